"""Which pages a decode step attends to: sinks, the recent window, and the top pages by a query-aware score.

The score of a page bounds the attention it can get: Quest's upper bound of q . k over the page
(channel-wise min/max of K, `summaries`), one per query head, made one number per page by
`aggregate` ("rank": the best rank over the heads; "mass": the largest softmaxed bound).

`choose_pages` runs on the device with fixed shapes (one `topk` over `[n, pages]`), so a
decode step never copies scores to the host; `select_pages` is the same selection in numpy,
kept as the reference the tests compare against.
"""

from __future__ import annotations

import numpy as np
import torch


def page_scores(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, num_pages: torch.Tensor,
                scale: float, aggregate: str = "mass", top: int | None = None, box_scale: float = 1.0) -> torch.Tensor:
    """Score per page `[n, pages]` of queries `q` `[n, q_heads, head_dim]`; higher is more needed.

    kmin/kmax: `[n, kv_heads, pages, head_dim]` digests (`KeySummaries.pages`); pages at or past
    `num_pages[i]` score -inf. The bound splits q by sign: sum_d max(q_d lo_d, q_d hi_d) =
    q+ . hi + q- . lo, two batched matrix products that read the digests in place.
    `box_scale` a < 1 scores the box `mid -+ a half` of each page's min/max box (centre `mid`,
    half-width `half`) instead: `q . mid + a |q| . half`, an estimate of the page's largest logit
    rather than a bound of it (Quest's bound, a = 1, is reached only by a token at every channel's
    extreme at once). The same two products: u . max + v . min with u, v = (q +- a |q|) / 2.
    `top` (rank only): rank just each head's `top` best pages (a `topk`, not a sort of every
    page); a page in no head's top scores 0. With `top` >= the pages a row takes (protected ones
    included) the pages chosen are the same as with full ranks (see below).
    """
    n, hq, d = q.shape
    hkv = kmin.shape[1]
    if hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} KV heads")
    qg = q.float().reshape(n, hkv, hq // hkv, d)
    wide = qg.abs() * box_scale
    hi, lo = (qg + wide) * 0.5, (qg - wide) * 0.5  # a = 1: exactly q+ and q- (doubling and halving are exact)
    bound = torch.matmul(hi, kmax.transpose(-1, -2))  # [n, kv_heads, group, pages]
    bound.add_(torch.matmul(lo, kmin.transpose(-1, -2)))
    pages = kmin.shape[2]
    valid = torch.arange(pages, device=q.device)[None, :] < num_pages.to(q.device)[:, None]
    bound = (bound * scale).masked_fill(~valid[:, None, None, :], float("-inf"))
    if aggregate == "mass":
        return bound.softmax(-1).amax(dim=(1, 2)).masked_fill(~valid, float("-inf"))
    if aggregate != "rank":
        raise ValueError(f"aggregate must be 'rank' or 'mass', got {aggregate!r}")
    # Each query head ranks the pages by its own bound; a page scores by its best rank over the
    # heads (the union of every head's top pages, as Quest selects per head).
    flat = bound.flatten(1, 2)  # [n, heads, pages]
    if top is None or top >= pages:
        order = flat.argsort(dim=-1, descending=True)
        rank = torch.empty_like(order)
        rank.scatter_(-1, order, torch.arange(pages, device=q.device).expand_as(order))
        best = rank.amin(dim=1).float()
    else:
        # Why the top `top` of each head is enough: let a row take at most `top` pages, `prot`
        # protected ones and `rest` chosen by score. Any page x whose best rank is >= top is
        # beaten, in its best head h, by `top` pages, at least `rest` of them unprotected (at most
        # `prot` are protected; pages past the row's end rank last); each of those has a
        # best rank below x's, so x is never among the `rest` chosen. Every choosable page is
        # thus in some head's top, and its best rank (the min over the heads that have it in their
        # top) is exact. Pages in no head's top keep +inf, score 0, and are never chosen over one that is.
        idx = flat.topk(top, dim=-1).indices  # [n, heads, top], best first
        ranks = torch.arange(top, device=q.device, dtype=torch.float32).expand(idx.shape)
        best = torch.full((n, pages), float("inf"), device=q.device)
        best.scatter_reduce_(1, idx.flatten(1), ranks.flatten(1), "amin")
    return (1.0 / (1.0 + best)).masked_fill(~valid, float("-inf"))


def _order_key(priority: torch.Tensor) -> torch.Tensor:
    """Distinct int64 keys that order like `priority` `[n, pages]` (float32), ties to the lower page.

    float32 bits as int32 order like the floats once the negative ones have their low 31 bits
    flipped; times 2^32 plus (2^31 - 1 - page) makes every key of a row distinct, so `topk`'s
    choice among equal scores is fixed (it is not, for equal floats). (2^31 - 1, not 2^32 - 1:
    the constant then fits the 32-bit index arithmetic a compiler may generate for `page`.)
    """
    bits = priority.contiguous().view(torch.int32)
    mono = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)
    cols = torch.arange(priority.shape[1], device=priority.device)
    return mono * (1 << 32) + ((1 << 31) - 1 - cols)


