"""`pycnictl doctor`: check the node against pycni's invariant and say how to repair each
difference (pycni.doctor does the work; this is the command line around it)."""

from __future__ import annotations

import json

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
    from ..agent.client import agent_health
    from ..doctor import Report, examine, parse_live
    from ..doctor.status import agent_socket, default_data_dirs

    args.socket = agent_socket(args.socket, args.conf_dir)[0]

    live = None
    if args.live_from:
        try:
            with open(args.live_from) as f:
                live = parse_live(json.load(f))
        except (OSError, ValueError) as exc:
            return _cannot(args, Report(errors=[f"--live-from {args.live_from}: {exc}"]))
    data_dirs = args.data_dirs
    if not data_dirs:
        data_dirs = default_data_dirs(agent_health(args.socket)["health"], args.conf_dir)
    if args.rebuild_store:
        problem = _rebuild(args, data_dirs)
        if problem:
            return _cannot(args, Report(errors=[problem]))
    report = examine(data_dirs, live, args.socket)
    if args.json:
        print(json.dumps(report.to_json(), indent=2, sort_keys=True))
    else:
        print(render(report), end="")
    return 1 if report.findings else 2 if report.errors else 0


def _rebuild(args, data_dirs: list[str]) -> str | None:
    """Rebuild each data dir's store; what went wrong, or None. What was recorded and what
    was left alone is printed (on stderr with --json)."""
    import glob
    import os
    import sys

    from ..cni.errors import CniError
    from ..doctor.rebuild import RebuildError, confs_from_files, rebuild_store

    files = args.conf or sorted(
        f
        for f in glob.glob(os.path.join(args.conf_dir, "*"))
        if f.endswith((".conf", ".conflist", ".json"))
    )
    out = sys.stderr if args.json else sys.stdout
    for data_dir in data_dirs:
        try:
            confs = confs_from_files(files, data_dir)
            if not confs:
                return (
                    f"rebuild: no pycni network with dataDir {data_dir} in "
                    f"{', '.join(files) or 'no config file'}"
                )
            done = rebuild_store(data_dir, confs)
        except RebuildError as exc:
            return f"rebuild: {exc}"
        except CniError as exc:  # the new store or the packet rules
            return f"rebuild: {exc.msg}"
        for line in done.restored:
            print(f"restored: {line}", file=out)
        for line in done.skipped:
            print(f"left alone: {line}", file=out)
        print(
            f"rebuilt {os.path.join(data_dir, 'pycni.db')}: {len(done.restored)} "
            f"attachments restored, {len(done.skipped)} veths left alone",
            file=out,
        )
    return None


def _cannot(args, report) -> int:
    if args.json:
        print(json.dumps(report.to_json(), indent=2, sort_keys=True))
    else:
        print(render(report), end="")
    return 2


def render(report) -> str:
    out = [f"cannot check: {e}" for e in report.errors]
    out += [str(f) for f in report.findings]
    counts = (
        f"{report.attachments} attachment{'s' * (report.attachments != 1)}, "
        f"{report.addresses} address{'es' * (report.addresses != 1)}"
    )
    if report.findings:
        out.append(
            f"{len(report.findings)} finding{'s' * (len(report.findings) != 1)} ({counts} checked)"
        )
    elif not report.errors:
        out.append(f"ok: {counts}, rules and routes as desired")
    out += [f"note: {n}" for n in report.notes]
    return "\n".join(out) + "\n"
