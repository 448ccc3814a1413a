"""The cluster's daemons: started detached (they outlive `lab up`), stopped by the pid recorded
under <state>/kube/pids, and only when that pid still runs the binary it was started as (a
reused pid is never signalled)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time


class DaemonError(Exception):
    pass


def pid_dir(state_dir: str) -> str:
    return os.path.join(state_dir, "kube", "pids")


def start(
    state_dir: str, name: str, binary: str, argv: list[str], log: str, *, env: dict | None = None
) -> int:
    """Start argv, which execs `binary` in the end (nsenter does), so the pid is the daemon's
    own; record it."""
    os.makedirs(pid_dir(state_dir), exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
    info = {"pid": proc.pid, "binary": binary, "log": log}
    with open(os.path.join(pid_dir(state_dir), name + ".json"), "w") as f:
        json.dump(info, f)
    # Until the exec chain (nsenter, unshare, ...) has reached the daemon: only then does
    # running() recognise it.
    deadline = time.monotonic() + 10
    while not running(info) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return proc.pid


def recorded(state_dir: str) -> dict[str, dict]:
    out: dict[str, dict] = {}
    d = pid_dir(state_dir)
    if not os.path.isdir(d):
        return out
    for entry in sorted(os.listdir(d)):
        if entry.endswith(".json"):
            try:
                with open(os.path.join(d, entry)) as f:
                    out[entry[:-5]] = json.load(f)
            except (OSError, ValueError):
                continue
    return out


def running(info: dict) -> bool:
    """The recorded pid is alive (not a zombie) and still runs the recorded binary."""
    pid = info.get("pid")
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    exe = exe.removesuffix(" (deleted)")
    return state != "Z" and os.path.basename(exe) == os.path.basename(info.get("binary", ""))


def pid_of(state_dir: str, name: str) -> int | None:
    info = recorded(state_dir).get(name)
    return info["pid"] if info and running(info) else None


def stop(state_dir: str, names: list[str], grace: float = 5.0) -> list[str]:
    """SIGTERM the named daemons together, SIGKILL what lingers after `grace`; returns the
    names stopped."""
    infos = recorded(state_dir)
    live = {n: infos[n] for n in names if n in infos and running(infos[n])}
    for info in live.values():
        _signal(info["pid"], signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(running(i) for i in live.values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    for info in live.values():
        if running(info):
            _signal(info["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 5
    while any(running(i) for i in live.values()) and time.monotonic() < deadline:
        time.sleep(0.02)
    for n in names:
        try:
            os.unlink(os.path.join(pid_dir(state_dir), n + ".json"))
        except FileNotFoundError:
            pass
    return list(live)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def rss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0
