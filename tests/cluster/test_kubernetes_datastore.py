"""The kubernetes datastore against a small fake API server (pycni/harness/k8s_fake_api.py).

The real client (``kubernetes.client.ApiClient``) talks HTTP to the server running in a thread:
it serves the Node objects recorded in tests/data/k8s, applies merge patches, and streams watch
events the way kube-apiserver does (chunked, one JSON object per line, ``ERROR`` with a 410
Status for an expired resourceVersion). So the client's own request building, content types,
deserialization and watch machinery are exercised, not mocks of them.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from kubernetes import client

from pycni.cluster.kubernetes import ANN_NODE_IPS, ANN_VTEP_MAC, KubernetesDatastore
from pycni.cluster.kv import KVError
from pycni.cluster.model import ClusterError, NodeRecord
from pycni.harness.k8s_fake_api import FakeAPIServer

# Recorded from a kubeadm cluster: two nodes, and node-c's life (ADDED without a podCIDR,
# MODIFIED with one, MODIFIED Ready, DELETED) as a watch streamed it.
DATA = Path(__file__).resolve().parent.parent / "data" / "k8s"


def load(name: str) -> dict:
    return json.loads((DATA / name).read_text())


def recorded_events() -> list[dict]:
    return [json.loads(line) for line in (DATA / "watch-node-c.json").read_text().splitlines()]


# -- fixtures ---------------------------------------------------------------------------------


OPEN: list[KubernetesDatastore] = []  # every store a test made, closed before the server stops


@pytest.fixture
def server():
    before = set(threading.enumerate())
    srv = FakeAPIServer()
    srv.load_list(load("nodelist.json"))
    srv.start()
    yield srv
    while OPEN:
        OPEN.pop().close()
    srv.stop()
    assert set(threading.enumerate()) <= before, "a thread outlived the test"


@pytest.fixture
def api(server):
    with client.ApiClient(client.Configuration(host=server.url)) as api_client:
        yield api_client


def store_for(api, name: str = "node-a") -> KubernetesDatastore:
    store = KubernetesDatastore(name, api_client=api)
    store.request_timeout = (2.0, 5.0)
    OPEN.append(store)
    return store


@pytest.fixture
def store(api):
    return store_for(api)


def local(name: str = "node-a", ips: tuple[str, ...] = (), mac: str = "") -> NodeRecord:
    return NodeRecord(name=name, node_ips=ips, vtep_mac=mac)


def names(store: KubernetesDatastore) -> list[str]:
    return [n.name for n in store.nodes()]


def net(text: str):
    return ipaddress.ip_network(text)


def watching(store: KubernetesDatastore, server: FakeAPIServer) -> None:
    """As the agent's loop: it has listed and waits, so the informer's watch is open."""
    store.nodes()
    store.wait(0.01)
    assert server.wait_watching()


def timed_wait(store: KubernetesDatastore, timeout: float) -> tuple[bool, float]:
    t0 = time.monotonic()
    return store.wait(timeout), time.monotonic() - t0


# -- register ---------------------------------------------------------------------------------


def test_register_returns_podcidr_and_publishes_annotations(store, server):
    me = store.register(local(mac="0a:58:0a:f4:00:01"))
    assert me == NodeRecord(
        "node-a", ("192.168.56.10",), (net("10.244.0.0/24"),), "0a:58:0a:f4:00:01"
    )
    ann = server.annotations("node-a")
    assert ann[ANN_NODE_IPS] == "192.168.56.10"
    assert ann[ANN_VTEP_MAC] == "0a:58:0a:f4:00:01"
    assert ann["node.alpha.kubernetes.io/ttl"] == "0"  # a merge patch keeps the others
    assert [r[2] for r in server.requests if r[0] == "PATCH"] == ["application/merge-patch+json"]
    # Published already: registering again (agent restart) writes nothing.
    assert store.register(local(mac="0a:58:0a:f4:00:01")) == me
    assert server.count("PATCH") == 1


def test_register_without_vtep_publishes_no_mac(store, server):
    store.register(local())
    assert ANN_VTEP_MAC not in server.annotations("node-a")


def test_register_without_podcidr_says_what_to_fix(api, server):
    server.put(load("node-c-no-podcidr.json"))
    with pytest.raises(ClusterError, match="node node-c has no podCIDR") as err:
        store_for(api, "node-c").register(local("node-c"))
    assert "--allocate-node-cidrs" in str(err.value) and "--cluster-cidr" in str(err.value)
    assert "--pod-network-cidr" in str(err.value)
    assert server.count("PATCH") == 0


def test_register_unknown_node(api):
    with pytest.raises(ClusterError, match="node node-x is not registered in the API server"):
        store_for(api, "node-x").register(local("node-x"))


def test_dual_stack_podcidrs(api, server):
    store = store_for(api, "node-b")
    me = store.register(local("node-b", mac="8e:3a:0c:51:7f:02"))
    assert me.subnets == (net("10.244.1.0/24"), net("fd00:10:244:1::/64"))
    assert me.node_ips == ("192.168.56.11", "fd00:56::11")
    assert me.subnet(6) == net("fd00:10:244:1::/64") and me.node_ip(6) == "fd00:56::11"
    assert server.count("PATCH") == 0  # node-b's annotations were published before
    assert [n for n in store.nodes() if n.name == "node-b"] == [me]


def test_podcidr_alone_on_old_objects(api, server):
    server.modify("node-a", {"spec": {"podCIDRs": None}})
    assert store_for(api).register(local()).subnets == (net("10.244.0.0/24"),)


def test_node_ip_override(store, server):
    me = store.register(local(ips=("10.0.0.5",)))
    assert me.node_ips == ("10.0.0.5",)
    assert server.annotations("node-a")[ANN_NODE_IPS] == "10.0.0.5"
    assert store.nodes()[0].node_ips == ("10.0.0.5",)


# -- nodes ------------------------------------------------------------------------------------


def test_nodes_from_annotations_or_internal_ips(store, server):
    server.put(load("node-c-no-podcidr.json"))  # no podCIDR yet: not a node of the network
    assert store.nodes() == [
        NodeRecord("node-a", ("192.168.56.10",), (net("10.244.0.0/24"),), ""),
        NodeRecord(
            "node-b",
            ("192.168.56.11", "fd00:56::11"),
            (net("10.244.1.0/24"), net("fd00:10:244:1::/64")),
            "8e:3a:0c:51:7f:02",
        ),
    ]


def test_garbled_node_ips_annotation_falls_back(store, server):
    server.modify("node-b", {"metadata": {"annotations": {ANN_NODE_IPS: "not-an-ip"}}})
    assert store.nodes()[1].node_ips == ("192.168.56.11", "fd00:56::11")


# -- wait -------------------------------------------------------------------------------------


def test_wait_follows_recorded_node_join(store, server):
    """node-c registers, gets its podCIDR, turns Ready, is deleted: only the podCIDR and the
    deletion concern the pod network."""
    assert names(store) == ["node-a", "node-b"]
    expected = {"ADDED": False, "MODIFIED": None, "DELETED": True}
    for i, event in enumerate(recorded_events()):
        server.replay(event)
        woke, took = timed_wait(store, 0.3)
        want = expected[event["type"]]
        if want is None:  # first MODIFIED assigns the podCIDR, the second is a status update
            want = i == 1
        assert woke is want, (i, event["type"])
        assert took < 2
        if i == 1:
            assert store.nodes()[2] == NodeRecord(
                "node-c", ("192.168.56.12",), (net("10.244.2.0/24"),)
            )
    assert names(store) == ["node-a", "node-b"]


def test_wait_times_out_when_only_status_changes(store, server):
    store.nodes()
    server.modify("node-a", {"status": {"conditions": []}})  # a kubelet heartbeat, say
    woke, took = timed_wait(store, 0.5)
    assert woke is False and 0.4 <= took < 2


def test_wait_wakes_on_live_event(store, server):
    store.nodes()
    change = threading.Timer(
        0.2,
        server.modify,
        ("node-b", {"metadata": {"annotations": {ANN_VTEP_MAC: "8e:3a:0c:51:7f:99"}}}),
    )
    change.start()
    try:
        woke, took = timed_wait(store, 5)
    finally:
        change.join()
    assert woke is True and took < 2
    assert store.nodes()[1].vtep_mac == "8e:3a:0c:51:7f:99"


def test_another_node_added(store, server):
    store.nodes()
    node = load("node-c-no-podcidr.json")
    node["spec"] = {"podCIDR": "10.244.2.0/24", "podCIDRs": ["10.244.2.0/24"]}
    server.put(node)
    assert store.wait(5) is True
    assert names(store) == ["node-a", "node-b", "node-c"]


def test_node_deleted(store, server):
    store.nodes()
    server.delete("node-b")
    assert store.wait(5) is True
    assert names(store) == ["node-a"]


def test_wait_resumes_where_it_stopped(store, server):
    store.nodes()
    server.delete("node-b")
    assert store.wait(5) is True
    # No nodes() in between: the next watch starts after the deletion, not before it.
    woke, _ = timed_wait(store, 0.3)
    assert woke is False


@pytest.mark.parametrize("as_status", [False, True], ids=["error-event", "http-410"])
def test_expired_resource_version_relists(store, server, as_status):
    server.gone_as_status = as_status
    watching(store, server)
    # While nothing is served: a change, compaction, and the watch's connection dropped. The
    # watch resumes from a version that is gone.
    with server.cond:
        server.modify("node-b", {"metadata": {"annotations": {ANN_VTEP_MAC: "8e:3a:0c:51:7f:42"}}})
        server.compact()
        server.restart()
    woke, took = timed_wait(store, 5)
    assert woke is True and took < 2
    assert server.count("GET", watch=True) >= 2  # the first watch, the one that got 410
    assert server.count("GET") == 2  # the first list, and the relist after 410
    assert store.nodes()[1].vtep_mac == "8e:3a:0c:51:7f:42"
    # The relist gave a fresh resourceVersion: watching works again.
    server.delete("node-b")
    assert store.wait(5) is True


def test_nodes_alone_lists_and_never_watches(store, server):
    """A one-shot caller (uninstall): no informer, no watch."""
    assert names(store) == names(store) == ["node-a", "node-b"]
    assert (server.count("GET"), server.count("GET", watch=True)) == (2, 0)


def test_the_first_wait_goes_on_from_the_last_list(store, server):
    assert names(store) == ["node-a", "node-b"]
    server.delete("node-b")  # after the list, before anybody watched
    assert store.wait(5) is True
    assert names(store) == ["node-a"]
    assert server.count("GET") == 1  # the informer watched from that list, listing nothing


def test_a_steady_cluster_costs_no_requests(store, server):
    """After the start (read our Node, publish, list, watch), the loop's calls are answered
    from the informer: nodes(), wait() and keepalive() make no request at all."""
    me = store.register(local(ips=("192.168.56.10",), mac="0a:58:0a:f4:00:01"))
    watching(store, server)
    start = sum(server.counts.values())
    for _ in range(5):
        assert store.nodes()[0] == me
        assert store.wait(0.05) is False
        assert store.keepalive() == me
    server.modify("node-b", {"status": {"conditions": []}})  # a kubelet heartbeat
    assert store.wait(0.3) is False
    assert sum(server.counts.values()) == start, server.counts


def test_close_ends_the_watch_at_once(store, server):
    watching(store, server)
    t0 = time.monotonic()
    store.close()
    assert time.monotonic() - t0 < 1.0


# -- keepalive, release -----------------------------------------------------------------------


def test_podcidr_changed_when_node_recreated(store, server):
    store.register(local(mac="0a:58:0a:f4:00:01"))
    store.nodes()
    # The node object is deleted and the kubelet registers it again: a new podCIDR, and
    # none of our annotations.
    old = server.nodes["node-a"]
    server.delete("node-a")
    reborn = copy.deepcopy(old)
    reborn["metadata"]["annotations"] = {"node.alpha.kubernetes.io/ttl": "0"}
    reborn["spec"].update(podCIDR="10.244.7.0/24", podCIDRs=["10.244.7.0/24"])
    server.put(reborn)
    assert store.wait(5) is True
    me = store.keepalive()
    assert me.subnets == (
        net(
            "10.244.7.0/24",
        ),
    )
    assert server.annotations("node-a")[ANN_VTEP_MAC] == "0a:58:0a:f4:00:01"
    assert store.nodes()[0] == me


def test_keepalive_republishes_removed_annotations(store, server):
    me = store.register(local(mac="0a:58:0a:f4:00:01"))
    assert store.keepalive() == me
    assert server.count("PATCH") == 1
    server.modify("node-a", {"metadata": {"annotations": {ANN_NODE_IPS: None, ANN_VTEP_MAC: None}}})
    assert store.keepalive() == me
    assert server.annotations("node-a")[ANN_NODE_IPS] == "192.168.56.10"
    assert server.count("PATCH") == 2


def test_keepalive_of_deleted_node(store, server):
    store.register(local())
    server.delete("node-a")
    with pytest.raises(ClusterError, match="node node-a is not registered in the API server"):
        store.keepalive()


def test_release_removes_annotations_only(store, server):
    store.register(local(mac="0a:58:0a:f4:00:01"))
    store.release()
    ann = server.annotations("node-a")
    assert ANN_NODE_IPS not in ann and ANN_VTEP_MAC not in ann
    assert ann["node.alpha.kubernetes.io/ttl"] == "0"
    assert server.nodes["node-a"]["spec"]["podCIDRs"] == ["10.244.0.0/24"]
    server.delete("node-a")
    store.release()  # nothing left to remove: not an error


def test_keepalive_from_the_cache_republishes_removed_annotations(store, server):
    me = store.register(local(ips=("192.168.56.10",), mac="0a:58:0a:f4:00:01"))
    store.nodes()
    server.modify("node-a", {"metadata": {"annotations": {ANN_NODE_IPS: None, ANN_VTEP_MAC: None}}})
    assert store.wait(5) is True  # our own Node changed: the loop reconciles, then keepalive
    assert store.keepalive() == me
    assert server.annotations("node-a")[ANN_VTEP_MAC] == "0a:58:0a:f4:00:01"
    assert server.count("PATCH") == 2
    assert store.nodes()[0] == me  # what was just written, read back through the watch


def test_keepalive_from_the_cache_notices_a_deleted_node(store, server):
    store.register(local(ips=("192.168.56.10",)))
    store.nodes()
    server.delete("node-a")
    assert store.wait(5) is True
    with pytest.raises(ClusterError, match="node node-a is not registered in the API server"):
        store.keepalive()


def test_an_outage_after_the_first_list(store, server):
    """The node list is served from the cache meanwhile; keepalive, which cannot vouch for the
    cache, asks the server and reports the outage."""
    store.register(local(ips=("192.168.56.10",)))
    watching(store, server)
    before = store.nodes()
    server.unavailable = True
    server.restart()
    assert store.wait(1) is False
    assert store.nodes() == before
    with pytest.raises(KVError, match="kubernetes API server: read node: 503"):
        store.keepalive()


# -- errors -----------------------------------------------------------------------------------


def test_unreachable_api_server_is_kverror():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with client.ApiClient(client.Configuration(host=f"http://127.0.0.1:{port}")) as api:
        store = store_for(api)
        t0 = time.monotonic()
        for call in (lambda: store.register(local()), store.nodes, lambda: store.wait(1)):
            with pytest.raises(
                KVError, match=f"cannot reach the kubernetes API server at http://127.0.0.1:{port}"
            ):
                call()
        assert time.monotonic() - t0 < 5


def test_api_error_is_kverror_with_the_servers_message(store, server):
    server.forbid_patch = True
    with pytest.raises(KVError, match='403 Forbidden: nodes "node-a" is forbidden'):
        store.register(local())


# -- configuration ----------------------------------------------------------------------------


def test_from_kubeconfig(server, tmp_path):
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(f"""\
apiVersion: v1
kind: Config
clusters:
- name: test
  cluster:
    server: {server.url}
