"""`DecodeBudget.select_every`: steps between selections attend to the kept selection plus sinks and window.

CPU, torch reference attention; the expected output of every step is plain softmax attention
over exactly the pages the rule names, computed from the test's own copy of K and V.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tierkv import DecodeBudget, KVLayout, PageManager

BT = 4
H, HQ, D = 2, 4, 8
SCALE = 1 / math.sqrt(D)


def manager(budget: DecodeBudget, device_pages: int = 64, max_seqs: int = 4) -> PageManager:
    layout = KVLayout(num_layers=1, kv_factor=2, num_kv_heads=H, head_dim=D, dtype=torch.float32, block_tokens=BT)
    return PageManager(layout, budget, device_pages=device_pages, host_pages=256, max_seqs=max_seqs, max_pages=64)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[HQ, D] attention of one query over k/v [T, H, D]."""
    kk, vv = k.repeat_interleave(HQ // H, dim=1), v.repeat_interleave(HQ // H, dim=1)
    w = (torch.einsum("hd,thd->ht", q, kk) * SCALE).softmax(-1)
    return torch.einsum("ht,thd->hd", w, vv)


def tokens_of(pages: list[int], total: int) -> torch.Tensor:
    return torch.from_numpy(np.concatenate([np.arange(p * BT, min((p + 1) * BT, total)) for p in pages]))


class Decoder:
    """One sequence decoding through a page manager, with the test's own copy of its K/V."""

    def __init__(self, m: PageManager, tokens: int, seed: int) -> None:
        self.m, self.g = m, torch.Generator().manual_seed(seed)
        self.k, self.v = torch.randn(tokens, H, D, generator=self.g), torch.randn(tokens, H, D, generator=self.g)
        self.seq = m.add([self.k], [self.v])

    def token(self) -> torch.Tensor:
        k, v = torch.randn(1, H, D, generator=self.g), torch.randn(1, H, D, generator=self.g)
        self.k, self.v = torch.cat([self.k, k]), torch.cat([self.v, v])
        self.m.append(0, [self.seq], k, v)
        return torch.randn(1, HQ, D, generator=self.g)

    def expect(self, q: torch.Tensor, pages: list[int]) -> torch.Tensor:
        tok = tokens_of(pages, len(self.k))
        return attention(q[0], self.k[tok], self.v[tok])


def test_exact_mode_with_select_every_equals_dense_attention() -> None:
    d = Decoder(manager(DecodeBudget(select_every=5)), 13, 1)
    for _ in range(14):  # crosses three page boundaries between selections
        q = d.token()
        out = d.m.attend(0, [d.seq], q, SCALE)
        torch.testing.assert_close(out[0], attention(q[0], d.k, d.v), rtol=1e-5, atol=1e-5)


def test_between_selections_a_step_attends_to_the_kept_pages_still_resident_plus_sinks_and_window() -> None:
    budget = DecodeBudget(pages=4, sink_pages=1, window_pages=2, select_every=3)
    d = Decoder(manager(budget), 40, 2)  # 10 pages
    kept: list[int] = []
    cached_steps = 0
    for step in range(10):
        q = d.token()
        if step % 3 == 0:  # a selection step: the pages `select` names for this query
            kept = [p for p in d.m.select(0, [d.seq], q, SCALE)[0].tolist() if p >= 0]
            want = kept
        else:
            cached_steps += 1
            pages = -(-len(d.k) // BT)
            window = range(max(0, pages - budget.window_pages), pages)
            resident = d.m.layers[0].dev_slot[d.seq]
            want = sorted(p for p in set(kept) | set(window) if resident[p] >= 0)
        out = d.m.attend(0, [d.seq], q, SCALE)
        torch.testing.assert_close(out[0], d.expect(q, want), rtol=1e-5, atol=1e-5)
        if step % 3:
            assert d.m.last_step is not None and d.m.last_step.fetched == 0  # nothing moves between selections
    assert cached_steps == 6


def test_a_selection_is_forced_when_more_pages_opened_than_the_window_holds() -> None:
    # select_every is far beyond the steps run; the window (1 page) forces a selection at each page's second open.
    budget = DecodeBudget(pages=3, sink_pages=1, window_pages=1, select_every=100)
    d = Decoder(manager(budget), 24, 3)  # 6 pages
    selections = 0
    for _ in range(3 * BT):
        q = d.token()
        chosen = [p for p in d.m.select(0, [d.seq], q, SCALE)[0].tolist() if p >= 0]
        before = d.m.layers[0].kept.selection
        out = d.m.attend(0, [d.seq], q, SCALE)
        if d.m.layers[0].kept.selection is not before:
            selections += 1
            torch.testing.assert_close(out[0], d.expect(q, chosen), rtol=1e-5, atol=1e-5)
    # Tokens 24..35 open pages 6, 7 and 8 (at steps 0, 4, 8): step 0 selects; page 7 is in the
    # window at step 4 (one page since the selection); page 8 is the second, so step 8 selects.
    assert selections == 2


def test_a_new_sequence_or_another_batch_makes_the_next_step_select() -> None:
    budget = DecodeBudget(fraction=0.5, sink_pages=1, window_pages=1, select_every=50)
    m = manager(budget, device_pages=12)
    a, b = Decoder(m, 40, 4), Decoder(m, 40, 5)
    for _ in range(2):
        qa, qb = a.token(), b.token()
        m.attend(0, [a.seq, b.seq], torch.cat([qa, qb]), SCALE)
    first = m.layers[0].kept.selection
    qa = a.token()
    m.attend(0, [a.seq], qa, SCALE)  # another batch: selects
    assert m.layers[0].kept.selection is not first
    c = Decoder(m, 40, 6)  # demotes a's and b's pages: the kept selection is dropped
    assert m.layers[0].kept.selection is None
    for d in (a, b, c):
        q = d.token()
        out = m.attend(0, [d.seq], q, SCALE)
        pages = [p for p in range(-(-len(d.k) // BT)) if m.layers[0].dev_slot[d.seq, p] >= 0]
        assert len(pages) <= 12
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_select_every_must_be_a_positive_int(bad: object) -> None:
    with pytest.raises(ValueError, match="select_every must be an int >= 1"):
        DecodeBudget(select_every=bad)  # type: ignore[arg-type]


def twins(budget: DecodeBudget, lengths: list[int]) -> list[PageManager]:
    """Two identical managers of 2 layers holding the same sequences (for per-layer vs planned steps)."""
    layout = KVLayout(num_layers=2, kv_factor=2, num_kv_heads=H, head_dim=D, dtype=torch.float32, block_tokens=BT)
    ms = [PageManager(layout, budget, device_pages=16, host_pages=256, max_seqs=4, max_pages=64) for _ in range(2)]
    g = torch.Generator().manual_seed(30)
    for n in lengths:
        kv = [torch.randn(n, H, D, generator=g) for _ in range(4)]
        for m in ms:
            m.add(kv[:2], kv[2:])
    return ms


@pytest.mark.parametrize("every", [1, 3])
def test_a_planned_step_equals_append_and_attend_layer_by_layer(every: int) -> None:
    ms = twins(DecodeBudget(fraction=0.3, sink_pages=1, window_pages=1, select_every=every), [30, 37, 41])
    a, b = ms
    g = torch.Generator().manual_seed(31)
    for t in range(14):  # pages open and fill, under pressure (16 slots, 3 sequences wanting ~3-4 pages each)
        seqs = [0, 1, 2] if t < 10 else [2, 0]
        n = len(seqs)
        kv = [torch.randn(n, H, D, generator=g) for _ in range(4)]
        qs = [torch.randn(n, HQ, D, generator=g) for _ in range(2)]
        plan = b.plan_step(seqs)
        for layer in range(2):
            a.append(layer, seqs, kv[layer], kv[2 + layer])
            b.append_planned(plan, layer, kv[layer], kv[2 + layer])
            assert torch.equal(a.attend(layer, seqs, qs[layer], SCALE), b.attend_planned(plan, layer, qs[layer], SCALE))
    for la, lb in zip(a.layers, b.layers):
        assert torch.equal(la.dev, lb.dev) and torch.equal(la.res.slot, lb.res.slot)
    assert a.fetched_pages == b.fetched_pages > 0 and a.evicted_pages == b.evicted_pages > 0


def test_a_plan_runs_once_and_checks_its_inputs() -> None:
    ms = twins(DecodeBudget(fraction=0.5), [21])
    m = ms[0]
    plan = m.plan_step([0])  # tokens 21 and 22: no page opens or fills
    again = m.plan_step([0])
    assert plan.key == again.key  # the same work: a captured step replays for it
    m.plan_step([0])
    opens = m.plan_step([0])  # token 24 opens page 6: its placement is part of the step's device work
    assert opens.key != again.key
    again = m.plan_step([0])
    with pytest.raises(ValueError, match="not the latest"):
        m.append_planned(plan, 0, torch.zeros(1, H, D), torch.zeros(1, H, D))
    with pytest.raises(ValueError, match="append needs keys and values of shape"):
        m.append_planned(again, 0, torch.zeros(2, H, D), torch.zeros(2, H, D))
    with pytest.raises(ValueError, match="q must be"):
        m.attend_planned(again, 0, torch.zeros(1, D), SCALE)
    with pytest.raises(KeyError, match="sequence 3"):
        m.plan_step([3])
