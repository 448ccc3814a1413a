"""`pycnictl doctor` and pycni.doctor.check on real nodes: a sound node has no finding; each way
of breaking it by hand gives exactly one precise finding; the doctor changes nothing, never
hangs on a bogus netns, and exits 0 / 1 / 2.

Every doctor runs inside the node's namespace (it checks the namespace it runs in), with the
node's private dataDir and agent socket, never the machine's."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import sys
import tempfile
import time

import pytest

from conftest import pod_name, sh, tear_down_labs, unique
from pycni.dataplane.names import host_veth_name

pytestmark = pytest.mark.netns

PYCNICTL = [sys.executable, "-c", "from pycni.ctl.main import main; main()"]
CHECK = """
import json, sys
from pycni.doctor import check
live = None if sys.argv[2] == "-" else {tuple(p) for p in json.loads(sys.argv[2])}
print(json.dumps([f.to_json() for f in check(sys.argv[1], live)]))
"""


def data_dir(node) -> str:
    return os.path.join(node.root, "data")


def agent_socket(node) -> str:
    # AgentProcess's path: nothing listens there unless the test started an agent.
    return os.path.join(node.root, "agent", "agent.sock")


def doctor(node, *args: str, data: bool = True, timeout: float = 60) -> tuple[int, str, str]:
    """`pycnictl doctor ARGS` in the node: (exit status, stdout, stderr)."""
    argv = [*PYCNICTL, "doctor", "--socket", agent_socket(node), *args]
    if data:
        argv += ["--data-dir", data_dir(node)]
    proc = sh("ip", "netns", "exec", node.ns, *argv, check=False, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def doctor_json(node, *args: str) -> tuple[int, dict]:
    rc, out, err = doctor(node, "--json", *args)
    assert rc in (0, 1, 2), err
    return rc, json.loads(out)


def findings(node, live: set | None = None) -> list[dict]:
    """pycni.doctor.check in the node's namespace."""
    arg = "-" if live is None else json.dumps(sorted(live))
    proc = sh(
        "ip",
        "netns",
        "exec",
        node.ns,
        sys.executable,
        "-c",
        CHECK,
        data_dir(node),
        arg,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def only(node, kind: str) -> dict:
    """The one finding the node should now have, of `kind`; checks the CLI agrees."""
    found = findings(node)
    assert [f["kind"] for f in found] == [kind], found
    rc, report = doctor_json(node)
    assert rc == 1 and report["findings"] == found, report
    return found[0]


@pytest.fixture
def pods(node):
    """Three pods on a node with ipMasq (so pycni has packet rules): [(cid, netns path, ip)]."""
    node.base["ipMasq"] = True
    made = []
    for i in range(3):
        netns = node.pod()
        cid = f"c{i}{'0' * 20}"
        result = node.add(netns, cid)
        made.append((cid, netns, result["ips"][0]["address"].split("/")[0]))
    return made


@pytest.mark.parametrize("node", ["standalone", "agent"], indirect=True)
def test_a_sound_node_has_no_findings(node, pods):
    assert findings(node) == []
    rc, out, err = doctor(node)
    assert rc == 0, out + err
    assert out.splitlines()[0] == "ok: 3 attachments, 3 addresses, rules and routes as desired"
    rc, report = doctor_json(node)
    assert rc == 0 and report["ok"] and report["findings"] == [] and report["errors"] == []
    assert (report["attachments"], report["addresses"]) == (3, 3)
    # The same store named twice is one store.
    assert doctor(node, "--data-dir", data_dir(node) + "/")[0] == 0
    if node.base.get("agentSocket"):
        # Without --data-dir the agent's data dirs are checked; it runs no cluster side.
        rc, out, err = doctor(node, data=False)
        assert rc == 0 and "ok: 3 attachments" in out, out + err
        assert "runs no cluster side" in out
    else:
        assert "no agent answers" in out


def test_doctor_changes_nothing(node, pods):
    def content(name: str) -> bytes:
        # A reader may leave an empty WAL file behind (SQLite's coordination, no data).
        path = os.path.join(data_dir(node), name)
        return open(path, "rb").read() if os.path.exists(path) else b""

    def state() -> tuple:
        db = [hashlib.sha256(content(f)).hexdigest() for f in ("pycni.db", "pycni.db-wal")]
        return (
            db,
            node.exec("nft", "list", "ruleset").stdout,
            node.exec("ip", "link", "show").stdout,
            # A host veth's link-local address may finish DAD meanwhile: the kernel's doing.
            node.exec("ip", "addr", "show").stdout.replace(" tentative", ""),
        )

    # A broken node: the doctor must not repair or touch anything either.
    node.exec("ip", "link", "del", host_veth_name(node.name, pods[0][0], "eth0"))
    node.exec("nft", "delete", "table", "inet", "pycni")
    before = state()
    assert doctor(node)[0] == 1
    assert state() == before


def test_host_veth_deleted_by_hand(node, pods):
    cid = pods[1][0]
    veth = host_veth_name(node.name, cid, "eth0")
    node.exec("ip", "link", "del", veth)
    f = only(node, "host-veth-missing")
    assert cid in f["subject"] and veth in f["expected"] and "cni0" in f["expected"]
    assert f"no link {veth}" in f["actual"] and "eth0 is gone" in f["actual"]
    assert "DEL then ADD" in f["hint"]


def test_bridge_port_without_hairpin(node, pods):
    cid = pods[2][0]
    veth = host_veth_name(node.name, cid, "eth0")
    node.exec("ip", "link", "set", veth, "type", "bridge_slave", "hairpin", "off")
    f = only(node, "host-veth-no-hairpin")
    assert cid in f["subject"] and f"bridge port {veth} in hairpin mode" in f["expected"]
    assert f["actual"].startswith("hairpin off: the pod cannot reach itself through a Service")
    assert f["hint"].startswith(f"bridge link set dev {veth} hairpin on")
    node.exec("bridge", "link", "set", "dev", veth, "hairpin", "on")  # the repair it names
    assert findings(node) == []


def test_orphan_veth_with_a_pycni_alias(node, pods):
    node.exec("ip", "link", "add", "vethorphan0", "type", "veth", "peer", "name", "vethorphan1")
    node.exec("ip", "link", "set", "vethorphan0", "alias", f"pycni {node.name} ghost99 eth0")
    f = only(node, "orphan-veth")
    assert f["subject"] == "veth vethorphan0"
    assert "ghost99" in f["actual"] and "ip link del vethorphan0" in f["hint"]
    assert "DEL for container ghost99" in f["hint"]


def test_pod_netns_deleted_without_del(node, pods):
    cid, netns, _ = pods[2]
    sh("ip", "netns", "del", pod_name(netns))
    f = only(node, "stale-attachment")
    assert cid in f["subject"] and f"netns {netns} does not exist" in f["actual"]
    assert f"DEL for container {cid}" in f["hint"]


def test_a_bogus_netns_path_is_a_finding_not_a_hang(node, pods, tmp_path):
    """The store says the pod's netns is a FIFO (opening one blocks until a writer comes)."""
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    cid = pods[0][0]
    with sqlite3.connect(os.path.join(data_dir(node), "pycni.db")) as conn:
        conn.execute("UPDATE attachments SET netns = ? WHERE container_id = ?", (fifo, cid))
    started = time.monotonic()
    f = only(node, "stale-attachment")
    assert time.monotonic() - started < 30
    assert f"{fifo} is not a network namespace" in f["actual"]
    assert "host veth" in f["actual"] and "still there" in f["actual"]


def _insert_allocation(
    node, cid: str, ip: str, gateway: str | None, attachment: int | None = None
) -> None:
    with sqlite3.connect(os.path.join(data_dir(node), "pycni.db")) as conn:
        att_id, range_set = conn.execute(
            "SELECT at.id, al.range_set FROM attachments at JOIN allocations al"
            " ON al.attachment_id = at.id WHERE at.container_id = ?",
            (cid,),
        ).fetchone()
        conn.execute(
            "INSERT INTO allocations (attachment_id, seq, network, ip, prefixlen,"
            " gateway, range_set) VALUES (?, 1, ?, ?, 24, ?, ?)",
            (attachment or att_id, node.name, ip, gateway, range_set),
        )


def test_out_of_range_allocation_in_sqlite(node, pods):
    cid = pods[0][0]
    _insert_allocation(node, cid, "10.99.0.7", None)
    f = only(node, "allocation-out-of-range")
    assert "10.99.0.7/24" in f["subject"] and cid in f["subject"]
    assert "outside its range set 10.244.1.0/24" in f["actual"]


def test_gateway_allocated_in_sqlite(node, pods):
    _insert_allocation(node, pods[1][0], "10.244.1.1", "10.244.1.1")
    f = only(node, "allocation-reserved")
    assert f["actual"] == "10.244.1.1 is the gateway of 10.244.1.0/24"


def test_allocation_without_attachment_in_sqlite(node, pods):
    _insert_allocation(node, pods[0][0], "10.244.1.77", "10.244.1.1", attachment=999)
    f = only(node, "orphan-allocation")
    assert "10.244.1.77/24" in f["subject"] and "attachment row 999" in f["actual"]
    rc, report = doctor_json(node)
    assert report["addresses"] == 3  # an orphan row is nobody's address


def test_two_networks_sharing_a_subnet_hold_one_address_twice(node, pods):
    """SQLite keeps addresses unique per network; two networks with the same subnet on one
    node (a misconfiguration) are how one address ends up held twice."""
    netns = node.pod()
    node.add(netns, "other0", conf=node.conf(name="othernet", bridge="cni1"))
    f = only(node, "duplicate-address")
    assert f["subject"] == f"address {pods[0][2]}"
    assert "2 holders" in f["actual"] and "othernet" in f["actual"] and pods[0][0] in f["actual"]


def test_nft_table_deleted(node, pods):
    node.exec("nft", "delete", "table", "inet", "pycni")
    f = only(node, "rules-missing")
    assert f["subject"] == "nftables table inet pycni" and f["actual"] == "absent"
    assert "masquerade ip saddr 10.244.1.0/24" in f["expected"]


def test_masquerade_rule_changed_by_hand(node, pods):
    """One rule that differs is one finding naming both versions."""
    node.exec("nft", "flush", "chain", "inet", "pycni", "postrouting")
    node.exec(
        "nft",
        "add",
        "rule",
        "inet",
        "pycni",
        "postrouting",
        "ip",
        "saddr",
        "10.244.1.0/24",
        "ip",
        "daddr",
        "!=",
        "{ 10.244.1.0/24, 224.0.0.0/4 }",
        "masquerade",
    )
    f = only(node, "rule-differs")
    assert "10.244.0.0/16" in f["expected"] and "10.244.0.0/16" not in f["actual"]


def test_bridge_address_deleted(node, pods):
    node.exec("ip", "addr", "del", "10.244.1.1/24", "dev", "cni0")
    f = only(node, "bridge-gateway-missing")
    assert f["subject"] == f"bridge cni0 (network {node.name})"
    assert f["expected"] == "gateway address 10.244.1.1/24"
    assert "ip addr add 10.244.1.1/24 dev cni0" in f["hint"]


def test_the_runtimes_view(node, pods, tmp_path):
    (c0, _, _), (c1, _, _), (c2, _, _) = pods
    live = {(c0, "eth0"), (c1, "eth0"), ("ghost", "eth0")}
    found = findings(node, live)
    assert sorted((f["kind"], f["subject"]) for f in found) == [
        ("missing-in-store", "container ghost eth0"),
        ("unknown-to-runtime", f"network {node.name}, container {c2} eth0"),
    ]
    # The same through the CLI, from CNI GC's format.
    path = tmp_path / "live.json"
    path.write_text(
        json.dumps(
            {
                "cni.dev/valid-attachments": [
                    {"containerID": c, "ifname": i} for c, i in sorted(live)
                ]
            }
        )
    )
    rc, report = doctor_json(node, "--live-from", str(path))
    assert rc == 1 and report["findings"] == found
    path.write_text(json.dumps([[c, "eth0"] for c, _, _ in pods]))
    assert doctor_json(node, "--live-from", str(path))[0] == 0


def test_exit_status_two_when_it_cannot_check(node, pods, tmp_path):
    bad = tmp_path / "live.json"
    bad.write_text('{"not": "a list"}')
    rc, report = doctor_json(node, "--live-from", str(bad))
    assert rc == 2 and report["errors"] and not report["ok"]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "pycni.db").write_bytes(b"this is not a database" * 100)
    rc, out, err = doctor(node, "--data-dir", str(broken), data=False)
    # Nothing is called an orphan: the pods' veths may be the unreadable store's.
    assert rc == 2 and out.startswith(f"cannot check: cannot read the IPAM database {broken}")
    assert "orphan" not in out
    # A data dir never used is no error: nothing to check there.
    rc, out, _ = doctor(node, "--data-dir", str(tmp_path / "unused"), data=False)
    assert rc == 1  # the pods' veths are then orphans of a store not given
    assert "orphan-veth" in out


