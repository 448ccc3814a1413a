"""The lab as data: nodes, their pods, and where everything lives. Saved to <state>/lab.json
before anything is made, so `lab down` can undo whatever a failed `lab up` left."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import uuid
from dataclasses import asdict, dataclass, field

from ..node_config import CONFLIST_NAME, atomic_write

DEFAULT_STATE_DIR = "/run/pycni-lab"
DEFAULT_PREFIX = "pycnilab"
NETWORK_NAME = "pycni"
CLUSTER_CIDR = "10.244.0.0/16"
CLUSTER_CIDR6 = "fd00:10:244::/56"  # with --ipv6: each node a /64 of it
# Underlay subnets (documentation ranges): node i of an underlay is address i, the router .254.
UNDERLAYS = ("192.0.2.0/24", "198.51.100.0/24")
UNDERLAYS6 = ("2001:db8:1::/64", "2001:db8:2::/64")
WAN = ipaddress.ip_network("203.0.113.0/24")  # router .1, the outside .254
WAN6 = ipaddress.ip_network("2001:db8:ff::/64")
IFNAME = "eth0"
POD_NAMESPACE = "default"  # the lab's own pods' Kubernetes namespace
# Every pod's probe server listens on this TCP port unless the pod declares container ports of
# its own (then on its first TCP one); the lab's own pods declare it under the name below, so
# a policy can name it.
PROBE_PORT = 8080
PROBE_PORT_NAME = "serve"
MAX_PODS = 20
MAX_NODES = 50
PREFIX_RE = re.compile(r"[a-z][a-z0-9]{0,19}")


class LabError(Exception):
    pass


@dataclass
class Pod:
    netns: str
    k8s_name: str
    container_id: str
    uid: str
    ifname: str = IFNAME
    namespace: str = POD_NAMESPACE  # the Kubernetes namespace (K8S_POD_NAMESPACE)
    cache: str = ""  # libcni-style cached result
    address: str = ""
    address6: str = ""  # dual stack
    mac: str = ""
    host_veth: str = ""

    @property
    def netns_path(self) -> str:
        return f"/run/netns/{self.netns}"

    @property
    def ip(self) -> str:
        return self.address.split("/")[0]

    @property
    def ip6(self) -> str:
        return self.address6.split("/")[0]

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.k8s_name}"

    @property
    def label(self) -> str:
        """How tables and pictures name it: the lab's own pods by name, others as ns/name."""
        return self.k8s_name if self.namespace == POD_NAMESPACE else self.key

    @property
    def ips(self) -> list[str]:
        return [ip for ip in (self.ip, self.ip6) if ip]


@dataclass
class Node:
    name: str
    netns: str
    lan: str  # the underlay subnet the node sits on
    lan_ip: str
    root: str  # the node's plugin, config, IPAM data, logs and result cache
    subnet: str = ""  # learned from the agent once it has leased one
    lan6_ip: str = ""  # dual stack: the node's IPv6 underlay address
    subnet6: str = ""
    pods: list[Pod] = field(default_factory=list)

    @property
    def agent_socket(self) -> str:
        return os.path.join(self.root, "agent.sock")

    @property
    def agent_log(self) -> str:
        return os.path.join(self.root, "agent.log")

    @property
    def bin_dir(self) -> str:
        return os.path.join(self.root, "bin")

    @property
    def plugin(self) -> str:
        return os.path.join(self.bin_dir, "pycni")

    @property
    def conf_dir(self) -> str:
        return os.path.join(self.root, "net.d")

    @property
    def conflist_path(self) -> str:
        return os.path.join(self.conf_dir, CONFLIST_NAME)

    @property
    def subnet_file(self) -> str:
        return os.path.join(self.root, "subnet.env")

    @property
    def data_dir(self) -> str:
        return os.path.join(self.root, "data")

    @property
    def results_dir(self) -> str:
        return os.path.join(self.root, "results")

    @property
    def gateway(self) -> str:
        return str(ipaddress.ip_network(self.subnet)[1]) if self.subnet else ""

    @property
    def gateway6(self) -> str:
        return str(ipaddress.ip_network(self.subnet6)[1]) if self.subnet6 else ""

    @property
    def router_ip(self) -> str:
        return str(ipaddress.ip_network(self.lan)[254])

    @property
    def lan6(self) -> str:
        return UNDERLAYS6[UNDERLAYS.index(self.lan)]

    @property
    def router6_ip(self) -> str:
        return str(ipaddress.ip_network(self.lan6)[254])


