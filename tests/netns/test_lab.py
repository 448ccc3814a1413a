"""`pycnictl lab up` / `lab down` end to end, beside any lab the user has up (own prefix and
state directory)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import RUN_ID, sh

pytestmark = pytest.mark.netns


def pycnictl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "from pycni.ctl.main import main; main()", *args],
        capture_output=True, text=True, timeout=120,
    )


def lab_namespaces(prefix: str) -> list[str]:
    out = sh("ip", "netns", "list").stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(prefix + "-")]


@pytest.fixture
def lab(tmp_path):
    prefix = f"pt{RUN_ID}lab"
    state = str(tmp_path / "lab")
    opts = ("--prefix", prefix, "--state-dir", state)
    try:
        yield prefix, state, opts
    finally:
        pycnictl("lab", "down", *opts)
        for ns in lab_namespaces(prefix):  # only if down itself is broken
            sh("ip", "netns", "del", ns, check=False)


def table_rows(out: str) -> list[list[str]]:
    rows = []
    for line in out.splitlines():
        words = line.split()
        if words and re.fullmatch(r"(pod|node)->(pod|gateway|outside)", words[0]):
            rows.append(words)
    return rows


@pytest.mark.parametrize("agent", [True, False], ids=["agent", "in-process"])
def test_lab_up_measures_and_down_removes_everything(lab, agent):
    prefix, state, opts = lab
    up = pycnictl("lab", "up", "--pods", "3", *opts, *([] if agent else ["--no-agent"]))
    assert up.returncode == 0, up.stdout + up.stderr
    assert "all 15 paths OK" in up.stdout
    for i, addr in enumerate(("10.244.1.2/24", "10.244.1.3/24", "10.244.1.4/24"), 1):
        assert re.search(rf"{prefix}-pod{i}\s+{re.escape(addr)}\s+\S+\s+veth[0-9a-f]{{11}}",
                         up.stdout), up.stdout
    rows = table_rows(up.stdout)
    assert len(rows) == 15
    kinds = [r[0] for r in rows]
    assert kinds.count("pod->pod") == 6 and kinds.count("pod->outside") == 3
    for r in rows:
        # PATH FROM TO ADDR ICMP ms TCP ms SEEN [note]
        assert r[4] == "OK" and r[6] == "OK", r
    for r in rows:
        if r[0] == "pod->outside":
            assert r[8] == "192.0.2.1" and "masqueraded" in r, r
        if r[0] == "pod->pod":
            src = {"pod1": "10.244.1.2", "pod2": "10.244.1.3", "pod3": "10.244.1.4"}[r[1]]
            assert r[8] == src, r

    names = lab_namespaces(prefix)
    assert sorted(names) == sorted(
        [f"{prefix}-node1", f"{prefix}-outside"] + [f"{prefix}-pod{i}" for i in (1, 2, 3)])
    # The measuring servers are gone: nothing runs in any lab namespace but the node's agent,
    # which served every ADD.
    for ns in names:
        pids = sh("ip", "netns", "pids", ns).stdout.split()
        if agent and ns == f"{prefix}-node1":
            assert len(pids) == 1, pids
            with open(f"/proc/{pids[0]}/cmdline", "rb") as f:
                assert b"agent" in f.read().split(b"\0")
        else:
            assert pids == [], ns
    served = open(os.path.join(state, "agent.log" if agent else "pycni.log")).read()
    assert served.count("ADD ") == 3, served
    # The plugin ran as a runtime runs it: results cached, masquerade in the node only.
    assert len(os.listdir(os.path.join(state, "results"))) == 3
    assert "masquerade" in sh("ip", "netns", "exec", f"{prefix}-node1",
                              "nft", "list", "table", "inet", "pycni").stdout

    again = pycnictl("lab", "up", *opts)
    assert again.returncode == 1 and "already up" in again.stderr

    down = pycnictl("lab", "down", *opts)
    assert down.returncode == 0, down.stdout + down.stderr
    assert down.stdout.count("DEL ") == 3
    assert lab_namespaces(prefix) == []
    assert not os.path.exists(state)
    assert sh("pgrep", "-f", f"agent --socket {state}/", check=False).stdout == ""

    idle = pycnictl("lab", "down", *opts)
    assert idle.returncode == 0, idle.stdout + idle.stderr


def test_lab_down_when_half_gone(lab):
    prefix, state, opts = lab
    up = pycnictl("lab", "up", "--pods", "2", *opts)
    assert up.returncode == 0, up.stdout + up.stderr
    sh("ip", "netns", "del", f"{prefix}-pod1")
    down = pycnictl("lab", "down", *opts)
    assert down.returncode == 0, down.stdout + down.stderr
    assert lab_namespaces(prefix) == [] and not os.path.exists(state)

    # Namespaces left without any state (say the state dir was wiped) are found by name.
    sh("ip", "netns", "add", f"{prefix}-node1")
    down = pycnictl("lab", "down", *opts)
    assert down.returncode == 0, down.stdout + down.stderr
    assert lab_namespaces(prefix) == []
