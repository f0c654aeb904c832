"""The remote tier's pure parts: the record header, remote_url, the config fields, the breaker, the fault log.

No server is needed here; tests/test_remote.py runs the tier against a real Redis Cluster.
"""

from __future__ import annotations

import logging
import struct

import pytest
import torch

from tierkv import ConfigError, KVLayout, Namespace, StoreConfig
from tierkv.remote_url import parse_remote_url, redact
from tierkv.tiers.remote.breaker import BreakerState, CircuitBreaker
from tierkv.tiers.remote.faults import FaultLog
from tierkv.tiers.remote.record import FORMAT_VERSION, MAGIC, Problem, RecordFormat, record_key

LAYOUT = KVLayout(num_layers=2, kv_factor=2, num_kv_heads=2, head_dim=8, dtype=torch.bfloat16, block_tokens=4)
NS = Namespace(model="format-test")
KEY = bytes(range(16))
IDENT = bytes(16) + bytes(range(16))
SUM = 0x1234_5678_9ABC_DEF0


def fmt(namespace: Namespace = NS, layout: KVLayout = LAYOUT) -> RecordFormat:
    return RecordFormat.for_store(namespace, layout)


def value(f: RecordFormat, key: bytes = KEY, ident: bytes = IDENT, checksum: int = SUM) -> bytes:
    return f.header(key, ident, checksum) + bytes(f.payload_bytes)


# -- record -----------------------------------------------------------------------------------


def test_header_round_trip_and_sizes() -> None:
    f = fmt()
    assert f.ident_bytes == 16 + 4 * LAYOUT.block_tokens
    assert f.value_bytes == f.header_bytes + LAYOUT.block_bytes
    head = f.header(KEY, IDENT, SUM)
    assert len(head) == f.header_bytes and head[:4] == MAGIC
    assert f.read_header(head, KEY, IDENT) == SUM
    assert f.check_value(value(f), KEY, IDENT, SUM) is None
    assert f.check_value(value(f), KEY, IDENT, None) is None  # a block adopted without a checksum yet
    assert record_key(KEY) == b"tierkv:" + KEY.hex().encode()
    assert b"{" not in record_key(KEY), "no hash tag: blocks spread over every shard"


def test_tenant_does_not_change_the_header_namespace_but_the_model_does() -> None:
    assert fmt(Namespace(model="format-test", tenant="t1")).namespace == fmt().namespace
    assert fmt(Namespace(model="other")).namespace != fmt().namespace
    other_layout = KVLayout(num_layers=2, kv_factor=2, num_kv_heads=2, head_dim=8, dtype=torch.float16, block_tokens=4)
    assert fmt(layout=other_layout).layout != fmt().layout


@pytest.mark.parametrize("field", ["magic", "version", "namespace", "layout", "key", "payload", "ident"])
def test_any_header_field_that_differs_makes_a_foreign_value(field: str) -> None:
    f = fmt()
    head = bytearray(f.header(KEY, IDENT, SUM))
    offsets = {"magic": 0, "version": 4, "namespace": 8, "layout": 24, "key": 40, "payload": 64, "ident": 72}
    head[offsets[field]] ^= 0x01
    assert f.read_header(bytes(head), KEY, IDENT) is Problem.FOREIGN
    assert f.check_value(bytes(head) + bytes(f.payload_bytes), KEY, IDENT, SUM) is Problem.FOREIGN


def test_a_record_of_another_block_is_foreign() -> None:
    f = fmt()
    assert f.read_header(f.header(KEY, IDENT, SUM), bytes(16), IDENT) is Problem.FOREIGN
    assert f.read_header(f.header(KEY, IDENT, SUM), KEY, bytes(len(IDENT))) is Problem.FOREIGN


def test_lengths_and_checksums() -> None:
    f = fmt()
    good = value(f)
    assert f.check_value(None, KEY, IDENT, SUM) is Problem.MISSING
    assert f.check_value(b"", KEY, IDENT, SUM) is Problem.MISSING
    assert f.check_value(good[:-1], KEY, IDENT, SUM) is Problem.TORN
    assert f.check_value(good + b"x", KEY, IDENT, SUM) is Problem.TORN
    assert f.check_value(good[:10], KEY, IDENT, SUM) is Problem.TORN
    assert f.check_value(good, KEY, IDENT, SUM + 1) is Problem.REPLACED
    assert f.read_header(good[:5], KEY, IDENT) is Problem.TORN


