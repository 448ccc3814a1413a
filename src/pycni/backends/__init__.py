"""Routes to the other nodes' pods: host-gw, vxlan (flannel's scheme) or auto (host-gw where
the peer shares our L2 segment, vxlan elsewhere).

`plan` turns the node list into a desired set of routes, neighbours and FDB entries (pure);
`kernel` reads pycni's entries (route protocol RTPROT_PYCNI, the VTEP's neighbours and FDB)
and applies the difference; `vxlan` keeps the VTEP; `reconcile_once` does one whole round.
"""

from .kernel import RTPROT_PYCNI, Changes, apply, read_state
from .plan import MODES, Desired, Underlay, VtepInfo, desired, vtep_mac, vtep_mtu
from .reconcile import VxlanSettings, read_underlay, reconcile_once
from .vxlan import BackendError, delete_vtep, ensure_vtep, vtep_index

__all__ = [
    "MODES",
    "RTPROT_PYCNI",
    "BackendError",
    "Changes",
    "Desired",
    "Underlay",
    "VtepInfo",
    "VxlanSettings",
    "apply",
    "delete_vtep",
    "desired",
    "ensure_vtep",
    "read_state",
    "read_underlay",
    "reconcile_once",
    "vtep_index",
    "vtep_mac",
    "vtep_mtu",
]
