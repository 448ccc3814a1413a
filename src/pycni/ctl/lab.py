"""`pycnictl lab`: a demo network built from network namespaces, wired through the installed plugin.

Topology (one node for now; the structure is a Lab of Nodes so it can grow into a cluster):

    <prefix>-pod1 .. podN        pod namespaces, networked by the plugin (eth0)
          | veth (made by pycni)
    <prefix>-node1               the "node": bridge cni0, pod subnet 10.244.1.0/24, eth0 192.0.2.1
          | veth
    <prefix>-outside             the world outside the cluster: bridge lan0 192.0.2.254/24,
                                 no route to the pods, so replies only come back masqueraded

The host's own namespace, its cni0 and /etc/cni are never touched: the plugin is installed under
the state directory and run inside the node namespace with `ip netns exec`, with the environment
and stdin a runtime gives it (libcni's conventions, including its result cache and prevResult on
DEL). Everything made is recorded in <state>/lab.json before it is made, so `lab down` finds it
after any failure, and `lab down` also sweeps namespaces by name when the state is gone.
"""

from __future__ import annotations

import argparse
import base64
import ipaddress
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field

from .install import atomic_write, node_conflist, write_launcher

DEFAULT_STATE_DIR = "/run/pycni-lab"
DEFAULT_PREFIX = "pycnilab"
NETWORK_NAME = "pycni"
CLUSTER_CIDR = "10.244.0.0/16"
LAN = ipaddress.ip_network("192.0.2.0/24")
OUTSIDE_IP = LAN[254]  # node i is LAN[i]
CONFLIST = "10-pycni.conflist"
IFNAME = "eth0"
POD_NAMESPACE = "default"
_PREFIX_RE = re.compile(r"[a-z][a-z0-9]{0,19}")
# Entries of a state directory that the lab made and may remove.
_STATE_ENTRIES = ("bin", "net.d", "data", "results", "pycni.log", "agent.sock", "agent.log")
_PROBE_TIMEOUT = 1.5
# Every pod pings and connects to every other: the table grows with the square of this.
MAX_PODS = 20


class LabError(Exception):
    pass


# ----------------------------------------------------------------------------- the model


@dataclass
class Pod:
    netns: str
    k8s_name: str
    container_id: str
    uid: str
    ifname: str = IFNAME
    cache: str = ""  # libcni-style cached result
    address: str = ""
    mac: str = ""
    host_veth: str = ""

    @property
    def netns_path(self) -> str:
        return f"/run/netns/{self.netns}"

    @property
    def ip(self) -> str:
        return self.address.split("/")[0]


@dataclass
class Node:
    name: str
    netns: str
    lan_ip: str
    subnet: str
    root: str  # where this node's plugin, config, IPAM data, log and result cache live
    pods: list[Pod] = field(default_factory=list)
    agent: bool = True  # a pycni agent serves this node's plugin (else it runs in-process)

    @property
    def agent_socket(self) -> str:
        return os.path.join(self.root, "agent.sock")

    @property
    def agent_log(self) -> str:
        return os.path.join(self.root, "agent.log")

    @property
    def bin_dir(self) -> str:
        return os.path.join(self.root, "bin")

    @property
    def plugin(self) -> str:
        return os.path.join(self.bin_dir, "pycni")

    @property
    def conflist_path(self) -> str:
        return os.path.join(self.root, "net.d", CONFLIST)

    @property
    def data_dir(self) -> str:
        return os.path.join(self.root, "data")

    @property
    def log_file(self) -> str:
        return os.path.join(self.root, "pycni.log")

    @property
    def results_dir(self) -> str:
        return os.path.join(self.root, "results")

    @property
    def gateway(self) -> str:
        return str(ipaddress.ip_network(self.subnet)[1])


