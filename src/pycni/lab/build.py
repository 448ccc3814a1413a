"""Making and unmaking the lab's pieces: namespaces, the underlay, node agents, etcd and pods.

    <prefix>-router    bridges lan0 (192.0.2.254/24) [and lan1 (198.51.100.254/24)], wan0 to the
                       outside; forwards between them but knows no pod subnet, so pods of nodes
                       on different underlays can only meet through VXLAN
    <prefix>-outside   the internet: 203.0.113.254, reaches the nodes' addresses, never the pods
    <prefix>-nodeI     a node: eth0 on an underlay, its pycni agent (cluster side included)
    <prefix>-nIpodJ    pods, networked by the node's installed plugin as a runtime would

The host's own namespace, its cni0 and /etc/cni are never touched: each node's plugin, config
and state live under <state>/nodes/<node>.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import subprocess
import time

from ..cni import versions
from ..install.native import write_plugin
from ..node_config import atomic_write, read_subnet_env
from .model import (
    NETWORK_NAME,
    UNDERLAYS,
    UNDERLAYS6,
    WAN,
    WAN6,
    Lab,
    LabError,
    Node,
    Pod,
)

AGENT_METRICS_PORT = 9654
AGENT_RESYNC = 5.0  # seconds: a lab shows repairs quickly
CONFIG_TIMEOUT = 30.0


def run(*argv: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed: {(proc.stderr or proc.stdout).strip()}")
    return proc


def netns_list() -> set[str]:
    out = run("ip", "netns", "list", check=False).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def ip_batch(netns: str, commands: list[str]) -> None:
    run("ip", "-n", netns, "-batch", "-", input="\n".join(commands) + "\n")


def make_netns(name: str) -> None:
    run("ip", "netns", "add", name)
    run("ip", "-n", name, "link", "set", "lo", "up")


def _forwarding(netns: str, ipv6: bool = False) -> None:
    # Lab links are new and their link-local addresses would be tentative (DAD) for a second
    # or two, during which the kernel cannot resolve neighbours for forwarded IPv6 packets.
    v6 = ["net.ipv6.conf.all.forwarding=1", "net.ipv6.conf.default.accept_dad=0"]
    run(
        "ip",
        "netns",
        "exec",
        netns,
        "sysctl",
        "-q",
        "-w",
        "net.ipv4.ip_forward=1",
        *(v6 if ipv6 else []),
    )


# ----------------------------------------------------------------------------- underlay

# br_netfilter (loaded for kube-proxy and pycni's own bridge) makes every bridge of every
# namespace run the IP hooks on the frames it switches. The lab's underlay bridges stand for a
# hardware switch, which runs none: left on, they cost a cross-node stream 2-6% of its CPU.
# `-e`: the keys exist only while br_netfilter is loaded.
SWITCH_WITHOUT_NETFILTER = (
    "sysctl",
    "-q",
    "-e",
    "-w",
    "net.bridge.bridge-nf-call-iptables=0",
    "net.bridge.bridge-nf-call-ip6tables=0",
    "net.bridge.bridge-nf-call-arptables=0",
)


def build_router_and_outside(lab: Lab) -> None:
    make_netns(lab.router)
    _forwarding(lab.router, lab.ipv6)
    run("ip", "netns", "exec", lab.router, *SWITCH_WITHOUT_NETFILTER)
    commands = []
    for i, lan in enumerate(map(ipaddress.ip_network, UNDERLAYS[: lab.underlays])):
        # A fixed MAC: a bridge otherwise takes its lowest port's, which changes when that
        # node leaves, and every node's ARP entry for the router goes stale (seen in tests).
        mac = "0a:58:" + ":".join(f"{b:02x}" for b in lan[254].packed)
        commands += [
            f"link add lan{i} address {mac} type bridge mcast_snooping 0",
            f"addr add {lan[254]}/{lan.prefixlen} dev lan{i}",
            f"link set lan{i} up",
        ]
        if lab.ipv6:
            lan6 = ipaddress.ip_network(UNDERLAYS6[i])
            commands.append(f"addr add {lan6[254]}/{lan6.prefixlen} dev lan{i} nodad")
    ip_batch(lab.router, commands)
    make_netns(lab.outside)
    run(
        "ip",
        "-n",
        lab.router,
        "link",
        "add",
        "wan0",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        lab.outside,
    )
    ip_batch(lab.router, [f"addr add {WAN[1]}/{WAN.prefixlen} dev wan0", "link set wan0 up"])
    ip_batch(
        lab.outside,
        [
            f"addr add {WAN[254]}/{WAN.prefixlen} dev eth0",
            "link set eth0 up",
            f"route add default via {WAN[1]}",
        ],
    )
    if lab.ipv6:
        ip_batch(lab.router, [f"addr add {WAN6[1]}/{WAN6.prefixlen} dev wan0 nodad"])
        ip_batch(
            lab.outside,
            [
                f"addr add {WAN6[254]}/{WAN6.prefixlen} dev eth0 nodad",
                f"route add default via {WAN6[1]}",
            ],
        )


def _lan_bridge(node: Node) -> str:
    return f"lan{UNDERLAYS.index(node.lan)}"


def build_node(lab: Lab, node: Node) -> None:
    """The node's namespace on its underlay, its plugin, and its agent. The agent writes the
    node's CNI config once it has leased a subnet; wait_ready() waits for that."""
    build_node_network(lab, node)
    # What `pycnictl install` writes: native where cc is found, compiled once per lab.
    write_plugin(node.plugin, os.path.join(lab.state_dir, "bin"))
    start_agent(lab, node)


