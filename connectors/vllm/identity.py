"""Who produced the KV: the `Namespace` of a vLLM engine, identical in the scheduler and every worker.

Keys must survive a restart and must never match KV of other weights, so the namespace is built
from things that are stable across processes and runs: the model name, a fingerprint of the
weight files and of the model config, and the tensor-parallel shard. It is computed from files
(not from loaded tensors) because the scheduler process never loads the weights.
"""

from __future__ import annotations

import logging
from pathlib import Path

import xxhash

from tierkv import Namespace

log = logging.getLogger("tierkv.vllm")

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
SAMPLE_BYTES = 1 << 16  # read from each end of each weight file


def model_directory(model: str, revision: str | None) -> Path | None:
    """The local directory holding `model`'s files: the path itself, or its Hugging Face cache snapshot."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(model, "config.json", revision=revision)
    return Path(found).parent if isinstance(found, str) else None


def _sample_file(h: xxhash.xxh3_128, path: Path) -> None:
    """Size, first and last `SAMPLE_BYTES`: the header (tensor names, shapes, offsets) and real values."""
    size = path.stat().st_size
    h.update(f"{path.name}\0{size}\0".encode())
    with path.open("rb") as f:
        h.update(f.read(SAMPLE_BYTES))
        if size > SAMPLE_BYTES:
            f.seek(max(SAMPLE_BYTES, size - SAMPLE_BYTES))
            h.update(f.read(SAMPLE_BYTES))


def weights_fingerprint(model: str, revision: str | None, config_json: str, dtype: str) -> str:
    """xxh3-128 of the model config, the KV dtype and samples of every weight file.

    Sampling both ends of each file catches a retrained checkpoint (its values differ from the
    first bytes of data on) without reading gigabytes at start-up. Models with no local files
    fall back to name + revision + config, with a warning: pin `model_fingerprint` for those.
    """
    h = xxhash.xxh3_128()
    h.update(b"tierkv-vllm-fingerprint-v1\0")
    h.update(config_json.encode())
    h.update(f"\0{dtype}\0{revision or ''}\0".encode())
    directory = model_directory(model, revision)
    files = sorted(p for p in directory.iterdir() if p.suffix in WEIGHT_SUFFIXES) if directory else []
    if not files:
        log.warning(
            "tierkv: no local weight files found for %s; its KV is keyed by name, revision and config only. "
            "Set kv_connector_extra_config.model_fingerprint to pin the weights' identity.", model,
        )
    for path in files:
        _sample_file(h, path)
    return h.hexdigest()


def model_name(model: str) -> str:
    """The name the namespace carries: a hub id as given, a local directory by its last component.

    The weights are identified by the fingerprint; the name is for people reading a store's
    identity, and must not depend on where a copy of the model happens to live.
    """
    path = Path(model).expanduser()
    return path.resolve().name if path.is_dir() else model


def engine_namespace(model: str, fingerprint: str, tp_rank: int, tp_size: int, page_format: str = "") -> Namespace:
    """The namespace of one tensor-parallel shard; the tenant (cache_salt) is applied per request.

    `page_format` names an attention backend whose pages are stored whole in a layout of its own
    (vLLM's CPU attention): its blocks hold other bytes than a token-major engine's for the same tokens.
    """
    return Namespace(model=model_name(model), weights_fingerprint=fingerprint, tp_rank=tp_rank, tp_size=tp_size,
                     kv_format=f"vllm-pages:{page_format}" if page_format else "")
