"""What tierkv must know about a transformers model before it may reuse the model's KV.

Three questions, answered once per model:

- Is the model's cache plain per-layer K/V, one row per token, that a stored prefix can rebuild?
  Sliding-window layers keep only the last window, linear-attention/Mamba layers keep a state
  that is not per token, KV-sharing layers keep nothing, MLA keeps keys and values of different
  shapes, and multimodal/encoder-decoder models have KV that does not follow from the token ids
  alone. All of these are refused with `UnsupportedModelError` naming the reason: a refusal is
  recoverable, wrong KV served as a hit is not.
- What shape is the KV? Read from a one-token probe forward rather than from config fields,
  because every architecture names heads and head sizes differently; the probe is right by
  construction.
- Who produced it? The `Namespace` holds the model's name, a fingerprint of its weights and
  config, and the adapter, so two models never share a key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
import xxhash
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from tierkv import KVLayout, Namespace, TierKVError

# Config entries that steer the Python API, not the numbers: changing them must not cost a miss.
_CONFIG_KEYS_IGNORED = frozenset(
    {"transformers_version", "use_cache", "output_attentions", "output_hidden_states", "return_dict"}
)

# Elements read from each parameter and buffer for the weights fingerprint.
FINGERPRINT_SAMPLES = 16


class UnsupportedModelError(TierKVError, ValueError):
    """The model's cache is not plain per-layer K/V of the prompt's tokens, so tierkv will not reuse it."""


@dataclass(frozen=True)
class ModelKV:
    """The K/V one decoder layer keeps per token, as the model really produces it."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    layer_devices: tuple[torch.device, ...]

    def layout(self, block_tokens: int) -> KVLayout:
        return KVLayout(
            num_layers=self.num_layers,
            kv_factor=2,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            dtype=self.dtype,
            block_tokens=block_tokens,
        )


def _refuse(model: PreTrainedModel, reason: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"tierkv cannot reuse the KV cache of {type(model).__name__}: {reason}")


_LAYER_REASONS = {
    "DynamicSlidingWindowLayer": "uses sliding-window attention; its cache keeps only the last window of tokens, "
    "so the KV of a whole prefix is never available to store",
    "LinearAttentionLayer": "is a linear-attention / state-space (Mamba-style) layer whose cache is a running state, "
    "not per-token K/V",
    "DummyLayer": "shares another layer's KV and keeps no cache of its own",
    "DynamicIndexedLayer": "keeps an indexer key cache besides K/V",
}


def _check_cache_structure(model: PreTrainedModel) -> None:
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        raise _refuse(
            model, "it is an encoder-decoder model; its decoder KV depends on the encoder input, not only on the prompt tokens"
        )
    media = sorted(k for k in getattr(type(config), "sub_configs", {}) if k != "text_config")
    if media:
        raise _refuse(
            model,
            f"it is a multimodal model (sub-configs {media}); the KV of media placeholder tokens depends on the media, "
            "which a key made of token ids cannot tell apart",
        )
    layers = DynamicCache(config=config).layers
    for i, layer in enumerate(layers):
        if type(layer) is not DynamicLayer:
            kind = type(layer).__name__
            detail = _LAYER_REASONS.get(kind, f"has a {kind} cache, not a plain per-layer K/V cache")
            window = getattr(layer, "sliding_window", None)
            suffix = f" (sliding_window={window})" if window is not None else ""
            raise _refuse(model, f"layer {i} {detail}{suffix}")


