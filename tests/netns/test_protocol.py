"""The CNI protocol as a runtime sees it: every command in every version, every class of bad
input, idempotent DEL, CHECK drift detection, GC, STATUS, chaining and requested addresses.

Everything runs through the installed plugin inside a sandboxed node netns (see conftest)."""

from __future__ import annotations

import json
import os
import time

import pytest

from conftest import Node, Reply, pod_name
from pycni.cni import versions
from pycni.dataplane.names import host_veth_name

pytestmark = pytest.mark.netns
# Every test here runs through the in-process plugin and through the node agent.
BOTH_MODES = True

SUPPORTED = list(versions.SUPPORTED)
GW = "10.244.1.1"
FIRST = "10.244.1.2/24"
VALID = "cni.dev/valid-attachments"


# --- helpers -------------------------------------------------------------------------------


def at_least(version: str, minimum: str) -> bool:
    return versions.parse(version) >= versions.parse(minimum)


def pod_links(node: Node, pod: str) -> list[str]:
    out = node.spaces.exec(pod_name(pod), "ip", "-o", "link", "show").stdout
    return [line.split(": ")[1].split("@")[0] for line in out.splitlines()]


def pod_exec(node: Node, pod: str, *args: str, check: bool = True):
    return node.spaces.exec(pod_name(pod), *args, check=check)


def ping_gateway(node: Node, pod: str) -> None:
    pod_exec(node, pod, "ping", "-c1", "-W2", GW)


def assert_ok(reply: Reply, output: bool = False) -> None:
    assert reply.rc == 0, reply
    assert "Traceback" not in reply.stdout
    if not output:
        assert reply.stdout.strip() == "", reply


def assert_error(reply: Reply, code: int, *words: str, version: str | None = None) -> dict:
    """Non-zero exit; stdout is exactly one JSON CNI error object with this code and a msg
    mentioning every word."""
    assert reply.rc != 0, reply
    assert "Traceback" not in reply.stdout, reply.stdout
    lines = [line for line in reply.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, reply.stdout
    err = json.loads(lines[0])
    assert isinstance(err, dict), err
    assert set(err) <= {"cniVersion", "code", "msg", "details"}, err
    assert err["code"] == code, err
    assert isinstance(err["msg"], str) and len(err["msg"]) > 10, err
    for word in words:
        assert word in err["msg"], (word, err)
    assert err["cniVersion"] in SUPPORTED, err
    if version is not None:
        assert err["cniVersion"] == version, err
    return err


def probe_first_address(node: Node) -> None:
    """No allocation leaked: a fresh ADD gets the very first address (the fixture's teardown
    removes it with the namespaces)."""
    out = node.add(node.pod("probe"), "probe")
    assert out["ips"][0]["address"] == FIRST, out


def probe_free(node: Node, ip: str) -> None:
    """`ip` is free: a new container may ask for it (allocation is round-robin, so a freed
    address is not handed out again unasked until the range wraps)."""
    pod = node.pod("probe")
    out = node.add(pod, "probe", node.conf(runtimeConfig={"ips": [ip]}))
    assert out["ips"][0]["address"].split("/")[0] == ip, out
    assert_ok(node.run("DEL", container_id="probe", netns=pod))


def assert_nothing_left(node: Node, pod: str, links_before: list[str]) -> None:
    assert node.links() == links_before
    assert pod_links(node, pod) == ["lo"]
    probe_first_address(node)


def raw_run(node: Node, environ: dict, data: bytes) -> Reply:
    """Like Node.run but with exactly this environment (so a variable can be truly absent)."""
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), **environ}
    return node.exec_plugin(env, data)


# --- 1. every command in every version ------------------------------------------------------


@pytest.mark.parametrize("version", SUPPORTED)
def test_every_command_in_every_version(node, version):
    pod = node.pod()
    conf = node.conf(cniVersion=version, mtu=1400)
    add = node.run("ADD", conf, container_id="c1", netns=pod)
    assert_ok(add, output=True)
    out = add.out
    assert out["cniVersion"] == version
    host = host_veth_name(node.name, "c1", "eth0")
    if not at_least(version, "0.3.0"):
        assert "ips" not in out and "interfaces" not in out and "ip6" not in out, out
        assert out["ip4"] == {
            "ip": FIRST,
            "gateway": GW,
            "routes": [{"dst": "0.0.0.0/0", "gw": GW}],
        }
    else:
        ip = {"address": FIRST, "gateway": GW, "interface": 2}
        if not at_least(version, "1.0.0"):
            ip = {"version": "4", **ip}
        assert out["ips"] == [ip]
        assert "ip4" not in out
        assert [i["name"] for i in out["interfaces"]] == ["cni0", host, "eth0"]
        assert out["interfaces"][2]["sandbox"] == pod
        assert "sandbox" not in out["interfaces"][0] and "sandbox" not in out["interfaces"][1]
        mtus = [i.get("mtu") for i in out["interfaces"]]
        assert mtus == ([None, None, 1400] if version == "1.1.0" else [None, None, None])
        assert out["routes"] == [{"dst": "0.0.0.0/0", "gw": GW}]
    assert "mtu 1400" in pod_exec(node, pod, "ip", "link", "show", "eth0").stdout
    ping_gateway(node, pod)

    check = node.run(
        "CHECK",
        node.conf(cniVersion=version, mtu=1400, prevResult=out),
        container_id="c1",
        netns=pod,
    )
    if at_least(version, "0.4.0"):
        assert_ok(check)
    else:
        assert_error(check, 1, "CHECK", version=version)

    status = node.run("STATUS", conf)
    gc = node.run(
        "GC", node.conf(cniVersion=version, **{VALID: [{"containerID": "c1", "ifname": "eth0"}]})
    )
    if version == "1.1.0":
        assert_ok(status)
        assert_ok(gc)
    else:
        assert_error(status, 1, "STATUS", version=version)
        assert_error(gc, 1, "GC", version=version)
    # Neither a GC that listed it nor a refused GC touched the attachment.
    assert host in node.links()
    ping_gateway(node, pod)

    assert_ok(node.run("DEL", conf, container_id="c1", netns=pod))
    assert host not in node.links()
    assert pod_links(node, pod) == ["lo"]

    ver = node.run("VERSION", conf)
    assert_ok(ver, output=True)
    assert ver.out == {"cniVersion": version, "supportedVersions": SUPPORTED}


