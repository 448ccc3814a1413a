"""`pycnictl doctor`: check the node against pycni's invariant and say how to repair each
difference (pycni.doctor does the work; this is the command line around it)."""

from __future__ import annotations

import json

from ..cni.netconf import DEFAULT_DATA_DIR
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
    p = sub.add_parser("doctor", help="check store, kernel, rules and routes agree; say how to "
                       "repair what does not", description=_HELP)
    p.add_argument("--data-dir", action="append", dest="data_dirs", metavar="DIR",
                   help="the plugin's dataDir (repeatable; default: the running agent's data "
                   f"dirs, else {DEFAULT_DATA_DIR})")
    p.add_argument("--socket", default=DEFAULT_SOCKET,
                   help=f"the agent to ask for the cluster's node list (default {DEFAULT_SOCKET})")
    p.add_argument("--live-from", metavar="FILE",
                   help="JSON: the runtime's live attachments, a list of {\"containerID\", "
                   "\"ifname\"} (or a CNI GC config holding cni.dev/valid-attachments)")
    p.add_argument("--json", action="store_true", help="print one JSON object, for scripts")
    p.set_defaults(func=run_doctor)


def run_doctor(args) -> int:
    from ..doctor import Report, examine, parse_live
    from .status import agent_health

    live = None
    if args.live_from:
        try:
            with open(args.live_from) as f:
                live = parse_live(json.load(f))
        except (OSError, ValueError) as exc:
            return _cannot(args, Report(errors=[f"--live-from {args.live_from}: {exc}"]))
    data_dirs = args.data_dirs
    if not data_dirs:
        health = agent_health(args.socket)["health"] or {}
        data_dirs = health.get("dataDirs") or [DEFAULT_DATA_DIR]
    report = examine(data_dirs, live, args.socket)
    if args.json:
        print(json.dumps(report.to_json(), indent=2, sort_keys=True))
    else:
        print(render(report), end="")
    return 1 if report.findings else 2 if report.errors else 0


def _cannot(args, report) -> int:
    if args.json:
        print(json.dumps(report.to_json(), indent=2, sort_keys=True))
    else:
        print(render(report), end="")
    return 2


def render(report) -> str:
    out = [f"cannot check: {e}" for e in report.errors]
    out += [str(f) for f in report.findings]
    counts = (f"{report.attachments} attachment{'s' * (report.attachments != 1)}, "
              f"{report.addresses} address{'es' * (report.addresses != 1)}")
    if report.findings:
        out.append(f"{len(report.findings)} finding{'s' * (len(report.findings) != 1)} "
                   f"({counts} checked)")
    elif not report.errors:
        out.append(f"ok: {counts}, rules and routes as desired")
    out += [f"note: {n}" for n in report.notes]
    return "\n".join(out) + "\n"
