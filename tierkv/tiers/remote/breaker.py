"""A circuit breaker: stop asking a dead server for a while, then try one request, and recover by itself.

Without it every lookup of every request would wait for a connect or a timeout against a node
that is down; with it, after `threshold` consecutive failures the node is left alone for a
cooldown (doubling on each failed trial, up to `max_cooldown_s`), and lookups meanwhile are
instant misses. After the cooldown one caller is let through (half-open): success closes the
breaker, failure opens it again. Thread-safe; time comes from `clock` so tests need not sleep.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from enum import Enum


class BreakerState(str, Enum):
    CLOSED = "closed"  # requests go through
    OPEN = "open"  # requests are refused until the cooldown ends
    HALF_OPEN = "half_open"  # one trial request is out


class CircuitBreaker:
    def __init__(self, threshold: int = 3, cooldown_s: float = 1.0, max_cooldown_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if threshold < 1 or cooldown_s <= 0 or max_cooldown_s < cooldown_s:
            raise ValueError("CircuitBreaker needs threshold >= 1 and 0 < cooldown_s <= max_cooldown_s")
        self.threshold = threshold
        self.base_cooldown_s = cooldown_s
        self.max_cooldown_s = max_cooldown_s
        self._clock = clock
        self._lock = threading.Lock()
        self._failures = 0
        self._cooldown = cooldown_s
        self._open_until = 0.0
        self._state = BreakerState.CLOSED
        self.opened = 0  # times it opened: for stats

    @property
    def state(self) -> BreakerState:
        with self._lock:
            if self._state is BreakerState.OPEN and self._clock() >= self._open_until:
                return BreakerState.HALF_OPEN  # the next `allow` lets a trial through
            return self._state

    def allow(self) -> bool:
        """Whether a request may go out now (in the open state after its cooldown: one trial)."""
        with self._lock:
            if self._state is BreakerState.CLOSED:
                return True
            if self._state is BreakerState.OPEN and self._clock() >= self._open_until:
                self._state = BreakerState.HALF_OPEN
                return True
            return False

    def success(self) -> None:
        with self._lock:
            self._failures = 0
            self._cooldown = self.base_cooldown_s
            self._state = BreakerState.CLOSED

    def failure(self) -> bool:
        """Count a failure; True when this one opened the breaker."""
        with self._lock:
            self._failures += 1
            trial = self._state is BreakerState.HALF_OPEN
            if not trial and self._failures < self.threshold:
                return False
            if trial:
                self._cooldown = min(self._cooldown * 2, self.max_cooldown_s)
            self._state = BreakerState.OPEN
            self._open_until = self._clock() + self._cooldown
            self.opened += 1
            return True
