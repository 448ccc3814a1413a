"""`pycnictl doctor` as it runs: find the agent and the data dirs, rebuild a store when asked,
examine the node, print the findings (text or JSON) and say by the exit status what was found.
The arguments are pycni.ctl.doctor's."""

from __future__ import annotations

import json


def run(args) -> int:
    """`pycnictl doctor` with its parsed arguments."""
    from ..agent.client import agent_health
    from . import Report, examine, parse_live
    from .status import agent_socket, default_data_dirs

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
    from .rebuild import RebuildError, confs_from_files, rebuild_store

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
