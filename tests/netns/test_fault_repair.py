"""The world changes under pycni: the pod's netns disappears in the middle of its ADD, someone
deletes the bridge between two pods, someone deletes or edits pycni's nftables table. ADD fails
cleanly or the node repairs itself, and the doctor says precisely what is wrong meanwhile.

A route of the cluster backend (proto 120) deleted by someone is put back by the agent's
periodic reconcile: tests/netns/test_cluster.py::test_periodic_reconcile_repairs_what_someone_
removed (and test_doctor.py's lab test shows the doctor reporting it first)."""

from __future__ import annotations

import errno
import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import TEST_FAULTS, DoctorProcess, Node, Reply, pod_name, sh
from pycni.agent.server import REPAIR_EVERY
from pycni.cni.env import PAUSE_AT_ENV
from pycni.dataplane.names import host_veth_name

pytestmark = pytest.mark.netns

MODES = ["standalone", "agent"]


def ok(reply: Reply) -> dict | None:
    assert reply.rc == 0, reply
    return reply.out


def address(result: dict) -> str:
    return result["ips"][0]["address"].split("/")[0]


def ping(node: Node, pod: str, target: str) -> None:
    res = node.spaces.exec(pod_name(pod), "ping", "-c1", "-W2", target, check=False)
    assert res.returncode == 0, f"ping {target} from {pod} failed: {res.stdout}{res.stderr}"


