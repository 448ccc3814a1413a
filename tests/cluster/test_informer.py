"""The informer (pycni/cluster/informer.py) against the fake API server, through the official
client: one list, one long-lived watch resumed from the last resourceVersion, a relist only
after 410 or an API error, backoff that does not spin, and a stop() that does not wait for the
watch to end. The server's request counters are the evidence."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from kubernetes import client

from pycni.cluster.informer import Informer
from pycni.cluster.kubernetes import node_record
from pycni.harness.k8s_fake_api import (
    FakeAPIServer,
    make_namespace,
    make_network_policy,
    make_node,
    make_pod,
)

FAST_BACKOFF = (0.2, 1.0)


def node(i: int, **kw) -> dict:
    return make_node(f"node-{i}", [f"10.244.{i}.0/24"], [f"192.168.56.{10 + i}"], **kw)


@pytest.fixture
def server():
    before = set(threading.enumerate())
    srv = FakeAPIServer()
    srv.load("nodes", [node(0), node(1)])
    srv.start()
    yield srv
    srv.stop()
    assert set(threading.enumerate()) <= before, "a thread outlived the test"


@pytest.fixture
def api(server):
    with client.ApiClient(client.Configuration(host=server.url)) as api_client:
        yield api_client


@pytest.fixture
def informers():
    """Makes informers and stops them after the test, before the server stops."""
    made: list[Informer] = []

    def make(list_fn, derive=node_record, **kw) -> Informer:
        kw.setdefault("request_timeout", (2.0, 5.0))
        informer = Informer(kw.pop("kind", "nodes"), list_fn, derive, **kw)
        made.append(informer)
        return informer.start()

    yield make
    for informer in made:
        assert informer.stop(), "the informer did not stop"


@pytest.fixture
def nodes(api, informers, server):
    """A synced node informer whose watch is open."""
    informer = informers(client.CoreV1Api(api).list_node, backoff=FAST_BACKOFF)
    assert informer.wait_synced(5)
    assert server.wait_watching()
    return informer


def expected_nodes(server: FakeAPIServer) -> dict:
    with server.cond:
        records = {name: node_record(_as_v1node(obj)) for name, obj in server.nodes.items()}
    return {name: r for name, r in records.items() if r is not None}


def _as_v1node(obj: dict):
    import json

    return client.ApiClient().deserialize(json.dumps(obj), "V1Node", "application/json")


def converges(informer: Informer, server: FakeAPIServer, timeout: float = 5.0) -> bool:
    want = expected_nodes(server)
    return informer.wait_until(lambda cache: dict(cache) == want, timeout)


def settle(seconds: float) -> None:
    time.sleep(seconds)


# -- listing and watching ---------------------------------------------------------------------


def test_lists_once_then_keeps_one_watch(nodes, server):
    version, records = nodes.snapshot()
    assert sorted(records) == ["node-0", "node-1"] and version == 1
    assert records["node-1"].subnets[0].compressed == "10.244.1.0/24"
    assert nodes.healthy and nodes.resource_version == str(server.rv)
    settle(0.5)
    assert (server.count("GET"), server.count("GET", watch=True)) == (1, 1)
    watch = next(p for m, p, _, _ in server.requests if "watch=true" in p)
    assert "allowWatchBookmarks=true" in watch and f"resourceVersion={server.rv}" in watch
    assert 300 <= int(watch.split("timeoutSeconds=")[1].split("&")[0]) <= 600


def test_events_change_the_cache_and_wake_waiters(nodes, server):
    version = nodes.version
    server.put(node(2))
    version = nodes.wait_changed(version, 5)
    assert nodes.get("node-2") == node_record(_as_v1node(server.nodes["node-2"]))
    # A kubelet's status update changes nothing the record keeps: nobody wakes.
    server.modify("node-2", {"status": {"conditions": []}})
    t0 = time.monotonic()
    assert nodes.wait_changed(version, 0.3) == version
    assert time.monotonic() - t0 >= 0.25
    # A node without a podCIDR is not kept, as if absent.
    server.put(make_node("node-3", None, ["192.168.56.13"]))
    server.delete("node-0")
    version = nodes.wait_changed(version, 5)
    assert converges(nodes, server)
    assert sorted(nodes.snapshot()[1]) == ["node-1", "node-2"]
    assert nodes.stats["events"] == 4 and server.count("GET") == 1


def test_a_watch_the_server_ends_is_resumed_without_a_list(api, informers, server):
    informer = informers(client.CoreV1Api(api).list_node, watch_timeout=(1, 1))
    assert informer.wait_synced(5)
    for i in range(2, 6):  # changes across several renewals
        server.put(node(i))
        settle(0.7)
    assert converges(informer, server)
    assert server.count("GET", watch=True) >= 3
    assert server.count("GET") == 1 and informer.stats["relists"] == 0
    for _, path, _, _ in server.requests:
        if "watch=true" in path:  # every watch resumes from a version, none from scratch
            assert "resourceVersion=" in path and "resourceVersion=0" not in path


@pytest.mark.parametrize("bookmarks", [True, False], ids=["bookmarks", "no-bookmarks"])
def test_bookmarks_keep_the_resume_point_fresh(nodes, server, bookmarks):
    """Other kinds' changes move the server's resourceVersion; only bookmarks tell a node watch
    about it. After a compaction, a resume from an old version gets 410 and relists; from a
    bookmark's it just goes on."""
    listed = nodes.resource_version
    server.bookmark_every = 0.2 if bookmarks else 3600
    server.restart()  # the next watch reads the new bookmark_every
    assert server.wait_watching()
    for i in range(3):
        server.put_object("namespaces", make_namespace(f"ns-{i}"))
    newest = str(server.rv)
    if bookmarks:
        deadline = time.monotonic() + 5
        while nodes.resource_version != newest and time.monotonic() < deadline:
            time.sleep(0.05)
        assert nodes.resource_version == newest and nodes.stats["bookmarks"] >= 1
    else:
        settle(0.5)
        assert nodes.resource_version == listed
    with server.cond:  # history before `newest` is forgotten; one node event after it
        server.compact()
        server.put(node(5))
        server.restart()
    assert converges(nodes, server)
    assert nodes.stats["relists"] == (0 if bookmarks else 1)
    assert server.count("GET") == (1 if bookmarks else 2)


