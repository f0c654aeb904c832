"""`LayerLoad`: what `BlockStore.load_layers` returns, a load into an engine's pages that arrives layer by layer.

An engine computes layer 0 of its prefill as soon as layer 0's KV is in its pages, while the
later layers are still crossing PCIe: `wait(layer)` orders the caller's stream after that layer
(no host synchronisation). A block's checksum covers every layer, so whether the load was
intact is known only when the last layer is in: `finish()` waits for the copies, verifies, and
returns where the verified run ends. Anything computed from the load must be discarded (and
recomputed from there) when `finish()` returns less than `end`: that is how a corrupt block is
never the cause of an output. Until `finish()`, the blocks are leased (they cannot be evicted
or overwritten while their bytes are in flight).

When the blocks cannot be moved layer by layer (a CPU engine, blocks in a device tier or on
disk, a layout whose layers are not whole 4 KiB sectors), `load_layers` loads and verifies them
whole before it returns, and the `LayerLoad` is already finished: `wait` does nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .ops.layer_copy import LayerCopy


class LayerLoad:
    """A load queued layer by layer (`pending`), or one already done.

    `end`: first_block plus the blocks being loaded, the end of the run in blocks if all verify.
    `layerwise`: whether the copies really arrive layer by layer (False: loaded whole, verified).
    """

    def __init__(self, end: int, copy: LayerCopy | None = None,
                 settle: Callable[[list[int] | None], int] | None = None) -> None:
        self.end = end
        self.layerwise = copy is not None
        self._copy = copy
        self._settle = settle  # releases the lease, drops failed copies; None: the check itself failed
        self._verified_end: int | None = None if copy is not None else end

    def wait(self, layer: int, stream: torch.cuda.Stream | None = None) -> None:
        """Make `stream` (default: the current one) wait until layer `layer` is in the engine's pages."""
        if self._copy is not None:
            self._copy.wait(layer, stream)

    @property
    def finished(self) -> bool:
        return self._verified_end is not None

    def finish(self) -> int:
        """Wait for every copy, verify, release the lease; the end of the verified run, in blocks (idempotent).

        Less than `end` when a block failed its checksum: its copy in the store is dropped, and
        what the engine holds from that block on must be recomputed. If the wait itself fails (a
        CUDA error), the lease is released, nothing of the load counts, and the error propagates.
        """
        if self._verified_end is None:
            assert self._copy is not None and self._settle is not None
            copy, self._copy = self._copy, None
            try:
                bad: list[int] | None = copy.bad_blocks()
            except BaseException:
                self._verified_end = self._settle(None)
                raise
            self._verified_end = self._settle(bad)
        return self._verified_end

    def __enter__(self) -> LayerLoad:
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()
