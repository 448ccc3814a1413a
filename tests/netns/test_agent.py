"""The node agent as runtimes meet it: the same answers as the in-process plugin for every
command, concurrency, restarts in the middle of a pod storm (SIGTERM and SIGKILL), traffic
across a restart, the fallback paths, and a socket that only root may use.

Every call runs the installed plugin inside a sandboxed node netns (see conftest)."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import TEST_FAULTS, AgentProcess, Node, Reply, UnixServer, pod_name
from pycni import shim
from pycni.cni import versions
from pycni.dataplane.names import host_veth_name

pytestmark = pytest.mark.netns

SUPPORTED = list(versions.SUPPORTED)
VALID = "cni.dev/valid-attachments"


# --- helpers -------------------------------------------------------------------------------


def assert_error(reply: Reply, code: int, *words: str) -> dict:
    assert reply.rc != 0, reply
    assert "Traceback" not in reply.stdout + reply.stderr, reply
    lines = [line for line in reply.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, reply
    err = json.loads(lines[0])
    assert set(err) <= {"cniVersion", "code", "msg", "details"}, err
    assert err["code"] == code, err
    assert err["cniVersion"] in SUPPORTED, err
    for word in words:
        assert word in err["msg"], (word, err)
    return err


def assert_ok(reply: Reply) -> None:
    assert reply.rc == 0, reply
    assert "Traceback" not in reply.stdout + reply.stderr, reply


def second_node(node: Node, tmp_path) -> Node:
    """Another node like `node` (same network, bridge and names), with its own netns and
    state: runs the same inputs in-process (its agentSocket leads nowhere)."""
    ns = node.spaces.make("nodeb")
    node.spaces.exec(ns, "ip", "link", "set", "lo", "up")
    root = tmp_path / "b"
    root.mkdir()
    other = Node(ns=ns, root=str(root), plugin=node.plugin, spaces=node.spaces, bridge=node.bridge)
    other.base["agentSocket"] = str(root / "no-agent.sock")
    return other


def plugin_log(node: Node) -> str:
    """The log file the config names: written only by a plugin working in-process (an agent
    logs to its own file). Node.log() reads both."""
    path = os.path.join(node.root, "pycni.log")
    return open(path).read() if os.path.exists(path) else ""


def launcher_python(plugin: str) -> str:
    with open(plugin) as f:
        return f.readline()[2:].split()[0]


def traced_run(node: Node, command: str, conf=None, **kw) -> tuple[Reply, set[str]]:
    """Node.run, but through `python -X importtime` on the launcher: also returns the modules
    the executable imported, which tells whether the plugin ran in this process."""
    python = launcher_python(node.plugin)
    real = node.plugin
    wrapper = os.path.join(node.root, "traced-pycni")
    if not os.path.exists(wrapper):
        with open(wrapper, "w") as f:
            f.write(f"#!/bin/sh\nexec {python} -X importtime -IS {real}\n")
        os.chmod(wrapper, 0o755)
    node.plugin = wrapper
    try:
        reply = node.run(command, conf, **kw)
    finally:
        node.plugin = real
    modules = set()
    other = []
    for line in reply.stderr.splitlines():
        if line.startswith("import time:"):
            modules.add(line.rsplit("|", 1)[1].strip())
        else:
            other.append(line)
    return Reply(reply.rc, reply.out, reply.stdout, "\n".join(other)), modules


def store_rows(node: Node, network: str | None = None) -> tuple[list, list]:
    """(attachments as (container, ifname, host veth), allocated ips) in the node's store."""
    path = os.path.join(node.root, "data", "pycni.db")
    if not os.path.exists(path):
        return [], []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        net = network or node.name
        atts = db.execute(
            "SELECT container_id, ifname, host_veth FROM attachments WHERE network = ?", (net,)
        ).fetchall()
        ips = [r[0] for r in db.execute("SELECT ip FROM allocations WHERE network = ?", (net,))]
    finally:
        db.close()
    return atts, ips


def bridge_ports(node: Node) -> list[str]:
    out = node.exec("ip", "-o", "link", "show", "master", node.bridge, check=False).stdout
    return [line.split(": ")[1].split("@")[0] for line in out.splitlines()]


def veths(node: Node) -> list[str]:
    return [link for link in node.links() if link.startswith("veth")]


def pod_addresses(node: Node, pod: str) -> dict[str, list[str]]:
    """Interface -> IPv4 addresses in the pod netns (lo left out)."""
    out = node.spaces.exec(pod_name(pod), "ip", "-o", "-4", "addr", "show").stdout
    addrs: dict[str, list[str]] = {}
    for line in out.splitlines():
        fields = line.split()
        if fields[1] != "lo":
            addrs.setdefault(fields[1], []).append(fields[3])
    return addrs


def pod_links(node: Node, pod: str) -> list[str]:
    out = node.spaces.exec(pod_name(pod), "ip", "-o", "link", "show").stdout
    return [line.split(": ")[1].split("@")[0] for line in out.splitlines()]


