"""A seam in the disk tier's own I/O calls, through which fault-injection tests make the device fail.

Off (one global lookup per request) unless a test installs a `FaultPlan`. Then every positional
read, write and sync of the data files asks the plan first, and a matching rule raises the
`OSError` a failing device or a full file system would (EIO, ENOSPC), stalls the call as a slow
device does, or kills the process with SIGKILL at that exact call, which is how the crash tests
place a crash between a payload write, its fsync and the manifest commit. The tier's real code
runs either way: the plan stands in for the device, never for the tier. LMDB does its own I/O,
so the manifest's faults come from real file systems in the tests (a full tmpfs, RLIMIT_FSIZE).
"""

from __future__ import annotations

import errno as errnos
import os
import signal
import threading
import time
from dataclasses import dataclass, field

OPS = ("read", "write", "sync")


@dataclass
class Rule:
    """Fail (or kill at) the calls of one kind that touch a byte range of a data file.

    op: "read", "write" or "sync" (a sync touches the whole file).
    action: "raise" an OSError with `errno`, "delay" the call by `seconds` (a slow device), or
        "kill" the process with SIGKILL.
    file, start, stop: the data file (None: any) and the byte range [start, stop) a call must
        overlap (stop None: to the end).
    after: the rule fires from the `after`-th matching call on; `times` bounds how often (None: always).
    heals_on_write: a read rule that stops once a write covers its whole range, as a bad sector
        is remapped when it is written again.
    """

    op: str
    action: str = "raise"
    errno: int = errnos.EIO
    file: int | None = None
    start: int = 0
    stop: int | None = None
    after: int = 1
    times: int | None = None
    heals_on_write: bool = False
    seconds: float = 0.0
    matched: int = 0  # calls that touched the range
    fired: int = 0  # calls failed (or killed at)

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"Rule.op must be one of {OPS}, got {self.op!r}")
        if self.action not in ("raise", "delay", "kill"):
            raise ValueError(f"Rule.action must be 'raise', 'delay' or 'kill', got {self.action!r}")

    def overlaps(self, file: int, offset: int, length: int) -> bool:
        if self.file is not None and file != self.file:
            return False
        if length == 0:  # a sync: the whole file
            return True
        return offset < (self.stop if self.stop is not None else offset + length) and offset + length > self.start

    def covered_by(self, file: int, offset: int, length: int) -> bool:
        return (self.file is None or file == self.file) and self.stop is not None and \
            offset <= self.start and offset + length >= self.stop


@dataclass
class FaultPlan:
    """The rules in force; checked from the disk tier's I/O threads, hence the lock."""

    rules: list[Rule]
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def check(self, op: str, file: int, offset: int, length: int) -> None:
        delay = 0.0
        with self._lock:
            for rule in self.rules:
                if op == "write" and rule.op == "read" and rule.heals_on_write and rule.covered_by(file, offset, length):
                    rule.times = rule.fired  # healed: fires no more
                if rule.op != op or not rule.overlaps(file, offset, length):
                    continue
                rule.matched += 1
                if rule.matched < rule.after or (rule.times is not None and rule.fired >= rule.times):
                    continue
                rule.fired += 1
                if rule.action == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                if rule.action == "delay":
                    delay += rule.seconds
                    continue
                raise OSError(rule.errno, f"{os.strerror(rule.errno)} (injected: {op} of data file {file} at {offset})")
        if delay:
            time.sleep(delay)  # outside the lock: other I/O threads are slow on their own

    @property
    def fired(self) -> int:
        return sum(r.fired for r in self.rules)


_plan: FaultPlan | None = None


def install(plan: FaultPlan | None) -> None:
    """Put `plan` in force for every disk tier of this process (None: no faults)."""
    global _plan
    _plan = plan


def check(op: str, file: int, offset: int, length: int) -> None:
    """Called by the data-file I/O before each call; raises (or kills) where the plan says so."""
    plan = _plan
    if plan is not None:
        plan.check(op, file, offset, length)
