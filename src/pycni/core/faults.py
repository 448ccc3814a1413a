"""Test-only fault injection at the core's named checkpoints, to prove that a failure or a crash
at any step leaves a node that DEL, GC and the next ADD bring back to pycni's invariant.

At a checkpoint named by the request's environment (see cni.env):
  PYCNI_FAIL_AFTER=<step>            fail there with code 199 (ADD unwinds what it made);
  PYCNI_TEST_KILL_AT=<step>          SIGKILL the process doing the work: the plugin in-process,
                                     the agent behind the shim (which then answers code 11);
  PYCNI_TEST_PAUSE_AT=<step>:<fifo>  wait there until a test has opened the FIFO for writing
                                     and closed it again, to change the world in between.

Read from the request, never from os.environ: in the agent the environment is the caller's. No
runtime sets these variables; nothing happens at a step they do not name.
"""

from __future__ import annotations

import logging
import os
import signal

from ..cni.env import FAIL_AFTER_ENV as ENV
from ..cni.env import Request
from ..cni.errors import INTERNAL_ERROR, CniError

log = logging.getLogger("pycni")

ADD_STEPS = ("ipam", "bridge", "veth", "bandwidth", "pod", "host", "masquerade")
# DEL's steps also run inside GC, once per attachment it releases.
DEL_STEPS = ("del-veth", "del-ifb", "del-store", "del-rules")
GC_STEPS = ("gc-store", "gc-veths", "gc-rules")


def checkpoint(request: Request, step: str) -> None:
    if not (request.fail_after or request.kill_at or request.pause_at):
        return  # every real call
    where, _, fifo = request.pause_at.partition(":")
    if where == step and fifo:
        _pause(fifo, step)
    if request.kill_at == step:
        log.warning("test hook: SIGKILL after step %r", step)
        os.kill(os.getpid(), signal.SIGKILL)
    if request.fail_after == step:
        raise CniError(INTERNAL_ERROR, f"injected failure after step {step!r} ({ENV})")


def _pause(fifo: str, step: str) -> None:
    """Rendezvous with the test: opening blocks until it opens the FIFO for writing, reading
    until it closes it."""
    log.warning("test hook: paused after step %r on %s", step, fifo)
    fd = os.open(fifo, os.O_RDONLY | os.O_CLOEXEC)
    try:
        while os.read(fd, 64):
            pass
    finally:
        os.close(fd)
