"""The NVRTC build path: every csrc/ source compiles for Hopper, the cubin cache, and errors that name the file.

NVRTC needs only libnvrtc, no GPU, so this runs on CPU machines that have it (the
`nvidia-cuda-nvrtc` wheel); elsewhere it is skipped.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tierkv.ops import cuda_build
from tierkv.ops.cuda_build import KernelError, compile_cubin

try:
    cuda_build.nvrtc_version()
    HAVE_NVRTC = True
except Exception:  # noqa: BLE001 - libnvrtc missing in any way
    HAVE_NVRTC = False

pytestmark = pytest.mark.skipif(not HAVE_NVRTC, reason="libnvrtc is not installed")

SOURCES = sorted(p.name for p in cuda_build.CSRC_DIR.glob("*.cu"))
KERNELS = [f"tierkv_{op}_w{w}" for op in ("gather", "scatter", "copy_rows") for w in (16, 8, 4, 2, 1)]


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TIERKV_KERNEL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_sources_are_found() -> None:
    assert "transfer.cu" in SOURCES


@pytest.mark.parametrize("source", SOURCES)
def test_every_source_compiles_for_sm90(source: str, private_cache: Path) -> None:
    cubin = compile_cubin(source, "sm_90")
    assert cubin[:4] == b"\x7fELF"
    if source == "transfer.cu":
        for name in KERNELS:
            assert name.encode() in cubin, name
    cached = list(private_cache.glob("*.cubin"))
    assert len(cached) == 1 and cached[0].read_bytes() == cubin


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


def test_compile_error_names_the_file_and_the_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "broken.cu").write_text('extern "C" __global__ void k(float* x) { x[threadIdx.x] = undefined_name; }\n')
    monkeypatch.setattr(cuda_build, "CSRC_DIR", tmp_path)
    with pytest.raises(KernelError, match=r"broken\.cu: NVRTC compile for sm_90 failed:(.|\n)*undefined_name"):
        compile_cubin("broken.cu", "sm_90")
