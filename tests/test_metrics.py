"""Prometheus metrics: families by prometheus_client, the in-process exporter scraped over HTTP, the
directory exporter beside a live writer, and `tierkv metrics` as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import kv_for, prompt, tiny_layout
from prometheus_client.parser import text_string_to_metric_families

from tierkv import BlockStore, Namespace, StoreConfig
from tierkv.metrics import OPERATIONS, SLOT_ALIGN, DirectoryCollector, serve_directory, writer_pid


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value, parsed by prometheus_client's own parser."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return samples(response.read().decode())


def store_with(config: StoreConfig, model: str = "metrics-test") -> BlockStore:
    return BlockStore(tiny_layout(), Namespace(model=model), config)


def small(**extra: object) -> StoreConfig:
    b = tiny_layout().block_bytes
    return StoreConfig(device_bytes=2 * b, host_bytes=4 * b, device="cpu", **extra)  # type: ignore[arg-type]


def test_families_carry_every_tier_figure_and_latency_histograms() -> None:
    with store_with(small()) as store:
        a, c = prompt(0, 2), prompt(100, 2)
        store.put(a, kv_for(store.layout, a))
        store.put(c, kv_for(store.layout, c))  # device full: a demoted to host
        store.get(a)
        store.match(a)
        s = samples(store.prometheus())
        stats = store.stats()
    b = tiny_layout().block_bytes
    for tier in ("device", "host"):
        t = stats["tiers"][tier]
        label = (("tier", tier),)
        assert s[("tierkv_capacity_bytes", label)] == t["capacity_bytes"]
        assert s[("tierkv_used_bytes", label)] == t["used_bytes"]
        assert s[("tierkv_used_blocks", label)] == t["used_slots"]
        assert s[("tierkv_hits_total", label)] == t["hits"]
        assert s[("tierkv_misses_total", label)] == t["misses"]
        assert s[("tierkv_evictions_total", label)] == t["evictions"]
        assert s[("tierkv_corrupt_reads_total", label)] == 0
        assert s[("tierkv_bytes_in_total", label)] == t["bytes_in"]
        assert s[("tierkv_bytes_out_total", label)] == t["bytes_out"]
    assert s[("tierkv_moved_bytes_total", (("direction", "device->host"),))] == stats["bytes_moved"]["device->host"] > 0
    assert s[("tierkv_blocks", ())] == 4 and s[("tierkv_block_bytes", ())] == b
    # Latency histograms: one observation per call, in the +Inf bucket and the count.
    count = {op: s[("tierkv_operation_duration_seconds_count", (("op", op),))] for op in OPERATIONS}
    assert count == {"put": 2, "get": 1, "match": 1, "lease": 0, "save_from": 0, "load_into": 0, "load_layers": 0}
    assert s[("tierkv_operation_duration_seconds_bucket", (("le", "+Inf"), ("op", "put")))] == 2
    assert s[("tierkv_operation_duration_seconds_sum", (("op", "put"),))] > 0


def test_the_store_exporter_is_scraped_over_http_and_its_numbers_move() -> None:
    with store_with(small(metrics_port=0)) as store:
        url = store.metrics_url
        assert url is not None and url.endswith("/metrics")
        label = (("store", "metrics-test"),)
        before = scrape(url)
        assert before[("tierkv_hits_total", (*label, ("tier", "device")))] == 0
        a = prompt(0, 2)
        store.put(a, kv_for(store.layout, a))
        store.get(a)
        store.get(a)
        after = scrape(url)
        assert after[("tierkv_hits_total", (*label, ("tier", "device")))] == 4
        assert after[("tierkv_used_blocks", (*label, ("tier", "device")))] == 2
        assert after[("tierkv_operation_duration_seconds_count", (("op", "get"), *label))] == 2
        assert after[("tierkv_operation_duration_seconds_count", (("op", "put"), *label))] == 1
    with pytest.raises(urllib.error.URLError):  # closing the store stopped its server
        urllib.request.urlopen(url, timeout=5)


def test_stores_of_one_process_share_a_port_told_apart_by_a_store_label() -> None:
    with store_with(small(metrics_port=0), "model-a") as a:
        port = int(a.metrics_url.rsplit(":", 1)[1].split("/")[0])  # type: ignore[union-attr]
        with store_with(small(metrics_port=port), "model-a") as twin, store_with(small(metrics_port=port), "model-b") as b:
            tokens = prompt(0, 1)
            b.put(tokens, kv_for(b.layout, tokens))
            s = scrape(a.metrics_url)  # type: ignore[arg-type]
            used = {dict(labels)["store"]: v for (name, labels), v in s.items()
                    if name == "tierkv_used_blocks" and dict(labels)["tier"] == "device"}
            assert used == {"model-a": 0, "model-a#2": 0, "model-b": 1}
            assert twin.metrics_url == a.metrics_url
        assert {dict(labels)["store"] for (name, labels) in scrape(a.metrics_url) if name == "tierkv_blocks"} == {"model-a"}  # type: ignore[arg-type]


def test_a_port_in_use_is_a_config_error_naming_the_field() -> None:
    import socket

    from tierkv import ConfigError

    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        with pytest.raises(ConfigError, match="metrics_port: cannot serve metrics on port"):
            store_with(small(metrics_port=taken.getsockname()[1]))


@pytest.mark.parametrize(("given", "kept"), [
    ("127.0.0.1", "127.0.0.1"), (" 0.0.0.0 ", "0.0.0.0"), ("::", "::"), ("[::1]", "::1"), ("localhost", "localhost"),
    ("metrics.internal", "metrics.internal")])
def test_metrics_host_takes_addresses_and_host_names(given: str, kept: str) -> None:
    assert small(metrics_host=given).metrics_host == kept
    assert StoreConfig.from_env({"TIERKV_METRICS_HOST": given}).metrics_host == kept


def test_metrics_host_defaults_to_this_machine_only() -> None:
    assert StoreConfig().metrics_host == "127.0.0.1"
    assert StoreConfig.from_env({"TIERKV_METRICS_HOST": ""}).metrics_host == "127.0.0.1"  # "" means unset


@pytest.mark.parametrize("bad", ["300.1.1.1", "1.2.3", "not an address", "-leading.dash", "", "[]", 9464, ["127.0.0.1"]])
def test_a_bad_metrics_host_is_a_config_error_naming_the_field(bad: object) -> None:
    from tierkv import ConfigError

    with pytest.raises(ConfigError, match=r"metrics_host: expected an IP address or host name to listen on .* got"):
        small(metrics_host=bad)


def test_the_exporter_listens_on_the_address_it_is_given() -> None:
    from tierkv.metrics import Exporter

    families = store_with(small()).metric_families
    local = Exporter(families, "local", 0)  # the default: loopback only
    every = Exporter(families, "every", 0, host="0.0.0.0")
    try:
        assert local._server.httpd.server_address[0] == "127.0.0.1"
        assert every._server.httpd.server_address[0] == "0.0.0.0"
        assert every.url == f"http://127.0.0.1:{every.port}/metrics"  # where a client on this machine finds it
        assert ("tierkv_blocks", (("store", "local"),)) in scrape(local.url)
        assert ("tierkv_blocks", (("store", "every"),)) in scrape(every.url)
    finally:
        local.close()
        every.close()


def test_an_address_this_machine_lacks_is_a_config_error_naming_metrics_host() -> None:
    from tierkv import ConfigError
    from tierkv.metrics import Exporter

    families = store_with(small()).metric_families
    with pytest.raises(ConfigError, match="metrics_host: cannot serve metrics on port 0 of 192.0.2.1: "):
        Exporter(families, "x", 0, host="192.0.2.1")  # TEST-NET-1: assigned to no machine
    with pytest.raises(ConfigError, match="metrics_host: cannot serve metrics on port 0 of no-such-host.invalid: "):
        Exporter(families, "x", 0, host="no-such-host.invalid")  # .invalid never resolves (RFC 6761)


def test_the_store_listens_on_its_metrics_host() -> None:
    from tierkv import ConfigError

    with store_with(small(metrics_port=0, metrics_host="0.0.0.0")) as store:
        assert store._exporter._server.httpd.server_address[0] == "0.0.0.0"  # type: ignore[union-attr]
        assert ("tierkv_blocks", (("store", "metrics-test"),)) in scrape(store.metrics_url)  # type: ignore[arg-type]
    with store_with(small(metrics_port=0)) as store:
        assert store._exporter._server.httpd.server_address[0] == "127.0.0.1"  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match="metrics_host: cannot serve metrics on port 0 of 192.0.2.1"):
        store_with(small(metrics_port=0, metrics_host="192.0.2.1"))


def test_one_port_cannot_listen_on_two_addresses() -> None:
    from tierkv import ConfigError
    from tierkv.metrics import Exporter

    families = store_with(small()).metric_families
    first = Exporter(families, "a", 0)
    try:
        with pytest.raises(ConfigError, match=f"metrics_host: port {first.port} is already served on 127.0.0.1"):
            Exporter(families, "b", first.port, host="0.0.0.0")
    finally:
        first.close()


def disk_config(path: Path) -> StoreConfig:
    b = tiny_layout().block_bytes
    return StoreConfig(device_bytes=2 * b, host_bytes=2 * b, device="cpu", disk_path=str(path), disk_bytes="1MiB")


WRITER = """
import sys
sys.path.insert(0, {tests!r})
from conftest import kv_for, prompt, tiny_layout
from tierkv import BlockStore, Namespace, StoreConfig
b = tiny_layout().block_bytes
config = StoreConfig(device_bytes=2 * b, host_bytes=2 * b, device="cpu", disk_path={path!r}, disk_bytes="1MiB")
with BlockStore(tiny_layout(), Namespace(model="metrics-test"), config) as store:
    for first in (0, 1000):
        tokens = prompt(first, 8)
        store.put(tokens, kv_for(store.layout, tokens))
        print("stored", flush=True)
        sys.stdin.readline()