def raw_call(path: str, data: bytes, timeout: float = 10, shut: bool = True) -> bytes:
    """Send raw bytes to the agent socket; everything it answers until it closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        try:
            s.sendall(data)
            if shut:
                s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the agent may close early on a bad header; read what it said
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass
        return b"".join(chunks)


def health(path: str) -> dict | None:
    try:
        head, _, body = raw_call(path, b"PYCNI/1 HEALTH 0 0\n", timeout=2).partition(b"\n")
    except OSError:
        return None
    return json.loads(body) if head == b"0" else None


def wait_serving(agent: AgentProcess, timeout: float = 15) -> dict:
    """Until the agent process we started (not a predecessor) answers on the socket."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = health(agent.socket)
        if h and h["pid"] == agent.proc.pid:
            return h
        assert agent.proc.poll() is None, agent.proc.stderr.read().decode()
        time.sleep(0.02)
    raise AssertionError("restarted agent never answered")


def wait_inflight(agent: AgentProcess, at_least: int, timeout: float = 20) -> int:
    """Until the agent has at least this many calls in flight (the HEALTH call included)."""
    deadline = time.monotonic() + timeout
    seen = 0
    while time.monotonic() < deadline:
        h = health(agent.socket)
        seen = h["inflight"] if h else 0
        if seen >= at_least:
            return seen
        time.sleep(0.005)
    raise AssertionError(f"the agent never had {at_least} calls in flight (saw {seen})")


def wait_backlog(node: Node, path: str, n: int, timeout: float = 15) -> int:
    """Until `n` connections wait in the listen backlog of the socket at `path` (the agent's
    netns holds it; `ss` shows the backlog as the listener's Recv-Q)."""
    deadline = time.monotonic() + timeout
    queued = 0
    while time.monotonic() < deadline:
        for line in node.exec("ss", "-xlnH").stdout.splitlines():
            fields = line.split()
            # The name ss shows is the one bound: the agent binds a temporary name and
            # renames it into place.
            if fields[4] == path or fields[4].startswith(path + "."):
                queued = int(fields[2])
        if queued >= n:
            return queued
        time.sleep(0.05)
    raise AssertionError(f"only {queued} of {n} callers queued")


def restart(agent: AgentProcess, sig: int, gap: float = 0.0) -> None:
    """Restart the agent with `sig`; `gap` seconds pass with no agent at all."""
    if sig == signal.SIGTERM:
        assert agent.stop() == 0, agent.log()
    else:
        agent.kill()
    time.sleep(gap)
    agent.start()
    wait_serving(agent)


def in_parallel(fn, items, workers: int | None = None) -> list:
    with ThreadPoolExecutor(max_workers=workers or len(items) or 1) as pool:
        return list(pool.map(fn, items))


# --- 1. the agent answers exactly as the in-process plugin ---------------------------------


def scenario(n: Node) -> list[tuple[str, Reply, set[str]]]:
    """Every command, good and bad, through `n`; each step's reply and imported modules."""
    steps: list[tuple[str, Reply, set[str]]] = []
    p1, p2, p3, p4 = n.pod("a"), n.pod("b"), n.pod("c"), n.pod("d")
    tiny = {"name": "tiny", "bridge": "cni1", "subnet": "10.244.9.0/30"}

    def step(label, command, conf=None, **kw) -> Reply:
        reply, modules = traced_run(n, command, conf, **kw)
        steps.append((label, reply, modules))
        return reply

    add = step("ADD", "ADD", container_id="c1", netns=p1)
    step("ADD-0.4.0", "ADD", n.conf(cniVersion="0.4.0"), container_id="c2", netns=p2)
    step("ADD-same-again", "ADD", container_id="c1", netns=p1)
    step("CHECK", "CHECK", n.conf(prevResult=add.out), container_id="c1", netns=p1)
    drift = json.loads(json.dumps(add.out)) if add.out else {}
    if drift.get("ips"):
        drift["ips"][0]["address"] = "10.244.1.200/24"
    step("CHECK-drift", "CHECK", n.conf(prevResult=drift), container_id="c1", netns=p1)
    step(
        "CHECK-0.3.1",
        "CHECK",
        n.conf(cniVersion="0.3.1", prevResult=add.out),
        container_id="c1",
        netns=p1,
    )
    step("STATUS", "STATUS")
    step("STATUS-0.4.0", "STATUS", n.conf(cniVersion="0.4.0"))
    step("VERSION", "VERSION")
    step("VERSION-0.2.0", "VERSION", n.conf(cniVersion="0.2.0"))
    step("VERSION-bad-config", "VERSION", b"not json")
    step("GC-keeps-c1", "GC", n.conf(**{VALID: [{"containerID": "c1", "ifname": "eth0"}]}))
    step("GC-bad", "GC", n.conf(**{VALID: "everything"}))
    step("bad-config-mtu", "ADD", n.conf(mtu="1500"), container_id="c9", netns=p3)
    step("bad-config-json", "ADD", b"{nope", container_id="c9", netns=p3)
    step("bad-env-cid", "ADD", container_id="abc$(id)", netns=p3)
    step("bad-env-command", "FROB", container_id="c9", netns=p3)
    step("bad-env-ifname", "ADD", container_id="c9", netns=p3, ifname="e" * 16)
    step("bad-env-netns", "ADD", container_id="c9", netns="run/netns/x")
    step("tiny-ADD", "ADD", n.conf(**tiny), container_id="t1", netns=p3)
    step("tiny-exhausted", "ADD", n.conf(**tiny), container_id="t2", netns=p4)
    step(
        "requested-taken",
        "ADD",
        n.conf(
            runtimeConfig={"ips": [add.out["ips"][0]["address"].split("/")[0]]} if add.out else {}
        ),
        container_id="c5",
        netns=p4,
    )
    step(
        "injected-failure",
        "ADD",
        container_id="c6",
        netns=p4,
        env={**TEST_FAULTS, "PYCNI_FAIL_AFTER": "veth"},
    )
    step("DEL", "DEL", container_id="c1", netns=p1)
    step("DEL-again", "DEL", container_id="c1", netns=p1)
    step("DEL-gone-by-GC", "DEL", container_id="c2", netns=p2)
    step("DEL-tiny", "DEL", n.conf(**tiny), container_id="t1", netns=p3)
    step("DEL-bad-name", "DEL", n.conf(name="bad/name"), container_id="c1")
    return steps


