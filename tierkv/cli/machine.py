"""What this machine offers tierkv, found out without side effects: the data behind `tierkv info`.

Every probe reports what it saw, including why something is unavailable, and none of them may
hang or crash on a machine without a GPU. In particular kvikio's file I/O (and opening the
cuFile driver) is never touched here: without a CUDA driver it fails or hangs, and with one
it is a costly step that `info` has no business taking.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import platform
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..config import StoreConfig
from ..errors import ConfigError
from ..ops import cuda_driver as _cuda
from ..ops.cpu_build import describe as cpu_checksum_path
from ..ops.transfer import transfer_paths
from ..tiers.disk import kvikio_status


@dataclass(frozen=True)
class Probe:
    """Whether a capability is usable here, and a one-line account of what was found."""

    available: bool
    detail: str


@dataclass(frozen=True)
class GPU:
    index: int
    name: str
    memory_bytes: int
    compute_capability: str


@dataclass(frozen=True)
class MachineInfo:
    python: str
    platform: str
    cpu_count: int
    torch_version: str
    torch_build: str  # "CUDA 12.8", "ROCm 6.2" or "CPU"
    gpus: list[GPU]
    cuda_driver: Probe
    pinned_memory: Probe
    kvikio: Probe
    cpu_checksums: Probe  # the compiled C hasher, or xxhash where it cannot be built
    config: dict[str, Any] | None
    config_error: str | None
    config_warnings: list[str]  # TIERKV_ variables that name no field and are ignored
    device_tier: str  # where a `BlockStore` made from this config would keep its device tier
    disk_io: str  # which file I/O a disk tier would use here, and why
    transfer_paths: dict[str, Any]  # copy path per operation, direction and block size
    no_gpu: str | None = None  # why no GPU is listed, in plain words; None when there are GPUs

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def torch_build() -> str:
    if torch.version.cuda:
        return f"CUDA {torch.version.cuda}"
    if torch.version.hip:
        return f"ROCm {torch.version.hip}"
    return "CPU"


def detect_gpus() -> list[GPU]:
    if not torch.cuda.is_available():
        return []
    found = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        found.append(GPU(index=i, name=p.name, memory_bytes=p.total_memory, compute_capability=f"{p.major}.{p.minor}"))
    return found


NO_DRIVER = "no CUDA driver: none is installed, as on a machine without an NVIDIA GPU"


def probe_cuda_driver() -> Probe:
    """Initialise the CUDA driver API through cuda-python and read its version.

    Where the driver library cannot even be loaded (every CPU-only machine), say so plainly
    rather than pass on the loader's message about system search paths.
    """
    available, detail = _cuda.probe()
    if not available and detail.startswith("no CUDA driver: ") and "cuInit failed with" not in detail:
        return Probe(False, NO_DRIVER)
    return Probe(available, detail)


def no_gpu_reason(driver: Probe, build: str) -> str | None:
    """Why torch lists no GPU, in the words a user needs; None when it lists some."""
    if torch.cuda.is_available():
        return None
    if not driver.available:
        return "none: no GPU on this machine (CPU only; the device tier uses CPU memory)"
    if build == "CPU":
        return "none visible to torch: this torch is a CPU build; install a CUDA build to use the GPU"
    return "none visible to torch (check CUDA_VISIBLE_DEVICES)"


def probe_pinned_memory() -> Probe:
    """Page-locked host memory is a CUDA facility: only try it where torch sees CUDA."""
    if not torch.cuda.is_available():
        return Probe(False, "unavailable: torch sees no CUDA device, so the host tier uses plain memory")
    try:
        torch.empty(1, pin_memory=True)
    except RuntimeError as e:
        return Probe(False, f"pinning failed: {e}")
    return Probe(True, "works; the host tier is pinned")


def probe_kvikio(driver: Probe) -> Probe:
    """kvikio's presence and compat-mode setting, read from `kvikio.defaults` only.

    Whether GPUDirect Storage is really used is decided by kvikio when the first file is
    opened (compat mode AUTO tries cuFile, then falls back to POSIX); that is not done here.
    """
    if importlib.util.find_spec("kvikio") is None:
        return Probe(False, "kvikio not installed (the 'gpu' extra installs it)")
    try:
        import kvikio
        import kvikio.defaults
    except (ImportError, RuntimeError, OSError) as e:  # its native libraries (libkvikio, libcufile) failed to load
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return Probe(False, f"kvikio is installed but does not load: {reason}")
    version = kvikio.__version__
    if not driver.available:
        return Probe(False, f"kvikio {version} installed, no CUDA driver so file I/O through it is unavailable")
    name = kvikio.defaults.get("compat_mode").name
    return Probe(True, f"kvikio {version}, compat_mode {name}: {_COMPAT_MODES[name]}")


_COMPAT_MODES = {
    "ON": "POSIX I/O through bounce buffers, no GDS",
    "OFF": "GDS through cuFile required",
    "AUTO": "GDS through cuFile where available, else POSIX",
}


def config_in_effect(environ: dict[str, str] | None = None) -> tuple[dict[str, Any] | None, str | None]:
    """`StoreConfig.from_env()` as a dict, or the error that stops it, never an exception."""
    logger = logging.getLogger("tierkv.config")
    level = logger.level
    logger.setLevel(logging.ERROR)  # ignored variables are listed by `collect`, not logged
    try:
        return StoreConfig.from_env(environ).to_dict(), None
    except ConfigError as e:
        return None, str(e)
    finally:
        logger.setLevel(level)


def _quiet_transfer_paths() -> dict[str, Any]:
    """`transfer_paths()` without the notice that CUDA is missing: the report says so itself."""
    logger = logging.getLogger("tierkv")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return transfer_paths()
    finally:
        logger.setLevel(level)


def collect(environ: dict[str, str] | None = None) -> MachineInfo:
    driver = probe_cuda_driver()
    config, error = config_in_effect(environ)
    device = "unknown (config error)"
    if config is not None:
        device = config["device"] or ("cuda" if torch.cuda.is_available() else "cpu (no CUDA device)")
    build = torch_build()
    return MachineInfo(
        python=platform.python_version(),
        platform=f"{platform.system()} {platform.machine()}",
        cpu_count=os.cpu_count() or 0,
        torch_version=torch.__version__,
        torch_build=build,
        gpus=detect_gpus(),
        cuda_driver=driver,
        pinned_memory=probe_pinned_memory(),
        kvikio=probe_kvikio(driver),
        cpu_checksums=Probe(*cpu_checksum_path()),
        config=config,
        config_error=error,
        config_warnings=StoreConfig.ignored_env(environ),
        device_tier=device,
        disk_io=disk_io_in_effect(config),
        transfer_paths=_quiet_transfer_paths(),
        no_gpu=no_gpu_reason(driver, build),
    )


def disk_io_in_effect(config: dict[str, Any] | None) -> str:
    """The disk tier's I/O path under `config`, with the reason kvikio is or is not used."""
    usable, why = kvikio_status()
    wanted = (config or {}).get("disk_io", "auto")
    if wanted == "posix" or (wanted == "auto" and not usable):
        if wanted == "posix":
            return "posix (disk_io=posix)"
        return f"posix (pread/pwrite, O_DIRECT where the file system allows): {why}"
    return f"kvikio: {why}" if usable else f"disk_io=kvikio cannot work here: {why}"
