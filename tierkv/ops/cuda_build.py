"""Compile `csrc/*.cu` at first use with NVRTC, cache the cubin on disk, load and launch through the driver API.

Why NVRTC through cuda-python and not a torch C++ extension: nothing is built at install time,
the kernels do not link against torch's C++ ABI (so one wheel works with any torch), and the
first use on a new GPU costs one compile of well under a second, after which the cubin comes
from `~/.cache/tierkv/kernels` (or `$TIERKV_KERNEL_CACHE`). Kernels are launched on the caller's
CUDA stream handle, so they order with torch work like any torch op.

Every driver or NVRTC failure becomes a `KernelError` that names the kernel or source file.
Driver calls go through `cuda_driver` (the one lazy import, `cuInit` and result check).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import cuda_driver as _cuda

log = logging.getLogger("tierkv.ops")

try:  # `tierkv._csrc` when installed; the source tree's csrc/ maps to it (see pyproject)
    import tierkv._csrc as _csrc_pkg  # type: ignore[import-not-found]  # exists only once installed

    CSRC_DIR = Path(_csrc_pkg.__file__).parent
except ImportError:  # running from a source checkout without an editable install
    CSRC_DIR = Path(__file__).resolve().parents[2] / "csrc"


class KernelError(_cuda.CudaError):
    """A CUDA kernel could not be compiled, loaded or launched; the message names it."""


def cuda_driver() -> Any:
    """The cuda.bindings driver module, imported on first use so CPU-only machines never load it."""
    return _cuda.driver()


def check_cuda(result: tuple | Any, what: str) -> tuple:
    """Unpack a cuda.bindings result tuple, raising `KernelError(what: <error name>)` on failure."""
    return _cuda.check(result, what, error=KernelError)


def cache_dir() -> Path:
    env = os.environ.get("TIERKV_KERNEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "tierkv" / "kernels"


def nvrtc_version() -> tuple[int, int]:
    from cuda.bindings import nvrtc

    err, major, minor = nvrtc.nvrtcVersion()
    if int(err) != 0:
        raise KernelError(f"nvrtcVersion failed: {err}")
    return major, minor


def compile_cubin(source: str, arch: str) -> bytes:
    """NVRTC-compile `csrc/<source>` for `arch` (e.g. "sm_90"), through the on-disk cache.

    The cache key covers the source text, the options and the NVRTC version, so an edited
    kernel or a new toolkit never loads a stale cubin. Works without a GPU (only libnvrtc).
    """
    from cuda.bindings import nvrtc

    text = (CSRC_DIR / source).read_bytes()
    options = [f"--gpu-architecture={arch}".encode(), b"-std=c++17", b"-lineinfo"]
    key = hashlib.sha256(text + b"\0".join(options) + repr(nvrtc_version()).encode()).hexdigest()[:20]
    path = cache_dir() / f"{Path(source).stem}-{arch}-{key}.cubin"
    if path.exists():
        return path.read_bytes()
    err, prog = nvrtc.nvrtcCreateProgram(text, source.encode(), 0, [], [])
    if int(err) != 0:
        raise KernelError(f"{source}: nvrtcCreateProgram failed: {err}")
    try:
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(options), options)
        if int(err) != 0:
            _, size = nvrtc.nvrtcGetProgramLogSize(prog)
            buf = b" " * size
            nvrtc.nvrtcGetProgramLog(prog, buf)
            raise KernelError(f"{source}: NVRTC compile for {arch} failed:\n{buf.decode(errors='replace')}")
        _, size = nvrtc.nvrtcGetCUBINSize(prog)
        cubin = b" " * size
        (err,) = nvrtc.nvrtcGetCUBIN(prog, cubin)
        if int(err) != 0:
            raise KernelError(f"{source}: nvrtcGetCUBIN failed: {err}")
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(cubin)
    os.replace(tmp, path)  # atomic: a concurrent process sees the whole cubin or none
    return cubin


@dataclass
class _Arg:
    value: int | float
    ctype: type


def ptr(x: torch.Tensor | int) -> _Arg:
    return _Arg(x.data_ptr() if isinstance(x, torch.Tensor) else int(x), ctypes.c_void_p)


def i64(x: int) -> _Arg:
    return _Arg(int(x), ctypes.c_int64)


def i32(x: int) -> _Arg:
    return _Arg(int(x), ctypes.c_int32)


class Module:
    """One compiled `.cu` file loaded into the primary context of one device (the one torch uses)."""

    def __init__(self, source: str, device: torch.device) -> None:
        driver = cuda_driver()
        self.source = source
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.init()
        _cuda.init(error=KernelError)  # once per process
        (dev,) = check_cuda(driver.cuDeviceGet(index), "cuDeviceGet")
        (self._ctx,) = check_cuda(driver.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
        major, minor = torch.cuda.get_device_capability(index)
        self.arch = f"sm_{major}{minor}"
        self.num_sms = torch.cuda.get_device_properties(index).multi_processor_count
        cubin = compile_cubin(source, self.arch)
        self._make_current()
        (self._module,) = check_cuda(driver.cuModuleLoadData(cubin), f"{source}: cuModuleLoadData")
        self._functions: dict[str, Any] = {}

    def _make_current(self) -> None:
        driver = cuda_driver()
        (current,) = check_cuda(driver.cuCtxGetCurrent(), "cuCtxGetCurrent")
        if int(current) != int(self._ctx):
            check_cuda(driver.cuCtxSetCurrent(self._ctx), "cuCtxSetCurrent")

    def function(self, name: str) -> Any:
        fn = self._functions.get(name)
        if fn is None:
            (fn,) = check_cuda(cuda_driver().cuModuleGetFunction(self._module, name.encode()), f"{name}: cuModuleGetFunction")
            self._functions[name] = fn
        return fn

    def launch(self, name: str, grid: int, block: int, args: list[_Arg], stream: torch.cuda.Stream) -> None:
        """Queue `name<<<grid, block, 0, stream>>>(args)`; launch errors raise `KernelError` naming it."""
        driver = cuda_driver()
        self._make_current()
        params = (tuple(a.value for a in args), tuple(a.ctype for a in args))
        cu_stream = driver.CUstream(stream.cuda_stream)
        check_cuda(
            driver.cuLaunchKernel(self.function(name), grid, 1, 1, block, 1, 1, 0, cu_stream, params, 0),
            f"kernel {name} ({self.source})",
        )


_modules: dict[tuple[str, int], Module] = {}
_lock = threading.Lock()


def module(source: str, device: torch.device) -> Module:
    """The loaded module of `csrc/<source>` for `device`, compiled or read from cache once per process."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _lock:
        mod = _modules.get((source, index))
        if mod is None:
            mod = _modules[(source, index)] = Module(source, torch.device("cuda", index))
        return mod