# -- what a long-lived watch must survive -----------------------------------------------------


@pytest.mark.parametrize("as_status", [False, True], ids=["error-event", "http-410"])
def test_410_relists_and_loses_nothing(nodes, server, as_status):
    server.gone_as_status = as_status
    with server.cond:  # while nothing is served: changes, compaction, connections dropped
        server.put(node(2))
        server.modify("node-1", {"spec": {"podCIDRs": ["10.244.9.0/24"]}})
        server.delete("node-0")
        server.compact()
        server.restart()
    assert converges(nodes, server)
    assert sorted(nodes.snapshot()[1]) == ["node-1", "node-2"]
    assert nodes.get("node-1").subnets[0].compressed == "10.244.9.0/24"
    assert nodes.stats["relists"] == 1 and server.count("GET") == 2
    # Watching goes on from the new list.
    server.delete("node-2")
    assert converges(nodes, server)


def test_a_restart_resumes_from_the_last_version(nodes, server):
    with server.cond:
        server.put(node(2))
        server.delete("node-1")
        server.restart()
    assert converges(nodes, server)
    assert server.count("GET") == 1 and nodes.stats["relists"] == 0
    assert server.wait_watching()
    server.put(node(3))
    assert converges(nodes, server)
    assert nodes.healthy


def test_stop_is_prompt_mid_watch(nodes, server):
    t0 = time.monotonic()
    assert nodes.stop(timeout=5)
    assert time.monotonic() - t0 < 1.0
    assert nodes.wait_changed(nodes.version, 5) == nodes.version  # returns at once, stopped


def test_stop_is_prompt_during_a_backoff(api, informers, server):
    server.unavailable = True
    informer = informers(client.CoreV1Api(api).list_node, backoff=(30.0, 30.0))
    assert not informer.wait_synced(5)
    t0 = time.monotonic()
    assert informer.stop(timeout=5)
    assert time.monotonic() - t0 < 1.0


# -- failures ---------------------------------------------------------------------------------


