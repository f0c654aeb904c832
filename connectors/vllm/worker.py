"""The worker's half of the connector: the writable store, and the copies between it and vLLM's pages.

Each worker (one per tensor-parallel rank) owns one `BlockStore` holding its shard of every block;
its disk tier lives in `<disk_path>/rank<R>-of-<N>` and is locked by that process alone. vLLM's
paged KV is the GPU tier, so by default the store has no device tier of its own: loads read
host or disk blocks and scatter them into the pages vLLM allocated for the request; saves gather
newly completed blocks out of vLLM's pages into the store.

Both directions go through the store's engine front door. A step's synchronous loads are
`load_layers`: on a GPU with the blocks in pinned host memory each layer is copied, hashed and
scattered on side streams, and `wait_for_layer_load(layer)` makes the forward pass wait for that
layer only, so the first layers compute while later ones are on the link (elsewhere the blocks
are loaded whole before the forward pass). Background loads are `load_into`. `save_from` gathers
the blocks past the stored prefix straight out of vLLM's pages.

Loads never produce a wrong token: the store verifies every block against its checksum and says
how far the verified run goes; whatever the scheduler promised beyond that is reported through
`load_errors`, and vLLM recomputes from the first such block and discards the step's output for
the request. A layer-wise load is verified once its last layer is in, which is after the forward
pass that used it: the verdict is taken in `wait_for_save` (before this step's saves, so a
request whose load fell short never has blocks computed from it stored) and at the latest in
`load_errors`. A step in which vLLM did not wait for every layer (its attention did not call
`wait_for_layer_load`) reports its layer-wise loads as failed.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from tierkv import BlockStore, CapacityError, EngineKV, KVLayout, LayerLoad, Namespace, StoreConfig, TierKVError

from .layout import AttentionKV, engine_block_table
from .meta import LoadJob, RankResidency, ResidencyReport, SaveJob, TierKVMetadata
from .saves import SaveQueue

log = logging.getLogger("tierkv.vllm")


def rank_store_config(config: StoreConfig, tp_rank: int, tp_size: int) -> StoreConfig:
    """The store config of one rank: its own disk subdirectory, so each rank's writer lock is its own."""
    if config.disk_path is None:
        return config
    return replace(config, disk_path=str(Path(config.disk_path).expanduser() / f"rank{tp_rank}-of-{tp_size}"))


@dataclass
class PendingLoad:
    """A synchronous load of this step still arriving layer by layer: verified at `WorkerSide._settle`."""

    job: LoadJob
    load: LayerLoad
    first: int
    want: int


