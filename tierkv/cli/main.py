"""The `tierkv` command: `tierkv info` (what this machine offers), `tierkv demo` (the store at work)
and `tierkv top` (stores sharing GPU budgets, live).

Mistakes on the command line or in the configuration end with one line saying what to fix and
exit status 2, never a traceback: a traceback is for bugs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any, NoReturn, TypeVar

from tqdm import tqdm

from .. import __version__
from ..config import StoreConfig, apply_log_level, parse_bytes, parse_float, parse_int
from ..errors import ConfigError, TierKVError
from ..layout import KVLayout, dtype_name
from ..store import BlockStore
from ..tiers.elastic.budget import BudgetError, BudgetSnapshot, list_budgets, read_budget
from .machine import MachineInfo, collect
from .workload import SYNTHETIC_LAYOUT, SYNTHETIC_NAMESPACE, ChatWorkload, ReplayResult, check_fits, replay

# The default demo overflows both tiers: its 48 conversations need about 4300 blocks (268 MiB),
# so blocks are demoted from device to host and dropped from host, and it runs in seconds.
DEMO_DEVICE_BYTES = "64MiB"
DEMO_HOST_BYTES = "128MiB"


class UsageError(Exception):
    """A mistake on the command line; its message says what to change."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: error: {message} (see '{self.prog} --help')")


T = TypeVar("T")
_ARG = "value"


def _arg(parse: Callable[..., T], **bounds: Any) -> Callable[[str], T]:
    """An argparse `type=` from one of the shared parsers of `tierkv.config`: `parse(text, ..., **bounds)`,
    its `ConfigError` turned into argparse's error (argparse names the option itself)."""

    def convert(text: str) -> T:
        try:
            return parse(text, _ARG, **bounds)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix(f"{_ARG}: ")) from None

    convert.__name__ = parse.__name__
    return convert


