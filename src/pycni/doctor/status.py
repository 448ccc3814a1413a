"""What this node's pod network looks like (`pycnictl status`), and where the kernel has drifted
from the store (a missing bridge or host veth, masquerade rules that should be there)."""

from __future__ import annotations

import os
import shutil
import subprocess

from ..agent.client import agent_health
from ..cni.netconf import DEFAULT_DATA_DIR
from ..node_config import DEFAULT_CONF_DIR, find_agent_socket, find_data_dir
from ..shim import DEFAULT_SOCKET

# --- gathering ----------------------------------------------------------------------------


class Kernel:
    """Link lookups in the current network namespace (one netlink socket for the report)."""

    def __init__(self) -> None:
        from pyroute2 import IPRoute

        self.ipr = IPRoute()

    def link(self, name: str) -> dict | None:
        """{"exists": True, "up": bool} or None when there is no such link."""
        idx = self.ipr.link_lookup(ifname=name)
        if not idx:
            return None
        msg = self.ipr.get_links(idx[0])[0]
        return {"exists": True, "up": bool(msg["flags"] & 1)}  # IFF_UP

    def close(self) -> None:
        self.ipr.close()


def masquerade_present() -> tuple[str | None, bool | None]:
    """(backend, whether pycni's packet rules exist); present is None if unknowable."""
    from ..rules import iptables, nft, sync

    try:
        backend = sync.resolve_backend()
    except Exception:
        return None, None
    if backend == "nft":
        argvs = [["nft", "list", "table", "inet", nft.TABLE]]
    else:
        argvs = [["iptables", "-w", "-t", h.table, "-S", h.chain] for h in iptables.HOOKS]
    if not shutil.which(argvs[0][0]):
        return backend, None
    try:
        rcs = [
            subprocess.run(a, capture_output=True, timeout=10, check=False).returncode
            for a in argvs
        ]
    except (OSError, subprocess.TimeoutExpired):
        return backend, None
    return backend, 0 in rcs


def read_store(data_dir: str, kernel: Kernel) -> tuple[dict, list[dict], bool]:
    """(store summary, networks, whether pycni's packet rules are wanted) for one data dir."""
    from ..agent.metrics import pool_usage
    from ..core import masquerade
    from ..ipam.store import Store

    summary = {"dataDir": data_dir, "ok": False, "error": None}
    if not os.path.exists(os.path.join(data_dir, "pycni.db")):
        summary["error"] = "no IPAM database (no pod was ever added with this dataDir)"
        return summary, [], False
    try:
        with Store(data_dir) as store:
            infos = store.list_networks()
            attachments = store.list_attachments()
            usage = list(pool_usage(store))
            wants_masq = bool(masquerade.desired_rules(store))
    except Exception as exc:
        summary["error"] = str(exc)
        return summary, [], False
    summary["ok"] = True

    networks = []
    for name in sorted(set(infos) | {a.network for a in attachments}):
        info = infos.get(name, {})
        pods = [_pod(a, kernel) for a in attachments if a.network == name]
        bridge = info.get("bridge")
        link = kernel.link(bridge) if bridge else None
        pools = []
        for network, key, used, capacity in usage:
            if network == name:
                pct = round(100.0 * used / capacity, 1) if capacity else None
                pools.append({"key": key, "allocated": used, "capacity": capacity, "percent": pct})
        networks.append(
            {
                "name": name,
                "dataDir": data_dir,
                "bridge": {
                    "name": bridge,
                    "exists": link is not None,
                    "up": bool(link and link["up"]),
                },
                "ipMasq": bool(info.get("ipMasq")),
                "subnets": info.get("subnets", []),
                "rangeSets": pools,
                "pods": pods,
            }
        )
    return summary, networks, wants_masq


def _pod(att, kernel: Kernel) -> dict:
    return {
        "containerId": att.container_id,
        "ifname": att.ifname,
        "addresses": [f"{a.ip}/{a.prefixlen}" for a in att.allocations],
        "hostVeth": att.host_veth,
        "hostVethExists": kernel.link(att.host_veth) is not None,
        "netns": att.netns,
        "netnsExists": bool(att.netns) and os.path.exists(att.netns),
        "created": att.created,
    }


def agent_socket(socket_path: str | None, conf_dir: str) -> tuple[str, str | None, bool]:
    """(socket to ask, what named it or None, whether an agent is expected there): --socket
    if given, else the agentSocket of the node's pycni config in `conf_dir` (the cluster
    agent writes its own there), else the default socket, where an agent is optional."""
    if socket_path is not None:
        return socket_path, "--socket", True
    found = find_agent_socket(conf_dir)
    if found is not None and found[0]:
        return found[0], found[1], True
    return DEFAULT_SOCKET, None, False


def default_data_dirs(health: dict | None, conf_dir: str) -> list[str]:
    """The data dirs to read without --data-dir: the running agent's, else the one the node's
    pycni config names, else the default."""
    found = find_data_dir(conf_dir)
    return (health or {}).get("dataDirs") or [found or DEFAULT_DATA_DIR]


