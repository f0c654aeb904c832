"""Every causal LM transformers ships, built tiny with random weights and checked for prefix reuse.

The registry is transformers' own (`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`), walked whole: a class
tierkv has never seen is checked like the others, and a new transformers release adds rows by
itself. Each class is built from its config class with tiny sizes (`TINY`, applied to whatever
fields the config has; `OVERRIDES` only where those defaults cannot be built), and then either

- **served**: `TierKV(model)` accepts it and greedy `generate` with reuse returns exactly the
  tokens plain `generate` returns, in every case of `check` (cold, a hit ending mid-prompt, an
  exact repeat, a prompt extending past the whole stored chain including a stored reply, and a
  left-padded batch whose rows hit different depths), with tokens really reused; or
- **refused**: `TierKV(model)` raises `UnsupportedModelError` naming the reason.

Anything else (tokens differ, reuse never happens, another exception) is a bug in tierkv or a
model that needs a refusal rule: `ZooResult.ok` is False. `scripts/hf_zoo_table.py` prints the
table of docs/transformers.md from `sweep()`; tests/test_hf_zoo.py runs it.
"""

from __future__ import annotations

import inspect
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from tierkv import StoreConfig

from . import TierKV, UnsupportedModelError
from .model import check_config

VOCAB = 256
BLOCK_TOKENS = 8
NEW_TOKENS = 4
WINDOW = 13  # sliding window / attention chunk: shorter than the prompts, not a block multiple

# Tiny sizes under every name the configs use; each config takes the fields it has.
TINY: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 256,
    "initializer_range": 0.2,  # large enough that random greedy decoding does not repeat one token
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "sliding_window": WINDOW,
    "attention_chunk_size": WINDOW,
    "is_decoder": True,  # the causal-LM heads of encoder families (BERT, RoBERTa, ...) generate only as decoders
    # other spellings of the same sizes
    "n_layer": 2,
    "n_layers": 2,
    "num_layers": 2,
    "n_embd": 64,
    "n_head": 4,
    "n_heads": 4,
    "d_model": 64,
    "n_positions": 256,
    "n_ctx": 256,
    "n_inner": 128,
    "ffn_dim": 128,
    "ffn_hidden_size": 128,
    "d_ff": 128,
    "decoder_layers": 2,
    "decoder_attention_heads": 4,
    "decoder_ffn_dim": 128,
    # mixture of experts
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "moe_num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "n_shared_experts": 1,
}

# Multi-head latent attention at tiny sizes (every head keeps its own latent K/V).
_MLA = {
    "num_key_value_heads": 4,
    "kv_lora_rank": 16,
    "q_lora_rank": 32,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 16,
    "qk_head_dim": 24,
    "v_head_dim": 8,
    "n_group": 1,
    "topk_group": 1,
    "first_k_dense_replace": 1,
}

# Per-architecture fields, only where the TINY defaults cannot be built (keyed by model_type).
OVERRIDES: dict[str, dict[str, Any]] = {
    "axk1": _MLA,
    "codegen": {"rotary_dim": 8},
    # Three-axis RoPE: it splits head_dim 128 into its axes.
    "cohere_compass_text": {"hidden_size": 256, "num_attention_heads": 2, "num_key_value_heads": 1,
                            "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}},
    "dbrx": {
        "max_seq_len": 256,
        "attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
        "ffn_config": {"moe_num_experts": 4, "moe_top_k": 2, "ffn_hidden_size": 128},
    },
    "deepseek_v2": _MLA,
    "deepseek_v3": _MLA,
    # Two layers of each kind, the last two reading the KV of earlier ones (KV sharing, as in the real model).
    "gemma3n_text": {"num_hidden_layers": 4, "num_kv_shared_layers": 2,
                     "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
                     "vocab_size_per_layer_input": VOCAB, "hidden_size_per_layer_input": 16},
    "gemma4_text": {"layer_types": ["sliding_attention", "full_attention"], "vocab_size_per_layer_input": VOCAB,
                    "hidden_size_per_layer_input": 16},
    "glm4_moe_lite": _MLA,
    "gpt_neo": {"attention_types": [[["global", "local"], 1]], "window_size": WINDOW},
    "gptj": {"rotary_dim": 8},
    # LFM2's default config lists only attention layers; the architecture interleaves short convolutions.
    "lfm2": {"layer_types": ["conv", "full_attention"]},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 1},
    "longcat_flash": {**_MLA, "head_dim": 8, "expert_ffn_hidden_size": 32, "ffn_hidden_size": 128, "moe_topk": 2,
                      "zero_expert_num": 1},
    "mamba2": {"num_heads": 8, "n_groups": 1},
    "minicpm3": _MLA,
    "musicgen": {"num_codebooks": 1},
    "musicgen_melody": {"num_codebooks": 1},
    "reformer": {"axial_pos_embds_dim": [32, 32]},
    "youtu": _MLA,
    "zamba": {"layers_block_type": ["mamba", "hybrid"]},
    "zamba2": {"layers_block_type": ["mamba", "hybrid"]},
    "zaya": {"num_experts_per_tok": 1},
}

