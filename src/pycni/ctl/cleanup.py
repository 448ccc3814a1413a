"""`pycnictl cleanup`: remove pycni's packet rules from this node's network namespace."""

from __future__ import annotations

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
    from ..install.cleanup import remove_packet_rules

    if remove_packet_rules(args.data_dir):
        print("removed pycni's packet rules")
    else:
        print("no packet rules of pycni's here")
    return 0
