"""The subnet lease logic (cluster/leases.py) on a real etcd: racing claims, restarts, release,
and an etcd restart. tests/unit/test_leases.py covers the rest on SQLite."""

from __future__ import annotations

import ipaddress
import uuid

import pytest

from conftest import register_racing
from pycni.cluster.etcd import EtcdKV
from pycni.cluster.kv import KVError
from pycni.cluster.leases import LeaseDatastore
from pycni.cluster.model import ClusterSettings, NodeRecord, SubnetsExhausted


@pytest.fixture
def make_store(etcd_server):
    prefix = f"/test/{uuid.uuid4().hex[:12]}/"
    made: list[LeaseDatastore] = []

    def make(cidr: str = "10.244.0.0/16", ttl: float = 60.0) -> LeaseDatastore:
        store = LeaseDatastore(
            EtcdKV(etcd_server.client_url, ttl), ClusterSettings((cidr,)), "etcd", prefix=prefix
        )
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


def rec(name: str, i: int = 1) -> NodeRecord:
    return NodeRecord(name, (f"192.0.2.{i}",), (), "0a:00:00:00:00:01")


def test_racing_agents_on_etcd_never_share_a_subnet(make_store):
    stores = [make_store() for _ in range(10)]
    got = register_racing(stores, [rec(f"n{i}", i + 1) for i in range(10)])
    assert len({r.subnets for r in got.values()}) == len(stores)
    assert [n.name for n in stores[0].nodes()] == sorted(got)


def test_restart_keeps_subnet_and_release_frees_it(make_store):
    first = make_store()
    mine = first.register(rec("a"))
    first.close()
    again = make_store()
    assert again.register(rec("a")) == mine
    watcher = make_store()
    watcher.nodes()
    again.release()
    assert watcher.wait(5.0)
    assert watcher.nodes() == []


def test_exhaustion_on_etcd(make_store):
    make_store("10.244.0.0/23").register(rec("a"))
    make_store("10.244.0.0/23").register(rec("b", 2))
    with pytest.raises(SubnetsExhausted, match="10.244.0.0/23"):
        make_store("10.244.0.0/23").register(rec("c", 3))


def test_etcd_restart_keeps_leases_and_agents_carry_on(make_store, etcd_server):
    a = make_store()
    mine = a.register(rec("a"))
    etcd_server.kill()
    with pytest.raises(KVError):
        a.nodes()
    etcd_server.restart()
    assert a.keepalive() == mine
    assert [n.subnets[0] for n in a.nodes()] == [ipaddress.ip_network("10.244.0.0/24")]