EXPECTED = {  # step -> (exit status, CNI error code or None)
    "ADD": (0, None),
    "ADD-0.4.0": (0, None),
    "ADD-same-again": (1, 102),
    "CHECK": (0, None),
    "CHECK-drift": (1, 104),
    "CHECK-0.3.1": (1, 1),
    "STATUS": (0, None),
    "STATUS-0.4.0": (1, 1),
    "VERSION": (0, None),
    "VERSION-0.2.0": (0, None),
    "VERSION-bad-config": (0, None),
    "GC-keeps-c1": (0, None),
    "GC-bad": (1, 7),
    "bad-config-mtu": (1, 7),
    "bad-config-json": (1, 6),
    "bad-env-cid": (1, 4),
    "bad-env-command": (1, 4),
    "bad-env-ifname": (1, 4),
    "bad-env-netns": (1, 4),
    "tiny-ADD": (0, None),
    "tiny-exhausted": (1, 100),
    "requested-taken": (1, 101),
    "injected-failure": (1, 199),
    "DEL": (0, None),
    "DEL-again": (0, None),
    "DEL-gone-by-GC": (0, None),
    "DEL-tiny": (0, None),
    "DEL-bad-name": (1, 7),
}

NOT_JSON = {"VERSION-bad-config", "bad-config-json"}

MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


def normalized(n: Node, reply: Reply):
    """stdout with what legitimately differs between two nodes replaced: the pod netns paths
    (unique per test), the node's root, and the random veth MACs (checked for form)."""
    text = reply.stdout.replace(n.root, "<root>")
    text = re.sub(r"/run/netns/pt\w+", "<netns>", text)
    if not text.strip():
        return text
    out = json.loads(text)
    for iface in out.get("interfaces", []) if isinstance(out, dict) else []:
        if iface.get("name") != n.bridge and "mac" in iface:
            assert MAC.match(iface["mac"]), iface
            iface["mac"] = "<mac>"
    return out


def test_every_command_answers_the_same_through_the_agent_and_in_process(node, agent, tmp_path):
    if os.path.exists(shim.DEFAULT_SOCKET):
        pytest.skip("an agent may listen on the default socket")
    alone = second_node(node, tmp_path)
    via_agent = scenario(node)
    in_process = scenario(alone)
    assert [s[0] for s in via_agent] == list(EXPECTED)
    for (label, a, a_mods), (_, b, b_mods) in zip(via_agent, in_process, strict=True):
        rc, code = EXPECTED[label]
        assert (a.rc, a.code) == (rc, code), (label, a)
        assert (b.rc, b.code) == (rc, code), (label, b)
        assert a.stdout == b.stdout == "" or (
            a.stdout.endswith("\n") and b.stdout.endswith("\n")
        ), (label, a, b)
        assert normalized(node, a) == normalized(alone, b), label
        # stderr is not part of the protocol: in-process, a warning logged before the config
        # named a log file reaches stderr through logging's last resort; the agent logs it.
        assert "Traceback" not in a.stderr + b.stderr, (label, a.stderr, b.stderr)
        if label not in NOT_JSON:
            assert a.stderr == "", (label, a.stderr)
        if code is not None:
            assert_error(a, code)
        # Who did the work: the executable imported the plugin only when it ran it itself.
        # A config that is not JSON names no agentSocket: the default socket (no agent there
        # in this sandbox), so the executable runs it and reports the bad config itself.
        if label in NOT_JSON:
            assert "pycni.plugin" in a_mods, label
        else:
            assert "pycni.plugin" not in a_mods and "pycni.core" not in a_mods, label
        assert "pycni.plugin" in b_mods, label
    # The agent did it, in its own log; the plugin's log file was never opened.
    agent_log = agent.log()
    for line in (
        "ADD c1/eth0: allocated 10.244.1.2",
        "ADD c2/eth0: allocated 10.244.1.3",
        "GC: releasing c2/eth0",
        "error 102",
        "error 104",
        "error 100",
        "error 101",
        "rolled back",
        "DEL c1/eth0",
    ):
        assert line in agent_log, line
        assert line in plugin_log(alone), line
    # Errors found before a config named a log file: only the agent has a log for them.
    for line in ("error 7: invalid network config: mtu", "error 4: CNI_CONTAINERID"):
        assert line in agent_log, line
    assert plugin_log(node) == ""
    assert not os.path.exists(os.path.join(alone.root, "agent.log"))
    # Both nodes end in the same (empty) state.
    for n in (node, alone):
        assert store_rows(n) == ([], []) and store_rows(n, "tiny") == ([], [])
        assert veths(n) == []


