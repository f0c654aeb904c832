"""The synthetic chat workload and its replay: reproducible, really sharing prefixes, growing by turn."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tierkv import BlockStore, CapacityError, KVLayout, Namespace, StoreConfig
from tierkv.cli.workload import (
    SYNTHETIC_LAYOUT,
    SYNTHETIC_NAMESPACE,
    ChatWorkload,
    WrongKVError,
    check_fits,
    holds_synthetic_kv,
    replay,
    synthetic_kv,
)

SMALL = ChatWorkload(users=5, turns=4, system_prompts=2, system_tokens=64, user_tokens=16, answer_tokens=32, seed=7)


def as_tuples(workload: ChatWorkload) -> list[tuple[int, int, int, bytes]]:
    return [(r.user, r.turn, r.system_prompt, r.tokens.tobytes()) for r in workload.requests()]


def by_user(workload: ChatWorkload) -> dict[int, list[np.ndarray]]:
    out: dict[int, list[np.ndarray]] = {}
    for r in workload.requests():
        out.setdefault(r.user, []).append(r.tokens)
    return out


def store_for(workload: ChatWorkload, device_blocks: int, host_blocks: int) -> BlockStore:
    bb = SYNTHETIC_LAYOUT.block_bytes
    config = StoreConfig(device_bytes=device_blocks * bb, host_bytes=host_blocks * bb, device="cpu")
    return BlockStore(SYNTHETIC_LAYOUT, SYNTHETIC_NAMESPACE, config)


# -- the request stream --------------------------------------------------------------


def test_same_seed_same_stream_other_seed_other_stream() -> None:
    assert as_tuples(SMALL) == as_tuples(SMALL)
    other = ChatWorkload(**{**SMALL.__dict__, "seed": 8})
    assert as_tuples(other) != as_tuples(SMALL)


def test_every_user_gets_every_turn_in_order_and_users_interleave() -> None:
    reqs = list(SMALL.requests())
    assert len(reqs) == SMALL.num_requests == 20
    for user in range(SMALL.users):
        assert [r.turn for r in reqs if r.user == user] == list(range(SMALL.turns))
    users_in_order = [r.user for r in reqs]
    assert users_in_order != sorted(users_in_order), "requests should interleave users, not serve one after another"


def test_tokens_are_int32_within_the_vocabulary() -> None:
    wl = ChatWorkload(users=2, turns=2, vocab_size=50, system_tokens=32, user_tokens=8, answer_tokens=8)
    for r in wl.requests():
        assert r.tokens.dtype == np.int32 and r.tokens.ndim == 1
        assert 0 <= r.tokens.min() and r.tokens.max() < 50


def test_a_conversation_does_not_depend_on_the_other_users() -> None:
    few = by_user(ChatWorkload(**{**SMALL.__dict__, "users": 3}))
    many = by_user(SMALL)
    for user in range(3):
        assert [t.tobytes() for t in few[user]] == [t.tobytes() for t in many[user]]


def test_each_turn_extends_the_previous_prompt_by_its_answer_and_a_new_message() -> None:
    for prompts in by_user(SMALL).values():
        for turn, tokens in enumerate(prompts):
            assert len(tokens) == SMALL.prompt_tokens(turn)
            if turn:
                prev = prompts[turn - 1]
                assert np.array_equal(tokens[: len(prev)], prev)
                assert len(tokens) - len(prev) == SMALL.answer_tokens + SMALL.user_tokens
    assert SMALL.total_prompt_tokens == sum(len(r.tokens) for r in SMALL.requests())


def test_system_prompts_are_shared_by_their_users_and_differ_between_groups() -> None:
    st = SMALL.system_tokens
    groups: dict[int, list[np.ndarray]] = {}
    for r in SMALL.requests():
        if r.turn == 0:
            assert r.system_prompt == r.user % SMALL.system_prompts
            groups.setdefault(r.system_prompt, []).append(r.tokens)
    assert sorted(groups) == list(range(SMALL.system_prompts))
    for prompts in groups.values():
        assert len(prompts) > 1
        assert all(np.array_equal(p[:st], prompts[0][:st]) for p in prompts)
        # after the system prompt, every user says something of their own
        assert not np.array_equal(prompts[0][st:], prompts[1][st:])
    assert not np.array_equal(groups[0][0][:st], groups[1][0][:st])


def test_shared_system_prompt_blocks_are_found_in_a_store() -> None:
    """The sharing is real at the block level: one user's prompt makes another's prefix a hit."""
    first = {r.user: r for r in SMALL.requests() if r.turn == 0}
    with store_for(SMALL, 64, 64) as store:
        store.put(first[0].tokens, synthetic_kv(store.keys(first[0].tokens), SYNTHETIC_LAYOUT))
        assert store.match(first[2].tokens) == SMALL.system_tokens  # same system prompt, other user
        assert store.match(first[1].tokens) == 0  # other system prompt


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("users", 0, "users must be an int >= 1"),
        ("turns", True, "turns must be an int >= 1"),
        ("system_prompts", 1.5, "system_prompts must be an int >= 1"),
        ("answer_tokens", -1, "answer_tokens must be an int >= 0"),
        ("vocab_size", 2**31 + 1, "vocab_size must be <= 2\\*\\*31"),
        ("seed", -3, "seed must be an int >= 0"),
    ],
)
def test_bad_workload_fields_are_named(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ChatWorkload(**{field: value})


def test_an_empty_first_prompt_is_refused() -> None:
    with pytest.raises(ValueError, match="system_tokens and user_tokens are both 0"):
        ChatWorkload(system_tokens=0, user_tokens=0)


# -- synthetic KV --------------------------------------------------------------------


def test_synthetic_kv_is_a_deterministic_function_of_the_key() -> None:
    keys = [bytes([i]) * 16 for i in range(3)]
    a = synthetic_kv(keys, SYNTHETIC_LAYOUT)
    assert a.shape == (3, *SYNTHETIC_LAYOUT.block_shape) and a.dtype == SYNTHETIC_LAYOUT.dtype
    assert torch.equal(a.view(torch.uint8), synthetic_kv(keys, SYNTHETIC_LAYOUT).view(torch.uint8))
    assert torch.equal(a[1:2].view(torch.uint8), synthetic_kv(keys[1:2], SYNTHETIC_LAYOUT).view(torch.uint8))
    assert not torch.equal(a[0].view(torch.uint8), a[1].view(torch.uint8))
    assert synthetic_kv([], SYNTHETIC_LAYOUT).shape == (0, *SYNTHETIC_LAYOUT.block_shape)


def test_holds_synthetic_kv_spots_any_changed_byte() -> None:
    keys = [bytes([i]) * 8 + bytes(range(8)) for i in range(4)]
    kv = synthetic_kv(keys, SYNTHETIC_LAYOUT)
    assert holds_synthetic_kv(kv, keys)
    assert holds_synthetic_kv(kv[:0], [])
    assert not holds_synthetic_kv(kv[:3], keys)  # one block short
    assert not holds_synthetic_kv(kv, keys[::-1])  # blocks in the wrong order
    raw = kv.clone().view(torch.uint8).view(4, -1)
    raw[2, 12345] ^= 1
    assert not holds_synthetic_kv(raw.view(SYNTHETIC_LAYOUT.dtype).view(kv.shape), keys)


def test_synthetic_kv_needs_blocks_made_of_whole_keys() -> None:
    odd = KVLayout(num_layers=1, kv_factor=1, num_kv_heads=1, head_dim=5, dtype="uint8", block_tokens=3)  # 15 bytes
    with pytest.raises(ValueError, match="block_bytes must be a multiple of 16, got 15"):
        synthetic_kv([bytes(16)], odd)
    config = StoreConfig(device_bytes=10 * odd.block_bytes, host_bytes=0, device="cpu")
    with BlockStore(odd, SYNTHETIC_NAMESPACE, config) as store:
        with pytest.raises(ValueError, match="multiple of 16"):
            replay(store, SMALL.requests())


# -- replay --------------------------------------------------------------------------


def test_replay_serves_what_was_computed_before_and_accounts_for_every_token() -> None:
    with store_for(SMALL, 256, 256) as store:  # big enough for everything: nothing is recomputed
        result = replay(store, SMALL.requests())
        assert result.requests == SMALL.num_requests
        assert result.prompt_tokens == SMALL.total_prompt_tokens
        assert result.served_tokens + result.computed_tokens == result.prompt_tokens
        assert result.verified_blocks * 16 == result.served_tokens
        # Computed: each system prompt once, then per prompt what the store cannot have seen yet:
        # its partial last block and every block after the previous prompt's last full block.
        expected_computed = SMALL.system_prompts * SMALL.system_tokens
        for prompts in by_user(SMALL).values():
            covered = SMALL.system_tokens
            for tokens in prompts:
                expected_computed += len(tokens) - covered
                covered = len(tokens) // 16 * 16
        assert result.computed_tokens == expected_computed
        again = replay(store, SMALL.requests())
        assert again.computed_tokens == sum(len(r.tokens) % 16 for r in SMALL.requests())


def test_replay_under_pressure_demotes_and_drops_yet_serves_only_correct_kv() -> None:
    with store_for(SMALL, 16, 24) as store:
        result = replay(store, SMALL.requests())
        stats = store.stats()
    assert result.served_tokens > 0
    assert stats["bytes_moved"]["device->host"] > 0
    assert stats["tiers"]["device"]["evictions"] > 0 and stats["dropped"] > 0


def test_replay_detects_a_store_serving_the_wrong_kv() -> None:
    wl = ChatWorkload(users=2, turns=1, system_prompts=1, system_tokens=32, user_tokens=16, answer_tokens=0)
    first = next(wl.requests())
    with store_for(wl, 8, 8) as store:
        wrong = torch.zeros((3, *SYNTHETIC_LAYOUT.block_shape), dtype=SYNTHETIC_LAYOUT.dtype)
        store.put(first.tokens, wrong)
        with pytest.raises(WrongKVError, match=f"user {first.user} turn 0: the store served 3 blocks"):
            replay(store, wl.requests())


def test_check_fits_refuses_tiers_smaller_than_the_longest_prompt() -> None:
    need = SMALL.prompt_tokens(SMALL.turns - 1) // 16
    with store_for(SMALL, need // 2, need - need // 2) as store:
        check_fits(store, SMALL)
    with store_for(SMALL, need // 2, need - need // 2 - 1) as store:
        with pytest.raises(CapacityError, match=f"the longest prompt needs {need} blocks"):
            check_fits(store, SMALL)


def test_replay_on_another_namespace_stays_correct() -> None:
    """The replay derives keys from the store's own namespace, so any namespace works."""
    bb = SYNTHETIC_LAYOUT.block_bytes
    config = StoreConfig(device_bytes=64 * bb, host_bytes=64 * bb, device="cpu")
    with BlockStore(SYNTHETIC_LAYOUT, Namespace(model="other", tenant="t1"), config) as store:
        assert replay(store, SMALL.requests()).served_tokens > 0


