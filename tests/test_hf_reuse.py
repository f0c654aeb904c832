"""Prefix reuse in transformers: with reuse, greedy `generate` gives exactly the tokens it gives without.

Tiny random-weight models of several architectures are built in the test (no hub access). Each
reference is plain `model.generate` on the same inputs with no cache passed in.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tierkv import StoreConfig, TierKVError  # noqa: E402
from tierkv_connectors.hf import TierKV, cache_argument, describe_model  # noqa: E402

BT = 16  # tokens per block
VOCAB = 256
NEW = 8  # tokens generated per call

_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def build(arch: str, dtype: torch.dtype = torch.float32) -> transformers.PreTrainedModel:
    torch.manual_seed(1234)
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(num_key_value_heads=2, **_COMMON))
    elif arch == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(num_key_value_heads=2, **_COMMON))
    elif arch == "qwen3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(num_key_value_heads=2, head_dim=16, **_COMMON))
    elif arch == "mistral":
        # Mistral 7B v0.2 and later train without a sliding window; windowed ones are refused (test_hf_model).
        model = transformers.MistralForCausalLM(transformers.MistralConfig(num_key_value_heads=2, sliding_window=None, **_COMMON))
    elif arch == "gpt_neox":
        model = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(rotary_pct=0.5, **_COMMON))
    elif arch == "phi3":
        model = transformers.Phi3ForCausalLM(transformers.Phi3Config(num_key_value_heads=2, **_COMMON))
    else:
        raise AssertionError(arch)
    return model.to(dtype).eval()


ARCHS = ["llama", "qwen2", "qwen3", "mistral", "gpt_neox", "phi3"]


def tokens(seed: int, n: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n,), generator=gen)


def reference(model: transformers.PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    mask = torch.ones_like(ids) if mask is None else mask
    return model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)


def store_config(model: transformers.PreTrainedModel, device_blocks: int = 256, host_blocks: int = 256) -> StoreConfig:
    layout = describe_model(model).layout(BT)
    return StoreConfig(device_bytes=device_blocks * layout.block_bytes, host_bytes=host_blocks * layout.block_bytes, device="cpu")


def left_pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_tokens_identical_for_every_hit_length(arch: str) -> None:
    model = build(arch)
    with TierKV(model, store_config(model), block_tokens=BT) as tkv:
        a = tokens(1, 40)  # 2 full blocks + 8 tokens
        cases = [
            ("miss", a, 0),
            ("partial block after the hit", torch.cat([a[:32], tokens(2, 9)]), 32),
            ("whole prompt stored, a block multiple", a[:32], 31),
            ("prompt ending mid-block", a, 32),
            ("hit shorter than a stored prefix", torch.cat([a[:16], tokens(3, 20)]), 16),
        ]
        for label, prompt, expected_reuse in cases:
            ids = prompt.unsqueeze(0)
            out = tkv.generate(ids, max_new_tokens=NEW, generation_config=model.generation_config)
            assert out.reused_tokens == [expected_reuse], label
            assert out.computed_tokens == [len(prompt) - expected_reuse], label
            assert torch.equal(out.sequences, reference(model, ids)), f"{arch}: {label}: tokens differ with reuse"


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_logits_match_without_reuse(arch: str) -> None:
    model = build(arch)
    with TierKV(model, store_config(model), block_tokens=BT) as tkv:
        prompt = tokens(5, 53).unsqueeze(0)
        tkv.generate(prompt[:, :48], max_new_tokens=1)  # stores 3 blocks
        cache = tkv.cache(prompt)
        assert cache.get_seq_length() == 48
        with torch.no_grad():
            reused = model(prompt[:, 48:], **cache_argument(cache)).logits[0]
            full = model(prompt).logits[0, 48:]
        torch.testing.assert_close(reused, full, rtol=1e-5, atol=1e-5)


def test_bfloat16_logits_within_dtype_tolerance_and_tokens_identical() -> None:
    model = build("llama", torch.bfloat16)
    with TierKV(model, store_config(model), block_tokens=BT) as tkv:
        assert tkv.layout.dtype == torch.bfloat16
        prompt = tokens(6, 40).unsqueeze(0)
        tkv.generate(prompt[:, :32], max_new_tokens=1)
        out = tkv.generate(prompt, max_new_tokens=NEW)
        assert out.reused_tokens == [32]
        assert torch.equal(out.sequences, reference(model, prompt))
        cache = tkv.cache(prompt, save_prompt=False)
        with torch.no_grad():
            reused = model(prompt[:, 32:], **cache_argument(cache)).logits[0].float()
            full = model(prompt).logits[0, 32:].float()
        torch.testing.assert_close(reused, full, rtol=1.6e-2, atol=2e-2)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3"])
def test_batch_of_prompts_with_different_prefixes_and_hit_lengths(arch: str) -> None:
    model = build(arch)
    with TierKV(model, store_config(model), block_tokens=BT) as tkv:
        shared, other = tokens(10, 48), tokens(11, 32)
        tkv.generate(shared.unsqueeze(0), max_new_tokens=1)  # 3 blocks of `shared`
        tkv.generate(other.unsqueeze(0), max_new_tokens=1)  # 2 blocks of `other`
        rows = [
            torch.cat([shared, tokens(12, 5)]),  # 53 tokens, hit 48
            torch.cat([other[:16], tokens(13, 14)]),  # 30 tokens, hit 16
            torch.cat([shared[:32], tokens(14, 3)]),  # 35 tokens, hit 32
            tokens(15, 20),  # 20 tokens, miss
        ]
        ids, mask = left_pad(rows)
        out = tkv.generate(ids, mask, max_new_tokens=NEW)
        assert torch.equal(out.sequences, reference(model, ids, mask)), f"{arch}: batched reuse changed the tokens"
        # width 53: the cache length is min(pad + hit) = min(0+48, 23+16, 18+32, 33+0) = 33
        assert out.reused_tokens == [33, 10, 15, 0]
        assert out.computed_tokens == [20, 20, 20, 20]
        # Each row stored its own new full blocks: the miss row's first block is now a hit.
        assert tkv.store.match(rows[3]) == 16
        assert tkv.store.match(rows[0]) == 48


def test_batch_rows_all_hit_deeply() -> None:
    model = build("llama")
    with TierKV(model, store_config(model), block_tokens=BT) as tkv:
        a, b = tokens(20, 64), tokens(21, 40)
        tkv.generate(a.unsqueeze(0), max_new_tokens=1)
        tkv.generate(b.unsqueeze(0), max_new_tokens=1)
        ids, mask = left_pad([torch.cat([a, tokens(22, 3)]), torch.cat([b[:32], tokens(23, 2)])])
        out = tkv.generate(ids, mask, max_new_tokens=NEW)
        # widths 67 and 34: row 1 has 33 padding columns; cache length min(0 + 64, 33 + 32) = 64
        assert out.reused_tokens == [64, 31]
        assert torch.equal(out.sequences, reference(model, ids, mask))


def test_prefix_found_only_in_the_host_tier() -> None:
    model = build("llama")
    with TierKV(model, store_config(model, device_blocks=2, host_blocks=64), block_tokens=BT) as tkv:
        a, b = tokens(30, 64), tokens(31, 64)
        tkv.generate(a.unsqueeze(0), max_new_tokens=1)
        tkv.generate(b.unsqueeze(0), max_new_tokens=1)  # pushes every block of `a` down to the host tier
        before = tkv.store.stats()["tiers"]
        assert before["device"]["used_slots"] == 2
        prompt = torch.cat([a, tokens(32, 7)]).unsqueeze(0)
        out = tkv.generate(prompt, max_new_tokens=NEW)
        after = tkv.store.stats()["tiers"]
        assert out.reused_tokens == [64]
        assert after["host"]["hits"] - before["host"]["hits"] == 4
        assert after["device"]["hits"] == before["device"]["hits"]
        assert torch.equal(out.sequences, reference(model, prompt))


def test_store_generated_lets_the_next_turn_reuse_the_reply() -> None:
    model = build("qwen3")
    with TierKV(model, store_config(model), block_tokens=BT) as tkv:
        first = tokens(40, 30).unsqueeze(0)
        out = tkv.generate(first, max_new_tokens=20, store_generated=True)
        history = out.sequences  # 50 tokens; KV exists for the first 49
        assert tkv.store.match(history[0]) == 48
        turn2 = torch.cat([history[0], tokens(41, 6)]).unsqueeze(0)
        second = tkv.generate(turn2, max_new_tokens=NEW)
        assert second.reused_tokens == [48]
        assert torch.equal(second.sequences, reference(model, turn2))


def test_cache_passed_to_model_generate_directly() -> None:
    model = build("mistral")
    with TierKV(model, store_config(model), block_tokens=BT) as tkv:
        prompt = tokens(50, 37).unsqueeze(0)
        mask = torch.ones_like(prompt)
        model.generate(prompt, attention_mask=mask, **cache_argument(tkv.cache(prompt, mask)), max_new_tokens=2)
        cache = tkv.cache(prompt, mask)
        assert cache.reused_tokens == [32] and cache.stored_blocks == 0
        out = model.generate(prompt, attention_mask=mask, **cache_argument(cache), max_new_tokens=NEW, do_sample=False)
        assert torch.equal(out, reference(model, prompt))


def test_save_prompt_false_stores_nothing() -> None:
    model = build("llama")
    with TierKV(model, store_config(model), block_tokens=BT) as tkv:
        prompt = tokens(60, 40).unsqueeze(0)
        cache = tkv.cache(prompt, save_prompt=False)
        model.generate(prompt, attention_mask=torch.ones_like(prompt), **cache_argument(cache), max_new_tokens=2)
        assert tkv.store.match(prompt[0]) == 0 and cache.stored_blocks == 0


def test_tenants_do_not_share_blocks() -> None:
    model = build("llama")
    with TierKV(model, store_config(model), block_tokens=BT) as tkv:
        prompt = tokens(70, 40).unsqueeze(0)
        tkv.generate(prompt, max_new_tokens=1, tenant="alice")
        assert tkv.generate(prompt, max_new_tokens=1, tenant="bob").reused_tokens == [0]
        assert tkv.generate(prompt, max_new_tokens=1, tenant="alice").reused_tokens == [32]


def test_store_too_small_warns_and_generation_still_matches() -> None:
    model = build("llama")
    with TierKV(model, store_config(model, device_blocks=1, host_blocks=1), block_tokens=BT) as tkv:
        prompt = tokens(80, 60).unsqueeze(0)
        with pytest.warns(RuntimeWarning, match="stored no KV for row 0"):
            out = tkv.generate(prompt, max_new_tokens=NEW)
        assert out.stored_blocks == 0
        assert torch.equal(out.sequences, reference(model, prompt))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(num_beams=2), "beam search"),
        (dict(num_return_sequences=2, do_sample=True), "num_return_sequences=2"),
        (dict(cache_implementation="quantized"), "quantized"),
        (dict(use_cache=False), "use_cache=False"),
        (dict(prefill_chunk_size=8), "chunked prefill"),
        (dict(return_dict_in_generate=True), "return_dict_in_generate"),
    ],
)
def test_generation_settings_that_break_reuse_are_refused(change: dict, message: str) -> None:
    model = build("llama")
    with TierKV(model, store_config(model), block_tokens=BT) as tkv:
        config = transformers.GenerationConfig(**change)
        with pytest.raises(ValueError, match=message):
            tkv.generate(tokens(90, 20).unsqueeze(0), max_new_tokens=2, generation_config=config)


def test_cache_used_with_more_rows_than_it_was_built_for_is_refused() -> None:
    model = build("llama")
    with TierKV(model, store_config(model), block_tokens=BT) as tkv:
        prompt = tokens(91, 40).unsqueeze(0)
        tkv.generate(prompt, max_new_tokens=1)
        cache = tkv.cache(prompt)
        with pytest.raises(TierKVError, match="built for 1 prompt row"):
            model.generate(prompt, attention_mask=torch.ones_like(prompt), **cache_argument(cache), max_new_tokens=2,
                           do_sample=True, num_return_sequences=2)


@pytest.mark.parametrize("other_length", [36, 45])
def test_cache_used_with_another_prompt_is_refused_before_anything_is_stored(other_length: int) -> None:
    model = build("llama")
    with TierKV(model, store_config(model), block_tokens=BT) as tkv:
        built_for = tokens(94, 40).unsqueeze(0)
        tkv.generate(built_for[:, :32], max_new_tokens=1)
        cache = tkv.cache(built_for)
        other = torch.cat([built_for[0, :32], tokens(95, other_length - 32)]).unsqueeze(0)
        with pytest.raises(TierKVError, match=f"brings the cache to {other_length} columns.*built for a prompt of 40"):
            model.generate(other, attention_mask=torch.ones_like(other), **cache_argument(cache), max_new_tokens=8)
        assert tkv.store.match(other[0]) == tkv.store.match(built_for[0]) == 32


@pytest.mark.parametrize(
    ("mask_rows", "message"),
    [
        ([[1, 1, 1, 0], [1, 1, 1, 1]], "left padding"),
        ([[0, 1, 0, 1], [1, 1, 1, 1]], "left padding"),
        ([[0, 0, 0, 0], [1, 1, 1, 1]], "left padding"),
        ([[0, 2, 1, 1], [1, 1, 1, 1]], "only 0"),
    ],
)
def test_bad_attention_masks_are_refused(mask_rows: list[list[int]], message: str) -> None:
    model = build("llama")
    with TierKV(model, store_config(model), block_tokens=BT) as tkv:
        ids = tokens(92, 8).reshape(2, 4)
        with pytest.raises(ValueError, match=message):
            tkv.cache(ids, torch.tensor(mask_rows))
        with pytest.raises(ValueError, match="shape of input_ids"):
            tkv.cache(ids, torch.ones(2, 5, dtype=torch.long))
        with pytest.raises(TypeError, match="2-D integer tensor"):
            tkv.cache(ids[0])
        with pytest.raises(ValueError, match="at least one token"):
            tkv.cache(ids[:, :0])


def test_save_sequences_checks_its_input() -> None:
    model = build("llama")
    with TierKV(model, store_config(model), block_tokens=BT) as tkv:
        prompt = tokens(93, 20).unsqueeze(0)
        cache = tkv.cache(prompt)
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), **cache_argument(cache), max_new_tokens=4)
        with pytest.raises(ValueError, match="do not start with the prompts"):
            cache.save_sequences(torch.flip(out, dims=[1]))
        with pytest.raises(ValueError, match=r"\[1, tokens\] tensor"):
            cache.save_sequences(out[0])
        assert cache.save_sequences(out) == 0  # 23 tokens with KV: the one full block was stored at prefill


def test_the_prompt_pass_over_a_loaded_prefix_attends_lower_right_causally_only_where_that_is_the_mask() -> None:
    model = build("llama")
    prefix, rest = tokens(70, 4 * BT), tokens(71, 20)
    ids = torch.cat([prefix, rest])[None]
    with TierKV(model, store_config(model), block_tokens=BT) as tkv:
        tkv.generate(prefix[None], max_new_tokens=1)
        cache = tkv.cache(ids, torch.ones_like(ids))
        cache.release_loads()
        assert cache.reused_tokens == [4 * BT]
        attn = model.model.layers[0].self_attn
        q_len, k_len = ids.shape[1] - 4 * BT, ids.shape[1]
        g = torch.Generator().manual_seed(3)
        q = torch.randn(1, 4, q_len, 16, generator=g)
        k, v = torch.randn(1, 2, k_len, 16, generator=g), torch.randn(1, 2, k_len, 16, generator=g)
        got = cache.attention(attn, q, k, v, 0.25, 0.0, {})
        mask = torch.ones(q_len, k_len, dtype=torch.bool).tril(k_len - q_len)
        want = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                                attn_mask=mask, scale=0.25).transpose(1, 2)
        assert got is not None and torch.allclose(got, want, atol=1e-6)
        # Anything else is left to transformers' own sdpa and its mask.
        one = k_len - q_len + 1  # a decode step's keys
        assert cache.attention(attn, q[:, :, :1], k[:, :, :one], v[:, :, :one], None, 0.0, {}) is None
        assert cache.attention(attn, q, k, v, None, 0.0, {"softcap": 30.0}) is None
        assert cache.attention(attn, q, k, v, None, 0.0, {"sliding_window": 8}) is None
        padded = tkv.cache(*left_pad([torch.cat([prefix, rest]), torch.cat([prefix, rest[:-3]])]))
        padded.release_loads()
        assert padded.loaded and padded.attention(attn, q, k, v, None, 0.0, {}) is None, "a padded row needs the mask"
        fresh = tkv.cache(ids, torch.ones_like(ids), load=False)
        assert fresh.attention(attn, q, k, v, None, 0.0, {}) is None
