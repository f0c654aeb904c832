"""Which device slot each page of one layer occupies, and which slots give way when a step needs pages: all on the device.

The tables live on the page manager's device so that a decode step never asks the host what is
resident (that would be a device-to-host copy and a synchronisation per layer). Pages are named
by a flat id `seq * max_pages + page`. Every table has one spare entry at its end (`trash_page`,
`trash_slot`): masked writes go there, so a scatter needs no data-dependent length on the host.

Room for the pages a step wants (`place`) is made in two moves, both fixed-shape tensor ops:

1. Budget: each requesting row gives up its own resident pages that it does not want, least
   recently selected first (then lowest score, then lowest page), until its resident pages plus
   the ones it is missing fit its budget (`over = resident + missing - budget`).
2. Pairing: every device slot gets a priority key (`victim_keys`); one stable sort orders the
   slots, best victim first: free slots (by slot number); pages of `LRU` sequences (the rows of
   an attention step) that are not wanted, least recently selected first; unprotected pages of
   `SCORE` sequences (everyone else), lowest score first; `NEVER` sequences, protected pages
   (sinks, recent window) and wanted pages are never victims. The k-th missing page (row-major
   over the request) takes the k-th slot of that order (a cumsum gives k). The caller has
   checked on the host that enough victims exist (`PageManager` does before anything is queued).

`tests/test_decode_residency.py` holds the same rule written as a plain Python loop.
"""

from __future__ import annotations

import torch

LRU, SCORE, NEVER = 1, 2, 3
_CLASS_SHIFT = 61
_AGE_BITS = 30
_NEVER_KEY = NEVER << _CLASS_SHIFT


def _score_bits(score: torch.Tensor) -> torch.Tensor:
    """Non-negative float32 scores as int64 that order the same way (the bit pattern of a float >= +0 is monotonic)."""
    return score.clamp(min=0).view(torch.int32).to(torch.int64) & 0x7FFFFFFF


