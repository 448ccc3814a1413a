"""The Go reference plugins as a lab cluster's pod network, in pycni's place, so `bench kube`
compares the two in the same cluster set-up: on every node, bridge + host-local (and
portmap) in /opt/cni/bin and a config list in /etc/cni/net.d naming the node's podCIDR,
written as a kubeadm user following the plugins' README would; the nodes reach each other's
pods by static routes (host-gw), since the reference has no agent. The kubelets turn Ready
when the config list appears, as with pycni's DaemonSet."""

from __future__ import annotations

import json
import os
import shutil

from ...harness.peers import plugin_dirs
from ..build import ip_batch
from ..model import Lab, LabError
from .node import node_path

PLUGINS = ("bridge", "host-local", "portmap")
CONFLIST = "/etc/cni/net.d/10-reference.conflist"


def variants() -> dict[str, str]:
    """`--cni` values for the reference: "reference-VERSION" -> its plugin directory."""
    return {f"reference-{version}": d for version, d in plugin_dirs().items()}


def conflist(pod_cidr: str) -> dict:
    return {
        "cniVersion": "1.0.0",
        "name": "reference",
        "plugins": [
            {
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": True,
                "ipMasq": True,
                "hairpinMode": True,  # a pod through its own Service, as kube-proxy needs
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": pod_cidr}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def install(lab: Lab, variant: str, node_cidrs: dict[str, list[str]]) -> None:
    """The plugins and config list on every node, and the routes between them."""
    source = variants().get(variant)
    if source is None:
        raise LabError(f"--cni {variant}: not built here (have {', '.join(variants())})")
    if lab.ipv6:
        raise LabError(f"--cni {variant}: the reference's lab config is IPv4 only")
    pod_cidrs = {name: cidrs[0] for name, cidrs in node_cidrs.items() if cidrs}
    for node in lab.nodes:
        cidr = pod_cidrs.get(node.name)
        if not cidr:
            raise LabError(f"{node.name} has no podCIDR (the controller manager allocates it)")
        for plugin in PLUGINS:
            shutil.copy2(os.path.join(source, plugin), node_path(node, f"/opt/cni/bin/{plugin}"))
        path = node_path(node, CONFLIST)
        with open(path + ".tmp", "w") as f:
            json.dump(conflist(cidr), f, indent=2)
        os.replace(path + ".tmp", path)  # containerd sees it whole
        routes = [
            f"route replace {pod_cidrs[other.name]} via {other.lan_ip}"
            for other in lab.nodes
            if other is not node and pod_cidrs.get(other.name)
        ]
        if routes:
            ip_batch(node.netns, routes)
