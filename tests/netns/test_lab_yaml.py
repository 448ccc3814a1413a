"""The lab spoken to in Kubernetes YAML, end to end: `lab up --pods 0`, then namespaces, pods
(named ports, on chosen nodes) and a NetworkPolicy from `lab apply -f`, networked through the
nodes' installed plugins; `lab get`, a relabel, `lab delete`, and `lab down` removing it all.
Own prefix and state directory, beside any lab the user has up. Enforcement is the agent's:
nothing here asserts that a policy denies anything."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess

import pytest

from conftest import lab_namespaces, lab_pycnictl, private_lab, sh
from pycni.cluster.factory import open_objects
from pycni.lab.model import Lab

pytestmark = pytest.mark.netns

WORLD = """
apiVersion: v1
kind: Namespace
metadata: {name: x, labels: {ns: x}}
---
apiVersion: v1
kind: Namespace
metadata: {name: y, labels: {ns: y}}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x, labels: {pod: a, app: db}}
spec:
  nodeName: node1
  containers:
  - name: server
    image: busybox
    ports:
    - {name: serve-80-tcp, containerPort: 80}
    - {name: serve-81-tcp, containerPort: 81}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: x, labels: {pod: b}}
spec:
  nodeName: node2
  containers:
  - name: server
    image: busybox
    ports: [{name: serve-80-tcp, containerPort: 80}]
---
apiVersion: v1
kind: Pod
metadata: {name: c, namespace: y, labels: {pod: c}}
spec:
  containers: [{name: server, image: busybox}]
"""

POLICY = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db, namespace: x}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {ns: y}}}]
    ports: [{port: serve-80-tcp}]
"""


