"""The control plane in its own namespace, <prefix>-cp, on the first underlay at .253:
etcd (loopback only), kube-apiserver, kube-controller-manager and kube-scheduler.

Authorization is Node,RBAC with the NodeRestriction admission plugin, as kubeadm sets it:
each kubelet holds a system:node:NAME certificate, the controllers and the scheduler their
bootstrap identities, and pods get service-account tokens signed with the lab's own key.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import time

from ...harness.kube import binary
from ...harness.pki import Pki
from ..build import ip_batch, make_netns, run
from ..model import UNDERLAYS, UNDERLAYS6, Lab, LabError
from . import procs

CP_HOST = 253  # the control plane's address on the first underlay (nodes 1.., the router .254)
SERVICE_CIDR = "10.96.0.0/12"
SERVICE_CIDR6 = "fd00:10:96::/112"  # with --ipv6 (kubeadm's dual-stack example)
KUBERNETES_SERVICE_IP = "10.96.0.1"
DNS_SERVICE_IP = "10.96.0.10"
CLUSTER_DOMAIN = "cluster.local"
APISERVER_PORT = 6443
READY_TIMEOUT = 120.0


def cp_netns(lab: Lab) -> str:
    return f"{lab.prefix}-cp"


def cp_ip() -> str:
    return str(ipaddress.ip_network(UNDERLAYS[0])[CP_HOST])


def cp_ip6() -> str:
    return str(ipaddress.ip_network(UNDERLAYS6[0])[CP_HOST])


def service_cidrs(lab: Lab) -> list[str]:
    """The Service ranges, IPv4 first (the primary family: the `kubernetes` Service's and
    CoreDNS's addresses stay IPv4), as kube-apiserver and the controller manager take them."""
    return [SERVICE_CIDR, SERVICE_CIDR6] if lab.ipv6 else [SERVICE_CIDR]


def cluster_cidrs(lab: Lab) -> list[str]:
    return [lab.network, lab.network6] if lab.ipv6 else [lab.network]


def server_url() -> str:
    return f"https://{cp_ip()}:{APISERVER_PORT}"


def kube_dir(lab: Lab) -> str:
    return os.path.join(lab.state_dir, "kube")


def pki(lab: Lab) -> Pki:
    return Pki(os.path.join(kube_dir(lab), "pki"))


def admin_kubeconfig(lab: Lab) -> str:
    return os.path.join(lab.state_dir, "kubeconfig")


def log_path(lab: Lab, name: str) -> str:
    return os.path.join(kube_dir(lab), "logs", name + ".log")


def build_cp_netns(lab: Lab) -> None:
    """The control plane's namespace on lan0, with no default route: only the underlays (and,
    once nodes have them, their pod subnets) are reachable, nothing beyond the lab."""
    ns = cp_netns(lab)
    make_netns(ns)
    lan = ipaddress.ip_network(UNDERLAYS[0])
    run("ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", "cp",
        "netns", lab.router)  # fmt: skip
    ip_batch(lab.router, ["link set cp master lan0", "link set cp up"])
    commands = [f"addr add {cp_ip()}/{lan.prefixlen} dev eth0", "link set eth0 up"]
    commands += [f"route add {u} via {lan[254]}" for u in UNDERLAYS[1 : lab.underlays]]
    if lab.ipv6:
        lan6 = ipaddress.ip_network(UNDERLAYS6[0])
        commands.append(f"addr add {cp_ip6()}/{lan6.prefixlen} dev eth0 nodad")
    ip_batch(ns, commands)


def make_pki(lab: Lab, node_names: list[str]) -> None:
    p = pki(lab)
    p.make_ca()
    ips = [KUBERNETES_SERVICE_IP, cp_ip(), "127.0.0.1"]
    if lab.ipv6:  # the `kubernetes` Service's IPv6 address, should it be made dual-stack
        ips += [str(ipaddress.ip_network(SERVICE_CIDR6)[1]), cp_ip6(), "::1"]
    p.issue(
        "apiserver",
        "kube-apiserver",
        ips=tuple(ips),
        dns=(
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            f"kubernetes.default.svc.{CLUSTER_DOMAIN}",
            "localhost",
        ),
        server=True,
    )
    # The apiserver towards kubelets (exec, logs, port-forward): authorized as a master.
    p.issue("apiserver-kubelet-client", "kube-apiserver-kubelet-client", "system:masters")
    p.issue("admin", "kubernetes-admin", "system:masters")
    # The bootstrap RBAC policy binds these user names to their roles.
    p.issue("controller-manager", "system:kube-controller-manager")
    p.issue("scheduler", "system:kube-scheduler")
    p.issue("kube-proxy", "system:kube-proxy")
    for name in node_names:
        p.issue(f"kubelet-{name}", f"system:node:{name}", "system:nodes")
    server = server_url()
    d = kube_dir(lab)
    p.kubeconfig(admin_kubeconfig(lab), server, "admin", "admin")
    for who in ("controller-manager", "scheduler", "kube-proxy"):
        p.kubeconfig(os.path.join(d, f"{who}.kubeconfig"), server, who, who)
    for name in node_names:
        p.kubeconfig(os.path.join(d, f"kubelet-{name}.kubeconfig"), server, f"kubelet-{name}",
                     f"system:node:{name}")  # fmt: skip


def in_cp_netns(lab: Lab, exe: str) -> list[str]:
    """argv that runs `exe` in the control plane's network namespace alone (nsenter, not ip
    netns exec: no private mount namespace)."""
    return ["nsenter", f"--net=/run/netns/{cp_netns(lab)}", "--", exe]


def start_etcd(lab: Lab) -> None:
    exe = binary("etcd")
    data = os.path.join(kube_dir(lab), "etcd")
    os.makedirs(data, mode=0o700, exist_ok=True)
    argv = in_cp_netns(lab, exe) + [
        "--name=lab",
        f"--data-dir={data}",
        "--listen-client-urls=http://127.0.0.1:2379",
        "--advertise-client-urls=http://127.0.0.1:2379",
        "--listen-peer-urls=http://127.0.0.1:2380",
        "--initial-advertise-peer-urls=http://127.0.0.1:2380",
        "--initial-cluster=lab=http://127.0.0.1:2380",
        "--listen-metrics-urls=http://127.0.0.1:2381",
        "--log-level=warn",
    ]
    procs.start(lab.state_dir, "etcd", exe, argv, log_path(lab, "etcd"))


def start_apiserver(lab: Lab) -> None:
    exe = binary("kube-apiserver")
    p = pki(lab)
    argv = in_cp_netns(lab, exe) + [
        "--etcd-servers=http://127.0.0.1:2379",
        f"--advertise-address={cp_ip()}",
        "--bind-address=0.0.0.0",
        f"--secure-port={APISERVER_PORT}",
        f"--service-cluster-ip-range={','.join(service_cidrs(lab))}",
        f"--client-ca-file={p.ca}",
        f"--tls-cert-file={p.path('apiserver.crt')}",
        f"--tls-private-key-file={p.path('apiserver.key')}",
        f"--kubelet-client-certificate={p.path('apiserver-kubelet-client.crt')}",
        f"--kubelet-client-key={p.path('apiserver-kubelet-client.key')}",
        # Nodes are reached at the lab's addresses, never at a hostname nobody resolves.
        "--kubelet-preferred-address-types=InternalIP",
        f"--service-account-issuer=https://kubernetes.default.svc.{CLUSTER_DOMAIN}",
        f"--service-account-key-file={p.path('sa.pub')}",
        f"--service-account-signing-key-file={p.path('sa.key')}",
        "--authorization-mode=Node,RBAC",
        "--enable-admission-plugins=NodeRestriction",
        "--allow-privileged=true",  # pycni's agent is privileged
        "--profiling=false",
    ]
    procs.start(lab.state_dir, "kube-apiserver", exe, argv, log_path(lab, "kube-apiserver"))


def start_controllers(lab: Lab) -> None:
    """The controller manager and the scheduler, once the apiserver is ready (started with it,
    the controller manager exits: "unable to load configmap based request-header-client-ca")."""
    d = kube_dir(lab)
    p = pki(lab)
    kcm = binary("kube-controller-manager")
    kubeconfig = os.path.join(d, "controller-manager.kubeconfig")
    flex = os.path.join(d, "flexvolume")  # else it creates /usr/libexec/kubernetes/...
    os.makedirs(flex, exist_ok=True)
    argv = in_cp_netns(lab, kcm) + [
        f"--kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        "--bind-address=127.0.0.1",
        "--leader-elect=false",
        "--use-service-account-credentials=true",
        f"--service-account-private-key-file={p.path('sa.key')}",
        f"--root-ca-file={p.ca}",
        f"--cluster-signing-cert-file={p.ca}",
        f"--cluster-signing-key-file={p.path('ca.key')}",
        # Each node's podCIDR, which pycni's agent reads from its Node (a kubeadm cluster's
        # --pod-network-cidr sets the same).
        "--allocate-node-cidrs=true",
        f"--cluster-cidr={','.join(cluster_cidrs(lab))}",
        # A /24 per node, and with --ipv6 also a /64 (the plain lab's split).
        *(
            ["--node-cidr-mask-size-ipv4=24", "--node-cidr-mask-size-ipv6=64"]
            if lab.ipv6
            else ["--node-cidr-mask-size=24"]
        ),
        f"--service-cluster-ip-range={','.join(service_cidrs(lab))}",
        f"--flex-volume-plugin-dir={flex}",
        "--profiling=false",
    ]
    procs.start(lab.state_dir, "kube-controller-manager", kcm, argv,
                log_path(lab, "kube-controller-manager"))  # fmt: skip
    sched = binary("kube-scheduler")
    kubeconfig = os.path.join(d, "scheduler.kubeconfig")
    argv = in_cp_netns(lab, sched) + [
        f"--kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        "--bind-address=127.0.0.1",
        "--leader-elect=false",
        "--profiling=false",
    ]
    procs.start(lab.state_dir, "kube-scheduler", sched, argv, log_path(lab, "kube-scheduler"))


def wait_apiserver(lab: Lab, timeout: float = READY_TIMEOUT) -> None:
    """Until /readyz answers ok, asked from inside the control plane's namespace."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if procs.pid_of(lab.state_dir, "kube-apiserver") is None:
            raise LabError(f"kube-apiserver exited: see {log_path(lab, 'kube-apiserver')}")
        proc = kubectl(lab, "get", "--raw=/readyz", check=False, timeout=10)
        if proc.returncode == 0 and proc.stdout.strip() == "ok":
            return
        last = (proc.stderr or proc.stdout).strip()[-300:]
        time.sleep(0.2)
    raise LabError(f"kube-apiserver not ready after {timeout:.0f} s: {last}")


def kubectl_argv(lab: Lab, *args: str) -> list[str]:
    """The built kubectl with the admin kubeconfig, in the control plane's namespace (the
    only place that reaches the apiserver: the host has no route into the lab)."""
    return in_cp_netns(lab, binary("kubectl")) + [f"--kubeconfig={admin_kubeconfig(lab)}", *args]


def kubectl(
    lab: Lab, *args: str, check: bool = True, timeout: float = 120, input: str | None = None
) -> subprocess.CompletedProcess:
    argv = kubectl_argv(lab, *args)
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input)
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"kubectl {' '.join(args)}: no answer in {timeout:.0f} s") from exc
    if check and proc.returncode != 0:
        raise LabError(f"kubectl {' '.join(args)} failed: {(proc.stderr or proc.stdout).strip()}")
    return proc


def route_pod_subnets(lab: Lab, subnets: dict[str, list[str]]) -> None:
    """Routes from the control plane to each node's pod subnets (the apiserver's proxy to pods
    and services, and the e2e binary, which runs here, reach pods directly)."""
    by_name = {n.name: n for n in lab.nodes}
    commands = [
        f"route replace {cidr} via {by_name[name].lan6_ip if ':' in cidr else by_name[name].lan_ip}"
        for name, cidrs in subnets.items()
        if name in by_name
        for cidr in cidrs
    ]
    if commands:
        ip_batch(cp_netns(lab), commands)
