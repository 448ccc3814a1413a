"""A test-only hook to fail ADD after a named step, proving that rollback leaves nothing."""

from __future__ import annotations

import os

from ..cni.errors import INTERNAL_ERROR, CniError

ENV = "PYCNI_FAIL_AFTER"
ADD_STEPS = ("ipam", "bridge", "veth", "pod", "host", "masquerade")


def checkpoint(step: str) -> None:
    if os.environ.get(ENV) == step:
        raise CniError(INTERNAL_ERROR, f"injected failure after step {step!r} ({ENV})")
