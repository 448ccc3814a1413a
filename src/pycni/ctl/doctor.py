"""`pycnictl doctor`: check the node against pycni's invariant and say how to repair each
difference (pycni.doctor does the work; this is the command line around it)."""

from __future__ import annotations

from ..cni.netconf import DEFAULT_DATA_DIR
from ..node_config import DEFAULT_CONF_DIR
from ..shim import DEFAULT_SOCKET

_HELP = """\
Check this node (the network namespace the command runs in) against pycni's invariant: the
IPAM store's attachments and allocations, the host veths and pod interfaces in the kernel and
(with --live-from) the runtime's live attachments are the same set; no address is held twice,
none is outside its range or reserved; each network's bridge is up with its gateways; pycni's
packet rules are what the store asks for; with a cluster agent running, its routes, neighbours
and FDB entries are what its backend plans for the node list. Only reads; changes nothing.

Prints "ok: ..." or one line per finding: what, where, expected, found, and how to repair it.
Exit status 0 when everything holds, 1 when there are findings, 2 when something could not be
checked (and nothing was found)."""


def register(sub) -> None:
    p = sub.add_parser(
        "doctor",
        help="check store, kernel, rules and routes agree; say how to repair what does not",
        description=_HELP,
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
        help="the agent to ask for the cluster's node list and the node's subnet (default: "
        f"the agentSocket of the pycni config in --conf-dir, else {DEFAULT_SOCKET})",
    )
    p.add_argument(
        "--conf-dir",
        default=DEFAULT_CONF_DIR,
        help=f"the node's CNI config dir ({DEFAULT_CONF_DIR}): read for the agent's socket, "
        "and with --rebuild-store for the networks",
    )
    p.add_argument(
        "--live-from",
        metavar="FILE",
        help='JSON: the runtime\'s live attachments, a list of {"containerID", '
        '"ifname"} (or a CNI GC config holding cni.dev/valid-attachments)',
    )
    p.add_argument("--json", action="store_true", help="print one JSON object, for scripts")
    p.add_argument(
        "--rebuild-store",
        action="store_true",
        help="first record the pods found on the node in a new IPAM store, after a "
        'damaged one was moved aside (docs/operations.md: "When the IPAM store cannot be '
        'used"); never touches a store that holds attachments',
    )
    p.add_argument(
        "--conf",
        action="append",
        metavar="FILE",
        help="with --rebuild-store: a CNI config (.conf or .conflist) of the "
        "networks to rebuild (repeatable; default: those in --conf-dir)",
    )
    p.set_defaults(func=run_doctor)


def run_doctor(args) -> int:
    from ..doctor.command import run

    return run(args)
