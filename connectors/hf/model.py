"""What tierkv must know about a transformers model before it may reuse the model's KV.

Three questions, answered once per model:

- Is the model's cache per-layer K/V, one row per token, that a stored prefix can rebuild, and
  is that K/V a function of the token and its position only? Full-attention layers keep every
  token; sliding-window and chunked-attention layers keep the last window, which a stored prefix
  rebuilds from the KV of the tokens just before its end. Linear-attention/Mamba layers keep a
  state that is not per token, KV-sharing layers keep nothing, MLA keeps keys and values of
  different shapes, dynamic-NTK RoPE makes a token's K depend on the length of the pass that
  computed it, and multimodal/encoder-decoder models have KV that does not follow from the token
  ids alone. All of these are refused with `UnsupportedModelError` naming the reason: a refusal
  is recoverable, wrong KV served as a hit is not. LongRoPE's two regimes (short factors up to
  `original_max_position_embeddings`, long factors past it) are kept apart by `ModelKV.kv_regime`.
- What shape is the KV? Read from a one-token probe forward rather than from config fields,
  because every architecture names heads and head sizes differently; the probe is right by
  construction.
- Who produced it? The `Namespace` holds the model's name, a fingerprint of its weights and
  config, and the adapter, so two models never share a key.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import xxhash
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from tierkv import KVLayout, Namespace, TierKVError

from .compat import cache_argument

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
    """The K/V one decoder layer keeps per token, as the model really produces it.

    `layer_windows[i]` is None for a layer that attends to every earlier token, and `W` for a
    sliding-window or chunked-attention layer, whose transformers cache keeps the last `W - 1`
    tokens (`DynamicSlidingWindowLayer`). `longrope_switch` is LongRoPE's
    `original_max_position_embeddings`: a forward pass reaching past it rotates every token with
    the long factors, so KV computed in such a pass is another regime (`kv_regime`).
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    layer_devices: tuple[torch.device, ...]
    layer_windows: tuple[int | None, ...] = ()
    longrope_switch: int | None = None

    def window(self, layer: int) -> int | None:
        """The window of layer `layer` (None: full attention)."""
        return self.layer_windows[layer] if self.layer_windows else None

    @property
    def sliding(self) -> bool:
        return any(w is not None for w in self.layer_windows)

    def kv_regime(self, longest: int) -> str:
        """Which KV a forward pass over sequences of at most `longest` tokens computes: "" or "longrope-long".

        KV of one regime never serves the other: blocks are keyed apart (a salt of the key chain).
        """
        if self.longrope_switch is not None and longest > self.longrope_switch:
            return "longrope-long"
        return ""

    def layout(self, block_tokens: int) -> KVLayout:
        return KVLayout(
            num_layers=self.num_layers,
            kv_factor=2,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            dtype=self.dtype,
            block_tokens=block_tokens,
        )


def _refuse(model: PreTrainedModel | type, reason: str) -> UnsupportedModelError:
    name = model.__name__ if isinstance(model, type) else type(model).__name__
    return UnsupportedModelError(f"tierkv cannot reuse the KV cache of {name}: {reason}")


_LAYER_REASONS = {
    "LinearAttentionLayer": "is a linear-attention / state-space (Mamba-style) layer whose cache is a running state, "
    "not per-token K/V",
    "LinearAttentionAndFullAttentionLayer": "keeps a recurrent (linear-attention / state-space) state besides K/V; "
    "that state is not per token",
    "LinearAttentionAndSlidingWindowAttentionLayer": "keeps a recurrent (linear-attention / state-space) state "
    "besides K/V; that state is not per token",
    "DummyLayer": "shares another layer's KV and keeps no cache of its own",
    "DynamicIndexedLayer": "keeps an indexer key cache besides K/V",
}

# Forward arguments and sub-config names that carry another modality: a key made of token ids
# cannot tell two images apart. Other sub-configs (`attn_config` / `ffn_config` of MPT and DBRX,
# `text_config`) are parts of the text model itself, not inputs.
_MEDIA = re.compile(r"pixel|image|video|audio|vision|visual|speech|input_features|waveform", re.IGNORECASE)
_ENCODER = re.compile(r"encoder", re.IGNORECASE)


