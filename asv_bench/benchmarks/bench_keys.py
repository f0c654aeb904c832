"""Keys and lookups of a 128k-token prompt: what every request pays before any KV moves.

Target (issue 2): hashing + `match` of 131072 tokens (8192 blocks of 16) under 2 ms median.
`match` hashes the prompt itself, so `MatchPrompt128k.time_match` is the number to hold
against the target; `ChainKeys128k` isolates the hashing.
"""

import numpy as np
import torch

from tierkv import BlockStore, KVLayout, Namespace, StoreConfig, chain_keys

TOKENS = 131072
BLOCK_TOKENS = 16
# Tiny blocks: lookups do not depend on the block size, and 8192 of them fit in 1 MiB.
LAYOUT = KVLayout(num_layers=1, kv_factor=1, num_kv_heads=1, head_dim=8, dtype=torch.uint8, block_tokens=BLOCK_TOKENS)
NAMESPACE = Namespace(model="bench-keys")


def prompt() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 128_000, TOKENS, dtype=np.int32)


def as_kind(tokens: np.ndarray, kind: str):
    """The prompt as an engine might hand it over."""
    if kind == "numpy int32":
        return tokens
    if kind == "list":
        return tokens.tolist()
    return torch.from_numpy(tokens.astype(np.int64))  # "torch int64", what tokenizers return


class ChainKeys128k:
    """`chain_keys` over 131072 tokens: 8192 chained xxh3_128 digests."""

    params = ["numpy int32", "list"]
    param_names = ["tokens"]
    timeout = 120

    def setup(self, kind):
        self.tokens = as_kind(prompt(), kind)
        self.seed = NAMESPACE.digest(LAYOUT)

    def time_chain_keys(self, kind):
        chain_keys(self.seed, self.tokens, BLOCK_TOKENS)


class MatchPrompt128k:
    """`store.match` of a 131072-token prompt whose 8192 blocks are all stored: a full hit."""

    params = ["numpy int32", "list", "torch int64"]
    param_names = ["tokens"]
    timeout = 120

    def setup(self, kind):
        tokens = prompt()
        n = TOKENS // BLOCK_TOKENS
        self.store = BlockStore(LAYOUT, NAMESPACE, StoreConfig(device_bytes=n * LAYOUT.block_bytes, host_bytes=0, device="cpu"))
        self.store.put(tokens, torch.zeros((n, *LAYOUT.block_shape), dtype=LAYOUT.dtype))
        self.tokens = as_kind(tokens, kind)
        assert self.store.match(self.tokens) == TOKENS

    def teardown(self, kind):
        self.store.close()

    def time_match(self, kind):
        self.store.match(self.tokens)