_SIZE = _arg(parse_bytes)
_POSITIVE_INT = _arg(parse_int, minimum=1)
_NON_NEGATIVE_INT = _arg(parse_int, minimum=0)
_POSITIVE_FLOAT = _arg(parse_float, above=0)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tierkv",
        description="tierkv: a tiered KV-cache store for LLM inference (GPU, pinned host memory, NVMe).",
        epilog="Store settings come from TIERKV_* environment variables (TIERKV_DEVICE_BYTES, "
        "TIERKV_HOST_BYTES, TIERKV_DEVICE, TIERKV_PIN_HOST, ...), over a YAML/JSON file named by TIERKV_CONFIG; "
        "'tierkv info' shows the ones in effect. TIERKV_LOG_LEVEL (e.g. debug) sets the log level.",
    )
    parser.add_argument("--version", action="version", version=f"tierkv {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = commands.add_parser(
        "info",
        help="show GPUs, CUDA driver, pinned memory, kvikio/GDS and the store config in effect",
        description="Report what this machine offers tierkv and the store configuration in effect. "
        "Safe on machines without a GPU: nothing here opens a file through kvikio or needs a driver.",
    )
    info.add_argument("--json", action="store_true", help="print one JSON object instead of a table")

    demo = commands.add_parser(
        "demo",
        help="a multi-turn chat on a small model, with and without tierkv: time to first token, prefill saved",
        description="Run a multi-turn chat about a long document on a transformers model twice, without and "
        "with tierkv, and report time to first token, prefill tokens saved and hits per tier. Without "
        "--model it builds a small Llama-architecture model with RANDOM weights (the replies are "
        "gibberish; the timings and reuse are real) and a real tokenizer shipped by mistral-common. "
        "Needs the 'hf' extra: pip install 'tierkv[hf]'.",
    )
    demo.add_argument("--model", metavar="PATH", default=None, help="a local transformers model directory to run instead")
    demo.add_argument("--turns", type=_POSITIVE_INT, default=4, help="chat turns (default %(default)s, at most 6)")
    demo.add_argument("--new-tokens", type=_POSITIVE_INT, default=16, help="tokens generated per reply (default %(default)s)")
    demo.add_argument("--device", choices=("cpu", "cuda"), default=None,
                      help="where the model runs (default: cuda when available)")
    demo.add_argument("--device-bytes", type=_SIZE, default=None, metavar="SIZE",
                      help="device tier capacity (default 1MiB: some hits come from host)")
    demo.add_argument("--host-bytes", type=_SIZE, default=None, metavar="SIZE", help="host tier capacity (default 256MiB)")
    demo.add_argument("--seed", type=_NON_NEGATIVE_INT, default=0, help="seed of the random demo model (default %(default)s)")

    replay = commands.add_parser(
        "replay",
        help="replay a synthetic multi-turn chat workload through a store and report hits, traffic and evictions",
        description="Replay a built-in multi-turn chat workload (users sharing system prompts, conversations "
        "growing turn by turn) through a BlockStore on the fastest device here. Each request loads its "
        "stored prefix and computes the rest; the KV is SYNTHETIC (derived from the token prefix, no model "
        "runs), which lets every served block be checked bit-exact. The default sizes overflow the device "
        "tier (demotion to host) and the host tier (drops).",
    )
    replay.add_argument("--users", type=_POSITIVE_INT, default=ChatWorkload.users, help="conversations (default %(default)s)")
    replay.add_argument("--turns", type=_POSITIVE_INT, default=ChatWorkload.turns,
                        help="prompts per conversation (default %(default)s)")
    replay.add_argument("--device-bytes", type=_SIZE, default=None, metavar="SIZE",
                        help=f"device tier capacity, e.g. 64MiB (default {DEMO_DEVICE_BYTES}, or TIERKV_DEVICE_BYTES)")
    replay.add_argument("--host-bytes", type=_SIZE, default=None, metavar="SIZE",
                        help=f"host tier capacity, e.g. 1GiB (default {DEMO_HOST_BYTES}, or TIERKV_HOST_BYTES)")
    replay.add_argument("--seed", type=_NON_NEGATIVE_INT, default=ChatWorkload.seed, help="workload seed (default %(default)s)")
    replay.add_argument("--json", action="store_true", help="print one JSON object instead of a report")

    top = commands.add_parser(
        "top",
        help="stores sharing GPU budgets: mapped bytes, min/max, device hit rates, shrink requests",
        description="Show every store on a shared GPU budget (StoreConfig gpu_budget_name), refreshed "
        "until Ctrl-C, the way nvidia-smi shows processes: the bytes its elastic device tier maps, its "
        "min/max, the bytes its blocks fill, its device hit rate, what shrink requests demoted, and a "
        "pending request. Counters are at most about a second old.",
    )
    top.add_argument("budgets", nargs="*", metavar="BUDGET", help="budget names (default: every budget on this machine)")
    top.add_argument("--once", action="store_true", help="print the table once and exit")
    top.add_argument("--interval", type=_POSITIVE_FLOAT, default=1.0, metavar="SECONDS",
                     help="refresh period (default %(default)s)")
    top.add_argument("--json", action="store_true", help="print one JSON object and exit")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as e:
        print(e, file=sys.stderr)
        return 2
    except SystemExit as e:  # --help and --version
        return int(e.code or 0)
    try:
        if args.command != "info":  # info reports a bad TIERKV_LOG_LEVEL with the config in effect
            apply_log_level()
        if args.command == "info":
            return _info(args)
        if args.command == "top":
            return _top(args)
        if args.command == "demo":
            return _model_demo(args)
        return _replay(args)
    except TierKVError as e:
        print(f"tierkv {args.command}: error: {e}", file=sys.stderr)
        return 2


# -- info --------------------------------------------------------------------------


def _info(args: argparse.Namespace) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info.to_dict(), indent=2))
    else:
        print(format_info(info))
    return 0


def _yes_no(available: bool) -> str:
    return "yes" if available else "no"


