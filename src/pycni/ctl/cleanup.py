"""`pycnictl cleanup`: remove pycni's packet rules from this node's network namespace."""

from __future__ import annotations

import os

from ..cni.netconf import DEFAULT_DATA_DIR


def register(sub) -> None:
    p = sub.add_parser("cleanup", help="remove pycni's packet rules (nftables / iptables)")
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR,
                   help="the plugin's dataDir, so it forgets what it had installed")
    p.set_defaults(func=_cleanup)


def _cleanup(args) -> int:
    from ..core import masquerade
    from ..ipam.store import Store

    has_store = os.path.exists(os.path.join(args.data_dir, "pycni.db"))
    store = Store(args.data_dir) if has_store else None
    try:
        masquerade.remove(store)
    finally:
        if store is not None:
            store.close()
    print("removed pycni's packet rules")
    return 0
