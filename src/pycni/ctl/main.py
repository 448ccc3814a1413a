"""pycnictl: the command for people: the node agent, the lab, install and uninstall, bench,
cleanup, status and doctor."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pycnictl", description=__doc__)
    parser.add_argument(
        "--version", action=_Version, nargs=0, help="print the version (and commit) and exit"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    from . import agent, bench, cleanup, doctor, install, lab, status, uninstall

    for module in (agent, lab, install, uninstall, cleanup, bench, status, doctor):
        module.register(sub)
    return parser


class _Version(argparse.Action):
    """argparse's own version action takes the text up front: this one asks for it (and so
    maybe runs git) only when --version is given."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        from ..version import describe

        print(f"pycnictl {describe()}")
        parser.exit()


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    sys.exit(args.func(args) or 0)
