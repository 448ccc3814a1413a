"""Subnet leases (cluster/leases.py) on the real SQLite KV, with a controllable clock for expiry.
The same logic runs on etcd; tests/cluster/test_lease_datastore_etcd.py repeats the key cases
there."""

from __future__ import annotations

import ipaddress

import pytest

from conftest import register_racing
from pycni.cluster.leases import LeaseDatastore, free_subnets, key_subnet, subnet_key
from pycni.cluster.model import ClusterSettings, NodeRecord, SubnetsExhausted
from pycni.cluster.sqlite import SqliteKV


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def make_store(tmp_path, clock):
    """make_store(settings=...) -> a datastore client of one shared file (one per "agent")."""
    made = []

    def make(cidrs=("10.244.0.0/16",), sizes=None, ttl=60.0):
        settings = ClusterSettings(tuple(cidrs), sizes or {4: 24, 6: 64})
        store = LeaseDatastore(
            SqliteKV(str(tmp_path / "cluster.db"), ttl, clock=clock), settings, "sqlite"
        )
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


def node(name: str, ip: str = "192.0.2.1", mac: str = "", subnets=()) -> NodeRecord:
    return NodeRecord(name, (ip,), tuple(subnets), mac)


def net(s: str):
    return ipaddress.ip_network(s)


def test_nodes_get_distinct_subnets_in_order(make_store):
    a, b = make_store(), make_store()
    ra = a.register(node("a", "192.0.2.1"))
    rb = b.register(node("b", "192.0.2.2"))
    assert ra.subnets == (net("10.244.0.0/24"),)
    assert rb.subnets == (net("10.244.1.0/24"),)
    assert [n.name for n in a.nodes()] == ["a", "b"]
    assert a.nodes()[1] == rb


def test_restarted_agent_keeps_its_subnet_and_rebinds_the_lease(make_store, clock):
    first = make_store(ttl=60)
    first.register(node("a"))
    make_store().register(node("b"))
    first.close()
    restarted = make_store(ttl=60)
    again = restarted.register(node("a", mac="0a:00:00:00:00:01"))
    assert again.subnets == (net("10.244.0.0/24"),)
    assert restarted.nodes()[0].vtep_mac == "0a:00:00:00:00:01"  # republished
    # The old agent's lease expiring must not take the subnet away from the new one, which
    # renews every quarter of the TTL while b is silent.
    for _ in range(6):
        clock.now += 15
        assert restarted.keepalive() == again
    assert [n.name for n in restarted.nodes()] == ["a"]  # b's lease expired, a's was renewed


def test_a_wish_is_honoured_when_free_and_ignored_when_taken(make_store):
    s = make_store()
    assert s.register(node("a", subnets=["10.244.7.0/24"])).subnets == (net("10.244.7.0/24"),)
    b = make_store().register(node("b", subnets=["10.244.7.0/24"]))
    assert b.subnets == (net("10.244.0.0/24"),)
    # A wish outside the cluster CIDR or of another size is ignored.
    c = make_store().register(node("c", subnets=["10.9.0.0/24"]))
    assert c.subnets == (net("10.244.1.0/24"),)


def test_exhausted_cluster_cidr_is_a_clear_error(make_store):
    for name in "abcd":
        make_store(cidrs=("10.244.0.0/22",)).register(node(name))
    with pytest.raises(SubnetsExhausted) as info:
        make_store(cidrs=("10.244.0.0/22",)).register(node("e"))
    message = str(info.value)
    assert "10.244.0.0/22" in message and "/24" in message and "all 4" in message


def test_released_subnet_is_reused_and_others_see_the_node_leave(make_store):
    a, b = make_store(), make_store()
    a.register(node("a"))
    b.register(node("b"))
    b.nodes()
    assert not b.wait(0.05)  # nothing changed
    a.release()
    assert b.wait(2.0)
    assert [n.name for n in b.nodes()] == ["b"]
    assert make_store().register(node("c")).subnets == (net("10.244.0.0/24"),)


def test_release_by_name_without_register(tmp_path, clock):
    settings = ClusterSettings(("10.244.0.0/16",))
    owner = LeaseDatastore(SqliteKV(str(tmp_path / "c.db"), 60, clock=clock), settings, "sqlite")
    owner.register(node("a"))
    leaver = LeaseDatastore(
        SqliteKV(str(tmp_path / "c.db"), 60, clock=clock), settings, "sqlite", node_name="a"
    )
    leaver.release()
    assert owner.nodes() == []
    owner.close()
    leaver.close()


