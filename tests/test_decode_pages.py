"""Decode-time page manager: exact mode equals dense attention, budgets hold, fetched pages are exact, pressure demotes by score.

Everything runs on CPU with the torch reference of paged attention; the dense reference here is
plain softmax attention over every token of the sequence.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tierkv import CapacityError, DecodeBudget, KVLayout, PageManager
from tierkv.decode.selection import page_scores, select_pages
from tierkv.decode.summaries import KeySummaries, page_minmax

BT = 4
H, HQ, D = 2, 4, 8


def layout(layers: int = 2, dtype: torch.dtype = torch.float32) -> KVLayout:
    return KVLayout(num_layers=layers, kv_factor=2, num_kv_heads=H, head_dim=D, dtype=dtype, block_tokens=BT)


def kv(tokens: int, seed: int, layers: int = 2) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return ([torch.randn(tokens, H, D, generator=g) for _ in range(layers)],
            [torch.randn(tokens, H, D, generator=g) for _ in range(layers)])


def dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[HQ, D] attention of one query over all of k/v [T, H, D]."""
    kk = k.repeat_interleave(HQ // H, dim=1)
    vv = v.repeat_interleave(HQ // H, dim=1)
    w = (torch.einsum("hd,thd->ht", q, kk) / math.sqrt(D)).softmax(-1)
    return torch.einsum("ht,thd->hd", w, vv)


def selected(table: torch.Tensor) -> list[list[int]]:
    """`PageManager.select`'s `[n, k]` tensor (-1 padded) as each row's page list."""
    return [[p for p in row if p >= 0] for row in table.tolist()]


def manager(budget: DecodeBudget, device_pages: int = 64, host_pages: int = 256, max_seqs: int = 4) -> PageManager:
    return PageManager(layout(), budget, device_pages=device_pages, host_pages=host_pages, max_seqs=max_seqs, max_pages=64)


def test_exact_mode_equals_dense_attention_while_decoding() -> None:
    m = manager(DecodeBudget())
    keys, values = kv(13, 1)
    seq = m.add(keys, values)
    g = torch.Generator().manual_seed(2)
    for _ in range(9):  # crosses two page boundaries
        for layer in range(2):
            k, v = torch.randn(1, H, D, generator=g), torch.randn(1, H, D, generator=g)
            keys[layer] = torch.cat([keys[layer], k])
            values[layer] = torch.cat([values[layer], v])
            m.append(layer, [seq], k, v)
            q = torch.randn(1, HQ, D, generator=g)
            out = m.attend(layer, [seq], q, 1 / math.sqrt(D))
            torch.testing.assert_close(out[0], dense(q[0], keys[layer], values[layer]), rtol=1e-5, atol=1e-5)
    assert m.num_tokens(seq) == 22 and m.resident_pages(0, seq) == 6


def test_a_budget_holds_and_attention_is_over_the_selected_pages() -> None:
    m = manager(DecodeBudget(pages=4, sink_pages=1, window_pages=2))
    keys, values = kv(40, 3)  # 10 pages
    seq = m.add(keys, values)
    g = torch.Generator().manual_seed(4)
    for _ in range(6):
        q = torch.randn(1, HQ, D, generator=g)
        chosen = selected(m.select(0, [seq], q, 1 / math.sqrt(D)))[0]
        out = m.attend(0, [seq], q, 1 / math.sqrt(D))
        assert len(chosen) == 4 and chosen[0] == 0 and chosen[-2:] == [8, 9]
        assert m.resident_pages(0, seq) <= 4
        tok = torch.from_numpy(np.concatenate([np.arange(p * BT, (p + 1) * BT) for p in chosen]))
        torch.testing.assert_close(out[0], dense(q[0], keys[0][tok], values[0][tok]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("aggregate", ["mass", "rank"])
def test_the_query_aware_score_finds_the_page_holding_a_matching_key(aggregate: str) -> None:
    m = manager(DecodeBudget(pages=3, sink_pages=1, window_pages=1, aggregate=aggregate))
    keys, values = kv(64, 5)  # 16 pages
    q = torch.randn(1, HQ, D, generator=torch.Generator().manual_seed(6))
    for layer in range(2):
        keys[layer][29] = 4 * q[0, :: HQ // H]  # a key of page 7 aligned with the query's heads
    seq = m.add(keys, values)
    assert selected(m.select(0, [seq], q, 1 / math.sqrt(D))) == [[0, 7, 15]]
    recent = manager(DecodeBudget(pages=3, sink_pages=1, window_pages=1, policy="recent"))
    seq = recent.add(keys, values)
    assert selected(recent.select(0, [seq], q, 1 / math.sqrt(D))) == [[0, 14, 15]]


def test_evicted_pages_come_back_exact() -> None:
    m = manager(DecodeBudget(pages=3, sink_pages=1, window_pages=1))
    keys, values = kv(48, 7)
    seq = m.add(keys, values)
    g = torch.Generator().manual_seed(8)
    fetched = 0
    for step in range(12):
        q = torch.zeros(1, HQ, D)
        target = 1 + step % 10  # each step wants another middle page
        for layer in range(2):
            keys_l = keys[layer][target * BT : (target + 1) * BT]
            q = keys_l.mean(0).repeat_interleave(HQ // H, dim=0)[None] * 8 + 0.01 * torch.randn(1, HQ, D, generator=g)
            chosen = selected(m.select(layer, [seq], q, 1 / math.sqrt(D)))[0]
            out = m.attend(layer, [seq], q, 1 / math.sqrt(D))
            fetched += m.last_step.fetched
            tok = torch.from_numpy(np.concatenate([np.arange(p * BT, (p + 1) * BT) for p in chosen]))
            torch.testing.assert_close(out[0], dense(q[0], keys[layer][tok], values[layer][tok]), rtol=1e-5, atol=1e-5)
            assert m.resident_pages(layer, seq) <= 3
    assert fetched >= 12 and m.evicted_pages >= 12


def test_pressure_demotes_running_sequences_by_score_never_below_sinks_and_window() -> None:
    budget = DecodeBudget(fraction=0.5, sink_pages=1, window_pages=1)
    m = manager(budget, device_pages=12)
    a = m.add(*kv(40, 9))  # 10 pages each: each wants 5
    b = m.add(*kv(40, 10))
    q = torch.randn(2, HQ, D, generator=torch.Generator().manual_seed(11))
    m.attend(0, [a, b], q, 1.0)
    assert m.resident_pages(0, a) == 5 and m.resident_pages(0, b) == 5
    c = m.add(*kv(40, 12))  # 2 free slots: c's sinks + window fit, nothing demoted yet
    m.attend(0, [a, b, c], torch.randn(3, HQ, D), 1.0)
    counts = [m.resident_pages(0, s) for s in (a, b, c)]
    assert sum(counts) <= 12 and min(counts) >= 2, counts
    d = m.add(*kv(40, 13))  # the minimums of four (8) still fit in 12: the others are demoted for it
    counts = [m.resident_pages(0, s) for s in (a, b, c, d)]
    assert sum(counts) <= 12 and min(counts) >= 2, counts
    for s in (a, b, c, d):
        assert m.layers[0].dev_slot[s, 0] >= 0 and m.layers[0].dev_slot[s, 9] >= 0  # sink and window stay


def test_a_sequence_that_cannot_get_its_sinks_and_window_is_refused_and_nothing_changes() -> None:
    m = manager(DecodeBudget(pages=2, sink_pages=1, window_pages=1), device_pages=4, max_seqs=3)
    m.add(*kv(40, 14))
    m.add(*kv(40, 15))
    before = [layer.dev_slot.clone() for layer in m.layers], [list(layer.free_host) for layer in m.layers]
    with pytest.raises(CapacityError, match="can be demoted"):
        m.add(*kv(40, 16))
    assert all(torch.equal(x, layer.dev_slot) for x, layer in zip(before[0], m.layers))
    assert before[1] == [list(layer.free_host) for layer in m.layers]


def test_remove_frees_every_page() -> None:
    m = manager(DecodeBudget(pages=3), device_pages=3, host_pages=10)
    s = m.add(*kv(40, 17))
    with pytest.raises(CapacityError, match="host pool"):
        m.add(*kv(40, 18))
    m.remove(s)
    assert m.add(*kv(40, 18)) == s  # the freed id and pages serve the next sequence
    with pytest.raises(KeyError, match="sequence 2 is not held"):
        m.remove(2)


def test_digests_of_decoded_pages_equal_summaries_of_all_their_keys() -> None:
    m = manager(DecodeBudget(pages=4, sink_pages=1, window_pages=1))
    keys, values = kv(10, 19)  # the prompt ends inside page 2: its digest is redone when the page fills
    seq = m.add(keys, values)
    g = torch.Generator().manual_seed(20)
    for _ in range(13):
        for layer in range(2):
            k = torch.randn(1, H, D, generator=g)
            keys[layer] = torch.cat([keys[layer], k])
            m.append(layer, [seq], k, k)
    for layer in range(2):  # 23 tokens: pages 0-4 full
        lo, hi = page_minmax(keys[layer][:20], BT)
        digest = m.layers[layer].digest
        assert torch.equal(digest.kmin[seq, :, :5], lo.transpose(0, 1))
        assert torch.equal(digest.kmax[seq, :, :5], hi.transpose(0, 1))
    other = KeySummaries(2, 4, H, D, torch.device("cpu"))  # rows not marked keep their digest
    page = torch.randn(2, BT, H, D, generator=g)
    other.write_pages(torch.tensor([0, 1]), torch.tensor([3, 3]), page, torch.tensor([True, False]))
    assert torch.equal(other.kmin[0, :, 3], page[0].amin(0)) and not other.kmin[1].any()


def test_the_score_bounds_every_key_of_its_page() -> None:
    keys = torch.randn(32, H, D, generator=torch.Generator().manual_seed(20))
    q = torch.randn(1, HQ, D, generator=torch.Generator().manual_seed(21))
    lo, hi = page_minmax(keys, BT)
    qg = q[0].view(H, HQ // H, D)
    pos, neg = qg.clamp(min=0)[:, :, None], qg.clamp(max=0)[:, :, None]
    bound = (pos * hi.permute(1, 0, 2)[:, None] + neg * lo.permute(1, 0, 2)[:, None]).sum(-1)
    real = torch.einsum("hgd,thd->hgt", qg, keys).view(H, HQ // H, 8, BT).amax(-1)
    assert (bound >= real - 1e-5).all()
    for aggregate in ("mass", "rank"):
        scores = page_scores(q, lo.transpose(0, 1)[None], hi.transpose(0, 1)[None], torch.tensor([6]), 1.0, aggregate)
        assert scores.shape == (1, 8) and torch.isinf(scores[0, 6:]).all() and (scores[0, :6] > 0).all()
    ranked = page_scores(q, lo.transpose(0, 1)[None], hi.transpose(0, 1)[None], torch.tensor([6]), 1.0, "rank")[0, :6]
    assert sorted(ranked.tolist(), reverse=True)[0] == 1.0  # some head's first page


def test_box_scale_moves_the_score_from_the_bound_to_the_box_centre() -> None:
    keys = torch.randn(32, H, D, generator=torch.Generator().manual_seed(22))
    q = torch.randn(1, HQ, D, generator=torch.Generator().manual_seed(23))
    lo, hi = (t.transpose(0, 1)[None] for t in page_minmax(keys, BT))  # [1, H, pages, D]
    qg = q.view(1, H, HQ // H, D)
    mid, half = (hi + lo) / 2, (hi - lo) / 2
    for a in (1.0, 0.25, 0.0):
        want = torch.einsum("nhgd,nhpd->nhgp", qg, mid) + a * torch.einsum("nhgd,nhpd->nhgp", qg.abs(), half)
        # "mass" softmaxes the scaled estimate: compare through the same softmax
        got = page_scores(q, lo, hi, torch.tensor([8]), 1.0, "mass", box_scale=a)
        assert torch.allclose(got[0], want.softmax(-1).amax(dim=(1, 2))[0], atol=1e-5), a
    with pytest.raises(ValueError, match="box_scale"):
        DecodeBudget(box_scale=1.5)
    with pytest.raises(ValueError, match="box_scale"):
        DecodeBudget(box_scale=float("nan"))


def test_bad_arguments_are_refused_with_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="cuda_graphs=True needs a CUDA device"):
        PageManager(layout(), DecodeBudget(), device_pages=4, host_pages=4, max_seqs=1, max_pages=4, cuda_graphs=True)
    with pytest.raises(ValueError, match="pages or fraction"):
        DecodeBudget(pages=4, fraction=0.5)
    with pytest.raises(ValueError, match="fraction must lie"):
        DecodeBudget(fraction=1.5)
    with pytest.raises(ValueError, match="below sink_pages"):
        DecodeBudget(pages=2, sink_pages=1, window_pages=2)
    with pytest.raises(ValueError, match="policy"):
        DecodeBudget(policy="h2o")
    with pytest.raises(ValueError, match="aggregate"):
        DecodeBudget(aggregate="sum")
    with pytest.raises(ValueError, match="cannot hold one sequence"):
        PageManager(layout(), DecodeBudget(pages=4), device_pages=2, host_pages=8, max_seqs=1, max_pages=8)
    m = manager(DecodeBudget())
    with pytest.raises(ValueError, match="layer 1"):
        m.add([torch.zeros(8, H, D), torch.zeros(8, H + 1, D)], [torch.zeros(8, H, D)] * 2)
    s = m.add(*kv(8, 22))
    with pytest.raises(ValueError, match="q must be"):
        m.attend(0, [s], torch.zeros(2, HQ, D), 1.0)
    with pytest.raises(KeyError, match="sequence 3"):
        m.attend(0, [3], torch.zeros(1, HQ, D), 1.0)
    with pytest.raises(ValueError, match="needs scores"):
        select_pages(None, np.array([10]), np.array([3]), 1, 1)


def test_dense_layers_keep_every_page_and_attend_to_all() -> None:
    m = manager(DecodeBudget(pages=3, sink_pages=1, window_pages=1, dense_layers=1))
    keys, values = kv(40, 23)  # 10 pages
    seq = m.add(keys, values)
    q = torch.randn(1, HQ, D, generator=torch.Generator().manual_seed(24))
    out = m.attend(0, [seq], q, 1 / math.sqrt(D))
    torch.testing.assert_close(out[0], dense(q[0], keys[0], values[0]), rtol=1e-5, atol=1e-5)
    m.attend(1, [seq], q, 1 / math.sqrt(D))
    assert m.resident_pages(0, seq) == 10 and m.resident_pages(1, seq) <= 3
    assert m.device_bytes() == (256 + 64) * m.page_bytes  # layer 0's pool is the host pool's size
    with pytest.raises(ValueError, match="dense_layers"):
        DecodeBudget(dense_layers=-1)
