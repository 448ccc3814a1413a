"""What a node publishes so that other nodes can reach its pods, and the cluster's settings.

Pure data: every datastore reads and writes these, every backend plans from them.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network

Network = IPv4Network | IPv6Network

DEFAULT_CLUSTER_CIDR = "10.244.0.0/16"
DEFAULT_SUBNET_LEN = {4: 24, 6: 64}


class ClusterError(Exception):
    """A cluster-level problem the agent reports through STATUS and its log."""


class SubnetsExhausted(ClusterError):
    pass


@dataclass(frozen=True)
class NodeRecord:
    """One node as the others see it.

    ``subnets``: its pod CIDRs, at most one per address family.
    ``node_ips``: its underlay addresses (at most one per family); host-gw routes go via these
    and VXLAN packets are sent to the first one.
    ``vtep_mac``: the MAC of its VXLAN device, "" when it runs none.
    """

    name: str
    node_ips: tuple[str, ...]
    subnets: tuple[Network, ...] = ()
    vtep_mac: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "subnets", tuple(ipaddress.ip_network(s) for s in self.subnets))
        object.__setattr__(
            self, "node_ips", tuple(str(ipaddress.ip_address(a)) for a in self.node_ips)
        )

    def subnet(self, version: int) -> Network | None:
        return next((s for s in self.subnets if s.version == version), None)

    def node_ip(self, version: int | None = None) -> str | None:
        """The node's address of ``version``, or its first address when None."""
        for a in self.node_ips:
            if version is None or ipaddress.ip_address(a).version == version:
                return a
        return None

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "nodeIPs": list(self.node_ips),
            "subnets": [str(s) for s in self.subnets],
            "vtepMAC": self.vtep_mac,
        }

    @classmethod
    def from_json(cls, data: dict) -> NodeRecord:
        return cls(
            name=str(data["name"]),
            node_ips=tuple(data.get("nodeIPs", ())),
            subnets=tuple(data.get("subnets", ())),
            vtep_mac=str(data.get("vtepMAC", "")),
        )


@dataclass(frozen=True)
class ClusterSettings:
    """The agent's cluster settings: the cluster CIDR(s) and the size of each node's share."""

    cluster_cidrs: tuple[Network, ...] = (ipaddress.ip_network(DEFAULT_CLUSTER_CIDR),)
    subnet_len: dict[int, int] = field(default_factory=lambda: dict(DEFAULT_SUBNET_LEN))

    def __post_init__(self) -> None:
        cidrs = tuple(ipaddress.ip_network(c) for c in self.cluster_cidrs)
        if not cidrs:
            raise ValueError("at least one cluster CIDR is needed")
        if len({c.version for c in cidrs}) != len(cidrs):
            raise ValueError("give at most one cluster CIDR per address family")
        object.__setattr__(self, "cluster_cidrs", cidrs)
        for c in cidrs:
            n = self.prefixlen(c.version)
            if not c.prefixlen < n <= c.max_prefixlen - 2:
                raise ValueError(
                    f"node subnet size /{n} does not fit cluster CIDR {c} "
                    f"(want /{c.prefixlen + 1} to /{c.max_prefixlen - 2})"
                )

    def prefixlen(self, version: int) -> int:
        return self.subnet_len.get(version, DEFAULT_SUBNET_LEN[version])

    def cidr(self, version: int) -> Network | None:
        return next((c for c in self.cluster_cidrs if c.version == version), None)
