"""Who may do what: only root talks to the agent (the socket's mode keeps others from
connecting; the peer-credential check refuses them even if the mode were opened), the plugin
talks only to an agent run by root (or by itself), and everything pycni writes is private:
state directory 0700; IPAM database (with its -wal/-shm), node lock and logs 0600; the agent
socket 0600 in a 0700 directory, whatever the umask of whoever started it.

Non-root callers are real processes run as nobody (uid 65534)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from conftest import AgentProcess, Node
from pycni import plugin, shim
from pycni.agent.server import Agent

pytestmark = pytest.mark.netns
NOBODY = 65534
SRC = os.path.join(os.path.dirname(__file__), "..", "..", "src")

# As nobody: the shim's client asks the agent, and a raw connect says what the kernel allowed.
CLIENT = r"""
import errno, socket, sys
sys.path.insert(0, sys.argv[1])
from pycni import shim
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[2])
    print("connected")
except OSError as exc:
    print(errno.errorcode[exc.errno])
s.close()
reply = shim.call_agent(sys.argv[2], b'{"cniVersion": "1.0.0"}')
print(repr(reply))
"""


def as_nobody(*argv: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        argv,
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd="/",
    )


def mode(path: str) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@contextlib.contextmanager
def umask(value: int):
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def open_dir():
    """A directory anyone may enter (pytest's tmp dirs are root's alone, 0700)."""
    path = tempfile.mkdtemp(prefix="pycni-perm-", dir="/tmp")
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def served_agent(open_dir, monkeypatch):
    """An agent on a thread (real peer-credential check), recording what reaches the core."""
    calls = []

    def handle(environ, stdin, on_config=None, faults=None):
        calls.append(environ)
        return {"cniVersion": "1.0.0", "supportedVersions": ["1.0.0"]}, 0

    monkeypatch.setattr(plugin, "handle", handle)
    agent = Agent(os.path.join(open_dir, "run", "agent.sock"), workers=2)
    agent.bind()
    thread = threading.Thread(target=agent.serve, daemon=True)
    thread.start()
    try:
        yield agent, calls
    finally:
        agent.stop()
        thread.join(15)


def test_a_non_root_caller_cannot_connect(served_agent):
    agent, calls = served_agent
    sock_dir = os.path.dirname(agent.socket_path)
    assert mode(sock_dir) == 0o700 and mode(agent.socket_path) == 0o600
    proc = as_nobody(sys.executable, "-c", CLIENT, SRC, agent.socket_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["EACCES", "None"], proc.stdout
    # Even with the directory open, the socket's own mode keeps nobody out.
    os.chmod(sock_dir, 0o755)
    proc = as_nobody(sys.executable, "-c", CLIENT, SRC, agent.socket_path)
    assert proc.stdout.split("\n")[:2] == ["EACCES", "None"], proc.stdout
    assert not calls
    # Root still gets in.
    assert shim.call_agent(agent.socket_path, b"{}")[0] == 0 and len(calls) == 1


def test_a_non_root_caller_is_refused_by_peer_credentials(served_agent):
    """If the socket's mode were opened by mistake, the agent still serves root only."""
    agent, calls = served_agent
    os.chmod(os.path.dirname(agent.socket_path), 0o755)
    os.chmod(agent.socket_path, 0o666)
    proc = as_nobody(sys.executable, "-c", CLIENT, SRC, agent.socket_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split("\n")
    assert lines[0] == "connected", proc.stdout
    status, out = eval(lines[1])  # the repr of (status, bytes)
    err = json.loads(out)
    assert status == 1 and err["code"] == 106 and "root only" in err["msg"], err
    assert str(NOBODY) in err["msg"]
    assert not calls  # nothing reached the core


SQUATTER = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(sys.argv[1])
s.listen(1)
print("listening", flush=True)
s.settimeout(10)
conn, _ = s.accept()
conn.settimeout(5)
got = b""
try:
    while chunk := conn.recv(65536):
        got += chunk
except OSError:
    pass
print(len(got), flush=True)
try:
    conn.sendall(b'0\n{"cniVersion": "1.1.0", "ips": [{"address": "6.6.6.6/32"}]}\n')
except OSError:
    pass  # the plugin hung up at once
"""


def test_the_plugin_talks_only_to_an_agent_run_by_root(open_dir):
    """A config may name a socket in a directory others can write: a non-root process
    listening there gets no request (and cannot answer for the agent); the plugin does the
    work itself."""
    os.chmod(open_dir, 0o1777)
    path = os.path.join(open_dir, "agent.sock")
    squatter = subprocess.Popen(
        [sys.executable, "-c", SQUATTER, path],
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd="/",
    )
    try:
        assert squatter.stdout.readline() == "listening\n", squatter.stderr.read()
        assert os.stat(path).st_uid == NOBODY
        assert shim.call_agent(path, b'{"cniVersion": "1.1.0"}') is None
        out, err = squatter.communicate(timeout=15)
        assert out.strip() == "0", (out, err)  # connected, but was sent nothing
    finally:
        squatter.kill()
        squatter.wait()


def private_files(node: Node, data: str) -> dict[str, int]:
    found = {data: mode(data)}
    for name in ("pycni.db", "pycni.db-wal", "pycni.db-shm", "gc.lock"):
        path = os.path.join(data, name)
        if os.path.exists(path):
            found[path] = mode(path)
    return found


def exec_with_umask(node: Node, conf: dict, command: str, pod: str, mask: int):
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": "perm1",
        "CNI_IFNAME": "eth0",
        "CNI_NETNS": pod,
    }
    proc = subprocess.run(
        ["ip", "netns", "exec", node.ns, node.plugin],
        input=json.dumps(conf).encode(),
        env=env,
        capture_output=True,
        timeout=60,
        umask=mask,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_plugin_state_is_private_whatever_the_umask(node):
    data = os.path.join(node.root, "state", "data")  # parents missing too
    log_file = os.path.join(node.root, "logs", "pycni.log")
    conf = node.conf(dataDir=data, logFile=log_file)
    pod = node.pod()
    exec_with_umask(node, conf, "ADD", pod, 0)
    files = private_files(node, data)
    assert files.pop(data) == 0o700
    assert os.path.join(data, "pycni.db") in files and os.path.join(data, "gc.lock") in files
    assert set(files.values()) == {0o600}, {k: oct(v) for k, v in files.items()}
    assert mode(log_file) == 0o600
    exec_with_umask(node, conf, "DEL", pod, 0)


def test_agent_state_is_private_whatever_the_umask(node):
    """The agent keeps the database open, so its -wal and -shm exist: they too are 0600."""
    with umask(0):
        agent = AgentProcess(node).start()
    try:
        node.base["agentSocket"] = agent.socket
        pod = node.pod()
        node.add(pod, "perm1")
        data = node.conf()["dataDir"]
        deadline = time.monotonic() + 5
        while not os.path.exists(os.path.join(data, "pycni.db-wal")):
            assert time.monotonic() < deadline, os.listdir(data)
            time.sleep(0.05)
        files = private_files(node, data)
        assert files.pop(data) == 0o700
        assert len(files) == 4, files  # db, -wal, -shm, lock
        assert set(files.values()) == {0o600}, {k: oct(v) for k, v in files.items()}
        assert mode(agent.socket) == 0o600 and mode(os.path.dirname(agent.socket)) == 0o700
        assert mode(agent.log_file) == 0o600
        assert node.run("DEL", container_id="perm1", netns=pod).rc == 0
    finally:
        agent.kill()
