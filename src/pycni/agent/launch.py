"""Starting `pycnictl agent` as a child process (the lab, the benchmark and the tests do)."""

from __future__ import annotations

import os
import subprocess
import sys
import time


def pycnictl_argv() -> list[str]:
    """How to run pycnictl from the caller's installation."""
    script = os.path.join(os.path.dirname(sys.executable), "pycnictl")
    if os.access(script, os.X_OK):
        return [script]
    return [sys.executable, "-c", "from pycni.ctl.main import main; main()"]


def agent_argv(
    socket: str, data_dir: str, log_file: str, metrics_port: int = 0, test_faults: bool = False
) -> list[str]:
    """The command line of an agent with private socket, data dir and log, from the same
    installation as the caller (its pycnictl script, so `ps` shows `pycnictl agent`);
    `test_faults`: one that honours the tests' fault injection."""
    return [
        *pycnictl_argv(),
        "agent",
        "--socket",
        socket,
        "--data-dir",
        data_dir,
        "--log-file",
        log_file,
        "--metrics-port",
        str(metrics_port),
        *(["--test-faults"] if test_faults else []),
    ]


def wait_until_listening(proc: subprocess.Popen, socket: str, timeout: float = 15.0) -> None:
    """Return once the agent's socket exists; raise RuntimeError if it exits or takes too long."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(socket):
        if proc.poll() is not None:
            raise RuntimeError(f"the agent exited with status {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the agent did not listen on {socket} within {timeout:.0f} s")
        time.sleep(0.02)