@dataclass
class Lab:
    prefix: str
    state_dir: str
    network: str = CLUSTER_CIDR
    outside: str = ""
    outside_ip: str = str(OUTSIDE_IP)
    nodes: list[Node] = field(default_factory=list)

    @classmethod
    def plan(cls, prefix: str, state_dir: str, pods: int, agent: bool = True) -> Lab:
        lab = cls(prefix=prefix, state_dir=os.path.abspath(state_dir),
                  outside=f"{prefix}-outside")
        node = Node(name="node1", netns=f"{prefix}-node1", lan_ip=str(LAN[1]),
                    subnet="10.244.1.0/24", root=lab.state_dir, agent=agent)
        for i in range(1, pods + 1):
            node.pods.append(Pod(netns=f"{prefix}-pod{i}", k8s_name=f"pod{i}",
                                 container_id=secrets.token_hex(32), uid=str(uuid.uuid4())))
        lab.nodes.append(node)
        return lab

    @property
    def path(self) -> str:
        return os.path.join(self.state_dir, "lab.json")

    def save(self) -> None:
        atomic_write(self.path, json.dumps(asdict(self), indent=2) + "\n", 0o644)

    @classmethod
    def load(cls, state_dir: str) -> Lab | None:
        path = os.path.join(state_dir, "lab.json")
        try:
            with open(path) as f:
                data = json.load(f)
            nodes = [Node(**{**n, "pods": [Pod(**p) for p in n["pods"]]}) for n in data["nodes"]]
            return cls(**{**data, "nodes": nodes})
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as exc:
            raise LabError(f"{path} is unreadable ({exc}); remove the lab's namespaces with "
                           "`ip netns del` and the directory by hand") from None

    def namespaces(self) -> list[str]:
        out = [p.netns for n in self.nodes for p in n.pods]
        out += [n.netns for n in self.nodes]
        return out + [self.outside]


# ----------------------------------------------------------------------------- helpers


def _run(*argv: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed: {(proc.stderr or proc.stdout).strip()}")
    return proc


def _netns_list() -> set[str]:
    out = _run("ip", "netns", "list", check=False).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _lab_netns_re(prefix: str) -> re.Pattern:
    return re.compile(rf"{re.escape(prefix)}-(outside|node\d+|pod\d+)")


def _ip_batch(netns: str, commands: list[str]) -> None:
    _run("ip", "-n", netns, "-batch", "-", input="\n".join(commands) + "\n")


def _cni_args(pod: Pod) -> list[tuple[str, str]]:
    return [("IgnoreUnknown", "1"), ("K8S_POD_NAMESPACE", POD_NAMESPACE),
            ("K8S_POD_NAME", pod.k8s_name), ("K8S_POD_INFRA_CONTAINER_ID", pod.container_id),
            ("K8S_POD_UID", pod.uid)]


def _exec_plugin(node: Node, pod: Pod, command: str, extra: dict | None = None,
                 netns_path: str | None = None) -> subprocess.CompletedProcess:
    """Run the installed plugin inside the node as a runtime (libcni) would: CNI_* environment,
    the conflist's plugin entry with name and cniVersion injected on stdin."""
    with open(node.conflist_path) as f:
        conflist = json.load(f)
    conf = dict(conflist["plugins"][0])
    conf["name"] = conflist["name"]
    conf["cniVersion"] = conflist["cniVersion"]
    conf.update(extra or {})
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": pod.container_id,
        "CNI_NETNS": pod.netns_path if netns_path is None else netns_path,
        "CNI_IFNAME": pod.ifname,
        "CNI_ARGS": ";".join(f"{k}={v}" for k, v in _cni_args(pod)),
        "CNI_PATH": node.bin_dir,
    }
    # The plugin's file name equals the config's type, found along CNI_PATH.
    plugin = os.path.join(node.bin_dir, conf["type"])
    return subprocess.run(["ip", "netns", "exec", node.netns, plugin], env=env,
                          input=json.dumps(conf), capture_output=True, text=True, timeout=60)


def _cache_path(node: Node, pod: Pod) -> str:
    # libcni: /var/lib/cni/results/<network>-<container id>-<ifname>
    return os.path.join(node.results_dir, f"{NETWORK_NAME}-{pod.container_id}-{pod.ifname}")


# ----------------------------------------------------------------------------- lab up


def _make_netns(name: str) -> None:
    _run("ip", "netns", "add", name)
    _run("ip", "-n", name, "link", "set", "lo", "up")


