"""The page manager's decode step replayed from CUDA graphs gives what the eager step gives, bit for bit.

Two managers hold the same prompts; one runs `cuda_graphs=True`. Both get the same tokens and
queries, through steps where pages open and fill at different steps for each sequence, a
sequence that arrives under pressure (demoting pages of the others) and one that leaves: every
attention output, residency table and counter must be equal. Replayed steps must not
synchronise either.

Run on the GPU machine: `python -m pytest -m gpu tests/gpu -q`.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_decode_sync_free_gpu import no_sync

from tierkv import DecodeBudget, KVLayout, PageManager

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

H, HQ, D, BT, LAYERS = 8, 32, 128, 16, 2


def pair(budget: DecodeBudget, lengths: list[int], device_pages: int, max_seqs: int) -> list[PageManager]:
    layout = KVLayout(LAYERS, 2, H, D, torch.bfloat16, BT)
    pages = -(-(max(lengths) + 128) // BT)
    out = []
    for graphs in (False, True):
        m = PageManager(layout, budget, device_pages=device_pages, host_pages=max_seqs * pages, max_seqs=max_seqs,
                        max_pages=pages, device="cuda", cuda_graphs=graphs)
        g = torch.Generator(device="cuda").manual_seed(0)
        for n in lengths:
            k = [torch.randn(n, H, D, generator=g, device="cuda").to(torch.bfloat16) for _ in range(LAYERS)]
            m.add(k, k)
        out.append(m)
    return out


def step(ms: list[PageManager], seqs: list[int], seed: int) -> None:
    """One decode step of every layer on both managers with the same inputs; their outputs must be equal."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(len(seqs), HQ, D, generator=g, device="cuda").to(torch.bfloat16)
    for layer in range(LAYERS):
        k = torch.randn(len(seqs), H, D, generator=g, device="cuda").to(torch.bfloat16)
        outs = []
        for m in ms:
            m.append(layer, seqs, k, k)
            outs.append(m.attend(layer, seqs, q, 1 / math.sqrt(D)))
        assert torch.equal(outs[0], outs[1]), f"layer {layer}: graph output differs from eager"


def same_state(ms: list[PageManager]) -> None:
    a, b = ms
    for la, lb in zip(a.layers, b.layers):
        assert torch.equal(la.res.slot, lb.res.slot) and torch.equal(la.res.occupant, lb.res.occupant)
        assert torch.equal(la.res.last_used, lb.res.last_used) and torch.equal(la.res.score, lb.res.score)
        assert torch.equal(la.dev, lb.dev) and torch.equal(la.host, lb.host)
        assert torch.equal(la.digest.kmin, lb.digest.kmin) and torch.equal(la.tokens_dev, lb.tokens_dev)
    assert a.fetched_pages == b.fetched_pages and a.evicted_pages == b.evicted_pages


