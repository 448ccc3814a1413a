"""`pycnictl status`: the arguments; the report is pycni.doctor.status's."""

from __future__ import annotations

import json

from ..cni.netconf import DEFAULT_DATA_DIR
from ..node_config import DEFAULT_CONF_DIR
from ..shim import DEFAULT_SOCKET

_HELP = """\
Show the node agent's health and, for every network in the IPAM store: the bridge, the pools
and their usage, and each pod's addresses, host veth and netns, checking each against the
kernel of the current network namespace.

Exit status 0 when healthy, 1 when something is off: the store cannot be read, a network's
bridge is missing or down while it has pods, a pod's host veth or netns is gone (drift), or the
masquerade rules the store asks for are not installed, the cluster agent says this node is
not ready (no subnet, or the node is missing from the datastore), or a pod holds an address
outside the node's current subnet. The agent is asked at --socket, else at the agentSocket the
node's pycni config in --conf-dir names (the cluster agent writes its own there), else at the
default socket. The agent is optional (the plugin runs in-process without one), so an agent
that is not running counts as off only when --socket or the config named it."""


def register(sub) -> None:
    p = sub.add_parser(
        "status", help="show the agent, networks, pools and pods; flag drift", description=_HELP
    )
    p.add_argument(
        "--data-dir",
        action="append",
        dest="data_dirs",
        metavar="DIR",
        help="the plugin's dataDir (repeatable; default: the running agent's data "
        f"dirs, else the one the pycni config in --conf-dir names, else {DEFAULT_DATA_DIR})",
    )
    p.add_argument(
        "--socket",
        default=None,
        help="the agent's socket (default: the agentSocket of the pycni config in "
        f"--conf-dir, else {DEFAULT_SOCKET}); naming it makes a missing agent a problem",
    )
    p.add_argument(
        "--conf-dir",
        default=DEFAULT_CONF_DIR,
        help=f"the node's CNI config dir, read for the agent's socket ({DEFAULT_CONF_DIR})",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object, for scripts")
    p.set_defaults(func=run_status)


def run_status(args) -> int:
    from ..doctor.status import collect, render

    report = collect(args.data_dirs, args.socket, args.conf_dir)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print(render(report), end="")
    return 0 if report["healthy"] else 1