def test_text_output_is_one_line_per_finding(node, pods):
    node.exec("ip", "addr", "del", "10.244.1.1/24", "dev", "cni0")
    node.exec("ip", "link", "set", host_veth_name(node.name, pods[0][0], "eth0"), "down")
    rc, out, _ = doctor(node)
    lines = out.splitlines()
    assert rc == 1
    assert lines[0].startswith("host-veth-down: network ")
    assert "expected " in lines[0] and "; found down; repair: ip link set " in lines[0]
    assert lines[1].startswith("bridge-gateway-missing: bridge cni0")
    assert lines[2] == "2 findings (3 attachments, 3 addresses checked)"


# --- the cluster side, on a lab ------------------------------------------------------------


@pytest.mark.parametrize(
    ("backend", "ipv6"), [("vxlan", True), ("host-gw", False)], ids=["vxlan-dual-stack", "host-gw"]
)
def test_a_lab_node_is_sound_and_route_drift_is_found(make_lab, backend, ipv6):
    lab = make_lab(backend, nodes=2, pods=1, ipv6=ipv6)
    a, b = lab.nodes
    argv = [*PYCNICTL, "doctor", "--socket", a.agent_socket, "--data-dir", a.data_dir, "--json"]

    def report() -> dict:
        proc = sh("ip", "netns", "exec", a.netns, *argv, check=False, timeout=60)
        assert proc.returncode in (0, 1) and not proc.stderr, proc.stdout + proc.stderr
        return json.loads(proc.stdout)

    clean = report()
    assert clean["ok"] and clean["findings"] == [] and clean["notes"] == [], clean
    assert (clean["attachments"], clean["addresses"]) == (1, 2 if ipv6 else 1)

    def drift(*command: str) -> list[dict]:
        """Break something the agent repairs within its resync (5 s in a lab): try until the
        doctor looks before the agent does."""
        for _ in range(5):
            sh("ip", "-n", a.netns, *command, check=False)
            found = report()["findings"]
            if found:
                return found
        return []

    found = drift("route", "del", b.subnet, "proto", "120")
    assert [f["kind"] for f in found] == ["route-missing"], found
    assert found[0]["expected"].startswith(f"route {b.subnet} via ")
    assert found[0]["subject"] == f"node node1 ({backend})"
    if backend == "vxlan":
        # Its routes, neighbours and FDB entries go with it: one finding.
        found = drift("link", "del", "pycni.1")
        assert [f["kind"] for f in found] == ["vtep-missing"], found


