"""pycnictl: the command for people: the node agent, the lab, install and uninstall, bench,
cleanup, status and doctor."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pycnictl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    from . import agent, bench, cleanup, doctor, install, lab, status, uninstall

    for module in (agent, lab, install, uninstall, cleanup, bench, status, doctor):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    sys.exit(args.func(args) or 0)
