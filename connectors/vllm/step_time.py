"""What the connector costs the engine's step: seconds its worker hooks take on the step's thread.

vLLM calls the worker hooks (`start_load_kv`, `wait_for_save`, `get_finished`, ...) on the thread
that runs the step, so whatever they take, the step takes too; the copies and hashing that run on
the connector's own threads are not in it (saves and asynchronous loads). `get_finished` is called
once per step, after the forward pass: it closes the step. The figure the issue asks for, "a
save adds at most 1 ms to a step", is `save_ms` of `summary()`.

Each kind is kept twice: wall time (`save_ms`: what the step waited) and the step thread's own
CPU time in the hook (`save_cpu_ms`). Where the wall time of a step is far above its CPU time,
the thread was not running: descheduled by the OS or waiting for the interpreter lock that
another thread held, which is how one step in a thousand takes 1-2 ms on a busy 2-core machine
while the hook's own work stays a fraction of that.
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
        self._current = dict.fromkeys(self._series(), 0.0)
        self._steps: dict[str, deque[float]] = {name: deque(maxlen=_KEPT_STEPS) for name in self._series()}
        self.steps = 0

    @contextmanager
    def hook(self, kind: str) -> Iterator[None]:
        """Time one hook call into this step's `kind` (one of `KINDS`)."""
        if kind not in self.KINDS:
            raise ValueError(f"kind must be one of {self.KINDS}, got {kind!r}")
        start, start_cpu = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            elapsed, cpu = time.perf_counter() - start, time.thread_time() - start_cpu
            with self._lock:
                self._current[kind] += elapsed
                self._current[f"{kind}_cpu"] += cpu

    def end_step(self) -> None:
        with self._lock:
            for name in self._steps:
                self._steps[name].append(self._current[name])
                self._current[name] = 0.0
            self.steps += 1

    @classmethod
    def _series(cls) -> list[str]:
        """Each kind's wall time, then its CPU time: `load`, ..., `load_cpu`, ..."""
        return [*cls.KINDS, *(f"{kind}_cpu" for kind in cls.KINDS)]

    def summary(self) -> dict[str, Any]:
        """Steps seen, and per kind the mean, 99th percentile and maximum milliseconds per step.

        `{kind}_ms` is wall time, `{kind}_cpu_ms` the step thread's CPU time in the same hooks;
        `{kind}_ms["cpu_of_max"]` is the CPU time of the step with the largest wall time (the two
        series are kept step by step, side by side).
        """
        with self._lock:
            out: dict[str, Any] = {"steps": self.steps}
            for name, samples in self._steps.items():
                ordered = sorted(samples)
                if not ordered:
                    out[f"{name}_ms"] = {"mean": 0.0, "p99": 0.0, "max": 0.0}
                    continue
                p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
                out[f"{name}_ms"] = {"mean": round(1e3 * sum(ordered) / len(ordered), 4), "p99": round(1e3 * p99, 4),
                                     "max": round(1e3 * ordered[-1], 4)}
                if name in self.KINDS:
                    slowest = max(range(len(samples)), key=samples.__getitem__)
                    out[f"{name}_ms"]["cpu_of_max"] = round(1e3 * self._steps[f"{name}_cpu"][slowest], 4)
            return out
