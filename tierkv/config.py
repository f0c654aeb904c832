"""Store configuration: one dataclass, loadable from a dict, a YAML/JSON file or `TIERKV_*` variables.

Validated once, in `__post_init__`, with messages that name the field, so a bad value fails at
start-up and not in the middle of serving.

`parse_bytes`, `parse_int`, `parse_float`, `parse_bool` and `parse_listen_host` are the project's one way to read a
setting (the store's fields, the command line's options, the vLLM connector's keys): the same
spellings are accepted everywhere and a refusal is a `ConfigError` that names the field and says
what was expected.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from dataclasses import field as dataclass_field
from fractions import Fraction
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .remote_url import SECRET_ENV, parse_remote_url

ENV_PREFIX = "TIERKV_"
CONFIG_ENV = "TIERKV_CONFIG"  # path of a YAML/JSON file that `StoreConfig.from_env` reads first
LOG_LEVEL_ENV = "TIERKV_LOG_LEVEL"  # level of the "tierkv" logger
# TIERKV_ variables that steer the program rather than name a store field (remote credentials
# among them: read by the remote tier when it connects, never stored in a config).
_PROGRAM_ENV = frozenset({CONFIG_ENV, LOG_LEVEL_ENV}) | SECRET_ENV
DURABILITY = ("none", "batch", "every")
REMOTE_WRITE = ("through", "evict")

# Decimal units are powers of 1000, binary ones (KiB...) powers of 1024; bare k/m/g/t/p are decimal.
_UNITS = {"": 1, "b": 1,
          "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "p": 1000**5, "pb": 1000**5,
          "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4, "pib": 1024**5}
_SIZE = re.compile(r"^\s*([+-]?[0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")
_INT = re.compile(r"^\s*[+-]?[0-9]+\s*$")
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
               "error": logging.ERROR, "critical": logging.CRITICAL}
_BUDGET_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_HOST_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
DEFAULT_METRICS_HOST = "127.0.0.1"


def check_budget_name(name: str) -> str:
    """A GPU budget's name: it becomes part of a file name in /dev/shm, so only safe characters."""
    if not isinstance(name, str) or not _BUDGET_NAME.match(name):
        raise ConfigError(f"gpu_budget_name: expected 1-64 letters, digits, '_', '.' or '-', got {name!r}")
    return name


# -- the shared parsers ------------------------------------------------------------------


def parse_bytes(value: Any, field: str) -> int:
    """A size in bytes, >= 0: an int, a whole float, or a string such as "512MiB", "4 GB", "1.5GiB".

    Units (any case, optional space before them): B; KB, MB, GB, TB, PB (powers of 1000);
    KiB, MiB, GiB, TiB, PiB (powers of 1024). A fractional result is rounded down to whole bytes.
    Bools are refused. Raises `ConfigError` naming `field`.
    """
    exact = _exact_bytes(value)
    if exact is None:
        raise ConfigError(f"{field}: expected a size such as 64MiB, 1.5GiB or 1048576 (units B, KB, MB, GB, TB, PB "
                          f"or KiB, MiB, GiB, TiB, PiB), got {value!r}")
    if exact < 0:
        raise ConfigError(f"{field}: must be >= 0, got {value!r}")
    return int(exact)


def _exact_bytes(value: Any) -> Fraction | None:
    """The exact number of bytes `value` spells, or None where it spells no size."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return Fraction(value)
    if isinstance(value, float):
        return Fraction(value) if value.is_integer() else None
    if isinstance(value, str) and (m := _SIZE.match(value)) and m.group(2).lower() in _UNITS:
        return Fraction(m.group(1)) * _UNITS[m.group(2).lower()]
    return None


def parse_int(value: Any, field: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """A whole number within [`minimum`, `maximum`] (either bound optional): an int or a decimal string.

    Strings may carry a sign and surrounding spaces ("12", " -3 "); floats ("4.0"), other bases,
    digit separators and bools are refused. Raises `ConfigError` naming `field` and the bounds.
    """
    n: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    elif isinstance(value, str) and _INT.match(value):
        n = int(value)
    if n is None or (minimum is not None and n < minimum) or (maximum is not None and n > maximum):
        if minimum is not None and maximum is not None:
            expected = f"a whole number from {minimum} to {maximum}"
        elif minimum is not None:
            expected = f"a whole number >= {minimum}"
        elif maximum is not None:
            expected = f"a whole number <= {maximum}"
        else:
            expected = "a whole number"
        raise ConfigError(f"{field}: expected {expected}, got {value!r}")
    return n


def parse_float(value: Any, field: str, *, above: float | None = None) -> float:
    """A finite number greater than `above` (when given): an int, a float or a string such as "0.5", "2e-3".

    Bools, NaN and infinities are refused. Raises `ConfigError` naming `field`.
    """
    x: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        x = float(value)
    elif isinstance(value, str):
        try:
            x = float(value)
        except ValueError:
            x = None
    if x is None or not math.isfinite(x) or (above is not None and not x > above):
        expected = "a number" if above is None else f"a number > {above:g}"
        raise ConfigError(f"{field}: expected {expected}, got {value!r}")
    return x


def parse_bool(value: Any, field: str) -> bool:
    """True or False, from a bool, the ints 1 and 0, or (any case, spaces around ignored)
    "1"/"0", "true"/"false", "yes"/"no", "on"/"off". Raises `ConfigError` naming `field`."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
    raise ConfigError(f"{field}: expected true or false (or yes/no, on/off, 1/0), got {value!r}")