def _build_outside(lab: Lab) -> None:
    _make_netns(lab.outside)
    _ip_batch(lab.outside, [
        "link add lan0 type bridge",
        f"addr add {lab.outside_ip}/{LAN.prefixlen} dev lan0",
        "link set lan0 up",
    ])


def _build_node(lab: Lab, node: Node) -> None:
    _make_netns(node.netns)
    port = node.name  # the node's port on the outside's LAN bridge
    # Created inside the node; the peer is born in the outside namespace.
    _run("ip", "-n", node.netns, "link", "add", "eth0", "type", "veth",
         "peer", "name", port, "netns", lab.outside)
    _ip_batch(lab.outside, [f"link set {port} master lan0", f"link set {port} up"])
    _ip_batch(node.netns, [
        f"addr add {node.lan_ip}/{LAN.prefixlen} dev eth0",
        "link set eth0 up",
        f"route add default via {lab.outside_ip}",
    ])
    write_launcher(node.plugin)
    # Each node's agent gets its own socket: the lab's nodes share one filesystem.
    conf = node_conflist(NETWORK_NAME, node.subnet, lab.network, dataDir=node.data_dir,
                         logFile=node.log_file, agentSocket=node.agent_socket if node.agent else "")
    atomic_write(node.conflist_path, json.dumps(conf, indent=2) + "\n", 0o644)
    if node.agent:
        _start_agent(node)


def _start_agent(node: Node) -> None:
    """`pycnictl agent` inside the node's namespace, detached from this command: it serves the
    node until `lab down`. Metrics and health on the node's own loopback."""
    from ..agent.launch import agent_argv, wait_until_listening

    _run("ip", "-n", node.netns, "link", "set", "lo", "up")
    argv = agent_argv(node.agent_socket, node.data_dir, node.agent_log, metrics_port=9654)
    with open(node.agent_log, "ab") as log:
        proc = subprocess.Popen(["ip", "netns", "exec", node.netns, *argv],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True)
    try:
        wait_until_listening(proc, node.agent_socket)
    except RuntimeError as exc:
        raise LabError(f"{node.name}: {exc}; see {node.agent_log}") from None


def _stop_agent(node: Node, wait: float = 10.0) -> None:
    """SIGTERM the agent (found as the pycnictl process in the node's namespace) and wait."""
    pids = []
    for pid in _run("ip", "netns", "pids", node.netns, check=False).stdout.split():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"agent" in f.read().split(b"\0"):
                    pids.append(int(pid))
        except OSError:
            pass
    for pid in pids:
        try:
            os.kill(pid, 15)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + wait
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if os.path.exists(f"/proc/{p}")]
        time.sleep(0.05)


def _add_pod(node: Node, pod: Pod) -> None:
    _make_netns(pod.netns)
    proc = _exec_plugin(node, pod, "ADD")
    try:
        result = json.loads(proc.stdout)
    except ValueError:
        result = None
    if proc.returncode != 0 or not isinstance(result, dict) or "ips" not in result:
        raise LabError(f"ADD of {pod.netns} failed (exit {proc.returncode}): "
                       f"{(proc.stdout or proc.stderr).strip()}")
    pod.cache = _cache_path(node, pod)
    with open(node.conflist_path, "rb") as f:
        config = f.read()
    cached = {
        "kind": "cniCacheV1", "containerId": pod.container_id,
        "config": base64.b64encode(config).decode(), "ifName": pod.ifname,
        "networkName": NETWORK_NAME, "netns": pod.netns_path,
        "cniArgs": [list(kv) for kv in _cni_args(pod)], "result": result,
    }
    atomic_write(pod.cache, json.dumps(cached, indent=2) + "\n", 0o600)
    ip = result["ips"][0]
    pod.address = ip["address"]
    ifaces = result.get("interfaces", [])
    if isinstance(ip.get("interface"), int) and ip["interface"] < len(ifaces):
        pod.mac = ifaces[ip["interface"]].get("mac", "")
    bridge = json.loads(config)["plugins"][0].get("bridge", "cni0")
    pod.host_veth = next((i["name"] for i in ifaces
                          if not i.get("sandbox") and i["name"] != bridge), "")


