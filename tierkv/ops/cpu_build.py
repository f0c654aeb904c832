"""Compile `csrc/checksum_cpu.c` at first use with the system C compiler, cache it, call it through ctypes.

Why not the `xxhash` package alone: it hashes one 4 KiB sector per call, each holding the
interpreter lock, and a thread that alternates such stretches with torch calls (which drop and
retake the lock) starves the process's other Python threads (`csrc/checksum_cpu.c` says how).
One ctypes call hashes every block asked for with the lock dropped, so a vLLM engine thread
runs on while the connector's save thread hashes host slots. Nothing is built at install time:
the first use on a machine costs one compile of well under a second, after which the library
comes from `~/.cache/tierkv/kernels` (or `$TIERKV_KERNEL_CACHE`), keyed by source, compiler and
flags. Without a C compiler, or on a big-endian machine, `native_checksums` is None and
`tierkv.integrity` hashes through `xxhash`: the same bits, the lock held.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from .cuda_build import CSRC_DIR, cache_dir

log = logging.getLogger("tierkv.ops")

SOURCE = "checksum_cpu.c"
# base, rows (or None), number of blocks, block bytes, out -> 0, or -1 when out of memory
NativeChecksums = Callable[[int, int | None, int, int, int], int]

_lock = threading.Lock()
_loaded: dict[str, NativeChecksums | None] = {}


def _flags() -> list[str]:
    """-O3, and AVX2 where this CPU has it (the accumulator loop vectorises to it: ~2x over SSE2)."""
    flags = ["-O3", "-fPIC", "-shared", "-std=c11"]
    try:
        cpu = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpu = ""
    if platform.machine() in ("x86_64", "AMD64") and " avx2" in cpu:
        flags.append("-mavx2")
    return flags


def _build(cc: str, flags: list[str]) -> Path:
    """The compiled library for this source, compiler and flags, from the cache or compiled now."""
    source = CSRC_DIR / SOURCE
    text = source.read_bytes()
    key = hashlib.sha256(text + "\0".join([cc, *flags, platform.machine()]).encode()).hexdigest()[:16]
    path = cache_dir() / f"{source.stem}-{key}.so"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        subprocess.run([cc, *flags, "-o", tmp, str(source)], check=True, capture_output=True, text=True, timeout=120)
        os.replace(tmp, path)  # atomic: processes compiling at once each install a whole file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def describe() -> tuple[bool, str]:
    """(built, one line) for `tierkv info`: which CPU checksum path this machine takes, and why."""
    if native_checksums() is None:
        return False, "xxhash, one call per 4 KiB sector holding the interpreter lock (no C hasher: see the log)"
    return True, f"C hasher ({SOURCE}, {' '.join(_flags())}): one call per request, interpreter lock dropped"


def native_checksums() -> NativeChecksums | None:
    """`tierkv_block_checksums` of the compiled library, or None where it cannot be built (logged once)."""
    if SOURCE in _loaded:  # every CPU hash asks: no lock once it is known
        return _loaded[SOURCE]
    with _lock:
        if SOURCE not in _loaded:
            _loaded[SOURCE] = _load()
        return _loaded[SOURCE]


def _load() -> NativeChecksums | None:
    if sys.byteorder != "little":
        log.info("tierkv: CPU checksums through xxhash (the C hasher reads little-endian words)")
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        log.info("tierkv: no C compiler found; CPU checksums go through xxhash, holding the interpreter lock")
        return None
    try:
        lib = ctypes.CDLL(str(_build(cc, _flags())))  # CDLL: every call drops the interpreter lock
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or e
        log.warning("tierkv: could not build %s with %s (%s); CPU checksums go through xxhash", SOURCE, cc, detail)
        return None
    fn = lib.tierkv_block_checksums
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    fn.restype = ctypes.c_int
    return fn
