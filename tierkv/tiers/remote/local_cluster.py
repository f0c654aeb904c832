"""A throwaway Redis Cluster on loopback: real `redis-server` processes, for tests, benchmarks and demos.

The remote tier is tested against the real thing, never a fake: `LocalCluster` starts masters
(and replicas) with `cluster-enabled yes` on free ports of 127.0.0.1, joins them with
`redis-cli --cluster create`, waits until every slot is served, and removes everything on
`stop()`. It can kill a node with SIGKILL and start it again on the same port and node file, so
a test can watch the tier ride through a node loss, a failover and a return. A single
non-cluster server (`masters=1, cluster=False`) is there for the plain-Redis path.

Nothing here is imported by the tier itself; it needs `redis-server` and `redis-cli` on PATH
(Debian/Ubuntu: `apt-get install -y redis-server`).
"""

from __future__ import annotations

import binascii
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

_BUS_OFFSET = 10000  # Redis Cluster's node-to-node bus listens on port + 10000


class ClusterStartError(RuntimeError):
    """The local cluster did not come up; the message carries the servers' last log lines."""


def redis_available() -> str | None:
    """None when redis-server and redis-cli are on PATH, else what is missing (for a skip reason)."""
    missing = [exe for exe in ("redis-server", "redis-cli") if shutil.which(exe) is None]
    return None if not missing else f"{' and '.join(missing)} not on PATH (apt-get install -y redis-server)"


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(n: int, bus: bool = True) -> list[int]:
    """`n` ports of 127.0.0.1 that are free now (each with its cluster bus port free too)."""
    rng = random.Random()
    ports: list[int] = []
    while len(ports) < n:
        port = rng.randrange(20000, 55000 - _BUS_OFFSET)
        if port in ports or (bus and port + _BUS_OFFSET in ports):
            continue
        if _port_free(port) and (not bus or _port_free(port + _BUS_OFFSET)):
            ports.append(port)
    return ports


@dataclass
class Node:
    """One redis-server process of the local cluster."""

    port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.directory / f"redis-{self.port}.log"

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


