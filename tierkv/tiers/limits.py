"""How much memory a tier can ever get here, so that a capacity is refused before anything is built for it.

A tier's free list has one entry per slot and a memory tier allocates its pool up front, so a
size far beyond the machine (host_bytes=100TiB) used to build a list of billions of entries and
then fail in the allocator with an error that names no field (`MemoryError('')`, or torch's
RuntimeError), or to be killed by the OOM killer later. The limits here are the hard ones, past
which an allocation can never succeed: the machine's memory (plus swap, for memory that may be
swapped), the cgroup's limit, and the process's address-space and data limits (`ulimit -v`).
A size within them may still not fit now; that allocation error is turned into one that names
the field too (`allocate`).
"""

from __future__ import annotations

import contextlib
import resource
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import ConfigError


def _size(n: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def _meminfo() -> dict[str, int]:
    out = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            name, _, rest = line.partition(":")
            fields = rest.split()
            if fields and fields[0].isdigit():
                out[name] = int(fields[0]) * 1024
    return out


def _status(field: str) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return None


def _read_int(path: str) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        text = Path(path).read_text().strip()
        return None if text == "max" else int(text)
    return None


def host_memory_limits(pinned: bool) -> list[tuple[int, str]]:
    """(bytes this process could still get, what limits it) for each hard limit that applies."""
    limits: list[tuple[int, str]] = []
    info = _meminfo()
    if "MemTotal" in info:
        total = info["MemTotal"] + (0 if pinned else info.get("SwapTotal", 0))
        limits.append((total, "the machine's memory" + ("" if pinned else " and swap")))
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit = _read_int(limit_file)
        if limit is not None and limit < 1 << 60:  # cgroup v1 says "no limit" with a huge number
            limits.append((max(limit - (_read_int(usage_file) or 0), 0), "the cgroup's memory limit, less its use"))
            break
    for rlimit, used_field, what in ((resource.RLIMIT_AS, "VmSize", "the address-space limit (ulimit -v), less its use"),
                                     (resource.RLIMIT_DATA, "VmData", "the data-segment limit (ulimit -d), less its use")):
        soft, _ = resource.getrlimit(rlimit)
        if soft != resource.RLIM_INFINITY:
            limits.append((max(soft - (_status(used_field) or 0), 0), what))
    return limits


def check_capacity(field: str, nbytes: int, device: torch.device, pinned: bool = False) -> None:
    """ConfigError naming `field` when `nbytes` of memory on `device` can never be had here."""
    if nbytes <= 0:
        return
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        limits = [(total, f"the memory of {torch.cuda.get_device_name(device)}")]
    else:
        limits = host_memory_limits(pinned)
    for room, what in limits:
        if nbytes > room:
            raise ConfigError(f"{field}: {_size(nbytes)} is more than this process can ever get ({what}: "
                              f"{_size(room)}); lower {field}")


def allocate(field: str, nbytes: int, make: Callable[[], torch.Tensor]) -> torch.Tensor:
    """`make()`, with an allocator's failure turned into a ConfigError that names `field` and the size."""
    try:
        return make()
    except (MemoryError, RuntimeError) as e:  # torch raises RuntimeError (or its OutOfMemoryError subclass)
        why = str(e).strip().splitlines()[0] if str(e).strip() else "out of memory"
        raise ConfigError(f"{field}: allocating {_size(nbytes)} failed ({why}); lower {field} or free memory") from None