def test_version_without_config_lists_exactly_the_supported_versions(node):
    reply = node.run("VERSION", b"", container_id=None, ifname=None, netns=None)
    assert_ok(reply, output=True)
    assert reply.out["supportedVersions"] == [
        "0.1.0",
        "0.2.0",
        "0.3.0",
        "0.3.1",
        "0.4.0",
        "1.0.0",
        "1.1.0",
    ]


def test_cni_versions_list_picks_highest_supported(node):
    pod = node.pod()
    out = node.add(
        pod, "c1", node.conf(cniVersion=None, cniVersions=["0.3.1", "1.0.0", "0.4.0", "9.9.9"])
    )
    assert out["cniVersion"] == "1.0.0"
    assert out["ips"][0] == {"address": FIRST, "gateway": GW, "interface": 2}


def test_no_cni_version_means_020(node):
    pod = node.pod()
    out = node.add(pod, "c1", node.conf(cniVersion=None))
    assert out["cniVersion"] == "0.2.0"
    assert out["ip4"]["ip"] == FIRST and "ips" not in out
    # CHECK needs 0.4.0: an implicit 0.2.0 config may not have it.
    reply = node.run(
        "CHECK", node.conf(cniVersion=None, prevResult=out), container_id="c1", netns=pod
    )
    assert_error(reply, 1, "CHECK")


@pytest.mark.parametrize(
    "conf",
    [
        {"cniVersion": "0.5.0"},
        {"cniVersion": "2.0.0"},
        {"cniVersion": None, "cniVersions": ["0.9.9", "3.0.0"]},
    ],
    ids=["0.5.0", "2.0.0", "list-none-supported"],
)
def test_unsupported_version_is_code_1(node, conf):
    pod = node.pod()
    before = node.links()
    err = assert_error(
        node.run("ADD", node.conf(**conf), container_id="c1", netns=pod), 1, "supported"
    )
    assert "1.1.0" in err.get("details", "")
    assert_nothing_left(node, pod, before)


# --- 2. bad input ---------------------------------------------------------------------------
# Each case: (id, build(node, pod, tmp_path) -> kwargs for Node.run, code, words in msg).


def _conf(**over):
    return lambda node, pod, tmp: {"conf": node.conf(**over)}


def _env(**kw):
    return lambda node, pod, tmp: kw


def _regular_file(node, pod, tmp):
    path = tmp / "not-a-netns"
    path.write_text("")
    return {"netns": str(path)}


def _huge(node, pod, tmp):
    conf = node.conf(padding="a" * (4 << 20))
    return {"conf": json.dumps(conf).encode()}