def format_info(info: MachineInfo) -> str:
    gpus = [f"{g.index}: {g.name}, {format_bytes(g.memory_bytes)}, compute capability {g.compute_capability}"
            for g in info.gpus] or ["none visible to torch"]
    rows = [
        ("tierkv", __version__),
        ("python", f"{info.python} on {info.platform}, {info.cpu_count} CPUs"),
        ("torch", f"{info.torch_version} ({info.torch_build} build)"),
        ("GPUs", gpus[0]),
        *[("", g) for g in gpus[1:]],
        ("CUDA driver", f"{_yes_no(info.cuda_driver.available)}: {info.cuda_driver.detail}"),
        ("pinned memory", f"{_yes_no(info.pinned_memory.available)}: {info.pinned_memory.detail}"),
        ("kvikio / GDS", f"{_yes_no(info.kvikio.available)}: {info.kvikio.detail}"),
        ("device tier", info.device_tier),
        ("disk tier I/O", info.disk_io),
        ("copy backend", f"{info.transfer_paths['backend']} (NVRTC kernels + copy-engine DMA on CUDA, torch otherwise)"),
        *[(f"  {op}", ", ".join(f"{d}: {'/'.join(sorted(set(by_size.values())))}" for d, by_size in dirs.items()))
          for op, dirs in info.transfer_paths.items() if isinstance(dirs, dict)],
    ]
    lines = _table(rows)
    lines.append("config in effect (defaults overridden by TIERKV_* variables):")
    if info.config is None:
        lines.append(f"  error: {info.config_error}")
    else:
        lines += ["  " + line for line in _table([(k, _config_value(k, v)) for k, v in info.config.items()])]
    return "\n".join(lines)


def _config_value(name: str, value: Any) -> str:
    if value is None:
        return "not set"
    if name.endswith("_bytes"):
        return f"{format_bytes(value)} ({value} bytes)"
    return str(value)


# -- demo --------------------------------------------------------------------------


def demo_config(device_bytes: int | None, host_bytes: int | None) -> StoreConfig:
    """Demo defaults, overridden by TIERKV_* variables, overridden by the command's flags."""
    try:
        config = StoreConfig.from_env(base={"device_bytes": DEMO_DEVICE_BYTES, "host_bytes": DEMO_HOST_BYTES})
    except ConfigError as e:
        raise ConfigError(f"in the TIERKV_* environment variables: {e}") from None
    flags = {k: v for k, v in (("device_bytes", device_bytes), ("host_bytes", host_bytes)) if v is not None}
    return StoreConfig.from_dict({**config.to_dict(), **flags}) if flags else config


def _model_demo(args: argparse.Namespace) -> int:
    """The real demo. transformers is imported here only: `tierkv` itself never imports an engine."""
    try:
        from tierkv_connectors.hf.demo import DemoOptions, run_demo
    except ImportError as e:
        raise TierKVError(
            f"the demo runs a transformers model, which needs the 'hf' extra ({e.name or e} is missing): "
            "pip install 'tierkv[hf]'; 'tierkv replay' runs the store alone, without a model"
        ) from None
    sizes = {k: v for k, v in (("device_bytes", args.device_bytes), ("host_bytes", args.host_bytes)) if v is not None}
    try:
        options = DemoOptions(model_path=args.model, turns=args.turns, new_tokens=args.new_tokens,
                              device=args.device, seed=args.seed, **sizes)
    except ValueError as e:
        raise TierKVError(str(e)) from None
    run_demo(options)
    return 0


def _replay(args: argparse.Namespace) -> int:
    workload = ChatWorkload(users=args.users, turns=args.turns, seed=args.seed)
    config = demo_config(args.device_bytes, args.host_bytes)
    with BlockStore(SYNTHETIC_LAYOUT, SYNTHETIC_NAMESPACE, config) as store:
        check_fits(store, workload)
        requests = tqdm(workload.requests(), total=workload.num_requests, desc="replaying", unit="req",
                        disable=None, leave=False)
        result = replay(store, requests)
        stats = store.stats()
        report = demo_report(workload, config, result, stats)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_demo(report))
    return 0


def hit_rates(stats: dict[str, Any]) -> dict[str, float | None]:
    """Per tier: hits / blocks looked up in it (a lookup reaches a tier only if faster ones missed)."""
    rates: dict[str, float | None] = {}
    for name, t in stats["tiers"].items():
        looked_up = t["hits"] + t["misses"]
        rates[name] = t["hits"] / looked_up if looked_up else None
    return rates


