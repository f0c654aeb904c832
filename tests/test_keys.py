"""Chained block keys: an independent reference, token input forms, and collision safety."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
import xxhash

from tierkv import chain_keys
from tierkv.keys import as_token_array, block_chunks, iter_chain, longest_stored_prefix

SEED = bytes(range(16))
BT = 4


def reference_keys(seed: bytes, tokens: list[int], block_tokens: int) -> list[bytes]:
    """The key format from the design, written out the slow obvious way."""
    keys, prev = [], seed
    for i in range(len(tokens) // block_tokens):
        block = np.asarray(tokens[i * block_tokens : (i + 1) * block_tokens], dtype=np.int32)
        prev = xxhash.xxh3_128_digest(prev + block.astype("<i4").tobytes())
        keys.append(prev)
    return keys


@dataclass
class Entry:
    ident: bytes
    name: str


def test_chain_keys_match_reference() -> None:
    rng = np.random.default_rng(0)
    tokens = rng.integers(-(2**31), 2**31 - 1, size=203, dtype=np.int64).tolist()
    keys = chain_keys(SEED, tokens, 16)
    assert keys == reference_keys(SEED, tokens, 16)
    assert len(keys) == 12 and all(len(k) == 16 for k in keys)


def test_keys_are_chained_not_per_block() -> None:
    a = chain_keys(SEED, [1, 2, 3, 4, 9, 9, 9, 9], BT)
    b = chain_keys(SEED, [5, 6, 7, 8, 9, 9, 9, 9], BT)
    assert a[1] != b[1]  # same second block, different prefix
    assert chain_keys(bytes(16), [1, 2, 3, 4], BT) != a[:1]  # the seed matters


def test_token_input_forms_give_identical_keys() -> None:
    tokens = list(range(1000, 1037))
    expected = chain_keys(SEED, tokens, BT)
    forms = [
        np.array(tokens, dtype=np.int64),
        np.array(tokens, dtype=np.int32),
        np.array(tokens, dtype=np.uint16),
        np.array(tokens, dtype=">i4"),  # big-endian input must still hash as little-endian
        torch.tensor(tokens, dtype=torch.int64),
        torch.tensor(tokens, dtype=torch.int32),
        torch.tensor(tokens, dtype=torch.int64).repeat_interleave(2)[::2],  # non-contiguous view
        tuple(tokens),
    ]
    for form in forms:
        assert chain_keys(SEED, form, BT) == expected, type(form)


def test_trailing_partial_block_is_ignored() -> None:
    base = chain_keys(SEED, list(range(8)), BT)
    assert chain_keys(SEED, list(range(11)), BT) == base
    assert chain_keys(SEED, list(range(3)), BT) == []
    assert chain_keys(SEED, [], BT) == []


@pytest.mark.parametrize(
    "tokens",
    [
        [1.0, 2.0, 3.0, 4.0],
        [True, False, True, False],
        ["a", "b", "c", "d"],
        np.array([1.5, 2.0, 3.0, 4.0]),
        np.array([True, False, True, True]),
        torch.tensor([1.0, 2.0, 3.0, 4.0]),
        torch.tensor([True, False, True, True]),
        [2**70, 1, 2, 3],
        [None, 1, 2, 3],
    ],
)
def test_non_integer_tokens_raise_type_error(tokens: object) -> None:
    with pytest.raises(TypeError, match="tokens must be"):
        chain_keys(SEED, tokens, BT)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "tokens",
    [
        [[1, 2], [3, 4]],
        np.zeros((2, 4), dtype=np.int64),
        torch.zeros((2, 4), dtype=torch.int64),
        np.int64(7),
    ],
)
def test_non_1d_tokens_raise_value_error(tokens: object) -> None:
    with pytest.raises(ValueError, match="tokens must be one-dimensional"):
        chain_keys(SEED, tokens, BT)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "tokens",
    [
        [2**31, 0, 0, 0],
        [-(2**31) - 1, 0, 0, 0],
        np.array([0, 0, 0, 2**40], dtype=np.int64),
        np.array([0, 0, 0, 2**32], dtype=np.uint64),
        torch.tensor([0, 0, 0, -(2**40)]),
    ],
)
def test_out_of_int32_tokens_raise_value_error(tokens: object) -> None:
    with pytest.raises(ValueError, match="token ids must fit in int32"):
        chain_keys(SEED, tokens, BT)  # type: ignore[arg-type]


def test_int32_extremes_are_valid_tokens() -> None:
    tokens = [-(2**31), 2**31 - 1, 0, -1]
    assert chain_keys(SEED, tokens, BT) == reference_keys(SEED, tokens, BT)


def test_as_token_array_is_contiguous_little_endian_int32() -> None:
    arr = as_token_array(torch.arange(10)[::3])
    assert arr.dtype == np.dtype("<i4") and arr.flags.c_contiguous
    assert arr.tolist() == [0, 3, 6, 9]
    assert as_token_array([]).tolist() == []


def test_block_chunks_are_per_block_token_bytes() -> None:
    arr = as_token_array(list(range(10)))
    chunks = block_chunks(arr, BT)
    assert chunks == [np.arange(0, 4, dtype="<i4").tobytes(), np.arange(4, 8, dtype="<i4").tobytes()]


def test_iter_chain_yields_keys_and_idents() -> None:
    tokens = list(range(12))
    chunks = block_chunks(as_token_array(tokens), BT)
    pairs = list(iter_chain(SEED, chunks))
    assert [k for k, _ in pairs] == chain_keys(SEED, tokens, BT)
    prev = SEED
    for (key, ident), chunk in zip(pairs, chunks):
        assert ident == prev + chunk
        assert key == xxhash.xxh3_128_digest(ident)
        prev = key


def _stored(seed: bytes, tokens: list[int], num_blocks: int) -> dict[bytes, Entry]:
    chunks = block_chunks(as_token_array(tokens), BT)
    return {k: Entry(ident, f"b{i}") for i, (k, ident) in enumerate(iter_chain(seed, chunks)) if i < num_blocks}


@pytest.mark.parametrize("num_stored", [0, 1, 3, 5])
def test_longest_stored_prefix_agrees_with_iter_chain(num_stored: int) -> None:
    tokens = list(range(21))
    stored = _stored(SEED, tokens, num_stored)
    chunks = block_chunks(as_token_array(tokens), BT)
    found = longest_stored_prefix(SEED, chunks, stored)
    assert [e.name for e in found] == [f"b{i}" for i in range(num_stored)]
    # Walking iter_chain by hand and stopping at the first miss gives the same entries.
    by_hand = []
    for key, ident in iter_chain(SEED, chunks):
        e = stored.get(key)
        if e is None or e.ident != ident:
            break
        by_hand.append(e)
    assert by_hand == found


def test_lookup_stops_at_a_gap() -> None:
    tokens = list(range(16))
    stored = _stored(SEED, tokens, 4)
    keys = chain_keys(SEED, tokens, BT)
    del stored[keys[1]]
    found = longest_stored_prefix(SEED, block_chunks(as_token_array(tokens), BT), stored)
    assert [e.name for e in found] == ["b0"]


@pytest.mark.parametrize("forged", [0, 2])
def test_collision_with_wrong_ident_is_a_miss(forged: int) -> None:
    """A key that matches but names other tokens (a hash collision) must end the prefix there."""
    tokens = list(range(16))
    stored = _stored(SEED, tokens, 4)
    key = chain_keys(SEED, tokens, BT)[forged]
    stored[key] = Entry(stored[key].ident[:-1] + b"\xff", "forged")
    found = longest_stored_prefix(SEED, block_chunks(as_token_array(tokens), BT), stored)
    assert [e.name for e in found] == [f"b{i}" for i in range(forged)]


def test_other_seed_finds_nothing() -> None:
    tokens = list(range(16))
    stored = _stored(SEED, tokens, 4)
    assert longest_stored_prefix(bytes(16), block_chunks(as_token_array(tokens), BT), stored) == []