def pycnictl(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return lab_pycnictl(*args, stdin=stdin, timeout=180)


@pytest.fixture
def lab():
    with private_lab("yaml") as made:
        yield made


def get_pods(opts) -> dict[str, dict]:
    got = pycnictl("lab", "get", "pods", "--json", *opts)
    assert got.returncode == 0, got.stderr
    return {f"{p['namespace']}/{p['name']}": p for p in json.loads(got.stdout)}


def test_pods_namespaces_and_policies_from_yaml(lab, tmp_path):
    prefix, state, opts = lab
    up = pycnictl("lab", "up", "--nodes", "2", "--pods", "0", *opts)
    assert up.returncode == 0, up.stdout + up.stderr
    assert "no pods yet" in up.stdout and "no paths measured" in up.stdout
    assert sorted(lab_namespaces(prefix)) == sorted(
        f"{prefix}-{n}" for n in ("router", "outside", "node1", "node2")
    )
    subnets = {n.name: ipaddress.ip_network(n.subnet) for n in Lab.load(state).nodes}

    world = tmp_path / "world.yaml"
    world.write_text(WORLD)
    applied = pycnictl("lab", "apply", "-f", str(world), *opts)
    assert applied.returncode == 0, applied.stdout + applied.stderr
    assert applied.stdout.splitlines() == [
        "namespace/x created",
        "namespace/y created",
        "pod/x/a created",
        "pod/x/b created",
        "pod/y/c created",
    ]
    pods = get_pods(opts)
    assert sorted(pods) == ["x/a", "x/b", "y/c"]
    # spec.nodeName picks the node; without one, the node with the fewest pods (node1 first).
    assert [pods[k]["node"] for k in ("x/a", "x/b", "y/c")] == ["node1", "node2", "node1"]
    assert pods["x/a"]["labels"] == {"pod": "a", "app": "db"}
    for pod in pods.values():
        assert pod["netns"] in lab_namespaces(prefix)
        assert len(pod["ips"]) == 1
        assert ipaddress.ip_address(pod["ips"][0]) in subnets[pod["node"]], pod
        eth0 = sh("ip", "-n", pod["netns"], "-4", "-o", "addr", "show", "eth0").stdout
        assert pod["ips"][0] + "/" in eth0

    # The plugin ran as a kubelet's runtime would, with the pod's namespace and name.
    recorded = Lab.load(state)
    entry = next(p for n in recorded.nodes for p in n.pods if p.k8s_name == "a")
    with open(entry.cache) as f:
        cni_args = dict(json.load(f)["cniArgs"])
    assert cni_args["K8S_POD_NAMESPACE"] == "x" and cni_args["K8S_POD_NAME"] == "a"
    # Stored as the API server and kubelet would have it, for the agents to read.
    store = open_objects("sqlite", path=os.path.join(state, "cluster.db"))
    try:
        obj = store.get("Pod", "x", "a")
        assert obj is not None
        assert obj["spec"]["nodeName"] == "node1"
        assert obj["status"]["podIPs"] == [{"ip": pods["x/a"]["ips"][0]}]
        assert obj["status"]["phase"] == "Running"
        assert obj["metadata"]["uid"] == entry.uid
        ns = store.get("Namespace", "", "y")
        assert ns is not None and ns["metadata"]["labels"]["kubernetes.io/metadata.name"] == "y"
    finally:
        store.close()

    # With no policy, every path is open (named ports or not: x/a is probed on its port 80).
    probe = pycnictl("lab", "probe", *opts)
    assert probe.returncode == 0, probe.stdout + probe.stderr
    assert "all 15 paths OK" in probe.stdout
    assert f"x/a {pods['x/a']['ips'][0]}:80" in probe.stdout
    assert f"y/c {pods['y/c']['ips'][0]} " in probe.stdout  # no ports: the lab's 8080

    policy = pycnictl("lab", "apply", "-f", "-", *opts, stdin=POLICY)
    assert policy.returncode == 0, policy.stderr
    assert policy.stdout == "networkpolicy.networking.k8s.io/x/db created\n"
    got = pycnictl("lab", "get", "policies", "--json", *opts)
    assert json.loads(got.stdout) == [
        {"namespace": "x", "name": "db", "policyTypes": ["Ingress"], "pods": ["a"]}
    ]

    # A relabel updates the object only: no second ADD, and the policy now selects b too.
    adds = open(os.path.join(state, "nodes", "node2", "agent.log")).read().count("ADD ")
    assert adds == 1  # x/b's
    relabel = WORLD.replace("{pod: b}", "{pod: b, app: db}")
    again = pycnictl("lab", "apply", "-f", "-", *opts, stdin=relabel)
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines() == [
        "namespace/x unchanged",
        "namespace/y unchanged",
        "pod/x/a unchanged",
        "pod/x/b configured",
        "pod/y/c unchanged",
    ]
    assert open(os.path.join(state, "nodes", "node2", "agent.log")).read().count("ADD ") == adds
    assert get_pods(opts)["x/b"]["labels"] == {"pod": "b", "app": "db"}
    got = pycnictl("lab", "get", "policies", *opts)
    assert got.stdout.splitlines()[1].split() == ["x", "db", "Ingress", "a,b"]
    moved = pycnictl("lab", "apply", "-f", "-", *opts, stdin=WORLD.replace("node2", "node1"))
    assert moved.returncode == 1 and "delete it first" in moved.stderr

    # Deleting a pod: DEL through the plugin, its namespace, veth and cached result gone.
    a = get_pods(opts)["x/a"]
    veth = entry.host_veth
    assert (
        veth
        and sh("ip", "-n", f"{prefix}-node1", "link", "show", veth, check=False).returncode == 0
    )
    gone = pycnictl("lab", "delete", "-f", "-", *opts, stdin=WORLD.split("---")[2])
    assert gone.returncode == 0, gone.stderr
    assert gone.stdout == "pod/x/a deleted\n"
    assert a["netns"] not in lab_namespaces(prefix)
    assert sh("ip", "-n", f"{prefix}-node1", "link", "show", veth, check=False).returncode != 0
    assert not os.path.exists(entry.cache)
    assert "DEL " in open(os.path.join(state, "nodes", "node1", "agent.log")).read()
    assert sorted(get_pods(opts)) == ["x/b", "y/c"]

    # Deleting a namespace deletes its pods.
    ns_y = "apiVersion: v1\nkind: Namespace\nmetadata: {name: y}\n"
    gone = pycnictl("lab", "delete", "-f", "-", *opts, stdin=ns_y)
    assert gone.stdout.splitlines() == ["pod/y/c deleted", "namespace/y deleted"], gone.stderr
    assert sorted(get_pods(opts)) == ["x/b"]

    # lab down DELs what is left and removes every namespace.
    down = pycnictl("lab", "down", *opts)
    assert down.returncode == 0, down.stdout + down.stderr
    assert down.stdout.count("DEL ") == 1
    assert lab_namespaces(prefix) == [] and not os.path.exists(state)


def test_the_lab_s_own_pods_and_applied_ones_over_etcd(lab):
    """With etcd (listening in the router's namespace, out of the host's reach) the objects
    go there: the lab's own pods too, selectable by their pod label."""
    prefix, state, opts = lab
    up = pycnictl("lab", "up", "--nodes", "1", "--pods", "1", "--datastore", "etcd", *opts)
    assert up.returncode == 0, up.stdout + up.stderr
    assert "all 2 paths OK" in up.stdout
    docs = WORLD.split("---")
    applied = pycnictl(
        "lab", "apply", "-f", "-", *opts, stdin="---".join((docs[0], docs[2], POLICY))
    )
    assert applied.returncode == 0, applied.stderr
    assert applied.stdout.splitlines() == [
        "namespace/x created",
        "networkpolicy.networking.k8s.io/x/db created",
        "pod/x/a created",
    ]
    pods = get_pods(opts)
    assert sorted(pods) == ["default/n1pod1", "x/a"]
    assert pods["default/n1pod1"]["labels"] == {"pod": "n1pod1"}
    everyone = POLICY.replace("db, namespace: x", "all, namespace: default")
    everyone = everyone.replace("{matchLabels: {app: db}}", "{}")
    assert pycnictl("lab", "apply", "-f", "-", *opts, stdin=everyone).returncode == 0
    got = pycnictl("lab", "get", "policies", "--json", *opts)
    assert {p["name"]: p["pods"] for p in json.loads(got.stdout)} == {
        "all": ["n1pod1"],
        "db": ["a"],
    }
    down = pycnictl("lab", "down", *opts)
    assert down.returncode == 0, down.stdout + down.stderr
    assert down.stdout.count("DEL ") == 2
    assert lab_namespaces(prefix) == [] and not os.path.exists(state)