def test_put_finds_room_whenever_unleased_blocks_could_make_it() -> None:
    """A workload that once deadlocked eviction: the device tier full of chain tails whose heads
    filled the host tier, so neither had an evictable leaf and put raised CapacityError with 88
    of 192 slots leased."""
    wl = ChatWorkload(users=6, turns=3, seed=2)
    tiny = KVLayout(num_layers=1, kv_factor=1, num_kv_heads=1, head_dim=8, dtype="uint8", block_tokens=16)
    config = StoreConfig(device_bytes=64 * tiny.block_bytes, host_bytes=128 * tiny.block_bytes, device="cpu")
    with BlockStore(tiny, SYNTHETIC_NAMESPACE, config) as store:  # only block counts matter here
        result = replay(store, wl.requests())
    assert result.first_capacity_error is None
    assert result.unstored_requests == 0


def test_replay_counts_requests_whose_blocks_could_not_be_stored() -> None:
    wl = ChatWorkload(users=2, turns=1, system_prompts=2, system_tokens=32, user_tokens=16, answer_tokens=0)
    first, second = wl.requests()
    with store_for(wl, 3, 0) as store:  # room for one 3-block prompt
        assert replay(store, [first]).unstored_requests == 0
        with store.lease(first.tokens):  # its blocks cannot make room for the second prompt
            result = replay(store, [second])
    assert result.unstored_requests == 1
    assert result.first_capacity_error is not None and "cannot store 3 new blocks" in result.first_capacity_error
    assert result.computed_tokens == 48