def open_writer(fifo: str, waiting, timeout: float = 30) -> int:
    """Open the FIFO for writing once the paused call holds it open for reading (that is the
    rendezvous: the call is now waiting at its checkpoint)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # ENXIO: no reader yet
                raise
        assert not waiting.done(), f"the call never paused: {waiting.result()}"
        assert time.monotonic() < deadline, "the call never reached its checkpoint"
        time.sleep(0.01)


# --- the pod's netns disappears in the middle of its ADD -------------------------------------


@pytest.mark.parametrize("node", MODES, indirect=True)
@pytest.mark.parametrize("step", ["ipam", "veth", "masquerade"])
def test_netns_deleted_in_the_middle_of_add(node, step, tmp_path):
    """The call holds the netns open, so the kernel keeps it until the call ends, and the
    interface made in it would vanish then. ADD says so and leaves nothing, no DEL needed."""
    node.base["ipMasq"] = True
    keeper = ("keeper", "eth0")
    ok(node.run("ADD", container_id=keeper[0], netns=node.pod("k")))
    fifo = str(tmp_path / "pause")
    os.mkfifo(fifo)
    pod = node.pod("v")
    mapping = {"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}
    conf = node.conf(runtimeConfig={"portMappings": [mapping]})
    with DoctorProcess(node) as doctor, ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(
            node.run,
            "ADD",
            conf,
            container_id="vanish",
            netns=pod,
            env={**TEST_FAULTS, PAUSE_AT_ENV: f"{step}:{fifo}"},
        )
        fd = open_writer(fifo, waiting)
        try:
            sh("ip", "netns", "del", pod_name(pod))
        finally:
            os.close(fd)  # the call goes on
        reply = waiting.result(timeout=60)
        assert reply.rc == 1 and reply.code == 3, reply
        assert reply.out["msg"] == f"network namespace {pod} disappeared during ADD", reply
        assert doctor.check({keeper}) == []
        # The runtime's DEL of the failed sandbox finds nothing to do.
        ok(node.run("DEL", conf, container_id="vanish", netns=pod))
        assert doctor.check({keeper}) == []
    assert "vanish" not in node.exec("nft", "list", "table", "inet", "pycni").stdout
    assert "8080" not in node.exec("nft", "list", "table", "inet", "pycni").stdout


# --- the bridge deleted by someone else ------------------------------------------------------


@pytest.fixture
def two_pods(node):
    """Two pods on a node with ipMasq, the first with a hostPort: [(cid, netns, address)]."""
    node.base["ipMasq"] = True
    mapping = {"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}
    made = []
    for cid, conf in (("a", node.conf(runtimeConfig={"portMappings": [mapping]})), ("b", None)):
        pod = node.pod(cid)
        made.append((cid, pod, address(ok(node.run("ADD", conf, container_id=cid, netns=pod)))))
    return made


def bridge_ports(node: Node) -> set[str]:
    out = node.exec("ip", "-o", "link", "show", "master", "cni0").stdout
    return {line.split(": ")[1].split("@")[0] for line in out.splitlines()}


def route_localnet(node: Node) -> str:
    return node.exec("cat", "/proc/sys/net/ipv4/conf/cni0/route_localnet").stdout.strip()


def assert_repaired(node: Node, doctor: DoctorProcess, pods: list) -> None:
    live = {(cid, "eth0") for cid, _, _ in pods}
    assert doctor.check(live) == []
    assert bridge_ports(node) == {host_veth_name(node.name, cid, "eth0") for cid, _, _ in pods}
    assert route_localnet(node) == "1"  # pod a's hostPort on 127.0.0.1
    for _, pod, _ in pods:
        ping(node, pod, "10.244.1.1")
    ping(node, pods[0][1], pods[1][2])
    ping(node, pods[1][1], pods[2][2])


@pytest.mark.parametrize("node", MODES, indirect=True)
def test_bridge_deleted_next_add_makes_it_and_takes_the_pods_back(node, two_pods):
    with DoctorProcess(node) as doctor:
        live = {(cid, "eth0") for cid, _, _ in two_pods}
        assert doctor.check(live) == []
        node.exec("ip", "link", "del", "cni0")
        # One finding for the bridge: its pods being cut off follows from it.
        found = doctor.check(live)
        assert len(found) == 1 and found[0].startswith(
            f"bridge-missing: bridge cni0 (network {node.name}): expected a bridge holding "
            "10.244.1.1/24; found no link cni0; the host veths of its 2 pod(s) are on no "
            "bridge"
        ), found
        pod = node.pod("c")
        c = ("c", pod, address(ok(node.run("ADD", container_id="c", netns=pod))))
        assert_repaired(node, doctor, [*two_pods, c])
    log = node.log()
    for cid in ("a", "b"):
        veth = host_veth_name(node.name, cid, "eth0")
        assert f"bridge cni0 was made again: put {veth} ({cid}/eth0) back on it" in log


@pytest.mark.parametrize("node", MODES, indirect=True)
def test_bridge_made_again_by_hand_the_doctor_names_each_detached_veth(node, two_pods):
    """Someone deletes the bridge and makes an empty one of the same name: the doctor lists
    what is missing, one finding each; the next ADD finds it down and puts the pods back."""
    with DoctorProcess(node) as doctor:
        live = {(cid, "eth0") for cid, _, _ in two_pods}
        node.exec("ip", "link", "del", "cni0")
        node.exec("ip", "link", "add", "cni0", "type", "bridge")
        found = sorted(doctor.check(live))
        veth = {cid: host_veth_name(node.name, cid, "eth0") for cid in ("a", "b")}
        assert [f.split(":")[0] for f in found] == [
            "bridge-down",
            "bridge-gateway-missing",
            "host-veth-detached",
            "host-veth-detached",
        ]
        for cid in ("a", "b"):
            assert (
                f"host-veth-detached: network {node.name}, container {cid} eth0: expected "
                f"{veth[cid]} attached to bridge cni0; found on no bridge; repair: ip link "
                f"set {veth[cid]} master cni0"
            ) in found
        pod = node.pod("c")
        c = ("c", pod, address(ok(node.run("ADD", container_id="c", netns=pod))))
        assert_repaired(node, doctor, [*two_pods, c])


# --- pycni's nftables table deleted or edited by someone else --------------------------------


def wait_sound(doctor: DoctorProcess, live: set, timeout: float) -> float:
    """Seconds until the doctor finds nothing (fails after `timeout`)."""
    started = time.monotonic()
    while found := doctor.check(live):
        assert time.monotonic() - started < timeout, found
        time.sleep(0.1)
    return time.monotonic() - started


def test_the_agent_puts_back_its_rules(node, agent, two_pods):
    """An ADD or DEL rewrites the rules only when the wanted set changes; the agent compares
    the kernel's with the store's at start-up and on every pass, and applies them again."""
    live = {(cid, "eth0") for cid, _, _ in two_pods}
    with DoctorProcess(node) as doctor:
        assert doctor.check(live) == []
        # Edited while no agent runs: the new one puts it right at start-up.
        assert agent.stop() == 0
        node.exec("nft", "flush", "chain", "inet", "pycni", "hostports")
        found = doctor.check(live)
        assert [f.split(":")[0] for f in found] == ["rule-missing"], found
        agent.start()
        at_start = wait_sound(doctor, live, 10)
        # Deleted under a running agent: its next pass puts it back.
        node.exec("nft", "delete", "table", "inet", "pycni")
        found = doctor.check(live)
        assert [f.split(":")[0] for f in found] == ["rules-missing"], found
        periodic = wait_sound(doctor, live, REPAIR_EVERY + 5)
    # Two repairs, and none on the passes that found the rules right.
    assert agent.log().count("applied them again") == 2
    print(
        f"rules repaired {at_start:.1f} s after the agent started, {periodic:.1f} s after "
        f"the table was deleted (a pass every {REPAIR_EVERY:g} s)"
    )
