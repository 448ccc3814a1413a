"""Putting the plugin where runtimes look for it (the seed system's manual set-up, done right).

The executable is a small launcher rather than a console-script wrapper: it runs Debian's
interpreter with -IS (no site import, no user paths; measured as the cheapest start-up) and puts
exactly pycni's and its dependencies' directories on sys.path.
"""

from __future__ import annotations

import json
import os
import sys

from ..node_config import CONFLIST_NAME, atomic_write, node_conflist

LAUNCHER = """#!{python} -IS
# pycni CNI plugin launcher, written by `pycnictl install`. Runtimes exec this file.
import sys
sys.path[:0] = {paths!r}
from pycni.shim import main
main()
"""


def launcher_text() -> str:
    import pyroute2

    import pycni

    paths = []
    for mod in (pycni, pyroute2):
        root = os.path.dirname(os.path.dirname(os.path.abspath(mod.__file__)))
        if root not in paths:
            paths.append(root)
    return LAUNCHER.format(python=sys.executable, paths=paths)


def write_launcher(path: str) -> str:
    atomic_write(path, launcher_text(), 0o755)
    return path


def register(sub) -> None:
    p = sub.add_parser("install", help="install the plugin (and optionally a network config)")
    p.add_argument("--bin-dir", default="/opt/cni/bin", help="where runtimes look for plugins")
    p.add_argument("--conf-dir", default="/etc/cni/net.d", help="where runtimes find configs")
    p.add_argument("--subnet", help="this node's pod CIDR; with it a config list is written")
    p.add_argument("--network", help="the cluster CIDR (never masqueraded)")
    p.add_argument("--name", default="pycni", help="network name")
    p.set_defaults(func=_install)


def _install(args) -> int:
    target = write_launcher(os.path.join(args.bin_dir, "pycni"))
    print(f"installed {target}")
    if args.subnet:
        conf = node_conflist(args.name, args.subnet, args.network)
        path = os.path.join(args.conf_dir, CONFLIST_NAME)
        atomic_write(path, json.dumps(conf, indent=2) + "\n", 0o644)
        print(f"wrote {path}")
    return 0
