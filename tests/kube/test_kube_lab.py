"""`pycnictl lab up --kubernetes`: a real control plane and two kubelets, networked by pycni
installed from its manifest, judged by kubectl and by upstream e2e specs.

One cluster for the module (bringing one up costs tens of seconds): two dual-stack nodes on
host-gw (`--ipv6`: every pod and the Service get an IPv4 and an IPv6 address), with pods on
both reaching each other and a ClusterIP Service over both families, a default-deny
NetworkPolicy enforced on both, an IPv6 ipBlock allowing IPv6 alone, a few upstream Netpol
and "Networking Granular Checks: Pods" specs passing, and
`lab down` leaving no process, namespace, mount or cgroup behind. Skipped when `./dev kube`
has not built its cache, failed then under ./dev test (PYCNI_REQUIRE_PEERS=1).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from conftest import RUN_ID, lab_namespaces, lab_pycnictl, sh
from pycni.harness import kube, peers

pytestmark = [pytest.mark.netns, pytest.mark.kube]

PREFIX = f"kt{RUN_ID}"
AGNHOST = "registry.k8s.io/e2e-test-images/agnhost:2.66.1"
NAMESPACE = "kubelab"
# Upstream specs, by their exact names (each must run and pass).
E2E_FOCUS = (
    r"Netpol NetworkPolicy between server and client should support a 'default-deny-ingress' "
    r"policy|Netpol NetworkPolicy between server and client should enforce policy to allow "
    r"traffic from pods within server namespace based on PodSelector|Networking Granular "
    r"Checks: Pods should function for (intra|node)-pod communication: (http|udp)"
)
E2E_SPECS = 6


def _kube_missing() -> str | None:
    try:
        for name in ("kube-apiserver", "kubelet", "kubectl", "e2e.test", "etcd"):
            kube.binary(name)
        kube.images(pycni=False)  # pycni's own: built by `lab up` when the checkout changed
        peers.pinned_containerd()
    except (kube.KubeNotBuilt, peers.MissingPeer) as exc:
        return str(exc)
    return None


@pytest.fixture(scope="module")
def cluster():
    why = _kube_missing()
    if why:
        if peers.required():
            pytest.fail(f"{why} (PYCNI_REQUIRE_PEERS=1)", pytrace=False)
        pytest.skip(why)
    state = f"/tmp/{PREFIX}"  # short: unix socket paths live under it
    shutil.rmtree(state, ignore_errors=True)
    opts = ("--prefix", PREFIX, "--state-dir", state)
    started = time.monotonic()
    try:
        up = lab_pycnictl("lab", "up", "--kubernetes", "--nodes", "2", "--backend", "host-gw",
                          "--ipv6", *opts, timeout=900)  # fmt: skip
        print(up.stdout, up.stderr, f"up in {time.monotonic() - started:.1f} s", sep="\n")
        assert up.returncode == 0, up.stdout + up.stderr
        yield opts
    finally:
        started = time.monotonic()
        down = lab_pycnictl("lab", "down", *opts, timeout=300)
        print(down.stdout, down.stderr, f"down in {time.monotonic() - started:.1f} s", sep="\n")
        for ns in lab_namespaces(PREFIX):
            sh("ip", "netns", "del", ns, check=False)


def kubectl(opts, *args: str, stdin: str | None = None, check: bool = True, timeout=120):
    proc = lab_pycnictl("lab", "kubectl", *opts, "--", *args, stdin=stdin, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_two_nodes_ready_at_the_lab_addresses(cluster):
    nodes = json.loads(kubectl(cluster, "get", "nodes", "-o", "json").stdout)["items"]
    assert sorted(n["metadata"]["name"] for n in nodes) == ["node1", "node2"]
    for n in nodes:
        ready = {c["type"]: c["status"] for c in n["status"]["conditions"]}["Ready"]
        assert ready == "True", n["status"]["conditions"]
        internal = [a["address"] for a in n["status"]["addresses"] if a["type"] == "InternalIP"]
        number = n["metadata"]["name"][4:]
        assert internal == ["192.0.2." + number, "2001:db8:1::" + number]
        v4, v6 = n["spec"]["podCIDRs"]
        assert v4.startswith("10.244.") and v4.endswith("/24"), v4
        assert v6.startswith("fd00:10:244:") and v6.endswith("/64"), v6
    assert len({n["spec"]["podCIDR"] for n in nodes}) == 2
    ds = json.loads(kubectl(cluster, "-n", "kube-system", "get", "ds", "pycni", "-o",
                            "json").stdout)  # fmt: skip
    assert ds["status"]["numberReady"] == 2


def _workload() -> str:
    docs = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}]
    for i in (1, 2):
        docs.append({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"web{i}", "namespace": NAMESPACE, "labels": {"app": f"web{i}"}},
            "spec": {
                "nodeName": f"node{i}",
                "terminationGracePeriodSeconds": 0,
                "containers": [{"name": "web", "image": AGNHOST,
                                "imagePullPolicy": "IfNotPresent",
                                "args": ["netexec", "--http-port=8080"]}],
            },
        })  # fmt: skip
    docs.append({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web2", "namespace": NAMESPACE},
        "spec": {"ipFamilyPolicy": "RequireDualStack", "selector": {"app": "web2"},
                 "ports": [{"port": 80, "targetPort": 8080}]},
    })  # fmt: skip
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": docs})


@pytest.fixture(scope="module")
def workload(cluster):
    started = time.monotonic()
    kubectl(cluster, "apply", "-f", "-", stdin=_workload())
    kubectl(cluster, "-n", NAMESPACE, "wait", "--for=condition=Ready", "pod", "--all",
            "--timeout=120s", timeout=150)  # fmt: skip
    print(f"2 pods Ready in {time.monotonic() - started:.1f} s")
    pods = json.loads(kubectl(cluster, "-n", NAMESPACE, "get", "pods", "-o", "json").stdout)
    ips = {p["metadata"]["name"]: p["status"]["podIP"] for p in pods["items"]}
    svc = kubectl(cluster, "-n", NAMESPACE, "get", "svc", "web2", "-o",
                  "jsonpath={.spec.clusterIP}").stdout  # fmt: skip
    return ips, svc


@pytest.fixture(scope="module")
def workload6(cluster, workload):
    """The IPv6 addresses of the same pods and Service, bracketed for host:port."""
    pods = json.loads(kubectl(cluster, "-n", NAMESPACE, "get", "pods", "-o", "json").stdout)
    ips = {}
    for p in pods["items"]:
        v4, v6 = (a["ip"] for a in p["status"]["podIPs"])
        assert v4 == p["status"]["podIP"] and ":" in v6, p["status"]["podIPs"]
        ips[p["metadata"]["name"]] = f"[{v6}]"
    svc = json.loads(kubectl(cluster, "-n", NAMESPACE, "get", "svc", "web2", "-o",
                             "jsonpath={.spec.clusterIPs}").stdout)  # fmt: skip
    assert len(svc) == 2 and ":" in svc[1], svc
    return ips, f"[{svc[1]}]"


def connect(cluster, target: str, timeout: str = "3s") -> subprocess.CompletedProcess:
    """agnhost's own TCP connect from web1 (on node1)."""
    return kubectl(cluster, "-n", NAMESPACE, "exec", "web1", "--", "/agnhost", "connect",
                   target, f"--timeout={timeout}", check=False)  # fmt: skip


