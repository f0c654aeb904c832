"""Sliding-window and chunked-attention models are served: a stored prefix rebuilds exactly the cache plain
`generate` holds, and greedy tokens with reuse are the tokens without.

A layer with a window of W keeps the last W - 1 tokens (`DynamicSlidingWindowLayer`); blocks
carry every layer's KV, so the rebuilt layer takes the last W - 1 columns before the prefix end,
and its new KV is recorded as it is computed so that it can be stored. The window (13 tokens)
is shorter than the prompts and not a block multiple, so every case crosses it. Models with a
recurrent state stay refused, with the reason.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer  # noqa: E402

from tierkv import StoreConfig  # noqa: E402
from tierkv_connectors.hf import TierKV, UnsupportedModelError, cache_argument, describe_model  # noqa: E402
from tierkv_connectors.hf.zoo import WINDOW, build, check_reuse  # noqa: E402

# (model_type, class, config fields beyond the zoo's tiny ones that turn the window on)
SLIDING = [
    ("mistral", "MistralForCausalLM", {}),
    ("qwen2", "Qwen2ForCausalLM", {"use_sliding_window": True, "max_window_layers": 1}),
    ("gemma2", "Gemma2ForCausalLM", {}),
    ("gemma3_text", "Gemma3ForCausalLM", {"layer_types": ["sliding_attention", "full_attention"]}),
    ("cohere2", "Cohere2ForCausalLM", {"layer_types": ["sliding_attention", "full_attention"]}),
    ("gpt_oss", "GptOssForCausalLM", {"layer_types": ["sliding_attention", "full_attention"]}),
    ("olmo3", "Olmo3ForCausalLM", {"layer_types": ["sliding_attention", "full_attention"]}),
    ("starcoder2", "Starcoder2ForCausalLM", {}),
    ("llama4_text", "Llama4ForCausalLM", {"layer_types": ["chunked_attention", "full_attention"], "no_rope_layers": [1, 0]}),
]


@pytest.mark.parametrize(("model_type", "class_name", "extra"), SLIDING, ids=[s[0] for s in SLIDING])
def test_sliding_window_model_is_token_identical_with_reuse(model_type: str, class_name: str, extra: dict) -> None:
    model = build(model_type, class_name, **extra)
    kv = describe_model(model)
    assert WINDOW in kv.layer_windows, f"{class_name}: no layer has the window: {kv.layer_windows}"
    with torch.no_grad():
        reused = check_reuse(model)  # cold, hit mid-prompt, repeat + stored reply, extension, padded batch
    assert reused[0] == 0 and all(reused[1:])


@pytest.mark.parametrize(("model_type", "class_name", "extra"), [SLIDING[2], SLIDING[8]], ids=["gemma2", "llama4_chunked"])
def test_rebuilt_cache_is_the_cache_plain_generate_holds(model_type: str, class_name: str, extra: dict) -> None:
    model = build(model_type, class_name, **extra)
    bt = 8
    prefix = torch.randint(3, 256, (1, 4 * bt), generator=torch.Generator().manual_seed(1))
    prompt = torch.cat([prefix, torch.randint(3, 256, (1, 5), generator=torch.Generator().manual_seed(2))], dim=1)
    layout = describe_model(model).layout(bt)
    config = StoreConfig(device_bytes=64 * layout.block_bytes, host_bytes=64 * layout.block_bytes, device="cpu")
    with TierKV(model, config, block_tokens=bt) as tkv, torch.no_grad():
        tkv.generate(prefix, max_new_tokens=1)  # stores the 4 blocks, computed by one forward of `prefix`
        cache = tkv.cache(prompt, save_prompt=False)
        assert cache.reused_tokens == [4 * bt]
        plain = transformers.DynamicCache(config=model.config)
        model(prefix, attention_mask=torch.ones_like(prefix), **cache_argument(plain), use_cache=True)
        assert [type(layer) for layer in cache.layers] == [type(layer) for layer in plain.layers]
        assert DynamicSlidingWindowLayer in {type(layer) for layer in cache.layers}
        for mine, theirs in zip(cache.layers, plain.layers):
            assert torch.equal(mine.keys, theirs.keys) and torch.equal(mine.values, theirs.values)
            assert mine.get_seq_length() == theirs.get_seq_length() == 4 * bt
            assert mine.get_mask_sizes(5) == theirs.get_mask_sizes(5)
            if isinstance(mine, DynamicSlidingWindowLayer):
                assert mine.keys.shape[-2] == WINDOW - 1  # the window, not the whole prefix
            else:
                assert type(mine) is DynamicLayer and mine.keys.shape[-2] == 4 * bt


def test_reply_of_a_sliding_model_is_stored_only_when_recorded() -> None:
    model = build("mistral", "MistralForCausalLM")
    bt = 8
    prompt = torch.randint(3, 256, (1, 20), generator=torch.Generator().manual_seed(3))
    layout = describe_model(model).layout(bt)
    config = StoreConfig(device_bytes=64 * layout.block_bytes, host_bytes=64 * layout.block_bytes, device="cpu")
    with TierKV(model, config, block_tokens=bt) as tkv, torch.no_grad():
        cache = tkv.cache(prompt, record_reply=False)
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), **cache_argument(cache), max_new_tokens=12,
                             do_sample=False)
        with pytest.raises(ValueError, match="record_reply=False"):
            cache.save_sequences(out)
        assert tkv.store.match(out[0]) == 16  # the prompt's blocks were stored at prefill all the same
        cache = tkv.cache(prompt)
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), **cache_argument(cache), max_new_tokens=12,
                             do_sample=False)
        assert cache.save_sequences(out) == 1  # 31 tokens with KV: blocks 16..24 new
        assert tkv.store.match(out[0]) == 24


RECURRENT = [
    ("mamba", "MambaForCausalLM", "Mamba-style"),
    ("jamba", "JambaForCausalLM", "state"),
    ("bamba", "BambaForCausalLM", "state"),
    ("falcon_h1", "FalconH1ForCausalLM", "state"),
    ("qwen3_next", "Qwen3NextForCausalLM", "state"),
    ("rwkv", "RwkvForCausalLM", "state"),
]


@pytest.mark.parametrize(("model_type", "class_name", "reason"), RECURRENT, ids=[r[0] for r in RECURRENT])
def test_models_with_recurrent_state_stay_refused(model_type: str, class_name: str, reason: str) -> None:
    with pytest.raises(UnsupportedModelError, match=reason) as info:
        TierKV(build(model_type, class_name))  # the zoo's build already refuses what check_config refuses
    assert class_name in str(info.value)
    config = transformers.AutoConfig.for_model(model_type)
    with torch.device("meta"), pytest.raises(UnsupportedModelError, match=reason):
        TierKV(getattr(transformers, class_name)(config))  # and TierKV on the default config, by itself
