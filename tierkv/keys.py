"""Token ids in, chained block keys out.

`key_i = xxh3_128(key_{i-1} || tokens_i as little-endian int32)`, `key_{-1}` = namespace digest.
A key therefore names the whole prefix up to its block. Each block also keeps its *ident*,
the exact bytes that were hashed (parent key and token ids); comparing idents on every hit
turns a hash collision into a miss instead of wrong KV.

Hashing is the hot path of `match` on long prompts, so the token ids are cut into per-block
byte strings by one numpy view (no Python loop over tokens) and the chain is a tight loop.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import xxhash

if TYPE_CHECKING:
    from .layout import KVLayout
    from .namespace import Namespace

Tokens = Sequence[int] | np.ndarray | torch.Tensor

_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1
_hash = xxhash.xxh3_128_digest


def as_token_array(tokens: Tokens) -> np.ndarray:
    """Validate and convert token ids to a contiguous little-endian int32 array."""
    if isinstance(tokens, torch.Tensor):
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise TypeError(f"tokens must be integers, got a tensor of {tokens.dtype}")
        tokens = tokens.detach().cpu().numpy()
    if isinstance(tokens, np.ndarray):
        arr = tokens
        if arr.dtype.kind not in "iu":
            raise TypeError(f"tokens must be integers, got an array of {arr.dtype}")
    else:
        try:
            arr = np.asarray(tokens)
        except (TypeError, ValueError, OverflowError) as e:
            raise TypeError(f"tokens must be a sequence of ints: {e}") from None
        if arr.size == 0:
            arr = arr.astype(np.int64)
        if arr.dtype.kind not in "iu":
            raise TypeError(f"tokens must be integers, got values of type {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"tokens must be one-dimensional, got shape {arr.shape}")
    if arr.dtype != np.dtype("<i4"):
        if arr.size and (int(arr.min()) < _INT32_MIN or int(arr.max()) > _INT32_MAX):
            raise ValueError("token ids must fit in int32")
        arr = arr.astype("<i4")
    return np.ascontiguousarray(arr)


def block_chunks(tokens: np.ndarray, block_tokens: int) -> list[bytes]:
    """The token bytes of each *full* block; a trailing partial block is not a block."""
    n = len(tokens) // block_tokens
    return tokens[: n * block_tokens].view(f"V{4 * block_tokens}").tolist()


def iter_chain(seed: bytes, chunks: Sequence[bytes]) -> Iterator[tuple[bytes, bytes]]:
    """Yield `(key, ident)` per block; lazy, so a lookup can stop at the first miss."""
    prev = seed
    for chunk in chunks:
        ident = prev + chunk
        prev = _hash(ident)
        yield prev, ident


def longest_stored_prefix(seed: bytes, chunks: Sequence[bytes], stored: Mapping[bytes, Any]) -> list[Any]:
    """Entries of `stored` for the longest prefix of `chunks` whose keys and idents both match.

    The chain loop of `iter_chain` fused with the lookup: this is what `match` runs on every
    prompt, so it stops at the first miss and makes no per-block generator round trip.
    """
    get = stored.get
    found: list[Any] = []
    append = found.append
    prev = seed
    for chunk in chunks:
        ident = prev + chunk
        prev = _hash(ident)
        entry = get(prev)
        if entry is None or entry.ident != ident:
            break
        append(entry)
    return found


def chain_keys(seed: bytes, tokens: Tokens, block_tokens: int) -> list[bytes]:
    """All block keys of `tokens`; the one public way to compute tierkv keys."""
    chunks = block_chunks(as_token_array(tokens), block_tokens)
    prev = seed
    return [prev := _hash(prev + c) for c in chunks]


class KeyChain:
    """The one place where a namespace, a layout and a tenant become the seed of a key chain.

    A store, a vLLM scheduler in another process and a test all derive keys through this, so
    they agree by construction. Seeds are cached per tenant, at most `max_tenants` of them (least
    recently used go first): one-off tenants cost a digest each, never memory forever.
    """

    def __init__(self, namespace: Namespace, layout: KVLayout, max_tenants: int = 4096) -> None:
        self.namespace = namespace
        self.layout = layout
        self.block_tokens = layout.block_tokens
        self._max = max_tenants
        self._seeds: OrderedDict[str, bytes] = OrderedDict()

    def seed(self, tenant: str | None = None) -> bytes:
        """The chain's seed for `tenant` (None: the namespace's own tenant)."""
        if tenant is None:
            tenant = self.namespace.tenant
        seed = self._seeds.get(tenant)
        if seed is not None:
            self._seeds.move_to_end(tenant)
            return seed
        if not isinstance(tenant, str):
            raise TypeError(f"tenant must be a string, got {tenant!r}")
        seed = self._seeds[tenant] = self.namespace.with_tenant(tenant).digest(self.layout)
        if len(self._seeds) > self._max:
            self._seeds.popitem(last=False)
        return seed

    def chunks(self, tokens: Tokens) -> list[bytes]:
        """The token bytes of each full block of `tokens`."""
        return block_chunks(as_token_array(tokens), self.block_tokens)

    def keys(self, tokens: Tokens, tenant: str | None = None) -> list[bytes]:
        """The key of every full block of `tokens`."""
        return chain_keys(self.seed(tenant), tokens, self.block_tokens)