def _rope_parameter_sets(config: Any) -> Iterator[tuple[str | None, dict[str, Any]]]:
    """`(layer type or None, rope parameters)` of a text config, flat or per layer type."""
    for attr in ("rope_parameters", "rope_scaling"):
        params = getattr(config, attr, None)
        if not isinstance(params, dict) or not params:
            continue
        if all(isinstance(v, dict) for v in params.values()):
            yield from ((str(k), v) for k, v in params.items())
        else:
            yield None, params


def _check_rope(model: PreTrainedModel | type, config: Any) -> int | None:
    """Refuse RoPE whose K depends on more than the token and its position; return LongRoPE's switch point."""
    switch: int | None = None
    for layer_type, params in _rope_parameter_sets(config):
        rope_type = str(params.get("rope_type", params.get("type", "default")))
        where = f" ({layer_type} layers)" if layer_type else ""
        if "dynamic" in rope_type:
            limit = getattr(config, "max_position_embeddings", None)
            raise _refuse(
                model,
                f"it uses dynamic-NTK RoPE (rope_type={rope_type!r}{where}): once a forward pass is longer than "
                f"max_position_embeddings={limit}, the rotary base is recomputed from that pass's length (and kept for "
                "later passes), so the K of a token depends on the length of the sequence it was computed in, "
                "not only on the token and its position; a stored prefix would not be the KV plain generate computes",
            )
        if rope_type == "longrope":
            point = params.get("original_max_position_embeddings", getattr(config, "original_max_position_embeddings", None))
            if not isinstance(point, int) or point <= 0:
                raise _refuse(model, f"it uses LongRoPE{where} without original_max_position_embeddings, its switch point")
            switch = point if switch is None else min(switch, point)
    return switch


def check_config(model_class: type[PreTrainedModel], config: Any) -> tuple[tuple[int | None, ...], int | None]:
    """What can be refused from the class and config alone, before any weight exists.

    Returns each layer's window (None: full attention) and LongRoPE's switch point (or None);
    raises `UnsupportedModelError` for an encoder-decoder or multimodal config, a model whose
    generate keeps a cache class of its own, RoPE that depends on the sequence length, and cache
    layers that are not per-token K/V.
    """
    if getattr(config, "is_encoder_decoder", False):
        raise _refuse(
            model_class,
            "it is an encoder-decoder model; its decoder KV depends on the encoder input, not only on the prompt tokens",
        )
    sub_configs = getattr(type(config), "sub_configs", {})
    media_configs = sorted(k for k in sub_configs if k != "text_config" and _MEDIA.search(k))
    try:
        arguments = set(inspect.signature(model_class.forward).parameters)
    except (TypeError, ValueError, AttributeError):
        arguments = set()
    media_inputs = sorted(a for a in arguments if _MEDIA.search(a))
    if media_configs or media_inputs:
        parts = [f"sub-configs {media_configs}"] if media_configs else []
        parts += [f"forward inputs {media_inputs}"] if media_inputs else []
        raise _refuse(model_class, _multimodal(", ".join(parts)))
    encoders = sorted(k for k in sub_configs if _ENCODER.search(k))
    if encoders:
        raise _refuse(
            model_class, f"it conditions on an encoder (sub-configs {encoders}); its KV depends on the encoder's output"
        )
    generate = getattr(model_class, "generate", None)
    if generate is not None and generate is not GenerationMixin.generate:
        raise _refuse(
            model_class,
            f"its generate is its own ({generate.__qualname__}), not transformers' GenerationMixin.generate that "
            "continues a TierKVCache; it rewrites the prompt or the cache on the way",
        )
    if "shared_kv_states" in arguments:
        raise _refuse(
            model_class,
            "it keeps no KV cache of its own: its forward attends to another model's KV (shared_kv_states), "
            "as a drafter for speculative decoding does",
        )
    supports_dynamic = getattr(model_class, "_supports_default_dynamic_cache", None)
    if callable(supports_dynamic) and not supports_dynamic():
        raise _refuse(
            model_class,
            "its generate keeps a cache of its own class instead of a DynamicCache "
            "(a recurrent or memory state, not per-token K/V)",
        )
    text_config = config.get_text_config(decoder=True)
    switch = _check_rope(model_class, text_config)
    windows: list[int | None] = []
    for i, layer in enumerate(DynamicCache(config=text_config).layers):
        kind = type(layer)
        if kind is DynamicLayer:
            windows.append(None)
        elif isinstance(layer, DynamicSlidingWindowLayer) and kind is DynamicSlidingWindowLayer:
            windows.append(int(layer.sliding_window))
        else:
            name = kind.__name__
            detail = _LAYER_REASONS.get(name, f"has a {name} cache, not a plain per-layer K/V cache")
            raise _refuse(model_class, f"layer {i} {detail}")
    return tuple(windows), switch


