"""Removing pycni's packet rules from this network namespace (`pycnictl cleanup`, and
uninstall's last step)."""

from __future__ import annotations

import os
import shutil


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
