"""The scheduler's half of the connector: decide hits, plan loads and saves, mirror what workers store.

The scheduler never touches KV bytes, and it may live in another process than the workers (vLLM
on CPU, and tensor parallelism, always do that). It answers `get_num_new_matched_tokens` from a
*mirror*: for each tensor-parallel rank, every key that rank's store holds and the tier it is in.
Workers keep the mirror current with residency reports that ride back on vLLM's own
worker-to-scheduler channel (`KVConnectorWorkerMetadata`, aggregated over ranks by vLLM): the
first report of a rank lists its whole store (including what a previous run left on disk), later
ones only changes. Until every rank has sent its first report the scheduler answers "not yet"
(None), so the first requests after a restart still see the blocks on disk.

A hit counts only blocks every rank holds, never more than the prompt minus its last token (vLLM
must compute at least one token), and starts where vLLM's own prefix cache ends: tierkv loads
only what vLLM lacks. A stale mirror (a block evicted after the last report) costs a load error
and a recompute, never a wrong token: the worker verifies every block it loads.

With a shared tier (a Redis Cluster other engines publish to), a prefix that runs past the mirror
is asked of that tier in the background (`lookup.py`): the request waits a step (None), then its
hit may reach further, loaded asynchronously like a disk hit.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from tierkv import KeyChain, KVLayout, Namespace

from .lookup import SharedLookup
from .meta import LoadJob, RankResidency, ResidencyReport, SaveJob, TierKVMetadata

# Tiers up to this one are memory: a load from them is quick and synchronous; from any slower tier
# (disk, remote) it is asynchronous when the config allows.
_LAST_MEMORY_TIER = "host"


def request_tenant(request: Any) -> str:
    """vLLM's `cache_salt` isolates tenants in its prefix cache; it salts tierkv's keys the same way."""
    return request.cache_salt or ""


def storable(request: Any) -> bool:
    """Requests whose KV follows from their token ids alone.

    LoRA adapters, multimodal inputs and prompt embeddings change the KV of the same token ids,
    so their blocks are neither loaded nor stored (vLLM's own prefix cache still serves them).
    """
    return (
        request.lora_request is None
        and not request.mm_features
        and request.prompt_embeds is None
        and request.prompt_is_token_ids is None
    )


@dataclass
class LoadPlan:
    start: int  # tokens vLLM already holds
    end: int  # tokens covered once the load is done
    tiers: list[str]  # slowest tier, over ranks, of each block loaded
    is_async: bool


class SchedulerSide:
    """Hit decisions and per-step jobs; one per engine, in the scheduler process."""

    def __init__(self, layout: KVLayout, namespaces: list[Namespace], async_disk_loads: bool,
                 async_saves: bool = True, shared: SharedLookup | None = None) -> None:
        self.layout = layout
        self.block_tokens = layout.block_tokens
        self.namespaces = namespaces
        self.async_disk_loads = async_disk_loads
        self.async_saves = async_saves
        self._mirrors: list[dict[bytes, str] | None] = [None] * len(namespaces)
        self._order: dict[str, int] = {}  # tier name -> position, fastest first, as the workers' stores report it
        self._chains = [KeyChain(ns, layout) for ns in namespaces]
        self._keys: dict[str, list[list[bytes]]] = {}  # req_id -> keys per rank, for its longest hashed prefix
        self._requests: dict[str, Any] = {}
        self._plans: dict[str, LoadPlan] = {}
        self._sources: dict[str, dict[str, int]] = {}
        self._loads: list[LoadJob] = []
        self._saved: dict[str, int] = {}  # req_id -> tokens covered by save jobs already sent
        self._shared = shared

    # -- mirror --------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Every rank has reported its store once."""
        return all(m is not None for m in self._mirrors)

    def apply(self, report: ResidencyReport) -> None:
        """Fold one step's residency report of the workers into the mirror."""
        for rank, change in report.ranks.items():
            self._apply_rank(rank, change)

    def _apply_rank(self, rank: int, change: RankResidency) -> None:
        mirror = self._mirrors[rank]
        if change.full or mirror is None:
            mirror = self._mirrors[rank] = {}
        if change.order:
            self._order = {name: i for i, name in enumerate(change.order)}
        for key, tier in change.tiers.items():
            if tier is None:
                mirror.pop(key, None)
            else:
                mirror[key] = tier

    def _slower(self, names: list[str]) -> str:
        return max(names, key=lambda name: self._order.get(name, len(self._order)))

    def _is_slow(self, name: str) -> bool:
        return self._order.get(name, len(self._order)) > self._order.get(_LAST_MEMORY_TIER, 0)

    def _keys_for(self, request: Any, num_blocks: int) -> list[list[bytes]]:
        """Keys of the first `num_blocks` blocks of the request, per rank; hashed once per request."""
        cached = self._keys.get(request.request_id)
        if cached is not None and len(cached[0]) >= num_blocks:
            return [k[:num_blocks] for k in cached]
        tokens = list(request.all_token_ids[: num_blocks * self.block_tokens])
        tenant = request_tenant(request)
        keys = [chain.keys(tokens, tenant) for chain in self._chains]
        self._keys[request.request_id] = keys
        return keys

    # -- scheduler hooks -------------------------------------------------------------

    def on_new_request(self, request: Any) -> None:
        self._requests[request.request_id] = request

    def match(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        """`get_num_new_matched_tokens`: tokens tierkv can load beyond what vLLM holds, and whether async."""
        if not storable(request):
            return 0, False
        if not self.ready:
            return None, False  # ask again next step, once the workers have reported their stores
        bt = self.block_tokens
        if num_computed_tokens % bt:
            return 0, False  # a load may not start inside a stored block: that would overwrite vLLM's pages
        limit = (request.num_tokens - 1) // bt
        first = num_computed_tokens // bt
        if limit <= first:
            return 0, False
        keys = self._keys_for(request, limit)
        tiers: list[str] = []
        mirrors = [m for m in self._mirrors if m is not None]
        for i in range(limit):
            held = [m.get(keys[r][i]) for r, m in enumerate(mirrors)]
            names = [name for name in held if name is not None]
            if len(names) < len(held):
                break
            tiers.append(self._slower(names))
        if self._shared is not None and len(tiers) < limit:
            shared = self._shared.held(request.request_id, list(request.all_token_ids[: limit * bt]), request_tenant(request))
            if shared is None:
                return None, False  # asked in the background: the answer is there in a step or two
            tiers += [self._shared.tier] * (shared - len(tiers))
        hit = len(tiers)
        if hit <= first:
            self._plans.pop(request.request_id, None)
            return 0, False
        loaded = tiers[first:hit]
        is_async = self.async_disk_loads and any(self._is_slow(name) for name in loaded)
        self._plans[request.request_id] = LoadPlan(num_computed_tokens, hit * bt, loaded, is_async)
        return (hit - first) * bt, is_async

    def after_alloc(self, request: Any, block_ids: list[int], num_external_tokens: int) -> None:
        """`update_state_after_alloc`: turn the plan vLLM accepted into a load job for the workers."""
        plan = self._plans.pop(request.request_id, None)
        if self._shared is not None:
            self._shared.forget(request.request_id)  # asked again if the request comes back (preempted)
        if num_external_tokens == 0 or plan is None:
            return
        end = plan.start + num_external_tokens
        bt = self.block_tokens
        num_blocks = -(-end // bt)
        self._loads.append(LoadJob(
            req_id=request.request_id,
            tenant=request_tenant(request),
            token_ids=list(request.all_token_ids[: num_blocks * bt]),
            start=plan.start,
            end=end,
            block_ids=list(block_ids),
            is_async=plan.is_async,
        ))
        counts = Counter(plan.tiers[: num_blocks - plan.start // bt])
        self._sources[request.request_id] = {name: n * bt for name, n in counts.items()}

    def hit_sources(self, request: Any, num_external_tokens: int) -> dict[str, int]:
        """Tokens of the last accepted load per tier name, trimmed to what vLLM counted."""
        sources = self._sources.pop(request.request_id, {})
        out: dict[str, int] = {}
        left = num_external_tokens
        for name in sorted(sources, key=lambda name: self._order.get(name, len(self._order))):
            n = min(sources[name], left)
            if n:
                out[name] = n
                left -= n
        return out

    def build(self, scheduler_output: Any) -> TierKVMetadata:
        """`build_connector_meta`: this step's loads, and saves of every block this step completes."""
        meta = TierKVMetadata(loads=self._loads, preempted=sorted(scheduler_output.preempted_req_ids or ()))
        self._loads = []
        computed = {r.req_id: r.num_computed_tokens for r in scheduler_output.scheduled_new_reqs}
        cached = scheduler_output.scheduled_cached_reqs
        computed.update(zip(cached.req_ids, cached.num_computed_tokens))
        block_state = scheduler_output.kv_connector_block_state
        bt = self.block_tokens
        for req_id, scheduled in scheduler_output.num_scheduled_tokens.items():
            request = self._requests.get(req_id)
            if request is None or not storable(request) or req_id not in computed:
                continue
            # KV exists after this step for computed + scheduled tokens; speculative tokens are
            # not in all_token_ids yet, and their blocks wait until they are accepted.
            end = min(computed[req_id] + scheduled, request.num_tokens)
            end -= end % bt
            if end <= self._saved.get(req_id, 0):
                continue
            block_ids = block_state.get_block_ids(req_id)
            if block_ids is None:
                continue
            meta.saves.append(SaveJob(req_id=req_id, tenant=request_tenant(request),
                                      token_ids=list(request.all_token_ids[:end]), block_ids=list(block_ids[0])))
            self._saved[req_id] = end
        return meta

    def finished(self, request: Any) -> bool:
        """`request_finished`: forget the request; True when vLLM must keep its blocks until the workers
        report its saves done (asynchronous saves were queued for it)."""
        req_id = request.request_id
        had_saves = req_id in self._saved
        for table in (self._requests, self._keys, self._plans, self._sources, self._saved):
            table.pop(req_id, None)
        if self._shared is not None:
            self._shared.forget(req_id)
        return self.async_saves and had_saves

    def close(self) -> None:
        if self._shared is not None:
            self._shared.close()