def _multimodal(found: str) -> str:
    return (
        f"it is a multimodal model ({found}); the KV of media placeholder tokens depends on the media, "
        "which a key made of token ids cannot tell apart"
    )


def _check_cache_structure(model: PreTrainedModel) -> tuple[tuple[int | None, ...], int | None]:
    """`check_config` for the model's class and config."""
    return check_config(type(model), model.config)


# The continuation probe: `_PROBE[1]` tokens in one forward pass, and the first `_PROBE[0]` of them
# followed by the rest as a continuation of their cache, must give the same KV and logits.
_PROBE = (5, 9)


def _forward(model: PreTrainedModel, ids: torch.Tensor, cache: DynamicCache, columns: int) -> torch.Tensor:
    mask = torch.ones((ids.shape[0], columns), dtype=torch.long, device=ids.device)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True, **cache_argument(cache))
    return out.logits.float()


def _kv(cache: DynamicCache) -> list[torch.Tensor]:
    return [
        torch.cat([layer.keys, layer.values], dim=-1).float()
        for layer in cache.layers
        if isinstance(layer, DynamicLayer) and layer.keys is not None and layer.values is not None
    ]


@dataclass(frozen=True)
class _Noise:
    """How far one forward pass differs from itself computed another, equally valid way: per layer's KV, and logits."""

    kv: list[float]
    logits: float


_NOISE_MARGIN = 8  # a difference this many times the rounding noise (plus the tolerance) is a real one


def _rounding_noise(model: PreTrainedModel, ids: torch.Tensor, whole: DynamicCache, whole_logits: torch.Tensor,
                    columns: int) -> _Noise:
    """The rounding noise of this model on this device: the probe again as a batch of two identical rows.

    On a GPU in bf16 a matmul of another shape rounds differently, and through the layers of a
    deep model (random weights above all) that grows past any fixed tolerance by the last layers,
    although nothing is wrong. A batch of two changes the shapes as a continuation does, so its
    difference from the single pass is the noise a continuation may show. On the CPU it is zero
    and the check is as strict as the tolerance. A model that cannot continue a cache (attention
    that is not causal) differs by far more, from its first attention layer on.
    """
    twice = DynamicCache()
    logits = _forward(model, ids.expand(2, -1), twice, columns)
    kv = [(a[:1] - b).abs().max().item() for a, b in zip(_kv(twice), _kv(whole))]
    return _Noise(kv, (logits[:1, -1] - whole_logits[:, -1]).abs().max().item())


