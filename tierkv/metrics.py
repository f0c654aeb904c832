"""Prometheus metrics of a store, on prometheus_client: families, latency histograms, the HTTP exporter.

Three ways to get them (docs/metrics.md):

- `BlockStore.prometheus()`: the text exposition of one store, rendered by prometheus_client.
- `StoreConfig(metrics_port=N)` (or `TIERKV_METRICS_PORT`): the store serves /metrics over HTTP
  from its own process, live, on `metrics_host` (127.0.0.1 unless told otherwise). Several stores
  of one process may name the same port; they share one server and their samples are told apart
  by a `store` label.
- `tierkv metrics DIR --port N`: what a disk store directory holds, read from its manifest
  without its writer lock (`DirectoryCollector`), for a directory no live exporter serves.

Names follow Prometheus conventions: counters end in `_total`, sizes in `_bytes`, durations in
`_seconds`; per-tier series carry `tier="device|host|disk|..."`.
"""

from __future__ import annotations

import bisect
import errno
import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from .config import DEFAULT_METRICS_HOST
from .errors import ConfigError

# The store operations whose latency is observed (`BlockStore` methods of these names).
OPERATIONS = ("put", "get", "match", "lease", "save_from", "load_into", "load_layers")
# Bucket bounds in seconds: 10 us (a match of a short prompt) to 10 s (a cold multi-GiB load from disk).
LATENCY_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0, 10.0)