# Calls a model needs after it is built, before it runs (keyed by model_type).
PREPARE: dict[str, Callable[[Any], None]] = {
    "xmod": lambda model: model.set_default_language("en_XX"),
}


@dataclass
class ZooResult:
    """What one architecture did: `outcome` is "served", "refused", "failed" or "not built"."""

    model_type: str
    class_name: str
    outcome: str
    reason: str = ""
    seconds: float = 0.0
    reused: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.outcome in ("served", "refused")


def causal_lm_classes() -> list[tuple[str, str]]:
    """`(model_type, class name)` of every causal LM class transformers registers, each class once."""
    seen: set[str] = set()
    out = []
    for model_type, name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        if name in seen:
            continue
        seen.add(name)
        out.append((model_type, name))
    return out


def _accepted(config_class: type) -> set[str]:
    names = set(inspect.signature(config_class).parameters)
    names |= set(getattr(config_class, "attribute_map", {}))
    return names


_LAYER_LISTS = ("layer_types", "layers_block_type")
_LAYER_COUNTS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers")


def _kinds(config: Any, attr: str) -> list[str]:
    value = getattr(config, attr, None)
    return list(dict.fromkeys(value)) if isinstance(value, list) else []


def tiny_config(model_type: str, class_name: str, **extra: Any) -> Any:
    """The config of `class_name` with the TINY sizes it accepts, `OVERRIDES[model_type]`, then `extra`.

    Two layers, unless the architecture's default config mixes more kinds of layer (sliding and
    full attention, attention and Mamba, ...): then one layer of each kind, in the default's
    order, so the tiny model has every kind of cache layer the real one has.
    """
    config_class = getattr(transformers, class_name).config_class
    accepted = _accepted(config_class)
    kwargs = {k: v for k, v in TINY.items() if k in accepted}
    kwargs.update(OVERRIDES.get(model_type, {}))
    kwargs.update(extra)
    config = config_class(**kwargs)
    if any(attr in kwargs for attr in _LAYER_LISTS):
        return config
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        default = config_class()
    for attr in _LAYER_LISTS:
        kinds = _kinds(default, attr)
        if set(kinds) - set(_kinds(config, attr)):
            counts = {k: len(kinds) for k in _LAYER_COUNTS if k in accepted}
            try:
                return config_class(**{**kwargs, **counts, attr: kinds})
            except Exception:
                continue  # the architecture derives its layer kinds otherwise: keep the plain tiny config
    return config


# A tiny build has well under a million parameters; a config whose sizes TINY did not reach is refused
# before it allocates (some default to billions of parameters in their sub-configs).
MAX_PARAMETERS = 20_000_000


class TooLarge(ValueError):
    """The tiny config still builds a large model: it needs an `OVERRIDES` entry."""


def build(model_type: str, class_name: str, dtype: torch.dtype = torch.float32, **extra: Any) -> Any:
    """A tiny random-weight `class_name`, in eval mode, seeded so every build is the same model.

    Refuses (`UnsupportedModelError`) what `check_config` refuses from the built model's config
    (a causal-LM head may rewrite the config it is given: BART's decoder is no encoder-decoder),
    and a config still too large to build (`TooLarge`), before any weight is allocated.
    """
    config = tiny_config(model_type, class_name, **extra)
    model_class = getattr(transformers, class_name)
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            skeleton = model_class(config)
    except Exception:
        check_config(model_class, config)  # refused from the config alone (e.g. a vision tower needing timm)
        raise
    check_config(model_class, skeleton.config)
    size = sum(p.numel() for p in skeleton.parameters())
    if size > MAX_PARAMETERS:
        raise TooLarge(f"the tiny config of {class_name} still has {size:,} parameters; it needs an OVERRIDES entry")
    torch.manual_seed(1234)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = model_class(config)
    if model_type in PREPARE:
        PREPARE[model_type](model)
    return model.to(dtype).eval()


