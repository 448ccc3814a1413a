"""The executable runtimes exec: CNI environment and config in, one JSON document out.

stdout carries only the result or a CNI error object; everything else goes to the log. Heavy
imports (pyroute2) happen only in the commands that need them, so VERSION stays cheap.
"""

from __future__ import annotations

import json
import logging
import os
import sys

from .cni import MAX_CONFIG_BYTES, versions
from .cni import env as cnienv
from .cni.errors import INTERNAL_ERROR, CniError


def handle(
    environ, stdin: bytes, on_config=None, faults: bool | None = None
) -> tuple[dict | None, int]:
    """Run one CNI invocation; return (JSON to print or None, exit status).

    `on_config` (the agent's) sees each parsed config, e.g. to learn which data dirs exist.
    `faults`: whether the test-only fault-injection variables are honoured; None (in-process)
    means as this process's environment says (PYCNI_TEST_FAULTS=1); the agent passes its own
    --test-faults, so a request can never opt in by itself.
    """
    # Errors answer in the version the config asked for, even errors found before it is parsed.
    version = asked_version(stdin)
    if faults is None:
        faults = cnienv.faults_opted_in(environ)
    try:
        request = cnienv.from_environ(environ, faults)
        if request.command == "VERSION":
            return {"cniVersion": version, "supportedVersions": list(versions.SUPPORTED)}, 0
        from .cni import netconf

        raw = netconf.decode(stdin)
        version = versions.from_config(raw)
        if request.command == "DEL":
            conf = netconf.parse_for_delete(raw, request)
        else:
            conf = netconf.parse(raw, request)
        if on_config is not None:
            on_config(conf)
        from . import log

        log.setup(conf.log_file, conf.log_level, environ)
        if not faults and any(environ.get(k) for k in cnienv.FAULT_ENVS):
            logging.getLogger("pycni").warning(
                "ignoring the test-only fault-injection variables: not opted in (an agent "
                "started with --test-faults, or %s=1 in-process)",
                cnienv.TEST_FAULTS_ENV,
            )
        if conf.config_problem:
            logging.getLogger("pycni").warning("DEL despite a bad config: %s", conf.config_problem)
        if request.command == "CHECK":
            versions.require(version, "0.4.0", "CHECK")
        elif request.command in ("STATUS", "GC"):
            versions.require(version, "1.1.0", request.command)
        from . import core

        return core.run(request, conf), 0
    except CniError as exc:
        logging.getLogger("pycni").warning("error %d: %s", exc.code, exc.msg)
        return exc.to_json(version if version in versions.SUPPORTED else versions.LATEST), 1
    except Exception as exc:  # a bug: report it as a CNI error, never as a traceback on stdout
        logging.getLogger("pycni").exception("internal error")
        err = CniError(
            INTERNAL_ERROR,
            f"internal error: {type(exc).__name__}: {exc}",
            "see the pycni log for the traceback",
        )
        return err.to_json(version), 1


def asked_version(stdin: bytes) -> str:
    """The supported version stdin asks for, else the latest; never fails."""
    try:
        conf = json.loads(stdin) if stdin.strip() else {}
        if isinstance(conf, dict) and conf.get("cniVersion") in versions.SUPPORTED:
            return conf["cniVersion"]
    except (ValueError, RecursionError):  # RecursionError: JSON nested too deep
        pass
    return versions.LATEST


def main() -> None:
    # Read one byte past the limit so an oversized config is refused, not truncated.
    run(sys.stdin.buffer.read(MAX_CONFIG_BYTES + 1) if not sys.stdin.isatty() else b"")


def run(stdin: bytes) -> None:
    """The whole plugin in this process: what the thin executable falls back to."""
    out, status = handle(os.environ, stdin)
    if out is not None:
        sys.stdout.write(json.dumps(out))
        sys.stdout.write("\n")
        sys.stdout.flush()
    sys.exit(status)
