"""Prefix reuse across `generate` calls: questions about one long document.

The first call computes the whole prompt and stores its blocks; every later call finds the
document in the store and computes only its own question.

    python examples/hf_prefix_reuse.py                 # random-weight demo model, offline
    python examples/hf_prefix_reuse.py /path/to/model  # any local transformers model directory
"""

import sys
import time

import torch

from tierkv import StoreConfig
from tierkv_connectors.hf import TierKV
from tierkv_connectors.hf.demo import load_chat_model

DOCUMENT = " ".join(
    f"Entry {i}: the lighthouse ledger records a cargo of {cargo} unloaded on day {3 * i + 1} of the season."
    for i, cargo in enumerate(["copper", "figs", "indigo cloth", "salt", "timber", "a crated piano"] * 6)
)
QUESTIONS = ["Which cargo came on day 16?", "How many entries mention figs?", "What arrived last?"]


def main(model_path: str | None) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer, about = load_chat_model(model_path, device)
    print(f"model: {about}")
    with TierKV(model, StoreConfig(device_bytes="256MiB", host_bytes="1GiB", device=device)) as tkv:
        for question in QUESTIONS:
            ids = torch.tensor([tokenizer.encode_chat([("user", f"{DOCUMENT}\n\n{question}")])], device=device)
            start = time.perf_counter()
            out = tkv.generate(ids, max_new_tokens=12)
            seconds = time.perf_counter() - start
            reply = tokenizer.decode(out.sequences[0, ids.shape[1]:].tolist())
            print(f"{question!r}: prompt {out.prompt_tokens[0]} tokens, reused {out.reused_tokens[0]}, "
                  f"computed {out.computed_tokens[0]}, {seconds * 1e3:.0f} ms -> {reply[:40]!r}")
        print("store:", {name: tier["hits"] for name, tier in tkv.store.stats()["tiers"].items()}, "block hits per tier")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
