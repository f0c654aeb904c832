"""`remote_url`, read once: which Redis nodes, which credentials, whether TLS, and never a password in a message.

A remote URL names one node of a Redis Cluster (or a plain Redis server) or several, comma
separated: `redis://[user:password@]host[:port][/db][?option=value...]`, `rediss://` for TLS.
The client discovers the rest of a cluster from any node it reaches, so naming several only
helps while some are down. Credentials may come from the URL or, so that they stay out of
config files and process listings, from `TIERKV_REMOTE_USERNAME` / `TIERKV_REMOTE_PASSWORD`.

This module is a pure value type (StoreConfig validates with it); connecting is the tier's job.
Every error and every `redacted()` form shows `***` where the password was.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote, urlsplit

from .errors import ConfigError

USERNAME_ENV = "TIERKV_REMOTE_USERNAME"
PASSWORD_ENV = "TIERKV_REMOTE_PASSWORD"
SECRET_ENV = frozenset({USERNAME_ENV, PASSWORD_ENV})
DEFAULT_PORT = 6379

# Query options: TLS files and checks (redis-py's names), and whether the server is a cluster.
TLS_OPTIONS = frozenset({"ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname"})
OPTIONS = TLS_OPTIONS | {"cluster"}
_CERT_REQS = ("none", "optional", "required")
_PASSWORD = re.compile(r"(://[^:/@,]*:)[^@,]*@")


def redact(url: str) -> str:
    """`url` with every password replaced by `***` (for messages and logs)."""
    return _PASSWORD.sub(r"\1***@", url)


@dataclass(frozen=True)
class RemoteNode:
    host: str
    port: int

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class RemoteTarget:
    """What a remote URL says: the nodes to start from, TLS, credentials, and the options given."""

    nodes: tuple[RemoteNode, ...]
    tls: bool
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    cluster: bool | None = None  # None: ask the first node that answers
    tls_options: tuple[tuple[str, str], ...] = ()

    def redacted(self) -> str:
        scheme = "rediss" if self.tls else "redis"
        auth = f"{self.username or ''}:***@" if self.password is not None else (f"{self.username}@" if self.username else "")
        return ",".join(f"{scheme}://{auth}{n.address}" for n in self.nodes)

    def with_environment(self, environ: Mapping[str, str] | None = None) -> RemoteTarget:
        """Credentials the URL leaves out, taken from TIERKV_REMOTE_USERNAME / TIERKV_REMOTE_PASSWORD."""
        env = os.environ if environ is None else environ
        username = self.username if self.username is not None else env.get(USERNAME_ENV) or None
        password = self.password if self.password is not None else env.get(PASSWORD_ENV) or None
        return RemoteTarget(self.nodes, self.tls, self.db, username, password, self.cluster, self.tls_options)


def parse_remote_url(value: object, field_name: str = "remote_url") -> RemoteTarget:
    """Parse and check a remote URL (one or comma-separated); raises `ConfigError` naming `field_name`."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{field_name}: expected a redis:// or rediss:// URL (or a comma-separated list), got "
                          f"{redact(value) if isinstance(value, str) else value!r}")
    parts = [p.strip() for p in value.split(",")]
    nodes: list[RemoteNode] = []
    schemes: set[str] = set()
    usernames: set[str] = set()
    passwords: set[str] = set()
    dbs: set[int] = set()
    options: dict[str, str] = {}
    for part in parts:
        shown = redact(part)
        if not part:
            raise ConfigError(f"{field_name}: empty entry in the list {redact(value)!r}")
        try:
            url = urlsplit(part)
            port = url.port
        except ValueError as e:
            raise ConfigError(f"{field_name}: {shown!r} is not a valid URL ({e})") from None
        if url.scheme not in ("redis", "rediss"):
            raise ConfigError(f"{field_name}: {shown!r} must start with redis:// or rediss:// (TLS)")
        if not url.hostname:
            raise ConfigError(f"{field_name}: {shown!r} names no host")
        schemes.add(url.scheme)
        nodes.append(RemoteNode(url.hostname, port or DEFAULT_PORT))
        if url.username:
            usernames.add(unquote(url.username))
        if url.password is not None:
            passwords.add(unquote(url.password))
        path = url.path.strip("/")
        if path:
            if not path.isdigit():
                raise ConfigError(f"{field_name}: {shown!r}: the path may only be a database number, got /{path}")
            dbs.add(int(path))
        for key, val in parse_qsl(url.query, keep_blank_values=True):
            if key not in OPTIONS:
                raise ConfigError(f"{field_name}: {shown!r}: unknown option {key!r}; known: {sorted(OPTIONS)}")
            if options.get(key, val) != val:
                raise ConfigError(f"{field_name}: option {key!r} differs between the URLs of the list")
            options[key] = val
    if len(schemes) > 1:
        raise ConfigError(f"{field_name}: mixes redis:// and rediss://; every node of one cluster speaks the same")
    if len(usernames) > 1 or len(passwords) > 1:
        raise ConfigError(f"{field_name}: the URLs of the list carry different credentials; give them once")
    if len(dbs) > 1:
        raise ConfigError(f"{field_name}: the URLs of the list name different databases")
    tls = schemes == {"rediss"}
    cluster = _cluster_option(options.pop("cluster", None), field_name)
    db = dbs.pop() if dbs else 0
    if db and cluster:
        raise ConfigError(f"{field_name}: a Redis Cluster has only database 0, got /{db}")
    if len(nodes) > 1 and cluster is False:
        raise ConfigError(f"{field_name}: cluster=no takes one node, the list names {len(nodes)}")
    tls_options = _tls_options(options, tls, field_name)
    return RemoteTarget(tuple(dict.fromkeys(nodes)), tls, db, usernames.pop() if usernames else None,
                        passwords.pop() if passwords else None, cluster, tls_options)


def _cluster_option(word: str | None, field_name: str) -> bool | None:
    if word is None or word.lower() == "auto":
        return None
    if word.lower() in ("1", "yes", "true", "on"):
        return True
    if word.lower() in ("0", "no", "false", "off"):
        return False
    raise ConfigError(f"{field_name}: option cluster must be yes, no or auto, got {word!r}")


def _tls_options(options: dict[str, str], tls: bool, field_name: str) -> tuple[tuple[str, str], ...]:
    if options and not tls:
        raise ConfigError(f"{field_name}: options {sorted(options)} need TLS: use rediss://")
    reqs = options.get("ssl_cert_reqs")
    if reqs is not None and reqs not in _CERT_REQS:
        raise ConfigError(f"{field_name}: ssl_cert_reqs must be one of {list(_CERT_REQS)}, got {reqs!r}")
    check = options.get("ssl_check_hostname")
    if check is not None and check.lower() not in ("true", "false", "yes", "no", "1", "0"):
        raise ConfigError(f"{field_name}: ssl_check_hostname must be true or false, got {check!r}")
    for key in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
        path = options.get(key)
        if path is not None and not os.path.isfile(path):
            raise ConfigError(f"{field_name}: {key}={path!r} is not a readable file")
    return tuple(sorted(options.items()))
