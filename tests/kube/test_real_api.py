"""pycni's Kubernetes-facing code against a real kube-apiserver (harness/apiserver.py: etcd and
the apiserver built by `./dev kube`, on loopback), authenticated as the agent's pod is, with a
ServiceAccount token and exactly the RBAC deploy/kubernetes/pycni.yaml grants: a verb the
manifest lacks fails these tests (403), it cannot pass silently. The fake API server's tests
(tests/cluster) say what each behaviour is; these say the real server agrees."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from pycni.cluster.informer import Informer
from pycni.cluster.kubernetes import ANN_NODE_IPS, ANN_VTEP_MAC, KubernetesDatastore
from pycni.cluster.kubernetes_objects import KubernetesObjects
from pycni.cluster.kv import KVError
from pycni.cluster.model import NodeRecord
from pycni.harness import kube, peers

pytestmark = pytest.mark.kube

MANIFEST = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes" / "pycni.yaml"
NAMESPACE, ACCOUNT = "kube-system", "pycni"


def node(name: str, cidr: str) -> str:
    return yaml.safe_dump({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name},
        "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
    })  # fmt: skip


def set_internal_ip(api, name: str, ip: str) -> None:
    status = json.dumps({"status": {"addresses": [{"type": "InternalIP", "address": ip}]}})
    api.kubectl("patch", "node", name, "--subresource=status", "--type=merge", "-p", status)


def require_kube() -> None:
    """Skip without `./dev kube`'s binaries; fail under ./dev test, which builds them."""
    try:
        for name in ("etcd", "kube-apiserver", "kubectl"):
            kube.binary(name)
    except kube.KubeNotBuilt as exc:
        if peers.required():
            pytest.fail(f"{exc} (PYCNI_REQUIRE_PEERS=1)", pytrace=False)
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    from pycni.harness.apiserver import LocalApiServer

    require_kube()
    with LocalApiServer(str(tmp_path_factory.mktemp("api"))) as server:
        # The operator's way: the whole manifest (its DaemonSet finds no node to run on).
        server.kubectl("apply", "-f", str(MANIFEST))
        for name, cidr, ip in (("node-a", "10.244.1.0/24", "192.0.2.1"),
                               ("node-b", "10.244.2.0/24", "192.0.2.2")):  # fmt: skip
            server.kubectl("apply", "-f", "-", stdin=node(name, cidr))
            set_internal_ip(server, name, ip)
        yield server


@pytest.fixture(scope="module")
def agent_config(api, tmp_path_factory) -> str:
    """The agent pod's credentials: the pycni ServiceAccount's token, nothing more."""
    path = str(tmp_path_factory.mktemp("sa") / "kubeconfig")
    return api.token_kubeconfig(path, NAMESPACE, ACCOUNT)


def datastore(kubeconfig: str, name: str = "node-a") -> KubernetesDatastore:
    store = KubernetesDatastore(name, kubeconfig=kubeconfig)
    store.watch_timeout = (2.0, 4.0)  # watches the server ends often: resumes get exercised
    return store


def local(name: str = "node-a", ip: str = "192.0.2.1") -> NodeRecord:
    return NodeRecord(name=name, node_ips=(ip,), vtep_mac="aa:bb:cc:00:00:01")


def followed(store: KubernetesDatastore, check, timeout: float = 20.0) -> bool:
    """Whether the store's view comes to pass `check` (on its node names), woken by its watch
    as the agent's loop is."""
    deadline = time.monotonic() + timeout
    while not check({n.name for n in store.nodes()}):
        if time.monotonic() > deadline:
            return False
        store.wait(1.0)
    return True


def test_the_manifests_rbac_is_all_the_agent_needs(api, agent_config):
    """Register (get, patch its Node), list and watch Nodes, and the NetworkPolicy source's
    lists and watches, with the ServiceAccount's token."""
    store = datastore(agent_config)
    try:
        mine = store.register(local())
        assert [str(s) for s in mine.subnets] == ["10.244.1.0/24"]
        got = yaml.safe_load(api.kubectl("get", "node", "node-a", "-o", "yaml").stdout)
        annotations = got["metadata"]["annotations"]
        assert annotations[ANN_NODE_IPS] == "192.0.2.1"
        assert annotations[ANN_VTEP_MAC] == "aa:bb:cc:00:00:01"
        assert store.wait(0.5) in (True, False)  # the watch opens (list, watch: allowed)
        assert {n.name for n in store.nodes()} >= {"node-a", "node-b"}
    finally:
        store.close()
    objects = KubernetesObjects(kubeconfig=agent_config)
    try:
        snapshot = objects.snapshot()
        assert any(n["metadata"]["name"] == NAMESPACE for n in snapshot.namespaces)
    finally:
        objects.close()


