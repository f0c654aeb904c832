"""A GPU memory budget shared by the elastic device tiers of several stores, in one process or many.

The budget is a small table in POSIX shared memory: a file in `/dev/shm` (what `shm_open`
creates on Linux), mapped by every member, guarded by an `flock` on the same file. The kernel
drops an `flock` when its holder dies, `kill -9` included, so a crashed member never wedges the
others. Each row is one store: its pid and process start time, its `min_bytes` / `max_bytes`,
the bytes it holds (= the pages its tier has mapped), a shrink request, and counters for
`tierkv top`.

Rules, all applied under the lock, so the total held never exceeds the budget:

- A store that needs pages takes free budget (`acquire`). If there is not enough, it asks the
  members furthest above their minimum to shrink, by writing a target ("please hold at most N
  bytes") into their rows, never below their minimum, and waits for them to act (at most
  `SHRINK_WAIT_S`); then it takes what has become free. Asking frees more than the shortfall
  (at least `GROW_STEP_PAGES` pages) so that a growing store does not ask page by page.
- A store asked to shrink acts on the request at the start of its next operation, or from its
  watcher thread when idle (`start_watcher`, polling every `POLL_S`): it demotes its coldest
  blocks to host, unmaps the emptied pages, `release`s them, and clears the request. Stores of
  the same process are also asked directly, without waiting for the poll, when their lock is free.
- A row whose process is gone (no such pid, a zombie, or a pid reused by a younger process) is
  cleared at the next locked operation: the driver freed that process's GPU memory when it
  died, so its share returns to the pool.
- `min_bytes` are promised: a store may join only if the minimums of all live members fit in the
  budget, and nobody is asked to go below its minimum.

The module is longer than most (the table's format, liveness, snapshots and the member's rules)
because it is one protocol: every rule above is kept by code that reads and writes the rows under
the same lock, and splitting the format from the rules would put those halves in two files that
can only be changed together.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from ...config import check_budget_name as check_name
from ...errors import ConfigError, TierKVError

MAX_MEMBERS = 64
NO_REQUEST = 2**64 - 1
SHRINK_WAIT_S = 1.0  # longest a store waits for others to give memory back before evicting its own
POLL_S = 0.005  # how often an idle member looks for a shrink request
PUBLISH_S = 0.5  # how often an idle member refreshes its counters for `tierkv top`
GROW_STEP_PAGES = 16  # least a store asks others to free, in its pages

_MAGIC = b"TKVBUDG1"
_HEADER = struct.Struct("<8sIIQQ")  # magic, layout version, rows, total bytes, reserved
# The fields of `BudgetRow`, in this order; the byte layout is shared with every other process
# (of any tierkv version of this layout) that maps the file, so it never changes within a version.
_ROW = struct.Struct("<qQQQQQQQQQQd48s")
_LAYOUT_VERSION = 1
_SIZE = _HEADER.size + MAX_MEMBERS * _ROW.size
_TARGET = struct.Struct("<Q")
_TARGET_OFFSET = struct.calcsize("<qQQQQ")  # of target_bytes in a row: read without the lock by the owner's watcher
_STATS = struct.Struct("<QQQQQd")  # used, hits, lookups, blocks, demoted, updated: written without the lock by the owner
_STATS_OFFSET = _TARGET_OFFSET + _TARGET.size
_LABEL_BYTES = 48
_PREFIX = "tierkv-budget-"


class BudgetError(ConfigError):
    """The shared budget refuses this store (its minimum cannot be promised, sizes disagree, ...)."""


def budget_dir() -> Path:
    """Where budget files live: `/dev/shm` (shared memory) when there is one, else the temp dir."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


def budget_path(name: str) -> Path:
    return budget_dir() / f"{_PREFIX}{check_name(name)}"


def list_budgets() -> list[str]:
    """Names of the budgets that have a file here, live members or not."""
    return sorted(p.name[len(_PREFIX):] for p in budget_dir().glob(f"{_PREFIX}*"))


# -- process liveness ---------------------------------------------------------------------------


