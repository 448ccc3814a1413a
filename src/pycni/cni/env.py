"""The CNI_* environment: parsed and validated before anything touches the system."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from .errors import INVALID_ENVIRONMENT, CniError

COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC")
# The spec's rules (libcni's ValidateContainerID / ValidateInterfaceName).
_CONTAINER_ID = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.\-]*")
_IFNAME_MAX = 15
# Test-only fault injection at the core's named checkpoints (see core.faults): fail there,
# SIGKILL the process doing the work, or wait on a FIFO ("<step>:<path>"). Never set by a
# runtime; the shim forwards them to the agent with the other PYCNI_ variables. Honoured only
# under an explicit opt-in: an agent started with --test-faults, or an in-process plugin
# whose own environment holds PYCNI_TEST_FAULTS=1 (never a request's word to the agent).
FAIL_AFTER_ENV = "PYCNI_FAIL_AFTER"
KILL_AT_ENV = "PYCNI_TEST_KILL_AT"
PAUSE_AT_ENV = "PYCNI_TEST_PAUSE_AT"
FAULT_ENVS = (FAIL_AFTER_ENV, KILL_AT_ENV, PAUSE_AT_ENV)
TEST_FAULTS_ENV = "PYCNI_TEST_FAULTS"


@dataclass(frozen=True)
class Request:
    command: str
    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    args: dict[str, str] = field(default_factory=dict)
    path: tuple[str, ...] = ()
    fail_after: str = ""
    kill_at: str = ""
    pause_at: str = ""

    @property
    def pod(self) -> tuple[str, str] | None:
        """The Kubernetes pod (namespace, name) a runtime names in CNI_ARGS, if it does."""
        namespace, name = self.args.get("K8S_POD_NAMESPACE"), self.args.get("K8S_POD_NAME")
        return (namespace, name) if namespace and name else None


def _bad(msg: str) -> CniError:
    return CniError(INVALID_ENVIRONMENT, msg)


def validate_container_id(cid: str) -> None:
    if not cid:
        raise _bad("CNI_CONTAINERID is required")
    if len(cid) > 1024 or not _CONTAINER_ID.fullmatch(cid):
        raise _bad(
            f"CNI_CONTAINERID {cid[:80]!r} is invalid: it must start with a letter or digit "
            "and contain only letters, digits, '_', '.' and '-'"
        )


def validate_ifname(name: str, what: str = "CNI_IFNAME") -> None:
    if not name:
        raise _bad(f"{what} is required")
    try:
        size = len(name.encode())
    except UnicodeEncodeError:  # undecodable bytes in the environment, or a lone surrogate
        raise _bad(f"{what} {name[:40]!r} is not valid UTF-8") from None
    if size > _IFNAME_MAX:
        raise _bad(f"{what} {name[:40]!r} is longer than {_IFNAME_MAX} bytes")
    if name in (".", ".."):
        raise _bad(f"{what} must not be '.' or '..'")
    # The kernel reads a '%' as a pattern ("eth%d" becomes eth0, eth1...): the interface would
    # get another name than the one asked for.
    if any(c in "/:%" or c.isspace() or not c.isprintable() for c in name):
        raise _bad(
            f"{what} {name!r} must not contain '/', ':', '%', whitespace or control characters"
        )


def validate_netns(path: str) -> None:
    if not os.path.isabs(path) or "\0" in path or len(path) > 4096:
        raise _bad(f"CNI_NETNS {path[:200]!r} must be an absolute path to a network namespace")


def parse_cni_args(raw: str) -> dict[str, str]:
    """CNI_ARGS is `K=V;K=V`; runtimes send several keys we ignore on purpose."""
    args: dict[str, str] = {}
    for pair in filter(None, raw.split(";")):
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise _bad(f"CNI_ARGS: {pair[:80]!r} is not of the form KEY=VALUE")
        args[key] = value
    return args


def from_environ(environ: os._Environ | dict, faults: bool = False) -> Request:
    """The request in ``environ``; its fault-injection variables only when ``faults`` (the
    caller's opt-in), else they are ignored as any unknown variable is."""
    command = environ.get("CNI_COMMAND", "")
    if not command:
        raise _bad("CNI_COMMAND is required")
    if command not in COMMANDS:
        raise _bad(
            f"CNI_COMMAND {command[:40]!r} is unknown; expected one of {', '.join(COMMANDS)}"
        )
    if command in ("VERSION", "STATUS"):
        return Request(command=command, path=_path(environ))
    if command == "GC":
        return Request(command=command, path=_path(environ), **_faults(environ, faults))
    cid = environ.get("CNI_CONTAINERID", "")
    ifname = environ.get("CNI_IFNAME", "")
    netns = environ.get("CNI_NETNS", "")
    validate_container_id(cid)
    validate_ifname(ifname)
    if netns:
        validate_netns(netns)
    elif command != "DEL":  # DEL may come after the netns is gone
        raise _bad(f"CNI_NETNS is required for {command}")
    return Request(
        command=command,
        container_id=cid,
        netns=netns,
        ifname=ifname,
        args=parse_cni_args(environ.get("CNI_ARGS", "")),
        path=_path(environ),
        **_faults(environ, faults),
    )


def faults_opted_in(environ) -> bool:
    """Whether an in-process plugin's own environment opts in to fault injection."""
    return environ.get(TEST_FAULTS_ENV, "") == "1"


def _faults(environ, honoured: bool) -> dict[str, str]:
    if not honoured:
        return {}
    return {
        "fail_after": environ.get(FAIL_AFTER_ENV, ""),
        "kill_at": environ.get(KILL_AT_ENV, ""),
        "pause_at": environ.get(PAUSE_AT_ENV, ""),
    }


def _path(environ) -> tuple[str, ...]:
    return tuple(p for p in environ.get("CNI_PATH", "").split(os.pathsep) if p)
