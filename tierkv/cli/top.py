"""`tierkv top`: stores sharing GPU budgets, refreshed like nvidia-smi (plain text into a pipe)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from ..tiers.elastic.budget import BudgetError, BudgetSnapshot, list_budgets, read_budget
from .text import format_bytes, pct, table

CLEAR_SCREEN = "\033[H\033[2J"


def _budgets(names: Sequence[str]) -> list[BudgetSnapshot]:
    if names:
        return [read_budget(n) for n in names]
    snaps = []
    for name in list_budgets():
        try:
            snaps.append(read_budget(name))
        except BudgetError:  # removed by its last member since the listing, or not ours
            continue
    return snaps


def run_top(args: argparse.Namespace) -> int:
    # Screen codes only for a terminal: into a pipe or a file each refresh is plain text under a time stamp.
    terminal = sys.stdout.isatty()
    try:
        while True:
            snaps = _budgets(args.budgets)
            if args.json:
                print(json.dumps([top_report(s) for s in snaps], indent=2))
                return 0
            if args.once:
                print(format_top(snaps))
                return 0
            if terminal:
                print(CLEAR_SCREEN + format_top(snaps), flush=True)
            else:
                print(f"-- {time.strftime('%Y-%m-%d %H:%M:%S')}\n{format_top(snaps)}\n", flush=True)
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0


def top_report(s: BudgetSnapshot) -> dict[str, Any]:
    return {"name": s.name, "total_bytes": s.total_bytes, "held_bytes": s.held_bytes, "free_bytes": s.free_bytes,
            "members": [{**asdict(m), "hit_rate": m.hit_rate} for m in s.members]}


def format_top(snaps: Sequence[BudgetSnapshot]) -> str:
    if not snaps:
        return "no GPU budgets on this machine (stores join one with gpu_budget_name in their StoreConfig)"
    lines: list[str] = []
    for s in snaps:
        live = sum(m.alive for m in s.members)
        lines.append(f"GPU budget {s.name}: {format_bytes(s.total_bytes)}, {format_bytes(s.held_bytes)} mapped by "
                     f"{live} store{'s' * (live != 1)}, {format_bytes(s.free_bytes)} free")
        rows = [("STORE", "PID", "MAPPED", "MIN", "MAX", "USED", "BLOCKS", "DEVICE HITS", "DEMOTED", "SHRINK TO", "STATE")]
        rows += [(m.label, str(m.pid), format_bytes(m.held_bytes), format_bytes(m.min_bytes), format_bytes(m.max_bytes),
                  format_bytes(m.used_bytes), f"{m.blocks:,}", pct(m.hit_rate), format_bytes(m.demoted_bytes),
                  "-" if m.target_bytes is None else format_bytes(m.target_bytes),
                  "alive" if m.alive else "dead: freed at the next change")
                 for m in s.members]
        lines += ["  " + line for line in table(rows)] + [""]
    return "\n".join(lines).rstrip()
