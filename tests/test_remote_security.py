"""The remote tier on a cluster that speaks only TLS and wants passwords: AUTH, ACL users, TLS, and what
a wrong credential costs (misses, counted; never an exception, never the password in a log line).

One real 3-master cluster for the module: TLS everywhere (clients, replication, the cluster bus),
`requirepass` for the default user, and two ACL users: `writer` (read and write tierkv keys) and
`reader` (read only). The certificates are a throwaway CA made with openssl.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from conftest import kv_for, prompt, same_bits
from remote_fixtures import LAYOUT, published, remote_store, start_cluster, unique_model
from tierkv.tiers.remote.local_cluster import LocalCluster, make_test_certificates

PASSWORD = "default-pw-41"
WRITER = ("writer", "writer-pw-42", "~tierkv:* +@read +@write +@connection +info +cluster +command")
READER = ("reader", "reader-pw-43", "~tierkv:* +get +getrange +strlen +@connection +info +cluster +command")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make test certificates")
    certs = make_test_certificates(tmp_path_factory.mktemp("tls"))
    yield from start_cluster(masters=3, password=PASSWORD, acl_users=(WRITER, READER), tls=certs)


def url(cluster: LocalCluster, user: str | None = None, password: str | None = None, ca: bool = True) -> str:
    base = cluster.url(user=user, password=password, nodes=3)
    assert cluster.tls is not None
    return base.replace(",", f"?ssl_ca_certs={cluster.tls / 'ca.crt'},") + f"?ssl_ca_certs={cluster.tls / 'ca.crt'}" \
        if ca else base


def tokens_and_kv(first: int, blocks: int) -> tuple[list[int], object]:
    tokens = prompt(first, blocks)
    return tokens, kv_for(LAYOUT, tokens)


def test_tls_and_the_default_users_password_from_the_url(cluster: LocalCluster) -> None:
    model = unique_model()
    with remote_store(cluster, model, url=url(cluster, password=PASSWORD)) as a, \
            remote_store(cluster, model, url=url(cluster, password=PASSWORD)) as b:
        tokens, kv = tokens_and_kv(0, 20)
        a.put(tokens, kv)
        published(a)
        assert same_bits(b.get(tokens), kv)
        s = b.stats()["remote"]
        assert s["url"].startswith("rediss://:***@") and PASSWORD not in repr(b.stats())
        assert s["faults_total"] == {}


def test_credentials_from_the_environment(cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIERKV_REMOTE_USERNAME", WRITER[0])
    monkeypatch.setenv("TIERKV_REMOTE_PASSWORD", WRITER[1])
    model = unique_model()
    with remote_store(cluster, model, url=url(cluster)) as a, remote_store(cluster, model, url=url(cluster)) as b:
        tokens, kv = tokens_and_kv(0, 10)
        a.put(tokens, kv)
        published(a)
        assert same_bits(b.get(tokens), kv)


def test_a_read_only_acl_user_consumes_what_the_writer_published(cluster: LocalCluster) -> None:
    model = unique_model()
    with remote_store(cluster, model, url=url(cluster, *WRITER[:2])) as writer, \
            remote_store(cluster, model, url=url(cluster, *READER[:2]), remote_read_only=True) as reader:
        tokens, kv = tokens_and_kv(0, 12)
        writer.put(tokens, kv)
        published(writer)
        assert same_bits(reader.get(tokens), kv)
        assert reader.stats()["remote"]["faults_total"] == {}


def test_writes_the_acl_refuses_are_skipped_and_counted(cluster: LocalCluster) -> None:
    model = unique_model()
    with remote_store(cluster, model, url=url(cluster, *READER[:2])) as reader:  # not marked read-only: it tries
        tokens, kv = tokens_and_kv(0, 6)
        reader.put(tokens, kv)
        published(reader)
        reader.match([])  # an operation: the agent forgets the copies the cluster refused
        s = reader.stats()["remote"]
        assert s["lost_writes_total"] == {"denied": 6} and s["faults_total"]["denied"] == 6
        assert same_bits(reader.get(tokens), kv), "its local copies serve on"
        assert all("remote" not in w for w in reader.locate(reader.keys(tokens)).values())


def test_a_wrong_password_is_misses_and_a_log_line_never_an_exception_or_the_password(
        cluster: LocalCluster, caplog: pytest.LogCaptureFixture) -> None:
    wrong = "not-the-password-99"
    with caplog.at_level(logging.WARNING, logger="tierkv.remote"):
        with remote_store(cluster, unique_model(), url=url(cluster, WRITER[0], wrong)) as store:
            tokens, kv = tokens_and_kv(0, 4)
            store.put(tokens, kv)
            assert same_bits(store.get(tokens), kv)
            assert store.match(prompt(900, 4)) == 0
            stats = store.stats()
    faults = stats["remote"]["faults_total"]
    assert any(kind.endswith("auth") for kind in faults), faults
    assert wrong not in caplog.text + repr(stats), "the password is never logged nor in stats()"
    assert "auth" in caplog.text, "the operator is told, once per interval"


def test_tls_without_the_ca_is_refused_and_served_as_misses(cluster: LocalCluster) -> None:
    with remote_store(cluster, unique_model(), url=url(cluster, password=PASSWORD, ca=False)) as store:
        tokens, kv = tokens_and_kv(0, 4)
        store.put(tokens, kv)
        assert same_bits(store.get(tokens), kv)
        faults = store.stats()["remote"]["faults_total"]
    assert any("tls" in kind or "connection" in kind for kind in faults), faults


def test_certificates_are_real_files(cluster: LocalCluster) -> None:
    assert cluster.tls is not None and all((Path(cluster.tls) / f).is_file() for f in ("ca.crt", "server.crt", "server.key"))