def _recency(last_used: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """30 bits that grow with `last_used`: older pages (selected longer ago) first. Ages past 2^30 steps tie."""
    cap = (1 << _AGE_BITS) - 1
    return cap - (step - last_used).clamp(0, cap)


class Residency:
    """Device slot of every page of `max_seqs` x `max_pages`, and the page in each of `slots` device slots."""

    def __init__(self, max_seqs: int, max_pages: int, slots: int, device: torch.device) -> None:
        self.max_seqs, self.max_pages, self.slots = max_seqs, max_pages, slots
        n = max_seqs * max_pages
        self.trash_page, self.trash_slot = n, slots
        self.slot = torch.full((n + 1,), -1, dtype=torch.int64, device=device)  # -1: not resident
        self.occupant = torch.full((slots + 1,), -1, dtype=torch.int64, device=device)  # -1: free
        self.last_used = torch.zeros(n + 1, dtype=torch.int64, device=device)  # step that last selected the page
        self.score = torch.zeros(n + 1, dtype=torch.float32, device=device)  # its score then (>= 0)
        self._cols = torch.arange(max_pages, device=device)

    @property
    def table(self) -> torch.Tensor:
        """`[max_seqs, max_pages]` device slot of each page, -1 where it is not resident (a view)."""
        return self.slot[:-1].view(self.max_seqs, self.max_pages)

    def ids(self, rows: torch.Tensor, pages: torch.Tensor) -> torch.Tensor:
        """Flat page ids of `pages` `[n, k]` of sequences `rows` `[n]`."""
        return rows[:, None] * self.max_pages + pages

    def masked(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`ids` where `mask`, the spare page elsewhere: the index of a masked scatter."""
        return torch.where(mask, ids, self.trash_page)

    def victim_keys(self, keep: torch.Tensor, seq_class: torch.Tensor, num_pages: torch.Tensor, sink_pages: int,
                    window_pages: int, step: torch.Tensor) -> torch.Tensor:
        """`[slots]` int64 priority of each slot as a victim, lowest first; `>= NEVER << 61` means never.

        keep: `[slots]` bool, slots holding a page the step wants. seq_class: `[max_seqs]` LRU,
        SCORE or NEVER. num_pages: `[max_seqs]` page count of each sequence (for its protected pages).
        """
        occ = self.occupant[:-1]
        o = occ.clamp(min=0)
        seq, page = o // self.max_pages, o % self.max_pages
        cls = seq_class[seq]
        protected = (page < sink_pages) | (page >= num_pages[seq] - window_pages)
        bits, recent = _score_bits(self.score[o]), _recency(self.last_used[o], step)
        lru = (LRU << _CLASS_SHIFT) | (recent << 31) | bits
        low = (SCORE << _CLASS_SHIFT) | (bits << _AGE_BITS) | recent
        key = torch.where(cls == LRU, lru, torch.where(cls == SCORE, low, _NEVER_KEY))
        key = torch.where(protected | keep, _NEVER_KEY, key)
        return torch.where(occ < 0, 0, key)

    def victims_available(self, seq_class: torch.Tensor, num_pages: torch.Tensor, sink_pages: int, window_pages: int,
                          step: torch.Tensor) -> int:
        """How many slots could be given up now, nothing wanted (synchronises: for `add`, which is rare)."""
        keep = torch.zeros(self.slots, dtype=torch.bool, device=self.slot.device)
        keys = self.victim_keys(keep, seq_class, num_pages, sink_pages, window_pages, step)
        return int((keys < _NEVER_KEY).sum())

    def place(self, rows: torch.Tensor, want: torch.Tensor, mask: torch.Tensor, width: int, budgets: torch.Tensor,
              seq_class: torch.Tensor, num_pages: torch.Tensor, sink_pages: int, window_pages: int,
              step: torch.Tensor, roomy: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Make pages `want[i, j]` (where `mask[i, j]`) of sequence `rows[i]` resident; nothing leaves the device.

        want: `[n, k]` page indices below `width` (the rows' largest page count), valid even where
        masked. budgets: `[n]` device pages each row may hold after the call. Returns the slot each
        newly placed page got (`[n, k]`, -1 where the page was resident or masked; its contents are
        the caller's to fill) and the number of pages evicted (a 0-dim device tensor). `step`: the
        manager's step counter, a 0-dim device tensor (so a captured step reads it when replayed).
        `roomy`: the caller knows that every sequence holding device slots is among `rows` and
        that `budgets` sum to at most the slots; after the trim the free slots then cover every
        missing page, so the k-th missing page takes the k-th free slot (a cumsum and a search)
        without ranking the occupied ones: the same slots the full victim order gives.
        """
        n = rows.shape[0]
        ids = self.ids(rows, want)
        cur = self.slot[ids]
        missing = mask & (cur < 0)
        evicted = self._trim(rows, want, mask, missing, width, budgets, step)
        flat = missing.reshape(-1)
        k = (flat.cumsum(0) - 1).clamp(0, self.slots - 1)
        if roomy:
            free = (self.occupant[:-1] < 0).cumsum(0)
            victim = torch.where(flat, torch.searchsorted(free, k + 1).clamp(max=self.slots - 1), -1)
        else:
            keep = torch.zeros(self.slots + 1, dtype=torch.bool, device=cur.device)
            keep.index_fill_(0, torch.where(mask & (cur >= 0), cur, self.trash_slot).reshape(-1), True)
            order = self.victim_keys(keep[:-1], seq_class, num_pages, sink_pages, window_pages, step).argsort(stable=True)
            victim = torch.where(flat, order[k], -1)
        to = torch.where(flat, victim, self.trash_slot)
        old = self.occupant[to]
        gone = flat & (old >= 0)
        self.slot.index_fill_(0, torch.where(gone, old, self.trash_page).reshape(-1), -1)
        fids = ids.reshape(-1)
        self.slot[self.masked(fids, flat)] = victim
        self.occupant[to] = torch.where(flat, fids, -1)
        return victim.view(n, -1), evicted + gone.sum()

    def _trim(self, rows: torch.Tensor, want: torch.Tensor, mask: torch.Tensor, missing: torch.Tensor, width: int,
              budgets: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """Move 1: each row's unwanted resident pages beyond its budget leave, least recently selected first."""
        n = rows.shape[0]
        cols = self._cols[:width]
        grid = self.ids(rows, cols.expand(n, width))
        slot = self.slot[grid]
        wanted = torch.zeros(n, width + 1, dtype=torch.bool, device=slot.device)
        wanted.scatter_(1, torch.where(mask, want, width), True)
        cand = (slot >= 0) & ~wanted[:, :width]
        over = (slot >= 0).sum(1) + missing.sum(1) - budgets
        key = (_recency(self.last_used[grid], step) << 31) | _score_bits(self.score[grid])
        order = torch.where(cand, key, _NEVER_KEY).argsort(dim=1, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, cols.expand(n, width))
        trim = cand & (rank < over[:, None])
        self.occupant.index_fill_(0, torch.where(trim, slot, self.trash_slot).reshape(-1), -1)
        self.slot.index_fill_(0, self.masked(grid, trim).reshape(-1), -1)
        return trim.sum()

    def free_seq(self, seq: int) -> None:
        """A removed sequence's slots are free again."""
        mine = self.slot[seq * self.max_pages : (seq + 1) * self.max_pages]
        self.occupant.index_fill_(0, torch.where(mine >= 0, mine, self.trash_slot).reshape(-1), -1)
        mine.fill_(-1)
