"""libcni 1.3's calls, made by libcni itself, to pycni and to the reference chain side by side.

tools/libcni-client (built by ./dev peers) makes one libcni call per run: ADD, CHECK, DEL (with
and without a cached result, so with and without prevResult), STATUS and GC with the valid
list present, empty, null (a nil slice) or absent (nil GCArgs, as `cnitool gc` calls it). Each
test runs the same calls on two nodes, one with pycni's config list and one with the reference
bridge + host-local, and asserts that pycni answers as the reference does: success or the same
error, and the same attachments still holding an address afterwards.

The reference runs at both versions: Debian's 1.1.1 (spec 1.0.0: libcni then makes no GC or
STATUS plugin call) and the pinned newest (spec 1.1.0). pycni's list says the same version.
Chaining: pycni followed by the reference tuning and portmap plugins, both versions.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass

import pytest

from conftest import Namespaces, have, peer_params, unique
from pycni.bench.cri import reference_conflist
from pycni.harness import peers
from pycni.ipam.store import Store
from pycni.node_config import node_conflist

pytestmark = [pytest.mark.netns, pytest.mark.reference]

SUBNET = "10.244.7.0/24"
PLUGINS = peer_params("plugins")
ABSENT = object()  # GC without GCArgs: libcni sends no valid-attachments key


@pytest.fixture(scope="module")
def client() -> str:
    try:
        return peers.binary("libcni-client", "libcni-client")
    except peers.MissingPeer as exc:
        if peers.required():
            pytest.fail(str(exc), pytrace=False)
        pytest.skip(str(exc))


def spec_version(plugin_dir: str) -> str:
    """What a config list for these plugins says: 1.1.1 knows no GC or STATUS (spec 1.1.0)."""
    return "1.0.0" if plugin_dir == peers.DEBIAN_PLUGINS else "1.1.0"


@dataclass
class Chain:
    """One node's network as a runtime sees it: a config list, CNI_PATH, a libcni cache."""

    label: str
    ns: str
    root: str
    conflist: dict
    cni_path: list[str]
    client: str
    spaces: Namespaces

    @property
    def network(self) -> str:
        return self.conflist["name"]

    def call(self, op: str, cid: str = "", pod: str = "", *, cache="cache", gc=None) -> dict:
        request = {
            "op": op,
            "conflist": self.conflist,
            "cniPath": self.cni_path,
            "cacheDir": os.path.join(self.root, cache),
            "runtime": {
                "containerID": cid,
                "netns": f"/run/netns/{pod}" if pod else "",
                "ifName": "eth0",
                "args": [
                    ["IgnoreUnknown", "1"],
                    ["K8S_POD_NAME", cid or "none"],
                    ["K8S_POD_NAMESPACE", "default"],
                ],
                "capabilityArgs": {},
            },
        }
        if gc is not ABSENT and op == "gc":
            request["gc"] = {"validAttachments": gc}
        proc = self.spaces.exec(
            self.ns, self.client, input=json.dumps(request), check=False, timeout=120
        )
        assert proc.stdout, f"{self.label} {op}: no answer ({proc.stderr})"
        return json.loads(proc.stdout)

    def add(self, cid: str) -> str:
        pod = self.spaces.make("lp")
        answer = self.call("add", cid, pod)
        assert answer["ok"], f"{self.label} ADD {cid}: {answer}"
        return pod

    def held(self) -> set[str]:
        """Container IDs that hold an address."""
        if self.label == "pycni":
            with Store(os.path.join(self.root, "data")) as store:
                return {a.container_id for a in store.list_attachments(self.network)}
        found = set()
        directory = os.path.join(self.root, "ipam", self.network)
        for name in os.listdir(directory) if os.path.isdir(directory) else []:
            if name[0].isdigit():  # address files; not "last_reserved_ip.0" or "lock"
                with open(os.path.join(directory, name)) as f:
                    found.add(f.read().splitlines()[0].strip())
        return found

    def veths(self) -> set[str]:
        out = self.spaces.exec(self.ns, "ip", "-o", "link", "show", "type", "veth").stdout
        return {line.split(": ")[1].split("@")[0] for line in out.splitlines()}


def make_chain(label, spaces, tmp_path, client, plugin_dir, plugin_bin, extra=()) -> Chain:
    ns = spaces.make("ln")
    spaces.exec(ns, "ip", "link", "set", "lo", "up")
    root = str(tmp_path / label)
    os.makedirs(root)
    network = unique("lc")
    version = spec_version(plugin_dir)
    if label == "pycni":
        conflist = node_conflist(
            network,
            SUBNET,
            None,
            bridge="cni0",
            dataDir=os.path.join(root, "data"),
            logFile=os.path.join(root, "pycni.log"),
        )
        conflist.pop("cniVersions", None)
        cni_path = [os.path.dirname(plugin_bin), plugin_dir]
    else:
        # The same reference chain `pycnictl bench cri` measures.
        conflist = dict(reference_conflist(root, SUBNET), name=network)
        cni_path = [plugin_dir]
    conflist["cniVersion"] = version
    conflist["plugins"] += list(extra)
    return Chain(label, ns, root, conflist, cni_path, client, spaces)


