"""Shared fixtures for the store tests: a tiny layout, KV derived from tokens, an index auditor.

KV is a pure function of (tenant, token prefix), so any thread or any step of a state machine
that puts the same tokens writes the same bytes, and a test can always say what `get` owes it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
import xxhash

from tierkv import BlockStore, KVLayout, Namespace, StoreConfig
from tierkv.index import ABSENT

BLOCK_TOKENS = 4


def tiny_layout(dtype: torch.dtype | str = torch.bfloat16, kv_factor: int = 2) -> KVLayout:
    """Blocks of a few hundred bytes: eviction scenarios need many blocks, not big ones."""
    return KVLayout(num_layers=2, kv_factor=kv_factor, num_kv_heads=2, head_dim=4, dtype=dtype, block_tokens=BLOCK_TOKENS)


def make_store(
    device_blocks: int, host_blocks: int, layout: KVLayout | None = None, namespace: Namespace | None = None
) -> BlockStore:
    """A CPU store whose tiers hold exactly the given numbers of blocks."""
    layout = layout or tiny_layout()
    bb = layout.block_bytes
    config = StoreConfig(device_bytes=device_blocks * bb, host_bytes=host_blocks * bb, device="cpu")
    return BlockStore(layout, namespace or Namespace(model="tiny-test"), config)


def kv_for(layout: KVLayout, tokens: Sequence[int] | np.ndarray, tenant: str = "") -> torch.Tensor:
    """Random-looking KV for every full block of `tokens`, a function of (tenant, prefix) only.

    Block i depends on all tokens up to the end of block i, so serving another prompt's block
    for a shared suffix shows up as a byte mismatch. Raw random bytes (NaN payloads included)
    make "bit-exact" mean bits, not float equality.
    """
    arr = np.asarray(tokens, dtype="<i4")
    bt = layout.block_tokens
    n = len(arr) // bt
    out = torch.empty((n, layout.block_bytes), dtype=torch.uint8)
    for i in range(n):
        seed = xxhash.xxh3_64_intdigest(tenant.encode() + arr[: (i + 1) * bt].tobytes()) & (2**63 - 1)
        gen = torch.Generator().manual_seed(seed)
        out[i] = torch.randint(0, 256, (layout.block_bytes,), dtype=torch.uint8, generator=gen)
    return out.view(layout.dtype).reshape(n, *layout.block_shape)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Byte equality of two tensors of the same shape and dtype (NaNs compare as their bits)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a.cpu().contiguous().view(torch.uint8), b.cpu().contiguous().view(torch.uint8))


def prompt(first: int, num_blocks: int, extra: int = 0) -> list[int]:
    """`num_blocks` full blocks of consecutive token ids starting at `first`, plus `extra` tokens."""
    return list(range(first, first + num_blocks * BLOCK_TOKENS + extra))


def check_index_invariants(store: BlockStore) -> None:
    """Audit the index against a recount from scratch; raise AssertionError on the first lie.

    - every indexed block is resident somewhere, and its parent is an indexed, resident block;
    - `fastest` and `copies`, which the index keeps as slots change, equal a recount of `slots`;
    - `child_fast` equals a recount of children by their fastest tier;
    - `resident_count(t)` equals the number of blocks holding a slot in t;
    - no slot of a tier is held twice, none is both held and free, and held + free == num_slots;
    - leases are never negative, and `leased_copies` (the capacity `put` may not count on)
      equals the number of slots held by leased blocks.

    Reads the index and the tiers without the store's lock: call it when no other thread acts on
    the store (worker threads joined; an elastic store's budget watcher acts only on a pending
    shrink request, see `settled` in test_elastic_store.py).
    """
    index = store.index
    blocks = list(index.blocks.values())
    num_tiers = len(store.tiers)
    recount = {id(b): [0] * num_tiers for b in blocks}
    for b in blocks:
        assert index.blocks[b.key] is b
        assert b.fastest != ABSENT, "an indexed block is resident nowhere"
        held_in = [t for t, s in enumerate(b.slots) if s != ABSENT]
        assert (b.fastest, b.copies) == (held_in[0], len(held_in)), f"fastest/copies stale for slots {b.slots}"
        assert all(s >= 0 or s == ABSENT for s in b.slots), f"slot left pending: {b.slots}"
        assert b.leases >= 0
        if b.parent is not None:
            assert index.blocks.get(b.parent.key) is b.parent, "a block's parent left the index"
            assert b.parent.fastest != ABSENT, "a resident block's parent is resident nowhere"
            assert b.ident[:16] == b.parent.key, "ident does not start with the parent key"
            recount[id(b.parent)][b.fastest] += 1
    for b in blocks:
        assert b.child_fast == recount[id(b)], f"child_fast {b.child_fast} != recount {recount[id(b)]}"
    leased = sum(1 for b in blocks if b.leases for s in b.slots if s != ABSENT)
    assert index.leased_copies == leased, f"leased_copies {index.leased_copies} != recount {leased}"
    for t, tier in enumerate(store.tiers):
        held = [b.slots[t] for b in blocks if b.slots[t] != ABSENT]
        assert index.resident_count(t) == len(held), f"{tier.name}: resident_count disagrees with slots"
        assert len(set(held)) == len(held), f"{tier.name}: a slot is held by two blocks"
        free = set(tier._free)
        assert len(free) == tier.free_slots, f"{tier.name}: a slot is on the free list twice"
        assert not free & set(held), f"{tier.name}: a held slot is also free"
        assert len(held) + tier.free_slots == tier.num_slots, f"{tier.name}: slots leaked"
        assert all(0 <= s < tier.num_slots for s in held)


@pytest.fixture
def layout() -> KVLayout:
    return tiny_layout()


@pytest.fixture
def namespace() -> Namespace:
    return Namespace(model="tiny-test")


# -- shared GPU budgets and child processes --------------------------------------------------------

CHECKOUT = Path(__file__).resolve().parents[1]


@pytest.fixture
def name() -> Iterator[str]:
    """A fresh GPU-budget name; its shared-memory table is removed afterwards."""
    from tierkv.tiers.elastic.budget import budget_path

    n = f"test-{uuid.uuid4().hex[:12]}"
    yield n
    budget_path(n).unlink(missing_ok=True)


def spawn(*args: str | Path, stdin: bool = False) -> subprocess.Popen[str]:
    """`python ARGS...` in a child process that imports tierkv from this checkout even if not installed."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(CHECKOUT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, *map(str, args)], stdin=subprocess.PIPE if stdin else None,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def ask(proc: subprocess.Popen[str], command: str) -> dict:
    """Send one command line to a child speaking JSON lines; its reply (or its stderr on death)."""
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(command + "\n")
    proc.stdin.flush()
    line = proc.stdout.readline()
    assert line, proc.stderr.read() if proc.stderr else "child died"
    return json.loads(line)