def build_node_network(
    lab: Lab, node: Node, default_route: bool = True, extra_routes: tuple[str, ...] = ()
) -> None:
    """The node's namespace, plugged into its underlay. Without a default route (the
    Kubernetes lab) it reaches the underlays and `extra_routes` only: nothing it does can
    leave the lab (a pull, a lookup through the machine's resolver)."""
    make_netns(node.netns)
    _forwarding(node.netns, lab.ipv6)
    port = f"{node.name}"  # the node's port on the router's bridge
    lan = ipaddress.ip_network(node.lan)
    run(
        "ip",
        "-n",
        node.netns,
        "link",
        "add",
        "eth0",
        "type",
        "veth",
        "peer",
        "name",
        port,
        "netns",
        lab.router,
    )
    ip_batch(lab.router, [f"link set {port} master {_lan_bridge(node)}", f"link set {port} up"])
    if default_route:
        routes = [f"route add default via {node.router_ip}"]
    else:
        routes = [f"route add {u} via {node.router_ip}" for u in UNDERLAYS[: lab.underlays]
                  if u != node.lan]  # fmt: skip
        routes += [f"route add {r} via {node.router_ip}" for r in extra_routes if ":" not in r]
    ip_batch(
        node.netns,
        [f"addr add {node.lan_ip}/{lan.prefixlen} dev eth0", "link set eth0 up", *routes],
    )
    if node.lan6_ip:
        lan6 = ipaddress.ip_network(node.lan6)
        ip_batch(
            node.netns,
            [
                f"addr add {node.lan6_ip}/{lan6.prefixlen} dev eth0 nodad",
                *([f"route add default via {node.router6_ip}"] if default_route else []),
                *(f"route add {r} via {node.router6_ip}" for r in extra_routes if ":" in r),
            ],
        )


def agent_args(lab: Lab, node: Node) -> list[str]:
    """The cluster half of the node agent's command line (shared with `pycnictl leave`)."""
    cidrs = [lab.network, lab.network6] if lab.ipv6 else [lab.network]
    args = [
        *(a for c in cidrs for a in ("--cluster-cidr", c)),
        "--node-name",
        node.name,
        "--iface",
        "eth0",
        "--backend",
        lab.backend,
        "--datastore",
        lab.datastore,
        "--conf-dir",
        node.conf_dir,
        "--subnet-file",
        node.subnet_file,
        "--network-name",
        NETWORK_NAME,
        "--resync",
        str(AGENT_RESYNC),
    ]
    if not lab.fast_path:
        args.append("--no-fast-path")
    if lab.datastore == "etcd":
        args += ["--etcd-endpoints", lab.etcd_url]
    else:
        args += ["--datastore-path", lab.cluster_db]
    # The plugin's own keys that the lab's nodes need in their config.
    return args


def start_agent(lab: Lab, node: Node) -> None:
    """`pycnictl agent` inside the node's namespace, detached from this command: it serves the
    node until `lab down`. Metrics and health on the node's own loopback."""
    from ..agent.launch import agent_argv, wait_until_listening

    argv = agent_argv(
        node.agent_socket, node.data_dir, node.agent_log, metrics_port=AGENT_METRICS_PORT
    ) + agent_args(lab, node)
    os.makedirs(node.root, exist_ok=True)
    with open(node.agent_log, "ab") as log:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", node.netns, *argv],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    try:
        wait_until_listening(proc, node.agent_socket)
    except RuntimeError as exc:
        with open(node.agent_log, errors="replace") as f:
            tail = "".join(f.readlines()[-5:])
        raise LabError(f"{node.name}: {exc}; the end of {node.agent_log}:\n{tail}") from None


