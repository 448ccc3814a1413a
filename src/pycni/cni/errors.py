"""CNI error objects: every failure pycni reports is a CniError carrying its spec code."""

from __future__ import annotations

# Codes defined by the CNI specification.
INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENVIRONMENT = 4
IO_FAILURE = 5
DECODING_FAILURE = 6
INVALID_NETWORK_CONFIG = 7
TRY_AGAIN_LATER = 11
NOT_AVAILABLE = 50
NOT_AVAILABLE_LIMITED = 51

# pycni's own codes (the spec reserves 100 and up for plugins).
POOL_EXHAUSTED = 100
ADDRESS_UNAVAILABLE = 101
ATTACHMENT_EXISTS = 102
DATAPLANE_FAILURE = 103
CHECK_FAILED = 104
RULES_FAILURE = 105
ACCESS_DENIED = 106
INTERNAL_ERROR = 199


class CniError(Exception):
    """A failure to report to the runtime as a CNI error object."""

    def __init__(self, code: int, msg: str, details: str = ""):
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_json(self, cni_version: str) -> dict:
        out = {"cniVersion": cni_version, "code": self.code, "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out

    def __repr__(self) -> str:
        return f"CniError({self.code}, {self.msg!r}, {self.details!r})"


def config_error(key: str, problem: str) -> CniError:
    """An invalid network config value; the message names the key so the operator can fix it."""
    return CniError(INVALID_NETWORK_CONFIG, f"invalid network config: {key}: {problem}")
