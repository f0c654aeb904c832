"""tierkv's figures through vLLM's connector metrics: worker reports, their aggregation, and vLLM's
own Prometheus classes (KVConnectorProm, built from the kv_transfer_config as `vllm serve` does),
scraped over HTTP."""

from __future__ import annotations

import functools
import urllib.request

import pytest

pytest.importorskip("vllm")

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from conftest import kv_for, make_store, prompt  # noqa: E402
from tierkv_connectors.vllm.metrics import StatsReporter, TierKVStats, parse_key  # noqa: E402


def counters(stats: TierKVStats, name: str) -> dict[str, float]:
    return {parse_key(k)[1]["tier"]: v for k, v in stats.data["counter"].items() if parse_key(k)[0] == name}


def test_a_worker_reports_deltas_at_most_once_an_interval() -> None:
    with make_store(2, 4) as store:
        reporter = StatsReporter(rank=0, interval_s=10)
        first = reporter.report(store.metric_families, now=100.0)
        assert first is not None and first.data["counter"] == {}  # nothing happened yet
        assert first.data["gauge"]["tierkv_capacity_blocks|rank=0,tier=host"] == 4
        a = prompt(0, 2)
        store.put(a, kv_for(store.layout, a))
        store.get(a)
        assert reporter.report(store.metric_families, now=105.0) is None  # too soon
        second = reporter.report(store.metric_families, now=111.0)
        assert second is not None
        assert counters(second, "tierkv_hits_total") == {"device": 2}
        assert second.data["counter"]["tierkv_operation_duration_seconds_count_total|op=put,rank=0"] == 1
        third = reporter.report(store.metric_families, now=122.0)
        assert third is not None and third.data["counter"] == {}  # deltas: nothing new
        assert third.data["gauge"]["tierkv_used_blocks|rank=0,tier=device"] == 2


def test_reports_of_two_ranks_add_up_and_keep_their_gauges_apart() -> None:
    stores = [make_store(2, 4), make_store(2, 4)]
    try:
        reports = []
        for rank, store in enumerate(stores):
            a = prompt(0, 1 + rank)
            store.put(a, kv_for(store.layout, a))
            store.get(a)
            stats = StatsReporter(rank, interval_s=0).report(store.metric_families)
            assert stats is not None
            reports.append(stats)
        total = TierKVStats(data={}).aggregate(reports[0]).aggregate(reports[1])
        assert isinstance(total, TierKVStats)
        hits = sum(v for k, v in total.data["counter"].items() if k.startswith("tierkv_hits_total|"))
        assert hits == 1 + 2
        assert total.data["gauge"]["tierkv_used_blocks|rank=0,tier=device"] == 1
        assert total.data["gauge"]["tierkv_used_blocks|rank=1,tier=device"] == 2
        assert total.reduce() == {"hits_device": 3, "used_blocks_device": 3, "used_blocks_host": 0}  # zero deltas are not sent
    finally:
        for store in stores:
            store.close()


def _vllm_config():  # type: ignore[no-untyped-def]
    from vllm.config import KVTransferConfig, VllmConfig

    return VllmConfig(kv_transfer_config=KVTransferConfig(
        kv_connector="TierKVConnector", kv_connector_module_path="tierkv_connectors.vllm", kv_role="kv_both"))


def test_vllm_prometheus_classes_show_tierkv_figures_over_http() -> None:
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorLogging, KVConnectorProm

    registry = CollectorRegistry()

    class Prom(KVConnectorProm):  # vLLM's class, registering into a registry of this test
        _gauge_cls = functools.partial(Gauge, registry=registry)  # type: ignore[assignment]
        _counter_cls = functools.partial(Counter, registry=registry)  # type: ignore[assignment]
        _histogram_cls = functools.partial(Histogram, registry=registry)  # type: ignore[assignment]

    config = _vllm_config()
    prom = Prom(config, ["model_name", "engine"], {0: ["tiny", "0"]})
    assert prom.prom_metrics is not None  # TierKVConnector.build_prom_metrics, found through the factory
    logging = KVConnectorLogging(config.kv_transfer_config)
    httpd, _ = start_http_server(0, addr="127.0.0.1", registry=registry)
    url = f"http://127.0.0.1:{httpd.server_port}/metrics"

    def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for f in text_string_to_metric_families(text) for s in f.samples}

    hits = ("vllm:tierkv_hits_total", (("engine", "0"), ("model_name", "tiny"), ("rank", "0"), ("tier", "device")))
    used = ("vllm:tierkv_used_blocks", (("engine", "0"), ("model_name", "tiny"), ("rank", "0"), ("tier", "device")))
    try:
        with make_store(2, 4) as store:
            reporter = StatsReporter(0, interval_s=0)
            a = prompt(0, 2)
            store.put(a, kv_for(store.layout, a))
            store.get(a)
            stats = reporter.report(store.metric_families)
            assert stats is not None
            prom.observe(stats.data)
            logging.observe(stats.data)  # vLLM's log line: build_kv_connector_stats + reduce
            first = scrape()
            store.get(a)
            stats = reporter.report(store.metric_families)
            assert stats is not None
            prom.observe(stats.data)
            second = scrape()
        assert first[hits] == 2 and second[hits] == 4
        assert first[used] == 2
        lines: list[str] = []
        logging.log(lambda fmt, *args: lines.append(fmt % args))
        assert lines and "hits_device=2" in lines[0]
    finally:
        httpd.shutdown()
        httpd.server_close()