def parse_listen_host(value: Any, field: str) -> str:
    """An address to listen on: an IPv4 or IPv6 address ("0.0.0.0" and "::" are every interface;
    brackets around IPv6 are dropped) or a host name of RFC 1123 form. Whether this machine has
    that address is known only when binding; the exporter reports that naming `field` too."""
    text = value.strip() if isinstance(value, str) else None
    if text and text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if text:
        try:
            return str(ipaddress.ip_address(text))
        except ValueError:
            labels = text.removesuffix(".").split(".")
            numeric = all(label.isdigit() for label in labels)  # "300.1.1.1" is a bad address, not a name
            if len(text) <= 253 and not numeric and all(_HOST_LABEL.match(label) for label in labels):
                return text
    raise ConfigError(f"{field}: expected an IP address or host name to listen on ('127.0.0.1': this machine only, "
                      f"'0.0.0.0' or '::': every interface), got {value!r}")


def apply_log_level(environ: Mapping[str, str] | None = None) -> None:
    """Set the "tierkv" logger's level from `TIERKV_LOG_LEVEL` (debug, info, warning, error or
    critical, any case); unset or empty leaves logging alone. Where neither that logger nor the
    root logger has a handler, one writing to stderr is added, so the level chosen is seen."""
    env = os.environ if environ is None else environ
    word = env.get(LOG_LEVEL_ENV, "").strip().lower()
    if not word:
        return
    if word not in _LOG_LEVELS:
        raise ConfigError(f"{LOG_LEVEL_ENV}: expected one of {list(_LOG_LEVELS)}, got {env[LOG_LEVEL_ENV]!r}")
    logger = logging.getLogger("tierkv")
    logger.setLevel(_LOG_LEVELS[word])
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)


