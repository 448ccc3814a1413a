"""Names pycni gives the things it makes, so DEL, GC and uninstall can find them later."""

from __future__ import annotations

import hashlib

HOST_VETH_PREFIX = "veth"
IFB_PREFIX = "ifb"
ALIAS_PREFIX = "pycni"
# Not "pycni <network> ": GC sweeps links with the veth alias prefix as veths.
IFB_ALIAS_PREFIX = "pycni-ifb"


def _attachment_digest(network: str, container_id: str, ifname: str) -> str:
    return hashlib.sha256(f"{network}\0{container_id}\0{ifname}".encode()).hexdigest()


def host_veth_name(network: str, container_id: str, ifname: str) -> str:
    """Deterministic host-side veth name, 15 characters: 'veth' + 11 hex digits.

    44 bits of hash keep collisions improbable among thousands of pods on a node.
    """
    return HOST_VETH_PREFIX + _attachment_digest(network, container_id, ifname)[:11]


def ifb_name(network: str, container_id: str, ifname: str) -> str:
    """The attachment's ifb device (egress shaping), 14 characters: 'ifb' + the same 11 hex
    digits as its host veth, so the pair reads as one in `ip link`."""
    return IFB_PREFIX + _attachment_digest(network, container_id, ifname)[:11]


def ifb_alias(network: str, container_id: str, ifname: str) -> str:
    """Interface alias on the ifb: whose it is; GC finds orphans of a network by its prefix."""
    return f"{ifb_alias_prefix(network)}{container_id} {ifname}"[:127]


def ifb_alias_prefix(network: str) -> str:
    return f"{IFB_ALIAS_PREFIX} {network} "


def host_veth_alias(network: str, container_id: str, ifname: str) -> str:
    """Interface alias on the host veth: who it belongs to, readable with `ip link`.

    GC uses the network part to find veths of this network the store no longer knows.
    """
    return f"{alias_prefix(network)}{container_id} {ifname}"[:127]


def alias_prefix(network: str) -> str:
    return f"{ALIAS_PREFIX} {network} "


def local_unicast_mac(octets: bytes) -> str:
    """The first six bytes as a MAC made unicast and locally administered (never a vendor's)."""
    b = bytearray(octets[:6])
    b[0] = (b[0] & 0xFE) | 0x02
    return ":".join(f"{x:02x}" for x in b)


def bridge_mac(gateway_packed: bytes) -> str:
    """A fixed bridge MAC (locally administered 0a:58 + gateway IPv4), so the bridge's address
    does not change as ports come and go and pods' ARP entries stay valid."""
    tail = gateway_packed[-4:]
    return "0a:58:" + ":".join(f"{b:02x}" for b in tail)
