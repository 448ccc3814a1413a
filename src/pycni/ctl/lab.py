"""`pycnictl lab`: the arguments; the lab itself is pycni.lab's."""

from __future__ import annotations

import argparse

from ..lab.model import (
    CLUSTER_CIDR6,
    DEFAULT_PREFIX,
    DEFAULT_STATE_DIR,
    MAX_NODES,
    MAX_PODS,
    PREFIX_RE,
)
from .agent import BACKENDS


def _prefix(value: str) -> str:
    if not PREFIX_RE.fullmatch(value):
        raise argparse.ArgumentTypeError(
            f"{value!r}: use 1-20 lowercase letters and digits, starting with a letter"
        )
    return value


def _bounded(name: str, high: int, low: int = 1):
    def parse(value: str) -> int:
        if not value.isdigit() or not low <= int(value) <= high:
            raise argparse.ArgumentTypeError(
                f"{value!r}: give a number of {name} from {low} to {high}"
            )
        return int(value)

    return parse


# `lab get` resources, with the names kubectl also accepts for them.
RESOURCES = {
    "pods": ("pods", "pod", "po"),
    "policies": ("policies", "policy", "networkpolicies", "networkpolicy", "netpol"),
    "namespaces": ("namespaces", "namespace", "ns"),
}


def _resource(value: str) -> str:
    for resource, names in RESOURCES.items():
        if value in names:
            return resource
    raise argparse.ArgumentTypeError(f"{value!r}: get one of {', '.join(RESOURCES)}")