BAD_INPUT = [
    ("command-empty", _env(command=""), 4, ["CNI_COMMAND"]),
    ("command-unknown", _env(command="FROB"), 4, ["FROB", "ADD"]),
    ("command-lowercase", _env(command="add"), 4, ["'add'"]),
    ("cid-missing", _env(container_id=None), 4, ["CNI_CONTAINERID"]),
    ("cid-empty", _env(container_id=""), 4, ["CNI_CONTAINERID"]),
    ("cid-invalid-chars", _env(container_id="abc$(id)"), 4, ["CNI_CONTAINERID", "letters"]),
    ("cid-traversal", _env(container_id="../x"), 4, ["CNI_CONTAINERID", "../x"]),
    ("cid-leading-dot", _env(container_id=".hidden"), 4, ["CNI_CONTAINERID"]),
    ("ifname-missing", _env(ifname=None), 4, ["CNI_IFNAME"]),
    ("ifname-too-long", _env(ifname="e" * 16), 4, ["CNI_IFNAME", "15"]),
    ("ifname-dot", _env(ifname="."), 4, ["CNI_IFNAME", "'.'"]),
    ("ifname-dotdot", _env(ifname=".."), 4, ["CNI_IFNAME", "'..'"]),
    ("ifname-slash", _env(ifname="et/h0"), 4, ["CNI_IFNAME", "'/'"]),
    ("ifname-colon", _env(ifname="eth0:1"), 4, ["CNI_IFNAME", "':'"]),
    ("ifname-space", _env(ifname="eth 0"), 4, ["CNI_IFNAME", "whitespace"]),
    ("netns-missing", _env(netns=None), 4, ["CNI_NETNS"]),
    ("netns-relative", _env(netns="run/netns/x"), 4, ["CNI_NETNS", "absolute"]),
    (
        "netns-nonexistent",
        _env(netns="/run/netns/pycni-test-no-such-ns"),
        3,
        ["/run/netns/pycni-test-no-such-ns"],
    ),
    ("netns-regular-file", _regular_file, 4, ["CNI_NETNS", "not-a-netns"]),
    (
        "netns-directory",
        lambda n, p, t: {"netns": str(t)},
        4,
        ["CNI_NETNS", "not a network namespace"],
    ),
    (
        "netns-mount-namespace",
        _env(netns="/proc/self/ns/mnt"),
        4,
        ["CNI_NETNS", "/proc/self/ns/mnt", "not a network namespace"],
    ),
    ("json-undecodable", lambda n, p, t: {"conf": b'{"cniVersion": '}, 6, ["JSON"]),
    ("json-bad-utf8", lambda n, p, t: {"conf": b"\xff\xfe{}"}, 6, ["JSON"]),
    ("json-empty", lambda n, p, t: {"conf": b""}, 6, ["JSON"]),
    ("json-array", lambda n, p, t: {"conf": b"[1, 2]"}, 6, ["object"]),
    ("json-string", lambda n, p, t: {"conf": b'"x"'}, 6, ["object"]),
    ("json-huge", _huge, 6, ["larger"]),
    ("name-missing", _conf(name=None), 7, ["name"]),
    ("name-empty", _conf(name=""), 7, ["name"]),
    ("name-bad-chars", _conf(name="my net/../x"), 7, ["name"]),
    ("mtu-string", _conf(mtu="1500"), 7, ["mtu"]),
    ("mtu-bool", _conf(mtu=True), 7, ["mtu"]),
    ("mtu-too-small", _conf(mtu=100), 7, ["mtu"]),
    ("ipmasq-string", _conf(ipMasq="yes"), 7, ["ipMasq"]),
    ("bridge-int", _conf(bridge=5), 7, ["bridge"]),
    ("bridge-bad-name", _conf(bridge="br/0"), 7, ["bridge"]),
    ("cniversion-int", _conf(cniVersion=1), 7, ["cniVersion"]),
    ("subnet-missing", _conf(subnet=None), 7, ["subnet"]),
    ("subnet-31", _conf(subnet="10.244.1.0/31"), 7, ["subnet", "too small"]),
    ("subnet-not-cidr", _conf(subnet="10.244.1.0"), 7, ["subnet"]),
    ("subnet-garbage", _conf(subnet="ten.two"), 7, ["subnet"]),
    ("subnet-host-bits", _conf(subnet="10.244.1.5/24"), 7, ["subnet", "host bits"]),
    ("gateway-outside", _conf(gateway="10.244.2.1"), 7, ["gateway", "outside"]),
    ("gateway-broadcast", _conf(gateway="10.244.1.255"), 7, ["gateway", "broadcast"]),
    ("rangestart-outside", _conf(rangeStart="10.244.9.10"), 7, ["rangeStart", "outside"]),
    (
        "rangestart-after-end",
        _conf(rangeStart="10.244.1.100", rangeEnd="10.244.1.50"),
        7,
        ["rangeStart", "rangeEnd"],
    ),
    (
        "ranges-mixed-families",
        _conf(
            subnet=None, ranges=[[{"subnet": "10.244.1.0/24"}, {"subnet": "fd00:10:244:1::/64"}]]
        ),
        7,
        ["ranges[0]", "IPv6"],
    ),
    ("ranges-and-subnet", _conf(ranges=[[{"subnet": "10.244.1.0/24"}]]), 7, ["subnet"]),
    (
        "ranges-two-v4-sets",
        _conf(subnet=None, ranges=[[{"subnet": "10.244.1.0/24"}], [{"subnet": "10.244.2.0/24"}]]),
        7,
        ["ranges"],
    ),
    ("ipam-type-dhcp", _conf(ipam={"type": "dhcp"}), 7, ["ipam.type", "dhcp"]),
    ("ipam-not-object", _conf(ipam="host-local"), 7, ["ipam"]),
    ("routes-bad-dst", _conf(routes=[{"dst": "10.0.0.0/33"}]), 7, ["routes[0].dst"]),
    ("routes-no-dst", _conf(routes=[{"gw": "10.244.1.1"}]), 7, ["routes[0]"]),
    ("routes-bad-gw", _conf(routes=[{"dst": "10.0.0.0/8", "gw": "nope"}]), 7, ["routes[0].gw"]),
    ("routes-not-list", _conf(routes={"dst": "10.0.0.0/8"}), 7, ["routes"]),
    (
        "dns-bad-nameserver",
        _conf(dns={"nameservers": ["dns.example"]}),
        7,
        ["dns.nameservers", "dns.example"],
    ),
    ("dns-nameservers-string", _conf(dns={"nameservers": "10.96.0.10"}), 7, ["dns.nameservers"]),
    ("datadir-relative", _conf(dataDir="var/lib/pycni"), 7, ["dataDir", "absolute"]),
    (
        "datadir-dotdot",
        lambda n, p, t: {"conf": n.conf(dataDir=n.root + "/../escape")},
        7,
        ["dataDir", ".."],
    ),
    ("loglevel-bogus", _conf(logLevel="chatty"), 7, ["logLevel"]),
    (
        "runtimeconfig-ips-not-list",
        _conf(runtimeConfig={"ips": "10.244.1.9"}),
        7,
        ["runtimeConfig.ips"],
    ),
    ("cni-args-no-equals", _env(env={"CNI_ARGS": "IgnoreUnknown=1;IP"}), 4, ["CNI_ARGS"]),
    ("cni-args-empty-key", _env(env={"CNI_ARGS": "=10.244.1.9"}), 4, ["CNI_ARGS"]),
    ("cni-args-bad-ip", _env(env={"CNI_ARGS": "IP=10.244.1.999"}), 7, ["CNI_ARGS IP"]),
    ("prevresult-not-object", _conf(prevResult=[1]), 6, ["prevResult"]),
    (
        "prevresult-bad-ip",
        _conf(prevResult={"cniVersion": "1.1.0", "ips": [{"address": "nope"}]}),
        6,
        ["prevResult"],
    ),
]