def wait_ready(node: Node, timeout: float = CONFIG_TIMEOUT) -> None:
    """Until the agent has written the node's CNI config (its subnet is leased)."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(node.conflist_path):
        if time.monotonic() > deadline:
            raise LabError(
                f"{node.name}: no CNI config after {timeout:.0f} s: the agent has no "
                f"subnet (see {node.agent_log})"
            )
        time.sleep(0.05)
    env = read_subnet_env(node.subnet_file)
    node.subnet, node.subnet6 = env.get("SUBNET", ""), env.get("IPV6_SUBNET", "")


def wait_converged(lab: Lab, timeout: float = CONFIG_TIMEOUT) -> None:
    """Until every node's agent has reconciled routes towards every other node (its health
    lists them as remote nodes): a probe sent earlier could find a route still missing."""
    from ..agent.client import agent_health

    deadline = time.monotonic() + timeout
    pending = list(lab.nodes)
    while pending:
        node = pending[0]
        want = {n.name for n in lab.nodes} - {node.name}
        try:
            health = agent_health(node.agent_socket).get("health") or {}
            cluster = health.get("cluster", {})
            seen = {n["name"] for n in cluster.get("remoteNodes", [])}
        except (OSError, ValueError):
            seen = set()
        if seen == want:
            pending.pop(0)
            continue
        if time.monotonic() > deadline:
            raise LabError(
                f"{node.name}: routes to {', '.join(sorted(want - seen))} missing "
                f"(and to {', '.join(sorted(seen - want)) or 'nothing'} extra) after "
                f"{timeout:.0f} s; see {node.agent_log}"
            )
        time.sleep(0.05)


def netns_pids(netns: str) -> list[int]:
    return [int(pid) for pid in run("ip", "netns", "pids", netns, check=False).stdout.split()]


def _argv(pid: int) -> list[bytes]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []  # gone meanwhile


def agent_pids(node: Node) -> list[int]:
    return [pid for pid in netns_pids(node.netns) if b"agent" in _argv(pid)]


def stop_agent(node: Node, sig: int = 15, wait: float = 10.0) -> None:
    """Signal the agent (the pycnictl process in the node's namespace) and wait for it."""
    pids = agent_pids(node)
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + wait
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if _alive(p)]
        time.sleep(0.05)
    if pids:
        raise LabError(f"{node.name}: the agent (pid {pids[0]}) did not stop")


def leave(lab: Lab, node: Node) -> None:
    """Clean node removal: `pycnictl leave` in the node after its agent stopped."""
    from ..agent.launch import pycnictl_argv

    argv = [*pycnictl_argv(), "leave", "--data-dir", node.data_dir, *agent_args(lab, node)]
    run("ip", "netns", "exec", node.netns, *argv, timeout=60)


# ----------------------------------------------------------------------------- etcd


def start_etcd(lab: Lab):
    """etcd in the router's namespace, on the first underlay's router address (every node
    reaches it, whichever underlay it is on). Detached: it runs until `lab down`."""
    from ..cluster.etcd_server import EtcdServer

    host = ipaddress.ip_network(UNDERLAYS[0])[254]
    server = EtcdServer(
        lab.etcd_dir,
        client_url=lab.etcd_url,
        peer_url=f"http://{host}:2380",
        netns=lab.router,
        log_path=os.path.join(lab.state_dir, "etcd.log"),
    )
    server.start()
    server.detach()
    return server


def kill_etcd(lab: Lab) -> None:
    """SIGKILL the lab's etcd (a crash); start_etcd() brings it back with the same data."""
    pids = etcd_pids(lab)
    for pid in pids:
        os.kill(pid, 9)
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.02)


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent to reap it counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def etcd_pids(lab: Lab) -> list[int]:
    return [
        pid
        for pid in netns_pids(lab.router)
        if os.path.basename(next(iter(_argv(pid)), b"")) == b"etcd"
    ]


# ----------------------------------------------------------------------------- pods


def cni_args(pod: Pod) -> list[tuple[str, str]]:
    return [
        ("IgnoreUnknown", "1"),
        ("K8S_POD_NAMESPACE", pod.namespace),
        ("K8S_POD_NAME", pod.k8s_name),
        ("K8S_POD_INFRA_CONTAINER_ID", pod.container_id),
        ("K8S_POD_UID", pod.uid),
    ]


