"""`tierkv demo`: the CLI side of the transformers demo (`tierkv_connectors.hf.demo`).

Everything a user can get wrong is checked here before transformers is imported (which alone
takes seconds): a --model path that does not exist, a --plot file that cannot be written, a
bad TIERKV_* variable. What goes wrong later (a directory that is no model) comes back from the
demo as a `TierKVError` with one line, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
from pathlib import Path

from ..errors import TierKVError
from .main import DEMO_DEVICE_BYTES, DEMO_HOST_BYTES, store_config_from_env


def _check_plot_target(path: str) -> None:
    if importlib.util.find_spec("matplotlib") is None:
        raise TierKVError("--plot needs matplotlib: pip install matplotlib")
    if not path.lower().endswith(".png"):
        raise TierKVError(f"--plot {path}: the picture is a PNG, so the file name must end in .png")
    parent = Path(path).resolve().parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise TierKVError(f"--plot {path}: cannot write into {parent}")


def run_demo_command(args: argparse.Namespace) -> int:
    if args.model is not None and not Path(args.model).exists():
        raise TierKVError(f"--model {args.model}: no such file or directory "
                          "(give a local transformers model directory or a .gguf file)")
    if args.plot is not None:
        _check_plot_target(args.plot)
    config = store_config_from_env({"device_bytes": DEMO_DEVICE_BYTES, "host_bytes": DEMO_HOST_BYTES},
                                   {"device_bytes": args.device_bytes, "host_bytes": args.host_bytes})
    try:
        from tierkv_connectors.hf.demo import DemoOptions, default_model_file, run_demo
    except ImportError as e:
        raise TierKVError(
            f"the demo runs a transformers model, which needs the 'hf' extra ({e.name or e} is missing): "
            "pip install 'tierkv[hf]'; 'tierkv replay' runs the store alone, without a model"
        ) from None
    if args.model is None and not args.random_weights:
        default_model_file()  # says how to install it, before the model code is loaded
    try:
        options = DemoOptions(model_path=args.model, random_weights=args.random_weights, turns=args.turns,
                              new_tokens=args.new_tokens, repeat=args.repeat, device=args.device, store=config,
                              seed=args.seed)
    except ValueError as e:
        raise TierKVError(str(e)) from None
    report = run_demo(options, quiet=args.json)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    if args.plot is not None:
        from .plots import plot_demo

        plot_demo(report.to_dict(), args.plot)
        if not args.json:
            print(f"plot: {args.plot}")
    return 0