@pytest.mark.parametrize(
    "build, code, words", [c[1:] for c in BAD_INPUT], ids=[c[0] for c in BAD_INPUT]
)
def test_bad_input_is_refused_cleanly(node, tmp_path, build, code, words):
    pod = node.pod()
    before = node.links()
    kw = {"container_id": "c1", "netns": pod, **build(node, pod, tmp_path)}
    command = kw.pop("command", "ADD")
    reply = node.run(command, kw.pop("conf", None), **kw)
    assert_error(reply, code, *words)
    assert not os.path.exists(os.path.join(node.root, "escape"))
    assert_nothing_left(node, pod, before)


def test_truly_absent_cni_command_is_code_4(node):
    pod = node.pod()
    before = node.links()
    reply = raw_run(
        node,
        {"CNI_CONTAINERID": "c1", "CNI_IFNAME": "eth0", "CNI_NETNS": pod},
        json.dumps(node.conf()).encode(),
    )
    assert_error(reply, 4, "CNI_COMMAND")
    assert_nothing_left(node, pod, before)


def test_absent_everything_but_command_is_code_4(node):
    reply = raw_run(node, {"CNI_COMMAND": "ADD"}, json.dumps(node.conf()).encode())
    assert_error(reply, 4, "CNI_CONTAINERID")


@pytest.mark.parametrize("command", ["DEL", "CHECK"])
def test_bad_environment_is_refused_for_del_and_check_too(node, command):
    reply = node.run(
        command,
        node.conf(prevResult={"cniVersion": "1.1.0"}),
        container_id="../../etc",
        netns=node.pod(),
    )
    assert_error(reply, 4, "CNI_CONTAINERID")


def test_unknown_keys_are_ignored(node):
    pod = node.pod()
    conf = node.conf(
        someFutureKey={"nested": [1, 2]},
        capabilities={"portMappings": True},
        runtimeConfig={"portMappings": [], "bandwidth": {}},
        disableCheck=False,
        args={"labels": [{"key": "app", "value": "x"}]},
    )
    out = node.add(pod, "c1", conf)
    assert out["ips"][0]["address"] == FIRST
    ping_gateway(node, pod)


# --- 3. DEL idempotency ---------------------------------------------------------------------


def test_del_twice(node):
    pod = node.pod()
    node.add(pod, "c1")
    host = host_veth_name(node.name, "c1", "eth0")
    assert host in node.links()
    assert_ok(node.run("DEL", container_id="c1", netns=pod))
    assert host not in node.links()
    assert pod_links(node, pod) == ["lo"]
    assert_ok(node.run("DEL", container_id="c1", netns=pod))
    assert_ok(node.run("DEL", container_id="c1", netns=""))


def test_del_after_pod_netns_was_deleted_frees_the_address(node):
    # A /30 has exactly one pod address: a second ADD only works if DEL freed it.
    node.subnet = "10.244.1.0/30"
    pod = node.pod()
    out = node.add(pod, "c1")
    assert out["ips"][0]["address"] == "10.244.1.2/30"
    host = host_veth_name(node.name, "c1", "eth0")
    node.spaces.remove(pod_name(pod))
    # The kernel takes the pair with the namespace, in its own time (cleanup_net is async).
    deadline = time.monotonic() + 10
    while host in node.links() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert host not in node.links()
    assert_error(node.run("ADD", container_id="c2", netns=node.pod()), 100, "10.244.1.0/30")
    assert_ok(node.run("DEL", container_id="c1", netns=pod))
    assert_ok(node.run("DEL", container_id="c1", netns=pod))
    assert_ok(node.run("STATUS"))
    pod2 = node.pod()
    assert node.add(pod2, "c2")["ips"][0]["address"] == "10.244.1.2/30"
    ping_gateway(node, pod2)