def test_expired_lease_is_reclaimed_with_the_same_subnet(make_store, clock):
    a = make_store(ttl=10)
    mine = a.register(node("a"))
    b = make_store(ttl=1000)
    b.register(node("b"))
    for _ in range(11):  # a's agent was gone longer than the TTL, while b's went on
        clock.now += 1
        b.keepalive()
    assert [n.name for n in a.nodes()] == ["b"]
    assert a.keepalive().subnets == mine.subnets  # claims again, same subnet (still free)
    assert [n.name for n in a.nodes()] == ["a", "b"]


def test_lease_taken_over_after_expiry_gives_a_new_subnet(make_store, clock):
    a = make_store(ttl=10)
    a.register(node("a"))
    clock.now += 11
    b = make_store(ttl=1000).register(node("b"))  # takes the first free subnet: a's old one
    assert b.subnets == (net("10.244.0.0/24"),)
    assert a.keepalive().subnets == (net("10.244.1.0/24"),)


def test_keepalive_repairs_a_lease_someone_deleted(make_store):
    a = make_store()
    mine = a.register(node("a"))
    a.kv.delete(subnet_key("/pycni/", mine.subnets[0]))
    assert a.keepalive() == mine
    assert [n.name for n in a.nodes()] == ["a"]


def test_dual_stack_node_gets_one_subnet_per_family(make_store):
    cidrs = ("10.244.0.0/16", "fd00:10:244::/56")
    a = make_store(cidrs=cidrs).register(node("a"))
    b = make_store(cidrs=cidrs).register(NodeRecord("b", ("192.0.2.2", "2001:db8::2")))
    assert a.subnets == (net("10.244.0.0/24"), net("fd00:10:244::/64"))
    assert b.subnets == (net("10.244.1.0/24"), net("fd00:10:244:1::/64"))
    seen = make_store(cidrs=cidrs).nodes()
    assert seen[1].node_ips == ("192.0.2.2", "2001:db8::2")
    assert seen[1].subnet(6) == net("fd00:10:244:1::/64")


def test_resized_cluster_moves_the_node_and_frees_the_old_subnet(make_store):
    make_store(sizes={4: 24}).register(node("a"))
    make_store(sizes={4: 24}).register(node("b"))  # 10.244.1.0/24
    moved = make_store(sizes={4: 25}).register(node("a"))
    assert moved.subnets == (net("10.244.0.0/25"),)  # may overlap its own old lease only
    c = make_store(sizes={4: 25}).register(node("c"))
    assert c.subnets == (net("10.244.0.128/25"),)  # never inside b's /24
    keys = make_store().kv.list("/pycni/subnets/")[0]
    assert sorted(str(key_subnet("/pycni/", k)) for k in keys) == [
        "10.244.0.0/25",
        "10.244.0.128/25",
        "10.244.1.0/24",
    ]


def test_racing_agents_never_share_a_subnet(make_store):
    stores = [make_store() for _ in range(12)]
    results = register_racing(stores, [node(f"n{i}", f"192.0.2.{i + 1}") for i in range(12)])
    subnets = [r.subnets[0] for r in results.values()]
    assert len(set(subnets)) == len(stores)
    assert {n.name for n in stores[0].nodes()} == set(results)


def test_unreadable_lease_values_are_skipped(make_store):
    s = make_store()
    s.register(node("a"))
    s.kv.create("/pycni/subnets/v4/10.244.9.0-24", "not json")
    s.kv.create("/pycni/other/key", "{}")
    assert [n.name for n in s.nodes()] == ["a"]


def test_free_subnets_order():
    cidr = net("10.244.0.0/22")
    taken = {net("10.244.0.0/24"), net("10.244.2.0/24")}
    assert list(free_subnets(cidr, 24, taken)) == [net("10.244.1.0/24"), net("10.244.3.0/24")]
    assert list(free_subnets(cidr, 24, taken, net("10.244.3.0/24")))[0] == net("10.244.3.0/24")
    assert key_subnet("/p/", subnet_key("/p/", net("fd00::/64"))) == net("fd00::/64")
    assert key_subnet("/p/", "/p/nodes/x") is None
