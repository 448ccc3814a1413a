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


def _bounded(name: str, high: int):
    def parse(value: str) -> int:
        if not value.isdigit() or not 1 <= int(value) <= high:
            raise argparse.ArgumentTypeError(f"{value!r}: give a number of {name} from 1 to {high}")
        return int(value)

    return parse


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
        type=_bounded("pods", MAX_PODS),
        default=2,
        help=f"pods per node (1-{MAX_PODS}; 2)",
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
        "IPv4 one, and every path measured over both",
    )
    u.add_argument(
        "--svg",
        metavar="FILE",
        help="also draw the lab and its measured connectivity into FILE (SVG)",
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


def _up(args) -> int:
    from ..lab.commands import up

    return up(args)


def _down(args) -> int:
    from ..lab.commands import down

    return down(args)


def _draw(args) -> int:
    from ..lab.commands import draw

    return draw(args)
