"""Faults of the remote tier, counted by kind and logged at most once per interval per kind.

A remote fault (a node down, a timeout, a slot moving, a full server, a value someone broke) is a
miss or a skipped write, never an exception, so the only way an operator learns about it is here:
a counter per kind in `stats()["remote"]`, and one warning line per kind and interval that says
how many happened since the last line. A storm of faults costs one line per interval, not one per
request. Messages are built from exception text and redacted addresses, never from credentials.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable

log = logging.getLogger("tierkv.remote")


class FaultLog:
    def __init__(self, interval_s: float = 30.0, clock: Callable[[], float] = time.monotonic,
                 logger: logging.Logger = log) -> None:
        self.interval_s = interval_s
        self.counts: Counter[str] = Counter()
        self._clock = clock
        self._log = logger
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._unlogged: Counter[str] = Counter()

    def note(self, kind: str, detail: str, n: int = 1) -> None:
        """Count `n` faults of `kind`; log a line unless one for `kind` went out less than an interval ago."""
        if n <= 0:
            return
        with self._lock:
            self.counts[kind] += n
            self._unlogged[kind] += n
            now = self._clock()
            last = self._last.get(kind)
            if last is not None and now - last < self.interval_s:
                return
            count = self._unlogged.pop(kind)
            self._last[kind] = now
        since = "" if last is None else f" in the last {now - last:.0f} s"
        self._log.warning("tierkv remote tier: %d x %s%s (%s); served as misses, writes skipped", count, kind, since, detail)