def collect(
    data_dirs: list[str] | None, socket_path: str | None, conf_dir: str = DEFAULT_CONF_DIR
) -> dict:
    problems: list[str] = []
    path, named_by, expected = agent_socket(socket_path, conf_dir)
    agent = agent_health(path)
    agent["socket"] = path
    agent["namedBy"] = named_by
    if expected and not agent["running"]:
        by = "" if named_by == "--socket" else f" (named by {named_by})"
        problems.append(f"agent at {path}{by}: {agent['error']}")
    elif agent["running"] and agent["error"]:
        problems.append(f"agent at {agent['socket']}: {agent['error']}")
    elif agent["health"] and agent["health"].get("status") != "ok":
        problems.append(f"agent is {agent['health'].get('status')}")

    if not data_dirs:
        data_dirs = default_data_dirs(agent["health"], conf_dir)
    stores, networks, wants_masq = [], [], False
    kernel = Kernel()
    try:
        for data_dir in data_dirs:
            summary, found, wants = read_store(data_dir, kernel)
            stores.append(summary)
            networks.extend(found)
            wants_masq = wants_masq or wants
            exists = os.path.exists(os.path.join(data_dir, "pycni.db"))
            if not summary["ok"] and exists:
                problems.append(f"store {data_dir}: {summary['error']}")
    finally:
        kernel.close()

    for net in networks:
        where = f"network {net['name']}"
        if net["pods"] and not net["bridge"]["exists"]:
            problems.append(f"{where}: bridge {net['bridge']['name']} is missing (drift)")
        elif net["pods"] and not net["bridge"]["up"]:
            problems.append(f"{where}: bridge {net['bridge']['name']} is down")
        for pod in net["pods"]:
            who = f"{where}: pod {pod['containerId'][:12]}/{pod['ifname']}"
            if not pod["hostVethExists"]:
                problems.append(f"{who}: host veth {pod['hostVeth']} is missing (drift)")
            if not pod["netnsExists"]:
                problems.append(f"{who}: netns {pod['netns']} is gone (stale; GC reclaims it)")

    cluster = (agent["health"] or {}).get("cluster")
    if cluster is not None and not cluster.get("ready"):
        problems.append(f"cluster: {cluster.get('reason') or 'not ready'}")
    elif cluster is not None:
        if cluster.get("lastError"):
            problems.append(f"cluster: datastore: {cluster['lastError']}")
        for error in (cluster.get("lastChanges") or {}).get("errors", []):
            problems.append(f"cluster: last reconcile: {error}")
        problems += outside_node_subnet(networks, cluster)
    policy = (agent["health"] or {}).get("policy")
    if policy is not None and policy.get("error"):
        problems.append(f"networkpolicy: {policy['error']}")

    backend, present = masquerade_present()
    masq = {"backend": backend, "expected": wants_masq, "present": present}
    if wants_masq and present is False:
        problems.append(f"masquerade rules ({backend}) are missing (drift)")

    from .. import version

    return {
        "healthy": not problems,
        "problems": problems,
        "pycnictl": {"version": version.version(), "commit": version.commit()},
        "agent": agent,
        "stores": stores,
        "networks": networks,
        "masquerade": masq,
    }


def outside_node_subnet(networks: list[dict], cluster: dict) -> list[str]:
    """Pods of the cluster's network holding an address outside the node's subnet now (of an
    earlier podCIDR: other nodes no longer route to it)."""
    import ipaddress

    subnets: dict[int, ipaddress.IPv4Network | ipaddress.IPv6Network] = {}
    for text in cluster.get("subnets") or ():
        subnet = ipaddress.ip_network(text)
        subnets.setdefault(subnet.version, subnet)
    out = []
    for net in networks:
        if net["name"] != cluster.get("network"):
            continue
        for pod in net["pods"]:
            for text in pod["addresses"]:
                ip = ipaddress.ip_interface(text).ip
                if ip.version in subnets and ip not in subnets[ip.version]:
                    out.append(
                        f"network {net['name']}: pod {pod['containerId'][:12]}/{pod['ifname']}: "
                        f"address {ip} is outside the node's subnet {subnets[ip.version]} (from "
                        "an earlier podCIDR; unreachable from other nodes): recreate the pod"
                    )
    return out


# --- text ---------------------------------------------------------------------------------


def _render_cluster(c: dict) -> list[str]:
    state = "ready" if c.get("ready") else f"NOT READY ({c.get('reason')})"
    out = [
        f"cluster: node {c.get('node')}, {state}, datastore {c.get('datastore')}, "
        f"backend {c.get('backend')}",
        f"  subnets  {', '.join(c.get('subnets') or []) or '-'} "
        f"(node addresses {', '.join(c.get('nodeIPs') or []) or '-'}"
        f"{', VTEP ' + c['vtepMAC'] if c.get('vtepMAC') else ''})",
    ]
    remote = c.get("remoteNodes") or []
    out.append(
        f"  routes   to {len(remote)} other node(s); {c.get('reconciles', 0)} reconcile "
        f"passes, the last {1000 * (c.get('lastReconcileSeconds') or 0):.1f} ms"
    )
    for node in remote:
        out.append(
            f"    {node['name']:<16} {', '.join(node['subnets']):<36} via "
            f"{', '.join(node['nodeIPs'])}"
        )
    return out


