"""CUDA graphs of a page manager's steady decode work: captured the second time a shape runs, replayed after.

A steady decode step launches a few hundred small kernels per layer (scores, `topk`, the
residency tables' scatters, the fetch, the attention); launching them from Python costs far
more than running them. The step's device work depends on the host only through values that
stay fixed while a batch decodes (the rows, the padded selection and page widths, the
budget's constants), so one graph per layer and shape replays it with no Python in between.

What a graph reads and writes must stay at its address for the graph's life: the manager's
pools and tables are allocated once and updated in place, the inputs are copied into the
graph's own buffers before each replay, and the output is copied out after it (graphs share
one memory pool and are replayed one at a time on one stream, so one graph's scratch memory
is another's). The first time a key comes it runs eagerly: Triton's compilation and cuBLAS's
set-up must not happen during a capture. A capture that fails raises `GraphCaptureError`.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch

from ..errors import GraphCaptureError

MAX_GRAPHS = 512  # beyond this many shapes (batches that keep changing) every graph is dropped and captured anew


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]  # the graph's own input buffers
    output: torch.Tensor | None
    keep: object  # tensors the graph's pointers refer to that the caller might otherwise free


class StepGraphs:
    """Graphs of device-only functions keyed by what fixes their work; see the module docstring."""

    def __init__(self, device: torch.device) -> None:
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()
        self._seen: set[Hashable] = set()
        self._graphs: dict[Hashable, _Captured] = {}
        self.enabled = True
        self.captures = 0
        self.replays = 0

    def run(self, key: Hashable, fn: Callable[..., torch.Tensor | None], inputs: tuple[torch.Tensor, ...],
            keep: object = None) -> torch.Tensor | None:
        """`fn(*inputs)`: eagerly the first time `key` comes, from a graph captured the second time, replayed after.

        `fn` must launch only device work whose shape and host-side arguments `key` fixes; it
        may read and write tensors that live at fixed addresses (and `keep` holds alive).
        Returns `fn`'s output (a fresh tensor, not the graph's buffer) or None.
        """
        captured = self._graphs.get(key)
        if captured is None:
            if not self.enabled or key not in self._seen:
                self._seen.add(key)
                return fn(*inputs)
            captured = self._capture(key, fn, inputs, keep)
        else:
            for buf, t in zip(captured.inputs, inputs):
                buf.copy_(t)
        captured.graph.replay()
        self.replays += 1
        return None if captured.output is None else captured.output.clone()

    def _capture(self, key: Hashable, fn: Callable[..., torch.Tensor | None], inputs: tuple[torch.Tensor, ...],
                 keep: object) -> _Captured:
        if len(self._graphs) >= MAX_GRAPHS:
            self.clear()
        static = tuple(t.clone() for t in inputs)  # outside the pool: they outlive every replay
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                out = fn(*static)
        except RuntimeError as e:
            # Not an eager fallback: a capture that fails midway can leave torch's CUDA state
            # (its RNG's capture bookkeeping, for one) unusable for later work, so say so and stop.
            self.enabled = False
            raise GraphCaptureError(
                f"a decode step could not be captured as a CUDA graph ({e}); run it eagerly: "
                "PageManager(..., cuda_graphs=False), or TierKV(..., decode_cuda_graphs=False) in transformers"
            ) from e
        captured = _Captured(graph, static, out, keep)
        self._graphs[key] = captured
        self.captures += 1
        return captured

    def clear(self) -> None:
        """Drop every graph (after which each shape runs eagerly once, then is captured again)."""
        self._graphs.clear()
        self._seen.clear()
