"""pycnictl: the command for people: the node agent, the lab, install, bench, cleanup and status."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="pycnictl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    from . import agent, bench, cleanup, install, lab, status

    for module in (agent, lab, install, cleanup, bench, status):
        module.register(sub)
    args = parser.parse_args(argv)
    sys.exit(args.func(args) or 0)
