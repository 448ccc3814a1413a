"""Flannel-style subnet leases on a key-value store (etcd, or a SQLite file).

One key per leased subnet, ``<prefix>subnets/v4/10.244.3.0-24``, holding the owner's name and
what other nodes need to reach it (its addresses and VTEP MAC). A node claims a free subnet by
creating its key (only-if-absent, so two nodes racing never share one), holds it by renewing the
lease the key is bound to, and keeps it across an agent restart by rebinding its own key (found
by node name) to the new agent's lease. A node that vanishes without releasing loses its keys
when the lease expires; a clean removal deletes them at once. Both are what the other nodes see.
"""

from __future__ import annotations

import ipaddress
import json
import logging
from collections.abc import Iterator

from .datastore import Datastore
from .kv import KV
from .model import ClusterSettings, Network, NodeRecord, SubnetsExhausted

log = logging.getLogger("pycni")

DEFAULT_PREFIX = "/pycni/"
_CLAIM_ATTEMPTS = 20  # creates lost to other nodes before giving up on this round


def subnet_key(prefix: str, subnet: Network) -> str:
    return f"{prefix}subnets/v{subnet.version}/{subnet.network_address}-{subnet.prefixlen}"


def key_subnet(prefix: str, key: str) -> Network | None:
    """The subnet a key names, or None for a key that is not a subnet lease."""
    tail = key[len(prefix) :].split("/")
    if len(tail) != 3 or tail[0] != "subnets":
        return None
    try:
        return ipaddress.ip_network(tail[2].replace("-", "/"))
    except ValueError:
        return None


def _value(record: NodeRecord) -> str:
    return json.dumps(
        {"node": record.name, "nodeIPs": list(record.node_ips), "vtepMAC": record.vtep_mac},
        sort_keys=True,
    )


def _owner(value: str) -> str | None:
    try:
        data = json.loads(value)
    except ValueError:
        return None
    return data.get("node") if isinstance(data, dict) else None


def free_subnets(
    cidr: Network, prefixlen: int, taken: set[Network], wish: Network | None = None
) -> Iterator[Network]:
    """Candidate subnets of ``cidr`` in the order to try them: the wish first (the subnet this
    node had before, when it is still free), then every free one in address order."""
    # Leases of another size (the cluster was resized) must not overlap a new one either.
    others = [t for t in taken if t.version == cidr.version and t.prefixlen != prefixlen]

    def free(subnet: Network) -> bool:
        return subnet not in taken and not any(subnet.overlaps(t) for t in others)

    if wish is not None and wish.prefixlen == prefixlen and wish.subnet_of(cidr) and free(wish):
        yield wish
    for subnet in cidr.subnets(new_prefix=prefixlen):
        if subnet != wish and free(subnet):
            yield subnet