def test_version_without_any_config_goes_to_the_default_socket_only(node, agent):
    """With no config there is no agentSocket: the executable tries the default socket (no
    agent there in this sandbox) and answers in-process."""
    if os.path.exists(shim.DEFAULT_SOCKET):
        pytest.skip("a real agent listens on the default socket")
    reply, modules = traced_run(node, "VERSION", b"", container_id=None, ifname=None, netns=None)
    assert_ok(reply)
    assert reply.out == {"cniVersion": versions.LATEST, "supportedVersions": SUPPORTED}
    assert "pycni.plugin" in modules


# --- 2. concurrency ------------------------------------------------------------------------


def test_40_concurrent_adds_then_40_concurrent_dels(node, agent):
    pods = {f"c{i}": node.pod("s") for i in range(40)}
    replies = in_parallel(
        lambda cid: node.run("ADD", container_id=cid, netns=pods[cid]), list(pods)
    )
    for reply in replies:
        assert_ok(reply)
    addrs = [r.out["ips"][0]["address"] for r in replies]
    assert len(set(addrs)) == 40, Counter(addrs).most_common(3)
    for (cid, pod), addr in zip(pods.items(), addrs, strict=True):
        assert pod_addresses(node, pod) == {"eth0": [addr]}, cid
    atts, ips = store_rows(node)
    assert sorted(a[0] for a in atts) == sorted(pods)
    assert sorted(ips) == sorted(a.split("/")[0] for a in addrs)
    assert sorted(bridge_ports(node)) == sorted(
        host_veth_name(node.name, cid, "eth0") for cid in pods
    )
    assert agent.log().count(": allocated ") == 40 and plugin_log(node) == ""

    replies = in_parallel(
        lambda cid: node.run("DEL", container_id=cid, netns=pods[cid]), list(pods)
    )
    for reply in replies:
        assert_ok(reply)
    assert store_rows(node) == ([], [])
    assert veths(node) == [] and bridge_ports(node) == []
    for pod in pods.values():
        assert pod_links(node, pod) == ["lo"]
    assert agent.proc.poll() is None


def test_two_adds_of_one_container_at_once_one_wins(node, agent):
    pods = {f"d{i}": node.pod("d") for i in range(6)}
    calls = [(cid, pod) for cid, pod in pods.items() for _ in range(2)]
    random.shuffle(calls)
    replies = in_parallel(lambda c: (c[0], node.run("ADD", container_id=c[0], netns=c[1])), calls)
    for cid, pod in pods.items():
        mine = [r for c, r in replies if c == cid]
        ok = [r for r in mine if r.rc == 0]
        assert len(ok) == 1, (cid, mine)
        (loser,) = [r for r in mine if r.rc != 0]
        assert_error(loser, 102, cid)
        assert pod_addresses(node, pod) == {"eth0": [ok[0].out["ips"][0]["address"]]}
        assert pod_links(node, pod) == ["lo", "eth0"]
    atts, ips = store_rows(node)
    assert sorted(a[0] for a in atts) == sorted(pods) and len(set(ips)) == len(pods)
    assert sorted(bridge_ports(node)) == sorted(a[2] for a in atts)
    assert "rolled back" not in agent.log()  # the loser touched nothing


def test_add_and_del_of_one_container_at_once_do_not_interleave(node, agent):
    """Whichever runs first, the container ends either fully attached or fully gone; never
    an address without a veth, a veth without an address, or a half-configured pod."""
    pods = {f"e{i}": node.pod("e") for i in range(8)}
    calls = [(cmd, cid) for cid in pods for cmd in ("ADD", "DEL")]
    random.shuffle(calls)
    in_parallel(lambda c: node.run(c[0], container_id=c[1], netns=pods[c[1]]), calls)
    atts, ips = store_rows(node)
    attached = {a[0] for a in atts}
    assert len(ips) == len(atts)
    assert sorted(bridge_ports(node)) == sorted(a[2] for a in atts)
    for cid, pod in pods.items():
        if cid in attached:
            assert list(pod_addresses(node, pod)) == ["eth0"], cid
            assert_ok(node.run("DEL", container_id=cid, netns=pod))
        else:
            assert pod_links(node, pod) == ["lo"], cid
    assert store_rows(node) == ([], []) and veths(node) == []


