"""A test-only hook to fail ADD after a named step, proving that rollback leaves nothing."""

from __future__ import annotations

from ..cni.env import FAIL_AFTER_ENV as ENV
from ..cni.env import Request
from ..cni.errors import INTERNAL_ERROR, CniError

ADD_STEPS = ("ipam", "bridge", "veth", "pod", "host", "masquerade")


def checkpoint(request: Request, step: str) -> None:
    # Read from the request, not os.environ: in the agent the environment is the caller's.
    if request.fail_after == step:
        raise CniError(INTERNAL_ERROR, f"injected failure after step {step!r} ({ENV})")