def test_header_layout_is_the_documented_one() -> None:
    f = fmt()
    magic, version, ident_len, _, _, key, checksum, payload = struct.unpack_from("<4sHH16s16s16sQQ", f.header(KEY, IDENT, SUM))
    assert (magic, version, ident_len, key, checksum, payload) == (MAGIC, FORMAT_VERSION, len(IDENT), KEY, SUM,
                                                                   LAYOUT.block_bytes)
    with pytest.raises(ValueError, match="ident"):
        f.header(KEY, IDENT[:-1], SUM)


# -- remote_url ---------------------------------------------------------------------------------


def test_urls_parse() -> None:
    t = parse_remote_url("redis://10.0.0.1:7000")
    assert [(n.host, n.port) for n in t.nodes] == [("10.0.0.1", 7000)] and not t.tls and t.cluster is None
    t = parse_remote_url("rediss://app:s%3Acret@a.example:6380, rediss://b.example?ssl_cert_reqs=required&cluster=yes")
    assert [n.address for n in t.nodes] == ["a.example:6380", "b.example:6379"]
    assert t.tls and t.username == "app" and t.password == "s:cret" and t.cluster is True
    assert dict(t.tls_options) == {"ssl_cert_reqs": "required"}
    assert "s:cret" not in repr(t) and "s%3Acret" not in t.redacted() and "***" in t.redacted()
    assert parse_remote_url("redis://h/3?cluster=no").db == 3