users:
- name: pycni
  user:
    token: s3cr3t-token
contexts:
- name: pycni@test
  context:
    cluster: test
    user: pycni
current-context: pycni@test
""")
    store = KubernetesDatastore("node-a", kubeconfig=str(kubeconfig))
    try:
        assert store.register(local()).subnets == (net("10.244.0.0/24"),)
        assert names(store) == ["node-a", "node-b"]
    finally:
        store.close()
    assert {r[3] for r in server.requests} == {"Bearer s3cr3t-token"}


def test_bad_kubeconfig(tmp_path):
    with pytest.raises(ClusterError, match="cannot load kubeconfig"):
        KubernetesDatastore("node-a", kubeconfig=str(tmp_path / "missing"))


def test_no_incluster_config(monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_PORT", raising=False)
    with pytest.raises(ClusterError, match="cannot load in-cluster config"):
        KubernetesDatastore("node-a")


def test_import_does_not_load_the_client():
    code = "import sys, pycni.cluster.kubernetes; print('kubernetes' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- a node that vanished without `pycnictl leave` ------------------------------------------

T0 = "2024-05-14T07:00:00Z"
T0_EPOCH = 1715670000.0


def ready(status: str, since: str = T0) -> dict:
    condition = {
        "type": "Ready",
        "status": status,
        "lastHeartbeatTime": since,
        "lastTransitionTime": since,
        "reason": "NodeStatusUnknown" if status == "Unknown" else "KubeletReady",
        "message": "Kubelet stopped posting node status." if status == "Unknown" else "ok",
    }
    return {"status": {"conditions": [condition]}}


def eventually(check, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not within the time"
        time.sleep(0.02)


def clocked_store(api, now: list[float]) -> KubernetesDatastore:
    store = KubernetesDatastore("node-a", api_client=api, node_timeout=60, clock=lambda: now[0])
    store.request_timeout = (2.0, 5.0)
    store.backoff = (0.05, 0.1)
    OPEN.append(store)
    return store


def test_a_node_unknown_for_the_timeout_leaves_the_routes_and_comes_back(api, server):
    now = [T0_EPOCH + 10]
    store = clocked_store(api, now)
    store.register(local(ips=("192.168.56.10",)))
    watching(store, server)
    assert names(store) == ["node-a", "node-b"]
    server.modify("node-b", ready("Unknown"))  # the node lifecycle controller's doing
    eventually(lambda: "node-b" in store._unknown_since)
    assert names(store) == ["node-a", "node-b"]  # 10 s of the 60
    now[0] += 51
    assert names(store) == ["node-a"]
    server.modify("node-a", ready("Unknown"))  # its own node: the agent asking is alive
    eventually(lambda: "node-a" in store._unknown_since)
    assert names(store) == ["node-a"]
    server.modify("node-b", ready("True", "2024-05-14T08:00:00Z"))  # it reports again
    eventually(lambda: names(store) == ["node-a", "node-b"])
    # A first list (no watch yet) judges the same way.
    fresh = clocked_store(api, now)
    server.modify("node-b", ready("Unknown"))
    assert names(fresh) == ["node-a"]


def test_an_api_server_outage_removes_no_node(api, server):
    now = [T0_EPOCH + 10]
    store = clocked_store(api, now)
    store.register(local(ips=("192.168.56.10",)))
    watching(store, server)
    server.modify("node-b", ready("Unknown"))
    eventually(lambda: "node-b" in store._unknown_since)
    assert names(store) == ["node-a", "node-b"]
    server.unavailable = True
    server.restart()
    eventually(lambda: store.informer is not None and not store.informer.healthy)
    now[0] += 3600  # an hour of outage: the cache is stale, nothing is judged on it
    assert names(store) == ["node-a", "node-b"]
    server.unavailable = False  # back, and node-b is still Unknown: now it goes
    eventually(lambda: store.informer.healthy)
    assert names(store) == ["node-a"]
