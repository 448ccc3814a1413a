"""`pycnictl lab`: the demo cluster. model (what it is), build (its pieces), lifecycle (whole-lab
operations the CLI and the tests share), probes (the connectivity matrix), cli (the command)."""

from .cli import register

__all__ = ["register"]