def _render_policy(p: dict) -> list[str]:
    sizes = p.get("sizes") or {}
    names = p.get("policies") or []
    out = [
        f"networkpolicy: {len(names)} polic{'y' if len(names) == 1 else 'ies'}, "
        f"{sizes.get('isolated_ingress', 0)} pod(s) isolated for ingress and "
        f"{sizes.get('isolated_egress', 0)} for egress of {sizes.get('pods', 0)} here; "
        f"{sizes.get('rules', 0)} rules, {sizes.get('address_sets', 0)} address sets "
        f"({sizes.get('address_elements', 0)} elements)"
    ]
    if names:
        out.append(f"  in force {', '.join(names)}")
    for problem in p.get("problems") or []:
        out.append(f"  left out {problem}")
    if p.get("error"):
        out.append(f"  ERROR    {p['error']}")
    return out


def _build(info: dict) -> str:
    """``0.1.0 (commit 1a2b3c)`` from a health report's version and commit (older agents send
    no commit)."""
    commit = info.get("commit")
    return f"{info.get('version')} (commit {commit})" if commit else str(info.get("version"))


def render(report: dict) -> str:
    out: list[str] = []
    agent = report["agent"]
    if agent["running"] and agent["health"]:
        h = agent["health"]
        out.append(
            f"agent: {h.get('status')} (pid {h.get('pid')}, version {_build(h)}, "
            f"up {_duration(h.get('uptime', 0))}, {h.get('inflight', 0)} in flight) "
            f"on {agent['socket']}"
        )
        mine = report.get("pycnictl") or {}
        if mine and _build(mine) != _build(h):
            # Mid-upgrade: the node's agent is not the build this command comes from.
            out.append(f"  this pycnictl is version {_build(mine)}: not the agent's")
    elif agent["running"]:
        out.append(f"agent: answering oddly on {agent['socket']}: {agent['error']}")
    elif agent.get("namedBy") not in (None, "--socket"):
        out.append(f"agent: NOT RUNNING ({agent['socket']}, named by {agent['namedBy']})")
    else:
        out.append(f"agent: not running ({agent['socket']}; the plugin works in-process)")
    cluster = (agent["health"] or {}).get("cluster") if agent["running"] else None
    if cluster is not None:
        out.extend(_render_cluster(cluster))
    policy = (agent["health"] or {}).get("policy") if agent["running"] else None
    if policy is not None:
        out.extend(_render_policy(policy))

    for store in report["stores"]:
        if not store["ok"]:
            out.append(f"store {store['dataDir']}: {store['error']}")
    for net in report["networks"]:
        out.append("")
        out.append(
            f"network {net['name']} (data dir {net['dataDir']}"
            f"{', ipMasq' if net['ipMasq'] else ''})"
        )
        br = net["bridge"]
        state = "up" if br["up"] else ("DOWN" if br["exists"] else "MISSING")
        out.append(f"  bridge   {br['name']}: {state}")
        out.append(f"  subnets  {', '.join(net['subnets']) or '-'}")
        for pool in net["rangeSets"]:
            if pool["capacity"]:
                use = f"{pool['allocated']}/{pool['capacity']} allocated ({pool['percent']:g}%)"
            else:
                use = f"{pool['allocated']} allocated (capacity unknown)"
            out.append(f"  pool     {pool['key']}: {use}")
        out.append(f"  pods     {len(net['pods'])}")
        if net["pods"]:
            rows = [("CONTAINER", "IFNAME", "ADDRESSES", "HOST VETH", "NETNS")]
            for pod in net["pods"]:
                veth = pod["hostVeth"] + ("" if pod["hostVethExists"] else " MISSING (drift)")
                netns = pod["netns"] + ("" if pod["netnsExists"] else " (gone)")
                rows.append(
                    (
                        pod["containerId"][:12],
                        pod["ifname"],
                        ", ".join(pod["addresses"]),
                        veth,
                        netns,
                    )
                )
            widths = [max(len(r[i]) for r in rows) for i in range(4)]
            for r in rows:
                cells = [c.ljust(w) for c, w in zip(r[:4], widths, strict=True)]
                out.append("    " + "  ".join([*cells, r[4]]))
    if not report["networks"]:
        out.append("no networks in the store")

    m = report["masquerade"]
    present = {True: "present", False: "absent", None: "unknown"}[m["present"]]
    wanted = "expected" if m["expected"] else "not expected"
    out.append("")
    out.append(f"masquerade: {wanted}; rules ({m['backend'] or 'no backend'}) {present}")
    out.append("")
    if report["healthy"]:
        out.append("status: healthy")
    else:
        out.append(f"status: {len(report['problems'])} problem(s)")
        out.extend(f"  - {p}" for p in report["problems"])
    return "\n".join(out) + "\n"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