@pytest.fixture(params=PLUGINS)
def chains(request, netns, tmp_path, client, plugin_bin) -> tuple[Chain, Chain]:
    plugin_dir = request.param
    return tuple(
        make_chain(label, netns, tmp_path, client, plugin_dir, plugin_bin)
        for label in ("pycni", "reference")
    )


def both(chains, fn) -> list:
    return [fn(c) for c in chains]


def outcome(answer: dict) -> str:
    """What a runtime acts on: success, or the CNI error code."""
    if answer["ok"]:
        return "ok"
    return f"error {answer.get('error', {}).get('code', '?')}"


# --- ADD, CHECK, STATUS, DEL ----------------------------------------------------------------


def test_add_check_status_and_del_answer_alike(chains):
    pods = both(chains, lambda c: c.add("c1"))
    for op in ("check", "status"):
        answers = [c.call(op, "c1", pod) for c, pod in zip(chains, pods, strict=True)]
        assert [outcome(a) for a in answers] == ["ok", "ok"], (op, answers)
    # CHECK of an attachment the plugin never made: both refuse (the codes may differ: the
    # reference reports the interface it cannot find, pycni the unknown container).
    strangers = [c.call("check", "stranger", pod) for c, pod in zip(chains, pods, strict=True)]
    assert [a["ok"] for a in strangers] == [False, False], strangers
    answers = [c.call("del", "c1", pod) for c, pod in zip(chains, pods, strict=True)]
    assert [outcome(a) for a in answers] == ["ok", "ok"], answers
    assert both(chains, Chain.held) == [set(), set()]


def test_del_without_prev_result_and_twice(chains):
    """A runtime that lost its cache (a new cache dir) DELs without prevResult; a second DEL,
    and a DEL whose netns is gone, succeed too."""
    pods = both(chains, lambda c: c.add("c1"))
    answers = [c.call("del", "c1", pod, cache="other") for c, pod in zip(chains, pods, strict=True)]
    assert [outcome(a) for a in answers] == ["ok", "ok"], answers
    assert both(chains, Chain.held) == [set(), set()]
    for c, pod in zip(chains, pods, strict=True):
        c.spaces.remove(pod)
    answers = [c.call("del", "c1", pod) for c, pod in zip(chains, pods, strict=True)]
    assert [outcome(a) for a in answers] == ["ok", "ok"], answers


# --- GC ---------------------------------------------------------------------------------------

GC_LISTS = {
    "present": [{"containerID": "c1", "ifname": "eth0"}],
    "empty": [],
    "null": None,
    "absent": ABSENT,
}


@pytest.mark.parametrize("cache", ["kept", "lost"])
@pytest.mark.parametrize("given", list(GC_LISTS))
def test_gc_answers_and_releases_alike(chains, given, cache):
    """Two attachments, then GC with the list as given. With libcni's cache kept, libcni DELs
    what it cached and is not listed before the plugins' GC, and both chains end alike. With
    the cache lost (a new cache dir) only a plugin's own GC can free the leaked attachments:
    the reference bridge has none (1.10.0 answers GC with success and frees nothing, "FIXME GC"
    in its source; 1.1.1 predates GC), pycni frees what is not listed (spec 1.1.0)."""
    for c in chains:
        c.add("c1")
        c.add("c2")
    assert both(chains, Chain.held) == [{"c1", "c2"}] * 2
    where = "cache" if cache == "kept" else "fresh"
    answers = [c.call("gc", cache=where, gc=GC_LISTS[given]) for c in chains]
    assert [outcome(a) for a in answers] == ["ok", "ok"], answers
    pycni, reference = both(chains, Chain.held)
    listed = {"c1"} if given == "present" else set()
    if cache == "kept":
        assert pycni == reference == listed
    else:
        assert reference == {"c1", "c2"}, "the reference bridge gained a GC: compare again"
        plugin_gc = spec_version(chains[0].cni_path[-1]) == "1.1.0"
        assert pycni == (listed if plugin_gc else {"c1", "c2"})


@pytest.mark.parametrize("given", list(GC_LISTS))
def test_gc_lists_read_as_host_local_reads_them(netns, tmp_path, client, plugin_bin, given):
    """host-local is the one reference plugin with a GC. Called through libcni with a lost cache,
    it keeps exactly the listed attachments, reading null and absent as empty; pycni too."""
    plugin_dir = peers.plugin_dirs().get(peers.pins()["cni-plugins"].version.removeprefix("v"))
    if plugin_dir is None:
        pytest.skip("the pinned reference plugins are not built")
    pycni = make_chain("pycni", netns, tmp_path, client, plugin_dir, plugin_bin)
    ipam = {"type": "host-local", "subnet": SUBNET, "dataDir": str(tmp_path / "hl" / "ipam")}
    host_local = Chain(
        "host-local",
        pycni.ns,
        str(tmp_path / "hl"),
        {
            "cniVersion": "1.1.0",
            "name": unique("hl"),
            "plugins": [{"type": "host-local", "ipam": ipam}],
        },
        [plugin_dir],
        client,
        netns,
    )
    for c in (pycni, host_local):
        c.add("c1")
        c.add("c2")
        answer = c.call("gc", cache="fresh", gc=GC_LISTS[given])
        assert outcome(answer) == "ok", (c.label, answer)
    listed = {"c1"} if given == "present" else set()
    assert pycni.held() == host_local.held() == listed


