"""Many users, one long system prompt: it is computed once and reused by every later request.

The first request stores the system prompt's blocks. Then a batch of users with questions of
different lengths (left-padded) arrives; each row loads the shared prefix from the store and
the batch computes only the questions. The batch is also run without tierkv for comparison.

    python examples/hf_shared_system_prompt.py                 # random-weight demo model, offline
    python examples/hf_shared_system_prompt.py /path/to/model  # any local transformers model directory
"""

import sys
import time

import torch

from tierkv import StoreConfig
from tierkv_connectors.hf import TierKV
from tierkv_connectors.hf.demo import load_chat_model

SYSTEM = "You are the help desk of the Velmora harbour archive. " + " ".join(
    f"Rule {i}: {rule}" for i, rule in enumerate([
        "answer only from the ledgers", "quote the entry number", "never guess a date",
        "refer questions about fees to the granary clerk", "keep answers under three sentences",
    ] * 8, 1))
USERS = [
    "When does the archive open?",
    "Can I consult the 1788 ledger of copper cargoes from the northern quay?",
    "Who reads the granary copy?",
    "Is the lamp really lit once a year, and if so on which night and by whom?",
]


def left_pad(rows: list[list[int]], pad_id: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, mask


def main(model_path: str | None) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer, about = load_chat_model(model_path, device)
    print(f"model: {about}")
    prompts = [tokenizer.encode_chat([("system", SYSTEM), ("user", question)]) for question in USERS]
    ids, mask = left_pad(prompts, tokenizer.eos_id, device)
    with TierKV(model, StoreConfig(device_bytes="256MiB", host_bytes="1GiB", device=device)) as tkv:
        first = torch.tensor([prompts[0]], device=device)
        tkv.generate(first, max_new_tokens=1)  # the first user's request stores the system prompt
        start = time.perf_counter()
        out = tkv.generate(ids, mask, max_new_tokens=12)
        with_tierkv = time.perf_counter() - start
    start = time.perf_counter()
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.eos_id)
    without = time.perf_counter() - start
    for question, n, reused in zip(USERS, out.prompt_tokens, out.reused_tokens):
        print(f"{question[:40]!r:44} prompt {n} tokens, {reused} from the store")
    print(f"batch of {len(USERS)}: {with_tierkv * 1e3:.0f} ms with tierkv, {without * 1e3:.0f} ms without; "
          f"same tokens: {torch.equal(out.sequences, plain)}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