def test_an_outage_backs_off_and_recovers(api, informers, server):
    informer = informers(client.CoreV1Api(api).list_node, backoff=FAST_BACKOFF)
    assert informer.wait_synced(5) and server.wait_watching()
    before = sum(server.counts.values())
    server.unavailable = True  # 503 to everything
    server.restart()
    settle(3.0)
    during = sum(server.counts.values()) - before
    # 0.2 s doubling to 1 s, jittered: at most 8 attempts in 3 s; a spinning loop makes
    # hundreds.
    assert 2 <= during <= 8, during
    assert not informer.healthy
    assert informer.failure is not None and "nodes" in informer.failure.what
    assert informer.synced  # the cache is kept meanwhile
    server.put(node(2))  # while the informer cannot see it
    server.unavailable = False
    assert converges(informer, server, timeout=5)
    assert informer.healthy


def test_an_unreachable_server_backs_off():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    before = set(threading.enumerate())
    with client.ApiClient(client.Configuration(host=f"http://127.0.0.1:{port}")) as api:
        informer = Informer("nodes", client.CoreV1Api(api).list_node, node_record)
        informer.backoff = FAST_BACKOFF
        informer.start()
        try:
            assert not informer.wait_synced(5)
            assert informer.failure is not None and informer.failure.what == "list nodes"
            settle(2.0)
            assert 2 <= informer.stats["failures"] <= 6, informer.stats
        finally:
            assert informer.stop()
    assert set(threading.enumerate()) <= before


def test_watches_that_end_at_once_do_not_spin(api, informers, server):
    server.max_watch = 0  # every watch ends as soon as it began, with nothing
    informer = informers(client.CoreV1Api(api).list_node, backoff=FAST_BACKOFF)
    assert informer.wait_synced(5)
    settle(2.0)
    assert 2 <= server.count("GET", watch=True) <= 7, server.counts
    assert server.count("GET") == 1  # nothing was wrong with what we hold


def test_a_server_that_answers_410_to_every_watch_is_not_hammered(api, informers, server):
    server.compacted = 10**9  # whatever version a watch starts from is "too old"
    informer = informers(client.CoreV1Api(api).list_node, backoff=FAST_BACKOFF)
    assert informer.wait_synced(5)
    settle(2.0)
    assert 2 <= server.count("GET") <= 7, server.counts
    assert informer.stats["relists"] == server.count("GET", watch=True)


# -- one mechanism for every kind -------------------------------------------------------------


def test_the_networkpolicy_kinds(api, informers, server):
    """Namespaces, Pods and NetworkPolicies: the same informer, keyed namespace/name."""
    core, networking = client.CoreV1Api(api), client.NetworkingV1Api(api)
    server.load("namespaces", [make_namespace("default"), make_namespace("web")])
    server.load("pods", [make_pod("web", "front", "node-0", "10.244.0.5", {"app": "front"})])
    server.load("networkpolicies", [make_network_policy("web", "deny", {"app": "front"})])
    labels = informers(
        core.list_namespace, lambda ns: dict(ns.metadata.labels or {}), kind="namespaces"
    )
    pods = informers(
        core.list_pod_for_all_namespaces, lambda p: (p.status.pod_ip, p.spec.node_name), kind="pods"
    )
    policies = informers(
        networking.list_network_policy_for_all_namespaces,
        lambda np: np.spec.pod_selector.match_labels,
        kind="networkpolicies",
    )
    for informer in (labels, pods, policies):
        assert informer.wait_synced(5)
    assert labels.snapshot()[1]["web"]["kubernetes.io/metadata.name"] == "web"
    assert pods.snapshot()[1] == {"web/front": ("10.244.0.5", "node-0")}
    assert policies.snapshot()[1] == {"web/deny": {"app": "front"}}
    for resource in ("namespaces", "pods", "networkpolicies"):
        assert server.wait_watching(resource)
    version = pods.version
    server.put_object("pods", make_pod("web", "back", "node-1", "10.244.1.7"))
    pods.wait_changed(version, 5)
    assert pods.get("web/back") == ("10.244.1.7", "node-1")
    server.delete_object("networkpolicies", "web/deny")
    assert policies.wait_until(lambda cache: not cache, 5)
    for resource in ("namespaces", "pods", "networkpolicies"):
        assert server.count("GET", resource=resource) == 1
        assert server.count("GET", watch=True, resource=resource) == 1