def register(sub) -> None:
    p = sub.add_parser("lab", help="a cluster in a box: nodes, pods, an outside, measurements")
    lsub = p.add_subparsers(dest="lab_command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--state-dir",
        default=DEFAULT_STATE_DIR,
        help=f"where the lab keeps its nodes' plugin, config and state ({DEFAULT_STATE_DIR})",
    )
    common.add_argument(
        "--prefix",
        type=_prefix,
        default=DEFAULT_PREFIX,
        help="namespace name prefix, so labs can run side by side "
        f"(lowercase letters and digits; {DEFAULT_PREFIX})",
    )
    u = lsub.add_parser(
        "up",
        parents=[common],
        help="build the cluster, network pods through "
        "each node's plugin, print subnets and the measured connectivity",
    )
    u.add_argument(
        "--nodes", type=_bounded("nodes", MAX_NODES), default=3, help=f"nodes (1-{MAX_NODES}; 3)"
    )
    u.add_argument(
        "--pods",
        type=_bounded("pods", MAX_PODS, low=0),
        default=2,
        help=f"pods per node (0-{MAX_PODS}; 2): with 0, `lab apply` makes them",
    )
    u.add_argument(
        "--backend",
        choices=BACKENDS,
        default="vxlan",
        help="how nodes reach each other's pods (vxlan)",
    )
    u.add_argument(
        "--datastore",
        choices=("sqlite", "etcd"),
        default="sqlite",
        help="where subnets are leased: a shared sqlite file, or an etcd the lab starts (sqlite)",
    )
    u.add_argument(
        "--underlays",
        type=int,
        choices=(1, 2),
        default=1,
        help="underlay subnets joined by the router; with 2 and --backend auto, "
        "nodes mix host-gw and VXLAN (1)",
    )
    u.add_argument(
        "--ipv6",
        action="store_true",
        help=f"dual stack: IPv6 underlays, a {CLUSTER_CIDR6} cluster CIDR beside the "
        "IPv4 one, and every path measured over both (with --kubernetes: dual-stack "
        "nodes, pods and Services)",
    )
    u.add_argument(
        "--no-fast-path",
        dest="fast_path",
        action="store_false",
        help="the nodes' agents run without the eBPF fast path (--no-fast-path of the agent)",
    )
    u.add_argument(
        "--svg",
        metavar="FILE",
        help="also draw the lab and its measured connectivity into FILE (SVG)",
    )
    u.add_argument(
        "--kubernetes",
        action="store_true",
        help="a real cluster: etcd and a control plane, a containerd, kubelet and "
        "kube-proxy per node, pycni applied as its DaemonSet (needs ./dev kube); "
        "--pods does not apply: make pods with `lab kubectl`",
    )
    u.set_defaults(func=_up)
    d = lsub.add_parser(
        "down",
        parents=[common],
        help="DEL every pod through the plugin and remove everything the lab made",
    )
    d.set_defaults(func=_down)
    w = lsub.add_parser(
        "draw",
        parents=[common],
        help="draw the running lab (nodes, subnets, pods, underlay, outside) and its "
        "connectivity matrix, measured now, as an SVG picture",
    )
    w.add_argument("--svg", metavar="FILE", required=True, help="the picture to write")
    w.add_argument(
        "--no-probes", action="store_true", help="draw the topology only, without measuring"
    )
    w.set_defaults(func=_draw)
    a = lsub.add_parser(
        "apply",
        parents=[common],
        help="create or update Namespaces, Pods (networked through their node's plugin) and "
        "NetworkPolicies from Kubernetes YAML",
    )
    _filenames(a, "to apply")
    a.set_defaults(func=_apply)
    r = lsub.add_parser(
        "delete",
        parents=[common],
        help="delete the objects the YAML names (a pod DELed through its plugin, a namespace "
        "with its pods and policies)",
    )
    _filenames(r, "whose objects to delete")
    r.add_argument(
        "--ignore-not-found",
        action="store_true",
        help="an object that does not exist is no error",
    )
    r.set_defaults(func=_delete)
    g = lsub.add_parser(
        "get",
        parents=[common],
        help="list pods (node, netns, addresses, labels), policies (and the pods each "
        "selects) or namespaces",
    )
    g.add_argument(
        "resource",
        type=_resource,
        metavar="{pods,policies,namespaces}",
        help="what to list (kubectl's short names work too: po, netpol, ns)",
    )
    g.add_argument("--json", action="store_true", help="a JSON list instead of a table")
    g.set_defaults(func=_get)
    m = lsub.add_parser(
        "probe",
        parents=[common],
        help="measure the connectivity matrix now, judged against the NetworkPolicies "
        "(an expected denial is no failure)",
    )
    m.add_argument("--json", action="store_true", help="one JSON entry per path")
    m.set_defaults(func=_probe)
    k = lsub.add_parser(
        "kubectl",
        parents=[common],
        help="run the built kubectl against a `lab up --kubernetes` cluster: "
        "pycnictl lab kubectl -- get nodes",
    )
    k.add_argument("args", nargs=argparse.REMAINDER, help="kubectl's arguments, after --")
    k.set_defaults(func=_kubectl)
    e = lsub.add_parser(
        "e2e",
        parents=[common],
        help="run the upstream e2e binary against a `lab up --kubernetes` cluster",
    )
    e.add_argument("--focus", metavar="REGEX", help="only the specs whose names match")
    e.add_argument(
        "--skip",
        metavar="REGEX",
        help="also skip these (SCTP, [Serial], [Disruptive], [Flaky] and [Slow] always are)",
    )
    e.add_argument("--include-slow", action="store_true", help="do not skip the [Slow] specs")
    e.add_argument(
        "--ginkgo-arg",
        dest="ginkgo_args",
        action="append",
        metavar="ARG",
        help="one more argument for e2e.test (e.g. --ginkgo-arg=--ginkgo.v); may be repeated",
    )
    e.set_defaults(func=_e2e)


def _filenames(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "-f",
        "--filename",
        action="append",
        required=True,
        metavar="FILE",
        help=f"YAML or JSON {what} (several documents, kind: List too); - for stdin, a "
        "directory for its .yaml, .yml and .json files; may be repeated",
    )


def _up(args) -> int:
    from ..lab.commands import up

    return up(args)


def _down(args) -> int:
    from ..lab.commands import down

    return down(args)


def _draw(args) -> int:
    from ..lab.commands import draw

    return draw(args)


def _apply(args) -> int:
    from ..lab.kubectl import apply_command

    return apply_command(args)


def _delete(args) -> int:
    from ..lab.kubectl import delete_command

    return delete_command(args)


def _get(args) -> int:
    from ..lab.kubectl import get_command

    return get_command(args)


def _probe(args) -> int:
    from ..lab.kubectl import probe_command

    return probe_command(args)


def _kubectl(args) -> int:
    from ..lab.kube.commands import kubectl_command

    return kubectl_command(args)


def _e2e(args) -> int:
    from ..lab.kube.commands import e2e_command

    return e2e_command(args)
