"""Installing pycni's rule set: choosing the backend, the atomic replace (``nft -f -``, or
``iptables-restore --noflush`` and one jump per chain), removing everything, and reading back
what is installed. Every command pycni runs for its packet rules runs here; nft.py and
iptables.py only turn a RuleSet into text and text back into a RuleSet.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from pycni.cni.errors import INVALID_ENVIRONMENT, RULES_FAILURE, CniError
from pycni.rules import iptables, nft
from pycni.rules.model import RuleSet

BACKENDS = ("nft", "iptables")
ENV_BACKEND = "PYCNI_RULES_BACKEND"

_TIMEOUT = 30.0
# The node lock: an abstract unix socket name, so one per network namespace (as the rules
# are), no file anywhere, and released by the kernel when its holder dies.
_LOCK_NAME = "\0pycni-rules-lock"
_LOCK_POLL = 0.005
_held = threading.local()
_in_process = threading.Lock()


@contextmanager
def node_lock(timeout: float = _TIMEOUT) -> Iterator[None]:
    """Every update of pycni's rules in this network namespace, whichever store it comes
    from, one at a time: each reads the others' wants and installs the merged set, which two
    at once would overwrite with each one's view. Reentrant within a thread."""
    if getattr(_held, "depth", 0):
        _held.depth += 1
        try:
            yield
        finally:
            _held.depth -= 1
        return
    deadline = time.monotonic() + timeout
    if not _in_process.acquire(timeout=timeout):  # this process's threads queue here
        raise CniError(RULES_FAILURE, f"packet rules: node lock busy for {timeout:g}s")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        while True:
            try:
                sock.bind(_LOCK_NAME)
                break
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise CniError(RULES_FAILURE, f"packet rules: node lock: {exc}") from None
                if time.monotonic() > deadline:
                    raise CniError(
                        RULES_FAILURE,
                        f"packet rules: another process has held the node's rule lock for "
                        f"{timeout:g}s",
                    ) from None
                time.sleep(_LOCK_POLL)
        _held.depth = 1
        try:
            yield
        finally:
            _held.depth = 0
    finally:
        sock.close()
        _in_process.release()


def node_lock_held_elsewhere() -> bool:
    """Whether another thread or process holds the node lock now (False for its holder)."""
    if getattr(_held, "depth", 0):
        return False
    if _in_process.locked():
        return True
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(_LOCK_NAME)  # free: held for this instant only, released by close
        return False
    except OSError as exc:
        return exc.errno == errno.EADDRINUSE
    finally:
        sock.close()


def digest(rules: RuleSet) -> str:
    """sha256 (hex) of the canonical rendering: equal digests mean equal rule sets."""
    return hashlib.sha256(nft.render_nft(rules).encode()).hexdigest()


# --------------------------------------------------------------------------- execution


def _run(argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            argv, input=stdin, capture_output=True, text=True, timeout=_TIMEOUT, check=False
        )
    except FileNotFoundError:
        raise CniError(RULES_FAILURE, f"packet rules: {argv[0]} not found") from None
    except subprocess.TimeoutExpired:
        raise CniError(
            RULES_FAILURE, f"packet rules: {' '.join(argv)} timed out after {_TIMEOUT:g}s"
        ) from None


def _must(argv: list[str], stdin: str | None = None) -> str:
    proc = _run(argv, stdin)
    if proc.returncode != 0:
        err = (proc.stderr or proc.stdout).strip()
        raise CniError(
            RULES_FAILURE,
            f"packet rules: {' '.join(argv)} failed (exit {proc.returncode}): {err}",
            details=stdin or "",
        )
    return proc.stdout