def test_del_with_empty_netns_removes_host_veth_by_name(node):
    pod = node.pod()
    node.add(pod, "c1")
    host = host_veth_name(node.name, "c1", "eth0")
    assert host in node.links()
    assert_ok(node.run("DEL", container_id="c1", netns=""))
    assert host not in node.links()
    assert pod_links(node, pod) == ["lo"]
    assert_ok(node.run("DEL", container_id="c1", netns=None))
    probe_free(node, "10.244.1.2")


def test_del_of_never_added_container(node):
    assert_ok(node.run("DEL", container_id="never-added", netns=node.pod()))
    assert_ok(node.run("DEL", container_id="never-added", netns=""))
    # Also when the node has no data dir yet and the netns path does not exist.
    assert_ok(node.run("DEL", container_id="never", netns="/run/netns/pycni-no-such-ns"))


@pytest.mark.parametrize(
    "prev",
    [{"cniVersion": "1.1.0", "ips": [{"address": "nope"}]}, [1, 2], "garbage"],
    ids=["bad-ip", "list", "string"],
)
def test_del_with_damaged_prev_result_still_cleans_up(node, prev):
    """DEL never needs prevResult; a damaged one must not strand the pod's resources (the
    runtime would retry that DEL forever)."""
    pod = node.pod()
    node.add(pod, "c1")
    assert_ok(node.run("DEL", node.conf(prevResult=prev), container_id="c1", netns=pod))
    assert not [link for link in node.links() if link.startswith("veth")]
    assert pod_links(node, pod) == ["lo"]
    probe_free(node, "10.244.1.2")


def test_del_with_or_without_prev_result(node):
    pod1, pod2 = node.pod(), node.pod()
    out1 = node.add(pod1, "c1")
    node.add(pod2, "c2")
    assert_ok(node.run("DEL", node.conf(prevResult=out1), container_id="c1", netns=pod1))
    # A prevResult from some other container does not mislead DEL: it releases by its keys.
    assert_ok(node.run("DEL", node.conf(prevResult=out1), container_id="c2", netns=pod2))
    assert not [link for link in node.links() if link.startswith("veth")]
    assert pod_links(node, pod1) == ["lo"] and pod_links(node, pod2) == ["lo"]
    probe_free(node, "10.244.1.2")
    probe_free(node, "10.244.1.3")


@pytest.mark.parametrize(
    "edit",
    [{"subnet": None}, {"subnet": "10.244.1.0/31"}, {"mtu": "big"}],
    ids=["subnet-removed", "subnet-bad", "mtu-bad"],
)
def test_del_cleans_up_even_when_the_config_no_longer_validates(node, edit):
    """Operators edit configs under running pods; DEL needs only the name and dataDir."""
    pod = node.pod()
    node.add(pod, "c1")
    assert_ok(node.run("DEL", node.conf(**edit), container_id="c1", netns=pod))
    assert not [link for link in node.links() if link.startswith("veth")]
    assert "DEL despite a bad config" in node.log()
    probe_free(node, "10.244.1.2")


def test_del_with_a_bad_name_is_still_an_error(node):
    assert_error(node.run("DEL", node.conf(name="bad/name"), container_id="c1"), 7, "name")


@pytest.mark.parametrize("version", ["0.3.1", "1.0.0"])
def test_environment_errors_answer_in_the_asked_version(node, version):
    reply = node.run("ADD", node.conf(cniVersion=version), container_id="bad id")
    assert_error(reply, 4, "CNI_CONTAINERID", version=version)


# --- 4. duplicate ADD -----------------------------------------------------------------------


def test_add_twice_is_102_and_first_attachment_survives(node):
    pod = node.pod()
    out = node.add(pod, "c1")
    host = host_veth_name(node.name, "c1", "eth0")
    links = node.links()
    assert_error(node.run("ADD", container_id="c1", netns=pod), 102, "c1", "eth0")
    # Also from another netns (a runtime bug): still 102, still nothing touched.
    assert_error(node.run("ADD", container_id="c1", netns=node.pod()), 102)
    assert node.links() == links and host in links
    ping_gateway(node, pod)
    assert_ok(node.run("CHECK", node.conf(prevResult=out), container_id="c1", netns=pod))