@dataclass
class LocalCluster:
    """Redis servers on loopback, cluster mode by default; use as a context manager or call start/stop.

    masters / replicas: shards, and replicas per shard (a failover needs one).
    password: `requirepass` (and `masterauth`) of every node; with `acl_users`, extra ACL users
        as (name, password, rules) tuples, e.g. ("reader", "pw", "~tierkv:* +@read +ping +cluster").
    maxmemory / maxmemory_policy: each node's memory bound and what it evicts when full.
    tls: a directory holding ca.crt, server.crt and server.key (see `make_test_certificates`);
        the nodes then speak only TLS, bus included.
    node_timeout_ms: how long a master may be silent before its replica takes over.
    """

    masters: int = 3
    replicas: int = 0
    cluster: bool = True
    password: str | None = None
    acl_users: tuple[tuple[str, str, str], ...] = ()
    maxmemory: str | None = None
    maxmemory_policy: str = "allkeys-lru"
    tls: Path | None = None
    node_timeout_ms: int = 1000
    directory: Path | None = None
    nodes: list[Node] = field(default_factory=list)
    _own_directory: bool = False

    # -- lifecycle -------------------------------------------------------------------

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 30.0) -> LocalCluster:
        missing = redis_available()
        if missing:
            raise ClusterStartError(missing)
        if not self.cluster and (self.masters != 1 or self.replicas):
            raise ValueError("a plain (non-cluster) server is one master without replicas")
        if self.directory is None:
            self.directory = Path(tempfile.mkdtemp(prefix="tierkv-redis-"))
            self._own_directory = True
        count = self.masters * (1 + self.replicas)
        try:
            for port in free_ports(count, bus=self.cluster):
                node = Node(port, self.directory)
                self.nodes.append(node)
                self._launch(node)
            deadline = time.monotonic() + timeout
            for node in self.nodes:
                self._wait_ping(node, deadline)
            if self.cluster:
                self._create(deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Terminate every node (SIGKILL after 5 s) and delete the directory if this cluster made it."""
        for node in self.nodes:
            if node.alive():
                assert node.process is not None
                node.process.terminate()
        for node in self.nodes:
            if node.process is not None:
                try:
                    node.process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    node.process.kill()
                    node.process.wait()
        self.nodes = []
        if self._own_directory and self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    # -- addresses -------------------------------------------------------------------

    @property
    def scheme(self) -> str:
        return "rediss" if self.tls is not None else "redis"

    def url(self, user: str | None = None, password: str | None = None, nodes: int = 1) -> str:
        """A remote_url naming the first `nodes` nodes, with credentials when given."""
        auth = ""
        if password is not None:
            auth = f"{user or ''}:{password}@"
        return ",".join(f"{self.scheme}://{auth}{n.address}" for n in self.nodes[:nodes])

    # -- faults ----------------------------------------------------------------------

    def kill(self, node: Node) -> None:
        """SIGKILL the node: no goodbye to clients or to the rest of the cluster."""
        assert node.process is not None
        node.process.send_signal(signal.SIGKILL)
        node.process.wait()

    def restart(self, node: Node, timeout: float = 30.0) -> None:
        """Start a killed node again on its port and node file; it rejoins the cluster."""
        if node.alive():
            raise RuntimeError(f"node {node.address} is still running")
        self._launch(node)
        self._wait_ping(node, time.monotonic() + timeout)

    def masters_now(self) -> list[Node]:
        """Nodes that are masters now (after failovers), as the live nodes report it."""
        out = []
        for node in self.nodes:
            if node.alive() and "role:master" in self.cli(node, "INFO", "replication"):
                out.append(node)
        return out

    def wait_replicated(self, timeout: float = 30.0) -> None:
        """Until every live master's replicas are online and have acknowledged its whole stream.

        `WAIT` cannot say this from redis-cli: it counts acknowledgements of the calling
        connection's own writes, and a fresh connection has none. A replica still loading its
        first full copy is listed with an offset too, so `state=online` is required as well.
        """
        deadline = time.monotonic() + timeout
        while True:
            lagging = [lag for node in self.masters_now() if (lag := self._replication_lag(node))]
            if not lagging:
                return
            if time.monotonic() > deadline:
                raise ClusterStartError(f"replicas did not catch up after {timeout:.0f} s: {lagging}")
            time.sleep(0.05)

    def _replication_lag(self, node: Node) -> str:
        """Why `node`'s replicas do not yet hold everything it has ("" when they do)."""
        info = dict(line.split(":", 1) for line in self.cli(node, "INFO", "replication").splitlines() if ":" in line)
        offset = int(info.get("master_repl_offset", "0"))
        replicas = [dict(part.split("=", 1) for part in value.strip().split(","))
                    for key, value in info.items() if key.startswith("slave") and key[5:].isdigit()]
        if len(replicas) < self.replicas:
            return f"{node.address}: {len(replicas)} of {self.replicas} replicas connected"
        behind = [r for r in replicas if r.get("state") != "online" or int(r.get("offset", "0")) < offset]
        return f"{node.address} at offset {offset}, replicas {behind}" if behind else ""

    def owner(self, key: bytes) -> Node:
        """The master serving `key` now (its slot computed here: CRC16 of the key, no hash tags in tierkv keys)."""
        return self.master_of_slot(binascii.crc_hqx(key, 0) % 16384) if self.cluster else self.nodes[0]

    def config_set(self, *pairs: str) -> None:
        """CONFIG SET on every live node (e.g. "maxmemory", "4mb", "maxmemory-policy", "noeviction")."""
        for node in self.nodes:
            if node.alive():
                reply = self.cli(node, "CONFIG", "SET", *pairs)
                if "OK" not in reply:
                    raise RuntimeError(f"CONFIG SET {pairs} on {node.address}: {reply.strip()}")

    def flushall(self) -> None:
        for node in self.masters_now() if self.cluster else self.nodes:
            self.cli(node, "FLUSHALL")

    def master_of(self, key: str) -> Node:
        """The node serving `key`'s slot as master, as a live node's CLUSTER NODES reports it now."""
        return self.master_of_slot(binascii.crc_hqx(key.encode(), 0) % 16384)

    def master_of_slot(self, slot: int) -> Node:
        live = next(n for n in self.nodes if n.alive())
        by_address = {n.address: n for n in self.nodes}
        for line in self.cli(live, "CLUSTER", "NODES").splitlines():
            parts = line.split()
            if len(parts) < 9 or "master" not in parts[2].split(","):
                continue
            for spec in parts[8:]:
                lo, _, hi = spec.partition("-")
                if lo.isdigit() and int(lo) <= slot <= int(hi or lo):
                    return by_address[parts[1].split("@")[0]]
        raise LookupError(f"no master serves slot {slot}")

    def wait_state_ok(self, timeout: float = 30.0, masters: int | None = None) -> None:
        """Until every live node reports cluster_state:ok (and, if given, that many masters serve slots)."""
        deadline = time.monotonic() + timeout
        while True:
            live = [n for n in self.nodes if n.alive()]
            infos = [self.cli(n, "CLUSTER", "INFO") for n in live]
            ok = all("cluster_state:ok" in info for info in infos)
            if ok and masters is not None:
                ok = all(f"cluster_size:{masters}" in info for info in infos)
            if ok:
                return
            if time.monotonic() > deadline:
                raise ClusterStartError(f"cluster not ok after {timeout:.0f} s: {infos[:1]}\n{self._logs()}")
            time.sleep(0.1)

    # -- redis-cli -------------------------------------------------------------------

    def cli_args(self, node: Node) -> list[str]:
        args = ["redis-cli", "-h", "127.0.0.1", "-p", str(node.port), "--no-auth-warning"]
        if self.password is not None:
            args += ["-a", self.password]
        if self.tls is not None:
            args += ["--tls", "--cacert", str(self.tls / "ca.crt"), "--cert", str(self.tls / "server.crt"),
                     "--key", str(self.tls / "server.key")]
        return args

    def cli(self, node: Node, *command: str, stdin: bytes | None = None) -> str:
        """Run one redis-cli command against `node` (with `-x`, `stdin` is the last argument)."""
        extra = ["-x"] if stdin is not None else []
        proc = subprocess.run([*self.cli_args(node), *extra, *command], input=stdin, capture_output=True, timeout=30)
        return proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")

    def cli_cluster(self, *command: str, stdin: bytes | None = None) -> str:
        """A redis-cli command in cluster mode (-c: follows MOVED to the key's master)."""
        node = next(n for n in self.nodes if n.alive())
        extra = ["-x"] if stdin is not None else []
        args = [*self.cli_args(node), *(["-c"] if self.cluster else []), *extra, *command]
        proc = subprocess.run(args, input=stdin, capture_output=True, timeout=30)
        return proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")

    # -- internals -------------------------------------------------------------------

    def _config(self, node: Node) -> list[str]:
        args = ["--bind", "127.0.0.1", "--dir", str(node.directory), "--logfile", str(node.log),
                "--save", "", "--appendonly", "no", "--protected-mode", "no", "--daemonize", "no"]
        if self.tls is None:
            args += ["--port", str(node.port)]
        else:
            args += ["--port", "0", "--tls-port", str(node.port), "--tls-cert-file", str(self.tls / "server.crt"),
                     "--tls-key-file", str(self.tls / "server.key"), "--tls-ca-cert-file", str(self.tls / "ca.crt"),
                     "--tls-auth-clients", "optional", "--tls-replication", "yes"]
            if self.cluster:
                args += ["--tls-cluster", "yes"]
        if self.cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{node.port}.conf",
                     "--cluster-node-timeout", str(self.node_timeout_ms), "--cluster-require-full-coverage", "no",
                     "--cluster-replica-validity-factor", "0"]
        if self.password is not None:
            args += ["--requirepass", self.password, "--masterauth", self.password]
        if self.maxmemory is not None:
            args += ["--maxmemory", self.maxmemory, "--maxmemory-policy", self.maxmemory_policy]
        for name, password, rules in self.acl_users:
            args += ["--user", name, "on", f">{password}", *rules.split()]
        return args

    def _launch(self, node: Node) -> None:
        node.process = subprocess.Popen(["redis-server", *self._config(node)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, start_new_session=True)

    def _wait_ping(self, node: Node, deadline: float) -> None:
        while True:
            if not node.alive():
                raise ClusterStartError(f"redis-server on {node.address} exited\n{self._logs()}")
            if "PONG" in self.cli(node, "PING"):
                return
            if time.monotonic() > deadline:
                raise ClusterStartError(f"redis-server on {node.address} does not answer PING\n{self._logs()}")
            time.sleep(0.05)

    def _create(self, deadline: float) -> None:
        first = self.nodes[0]
        args = [*self.cli_args(first), "--cluster", "create", *(n.address for n in self.nodes),
                "--cluster-replicas", str(self.replicas), "--cluster-yes"]
        proc = subprocess.run(args, capture_output=True, timeout=max(5.0, deadline - time.monotonic()))
        if proc.returncode != 0:
            raise ClusterStartError(f"redis-cli --cluster create failed: {proc.stdout.decode()[-2000:]}"
                                    f"{proc.stderr.decode()[-2000:]}\n{self._logs()}")
        self.wait_state_ok(max(1.0, deadline - time.monotonic()), masters=self.masters)
        if self.replicas:
            self._wait_replicas(deadline)

    def _wait_replicas(self, deadline: float) -> None:
        """Until every master has its replicas online, their first full copy loaded (so a failover has a synced replica)."""
        while True:
            masters = self.masters_now()
            lagging = [lag for node in masters if (lag := self._replication_lag(node))]
            if len(masters) == self.masters and not lagging:
                return
            if time.monotonic() > deadline:
                raise ClusterStartError(f"replicas did not sync: {lagging}\n{self._logs()}")
            time.sleep(0.1)

    def _logs(self, lines: int = 5) -> str:
        out = []
        for node in self.nodes:
            try:
                tail = node.log.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                continue
            out.append(f"--- {node.address}\n" + "\n".join(tail))
        return "\n".join(out)


def make_test_certificates(directory: Path) -> Path:
    """A throwaway CA and a server certificate for 127.0.0.1 (openssl), for TLS tests; returns `directory`."""
    directory.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=tierkv-test-ca",
        "-keyout", "ca.key", "-out", "ca.crt")
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "server.key", "-out", "server.csr")
    (directory / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2",
        "-extfile", "san.cnf", "-out", "server.crt")
    os.chmod(directory / "server.key", 0o600)
    return directory