"""


def test_the_directory_exporter_reads_beside_a_live_writer_without_its_lock(tmp_path: Path) -> None:
    code = WRITER.format(tests=str(Path(__file__).parent), path=str(tmp_path))
    writer = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert writer.stdin is not None and writer.stdout is not None
    try:
        assert writer.stdout.readline() == "stored\n"
        collector = DirectoryCollector(tmp_path)
        deadline = time.monotonic() + 60
        while (held := collector.read_directory())["blocks"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)  # demoted blocks reach the manifest once the write-behind thread has written them
        assert held["writer"] == writer.pid and held["model"] == "metrics-test"
        assert 0 < held["blocks"] <= 8
        httpd, port = serve_directory(tmp_path, 0)
        try:
            first = scrape(f"http://127.0.0.1:{port}/metrics")
            writer.stdin.write("\n")
            writer.stdin.flush()
            assert writer.stdout.readline() == "stored\n"
            # Blocks reach the manifest once the write-behind thread has made them durable: poll.
            used = ("tierkv_used_blocks", (("directory", str(tmp_path)), ("tier", "disk")))
            deadline = time.monotonic() + 60
            while (second := scrape(f"http://127.0.0.1:{port}/metrics"))[used] <= first[used] and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            httpd.shutdown()
            httpd.server_close()
        writer.stdin.write("\n")
        writer.stdin.flush()
        assert writer.wait(timeout=60) == 0
    finally:
        writer.kill()
    labels = (("directory", str(tmp_path)), ("tier", "disk"))
    assert second[("tierkv_used_blocks", labels)] > first[("tierkv_used_blocks", labels)]
    assert first[("tierkv_capacity_bytes", labels)] == 1 << 20
    assert first[("tierkv_disk_writer_pid", (("directory", str(tmp_path)),))] == writer.pid
    assert writer_pid(tmp_path) is None  # closed: nobody holds the lock
    assert DirectoryCollector(tmp_path).read_directory()["blocks"] == 16  # everything flushed on close


def test_slot_alignment_agrees_with_the_disk_tier() -> None:
    from tierkv.tiers.disk.files import ALIGN, slot_stride

    assert SLOT_ALIGN == ALIGN and slot_stride(1) == SLOT_ALIGN


def test_the_metrics_command_serves_a_directory(tmp_path: Path) -> None:
    with store_with(disk_config(tmp_path)) as store:
        tokens = prompt(0, 6)
        store.put(tokens, kv_for(store.layout, tokens))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIERKV_")}
    proc = subprocess.Popen([sys.executable, "-m", "tierkv", "metrics", str(tmp_path), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith(f"tierkv metrics: serving {tmp_path} at http://127.0.0.1:"), (line, proc.stderr)
        url = line.split(" at ")[1].split()[0]
        s = scrape(url)
        assert s[("tierkv_used_blocks", (("directory", str(tmp_path)), ("tier", "disk")))] == 6
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_metrics_command_refuses_a_directory_without_a_store(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "tierkv", "metrics", str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip() == f"tierkv metrics: error: {tmp_path} holds no tierkv disk store (no manifest/data.mdb there)"


def test_the_metrics_command_refuses_a_bad_address(tmp_path: Path) -> None:
    with store_with(disk_config(tmp_path)) as store:
        tokens = prompt(0, 1)
        store.put(tokens, kv_for(store.layout, tokens))

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "tierkv", "metrics", str(tmp_path), *args], capture_output=True,
                              text=True, timeout=120)

    malformed = run("--host", "300.1.1.1")
    assert malformed.returncode == 2 and "argument --host: expected an IP address or host name" in malformed.stderr
    absent = run("--host", "192.0.2.1", "--port", "0")
    assert absent.returncode == 2 and absent.stdout == ""
    assert absent.stderr.startswith("tierkv metrics: error: --host: cannot serve metrics on port 0 of 192.0.2.1: "), absent.stderr


def test_latency_observation_is_cheap() -> None:
    from tierkv.metrics import OperationLatency

    latency = OperationLatency()
    n = 20000
    start = time.perf_counter()
    for i in range(n):
        latency.observe("get", i * 1e-7)
    per_call = (time.perf_counter() - start) / n
    assert per_call < 20e-6, per_call  # about 1 us on the CI machine; generous for a loaded one
    assert latency.snapshot()["get"][0][-1] == n


def test_the_grafana_dashboard_asks_only_for_series_the_store_exports() -> None:
    import json
    import re

    dashboard = json.loads((Path(__file__).parent.parent / "examples" / "grafana_dashboard.json").read_text())
    asked = {name for panel in dashboard["panels"] for target in panel["targets"]
             for name in re.findall(r"\$\{prefix\}(tierkv_\w+)", target["expr"])}
    with store_with(small()) as store:
        a = prompt(0, 1)
        store.put(a, kv_for(store.layout, a))
        exported = {name for name, _ in samples(store.prometheus())}
    assert asked and asked <= exported, asked - exported
