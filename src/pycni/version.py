"""Which pycni this is: the package's version and, where it is known, the commit it was built
from, so that during an upgrade an operator can tell which agent runs on which node.

The commit comes from the environment variable ``PYCNI_COMMIT`` first (the image sets it from
its build argument of the same name: an image has no .git), else from git (``rev-parse`` of
HEAD) when this code runs from a checkout; else it is unknown ("").
"""

from __future__ import annotations

import functools
import os
import subprocess

from . import __version__

COMMIT_ENV = "PYCNI_COMMIT"
_GIT_TIMEOUT = 5.0


@functools.cache
def version() -> str:
    """The installed distribution's version (its metadata), else the package's own."""
    from importlib import metadata

    try:
        return metadata.version("pycni")
    except metadata.PackageNotFoundError:
        return __version__


@functools.cache
def commit() -> str:
    """The commit this code was built from: $PYCNI_COMMIT, else the checkout's HEAD, else
    ""."""
    stamped = os.environ.get(COMMIT_ENV, "").strip()
    if stamped:
        return stamped
    return _git_commit(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))


def _git_commit(root: str) -> str:
    # Only a checkout holding this very file: never a repository the package merely sits in.
    if not os.path.exists(os.path.join(root, ".git")):
        return ""
    try:
        # rev-parse, not describe --dirty: it never scans the working tree, so an agent
        # started from a checkout (the tests') is not held up before it accepts calls.
        proc = subprocess.run(
            ["git", "-C", root, "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=_GIT_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return proc.stdout.strip() if proc.returncode == 0 else ""


def describe() -> str:
    """``0.1.0 (commit 1a2b3c4d5e6f)``, or ``0.1.0`` when the commit is unknown."""
    found = commit()
    return f"{version()} (commit {found})" if found else version()