def up(args) -> int:
    started = time.monotonic()
    prefix, state_dir = args.prefix, os.path.abspath(args.state_dir)
    if os.path.exists(os.path.join(state_dir, "lab.json")):
        print(f"a lab is already up (state in {state_dir}); run `pycnictl lab down` first",
              file=sys.stderr)
        return 1
    present = sorted(n for n in _netns_list() if _lab_netns_re(prefix).fullmatch(n))
    if present:
        print(f"lab namespaces already exist ({', '.join(present)}); run `pycnictl lab down"
              f"{'' if prefix == DEFAULT_PREFIX else ' --prefix ' + prefix}` first",
              file=sys.stderr)
        return 1
    if os.path.isdir(state_dir) and os.listdir(state_dir):
        print(f"{state_dir} is not empty and holds no lab: choose another --state-dir",
              file=sys.stderr)
        return 1
    lab = Lab.plan(prefix, state_dir, args.pods, agent=args.agent)
    os.makedirs(state_dir, exist_ok=True)
    lab.save()  # first, so that `lab down` can undo whatever follows
    try:
        _build_outside(lab)
        for node in lab.nodes:
            _build_node(lab, node)
            for pod in node.pods:
                _add_pod(node, pod)
                lab.save()
    except BaseException as exc:
        print(f"lab up failed: {exc}", file=sys.stderr)
        print("removing what was made", file=sys.stderr)
        _teardown(lab.prefix, lab.state_dir, quiet=True)
        return 1
    built = time.monotonic() - started
    _print_lab(lab)
    rows = measure(lab)
    _print_table(rows)
    failed = [r for r in rows if not r.ok]
    print()
    if failed:
        print(f"{len(failed)} of {len(rows)} paths FAILED; the lab is left up for inspection")
    else:
        print(f"all {len(rows)} paths OK")
    print(f"lab up in {time.monotonic() - started:.1f} s (network built in {built:.1f} s); "
          f"remove it with `pycnictl lab down"
          f"{'' if prefix == DEFAULT_PREFIX else ' --prefix ' + prefix}"
          f"{'' if state_dir == DEFAULT_STATE_DIR else ' --state-dir ' + state_dir}`")
    return 1 if failed else 0


def _print_lab(lab: Lab) -> None:
    print(f"outside: netns {lab.outside}, {lab.outside_ip}/{LAN.prefixlen} (no route to pods)")
    for node in lab.nodes:
        print(f"{node.name}: netns {node.netns}, eth0 {node.lan_ip}/{LAN.prefixlen}, "
              f"pod subnet {node.subnet} (gateway {node.gateway} on cni0), masquerade on")
        print(f"  plugin {node.plugin}")
        print(f"  config {node.conflist_path}")
        if node.agent:
            print(f"  agent  {node.agent_socket} (log {node.agent_log}; "
                  f"metrics on the node's 127.0.0.1:9654)")
        else:
            print("  agent  none: the plugin works in-process")
        print()
        rows = [("POD", "ADDRESS", "MAC", "HOST VETH", "CONTAINER ID")]
        rows += [(p.netns, p.address, p.mac, p.host_veth, p.container_id[:12])
                 for p in node.pods]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    print()


# ----------------------------------------------------------------------------- measuring

# One TCP server per target namespace: answers each connection with the peer address it saw.
_SERVER = r"""
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 0))
s.listen(64)
print(s.getsockname()[1], flush=True)
deadline = time.monotonic() + float(sys.argv[1])
while time.monotonic() < deadline:
    s.settimeout(max(0.1, deadline - time.monotonic()))
    try:
        c, addr = s.accept()
    except OSError:
        continue
    try:
        c.sendall((addr[0] + "\n").encode())
    except OSError:
        pass
    c.close()
"""