def test_agent_and_in_process_plugins_share_one_store(node, agent):
    """The agent keeps a database connection per worker thread while one-shot plugins (the
    fallback, `pycnictl`) open and close their own. Neither may lose the other's writes: a
    one-shot plugin closing the store must not take the agent's WAL away from under it."""
    pods = {f"w{i}": node.pod("w") for i in range(10)}
    # Several concurrent calls: several agent workers, each with its own connection.
    first = in_parallel(lambda cid: node.add(pods[cid], cid), [f"w{i}" for i in range(8)])
    standalone = node.conf(agentSocket="")
    assert_ok(node.run("STATUS", standalone))  # opens and closes the store in-process
    via_agent = node.add(pods["w8"], "w8")
    alone = node.add(pods["w9"], "w9", standalone)
    addrs = [r["ips"][0]["address"] for r in [*first, via_agent, alone]]
    assert len(set(addrs)) == 10, addrs
    atts, ips = store_rows(node)
    assert sorted(a[0] for a in atts) == sorted(pods)
    assert sorted(ips) == sorted(a.split("/")[0] for a in addrs)
    for cid, pod in pods.items():
        assert_ok(node.run("DEL", container_id=cid, netns=pod))
    assert store_rows(node) == ([], []) and veths(node) == []


# --- 3. restart in the middle of a pod storm -----------------------------------------------


class Runtime:
    """What kubelet and the container runtime do with one pod: ADD until it works; on "try
    again" (11) just retry, on any other failure DEL (until that works) and retry."""

    def __init__(self, node: Node, attempts: int = 40):
        self.node = node
        self.attempts = attempts
        self.lock = threading.Lock()
        self.codes: Counter = Counter()
        self.history: dict[str, list] = {}

    def _call(self, command: str, cid: str, pod: str) -> Reply:
        try:
            reply = self.node.run(command, container_id=cid, netns=pod, timeout=60)
        except subprocess.TimeoutExpired:
            reply = Reply(-1, None, "", "timeout")
        assert "Traceback" not in reply.stdout + reply.stderr, reply
        with self.lock:
            self.codes[(command, reply.code if reply.rc else 0)] += 1
            self.history.setdefault(cid, []).append(
                (
                    round(time.monotonic(), 3),
                    command,
                    reply.rc,
                    reply.code,
                    reply.out["ips"][0]["address"] if reply.rc == 0 and reply.out else "",
                )
            )
        return reply

    def delete(self, cid: str, pod: str) -> None:
        for _ in range(self.attempts):
            if self._call("DEL", cid, pod).rc == 0:
                return
            time.sleep(0.05)
        raise AssertionError(f"DEL {cid} never succeeded")

    def start_pod(self, cid: str, pod: str) -> dict:
        for _ in range(self.attempts):
            reply = self._call("ADD", cid, pod)
            if reply.rc == 0:
                return reply.out
            if reply.code != 11:
                self.delete(cid, pod)
            time.sleep(random.uniform(0.02, 0.1))
        raise AssertionError(f"ADD {cid} never succeeded")


