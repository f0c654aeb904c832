"""Writes to the remote tier off the caller's thread: a bounded queue and one thread sending batches.

A store that writes a block through to the cluster (or demotes one there) pays a memory copy
into the queue, never a network round trip. The thread takes everything queued (up to
`batch_bytes`) and sends it as one batch, one pipeline per shard. Until its SET is answered a
queued record is served from the queue, so a block is readable here the moment it is stored.
Records are staged in buffers the queue hands out and takes back once sent (`buffer()`): fresh
memory costs page faults on every write, reused memory does not.

The queue is bounded in bytes. A write that does not fit waits for room, but only up to
`max_wait_s` (the tier's timeout): past that it is skipped and reported lost, as a failed SET is.
A healthy cluster drains the queue in that time; a slow or dead one must not stall the engine,
and a block that did not reach the cluster is only a miss for the other nodes. The tier's agent
drains `take_lost()` after each store operation and forgets those remote copies.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ...index import Block


@dataclass
class PendingWrite:
    """One record on its way: its Redis key and value, and the block and slot it is for."""

    key: bytes
    value: np.ndarray  # uint8 header + payload (a staging buffer of the queue), not changed while queued
    block: Block
    slot: int
    reason: str = ""  # why it was lost, once it is


# Sends a batch; returns, per write, None when it was stored or the fault kind that stopped it.
Sender = Callable[[Sequence[PendingWrite]], list[str | None]]


class WriteBehind:
    def __init__(self, send: Sender, value_bytes: int, limit_bytes: int, max_wait_s: float,
                 batch_bytes: int = 64 << 20) -> None:
        self._send = send
        self.value_bytes = value_bytes
        self.limit_bytes = max(limit_bytes, value_bytes)
        self.max_wait_s = max_wait_s
        self._spare: list[np.ndarray] = []  # staging buffers back from sent writes
        self.batch_bytes = batch_bytes
        self._cond = threading.Condition()
        self._queue: deque[PendingWrite] = deque()
        self._pending: dict[bytes, PendingWrite] = {}  # key -> its latest queued or in-flight write
        self._queued_bytes = 0
        self._busy = False
        self._closed = False
        self._lost: list[PendingWrite] = []
        self._thread: threading.Thread | None = None
        self.written = 0
        self.written_bytes = 0

    def submit(self, writes: Sequence[PendingWrite]) -> None:
        """Queue writes, each waiting up to `max_wait_s` for room; one that still does not fit is lost ("queue_full").

        Waiting is backpressure from a cluster that is slower than the store; a cluster that takes
        nothing fails its batches at once (its breaker is open), so the queue empties and nothing waits long.
        """
        with self._cond:
            for w in writes:
                size = len(w.value)
                if self._thread is None and not self._closed:
                    self._thread = threading.Thread(target=self._run, name="tierkv-remote-writer", daemon=True)
                    self._thread.start()
                fits = self._cond.wait_for(lambda: self._closed or not self._queued_bytes  # noqa: B023
                                           or self._queued_bytes + size <= self.limit_bytes,  # noqa: B023
                                           self.max_wait_s)
                if self._closed or not fits:
                    w.reason = "closed" if self._closed else "queue_full"
                    self._lost.append(w)
                    self._recycle(w.value)
                    continue
                self._queue.append(w)
                self._pending[w.key] = w
                self._queued_bytes += size
                self._cond.notify_all()

    def buffer(self) -> np.ndarray:
        """A staging buffer of `value_bytes` for one record (reused once a write that held it is done)."""
        with self._cond:
            if self._spare:
                return self._spare.pop()
        return np.empty(self.value_bytes, dtype=np.uint8)

    def _recycle(self, value: np.ndarray) -> None:
        if len(self._spare) * self.value_bytes < self.limit_bytes:
            self._spare.append(value)

    def copy_queued(self, key: bytes, offset: int, out: np.ndarray) -> bool:
        """Copy a queued or in-flight write of `key` (from byte `offset` of its value) into `out`; False if none."""
        with self._cond:
            w = self._pending.get(key)
            if w is None:
                return False
            out[:] = w.value[offset:]
            return True

    def take_lost(self) -> list[PendingWrite]:
        with self._cond:
            lost, self._lost = self._lost, []
            return lost

    @property
    def queued_bytes(self) -> int:
        return self._queued_bytes

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until everything queued was sent (or failed); False if `timeout` passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self._busy, timeout)

    def close(self, timeout: float) -> None:
        """Send what is queued (waiting at most `timeout`), then stop the thread; the rest is lost."""
        self.drain(timeout)
        with self._cond:
            self._closed = True
            while self._queue:
                w = self._queue.popleft()
                w.reason = "closed"
                self._lost.append(w)
            self._pending.clear()
            self._spare.clear()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._closed)
                if not self._queue:
                    return
                batch: list[PendingWrite] = []
                size = 0
                while self._queue and (not batch or size + len(self._queue[0].value) <= self.batch_bytes):
                    w = self._queue.popleft()
                    batch.append(w)
                    size += len(w.value)
                self._busy = True
            try:
                reasons = self._send(batch)
            except Exception as e:  # the sender reports faults as values; anything else still loses only this batch
                reasons = [f"error: {type(e).__name__}"] * len(batch)
            with self._cond:
                self._busy = False
                self._queued_bytes -= size
                for w, reason in zip(batch, reasons):
                    if self._pending.get(w.key) is w:
                        del self._pending[w.key]
                    self._recycle(w.value)
                    if reason is None:
                        self.written += 1
                        self.written_bytes += len(w.value)
                    else:
                        w.reason = reason
                        self._lost.append(w)
                self._cond.notify_all()
