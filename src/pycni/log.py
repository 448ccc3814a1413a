"""Diagnostics go to a log file (stdout belongs to the CNI result); DEBUG raises the level."""

from __future__ import annotations

import logging
import os
import stat
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
        # O_NONBLOCK: a FIFO without a reader fails here instead of hanging the call.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NONBLOCK, 0o600)
        try:
            _require_log_file(fd, path)
        finally:
            os.close(fd)
        handler = logging.FileHandler(path)
    except OSError:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    logger.addHandler(handler)


def _require_log_file(fd: int, path: str) -> None:
    """A log must be a regular file, never the plugin's stdout (logFile /dev/stdout would mix
    log lines into the CNI result) nor a device or pipe."""
    if path == os.devnull:
        return  # a sink some operators choose
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise OSError(f"{path} is not a regular file")
    try:
        out = os.fstat(1)
    except OSError:
        return
    if (st.st_dev, st.st_ino) == (out.st_dev, out.st_ino):
        raise OSError(f"{path} is stdout")