def test_same_container_second_ifname(node):
    pod = node.pod()
    out0 = node.add(pod, "c1")
    out1 = node.add(pod, "c1", ifname="eth1")
    assert out0["ips"][0]["address"] == FIRST
    assert out1["ips"][0]["address"] == "10.244.1.3/24"
    assert out1["interfaces"][2]["name"] == "eth1"
    assert host_veth_name(node.name, "c1", "eth0") != host_veth_name(node.name, "c1", "eth1")
    assert sorted(pod_links(node, pod)) == ["eth0", "eth1", "lo"]
    addrs = pod_exec(node, pod, "ip", "-o", "-4", "addr", "show", "eth1").stdout
    assert "10.244.1.3/24" in addrs
    ping_gateway(node, pod)
    assert_ok(node.run("DEL", container_id="c1", ifname="eth1", netns=pod))
    assert sorted(pod_links(node, pod)) == ["eth0", "lo"]
    ping_gateway(node, pod)


@pytest.mark.parametrize(
    "ifname, setup",
    [
        ("eth0", ("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "peer0")),
        ("lo", None),
    ],
    ids=["eth0-exists", "lo"],
)
def test_add_onto_existing_pod_interface_fails_cleanly(node, ifname, setup):
    pod = node.pod()
    if setup:
        pod_exec(node, pod, *setup)
    before_pod = sorted(pod_links(node, pod))
    node.add(node.pod(), "other")  # so the bridge exists and only this ADD's leftovers count
    before = node.links()
    reply = node.run("ADD", container_id="c1", ifname=ifname, netns=pod)
    assert_error(reply, 103, ifname)
    assert node.links() == before
    assert sorted(pod_links(node, pod)) == before_pod
    probe_free(node, "10.244.1.3")


# --- 5. CHECK -------------------------------------------------------------------------------


@pytest.fixture
def added(node):
    pod = node.pod()
    out = node.add(pod, "c1")
    return node, pod, out


def _check(node, pod, out, cid="c1"):
    return node.run("CHECK", node.conf(prevResult=out), container_id=cid, netns=pod)


def test_check_passes_after_add(added):
    node, pod, out = added
    assert_ok(_check(node, pod, out))


def test_check_detects_deleted_address(added):
    node, pod, out = added
    pod_exec(node, pod, "ip", "addr", "del", FIRST, "dev", "eth0")
    assert_error(_check(node, pod, out), 104, "10.244.1.2/24")


def test_check_detects_deleted_default_route(added):
    node, pod, out = added
    pod_exec(node, pod, "ip", "route", "del", "default")
    assert_error(_check(node, pod, out), 104, "route", "0.0.0.0/0")


def test_check_detects_pod_interface_down(added):
    node, pod, out = added
    pod_exec(node, pod, "ip", "link", "set", "eth0", "down")
    assert_error(_check(node, pod, out), 104, "eth0", "down")


def test_check_detects_deleted_host_veth(added):
    node, pod, out = added
    host = host_veth_name(node.name, "c1", "eth0")
    node.exec("ip", "link", "del", host)
    assert_error(_check(node, pod, out), 104, host)


def test_check_detects_host_veth_off_bridge(added):
    node, pod, out = added
    node.exec("ip", "link", "set", host_veth_name(node.name, "c1", "eth0"), "nomaster")
    assert_error(_check(node, pod, out), 104, "bridge")


def test_check_detects_mac_mismatch(added):
    node, pod, out = added
    bad = json.loads(json.dumps(out))
    assert bad["interfaces"][2]["name"] == "eth0"
    bad["interfaces"][2]["mac"] = "0a:00:00:00:00:01"
    assert_error(_check(node, pod, bad), 104, "MAC")


def test_check_detects_address_mismatch_in_prev_result(added):
    node, pod, out = added
    bad = json.loads(json.dumps(out))
    bad["ips"][0]["address"] = "10.244.1.50/24"
    assert_error(_check(node, pod, bad), 104, "10.244.1.2/24")


def test_check_without_prev_result_is_7(added):
    node, pod, _ = added
    assert_error(node.run("CHECK", container_id="c1", netns=pod), 7, "prevResult")


def test_check_unknown_container_is_3(added):
    node, pod, out = added
    assert_error(_check(node, pod, out, cid="stranger"), 3, "stranger")


# --- 6. GC ----------------------------------------------------------------------------------


def test_gc_releases_what_is_not_listed(node):
    pod1, pod2 = node.pod(), node.pod()
    assert node.add(pod1, "c1")["ips"][0]["address"] == FIRST
    assert node.add(pod2, "c2")["ips"][0]["address"] == "10.244.1.3/24"
    h1, h2 = (host_veth_name(node.name, c, "eth0") for c in ("c1", "c2"))
    assert_ok(
        node.run(
            "GC",
            node.conf(
                **{
                    VALID: [
                        {"containerID": "c1", "ifname": "eth0"},
                        {"containerID": "other", "ifname": "eth0"},
                    ]
                }
            ),
        )
    )
    links = node.links()
    assert h1 in links and h2 not in links
    assert pod_links(node, pod2) == ["lo"]
    ping_gateway(node, pod1)
    # c2's address is free again: it can be asked for by name.
    pod3 = node.pod()
    out = node.add(pod3, "c3", node.conf(runtimeConfig={"ips": ["10.244.1.3"]}))
    assert out["ips"][0]["address"] == "10.244.1.3/24"
    # c1's is still held.
    reply = node.run(
        "ADD", node.conf(runtimeConfig={"ips": ["10.244.1.2"]}), container_id="c4", netns=node.pod()
    )
    assert_error(reply, 101, "10.244.1.2", "c1")
    # c2 is now unknown to the store: DEL still succeeds.
    assert_ok(node.run("DEL", container_id="c2", netns=pod2))


def test_gc_with_a_malformed_list_is_7_and_removes_nothing(node):
    pod1, pod2 = node.pod(), node.pod()
    node.add(pod1, "c1")
    node.add(pod2, "c2")
    links = node.links()
    assert_error(node.run("GC", node.conf(**{VALID: "c1"})), 7, VALID)
    assert_error(node.run("GC", node.conf(**{VALID: [{"containerID": "c1"}]})), 7, VALID)
    assert node.links() == links
    ping_gateway(node, pod1)
    ping_gateway(node, pod2)
    for addr in ("10.244.1.2", "10.244.1.3"):
        reply = node.run(
            "ADD", node.conf(runtimeConfig={"ips": [addr]}), container_id="c9", netns=node.pod()
        )
        assert_error(reply, 101, addr)


@pytest.mark.parametrize("how", ["null", "absent"])
def test_gc_with_a_null_or_absent_list_releases_everything(node, how):
    """libcni sends the list as null (a nil slice) or not at all (nil GCArgs, `cnitool gc`)
    when it has no live attachment of the network: the reference host-local then releases every
    address, and so does pycni."""
    pod1, pod2 = node.pod(), node.pod()
    node.add(pod1, "c1")
    node.add(pod2, "c2")
    conf = node.conf()
    assert VALID not in conf
    if how == "null":
        conf[VALID] = None
    assert_ok(node.run("GC", conf))
    assert not [link for link in node.links() if link.startswith("veth")]
    assert pod_links(node, pod1) == pod_links(node, pod2) == ["lo"]
    probe_free(node, "10.244.1.2")


def test_gc_removes_orphan_host_veth(node):
    pod = node.pod()
    node.add(pod, "c1")
    node.exec("ip", "link", "add", "vethorphan0", "type", "veth", "peer", "name", "orphanpeer")
    node.exec("ip", "link", "set", "vethorphan0", "alias", "pycni testnet orphan eth0")
    # Another network's veth (even one whose name extends ours) is not ours to remove.
    node.exec("ip", "link", "add", "vethother0", "type", "veth", "peer", "name", "otherpeer")
    node.exec("ip", "link", "set", "vethother0", "alias", "pycni testnet2 orphan eth0")
    assert_ok(node.run("GC", node.conf(**{VALID: [{"containerID": "c1", "ifname": "eth0"}]})))
    links = node.links()
    assert "vethorphan0" not in links and "orphanpeer" not in links
    assert "vethother0" in links
    assert host_veth_name(node.name, "c1", "eth0") in links
    ping_gateway(node, pod)


def test_gc_with_empty_list_releases_everything(node):
    pod = node.pod()
    node.add(pod, "c1")
    assert_ok(node.run("GC", node.conf(**{VALID: []})))
    assert not [link for link in node.links() if link.startswith("veth")]
    assert pod_links(node, pod) == ["lo"]
    probe_free(node, "10.244.1.2")


# --- 7. STATUS ------------------------------------------------------------------------------


def test_status_empty_node_is_ready(node):
    assert_ok(node.run("STATUS", container_id=None, ifname=None, netns=None))


def test_status_reports_exhaustion_and_recovers(node):
    node.subnet = "10.244.1.0/30"
    assert_ok(node.run("STATUS"))
    pod = node.pod()
    node.add(pod, "c1")
    assert_error(node.run("STATUS"), 50, "exhausted", "10.244.1.0/30")
    assert_error(node.run("ADD", container_id="c2", netns=node.pod()), 100)
    assert_ok(node.run("DEL", container_id="c1", netns=pod))
    assert_ok(node.run("STATUS"))


# --- 8. chained prevResult on ADD -----------------------------------------------------------


def test_add_chains_prev_result(node):
    pod = node.pod()
    prev = {
        "cniVersion": "1.1.0",
        "interfaces": [{"name": "tap0", "mac": "0a:00:00:00:00:07", "sandbox": pod}],
        "ips": [{"address": "192.168.50.5/24", "gateway": "192.168.50.1", "interface": 0}],
        "routes": [{"dst": "192.168.0.0/16", "gw": "192.168.50.1"}],
        "dns": {"nameservers": ["192.168.50.53"]},
    }
    out = node.add(pod, "c1", node.conf(prevResult=prev, dns={"search": ["svc.local"]}))
    assert out["interfaces"][0] == prev["interfaces"][0]
    assert [i["name"] for i in out["interfaces"]][1:] == [
        "cni0",
        host_veth_name(node.name, "c1", "eth0"),
        "eth0",
    ]
    assert out["ips"][0] == prev["ips"][0]
    assert out["ips"][1] == {"address": FIRST, "gateway": GW, "interface": 3}
    assert out["interfaces"][out["ips"][1]["interface"]]["sandbox"] == pod
    assert out["routes"][0] == prev["routes"][0]
    assert {"dst": "0.0.0.0/0", "gw": GW} in out["routes"]
    assert out["dns"] == {"nameservers": ["192.168.50.53"], "search": ["svc.local"]}
    ping_gateway(node, pod)
    assert_ok(node.run("CHECK", node.conf(prevResult=out), container_id="c1", netns=pod))


def test_add_chains_legacy_prev_result(node):
    pod = node.pod()
    prev = {
        "cniVersion": "0.3.1",
        "interfaces": [{"name": "tap0", "sandbox": pod}],
        "ips": [{"version": "4", "address": "192.168.50.5/24", "interface": 0}],
    }
    out = node.add(pod, "c1", node.conf(cniVersion="0.3.1", prevResult=prev))
    assert out["cniVersion"] == "0.3.1"
    assert out["ips"][0] == prev["ips"][0]
    assert out["ips"][1] == {"version": "4", "address": FIRST, "gateway": GW, "interface": 3}


# --- 9. requested addresses and MAC ---------------------------------------------------------


REQUESTS = {
    "runtimeConfig.ips": {"conf": {"runtimeConfig": {"ips": ["10.244.1.77/24"]}}},
    "args.cni.ips": {"conf": {"args": {"cni": {"ips": ["10.244.1.77"]}}}},
    "CNI_ARGS": {
        "env": {
            "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web;IP=10.244.1.77"
        }
    },
}


def _request_kw(node: Node, how: str, ip: str | None = None) -> dict:
    spec = json.loads(json.dumps(REQUESTS[how]).replace("10.244.1.77", ip or "10.244.1.77"))
    return {"conf": node.conf(**spec.get("conf", {})), "env": spec.get("env")}


@pytest.mark.parametrize("how", list(REQUESTS))
def test_requested_address_is_honoured(node, how):
    pod = node.pod()
    kw = _request_kw(node, how)
    out = node.add(pod, "c1", kw["conf"], env=kw["env"])
    assert out["ips"][0]["address"] == "10.244.1.77/24"
    assert "10.244.1.77/24" in pod_exec(node, pod, "ip", "-o", "addr", "show", "eth0").stdout
    ping_gateway(node, pod)
    # The same address for another container: 101 and nothing left behind.
    pod2 = node.pod()
    links = node.links()
    reply = node.run("ADD", kw["conf"], container_id="c2", netns=pod2, env=kw["env"])
    assert_error(reply, 101, "10.244.1.77", "in use")
    assert node.links() == links
    assert pod_links(node, pod2) == ["lo"]
    ping_gateway(node, pod)


@pytest.mark.parametrize(
    "ip, words",
    [
        ("10.244.2.5", ["10.244.2.5", "not in any range"]),
        ("10.244.1.1", ["reserved"]),
        ("10.244.1.255", ["10.244.1.255", "not in any range"]),
        ("fd00::5", ["fd00::5"]),
    ],
    ids=["other-subnet", "gateway", "broadcast", "wrong-family"],
)
def test_requested_address_outside_range_is_101(node, ip, words):
    pod = node.pod()
    before = node.links()
    kw = _request_kw(node, "runtimeConfig.ips", ip)
    reply = node.run("ADD", kw["conf"], container_id="c1", netns=pod)
    assert_error(reply, 101, *words)
    assert_nothing_left(node, pod, before)


def test_requested_address_outside_range_start_end_is_101(node):
    pod = node.pod()
    before = node.links()
    conf = node.conf(
        rangeStart="10.244.1.10", rangeEnd="10.244.1.20", runtimeConfig={"ips": ["10.244.1.5"]}
    )
    assert_error(node.run("ADD", conf, container_id="c1", netns=pod), 101, "10.244.1.5")
    assert node.links() == before
    assert pod_links(node, pod) == ["lo"]
    out = node.add(pod, "c1", node.conf(rangeStart="10.244.1.10", rangeEnd="10.244.1.20"))
    assert out["ips"][0]["address"] == "10.244.1.10/24"


def test_runtime_config_mac_is_honoured(node):
    pod = node.pod()
    mac = "0a:58:0a:f4:01:99"
    out = node.add(pod, "c1", node.conf(runtimeConfig={"mac": mac.upper()}))
    assert out["interfaces"][2]["mac"] == mac
    assert f"link/ether {mac}" in pod_exec(node, pod, "ip", "link", "show", "eth0").stdout
    ping_gateway(node, pod)
    assert_ok(node.run("CHECK", node.conf(prevResult=out), container_id="c1", netns=pod))


@pytest.mark.parametrize(
    "mac",
    ["zz:58:0a:f4:01:99", "0a:58:0a:f4:01", "01:00:5e:00:00:01", 42],
    ids=["not-hex", "short", "multicast", "int"],
)
def test_invalid_mac_is_7(node, mac):
    pod = node.pod()
    before = node.links()
    reply = node.run("ADD", node.conf(runtimeConfig={"mac": mac}), container_id="c1", netns=pod)
    assert_error(reply, 7, "runtimeConfig.mac")
    assert_nothing_left(node, pod, before)
