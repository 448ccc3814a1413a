"""`pycnictl cleanup`: remove pycni's packet rules from this node's network namespace."""

from __future__ import annotations

import os
import shutil

from ..cni.netconf import DEFAULT_DATA_DIR


def register(sub) -> None:
    p = sub.add_parser("cleanup", help="remove pycni's packet rules (nftables / iptables)")
    p.add_argument(
        "--data-dir",
        default=DEFAULT_DATA_DIR,
        help="the plugin's dataDir, so it forgets what it had installed",
    )
    p.set_defaults(func=_cleanup)


def _cleanup(args) -> int:
    if remove_packet_rules(args.data_dir):
        print("removed pycni's packet rules")
    else:
        print("no packet rules of pycni's here")
    return 0


def packet_rules_present() -> bool:
    """Whether pycni has rules in this network namespace (nft table or iptables chains)."""
    from ..rules import sync

    return any(sync.installed(b) is not None for b in sync.BACKENDS if shutil.which(b))


def remove_packet_rules(data_dir: str) -> bool:
    """Remove pycni's rules whatever the store says (it forgets what it had applied, so the
    next ADD or sync puts back what is still wanted). True if there were any."""
    from ..core import masquerade
    from ..ipam.faults import StoreError
    from ..ipam.store import Store

    present = packet_rules_present()
    store = None
    if os.path.exists(os.path.join(data_dir, "pycni.db")):
        try:
            store = Store(data_dir)
        except StoreError:
            pass  # damaged (or full, read-only): the rules go all the same
    try:
        masquerade.remove(store)
    finally:
        if store is not None:
            store.close()
    return present
