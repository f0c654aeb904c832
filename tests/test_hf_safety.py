"""The three classes of issue 12: a prefix reported as reused must have been used, KV must depend on the
token and its position only, and a model is refused only for a reason it really has.

1. A model that drops or ignores the cache it was given (Phi-3 / PhiMoE with LongRoPE past
   `original_max_position_embeddings`, or any forward that does not write into the cache) never
   returns output while reporting reuse: `TierKV.generate` recomputes the prompt, a cache handed
   to `model.generate` / `model(...)` raises `PrefixNotUsedError`. LongRoPE's two regimes are
   kept apart, so a long prompt reuses long-regime KV only.
2. KV that depends on the sequence length (dynamic-NTK RoPE) is refused, as is KV that depends
   on later tokens (non-causal attention), found by a probe rather than a list.
3. Sub-configs that are parts of the text model (MPT's `attn_config`, DBRX's `ffn_config`) are
   not a modality: both are served, token-identical.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tierkv import StoreConfig  # noqa: E402
from tierkv_connectors.hf import (  # noqa: E402
    PrefixNotUsedError,
    TierKV,
    UnsupportedModelError,
    cache_argument,
    describe_model,
)
from tierkv_connectors.hf.compat import CACHE_KEYWORD  # noqa: E402
from tierkv_connectors.hf.zoo import build, check_reuse  # noqa: E402

BT = 16
NEW = 8
SWITCH = 32  # original_max_position_embeddings of the LongRoPE models
_TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
             initializer_range=0.2)


def longrope(factor: float = 4.0, **extra: float) -> dict:
    half = 8  # head_dim 16
    return {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * half, "long_factor": [factor] * half,
            "original_max_position_embeddings": SWITCH, **extra}


def phi3() -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    config = transformers.Phi3Config(**_TINY, original_max_position_embeddings=SWITCH, rope_parameters=longrope())
    return transformers.Phi3ForCausalLM(config).eval()


def phimoe() -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    config = transformers.PhimoeConfig(**_TINY, num_local_experts=4, num_experts_per_tok=2, sliding_window=None,
                                       original_max_position_embeddings=SWITCH,
                                       rope_parameters=longrope(short_mscale=1.0, long_mscale=1.2))
    return transformers.PhimoeForCausalLM(config).eval()


def tokens(seed: int, n: int) -> torch.Tensor:
    return torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(seed))


def plain(model: transformers.PreTrainedModel, ids: torch.Tensor, new: int = NEW) -> torch.Tensor:
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False)


def store_config(model: transformers.PreTrainedModel) -> StoreConfig:
    block = describe_model(model).layout(BT).block_bytes
    return StoreConfig(device_bytes=64 * block, host_bytes=64 * block, device="cpu")


# -- 1. the prefix reported as reused was used ------------------------------------------------------


@pytest.mark.parametrize("make", [phi3, phimoe], ids=["phi3", "phimoe"])
def test_longrope_prompt_past_the_switch_point_never_reports_an_unused_prefix(make) -> None:
    model = make()
    a = tokens(1, 80)
    with TierKV(model, store_config(model), block_tokens=BT) as tkv:
        tkv.generate(a[:20].unsqueeze(0), max_new_tokens=1)  # short regime: 1 block
        # 60 tokens > 32: long regime. The short-regime block is not its KV: no hit, computed whole.
        out = tkv.generate(a[:60].unsqueeze(0), max_new_tokens=NEW)
        assert out.reused_tokens == [0] and out.recomputed == ""
        assert torch.equal(out.sequences, plain(model, a[:60].unsqueeze(0)))
        # 50 tokens: 3 long-regime blocks stored (48 > 32), kept by prepare_inputs_for_generation.
        out = tkv.generate(a[:50].unsqueeze(0), max_new_tokens=NEW)
        assert out.reused_tokens == [48] and out.recomputed == ""
        assert torch.equal(out.sequences, plain(model, a[:50].unsqueeze(0)))
        # 40 tokens, long regime, hit of 32 <= 32: the model drops the cache. Before the fix this
        # computed the tail with no prefix and reported 32 reused; now the prompt is recomputed.
        with pytest.warns(RuntimeWarning, match="recomputed the whole prompt.*prepare_inputs_for_generation"):
            out = tkv.generate(torch.cat([a[:32], tokens(2, 8)]).unsqueeze(0), max_new_tokens=NEW)
        assert out.reused_tokens == [0] and "original_max_position_embeddings" in out.recomputed
        assert torch.equal(out.sequences, plain(model, torch.cat([a[:32], tokens(2, 8)]).unsqueeze(0)))


def test_longrope_short_prompt_reuse_survives_the_switch_during_decoding() -> None:
    model = phi3()
    a = tokens(3, 40)
    with TierKV(model, store_config(model), block_tokens=BT) as tkv:
        tkv.generate(a[:20].unsqueeze(0), max_new_tokens=1)
        # 24 tokens + 30 new crosses 32 while decoding: the model recomputes then, as plain generate does.
        out = tkv.generate(a[:24].unsqueeze(0), max_new_tokens=30, store_generated=True)
        assert out.reused_tokens == [16] and out.recomputed == ""
        assert torch.equal(out.sequences, plain(model, a[:24].unsqueeze(0), new=30))
        # Only blocks before the switch point were stored from the reply (short regime).
        assert tkv.store.match(out.sequences[0]) == SWITCH


def test_cache_dropped_inside_model_generate_raises_before_anything_is_computed() -> None:
    model = phi3()
    a = tokens(4, 48)
    with TierKV(model, store_config(model), block_tokens=BT) as tkv:
        tkv.generate(a[:40].unsqueeze(0), max_new_tokens=1)  # 2 long-regime blocks
        prompt = a.unsqueeze(0)
        cache = tkv.cache(prompt)
        assert cache.reused_tokens == [32] and cache.kv_regime == "longrope-long"
        with pytest.raises(PrefixNotUsedError, match=f"{CACHE_KEYWORD}=NoneType instead of the TierKVCache"):
            model.generate(prompt, attention_mask=torch.ones_like(prompt), **cache_argument(cache), max_new_tokens=2)
        assert not cache.prefilled and cache.bypassed and cache.stored_blocks == 0
        # Nothing stays armed: the next plain forward is not refused.
        plain(model, prompt, new=1)


class IgnoresCache(transformers.LlamaForCausalLM):
    """A model whose forward takes the cache and, once `ignore` is set, silently computes without it."""

    ignore = False

    def forward(self, *args, **kwargs):
        if self.ignore:
            kwargs.update(cache_argument(None))
        return super().forward(*args, **kwargs)


def test_forward_that_ignores_the_cache_is_caught() -> None:
    torch.manual_seed(0)
    model = IgnoresCache(transformers.LlamaConfig(**_TINY)).eval()
    prompt = tokens(5, 40).unsqueeze(0)
    with TierKV(model, store_config(model), block_tokens=BT) as tkv:
        model.ignore = True
        tkv.store.put(prompt[0, :32], torch.zeros((2, *tkv.layout.block_shape)))
        with pytest.warns(RuntimeWarning, match="did not write the prompt's KV"):
            out = tkv.generate(prompt, max_new_tokens=NEW)
        assert out.reused_tokens == [0] and out.recomputed
        assert torch.equal(out.sequences, plain(model, prompt))
        with pytest.raises(PrefixNotUsedError, match="did not write the prompt's KV"), torch.no_grad():
            model(prompt[:, 32:], **cache_argument(tkv.cache(prompt)))


def test_streamer_sees_the_prompt_once_when_the_prompt_is_recomputed() -> None:
    model = phi3()
    a = tokens(6, 48)

    class Recorder(transformers.generation.streamers.BaseStreamer):
        def __init__(self) -> None:
            self.puts: list[torch.Tensor] = []
            self.ended = 0

        def put(self, value: torch.Tensor) -> None:
            self.puts.append(value)

        def end(self) -> None:
            self.ended += 1

    with TierKV(model, store_config(model), block_tokens=BT) as tkv:
        tkv.generate(a[:40].unsqueeze(0), max_new_tokens=1)
        rec = Recorder()
        with pytest.warns(RuntimeWarning):
            out = tkv.generate(torch.cat([a[:32], tokens(7, 9)]).unsqueeze(0), max_new_tokens=4, streamer=rec)
        assert out.recomputed and rec.ended == 1
        assert len(rec.puts) == 1 + 4 and rec.puts[0].shape == (1, 41)  # the prompt once, then each new token


# -- 2. KV that depends on more than the token and its position ------------------------------------------


def test_dynamic_ntk_rope_is_refused() -> None:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**_TINY, rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    model = transformers.LlamaForCausalLM(config).eval()
    with pytest.raises(UnsupportedModelError, match=r"dynamic-NTK RoPE \(rope_type='dynamic'\).*depends on the length"):
        TierKV(model)


def test_dynamic_ntk_is_why_it_is_refused() -> None:
    """The refusal is real: a prefix stored from a short prompt is not what a long prompt computes."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**_TINY, "max_position_embeddings": 32},
                                      rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    model = transformers.LlamaForCausalLM(config).eval()
    ids = tokens(8, 64).unsqueeze(0)
    with torch.no_grad():
        short = model(ids[:, :16], use_cache=True).past_key_values.layers[0].keys
        long = model(ids, use_cache=True).past_key_values.layers[0].keys[:, :, :16]
    assert not torch.allclose(short, long, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_causal_attention_is_refused_by_the_probe(dtype: torch.dtype) -> None:
    # BertLMHeadModel without is_decoder attends both ways: a token's KV depends on the tokens after it.
    # In bf16 the probe allows for rounding noise (measured as a batch of two); that never excuses this.
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, is_decoder=False)
    with pytest.raises(UnsupportedModelError, match="depends on the tokens after it"):
        TierKV(transformers.BertLMHeadModel(config).to(dtype).eval())


# -- 3. sub-configs that are not a modality ---------------------------------------------------------------


@pytest.mark.parametrize(("model_type", "class_name"), [("mpt", "MptForCausalLM"), ("dbrx", "DbrxForCausalLM")])
def test_text_model_sub_configs_are_not_a_modality(model_type: str, class_name: str) -> None:
    model = build(model_type, class_name)
    assert sorted(type(model.config).sub_configs) in (["attn_config"], ["attn_config", "ffn_config"])
    with torch.no_grad():
        reused = check_reuse(model)
    assert all(reused[1:])


def test_a_real_modality_is_still_refused_and_named() -> None:
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=28, patch_size=14)
    text = transformers.LlamaConfig(**_TINY)
    model = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(text_config=text, vision_config=vision)).eval()
    message = r"multimodal model \(sub-configs \['vision_config'\], forward inputs \[.*'pixel_values'"
    with pytest.raises(UnsupportedModelError, match=message):
        TierKV(model)
