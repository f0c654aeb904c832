"""The worker's half of the connector: the writable store, and the copies between it and vLLM's pages.

Each worker (one per tensor-parallel rank) owns one `BlockStore` holding its shard of every block;
its disk tier lives in `<disk_path>/rank<R>-of-<N>` and is locked by that process alone. vLLM's
paged KV is the GPU tier, so by default the store has no device tier of its own: loads read
host or disk blocks and scatter them into the pages vLLM allocated for the request; saves gather
newly completed blocks out of vLLM's pages into the store.

Loads never produce a wrong token. `BlockStore.get` verifies every host and disk block against
its checksum and returns the longest prefix it could serve; whatever the scheduler promised
beyond that is reported through `load_errors`, and vLLM recomputes from the first such block.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from tierkv import BlockStore, CapacityError, KVLayout, Namespace, StoreConfig, TierKVError, chain_keys
from tierkv.ops.engine_layout import EngineKV, chunk_slots
from tierkv.ops.transfer import gather_engine_blocks, scatter_engine_blocks
from tierkv.residency import Churn, churn, fastest_tiers, snapshot

from .layout import AttentionKV, engine_block_table
from .meta import GONE, TIER_NAMES, LoadJob, RankResidency, ResidencyReport, SaveJob, TierKVMetadata

log = logging.getLogger("tierkv.vllm")


def rank_store_config(config: StoreConfig, tp_rank: int, tp_size: int) -> StoreConfig:
    """The store config of one rank: its own disk subdirectory, so each rank's writer lock is its own."""
    if config.disk_path is None:
        return config
    return replace(config, disk_path=str(Path(config.disk_path).expanduser() / f"rank{tp_rank}-of-{tp_size}"))