def test_a_verb_the_role_lacks_is_an_error_not_silence(api, agent_config, tmp_path):
    """The same account, its role without `patch`: register must fail, saying forbidden."""
    role = yaml.safe_load(api.kubectl("get", "clusterrole", "pycni", "-o", "yaml").stdout)
    rules = [dict(r, verbs=[v for v in r["verbs"] if v != "patch"]) for r in role["rules"]]
    narrowed = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                "metadata": {"name": "pycni-no-patch"}, "rules": rules}  # fmt: skip
    api.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(narrowed))
    api.kubectl("create", "serviceaccount", "pycni-no-patch", "-n", NAMESPACE)
    api.kubectl("create", "clusterrolebinding", "pycni-no-patch", "--clusterrole=pycni-no-patch",
                f"--serviceaccount={NAMESPACE}:pycni-no-patch")  # fmt: skip
    config = api.token_kubeconfig(str(tmp_path / "kc"), NAMESPACE, "pycni-no-patch")
    # node-b: its annotations are not yet what this agent publishes, so register must patch.
    store = datastore(config, "node-b")
    try:
        deadline = time.monotonic() + 10  # a new binding reaches RBAC's cache within moments
        while True:
            try:
                store.register(local("node-b", "192.0.2.2"))
            except KVError as exc:
                if "forbidden" in str(exc).lower() or time.monotonic() > deadline:
                    assert "forbidden" in str(exc).lower(), exc
                    assert "patch" in str(exc), exc
                    break
                time.sleep(0.2)
            else:
                pytest.fail("register patched node-b's annotations without the patch verb")
    finally:
        store.close()


def test_the_watch_follows_a_node_joining_and_leaving(api, agent_config):
    store = datastore(agent_config)
    try:
        store.register(local())
        store.wait(0.1)
        api.kubectl("apply", "-f", "-", stdin=node("node-c", "10.244.3.0/24"))
        set_internal_ip(api, "node-c", "192.0.2.3")
        assert followed(store, lambda names: "node-c" in names), "node-c never appeared"
        api.kubectl("delete", "node", "node-c")
        assert followed(store, lambda names: "node-c" not in names), "node-c never left"
    finally:
        store.close()


def test_a_restarted_agent_sees_what_changed_while_it_was_down(api, agent_config):
    """An agent killed mid-watch, a Node changed meanwhile, a new agent: it lists afresh."""
    first = datastore(agent_config)
    first.register(local())
    first.wait(0.5)  # its watch is open
    first.close()
    api.kubectl("apply", "-f", "-", stdin=node("node-d", "10.244.4.0/24"))
    set_internal_ip(api, "node-d", "192.0.2.4")
    second = datastore(agent_config)
    try:
        second.register(local())
        assert "node-d" in {n.name for n in second.nodes()}
    finally:
        second.close()
        api.kubectl("delete", "node", "node-d")


def test_a_compacted_resource_version_is_a_real_410_and_relists(tmp_path):
    """A watch resumed from a resourceVersion etcd compacted away: the apiserver (its watch
    cache off, so the watch reaches etcd) answers 410 Gone, and the informer lists again,
    losing no change."""
    from kubernetes import client, config

    from pycni.harness.apiserver import LocalApiServer

    require_kube()
    with LocalApiServer(str(tmp_path / "api"), watch_cache=False) as server:
        server.kubectl("apply", "-f", "-", stdin=node("node-a", "10.244.1.0/24"))
        api_client = config.new_client_from_config(config_file=server.kubeconfig)
        core = client.CoreV1Api(api_client)
        informer = Informer("nodes", core.list_node, lambda n: n.metadata.name,
                            watch_timeout=(1.0, 2.0), backoff=(0.1, 0.5))  # fmt: skip
        try:
            old = core.list_node().metadata.resource_version
            for name in ("node-b", "node-c"):
                server.kubectl("apply", "-f", "-", stdin=node(name, "10.244.9.0/24"))
            server.compact()
            informer.resource_version = old  # as a watch that was cut before the compaction
            informer.start()
            assert informer.wait_until(lambda cache: len(cache) == 3, 20), informer.stats
            assert informer.stats["relists"] >= 1, informer.stats
        finally:
            informer.stop()
            api_client.close()
