"""stats() numbers after a scripted sequence, and prometheus() as parseable exposition text."""

from __future__ import annotations

import re

import pytest

from conftest import kv_for, make_store, prompt
from tierkv import BlockStore, KVLayout
from tierkv.stats import StoreCounters, to_prometheus

TIER_KEYS = {"device", "slots", "used_slots", "capacity_bytes", "used_bytes", "hits", "misses", "evictions", "bytes_in", "bytes_out"}
TOP_KEYS = {"tiers", "blocks", "block_bytes", "bytes_moved", "dropped", "puts", "gets", "leased_owners"}

_LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*"'
SAMPLE = re.compile(
    rf"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?P<labels>\{{(?:{_LABEL}(?:,{_LABEL})*)?\}})? "
    r"(?P<value>[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|NaN|[+-]Inf)$"
)
COMMENT = re.compile(r"^# (?P<kind>HELP|TYPE) (?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*) (?P<rest>.+)$")


def scripted(layout: KVLayout) -> BlockStore:
    """Device 2 blocks, host 4: put A, get A, put C (A demoted), get A (promoted, C demoted), one miss."""
    store = make_store(2, 4, layout)
    a, c = prompt(0, 2), prompt(100, 2)
    store.put(a, kv_for(layout, a))
    store.get(a)
    store.put(c, kv_for(layout, c))
    store.match(a)
    store.get(a)
    store.get(prompt(500, 1))
    return store


def test_stats_after_scripted_sequence(layout) -> None:
    b = layout.block_bytes
    with scripted(layout) as store:
        s = store.stats()
        assert TOP_KEYS <= set(s)
        assert set(s["tiers"]) == {"device", "host"}
        for tier in s["tiers"].values():
            assert TIER_KEYS <= set(tier)
        dev, host = s["tiers"]["device"], s["tiers"]["host"]
        assert {k: dev[k] for k in TIER_KEYS} == {
            "device": "cpu", "slots": 2, "used_slots": 2, "capacity_bytes": 2 * b, "used_bytes": 2 * b,
            "hits": 2, "misses": 3, "evictions": 4, "bytes_in": 6 * b, "bytes_out": 8 * b,
        }
        assert {k: host[k] for k in TIER_KEYS} == {
            "device": "cpu", "slots": 4, "used_slots": 4, "capacity_bytes": 4 * b, "used_bytes": 4 * b,
            "hits": 2, "misses": 1, "evictions": 0, "bytes_in": 4 * b, "bytes_out": 2 * b,
        }
        assert s["bytes_moved"] == {"put->device": 4 * b, "device->get": 4 * b, "device->host": 4 * b, "host->device": 2 * b}
        assert {k: s[k] for k in TOP_KEYS - {"tiers", "bytes_moved"}} == {
            "blocks": 4, "block_bytes": b, "dropped": 0, "puts": 2, "gets": 3, "leased_owners": 0,
        }


def test_dropped_and_leased_owners(layout) -> None:
    with make_store(0, 2, layout) as store:
        a, c = prompt(0, 2), prompt(100, 1)
        store.put(a, kv_for(layout, a))
        store.put(c, kv_for(layout, c))
        s = store.stats()
        assert s["dropped"] == 1 and s["tiers"]["host"]["evictions"] == 1 and s["blocks"] == 2
        store.lease(a, owner="r1")
        store.lease(c, owner="r2")
        store.lease(c)  # no owner: not counted
        assert store.stats()["leased_owners"] == 2


def test_stats_is_a_snapshot(layout) -> None:
    with make_store(2, 2, layout) as store:
        s = store.stats()
        a = prompt(0, 1)
        store.put(a, kv_for(layout, a))
        assert s["puts"] == 0 and s["bytes_moved"] == {}


def parse_exposition(text: str) -> dict[tuple[str, str], float]:
    """Samples keyed by (name, labels); fails on any line that is not HELP, TYPE or a sample."""
    assert text.endswith("\n")
    samples: dict[tuple[str, str], float] = {}
    typed: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            m = COMMENT.match(line)
            assert m, f"bad comment line: {line!r}"
            if m["kind"] == "TYPE":
                assert m["rest"] in ("counter", "gauge", "histogram", "summary", "untyped"), line
                assert m["name"] not in typed, f"TYPE given twice for {m['name']}"
                typed[m["name"]] = m["rest"]
            continue
        m = SAMPLE.match(line)
        assert m, f"bad sample line: {line!r}"
        histogram = typed.get(re.sub(r"_(bucket|sum|count)$", "", m["name"])) == "histogram"
        assert m["name"] in typed or histogram, f"sample before its TYPE: {line!r}"
        key = (m["name"], m["labels"] or "")
        assert key not in samples, f"duplicate sample {key}"
        samples[key] = float(m["value"])
    for name, kind in typed.items():
        if kind == "counter":
            assert name.endswith("_total"), f"counter {name} should end in _total"
    return samples


def test_prometheus_text_parses_and_agrees_with_stats(layout) -> None:
    b = layout.block_bytes
    with scripted(layout) as store:
        samples = parse_exposition(store.prometheus())
    assert samples[("tierkv_hits_total", '{tier="device"}')] == 2
    assert samples[("tierkv_misses_total", '{tier="device"}')] == 3
    assert samples[("tierkv_evictions_total", '{tier="device"}')] == 4
    assert samples[("tierkv_capacity_bytes", '{tier="host"}')] == 4 * b
    assert samples[("tierkv_used_bytes", '{tier="host"}')] == 4 * b
    assert samples[("tierkv_bytes_in_total", '{tier="device"}')] == 6 * b
    assert samples[("tierkv_bytes_out_total", '{tier="host"}')] == 2 * b
    assert samples[("tierkv_moved_bytes_total", '{direction="host->device"}')] == 2 * b
    assert samples[("tierkv_blocks", "")] == 4
    assert samples[("tierkv_dropped_blocks_total", "")] == 0


def test_prometheus_of_an_empty_store_parses(layout) -> None:
    with make_store(1, 1, layout) as store:
        samples = parse_exposition(store.prometheus())
    assert samples[("tierkv_blocks", "")] == 0
    assert not any(name == "tierkv_moved_bytes_total" for name, _ in samples)


@pytest.mark.parametrize("prefix", ["tierkv", "my_app"])
def test_to_prometheus_prefix(layout, prefix: str) -> None:
    with scripted(layout) as store:
        samples = parse_exposition(to_prometheus(store.stats(), prefix=prefix))
    assert samples[(f"{prefix}_bytes_in_total", '{tier="host"}')] == 4 * layout.block_bytes
    assert all(name.startswith(prefix + "_") for name, _ in samples)


def test_counters_moved_bytes_per_direction() -> None:
    c = StoreCounters.for_tiers(["device", "host"])
    c.moved_bytes("put", "device", 5)
    c.moved_bytes("device", "get", 3)
    assert dict(c.moved) == {"put->device": 5, "device->get": 3}
    assert (c.tiers["device"].bytes_in, c.tiers["device"].bytes_out) == (5, 3)
    assert (c.tiers["host"].bytes_in, c.tiers["host"].bytes_out) == (0, 0)
