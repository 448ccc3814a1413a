"""What runs on the cluster once it is up: pycni, applied from deploy/kubernetes/pycni.yaml as
an operator applies it, and CoreDNS behind 10.96.0.10 (the DNS conformance specs need it).

pycni's manifest is applied unchanged but for its ConfigMap, which an operator edits too: the
lab's backend and fast-path setting. Its image name and pull policy (IfNotPresent) are the
manifest's; the image was imported into every node's containerd beforehand.
"""

from __future__ import annotations

import os

import yaml

from ...harness.kube import ImageArchive
from ...harness.peers import REPO
from ..model import Lab
from . import controlplane as cp

MANIFEST = os.path.join(REPO, "deploy", "kubernetes", "pycni.yaml")


def pycni_manifest(lab: Lab, path: str = MANIFEST) -> str:
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    for doc in docs:
        if doc.get("kind") == "ConfigMap" and doc["metadata"]["name"] == "pycni":
            doc["data"]["backend"] = lab.backend
            doc["data"]["cluster-cidr"] = lab.network
            doc["data"]["cluster-cidr-ipv6"] = lab.network6 if lab.ipv6 else ""
            doc["data"]["fast-path"] = "on" if lab.fast_path else "off"
    return yaml.safe_dump_all(docs, sort_keys=False)


def apply_pycni(lab: Lab) -> None:
    cp.kubectl(lab, "apply", "-f", "-", input=pycni_manifest(lab))


def coredns_image(archives: list[ImageArchive]) -> str | None:
    return next((i.name for i in archives if "coredns" in i.name.rsplit("/", 1)[-1]), None)


COREFILE = f"""\
.:53 {{
    errors
    health :8080
    ready :8181
    kubernetes {cp.CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 30
    }}
    cache 30
    loadbalance
}}
"""


def coredns_manifest(image: str) -> str:
    """CoreDNS as kubeadm deploys it, less what needs the outside (no `forward`: the lab has
    no upstream resolver, and must never reach the machine's)."""
    docs = [
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": "coredns", "namespace": "kube-system"}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": "system:coredns"},
         "rules": [
             {"apiGroups": [""], "resources": ["endpoints", "services", "pods", "namespaces"],
              "verbs": ["list", "watch"]},
             {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
              "verbs": ["list", "watch"]},
         ]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": "system:coredns"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                     "name": "system:coredns"},
         "subjects": [{"kind": "ServiceAccount", "name": "coredns",
                       "namespace": "kube-system"}]},
        {"apiVersion": "v1", "kind": "ConfigMap",
         "metadata": {"name": "coredns", "namespace": "kube-system"},
         "data": {"Corefile": COREFILE}},
        {"apiVersion": "apps/v1", "kind": "Deployment",
         "metadata": {"name": "coredns", "namespace": "kube-system",
                      "labels": {"k8s-app": "kube-dns"}},
         "spec": {
             "replicas": 1,
             "selector": {"matchLabels": {"k8s-app": "kube-dns"}},
             "template": {
                 "metadata": {"labels": {"k8s-app": "kube-dns"}},
                 "spec": {
                     "serviceAccountName": "coredns",
                     "priorityClassName": "system-cluster-critical",
                     "dnsPolicy": "Default",
                     "tolerations": [{"key": "CriticalAddonsOnly", "operator": "Exists"}],
                     "containers": [{
                         "name": "coredns",
                         "image": image,
                         "imagePullPolicy": "IfNotPresent",
                         "args": ["-conf", "/etc/coredns/Corefile"],
                         "ports": [
                             {"name": "dns", "containerPort": 53, "protocol": "UDP"},
                             {"name": "dns-tcp", "containerPort": 53, "protocol": "TCP"},
                         ],
                         "securityContext": {
                             "capabilities": {"add": ["NET_BIND_SERVICE"]},
                         },
                         "readinessProbe": {"httpGet": {"path": "/ready", "port": 8181},
                                            "periodSeconds": 2},
                         "livenessProbe": {"httpGet": {"path": "/health", "port": 8080},
                                           "initialDelaySeconds": 10},
                         "volumeMounts": [{"name": "config", "mountPath": "/etc/coredns"}],
                     }],
                     "volumes": [{"name": "config", "configMap": {"name": "coredns"}}],
                 },
             },
         }},
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": "kube-dns", "namespace": "kube-system",
                      "labels": {"k8s-app": "kube-dns"}},
         "spec": {
             "clusterIP": cp.DNS_SERVICE_IP,
             "selector": {"k8s-app": "kube-dns"},
             "ports": [
                 {"name": "dns", "port": 53, "protocol": "UDP"},
                 {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
             ],
         }},
    ]  # fmt: skip
    return yaml.safe_dump_all(docs, sort_keys=False)


def apply_coredns(lab: Lab, archives: list[ImageArchive]) -> bool:
    image = coredns_image(archives)
    if image is None:
        return False
    cp.kubectl(lab, "apply", "-f", "-", input=coredns_manifest(image))
    return True