def _read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The mapping a JSON or YAML file holds (YAML for .yaml/.yml, JSON otherwise)."""
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
    return data


def _close_field(name: str, known: set[str]) -> str | None:
    """The field a `TIERKV_` variable name most likely misspells, if any is close."""
    import difflib

    field = name[len(ENV_PREFIX):].lower()
    close = difflib.get_close_matches(field, sorted(known), n=1, cutoff=0.8)
    return close[0] if close else None


def _ignored_text(name: str) -> str:
    return f"environment variable {name} is not a tierkv setting (no config field of that name); ignored"


def _unknown_env(name: str, known: set[str]) -> None:
    """A typo of a field is an error that names the field; another program's variable only a warning."""
    close = _close_field(name, known)
    if close is not None:
        raise ConfigError(f"environment variable {name} names no config field; did you mean "
                          f"{ENV_PREFIX}{close.upper()} ({close})?")
    logging.getLogger("tierkv.config").warning("%s", _ignored_text(name))


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
    verify_reads: check each block read from host, disk or a remote store against its checksum (TREE_CHECKSUM, docs/checksums.md);
        off, blocks are served unchecked (disk and remote records still carry checksums, for stores that check).
    io_threads: threads issuing disk reads and writes (posix path).
    disk_io: "auto" (kvikio where it can work, else posix), "posix" or "kvikio".
    writeback_bytes: bound of the queue of blocks on their way to disk; demotions to disk
        wait for the disk only when it is full.
    metrics_port: serve this store's Prometheus metrics over HTTP at /metrics on this TCP port
        (0: a free port, see `BlockStore.metrics_url`); None: no exporter. See docs/metrics.md.
    metrics_host: the address that exporter listens on: "127.0.0.1" (the default: this machine
        only), "0.0.0.0" or "::" (every interface, for a Prometheus on another host), or one
        interface's address or host name. An address this machine does not have is a `ConfigError`
        when the store opens.
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
    remote_url: a Redis Cluster (or plain Redis) shared by a fleet of stores, below the disk tier:
        redis:// or rediss:// (TLS) URL of any node, or a comma-separated list; credentials in the
        URL or in TIERKV_REMOTE_USERNAME / TIERKV_REMOTE_PASSWORD. None: no remote tier. See docs/remote.md.
    remote_bytes: how much of the remote tier this store keeps track of (its index entries), not the
        cluster's size: the cluster's own maxmemory and remote_ttl_s bound that.
    remote_ttl_s: expiry of each block written to the remote tier, in seconds; None: no TTL.
    remote_timeout_s: limit of one network operation (connect, or one batch) before it counts as a miss.
    remote_write: "through": every new block is written to the remote tier (asynchronously) as it is
        stored locally, so other stores see it at once; "evict": only blocks leaving the last local tier.
    remote_read_only: read blocks others published, never write (for nodes that may consume, not publish).
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
    metrics_port: int | None = None
    metrics_host: str = DEFAULT_METRICS_HOST
    device_elastic: bool = False
    device_min_bytes: int = 0
    device_page_bytes: int | None = None
    gpu_budget_name: str | None = None
    gpu_budget_bytes: int | None = None
    remote_url: str | None = dataclass_field(default=None, repr=False)  # may carry a password
    remote_bytes: int = 64 << 30
    remote_ttl_s: float | None = None
    remote_timeout_s: float = 1.0
    remote_write: str = "through"
    remote_read_only: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "device_bytes", parse_bytes(self.device_bytes, "device_bytes"))
        object.__setattr__(self, "host_bytes", parse_bytes(self.host_bytes, "host_bytes"))
        if self.device is not None and (not isinstance(self.device, str) or not re.match(r"^(cpu|cuda(:\d+)?)$", self.device)):
            raise ConfigError(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.pin_host is not None:
            object.__setattr__(self, "pin_host", parse_bool(self.pin_host, "pin_host"))
        object.__setattr__(self, "disk_bytes", parse_bytes(self.disk_bytes, "disk_bytes"))
        if self.disk_path is not None:
            if not isinstance(self.disk_path, (str, os.PathLike)) or not str(self.disk_path):
                raise ConfigError(f"disk_path: expected a directory path, got {self.disk_path!r}")
            object.__setattr__(self, "disk_path", os.fspath(self.disk_path))
        if self.durability not in DURABILITY:
            raise ConfigError(f"durability: expected one of {list(DURABILITY)}, got {self.durability!r}")
        object.__setattr__(self, "flush_on_close", parse_bool(self.flush_on_close, "flush_on_close"))
        object.__setattr__(self, "verify_reads", parse_bool(self.verify_reads, "verify_reads"))
        object.__setattr__(self, "io_threads", parse_int(self.io_threads, "io_threads", minimum=1, maximum=256))
        object.__setattr__(self, "writeback_bytes", parse_bytes(self.writeback_bytes, "writeback_bytes"))
        if self.metrics_port is not None:
            object.__setattr__(self, "metrics_port", parse_int(self.metrics_port, "metrics_port", minimum=0, maximum=65535))
        host = DEFAULT_METRICS_HOST if self.metrics_host is None else self.metrics_host  # None (TIERKV_...=""): the default
        object.__setattr__(self, "metrics_host", parse_listen_host(host, "metrics_host"))
        if self.disk_io not in ("auto", "posix", "kvikio"):
            raise ConfigError(f"disk_io: expected 'auto', 'posix' or 'kvikio', got {self.disk_io!r}")
        self._check_elastic()
        self._check_remote()

    def _check_remote(self) -> None:
        if self.remote_url is not None:
            parse_remote_url(self.remote_url, "remote_url")
        object.__setattr__(self, "remote_bytes", parse_bytes(self.remote_bytes, "remote_bytes"))
        if self.remote_ttl_s is not None:
            object.__setattr__(self, "remote_ttl_s", parse_float(self.remote_ttl_s, "remote_ttl_s", above=0.001))
        object.__setattr__(self, "remote_timeout_s", parse_float(self.remote_timeout_s, "remote_timeout_s", above=0))
        if self.remote_write not in REMOTE_WRITE:
            raise ConfigError(f"remote_write: expected one of {list(REMOTE_WRITE)}, got {self.remote_write!r}")
        object.__setattr__(self, "remote_read_only", parse_bool(self.remote_read_only, "remote_read_only"))
        if self.remote_url is None:
            unset = {"remote_ttl_s": None, "remote_write": "through", "remote_read_only": False}
            for name, value in unset.items():
                if getattr(self, name) != value:
                    raise ConfigError(f"{name}: only used by the remote tier; set remote_url or leave it unset")

    def _check_elastic(self) -> None:
        object.__setattr__(self, "device_elastic", parse_bool(self.device_elastic, "device_elastic"))
        object.__setattr__(self, "device_min_bytes", parse_bytes(self.device_min_bytes, "device_min_bytes"))
        for size_field in ("device_page_bytes", "gpu_budget_bytes"):
            if getattr(self, size_field) is not None:
                object.__setattr__(self, size_field, parse_bytes(getattr(self, size_field), size_field))
        if self.device_page_bytes == 0:
            raise ConfigError("device_page_bytes: must be > 0, or unset for the GPU's granularity")
        name = self.gpu_budget_name
        if name is not None:
            check_budget_name(name)
        if not self.device_elastic:
            unset = {"device_min_bytes": 0, "device_page_bytes": None, "gpu_budget_name": None, "gpu_budget_bytes": None}
            for field, value in unset.items():
                if getattr(self, field) != value:
                    raise ConfigError(f"{field}: only used by an elastic device tier; set device_elastic=true or leave it unset")
            return
        if (name is None) != (self.gpu_budget_bytes is None):
            raise ConfigError("gpu_budget_name and gpu_budget_bytes go together: name the shared budget and give its size")
        if self.device_min_bytes and name is None:
            raise ConfigError("device_min_bytes: a minimum only matters against others sharing a GPU budget; set gpu_budget_name")
        if self.device_min_bytes > self.device_bytes:
            raise ConfigError(f"device_min_bytes: {self.device_min_bytes} is above device_bytes {self.device_bytes}, "
                              "the tier's maximum")
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
        return cls.from_dict(_read_config_file(path))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, base: Mapping[str, Any] | None = None) -> StoreConfig:
        """`base`, overridden by the file `TIERKV_CONFIG` names (if set), overridden by `TIERKV_<FIELD>` variables.

        A `TIERKV_<FIELD>` value of "", "none" or "auto" means unset (None). A `TIERKV_` name
        that is no field but close to one (a typo: TIERKV_HOST_BYTE) is an error suggesting the
        field; any other (a deployment's own TIERKV_ variable) is logged as a warning and ignored
        (`ignored_env`). `TIERKV_LOG_LEVEL`, when set, sets the "tierkv" logger's level
        (`apply_log_level`). `environ` defaults to `os.environ`.
        """
        env = os.environ if environ is None else environ
        apply_log_level(env)
        known = {f.name for f in fields(cls)}
        data = dict(base or {})
        path = env.get(CONFIG_ENV, "").strip()
        from_file: set[str] = set()
        if path:
            try:
                file_data = _read_config_file(Path(path).expanduser())
            except ConfigError as e:
                raise ConfigError(f"{e} (named by {CONFIG_ENV})") from None
            unknown = sorted(set(file_data) - known)
            if unknown:
                raise ConfigError(f"config file {path} (named by {CONFIG_ENV}): unknown config field(s) {unknown}; "
                                  f"known fields are {sorted(known)}")
            data.update(file_data)
            from_file = set(file_data)
        for name, value in env.items():
            if not name.startswith(ENV_PREFIX) or name in _PROGRAM_ENV:
                continue
            field = name[len(ENV_PREFIX):].lower()
            if field not in known:
                _unknown_env(name, known)
                continue
            data[field] = None if value.lower() in ("", "none", "auto") else value
            from_file.discard(field)
        try:
            return cls.from_dict(data)
        except ConfigError as e:
            if str(e).partition(":")[0] in from_file:  # say where a bad value came from
                raise ConfigError(f"{e} (in config file {path}, named by {CONFIG_ENV})") from None
            raise

    @classmethod
    def ignored_env(cls, environ: Mapping[str, str] | None = None) -> list[str]:
        """What `from_env` says of the `TIERKV_` variables it ignores (names far from every field)."""
        env = os.environ if environ is None else environ
        known = {f.name for f in fields(cls)}
        return [_ignored_text(name) for name in sorted(env) if name.startswith(ENV_PREFIX)
                and name not in _PROGRAM_ENV and name[len(ENV_PREFIX):].lower() not in known
                and _close_field(name, known) is None]

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

