"""The route backends on a small lab: three node namespaces on an underlay bridge (in a
namespace of its own), each with a pod bridge and a pod; for auto mode a second underlay
segment behind a router namespace. reconcile_once runs inside each node; pods ping pods."""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field, replace

import pytest

from pycni.backends import RTPROT_PYCNI, Changes, VxlanSettings, reconcile_once, vtep_mac
from pycni.backends.vxlan import ensure_vtep
from pycni.cluster.model import NodeRecord
from pycni.dataplane.netns import pod_netlink

pytestmark = pytest.mark.netns

VTEP = "pycni.1"


def batch(ns: str, commands: str) -> None:
    """Many `ip` commands in one process (`ip -n NS -batch -`)."""
    subprocess.run(
        ["ip", "-n", ns, "-batch", "-"], input=commands, text=True, check=True, capture_output=True
    )


def ip(ns: str, *args: str) -> str:
    return subprocess.run(
        ["ip", "-n", ns, *args], check=True, capture_output=True, text=True
    ).stdout


def sysctl_forwarding(netns, ns: str) -> None:
    netns.exec(ns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")


@dataclass
class Host:
    name: str
    ns: str
    pod: str
    ips: tuple[str, ...]
    subnets: tuple[str, ...]
    pod_ips: tuple[str, ...]

    def record(self, **changes) -> NodeRecord:
        rec = NodeRecord(self.name, self.ips, self.subnets, vtep_mac(self.name))
        return replace(rec, **changes) if changes else rec


@dataclass
class Lab:
    netns: object
    hosts: list[Host] = field(default_factory=list)

    def records(self) -> list[NodeRecord]:
        return [h.record() for h in self.hosts]

    def reconcile(
        self,
        host: Host,
        mode: str,
        nodes: list[NodeRecord] | None = None,
        vxlan: VxlanSettings | None = None,
    ) -> Changes:
        nodes = self.records() if nodes is None else nodes
        local = (
            next(n for n in nodes if n.name == host.name)
            if any(n.name == host.name for n in nodes)
            else host.record()
        )
        with pod_netlink(f"/run/netns/{host.ns}") as ipr:
            return reconcile_once(ipr, local, nodes, mode, "eth0", vxlan)

    def reconcile_all(self, mode: str) -> list[Changes]:
        out = [self.reconcile(h, mode) for h in self.hosts]
        for c in out:
            assert not c.errors, c.errors
        return out

    def ping(self, src: Host, dst: Host, family: int = 4, tries: int = 3) -> bool:
        target = next(a for a in dst.pod_ips if (":" in a) == (family == 6))
        for _ in range(tries):
            r = self.netns.exec(src.pod, "ping", f"-{family}", "-c1", "-W1", target, check=False)
            if r.returncode == 0:
                return True
        return False

    def assert_all_ping(self, family: int = 4) -> None:
        for a in self.hosts:
            for b in self.hosts:
                if a is not b:
                    assert self.ping(a, b, family), f"{a.name} -> {b.name} (IPv{family})"


def build(netns, segments: tuple[int, ...] = (1, 1, 1), dual: bool = False) -> Lab:
    """Nodes node1..nodeN; node i sits on underlay segment segments[i-1] (1: 192.168.10.0/24,
    2: 192.168.20.0/24 behind a router). Pod subnet 10.244.i.0/24 (+ fd00:244:i::/64)."""
    lab = Lab(netns)
    ul = netns.make("ul")
    cmds = ""
    for seg in sorted(set(segments)):
        cmds += f"link add br{seg} type bridge\nlink set br{seg} up\n"
    batch(ul, cmds)
    routed = len(set(segments)) > 1
    if routed:
        rt = netns.make("rt")
        cmds = ""
        for seg in sorted(set(segments)):
            cmds += (
                f"link add r{seg} type veth peer name rp{seg} netns {ul}\n"
                f"link set r{seg} up\naddr add 192.168.{seg}0.254/24 dev r{seg}\n"
                f"addr add fd00:{seg}0::fe/64 dev r{seg} nodad\n"
            )
        batch(rt, cmds)
        batch(ul, "".join(f"link set rp{seg} master br{seg} up\n" for seg in sorted(set(segments))))
        sysctl_forwarding(netns, rt)
    for i, seg in enumerate(segments, start=1):
        ns, pod = netns.make(f"node{i}"), netns.make(f"pod{i}")
        node_ips = (f"192.168.{seg}0.{i}",) + ((f"fd00:{seg}0::{i}",) if dual else ())
        subnets = (f"10.244.{i}.0/24",) + ((f"fd00:244:{i}::/64",) if dual else ())
        pod_ips = (f"10.244.{i}.2",) + ((f"fd00:244:{i}::2",) if dual else ())
        cmds = (
            f"link set lo up\nlink add eth0 type veth peer name u{i} netns {ul}\n"
            f"link set eth0 up\naddr add {node_ips[0]}/24 dev eth0\n"
            "link add cni0 type bridge\nlink set cni0 up\n"
            f"addr add 10.244.{i}.1/24 dev cni0\n"
            f"link add vp{i} type veth peer name eth0 netns {pod}\n"
            f"link set vp{i} master cni0 up\n"
        )
        if dual:
            cmds += (
                f"addr add {node_ips[1]}/64 dev eth0 nodad\n"
                f"addr add fd00:244:{i}::1/64 dev cni0 nodad\n"
            )
        if routed:
            cmds += f"route add default via 192.168.{seg}0.254\n"
            if dual:
                cmds += f"route add default via fd00:{seg}0::fe\n"
        batch(ns, cmds)
        batch(ul, f"link set u{i} master br{seg} up\n")
        cmds = (
            f"link set lo up\nlink set eth0 up\naddr add 10.244.{i}.2/24 dev eth0\n"
            f"route add default via 10.244.{i}.1\n"
        )
        if dual:
            cmds += (
                f"addr add fd00:244:{i}::2/64 dev eth0 nodad\n"
                f"route add default via fd00:244:{i}::1\n"
            )
        batch(pod, cmds)
        sysctl_forwarding(netns, ns)
        lab.hosts.append(Host(f"node{i}", ns, pod, node_ips, subnets, pod_ips))
    return lab


def ours(ns: str, family: int = 4) -> list[str]:
    """pycni's routes (`ip route show proto 120`, which leaves "proto 120" out of each line)."""
    return [
        line.strip()
        for line in ip(ns, f"-{family}", "route", "show", "proto", str(RTPROT_PYCNI)).splitlines()
        if line
    ]


def neighbours(ns: str) -> str:
    return ip(ns, "neigh", "show", "dev", VTEP, "nud", "permanent")


def fdb(ns: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", ns, "bridge", "fdb", "show", "dev", VTEP],
        check=True,
        capture_output=True,
        text=True,
    ).stdout


def is_zero(c: Changes) -> bool:
    return (c.added, c.replaced, c.removed, c.errors) == (0, 0, 0, [])


# ---- the three modes ---------------------------------------------------------------------


def test_host_gw(netns):
    lab = build(netns)
    first = lab.reconcile_all("host-gw")
    assert [c.added for c in first] == [2, 2, 2] and all(c.vtep is None for c in first)
    lab.assert_all_ping()
    n1 = lab.hosts[0].ns
    assert sorted(ours(n1)) == [f"10.244.{i}.0/24 via 192.168.10.{i} dev eth0" for i in (2, 3)]
    assert f"10.244.2.0/24 via 192.168.10.2 dev eth0 proto {RTPROT_PYCNI}" in ip(n1, "route")
    assert "pycni.1" not in ip(n1, "link")
    assert all(is_zero(c) for c in lab.reconcile_all("host-gw"))


def test_vxlan(netns):
    lab = build(netns)
    first = lab.reconcile_all("vxlan")
    # The VTEP + per peer: route, neighbour, FDB entry.
    assert [c.added for c in first] == [7, 7, 7]
    lab.assert_all_ping()
    h1 = lab.hosts[0]
    assert first[0].vtep is not None and first[0].vtep.mac == vtep_mac("node1")
    link = ip(h1.ns, "-d", "link", "show", VTEP)
    assert "vxlan id 1 local 192.168.10.1 dev eth0" in link and "dstport 8472" in link
    assert "nolearning" in link and "mtu 1450" in link and vtep_mac("node1") in link
    assert "inet 10.244.1.0/32" in ip(h1.ns, "addr", "show", VTEP)
    assert sorted(ours(h1.ns)) == [
        f"10.244.{i}.0/24 via 10.244.{i}.0 dev {VTEP} onlink" for i in (2, 3)
    ]
    assert f"10.244.2.0 lladdr {vtep_mac('node2')} PERMANENT" in neighbours(h1.ns)
    assert f"{vtep_mac('node3')} dst 192.168.10.3 self permanent" in fdb(h1.ns)
    assert all(is_zero(c) for c in lab.reconcile_all("vxlan"))


def test_auto_mixes_host_gw_and_vxlan(netns):
    lab = build(netns, segments=(1, 1, 2))
    lab.reconcile_all("auto")
    lab.assert_all_ping()
    h1, _, h3 = lab.hosts
    routes = sorted(ours(h1.ns))
    assert routes == [
        "10.244.2.0/24 via 192.168.10.2 dev eth0",
        f"10.244.3.0/24 via 10.244.3.0 dev {VTEP} onlink",
    ]
    assert f"{vtep_mac('node3')} dst 192.168.20.3" in fdb(h1.ns)
    assert vtep_mac("node2") not in fdb(h1.ns)
    # Node 3 is alone on its segment: everything through the tunnel.
    assert all(f"dev {VTEP}" in r for r in ours(h3.ns)) and len(ours(h3.ns)) == 2
    assert all(is_zero(c) for c in lab.reconcile_all("auto"))


def test_auto_creates_vtep_without_vxlan_peers(netns):
    lab = build(netns, segments=(1, 1))
    changes = lab.reconcile_all("auto")
    assert all(c.vtep is not None for c in changes)
    assert all(f"dev {VTEP}" not in r for r in ours(lab.hosts[0].ns))
    assert VTEP in ip(lab.hosts[0].ns, "link")


def test_dual_stack_host_gw(netns):
    lab = build(netns, dual=True)
    first = lab.reconcile_all("host-gw")
    assert [c.added for c in first] == [4, 4, 4]
    lab.assert_all_ping(4)
    lab.assert_all_ping(6)
    assert sorted(r.split(" metric")[0] for r in ours(lab.hosts[0].ns, 6)) == [
        f"fd00:244:{i}::/64 via fd00:10::{i} dev eth0" for i in (2, 3)
    ]
    assert all(is_zero(c) for c in lab.reconcile_all("host-gw"))


def test_dual_stack_vxlan(netns):
    lab = build(netns, dual=True)
    lab.reconcile_all("vxlan")
    lab.assert_all_ping(4)
    lab.assert_all_ping(6)
    assert "inet6 fd00:244:1::/128" in ip(lab.hosts[0].ns, "addr", "show", VTEP)
    assert all(is_zero(c) for c in lab.reconcile_all("vxlan"))


def test_vxlan_over_ipv6_underlay(netns):
    lab = build(netns, dual=True)
    for h in lab.hosts:
        h.ips = tuple(reversed(h.ips))  # IPv6 first: the VTEP's local address
    lab.reconcile_all("vxlan")
    lab.assert_all_ping(4)
    link = ip(lab.hosts[0].ns, "-d", "link", "show", VTEP)
    assert "local fd00:10::1" in link and "mtu 1430" in link
    assert "dst fd00:10::2" in fdb(lab.hosts[0].ns)


# ---- ownership, changes, removal -------------------------------------------------------------


def test_foreign_routes_survive_and_are_never_overwritten(netns):
    lab = build(netns)
    h1 = lab.hosts[0]
    ip(h1.ns, "route", "add", "10.99.0.0/24", "via", "192.168.10.3", "proto", "static")
    # Somebody's route to node2's subnet: pycni reports it and leaves it.
    ip(h1.ns, "route", "add", "10.244.2.0/24", "via", "192.168.10.3", "proto", "static")
    changes = lab.reconcile(h1, "host-gw")
    assert changes.added == 1 and len(changes.errors) == 1
    assert "10.244.2.0/24" in changes.errors[0] and "did not make" in changes.errors[0]
    routes = ip(h1.ns, "route", "show")
    assert "10.99.0.0/24 via 192.168.10.3 dev eth0 proto static" in routes
    assert "10.244.2.0/24 via 192.168.10.3 dev eth0 proto static" in routes
    assert len(ours(h1.ns)) == 1
    # Dropping everyone removes ours only.
    changes = lab.reconcile(h1, "host-gw", nodes=[h1.record()])
    assert changes.removed == 1 and not changes.errors
    assert ours(h1.ns) == [] and "10.99.0.0/24" in ip(h1.ns, "route", "show")


@pytest.mark.parametrize("mode", ["host-gw", "vxlan"])
def test_removed_node_loses_its_entries(netns, mode):
    lab = build(netns)
    lab.reconcile_all(mode)
    h1, h2, h3 = lab.hosts
    changes = lab.reconcile(h1, mode, nodes=[h1.record(), h2.record()])
    assert changes.removed == (1 if mode == "host-gw" else 3) and not changes.added
    assert "10.244.3.0" not in "".join(ours(h1.ns))
    if mode == "vxlan":
        assert "10.244.3.0" not in neighbours(h1.ns)
        assert vtep_mac("node3") not in fdb(h1.ns)
        assert vtep_mac("node2") in fdb(h1.ns)
    assert lab.ping(h1, h2) and not lab.ping(h1, h3, tries=1)


def test_changed_node_ip_is_replaced(netns):
    for mode in ("host-gw", "vxlan"):
        lab = build(netns)
        lab.reconcile_all(mode)
        h1, h2, _ = lab.hosts
        ip(h2.ns, "addr", "del", "192.168.10.2/24", "dev", "eth0")
        ip(h2.ns, "addr", "add", "192.168.10.22/24", "dev", "eth0")
        h2.ips = ("192.168.10.22",)
        # Node2 itself: the kernel flushed its routes with the old address; in vxlan mode
        # its VTEP follows the new address (recreated, same MAC).
        c2 = lab.reconcile(h2, mode)
        assert not c2.errors and c2.added == (2 if mode == "host-gw" else 6)
        if mode == "vxlan":
            assert c2.replaced == 1 and c2.vtep.mac == vtep_mac("node2")
        changes = lab.reconcile(h1, mode)
        assert (changes.added, changes.replaced, changes.removed) == (0, 1, 0)
        if mode == "vxlan":
            assert f"{vtep_mac('node2')} dst 192.168.10.22" in fdb(h1.ns)
        else:
            assert "10.244.2.0/24 via 192.168.10.22" in "".join(ours(h1.ns))
        for h in lab.hosts[2:]:
            lab.reconcile(h, mode)
        lab.assert_all_ping()


def test_changed_vtep_mac_is_replaced(netns):
    lab = build(netns)
    lab.reconcile_all("vxlan")
    h1, h2, _ = lab.hosts
    fake = "0a:00:00:00:22:22"
    nodes = [h1.record(), h2.record(vtep_mac=fake), lab.hosts[2].record()]
    changes = lab.reconcile(h1, "vxlan", nodes=nodes)
    # neighbour replaced, FDB entry for the new MAC added and the old one removed.
    assert (changes.added, changes.replaced, changes.removed) == (1, 1, 1)
    assert f"10.244.2.0 lladdr {fake} PERMANENT" in neighbours(h1.ns)
    assert fake in fdb(h1.ns) and vtep_mac("node2") not in fdb(h1.ns)
    assert not lab.ping(h1, h2, tries=1)
    changes = lab.reconcile(h1, "vxlan")
    assert (changes.added, changes.replaced, changes.removed) == (1, 1, 1)
    assert lab.ping(h1, h2)


def test_switch_vxlan_to_host_gw_removes_vtep(netns):
    lab = build(netns)
    lab.reconcile_all("vxlan")
    changes = lab.reconcile_all("host-gw")
    # Two routes replaced; two neighbours, two FDB entries and the VTEP removed.
    assert [(c.added, c.replaced, c.removed) for c in changes] == [(0, 2, 5)] * 3
    for h in lab.hosts:
        assert VTEP not in ip(h.ns, "link")
        assert all("dev eth0" in r for r in ours(h.ns)) and len(ours(h.ns)) == 2
    lab.assert_all_ping()
    assert all(is_zero(c) for c in lab.reconcile_all("host-gw"))


def test_vtep_with_other_vni_is_recreated_keeping_its_mac(netns):
    lab = build(netns)
    lab.reconcile_all("vxlan")
    h1 = lab.hosts[0]
    before = ip(h1.ns, "-o", "link", "show", VTEP).split(":")[0]
    changes = lab.reconcile(h1, "vxlan", vxlan=VxlanSettings(vni=7))
    assert changes.replaced == 1 and changes.added == 6  # the kernel dropped its entries
    link = ip(h1.ns, "-d", "link", "show", VTEP)
    assert "vxlan id 7" in link and vtep_mac("node1") in link
    assert ip(h1.ns, "-o", "link", "show", VTEP).split(":")[0] != before
    for h in lab.hosts[1:]:
        lab.reconcile(h, "vxlan", vxlan=VxlanSettings(vni=7))
    lab.assert_all_ping()


def test_ensure_vtep_fixes_mtu_mac_and_addresses_in_place(netns):
    lab = build(netns, segments=(1,))
    h1 = lab.hosts[0]
    lab.reconcile(h1, "vxlan")
    ip(h1.ns, "link", "set", VTEP, "mtu", "1300", "address", "0a:00:00:00:99:99", "down")
    ip(h1.ns, "addr", "add", "10.1.2.3/32", "dev", VTEP)
    changes = lab.reconcile(h1, "vxlan")
    assert (changes.added, changes.replaced, changes.removed) == (0, 1, 0)
    link = ip(h1.ns, "link", "show", VTEP)
    assert "mtu 1450" in link and vtep_mac("node1") in link and ",UP" in link
    assert "10.1.2.3" not in ip(h1.ns, "addr", "show", VTEP)
    with pod_netlink(f"/run/netns/{h1.ns}") as ipr:
        eth0 = ipr.link_lookup(ifname="eth0")[0]
        info = ensure_vtep(ipr, VTEP, 1, "192.168.10.1", eth0, vtep_mac("node1"), mtu=1450)
        assert info.mac == vtep_mac("node1")


def test_device_of_another_kind_is_left_alone(netns):
    lab = build(netns, segments=(1, 1))
    h1 = lab.hosts[0]
    ip(h1.ns, "link", "add", VTEP, "type", "bridge")
    changes = lab.reconcile(h1, "auto")
    assert changes.vtep is None and "not a VXLAN device" in changes.errors[0]
    assert changes.added == 1  # host-gw to the on-link peer still works
    assert "bridge" in ip(h1.ns, "-d", "link", "show", VTEP)
    assert lab.reconcile(h1, "host-gw").removed == 0  # and host-gw does not delete it
    assert VTEP in ip(h1.ns, "link")


def test_missing_underlay_is_an_error_not_an_exception(netns):
    lab = build(netns, segments=(1,))
    h1 = lab.hosts[0]
    with pod_netlink(f"/run/netns/{h1.ns}") as ipr:
        changes = reconcile_once(ipr, h1.record(), [h1.record()], "vxlan", "nosuch0")
    assert changes.errors and "nosuch0" in changes.errors[0]


def test_reconcile_is_fast_enough_to_run_often(netns):
    lab = build(netns)
    lab.reconcile_all("vxlan")
    start = time.perf_counter()
    for _ in range(10):
        assert all(is_zero(c) for c in lab.reconcile_all("vxlan"))
    assert (time.perf_counter() - start) / 30 < 0.1


@pytest.mark.parametrize("mode", ["vxlan", "host-gw"])
def test_the_raw_netlink_path_reads_and_writes_what_pyroute2_does(netns, mode):
    """read_state and apply go through dataplane/rtnl.py (struct-parsed dumps, pipelined
    requests) where they can: on a dual-stack lab, what it reads equals pyroute2's reading of
    the same kernel, and what it applies pyroute2 reads back as planned."""
    from pycni.backends import kernel
    from pycni.backends.vxlan import vtep_index
    from pycni.dataplane.rtnl import Rtnl

    lab = build(netns, dual=True)
    lab.reconcile_all(mode)
    lab.assert_all_ping(4)
    lab.assert_all_ping(6)
    for host in lab.hosts:
        with pod_netlink(f"/run/netns/{host.ns}") as ipr:
            rt = Rtnl.open(ipr)
            assert rt is not None  # the lean path is the one taken here
            rt.close()
            index = vtep_index(ipr, VTEP)
            assert (index is not None) == (mode == "vxlan")
            raw = kernel.read_state(ipr, index)
            assert raw == kernel._read_state_pyroute2(ipr, index)
            assert len(raw.routes) == 2 * (len(lab.hosts) - 1)  # both families, each peer
            # Remove everything through the raw writer; pyroute2 then reads nothing of ours.
            changes = kernel.apply(ipr, kernel.State(), raw)
            assert changes.errors == [] and changes.removed == len(raw.entries())
            assert kernel._read_state_pyroute2(ipr, index).entries() == frozenset()
            # Deleting what is gone is no error; adding it back restores the same state.
            again = kernel.apply(ipr, kernel.State(), raw)
            assert again.errors == [] and again.removed == 0
            back = kernel.apply(ipr, raw, kernel.State())
            assert back.errors == [] and back.added == len(raw.entries())
            assert kernel._read_state_pyroute2(ipr, index) == raw
    lab.assert_all_ping(4)
    lab.assert_all_ping(6)


def in_netns(ns: str, fn):
    """fn() on a thread moved into `ns` for the call (a KernelWatch subscribes in the namespace
    of the thread that opens it, as the agent's loop thread does in its node's)."""
    import threading

    from pycni.dataplane.netns import _setns, netns_fd

    out: list = []

    def run():
        with netns_fd(f"/run/netns/{ns}") as fd:
            _setns(fd)  # this thread only, and it ends right after
        out.append(fn())

    t = threading.Thread(target=run)
    t.start()
    t.join()
    return out[0]


@pytest.mark.parametrize("mode", ["vxlan", "host-gw"])
def test_a_quiet_kernel_is_trusted_and_any_change_to_ours_is_noticed(netns, mode):
    """With a KernelWatch, a pass with the plan the kernel was last found holding reads
    nothing back, until the kernel announces a change that could touch pycni's entries: a
    route or VTEP neighbour removed by hand is noticed and put back on the next pass; a route
    of another table is not a reason to read."""
    from pycni.backends.watch import KernelWatch

    lab = build(netns)
    host = lab.hosts[0]
    nodes = lab.records()
    watch = in_netns(host.ns, KernelWatch.open)
    assert watch is not None
    try:
        with pod_netlink(f"/run/netns/{host.ns}") as ipr:

            def reconcile() -> Changes:
                return reconcile_once(ipr, nodes[0], nodes, mode, "eth0", None, watch=watch)

            first = reconcile()
            assert first.added >= 2 and not first.trusted
            second = reconcile()  # its own changes were announced: read once more
            assert is_zero(second) and not second.trusted
            third = reconcile()
            assert is_zero(third) and third.trusted
            ip(host.ns, "route", "add", "10.9.9.0/24", "dev", "eth0", "table", "100")
            assert reconcile().trusted  # not the main table: nothing of ours
            ip(host.ns, "route", "del", "10.244.2.0/24")
            repaired = reconcile()
            assert not repaired.trusted and repaired.added == 1 and repaired.errors == []
            assert not reconcile().trusted  # the repair's own announcement
            assert reconcile().trusted
            if mode == "vxlan":
                ip(host.ns, "neigh", "del", "10.244.3.0", "dev", VTEP)
                fixed = reconcile()
                assert not fixed.trusted and fixed.added == 1
            # Another plan (a node left) is never trusted to the old one's kernel.
            fewer = reconcile_once(ipr, nodes[0], nodes[:2], mode, "eth0", None, watch=watch)
            assert not fewer.trusted and fewer.removed >= 1
    finally:
        watch.close()