# --- chaining the reference meta plugins after pycni --------------------------------------------


def test_pycni_chained_with_tuning_and_portmap(netns, tmp_path, client, plugin_bin, plugin_dir):
    """pycni, then the reference tuning (a sysctl and the MTU in the pod) and portmap (a
    hostPort, with pycni's own portMappings capability off): ADD, the hostPort answers from the
    node, CHECK, DEL leaves no rule of portmap's and no address held."""
    if not have("iptables"):
        pytest.skip("portmap needs iptables")
    extra = [
        {"type": "tuning", "mtu": 1400, "sysctl": {"net.ipv4.conf.eth0.accept_redirects": "0"}},
        {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True},
    ]
    chain = make_chain("pycni", netns, tmp_path, client, plugin_dir, plugin_bin, extra)
    chain.conflist["plugins"][0].pop("capabilities", None)
    node_ip = "192.168.217.1"
    outside = netns.make("lx")
    netns.exec(chain.ns, "ip", "link", "add", "up0", "type", "veth", "peer", "name", "up1")
    netns.exec(chain.ns, "ip", "link", "set", "up1", "netns", outside)
    netns.exec(chain.ns, "ip", "addr", "add", f"{node_ip}/24", "dev", "up0")
    netns.exec(chain.ns, "ip", "link", "set", "up0", "up")
    netns.exec(outside, "ip", "addr", "add", "192.168.217.2/24", "dev", "up1")
    netns.exec(outside, "ip", "link", "set", "up1", "up")
    netns.exec(outside, "ip", "link", "set", "lo", "up")
    netns.exec(chain.ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")

    pod = netns.make("lp")
    request_caps = {"portMappings": [{"hostPort": 18080, "containerPort": 8080, "protocol": "tcp"}]}
    answer = _call_with_caps(chain, "add", "c1", pod, request_caps)
    assert answer["ok"], answer
    assert "1400" in netns.exec(pod, "cat", "/sys/class/net/eth0/mtu").stdout
    assert netns.exec(pod, "sysctl", "-n", "net.ipv4.conf.eth0.accept_redirects").stdout == "0\n"
    server = subprocess.Popen(
        ["ip", "netns", "exec", pod, "python3", "-c", _SERVER],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert _fetch(netns, outside, node_ip, 18080) == "pod", "the hostPort through portmap"
        answer = _call_with_caps(chain, "check", "c1", pod, request_caps)
        if plugin_dir == peers.DEBIAN_PLUGINS:
            # portmap 1.1.1's own CHECK looks for an IPv6 chain an IPv4-only pod never gets.
            assert "could not check ipv6 dnat" in answer.get("text", ""), answer
        else:
            assert answer["ok"], answer
    finally:
        server.kill()
        server.wait()
    answer = _call_with_caps(chain, "del", "c1", pod, request_caps)
    assert answer["ok"], answer
    assert chain.held() == set()
    rules = netns.exec(chain.ns, "iptables-save", "-t", "nat", check=False).stdout
    assert "CNI-DN-" not in rules, rules


_SERVER = (
    "import socket\n"
    "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind(('0.0.0.0', 8080)); s.listen()\n"
    "while True:\n"
    "    c, _ = s.accept(); c.sendall(b'pod'); c.close()\n"
)


def _call_with_caps(chain: Chain, op: str, cid: str, pod: str, caps: dict) -> dict:
    request = {
        "op": op,
        "conflist": chain.conflist,
        "cniPath": chain.cni_path,
        "cacheDir": os.path.join(chain.root, "cache"),
        "runtime": {
            "containerID": cid,
            "netns": f"/run/netns/{pod}",
            "ifName": "eth0",
            "args": [],
            "capabilityArgs": caps,
        },
    }
    proc = chain.spaces.exec(chain.ns, chain.client, input=json.dumps(request), check=False)
    return json.loads(proc.stdout)


def _fetch(spaces: Namespaces, ns: str, host: str, port: int, attempts: int = 50) -> str | None:
    code = (
        "import socket,sys\n"
        f"s = socket.create_connection(({host!r}, {port}), timeout=2)\n"
        "sys.stdout.write(s.recv(16).decode())\n"
    )
    for _ in range(attempts):
        out = spaces.exec(ns, "python3", "-c", code, check=False)
        if out.returncode == 0:
            return out.stdout
        time.sleep(0.1)
    return None


@pytest.fixture(params=PLUGINS)
def plugin_dir(request) -> str:
    return request.param
