"""`tierkv replay`: a synthetic multi-turn chat workload through a store alone; hits, traffic, evictions."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import Any

from tqdm import tqdm

from ..config import StoreConfig
from ..layout import KVLayout, dtype_name
from ..store import BlockStore
from .main import REPLAY_DEVICE_BYTES, REPLAY_HOST_BYTES, store_config_from_env
from .text import format_bytes, pct, table
from .workload import SYNTHETIC_LAYOUT, SYNTHETIC_NAMESPACE, ChatWorkload, ReplayResult, check_fits, replay


def run_replay(args: argparse.Namespace) -> int:
    workload = ChatWorkload(users=args.users, turns=args.turns, seed=args.seed)
    config = store_config_from_env({"device_bytes": REPLAY_DEVICE_BYTES, "host_bytes": REPLAY_HOST_BYTES},
                                   {"device_bytes": args.device_bytes, "host_bytes": args.host_bytes})
    with BlockStore(SYNTHETIC_LAYOUT, SYNTHETIC_NAMESPACE, config) as store:
        check_fits(store, workload)
        requests = tqdm(workload.requests(), total=workload.num_requests, desc="replaying", unit="req",
                        disable=None, leave=False)
        result = replay(store, requests)
        stats = store.stats()
        report = replay_report(workload, config, result, stats)
    print(json.dumps(report, indent=2) if args.json else format_replay(report))
    return 0


def hit_rates(stats: dict[str, Any]) -> dict[str, float | None]:
    """Per tier: hits / blocks looked up in it (a lookup reaches a tier only if faster ones missed)."""
    rates: dict[str, float | None] = {}
    for name, t in stats["tiers"].items():
        looked_up = t["hits"] + t["misses"]
        rates[name] = t["hits"] / looked_up if looked_up else None
    return rates


def replay_report(workload: ChatWorkload, config: StoreConfig, result: ReplayResult, stats: dict[str, Any]) -> dict[str, Any]:
    return {
        "kv": "synthetic: derived from each block's token prefix, no model ran",
        "workload": asdict(workload),
        "layout": SYNTHETIC_LAYOUT.to_dict(),
        "block_bytes": SYNTHETIC_LAYOUT.block_bytes,
        "config": config.to_dict(),
        "requests": result.requests,
        "prompt_tokens": result.prompt_tokens,
        "served_tokens": result.served_tokens,
        "computed_tokens": result.computed_tokens,
        "verified_blocks": result.verified_blocks,
        "unstored_requests": result.unstored_requests,
        "first_capacity_error": result.first_capacity_error,
        "hit_rate": hit_rates(stats),
        "bytes_moved": stats["bytes_moved"],
        "evictions": {name: t["evictions"] for name, t in stats["tiers"].items()},
        "dropped_blocks": stats["dropped"],
        "elapsed_s": round(result.elapsed_s, 3),
        "stats": stats,
    }


def format_replay(r: dict[str, Any]) -> str:
    w, tiers = r["workload"], r["stats"]["tiers"]
    prompt = r["prompt_tokens"]
    lines = [
        "tierkv replay: a synthetic multi-turn chat workload served from a BlockStore",
        "  KV is SYNTHETIC: each block's bytes are derived from its token prefix (no model runs);",
        "  every block served from the store was checked bit-exact against it.",
        "",
        *table([
            ("workload", f"{w['users']} users x {w['turns']} turns, {w['system_prompts']} shared system prompts of "
                         f"{w['system_tokens']} tokens, +{w['user_tokens']} user / +{w['answer_tokens']} answer "
                         f"tokens a turn, seed {w['seed']}"),
            ("layout", f"{_layout_text(SYNTHETIC_LAYOUT)} = {format_bytes(r['block_bytes'])} a block"),
            *[(f"{name} tier", f"{t['device']}, {format_bytes(t['capacity_bytes'])} ({t['slots']} blocks)")
              for name, t in tiers.items()],
        ]),
        "",
        *table([
            ("requests", f"{r['requests']:,}"),
            ("prompt tokens", f"{prompt:,}"),
            ("  from the store", f"{r['served_tokens']:,} ({pct(r['served_tokens'] / prompt if prompt else None)}), "
                                 f"{r['verified_blocks']:,} blocks verified"),
            ("  computed", f"{r['computed_tokens']:,} (synthetic prefill)"),
        ]),
        *([f"  {r['unstored_requests']:,} requests could not store their new blocks; the first refusal was:",
           f"  {r['first_capacity_error']}"] if r["unstored_requests"] else []),
        "",
        *table([("tier", "looked up", "hits", "hit rate", "evictions", "used")]
               + [(name, f"{t['hits'] + t['misses']:,}", f"{t['hits']:,}", pct(r["hit_rate"][name]),
                   f"{t['evictions']:,}", f"{t['used_slots']:,} / {t['slots']:,} blocks")
                  for name, t in tiers.items()]),
        f"  (a lookup reaches a tier only when the faster ones missed; {r['dropped_blocks']:,} blocks dropped "
        "from the last tier)",
        "",
        "bytes moved",
        *["  " + line for line in table([(d.replace("->", " -> "), format_bytes(n)) for d, n in r["bytes_moved"].items()])],
        "",
        f"replayed in {r['elapsed_s']:.2f} s",
    ]
    return "\n".join(lines)


def _layout_text(layout: KVLayout) -> str:
    return (f"{layout.num_layers} layers x {layout.kv_factor} x {layout.block_tokens} tokens x "
            f"{layout.num_kv_heads} heads x {layout.head_dim} dims, {dtype_name(layout.dtype)}")
