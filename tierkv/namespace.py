"""What makes two KV tensors interchangeable, condensed to the 128-bit seed of every key chain.

Everything that changes the bytes of KV for the same tokens belongs here: the model and its
weights, the layout, the tensor-parallel shard, the adapter, an engine's own page format, and
a tenant salt for isolation.
Two namespaces that differ in any field never produce the same key.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace

import xxhash

from .layout import KVLayout

# Bump when the meaning of keys changes, so old stores miss instead of serving stale KV.
KEY_FORMAT_VERSION = 1


@dataclass(frozen=True)
class Namespace:
    """Identity of the producer of KV. Only `model` is required."""

    model: str
    weights_fingerprint: str = ""
    tp_rank: int = 0
    tp_size: int = 1
    adapter: str = ""
    tenant: str = ""
    kv_format: str = ""  # how a block's bytes are arranged, when not token-major KV (an engine's own page format)

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"Namespace.model must be a non-empty string, got {self.model!r}")
        for name in ("weights_fingerprint", "adapter", "tenant", "kv_format"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"Namespace.{name} must be a string, got {getattr(self, name)!r}")
        for name in ("tp_rank", "tp_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"Namespace.{name} must be an int, got {value!r}")
        if self.tp_size < 1 or not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"Namespace needs 0 <= tp_rank < tp_size, got tp_rank={self.tp_rank}, tp_size={self.tp_size}")

    def with_tenant(self, tenant: str) -> Namespace:
        return replace(self, tenant=tenant)

    def to_dict(self) -> dict[str, object]:
        """The fields; `kv_format` only when set, so token-major KV keeps the keys and disk
        identities it had before the field existed."""
        d = asdict(self)
        if not self.kv_format:
            del d["kv_format"]
        return d

    def digest(self, layout: KVLayout) -> bytes:
        """16-byte seed of the key chain for blocks of `layout` produced in this namespace."""
        canonical = json.dumps(
            {"v": KEY_FORMAT_VERSION, "ns": self.to_dict(), "layout": layout.to_dict()},
            sort_keys=True,
            separators=(",", ":"),
        )
        return xxhash.xxh3_128_digest(canonical.encode())