def process_start(pid: int) -> int | None:
    """Start time of a live process in clock ticks since boot; None when it is gone or a zombie.

    Compared with the start time recorded at join, it tells a dead member from a new process
    that happens to reuse its pid.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def _alive(pid: int, start: int) -> bool:
    return pid > 0 and process_start(pid) == start


# -- the table ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemberState:
    """One row of the table as `tierkv top` shows it."""

    row: int
    pid: int
    alive: bool
    label: str
    min_bytes: int
    max_bytes: int
    held_bytes: int  # budget taken = pages mapped by its tier
    target_bytes: int | None  # pending shrink request
    used_bytes: int  # device bytes holding blocks
    hits: int  # blocks served from the device tier
    lookups: int  # blocks looked up in the device tier
    blocks: int
    demoted_bytes: int  # moved down to host by shrink requests
    updated: float  # time.time() of the last refresh of the counters

    @property
    def hit_rate(self) -> float | None:
        return self.hits / self.lookups if self.lookups else None


@dataclass(frozen=True)
class BudgetSnapshot:
    name: str
    total_bytes: int
    members: list[MemberState]

    @property
    def held_bytes(self) -> int:
        return sum(m.held_bytes for m in self.members if m.alive)

    @property
    def free_bytes(self) -> int:
        return self.total_bytes - self.held_bytes


@dataclass(frozen=True, slots=True)
class BudgetRow:
    """One row of the table as stored: `pack` / `unpack` convert to and from its bytes (`_ROW`).

    The conversion is exact both ways for every row that fits the format: a pending shrink
    request of `NO_REQUEST` reads as `target_bytes=None`, and the label is the stored bytes
    without the NUL padding of the fixed-size field (kept as bytes, not decoded, so that a row
    read and written back is byte-identical whatever wrote it). An empty row is all zeros.
    """

    pid: int = 0  # 0: the row is free
    start: int = 0  # process start time of pid at join (see `process_start`)
    min_bytes: int = 0
    max_bytes: int = 0
    held_bytes: int = 0  # budget taken = pages mapped by its tier
    target_bytes: int | None = 0  # pending shrink request; None: no request
    used_bytes: int = 0  # counters for `tierkv top`, refreshed by `publish`
    hits: int = 0
    lookups: int = 0
    blocks: int = 0
    demoted_bytes: int = 0
    updated: float = 0.0  # time.time() of the last refresh of the counters
    label: bytes = b""  # at most _LABEL_BYTES, UTF-8 as written by `BudgetMember`

    SIZE = _ROW.size

    def pack(self) -> bytes:
        return _ROW.pack(*self._values())

    def pack_into(self, buffer: mmap.mmap | bytearray, offset: int = 0) -> None:
        _ROW.pack_into(buffer, offset, *self._values())

    @classmethod
    def unpack(cls, buffer: mmap.mmap | bytes | bytearray, offset: int = 0) -> BudgetRow:
        (pid, start, min_bytes, max_bytes, held, target, used, hits, lookups, blocks, demoted, updated,
         label) = _ROW.unpack_from(buffer, offset)
        return cls(pid, start, min_bytes, max_bytes, held, None if target == NO_REQUEST else target,
                   used, hits, lookups, blocks, demoted, updated, label.rstrip(b"\0"))

    def _values(self) -> tuple[int | float | bytes, ...]:
        if len(self.label) > _LABEL_BYTES:
            raise ValueError(f"a budget row label holds at most {_LABEL_BYTES} bytes, got {len(self.label)}")
        target = NO_REQUEST if self.target_bytes is None else self.target_bytes
        return (self.pid, self.start, self.min_bytes, self.max_bytes, self.held_bytes, target, self.used_bytes,
                self.hits, self.lookups, self.blocks, self.demoted_bytes, self.updated, self.label)

    @property
    def in_use(self) -> bool:
        return self.pid != 0

    @property
    def alive(self) -> bool:
        return _alive(self.pid, self.start)

    @property
    def ceiling(self) -> int:
        """The most it may hold: what it holds, or less while a shrink request is pending."""
        return self.held_bytes if self.target_bytes is None else min(self.held_bytes, self.target_bytes)

    def state(self, row: int) -> MemberState:
        return MemberState(
            row=row, pid=self.pid, alive=self.alive, label=self.label.decode(errors="replace"),
            min_bytes=self.min_bytes, max_bytes=self.max_bytes, held_bytes=self.held_bytes, target_bytes=self.target_bytes,
            used_bytes=self.used_bytes, hits=self.hits, lookups=self.lookups, blocks=self.blocks,
            demoted_bytes=self.demoted_bytes, updated=self.updated,
        )


_EMPTY_ROW = BudgetRow()


def _row_offset(row: int) -> int:
    return _HEADER.size + row * _ROW.size


def _read_row(mm: mmap.mmap, row: int) -> BudgetRow:
    return BudgetRow.unpack(mm, _row_offset(row))


def _write_row(mm: mmap.mmap, row: int, record: BudgetRow) -> None:
    record.pack_into(mm, _row_offset(row))


def _rows(mm: mmap.mmap) -> Iterator[tuple[int, BudgetRow]]:
    """(row index, row) of every row in use."""
    for r in range(MAX_MEMBERS):
        record = _read_row(mm, r)
        if record.in_use:
            yield r, record


def _states(mm: mmap.mmap) -> list[MemberState]:
    return [record.state(r) for r, record in _rows(mm)]


def _total(mm: mmap.mmap) -> int:
    return _HEADER.unpack_from(mm, 0)[3]


def read_budget(name: str) -> BudgetSnapshot:
    """The table of budget `name`, read under a shared lock (changes nothing, reclaims nothing)."""
    path = budget_path(name)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise BudgetError(f"no GPU budget named {name!r} (no file {path})") from None
    try:
        if os.fstat(fd).st_size < _SIZE:
            raise BudgetError(f"{path} is not a tierkv budget file (too short)")
        fcntl.flock(fd, fcntl.LOCK_SH)
        with mmap.mmap(fd, _SIZE, access=mmap.ACCESS_READ) as mm:
            magic, version, rows, total, _ = _HEADER.unpack_from(mm, 0)
            if magic != _MAGIC or version != _LAYOUT_VERSION or rows != MAX_MEMBERS:
                raise BudgetError(f"{path} is not a tierkv budget file of this version")
            members = _states(mm)
        return BudgetSnapshot(name, total, members)
    finally:
        os.close(fd)


# -- a member -----------------------------------------------------------------------------------

# Members of this process by (budget file, row): asked to shrink by a call, not through polling.
_local: dict[tuple[str, int], weakref.ref[BudgetMember]] = {}
_local_lock = threading.Lock()


class BudgetMember:
    """This store's row in budget `name`: join on construction, `leave()` when done.

    `total_bytes` must match the budget's if it already has live members (the first member
    sets it). Thread-safe: the store's operations and the watcher thread share it.
    """

    def __init__(self, name: str, total_bytes: int, label: str, min_bytes: int, max_bytes: int) -> None:
        if min_bytes > max_bytes:
            raise BudgetError(f"device_min_bytes {min_bytes} is above the tier's maximum {max_bytes}")
        self.name = check_name(name)
        self.path = budget_path(name)
        self.min_bytes, self.max_bytes = min_bytes, max_bytes
        self._thread_lock = threading.Lock()
        self._fd, self._mm = self._open()
        try:
            self.row = self._join(total_bytes, label)
        except BaseException:
            if self._live_rows() == 0:  # do not leave behind a file that we created for nothing
                self.path.unlink(missing_ok=True)
            self._mm.close()
            os.close(self._fd)  # drops the lock
            raise
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        self.total_bytes = total_bytes
        self._pid = os.getpid()
        self._left = False
        self._on_request: Callable[[bool], bool] | None = None
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        with _local_lock:
            _local[(str(self.path), self.row)] = weakref.ref(self)

    # -- joining and leaving --------------------------------------------------------------------

    def _open(self) -> tuple[int, mmap.mmap]:
        """Open (creating if needed) the budget file and return it locked exclusively."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            st = os.fstat(fd)
            if st.st_nlink == 0:  # the last member unlinked it while we waited: start a new one
                os.close(fd)
                continue
            if st.st_size < _SIZE:
                os.ftruncate(fd, _SIZE)
            mm = mmap.mmap(fd, _SIZE)
            magic, version, rows, _, _ = _HEADER.unpack_from(mm, 0)
            if magic == b"\0" * 8:
                _HEADER.pack_into(mm, 0, _MAGIC, _LAYOUT_VERSION, MAX_MEMBERS, 0, 0)
            elif magic != _MAGIC or version != _LAYOUT_VERSION or rows != MAX_MEMBERS:
                mm.close()
                os.close(fd)
                raise BudgetError(f"{self.path} is not a tierkv budget file of this version; remove it or pick another name")
            return fd, mm

    def _join(self, total_bytes: int, label: str) -> int:
        mm = self._mm
        self._reclaim()
        live = [record for _, record in _rows(mm)]
        if not live:
            _HEADER.pack_into(mm, 0, _MAGIC, _LAYOUT_VERSION, MAX_MEMBERS, total_bytes, 0)
        elif _total(mm) != total_bytes:
            raise BudgetError(
                f"GPU budget {self.name!r} holds {_total(mm)} bytes for its {len(live)} live member(s), "
                f"but this store asks for gpu_budget_bytes={total_bytes}; use the same size everywhere"
            )
        mins = sum(record.min_bytes for record in live)
        if mins + self.min_bytes > total_bytes:
            raise BudgetError(
                f"device_min_bytes={self.min_bytes} cannot be promised: GPU budget {self.name!r} holds {total_bytes} "
                f"bytes and its live members' minimums already take {mins}"
            )
        free_rows = [r for r in range(MAX_MEMBERS) if not _read_row(mm, r).in_use]
        if not free_rows:
            raise BudgetError(f"GPU budget {self.name!r} already has {MAX_MEMBERS} live members")
        pid = os.getpid()
        start = process_start(pid) or 0
        record = BudgetRow(pid=pid, start=start, min_bytes=self.min_bytes, max_bytes=self.max_bytes, target_bytes=None,
                           updated=time.time(), label=label.encode()[:_LABEL_BYTES].rstrip(b"\0"))
        _write_row(mm, free_rows[0], record)
        return free_rows[0]

    def leave(self) -> None:
        """Give the row back (the tier has unmapped its pages); the last member removes the file."""
        if self._left:
            return
        self._left = True
        self._stop.set()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join()
        with _local_lock:
            _local.pop((str(self.path), self.row), None)
        if os.getpid() != self._pid:  # a forked child must not touch its parent's row
            return
        with self._locked():
            _write_row(self._mm, self.row, _EMPTY_ROW)
            self._reclaim()
            if self._live_rows() == 0:
                self.path.unlink(missing_ok=True)
        self._mm.close()
        os.close(self._fd)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Threads of this process serialise on the thread lock; processes (and members) on the flock."""
        with self._thread_lock:
            if self._mm.closed:
                raise TierKVError(f"this store has left GPU budget {self.name!r}")
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _live_rows(self) -> int:
        return sum(1 for _ in _rows(self._mm))

    def _reclaim(self) -> None:
        """Clear the rows of dead processes: their share of the budget is free again."""
        for r, record in _rows(self._mm):
            if not record.alive:
                _write_row(self._mm, r, _EMPTY_ROW)

    # -- budget ----------------------------------------------------------------------------------

    def _held_total(self) -> int:
        return sum(_read_row(self._mm, r).held_bytes for r in range(MAX_MEMBERS))

    def held_bytes(self) -> int:
        with self._locked():
            return _read_row(self._mm, self.row).held_bytes

    def acquire(self, nbytes: int, unit: int) -> int:
        """Take up to `nbytes` of budget in whole `unit`s; returns the bytes granted (maybe 0).

        Never more than `max_bytes` held, nor above a pending shrink target of our own. When the
        free budget is short, members furthest above their minimum are asked to shrink and this
        call waits for them (see the module docstring).
        """
        deadline = time.monotonic() + SHRINK_WAIT_S
        asked: dict[int, int] = {}  # row -> pid when asked
        while True:
            with self._locked():
                self._reclaim()
                me = _read_row(self._mm, self.row)
                cap = min(nbytes, self.max_bytes - me.held_bytes)
                contended = me.target_bytes is not None  # we are asked to shrink ourselves: no growth
                if me.target_bytes is not None:  # past the target, and no asking or waiting for others
                    cap = min(cap, me.target_bytes - me.held_bytes)
                want = max(cap, 0) // unit * unit
                if want == 0:
                    return 0
                free = self.total_bytes - self._held_total()
                if free < want and not asked and not contended:
                    asked = self._ask_others(max(want - free, GROW_STEP_PAGES * unit))
                if free >= want or not asked or contended or self._settled(asked) or time.monotonic() > deadline:
                    grant = min(want, max(free, 0) // unit * unit)
                    _write_row(self._mm, self.row, replace(me, held_bytes=me.held_bytes + grant))
                    return grant
            if not _nudge(str(self.path), asked):
                time.sleep(POLL_S)

    def _ask_others(self, need: int) -> dict[int, int]:
        """Write shrink targets into the rows furthest above their minimum; returns who was asked."""
        rows = [(v.ceiling - v.min_bytes, r, v) for r, v in _rows(self._mm) if r != self.row and v.ceiling > v.min_bytes]
        rows.sort(key=lambda x: (-x[0], x[1]))
        asked: dict[int, int] = {}
        for surplus, r, v in rows:
            if need <= 0:
                break
            take = min(surplus, need)
            _write_row(self._mm, r, replace(v, target_bytes=v.ceiling - take))
            asked[r] = v.pid
            need -= take
        return asked

    def _settled(self, asked: dict[int, int]) -> bool:
        """Every member asked has acted (or gone): waiting longer frees nothing more."""
        for r, pid in asked.items():
            v = _read_row(self._mm, r)
            if v.pid == pid and v.target_bytes is not None and v.held_bytes > v.target_bytes:
                return False
        return True

    def release(self, nbytes: int) -> None:
        with self._locked():
            me = _read_row(self._mm, self.row)
            if nbytes > me.held_bytes:
                raise AssertionError(f"releasing {nbytes} bytes of budget but only {me.held_bytes} are held")
            _write_row(self._mm, self.row, replace(me, held_bytes=me.held_bytes - nbytes))

    # -- shrink requests ------------------------------------------------------------------------

    def pending_target(self) -> int | None:
        """The bytes we were asked to shrink to, if any; a lock-free read, cheap enough for every operation."""
        if self._left:
            return None
        (target,) = _TARGET.unpack_from(self._mm, _row_offset(self.row) + _TARGET_OFFSET)
        return None if target == NO_REQUEST else target

    def settle(self, target: int) -> None:
        """The request for `target` was acted on; a lower one written meanwhile stays pending."""
        with self._locked():
            me = _read_row(self._mm, self.row)
            if me.target_bytes == target:
                _write_row(self._mm, self.row, replace(me, target_bytes=None))

    def start_watcher(self, on_request: Callable[[bool], bool], on_tick: Callable[[], bool]) -> None:
        """Act on shrink requests while the store is idle, and refresh its counters for `top`.

        `on_request(blocking)` acts on the pending request and says whether it could (the
        watcher never blocks on the store: it retries every `POLL_S`, so `close()` can stop it);
        `on_tick()` publishes counters and returns False once the store is gone (the watcher
        then leaves the budget for it). Stores of this process are also asked directly.
        """
        self._on_request = on_request

        def watch() -> None:
            last = 0.0
            while not self._stop.wait(POLL_S):
                if self.pending_target() is not None:
                    on_request(False)
                now = time.monotonic()
                if now - last >= PUBLISH_S:
                    last = now
                    if not on_tick():
                        self.leave()
                        return

        self._watcher = threading.Thread(target=watch, name=f"tierkv-budget-{self.name}-{self.row}", daemon=True)
        self._watcher.start()

    def publish(self, used_bytes: int, hits: int, lookups: int, blocks: int, demoted_bytes: int) -> None:
        """Counters for `tierkv top`; only this member writes them, readers tolerate a torn update."""
        if self._left:
            return
        offset = _row_offset(self.row) + _STATS_OFFSET
        _STATS.pack_into(self._mm, offset, used_bytes, hits, lookups, blocks, demoted_bytes, time.time())

    def snapshot(self) -> BudgetSnapshot:
        with self._locked():
            return BudgetSnapshot(self.name, _total(self._mm), _states(self._mm))


def _nudge(path: str, asked: dict[int, int]) -> bool:
    """Ask members of this process to act now; True when every member asked has been handled so."""
    handled = True
    for row in asked:
        with _local_lock:
            ref = _local.get((path, row))
        member = ref() if ref is not None else None
        callback = member._on_request if member is not None else None
        if callback is None or not callback(False):
            handled = False
    return handled
