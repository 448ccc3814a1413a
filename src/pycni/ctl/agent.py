"""`pycnictl agent`: the per-node daemon that serves the thin plugin executable and, given a
cluster CIDR, wires this node into the cluster; `pycnictl leave`: clean removal of a node."""

from __future__ import annotations

import argparse
import signal
import socket

from ..cluster.factory import DEFAULT_NODE_TIMEOUT, DEFAULT_SQLITE_PATH, KINDS
from ..cni.netconf import DEFAULT_DATA_DIR
from ..shim import DEFAULT_SOCKET

DEFAULT_LOG = "/var/log/pycni-agent.log"
DEFAULT_METRICS_PORT = 9654
BACKENDS = ("host-gw", "vxlan", "auto")  # pycni.backends.MODES (not imported: pyroute2 is slow)


def register(sub) -> None:
    cluster = cluster_options()
    p = sub.add_parser(
        "agent",
        parents=[cluster],
        help="run the node agent (serves CNI calls; with --cluster-cidr also "
        "leases the node's subnet and routes to the other nodes)",
    )
    p.add_argument("--socket", default=DEFAULT_SOCKET, help="unix socket to serve on")
    p.add_argument(
        "--data-dir",
        default=DEFAULT_DATA_DIR,
        help="the plugin's dataDir (for metrics and status before any call)",
    )
    # 16: the storm of 110 ADDs is no slower than with 32 (the kernel's rtnl lock serialises the
    # veth work anyway) and each worker keeps its own netlink handle and SQLite connection,
    # ~0.6 MB: 32 of them took the agent to 59 MB after the storm, 16 to 52 MB.
    p.add_argument("--workers", type=int, default=16, help="calls served at once")
    p.add_argument(
        "--test-faults",
        action="store_true",
        help="TESTS ONLY: honour the fault-injection variables of CNI calls (PYCNI_FAIL_AFTER, "
        "PYCNI_TEST_KILL_AT, PYCNI_TEST_PAUSE_AT: fail, SIGKILL the agent, or pause at a step); "
        "never in production",
    )
    p.add_argument(
        "--no-network-policy",
        dest="network_policy",
        action="store_false",
        help="do not enforce NetworkPolicy (on by default with --cluster-cidr: the objects "
        "come from the API server, or from the sqlite or etcd datastore)",
    )
    p.add_argument("--log-file", default=DEFAULT_LOG, help="'' logs to stderr")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.add_argument(
        "--metrics-addr",
        default=None,
        help="metrics and health listen address (default 127.0.0.1; a non-loopback "
        "address serves them unauthenticated beyond this host)",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=DEFAULT_METRICS_PORT,
        help="Prometheus /metrics and /healthz port; 0 turns them off",
    )
    p.set_defaults(func=run_agent)
    leave = sub.add_parser(
        "leave",
        parents=[cluster],
        help="remove this node from the cluster: release its subnet (the "
        "other nodes drop their routes to it) and remove its own routes",
    )
    leave.add_argument(
        "--data-dir",
        default=DEFAULT_DATA_DIR,
        help="the agent's --data-dir (its packet-rule state)",
    )
    leave.set_defaults(func=run_leave)


def _positive_seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def cidr_list(text: str) -> list[str]:
    """``10.244.0.0/16,fd00:10:244::/56`` as a list; empty items (an unset ConfigMap key
    expanded into the argument) are left out."""
    return [item.strip() for item in text.split(",") if item.strip()]


