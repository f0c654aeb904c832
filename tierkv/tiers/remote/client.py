"""The tier's connection to Redis: batches of commands, one pipeline per shard, every shard at once, faults as values.

redis-py's `RedisCluster` (with hiredis where it installs) knows the cluster: its nodes, which
master serves which slot, and how to reload that after a failover or a slot migration. The
bytes themselves go over `wire.py` connections, one pool per node: a batch is grouped by the
master of each key, the shards' pipelines run at once, one thread each (one round trip for a
prompt's hundred blocks, not one per shard or per block), and values are received
straight into their rows. redis-py's own cluster pipeline could not do the last part, and it
raises for the whole batch when one node is down; here a node that is down costs only its own
keys, and every command gets its reply or a `Fault` that names what went wrong. Nothing raises
out of `execute`.

Each node has a circuit breaker: a dead node is left alone for a while and its keys are instant
misses. A connection error, a key refused by an open breaker, or a MOVED/ASK/TRYAGAIN/CLUSTERDOWN
reply marks the slot map stale; it is reloaded (at most every `REFRESH_S`, backing off while that
fails) before the next batch, which is how a failover or a resharding is picked up within a second.
Connecting is lazy and retried the same way, so a store opens even while its cluster is down.

redis-py is needed only with a remote tier (`pip install 'tierkv[remote]'`) and imported here only.
"""

from __future__ import annotations

import binascii
import contextlib
import ssl
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ...errors import ConfigError
from ...remote_url import RemoteTarget
from .breaker import BreakerState, CircuitBreaker
from .faults import FaultLog
from .wire import Connection, ErrorReply, Request, WireError, tls_context

REFRESH_S = 0.5  # the slot map is reloaded at most this often after a fault that may mean it moved
MAX_REFRESH_S = 30.0  # ... and, while reloading fails, ever less often, down to this
_IDLE_PER_NODE = 4
_SHARD_THREADS = 16  # threads running the shards' pipelines of a batch at once
# Error replies that mean the key's slot is served elsewhere now, or not at all for a moment.
_MOVING = {"MOVED": "moved", "ASK": "ask", "TRYAGAIN": "try_again", "CLUSTERDOWN": "cluster_down"}
_ERRORS = {"OOM": "full", "NOAUTH": "auth", "WRONGPASS": "auth", "NOPERM": "denied", "READONLY": "read_only_replica",
           "LOADING": "loading", "MASTERDOWN": "cluster_down"}


@dataclass(frozen=True)
class Fault:
    """What a command got instead of a reply: the kind (a counter name) and what was said."""

    kind: str
    detail: str


def load_redis() -> Any:
    try:
        import redis
    except ImportError:
        raise ConfigError("remote_url: the remote tier needs redis-py; install it with `pip install 'tierkv[remote]'` "
                          "(redis and hiredis)") from None
    return redis


def error_fault(reply: ErrorReply) -> Fault:
    kind = _MOVING.get(reply.code) or _ERRORS.get(reply.code, "error")
    return Fault(kind, reply.message[:200])


class NodePool:
    """Idle connections to one server, handed to one caller at a time."""

    def __init__(self, client: RemoteClient, host: str, port: int) -> None:
        self.client, self.host, self.port = client, host, port
        self._idle: list[Connection] = []
        self._lock = threading.Lock()

    def get(self) -> Connection:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return self.client.open_connection(self.host, self.port)

    def put(self, conn: Connection) -> None:
        with self._lock:
            if len(self._idle) < _IDLE_PER_NODE:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