@dataclass
class Lab:
    prefix: str
    state_dir: str
    backend: str = "vxlan"
    datastore: str = "sqlite"
    underlays: int = 1
    pods_per_node: int = 2
    ipv6: bool = False
    fast_path: bool = True  # the nodes' agents run the eBPF fast path
    # `lab up --kubernetes`: a real control plane and kubelets (lab/kube/); pycni runs as
    # its DaemonSet there, not as agents the lab starts.
    kubernetes: bool = False
    # Its pod network: "pycni" (the DaemonSet), or "reference-VERSION" (the Go bridge +
    # host-local, lab/kube/reference.py) for `bench kube` to compare in the same set-up.
    cni: str = "pycni"
    network: str = CLUSTER_CIDR
    network6: str = CLUSTER_CIDR6
    etcd_url: str = ""
    nodes: list[Node] = field(default_factory=list)

    @classmethod
    def plan(
        cls,
        prefix: str,
        state_dir: str,
        nodes: int,
        pods: int,
        backend: str = "vxlan",
        datastore: str = "sqlite",
        underlays: int = 1,
        ipv6: bool = False,
        fast_path: bool = True,
    ) -> Lab:
        lab = cls(
            prefix=prefix,
            state_dir=os.path.abspath(state_dir),
            backend=backend,
            datastore=datastore,
            underlays=underlays,
            pods_per_node=pods,
            ipv6=ipv6,
            fast_path=fast_path,
        )
        if datastore == "etcd":
            lab.etcd_url = f"http://{ipaddress.ip_network(UNDERLAYS[0])[254]}:2379"
        for _ in range(nodes):
            lab.plan_node()
        return lab

    def plan_node(self) -> Node:
        """One more node (the lab's next number), on the underlays in turn, with its pods."""
        i = max((int(n.name[4:]) for n in self.nodes), default=0) + 1
        lan = ipaddress.ip_network(UNDERLAYS[(i - 1) % self.underlays])
        host = (i - 1) // self.underlays + 1
        name = f"node{i}"
        node = Node(
            name=name,
            netns=f"{self.prefix}-{name}",
            lan=str(lan),
            lan_ip=str(lan[host]),
            root=os.path.join(self.state_dir, "nodes", name),
        )
        if self.ipv6:
            node.lan6_ip = str(ipaddress.ip_network(node.lan6)[host])
        for _ in range(self.pods_per_node):
            self.plan_pod(node)
        self.nodes.append(node)
        return node

    def plan_pod(
        self,
        node: Node,
        namespace: str = POD_NAMESPACE,
        name: str = "",
        avoid: frozenset[str] | set[str] = frozenset(),
    ) -> Pod:
        """One more pod on `node`, in netns <prefix>-nIpodJ (J the node's next free number,
        none of `avoid`, so `lab down` finds it by name); named nIpodJ unless `name` is given."""
        i = int(node.name[4:])
        taken = {p.netns for p in node.pods} | set(avoid)
        j = len(node.pods) + 1
        while f"{self.prefix}-n{i}pod{j}" in taken:
            j += 1
        pod = Pod(
            netns=f"{self.prefix}-n{i}pod{j}",
            k8s_name=name or f"n{i}pod{j}",
            container_id=secrets.token_hex(32),
            uid=str(uuid.uuid4()),
            namespace=namespace,
        )
        node.pods.append(pod)
        return pod

    def pods(self) -> list[tuple[Node, Pod]]:
        return [(node, pod) for node in self.nodes for pod in node.pods]

    def find_pod(self, namespace: str, name: str) -> tuple[Node, Pod] | None:
        return next(
            ((n, p) for n, p in self.pods() if (p.namespace, p.k8s_name) == (namespace, name)),
            None,
        )

    @property
    def router(self) -> str:
        return f"{self.prefix}-router"

    @property
    def outside(self) -> str:
        return f"{self.prefix}-outside"

    @property
    def outside_ip(self) -> str:
        return str(WAN[254])

    @property
    def outside_ip6(self) -> str:
        return str(WAN6[254]) if self.ipv6 else ""

    @property
    def cluster_db(self) -> str:
        return os.path.join(self.state_dir, "cluster.db")

    @property
    def etcd_dir(self) -> str:
        return os.path.join(self.state_dir, "etcd")

    @property
    def path(self) -> str:
        return os.path.join(self.state_dir, "lab.json")

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        raise LabError(f"no node {name} in the lab")

    def save(self) -> None:
        atomic_write(self.path, json.dumps(asdict(self), indent=2) + "\n", 0o644)

    @classmethod
    def named(cls, state_dir: str, prefix: str) -> Lab:
        """The lab `prefix` that is up in `state_dir`; LabError, saying so, when none is."""
        state_dir = os.path.abspath(state_dir)
        lab = cls.load(state_dir)
        if lab is None or lab.prefix != prefix:
            raise LabError(f"no lab {prefix} is up in {state_dir}")
        return lab

    @classmethod
    def load(cls, state_dir: str) -> Lab | None:
        path = os.path.join(state_dir, "lab.json")
        try:
            with open(path) as f:
                data = json.load(f)
            nodes = [Node(**{**n, "pods": [Pod(**p) for p in n["pods"]]}) for n in data["nodes"]]
            return cls(**{**data, "nodes": nodes})
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as exc:
            raise LabError(
                f"{path} is unreadable ({exc}); remove the lab's namespaces with "
                "`ip netns del` and the directory by hand"
            ) from None

    def namespaces(self) -> list[str]:
        out = [p.netns for n in self.nodes for p in n.pods]
        out += [n.netns for n in self.nodes]
        if self.kubernetes:
            out.append(f"{self.prefix}-cp")
        return out + [self.outside, self.router]


def lab_netns_re(prefix: str) -> re.Pattern:
    return re.compile(rf"{re.escape(prefix)}-(outside|router|cp|node\d+|n\d+pod\d+)")
