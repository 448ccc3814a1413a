"""`pycnictl lab e2e`: the upstream e2e binary (`./dev kube`'s e2e.test) against the lab.

It runs in the control plane's namespace (the only one reaching the apiserver), provider
local, the lab's admin kubeconfig and the built kubectl. Always skipped: SCTP (this kernel has
no SCTP sockets: each such spec would wait 300 s). Skipped unless asked: [Serial] and
[Disruptive] specs (they reboot or restart nodes over SSH, or need the whole cluster to
themselves; the lab's nodes have no SSH and its kubelets are not services to restart),
[Flaky], and [Slow] unless --include-slow. The whole ginkgo output goes to a log under
<state>/e2e/; ginkgo's own summary lines are printed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

from ...harness.kube import binary
from ..model import Lab
from . import controlplane as cp

ALWAYS_SKIP = r"SCTP|Feature:SCTPConnectivity"
DEFAULT_SKIP = r"\[Serial\]|\[Disruptive\]|\[Flaky\]"
SLOW = r"\[Slow\]"
SUMMARY = re.compile(
    r"^\s*(Ran \d+ of \d+ Specs|SUCCESS!|FAIL!|Summarizing \d+ Failure|\[FAIL\]|\[PANICKED\]"
    r"|\[TIMEDOUT\]|Test Suite (Passed|Failed))"
)
RAN = re.compile(r"Ran (\d+) of (\d+) Specs")


def skip_regex(skip: str | None, include_slow: bool) -> str:
    parts = [ALWAYS_SKIP, DEFAULT_SKIP] + ([] if include_slow else [SLOW])
    if skip:
        parts.append(skip)
    return "|".join(parts)


def run_e2e(
    lab: Lab, focus: str | None, skip: str | None, include_slow: bool, extra: list[str]
) -> int:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    report = os.path.join(lab.state_dir, "e2e", stamp)
    os.makedirs(report, exist_ok=True)
    log = os.path.join(report, "e2e.log")
    e2e = cp.in_cp_netns(lab, binary("e2e.test"))
    argv = e2e + [
        "--provider=local",
        f"--kubeconfig={cp.admin_kubeconfig(lab)}",
        f"--kubectl-path={binary('kubectl')}",
        f"--report-dir={report}",
        f"--ginkgo.junit-report={os.path.join(report, 'junit.xml')}",
        f"--ginkgo.skip={skip_regex(skip, include_slow)}",
        "--ginkgo.no-color",
        "--disable-log-dump",
        *extra,
    ]  # fmt: skip
    if focus:
        argv.append(f"--ginkgo.focus={focus}")
    print(f"e2e: {' '.join(argv[len(e2e) :])}")
    print(f"e2e: whole output in {log}")
    ran = None
    started = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, "KUBECONFIG": cp.admin_kubeconfig(lab)},
        )
        assert proc.stdout is not None
        pending = b""
        # Read as it comes: ginkgo marks each finished spec with a dot and no newline, so a
        # line-by-line reader would leave the log empty for the whole run.
        while chunk := os.read(proc.stdout.fileno(), 65536):
            out.write(chunk)
            out.flush()
            *lines, pending = (pending + chunk).split(b"\n")
            for raw in lines:
                line = raw.decode(errors="replace")
                if SUMMARY.match(line):
                    print(line.rstrip(), flush=True)
                m = RAN.search(line)
                if m:
                    ran = int(m.group(1))
        rc = proc.wait()
    print(f"e2e: exit {rc} after {time.monotonic() - started:.0f} s; JUnit report "
          f"{os.path.join(report, 'junit.xml')}")  # fmt: skip
    if ran == 0:
        print("e2e: no spec ran (check --focus)", file=sys.stderr)
        return 1
    return 1 if rc != 0 or ran is None else 0
