"""What the scheduler tells the workers each step, and what the workers tell the scheduler back.

Both travel over vLLM's own channels (the scheduler output and the model runner output), which
already cross process boundaries and aggregate tensor-parallel ranks, so tierkv needs no
protocol of its own. Everything here is plain data that pickles.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata, KVConnectorWorkerMetadata

__all__ = ["LoadJob", "RankResidency", "ResidencyReport", "SaveJob", "TierKVMetadata"]


@dataclass
class LoadJob:
    """Copy stored blocks into vLLM pages: tokens `[start, end)` of one request."""

    req_id: str
    tenant: str
    token_ids: list[int]  # the prefix whose stored blocks are read: whole blocks, covering `end`
    start: int  # tokens before this vLLM already holds; loading starts here (block-aligned)
    end: int  # vLLM counts tokens up to here as loaded; any it does not get must be reported
    block_ids: list[int]  # the request's vLLM block table, covering at least len(token_ids) tokens
    is_async: bool


@dataclass
class SaveJob:
    """Store every full block of `token_ids` that the store does not hold yet, from vLLM pages."""

    req_id: str
    tenant: str
    token_ids: list[int]  # a whole number of blocks whose KV is in vLLM pages after this step
    block_ids: list[int]


@dataclass
class TierKVMetadata(KVConnectorMetadata):
    """One step's work for every worker."""

    loads: list[LoadJob] = field(default_factory=list)
    saves: list[SaveJob] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)  # requests whose pages vLLM reuses from this step on


@dataclass
class RankResidency:
    """Changes to one rank's store since its last report: key -> the name of its fastest tier, or None when gone.

    `full` marks a report that lists every stored key (the first one after the store opens):
    the scheduler replaces its mirror of that rank instead of patching it. A full report also
    carries the store's tier names, fastest first (`BlockStore.tier_names`), which is how the
    scheduler tells which of two tiers is the slower one.
    """

    full: bool
    tiers: dict[bytes, str | None]
    order: tuple[str, ...] = ()


@dataclass
class ResidencyReport(KVConnectorWorkerMetadata):
    """Residency changes of every rank in one step, merged by vLLM's output aggregator."""

    ranks: dict[int, RankResidency] = field(default_factory=dict)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> ResidencyReport:
        if not isinstance(other, ResidencyReport):
            raise TypeError(f"cannot merge a ResidencyReport with {type(other).__name__}")
        return ResidencyReport(ranks={**self.ranks, **other.ranks})
