"""`pycnictl install` on this node: the plugin executable into the bin dir and, given a subnet,
the node's config list into the conf dir. Idempotent; refuses to overwrite files pycni did not
write.

The executable is the native one (pycni.install.native) wherever a C compiler is found: it
forwards to the agent without Python's start-up, which is most of a pod's CNI latency. The
Python launcher is the fallback, chosen with --python or when there is no compiler, and the
output says which was written and why."""

from __future__ import annotations

import ipaddress
import json
import os
import sys

from ..node_config import CONFLIST_NAME, node_conflist
from .launchers import (
    PLUGIN_NAME,
    configs_before,
    is_pycni_conflist,
    is_pycni_launcher,
    launcher_text,
    refuse,
    standalone_text,
    write_owned,
)
from .native import install_native


def install(args) -> int:
    """`pycnictl install` with its parsed arguments."""
    if (args.network or args.data_dir) and not args.subnet:
        refuse(
            "--network and --data-dir need --subnet (they go into the config list, which "
            "is written only with --subnet)"
        )
    if sum(bool(x) for x in (args.native, args.native_from, args.python)) > 1:
        refuse(
            "give one of --native (compile here), --native-from (copy a build) and --python "
            "(the Python launcher)"
        )
    conf = conflist(args) if args.subnet else None
    target = os.path.join(args.bin_dir, PLUGIN_NAME)
    kind = executable_kind(args)
    if kind == "native":
        install_native(args.bin_dir, target, args.standalone, args.native_from, args.force)
    else:
        text = standalone_text() if args.standalone else launcher_text()
        write_owned(target, text, 0o755, args.force, is_pycni_launcher, "executable")
        why = "as --python asks" if args.python else f"no C compiler found ({NO_CC_HINT})"
        print(
            f"{target} is the {'standalone ' if args.standalone else ''}Python launcher, "
            f"{why}: every call pays Python's start-up, which the native executable does not"
        )
    if getattr(args, "fast_path_dir", None):
        from ..dataplane.fastpath import FastPathError, build

        try:
            print(f"fast path: {build(args.fast_path_dir)}")
        except FastPathError as exc:
            refuse(f"the eBPF fast path: {exc}")
    if conf is not None:
        path = os.path.join(args.conf_dir, CONFLIST_NAME)
        write_owned(
            path,
            json.dumps(conf, indent=2) + "\n",
            0o644,
            args.force,
            is_pycni_conflist,
            "config list",
        )
        for earlier in configs_before(args.conf_dir, CONFLIST_NAME):
            print(
                f"note: {os.path.join(args.conf_dir, earlier)} sorts before {CONFLIST_NAME}: "
                "runtimes use the first config by name, so they will use that one",
                file=sys.stderr,
            )
    return 0


NO_CC_HINT = "apt-get install gcc, then run pycnictl install again for the native executable"


def executable_kind(args) -> str:
    """ "native" or "python": native unless asked for Python or no C compiler is found."""
    if args.native or args.native_from:
        return "native"
    if args.python:
        return "python"
    from ..native.build import compiler

    return "native" if compiler() is not None else "python"


def conflist(args) -> dict:
    """The config list from the options, validated by the plugin's own config parser."""
    from ..cni.env import Request
    from ..cni.errors import CniError
    from ..cni.netconf import DEFAULT_DATA_DIR, parse

    extra = {}
    if args.data_dir and args.data_dir != DEFAULT_DATA_DIR:
        extra["dataDir"] = args.data_dir
    conf = node_conflist(args.name, args.subnet, args.network, **extra)
    entry = {"cniVersion": conf["cniVersion"], "name": conf["name"], **conf["plugins"][0]}
    try:
        parse(entry, Request("ADD"))
    except CniError as exc:
        refuse(exc.msg)
    if args.network:
        subnet = ipaddress.ip_network(args.subnet)
        network = ipaddress.ip_network(args.network)
        if subnet.version != network.version or not subnet.subnet_of(network):
            refuse(
                f"--subnet {subnet} is not inside --network {network} (the node's pod "
                "CIDR is a part of the cluster CIDR)"
            )
    return conf
