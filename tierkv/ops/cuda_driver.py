"""The CUDA driver API through cuda-python: one lazy import, one `cuInit`, one way to check results.

`cuda.bindings.driver` is imported on first use, so CPU-only machines never load it. It imports
without a GPU and even without `libcuda.so`: what the machine lacks shows at the first call,
where `cuInit` returns an error code (a driver but no usable device) or raises (no driver
library at all). `init()` makes that call once per process and turns either outcome into an
error; `probe()` reports it without raising, quickly and without side effects beyond `cuInit`,
so a machine without a driver is told apart from one with.

Every other failure comes back from `check(result, what)`, which unpacks a cuda.bindings result
tuple and raises `CudaError` (or the error type the caller names) as "<what> failed: <error name>".
"""

from __future__ import annotations

import os
import threading
from typing import Any

from ..errors import TierKVError


class CudaError(TierKVError, RuntimeError):
    """A CUDA driver call failed, or there is no CUDA driver; the message names the call and the error."""


def driver() -> Any:
    """The `cuda.bindings.driver` module, imported on first use (ImportError without cuda-python)."""
    from cuda.bindings import driver as cuda_bindings_driver

    return cuda_bindings_driver


def error_name(err: Any) -> str:
    """The driver's name for an error code ("CUDA_ERROR_OUT_OF_MEMORY"), or its text for anything else."""
    d = driver()
    if not isinstance(err, d.CUresult):
        return str(err)
    try:
        status, name = d.cuGetErrorName(err)
    except RuntimeError:  # the driver library cannot be loaded: the enum still knows the name
        return err.name
    if int(status) != 0 or name is None:
        return err.name
    return name.decode() if isinstance(name, bytes) else str(name)


def check(result: tuple | Any, what: str, error: type[Exception] = CudaError) -> tuple:
    """Unpack a cuda.bindings result tuple, raising `error(f"{what} failed: <error name>")` on failure.

    `result` is what a binding returns: `(CUresult, value, ...)`, or a bare `CUresult`. The values
    after the status come back as a tuple (empty for calls that return only a status).
    """
    if not isinstance(result, tuple):
        result = (result,)
    err = result[0]
    if int(err) != 0:
        raise error(f"{what} failed: {error_name(err)}")
    return result[1:]


# cuInit's outcome in this process: None once it succeeded, else (error message, probe detail).
# Keyed by pid so that a forked child, which cannot use its parent's driver state, calls cuInit
# for itself.
_init_pid: int | None = None
_init_failure: tuple[str, str] | None = None
_init_lock = threading.Lock()


def _cu_init() -> tuple[str, str] | None:
    """Call cuInit once per process: None on success, else why not (raises only ImportError)."""
    global _init_pid, _init_failure
    pid = os.getpid()
    with _init_lock:
        if _init_pid != pid:
            d = driver()
            failure: tuple[str, str] | None = None
            try:
                (err,) = d.cuInit(0)
            except RuntimeError as e:  # cuda-python raises when libcuda.so cannot be loaded at all
                failure = (f"cuInit failed: {e}", f"no CUDA driver: {e}")
            else:
                if int(err) != 0:
                    name = error_name(err)
                    failure = (f"cuInit failed: {name}", f"no CUDA driver: cuInit failed with {name}")
            _init_pid, _init_failure = pid, failure
        return _init_failure


def init(error: type[Exception] = CudaError) -> Any:
    """The driver module with `cuInit` done (once per process); raises `error("cuInit failed: ...")` without a driver."""
    d = driver()
    failure = _cu_init()
    if failure is not None:
        raise error(failure[0])
    return d


def probe() -> tuple[bool, str]:
    """Whether the driver API works here, and a one-line account of what was found; never raises."""
    try:
        d = driver()
    except ImportError as e:
        return False, f"cuda-python is not installed ({e}); cannot query the driver"
    failure = _cu_init()
    if failure is not None:
        return False, failure[1]
    err, version = d.cuDriverGetVersion()
    if int(err) != 0:
        return False, f"CUDA driver present but cuDriverGetVersion failed with {error_name(err)}"
    return True, f"CUDA driver API {version // 1000}.{version % 1000 // 10}"
