"""`tierkv doctor` on this machine with and without each requirement a test can fake: a tiny
pinned-memory limit, too little host memory or disk, a file system refusing O_DIRECT, a live and a
stale writer lock, a reachable and an unreachable Redis, a bad configuration."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import resource
import socket
import subprocess
import sys
import threading
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from tierkv import StoreConfig
from tierkv.cli import doctor
from tierkv.cli.main import main

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="describes a machine without a GPU")


def run(env: dict[str, str], *, memlock: int | None = None) -> tuple[int, dict[str, dict[str, str]], str]:
    """`tierkv doctor --json` in a child process (its own rlimits); returns (exit status, checks by name, stdout)."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("TIERKV_")}
    full.update(env)

    def limit() -> None:
        if memlock is not None:
            resource.setrlimit(resource.RLIMIT_MEMLOCK, (memlock, memlock))

    done = subprocess.run([sys.executable, "-m", "tierkv", "doctor", "--json"], capture_output=True, text=True,
                          timeout=300, env=full, preexec_fn=limit)
    report = json.loads(done.stdout)
    checks: dict[str, dict[str, str]] = {}
    for c in report["checks"]:
        checks.setdefault(c["name"], c)
    assert report["ok"] == (done.returncode == 0), done.stderr
    return done.returncode, checks, done.stdout


