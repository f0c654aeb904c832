"""Reusing a layer's page selection between selections (`DecodeBudget.select_every`).

A layer that selects only every n-th step keeps its latest selection on the device (`Kept`, at
fixed addresses, so that a captured selecting step writes it and a captured step between
selections reads it) and, on the host, what it was made for (`_Selection`). `KeptSelections`
decides each step's mode from host values only:

- "select": score, place, fetch as usual (and keep the result);
- "merge": reuse the kept pages, but rebuild the block table from them and the current window,
  because a placement since (a page opening, a sequence arriving or leaving) may have taken a
  kept page's slot (`merge_table` leaves such pages out);
- "same": nothing was placed since the table was built: attend over it, only the lengths grow.

A page opened since the selection is in the window, so it is attended; a selection is forced
when more pages opened since than the window holds, when the batch or its padded width changes,
and after `forget` (arrivals and departures).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .residency import Residency

KeptKey = tuple[tuple[int, ...], int]  # (the batch's sequences, padded selection width)
MAX_KEPT = 64  # beyond this many (batch, width) pairs every kept selection is dropped and made anew


@dataclass(frozen=True)
class Kept:
    """A layer's latest selection for one batch and width: `[n, k]` pages and mask, and the block
    table the steps between selections attend over (`[n, k + window]` slots, the first
    `count[i]` of row i in use)."""

    pages: torch.Tensor
    mask: torch.Tensor
    table: torch.Tensor
    count: torch.Tensor


@dataclass(frozen=True)
class _Selection:
    """The host's record of a layer's latest selection: for which batch and width, at which of the
    layer's steps, and each row's page count then."""

    key: KeptKey
    at: int
    pages: np.ndarray


class KeptSelections:
    """One layer's kept selections and the host state that says when each may be reused."""

    def __init__(self, every: int, window_pages: int, device: torch.device) -> None:
        self.every, self.window_pages, self.device = every, window_pages, device
        self._kept: dict[KeptKey, Kept] = {}
        self.selection: _Selection | None = None  # the latest selection (None: the next step selects)
        self._steps = 0  # attention steps of the layer so far
        self._placements = 0  # placements so far: each may take a kept page's slot
        self._table_for: tuple[KeptKey, int] | None = None  # (key, placements) the kept table is right for

    def placed(self) -> None:
        """A placement happened in the layer (a page opened): kept tables must be merged again."""
        self._placements += 1

    def forget(self) -> None:
        """A sequence arrived or left: the next step selects."""
        self.selection = None
        self._placements += 1

    def plan(self, batch: tuple[int, ...], k: int, pages: np.ndarray) -> tuple[Kept | None, str, bool]:
        """(where this step's selection is kept, the step's mode, whether every kept buffer was dropped).

        `pages`: each row's page count now. With `every == 1` nothing is kept and every step
        selects. The third value tells the caller that buffers a captured step may hold were
        replaced (it drops its graphs).
        """
        self._steps += 1
        if self.every == 1:
            return None, "select", False
        key = (batch, k)
        kept = self._kept.get(key)
        dropped = False
        if kept is None:
            if len(self._kept) >= MAX_KEPT:  # batches that keep changing: start over
                self._kept.clear()
                self.selection = None
                dropped = True
            n = len(batch)
            kept = Kept(torch.zeros((n, k), dtype=torch.int64, device=self.device),
                        torch.zeros((n, k), dtype=torch.bool, device=self.device),
                        torch.zeros((n, k + self.window_pages), dtype=torch.int64, device=self.device),
                        torch.zeros(n, dtype=torch.int64, device=self.device))
            self._kept[key] = kept
        sel, now = self.selection, (key, self._placements)
        step = self._steps - 1
        if (sel is not None and sel.key == key and step - sel.at < self.every
                and int((pages - sel.pages).max()) <= self.window_pages):
            mode = "same" if self._table_for == now else "merge"
        else:
            self.selection = _Selection(key, step, pages)
            mode = "select"
        self._table_for = now  # the step writes the table it attends over into `kept`
        return kept, mode, dropped

    def merge_table(self, kept: Kept, res: Residency, rows: torch.Tensor, num_pages: torch.Tensor) -> None:
        """`kept.table`/`count` (device work): the kept pages and the current window that are resident, in order."""
        w = self.window_pages
        window = num_pages[:, None] - w + torch.arange(w, device=self.device)[None, :]
        cand = torch.cat([torch.where(kept.mask, kept.pages, -1), window.clamp(min=-1)], dim=1).sort(dim=1).values
        slots = res.slot[res.ids(rows, cand.clamp(min=0))]
        first = torch.ones_like(cand, dtype=torch.bool)
        first[:, 1:] = cand[:, 1:] != cand[:, :-1]
        ok = first & (cand >= 0) & (slots >= 0)
        n, width = cand.shape
        # Compact the pages kept in order; the columns after them hold the tail's slot (never read).
        at = torch.where(ok, ok.cumsum(1) - 1, width)
        table = res.slot[res.ids(rows, (num_pages - 1)[:, None])].expand(n, width + 1).clone()
        table.scatter_(1, at, slots)
        kept.table.copy_(table[:, :width])
        kept.count.copy_(ok.sum(1))

    @staticmethod
    def keep(kept: Kept, pages: torch.Tensor, mask: torch.Tensor, table: torch.Tensor, count: torch.Tensor) -> None:
        """What a selecting step keeps (device work): its pages, mask, block table and page counts."""
        kept.pages.copy_(pages)
        kept.mask.copy_(mask)
        k = table.shape[1]
        kept.table[:, :k] = table
        kept.table[:, k:] = table[:, -1:]
        kept.count.copy_(count)
