"""`pycnictl lab up` / `lab down` end to end, beside any lab the user has up (own prefix and
state directory)."""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET

import pytest

from conftest import lab_namespaces, lab_pycnictl, private_lab, sh

pytestmark = pytest.mark.netns


pycnictl = lab_pycnictl


@pytest.fixture
def lab():
    with private_lab("lab") as made:
        yield made


def table_rows(out: str) -> list[list[str]]:
    rows = []
    for line in out.splitlines():
        words = line.split()
        if words and re.fullmatch(r"(pod|node)->(pod|outside)", words[0]):
            rows.append(words)
    return rows


def test_lab_up_measures_the_cluster_and_down_removes_everything(lab):
    """The README's main job: 3 nodes, 2 pods each, the full connectivity matrix."""
    prefix, state, opts = lab
    up = pycnictl("lab", "up", *opts)
    assert up.returncode == 0, up.stdout + up.stderr
    assert "all 54 paths OK" in up.stdout
    subnets = re.findall(
        rf"node(\d)\s+{prefix}-node\d\s+192\.0\.2\.\d\s+(10\.244\.\d+\.0/24)", up.stdout
    )
    assert len({s for _, s in subnets}) == 3, up.stdout
    for i in (1, 2, 3):
        for j in (1, 2):
            assert re.search(
                rf"n{i}pod{j}\s+node{i}\s+10\.244\.\d+\.\d+/24\s+\S+\s+"
                r"veth[0-9a-f]{11}",
                up.stdout,
            ), up.stdout
    rows = table_rows(up.stdout)
    assert len(rows) == 54
    kinds = [r[0] for r in rows]
    assert kinds.count("pod->pod") == 30 and kinds.count("pod->outside") == 6
    assert kinds.count("node->pod") == 18
    for r in rows:
        assert "OK" in r and "FAIL" not in r, r
    node_ip = {f"n{i}pod{j}": f"192.0.2.{i}" for i in (1, 2, 3) for j in (1, 2)}
    for r in rows:
        if r[0] == "pod->outside":
            assert node_ip[r[1]] in r and "masqueraded" in r, r
        if r[0] == "pod->pod":
            assert "pod address kept" in " ".join(r), r

    names = lab_namespaces(prefix)
    expected = [f"{prefix}-{n}" for n in ("router", "outside", "node1", "node2", "node3")]
    expected += [f"{prefix}-n{i}pod{j}" for i in (1, 2, 3) for j in (1, 2)]
    assert sorted(names) == sorted(expected)
    # The measuring servers are gone: nothing runs in the lab but each node's agent.
    for ns in names:
        pids = sh("ip", "netns", "pids", ns).stdout.split()
        if re.fullmatch(rf"{prefix}-node\d", ns):
            assert len(pids) == 1, pids
            with open(f"/proc/{pids[0]}/cmdline", "rb") as f:
                assert b"agent" in f.read().split(b"\0")
        else:
            assert pids == [], ns
    for i in (1, 2, 3):
        node = os.path.join(state, "nodes", f"node{i}")
        served = open(os.path.join(node, "agent.log")).read()
        assert served.count("ADD ") == 2, served
        # The plugin ran as a runtime runs it: results cached; forward and masquerade rules in
        # the node only.
        assert len(os.listdir(os.path.join(node, "results"))) == 2
        rules = sh(
            "ip", "netns", "exec", f"{prefix}-node{i}", "nft", "list", "table", "inet", "pycni"
        ).stdout
        assert "masquerade" in rules and "10.244.0.0/16" in rules and "forward" in rules

    # The underlay switch is a switch: its bridge runs no IP hooks, whatever br_netfilter
    # (loaded for kube-proxy and pycni's own bridge) sets for a new namespace.
    switch = sh(
        "ip", "netns", "exec", f"{prefix}-router", "sysctl", "-e", "net.bridge", check=False
    ).stdout
    for fam in ("iptables", "ip6tables", "arptables"):
        assert f"bridge-nf-call-{fam} = 1" not in switch, switch

    again = pycnictl("lab", "up", *opts)
    assert again.returncode == 1 and "already up" in again.stderr

    # The picture of the running lab: every node, subnet and pod, and a measured matrix.
    picture = os.path.join(os.path.dirname(state), "lab.svg")
    drawn = pycnictl("lab", "draw", "--svg", picture, *opts)
    assert drawn.returncode == 0 and "54 paths measured, 0 failed" in drawn.stdout, drawn.stderr
    svg = ET.parse(picture).getroot()
    texts = "\n".join(t.text or "" for t in svg.iter() if t.tag.endswith("text"))
    for i, subnet in subnets:
        assert f"node{i}" in texts and subnet in texts
        assert f"n{i}pod1" in texts and f"n{i}pod2" in texts
    cells = [e.get("fill") for e in svg.iter() if e.get("data-cell")]
    assert cells.count("#5aa95a") == 54 and "#d9534f" not in cells

    down = pycnictl("lab", "down", *opts)
    assert down.returncode == 0, down.stdout + down.stderr
    assert down.stdout.count("DEL ") == 6
    assert lab_namespaces(prefix) == []
    assert not os.path.exists(state)
    assert sh("pgrep", "-f", f"agent --socket {state}/", check=False).stdout == ""

    idle = pycnictl("lab", "down", *opts)
    assert idle.returncode == 0, idle.stdout + idle.stderr


def test_lab_with_two_underlays_mixes_host_gw_and_vxlan_over_etcd(lab):
    prefix, state, opts = lab
    up = pycnictl(
        "lab",
        "up",
        "--nodes",
        "3",
        "--pods",
        "1",
        "--backend",
        "auto",
        "--underlays",
        "2",
        "--datastore",
        "etcd",
        *opts,
    )
    assert up.returncode == 0, up.stdout + up.stderr
    assert "all 18 paths OK" in up.stdout
    assert "datastore etcd at http://192.0.2.254:2379" in up.stdout
    routes = sh("ip", "-n", f"{prefix}-node1", "route", "show", "proto", "120").stdout
    assert "dev pycni.1" in routes and "dev eth0" in routes, routes  # node2 is off-link
    down = pycnictl("lab", "down", *opts)
    assert down.returncode == 0, down.stdout + down.stderr
    assert lab_namespaces(prefix) == [] and not os.path.exists(state)


def test_lab_refuses_host_gw_across_a_router(lab):
    _prefix, _state, opts = lab
    up = pycnictl("lab", "up", "--backend", "host-gw", "--underlays", "2", *opts)
    assert up.returncode == 1 and "one L2 segment" in up.stderr


def test_lab_down_when_half_gone(lab):
    prefix, state, opts = lab
    up = pycnictl("lab", "up", "--nodes", "2", "--pods", "1", *opts)
    assert up.returncode == 0, up.stdout + up.stderr
    sh("ip", "netns", "del", f"{prefix}-n1pod1")
    down = pycnictl("lab", "down", *opts)
    assert down.returncode == 0, down.stdout + down.stderr
    assert lab_namespaces(prefix) == [] and not os.path.exists(state)

    # Namespaces left without any state (say the state dir was wiped) are found by name.
    sh("ip", "netns", "add", f"{prefix}-node1")
    down = pycnictl("lab", "down", *opts)
    assert down.returncode == 0, down.stdout + down.stderr
    assert lab_namespaces(prefix) == []