@pytest.fixture
def make_lab():
    """make_lab(backend, nodes, pods, ipv6) -> a running Lab, torn down whatever happens."""
    from pycni.lab import lifecycle
    from pycni.lab.model import Lab

    made: list[tuple[str, str]] = []

    def make(backend: str, nodes: int, pods: int, ipv6: bool = False) -> Lab:
        state = tempfile.mkdtemp(prefix="pydr", dir="/tmp")  # short: unix socket paths
        lab = Lab.plan(unique("d"), state, nodes, pods, backend=backend, ipv6=ipv6)
        made.append((lab.prefix, state))
        lifecycle.bring_up(lab)
        return lab

    yield make
    tear_down_labs(made)


def test_hostports_and_shaping(node):
    """hostPort DNATs are part of the rules the store wants; an ifb with pycni's alias that no
    attachment owns is an orphan, the one an attachment owns is not."""
    node.base["ipMasq"] = True
    mapping = {"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}
    shaping = {"ingressRate": 8_000_000, "egressRate": 8_000_000}
    node.add(
        node.pod(),
        "shaped0",
        node.conf(runtimeConfig={"portMappings": [mapping], "bandwidth": shaping}),
    )
    assert findings(node) == []
    node.exec("ip", "link", "add", "ifbghost", "type", "ifb")
    node.exec("ip", "link", "set", "ifbghost", "alias", f"pycni-ifb {node.name} ghost eth0")
    assert only(node, "orphan-ifb")["subject"] == "ifb ifbghost"
    node.exec("ip", "link", "del", "ifbghost")
    node.exec("nft", "flush", "chain", "inet", "pycni", "hostports")
    f = only(node, "rule-missing")
    assert f["subject"] == "hostports rule in nftables table inet pycni"
    assert f["expected"] == "hostPort tcp any address port 8080 -> 10.244.1.2 port 80"