def _tokens(seed: int, n: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n,), generator=gen)


def _left_pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    return ids, mask


class Diverged(AssertionError):
    """Reuse changed the tokens, or reused nothing where a hit was expected."""


def check_reuse(model: Any, new_tokens: int = NEW_TOKENS, block_tokens: int = BLOCK_TOKENS) -> list[int]:
    """Run the reuse cases against plain greedy `generate`; raise `Diverged` on any difference.

    `TierKV(model)` raises `UnsupportedModelError` first for a model it refuses. Returns the
    tokens reused per case (batch rows summed).
    """
    config = StoreConfig(device_bytes=4 << 20, host_bytes=4 << 20, device="cpu")  # hundreds of tiny blocks
    generation = transformers.GenerationConfig(do_sample=False, max_new_tokens=new_tokens, pad_token_id=0)

    def plain(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return model.generate(ids, attention_mask=mask, generation_config=generation)

    reused: list[int] = []
    bt = block_tokens
    with TierKV(model, config, block_tokens=bt) as tkv:

        def case(label: str, rows: list[torch.Tensor], expect_hit: bool, store_generated: bool = False) -> torch.Tensor:
            ids, mask = _left_pad(rows)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = tkv.generate(ids, mask, generation_config=generation, store_generated=store_generated)
            want = plain(ids, mask)
            if not torch.equal(out.sequences, want):
                raise Diverged(
                    f"{label}: tokens differ with reuse (reused {out.reused_tokens}): "
                    f"{out.sequences[:, ids.shape[1]:].tolist()} != {want[:, ids.shape[1]:].tolist()}"
                )
            if out.recomputed:
                raise Diverged(f"{label}: the prefix was not used: {out.recomputed}")
            if expect_hit and not any(out.reused_tokens):
                raise Diverged(f"{label}: nothing was reused (hits {out.reused_tokens})")
            reused.append(sum(out.reused_tokens))
            return out.sequences

        a = _tokens(1, 4 * bt + 5)  # 37 tokens with 8-token blocks
        first = a[: 3 * bt + 5]
        case("cold", [first], expect_hit=False)  # stores 3 blocks
        case("hit ending mid-prompt", [torch.cat([a[: 2 * bt], _tokens(2, bt + 3)])], expect_hit=True)
        repeat = case("exact repeat, reply stored", [first], expect_hit=True, store_generated=True)
        extended = torch.cat([repeat[0], _tokens(3, bt - 2)])
        case("extension past the whole stored chain", [extended], expect_hit=True)
        batch = [torch.cat([a, _tokens(4, 3)]), torch.cat([a[:bt], _tokens(5, 2 * bt + 1)]), _tokens(6, 2 * bt + 3)]
        case("left-padded batch, hits of different lengths", batch, expect_hit=True)
    return reused


def check(model_type: str, class_name: str, **extra: Any) -> ZooResult:
    """Build `class_name` tiny and check it: served token-identical with reuse, or refused with a reason."""
    started = time.perf_counter()

    def result(outcome: str, reason: str = "", reused: list[int] | None = None) -> ZooResult:
        return ZooResult(model_type, class_name, outcome, reason, time.perf_counter() - started, reused or [])

    try:
        model = build(model_type, class_name, **extra)
    except UnsupportedModelError as e:
        return result("refused", str(e))
    except Exception as e:
        return result("not built", f"{type(e).__name__}: {e}")
    try:
        with torch.no_grad():
            reused = check_reuse(model)  # TierKV(model) refuses first, if it does
    except UnsupportedModelError as e:
        return result("refused", str(e))
    except Diverged as e:
        return result("failed", str(e))
    except Exception as e:
        return result("failed", f"{type(e).__name__}: {e}")
    return result("served", reused=reused)


def sweep(
    classes: Iterable[tuple[str, str]] | None = None, progress: Callable[[ZooResult], None] | None = None
) -> list[ZooResult]:
    """`check` every causal LM class (or those given), in registry order, on one CPU thread.

    Tiny models are all overhead: one thread is faster than several that wait on each other.
    """
    results = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for model_type, class_name in causal_lm_classes() if classes is None else classes:
            r = check(model_type, class_name)
            if progress is not None:
                progress(r)
            results.append(r)
    finally:
        torch.set_num_threads(threads)
    return results