def assert_node_state(
    node: Node, pods: dict[str, str], results: dict[str, dict], history: dict | None = None
) -> None:
    """Each container exactly one attachment; store, bridge and pods agree."""
    atts, ips = store_rows(node)
    per_container = Counter(a[0] for a in atts)
    wrong = {
        cid: (per_container.get(cid, 0), (history or {}).get(cid))
        for cid in set(pods) | set(per_container)
        if per_container.get(cid) != 1
    }
    assert not wrong, wrong  # container -> (attachments in the store, what the runtime saw)
    assert len(ips) == len(set(ips)) == len(pods), Counter(ips).most_common(3)
    assert sorted(bridge_ports(node)) == sorted(
        host_veth_name(node.name, cid, "eth0") for cid in pods
    )
    assert sorted(veths(node)) == sorted(bridge_ports(node))
    by_cid = {}
    for cid, pod in pods.items():
        addr = results[cid]["ips"][0]["address"]
        assert pod_addresses(node, pod) == {"eth0": [addr]}, (cid, pod_addresses(node, pod))
        by_cid[cid] = addr.split("/")[0]
    assert sorted(by_cid.values()) == sorted(ips)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_agent_restart_during_a_pod_storm(node, agent, sig):
    """60 pods arrive over about a second; once several calls are in flight the agent is
    restarted. SIGTERM: what it accepted completes, callers in between run in-process.
    SIGKILL: its in-flight callers get 11 and retry (some find 102 and DEL first), callers
    in between find a stale socket and run in-process. Either way the node ends consistent."""
    pods = {f"s{i}": node.pod("s") for i in range(60)}
    gap_pod = node.pod("g")
    runtime = Runtime(node)

    def storm_pod(cid: str) -> dict:
        time.sleep(random.uniform(0, 1.0))
        return runtime.start_pod(cid, pods[cid])

    with ThreadPoolExecutor(max_workers=60) as pool:
        futures = {cid: pool.submit(storm_pod, cid) for cid in pods}
        try:
            # Let calls pile up so that many are in flight when the signal comes (the agent
            # alone is quick enough to keep up with the storm on a small machine).
            agent.signal(signal.SIGSTOP)
            try:
                wait_backlog(node, agent.socket, 10)
            finally:
                agent.signal(signal.SIGCONT)
            inflight = wait_inflight(agent, 6)
            agent.signal(sig)
            if sig == signal.SIGTERM:
                deadline = time.monotonic() + 10
                while os.path.exists(agent.socket) and time.monotonic() < deadline:
                    time.sleep(0.005)  # stop() unlinks the socket at once, then drains
            else:
                assert agent.proc.wait(30) == -signal.SIGKILL  # leaves a stale socket
            # A pod arriving now, with no agent to take it: it must run in-process.
            gap = runtime.start_pod("gap", gap_pod)
            assert agent.proc.wait(30) == (0 if sig == signal.SIGTERM else -signal.SIGKILL)
            agent.start()
            wait_serving(agent)
        finally:
            results = {cid: f.result() for cid, f in futures.items()}
    pods["gap"], results["gap"] = gap_pod, gap
    assert "ADD gap/eth0: allocated" in plugin_log(node)
    assert "ADD gap/eth0" not in agent.log()
    assert runtime.history["gap"][0][1:4] == ("ADD", 0, None), runtime.history["gap"]
    assert agent.log().count("listening on") == 2
    if sig == signal.SIGTERM:
        # The first agent finished what it had accepted and said so; nobody was dropped.
        assert "agent stopped" in agent.log()
        assert runtime.codes[("ADD", 11)] == 0, runtime.codes
    else:
        assert runtime.codes[("ADD", 11)] >= 1, (inflight, runtime.codes)
    assert_node_state(node, pods, results, runtime.history)
    in_process_adds = plugin_log(node).count(": allocated ")

    # Everything goes again, also concurrently, also through the restarted agent.
    in_parallel(lambda cid: runtime.delete(cid, pods[cid]), list(pods))
    assert store_rows(node) == ([], [])
    assert veths(node) == [] and bridge_ports(node) == []
    for pod in pods.values():
        assert pod_links(node, pod) == ["lo"]
    print(
        f"{signal.Signals(sig).name}: {inflight} in flight at the restart;"
        f" calls {dict(runtime.codes)}; in-process ADDs {in_process_adds}"
    )