def _check_continuation(model: PreTrainedModel) -> None:
    """Refuse a model that cannot continue a stored prefix exactly, found by running it.

    A prefix of the probe is computed alone, then the rest as a continuation of its cache,
    which is what reuse does; the KV and logits must agree with one pass over all of it, to
    rounding; and the prefix's KV must not change when other tokens follow it. This catches
    attention that is not causal (a token's KV depends on the tokens after it: BERT-style
    models without `is_decoder`), forwards that cannot take several new tokens on top of a
    cache, and anything else that makes a continued cache differ, whatever the architecture
    calls it.
    """
    vocab = int(getattr(model.config.get_text_config(decoder=True), "vocab_size", 0) or 0)
    short_n, long_n = _PROBE
    ids = ((torch.arange(long_n, device=model.device) * 7) % max(vocab - 3, 1) + min(3, max(vocab - 1, 0))).unsqueeze(0)
    whole = DynamicCache()
    whole_logits = _forward(model, ids, whole, long_n)
    prefix = DynamicCache()
    _forward(model, ids[:, :short_n], prefix, short_n)
    precise = next(model.parameters()).dtype in (torch.float32, torch.float64)
    tolerance = 1e-3 if precise else 3e-2
    noise = _rounding_noise(model, ids, whole, whole_logits, long_n)

    def differs(a: torch.Tensor, b: torch.Tensor, floor: float = 0.0) -> bool:
        limit = tolerance * max(a.abs().max().item(), 1e-6) + _NOISE_MARGIN * floor
        return a.shape != b.shape or (a - b).abs().max().item() > limit

    # The same prefix with other tokens after it, in a pass of the same shape: the same kernels
    # round the same way, so a causal model gives the prefix's KV to the bit (to 1e-3 for kernels
    # that are not deterministic) in any dtype, where a bf16 tolerance would hide a weak dependence.
    other = DynamicCache()
    _forward(model, torch.cat([ids[:, :short_n], ids[:, short_n:].flip(1) + 1], dim=1) % max(vocab, 1), other, long_n)
    same_shape = [(a[:, :, :short_n] - b[:, :, :short_n]).abs().max().item() > 1e-3 * max(b.abs().max().item(), 1e-6)
                  for a, b in zip(_kv(other), _kv(whole))]
    for i, (alone, appended) in enumerate(zip(_kv(prefix), _kv(whole))):
        if same_shape[i] or differs(alone, appended[:, :, :short_n], noise.kv[i]):
            raise _refuse(
                model,
                f"its attention is not causal: the KV of layer {i} for the first {short_n} tokens changes when "
                f"{long_n - short_n} tokens are appended, so a token's KV depends on the tokens after it and a "
                "stored prefix is not what a longer prompt computes (for BERT-style models: is_decoder=True)",
            )
    try:
        continued_logits = _forward(model, ids[:, short_n:], prefix, long_n)
    except Exception as e:
        raise _refuse(
            model, f"its forward cannot continue a cache with {long_n - short_n} new tokens ({type(e).__name__}: {e})"
        ) from e
    for i, (continued, appended) in enumerate(zip(_kv(prefix), _kv(whole))):
        if differs(continued, appended, noise.kv[i]):
            raise _refuse(model, f"continuing its cache gives other KV (layer {i}) than one forward pass over the same tokens")
    if differs(continued_logits[:, -1], whole_logits[:, -1], noise.logits):
        raise _refuse(model, "continuing its cache gives other logits than one forward pass over the same tokens")


def describe_model(model: PreTrainedModel) -> ModelKV:
    """The model's per-layer K/V, or `UnsupportedModelError` saying why it cannot be reused.

    Runs one forward pass of a single token (under `no_grad`) to read the real shapes, and three
    short ones to check that a stored prefix continues exactly (`_check_continuation`).
    """
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    windows, switch = _check_cache_structure(model)
    probe = DynamicCache()
    token = torch.zeros((1, 1), dtype=torch.long, device=model.device)
    with torch.no_grad():
        model(input_ids=token, use_cache=True, **cache_argument(probe))
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
    if windows and len(windows) != len(probe.layers):
        raise _refuse(model, f"its config describes {len(windows)} cache layers but its forward pass wrote {len(probe.layers)}")
    _check_continuation(model)
    return ModelKV(len(probe.layers), int(heads), int(head_dim), dtypes.pop(), tuple(devices), windows, switch)


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
