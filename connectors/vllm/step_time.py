"""What the connector costs the engine's step: seconds its worker hooks take on the step's thread.

vLLM calls the worker hooks (`start_load_kv`, `wait_for_save`, `get_finished`, ...) on the thread
that runs the step, so whatever they take, the step takes too; the copies and hashing that run on
the connector's own threads are not in it (saves and asynchronous loads). `get_finished` is called
once per step, after the forward pass: it closes the step. The figure the issue asks for, "a
save adds at most 1 ms to a step", is `save_ms` of `summary()`.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_KEPT_STEPS = 8192  # the latest steps kept for the percentiles


class StepTime:
    """Per-step seconds in the connector's worker hooks: loads, queuing saves, preemptions, the rest.

    "preempt" is `handle_preemptions`, which waits for the pending saves of preempted requests
    before vLLM reuses their pages: a cost of preemption, kept apart from what queuing a save costs.
    """

    KINDS = ("load", "save", "preempt", "other")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current = dict.fromkeys(self.KINDS, 0.0)
        self._steps: dict[str, deque[float]] = {kind: deque(maxlen=_KEPT_STEPS) for kind in self.KINDS}
        self.steps = 0

    @contextmanager
    def hook(self, kind: str) -> Iterator[None]:
        """Time one hook call into this step's `kind` (one of `KINDS`)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            with self._lock:
                self._current[kind] += elapsed

    def end_step(self) -> None:
        with self._lock:
            for kind in self.KINDS:
                self._steps[kind].append(self._current[kind])
                self._current[kind] = 0.0
            self.steps += 1

    def summary(self) -> dict[str, Any]:
        """Steps seen, and per kind the mean, 99th percentile and maximum milliseconds per step."""
        with self._lock:
            out: dict[str, Any] = {"steps": self.steps}
            for kind, samples in self._steps.items():
                ordered = sorted(samples)
                if not ordered:
                    out[f"{kind}_ms"] = {"mean": 0.0, "p99": 0.0, "max": 0.0}
                    continue
                p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
                out[f"{kind}_ms"] = {"mean": round(1e3 * sum(ordered) / len(ordered), 4), "p99": round(1e3 * p99, 4),
                                     "max": round(1e3 * ordered[-1], 4)}
            return out