def test_sigterm_answers_every_caller_that_already_connected(node, agent):
    """Callers queued in the backlog when SIGTERM arrives are answered, not dropped: freeze
    the agent, let requests queue, then SIGTERM and thaw it."""
    pods = [node.pod("q") for _ in range(8)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        agent.signal(signal.SIGSTOP)
        try:
            futures = [
                pool.submit(node.run, "ADD", container_id=f"q{i}", netns=pod)
                for i, pod in enumerate(pods)
            ]
            backlog = wait_backlog(node, agent.socket, 8)
            agent.signal(signal.SIGTERM)
        finally:
            agent.signal(signal.SIGCONT)
        replies = [f.result() for f in futures]
    assert backlog == 8
    assert agent.proc.wait(30) == 0
    for reply in replies:
        assert_ok(reply)
    assert plugin_log(node) == ""  # all served by the agent, none fell back
    assert len({r.out["ips"][0]["address"] for r in replies}) == 8
    assert agent.log().count(": allocated ") == 8


# --- 4. traffic keeps flowing across a restart ---------------------------------------------


def test_restart_keeps_traffic_and_state(node, agent):
    a, b = node.pod("pa"), node.pod("pb")
    addr_a = node.add(a, "ca")["ips"][0]["address"]
    addr_b = node.add(b, "cb")["ips"][0]["address"]
    count = 100  # 5 s at 20 per second
    ping = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            pod_name(a),
            "ping",
            "-n",
            "-i",
            "0.05",
            "-W",
            "1",
            "-c",
            str(count),
            addr_b.split("/")[0],
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        time.sleep(1.0)
        restart(agent, signal.SIGTERM)
        time.sleep(1.0)
        restart(agent, signal.SIGKILL)
        out, _ = ping.communicate(timeout=20)
    finally:
        if ping.poll() is None:
            ping.kill()
            ping.wait()
    m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    assert m, out
    sent, received = int(m.group(1)), int(m.group(2))
    assert sent == count and received >= count - 2, out
    assert pod_addresses(node, a) == {"eth0": [addr_a]}
    assert pod_addresses(node, b) == {"eth0": [addr_b]}
    # The restarted agent reads the same store: the next pod gets a new address.
    c = node.pod("pc")
    addr_c = node.add(c, "cc")["ips"][0]["address"]
    assert addr_c not in (addr_a, addr_b)
    assert addr_c == "10.244.1.4/24"
    assert agent.log().count("listening on") == 3
    assert plugin_log(node) == ""
    for cid, pod in (("ca", a), ("cb", b), ("cc", c)):
        assert_ok(node.run("DEL", container_id=cid, netns=pod))
    assert store_rows(node) == ([], [])


# --- 5. no agent, a dead agent, a broken agent ---------------------------------------------


def stale_socket(path: str) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()  # the file stays; connect() is refused


@pytest.mark.parametrize(
    "make",
    [None, stale_socket, lambda p: open(p, "w").close(), lambda p: os.mkdir(p)],
    ids=["absent", "stale-socket", "regular-file", "directory"],
)
def test_every_command_works_in_process_without_an_agent(node, make):
    path = os.path.join(node.root, "agent.sock")
    if make:
        make(path)
    node.base["agentSocket"] = path
    pod = node.pod()
    add, mods = traced_run(node, "ADD", container_id="c1", netns=pod)
    assert_ok(add)
    assert "pycni.plugin" in mods
    assert add.out["ips"][0]["address"] == "10.244.1.2/24"
    for command, conf in (
        ("CHECK", node.conf(prevResult=add.out)),
        ("STATUS", None),
        ("VERSION", None),
        ("GC", node.conf(**{VALID: [{"containerID": "c1", "ifname": "eth0"}]})),
        ("DEL", None),
        ("DEL", None),
    ):
        reply = node.run(command, conf, container_id="c1", netns=pod)
        assert_ok(reply)
        assert reply.stderr == ""
    assert_error(node.run("ADD", node.conf(mtu=1), container_id="c2", netns=pod), 7, "mtu")
    assert "ADD c1/eth0" in plugin_log(node) and "DEL c1/eth0" in plugin_log(node)
    assert store_rows(node) == ([], []) and veths(node) == []


def test_empty_agent_socket_means_standalone_even_with_an_agent(node, agent):
    pod = node.pod()
    reply, mods = traced_run(node, "ADD", node.conf(agentSocket=""), container_id="c1", netns=pod)
    assert_ok(reply)
    assert "pycni.plugin" in mods
    assert "ADD c1/eth0" in plugin_log(node) and "ADD c1/eth0" not in agent.log()
    assert_ok(node.run("DEL", node.conf(agentSocket=""), container_id="c1", netns=pod))


def read_request(conn) -> None:
    from pycni.agent import protocol

    protocol.read_call(conn)


BROKEN = {
    "close-at-once": lambda c: None,
    "close-after-reading": read_request,
    "garbage": lambda c: (read_request(c), c.sendall(b"HTTP/1.0 200 OK\r\n\r\nhello")),
    "status-only-no-newline": lambda c: (read_request(c), c.sendall(b"0")),
    "reset": lambda c: (
        read_request(c),
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"),
    ),
}


@pytest.fixture
def fake_server(node):
    servers: list[UnixServer] = []

    def make(behave) -> UnixServer:
        server = UnixServer(os.path.join(node.root, f"fake{len(servers)}.sock"), behave)
        servers.append(server)
        return server

    try:
        yield make
    finally:
        for server in servers:
            server.close()


@pytest.mark.parametrize("behaviour", list(BROKEN))
@pytest.mark.parametrize("version", ["1.1.0", "0.4.0"])
def test_broken_agent_is_try_again(node, fake_server, behaviour, version):
    server = fake_server(BROKEN[behaviour])
    node.base["agentSocket"] = server.path
    pod = node.pod()
    for command in ("ADD", "DEL", "VERSION"):
        reply = node.run(command, node.conf(cniVersion=version), container_id="c1", netns=pod)
        err = assert_error(reply, 11, server.path, "try again")
        assert err["cniVersion"] == version
        assert reply.rc == 1 and reply.stderr == ""
    assert server.accepted == 3
    # Nothing ran anywhere: no allocation, no veth, no log.
    assert store_rows(node) == ([], []) and veths(node) == [] and plugin_log(node) == ""


def test_agent_answer_is_passed_through_verbatim(node, fake_server):
    """The executable trusts the agent's status and body (garbage after a good status line
    is handed to the runtime as is)."""
    server = fake_server(lambda c: (read_request(c), c.sendall(b"3\nnot json at all\n")))
    node.base["agentSocket"] = server.path
    reply = node.run("ADD", container_id="c1", netns=node.pod())
    assert reply.rc == 3 and reply.stdout == "not json at all\n" and reply.stderr == ""


# --- 6. who may talk to the agent, and what it survives ------------------------------------


def test_socket_is_root_only(node, agent):
    st = os.stat(agent.socket)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == 0
    assert stat.S_IMODE(os.stat(os.path.dirname(agent.socket)).st_mode) == 0o700


# The real executable's code, run by an unprivileged user (the installed launcher lives in a
# root-only directory): the runtime would see the agent's answer, not a "try again".
NOBODY_SHIM = "import sys; sys.path[:0] = [sys.argv[1]]; from pycni.shim import main; main()"
SRC = os.path.join(os.path.dirname(__file__), "..", "..", "src")


def test_non_root_caller_is_refused(node, tmp_path):
    """Even with the socket opened up to everyone, a uid other than 0 gets CNI error 106."""
    public = tempfile.mkdtemp(prefix="pycni-agent-", dir="/tmp")
    proc = AgentProcess(node)
    proc.socket = os.path.join(public, "agent", "agent.sock")
    try:
        os.chmod(public, 0o755)
        proc.start()
        wait_serving(proc)
        os.chmod(os.path.dirname(proc.socket), 0o755)
        os.chmod(proc.socket, 0o666)
        pod = node.pod()
        for size in (0, 1 << 20):  # a small config, and one bigger than the socket buffer
            conf = node.conf(agentSocket=proc.socket, padding="x" * size)
            result = subprocess.run(
                [
                    "setpriv",
                    "--reuid=65534",
                    "--regid=65534",
                    "--clear-groups",
                    "/usr/bin/python3",
                    "-IS",
                    "-B",
                    "-c",
                    NOBODY_SHIM,
                    os.path.abspath(SRC),
                ],
                input=json.dumps(conf),
                capture_output=True,
                text=True,
                timeout=30,
                env={
                    "CNI_COMMAND": "ADD",
                    "CNI_CONTAINERID": "evil",
                    "CNI_IFNAME": "eth0",
                    "CNI_NETNS": pod,
                    "CNI_PATH": "/nonexistent",
                },
            )
            reply = Reply(result.returncode, None, result.stdout, result.stderr)
            err = assert_error(reply, 106, "root only", "65534")
            assert result.returncode == 1 and result.stderr == "", result
            assert err["cniVersion"] == "1.1.0"
        assert proc.log().count("refused a caller with uid 65534") == 2
        assert store_rows(node) == ([], []) and pod_links(node, pod) == ["lo"]
        # Root still gets served.
        node.base["agentSocket"] = proc.socket
        assert node.add(pod, "c1")["ips"][0]["address"] == "10.244.1.2/24"
        assert_ok(node.run("DEL", container_id="c1", netns=pod))
    finally:
        proc.kill()
        shutil.rmtree(public, ignore_errors=True)


MALFORMED = {
    "empty": b"",
    "http": b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
    "no-newline-long": b"P" * 5000,
    "three-fields": b"PYCNI/1 CNI 5\n",
    "unknown-op": b"PYCNI/1 SHUTDOWN 0 0\n",
    "negative-length": b"PYCNI/1 CNI -5 0\n",
    "huge-env": b"PYCNI/1 CNI 99999999999 0\n",
    "huge-stdin": b"PYCNI/1 CNI 0 99999999999\n",
    "huge-digits": b"PYCNI/1 CNI 0 " + b"9" * 100 + b"\n",
    "truncated-env": b"PYCNI/1 CNI 100 10\nCNI_COMMAND=ADD",
    "truncated-stdin": b'PYCNI/1 CNI 15 100\nCNI_COMMAND=ADD{"cniVersion"',
    "env-no-equals": b"PYCNI/1 CNI 11 0\nCNI_COMMAND",
    "binary": bytes(range(256)) * 4,
}


def test_malformed_requests_get_an_error_and_the_agent_keeps_serving(node, agent):
    for label, data in MALFORMED.items():
        answer = raw_call(agent.socket, data)
        head, _, body = answer.partition(b"\n")
        assert head == b"1", (label, answer)
        err = json.loads(body)
        assert err["code"] == 6 and "malformed request" in err["msg"], (label, err)
        assert agent.proc.poll() is None, label
    # Well framed but nonsense inside: the plugin's own checks answer (code 4).
    env = b"CNI_COMMAND=\xff\xfe\0CNI_CONTAINERID=c1"
    answer = raw_call(agent.socket, b"PYCNI/1 CNI %d 2\n%s{}" % (len(env), env))
    head, _, body = answer.partition(b"\n")
    assert head == b"1" and json.loads(body)["code"] == 4, answer
    # A following ADD works.
    pod = node.pod()
    assert node.add(pod, "c1")["ips"][0]["address"] == "10.244.1.2/24"
    assert_ok(node.run("DEL", container_id="c1", netns=pod))
    assert "Traceback" not in agent.log()


def test_a_stalled_caller_does_not_hold_up_others(node, agent):
    """A caller that sends half a request and goes quiet ties up one worker, not the agent."""
    stalled = []
    try:
        for _ in range(3):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(agent.socket)
            s.sendall(b"PYCNI/1 CNI 100 10\nCNI_COMMAND=ADD")
            stalled.append(s)
        pod = node.pod()
        started = time.monotonic()
        out = node.add(pod, "c1", timeout=10)
        assert time.monotonic() - started < 5
        assert out["ips"][0]["address"] == "10.244.1.2/24"
        assert_ok(node.run("DEL", container_id="c1", netns=pod))
    finally:
        for s in stalled:
            s.close()
