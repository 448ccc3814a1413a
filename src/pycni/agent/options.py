"""The agent's cluster side from parsed command-line options (`pycnictl agent`, `leave` and
`uninstall` take the same cluster options; ctl/agent.py declares them)."""

from __future__ import annotations


def cluster_node(args, data_dir: str, agent_socket: str):
    """The agent's cluster side from the command line, or None without --cluster-cidr."""
    if not args.cluster_cidr:
        return None
    from ..cluster.factory import open_datastore
    from ..cluster.kv import KVError
    from ..cluster.model import ClusterError, ClusterSettings
    from .cluster import ClusterNode, ClusterOptions

    try:
        settings = ClusterSettings(
            tuple(args.cluster_cidr), {4: args.subnet_size, 6: args.subnet_size_v6}
        )
    except ValueError as exc:
        raise SystemExit(f"pycnictl: {exc}") from None
    options = ClusterOptions(
        settings=settings,
        node_name=args.node_name,
        backend=args.backend,
        iface=args.iface,
        node_ips=tuple(args.node_ip),
        conf_dir=args.conf_dir,
        subnet_file=args.subnet_file,
        network_name=args.network_name,
        bridge=args.bridge,
        ip_masq=args.ip_masq,
        masq_exclude=tuple(args.masq_exclude),
        data_dir=data_dir,
        agent_socket=agent_socket,
        resync=args.resync,
        vni=args.vni,
        vxlan_port=args.vxlan_port,
        fast_path=args.fast_path != "off",
    )
    try:
        store = open_datastore(
            args.datastore,
            settings,
            args.node_name,
            path=args.datastore_path,
            etcd_endpoints=args.etcd_endpoints,
            etcd_prefix=args.etcd_prefix,
            kubeconfig=args.kubeconfig,
            lease_ttl=args.node_timeout,
        )
    except (ValueError, ClusterError, KVError) as exc:
        raise SystemExit(f"pycnictl: {args.datastore} datastore: {exc}") from None
    return ClusterNode(options, store)


def policy_controller(args, data_dir: str):
    """The NetworkPolicy controller over the object source beside the datastore."""
    from ..cluster.factory import open_objects
    from ..cluster.kv import KVError
    from ..cluster.model import ClusterError
    from .policy import PolicyController

    try:
        source = open_objects(
            args.datastore,
            path=args.datastore_path,
            etcd_endpoints=args.etcd_endpoints,
            etcd_prefix=args.etcd_prefix,
            kubeconfig=args.kubeconfig,
            lease_ttl=args.node_timeout,
        )
    except (ValueError, ClusterError, KVError) as exc:
        raise SystemExit(f"pycnictl: {args.datastore} NetworkPolicy objects: {exc}") from None
    return PolicyController(source, args.node_name, data_dir, resync=args.resync)