class WorkerSide:
    """Loads, saves and residency reports of one worker; the store opens when vLLM registers its KV cache."""

    def __init__(self, layout: KVLayout, namespace: Namespace, config: StoreConfig, attention: AttentionKV) -> None:
        self.layout = layout
        self.namespace = namespace
        self.config = config
        self.attention = attention
        self.rank = namespace.tp_rank
        self.store: BlockStore | None = None
        self.engine: EngineKV | None = None
        self._store_lock = threading.Lock()  # one store operation sequence at a time: saves and async loads
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tierkv-load")
        self._async: dict[str, Future[set[int]]] = {}
        self._invalid: set[int] = set()
        self._seeds: dict[str, bytes] = {}
        self._known: dict[bytes, int] = {}  # what the scheduler's mirror of this rank says
        self._touched: set[bytes] = set()
        self._reported = False
        self._churn: Churn | None = None
        self.counters = {"loaded_blocks": 0, "load_errors": 0, "saved_blocks": 0, "save_refused": 0}

    # -- lifecycle -------------------------------------------------------------------

    def open(self, engine: EngineKV) -> None:
        """Bind vLLM's pages and open the store (recovering its disk tier)."""
        engine.layout.check_store(self.layout)
        self.engine = engine
        if self.store is None:
            self.store = BlockStore(self.layout, self.namespace, self.config)
            self._reported = False  # the next report lists the whole store, recovered blocks included
            names = tuple(t.name for t in self.store.tiers)
            assert names == TIER_NAMES[: len(names)], f"unexpected tier order {names}"
            if self.store.recovery.blocks or self.store.recovery.dropped:
                log.info("tierkv: rank %d recovered %d blocks from %s (%d dropped)", self.rank,
                         self.store.recovery.blocks, self.config.disk_path, self.store.recovery.dropped)

    def unbind(self) -> None:
        """vLLM is about to release its pages (sleep mode): nothing may copy into them until `bind`."""
        self._drain()
        self.engine = None

    def bind(self, engine: EngineKV) -> None:
        engine.layout.check_store(self.layout)
        self.engine = engine

    def close(self) -> None:
        """Finish background loads, then close the store (which writes host-only blocks to disk)."""
        self._drain()
        self._pool.shutdown(wait=True)
        if self.store is not None:
            with self._store_lock:
                self.store.close()

    def _drain(self) -> None:
        for future in list(self._async.values()):
            future.exception()  # waits; failures were turned into load errors by the job itself

    # -- loads -----------------------------------------------------------------------

    def start_loads(self, meta: TierKVMetadata) -> None:
        """Run this step's synchronous loads now; hand asynchronous ones to the loader thread.

        Synchronous loads are queued on the current stream ahead of the forward pass, so every
        attention layer is ordered after them (on CPU they are simply done when this returns).
        """
        for job in meta.loads:
            if job.is_async:
                self._async[job.req_id] = self._pool.submit(self._load_async, job)
            else:
                self._invalid |= self._load(job, wait=False)

    def _load_async(self, job: LoadJob) -> set[int]:
        try:
            return self._load(job, wait=True)
        except Exception:  # a failed background load must not hang the request: recompute it all
            log.exception("tierkv: load of request %s failed; vLLM recomputes it", job.req_id)
            return self._failed_blocks(job, job.start)

    def _load(self, job: LoadJob, wait: bool) -> set[int]:
        """Copy `job`'s blocks from the store into vLLM's pages; return the vLLM blocks that did not load."""
        if self.engine is None or self.store is None:
            return self._failed_blocks(job, job.start)
        bt = self.layout.block_tokens
        # Whole stored blocks only, and only those the request's pages can take in full.
        covered = len(job.block_ids) * self.attention.block_size // bt
        first, want = job.start // bt, min(-(-job.end // bt), covered)
        try:
            with self._store_lock:
                blocks = self.store.get(job.token_ids[: want * bt], device=self.engine.device, tenant=job.tenant)
        except (TierKVError, OSError):  # an unreadable disk costs a recompute, not the engine
            log.exception("tierkv: request %s: reading stored blocks failed; vLLM recomputes them", job.req_id)
            return self._failed_blocks(job, job.start)
        got = min(blocks.shape[0], want)
        if got > first:
            table = engine_block_table(job.block_ids, self.attention, self.engine.layout)
            slots = chunk_slots(self.engine.layout, bt, table, range(first, got))
            done = scatter_engine_blocks(self.engine, slots, blocks, self.layout, rows=range(first, got))
            if wait and done is not None:
                done.synchronize()
            self.counters["loaded_blocks"] += got - first
        if got * bt >= job.end:
            return set()
        log.warning("tierkv: request %s: %d of %d stored blocks could not be read (evicted or corrupt); "
                    "vLLM recomputes them", job.req_id, want - got, want - first)
        return self._failed_blocks(job, max(job.start, got * bt))

    def _failed_blocks(self, job: LoadJob, from_token: int) -> set[int]:
        """vLLM block ids holding tokens `[from_token, job.end)`: what vLLM must recompute."""
        bs = self.attention.block_size
        failed = set(job.block_ids[from_token // bs: -(-job.end // bs)])
        self.counters["load_errors"] += len(failed)
        return failed

    def finished_loads(self) -> set[str]:
        """Requests whose background load is done (successfully or not); their failures join `load_errors`."""
        done = {req_id for req_id, future in self._async.items() if future.done()}
        for req_id in done:
            self._invalid |= self._async.pop(req_id).result()
        return done

    def load_errors(self) -> set[int]:
        errors, self._invalid = self._invalid, set()
        return errors

    # -- saves -----------------------------------------------------------------------

    def save(self, meta: TierKVMetadata) -> None:
        """Store the blocks this step completed (`wait_for_save`: vLLM's pages hold their KV now)."""
        if self.engine is None or self.store is None:
            return
        for job in meta.saves:
            self._save(job)

    def _save(self, job: SaveJob) -> None:
        assert self.engine is not None and self.store is not None
        bt = self.layout.block_tokens
        n = len(job.token_ids) // bt
        with self._store_lock:
            have = self.store.match(job.token_ids, tenant=job.tenant) // bt
            if have >= n:
                return
            # Only the blocks past the stored prefix are gathered out of vLLM's pages.
            kv = torch.empty((n - have, *self.layout.block_shape), dtype=self.layout.dtype)
            table = engine_block_table(job.block_ids, self.attention, self.engine.layout)
            slots = chunk_slots(self.engine.layout, bt, table, range(have, n))
            gather_engine_blocks(self.engine, slots, kv, self.layout)
            try:
                added = self.store.put(job.token_ids, kv, tenant=job.tenant, first_block=have)
            except CapacityError as e:
                self.counters["save_refused"] += 1
                log.warning("tierkv: request %s: blocks not stored: %s", job.req_id, e)
                return
        self.counters["saved_blocks"] += added
        self._touched.update(chain_keys(self._seed(job.tenant), job.token_ids, bt)[have:n])

    def _seed(self, tenant: str) -> bytes:
        seed = self._seeds.get(tenant)
        if seed is None:
            seed = self._seeds[tenant] = self.namespace.with_tenant(tenant).digest(self.layout)
        return seed

    # -- residency reports -------------------------------------------------------------

    def report(self) -> ResidencyReport | None:
        """What changed in this rank's store since the last report (everything, the first time).

        Before the store opens the report is an empty full one: the scheduler waits for every
        rank's first report, and a rank that has nothing must not keep it waiting.
        """
        if self.store is None:
            if self._reported:
                return None
            self._reported = True
            return ResidencyReport({self.rank: RankResidency(full=True, tiers={})})
        if not self._reported:
            self._reported = True
            self._churn = churn(self.store)
            self._known = snapshot(self.store)
            self._touched.clear()
            return ResidencyReport({self.rank: RankResidency(full=True, tiers=dict(self._known))})
        keys = self._touched
        now = churn(self.store)
        if now != self._churn:  # something left a tier on its own: re-check everything we reported
            self._churn = now
            keys = keys | self._known.keys()
        self._touched = set()
        if not keys:
            return None
        changes = {}
        for key, tier in fastest_tiers(self.store, keys).items():
            if self._known.get(key, GONE) == tier:
                continue
            changes[key] = tier
            if tier == GONE:
                del self._known[key]
            else:
                self._known[key] = tier
        return ResidencyReport({self.rank: RankResidency(full=False, tiers=changes)}) if changes else None

    def stats(self) -> dict[str, Any]:
        """The store's `stats()` plus the connector's own counters, for `collective_rpc`."""
        return {"rank": self.rank, **self.counters, "store": None if self.store is None else self.store.stats()}
