"""The small-block finding (docs/vllm.md, "Blocks smaller than vLLM's"), checked end to end after its fix.

One user's conversation at a time through vLLM (CPU), vLLM's own prefix cache off, the long-message
workload's prompts (512-token system prompt, 300-token messages, 20-token greedy answers, the
multi-turn benchmark's random Llama); each turn is fed the reference conversation, so every turn
is compared on the same prompt:

- vLLM with `--block-size 32` (the smallest its CPU attention takes) and no connector: the
  reference answers;
- the same with tierkv at `block_tokens` 32: hits of 32-token granularity, whole pages, every
  answer must be the reference's;
- vLLM's default 128-token pages with tierkv at 16: refused at start (CPU attention pages are
  copied only whole; before the fix this run changed 2 of 8 answers).

    python scripts/vllm_small_block_probe.py            (~5 min on 2 cores)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_vllm_multiturn as bench  # noqa: E402

USERS, TURNS = (3, 2), 4
ENV = {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_CPU_NUM_OF_RESERVED_CPU": "1",
       "TOKENIZERS_PARALLELISM": "false", "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}


def child(model: str, block_tokens: int, reference: Path, vllm_block: int) -> None:
    """Run the turns in this process's engine; write (reference run) or compare against the reference answers."""
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    args = bench.parse(["--users", "8", "--system-tokens", "512", "--user-tokens", "300", "--answer-tokens", "20"])
    kv = None
    if block_tokens:
        kv = KVTransferConfig(kv_connector="TierKVConnector", kv_connector_module_path="tierkv_connectors.vllm",
                              kv_role="kv_both", kv_load_failure_policy="recompute",
                              kv_connector_extra_config={"host_bytes": "1GiB", "block_tokens": block_tokens})
    llm = LLM(model=model, dtype="float32", enforce_eager=True, seed=0, max_model_len=2048, enable_prefix_caching=False,
              num_gpu_blocks_override=40 * 128 // vllm_block, block_size=vllm_block, kv_transfer_config=kv)
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    answers = json.loads(reference.read_text()) if block_tokens else {}
    for user in USERS:
        prompt = list(bench.system_prompt(args))
        for turn in range(TURNS):
            prompt += bench.user_message(args, user, turn)
            out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
            got = list(out.outputs[0].token_ids)
            key = f"{user}/{turn}"
            if block_tokens:
                same = got == answers[key]
                print(f"| {vllm_block} | {block_tokens} | {user} | {turn} | {len(prompt)} | {out.num_cached_tokens} | "
                      f"{'yes' if same else '**no**'} |", flush=True)
            else:
                answers[key] = got
            prompt += answers[key]  # the reference conversation, whatever this engine answered
    if not block_tokens:
        reference.write_text(json.dumps(answers))


def main() -> None:
    if len(sys.argv) == 6 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]), int(sys.argv[5]))
        return
    from tierkv_connectors.vllm.random_model import save_random_llama

    with tempfile.TemporaryDirectory(prefix="tierkv-probe-") as tmp:
        args = bench.parse([])
        model = str(save_random_llama(Path(tmp) / "model", hidden=512, layers=6, heads=8, kv_heads=8, head_dim=64,
                                      vocab=args.vocab))
        reference = Path(tmp) / "reference.json"
        print("| vLLM block | tierkv block_tokens | user | turn | prompt tokens | cached | answer = no connector |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: | --- |")
        for vllm_block, bt in ((32, 0), (32, 32), (128, 16)):
            run = subprocess.run([sys.executable, __file__, "--child", model, str(bt), str(reference), str(vllm_block)],
                                 env={**os.environ, **ENV}, capture_output=True, text=True)
            sys.stdout.write("".join(line + "\n" for line in run.stdout.splitlines() if line.startswith("|")))
            refused = "less than vLLM's block size" in run.stderr
            if vllm_block == 128:
                verdict = "refused at start, as it must be" if refused else "NOT refused"
                print(f"vLLM blocks of 128, tierkv blocks of 16: {verdict}")
                if not refused:
                    sys.exit(1)
            elif run.returncode:
                sys.exit(f"block_tokens {bt}: the engine failed:\n{run.stderr[-3000:]}")


if __name__ == "__main__":
    main()
