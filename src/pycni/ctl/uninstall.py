"""`pycnictl uninstall`: the arguments; the work is pycni.install.uninstall's."""

from __future__ import annotations

import os

from ..cni.netconf import DEFAULT_DATA_DIR
from ..install.launchers import DEFAULT_BIN_DIR
from ..shim import DEFAULT_SOCKET
from .agent import cluster_options

DEFAULT_RUN_DIR = os.path.dirname(DEFAULT_SOCKET)


def register(sub) -> None:
    p = sub.add_parser(
        "uninstall",
        parents=[cluster_options()],
        help="remove everything pycni put on this node (stop the agent first)",
        description="Remove everything pycni put on this node: the executable, the config "
        "list, pods' veths and ifbs, the bridge, pycni's routes and VTEP, its packet rules and "
        "its state. Stop the agent first. With --datastore (and the agent's other cluster "
        "options; the cluster CIDR and node name default to subnet.env's) it also releases "
        "the node's subnet, as `pycnictl leave` does. Idempotent.",
    )
    p.add_argument("--bin-dir", default=DEFAULT_BIN_DIR, help="where the executable was installed")
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="the plugin's dataDir")
    p.add_argument(
        "--run-dir",
        default=DEFAULT_RUN_DIR,
        help=f"the agent's socket and subnet.env directory ({DEFAULT_RUN_DIR})",
    )
    # Explicit or not: release only when asked; node and subnets default to subnet.env's.
    p.set_defaults(func=run_uninstall, datastore=None, node_name=None, subnet_file=None)


def run_uninstall(args) -> int:
    from ..install import uninstall

    return uninstall.run_uninstall(args)