# One client per source namespace: connect to each target, time the handshake, read the reply.
_CLIENT = r"""
import json, socket, sys, time
timeout = float(sys.argv[1])
for target in sys.argv[2:]:
    key, host, port = target.split(",")
    out = {"key": key, "ok": False, "rtt": None, "peer": "", "error": ""}
    try:
        t0 = time.perf_counter()
        c = socket.create_connection((host, int(port)), timeout=timeout)
        out["rtt"] = (time.perf_counter() - t0) * 1000
        c.settimeout(timeout)
        data = b""
        while not data.endswith(b"\n"):
            chunk = c.recv(64)
            if not chunk:
                break
            data += chunk
        c.close()
        out["peer"] = data.decode().strip()
        out["ok"] = bool(out["peer"])
    except OSError as exc:
        out["error"] = str(exc) or type(exc).__name__
    print(json.dumps(out), flush=True)
"""

_PING_RTT = re.compile(r"time[=<]([\d.]+) ms")


@dataclass
class Probe:
    kind: str
    src_label: str
    src_netns: str
    dst_label: str
    dst_netns: str
    dst_ip: str
    expect_peer: str
    icmp_ok: bool = False
    icmp_rtt: float | None = None
    tcp_ok: bool = False
    tcp_rtt: float | None = None
    peer: str = ""
    error: str = ""
    retried: bool = False

    @property
    def ok(self) -> bool:
        return self.icmp_ok and self.tcp_ok and self.peer == self.expect_peer


def plan_probes(lab: Lab) -> list[Probe]:
    probes: list[Probe] = []
    for node in lab.nodes:
        pods = node.pods
        for a in pods:
            for b in pods:
                if a is not b:
                    probes.append(Probe("pod->pod", a.k8s_name, a.netns, b.k8s_name, b.netns,
                                        b.ip, expect_peer=a.ip))
        for a in pods:
            probes.append(Probe("pod->gateway", a.k8s_name, a.netns, node.name, node.netns,
                                node.gateway, expect_peer=a.ip))
        for b in pods:
            probes.append(Probe("node->pod", node.name, node.netns, b.k8s_name, b.netns, b.ip,
                                expect_peer=node.gateway))
        for a in pods:
            probes.append(Probe("pod->outside", a.k8s_name, a.netns, "outside", lab.outside,
                                lab.outside_ip, expect_peer=node.lan_ip))
    return probes


def _ping(netns: str, ip: str) -> tuple[bool, float | None]:
    proc = _run("ip", "netns", "exec", netns, "ping", "-n", "-q", "-c1", "-W1", ip, check=False)
    if proc.returncode != 0:
        return False, None
    # -q prints "rtt min/avg/max/mdev = a/b/c/d ms"; without -q, "time=x ms".
    m = re.search(r"= ([\d.]+)/", proc.stdout) or _PING_RTT.search(proc.stdout)
    return True, float(m.group(1)) if m else None


def _tcp(src: str, probes: list[Probe], ports: dict[str, int]) -> None:
    """TCP probes from one source namespace, all through one client process."""
    if not probes:
        return
    targets = [f"{i},{p.dst_ip},{ports[p.dst_netns]}" for i, p in enumerate(probes)]
    try:
        proc = _run("ip", "netns", "exec", src, sys.executable, "-I", "-S", "-c", _CLIENT,
                    str(_PROBE_TIMEOUT), *targets, check=False,
                    timeout=_PROBE_TIMEOUT * 2 * len(probes) + 10)
    except subprocess.TimeoutExpired:
        for p in probes:
            p.error = "client timed out"
        return
    for line in proc.stdout.splitlines():
        out = json.loads(line)
        p = probes[int(out["key"])]
        p.tcp_ok, p.tcp_rtt, p.peer, p.error = out["ok"], out["rtt"], out["peer"], out["error"]
    if not proc.stdout.strip():
        for p in probes:
            p.error = f"client failed: {proc.stderr.strip()[-200:]}"


