"""Store configuration: one dataclass, loadable from a dict, a YAML/JSON file or `TIERKV_*` variables.

Validated once, in `__post_init__`, with messages that name the field, so a bad value fails at
start-up and not in the middle of serving.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError

ENV_PREFIX = "TIERKV_"
DURABILITY = ("none", "batch", "every")

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}
_BUDGET_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def check_budget_name(name: str) -> str:
    """A GPU budget's name: it becomes part of a file name in /dev/shm, so only safe characters."""
    if not isinstance(name, str) or not _BUDGET_NAME.match(name):
        raise ConfigError(f"gpu_budget_name: expected 1-64 letters, digits, '_', '.' or '-', got {name!r}")
    return name


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: Any, field: str) -> int:
    """Accept an int or a size string such as "512MiB", "4 GB", "1.5GiB"."""
    if isinstance(value, bool):
        raise ConfigError(f"{field}: expected a size in bytes, got {value!r}")
    if isinstance(value, int):
        n = value
    elif isinstance(value, float) and value.is_integer():
        n = int(value)
    elif isinstance(value, str) and (m := _SIZE.match(value)) and m.group(2).lower() in _UNITS:
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    else:
        raise ConfigError(f"{field}: expected a size such as 1073741824 or '1GiB', got {value!r}")
    if n < 0:
        raise ConfigError(f"{field}: must be >= 0, got {value!r}")
    return n


