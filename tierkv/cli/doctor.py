"""`tierkv doctor`: does this machine give the store configuration in effect what it needs?

One check per line, each saying what it found and, where something is wrong, what to do. A
check's status is `ok`, `warn` (works, but slower or less safely than it could), `fail` (a store
with this configuration would not start, or not work as configured) or `skip` (does not apply
here, e.g. GPU checks on a CPU-only machine). The exit status is 1 when any check fails.

Each check is a function of the config and the machine, without side effects beyond a probe
file in disk_path (removed at once) and a TCP connection to the remote tier.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import logging
import os
import resource
import shutil
import socket
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..config import StoreConfig
from ..errors import ConfigError
from .text import format_bytes

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""

    def line(self, width: int) -> str:
        mark = {OK: "ok  ", WARN: "WARN", FAIL: "FAIL", SKIP: "-   "}[self.status]
        return f"  {mark}  {self.name.ljust(width)}  {self.detail}" + (f"; fix: {self.fix}" if self.fix else "")


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _pinned(config: StoreConfig) -> bool:
    return config.pin_host if config.pin_host is not None else _cuda()


def check_memlock(config: StoreConfig) -> Check:
    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    limit = "unlimited" if soft == resource.RLIM_INFINITY else format_bytes(soft)
    fix = "raise it: ulimit -l unlimited (systemd: LimitMEMLOCK=infinity; docker: --ulimit memlock=-1)"
    short = soft != resource.RLIM_INFINITY and soft < config.host_bytes
    if not _pinned(config):
        return Check("pinned-memory limit", OK, f"ulimit -l is {limit}; the host tier is not pinned here, so it does not apply")
    if short:
        return Check("pinned-memory limit", FAIL, f"ulimit -l is {limit}, below host_bytes {format_bytes(config.host_bytes)} "
                     "of pinned host tier (and GPUDirect Storage buffers count against it)", fix)
    return Check("pinned-memory limit", OK, f"ulimit -l is {limit}, enough for a pinned host tier of "
                 f"{format_bytes(config.host_bytes)}")


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_host_memory(config: StoreConfig) -> Check:
    need = config.host_bytes
    device_on_cpu = (config.device or ("cuda" if _cuda() else "cpu")) == "cpu"
    if device_on_cpu:
        need += config.device_bytes
    what = "host_bytes" + (" + device_bytes (the device tier is in CPU memory here)" if device_on_cpu else "")
    available = _available_memory()
    if available is None:
        return Check("free host memory", SKIP, "cannot read MemAvailable from /proc/meminfo")
    if need > available:
        return Check("free host memory", FAIL, f"{what} = {format_bytes(need)}, but only {format_bytes(available)} is "
                     "available", "lower TIERKV_HOST_BYTES / TIERKV_DEVICE_BYTES, or free memory")
    return Check("free host memory", OK, f"{what} = {format_bytes(need)} of {format_bytes(available)} available")


def _disk_dir(config: StoreConfig) -> Path | None:
    return None if config.disk_path is None else Path(config.disk_path)


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _fs_type(path: Path) -> str:
    """The file system type of `path` from /proc/mounts (longest matching mount point), or ''."""
    best, kind = "", ""
    try:
        real = os.path.realpath(path)
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and (real == parts[1] or real.startswith(parts[1].rstrip("/") + "/")) \
                        and len(parts[1]) > len(best):
                    best, kind = parts[1], parts[2]
    except OSError:
        pass
    return kind


def open_direct(path: str) -> int:
    """Open `path` with O_DIRECT, as the disk tier opens its data files; EINVAL where the file system refuses."""
    return os.open(path, os.O_RDWR | getattr(os, "O_DIRECT", 0))


def check_o_direct(config: StoreConfig) -> Check:
    directory = _disk_dir(config)
    if directory is None:
        return Check("O_DIRECT", SKIP, "no disk tier (disk_path not set)")
    where = _existing_parent(directory)
    if not where.is_dir() or not os.access(where, os.W_OK):
        return Check("O_DIRECT", FAIL, f"disk_path {directory}: {where} is not a writable directory",
                     "create the directory or give the store's user write access")
    fd, probe = tempfile.mkstemp(prefix=".tierkv-doctor-", dir=where)
    os.close(fd)
    try:
        try:
            fd = open_direct(probe)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            kind = _fs_type(where) or "this file system"
            return Check("O_DIRECT", WARN, f"disk_path {directory} is on {kind}, which refuses O_DIRECT: disk I/O goes "
                         "through the page cache (slower, and it competes with the host tier for memory)",
                         "put disk_path on a local ext4/xfs file system (NVMe)")
        os.close(fd)
    finally:
        os.unlink(probe)
    return Check("O_DIRECT", OK, f"disk_path {directory} ({_fs_type(where) or 'file system'}) takes O_DIRECT")


def check_disk_space(config: StoreConfig) -> Check:
    directory = _disk_dir(config)
    if directory is None:
        return Check("free disk", SKIP, "no disk tier (disk_path not set)")
    where = _existing_parent(directory)
    free = shutil.disk_usage(where).free
    held = sum(p.stat().st_size for p in directory.glob("data*.bin")) if directory.is_dir() else 0
    if config.disk_bytes > free + held:
        return Check("free disk", FAIL, f"disk_bytes {format_bytes(config.disk_bytes)} at {directory}, but only "
                     f"{format_bytes(free + held)} is free there (data files included)",
                     "lower TIERKV_DISK_BYTES or free space")
    return Check("free disk", OK, f"disk_bytes {format_bytes(config.disk_bytes)} of {format_bytes(free + held)} free at "
                 f"{where}")


def check_gds(config: StoreConfig) -> Check:
    from .machine import probe_cuda_driver, probe_kvikio

    driver = probe_cuda_driver()
    if config.disk_path is None and config.disk_io != "kvikio":
        return Check("GDS driver", SKIP, "no disk tier (disk_path not set)")
    if not driver.available:
        if config.disk_io == "kvikio":
            return Check("GDS driver", FAIL, "disk_io=kvikio, but there is no CUDA driver", "set disk_io to auto or posix")
        return Check("GDS driver", SKIP, "no GPU here: the disk tier uses POSIX I/O")
    kvikio = probe_kvikio(driver)
    if not kvikio.available:
        status = FAIL if config.disk_io == "kvikio" else WARN
        return Check("GDS driver", status, kvikio.detail, "pip install 'tierkv[gpu]' for kvikio (GPUDirect Storage)")
    return Check("GDS driver", OK, kvikio.detail)


def check_vmm(config: StoreConfig) -> Check:
    if not _cuda():
        status = SKIP if not config.device_elastic else OK
        return Check("CUDA VMM", status, "no GPU here" + (": the elastic device tier maps host pages instead"
                                                          if config.device_elastic else ""))
    from ..ops import cuda_driver

    try:
        d = cuda_driver.init()
        attribute = d.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED
        err, supported = d.cuDeviceGetAttribute(attribute, 0)
        ok = int(err) == 0 and bool(supported)
    except Exception as e:  # noqa: BLE001 - any driver failure means: no VMM
        return Check("CUDA VMM", FAIL if config.device_elastic else WARN, f"cannot ask the driver: {e}")
    if ok:
        return Check("CUDA VMM", OK, "virtual memory management supported on GPU 0")
    return Check("CUDA VMM", FAIL if config.device_elastic else WARN, "GPU 0 does not support virtual memory management",
                 "set device_elastic=false (a static device tier)" if config.device_elastic else "")


def check_triton(config: StoreConfig) -> Check:
    found = importlib.util.find_spec("triton") is not None
    if not _cuda():
        installed = " (triton installed)" if found else ""
        return Check("Triton", SKIP, f"no GPU here: paged attention kernels are not used{installed}")
    if not found:
        return Check("Triton", WARN, "triton is not installed: tierkv.ops.paged_attention is unavailable",
                     "pip install triton")
    return Check("Triton", OK, "installed")


def check_nvrtc(config: StoreConfig) -> Check:
    try:
        from ..ops.cuda_build import nvrtc_version

        version = "{}.{}".format(*nvrtc_version())
    except Exception as e:  # noqa: BLE001 - missing library, missing cuda-python: both mean no NVRTC
        version = ""
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if not _cuda():
        return Check("NVRTC", SKIP, "no GPU here: copies use torch" + (f" (NVRTC {version} found)" if version else ""))
    if not version:
        return Check("NVRTC", WARN, f"NVRTC does not load ({reason}): block copies fall back to torch (slower)",
                     "pip install nvidia-cuda-nvrtc")
    return Check("NVRTC", OK, f"NVRTC {version}: transfer kernels compile at first use")


def check_writer_lock(config: StoreConfig) -> Check:
    from ..metrics import writer_pid

    directory = _disk_dir(config)
    if directory is None:
        return Check("writer lock", SKIP, "no disk tier (disk_path not set)")
    lock = directory / "LOCK"
    if not lock.exists():
        return Check("writer lock", OK, f"{directory} has no writer lock yet")
    named = lock.read_text(errors="replace").strip()
    holder = writer_pid(directory)
    if holder is None:
        return Check("writer lock", OK, f"{lock} is free" + (f" (last writer pid {named} is gone)" if named else ""))
    if named == str(holder) and Path(f"/proc/{holder}").exists():
        return Check("writer lock", FAIL, f"{directory} is open for writing by pid {holder}: a store started with this "
                     "disk_path now fails", "stop that process, or give this store another disk_path")
    return Check("writer lock", FAIL, f"stale writer lock: {lock} is held by pid {holder} but names pid {named or '?'} "
                 "(a child that inherited the writer's descriptor?)", f"stop pid {holder}")


def _redis_address(url: str) -> tuple[str, int]:
    from urllib.parse import urlsplit

    first = urlsplit(url.split(",")[0].strip())
    return first.hostname or "127.0.0.1", first.port or 6379


def check_remote(config: StoreConfig) -> Check | None:
    url = getattr(config, "remote_url", None)
    if url is None:
        return None if not hasattr(config, "remote_url") else Check("remote tier", SKIP, "no remote tier (remote_url not set)")
    host, port = _redis_address(url)
    timeout = float(getattr(config, "remote_timeout_s", 1.0) or 1.0)
    try:
        with socket.create_connection((host, port), timeout=timeout) as conn:
            conn.sendall(b"PING\r\n")
            reply = conn.recv(64)
    except OSError as e:
        return Check("remote tier", FAIL, f"cannot reach Redis at {host}:{port}: {e.strerror or e}",
                     "start it, or fix remote_url / the firewall")
    if reply.startswith(b"+PONG") or reply.startswith(b"-NOAUTH"):
        return Check("remote tier", OK, f"Redis at {host}:{port} answers"
                     + (" (it wants credentials: TIERKV_REMOTE_PASSWORD)" if reply.startswith(b"-NOAUTH") else ""))
    return Check("remote tier", FAIL, f"{host}:{port} answered {reply[:40]!r} to PING, not Redis",
                 "point remote_url at a Redis node")


CHECKS: list[Callable[[StoreConfig], Check | None]] = [
    check_memlock, check_host_memory, check_o_direct, check_disk_space, check_gds, check_vmm, check_triton,
    check_nvrtc, check_writer_lock, check_remote,
]


def pinning_check(config: StoreConfig) -> Check | None:
    if config.pin_host and not _cuda():
        return Check("pinned memory", FAIL, "pin_host=true, but there is no CUDA device to pin host memory for",
                     "unset TIERKV_PIN_HOST (auto pins exactly when CUDA is available)")
    return None


def diagnose(environ: dict[str, str] | None = None) -> tuple[list[Check], dict[str, Any] | None]:
    logging.getLogger("tierkv.config").setLevel(logging.ERROR)  # ignored variables get a line of their own
    try:
        config = StoreConfig.from_env(environ)
    except ConfigError as e:
        return [Check("configuration", FAIL, str(e), "fix the TIERKV_* variable or the TIERKV_CONFIG file it names")], None
    checks = [Check("configuration", OK, "TIERKV_* variables and TIERKV_CONFIG read")]
    checks += [Check("configuration", WARN, w) for w in StoreConfig.ignored_env(environ)]
    for check in [pinning_check, *CHECKS]:
        try:
            found = check(config)
        except Exception as e:  # noqa: BLE001 - a broken probe is a finding, not a crash
            found = Check(check.__name__.removeprefix("check_").replace("_", " "), WARN, f"the check itself failed: {e}")
        if found is not None:
            checks.append(found)
    return checks, config.to_dict()


def run_doctor(as_json: bool, environ: dict[str, str] | None = None) -> int:
    checks, config = diagnose(environ)
    failed = any(c.status == FAIL for c in checks)
    if as_json:
        print(json.dumps({"ok": not failed, "checks": [asdict(c) for c in checks], "config": config}, indent=2, default=str))
    else:
        width = max(len(c.name) for c in checks)
        print("tierkv doctor: what the store configuration in effect needs from this machine")
        print("\n".join(c.line(width) for c in checks))
        print("some required things are missing (FAIL above)" if failed else "nothing required is missing")
    return 1 if failed else 0
