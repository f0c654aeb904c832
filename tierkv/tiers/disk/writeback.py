"""Write-behind for the disk tier: demotions land in a bounded queue, a thread writes them out.

A caller that demotes blocks to disk pays a memory copy, not the disk's latency. The queue is
bounded in bytes: when it is full the caller waits (backpressure) instead of memory growing.
Until its write completes, a queued block is served from the queue, and its slot cannot be
handed out again even if the block is evicted meanwhile (it is quarantined until the write
that still targets it is done), so a late write never lands on another block's slot.
Completed writes are reported by generation, so the store commits only what reached disk.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class _Job:
    slots: list[int]
    gens: list[int]
    buffer: np.ndarray  # [len(slots) * stride] aligned staging


@dataclass
class WriteQueue:
    """Pending writes of one disk tier. All state is guarded by `cond`."""

    stride: int
    limit_bytes: int
    write: Callable[[Sequence[int], np.ndarray], None]  # blocking write + sync of one job
    release: Callable[[np.ndarray], None] = lambda buffer: None  # a job's buffer, once nothing reads it
    cond: threading.Condition = field(default_factory=threading.Condition)
    pending: dict[int, tuple[int, np.ndarray]] = field(default_factory=dict)  # slot -> (gen, row)
    quarantine: set[int] = field(default_factory=set)
    released: list[int] = field(default_factory=list)  # quarantined slots whose write finished
    completed: list[tuple[int, int]] = field(default_factory=list)  # (slot, gen) now durable
    failed: list[tuple[int, int, str]] = field(default_factory=list)
    _jobs: deque[_Job] = field(default_factory=deque)
    _queued_bytes: int = 0
    _gen: int = 0
    _busy: bool = False
    _closed: bool = False
    _thread: threading.Thread | None = None

    def submit(self, slots: Sequence[int], buffer: np.ndarray) -> list[int]:
        """Queue one batch (`buffer` holds the slots' rows, stride apart); returns generations."""
        size = len(slots) * self.stride
        with self.cond:
            while self._queued_bytes and self._queued_bytes + size > self.limit_bytes:
                self.cond.wait()  # backpressure: the disk is behind
            gens = list(range(self._gen, self._gen + len(slots)))
            self._gen += len(slots)
            rows = buffer.reshape(len(slots), self.stride)
            for slot, gen, row in zip(slots, gens, rows):
                self.pending[slot] = (gen, row)
            self._jobs.append(_Job(list(slots), gens, buffer))
            self._queued_bytes += size
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="tierkv-writeback", daemon=True)
                self._thread.start()
            self.cond.notify_all()
        return gens

    def lookup(self, slots: Sequence[int]) -> dict[int, np.ndarray]:
        """Copies of the queued rows among `slots` (position -> row)."""
        with self.cond:
            return {i: self.pending[s][1].copy() for i, s in enumerate(slots) if s in self.pending}

    def cancel(self, slots: Sequence[int]) -> list[int]:
        """Forget queued rows of freed slots; returns the slots that may be reused right away."""
        reusable = []
        with self.cond:
            for s in slots:
                if self.pending.pop(s, None) is not None or self._in_flight(s):
                    self.quarantine.add(s)
                else:
                    reusable.append(s)
        return reusable

    def _in_flight(self, slot: int) -> bool:
        return any(slot in job.slots for job in self._jobs)

    def is_pending(self, slot: int) -> bool:
        with self.cond:
            return slot in self.pending

    def take_results(self) -> tuple[list[tuple[int, int]], list[tuple[int, int, str]]]:
        """(completed, failed) writes since the last call, as (slot, generation[, error])."""
        with self.cond:
            out = (self.completed, self.failed)
            self.completed, self.failed = [], []
            return out

    def wait_results(self, timeout: float) -> bool:
        """Wait up to `timeout` s for finished (or failed) writes not taken yet; whether there are some.

        What the disk tier's committer waits on, so that it commits as soon as a batch is down.
        """
        with self.cond:
            self.cond.wait_for(lambda: self.completed or self.failed or self._closed, timeout)
            return bool(self.completed or self.failed)

    def has_results(self) -> bool:
        with self.cond:
            return bool(self.completed or self.failed)

    def take_released(self) -> list[int]:
        """Quarantined slots whose last write finished: free for reuse now."""
        with self.cond:
            out, self.released = self.released, []
            return out

    def drain(self) -> None:
        """Wait until every queued write is on disk (or failed)."""
        with self.cond:
            while self._jobs or self._busy:
                self.cond.wait()

    def close(self) -> None:
        self.drain()
        with self.cond:
            self._closed = True
            self.cond.notify_all()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self._jobs and not self._closed:
                    self.cond.wait()
                if not self._jobs:
                    return
                job = self._jobs[0]
                self._busy = True
            error = None
            try:
                self.write(job.slots, job.buffer)
            except Exception as e:  # reported to the store, which drops those disk copies
                error = str(e)
            with self.cond:
                self._jobs.popleft()
                self._busy = False
                self._queued_bytes -= len(job.slots) * self.stride
                for slot, gen in zip(job.slots, job.gens):
                    current = self.pending.get(slot)
                    if current is not None and current[0] == gen:
                        del self.pending[slot]
                        if error is None:
                            self.completed.append((slot, gen))
                        else:
                            self.failed.append((slot, gen, error))
                    if slot in self.quarantine and not self._in_flight(slot) and slot not in self.pending:
                        self.quarantine.discard(slot)
                        self.released.append(slot)
                self.cond.notify_all()
            self.release(job.buffer)  # no pending row points into it any more