def _parse_bool(value: Any, field: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return value.lower() in ("1", "true", "yes", "on")
    raise ConfigError(f"{field}: expected true or false, got {value!r}")


@dataclass(frozen=True)
class StoreConfig:
    """Capacities and placement of a `BlockStore`.

    device_bytes: capacity of the device tier (GPU memory; CPU memory where there is no GPU).
    host_bytes: capacity of the host tier (pinned RAM when CUDA is available).
    device: torch device of the device tier; None picks "cuda" when available, else "cpu".
    pin_host: pin the host tier; None pins exactly when CUDA is available.
    disk_path: directory of the disk tier (data files + LMDB manifest); None means no disk tier.
    disk_bytes: capacity of the disk tier, preallocated in the data files.
    durability: when disk writes become crash-safe. "none": never forced (after a crash some
        recent blocks may be gone, none corrupt); "batch": fsync + manifest commit after each
        batch of writes; "every": after each block. Reads are verified in every mode.
    flush_on_close: a clean close() writes blocks that live only in faster tiers to disk.
    verify_reads: check each block read from host or disk against its xxh3 checksum.
    io_threads: threads issuing disk reads and writes (posix path).
    disk_io: "auto" (kvikio where it can work, else posix), "posix" or "kvikio".
    writeback_bytes: bound of the queue of blocks on their way to disk; demotions to disk
        wait for the disk only when it is full.
    device_elastic: back the device tier with virtual memory whose pages are mapped as blocks
        arrive and unmapped when empty (CUDA VMM; an mmap range on CPU); device_bytes is then
        its maximum. See docs/elastic.md.
    device_min_bytes: device bytes this store keeps when others sharing its GPU budget ask it
        to shrink (needs gpu_budget_name).
    device_page_bytes: page of the elastic tier; None is the GPU's VMM granularity (2 MiB), or
        2 MiB on CPU.
    gpu_budget_name: name of a GPU memory budget shared by the elastic tiers of several stores,
        in this process or others; None: this store's tier grows alone up to device_bytes.
    gpu_budget_bytes: size of that budget; every member must give the same size.
    """

    device_bytes: int = 1 << 30
    host_bytes: int = 4 << 30
    device: str | None = None
    pin_host: bool | None = None
    disk_path: str | None = None
    disk_bytes: int = 16 << 30
    durability: str = "batch"
    flush_on_close: bool = True
    verify_reads: bool = True
    io_threads: int = 4
    disk_io: str = "auto"
    writeback_bytes: int = 256 << 20
    device_elastic: bool = False
    device_min_bytes: int = 0
    device_page_bytes: int | None = None
    gpu_budget_name: str | None = None
    gpu_budget_bytes: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "device_bytes", parse_bytes(self.device_bytes, "device_bytes"))
        object.__setattr__(self, "host_bytes", parse_bytes(self.host_bytes, "host_bytes"))
        if self.device is not None:
            if not isinstance(self.device, str) or not re.match(r"^(cpu|cuda(:\d+)?)$", self.device):
                raise ConfigError(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.pin_host is not None:
            object.__setattr__(self, "pin_host", _parse_bool(self.pin_host, "pin_host"))
        object.__setattr__(self, "disk_bytes", parse_bytes(self.disk_bytes, "disk_bytes"))
        if self.disk_path is not None:
            if not isinstance(self.disk_path, (str, os.PathLike)) or not str(self.disk_path):
                raise ConfigError(f"disk_path: expected a directory path, got {self.disk_path!r}")
            object.__setattr__(self, "disk_path", os.fspath(self.disk_path))
        if self.durability not in DURABILITY:
            raise ConfigError(f"durability: expected one of {list(DURABILITY)}, got {self.durability!r}")
        object.__setattr__(self, "flush_on_close", _parse_bool(self.flush_on_close, "flush_on_close"))
        object.__setattr__(self, "verify_reads", _parse_bool(self.verify_reads, "verify_reads"))
        threads = self.io_threads
        if isinstance(threads, str) and threads.isdigit():
            threads = int(threads)
        if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= 256:
            raise ConfigError(f"io_threads: expected an int from 1 to 256, got {self.io_threads!r}")
        object.__setattr__(self, "io_threads", threads)
        object.__setattr__(self, "writeback_bytes", parse_bytes(self.writeback_bytes, "writeback_bytes"))
        if self.disk_io not in ("auto", "posix", "kvikio"):
            raise ConfigError(f"disk_io: expected 'auto', 'posix' or 'kvikio', got {self.disk_io!r}")
        self._check_elastic()

    def _check_elastic(self) -> None:
        object.__setattr__(self, "device_elastic", _parse_bool(self.device_elastic, "device_elastic"))
        object.__setattr__(self, "device_min_bytes", parse_bytes(self.device_min_bytes, "device_min_bytes"))
        for name in ("device_page_bytes", "gpu_budget_bytes"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, parse_bytes(getattr(self, name), name))
        if self.device_page_bytes == 0:
            raise ConfigError("device_page_bytes: must be > 0, or unset for the GPU's granularity")
        name = self.gpu_budget_name
        if name is not None:
            check_budget_name(name)
        if not self.device_elastic:
            for field, unset in (("device_min_bytes", 0), ("device_page_bytes", None), ("gpu_budget_name", None), ("gpu_budget_bytes", None)):
                if getattr(self, field) != unset:
                    raise ConfigError(f"{field}: only used by an elastic device tier; set device_elastic=true or leave it unset")
            return
        if (name is None) != (self.gpu_budget_bytes is None):
            raise ConfigError("gpu_budget_name and gpu_budget_bytes go together: name the shared budget and give its size")
        if self.device_min_bytes and name is None:
            raise ConfigError("device_min_bytes: a minimum only matters against others sharing a GPU budget; set gpu_budget_name")
        if self.device_min_bytes > self.device_bytes:
            raise ConfigError(f"device_min_bytes: {self.device_min_bytes} is above device_bytes {self.device_bytes}, the tier's maximum")
        if self.gpu_budget_bytes is not None and self.device_min_bytes > self.gpu_budget_bytes:
            raise ConfigError(f"device_min_bytes: {self.device_min_bytes} is above gpu_budget_bytes {self.gpu_budget_bytes}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StoreConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**dict(data))

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> StoreConfig:
        """Read a JSON or YAML mapping (chosen by the file extension)."""
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as e:
            raise ConfigError(f"cannot read config file {p}: {e.strerror}") from None
        try:
            if p.suffix.lower() in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except Exception as e:  # both parsers raise their own error types
            raise ConfigError(f"config file {p} is not valid {p.suffix.lstrip('.') or 'JSON'}: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {p} must hold a mapping of field names to values")
        return cls.from_dict(data)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, base: Mapping[str, Any] | None = None) -> StoreConfig:
        """`base` overridden by `TIERKV_<FIELD>` variables; unknown `TIERKV_` names are errors."""
        env = os.environ if environ is None else environ
        data = dict(base or {})
        known = {f.name for f in fields(cls)}
        for name, value in env.items():
            if not name.startswith(ENV_PREFIX) or name in _NON_CONFIG_ENV:
                continue
            field = name[len(ENV_PREFIX):].lower()
            if field not in known:
                raise ConfigError(f"environment variable {name} names no config field; known: {sorted(known)}")
            data[field] = None if value.lower() in ("", "none", "auto") else value
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# TIERKV_ variables that steer the program rather than the store.
_NON_CONFIG_ENV = frozenset({"TIERKV_CONFIG", "TIERKV_LOG_LEVEL"})
