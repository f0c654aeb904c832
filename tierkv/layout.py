"""The shape of one stored block, and the checks that keep tensors honest about it.

A block holds `block_tokens` tokens of KV for every layer in one contiguous byte range,
layer-major: `[num_layers, kv_factor, block_tokens, num_kv_heads, head_dim]`. Moving whole
cross-layer blocks instead of per-layer fragments is what makes tier copies fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .errors import LayoutMismatchError

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
    "int8": torch.int8,
    "uint8": torch.uint8,
}


def parse_dtype(value: Any) -> torch.dtype:
    """Accept a torch dtype or its name ("bfloat16", "torch.float16", "half" is not accepted)."""
    if isinstance(value, torch.dtype):
        if value not in _DTYPES.values():
            raise ValueError(f"dtype {value} is not supported; use one of {sorted(_DTYPES)}")
        return value
    if isinstance(value, str):
        name = value.removeprefix("torch.")
        if name in _DTYPES:
            return _DTYPES[name]
    raise ValueError(f"dtype {value!r} is not supported; use one of {sorted(_DTYPES)}")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class KVLayout:
    """What a block looks like in memory; two stores share blocks only if their layouts are equal."""

    num_layers: int
    kv_factor: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    block_tokens: int

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"KVLayout.{name} must be a positive int, got {value!r}")
        if isinstance(self.kv_factor, bool) or not isinstance(self.kv_factor, int) or self.kv_factor not in (1, 2):
            raise ValueError(
                f"KVLayout.kv_factor must be 2 (separate K and V) or 1 (MLA latent), got {self.kv_factor!r}"
            )
        object.__setattr__(self, "dtype", parse_dtype(self.dtype))

    @property
    def block_shape(self) -> tuple[int, int, int, int, int]:
        return (self.num_layers, self.kv_factor, self.block_tokens, self.num_kv_heads, self.head_dim)

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def block_bytes(self) -> int:
        n = self.element_size
        for d in self.block_shape:
            n *= d
        return n

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_layers": self.num_layers,
            "kv_factor": self.kv_factor,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "dtype": dtype_name(self.dtype),
            "block_tokens": self.block_tokens,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KVLayout:
        return cls(**data)

    def differences(self, other: KVLayout) -> list[str]:
        """Human-readable field differences, for errors that say exactly what disagrees."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [f"{k}: {mine[k]!r} != {theirs[k]!r}" for k in mine if mine[k] != theirs[k]]

    def check_blocks(self, kv: torch.Tensor, num_blocks: int | None = None) -> None:
        """Raise a message naming the problem unless `kv` is `[n, *block_shape]` of our dtype."""
        if not isinstance(kv, torch.Tensor):
            raise TypeError(f"kv must be a torch.Tensor, got {type(kv).__name__}")
        if kv.dtype != self.dtype:
            raise LayoutMismatchError(f"kv dtype is {dtype_name(kv.dtype)}, the layout says {dtype_name(self.dtype)}")
        expected = (num_blocks if num_blocks is not None else kv.shape[0] if kv.dim() else -1, *self.block_shape)
        if kv.dim() != 6 or tuple(kv.shape) != expected:
            raise LayoutMismatchError(
                f"kv shape is {tuple(kv.shape)}, expected {expected} "
                "= [num_blocks, num_layers, kv_factor, block_tokens, num_kv_heads, head_dim]"
            )
