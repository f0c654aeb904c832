"""`tierkv.cli.machine`: truthful about this machine, never hanging, never raising over a bad config."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tierkv.cli.info import format_info
from tierkv.cli.machine import (
    Probe,
    collect,
    config_in_effect,
    detect_gpus,
    probe_cuda_driver,
    probe_kvikio,
    probe_pinned_memory,
    torch_build,
)

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="describes a machine without a GPU")


def kvikio_installed() -> bool:
    return importlib.util.find_spec("kvikio") is not None


def test_collect_finishes_in_a_fresh_process_and_serialises() -> None:
    """A fresh interpreter: no state of this test session can hide a hang at import or driver init."""
    code = "import json; from tierkv.cli.machine import collect; print(json.dumps(collect().to_dict()))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["torch_version"] == torch.__version__
    assert set(data["cuda_driver"]) == {"available", "detail"}


@no_gpu
def test_without_a_gpu_everything_says_why_it_is_unavailable() -> None:
    info = collect()
    assert info.gpus == [] and detect_gpus() == []
    assert not info.cuda_driver.available
    assert info.cuda_driver.detail.startswith("no CUDA driver")
    assert not info.pinned_memory.available
    assert "no CUDA device" in info.pinned_memory.detail
    assert info.device_tier.startswith("cpu")
    assert not info.kvikio.available


def test_info_names_the_cpu_checksum_path(monkeypatch: pytest.MonkeyPatch) -> None:
    from tierkv.ops import cpu_build

    info = collect()
    if shutil.which("cc") or shutil.which("gcc"):
        assert info.cpu_checksums.available and info.cpu_checksums.detail.startswith("C hasher (checksum_cpu.c")
    monkeypatch.setattr(cpu_build, "native_checksums", lambda: None)
    missing = collect().cpu_checksums
    assert not missing.available and missing.detail.startswith("xxhash")
    assert "CPU checksums" in format_info(collect())


@no_gpu
def test_torch_build_names_the_cpu_build() -> None:
    assert torch.version.cuda is None
    assert torch_build() == "CPU"


def test_driver_probe_agrees_with_torch() -> None:
    """torch needs a driver for CUDA, so torch seeing a GPU without the probe finding a driver is a bug."""
    if torch.cuda.is_available():
        assert probe_cuda_driver().available
    assert probe_pinned_memory().available == torch.cuda.is_available()


@pytest.mark.skipif(kvikio_installed(), reason="kvikio is installed here")
def test_kvikio_absent_is_reported_not_raised() -> None:
    probe = probe_kvikio(Probe(True, "a driver"))
    assert probe == Probe(False, "kvikio not installed (the 'gpu' extra installs it)")


@pytest.fixture
def fake_kvikio(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A directory on sys.path where a test writes its own `kvikio` package.

    Stands in for kvikio's three situations here (broken native libraries, no driver, a
    driver): the code under test is the probe, not kvikio.
    """
    for name in [m for m in sys.modules if m == "kvikio" or m.startswith("kvikio.")]:
        monkeypatch.delitem(sys.modules, name)
    (tmp_path / "kvikio").mkdir()
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path / "kvikio"
    for name in [m for m in sys.modules if m == "kvikio" or m.startswith("kvikio.")]:
        del sys.modules[name]


def write_kvikio(pkg: Path, init: str, defaults: str = "") -> None:
    (pkg / "__init__.py").write_text(textwrap.dedent(init))
    (pkg / "defaults.py").write_text(textwrap.dedent(defaults))
    # Opening the cuFile driver without a CUDA driver hangs or fails: the probe must never import it.
    (pkg / "cufile_driver.py").write_text("raise AssertionError('the probe opened the cuFile driver')\n")
    importlib.invalidate_caches()


def test_kvikio_whose_native_libraries_do_not_load_is_reported(fake_kvikio: Path) -> None:
    write_kvikio(fake_kvikio, """
        raise RuntimeError('Failure finding "libcufile.so.0": No such file\\n  listdir(...)')
    """)
    assert probe_kvikio(Probe(False, "no CUDA driver")) == Probe(
        False, 'kvikio is installed but does not load: Failure finding "libcufile.so.0": No such file'
    )


def test_kvikio_without_a_driver_is_not_asked_anything(fake_kvikio: Path) -> None:
    write_kvikio(fake_kvikio, "__version__ = '0.0.test'\n", """
        def get(name):
            raise AssertionError("kvikio settings read without a CUDA driver")
    """)
    assert probe_kvikio(Probe(False, "no CUDA driver")) == Probe(
        False, "kvikio 0.0.test installed, no CUDA driver so file I/O through it is unavailable"
    )


@pytest.mark.parametrize("mode, meaning", [("AUTO", "where available, else POSIX"), ("ON", "no GDS"), ("OFF", "required")])
def test_kvikio_with_a_driver_reports_its_compat_mode(fake_kvikio: Path, mode: str, meaning: str) -> None:
    write_kvikio(fake_kvikio, "__version__ = '0.0.test'\n", f"""
        import enum
        CompatMode = enum.IntEnum("CompatMode", ["OFF", "ON", "AUTO"], start=0)
        def get(name):
            assert name == "compat_mode"
            return CompatMode.{mode}
    """)
    probe = probe_kvikio(Probe(True, "CUDA driver API 13.0"))
    assert probe.available
    assert probe.detail.startswith(f"kvikio 0.0.test, compat_mode {mode}: ") and meaning in probe.detail


def test_config_errors_are_reported_not_raised() -> None:
    config, error = config_in_effect({"TIERKV_HOST_BYTES": "lots"})
    assert config is None
    assert error is not None and "host_bytes" in error and "'lots'" in error
    info = collect({"TIERKV_DEVICE_BYTES": "-1"})
    assert info.config is None and "device_bytes" in (info.config_error or "")
    assert info.device_tier == "unknown (config error)"


def test_config_in_effect_reads_the_environment_given() -> None:
    config, error = config_in_effect({"TIERKV_DEVICE_BYTES": "2GiB", "TIERKV_DEVICE": "cpu"})
    assert error is None and config is not None
    assert config["device_bytes"] == 2 << 30 and config["device"] == "cpu"
    assert collect({"TIERKV_DEVICE": "cpu"}).device_tier == "cpu"


@pytest.mark.gpu
def test_on_a_gpu_machine_gpus_driver_and_pinned_memory_are_found() -> None:
    info = collect()
    assert info.gpus and all(g.memory_bytes > 0 and "." in g.compute_capability for g in info.gpus)
    assert info.cuda_driver.available and info.cuda_driver.detail.startswith("CUDA driver API ")
    assert info.pinned_memory.available
    assert info.torch_build.startswith(("CUDA ", "ROCm "))
    assert info.device_tier == "cuda"
    if kvikio_installed():
        assert info.kvikio.available and "compat_mode" in info.kvikio.detail