@pytest.mark.parametrize(("url", "message"), [
    ("http://u:topsecret@h", "must start with redis://"),
    ("redis://", "names no host"),
    ("redis://h:notaport", "not a valid URL"),
    ("redis://a,rediss://b", "mixes redis:// and rediss://"),
    ("redis://u:topsecret@a,redis://u:other@b", "different credentials"),
    ("redis://h?ssl_cert_reqs=required", "need TLS"),
    ("rediss://h?ssl_cert_reqs=maybe", "ssl_cert_reqs"),
    ("rediss://h?ssl_ca_certs=/no/such/ca.pem", "not a readable file"),
    ("redis://h?colour=blue", "unknown option 'colour'"),
    ("redis://h/x", "database number"),
    ("redis://h/2?cluster=yes", "only database 0"),
    ("redis://a,redis://b?cluster=no", "takes one node"),
    ("redis://a,,redis://b", "empty entry"),
    ("", "expected a redis://"),
])
def test_bad_urls_are_refused_naming_the_field_and_never_the_password(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as e:
        parse_remote_url(url)
    assert str(e.value).startswith("remote_url:")
    assert "topsecret" not in str(e.value) and "other@" not in str(e.value)


def test_redact() -> None:
    assert redact("redis://u:pw@h:1,redis://:pw2@g") == "redis://u:***@h:1,redis://:***@g"
    assert redact("redis://h:1") == "redis://h:1"


def test_credentials_from_the_environment_fill_what_the_url_leaves_out() -> None:
    env = {"TIERKV_REMOTE_USERNAME": "fleet", "TIERKV_REMOTE_PASSWORD": "from-env"}
    t = parse_remote_url("redis://h").with_environment(env)
    assert (t.username, t.password) == ("fleet", "from-env")
    t = parse_remote_url("redis://u:from-url@h").with_environment(env)
    assert (t.username, t.password) == ("u", "from-url")


# -- StoreConfig ---------------------------------------------------------------------------------


def test_remote_config_fields_are_validated() -> None:
    c = StoreConfig(remote_url="redis://h:1", remote_ttl_s="30", remote_timeout_s="0.25", remote_write="evict",
                    remote_read_only="yes", remote_bytes="1GiB")
    assert (c.remote_ttl_s, c.remote_timeout_s, c.remote_write, c.remote_read_only, c.remote_bytes) == (
        30.0, 0.25, "evict", True, 1 << 30)
    for kwargs, message in [
        ({"remote_write": "sometimes"}, "remote_write: expected one of"),
        ({"remote_ttl_s": 0}, "remote_ttl_s: expected a number > 0.001"),
        ({"remote_timeout_s": -1}, "remote_timeout_s: expected a number > 0"),
        ({"remote_read_only": "perhaps"}, "remote_read_only: expected true or false"),
        ({"remote_bytes": "lots"}, "remote_bytes: expected a size"),
    ]:
        with pytest.raises(ConfigError, match=message):
            StoreConfig(remote_url="redis://h:1", **kwargs)
    with pytest.raises(ConfigError, match="remote_ttl_s: only used by the remote tier"):
        StoreConfig(remote_ttl_s=10)
    with pytest.raises(ConfigError, match="remote_url:"):
        StoreConfig(remote_url="redis://u:pw@h:port")


def test_remote_url_password_is_not_in_the_config_repr() -> None:
    c = StoreConfig(remote_url="redis://u:hunter2@h:1")
    assert "hunter2" not in repr(c)


def test_from_env_reads_remote_fields_and_leaves_credentials_to_the_tier() -> None:
    env = {"TIERKV_REMOTE_URL": "redis://h:7000", "TIERKV_REMOTE_WRITE": "evict",
           "TIERKV_REMOTE_USERNAME": "fleet", "TIERKV_REMOTE_PASSWORD": "pw"}
    c = StoreConfig.from_env(env)
    assert c.remote_url == "redis://h:7000" and c.remote_write == "evict"
    assert "pw" not in repr(c.to_dict())


# -- breaker and fault log -------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_the_threshold_and_recovers_by_itself() -> None:
    clock = Clock()
    b = CircuitBreaker(threshold=3, cooldown_s=1.0, max_cooldown_s=4.0, clock=clock)
    assert b.allow() and not b.failure() and not b.failure()
    assert b.failure(), "the third failure in a row opens it"
    assert b.state is BreakerState.OPEN and not b.allow()
    clock.now += 1.0
    assert b.state is BreakerState.HALF_OPEN
    assert b.allow() and not b.allow(), "one trial at a time"
    assert b.failure(), "a failed trial opens it again, for twice as long"
    clock.now += 1.5
    assert not b.allow()
    clock.now += 0.5
    assert b.allow()
    b.success()
    assert b.state is BreakerState.CLOSED and b.allow() and b.opened == 2
    assert not b.failure(), "after a success the count starts again"


def test_breaker_cooldown_is_capped() -> None:
    clock = Clock()
    b = CircuitBreaker(threshold=1, cooldown_s=1.0, max_cooldown_s=3.0, clock=clock)
    b.failure()
    for _ in range(5):
        clock.now += 10
        assert b.allow()
        b.failure()
    clock.now += 3.0
    assert b.allow(), "the cooldown stopped doubling at max_cooldown_s"


def test_fault_log_counts_everything_and_logs_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    faults = FaultLog(interval_s=30, clock=clock)
    with caplog.at_level(logging.WARNING, logger="tierkv.remote"):
        for _ in range(100):
            faults.note("timeout", "127.0.0.1:7000")
        faults.note("moved", "MOVED 1 127.0.0.1:7001")
        clock.now += 31
        faults.note("timeout", "127.0.0.1:7000")
    assert faults.counts == {"timeout": 101, "moved": 1}
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines
    assert "1 x timeout" in lines[0] and "1 x moved" in lines[1]
    assert "100 x timeout in the last 31 s" in lines[2], "the second line says how many it stood for"


# -- receive areas ----------------------------------------------------------------------------------


def test_a_receive_area_is_reused_only_once_no_tensor_shares_it() -> None:
    import gc

    from tierkv.tiers.remote.rows import RowAreas

    areas = RowAreas(limit_bytes=64 << 20)
    rows = areas.rows(8, 2 << 20)
    rows.fill_(7)
    view = rows.view(torch.int64)[1:]  # a view that outlives the tensor it came from
    address = rows.data_ptr()
    del rows
    gc.collect()
    assert areas.idle_bytes == 0, "a live view keeps its area out of the pool"
    assert int(view[0, 0]) == 0x0707070707070707
    del view
    gc.collect()
    assert areas.idle_bytes == 16 << 20
    again = areas.rows(8, 2 << 20)
    assert again.data_ptr() == address and areas.idle_bytes == 0
    small = areas.rows(2, 4096)
    assert small.shape == (2, 4096), "small reads are plain memory"
    del again
    gc.collect()
    big = RowAreas(limit_bytes=8 << 20).rows(8, 2 << 20)
    assert big.shape == (8, 2 << 20)
