"""Decode step time and GPU KV bytes: dense vs tierkv's page manager at 1/8 vs all KV in host memory, copied every step.

    python3 scripts/bench_preempt_gpu.py [OUT.md] [--layers 4] [--contexts 32768 131072] [--batches 1 16]
    python3 scripts/bench_preempt_gpu.py --cpu-smoke          # tiny shapes on CPU: checks the script runs

Llama-3-8B shapes (hidden 4096, 8 KV heads, 32 query heads, head_dim 128, MLP 14336, bf16,
random values), `--layers` of the 32 (every layer does the same work, so the time and bytes
per step scale by 32 / layers; the table gives both). One step = for every layer: the layer's
projections and MLP on the batch's hidden state (`--attention-only` leaves them out), the new
token's K/V appended, attention of one query per sequence:

    dense      every page on the GPU, tierkv's paged attention over all of them; the whole
               step is one CUDA graph (as an engine runs decode)
    pages 1/8  `PageManager(cuda_graphs=True)` with 1/8 of each sequence's pages on the GPU (1
               sink page, 2-page window, the rest by Quest min/max score), misses fetched from
               pinned host memory in one copy_rows launch per layer; selection, eviction and the
               block table are computed on the device and each layer's append and attention
               are replayed from the manager's graphs; the matmuls from graphs of their own
    host-all   every page in pinned host memory, all of them copied to a one-layer GPU buffer
               every layer of every step, then the same attention

The queries drift between steps (q_t = q_0 + drift * noise). `--drift` 0.12 changes about a
quarter of the selection per step ("selection churn" column: 24-25% on the H200), a little
more than SmolLM2-135M-Instruct does on ordinary text at 1/8 (`scripts/decode_churn.py`: 21%
at 4k tokens). A configuration whose KV
does not fit the GPU (or the host: `--host-gib`) is skipped with the reason.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tierkv import DecodeBudget, KVLayout, PageManager, StepPlan
from tierkv.decode.attention import attend_pages
from tierkv.decode.graphs import StepGraphs
from tierkv.ops.transfer import copy_slots

HIDDEN, MLP = 4096, 14336


@dataclass(frozen=True)
class Shape:
    layers: int
    kv_heads: int
    q_heads: int
    head_dim: int
    dtype: torch.dtype
    block_tokens: int
    full_layers: int  # the model's layer count, for the scaled columns


@dataclass(frozen=True)
class Row:
    mode: str
    context: int
    batch: int
    step_ms: float | None
    gpu_kv_bytes: int
    fetched_per_step: float
    churn: float | None = None  # fetched / selected pages per layer and step
    note: str = ""


@dataclass(frozen=True)
class Weights:
    """One layer's projections and MLP (random): the work of a decode step besides attention."""

    qkv: torch.Tensor  # [hidden, (q_heads + 2 kv_heads) head_dim]
    o: torch.Tensor  # [q_heads head_dim, hidden]
    gate_up: torch.Tensor  # [hidden, 2 mlp]
    down: torch.Tensor  # [mlp, hidden]


def weights(s: Shape, device: torch.device, hidden: int, mlp: int) -> list[Weights]:
    def w(a: int, b: int) -> torch.Tensor:
        return (torch.randn(a, b, device=device) / math.sqrt(a)).to(s.dtype)

    qkv = (s.q_heads + 2 * s.kv_heads) * s.head_dim
    return [Weights(w(hidden, qkv), w(s.q_heads * s.head_dim, hidden), w(hidden, 2 * mlp), w(mlp, hidden))
            for _ in range(s.layers)]


def before_attention(x: torch.Tensor, w: Weights) -> torch.Tensor:
    return x @ w.qkv


def after_attention(a: torch.Tensor, w: Weights) -> torch.Tensor:
    h = a.flatten(1) @ w.o
    gate, up = (h @ w.gate_up).chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up) @ w.down


class Graphed:
    """`fn(*args)` from a CUDA graph on CUDA (captured after one eager run), plainly on CPU."""

    def __init__(self, fn, *args: torch.Tensor) -> None:
        self.fn, self.args = fn, args
        self.out = fn(*args)
        self.graph = None
        if args[0].is_cuda:
            torch.cuda.synchronize()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = fn(*args)

    def __call__(self):
        if self.graph is None:
            return self.fn(*self.args)
        self.graph.replay()
        return self.out


def token_bytes(s: Shape) -> int:
    return 2 * s.kv_heads * s.head_dim * torch.empty((), dtype=s.dtype).element_size()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, steps: int, device: torch.device, warm: int = 2) -> float:
    for _ in range(warm):
        step()
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - t) / steps * 1e3


