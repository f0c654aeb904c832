"""The NVRTC build path: every csrc/ source compiles for Hopper, the cubin cache, and errors that name the file.

NVRTC needs only libnvrtc, no GPU, so this runs on CPU machines that have it (the
`nvidia-cuda-nvrtc` wheel); elsewhere those tests are skipped. The shared driver wrapper
(`tierkv.ops.cuda_driver`) is tested against a stand-in driver module, so it runs everywhere.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest

from tierkv.ops import cuda_build
from tierkv.ops import cuda_driver as cuda
from tierkv.ops.cuda_build import KernelError, compile_cubin

try:
    cuda_build.nvrtc_version()
    HAVE_NVRTC = True
except Exception:  # noqa: BLE001 - libnvrtc missing in any way
    HAVE_NVRTC = False

needs_nvrtc = pytest.mark.skipif(not HAVE_NVRTC, reason="libnvrtc is not installed")

SOURCES = sorted(p.name for p in cuda_build.CSRC_DIR.glob("*.cu"))
KERNELS = [f"tierkv_{op}_w{w}" for op in ("gather", "scatter", "copy_rows") for w in (16, 8, 4, 2, 1)]


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TIERKV_KERNEL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@needs_nvrtc
def test_sources_are_found() -> None:
    assert "transfer.cu" in SOURCES


@needs_nvrtc
@pytest.mark.parametrize("source", SOURCES)
def test_every_source_compiles_for_sm90(source: str, private_cache: Path) -> None:
    cubin = compile_cubin(source, "sm_90")
    assert cubin[:4] == b"\x7fELF"
    if source == "transfer.cu":
        for name in KERNELS:
            assert name.encode() in cubin, name
    cached = list(private_cache.glob("*.cubin"))
    assert len(cached) == 1 and cached[0].read_bytes() == cubin


@needs_nvrtc
def test_cache_is_reused_and_keyed_by_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, private_cache: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "k.cu").write_text('extern "C" __global__ void k(float* x) { x[threadIdx.x] = 1.0f; }\n')
    monkeypatch.setattr(cuda_build, "CSRC_DIR", src)
    first = compile_cubin("k.cu", "sm_90")
    path = next(private_cache.glob("k-sm_90-*.cubin"))
    path.write_bytes(b"sentinel")  # a cache hit returns the file as stored
    assert compile_cubin("k.cu", "sm_90") == b"sentinel"
    (src / "k.cu").write_text('extern "C" __global__ void k(float* x) { x[threadIdx.x] = 2.0f; }\n')
    assert compile_cubin("k.cu", "sm_90")[:4] == first[:4] == b"\x7fELF"  # edited source: new key, fresh compile
    assert len(list(private_cache.glob("k-sm_90-*.cubin"))) == 2


@needs_nvrtc
def test_compile_error_names_the_file_and_the_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "broken.cu").write_text('extern "C" __global__ void k(float* x) { x[threadIdx.x] = undefined_name; }\n')
    monkeypatch.setattr(cuda_build, "CSRC_DIR", tmp_path)
    with pytest.raises(KernelError, match=r"broken\.cu: NVRTC compile for sm_90 failed:(.|\n)*undefined_name"):
        compile_cubin("broken.cu", "sm_90")


# -- the shared driver wrapper (tierkv.ops.cuda_driver), against a stand-in for cuda.bindings.driver --


Install = Callable[[SimpleNamespace], SimpleNamespace]


class FakeResult(enum.IntEnum):
    CUDA_SUCCESS = 0
    CUDA_ERROR_OUT_OF_MEMORY = 2
    CUDA_ERROR_NO_DEVICE = 100


def fake_driver(init: FakeResult | Exception, version: int = 12080) -> SimpleNamespace:
    calls: list[str] = []

    def cu_init(flags: int) -> tuple[FakeResult]:
        calls.append("cuInit")
        if isinstance(init, Exception):
            raise init
        return (init,)

    return SimpleNamespace(
        CUresult=FakeResult, calls=calls, cuInit=cu_init,
        cuGetErrorName=lambda err: (FakeResult.CUDA_SUCCESS, err.name.encode()),
        cuDriverGetVersion=lambda: (FakeResult.CUDA_SUCCESS, version),
    )


@pytest.fixture
def use_driver(monkeypatch: pytest.MonkeyPatch) -> Install:
    """Install a stand-in driver module for one test, with cuInit not yet called in this process."""
    def install(d: SimpleNamespace) -> SimpleNamespace:
        monkeypatch.setattr(cuda, "driver", lambda: d)
        monkeypatch.setattr(cuda, "_init_pid", None)
        monkeypatch.setattr(cuda, "_init_failure", None)
        return d
    return install


def test_check_unpacks_results_and_raises_the_error_type_asked_for(use_driver: Install) -> None:
    use_driver(fake_driver(FakeResult.CUDA_SUCCESS))
    assert cuda.check((FakeResult.CUDA_SUCCESS, 7, 8), "cuThing") == (7, 8)
    assert cuda.check(FakeResult.CUDA_SUCCESS, "cuThing") == ()
    with pytest.raises(cuda.CudaError, match="^cuMemCreate failed: CUDA_ERROR_OUT_OF_MEMORY$"):
        cuda.check((FakeResult.CUDA_ERROR_OUT_OF_MEMORY, None), "cuMemCreate")
    with pytest.raises(KernelError, match="^kernel k failed: CUDA_ERROR_OUT_OF_MEMORY$"):
        cuda_build.check_cuda(FakeResult.CUDA_ERROR_OUT_OF_MEMORY, "kernel k")
    from tierkv.tiers.elastic.vmm import PageError, _check

    with pytest.raises(PageError, match="^cuMemMap failed: CUDA_ERROR_OUT_OF_MEMORY$"):
        _check((FakeResult.CUDA_ERROR_OUT_OF_MEMORY,), "cuMemMap")
    assert issubclass(KernelError, cuda.CudaError) and issubclass(cuda.CudaError, RuntimeError)


def test_cuinit_runs_once_per_process_and_a_missing_device_is_reported(use_driver: Install) -> None:
    d = use_driver(fake_driver(FakeResult.CUDA_ERROR_NO_DEVICE))
    assert cuda.probe() == (False, "no CUDA driver: cuInit failed with CUDA_ERROR_NO_DEVICE")
    with pytest.raises(KernelError, match="^cuInit failed: CUDA_ERROR_NO_DEVICE$"):
        cuda.init(error=KernelError)
    with pytest.raises(cuda.CudaError, match="^cuInit failed: CUDA_ERROR_NO_DEVICE$"):
        cuda.init()
    assert d.calls == ["cuInit"]
    cuda._init_pid = os.getpid() + 1  # as a forked child sees its parent's state: it calls cuInit itself
    with pytest.raises(cuda.CudaError):
        cuda.init()
    assert d.calls == ["cuInit", "cuInit"]

    ok = use_driver(fake_driver(FakeResult.CUDA_SUCCESS, version=12080))
    assert cuda.init() is ok and cuda.init() is ok and ok.calls == ["cuInit"]
    assert cuda.probe() == (True, "CUDA driver API 12.8")


def test_a_missing_driver_library_is_reported_not_raised(use_driver: Install) -> None:
    use_driver(fake_driver(RuntimeError("libcuda.so not found")))
    assert cuda.probe() == (False, "no CUDA driver: libcuda.so not found")
    with pytest.raises(cuda.CudaError, match="^cuInit failed: libcuda.so not found$"):
        cuda.init()