def demo_report(workload: ChatWorkload, config: StoreConfig, result: ReplayResult, stats: dict[str, Any]) -> dict[str, Any]:
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


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def format_demo(r: dict[str, Any]) -> str:
    w, tiers = r["workload"], r["stats"]["tiers"]
    prompt = r["prompt_tokens"]
    lines = [
        "tierkv demo: a synthetic multi-turn chat workload served from a BlockStore",
        "  KV is SYNTHETIC: each block's bytes are derived from its token prefix (no model runs);",
        "  every block served from the store was checked bit-exact against it.",
        "",
        *_table([
            ("workload", f"{w['users']} users x {w['turns']} turns, {w['system_prompts']} shared system prompts of "
                         f"{w['system_tokens']} tokens, +{w['user_tokens']} user / +{w['answer_tokens']} answer "
                         f"tokens a turn, seed {w['seed']}"),
            ("layout", f"{_layout_text(SYNTHETIC_LAYOUT)} = {format_bytes(r['block_bytes'])} a block"),
            *[(f"{name} tier", f"{t['device']}, {format_bytes(t['capacity_bytes'])} ({t['slots']} blocks)")
              for name, t in tiers.items()],
        ]),
        "",
        *_table([
            ("requests", f"{r['requests']:,}"),
            ("prompt tokens", f"{prompt:,}"),
            ("  from the store", f"{r['served_tokens']:,} ({_pct(r['served_tokens'] / prompt if prompt else None)}), "
                                 f"{r['verified_blocks']:,} blocks verified"),
            ("  computed", f"{r['computed_tokens']:,} (synthetic prefill)"),
        ]),
        *([f"  {r['unstored_requests']:,} requests could not store their new blocks; the first refusal was:",
           f"  {r['first_capacity_error']}"] if r["unstored_requests"] else []),
        "",
        *_table([("tier", "looked up", "hits", "hit rate", "evictions", "used")]
                + [(name, f"{t['hits'] + t['misses']:,}", f"{t['hits']:,}", _pct(r["hit_rate"][name]),
                    f"{t['evictions']:,}", f"{t['used_slots']:,} / {t['slots']:,} blocks")
                   for name, t in tiers.items()]),
        f"  (a lookup reaches a tier only when the faster ones missed; {r['dropped_blocks']:,} blocks dropped "
        "from the last tier)",
        "",
        "bytes moved",
        *["  " + line for line in _table([(d.replace("->", " -> "), format_bytes(n)) for d, n in r["bytes_moved"].items()])],
        "",
        f"replayed in {r['elapsed_s']:.2f} s",
    ]
    return "\n".join(lines)


def _layout_text(layout: KVLayout) -> str:
    return (f"{layout.num_layers} layers x {layout.kv_factor} x {layout.block_tokens} tokens x "
            f"{layout.num_kv_heads} heads x {layout.head_dim} dims, {dtype_name(layout.dtype)}")


# -- top ---------------------------------------------------------------------------


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


def _top(args: argparse.Namespace) -> int:
    try:
        while True:
            snaps = _budgets(args.budgets)
            if args.json:
                print(json.dumps([top_report(s) for s in snaps], indent=2))
                return 0
            if args.once:
                print(format_top(snaps))
                return 0
            print("\033[H\033[2J" + format_top(snaps), flush=True)
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
                  format_bytes(m.used_bytes), f"{m.blocks:,}", _pct(m.hit_rate), format_bytes(m.demoted_bytes),
                  "-" if m.target_bytes is None else format_bytes(m.target_bytes),
                  "alive" if m.alive else "dead: freed at the next change")
                 for m in s.members]
        lines += ["  " + line for line in _table(rows)] + [""]
    return "\n".join(lines).rstrip()


# -- formatting --------------------------------------------------------------------


def format_bytes(n: int) -> str:
    """Binary units, as people read memory sizes: 65536 -> '64.0 KiB'."""
    value, unit = float(n), "B"
    for larger in ("KiB", "MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, larger
    return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned columns; the last column is not padded."""
    widths = [max(len(row[i]) for row in rows if i < len(row)) for i in range(max(len(r) for r in rows))]
    return ["  ".join(cell.ljust(widths[i]) if i < len(row) - 1 else cell for i, cell in enumerate(row)).rstrip()
            for row in rows]