class RemoteClient:
    """Commands to a Redis Cluster or one Redis server, in batches; thread-safe."""

    def __init__(self, target: RemoteTarget, timeout_s: float, faults: FaultLog) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self.faults = faults
        self._tls: ssl.SSLContext | None = tls_context(dict(target.tls_options)) if target.tls else None
        self._lock = threading.Lock()
        self._cluster: Any = None  # redis.cluster.RedisCluster: the slot map, once connected in cluster mode
        self._single: NodePool | None = None  # the one server, once connected to a plain server
        self._pools: dict[str, NodePool] = {}
        self._routes: dict[int, tuple[str, NodePool]] = {}  # slot -> its master's (name, pool), as last mapped
        self._pool: ThreadPoolExecutor | None = None
        self._connect_breaker = CircuitBreaker()
        self._breakers: dict[str, CircuitBreaker] = {}
        self._stale = False
        self._refreshed = 0.0
        self._refresh_backoff = REFRESH_S
        self.mode = "unknown"  # "cluster" or "single" once connected

    # -- connections -------------------------------------------------------------------

    def open_connection(self, host: str, port: int) -> Connection:
        t = self.target
        return Connection(host, port, timeout=self.timeout_s, tls=self._tls, username=t.username, password=t.password,
                          db=t.db)

    def _is_cluster(self) -> bool:
        """Ask the first node that answers whether it runs in cluster mode."""
        last: WireError | None = None
        for node in self.target.nodes:
            try:
                conn = self.open_connection(node.host, node.port)
            except WireError as e:
                last = e
                continue
            try:
                request = Request((b"INFO", b"cluster"))
                conn.send([request])
                info = conn.read(request)
            finally:
                conn.close()
            return isinstance(info, bytes) and b"cluster_enabled:1" in info
        assert last is not None
        raise last

    def _redis_options(self) -> dict[str, Any]:
        t = self.target
        opts: dict[str, Any] = {"socket_timeout": self.timeout_s, "socket_connect_timeout": self.timeout_s,
                                "username": t.username, "password": t.password}
        if t.tls:
            opts["ssl"] = True
            for key, value in t.tls_options:
                opts[key] = value.lower() in ("true", "yes", "1") if key == "ssl_check_hostname" else value
        return opts

    def connect(self) -> bool:
        """Connect if not yet connected; False (a fault noted) when the servers cannot be reached now."""
        if self._cluster is not None or self._single is not None:
            return True
        with self._lock:
            if self._cluster is not None or self._single is not None:
                return True
            if not self._connect_breaker.allow():
                return False
            load_redis()
            try:
                cluster = self.target.cluster if self.target.cluster is not None else self._is_cluster()
                if cluster:
                    from redis.cluster import ClusterNode, RedisCluster

                    self._cluster = RedisCluster(startup_nodes=[ClusterNode(n.host, n.port) for n in self.target.nodes],
                                                 require_full_coverage=False, **self._redis_options())
                    self.mode = "cluster"
                else:
                    node = self.target.nodes[0]
                    pool = NodePool(self, node.host, node.port)
                    pool.put(pool.get())  # reachable, and the credentials work
                    self._single = pool
                    self.mode = "single"
            except Exception as e:  # any failure to connect is a fault: the store runs on without the tier
                self._connect_breaker.failure()
                fault = self._fault(e)
                self.faults.note(f"connect_{fault.kind}", f"{self.target.redacted()}: {fault.detail}")
                return False
            self._connect_breaker.success()
            self._refreshed = time.monotonic()
            return True

    def close(self) -> None:
        with self._lock:
            for pool in [*self._pools.values(), *([self._single] if self._single else [])]:
                pool.close()
            if self._cluster is not None:
                with contextlib.suppress(Exception):  # closing sockets of a dead server must not fail a close
                    self._cluster.close()
            self._cluster, self._single, self._pools = None, None, {}
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None

    @staticmethod
    def _fault(error: BaseException) -> Fault:
        if isinstance(error, WireError):
            return Fault(error.kind, error.detail)
        from redis import exceptions as e

        kinds: list[tuple[type[BaseException], str]] = [
            (e.AuthenticationError, "auth"), (e.AuthorizationError, "auth"), (e.TimeoutError, "timeout"),
            (e.ConnectionError, "connection"), (e.ClusterError, "cluster_down"), (e.RedisClusterException, "cluster_down"),
            (e.ResponseError, "error"), (OSError, "connection")]
        kind = next((k for cls, k in kinds if isinstance(error, cls)), "error")
        return Fault(kind, f"{type(error).__name__}: {str(error)[:200]}")

    # -- routing -----------------------------------------------------------------------

    def _refresh(self) -> None:
        """Reload the slot map after a fault that may mean it changed (failover, migration)."""
        if self._cluster is None or not self._stale or time.monotonic() - self._refreshed < REFRESH_S:
            return
        with self._lock:
            if not self._stale or self._cluster is None:
                return
            self._stale, self._refreshed = False, time.monotonic()
            try:
                self._cluster.nodes_manager.initialize()
                self._routes = {}
                self._refresh_backoff = REFRESH_S
            except Exception as e:  # the cluster may be half down: keep the old map, try again later, less often
                self._stale = True
                self._refreshed += self._refresh_backoff
                self._refresh_backoff = min(2 * self._refresh_backoff, MAX_REFRESH_S)
                fault = self._fault(e)
                self.faults.note(f"refresh_{fault.kind}", fault.detail)

    def _route(self, key: bytes) -> tuple[str, NodePool]:
        """(node name, connection pool) of the master serving `key` now (cached per slot until the map is reloaded)."""
        if self._single is not None:
            return "single", self._single
        slot = binascii.crc_hqx(key, 0) % 16384  # no hash tags in tierkv's keys: the slot of the whole key
        route = self._routes.get(slot)
        if route is not None:
            return route
        node = self._cluster.nodes_manager.get_node_from_slot(slot)
        pool = self._pools.get(node.name)
        if pool is None:
            with self._lock:
                pool = self._pools.setdefault(node.name, NodePool(self, node.host, node.port))
        route = self._routes[slot] = (node.name, pool)
        return route

    def _breaker(self, name: str) -> CircuitBreaker:
        breaker = self._breakers.get(name)
        if breaker is None:
            with self._lock:
                breaker = self._breakers.setdefault(name, CircuitBreaker())
        return breaker

    def breaker_states(self) -> dict[str, str]:
        states = {name: b.state.value for name, b in list(self._breakers.items())}
        if self._connect_breaker.state is not BreakerState.CLOSED:
            states["connect"] = self._connect_breaker.state.value
        return states

    @property
    def available(self) -> bool:
        """False while connecting is refused by its breaker: every command would be an instant fault."""
        return self._cluster is not None or self._single is not None or self._connect_breaker.state is not BreakerState.OPEN

    # -- batches -----------------------------------------------------------------------

    def execute(self, requests: Sequence[Request]) -> list[Any]:
        """Each request's reply, or a `Fault`; one pipeline per node, the nodes' pipelines at once."""
        results: list[Any] = [None] * len(requests)
        if not requests:
            return results
        if not self.connect():
            return [Fault("unreachable", self.target.redacted())] * len(requests)
        self._refresh()
        groups: dict[str, list[int]] = defaultdict(list)
        pools: dict[str, NodePool] = {}
        for i, request in enumerate(requests):
            try:
                name, pool = self._route(request.key)
            except Exception as e:  # a slot no master serves now: a miss until the map is reloaded
                results[i] = Fault("uncovered", str(e)[:200])
                self._stale = True
                continue
            pools[name] = pool
            groups[name].append(i)
        live = []
        for name, positions in groups.items():
            breaker = self._breaker(name)
            if breaker.allow():
                live.append((name, breaker, pools[name], positions))
                continue
            for i in positions:
                results[i] = Fault("node_down", name)
            self._stale = True  # its replica may have taken over: the next batch reloads the slot map
        def run(node: tuple[str, CircuitBreaker, NodePool, list[int]]) -> None:
            name, breaker, pool, positions = node
            self._run_node(name, breaker, pool, positions, requests, results)

        if len(live) == 1:
            run(live[0])
        elif live:
            # One thread per shard: every server sends at once, and each socket is drained while
            # the others fill (socket I/O releases the GIL); read one after the other, a server
            # whose replies outgrow its socket buffer waits for the ones before it.
            list(self._threads().map(run, live))
        return results

    def _threads(self) -> ThreadPoolExecutor:
        if self._pool is None:
            with self._lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(max_workers=_SHARD_THREADS, thread_name_prefix="tierkv-remote-io")
        return self._pool

    def _run_node(self, name: str, breaker: CircuitBreaker, pool: NodePool, positions: list[int],
                  requests: Sequence[Request], results: list[Any]) -> None:
        """One node's pipeline: send its requests, read its replies (faults into `results`, never raised)."""
        conn = None
        try:
            conn = pool.get()
            conn.send([requests[i] for i in positions])
        except WireError as e:  # the node is down or unreachable: its keys miss, the others go on
            self._node_failed(name, breaker, conn, positions, results, e)
            return
        self._read_replies(name, breaker, pool, conn, positions, requests, results)

    def _read_replies(self, name: str, breaker: CircuitBreaker, pool: NodePool, conn: Connection, positions: list[int],
                      requests: Sequence[Request], results: list[Any]) -> None:
        for n, i in enumerate(positions):
            try:
                reply = conn.read(requests[i])
            except WireError as e:  # the connection broke mid-batch: the rest of this node's keys miss
                self._node_failed(name, breaker, conn, positions[n:], results, e)
                return
            if isinstance(reply, ErrorReply):
                reply = error_fault(reply)
                if reply.kind in _MOVING.values():
                    self._stale = True
            results[i] = reply
        breaker.success()
        pool.put(conn)

    def _node_failed(self, name: str, breaker: CircuitBreaker, conn: Connection | None, positions: list[int],
                     results: list[Any], error: WireError) -> None:
        fault = Fault(error.kind, error.detail)
        for i in positions:
            results[i] = fault
        self._stale = True
        if conn is not None:
            conn.close()
        if breaker.failure():
            self.faults.note("breaker_open", f"{name}: {fault.detail}; its keys are misses for a while")
