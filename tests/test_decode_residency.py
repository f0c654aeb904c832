"""The device-side pieces of the page manager against plain references, on CPU.

`Residency.place` (victims and pairing) against `reference_place` (below) on random states;
`selection.choose_pages` against the numpy `select_pages`; the rank score's per-head top-k
against full ranks; `copy_rows_where`; CapacityError paths; exact mode for a batch with pages
opening and filling, in a row order that is not a run.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tierkv import CapacityError, DecodeBudget, KVLayout, PageManager
from tierkv.decode.residency import LRU, NEVER, SCORE, Residency
from tierkv.decode.selection import choose_pages, page_scores, select_pages
from tierkv.ops.transfer import copy_rows_where

BT, H, HQ, D = 4, 2, 4, 8


@st.composite
def states(draw: st.DrawFn) -> dict:
    seqs = draw(st.integers(1, 4))
    mp = draw(st.integers(1, 6))
    slots = draw(st.integers(1, 12))
    num_pages = [draw(st.integers(0, mp)) for _ in range(seqs)]
    pages = [s * mp + p for s in range(seqs) for p in range(num_pages[s])]
    resident = draw(st.lists(st.sampled_from(pages), unique=True, max_size=slots)) if pages else []
    where = draw(st.permutations(range(slots)))[: len(resident)]
    slot, occupant = [-1] * (seqs * mp), [-1] * slots
    for page, j in zip(resident, where):
        slot[page], occupant[j] = j, page
    step = 50
    last_used = [draw(st.integers(0, step)) for _ in range(seqs * mp)]
    score = [draw(st.sampled_from([0.0, 0.25, 0.5, 1.0])) for _ in range(seqs * mp)]  # ties on purpose
    with_pages = [s for s in range(seqs) if num_pages[s] > 0]
    assume(with_pages)
    rows = draw(st.lists(st.sampled_from(with_pages), unique=True, min_size=1))
    want, budgets = [], []
    for r in rows:
        w = sorted(draw(st.lists(st.integers(0, num_pages[r] - 1), unique=True, min_size=1)))
        want.append(w)
        budgets.append(len(w) + draw(st.integers(0, 2)))
    row_class = draw(st.sampled_from([LRU, NEVER]))  # an attention step, or pages opening in append
    classes = [row_class if s in rows else SCORE for s in range(seqs)]
    return dict(seqs=seqs, mp=mp, slots=slots, num_pages=num_pages, slot=slot, occupant=occupant, last_used=last_used,
                score=score, rows=rows, want=want, budgets=budgets, classes=classes, step=step,
                sink=draw(st.integers(0, 1)), window=draw(st.integers(1, 2)))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(states())
def test_place_pairs_missing_pages_with_victims_as_the_reference_does(x: dict) -> None:
    slot, occupant = list(x["slot"]), list(x["occupant"])
    try:
        expected, evicted = reference_place(slot, occupant, x["last_used"], x["score"], x["mp"], x["rows"], x["want"],
                                            x["budgets"], x["classes"], x["num_pages"], x["sink"], x["window"])
    except IndexError:  # not enough victims: the manager refuses such a step on the host first
        assume(False)
    holders = {page // x["mp"] for page in x["occupant"] if page >= 0}
    # `roomy` is for steps whose rows hold every occupied slot within budgets that fit the pool.
    roomy_too = holders <= set(x["rows"]) and sum(x["budgets"]) <= x["slots"]
    for roomy in (False, True) if roomy_too else (False,):
        res = Residency(x["seqs"], x["mp"], x["slots"], torch.device("cpu"))
        res.slot[:-1] = torch.tensor(x["slot"])
        res.occupant[:-1] = torch.tensor(x["occupant"])
        res.last_used[:-1] = torch.tensor(x["last_used"])
        res.score[:-1] = torch.tensor(x["score"])
        k = max(len(w) for w in x["want"])
        want = torch.tensor([w + [w[-1]] * (k - len(w)) for w in x["want"]])
        mask = torch.tensor([[j < len(w) for j in range(k)] for w in x["want"]])
        width = max(x["num_pages"][r] for r in x["rows"])
        got, n_evicted = res.place(torch.tensor(x["rows"]), want, mask, width, torch.tensor(x["budgets"]),
                                   torch.tensor(x["classes"]), torch.tensor(x["num_pages"]), x["sink"], x["window"],
                                   x["step"], roomy=roomy)
        assert [row[: len(w)] for row, w in zip(got.tolist(), x["want"])] == expected, roomy
        assert res.slot[:-1].tolist() == slot and res.occupant[:-1].tolist() == occupant
        assert int(n_evicted) == evicted


def test_choose_pages_matches_the_numpy_selection() -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        n = int(torch.randint(1, 5, (1,), generator=g))
        pages = torch.randint(1, 30, (n,), generator=g)
        width = int(pages.max())
        budgets = torch.randint(1, 12, (n,), generator=g).maximum(pages.clamp(max=3))
        counts = torch.minimum(budgets, pages)
        scores = torch.rand(n, width, generator=g)  # distinct: the two may break ties differently
        want = select_pages(scores, pages.numpy(), budgets.numpy(), 1, 2)
        chosen, mask = choose_pages(scores, pages, counts, int(counts.max()), 1, 2)
        assert [row[m].tolist() for row, m in zip(chosen, mask)] == [w.tolist() for w in want]


def test_rank_with_per_head_top_k_chooses_what_full_ranks_choose() -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(30):
        n, width = 3, 40
        pages = torch.randint(5, width + 1, (n,), generator=g)
        counts = torch.randint(3, 12, (n,), generator=g).minimum(pages)
        k = int(counts.max())
        q = torch.randn(n, HQ, D, generator=g)
        lo = torch.randn(n, H, width, D, generator=g)
        hi = lo + torch.rand(n, H, width, D, generator=g)
        full = page_scores(q, lo, hi, pages, 0.3, "rank")
        fast = page_scores(q, lo, hi, pages, 0.3, "rank", top=k)
        a = choose_pages(full, pages, counts, k, 1, 2)
        b = choose_pages(fast, pages, counts, k, 1, 2)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_copy_rows_where_skips_negative_sources() -> None:
    src = torch.arange(24, dtype=torch.float32).view(6, 4)
    dst = torch.full((5, 4), -1.0)
    copy_rows_where(src, torch.tensor([2, -1, 5, -1]), dst, torch.tensor([0, 0, 3, 4]))
    assert dst[0].tolist() == src[2].tolist() and dst[3].tolist() == src[5].tolist()
    assert (dst[[1, 2, 4]] == -1).all()
    copy_rows_where(src, torch.tensor([-1, -1]), dst, torch.tensor([9, 9]))  # skipped entries' dst is not read
    with pytest.raises(ValueError, match="pools must match"):
        copy_rows_where(src, torch.tensor([0]), torch.zeros(2, 3), torch.tensor([0]))


def layout(layers: int = 2) -> KVLayout:
    return KVLayout(num_layers=layers, kv_factor=2, num_kv_heads=H, head_dim=D, dtype=torch.float32, block_tokens=BT)


def dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    kk, vv = k.repeat_interleave(HQ // H, dim=1), v.repeat_interleave(HQ // H, dim=1)
    w = (torch.einsum("hd,thd->ht", q, kk) / math.sqrt(D)).softmax(-1)
    return torch.einsum("ht,thd->hd", w, vv)


def test_exact_mode_equals_dense_for_a_batch_whose_pages_open_and_fill_at_different_steps() -> None:
    m = PageManager(layout(), DecodeBudget(), device_pages=64, host_pages=64, max_seqs=4, max_pages=16)
    g = torch.Generator().manual_seed(3)
    kv = {}
    for tokens in (5, 12, 9):
        keys = [torch.randn(tokens, H, D, generator=g) for _ in range(2)]
        values = [torch.randn(tokens, H, D, generator=g) for _ in range(2)]
        kv[m.add(keys, values)] = (keys, values)
    seqs = [2, 0, 1]  # not a run of slots: the digests are gathered, not viewed
    for _ in range(11):
        for layer in range(2):
            k, v = torch.randn(3, H, D, generator=g), torch.randn(3, H, D, generator=g)
            for i, s in enumerate(seqs):
                kv[s][0][layer] = torch.cat([kv[s][0][layer], k[i : i + 1]])
                kv[s][1][layer] = torch.cat([kv[s][1][layer], v[i : i + 1]])
            m.append(layer, seqs, k, v)
            q = torch.randn(3, HQ, D, generator=g)
            out = m.attend(layer, seqs, q, 1 / math.sqrt(D))
            for i, s in enumerate(seqs):
                torch.testing.assert_close(out[i], dense(q[i], kv[s][0][layer], kv[s][1][layer]), rtol=1e-5, atol=1e-5)
    for s, (keys, values) in kv.items():  # every full page's host copy is exact
        layer = m.layers[1]
        for p in range(keys[1].shape[0] // BT):
            row = layer.host[int(layer.host_slot[s, p])][0]
            assert torch.equal(row[0], keys[1][p * BT : (p + 1) * BT]) and torch.equal(row[1], values[1][p * BT : (p + 1) * BT])


def test_a_steady_budgeted_batch_keeps_its_tables_consistent_and_within_budget() -> None:
    budget = DecodeBudget(fraction=0.25, sink_pages=1, window_pages=1)
    m = PageManager(layout(1), budget, device_pages=9, host_pages=64, max_seqs=3, max_pages=16)
    g = torch.Generator().manual_seed(4)
    for tokens in (30, 23, 41):
        m.add([torch.randn(tokens, H, D, generator=g)], [torch.randn(tokens, H, D, generator=g)])
    for _ in range(12):
        k = torch.randn(3, H, D, generator=g)
        m.append(0, [0, 1, 2], k, k)
        m.attend(0, [0, 1, 2], torch.randn(3, HQ, D, generator=g), 1.0)
        res = m.layers[0].res
        budgets = m._budgets(m.layers[0])
        for s in range(3):
            assert m.resident_pages(0, s) <= budgets[s]
        slot, occ = res.slot[:-1], res.occupant[:-1]
        held = occ[occ >= 0]
        assert torch.equal(slot[held], torch.nonzero(occ >= 0)[:, 0])  # occupant and slot agree both ways
        assert int((slot >= 0).sum()) == len(held)
    assert m.fetched_pages > 0 and m.last_step is not None and m.last_step.selected <= 9


def test_capacity_errors_come_before_anything_changes() -> None:
    m = PageManager(layout(1), DecodeBudget(pages=2, sink_pages=1, window_pages=1), device_pages=4, host_pages=11,
                    max_seqs=3, max_pages=8)
    a = m.add([torch.randn(20, H, D)], [torch.randn(20, H, D)])  # 5 pages
    b = m.add([torch.randn(20, H, D)], [torch.randn(20, H, D)])
    before = m.layers[0].res.occupant[:-1].tolist()
    with pytest.raises(CapacityError, match="host pool"):  # 1 host row left, the two new pages need 2
        m.append(0, [a, b], torch.randn(2, H, D), torch.randn(2, H, D))
    assert m.num_tokens(a) == 20 and len(m.layers[0].free_host) == 1
    with pytest.raises(CapacityError, match="can be demoted"):  # a and b hold sinks + windows: 4 of 4 slots
        m.add([torch.randn(3, H, D)], [torch.randn(3, H, D)])
    assert m.layers[0].res.occupant[:-1].tolist() == before
    with pytest.raises(KeyError, match="sequence 2"):
        m.attend(0, [a, 2], torch.randn(2, HQ, D), 1.0)
    with pytest.raises(ValueError, match="twice"):
        m.attend(0, [a, a], torch.randn(2, HQ, D), 1.0)


def reference_place(slot: list[int], occupant: list[int], last_used: list[int], score: list[float], max_pages: int,
                    rows: list[int], want: list[list[int]], budgets: list[int], seq_class: list[int],
                    num_pages: list[int], sink_pages: int, window_pages: int) -> tuple[list[list[int]], int]:
    """`Residency.place` as a Python loop over lists (changed in place): the rule the device code must follow.

    want[i]: the pages row i wants, ascending. Returns each wanted page's new slot (-1 if it was
    resident) and the pages evicted.
    """
    evicted = 0
    missing = [[p for p in w if slot[r * max_pages + p] < 0] for r, w in zip(rows, want)]
    for r, w, miss, b in zip(rows, want, missing, budgets):
        own = [p for p in range(num_pages[r]) if slot[r * max_pages + p] >= 0 and p not in w]
        resident = sum(slot[r * max_pages + p] >= 0 for p in range(num_pages[r]))
        own.sort(key=lambda p: (last_used[r * max_pages + p], score[r * max_pages + p], p))
        for p in own[: max(0, resident + len(miss) - b)]:
            occupant[slot[r * max_pages + p]] = -1
            slot[r * max_pages + p] = -1
            evicted += 1
    keep = {slot[r * max_pages + p] for r, w in zip(rows, want) for p in w if slot[r * max_pages + p] >= 0}
    order: list[tuple[tuple[int | float, ...], int]] = []
    for j, o in enumerate(occupant):
        if o < 0:
            order.append(((0, j), j))
            continue
        s, p = divmod(o, max_pages)
        if j in keep or p < sink_pages or p >= num_pages[s] - window_pages:
            continue
        if seq_class[s] == LRU:
            order.append(((1, last_used[o], score[o], j), j))
        elif seq_class[s] == SCORE:
            order.append(((2, score[o], last_used[o], j), j))
    victims = [j for _, j in sorted(order)]
    out, k = [], 0
    for r, w, miss in zip(rows, want, missing):
        got = []
        for p in w:
            if p not in miss:
                got.append(-1)
                continue
            j = victims[k]
            k += 1
            if occupant[j] >= 0:
                slot[occupant[j]] = -1
                evicted += 1
            slot[r * max_pages + p] = j
            occupant[j] = r * max_pages + p
            got.append(j)
        out.append(got)
    return out, evicted
