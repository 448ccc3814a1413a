"""Fixtures for the KV implementations: one etcd server for the session, and factories that make
clients of one shared store, so that each contract test runs on SQLite and on etcd."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator

import pytest

from pycni.cluster.etcd_server import ETCD, EtcdServer
from pycni.cluster.kv import KV


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory) -> Iterator[EtcdServer]:
    if not os.path.exists(ETCD):
        pytest.skip(f"{ETCD} is not installed (Debian package etcd-server)")
    server = EtcdServer(str(tmp_path_factory.mktemp("etcd") / "data"))
    try:
        server.start()
        yield server
    finally:
        server.remove_data()


class KVFactory:
    """Makes clients of one store; every key a test uses starts with ``prefix``."""

    def __init__(self, kind: str, make: Callable[[float], KV], short_ttl: float) -> None:
        self.kind = kind
        self.prefix = f"/test/{uuid.uuid4().hex[:12]}/"
        self.short_ttl = short_ttl  # the shortest TTL the store honours exactly
        self._make = make
        self.clients: list[KV] = []

    def __call__(self, ttl: float = 60.0) -> KV:
        kv = self._make(ttl)
        self.clients.append(kv)
        return kv

    def close(self) -> None:
        for kv in self.clients:
            kv.close()


@pytest.fixture(params=["sqlite", "etcd"])
def kv_factory(request, tmp_path) -> Iterator[KVFactory]:
    if request.param == "sqlite":
        from pycni.cluster.sqlite import SqliteKV

        path = str(tmp_path / "db" / "cluster.db")
        factory = KVFactory("sqlite", lambda ttl: SqliteKV(path, ttl), short_ttl=1.0)
    else:
        from pycni.cluster.etcd import EtcdKV

        server = request.getfixturevalue("etcd_server")
        # etcd rounds lease TTLs up to whole seconds and to its minimum, 2 s by default.
        factory = KVFactory("etcd", lambda ttl: EtcdKV(server.client_url, ttl), short_ttl=2.0)
    try:
        yield factory
    finally:
        if factory.kind == "etcd":
            from etcd3gw.client import Etcd3Client

            from pycni.cluster.etcd import parse_endpoints

            _, host, port = parse_endpoints(server.client_url)[0]
            client = Etcd3Client(host=host, port=port, api_path="/v3/", timeout=5)
            client.delete_prefix(factory.prefix)
            client.session.close()
        factory.close()