def queries(s: Shape, batch: int, device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Generator]:
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(batch, s.q_heads, s.head_dim, generator=g, device=device, dtype=torch.float32), g


def bench_dense(s: Shape, ctx: int, batch: int, device: torch.device, steps: int, ws: list[Weights] | None,
                drift: float) -> Row:
    layout = KVLayout(1, 2, s.kv_heads, s.head_dim, s.dtype, s.block_tokens)
    pages = -(-(ctx + steps + 4) // s.block_tokens)
    pools = [torch.randn((batch * pages, *layout.block_shape), device=device).to(s.dtype) for _ in range(s.layers)]
    table = torch.arange(batch * pages, device=device).view(batch, pages)
    lens = torch.full((batch,), ctx, dtype=torch.int64, device=device)
    q0, g = queries(s, batch, device, 1)
    q = q0.to(s.dtype)
    k = torch.randn(batch, s.kv_heads, s.head_dim, device=device, dtype=s.dtype)
    x = torch.randn(batch, HIDDEN if ws is None else ws[0].qkv.shape[0], device=device, dtype=s.dtype)
    scale = 1 / math.sqrt(s.head_dim)

    def layers(lens: torch.Tensor) -> None:  # device work only (no host reads of lens): captured as one graph
        lens.add_(1)
        pos = (lens[:1] - 1).expand(batch)
        rows, off = table.gather(1, (pos // s.block_tokens)[:, None])[:, 0], pos % s.block_tokens
        for i, pool in enumerate(pools):
            if ws is not None:
                before_attention(x, ws[i])
            pool[rows, 0, 0, off] = k
            pool[rows, 0, 1, off] = k
            a = attend_pages(q, pool, layout, table, lens, scale)
            if ws is not None:
                after_attention(a, ws[i])

    graphed = Graphed(layers, lens)

    def step() -> None:
        q.copy_(q0 + drift * torch.randn(q0.shape, generator=g, device=device))
        graphed()

    ms = timed(step, steps, device)
    return Row("dense", ctx, batch, ms, batch * ctx * token_bytes(s) * s.layers, 0.0)


def bench_pages(s: Shape, ctx: int, batch: int, device: torch.device, steps: int, fraction: float,
                ws: list[Weights] | None, drift: float, select_every: int = 1, whole: bool = False) -> Row:
    """The page manager's step; `whole`: planned (`PageManager.plan_step`) and captured as one graph per plan key,
    model included, as an engine captures its decode step (else each layer's halves are replayed from their own graphs)."""
    layout = KVLayout(s.layers, 2, s.kv_heads, s.head_dim, s.dtype, s.block_tokens)
    # Whole periods of selections and page opens, after two of them: a graph is captured the second time
    # its key comes, and keys change with the selection phase and as pages open and fill.
    period = max(select_every, s.block_tokens)
    warm, steps = 2 * period + 1, period * -(-steps // period)
    pages = -(-(ctx + warm + steps + 8) // s.block_tokens)
    budget = DecodeBudget(fraction=fraction, sink_pages=1, window_pages=2, select_every=select_every)
    m = PageManager(layout, budget, device_pages=batch * budget.wanted(pages), host_pages=batch * pages, max_seqs=batch,
                    max_pages=pages, device=device, cuda_graphs=device.type == "cuda" and not whole)
    for _ in range(batch):
        kv = [torch.randn(ctx, s.kv_heads, s.head_dim, device=device).to(s.dtype) for _ in range(s.layers)]
        m.add(kv, kv)
        del kv
    seqs = list(range(batch))
    q0, g = queries(s, batch, device, 2)
    k = torch.randn(batch, s.kv_heads, s.head_dim, device=device, dtype=s.dtype)
    x = torch.randn(batch, HIDDEN if ws is None else ws[0].qkv.shape[0], device=device, dtype=s.dtype)
    a = torch.zeros(batch, s.q_heads, s.head_dim, device=device, dtype=s.dtype)
    pre = [Graphed(before_attention, x, w) for w in ws] if ws is not None else None
    post = [Graphed(after_attention, a, w) for w in ws] if ws is not None else None
    scale = 1 / math.sqrt(s.head_dim)
    selected = []
    graphs = StepGraphs(device) if whole and device.type == "cuda" else None

    def planned(plan: StepPlan, q: torch.Tensor) -> None:  # device work only
        for layer in range(s.layers):
            if ws is not None:
                before_attention(x, ws[layer])
            m.append_planned(plan, layer, k, k)
            out = m.attend_planned(plan, layer, q, scale)
            if ws is not None:
                after_attention(out, ws[layer])

    def step() -> None:
        q = (q0 + drift * torch.randn(q0.shape, generator=g, device=device)).to(s.dtype)
        if whole:
            plan = m.plan_step(seqs)
            if graphs is None:
                planned(plan, q)
            else:
                graphs.run(plan.key, lambda qq: planned(plan, qq), (q,), keep=plan)
            assert m.last_step is not None
            selected.append(m.last_step.selected)
            return
        for layer in range(s.layers):
            if pre is not None:
                pre[layer]()
            m.append(layer, seqs, k, k)
            a.copy_(m.attend(layer, seqs, q, scale))
            if post is not None:
                post[layer]()
        assert m.last_step is not None
        selected.append(m.last_step.selected)

    before = m.fetched_pages  # a device counter: read outside the timed steps (reading it synchronises)
    ms = timed(step, steps, device, warm)
    fetched = (m.fetched_pages - before) / (warm + steps) / s.layers
    churn = fetched / (sum(selected) / len(selected))
    mode = (f"pages 1/{round(1 / fraction)}" + (f", select every {select_every}" if select_every > 1 else "")
            + (", whole-step graph" if whole else ""))
    return Row(mode, ctx, batch, ms, m.device_bytes(), fetched, churn)


def bench_host_all(s: Shape, ctx: int, batch: int, device: torch.device, steps: int, ws: list[Weights] | None,
                   drift: float) -> Row:
    layout = KVLayout(1, 2, s.kv_heads, s.head_dim, s.dtype, s.block_tokens)
    pages = -(-(ctx + steps + 2) // s.block_tokens)
    pin = device.type == "cuda"
    hosts = []
    for _ in range(s.layers):
        # Contents do not matter for the copy or the attention time; filling tens of GiB on the host would.
        hosts.append(torch.zeros((batch * pages, *layout.block_shape), dtype=s.dtype, pin_memory=pin))
    buf = torch.empty((batch * pages, *layout.block_shape), dtype=s.dtype, device=device)
    rows = torch.arange(batch * pages)
    table = rows.to(device).view(batch, pages)
    lens = torch.full((batch,), ctx, dtype=torch.int64)
    q0, g = queries(s, batch, device, 3)
    x = torch.randn(batch, HIDDEN if ws is None else ws[0].qkv.shape[0], device=device, dtype=s.dtype)
    a = torch.zeros(batch, s.q_heads, s.head_dim, device=device, dtype=s.dtype)
    pre = [Graphed(before_attention, x, w) for w in ws] if ws is not None else None
    post = [Graphed(after_attention, a, w) for w in ws] if ws is not None else None
    scale = 1 / math.sqrt(s.head_dim)

    def step() -> None:
        lens.add_(1)
        q = (q0 + drift * torch.randn(q0.shape, generator=g, device=device)).to(s.dtype)
        for i, host in enumerate(hosts):
            if pre is not None:
                pre[i]()
            copy_slots(host, rows, buf, rows)
            a.copy_(attend_pages(q, buf, layout, table, lens, scale))
            if post is not None:
                post[i]()

    ms = timed(step, steps, device)
    return Row("host-all", ctx, batch, ms, buf.numel() * buf.element_size(), float(batch * pages))


def table(rows: list[Row], s: Shape, title: str) -> str:
    scale = s.full_layers / s.layers
    out = [title, "",
           f"| context | batch | mode | step ms ({s.layers} layers) | step ms x{s.full_layers}/{s.layers} | "
           f"GPU KV MiB ({s.layers} layers) | GPU KV GiB ({s.full_layers} layers) | pages fetched / layer / step | "
           "selection churn | vs dense |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    dense = {(r.context, r.batch): r.step_ms for r in rows if r.mode == "dense" and r.step_ms is not None}
    for r in rows:
        base = dense.get((r.context, r.batch))
        ms = "—" if r.step_ms is None else f"{r.step_ms:.2f}"
        scaled = "—" if r.step_ms is None else f"{r.step_ms * scale:.1f}"
        vs = f"{r.step_ms / base:.2f}x" if r.step_ms is not None and base else ""
        out.append(f"| {r.context} | {r.batch} | {r.mode} | {ms} | {scaled} | {r.gpu_kv_bytes / 2**20:.1f} | "
                   f"{r.gpu_kv_bytes * scale / 2**30:.2f} | {r.fetched_per_step:.1f} | "
                   f"{'' if r.churn is None else f'{r.churn:.0%}'} | {vs} {r.note} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?", type=Path)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU (float32)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--fraction", type=float, default=0.125)
    ap.add_argument("--select-every", type=int, nargs="+", default=[1, 8],
                    help="DecodeBudget.select_every values to measure (a row each)")
    ap.add_argument("--whole-step", type=int, nargs="*", default=[1, 16],
                    help="select_every values to measure with the whole step planned and captured as one graph")
    ap.add_argument("--no-host-all", action="store_true", help="leave out the all-KV-in-host rows")
    ap.add_argument("--drift", type=float, default=0.12, help="query noise per step (selection churn, see above)")
    ap.add_argument("--attention-only", action="store_true", help="leave out the layers' projections and MLP")
    ap.add_argument("--gpu-gib", type=float, default=None, help="GPU memory to plan with (default: the device's, less 8 GiB)")
    ap.add_argument("--host-gib", type=float, default=80.0, help="pinned host memory to plan with")
    args = ap.parse_args()
    if args.cpu_smoke:
        device = torch.device("cpu")
        s = Shape(2, 2, 8, 64, torch.float32, 16, 32)
        contexts, batches, steps = [512, 2048], [1, 2], 3
        gpu_gib = 4.0
        hidden, mlp = 256, 512
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --cpu-smoke for the CPU check")
        device = torch.device("cuda")
        s = Shape(args.layers, 8, 32, 128, torch.bfloat16, 16, 32)
        contexts, batches, steps = args.contexts, args.batches, args.steps
        total = torch.cuda.get_device_properties(device).total_memory / 2**30
        gpu_gib = args.gpu_gib if args.gpu_gib is not None else total - 8
        hidden, mlp = HIDDEN, MLP
    ws = None if args.attention_only else weights(s, device, hidden, mlp)
    if ws is not None:
        gpu_gib -= sum(t.numel() * t.element_size() for w in ws for t in vars(w).values()) / 2**30
    rows: list[Row] = []
    for ctx in contexts:
        for batch in batches:
            kv = batch * ctx * token_bytes(s) * s.layers
            if kv / 2**30 > gpu_gib:
                rows.append(Row("dense", ctx, batch, None, kv, 0.0, f"does not fit: {kv / 2**30:.0f} GiB > {gpu_gib:.0f}"))
            else:
                rows.append(bench_dense(s, ctx, batch, device, steps, ws, args.drift))
            if kv / 2**30 > args.host_gib:
                rows.append(Row(f"pages 1/{round(1 / args.fraction)}", ctx, batch, None, kv // 8, 0.0,
                                f"host pool {kv / 2**30:.0f} GiB > --host-gib {args.host_gib:.0f}"))
                rows.append(Row("host-all", ctx, batch, None, kv // s.layers, 0.0, "host pool too large"))
                continue
            first = len(rows) - 1
            for every in args.select_every:
                rows.append(bench_pages(s, ctx, batch, device, steps, args.fraction, ws, args.drift, every))
            for every in args.whole_step:
                rows.append(bench_pages(s, ctx, batch, device, steps, args.fraction, ws, args.drift, every, whole=True))
            if not args.no_host_all:
                rows.append(bench_host_all(s, ctx, batch, device, steps, ws, args.drift))
            print(*rows[first:], sep="\n", flush=True)
            if args.out is not None:  # the rows so far, in case a time limit stops the larger shapes
                args.out.write_text(table(rows, s, "Decode step (partial: the run was stopped here)") + "\n")
            if device.type == "cuda":
                torch.cuda.empty_cache()
                release = getattr(torch._C, "_host_emptyCache", None)  # pinned blocks cached by torch
                if release is not None:
                    release()
    name = "CPU smoke (tiny shapes, float32)" if args.cpu_smoke else torch.cuda.get_device_name(device)
    work = "attention only" if ws is None else f"with projections and MLP (hidden {hidden}, MLP {mlp})"
    title = (f"Decode step, {name}: {s.kv_heads} KV heads, {s.q_heads} query heads, head_dim {s.head_dim}, "
             f"{str(s.dtype).removeprefix('torch.')}, pages of {s.block_tokens} tokens, {s.layers} layers measured, "
             f"{work}, query drift {args.drift}")
    report = table(rows, s, title)
    print(report)
    if args.out is not None:
        args.out.write_text(report + "\n")


if __name__ == "__main__":
    main()
