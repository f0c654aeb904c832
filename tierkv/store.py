"""`BlockStore`: the public put / match / get / lease API, and the engine's front door (save_from / load_into).

The store owns the lock, the index, the tiers and the counters; it finds a prompt's stored
prefix once per call and hands the moves to the placement policy (`placement.py`) and to the
tiers themselves (`tiers/`). It never asks what kind a tier is: tiers say what they can do.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from .checks import check_first_block, engine_memory, kv_rows, memory_device, same_process, store_arguments
from .config import StoreConfig
from .errors import TierKVError
from .index import Block, Index
from .keys import KeyChain, Tokens, as_token_array, block_chunks
from .layer_load import LayerLoad
from .layout import KVLayout
from .leases import Lease, LeaseBook
from .metrics import Exporter, OperationLatency, render, store_families
from .namespace import Namespace
from .ops.engine_layout import EngineKV, chunk_slots
from .ops.layer_copy import PATHS as LAYER_COPY_PATHS
from .placement import GpuChecksums, Placement, Verified, Writer
from .shared_tiers import SharedTiers
from .stats import StoreCounters
from .tiers import StoreAccess, Tier, TierAgent, TierSpec, build_tiers, close_tiers
from .tiers.base import Recovery
from .timed import timed
from .views import StoreViews

_MAX_READ_ATTEMPTS = 4  # a read retries after dropping corrupt copies; each retry sees fewer


class BlockStore:
    """Content-addressed KV blocks in a hierarchy of tiers (device, host, disk), fastest first.

    `tokens` anywhere may be a list of ints, a 1-D integer numpy array or a 1-D integer tensor.
    Only full blocks of `layout.block_tokens` tokens are stored; a trailing partial block is
    ignored. `tenant` salts the key chain for requests that must not share KV with others.
    """

    def __init__(self, layout: KVLayout, namespace: Namespace, config: StoreConfig | None = None) -> None:
        config = store_arguments(layout, namespace, config)
        self.layout = layout
        self.namespace = namespace
        self.config = config
        self.chain = KeyChain(namespace, layout)
        self.tiers: list[Tier] = build_tiers(TierSpec(config, layout, namespace))
        self._persistent = [t for t, tier in enumerate(self.tiers) if tier.persistent]
        self.index = Index(len(self.tiers), journaled=self._persistent)
        self._lock = threading.RLock()
        self._pid = os.getpid()  # a forked child gets a copy whose locks and threads did not survive the fork
        self._leases = LeaseBook(self.index, self._lock, layout.block_tokens)
        self._counters = StoreCounters.for_tiers([t.name for t in self.tiers])
        self._latency = OperationLatency()
        self._exporter: Exporter | None = None
        self.placement = Placement(self.tiers, self.index, self._counters)
        self._shared = SharedTiers(self.tiers, self.index, self.placement)
        self._views = StoreViews(self.tiers, self.index, self._counters, layout.block_bytes)
        self._closed = False
        self._layer_loads: set[LayerLoad] = set()  # queued layer-wise loads, finished before close
        try:
            self.recovery = Recovery()
            for t in self._persistent:
                found = self.tiers[t].recover(self.index, t)
                self.recovery = Recovery(self.recovery.blocks + found.blocks, self.recovery.dropped + found.dropped)
            self._agents: dict[int, TierAgent] = {}
            for t, tier in enumerate(self.tiers):
                agent = tier.agent(StoreAccess(self.placement, self._lock, self._locked, t, lambda: self._closed))
                if agent is not None:
                    self._agents[t] = agent
            if config.metrics_port is not None:
                self._exporter = Exporter(self.metric_families, namespace.model, config.metrics_port, config.metrics_host)
        except BaseException:
            close_tiers(self.tiers)
            raise

    # -- lifecycle -----------------------------------------------------------------

    def close(self) -> None:
        """Release memory; with a persistent tier, first write down what lives only above it.

        In a process forked from the one that opened the store, nothing is done: the files and
        memory are the parent's, and the parent closes them.
        """
        if os.getpid() != self._pid:
            return
        for load in list(self._layer_loads):
            load.finish()  # their copies read host slots that closing frees
        with self._lock:
            if self._closed:
                return
            try:
                for t in self._persistent:
                    if self.config.flush_on_close:
                        self.placement.flush_into(t)
                    self.tiers[t].flush(self.index, t)
                self._commit()
            finally:
                self._closed = True
                if self._exporter is not None:
                    self._exporter.close()
                for agent in self._agents.values():
                    agent.close()
                close_tiers(self.tiers)

    def __enter__(self) -> BlockStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the store lock for one public operation; tiers' agents act around it, changes commit after it."""
        self._check_process()
        with self._lock:
            if self._closed:
                raise TierKVError("this BlockStore is closed; open a new one")
            for agent in self._agents.values():
                agent.before_operation()
            try:
                yield
            finally:
                self._commit()
                for agent in self._agents.values():
                    agent.after_operation()

    def _check_process(self) -> None:
        same_process(self._pid)

    def _commit(self) -> None:
        for t in self._persistent:
            for block in self.tiers[t].commit(self.index, t):
                self.placement.discard_copy(block, t)  # its write failed

    @property
    def device(self) -> torch.device:
        """Where `get` returns blocks by default: the fastest tier's memory."""
        return self.tiers[0].device

    @property
    def tier_names(self) -> tuple[str, ...]:
        """The tiers' names, fastest first: what `residency` and `stats()` name them by."""
        return tuple(t.name for t in self.tiers)

    # -- blocks --------------------------------------------------------------------

    @timed("match")
    def match(self, tokens: Tokens, tenant: str | None = None) -> int:
        """How many leading tokens are covered by stored blocks, in any tier (shared ones asked too). Changes nothing."""
        chunks = self.chain.chunks(tokens)
        seed = self.chain.seed(tenant)
        with self._locked():
            found = self.index.lookup(seed, chunks)
            return (len(found) + self._shared.continue_chain(seed, chunks, found, adopt=False)) * self.layout.block_tokens

    @timed("put")
    def put(self, tokens: Tokens, kv: torch.Tensor, tenant: str | None = None, first_block: int = 0) -> int:
        """Store every full block of `tokens`; `kv` is `[num_full_blocks - first_block, *layout.block_shape]`.

        `first_block` lets a caller that knows blocks `0..first_block-1` are stored pass only
        the KV of the rest (an engine after a prefix hit); if fewer are stored by then, nothing
        is stored, since the chain would have a gap. Blocks already stored are only touched.
        New blocks go to the fastest tier with room after evicting least-recently-used leaves;
        if they cannot all be placed, nothing is written and `CapacityError` says why.
        Returns the number of blocks newly stored.
        """
        arr = as_token_array(tokens)
        rows = kv_rows(self.layout, kv, len(arr), first_block)  # checked before placement evicts anything for it
        sums = GpuChecksums(rows, first_block)

        def write(t: int, slots: list[int], span: slice, blocks: list[Block]) -> None:
            sums.stamp(blocks, span)
            self.placement.write(t, slots, rows[span.start - first_block : span.stop - first_block], blocks, "put")

        return self._store_chain(block_chunks(arr, self.layout.block_tokens), tenant, first_block, write, sums.start)

    @timed("save_from")
    def save_from(self, engine: EngineKV, block_table: Sequence[int] | torch.Tensor, tokens: Tokens,
                  first_block: int = 0, tenant: str | None = None) -> int:
        """Store the full blocks of `tokens` whose KV sits in the engine's pages; returns blocks newly stored.

        `block_table` lists the sequence's engine blocks in order (`engine.layout.block_size`
        tokens each) and must cover every full block of `tokens`. The stored prefix is found once;
        only the blocks past it are gathered out of the engine's pages, straight into the slots
        they get (pinned host memory behind an engine's own GPU pages), never through a pageable
        temporary. `first_block` and `CapacityError` behave as in `put`.
        """
        chunks, slots_of = self._engine_chunks(engine, block_table, tokens, first_block)

        def write(t: int, slots: list[int], span: slice, blocks: list[Block]) -> None:
            self.tiers[t].save_from_engine(slots, engine, slots_of[span], self.layout, blocks)
            self._counters.moved_bytes("engine", self.tiers[t].name, len(slots) * self.layout.block_bytes)

        return self._store_chain(chunks, tenant, first_block, write)

    def _engine_chunks(self, engine: EngineKV, block_table: Sequence[int] | torch.Tensor, tokens: Tokens,
                       first_block: int) -> tuple[list[bytes], torch.Tensor]:
        """The engine door's checks, then the chain's chunks and each block's engine token slots (`chunk_slots`)."""
        engine_memory(engine)
        engine.layout.check_store(self.layout)
        chunks = self.chain.chunks(tokens)
        check_first_block(first_block, len(chunks))
        return chunks, chunk_slots(engine.layout, self.layout.block_tokens, block_table, range(len(chunks)))

    def _store_chain(self, chunks: list[bytes], tenant: str | None, first_block: int, write: Writer,
                     prepare: Callable[[int], None] | None = None) -> int:
        """Add the blocks of `chunks` past the stored prefix: placed, indexed, then written by `write`.

        `prepare(k)`, if given, is told the chain position of the first new block before any is
        placed (a put queues its GPU hash there, to run while the host makes room).
        """
        seed = self.chain.seed(tenant)
        n = len(chunks)
        with self._locked():
            existing = self.index.lookup(seed, chunks)
            k = len(existing)
            self.index.touch(existing)
            self._counters.puts += 1
            if k == n or k < first_block:
                return 0
            chain = self.index.unknown_links(existing[-1].key if existing else seed, chunks[k:])
            if not chain:
                return 0
            if prepare is not None:
                prepare(k)
            self.index.acquire(existing)  # their children are about to arrive: keep them here
            try:
                self.placement.add_chain(existing[-1] if existing else None, chain, k, write)
            finally:
                self.index.release(existing)
            return len(chain)

    @timed("get")
    def get(self, tokens: Tokens, device: torch.device | str | None = None, tenant: str | None = None,
            first_block: int = 0) -> torch.Tensor:
        """Blocks `first_block..` of the longest stored prefix, bit-exact, as `[n, *layout.block_shape]` on `device`.

        Blocks found in a slower tier are promoted to the fastest tier with slots on the way
        (their slower copy stays valid). `get(t).shape[0] * block_tokens == match(t)`; with
        `first_block`, the blocks before it are not read (an engine that holds them already).
        """
        out_device = memory_device(device) if device is not None else self.device  # before promotion moves anything
        chunks = self.chain.chunks(tokens)
        check_first_block(first_block, len(chunks))

        def serve(blocks: list[Block], verified: Verified) -> torch.Tensor:
            return self.placement.gather(blocks, out_device, verified)

        rows = self._read_chain(chunks, tenant, first_block, serve)
        if rows is None:
            return torch.empty((0, *self.layout.block_shape), dtype=self.layout.dtype, device=out_device)
        return rows.view(self.layout.dtype).reshape(rows.shape[0], *self.layout.block_shape)

    @timed("load_into")
    def load_into(self, engine: EngineKV, block_table: Sequence[int] | torch.Tensor, tokens: Tokens,
                  first_block: int = 0, tenant: str | None = None) -> int:
        """Copy the stored prefix of `tokens` into the engine's pages; returns where the loaded run ends, in blocks.

        Blocks before `first_block` (those the engine holds already) are neither read nor copied;
        each block loaded is verified first and copied straight from its slot into the pages
        `block_table` names (which must cover every full block of `tokens`). The result is
        `first_block` plus the blocks loaded: less than the full blocks of `tokens` when the rest
        is not stored (or failed its checksum), and the engine must compute from there. GPU
        copies are ordered on the engine device's current stream.
        """
        chunks, slots_of = self._engine_chunks(engine, block_table, tokens, first_block)

        def serve(blocks: list[Block], verified: Verified) -> int:
            self.placement.load_into_engine(blocks, engine, slots_of[first_block:], self.layout, verified)
            return len(blocks)

        loaded = self._read_chain(chunks, tenant, first_block, serve)
        return first_block + (loaded or 0)

    @timed("load_layers")
    def load_layers(self, engine: EngineKV, block_table: Sequence[int] | torch.Tensor, tokens: Tokens,
                    first_block: int = 0, tenant: str | None = None, *, path: str = "dma") -> LayerLoad:
        """`load_into`, queued layer by layer: returns at once with a `LayerLoad` the engine waits on per layer.

        For an engine on a GPU whose blocks lie in pinned host memory, each layer of every block
        is copied (one DMA per run of consecutive slots; `path="kernel"` uses a copy kernel
        instead), hashed on the GPU and scattered into the pages on side streams; `wait(layer)`
        orders the caller's stream after it, and `finish()` verifies the whole blocks and returns
        the end of the run that passed (the engine must recompute from there; see `LayerLoad`).
        Otherwise the blocks are loaded whole and verified before this returns, as `load_into`
        does. The blocks stay leased until `finish()`, which `close()` also calls.
        """
        if path not in LAYER_COPY_PATHS:
            raise ValueError(f"path must be one of {LAYER_COPY_PATHS}, got {path!r}")
        chunks, slots_of = self._engine_chunks(engine, block_table, tokens, first_block)

        def serve(blocks: list[Block], verified: Verified) -> LayerLoad:
            end = first_block + len(blocks)
            started = self.placement.start_layer_load(blocks, engine, slots_of[first_block:end], self.layout,
                                                      verified, path)
            if started is None:
                self.placement.load_into_engine(blocks, engine, slots_of[first_block:], self.layout, verified)
                return LayerLoad(end)
            t, copy = started
            self.index.acquire(blocks)  # the copies read the slots until finish()
            load = LayerLoad(end, copy, lambda bad: self._settle_layer_load(load, blocks, t, first_block, bad))
            self._layer_loads.add(load)
            return load

        load = self._read_chain(chunks, tenant, first_block, serve)
        return load if load is not None else LayerLoad(first_block)

    def _settle_layer_load(self, load: LayerLoad, blocks: list[Block], t: int, first_block: int,
                           bad: list[int] | None) -> int:
        """The end of a layer-wise load: lease released, failed copies dropped; where the verified run ends."""
        with self._lock:
            self._layer_loads.discard(load)
            self.index.release(blocks)
            if bad is None:
                return first_block
            if bad:
                self.placement.count_corrupt(t, len(bad))
                for i in bad:
                    self.placement.discard_copy(blocks[i], t)
                self._commit()
            return first_block + (min(bad) if bad else len(blocks))

    def _read_chain(self, chunks: list[bytes], tenant: str | None, first_block: int,
                    serve: Callable[[list[Block], Verified], Any]) -> Any:
        """Find the stored prefix, lease it, promote and `serve` blocks `first_block..`, verified.

        A corrupt copy is dropped and the read tried again on what is left. Returns what `serve`
        returned, or None when nothing past `first_block` is stored.
        """
        seed = self.chain.seed(tenant)
        with self._locked():
            self._counters.gets += 1
            for attempt in range(_MAX_READ_ATTEMPTS):
                blocks = self.index.lookup(seed, chunks)
                if attempt == 0:
                    self._shared.continue_chain(seed, chunks, blocks, adopt=True)
                    self.placement.count_lookups(blocks, len(chunks))
                self.index.touch(blocks)
                wanted = blocks[first_block:]
                if not wanted:
                    return None
                self.index.acquire(wanted)
                verified = Verified()
                try:
                    self.placement.promote(wanted, verified)
                    result = serve(wanted, verified) if not verified.corrupt else None
                finally:
                    self.index.release(wanted)
                if not verified.corrupt:
                    return result
                for block, t in verified.corrupt:
                    self.placement.discard_copy(block, t)
            return None

    # -- leases ------------------------------------------------------------------

    @timed("lease")
    def lease(self, tokens: Tokens, owner: str | None = None, tenant: str | None = None) -> Lease:
        """Pin the stored prefix of `tokens` until the lease is released.

        Use as a context manager, or keep it and call `release()`; leases taken with an
        `owner` are all released by `release_owner(owner)` (e.g. when a request ends).
        """
        chunks = self.chain.chunks(tokens)
        seed = self.chain.seed(tenant)
        with self._locked():
            blocks = self.index.lookup(seed, chunks)
            self.index.touch(blocks)
            return self._leases.take(blocks, owner)

    def release_owner(self, owner: str) -> int:
        """Release every lease taken with `owner`; returns how many there were."""
        return self._leases.release_owner(owner)

    # -- keys and residency --------------------------------------------------------

    def keys(self, tokens: Tokens, tenant: str | None = None) -> list[bytes]:
        """The key of every full block of `tokens`, as the store computes them."""
        return self.chain.keys(tokens, tenant)

    def residency(self, keys: Iterable[bytes] | None = None) -> dict[bytes, str | None]:
        """The fastest tier holding each key (None: not stored); without `keys`, every stored block."""
        self._check_process()
        with self._lock:
            return self._views.residency(keys)

    def locate(self, keys: Iterable[bytes]) -> dict[bytes, dict[str, int]]:
        """Every tier holding each key and the slot it occupies there (empty: not stored), fastest first.

        For tools and tests that look at the bytes where they lie (a scrub, a corruption test).
        """
        self._check_process()
        with self._lock:
            return self._views.locate(keys)

    def residency_changes(self) -> dict[bytes, str | None]:
        """What changed since the last call: key -> fastest tier now, or None for a block that went.

        The first call returns every stored block and starts the change journal; an engine that
        mirrors the store in another process (vLLM's scheduler) sends these as its updates.
        """
        self._check_process()
        with self._lock:
            return self._views.changes()

    # -- elastic device tier -------------------------------------------------------

    def shrink_device(self, target_bytes: int) -> int:
        """Demote device blocks until the elastic device tier maps at most `target_bytes`; returns bytes given back.

        Whole pages are emptied, coldest first; any unleased block may be demoted, since its copy
        stays resident below. Less than asked is given back when leased blocks hold the rest.
        """
        agent = self._agents.get(0)
        if agent is None:
            raise TierKVError("shrink_device needs an elastic device tier (StoreConfig(device_elastic=True))")
        return agent.shrink(target_bytes)

    # -- observability -------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Capacity, occupancy and traffic per tier, bytes moved per direction, block counts.

        Tiers with more to say (elastic pages, the disk directory) add a section of their own.
        """
        self._check_process()
        with self._lock:
            return self._views.stats(self._agents, self._leases.owners)

    def metric_families(self, labels: dict[str, str] | None = None) -> list[Any]:
        """`stats()` and the operation latency histograms as prometheus_client metric families."""
        return store_families(self.stats(), self._latency, labels)

    def prometheus(self) -> str:
        """`stats()` and latency histograms in Prometheus text format (by prometheus_client), for a /metrics endpoint."""
        return render(self.metric_families())

    @property
    def metrics_url(self) -> str | None:
        """Where this store's exporter serves /metrics (`StoreConfig.metrics_port`), or None."""
        return None if self._exporter is None else self._exporter.url