class OperationLatency:
    """Per operation: counts per latency bucket and the sum, the data of one Prometheus histogram each.

    `observe` is on the hot path of every store call: one bisect and three additions under an
    uncontended lock, about a microsecond.
    """

    def __init__(self, operations: Sequence[str] = OPERATIONS, buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        self.buckets = tuple(buckets)
        self._lock = threading.Lock()
        self._counts = {op: [0] * (len(self.buckets) + 1) for op in operations}
        self._sums = dict.fromkeys(operations, 0.0)

    def observe(self, op: str, seconds: float) -> None:
        i = bisect.bisect_left(self.buckets, seconds)
        with self._lock:
            self._counts[op][i] += 1
            self._sums[op] += seconds

    def snapshot(self) -> dict[str, tuple[list[int], float]]:
        """op -> (cumulative counts per bucket bound, +Inf last; sum of seconds)."""
        with self._lock:
            out = {}
            for op, counts in self._counts.items():
                cumulative, total = [], 0
                for c in counts:
                    total += c
                    cumulative.append(total)
                out[op] = (cumulative, self._sums[op])
            return out


def _family(kind: str, name: str, doc: str, labels: Sequence[str]) -> Any:
    cls = {"gauge": GaugeMetricFamily, "counter": CounterMetricFamily}[kind]
    return cls(name, doc, labels=list(labels))


# (stats key, kind, metric name without the tierkv_ prefix, help); counters get `_total` from prometheus_client.
_PER_TIER = (
    ("capacity_bytes", "gauge", "capacity_bytes", "Bytes the tier can hold."),
    ("used_bytes", "gauge", "used_bytes", "Bytes the tier's blocks fill now (occupancy)."),
    ("slots", "gauge", "capacity_blocks", "Blocks the tier can hold."),
    ("used_slots", "gauge", "used_blocks", "Blocks the tier holds now."),
    ("hits", "counter", "hits", "Blocks served from the tier."),
    ("misses", "counter", "misses", "Blocks looked up in the tier and not found there."),
    ("evictions", "counter", "evictions", "Blocks that left the tier under pressure."),
    ("corrupt", "counter", "corrupt_reads", "Block reads from the tier that failed checksum verification (never served)."),
    ("bytes_in", "counter", "bytes_in", "Bytes written into the tier (from callers, engines and other tiers)."),
    ("bytes_out", "counter", "bytes_out", "Bytes read out of the tier (to callers, engines and other tiers)."),
)


def store_families(stats: dict[str, Any], latency: OperationLatency | None = None,
                   const: dict[str, str] | None = None, prefix: str = "tierkv") -> list[Metric]:
    """The metric families of one store's `stats()` (and latency histograms), each sample also
    carrying the `const` labels (the exporter's `store` label)."""
    const = const or {}
    names, values = list(const), list(const.values())
    out: list[Metric] = []
    tiers = stats["tiers"]
    for key, kind, name, doc in _PER_TIER:
        family = _family(kind, f"{prefix}_{name}", doc, [*names, "tier"])
        for tier, t in tiers.items():
            family.add_metric([*values, tier], t.get(key, 0))
        out.append(family)
    moved = CounterMetricFamily(f"{prefix}_moved_bytes", "Bytes moved, by direction: 'source->destination' "
                                "(put, get, engine are callers; the rest are tiers).", labels=[*names, "direction"])
    for direction, n in stats["bytes_moved"].items():
        moved.add_metric([*values, direction], n)
    out.append(moved)
    for kind, name, doc, value in (
        ("gauge", "blocks", "Distinct blocks stored in any tier.", stats["blocks"]),
        ("gauge", "block_bytes", "Bytes of one block (all layers, K and V).", stats["block_bytes"]),
        ("counter", "dropped_blocks", "Blocks deleted from the last tier.", stats["dropped"]),
        ("gauge", "leased_owners", "Requests holding leases now.", stats["leased_owners"]),
    ):
        family = _family(kind, f"{prefix}_{name}", doc, names)
        family.add_metric(values, value)
        out.append(family)
    out.extend(section_families(stats, const, prefix))
    if latency is not None:
        hist = HistogramMetricFamily(f"{prefix}_operation_duration_seconds",
                                     "Latency of store operations (put, get, match, lease, save_from, load_into, load_layers).",
                                     labels=[*names, "op"])
        bounds = [repr(float(b)) for b in latency.buckets] + ["+Inf"]
        for op, (cumulative, total) in latency.snapshot().items():
            hist.add_metric([*values, op], list(zip(bounds, cumulative)), total)
        out.append(hist)
    return out


# Keys of `stats()` that are the store's own; every other key whose value is a dict is a tier's section.
_STORE_KEYS = frozenset({"tiers", "blocks", "block_bytes", "bytes_moved", "dropped", "puts", "gets", "leased_owners"})


def section_families(stats: dict[str, Any], const: dict[str, str] | None = None, prefix: str = "tierkv") -> list[Metric]:
    """The numbers of the tiers' own sections of `stats()` (the disk directory, the remote tier's
    traffic and faults, ...) as `tierkv_<section>_<key>`: a key ending in `_total` is a counter,
    any other a gauge; a dict of numbers is one family with a `kind` label. Text is left out."""
    const = const or {}
    names, values = list(const), list(const.values())
    out: list[Metric] = []
    for section, body in stats.items():
        if section in _STORE_KEYS or not isinstance(body, dict):
            continue
        for key, value in body.items():
            kind = "counter" if key.endswith("_total") else "gauge"
            name = f"{prefix}_{section}_{key.removesuffix('_total')}"
            doc = f"stats()['{section}']['{key}']"
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                family = _family(kind, name, doc, names)
                family.add_metric(values, value)
                out.append(family)
            elif isinstance(value, dict) and value and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in value.values()):
                family = _family(kind, name, doc, [*names, "kind"])
                for label, v in value.items():
                    family.add_metric([*values, str(label)], v)
                out.append(family)
    return out


