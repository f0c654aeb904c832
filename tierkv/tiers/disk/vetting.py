"""Whether a manifest can be opened without killing the process, and its rebuild when that is not known.

LMDB trusts its file: it keeps no page checksums, and a flipped byte or a truncated file makes
it read outside its map (SIGBUS), follow a wild pointer (SIGSEGV) or fail an assertion (SIGABRT),
in whatever process opened it, at every open. A cache must not die of its own cache file, so the
store's process opens a manifest only when one of these holds:

- *clean*: it is byte for byte what a clean close left. After LMDB closed it, `close` recorded its
  size and xxh3-128 in `manifest.clean` beside it; the mark is removed when the next writer opens
  it, so it never vouches for a file someone writes.
- *rebuilt*: otherwise (a crash, a copy, damage) a child process (`manifest_reader.py`) reads every
  entry it can and sends them here; this process writes them into a fresh LMDB and swaps it in.
  The store never maps the old file, so nothing in it can crash the store; a fresh file also has
  no free-page list that a damaged one could have poisoned.

When the child dies, hangs or stops short, what it sent is kept (a partial salvage), the old
manifest is moved aside as `manifest.damaged` for inspection, and the loss (the entries its own
count says it held, minus those salvaged) is logged and counted. Records that were read but are
wrong are recovery's business (`recovery.py`), and bytes that are wrong are caught by checksums.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import lmdb
import xxhash

from ...errors import StorageError
from .manifest import KEY_BYTES, open_env
from .manifest_reader import FRAME

log = logging.getLogger("tierkv.disk")

MARK = "manifest.clean"
_REBUILD = "manifest.rebuild"
_DAMAGED = "manifest.damaged"
_DONE = "REBUILT"  # written into the rebuild directory once it is complete
_READER = Path(__file__).with_name("manifest_reader.py")


@dataclass
class Vetting:
    """What was found of the manifest at open, and what is to be done about it.

    how: "new" (none yet), "clean" (as a clean close left it), "rebuilt" (read whole by the
    child, rewritten), "damaged" (the child could not read all of it: moved aside, what it read kept).
    entries: block entries carried into the manifest that is opened (rebuilt or damaged).
    lost: entries the old manifest held that could not be read (None: not even its count was).

    Finding changes nothing the store has (a rebuild is written beside the manifest); `commit`
    puts it in place once the open goes ahead, `abandon` removes it when the open is refused,
    so that a refused open leaves the directory as it found it.
    """

    directory: Path
    how: str
    entries: int = 0
    lost: int | None = 0
    detail: str = ""
    identity: bytes | None = None  # the identity record a rebuild salvaged (None: none, or not rebuilt)
    committed: bool = False

    def commit(self) -> None:
        """Swap the rebuilt manifest in (the damaged one moved aside) and drop the clean mark; once."""
        if self.committed:
            return
        self.committed = True
        directory, manifest = self.directory, self.directory / "manifest"
        rebuild = directory / _REBUILD
        if self.how == "rebuilt":
            old = directory / "manifest.old"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(manifest, old)
            os.rename(rebuild, manifest)
            shutil.rmtree(old, ignore_errors=True)
        elif self.how == "damaged":
            aside = directory / _DAMAGED
            shutil.rmtree(aside, ignore_errors=True)  # keep only the latest damaged manifest
            os.rename(manifest, aside)
            os.rename(rebuild, manifest)
            log.error("disk tier: the manifest in %s is damaged (%s); moved aside to %s. %d block entries were "
                      "salvaged, %s lost: their blocks are recomputed when next needed", directory, self.detail, aside,
                      self.entries, "an unknown number" if self.lost is None else self.lost)
        (manifest / _DONE).unlink(missing_ok=True)
        (directory / MARK).unlink(missing_ok=True)  # from here on a writer changes the file
        _sync_dir(directory)

    def abandon(self) -> None:
        """The open was refused: remove the rebuild (if not swapped in yet); the directory is as it was."""
        if not self.committed:
            shutil.rmtree(self.directory / _REBUILD, ignore_errors=True)


def _digest(path: Path) -> dict[str, object]:
    h = xxhash.xxh3_128()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
            size += len(chunk)
    return {"size": size, "xxh3_128": h.hexdigest()}


def mark_clean(directory: Path) -> None:
    """After a clean close (LMDB closed): vouch for the manifest as it is now. Best effort: without a mark
    the next open rebuilds, which is slower but as safe."""
    data = directory / "manifest" / "data.mdb"
    tmp = directory / (MARK + ".tmp")
    try:
        tmp.write_text(json.dumps(_digest(data)))
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, directory / MARK)
        _sync_dir(directory)
    except OSError as e:
        log.warning("disk tier: could not mark the manifest in %s as cleanly closed (%s); the next open checks it "
                    "in a child process instead", directory, e.strerror)
        tmp.unlink(missing_ok=True)


def _is_clean(directory: Path, data: Path) -> bool:
    try:
        mark = json.loads((directory / MARK).read_text())
        return bool(mark == _digest(data))
    except (OSError, ValueError):
        return False


def _sync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def vet(directory: Path, timeout: float | None = None) -> Vetting:
    """Find out whether `directory / "manifest"` is safe to open in this process; prepare a rebuild if not known.

    The caller holds the directory lock, and calls `commit` or `abandon` on the result.
    """
    manifest = directory / "manifest"
    _finish_rebuild(directory, manifest)
    data = manifest / "data.mdb"
    if not data.exists():
        return Vetting(directory, "new")
    if _is_clean(directory, data):
        return Vetting(directory, "clean")
    if not sys.executable:
        log.warning("disk tier: no Python executable to check the manifest %s in a child process; opening it as it is",
                    manifest)
        return Vetting(directory, "clean", detail="unchecked: sys.executable is not set")
    salvage = _read_in_child(manifest, timeout)
    try:
        _write_fresh(directory / _REBUILD, salvage)
    except StorageError as e:
        shutil.rmtree(directory / _REBUILD, ignore_errors=True)
        if not salvage.complete:
            raise
        # No room for a second copy (a full file system), but the child read all of it: open it as it is.
        log.warning("%s; the manifest was read whole in a child process, so it is opened as it is", e)
        return Vetting(directory, "clean", detail="checked in a child process; no space to rewrite it")
    kept = len(salvage.blocks) if salvage.identity is not None else 0
    if salvage.complete:
        return Vetting(directory, "rebuilt", entries=kept, detail="checked in a child process and rewritten",
                       identity=salvage.identity)
    lost = None if salvage.count is None else max(salvage.count - kept, 0)
    return Vetting(directory, "damaged", entries=kept, lost=lost, detail=salvage.failure, identity=salvage.identity)


@dataclass
class _Salvage:
    identity: bytes | None
    meta: list[tuple[bytes, bytes]]
    blocks: list[tuple[bytes, bytes]]
    count: int | None  # the block count the old manifest stated
    complete: bool
    failure: str


def _read_in_child(manifest: Path, timeout: float | None) -> _Salvage:
    """Everything the reader child sends before it ends (or dies)."""
    size = (manifest / "data.mdb").stat().st_size
    limit = timeout if timeout is not None else 30.0 + size / (20 << 20)
    failure = ""
    try:
        proc = subprocess.run([sys.executable, str(_READER), str(manifest)], stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=limit)
        out, code = proc.stdout, proc.returncode
        if code < 0:
            failure = f"reading it killed a child process with signal {-code}"
        elif code != 0:
            last = proc.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no message"]
            failure = f"LMDB could not read it: {last[0]}"
    except subprocess.TimeoutExpired as e:
        out = e.stdout or b""
        failure = f"reading it did not finish in {limit:.0f} s"
    except OSError as e:
        raise StorageError(f"disk tier: cannot start a child process to check the manifest {manifest}: {e}") from None
    salvage = _Salvage(None, [], [], None, False, failure)
    # One pass over 100k frames after a crash: slices of `out` (one copy each), names bound locally.
    unpack_from, header, size, blocks = FRAME.unpack_from, FRAME.size, len(out), salvage.blocks
    pos = 0
    while pos + header <= size:
        tag, klen, vlen = unpack_from(out, pos)
        start = pos + header
        end = start + klen + vlen
        if end > size:
            break  # the frame it was writing when it died
        key = out[start : start + klen]
        value = out[start + klen : end]
        pos = end
        if tag == b"b":
            if klen == KEY_BYTES:  # any other key is no block: it would be dropped anyway
                blocks.append((key, value))
        elif tag == b"m" and key == b"identity":  # the one meta entry there is
            salvage.meta.append((key, value))
            salvage.identity = value
        elif tag == b"n":
            try:
                salvage.count = int(value)
            except ValueError:
                salvage.count = None
        elif tag == b"e":
            salvage.complete = not failure
    if salvage.identity is not None and not _is_identity(salvage.identity):
        salvage.identity = None  # a damaged identity says nothing: the entries cannot be attributed
        salvage.complete = False
        salvage.failure = salvage.failure or "its identity record is damaged"
    if not salvage.complete and not salvage.failure:
        salvage.failure = "reading it stopped short"
    return salvage


def _is_identity(raw: bytes) -> bool:
    try:
        return isinstance(json.loads(raw), dict)
    except ValueError:
        return False


def _write_fresh(rebuild: Path, salvage: _Salvage) -> None:
    """A new LMDB holding what was salvaged; the block entries only if the store's identity was too.

    Without the identity nothing says which layout the entries' bytes have, so they are not kept.
    """
    shutil.rmtree(rebuild, ignore_errors=True)
    try:
        rebuild.mkdir()
    except OSError as e:
        raise StorageError(f"disk tier: cannot write a fresh manifest in {rebuild}: {e.strerror}") from None
    env = open_env(rebuild, durable=True)
    try:
        meta = env.open_db(b"meta")
        blocks = env.open_db(b"blocks")
        with env.begin(write=True) as txn:
            for key, value in salvage.meta:
                if key != b"identity" or salvage.identity is not None:
                    txn.put(key, value, db=meta)
            if salvage.identity is not None:
                txn.cursor(db=blocks).putmulti(salvage.blocks)
        env.sync(True)
    except lmdb.Error as e:
        raise StorageError(f"disk tier: cannot write a fresh manifest in {rebuild}: {e}; free space there") from None
    finally:
        env.close()
    try:
        (rebuild / _DONE).write_bytes(b"")
        fd = os.open(rebuild / _DONE, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        _sync_dir(rebuild)
    except OSError as e:
        raise StorageError(f"disk tier: cannot write a fresh manifest in {rebuild}: {e.strerror}; free space there") from None


def _finish_rebuild(directory: Path, manifest: Path) -> None:
    """A crash during a swap: a complete rebuild with no manifest becomes the manifest; any other leftover goes."""
    rebuild = directory / _REBUILD
    if rebuild.exists():
        if (rebuild / _DONE).exists() and not manifest.exists():
            os.rename(rebuild, manifest)
            _sync_dir(directory)
        else:
            shutil.rmtree(rebuild, ignore_errors=True)
    shutil.rmtree(directory / "manifest.old", ignore_errors=True)
    (directory / (MARK + ".tmp")).unlink(missing_ok=True)
    (manifest / _DONE).unlink(missing_ok=True)

