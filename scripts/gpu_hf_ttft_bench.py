"""Time to first token through `TierKV.generate` on a GPU: recompute vs a stored prefix in pinned host or GPU memory.

A Llama-3-8B-shaped model (32 layers, hidden 4096, 32 heads, 8 KV heads, bf16) with random
weights, built on the GPU. For each prompt length, a fresh store per trial: the first 90% of the
prompt is stored by one `generate` call, then the whole prompt's first token is timed
(`max_new_tokens=1`, CUDA synchronised), against the same prompt with reuse turned off
(`load=False` through `TierKV.cache`). Hits come from a store with a host tier only (the case of a
GPU whose memory belongs to the model) and from a store with a device tier. Checksums are
verified on every read (the default).

    PYTHONUNBUFFERED=1 python scripts/gpu_hf_ttft_bench.py OUT.md [--tokens 8192,16384] [--layers 32]
    python scripts/gpu_hf_ttft_bench.py OUT.md --cpu-smoke      # tiny shapes on CPU: checks the script runs

Targets (issue 11): hits from pinned host >= 3x lower TTFT than recompute at 8k tokens, >= 5x at 16k.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tierkv import StoreConfig
from tierkv_connectors.hf import TierKV, cache_argument, tierkv_attention_for

GiB = 1 << 30


def build_model(layers: int, smoke: bool, device: torch.device) -> LlamaForCausalLM:
    if smoke:
        config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=1000, max_position_embeddings=4096)
    else:
        config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers, num_attention_heads=32,
                             num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
                             rope_theta=500000.0)
    dtype = torch.float32 if smoke else torch.bfloat16
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.eval()
    model.generation_config.pad_token_id = 0
    return model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def first_token_s(tkv: TierKV, ids: torch.Tensor, load: bool) -> tuple[float, int]:
    """Seconds to the first token of `ids` (reuse on or off), and the tokens reused.

    The clock stops when the first token is on the host (generate returned it, the model's
    stream is done). With reuse on, the cache also stores the prompt's new blocks, as
    `TierKV.generate` does: on a GPU that save runs in the background after prefill (its
    gather is on the model's stream, so it is in the figure; its copy to host is not), and it
    is waited for after the clock stops.
    """
    mask = torch.ones_like(ids)
    sync(ids.device)
    start = time.perf_counter()
    cache = tkv.cache(ids, mask, load=load, save_prompt=load)
    with tierkv_attention_for(tkv.model):  # as TierKV.generate runs it
        out = tkv.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1,  # type: ignore[operator]
                                 do_sample=False, **cache_argument(cache))
    out[0, -1].item()  # the first token, on the host
    elapsed = time.perf_counter() - start
    cache.wait_saved()
    sync(ids.device)
    return elapsed, cache.reused_tokens[0]


def trial(model: LlamaForCausalLM, config: StoreConfig, ids: torch.Tensor) -> tuple[float, float, int]:
    """(recompute s, reuse s, reused tokens) with a fresh store holding the first 90% of the prompt."""
    stored = ids[:, : int(ids.shape[1] * 0.9)]
    with TierKV(model, config) as tkv:
        tkv.generate(stored, torch.ones_like(stored), max_new_tokens=1)
        recompute, _ = first_token_s(tkv, ids, load=False)
        reuse, reused = first_token_s(tkv, ids, load=True)
    return recompute, reuse, reused


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="markdown table written here")
    parser.add_argument("--tokens", default="8192,16384", help="prompt lengths, comma-separated")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model on CPU, short prompts")
    args = parser.parse_args()
    smoke = args.cpu_smoke
    device = torch.device("cpu" if smoke else "cuda")
    lengths = [256, 512] if smoke else [int(t) for t in args.tokens.split(",")]
    model = build_model(args.layers, smoke, device)
    kv_bytes = 2 * model.config.num_hidden_layers * model.config.num_key_value_heads * (
        model.config.hidden_size // model.config.num_attention_heads) * (4 if smoke else 2)
    rows = ["| prompt tokens | stored from | recompute TTFT ms | reuse TTFT ms | speed-up | tokens reused |",
            "| --- | --- | --- | --- | --- | --- |"]
    print(rows[0], flush=True)
    with torch.no_grad():
        warm = torch.randint(1, model.config.vocab_size, (1, 64), device=device)
        model.generate(input_ids=warm, attention_mask=torch.ones_like(warm), max_new_tokens=1)  # type: ignore[operator]
        for n in lengths:
            room = 2 * n * kv_bytes + (64 << 20)
            stores = {"pinned host": StoreConfig(device_bytes=0, host_bytes=room, device=device.type),
                      "GPU (device tier)": StoreConfig(device_bytes=room, host_bytes=64 << 20, device=device.type)}
            for where, config in stores.items():
                results = []
                for t in range(args.trials + 1):  # the first trial warms kernels and allocators up; not counted
                    ids = torch.randint(1, model.config.vocab_size, (1, n), device=device,
                                        generator=torch.Generator(device).manual_seed(1000 * n + t))
                    results.append(trial(model, config, ids))
                kept = results[1:]
                recompute = statistics.median(r[0] for r in kept)
                reuse = statistics.median(r[1] for r in kept)
                row = (f"| {n} | {where} | {recompute * 1e3:.1f} | {reuse * 1e3:.1f} | {recompute / reuse:.2f}x | "
                       f"{kept[0][2]} |")
                rows.append(row)
                print(row, flush=True)
    name = "tiny model, CPU (smoke run)" if smoke else f"Llama-3-8B shapes, {args.layers} layers, bf16, random weights"
    text = (f"# transformers TTFT with a stored prefix\n\n{name}; medians of {args.trials} trials, a fresh store each, "
            "90% of the prompt stored; checksums verified.\n\n" + "\n".join(rows) + "\n")
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