class _Families(Collector):
    def __init__(self, families: Callable[[], Iterable[Metric]]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        yield from self._families()


def render(families: Iterable[Metric]) -> str:
    """Prometheus text exposition (format 0.0.4) of `families`, by prometheus_client."""
    registry = CollectorRegistry(auto_describe=False)
    materialised = list(families)
    registry.register(_Families(lambda: materialised))
    return generate_latest(registry).decode()


# -- the in-process exporter ------------------------------------------------------------


def listen(port: int, host: str, registry: CollectorRegistry, port_field: str = "metrics_port",
           host_field: str = "metrics_host") -> tuple[Any, int]:
    """prometheus_client's HTTP server for `registry` on host:port; returns (server, the port it got).

    A failure is a `ConfigError` naming the setting at fault: the port (taken, or privileged) or
    the address (not one of this machine's, or a name that does not resolve).
    """
    try:
        httpd, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as e:  # socket.gaierror too: a host name that does not resolve
        field = port_field if e.errno in (errno.EADDRINUSE, errno.EACCES) else host_field
        raise ConfigError(f"{field}: cannot serve metrics on port {port} of {host}: {e.strerror or e}") from None
    return httpd, int(httpd.server_port)


def local_url(host: str, port: int) -> str:
    """The /metrics URL a client on this machine uses for a server listening on host:port."""
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics"


class _Server:
    """One HTTP server per port in a process, serving every store registered on it."""

    def __init__(self, port: int, host: str) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.sources: dict[str, Callable[[dict[str, str]], list[Metric]]] = {}
        self.lock = threading.Lock()
        self.registry.register(_Families(self._collect))
        self.host = host
        self.httpd, self.port = listen(port, host, self.registry)

    def _collect(self) -> Iterator[Metric]:
        with self.lock:
            sources = list(self.sources.items())
        merged: dict[str, Metric] = {}
        for label, families in sources:
            for family in families({"store": label}):
                into = merged.setdefault(family.name, family)
                if into is not family:
                    into.samples.extend(family.samples)
        yield from merged.values()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


_servers: dict[int, _Server] = {}
_servers_lock = threading.Lock()


class Exporter:
    """A store's registration with the process's HTTP server on a port; `close()` withdraws it
    (the server stops with its last store). `host` is the address it listens on (`metrics_host`)."""

    def __init__(self, families: Callable[[dict[str, str]], list[Metric]], name: str, port: int,
                 host: str = DEFAULT_METRICS_HOST) -> None:
        with _servers_lock:
            server = _servers.get(port) if port else None
            if server is not None and server.host != host:
                raise ConfigError(f"metrics_host: port {port} is already served on {server.host} by another store of "
                                  f"this process, not on {host}; give the stores one metrics_host or separate ports")
            if server is None:
                server = _Server(port, host)
                _servers[server.port] = server
            with server.lock:
                label, n = name, 2
                while label in server.sources:
                    label, n = f"{name}#{n}", n + 1
                server.sources[label] = families
        self._server = server
        self.label = label
        self.port = server.port

    @property
    def url(self) -> str:
        return local_url(self._server.host, self.port)

    def close(self) -> None:
        server = self._server
        with _servers_lock:
            with server.lock:
                server.sources.pop(self.label, None)
                last = not server.sources
            if last and _servers.get(server.port) is server:
                del _servers[server.port]
                server.close()


# -- a store directory, read without its lock ------------------------------------------------

SLOT_ALIGN = 4096  # data-file slots are blocks rounded up to this (tiers/disk/files.py ALIGN)


class DirectoryCollector(Collector):
    """What a disk store directory holds, read at every scrape from its manifest (LMDB opened
    read-only, as a reader beside the writer: no writer lock taken) and its data files.

    Live counters (hits, misses, latency) exist only in the process that has the store open;
    this collector serves what the directory itself says: blocks, bytes, capacity, whether a
    writer holds it.
    """

    def __init__(self, directory: str | os.PathLike[str], prefix: str = "tierkv") -> None:
        self.directory = Path(directory)
        self.prefix = prefix
        manifest = self.directory / "manifest"
        if not (manifest / "data.mdb").is_file():
            from .errors import ConfigError

            raise ConfigError(f"{self.directory} holds no tierkv disk store (no manifest/data.mdb there)")
        self._manifest = manifest
        self.read_directory()  # fail now, not at the first scrape

    def read_directory(self) -> dict[str, Any]:
        import lmdb

        env = lmdb.open(str(self._manifest), subdir=True, readonly=True, lock=True, max_dbs=2, readahead=False)
        try:
            with env.begin() as txn:
                meta = env.open_db(b"meta", txn=txn, create=False)
                raw = txn.get(b"identity", db=meta)
                blocks_db = env.open_db(b"blocks", txn=txn, create=False)
                blocks = int(txn.stat(blocks_db)["entries"])
        finally:
            env.close()
        identity = json.loads(raw) if raw is not None else {}
        block_bytes = int(identity.get("block_bytes", 0))
        stride = -(-block_bytes // SLOT_ALIGN) * SLOT_ALIGN  # tiers/disk/files.py slot_stride, without torch
        file_bytes = sum(p.stat().st_size for p in self.directory.glob("data*.bin"))
        return {
            "blocks": blocks,
            "block_bytes": block_bytes,
            "capacity_bytes": file_bytes,
            "capacity_blocks": file_bytes // stride if stride else 0,
            "used_bytes": blocks * stride,
            "model": identity.get("namespace", {}).get("model", ""),
            "writer": writer_pid(self.directory),
        }

    def collect(self) -> Iterator[Metric]:
        p = self.prefix
        start = time.perf_counter()
        d = self.read_directory()
        labels, values = ["tier", "directory"], ["disk", str(self.directory)]
        for name, doc, key in (
            ("capacity_bytes", "Bytes the tier can hold.", "capacity_bytes"),
            ("used_bytes", "Bytes the tier's blocks fill now (occupancy).", "used_bytes"),
            ("capacity_blocks", "Blocks the tier can hold.", "capacity_blocks"),
            ("used_blocks", "Blocks the tier holds now.", "blocks"),
        ):
            family = GaugeMetricFamily(f"{p}_{name}", doc, labels=labels)
            family.add_metric(values, d[key])
            yield family
        block = GaugeMetricFamily(f"{p}_block_bytes", "Bytes of one block (all layers, K and V).", labels=["directory"])
        block.add_metric([str(self.directory)], d["block_bytes"])
        yield block
        writer = GaugeMetricFamily(f"{p}_disk_writer_pid", "Pid of the process holding the directory's writer lock "
                                   "(0: no store has it open).", labels=["directory"])
        writer.add_metric([str(self.directory)], d["writer"] or 0)
        yield writer
        took = GaugeMetricFamily(f"{p}_directory_scrape_seconds", "Time this scrape took to read the manifest.",
                                 labels=["directory"])
        took.add_metric([str(self.directory)], time.perf_counter() - start)
        yield took


def writer_pid(directory: Path) -> int | None:
    """The pid of the process holding the directory's writer lock (an flock on LOCK), or None.

    Read from /proc/locks (the kernel's table: holder pid and inode), so it takes no lock itself
    and can never make a starting writer fail; without /proc, a shared flock taken and dropped
    at once stands in (pid then from the file).
    """
    path = directory / "LOCK"
    try:
        st = os.stat(path)
    except OSError:
        return None
    try:
        with open("/proc/locks") as f:
            table = f.read().splitlines()
    except OSError:
        return _writer_pid_by_flock(path)
    for line in table:
        parts = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF" (a blocked waiter has "->" after the number)
        if "->" in parts or len(parts) < 6 or parts[1] != "FLOCK":
            continue
        _major, _minor, inode = parts[5].split(":")
        if int(inode) == st.st_ino and int(_major, 16) == os.major(st.st_dev) and int(_minor, 16) == os.minor(st.st_dev):
            return int(parts[4])
    return None


def _writer_pid_by_flock(path: Path) -> int | None:
    import fcntl

    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 64, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def serve_directory(directory: str | os.PathLike[str], port: int, host: str = "127.0.0.1") -> tuple[Any, int]:
    """Serve `DirectoryCollector(directory)` at http://host:port/metrics; returns (server, port)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DirectoryCollector(directory))
    return listen(port, host, registry, "--port", "--host")
