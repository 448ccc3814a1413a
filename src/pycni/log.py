"""Diagnostics go to a log file (stdout belongs to the CNI result); DEBUG raises the level."""

from __future__ import annotations

import logging
import os
import sys

FORMAT = "%(asctime)s %(process)d %(levelname)s %(message)s"


def setup(path: str, level: str, environ=os.environ) -> None:
    logger = logging.getLogger("pycni")
    if logger.handlers:
        return
    if environ.get("DEBUG", "") not in ("", "0", "false"):
        level = "debug"
    logger.setLevel(level.upper())
    handler: logging.Handler
    try:
        if not path:
            raise OSError("logging to a file is disabled")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # Create it private: the log names containers and addresses.
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
        handler = logging.FileHandler(path)
    except OSError:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    logger.addHandler(handler)
