"""Reproduce the open small-block finding (docs/vllm.md, "Blocks smaller than vLLM's") in one small run.

One user's conversation at a time through vLLM (CPU), vLLM's own prefix cache off, the long-message
workload's prompts (512-token system prompt, 300-token messages, 20-token greedy answers, the
multi-turn benchmark's random Llama): first without a connector (the reference answers), then
with tierkv at `block_tokens` 128 (vLLM's block size) and 16. Each turn is fed the reference
conversation, so every turn is compared on the same prompt. At 5a4f410 the 16-token run differed
on user 3 turn 2 and user 2 turn 3, the 128-token run on none.

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


def child(model: str, block_tokens: int, reference: Path) -> None:
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
              num_gpu_blocks_override=40, kv_transfer_config=kv)
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
                print(f"| {block_tokens} | {user} | {turn} | {len(prompt)} | {out.num_cached_tokens} | "
                      f"{'yes' if same else '**no**'} |", flush=True)
            else:
                answers[key] = got
            prompt += answers[key]  # the reference conversation, whatever this engine answered
    if not block_tokens:
        reference.write_text(json.dumps(answers))


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]))
        return
    from tierkv_connectors.vllm.random_model import save_random_llama

    with tempfile.TemporaryDirectory(prefix="tierkv-probe-") as tmp:
        args = bench.parse([])
        model = str(save_random_llama(Path(tmp) / "model", hidden=512, layers=6, heads=8, kv_heads=8, head_dim=64,
                                      vocab=args.vocab))
        reference = Path(tmp) / "reference.json"
        print("| tierkv block_tokens | user | turn | prompt tokens | cached | answer = no connector |")
        print("| ---: | ---: | ---: | ---: | ---: | --- |")
        for bt in (0, 128, 16):
            run = subprocess.run([sys.executable, __file__, "--child", model, str(bt), str(reference)],
                                 env={**os.environ, **ENV}, capture_output=True, text=True)
            sys.stdout.write("".join(line + "\n" for line in run.stdout.splitlines() if line.startswith("|")))
            if run.returncode:
                sys.exit(f"block_tokens {bt}: the engine failed:\n{run.stderr[-3000:]}")


if __name__ == "__main__":
    main()