def test_pods_on_both_nodes_reach_each_other_and_a_service(cluster, workload):
    ips, svc = workload
    assert ips["web1"] != ips["web2"]
    for target in (f"{ips['web2']}:8080", f"{svc}:80"):
        proc = connect(cluster, target)
        assert proc.returncode == 0, f"{target}: {proc.stdout}{proc.stderr}"
    # And back, node2 to node1: the pod's address is kept (host-gw, no masquerade).
    proc = kubectl(cluster, "-n", NAMESPACE, "exec", "web2", "--", "/agnhost", "connect",
                   f"{ips['web1']}:8080", "--timeout=3s", check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_pods_reach_each_other_and_the_service_over_ipv6_unmasqueraded(cluster, workload6):
    ips, svc = workload6
    for target in (f"{ips['web2']}:8080", f"{svc}:80"):
        proc = connect(cluster, target)
        assert proc.returncode == 0, f"{target}: {proc.stdout}{proc.stderr}"
    # web2 sees web1's own IPv6 address: host-gw routes pod subnets, it masquerades nothing.
    proc = kubectl(cluster, "-n", NAMESPACE, "exec", "web1", "--", "curl", "-sS", "-m", "3",
                   f"http://{ips['web2']}:8080/clientip", check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.rsplit(":", 1)[0] == ips["web1"], proc.stdout


DENY = {
    "apiVersion": "networking.k8s.io/v1",
    "kind": "NetworkPolicy",
    "metadata": {"name": "default-deny", "namespace": NAMESPACE},
    "spec": {"podSelector": {}, "policyTypes": ["Ingress"]},
}


def _until(cluster, target: str, reachable: bool, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while (connect(cluster, target, "2s").returncode == 0) != reachable:
        assert time.monotonic() < deadline, f"{target} {what} {timeout:.0f} s on"


def test_default_deny_policy_applied_with_kubectl_is_enforced(cluster, workload, workload6):
    ips, svc = workload
    ips6, svc6 = workload6
    kubectl(cluster, "apply", "-f", "-", stdin=json.dumps(DENY))
    try:
        _until(cluster, f"{ips['web2']}:8080", False, "still reachable after the policy")
        for target in (f"{svc}:80", f"{ips6['web2']}:8080", f"{svc6}:80"):
            assert connect(cluster, target, "2s").returncode != 0, target
    finally:
        kubectl(cluster, "-n", NAMESPACE, "delete", "networkpolicy", "default-deny")
    _until(cluster, f"{ips['web2']}:8080", True, "still denied after the policy went")
    assert connect(cluster, f"{ips6['web2']}:8080").returncode == 0


def test_an_ipv6_ipblock_admits_ipv6_alone(cluster, workload, workload6):
    """web2 admits node1's IPv6 pod subnet only: web1 reaches it over IPv6 (also through the
    Service, DNATed on node1 before the policy sees it), and no longer over IPv4."""
    ips, _ = workload
    ips6, svc6 = workload6
    nodes = json.loads(kubectl(cluster, "get", "nodes", "-o", "json").stdout)["items"]
    node1_v6 = next(n["spec"]["podCIDRs"][1] for n in nodes if n["metadata"]["name"] == "node1")
    policy = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "from-node1-ipv6", "namespace": NAMESPACE},
        "spec": {"podSelector": {"matchLabels": {"app": "web2"}},
                 "ingress": [{"from": [{"ipBlock": {"cidr": node1_v6}}]}]},
    }  # fmt: skip
    kubectl(cluster, "apply", "-f", "-", stdin=json.dumps(policy))
    try:
        _until(cluster, f"{ips['web2']}:8080", False, "still reachable over IPv4 after the policy")
        for target in (f"{ips6['web2']}:8080", f"{svc6}:80"):
            proc = connect(cluster, target)
            assert proc.returncode == 0, f"{target}: {proc.stdout}{proc.stderr}"
    finally:
        kubectl(cluster, "-n", NAMESPACE, "delete", "networkpolicy", "from-node1-ipv6")
    _until(cluster, f"{ips['web2']}:8080", True, "still denied after the policy went")


def test_the_agent_restarted_under_running_pods_disturbs_nothing(cluster, workload):
    """node1's pycni pod deleted (its agent stopped mid-watch), the DaemonSet starts another:
    web1 keeps reaching web2 across nodes meanwhile, and a pod started on node1 afterwards is
    networked by the new agent."""
    ips, _ = workload
    old = kubectl(cluster, "-n", "kube-system", "get", "pods", "-l", "app.kubernetes.io/name=pycni",
                  "--field-selector=spec.nodeName=node1", "-o", "name").stdout.split()  # fmt: skip
    assert len(old) == 1, old
    kubectl(cluster, "-n", "kube-system", "delete", old[0], "--wait=false")
    failures = 0
    deadline = time.monotonic() + 120
    while True:
        failures += connect(cluster, f"{ips['web2']}:8080", "2s").returncode != 0
        now = kubectl(cluster, "-n", "kube-system", "get", "pods", "-l",
                      "app.kubernetes.io/name=pycni", "--field-selector=spec.nodeName=node1",
                      "-o", "json").stdout  # fmt: skip
        items = json.loads(now)["items"]
        if (
            len(items) == 1
            and items[0]["metadata"]["name"] != old[0].split("/")[1]
            and any(
                c["type"] == "Ready" and c["status"] == "True"
                for c in items[0]["status"].get("conditions", [])
            )
        ):
            break
        assert time.monotonic() < deadline, "no new pycni pod Ready on node1 within 120 s"
    assert failures == 0, f"{failures} connections failed while the agent restarted"
    late = {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "late", "namespace": NAMESPACE},
            "spec": {"nodeName": "node1", "terminationGracePeriodSeconds": 0,
                     "containers": [{"name": "web", "image": AGNHOST,
                                     "imagePullPolicy": "IfNotPresent",
                                     "args": ["netexec", "--http-port=8080"]}]}}  # fmt: skip
    kubectl(cluster, "apply", "-f", "-", stdin=json.dumps(late))
    try:
        kubectl(cluster, "-n", NAMESPACE, "wait", "--for=condition=Ready", "pod/late",
                "--timeout=60s", timeout=90)  # fmt: skip
        late_ip = kubectl(cluster, "-n", NAMESPACE, "get", "pod", "late", "-o",
                          "jsonpath={.status.podIP}").stdout  # fmt: skip
        proc = kubectl(cluster, "-n", NAMESPACE, "exec", "web2", "--", "/agnhost", "connect",
                       f"{late_ip}:8080", "--timeout=3s", check=False)  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
    finally:
        kubectl(cluster, "-n", NAMESPACE, "delete", "pod", "late", "--wait=false")


def test_upstream_netpol_and_granular_pod_specs_pass(cluster):
    proc = lab_pycnictl("lab", "e2e", *cluster, "--focus", E2E_FOCUS, timeout=1800)
    print(proc.stdout, proc.stderr)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"Ran {E2E_SPECS} of " in proc.stdout
    assert f"{E2E_SPECS} Passed | 0 Failed" in proc.stdout


def test_down_leaves_nothing(cluster):
    """Last in the module: down now (the fixture's own down then finds nothing)."""
    state = cluster[cluster.index("--state-dir") + 1]
    started = time.monotonic()
    down = lab_pycnictl("lab", "down", *cluster, timeout=300)
    took = time.monotonic() - started
    assert down.returncode == 0, down.stdout + down.stderr
    print(f"lab down with pods running: {took:.1f} s")
    assert lab_namespaces(PREFIX) == []
    assert not os.path.exists(state)
    left = sh("pgrep", "-af", state, check=False).stdout
    assert left == "", left
    with open("/proc/self/mountinfo") as f:
        assert state not in f.read()
    cgroups = [d for d in os.listdir("/sys/fs/cgroup/memory") if d.startswith(f"pycni-{PREFIX}")]
    assert cgroups == []
    assert took < 60


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v", "-s"]))