def in_process(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> dict[str, doctor.Check]:
    for name in list(os.environ):
        if name.startswith("TIERKV_"):
            monkeypatch.delenv(name)
    checks, _ = doctor.diagnose(env)
    return {c.name: c for c in checks}


def test_a_plain_machine_passes_with_one_line_per_check(capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("TIERKV_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("TIERKV_HOST_BYTES", "16MiB")
    monkeypatch.setenv("TIERKV_DEVICE_BYTES", "16MiB")
    monkeypatch.setenv("TIERKV_DISK_PATH", str(tmp_path / "store"))
    monkeypatch.setenv("TIERKV_DISK_BYTES", "1MiB")
    assert main(["doctor"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("tierkv doctor:") and lines[-1] == "nothing required is missing"
    names = ["pinned-memory limit", "free host memory", "O_DIRECT", "free disk", "GDS driver", "CUDA VMM", "Triton",
             "NVRTC", "writer lock"]
    for name in names:
        assert sum(line.split()[1:1 + len(name.split())] == name.split() for line in lines) == 1, name
    assert not any(line.lstrip().startswith("FAIL") for line in lines)


@no_gpu
def test_pinned_memory_limit_with_and_without(tmp_path: Path) -> None:
    env = {"TIERKV_PIN_HOST": "true", "TIERKV_HOST_BYTES": "1MiB"}
    rc, checks, _ = run(env, memlock=64 << 10)
    assert checks["pinned-memory limit"]["status"] == "fail"
    assert "ulimit -l is 64.0 KiB, below host_bytes 1.0 MiB" in checks["pinned-memory limit"]["detail"]
    assert "ulimit -l unlimited" in checks["pinned-memory limit"]["fix"]
    assert rc == 1
    hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)[1]  # as high as this process may go (8 MiB here)
    if hard != resource.RLIM_INFINITY and hard < 1 << 20:
        pytest.skip("the hard memlock limit is below 1 MiB here")
    _, checks, _ = run(env, memlock=hard)
    assert checks["pinned-memory limit"]["status"] == "ok"
    # Pinning needs CUDA: said on its own line, whatever the limit.
    assert checks["pinned memory"]["status"] == "fail" and "no CUDA device" in checks["pinned memory"]["detail"]


def test_pinned_memory_limit_does_not_apply_to_an_unpinned_host_tier() -> None:
    _, checks, _ = run({"TIERKV_PIN_HOST": "false", "TIERKV_HOST_BYTES": "1GiB"}, memlock=64 << 10)
    assert checks["pinned-memory limit"]["status"] == "ok" and "not pinned" in checks["pinned-memory limit"]["detail"]


def test_host_memory_with_and_without(monkeypatch: pytest.MonkeyPatch) -> None:
    checks = in_process(monkeypatch, {"TIERKV_HOST_BYTES": "1PiB"})
    assert checks["free host memory"].status == "fail" and "available" in checks["free host memory"].detail
    assert in_process(monkeypatch, {"TIERKV_HOST_BYTES": "1MiB", "TIERKV_DEVICE_BYTES": "1MiB"})["free host memory"].status == "ok"


def test_o_direct_with_and_without(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env = {"TIERKV_DISK_PATH": str(tmp_path), "TIERKV_DISK_BYTES": "1MiB"}
    assert in_process(monkeypatch, env)["O_DIRECT"].status == "ok"

    def refuse(path: str) -> int:  # what tmpfs before Linux 6.6 (and some FUSE file systems) answer
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(doctor, "open_direct", refuse)
    check = in_process(monkeypatch, env)["O_DIRECT"]
    assert check.status == "warn" and "refuses O_DIRECT" in check.detail and "ext4/xfs" in check.fix
    assert list(tmp_path.iterdir()) == []  # the probe file is gone


def test_o_direct_on_this_machines_tmpfs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever this kernel's tmpfs does (O_DIRECT since Linux 6.6), doctor says it truthfully."""
    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm")
    check = in_process(monkeypatch, {"TIERKV_DISK_PATH": "/dev/shm/tierkv-doctor-test", "TIERKV_DISK_BYTES": "1MiB"})["O_DIRECT"]
    try:
        fd = os.open("/dev/shm/.tierkv-odirect-probe", os.O_RDWR | os.O_CREAT | os.O_DIRECT)
        os.close(fd)
        supported = True
    except OSError:
        supported = False
    finally:
        if os.path.exists("/dev/shm/.tierkv-odirect-probe"):
            os.unlink("/dev/shm/.tierkv-odirect-probe")
    assert check.status == ("ok" if supported else "warn") and "tmpfs" in check.detail


def test_free_disk_with_and_without(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    small = in_process(monkeypatch, {"TIERKV_DISK_PATH": str(tmp_path), "TIERKV_DISK_BYTES": "1MiB"})["free disk"]
    huge = in_process(monkeypatch, {"TIERKV_DISK_PATH": str(tmp_path), "TIERKV_DISK_BYTES": "1PiB"})["free disk"]
    assert small.status == "ok" and huge.status == "fail" and "TIERKV_DISK_BYTES" in huge.fix


def test_a_disk_path_nobody_may_write_fails(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("not a directory")
    check = in_process(monkeypatch, {"TIERKV_DISK_PATH": str(target / "store")})["O_DIRECT"]
    assert check.status == "fail" and "not a writable directory" in check.detail


HOLDER = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); "
          "os.ftruncate(fd, 0); os.pwrite(fd, (str(os.getpid()) if sys.argv[2] == 'self' else sys.argv[2]).encode(), 0); "
          "print('held', flush=True); time.sleep(120)")


def hold_lock(lock: Path, written_pid: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock), written_pid], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "held\n"
    return proc


def test_writer_lock_free_held_and_stale(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env = {"TIERKV_DISK_PATH": str(tmp_path)}
    assert in_process(monkeypatch, env)["writer lock"].status == "ok"
    lock = tmp_path / "LOCK"
    lock.write_text("999999999")  # left by a writer that exited: the kernel dropped its flock
    check = in_process(monkeypatch, env)["writer lock"]
    assert check.status == "ok" and "is gone" in check.detail
    holder = hold_lock(lock, "self")  # a live writer, as DirectoryLock leaves it: the file names it
    try:
        check = in_process(monkeypatch, env)["writer lock"]
        assert check.status == "fail" and f"open for writing by pid {holder.pid}" in check.detail
    finally:
        holder.kill()
        holder.wait()
    stale = hold_lock(lock, "12345")  # held by a process the file does not name (an inherited descriptor)
    try:
        check = in_process(monkeypatch, env)["writer lock"]
        assert check.status == "fail" and "stale writer lock" in check.detail and check.fix == f"stop pid {stale.pid}"
    finally:
        stale.kill()
        stale.wait()
    assert in_process(monkeypatch, env)["writer lock"].status == "ok"
    fd = os.open(lock, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # and doctor left nothing locked
    os.close(fd)


has_remote = "remote_url" in {f.name for f in fields(StoreConfig)}


@pytest.mark.skipif(not has_remote, reason="no remote tier in this StoreConfig")
def test_remote_tier_reachable_and_not(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]

        def answer() -> None:
            conn, _ = server.accept()
            with conn:
                conn.recv(64)
                conn.sendall(b"+PONG\r\n")

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        check = in_process(monkeypatch, {"TIERKV_REMOTE_URL": f"redis://127.0.0.1:{port}"})["remote tier"]
        thread.join(timeout=10)
    assert check.status == "ok" and f"127.0.0.1:{port} answers" in check.detail
    check = in_process(monkeypatch, {"TIERKV_REMOTE_URL": f"redis://127.0.0.1:{port}"})["remote tier"]  # closed now
    assert check.status == "fail" and "cannot reach Redis" in check.detail


def test_a_bad_configuration_is_a_failed_check_not_a_traceback() -> None:
    rc, checks, _ = run({"TIERKV_HOST_BYTES": "lots"})
    assert rc == 1 and checks["configuration"]["status"] == "fail" and "host_bytes" in checks["configuration"]["detail"]


def test_an_unrelated_variable_is_a_warning_line(monkeypatch: pytest.MonkeyPatch) -> None:
    checks, _ = doctor.diagnose({"TIERKV_DEPLOYMENT_ID": "blue"})
    warned = [c for c in checks if c.name == "configuration" and c.status == "warn"]
    assert len(warned) == 1 and "TIERKV_DEPLOYMENT_ID" in warned[0].detail
