"""The interface every datastore implements, as the agent uses it.

store = open_datastore(...)            # cluster.factory
me = store.register(local)             # this node's record, with its subnet(s)
while running:
    nodes = store.nodes()              # every node, this one included
    ...reconcile routes...
    store.wait(timeout)                # returns early when the node list changes
    store.keepalive()                  # renews this node's claim; re-claims if it was lost
store.close()                          # agent restart: the claim stays
store.release()                        # clean node removal: the subnet is freed
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from .model import NodeRecord


class Datastore(ABC):
    kind: str  # "sqlite" | "etcd" | "kubernetes"
    renew_every: float = 60.0  # seconds between keepalive() calls

    @abstractmethod
    def register(self, local: NodeRecord) -> NodeRecord:
        """Obtain this node's subnet(s) and publish what others need to reach it.

        ``local`` carries the node's name, addresses and VTEP MAC; its ``subnets`` are a wish
        (the ones recorded before a restart) that is honoured when still free. Returns the
        record as published, with its subnets. Raises SubnetsExhausted when the cluster CIDR
        has no free subnet, ClusterError when the datastore has none to give yet (kubernetes:
        no podCIDR allocated), KVError when the datastore cannot be reached."""

    def node_addresses(self) -> tuple[str, ...]:
        """This node's own addresses as the datastore knows them before register() (the
        kubernetes datastore: the Node's InternalIPs), so the agent can find its underlay
        interface by them; () when it knows none."""
        return ()

    @abstractmethod
    def nodes(self) -> list[NodeRecord]:
        """Every node with a subnet, this one included, sorted by name."""

    @abstractmethod
    def wait(self, timeout: float) -> bool:
        """Block until the node list may have changed (True) or ``timeout`` passes (False)."""

    @abstractmethod
    def keepalive(self) -> NodeRecord:
        """Renew this node's claim; if it was lost (expired, deleted), claim again (preferring
        the same subnets) and return the record now published."""

    @abstractmethod
    def release(self) -> None:
        """Clean removal of this node: its subnets become free and other nodes drop its routes."""

    def close(self) -> None:  # noqa: B027 (optional hook, not abstract)
        """Stop talking to the datastore; the claim remains (an agent restart keeps its subnet)."""