def resolve_backend(backend: str | None = None) -> str:
    """The backend to use: the argument, else $PYCNI_RULES_BACKEND, else nft if present."""
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown rules backend {backend!r} (want one of {BACKENDS})")
        return backend
    env = os.environ.get(ENV_BACKEND, "").strip()
    if env:
        if env not in BACKENDS:
            raise CniError(
                INVALID_ENVIRONMENT, f"{ENV_BACKEND}={env!r}: want one of {', '.join(BACKENDS)}"
            )
        return env
    return "nft" if shutil.which("nft") else "iptables"


def _ipt(family: int) -> str:
    return "iptables" if family == 4 else "ip6tables"


def _ipt_base(table_name: str, family: int) -> list[str]:
    return [_ipt(family), "-w", "-t", table_name]


def _ipt_chain_exists(table_name: str, chain: str, family: int) -> bool:
    return _run([*_ipt_base(table_name, family), "-S", chain]).returncode == 0


def _ipt_jump_count(hook: iptables.Hook, family: int) -> int:
    out = _must([*_ipt_base(hook.table, family), "-S", hook.parent])
    want = " ".join(["-A", hook.parent, *hook.jump])
    return sum(1 for line in out.splitlines() if line.strip() == want)


def _ipt_ensure_jump(hook: iptables.Hook, family: int) -> None:
    base = _ipt_base(hook.table, family)
    if _run([*base, "-C", hook.parent, *hook.jump]).returncode != 0:
        _must([*base, "-I" if hook.first else "-A", hook.parent, *hook.jump])
    # Concurrent appliers could both have added one: keep exactly one.
    for _ in range(max(0, _ipt_jump_count(hook, family) - 1)):
        _must([*base, "-D", hook.parent, *hook.jump])


def _hooks_of(chain: str) -> list[iptables.Hook]:
    return [h for h in iptables.HOOKS if h.chain == chain]


def _ipt_remove(table_name: str, chain: str, family: int) -> None:
    """Remove one of pycni's chains with every jump to it; nothing when it does not exist."""
    if not _ipt_chain_exists(table_name, chain, family):
        return
    base = _ipt_base(table_name, family)
    for hook in _hooks_of(chain):
        while _run([*base, "-C", hook.parent, *hook.jump]).returncode == 0:
            _must([*base, "-D", hook.parent, *hook.jump])
    _must([*base, "-F", chain])
    _must([*base, "-X", chain])


def _ipt_apply(rules: RuleSet, family: int) -> None:
    script = iptables.render_iptables(rules, family)
    if script:
        _must([f"{_ipt(family)}-restore", "-w", "--noflush"], script)
    bodies = iptables.chain_bodies(rules, family)
    for table_name, chain in iptables.IPT_CHAINS:
        if bodies[chain]:
            for hook in _hooks_of(chain):
                _ipt_ensure_jump(hook, family)
        else:
            _ipt_remove(table_name, chain, family)


def apply(rules: RuleSet, backend: str | None = None) -> str:
    """Install exactly ``rules`` (replacing what pycni had); an empty set removes everything.

    Returns the backend used. Failures raise CniError(RULES_FAILURE).
    """
    used = resolve_backend(backend)
    if used == "nft":
        _must(["nft", "-f", "-"], nft.render_nft(rules))
        return used
    if rules.policy:
        # The agent records policy rules only where nft runs; say so rather than drop them.
        raise CniError(RULES_FAILURE, "packet rules: NetworkPolicy needs the nft backend")
    for family in (4, 6):
        _ipt_apply(rules, family)
    return used


def apply_policy_elements(installed: RuleSet, wanted: RuleSet) -> bool:
    """Turn the table holding exactly ``installed`` into ``wanted`` by changing set elements
    alone, when the two differ in nothing but their policy sets' elements; False (nothing
    done) when they differ otherwise, or the backend is not nft: replace the table instead."""
    if resolve_backend() != "nft" or not installed.policy or not wanted.policy:
        return False
    same_but_policy = dataclasses.replace(installed, policy=wanted.policy)
    if same_but_policy != wanted:
        return False
    script = nft.render_policy_elements(installed.policy.statements, wanted.policy)
    if script is None:
        return False
    _must(["nft", "-f", "-"], script)
    return True