@pytest.mark.parametrize("every", [1, 4])
def test_replayed_steps_equal_eager_steps_through_opens_fills_arrivals_and_departures(every: int) -> None:
    budget = DecodeBudget(fraction=0.125, select_every=every)
    lengths = [1500 + 5 * i for i in range(3)]
    wanted = budget.wanted(-(-1700 // BT))
    ms = pair(budget, lengths, device_pages=3 * wanted + 8, max_seqs=4)
    for t in range(40):  # every sequence opens and fills pages, at different steps
        step(ms, [0, 1, 2], 100 + t)
    same_state(ms)
    graphs = ms[1].graphs
    assert graphs is not None and graphs.captures > 0 and graphs.replays > 0
    g = torch.Generator(device="cuda").manual_seed(7)
    k = [torch.randn(1200, H, D, generator=g, device="cuda").to(torch.bfloat16) for _ in range(LAYERS)]
    for m in ms:  # a fourth sequence under pressure: pages of the others are demoted
        assert m.add(k, k) == 3
    for t in range(20):
        step(ms, [0, 1, 2, 3], 200 + t)
    for m in ms:
        m.remove(1)
    for t in range(20):
        step(ms, [0, 2, 3], 300 + t)
    same_state(ms)
    assert ms[0].evicted_pages > 0


@pytest.mark.parametrize("every", [1, 4])
def test_replayed_steady_steps_do_not_synchronise(every: int) -> None:
    ms = pair(DecodeBudget(fraction=0.125, select_every=every), [2049, 2049], device_pages=2 * 20, max_seqs=2)
    m = ms[1]
    g = torch.Generator(device="cuda").manual_seed(3)
    q = torch.randn(2, HQ, D, generator=g, device="cuda").to(torch.bfloat16)
    k = torch.randn(2, H, D, generator=g, device="cuda").to(torch.bfloat16)
    for _ in range(3):  # eager, then captured
        for layer in range(LAYERS):
            m.append(layer, [0, 1], k, k)
            m.attend(layer, [0, 1], q, 0.1)
    with no_sync():  # offsets 4..11 of the tail page: replays only
        for _ in range(8):
            for layer in range(LAYERS):
                m.append(layer, [0, 1], k, k)
                m.attend(layer, [0, 1], q, 0.1)
    torch.cuda.synchronize()
    assert m.graphs is not None and m.graphs.replays >= 16



def test_a_step_that_cannot_be_captured_raises_and_says_how_to_run_eagerly() -> None:
    """In a child process: a failed capture may leave torch's CUDA state unusable for what follows."""
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from tierkv import GraphCaptureError\n"
        "from tierkv.decode.graphs import StepGraphs\n"
        "g = StepGraphs(torch.device('cuda'))\n"
        "x = torch.ones(4, device='cuda')\n"
        "fn = lambda t: t * float(t.sum())\n"  # .item(): a synchronisation, which a capture cannot hold
        "print(g.run('k', fn, (x,)).sum().item())\n"
        "try:\n"
        "    g.run('k', fn, (x,))\n"
        "except GraphCaptureError as e:\n"
        "    print('refused:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "16.0" in out.stdout, out.stderr
    assert "refused:" in out.stdout and "cuda_graphs=False" in out.stdout, out.stdout + out.stderr


@pytest.mark.parametrize("every", [1, 4])
def test_a_whole_planned_step_captured_as_one_graph_equals_eager_steps(every: int) -> None:
    """`plan_step` + `append_planned`/`attend_planned`, every layer in one CUDA graph per plan key, as an engine captures."""
    budget = DecodeBudget(fraction=0.125, select_every=every)
    wanted = budget.wanted(-(-1700 // BT))
    eager, planned = pair(budget, [1500, 1505, 1510], device_pages=3 * wanted + 8, max_seqs=4)
    seqs, scale = [0, 1, 2], 1 / math.sqrt(D)
    q_in = torch.zeros(3, HQ, D, dtype=torch.bfloat16, device="cuda")
    k_in = torch.zeros(LAYERS, 3, H, D, dtype=torch.bfloat16, device="cuda")
    out = torch.zeros(LAYERS, 3, HQ, D, dtype=torch.bfloat16, device="cuda")

    def run(plan) -> None:  # device work only
        for layer in range(LAYERS):
            planned.append_planned(plan, layer, k_in[layer], k_in[layer])
            out[layer] = planned.attend_planned(plan, layer, q_in, scale)

    graphs: dict[object, torch.cuda.CUDAGraph] = {}
    seen: set[object] = set()
    replays = 0
    for t in range(48):  # pages open and fill at different steps of the three sequences
        g = torch.Generator(device="cuda").manual_seed(500 + t)
        q = torch.randn(3, HQ, D, generator=g, device="cuda").to(torch.bfloat16)
        ks = torch.randn(LAYERS, 3, H, D, generator=g, device="cuda").to(torch.bfloat16)
        ref = []
        for layer in range(LAYERS):
            eager.append(layer, seqs, ks[layer], ks[layer])
            ref.append(eager.attend(layer, seqs, q, scale))
        plan = planned.plan_step(seqs)
        q_in.copy_(q)
        k_in.copy_(ks)
        if plan.key not in seen:  # eagerly the first time (Triton compiles outside a capture)
            seen.add(plan.key)
            run(plan)
        else:
            if plan.key not in graphs:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    run(plan)
                graphs[plan.key] = graph
            graphs[plan.key].replay()
            replays += 1
        assert torch.equal(out, torch.stack(ref)), f"step {t}: the captured planned step differs from eager"
    same_state([eager, planned])
    assert replays > 20 and len(graphs) < 20
