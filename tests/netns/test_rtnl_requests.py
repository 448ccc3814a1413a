"""The requests a pod's ADD and DEL make through the lean rtnetlink socket (dataplane.rtnl,
dataplane.veth), read back with iproute2: what pyroute2 used to make, the kernel now holds."""

from __future__ import annotations

import ipaddress
import json

import pytest

from conftest import sh
from pycni.cni.errors import DATAPLANE_FAILURE, CniError
from pycni.cni.result import Route
from pycni.dataplane import veth
from pycni.dataplane.netns import netns_fd
from pycni.dataplane.rtnl import Rtnl

pytestmark = pytest.mark.netns


def ip_json(ns: str, *args: str):
    """iproute2's JSON; [] for a device that does not exist."""
    done = sh("ip", "netns", "exec", ns, "ip", "-j", "-d", *args, check=False)
    if done.returncode and "does not exist" in done.stderr:
        return []
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout or "[]")


@pytest.fixture
def bridge_and_pod(netns):
    """A node namespace with a bridge, and a pod's."""
    node = netns.make("rn")
    pod = netns.make("rp")
    netns.exec(node, "ip", "link", "add", "br0", "type", "bridge")
    netns.exec(node, "ip", "link", "set", "br0", "up")
    return node, pod


def _in_node(node: str):
    """The node's namespace: the requests go through a socket made there."""
    return netns_fd(f"/run/netns/{node}")


def test_create_pair_is_echoed_and_configured(bridge_and_pod):
    node, pod = bridge_and_pod
    with _in_node(node) as node_fd, netns_fd(f"/run/netns/{pod}") as pod_fd:
        with Rtnl.inside(node_fd) as nl:
            br = ip_json(node, "link", "show", "br0")[0]["ifindex"]
            pair = veth.create_pair(
                nl, "hv0", "pycni/x/y", "eth0", pod_fd, 1400, "0A:58:0A:F4:01:02", br, True
            )
            # The echo gives what a lookup by name gives (the path of kernels before 6.2).
            assert veth._link_by_name(nl, "hv0") == (pair.host_index, pair.host_mac, pair.pod_index)
    host = ip_json(node, "link", "show", "hv0")[0]
    assert host["ifindex"] == pair.host_index
    assert host["address"] == pair.host_mac
    assert host["master"] == "br0" and "UP" in host["flags"] and host["mtu"] == 1400
    assert host["ifalias"] == "pycni/x/y"
    assert host["linkinfo"]["info_slave_data"]["hairpin"] is True
    eth0 = ip_json(pod, "link", "show", "eth0")[0]
    assert eth0["ifindex"] == pair.pod_index
    assert eth0["address"] == pair.pod_mac == "0a:58:0a:f4:01:02"
    assert eth0["mtu"] == 1400


def test_create_pair_without_hairpin_and_the_name_taken(bridge_and_pod):
    node, pod = bridge_and_pod
    with _in_node(node) as node_fd, netns_fd(f"/run/netns/{pod}") as pod_fd:
        with Rtnl.inside(node_fd) as nl:
            br = ip_json(node, "link", "show", "br0")[0]["ifindex"]
            veth.create_pair(nl, "hv1", "a", "eth0", pod_fd, None, None, br, False)
            with pytest.raises(CniError) as caught:
                veth.create_pair(nl, "hv2", "a", "eth0", pod_fd, None, None, br, False)
            assert caught.value.code == DATAPLANE_FAILURE
            assert "eth0 already exists in the pod's namespace" in caught.value.msg
            assert veth.delete_host_veth(nl, "hv1") is True
            assert veth.delete_host_veth(nl, "hv1") is False  # gone: DEL succeeds again
    assert ip_json(node, "link", "show", "hv2") == []
    assert ip_json(pod, "link", "show", "eth0") == []  # the pod end went with its host end


def test_configure_pod_addresses_and_routes(bridge_and_pod):
    node, pod = bridge_and_pod
    with _in_node(node) as node_fd, netns_fd(f"/run/netns/{pod}") as pod_fd:
        with Rtnl.inside(node_fd) as nl:
            br = ip_json(node, "link", "show", "br0")[0]["ifindex"]
            pair = veth.create_pair(nl, "hv3", "a", "eth0", pod_fd, None, None, br, False)
        addresses = [ipaddress.ip_interface("10.55.0.5/24"), ipaddress.ip_interface("fd55::5/64")]
        gw4, gw6 = ipaddress.ip_address("10.55.0.1"), ipaddress.ip_address("fd55::1")
        routes = [
            Route(ipaddress.ip_network("0.0.0.0/0"), gw4, {}),
            Route(ipaddress.ip_network("::/0"), gw6, {}),
            Route(ipaddress.ip_network("10.66.0.0/16"), gw4, {"mtu": 1400, "advmss": 1300}),
            Route(ipaddress.ip_network("10.67.0.0/16"), gw4, {"priority": 7, "table": 1000}),
        ]
        with Rtnl.inside(pod_fd) as pod_nl:
            veth.configure_pod(pod_nl, "eth0", pair.pod_index, addresses, routes)
            # Again: the routes exist (EEXIST is success), the addresses do not.
            with pytest.raises(CniError) as caught:
                veth.configure_pod(pod_nl, "eth0", pair.pod_index, addresses, routes)
            assert "adding 10.55.0.5/24 to eth0 in the pod failed: EEXIST" in caught.value.msg
            with pytest.raises(CniError) as caught:
                veth.configure_pod(pod_nl, "eth0", 999, [], [])
            assert "configuring eth0 in the pod failed: ENODEV" in caught.value.msg
    lo = ip_json(pod, "link", "show", "lo")[0]
    assert "UP" in lo["flags"]
    found = {
        (a["family"], a["local"], a["prefixlen"])
        for a in ip_json(pod, "addr", "show", "eth0")[0]["addr_info"]
        if a["scope"] == "global"
    }
    assert found == {("inet", "10.55.0.5", 24), ("inet6", "fd55::5", 64)}
    v6 = [
        a for a in ip_json(pod, "addr", "show", "eth0")[0]["addr_info"] if a["local"] == "fd55::5"
    ]
    assert v6[0].get("nodad") is True
    main4 = {r["dst"]: r for r in ip_json(pod, "-4", "route", "show")}
    assert main4["default"]["gateway"] == "10.55.0.1" and main4["default"]["protocol"] == "static"
    assert main4["10.66.0.0/16"]["metrics"] == [{"mtu": 1400, "advmss": 1300}]
    table = ip_json(pod, "-4", "route", "show", "table", "1000")
    assert table == [
        {
            "type": "unicast",
            "dst": "10.67.0.0/16",
            "gateway": "10.55.0.1",
            "dev": "eth0",
            "protocol": "static",
            "scope": "global",
            "metric": 7,
            "flags": [],
        }
    ]
    main6 = {r["dst"]: r for r in ip_json(pod, "-6", "route", "show")}
    assert main6["default"]["gateway"] == "fd55::1"
