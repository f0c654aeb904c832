"""Concurrent put/get/match/lease from several threads: data stays bit-exact, the index consistent."""

from __future__ import annotations

import random
import threading
import time

import torch

from conftest import BLOCK_TOKENS, check_index_invariants, kv_for, make_store, prompt, same_bits
from tierkv import CapacityError, KVLayout

NUM_THREADS = 6
SECONDS = 2.0


def overlapping_prompts() -> list[list[int]]:
    """Three system prompts, each continued by several user turns of different lengths."""
    prompts = []
    for s in range(3):
        system = prompt(1000 * s, 2)
        for u in range(4):
            prompts.append(system + prompt(1000 * s + 100 * (u + 1), 1 + u % 3, extra=u))
            prompts.append(prompts[-1] + prompt(1000 * s + 100 * (u + 1) + 50, 2))
    return prompts


def worker(store, layout: KVLayout, prompts, kvs, seed: int, stop: float, errors: list, counts: dict) -> None:
    rng = random.Random(seed)
    owner = f"thread-{seed}"
    held = []
    try:
        while time.monotonic() < stop:
            i = rng.randrange(len(prompts))
            tokens, kv = prompts[i], kvs[i]
            op = rng.random()
            if op < 0.35:
                try:
                    store.put(tokens, kv)
                    counts["put"] += 1
                except CapacityError:
                    counts["capacity"] += 1
            elif op < 0.7:
                got = store.get(torch.tensor(tokens))
                assert same_bits(got, kv[: got.shape[0]]), f"get returned wrong bytes for prompt {i}"
                counts["get"] += 1
            elif op < 0.85:
                n = store.match(tokens)
                assert n % BLOCK_TOKENS == 0 and n <= len(tokens)
                counts["match"] += 1
            elif op < 0.95:
                lease = store.lease(tokens, owner=owner)
                held.append((lease, tokens))
                assert store.match(tokens) >= lease.num_tokens, "a leased prefix shrank"
                if len(held) > 2:
                    held.pop(0)[0].release()
                counts["lease"] += 1
            else:
                store.release_owner(owner)
                held.clear()
        store.release_owner(owner)
    except BaseException as e:  # reported by the main thread
        errors.append(e)


def test_concurrent_random_operations_keep_data_and_index_consistent(layout) -> None:
    prompts = overlapping_prompts()
    kvs = [kv_for(layout, p) for p in prompts]
    with make_store(6, 12, layout) as store:
        errors: list[BaseException] = []
        counts = {"put": 0, "get": 0, "match": 0, "lease": 0, "capacity": 0}
        stop = time.monotonic() + SECONDS
        threads = [
            threading.Thread(target=worker, args=(store, layout, prompts, kvs, seed, stop, errors, counts))
            for seed in range(NUM_THREADS)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors[0]
        assert counts["put"] > 0 and counts["get"] > 0 and counts["lease"] > 0
        check_index_invariants(store)
        assert all(b.leases == 0 for b in store.index.blocks.values())
        assert store.stats()["leased_owners"] == 0
        for tokens, kv in zip(prompts, kvs):
            got = store.get(tokens)
            assert got.shape[0] * BLOCK_TOKENS == store.match(tokens)
            assert same_bits(got, kv[: got.shape[0]])
        check_index_invariants(store)
        assert store.stats()["tiers"]["device"]["evictions"] > 0  # the run did exercise pressure


def test_racing_puts_of_one_prompt_store_each_block_once(layout) -> None:
    tokens = prompt(0, 8)
    kv = kv_for(layout, tokens)
    with make_store(16, 16, layout) as store:
        barrier = threading.Barrier(NUM_THREADS)
        stored: list[int] = []
        errors: list[BaseException] = []

        def put() -> None:
            try:
                barrier.wait()
                stored.append(store.put(tokens, kv))
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=put) for _ in range(NUM_THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors[0]
        assert sum(stored) == 8 and len(stored) == NUM_THREADS
        assert store.stats()["bytes_moved"]["put->device"] == 8 * layout.block_bytes
        assert same_bits(store.get(tokens), kv)
        check_index_invariants(store)