def exec_plugin(
    node: Node, pod: Pod, command: str, extra: dict | None = None, netns_path: str | None = None
) -> subprocess.CompletedProcess:
    """Run the installed plugin inside the node as a runtime (libcni) would: CNI_* environment,
    the conflist's plugin entry with name and cniVersion injected on stdin."""
    with open(node.conflist_path) as f:
        conflist = json.load(f)
    conf = dict(conflist["plugins"][0])
    conf["name"] = conflist["name"]
    # As libcni >= 1.2 does: the highest version the list offers (we speak them all).
    conf["cniVersion"] = max(
        conflist.get("cniVersions") or [conflist["cniVersion"]], key=versions.parse
    )
    conf.update(extra or {})
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": pod.container_id,
        "CNI_NETNS": pod.netns_path if netns_path is None else netns_path,
        "CNI_IFNAME": pod.ifname,
        "CNI_ARGS": ";".join(f"{k}={v}" for k, v in cni_args(pod)),
        "CNI_PATH": node.bin_dir,
    }
    # The plugin's file name equals the config's type, found along CNI_PATH.
    plugin = os.path.join(node.bin_dir, conf["type"])
    return subprocess.run(
        ["ip", "netns", "exec", node.netns, plugin],
        env=env,
        input=json.dumps(conf),
        capture_output=True,
        text=True,
        timeout=60,
    )


def cache_path(node: Node, pod: Pod) -> str:
    # libcni: /var/lib/cni/results/<network>-<container id>-<ifname>
    return os.path.join(node.results_dir, f"{NETWORK_NAME}-{pod.container_id}-{pod.ifname}")


def add_pod(node: Node, pod: Pod, extra: dict | None = None) -> None:
    """ADD ``pod`` as a runtime would; ``extra``: more keys for the config (runtimeConfig)."""
    make_netns(pod.netns)
    proc = exec_plugin(node, pod, "ADD", extra)
    try:
        result = json.loads(proc.stdout)
    except ValueError:
        result = None
    if proc.returncode != 0 or not isinstance(result, dict) or "ips" not in result:
        raise LabError(
            f"ADD of {pod.netns} failed (exit {proc.returncode}): "
            f"{(proc.stdout or proc.stderr).strip()}"
        )
    pod.cache = cache_path(node, pod)
    with open(node.conflist_path, "rb") as f:
        config = f.read()
    cached = {
        "kind": "cniCacheV1",
        "containerId": pod.container_id,
        "config": base64.b64encode(config).decode(),
        "ifName": pod.ifname,
        "networkName": NETWORK_NAME,
        "netns": pod.netns_path,
        "cniArgs": [list(kv) for kv in cni_args(pod)],
        "result": result,
    }
    atomic_write(pod.cache, json.dumps(cached, indent=2) + "\n", 0o600)
    ip = result["ips"][0]
    pod.address = ip["address"]
    pod.address6 = next((i["address"] for i in result["ips"] if ":" in i["address"]), "")
    ifaces = result.get("interfaces", [])
    if isinstance(ip.get("interface"), int) and ip["interface"] < len(ifaces):
        pod.mac = ifaces[ip["interface"]].get("mac", "")
    bridge = json.loads(config)["plugins"][0].get("bridge", "cni0")
    pod.host_veth = next(
        (i["name"] for i in ifaces if not i.get("sandbox") and i["name"] != bridge), ""
    )


def del_pod(node: Node, pod: Pod, live: set[str]) -> str | None:
    """DEL through the plugin, with prevResult from the cache as libcni does; an error or None."""
    if node.netns not in live:
        return None  # the node (bridge, veths, rules) is gone with its namespace
    if not (os.path.exists(node.plugin) and os.path.exists(node.conflist_path)):
        return None if not pod.address else f"{pod.netns}: plugin or config missing, DEL skipped"
    extra = {}
    try:
        with open(pod.cache or cache_path(node, pod)) as f:
            extra["prevResult"] = json.load(f)["result"]
    except (OSError, ValueError, KeyError):
        pass  # ADD never finished (or the cache is gone): DEL without prevResult
    netns_path = pod.netns_path if pod.netns in live else ""
    proc = exec_plugin(node, pod, "DEL", extra, netns_path)
    if proc.returncode != 0:
        return f"DEL of {pod.netns} failed: {(proc.stdout or proc.stderr).strip()}"
    return None


def kill_netns_pids(netns: str) -> None:
    for pid in netns_pids(netns):
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass


def delete_netns(name: str) -> str | None:
    kill_netns_pids(name)
    proc = run("ip", "netns", "del", name, check=False)
    return None if proc.returncode == 0 else f"ip netns del {name}: {proc.stderr.strip()}"
