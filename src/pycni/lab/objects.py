"""The lab's pods as Kubernetes would hold them: the objects the lab stores in its datastore
(`lab/store.py`) for the node agents, in the JSON form `kubectl get -o json` prints.

What the API server and the kubelet add, the lab adds too: a namespace's
`kubernetes.io/metadata.name` label, a pod's `metadata.namespace`, `metadata.uid`,
`spec.nodeName` and, once the pod is networked, `status` (`phase: Running`, `podIP`,
`podIPs`, `hostIP`, `hostIPs`). A pod is stored before its ADD (without status), so an agent
compiling policy while the plugin runs already knows its labels, and again after it.
"""

from __future__ import annotations

import copy

from ..policy.objects import NAMESPACE_NAME_LABEL
from .model import POD_NAMESPACE, PROBE_PORT, PROBE_PORT_NAME, Node, Pod

NETWORKING_API = "networking.k8s.io/v1"
# apiVersion each kind takes, and how kubectl names the kind in its output.
API_VERSIONS = {"Namespace": "v1", "Pod": "v1", "NetworkPolicy": NETWORKING_API}
RESOURCES = {
    "Namespace": "namespace",
    "Pod": "pod",
    "NetworkPolicy": "networkpolicy.networking.k8s.io",
}


def ref(kind: str, namespace: str, name: str) -> str:
    """kubectl's name of an object, with the namespace: pod/x/a, namespace/x."""
    return "/".join(p for p in (RESOURCES[kind], namespace, name) if p)


def namespace_object(name: str, labels: dict[str, str] | None = None) -> dict:
    return normalized(
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}
    )


def builtin_pod_object(node: Node, pod: Pod) -> dict:
    """One of the lab's own pods (nIpodJ, in `default`): label pod=<name>, and the probe
    server's port declared as the container port `serve`."""
    port = {"name": PROBE_PORT_NAME, "containerPort": PROBE_PORT, "protocol": "TCP"}
    obj = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod.k8s_name,
            "namespace": POD_NAMESPACE,
            "labels": {"pod": pod.k8s_name},
        },
        "spec": {"containers": [{"name": "serve", "image": "pycni-lab/serve", "ports": [port]}]},
    }
    return pod_object(obj, node, pod)


def normalized(obj: dict) -> dict:
    """A copy with what the API server fills in: a namespaced object's metadata.namespace, a
    namespace's name label; empty labels dropped."""
    out = copy.deepcopy(obj)
    meta = out.setdefault("metadata", {})
    labels = meta.pop("labels", None) or {}
    if out.get("kind") == "Namespace":
        meta.pop("namespace", None)
        labels[NAMESPACE_NAME_LABEL] = meta["name"]
    else:
        meta["namespace"] = meta.get("namespace") or POD_NAMESPACE
    if labels:
        meta["labels"] = labels
    return out


def pod_object(obj: dict, node: Node, pod: Pod) -> dict:
    """The pod as stored: the applied object, normalized, with its uid and node, and its
    status once it has addresses (as the kubelet reports it). Anything stored before is
    replaced: the lab's state says what the pod is."""
    out = normalized(obj)
    out.pop("status", None)
    out["metadata"]["uid"] = pod.uid
    spec = out.get("spec")
    out["spec"] = {**(spec if isinstance(spec, dict) else {}), "nodeName": node.name}
    if pod.ips:
        host_ips = [ip for ip in (node.lan_ip, node.lan6_ip) if ip]
        out["status"] = {
            "phase": "Running",
            "hostIP": host_ips[0],
            "hostIPs": [{"ip": ip} for ip in host_ips],
            "podIP": pod.ips[0],
            "podIPs": [{"ip": ip} for ip in pod.ips],
        }
    return out
