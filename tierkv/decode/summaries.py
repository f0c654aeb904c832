"""Per-page, per-KV-head channel-wise min and max of K: the digest a query is scored against.

Quest's bound: for a query q and any key k of a page, q . k <= sum_d max(q_d * min_d, q_d * max_d).
The digest is 2 * head_dim numbers per page and head, 1/block_tokens of the page's K, so it stays
on the device for every page, resident or not. A decoded page's digest is computed once, when
the page fills (`write_pages`): until then the page is in the recent window, which is always
attended, so its digest is never read.
"""

from __future__ import annotations

import torch


def page_minmax(keys: torch.Tensor, block_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel-wise (min, max) of `keys` `[tokens, heads, head_dim]` per page: two `[pages, heads, head_dim]`.

    The last page may be partial; its missing tokens do not count.
    """
    if keys.dim() != 3:
        raise ValueError(f"keys must be [tokens, heads, head_dim], got shape {tuple(keys.shape)}")
    n, h, d = keys.shape
    pages = -(-n // block_tokens)
    pad = pages * block_tokens - n
    k = keys.float()
    lo = torch.cat([k, k.new_full((pad, h, d), float("inf"))]) if pad else k
    hi = torch.cat([k, k.new_full((pad, h, d), float("-inf"))]) if pad else k
    return lo.view(pages, block_tokens, h, d).amin(1), hi.view(pages, block_tokens, h, d).amax(1)


class KeySummaries:
    """min/max of K for up to `max_pages` pages of each of `max_seqs` sequences of one layer (float32).

    Stored `[max_seqs, kv_heads, max_pages, head_dim]`: a batch's digests for its first `width`
    pages are then a view that a batched matrix product reads as it is (head by head, pages as
    rows), with no copy into another order first (`pages`).
    """

    def __init__(self, max_seqs: int, max_pages: int, num_kv_heads: int, head_dim: int, device: torch.device) -> None:
        shape = (max_seqs, num_kv_heads, max_pages, head_dim)
        # Zeros, not infinities, past a sequence's pages: the score's matrix products multiply them
        # (0 * inf is NaN) and then mask them out.
        self.kmin = torch.zeros(shape, dtype=torch.float32, device=device)
        self.kmax = torch.zeros(shape, dtype=torch.float32, device=device)

    def reset(self, seq: int) -> None:
        self.kmin[seq].zero_()
        self.kmax[seq].zero_()

    def write(self, seq: int, keys: torch.Tensor, block_tokens: int) -> None:
        """The digests of a sequence's first pages from its keys `[tokens, heads, head_dim]` (prefill)."""
        lo, hi = page_minmax(keys, block_tokens)
        self.kmin[seq, :, : lo.shape[0]] = lo.transpose(0, 1)
        self.kmax[seq, :, : hi.shape[0]] = hi.transpose(0, 1)

    def pages(self, rows: torch.Tensor, run: int | None, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(kmin, kmax) `[n, kv_heads, width, head_dim]` of sequences `rows`; views when they are the run `run, run+1, ...`."""
        if run is not None:
            n = rows.shape[0]
            return self.kmin[run : run + n, :, :width], self.kmax[run : run + n, :, :width]
        return self.kmin[rows, :, :width], self.kmax[rows, :, :width]

    def write_pages(self, seqs: torch.Tensor, pages: torch.Tensor, keys: torch.Tensor, where: torch.Tensor) -> None:
        """The digest of page `pages[i]` of sequence `seqs[i]` from its keys `keys[i]` `[tokens, heads, head_dim]`,
        for the rows where `where[i]` (the others keep theirs: fixed shapes, no host decision)."""
        k = keys.float()
        heads = torch.arange(k.shape[2], device=k.device)[None, :]
        at = (seqs[:, None], heads, pages[:, None])  # [n, heads] entries of [n, heads, head_dim]
        w = where[:, None, None]
        self.kmin[at] = torch.where(w, k.amin(1), self.kmin[at])
        self.kmax[at] = torch.where(w, k.amax(1), self.kmax[at])