class WorkerSide:
    """Loads, saves and residency reports of one worker; the store opens when vLLM registers its KV cache."""

    def __init__(self, layout: KVLayout, namespace: Namespace, config: StoreConfig, attention: AttentionKV,
                 async_saves: bool = True, max_pending_saves: int = 64) -> None:
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
        self._layer_index = {name: i for i, name in enumerate(attention.layer_names)}
        self._pending: list[PendingLoad] = []  # this step's layer-wise loads, until settled
        self._waited: set[int] = set()  # layers the forward pass waited for this step
        self._step_failed: set[str] = set()  # requests whose load this step fell short: no saves from them
        self._reported = False
        # Residency changes since the last report, collected after each store operation by the
        # thread that ran it, so the report itself never waits for the store lock.
        self._changes: dict[bytes, str | None] = {}
        self._changes_lock = threading.Lock()
        self._full = False
        self._saves = SaveQueue(self._save, self._engine_device, max_pending_saves) if async_saves else None
        self.counters = {"loaded_blocks": 0, "load_errors": 0, "saved_blocks": 0, "save_refused": 0,
                         "saves_skipped_after_load_error": 0}

    # -- lifecycle -------------------------------------------------------------------

    def open(self, engine: EngineKV) -> None:
        """Bind vLLM's pages and open the store (recovering its disk tier)."""
        engine.layout.check_store(self.layout)
        self.engine = engine
        if self.store is None:
            self.store = BlockStore(self.layout, self.namespace, self.config)
            with self._changes_lock:  # the next report lists the whole store, recovered blocks included
                self._changes, self._full = self.store.residency_changes(), True  # the first call: everything
            if self.store.recovery.blocks or self.store.recovery.dropped:
                log.info("tierkv: rank %d recovered %d blocks from %s (%d dropped)", self.rank,
                         self.store.recovery.blocks, self.config.disk_path, self.store.recovery.dropped)

    def _engine_device(self) -> torch.device | None:
        return None if self.engine is None else self.engine.device

    def unbind(self) -> None:
        """vLLM is about to release its pages (sleep mode): nothing may copy into or out of them until `bind`."""
        self._drain()
        self.engine = None

    def bind(self, engine: EngineKV) -> None:
        engine.layout.check_store(self.layout)
        self.engine = engine

    def close(self) -> None:
        """Finish background loads and saves, then close the store (which writes host-only blocks to disk)."""
        self._drain()
        self._pool.shutdown(wait=True)
        if self._saves is not None:
            self._saves.close()
        if self.store is not None:
            with self._store_lock:
                self.store.close()

    def _drain(self) -> None:
        self._settle()
        for future in list(self._async.values()):
            future.exception()  # waits; failures were turned into load errors by the job itself
        if self._saves is not None:
            self._saves.drain()

    def _collect_changes(self) -> None:
        """Fold what the last store operation changed into the next residency report (caller holds `_store_lock`)."""
        assert self.store is not None
        changes = self.store.residency_changes()
        if changes:
            with self._changes_lock:
                self._changes.update(changes)

    # -- loads -----------------------------------------------------------------------

    def start_loads(self, meta: TierKVMetadata) -> None:
        """Start this step's synchronous loads (layer by layer where the store can); background ones go to the loader."""
        self._waited.clear()
        for job in meta.loads:
            if job.is_async:
                self._async[job.req_id] = self._pool.submit(self._load_async, job)
            else:
                self._fail(job, self._load(job, background=False))

    def wait_for_layer(self, layer_name: str) -> None:
        """vLLM's attention for `layer_name` is next: its stream waits until that layer of this step's loads is in."""
        index = self._layer_index.get(layer_name)
        if index is None:
            return
        self._waited.add(index)
        for pending in self._pending:
            pending.load.wait(index)

    def _load_async(self, job: LoadJob) -> set[int]:
        try:
            return self._load(job, background=True)
        except Exception:  # a failed background load must not hang the request: recompute it all
            log.exception("tierkv: load of request %s failed; vLLM recomputes it", job.req_id)
            return self._failed_blocks(job, job.start)

    def _load(self, job: LoadJob, background: bool) -> set[int]:
        """Copy `job`'s blocks from the store into vLLM's pages; return the vLLM blocks that did not load.

        In the background (`load_into`), the copies are done when this returns. Otherwise
        (`load_layers`) a load still arriving layer by layer is kept for `_settle` and counts as
        complete until then.
        """
        if self.engine is None or self.store is None:
            return self._failed_blocks(job, job.start)
        bt = self.layout.block_tokens
        # Whole stored blocks only, and only those the request's pages can take in full.
        covered = len(job.block_ids) * self.attention.block_size // bt
        first = job.start // bt
        want = max(first, min(-(-job.end // bt), covered))
        table = engine_block_table(job.block_ids, self.attention, self.engine.layout)
        tokens = job.token_ids[: want * bt]
        try:
            with self._store_lock:
                if background:
                    got = self.store.load_into(self.engine, table, tokens, first_block=first, tenant=job.tenant)
                else:
                    load = self.store.load_layers(self.engine, table, tokens, first_block=first, tenant=job.tenant)
                    got = load.end
                self._collect_changes()
        except (TierKVError, OSError):  # an unreadable disk costs a recompute, not the engine
            log.exception("tierkv: request %s: reading stored blocks failed; vLLM recomputes them", job.req_id)
            return self._failed_blocks(job, job.start)
        if background and self.engine.device.type == "cuda":
            torch.cuda.current_stream(self.engine.device).synchronize()
        if not background and not load.finished:
            self._pending.append(PendingLoad(job, load, first, want))
            return set()
        return self._outcome(job, first, want, got)

    def _outcome(self, job: LoadJob, first: int, want: int, got: int) -> set[int]:
        """Count a load that ended at block `got`; the vLLM blocks it left to recompute."""
        bt = self.layout.block_tokens
        self.counters["loaded_blocks"] += got - first
        if got * bt >= job.end:
            return set()
        log.warning("tierkv: request %s: %d of %d stored blocks could not be read (evicted or corrupt); "
                    "vLLM recomputes them", job.req_id, want - got, want - first)
        return self._failed_blocks(job, max(job.start, got * bt))

    def _fail(self, job: LoadJob, failed: set[int]) -> None:
        """Note a synchronous load's shortfall: vLLM recomputes those blocks, and this step saves nothing of the request."""
        if failed:
            self._invalid |= failed
            self._step_failed.add(job.req_id)

    def _settle(self) -> None:
        """Verify this step's layer-wise loads (they are past the forward pass now) and note what fell short."""
        pending, self._pending = self._pending, []
        unwaited = len(self._waited) < len(self._layer_index)
        if pending and unwaited:
            log.warning("tierkv: vLLM ran attention without waiting for %d of %d layers' loads; this step's loaded "
                        "blocks are reported for recomputation", len(self._layer_index) - len(self._waited),
                        len(self._layer_index))
        for p in pending:
            try:
                got = p.load.finish()
            except Exception:  # a copy that failed on the device: nothing of the load counts
                log.exception("tierkv: request %s: the layer-wise load failed; vLLM recomputes it", p.job.req_id)
                got = p.first
            self._fail(p.job, self._outcome(p.job, p.first, p.want, p.first if unwaited else got))

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
        """The vLLM blocks this step (and finished background loads) failed to load; the step ends here."""
        self._settle()
        errors, self._invalid = self._invalid, set()
        self._step_failed.clear()
        return errors

    # -- saves -----------------------------------------------------------------------

    def save(self, meta: TierKVMetadata) -> None:
        """Store the blocks this step completed (`wait_for_save`: vLLM's pages hold their KV now).

        With asynchronous saves (the default) this only queues them; see `saves.py`.
        """
        self._settle()
        saves = [job for job in meta.saves if job.req_id not in self._step_failed]
        if len(saves) < len(meta.saves):
            self.counters["saves_skipped_after_load_error"] += len(meta.saves) - len(saves)
        if self.engine is None or self.store is None or not saves:
            return
        if self._saves is not None:
            self._saves.submit(saves)
            return
        for job in saves:
            self._save(job)

    def handle_preemptions(self, meta: TierKVMetadata) -> None:
        """vLLM is about to reuse the pages of preempted requests: their pending saves finish first."""
        if self._saves is not None and meta.preempted:
            self._saves.wait(meta.preempted)

    def finished_saves(self, finished_req_ids: set[str]) -> set[str]:
        """Finished requests whose saves are done: vLLM frees their blocks now."""
        return set() if self._saves is None else self._saves.finished(finished_req_ids)

    def _save(self, job: SaveJob) -> None:
        engine, store = self.engine, self.store
        if engine is None or store is None:  # unbound meanwhile (sleep mode)
            return
        table = engine_block_table(job.block_ids, self.attention, engine.layout)
        with self._store_lock:
            try:
                # Only the blocks past the stored prefix are gathered out of vLLM's pages.
                added = store.save_from(engine, table, job.token_ids, tenant=job.tenant)
            except CapacityError as e:
                self.counters["save_refused"] += 1
                log.warning("tierkv: request %s: blocks not stored: %s", job.req_id, e)
                return
            finally:
                self._collect_changes()
        self.counters["saved_blocks"] += added

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
        with self._changes_lock:
            changes, self._changes = self._changes, {}
            full, self._full = self._full, False
        if full:  # a full report lists what is stored: the snapshot with later changes folded in
            stored: dict[bytes, str | None] = {key: tier for key, tier in changes.items() if tier is not None}
            return ResidencyReport({self.rank: RankResidency(full=True, tiers=stored, order=self.store.tier_names)})
        return ResidencyReport({self.rank: RankResidency(full=False, tiers=changes)}) if changes else None

    def stats(self) -> dict[str, Any]:
        """The store's `stats()` plus the connector's own counters, for `collective_rpc`."""
        dropped = 0 if self._saves is None else self._saves.dropped
        return {"rank": self.rank, **self.counters, "save_dropped": dropped,
                "store": None if self.store is None else self.store.stats()}