def remove_all(backend: str | None = None) -> None:
    """Remove everything pycni installed (table, chains, jumps); idempotent.

    With no backend given, cleans up every backend whose tool is present.
    """
    if backend is not None:
        backends = [resolve_backend(backend)]
    else:
        backends = [b for b in BACKENDS if shutil.which(b)]
    for b in backends:
        if b == "nft":
            _must(["nft", "-f", "-"], nft.render_nft(RuleSet()))
            continue
        for family in (4, 6):
            if shutil.which(_ipt(family)):
                for table_name, chain in iptables.IPT_CHAINS:
                    _ipt_remove(table_name, chain, family)


# --------------------------------------------------------------------------- read back


def installed(backend: str | None = None) -> RuleSet | None:
    """The rules currently installed, or None if pycni has nothing there.

    Compare with the wanted RuleSet (both are normalized). Best-effort: only understands what
    pycni renders; the fixed rules that come with hostPorts (the DNATed accept, the 127/8
    guard and masquerade, the ::1 return) are not read back, they follow from the hostports.
    """
    if resolve_backend(backend) == "nft":
        return _installed_nft()
    return _installed_ipt()


def _installed_nft() -> RuleSet | None:
    proc = _run(["nft", "-j", "list", "table", "inet", nft.TABLE])
    if proc.returncode != 0:
        if "No such file or directory" in proc.stderr or "does not exist" in proc.stderr:
            return None
        raise CniError(RULES_FAILURE, f"packet rules: nft list failed: {proc.stderr.strip()}")
    return nft.parse_nft(proc.stdout)


def _installed_ipt() -> RuleSet | None:
    listings: list[tuple[str, str]] = []
    for family in (4, 6):
        if not shutil.which(_ipt(family)):
            continue
        for table_name, chain in iptables.IPT_CHAINS:
            proc = _run([*_ipt_base(table_name, family), "-S", chain])
            if proc.returncode == 0:
                listings.append((chain, proc.stdout))
    # None when not one of pycni's chains exists.
    return iptables.parse_iptables(listings) if listings else None


def installed_stores(backend: str | None = None) -> tuple[str, ...]:
    """The data dirs whose wants the installed rules hold (RuleSet.stores), reading only
    their chain: a sync needs no more, and a table with large NetworkPolicy sets costs about
    as much to list as to replace."""
    if resolve_backend(backend) == "nft":
        proc = _run(["nft", "-j", "list", "chain", "inet", nft.TABLE, nft.STORES_CHAIN])
        if proc.returncode != 0:
            if "No such file or directory" in proc.stderr or "does not exist" in proc.stderr:
                return ()
            raise CniError(RULES_FAILURE, f"packet rules: nft list failed: {proc.stderr.strip()}")
        return nft.parse_nft(proc.stdout).stores
    listings = []
    for family in (4, 6):
        if shutil.which(_ipt(family)):
            proc = _run([*_ipt_base("filter", family), "-S", iptables.IPT_STORES_CHAIN])
            if proc.returncode == 0:
                listings.append((iptables.IPT_STORES_CHAIN, proc.stdout))
    return iptables.parse_iptables(listings).stores


def policy_counters(table: str = nft.TABLE) -> dict[str, tuple[int, int]]:
    """{counter: (packets, bytes)} of pycni's named counters in this network namespace; empty
    when there is no table (or no nft)."""
    try:
        proc = _run(["nft", "-j", "list", "counters", "table", "inet", table])
    except CniError:
        return {}
    if proc.returncode != 0:
        return {}
    out = {}
    for obj in json.loads(proc.stdout).get("nftables", []):
        counter = obj.get("counter")
        if counter:
            out[counter["name"]] = (int(counter.get("packets", 0)), int(counter.get("bytes", 0)))
    return out
