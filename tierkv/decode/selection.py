"""Which pages a decode step attends to: sinks, the recent window, and the top pages by a query-aware score.

The score of a page is an estimate of the attention mass it can hold: Quest's upper bound of
q . k over the page (channel-wise min/max of K, `summaries`), scaled like the real logits and
softmaxed over the sequence's pages for each query head, then the largest over the query heads
(a page that one head needs is needed; GQA heads of a group read the same KV head). Masses of
different sequences are comparable (each lies in [0, 1]), which is what demotion under pressure
ranks by.
"""

from __future__ import annotations

import numpy as np
import torch


def page_scores(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, num_pages: torch.Tensor,
                scale: float, aggregate: str = "mass") -> torch.Tensor:
    """Estimated attention mass per page `[n, pages]` of queries `q` `[n, q_heads, head_dim]`.

    kmin/kmax: `[n, pages, kv_heads, head_dim]` digests; pages at or past `num_pages[i]` score -inf.
    The bound splits q by sign: sum_d max(q_d lo_d, q_d hi_d) = q+ . hi + q- . lo, two matrix products.
    """
    n, hq, d = q.shape
    hkv = kmin.shape[2]
    if hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} KV heads")
    qg = q.float().reshape(n, hkv, hq // hkv, d)
    bound = torch.einsum("nhgd,nphd->nhgp", qg.clamp(min=0), kmax) + torch.einsum("nhgd,nphd->nhgp", qg.clamp(max=0), kmin)
    pages = kmin.shape[1]
    valid = torch.arange(pages, device=q.device)[None, :] < num_pages.to(q.device)[:, None]
    bound = (bound * scale).masked_fill(~valid[:, None, None, :], float("-inf"))
    if aggregate == "mass":
        return bound.softmax(-1).amax(dim=(1, 2)).masked_fill(~valid, float("-inf"))
    if aggregate != "rank":
        raise ValueError(f"aggregate must be 'rank' or 'mass', got {aggregate!r}")
    # Each query head ranks the pages by its own bound; a page scores by its best rank over the
    # heads (the union of every head's top pages, as Quest selects per head).
    order = bound.flatten(1, 2).argsort(dim=-1, descending=True)  # [n, heads, pages]
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(pages, device=q.device).expand_as(order))
    best = rank.amin(dim=1).float()
    return (1.0 / (1.0 + best)).masked_fill(~valid, float("-inf"))


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