class Servers:
    """TCP servers in the target namespaces, stopped (and waited for) on exit."""

    def __init__(self, namespaces: list[str], lifetime: float = 60.0) -> None:
        self.procs: dict[str, subprocess.Popen] = {}
        self.ports: dict[str, int] = {}
        self.namespaces = namespaces
        self.lifetime = lifetime

    def __enter__(self) -> Servers:
        try:
            for ns in self.namespaces:
                self.procs[ns] = subprocess.Popen(
                    ["ip", "netns", "exec", ns, sys.executable, "-I", "-S", "-c", _SERVER,
                     str(self.lifetime)],
                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    text=True,
                )
            for ns, proc in self.procs.items():
                line = proc.stdout.readline().strip()
                if not line.isdigit():
                    raise LabError(f"TCP server in {ns} did not start: {proc.stderr.read()}")
                self.ports[ns] = int(line)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs.values():
            proc.wait(timeout=10)
            proc.stdout.close()
            proc.stderr.close()


def measure(lab: Lab) -> list[Probe]:
    probes = plan_probes(lab)
    by_source: dict[str, list[Probe]] = {}
    for p in probes:
        by_source.setdefault(p.src_netns, []).append(p)
    with Servers(sorted({p.dst_netns for p in probes})) as servers:

        def run_source(src: str, mine: list[Probe]) -> None:
            # Pings one after the other from each source, so RTTs are not skewed by each other.
            # A failed probe is tried once more (and marked so): one lost packet on a loaded
            # machine is noise, a path that fails twice is broken.
            for p in mine:
                p.icmp_ok, p.icmp_rtt = _ping(src, p.dst_ip)
                if not p.icmp_ok:
                    p.retried = True
                    p.icmp_ok, p.icmp_rtt = _ping(src, p.dst_ip)
            _tcp(src, mine, servers.ports)
            again = [p for p in mine if not p.tcp_ok]
            for p in again:
                p.retried = True
            _tcp(src, again, servers.ports)

        threads = [threading.Thread(target=run_source, args=(src, mine))
                   for src, mine in by_source.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return probes


def _print_table(probes: list[Probe]) -> None:
    print("connectivity, measured (ICMP: ping -c1 -W1; TCP: connect time, and the source "
          "address the server saw):")
    rows = [("PATH", "FROM", "TO", "ICMP", "ms", "TCP", "ms", "SEEN AS", "")]

    def ms(v: float | None) -> str:
        return f"{v:.3f}" if v is not None else "-"

    for p in probes:
        note = ""
        if p.tcp_ok and p.peer != p.expect_peer:
            note = f"WRONG (expected {p.expect_peer})"
        elif p.kind == "pod->outside" and p.tcp_ok:
            note = "masqueraded"
        elif p.kind == "pod->pod" and p.tcp_ok:
            note = "pod address kept"
        elif not p.tcp_ok and p.error:
            note = p.error
        if p.retried:
            note = f"{note}, on a 2nd try" if note else "on a 2nd try"
        rows.append((p.kind, p.src_label, f"{p.dst_label} {p.dst_ip}",
                     "OK" if p.icmp_ok else "FAIL", ms(p.icmp_rtt),
                     "OK" if p.tcp_ok else "FAIL", ms(p.tcp_rtt), p.peer or "-", note))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    right = {4, 6}
    for r in rows:
        cells = [c.rjust(w) if i in right else c.ljust(w)
                 for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        print("  " + "  ".join(cells).rstrip())


# ----------------------------------------------------------------------------- lab down


def _kill_netns_pids(netns: str) -> None:
    for pid in _run("ip", "netns", "pids", netns, check=False).stdout.split():
        try:
            os.kill(int(pid), 9)
        except (ProcessLookupError, ValueError):
            pass


def _del_pod(node: Node, pod: Pod, live: set[str]) -> str | None:
    """DEL through the plugin, with prevResult from the cache as libcni does; an error or None."""
    if node.netns not in live:
        return None  # the node (bridge, veths, rules) is gone with its namespace
    if not (os.path.exists(node.plugin) and os.path.exists(node.conflist_path)):
        return f"{pod.netns}: plugin or config missing, DEL skipped"
    extra = {}
    try:
        with open(pod.cache or _cache_path(node, pod)) as f:
            extra["prevResult"] = json.load(f)["result"]
    except (OSError, ValueError, KeyError):
        pass  # ADD never finished (or the cache is gone): DEL without prevResult
    netns_path = pod.netns_path if pod.netns in live else ""
    proc = _exec_plugin(node, pod, "DEL", extra, netns_path)
    if proc.returncode != 0:
        return f"DEL of {pod.netns} failed: {(proc.stdout or proc.stderr).strip()}"
    return None


def _teardown(prefix: str, state_dir: str, quiet: bool = False) -> list[str]:
    problems: list[str] = []
    say = (lambda *a: None) if quiet else print
    lab = Lab.load(state_dir)
    live = _netns_list()
    if lab is not None:
        for node in lab.nodes:
            for pod in node.pods:
                problem = _del_pod(node, pod, live)
                if problem:
                    problems.append(problem)
                elif node.netns in live:
                    say(f"DEL {pod.netns}")
            if node.netns in live:
                _stop_agent(node)
        names = lab.namespaces()
    else:
        names = []
    pattern = _lab_netns_re(prefix)
    names += sorted(n for n in live if pattern.fullmatch(n) and n not in names)
    for name in names:
        if name not in live:
            continue
        _kill_netns_pids(name)
        proc = _run("ip", "netns", "del", name, check=False)
        if proc.returncode != 0:
            problems.append(f"ip netns del {name}: {proc.stderr.strip()}")
        else:
            say(f"removed netns {name}")
    problems += _remove_state(state_dir, lab is not None, say)
    return problems


def _remove_state(state_dir: str, owned: bool, say) -> list[str]:
    if not os.path.isdir(state_dir):
        return []
    if owned:
        for entry in _STATE_ENTRIES:
            path = os.path.join(state_dir, entry)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.lexists(path):
                os.unlink(path)
        # lab.json last: until now a new `lab down` could still find everything.
        os.unlink(os.path.join(state_dir, "lab.json"))
    try:
        os.rmdir(state_dir)
        say(f"removed {state_dir}")
    except OSError:
        if owned:
            return [f"{state_dir} still holds files the lab did not make; left in place"]
    return []


def down(args) -> int:
    try:
        problems = _teardown(args.prefix, os.path.abspath(args.state_dir))
    except LabError as exc:
        print(f"lab down: {exc}", file=sys.stderr)
        return 1
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr)
    print("lab is down" if not problems else "lab is down, with warnings")
    return 1 if problems else 0


# ----------------------------------------------------------------------------- CLI


def _prefix(value: str) -> str:
    if not _PREFIX_RE.fullmatch(value):
        raise argparse.ArgumentTypeError(
            f"{value!r}: use 1-20 lowercase letters and digits, starting with a letter")
    return value


def _pod_count(value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= MAX_PODS:
        raise argparse.ArgumentTypeError(f"{value!r}: give a number of pods from 1 to {MAX_PODS}")
    return int(value)


def register(sub) -> None:
    p = sub.add_parser("lab", help="a demo network in namespaces: one node, pods, measurements")
    lsub = p.add_subparsers(dest="lab_command", required=True)
    common = _common_options()
    u = lsub.add_parser("up", parents=[common], help="build the lab, network pods through the "
                        "installed plugin, print their addresses and measured connectivity")
    u.add_argument("--pods", type=_pod_count, default=3, help=f"pods on the node (1-{MAX_PODS}; 3)")
    u.add_argument("--no-agent", dest="agent", action="store_false",
                   help="no node agent: the plugin does its work in-process, as on a node set "
                   "up by hand")
    u.set_defaults(func=up)
    d = lsub.add_parser("down", parents=[common],
                        help="DEL every pod through the plugin and remove everything the lab made")
    d.set_defaults(func=down)


def _common_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--state-dir", default=DEFAULT_STATE_DIR,
                        help=f"where the lab keeps its plugin, config and state "
                        f"({DEFAULT_STATE_DIR})")
    parent.add_argument("--prefix", type=_prefix, default=DEFAULT_PREFIX,
                        help="namespace name prefix, so labs can run side by side "
                        f"(lowercase letters and digits; {DEFAULT_PREFIX})")
    return parent
