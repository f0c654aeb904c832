"""A tiny random Llama for real vLLM runs on CPU, and a runner that drives one engine per process.

The vLLM tests start each engine in its own process (`python tests/vllm_model.py SPEC.json`):
a restart must be a real new process, the store directory is locked by the process that writes
it, and a configuration error must be seen the way a user sees it, in the engine's output. The
runner prints one line `RESULT <json>` with the generated token ids, the cached-token counts, the
tierkv stats of each worker and vLLM's count of cached prompt tokens by source.

The model is the smallest vLLM's CPU attention accepts (head_dim 32), in float32 so that KV
loaded from tierkv and KV computed in place give the same greedy tokens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tierkv_connectors.vllm.random_model import save_random_llama

VOCAB = 512
RESULT_PREFIX = "RESULT "


def make_model(path: Path) -> Path:
    """The test model: 2 layers, hidden 64, one KV head of 32 channels, float32."""
    return save_random_llama(path, vocab=VOCAB)


def engine_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Offline vLLM on CPU with a 1 GiB KV cache; functions may be sent to workers (for stats)."""
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
                "TOKENIZERS_PARALLELISM": "false"})
    env.update(extra or {})
    return env


def run_engine(spec: dict[str, Any], timeout: float = 240, env: dict[str, str] | None = None) -> tuple[dict[str, Any] | None, str]:
    """Run one engine session in a new process; returns (result or None if it failed, its output)."""
    proc = subprocess.run([sys.executable, __file__, json.dumps(spec)], capture_output=True, text=True,
                          timeout=timeout, env=engine_env(env))
    output = proc.stdout + proc.stderr
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):]), output
    return None, output


def _session(spec: dict[str, Any]) -> dict[str, Any]:
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    kv_transfer = None
    if spec.get("connector") is not None:
        kv_transfer = KVTransferConfig(kv_connector="TierKVConnector",
                                       kv_connector_module_path="tierkv_connectors.vllm",
                                       kv_role=spec.get("role", "kv_both"),
                                       kv_load_failure_policy=spec.get("failure_policy", "recompute"),
                                       kv_connector_extra_config=spec["connector"])
    llm = LLM(model=spec["model"], dtype="float32", enforce_eager=True, seed=0, max_model_len=spec.get("max_model_len", 1024),
              enable_prefix_caching=spec.get("prefix_caching", True), kv_transfer_config=kv_transfer,
              disable_log_stats=False, **spec.get("engine", {}))
    params = SamplingParams(max_tokens=spec.get("max_tokens", 8), temperature=0.0, ignore_eos=True)
    phases: list[list[dict[str, Any]]] = []
    for phase in spec["phases"]:
        if phase.get("reset_prefix_cache"):
            assert llm.reset_prefix_cache(), "vLLM refused to reset its prefix cache"
        prompts = []
        for p in phase["prompts"]:
            tokens = list(p["tokens"])
            if "extend" in p:  # a next turn: an earlier prompt, its answer, then these tokens
                earlier = phases[p["extend"][0]][p["extend"][1]]
                tokens = earlier["prompt"] + earlier["tokens"] + tokens
            prompts.append({"prompt_token_ids": tokens, **({"cache_salt": p["salt"]} if p.get("salt") else {})})
        outputs = llm.generate(prompts, params, use_tqdm=False)
        phases.append([{"prompt": p["prompt_token_ids"], "tokens": list(o.outputs[0].token_ids),
                        "cached": o.num_cached_tokens} for p, o in zip(prompts, outputs)])
    stats = None
    if kv_transfer is not None:
        from tierkv_connectors.vllm import worker_stats

        stats = llm.collective_rpc(worker_stats)
    by_source = {m.labels["source"]: m.value for m in llm.get_metrics()
                 if m.name == "vllm:prompt_tokens_cached_by_source" and m.value}
    return {"phases": phases, "stats": stats, "cached_by_source": by_source}


def main() -> None:
    result = _session(json.loads(sys.argv[1]))
    print(RESULT_PREFIX + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
