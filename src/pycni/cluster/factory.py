"""Opening the datastore the agent's settings name."""

from __future__ import annotations

from .datastore import Datastore
from .model import ClusterSettings
from .objects import ObjectSource

KINDS = ("sqlite", "etcd", "kubernetes")
DEFAULT_SQLITE_PATH = "/var/lib/pycni/cluster.db"
# The bound on how long a node that vanished without `pycnictl leave` keeps its place in the
# other nodes' routes: the lease TTL (sqlite, etcd); how long its Ready may be Unknown
# (kubernetes). With the detection delays, within 5 minutes.
DEFAULT_NODE_TIMEOUT = 240.0
DEFAULT_LEASE_TTL = DEFAULT_NODE_TIMEOUT


def open_datastore(
    kind: str,
    settings: ClusterSettings,
    node_name: str,
    *,
    path: str = DEFAULT_SQLITE_PATH,
    etcd_endpoints: str = "",
    etcd_prefix: str = "/pycni/",
    kubeconfig: str | None = None,
    lease_ttl: float = DEFAULT_LEASE_TTL,
) -> Datastore:
    if kind == "sqlite":
        from .leases import LeaseDatastore
        from .sqlite import SqliteKV

        return LeaseDatastore(SqliteKV(path, lease_ttl), settings, kind, node_name=node_name)
    if kind == "etcd":
        from .etcd import EtcdKV
        from .leases import LeaseDatastore

        if not etcd_endpoints:
            raise ValueError("the etcd datastore needs --etcd-endpoints")
        return LeaseDatastore(
            EtcdKV(etcd_endpoints.split(","), lease_ttl),
            settings,
            kind,
            prefix=etcd_prefix,
            node_name=node_name,
        )
    if kind == "kubernetes":
        from .kubernetes import KubernetesDatastore

        return KubernetesDatastore(node_name, kubeconfig=kubeconfig, node_timeout=lease_ttl)
    raise ValueError(f"unknown datastore {kind!r} (want one of {', '.join(KINDS)})")


def open_objects(
    kind: str,
    *,
    path: str = DEFAULT_SQLITE_PATH,
    etcd_endpoints: str = "",
    etcd_prefix: str = "/pycni/",
    kubeconfig: str | None = None,
    lease_ttl: float = DEFAULT_LEASE_TTL,
) -> ObjectSource:
    """Where NetworkPolicy's objects come from, beside the datastore of the same kind."""
    from .objects import KVObjects

    if kind == "sqlite":
        from .sqlite import SqliteKV

        return KVObjects(SqliteKV(path, lease_ttl))
    if kind == "etcd":
        from .etcd import EtcdKV

        if not etcd_endpoints:
            raise ValueError("the etcd datastore needs --etcd-endpoints")
        return KVObjects(EtcdKV(etcd_endpoints.split(","), lease_ttl), etcd_prefix)
    if kind == "kubernetes":
        from .kubernetes_objects import KubernetesObjects

        return KubernetesObjects(kubeconfig)
    raise ValueError(f"no object source for the {kind!r} datastore")