class LeaseDatastore(Datastore):
    def __init__(
        self,
        kv: KV,
        settings: ClusterSettings,
        kind: str,
        prefix: str = DEFAULT_PREFIX,
        node_name: str = "",
    ) -> None:
        self.kv = kv
        self.node_name = node_name  # lets release() work without register() (pycnictl leave)
        self.settings = settings
        self.kind = kind
        self.prefix = prefix
        self.me: NodeRecord | None = None
        self._revision = 0
        # nodes(): the leases last listed and their records; keys' subnets; records by content.
        self._nodes_seen: tuple[dict[str, str], list[NodeRecord]] | None = None
        self._key_subnets: dict[str, Network | None] = {}
        self._parsed: dict[tuple, NodeRecord] = {}

    @property
    def renew_every(self) -> float:
        # Three renewals per TTL: a missed one or two (datastore briefly away) loses nothing.
        return self.kv.ttl / 3

    # --- reading ---------------------------------------------------------------------------

    def _leases(self) -> dict[Network, str]:
        values, self._revision = self.kv.list(self.prefix + "subnets/")
        out = {}
        for key, value in values.items():
            subnet = key_subnet(self.prefix, key)
            if subnet is not None:
                out[subnet] = value
        return out

    def nodes(self) -> list[NodeRecord]:
        values, self._revision = self.kv.list(self.prefix + "subnets/")
        # The agent asks on every pass, mostly for the same thousands of leases: the same
        # list again, parsed once (the records are frozen).
        if self._nodes_seen is not None and self._nodes_seen[0] == values:
            return list(self._nodes_seen[1])
        leases = {}
        for key, value in values.items():
            subnet = self._subnet_of(key)
            if subnet is not None:
                leases[subnet] = value
        records = self._records(leases)
        self._nodes_seen = (values, records)
        return list(records)

    def _subnet_of(self, key: str) -> Network | None:
        if key not in self._key_subnets:
            if len(self._key_subnets) > 100_000:
                self._key_subnets.clear()
            self._key_subnets[key] = key_subnet(self.prefix, key)
        return self._key_subnets[key]

    def _records(self, leases: dict[Network, str]) -> list[NodeRecord]:
        by_name: dict[str, dict] = {}
        for subnet, value in sorted(leases.items(), key=lambda kv: str(kv[0])):
            try:
                data = json.loads(value)
                name = str(data["node"])
            except (ValueError, KeyError, TypeError):
                log.warning("ignoring an unreadable subnet lease for %s: %r", subnet, value)
                continue
            entry = by_name.setdefault(
                name,
                {
                    "name": name,
                    "nodeIPs": data.get("nodeIPs", []),
                    "vtepMAC": data.get("vtepMAC", ""),
                    "subnets": [],
                },
            )
            if all(ipaddress.ip_network(s).version != subnet.version for s in entry["subnets"]):
                entry["subnets"].append(str(subnet))
        records = []
        if len(self._parsed) > 100_000:
            self._parsed.clear()
        for name in sorted(by_name):
            entry = by_name[name]
            try:
                content = (
                    name,
                    tuple(entry["nodeIPs"]),
                    entry["vtepMAC"],
                    tuple(entry["subnets"]),
                )
                record = self._parsed.get(content)
            except TypeError:  # unhashable: something odd in the lease, parsed below
                content, record = None, None
            if record is None:
                try:
                    record = NodeRecord.from_json(entry)
                except (ValueError, TypeError):
                    log.warning("ignoring node %s: its lease holds an invalid address", name)
                    continue
                if content is not None:
                    self._parsed[content] = record
            records.append(record)
        return records

    def wait(self, timeout: float) -> bool:
        before = self._revision
        self._revision = self.kv.wait(self.prefix + "subnets/", before, timeout)
        return self._revision != before

    # --- claiming --------------------------------------------------------------------------

    def register(self, local: NodeRecord) -> NodeRecord:
        value = _value(local)
        subnets = [self._claim(cidr, local, value) for cidr in self.settings.cluster_cidrs]
        self.me = NodeRecord(local.name, local.node_ips, tuple(subnets), local.vtep_mac)
        return self.me

    def _claim(self, cidr: Network, local: NodeRecord, value: str) -> Network:
        prefixlen = self.settings.prefixlen(cidr.version)
        for _ in range(_CLAIM_ATTEMPTS):
            leases = self._leases()
            mine = sorted(
                (
                    s
                    for s, v in leases.items()
                    if s.version == cidr.version and _owner(v) == local.name
                ),
                key=str,
            )
            if mine:
                keep = self._keep(mine, cidr, prefixlen, local)
                if keep is not None and self.kv.replace(
                    subnet_key(self.prefix, keep), leases[keep], value
                ):
                    for extra in mine:  # left by an earlier claim race or a resized cluster
                        if extra != keep:
                            self.kv.delete(subnet_key(self.prefix, extra), leases[extra])
                    return keep
                if keep is not None:
                    continue  # our own lease changed under us (expired, rewritten): look again
            taken = set(leases) - set(mine)  # ours may overlap the new one: freed below
            for subnet in free_subnets(cidr, prefixlen, taken, local.subnet(cidr.version)):
                if self.kv.create(subnet_key(self.prefix, subnet), value):
                    log.info("leased subnet %s for node %s", subnet, local.name)
                    for old in mine:  # no longer fits the cluster's settings
                        self.kv.delete(subnet_key(self.prefix, old), leases[old])
                    return subnet
                break  # another node took it first: re-read and try the next free one
            else:
                in_use = sum(1 for s in taken if s.version == cidr.version and s.subnet_of(cidr))
                raise SubnetsExhausted(
                    f"cluster CIDR {cidr} has no free /{prefixlen} subnet for node {local.name}: "
                    f"all {in_use} are leased to other nodes; remove nodes that are gone or "
                    "choose a larger cluster CIDR or a smaller subnet size"
                )
        raise SubnetsExhausted(
            f"could not lease a subnet of {cidr} for node {local.name} after "
            f"{_CLAIM_ATTEMPTS} attempts: too many nodes claiming at once"
        )

    @staticmethod
    def _keep(
        mine: list[Network], cidr: Network, prefixlen: int, local: NodeRecord
    ) -> Network | None:
        """Of the subnets leased to this node, the one to keep: one that still fits the
        cluster's settings, preferring the one it asked for."""
        fitting = [s for s in mine if s.prefixlen == prefixlen and s.subnet_of(cidr)]
        wish = local.subnet(cidr.version)
        if wish in fitting:
            return wish
        return fitting[0] if fitting else None

    def keepalive(self) -> NodeRecord:
        assert self.me is not None, "register() first"
        if self.kv.keepalive():
            leases = self._leases()
            value = _value(self.me)
            if all(leases.get(s) == value for s in self.me.subnets):
                return self.me
            log.warning(
                "the lease of node %s was changed or removed by someone else; claiming again",
                self.me.name,
            )
        else:
            log.warning("the lease of node %s expired; claiming its subnets again", self.me.name)
        return self.register(self.me)

    def release(self) -> None:
        name = self.me.name if self.me is not None else self.node_name
        released = []
        for subnet, value in self._leases().items():
            if _owner(value) == name and self.kv.delete(subnet_key(self.prefix, subnet), value):
                released.append(str(subnet))
        log.info("node %s released subnets: %s", name, ", ".join(released) or "none held")
        self.me = None

    def close(self) -> None:
        self.kv.close()