def cluster_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("cluster (on when --cluster-cidr is given)")
    g.add_argument(
        "--cluster-cidr",
        action="extend",
        type=cidr_list,
        default=[],
        help="the cluster's pod CIDR, e.g. 10.244.0.0/16; for dual stack repeat it with an "
        "IPv6 CIDR, or give both comma-separated as kubeadm's --pod-network-cidr "
        "(empty items are ignored: the manifest passes an empty IPv6 CIDR so)",
    )
    g.add_argument(
        "--subnet-size", type=int, default=24, help="prefix length of each node's IPv4 subnet (24)"
    )
    g.add_argument("--subnet-size-v6", type=int, default=64, help="... IPv6 subnet (64)")
    g.add_argument(
        "--datastore",
        choices=KINDS,
        default="sqlite",
        help="where node subnets are leased (sqlite, the embedded default)",
    )
    g.add_argument(
        "--datastore-path",
        default=DEFAULT_SQLITE_PATH,
        help=f"the sqlite datastore's file, shared by the nodes ({DEFAULT_SQLITE_PATH})",
    )
    g.add_argument("--etcd-endpoints", default="", help="comma-separated etcd client URLs")
    g.add_argument("--etcd-prefix", default="/pycni/", help="key prefix in etcd (/pycni/)")
    g.add_argument(
        "--kubeconfig",
        default=None,
        help="kubernetes datastore: kubeconfig (default: in-cluster config)",
    )
    g.add_argument(
        "--node-timeout",
        "--lease-ttl",
        dest="node_timeout",
        type=_positive_seconds,
        default=DEFAULT_NODE_TIMEOUT,
        help="seconds after which a node that vanished without `pycnictl leave` leaves the "
        "other nodes' routes: its subnet lease's TTL (sqlite, etcd; its agent renews it every "
        "third of it), or how long its Node's Ready may stay Unknown (kubernetes); "
        f"{DEFAULT_NODE_TIMEOUT:g}, so within 5 minutes. --lease-ttl is its old name",
    )
    g.add_argument("--node-name", default=socket.gethostname(), help="this node's name")
    g.add_argument(
        "--node-ip",
        action="append",
        default=[],
        help="address other nodes reach this node at (default: the underlay "
        "interface's address); repeat for dual stack. Without --iface, the underlay is the "
        "interface holding it",
    )
    g.add_argument(
        "--iface",
        default="",
        help="underlay interface (default: the one holding the node's address: --node-ip, "
        "or the Node's InternalIP with the kubernetes datastore; else the one holding the "
        "default route)",
    )
    g.add_argument(
        "--backend",
        choices=BACKENDS,
        default="vxlan",
        help="how pods reach other nodes' pods (vxlan)",
    )
    g.add_argument("--vni", type=int, default=1, help="VXLAN network identifier (1)")
    g.add_argument("--vxlan-port", type=int, default=8472, help="VXLAN UDP port (8472)")
    g.add_argument(
        "--conf-dir",
        default="/etc/cni/net.d",
        help="where the node's CNI config list is written once its subnet is known",
    )
    g.add_argument(
        "--subnet-file",
        default="/run/pycni/subnet.env",
        help="the node's subnet.env (/run/pycni/subnet.env)",
    )
    g.add_argument("--network-name", default="pycni", help="CNI network name (pycni)")
    g.add_argument("--bridge", default="cni0", help="the node's pod bridge (cni0)")
    g.add_argument(
        "--no-ip-masq",
        dest="ip_masq",
        action="store_false",
        help="do not masquerade pod traffic leaving the cluster CIDR",
    )
    g.add_argument(
        "--masq-exclude",
        action="append",
        default=[],
        help="a destination CIDR pod traffic reaches without masquerade (e.g. the "
        "node network); repeatable",
    )
    g.add_argument(
        "--fast-path",
        choices=("on", "off"),
        default="on",
        help="the eBPF fast path: tc programs that carry established, un-NATed pod "
        "connections past the bridge and the stack (on: wherever the kernel allows it)",
    )
    g.add_argument(
        "--no-fast-path",
        dest="fast_path",
        action="store_const",
        const="off",
        help="the same as --fast-path=off",
    )
    g.add_argument(
        "--resync",
        type=float,
        default=10.0,
        help="seconds between periodic reconciles (besides datastore events)",
    )
    return p


def run_agent(args) -> int:
    from .. import log
    from ..agent.options import cluster_node, policy_controller
    from ..agent.server import Agent

    log.setup(args.log_file, args.log_level)
    # Import every command's code now, not on the first pod's clock.
    from ..cni import netconf  # noqa: F401
    from ..core import add, check, delete, gc, resources, status  # noqa: F401

    resources.keep_warm()

    agent = Agent(
        args.socket, workers=args.workers, data_dir=args.data_dir, test_faults=args.test_faults
    )
    if args.test_faults:
        import logging

        logging.getLogger("pycni").warning(
            "--test-faults: CNI calls may fail, pause or kill this agent on request (tests only)"
        )
    agent.cluster = cluster_node(args, args.data_dir, args.socket)
    if agent.cluster is not None and args.network_policy:
        agent.policy = policy_controller(args, args.data_dir)
    elif agent.cluster is not None:
        from ..agent.policy import forget

        forget(args.data_dir)
    if args.metrics_port:
        from ..agent import metrics

        metrics.start(
            agent,
            args.metrics_addr or "127.0.0.1",
            args.metrics_port,
            allow_remote=args.metrics_addr is not None,
        )
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: agent.stop())
    agent.bind()
    if agent.cluster is not None:
        agent.cluster.start()
    if agent.policy is not None:
        agent.policy.start()
    try:
        agent.serve()
    finally:
        if agent.policy is not None:
            agent.policy.stop()
        if agent.cluster is not None:
            agent.cluster.stop()
    return 0


def run_leave(args) -> int:
    from .. import log
    from ..agent.options import cluster_node

    log.setup("", "info")
    node = cluster_node(args, args.data_dir, "")
    if node is None:
        raise SystemExit(
            "pycnictl leave: give the cluster settings the agent ran with "
            "(--cluster-cidr, --datastore, ...)"
        )
    return node.leave()
