"""The latency of a store's public operations, observed into its histograms (`metrics.OperationLatency`).

A decorator apart from the store so that `BlockStore` holds only its operations; `metrics.py`
renders what is observed here.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Concatenate, ParamSpec, Protocol, TypeVar

from .metrics import OperationLatency


class Observed(Protocol):
    """What `timed` needs of the object whose methods it times: its latency histograms."""

    _latency: OperationLatency


_S = TypeVar("_S", bound=Observed)
_P = ParamSpec("_P")
_R = TypeVar("_R")


def timed(op: str) -> Callable[[Callable[Concatenate[_S, _P], _R]], Callable[Concatenate[_S, _P], _R]]:
    """Observe each call's wall time (raised or not) as operation `op`."""

    def wrap(method: Callable[Concatenate[_S, _P], _R]) -> Callable[Concatenate[_S, _P], _R]:
        @functools.wraps(method)
        def timed_call(self: _S, *args: _P.args, **kwargs: _P.kwargs) -> _R:
            start = time.perf_counter()
            try:
                return method(self, *args, **kwargs)
            finally:
                self._latency.observe(op, time.perf_counter() - start)

        return timed_call

    return wrap