def describe_model(model: PreTrainedModel) -> ModelKV:
    """The model's per-layer K/V, or `UnsupportedModelError` saying why it cannot be reused.

    Runs one forward pass of a single token (under `no_grad`) to read the real shapes.
    """
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    _check_cache_structure(model)
    probe = DynamicCache()
    token = torch.zeros((1, 1), dtype=torch.long, device=model.device)
    with torch.no_grad():
        model(input_ids=token, past_key_values=probe, use_cache=True)
    if not probe.layers:
        raise _refuse(model, "its forward pass wrote nothing into the DynamicCache it was given")
    shapes = set()
    dtypes = set()
    devices = []
    for i, layer in enumerate(probe.layers):
        if type(layer) is not DynamicLayer or not layer.is_initialized or layer.keys is None or layer.values is None:
            raise _refuse(model, f"layer {i} did not store per-token K/V in the cache ({type(layer).__name__})")
        k, v = layer.keys, layer.values
        if k.shape != v.shape:
            raise _refuse(
                model,
                f"layer {i} keeps keys of shape {tuple(k.shape)} and values of shape {tuple(v.shape)}; "
                "a block holds K and V of one shape (multi-head latent attention is not supported)",
            )
        if k.dim() != 4 or k.shape[0] != 1 or k.shape[2] != 1:
            raise _refuse(model, f"layer {i} keeps K/V of shape {tuple(k.shape)} for one token, not [1, heads, 1, head_dim]")
        shapes.add((k.shape[1], k.shape[3]))
        dtypes.add(k.dtype)
        devices.append(k.device)
    if len(shapes) != 1 or len(dtypes) != 1:
        raise _refuse(
            model, f"its layers keep K/V of different (heads, head_dim) {sorted(shapes)} or dtypes {sorted(map(str, dtypes))}"
        )
    ((heads, head_dim),) = shapes
    return ModelKV(len(probe.layers), int(heads), int(head_dim), dtypes.pop(), tuple(devices))


def fingerprint_weights(model: PreTrainedModel) -> str:
    """A cheap 128-bit hex digest that changes when the model's weights or config change.

    Hashes the config (minus API-only switches), every parameter and buffer's name, shape and
    dtype, and the bytes of `FINGERPRINT_SAMPLES` evenly spaced elements of each. A fine-tune or
    merged adapter moves nearly every element of the matrices it touches, so samples catch it;
    a change confined to a few elements may not be caught: pass `weights_fingerprint=` yourself
    (e.g. the checkpoint's sha256) where that matters. Reads a few KiB, whatever the model size.
    """
    h = xxhash.xxh3_128()
    h.update(b"tierkv-hf-fingerprint-v1\0")
    config = {k: v for k, v in model.config.to_dict().items() if not k.startswith("_") and k not in _CONFIG_KEYS_IGNORED}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    tensors = sorted([*model.named_parameters(), *model.named_buffers()], key=lambda item: item[0])
    for name, tensor in tensors:
        if tensor.device.type == "meta":
            raise ValueError(
                f"cannot fingerprint {name}: it is on the meta device (offloaded weights); "
                "pass weights_fingerprint= explicitly, e.g. the checkpoint's sha256"
            )
        h.update(f"\0{name}\0{tuple(tensor.shape)}\0{tensor.dtype}\0".encode())
        flat = tensor.detach().reshape(-1)
        if flat.numel() == 0:
            continue
        # Integer arithmetic: a float linspace rounds past the end of tensors over 2**24 elements.
        k = min(FINGERPRINT_SAMPLES, flat.numel())
        picks = torch.arange(k, device=flat.device) * (flat.numel() - 1) // max(k - 1, 1)
        h.update(flat[picks].contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()


def model_name(model: PreTrainedModel) -> str:
    """The name a model's blocks are filed under: its path or hub id, else its class."""
    return getattr(model.config, "_name_or_path", "") or type(model).__name__


def model_namespace(
    model: PreTrainedModel,
    *,
    name: str | None = None,
    weights_fingerprint: str | None = None,
    adapter: str = "",
    tenant: str = "",
) -> Namespace:
    """The model's identity: name (default `model_name`), weights fingerprint (default computed), adapter."""
    fingerprint = fingerprint_weights(model) if weights_fingerprint is None else weights_fingerprint
    return Namespace(model=name or model_name(model), weights_fingerprint=fingerprint, adapter=adapter, tenant=tenant)


def namespace_for(
    model: PreTrainedModel,
    block_tokens: int = 16,
    *,
    name: str | None = None,
    weights_fingerprint: str | None = None,
    adapter: str = "",
    tenant: str = "",
) -> tuple[Namespace, KVLayout]:
    """The `Namespace` and `KVLayout` a `BlockStore` for `model` needs; refuses unsupported models."""
    layout = describe_model(model).layout(block_tokens)
    namespace = model_namespace(model, name=name, weights_fingerprint=weights_fingerprint, adapter=adapter, tenant=tenant)
    return namespace, layout
