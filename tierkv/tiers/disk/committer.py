"""The disk tier's agent: a thread that commits finished write-backs to the manifest as they finish.

Write-behind makes a demotion cost a memory copy; its manifest entry can only follow once the
write is down. Left to the store's own commit after each operation, that entry waited for the
*next* call, so an idle store killed with -9 lost the blocks of its last calls although their
bytes were on disk. This thread waits on the write queue and, as soon as a batch is down, runs
one empty operation through the store (`StoreAccess.locked`), whose commit records it: in
"batch" mode a block is in the manifest one write-back batch after it reached the queue,
whoever calls the store next.
"""

from __future__ import annotations

import logging
import threading

from ..base import StoreAccess, TierAgent
from .writeback import WriteQueue

log = logging.getLogger("tierkv.disk")

_POLL_S = 0.25  # how often an idle committer looks whether the store closed


class Committer(TierAgent):
    """Commits the disk tier's completed writes without waiting for the next call."""

    def __init__(self, queue: WriteQueue, store: StoreAccess) -> None:
        self._queue = queue
        self._store = store
        self._stop = threading.Event()
        self.commits = 0  # commits this thread ran (for stats)
        self._thread = threading.Thread(target=self._run, name="tierkv-commit", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._queue.wait_results(_POLL_S):
                continue
            # The store's lock, unless the store closes meanwhile: close() holds it while it waits for us.
            while not self._store.lock.acquire(timeout=_POLL_S):
                if self._stop.is_set():
                    return
            try:
                if self._stop.is_set() or self._store.is_closed():
                    return
                if not self._queue.has_results():
                    continue  # an operation that ended meanwhile committed them
                with self._store.locked():
                    pass  # an operation that does nothing: its commit records what the queue finished
                self.commits += 1
            except Exception:  # a bug, not a fault (the tier turns faults into counts); keep committing
                log.exception("disk tier: the background commit failed; the next operation commits instead")
            finally:
                self._store.lock.release()

    def describe(self) -> dict[str, int]:
        return {"background_commits": self.commits}

    def close(self) -> None:
        self._stop.set()