def choose_pages(priority: torch.Tensor | None, num_pages: torch.Tensor, counts: torch.Tensor, k: int, sink_pages: int,
                 window_pages: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pages each row attends to, on the device: `[n, k]` ascending page indices and a `[n, k]` mask.

    priority: `[n, width]` float32 scores (None: every row takes all its pages, exact mode).
    num_pages, counts: `[n]` device tensors, each row's pages and how many it takes
    (`min(budget, pages)`, at most k, at least its sinks + window). Sinks and the last
    `window_pages` pages are forced in (+inf), pages past a row's end out (-inf), then one `topk`
    of k; row i keeps its first `counts[i]`. Masked entries hold the row's last page (the tail,
    always resident), so they are valid indices everywhere the caller looks them up.
    """
    n = num_pages.shape[0]
    tail = (num_pages - 1)[:, None]
    cols = torch.arange(k, device=num_pages.device)[None, :]
    mask = cols < counts[:, None]
    if priority is None:
        return torch.where(mask, cols.expand(n, k), tail), mask
    width = priority.shape[1]
    pages = torch.arange(width, device=priority.device)[None, :]
    protected = (pages < sink_pages) | (pages >= num_pages[:, None] - window_pages)
    prio = priority.float().masked_fill(protected, float("inf")).masked_fill(pages >= num_pages[:, None], float("-inf"))
    top = _order_key(prio).topk(k, dim=1).indices
    chosen = torch.where(mask, top, width).sort(dim=1).values
    return torch.where(mask, chosen, tail), mask


def select_pages(scores: torch.Tensor | None, num_pages: np.ndarray, budgets: np.ndarray, sink_pages: int,
                 window_pages: int, policy: str = "quest") -> list[np.ndarray]:
    """Ascending page indices each sequence attends to: at most `budgets[i]` of its `num_pages[i]`.

    Always the first `sink_pages` and the last `window_pages` pages (the last page, being
    written, among them); the rest of the budget goes to the highest `scores` ("quest") or to
    the most recent pages ("recent", the dropping baseline). `scores` may be None when every
    budget covers its sequence (exact mode) or the policy is "recent".
    """
    out: list[np.ndarray] = []
    need_scores = policy == "quest" and bool((budgets < num_pages).any())
    if need_scores and scores is None:
        raise ValueError("select_pages needs scores for a budget below the sequence under the 'quest' policy")
    host_scores = scores.detach().float().cpu().numpy() if need_scores and scores is not None else None
    for i, (n, b) in enumerate(zip(num_pages.tolist(), budgets.tolist())):
        if b >= n:
            out.append(np.arange(n, dtype=np.int64))
            continue
        sinks = np.arange(min(sink_pages, n), dtype=np.int64)
        window = np.arange(max(len(sinks), n - window_pages), n, dtype=np.int64)
        rest = b - len(sinks) - len(window)
        middle = np.arange(len(sinks), window[0] if len(window) else n, dtype=np.int64)
        if rest <= 0 or len(middle) == 0:
            chosen = middle[:0]
        elif policy == "recent":
            chosen = middle[-rest:]
        else:
            assert host_scores is not None
            s = host_scores[i, middle]
            chosen = middle[np.argpartition(-s, rest - 1)[:rest]] if rest < len(middle) else middle
        out.append(np.sort(np.concatenate([sinks, chosen, window])))
    return out
