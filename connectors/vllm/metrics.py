"""tierkv's figures in vLLM's own /metrics: the connector stats path of vLLM 0.32.

vLLM asks each worker's connector for `get_kv_connector_stats()` after every step, sums what the
workers return (`KVConnectorStats.aggregate`) and hands the data to the connector's Prometheus
metrics (`build_prom_metrics(...).observe`) in the process that serves /metrics; so `vllm serve`
shows tierkv's counters as `vllm:tierkv_...` series beside vLLM's own, labelled like them
(model_name, engine) plus `rank` (the tensor-parallel worker).

A worker reports at most once a `REPORT_INTERVAL_S`: the store's Prometheus families
(`BlockStore.metric_families`), counters as deltas since its last report, gauges as they are, the
latency histograms as their `_count` and `_sum` counters. Keys are strings (`name|label=value,...`)
so the payload serializes like any of vLLM's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats

REPORT_INTERVAL_S = 1.0
PREFIX = "vllm:"
COUNTER, GAUGE, HELP = "counter", "gauge", "help"


def sample_key(name: str, labels: dict[str, str]) -> str:
    return name + "|" + ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def parse_key(key: str) -> tuple[str, dict[str, str]]:
    name, _, text = key.partition("|")
    return name, dict(item.split("=", 1) for item in text.split(",")) if text else {}


def snapshot(families: Iterable[Any], rank: int) -> tuple[dict[str, float], dict[str, float], dict[str, str]]:
    """Counters (cumulative), gauges and help texts of prometheus_client families, each sample labelled with `rank`."""
    counters: dict[str, float] = {}
    gauges: dict[str, float] = {}
    docs: dict[str, str] = {}
    for family in families:
        for s in family.samples:
            labels = {**s.labels, "rank": str(rank)}
            if family.type == "counter" and s.name.endswith("_total"):
                counters[sample_key(s.name, labels)] = s.value
            elif family.type == "gauge":
                gauges[sample_key(s.name, labels)] = s.value
            elif family.type == "histogram" and s.name.endswith(("_count", "_sum")):
                counters[sample_key(s.name + "_total", labels)] = s.value
            else:
                continue
            docs.setdefault(s.name, family.documentation)
    return counters, gauges, docs


class StatsReporter:
    """A worker's side: what changed since its last report, no more often than `interval_s`."""

    def __init__(self, rank: int, interval_s: float = REPORT_INTERVAL_S) -> None:
        self.rank = rank
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._at = float("-inf")

    def report(self, families: Callable[[], Iterable[Any]], now: float | None = None) -> TierKVStats | None:
        """`families()` is called only when a report is due (it renders the store's figures)."""
        now = time.monotonic() if now is None else now
        if now - self._at < self.interval_s:
            return None
        self._at = now
        counters, gauges, docs = snapshot(families(), self.rank)
        deltas = {k: v - self._last.get(k, 0.0) for k, v in counters.items()}
        self._last = counters
        return TierKVStats(data={COUNTER: {k: v for k, v in deltas.items() if v}, GAUGE: gauges, HELP: docs})


@dataclass
class TierKVStats(KVConnectorStats):
    """`data`: {"counter": {key: delta}, "gauge": {key: value}, "help": {name: text}}; counters add up
    when aggregated (across workers and steps), gauges keep the latest value per key (keys carry the rank)."""

    def __post_init__(self) -> None:
        for part in (COUNTER, GAUGE, HELP):
            self.data.setdefault(part, {})

    def reset(self) -> None:
        self.data = {COUNTER: {}, GAUGE: {}, HELP: {}}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        if not isinstance(other, TierKVStats) or other.is_empty():
            return self
        counters = self.data[COUNTER]
        for key, value in other.data[COUNTER].items():
            counters[key] = counters.get(key, 0.0) + value
        self.data[GAUGE].update(other.data[GAUGE])
        self.data[HELP].update(other.data[HELP])
        return self

    def reduce(self) -> dict[str, int | float]:
        """For vLLM's periodic log line: per tier, hits and misses of the interval, and the blocks held."""
        out: dict[str, int | float] = {}
        for part, names in ((COUNTER, ("tierkv_hits_total", "tierkv_misses_total")), (GAUGE, ("tierkv_used_blocks",))):
            for key, value in self.data[part].items():
                name, labels = parse_key(key)
                if name in names and "tier" in labels:
                    label = f"{name.removeprefix('tierkv_').removesuffix('_total')}_{labels['tier']}"
                    out[label] = int(out.get(label, 0) + value)
        return out

    def is_empty(self) -> bool:
        return not self.data[COUNTER] and not self.data[GAUGE]


class TierKVPromMetrics(KVConnectorPromMetrics):
    """vLLM's Prometheus side: one `vllm:tierkv_...` counter or gauge per series name, created at first sight
    with vLLM's label names (model_name, engine) plus the series' own (tier, direction, op, rank)."""

    def __init__(self, vllm_config: Any, metric_types: dict[type, type], labelnames: list[str],
                 per_engine_labelvalues: dict[int, list[object]]) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._metrics: dict[str, tuple[Any, tuple[str, ...]]] = {}

    def _metric(self, kind: str, name: str, labels: dict[str, str], docs: dict[str, str]) -> tuple[Any, tuple[str, ...]]:
        found = self._metrics.get(name)
        if found is None:
            own = tuple(sorted(labels))
            cls = self._counter_cls if kind == COUNTER else self._gauge_cls
            doc = docs.get(name.removesuffix("_total"), docs.get(name, "tierkv store figure"))
            metric_name = PREFIX + (name.removesuffix("_total") if kind == COUNTER else name)
            kwargs: dict[str, Any] = {"multiprocess_mode": "mostrecent"} if kind == GAUGE else {}
            found = self._metrics[name] = (cls(name=metric_name, documentation=f"tierkv: {doc}",
                                               labelnames=[*self._labelnames, *own], **kwargs), own)
        return found

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        docs = transfer_stats_data.get(HELP, {})
        engine = list(self.per_engine_labelvalues[engine_idx])
        for kind in (COUNTER, GAUGE):
            for key, value in transfer_stats_data.get(kind, {}).items():
                name, labels = parse_key(key)
                metric, own = self._metric(kind, name, labels, docs)
                child = metric.labels(*engine, *(labels.get(k, "") for k in own))
                if kind == COUNTER:
                    if value > 0:
                        child.inc(value)
                else:
                    child.set(value)
