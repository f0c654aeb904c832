"""What the transformers connector reads from a model: the K/V layout, the identity, and what it refuses."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tierkv import BlockStore, LayoutMismatchError, StoreConfig  # noqa: E402
from tierkv_connectors.hf import (  # noqa: E402
    TierKV,
    TierKVCache,
    UnsupportedModelError,
    describe_model,
    fingerprint_weights,
    namespace_for,
)

_COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=512, pad_token_id=0)


def llama(seed: int = 0, **overrides: object) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**_COMMON, "num_key_value_heads": 2, **overrides})).eval()


@pytest.mark.parametrize(
    ("model_class", "config", "heads", "head_dim"),
    [
        ("LlamaForCausalLM", transformers.LlamaConfig(num_key_value_heads=2, **_COMMON), 2, 16),
        ("Qwen3ForCausalLM", transformers.Qwen3Config(num_key_value_heads=1, head_dim=32, **_COMMON), 1, 32),
        ("GPTNeoXForCausalLM", transformers.GPTNeoXConfig(**_COMMON), 4, 16),
        ("Phi3ForCausalLM", transformers.Phi3Config(num_key_value_heads=2, **_COMMON), 2, 16),
    ],
)
def test_layout_is_read_from_the_model(model_class: str, config: object, heads: int, head_dim: int) -> None:
    model = getattr(transformers, model_class)(config).eval()
    namespace, layout = namespace_for(model, block_tokens=8)
    assert (layout.num_layers, layout.kv_factor, layout.num_kv_heads, layout.head_dim) == (2, 2, heads, head_dim)
    assert layout.block_tokens == 8 and layout.dtype == torch.float32
    assert namespace.model == model_class  # built from a config: no path, so the class names it
    assert describe_model(model.to(torch.bfloat16)).dtype == torch.bfloat16


def test_fingerprint_follows_weights_and_config() -> None:
    base = fingerprint_weights(llama(0))
    assert fingerprint_weights(llama(0)) == base
    assert fingerprint_weights(llama(1)) != base
    nudged = llama(0)
    with torch.no_grad():
        nudged.model.layers[1].self_attn.k_proj.weight.add_(1e-3)
    assert fingerprint_weights(nudged) != base
    assert fingerprint_weights(llama(0, rms_norm_eps=1e-5)) != base  # same weights, different numbers out
    assert fingerprint_weights(llama(0, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})) != base
    quiet = llama(0)
    quiet.config.use_cache = False  # an API switch, not a change of KV
    assert fingerprint_weights(quiet) == base


def test_fingerprint_samples_reach_the_last_element_of_huge_tensors() -> None:
    model = llama(0)
    # 2**25 + 4 elements: float32 cannot hold 2**25 + 3, so a float linspace would index past the end.
    model.register_buffer("big", torch.zeros(2**25 + 4, dtype=torch.uint8))
    before = fingerprint_weights(model)
    model.big[-1] = 1
    assert fingerprint_weights(model) != before


def test_two_models_never_share_a_key_chain() -> None:
    (ns_a, layout_a), (ns_b, layout_b) = namespace_for(llama(0)), namespace_for(llama(1))
    assert layout_a == layout_b
    assert ns_a.digest(layout_a) != ns_b.digest(layout_b)
    named, _ = namespace_for(llama(0), name="org/model", weights_fingerprint="sha256:abc", adapter="lora-x")
    assert (named.model, named.weights_fingerprint, named.adapter) == ("org/model", "sha256:abc", "lora-x")


def test_fingerprint_refuses_offloaded_weights() -> None:
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(num_key_value_heads=2, **_COMMON))
    with pytest.raises(ValueError, match="meta device.*weights_fingerprint="):
        fingerprint_weights(model)


def _refused(build: object) -> str:
    model = build().eval()
    with pytest.raises(UnsupportedModelError) as info:
        TierKV(model)
    return str(info.value)


def test_sliding_window_layers_are_described_not_refused() -> None:
    mistral = transformers.MistralForCausalLM(transformers.MistralConfig(num_key_value_heads=2, sliding_window=32, **_COMMON))
    assert describe_model(mistral.eval()).layer_windows == (32, 32)
    gemma2 = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(num_key_value_heads=2, head_dim=16, sliding_window=32,
                                                                      **_COMMON))
    kv = describe_model(gemma2.eval())
    assert kv.layer_windows == (32, None) and kv.sliding and kv.window(1) is None
    assert describe_model(llama()).layer_windows == (None, None)


def test_state_space_layers_are_refused() -> None:
    message = _refused(lambda: transformers.MambaForCausalLM(
        transformers.MambaConfig(vocab_size=256, hidden_size=32, num_hidden_layers=2, state_size=4)))
    assert "Mamba-style" in message and "not per-token K/V" in message


def test_multi_head_latent_attention_is_refused() -> None:
    config = transformers.DeepseekV3Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
        topk_group=1, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=8,
        first_k_dense_replace=1)
    message = _refused(lambda: transformers.DeepseekV3ForCausalLM(config))
    assert "keys of shape" in message and "values of shape" in message and "latent attention" in message


def test_encoder_decoder_and_multimodal_models_are_refused() -> None:
    message = _refused(lambda: transformers.T5ForConditionalGeneration(
        transformers.T5Config(vocab_size=256, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)))
    assert "encoder-decoder" in message
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=28, patch_size=14)
    message = _refused(lambda: transformers.LlavaForConditionalGeneration(
        transformers.LlavaConfig(text_config=transformers.LlamaConfig(**_COMMON), vision_config=vision)))
    assert "multimodal" in message and "vision_config" in message


def test_not_a_transformers_model_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="PreTrainedModel"):
        describe_model(torch.nn.Linear(2, 2))


def test_cache_refuses_a_store_of_another_layout() -> None:
    model = llama(0)
    other, _ = namespace_for(model)
    _, layout = namespace_for(llama(0, num_key_value_heads=4))
    store = BlockStore(layout, other, StoreConfig(device_bytes="1MiB", host_bytes="1MiB", device="cpu"))
    with pytest.raises(LayoutMismatchError, match="num_kv_heads: 4 != 2"):
        TierKVCache(store, describe_model(model), torch.ones((1, 4), dtype=torch.long))
