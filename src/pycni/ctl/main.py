"""pycnictl: the command for people (the lab demo now; agent, status, bench and install later)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="pycnictl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    from . import bench, cleanup, install, lab

    lab.register(sub)
    install.register(sub)
    cleanup.register(sub)
    bench.register(sub)
    args = parser.parse_args(argv)
    sys.exit(args.func(args) or 0)
