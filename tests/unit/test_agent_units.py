"""The agent's pure parts: the wire format (server and client side), the shim's choice of
socket, per-container locks, the agent's serialisation of calls and its socket life cycle."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest

from conftest import UnixServer
from pycni import plugin, shim
from pycni.agent import protocol
from pycni.agent.locks import KeyedLocks
from pycni.agent.server import Agent
from pycni.cni import MAX_CONFIG_BYTES, versions
from pycni.ipam.store import Store

# --- protocol.read_call --------------------------------------------------------------------


def frame(env: bytes, stdin: bytes, op: bytes = b"CNI") -> bytes:
    return b"PYCNI/1 %s %d %d\n%s%s" % (op, len(env), len(stdin), env, stdin)


def read_from(data: bytes, close: bool = True) -> protocol.Call:
    """read_call on the server end of a socketpair after the client wrote `data`."""
    server, client = socket.socketpair()

    def send():
        try:
            client.sendall(data)
            if close:
                client.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the reader gave up early (a refused header)

    writer = threading.Thread(target=send, daemon=True)
    writer.start()
    try:
        server.settimeout(5)
        return protocol.read_call(server)
    finally:
        server.close()
        writer.join(5)
        client.close()


def test_read_call_good_request():
    env = b"CNI_COMMAND=ADD\0CNI_CONTAINERID=c1\0CNI_ARGS=IgnoreUnknown=1;IP=10.0.0.9"
    stdin = b'{"cniVersion": "1.1.0", "name": "n"}\n'
    call = read_from(frame(env, stdin))
    assert call.op == "CNI"
    assert call.environ == {
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": "c1",
        "CNI_ARGS": "IgnoreUnknown=1;IP=10.0.0.9",
    }
    assert call.stdin == stdin


def test_read_call_leaves_what_follows_unread():
    """The lengths, not the end of the connection, delimit the request."""
    server, client = socket.socketpair()
    try:
        client.sendall(frame(b"A=1", b"xyz") + b"TRAILER")
        call = protocol.read_call(server)
        assert (call.environ, call.stdin) == ({"A": "1"}, b"xyz")
        assert server.recv(100) == b"TRAILER"
    finally:
        server.close()
        client.close()


def test_read_call_health_and_empty_parts():
    call = read_from(b"PYCNI/1 HEALTH 0 0\n")
    assert (call.op, call.environ, call.stdin) == ("HEALTH", {}, b"")
    call = read_from(frame(b"", b"{}"))
    assert (call.environ, call.stdin) == ({}, b"{}")
    call = read_from(frame(b"EMPTY=", b""))
    assert call.environ == {"EMPTY": ""}


def test_read_call_keeps_undecodable_bytes():
    call = read_from(frame(b"CNI_COMMAND=\xff\xfe", b""))
    assert call.environ["CNI_COMMAND"].encode("utf-8", "surrogateescape") == b"\xff\xfe"


def test_read_call_accepts_the_largest_config_the_plugin_reads():
    stdin = b" " * (MAX_CONFIG_BYTES + 1)  # the shim reads one byte past the limit
    assert read_from(frame(b"", stdin)).stdin == stdin


@pytest.mark.parametrize(
    "data, words",
    [
        (b"", "before a complete header"),
        (b"PYCNI/1 CNI 0 0", "before a complete header"),  # no newline, then EOF
        (b"X" * 200, "too long"),
        (b"PYCNI/1 CNI " + b"9" * 200 + b" 0\n", "too long"),
        (b"GET / HTTP/1.0\r\n\r\n", "malformed header"),
        (b"PYCNI/1 CNI 0\n", "malformed header"),
        (b"PYCNI/1 CNI 0 0 0\n", "malformed header"),
        (b"PYCNI/2 CNI 0 0\n", "malformed header"),
        (b"PYCNI/1 CNI -1 0\n", "malformed header"),
        (b"PYCNI/1 CNI 0x10 0\n", "malformed header"),
        (b"PYCNI/1 FROB 0 0\n", "unknown operation"),
        (b"PYCNI/1 cni 0 0\n", "unknown operation"),
        (b"PYCNI/1 CNI %d 0\n" % (protocol.MAX_ENV_BYTES + 1), "too large"),
        (b"PYCNI/1 CNI 0 %d\n" % (MAX_CONFIG_BYTES + 2), "too large"),
        (b"PYCNI/1 CNI 10 0\nA=1", "7 of 10 bytes unread"),  # truncated environment
        (b"PYCNI/1 CNI 3 10\nA=1{}", "8 of 10 bytes unread"),  # truncated stdin
        (frame(b"NOEQUALS", b""), "malformed environment entry"),
        (frame(b"A=1\0\0B=2", b""), "malformed environment entry"),
    ],
    ids=[
        "empty",
        "no-newline",
        "long-garbage",
        "long-digits",
        "http",
        "three-fields",
        "five-fields",
        "wrong-magic",
        "negative",
        "hex",
        "unknown-op",
        "lowercase-op",
        "env-too-large",
        "stdin-too-large",
        "truncated-env",
        "truncated-stdin",
        "env-no-equals",
        "env-empty-entry",
    ],
)
def test_read_call_refuses(data, words):
    with pytest.raises(protocol.ProtocolError) as exc:
        read_from(data)
    assert words in str(exc.value)


def test_read_call_refuses_oversized_lengths_without_reading_the_body():
    """A huge length is refused from the header alone (no body is ever sent here, and the
    connection stays open: read_call must not wait for it)."""
    server, client = socket.socketpair()
    try:
        server.settimeout(2)
        client.sendall(b"PYCNI/1 CNI 0 99999999999\n")
        with pytest.raises(protocol.ProtocolError, match="too large"):
            protocol.read_call(server)
    finally:
        server.close()
        client.close()


def test_reply_format():
    assert protocol.reply(0, b'{"a": 1}\n') == b'0\n{"a": 1}\n'
    assert protocol.reply(1, b"") == b"1\n"


# --- shim: socket choice, client side ------------------------------------------------------


@pytest.mark.parametrize(
    "stdin, expected",
    [
        (b"", shim.DEFAULT_SOCKET),
        (b'{"cniVersion": "1.1.0", "name": "n"}', shim.DEFAULT_SOCKET),
        (b'{"agentSocket": "/run/x/a.sock", "name": "n"}', "/run/x/a.sock"),
        (b'{"agentSocket": ""}', ""),
        (b'{"agentSocket": null}', shim.DEFAULT_SOCKET),
        (b'{"agentSocket": 5}', shim.DEFAULT_SOCKET),
        (b'{"agentSocket": "/a.sock", ', shim.DEFAULT_SOCKET),  # bad JSON
        (b'["agentSocket"]', shim.DEFAULT_SOCKET),  # not an object
        (b'{"args": {"agentSocket": "/nested.sock"}}', shim.DEFAULT_SOCKET),
        (b'{"name": "n", "x": "\\"agentSocket\\""}', shim.DEFAULT_SOCKET),
        (b'\xff\xfe{"agentSocket": "/a"}', shim.DEFAULT_SOCKET),
    ],
    ids=[
        "empty",
        "no-key",
        "given",
        "standalone",
        "null",
        "number",
        "bad-json",
        "list",
        "nested",
        "in-a-string",
        "undecodable",
    ],
)
def test_socket_path(stdin, expected):
    assert shim.socket_path(stdin) == expected


SHIM_IN_A_FRESH_PROCESS = r"""
import sys
sys.path[:0] = [sys.argv[1]]
from pycni import shim
data = sys.stdin.buffer.read()
print(shim.socket_path(data))
sys.stdout.write(shim.try_again(data, "x").decode())
"""


@pytest.mark.parametrize(
    "stdin",
    [
        b'{"agentSocket": "/a.sock", ',
        b'{"agentSocket": "/a.sock", "x": "unterminated',
        b'["agentSocket"',
        b'{"agentSocket": "/a.sock"} trailing',
        b'{"agentSocket": "/a", "padding": "' + b"a" * (MAX_CONFIG_BYTES + 1),
    ],
    ids=["cut", "unterminated-string", "open-list", "trailing", "huge-truncated"],
)
def test_socket_path_on_bad_json_in_a_fresh_interpreter(stdin):
    """As the launcher runs it (-IS, nothing imported yet): a config that is not JSON goes
    to the default socket and never raises (pytest has imported json already, which hides
    problems of a hand-rolled decoder)."""
    src = os.path.join(os.path.dirname(__file__), "..", "..", "src")
    proc = subprocess.run(
        [sys.executable, "-IS", "-c", SHIM_IN_A_FRESH_PROCESS, src],
        input=stdin[: MAX_CONFIG_BYTES + 1],
        capture_output=True,
        timeout=30,
    )
    assert proc.returncode == 0 and proc.stderr == b"", proc.stderr.decode()[-2000:]
    path, err = proc.stdout.decode().split("\n", 1)
    assert path == shim.DEFAULT_SOCKET
    assert json.loads(err) == {"cniVersion": versions.LATEST, "code": 11, "msg": "x; try again"}


@pytest.mark.parametrize(
    "stdin, version",
    [
        (b'{"cniVersion": "0.4.0"}', "0.4.0"),
        (b'{"cniVersion": "9.9.9"}', versions.LATEST),
        (b"not json", versions.LATEST),
        (b"[1]", versions.LATEST),
        (b"", versions.LATEST),
    ],
)
def test_try_again_is_code_11_in_the_asked_version(stdin, version):
    out = shim.try_again(stdin, "lost it")
    assert out.endswith(b"\n") and out.count(b"\n") == 1
    err = json.loads(out)
    assert err == {"cniVersion": version, "code": 11, "msg": "lost it; try again"}


@pytest.fixture
def fake_agent(tmp_path):
    servers = []

    def make(behave):
        server = UnixServer(str(tmp_path / f"fake{len(servers)}.sock"), behave)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


def test_call_agent_round_trip_forwards_only_cni_variables(fake_agent, monkeypatch):
    """The shim's request parses with the agent's reader, and the reply passes through."""
    seen = []

    def behave(conn):
        call = protocol.read_call(conn)
        seen.append(call)
        conn.sendall(protocol.reply(7, b'{"x": 1}\n'))

    server = fake_agent(behave)
    for key in list(os.environ):
        if key.startswith(("CNI_", "PYCNI_", "DEBUG")):
            monkeypatch.delenv(key)
    monkeypatch.setenv("CNI_COMMAND", "ADD")
    monkeypatch.setenv("CNI_ARGS", "A=1;B=2")
    monkeypatch.setenv("DEBUG", "1")
    monkeypatch.setenv("PYCNI_FAIL_AFTER", "ipam")
    monkeypatch.setenv("HOME_SECRET", "not forwarded")
    stdin = b'{"cniVersion": "1.1.0"}'
    assert shim.call_agent(server.path, stdin) == (7, b'{"x": 1}\n')
    assert len(seen) == 1
    assert seen[0].op == "CNI" and seen[0].stdin == stdin
    assert seen[0].environ == {
        "CNI_COMMAND": "ADD",
        "CNI_ARGS": "A=1;B=2",
        "DEBUG": "1",
        "PYCNI_FAIL_AFTER": "ipam",
    }


def test_call_agent_without_a_listener_is_none(tmp_path):
    assert shim.call_agent(str(tmp_path / "absent.sock"), b"{}") is None
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "stale.sock"))
    stale.close()  # the file stays, nobody listens
    assert shim.call_agent(str(tmp_path / "stale.sock"), b"{}") is None
    (tmp_path / "file.sock").write_text("")
    assert shim.call_agent(str(tmp_path / "file.sock"), b"{}") is None


@pytest.mark.parametrize(
    "answer",
    [b"", b"0", b"hello\n{}", b"-1\n{}", b" 0\n{}"],
    ids=["nothing", "no-newline", "garbage", "negative", "space"],
)
def test_call_agent_bad_answers_are_try_again(fake_agent, answer):
    def behave(conn):
        protocol.read_call(conn)
        conn.sendall(answer)

    server = fake_agent(behave)
    status, out = shim.call_agent(server.path, b'{"cniVersion": "0.4.0"}')
    assert status == 1
    err = json.loads(out)
    assert err["code"] == 11 and err["cniVersion"] == "0.4.0", err


@pytest.mark.parametrize("size", [10, 1 << 20], ids=["small", "bigger-than-the-buffer"])
def test_call_agent_reads_an_answer_given_without_reading_the_request(fake_agent, size):
    """An agent that refuses a caller answers and closes without reading the request; the
    kernel then reports a reset (and, for a big request, a broken pipe to the writer), but
    only after the answer: the shim must pass the answer on, not turn it into "try again"."""
    refusal = b'1\n{"cniVersion": "1.1.0", "code": 106, "msg": "root only"}\n'
    server = fake_agent(lambda conn: conn.sendall(refusal))
    status, out = shim.call_agent(server.path, b"{" + b" " * size + b"}")
    assert (status, out) == (1, refusal[2:])


# --- KeyedLocks ----------------------------------------------------------------------------


def run_threads(targets):
    threads = [threading.Thread(target=t) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
        assert not t.is_alive()


class Tracker:
    """Records how many holders of each key overlap."""

    def __init__(self):
        self.lock = threading.Lock()
        self.active: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.peak_total = 0
        self.events: list[tuple[str, str]] = []

    def work(self, key: str, tag: str, seconds: float = 0.02):
        with self.lock:
            self.active[key] = self.active.get(key, 0) + 1
            self.peak[key] = max(self.peak.get(key, 0), self.active[key])
            self.peak_total = max(self.peak_total, sum(self.active.values()))
            self.events.append(("start", tag))
        time.sleep(seconds)
        with self.lock:
            self.active[key] -= 1
            self.events.append(("end", tag))


def test_keyed_locks_serialise_one_key_and_not_others():
    locks, track = KeyedLocks(), Tracker()

    def worker(key, i):
        def go():
            with locks.hold(key):
                track.work(key, f"{key}{i}")

        return go

    run_threads([worker(k, i) for i in range(8) for k in ("a", "b", "c")])
    assert track.peak == {"a": 1, "b": 1, "c": 1}
    assert track.peak_total > 1  # different keys did overlap
    # Per key, every start is followed by its own end.
    for key in "abc":
        seq = [e for e in track.events if e[1].startswith(key)]
        for start, end in zip(seq[::2], seq[1::2], strict=True):
            assert start[0] == "start" and end == ("end", start[1])
    assert len(locks) == 0  # entries are dropped once unused


def test_keyed_locks_release_on_exception():
    locks = KeyedLocks()
    with pytest.raises(RuntimeError):
        with locks.hold("k"):
            raise RuntimeError("boom")
    assert len(locks) == 0
    got = threading.Event()

    def other():
        with locks.hold("k"):
            got.set()

    run_threads([other])
    assert got.is_set()


def test_keyed_locks_second_holder_waits():
    locks = KeyedLocks()
    order = []
    inside = threading.Event()

    def first():
        with locks.hold("k"):
            inside.set()
            time.sleep(0.15)
            order.append("first-done")

    def second():
        inside.wait(5)
        with locks.hold("k"):
            order.append("second-in")

    run_threads([first, second])
    assert order == ["first-done", "second-in"]


# --- Agent.execute: serialisation per container, observers ---------------------------------


@pytest.fixture
def fake_handle(monkeypatch):
    track = Tracker()

    def handle(environ, stdin, on_config=None, faults=None):
        cid = environ.get("CNI_CONTAINERID", "")
        track.work(cid, f"{environ['CNI_COMMAND']} {cid}", 0.03)
        if environ["CNI_COMMAND"] == "FAIL":
            return {"cniVersion": "1.1.0", "code": 102, "msg": "exists"}, 1
        return {"ok": cid}, 0

    monkeypatch.setattr(plugin, "handle", handle)
    return track


def test_agent_execute_serialises_calls_per_container(tmp_path, fake_handle):
    agent = Agent(str(tmp_path / "a.sock"))

    def call(cmd, cid):
        return lambda: agent.execute({"CNI_COMMAND": cmd, "CNI_CONTAINERID": cid}, b"{}")

    run_threads([call(cmd, cid) for cid in ("c1", "c2", "c3") for cmd in ("ADD", "DEL") * 3])
    assert fake_handle.peak == {"c1": 1, "c2": 1, "c3": 1}
    assert fake_handle.peak_total > 1
    assert len(agent.locks) == 0


def test_agent_execute_reports_to_observers(tmp_path, fake_handle):
    agent = Agent(str(tmp_path / "a.sock"))
    seen = []
    agent.observers.append(lambda *a: (_ for _ in ()).throw(RuntimeError("broken observer")))
    agent.observers.append(lambda cmd, code, secs: seen.append((cmd, code, secs >= 0)))
    assert agent.execute({"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c"}, b"") == ({"ok": "c"}, 0)
    assert agent.execute({"CNI_COMMAND": "FAIL", "CNI_CONTAINERID": "c"}, b"")[1] == 1
    assert seen == [("ADD", 0, True), ("FAIL", 102, True)]


# --- Agent socket life cycle (no netns needed) ---------------------------------------------


def raw(path: str, data: bytes, timeout: float = 5) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def test_bind_is_private_and_replaces_a_stale_socket(tmp_path):
    path = str(tmp_path / "run" / "agent.sock")
    os.makedirs(os.path.dirname(path))
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()
    agent = Agent(path)
    agent.bind()
    try:
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert not [n for n in os.listdir(os.path.dirname(path)) if n.endswith(".tmp")]
    finally:
        agent.stop()
    assert not os.path.exists(path)


def test_a_new_directory_is_0700(tmp_path):
    path = str(tmp_path / "fresh" / "agent.sock")
    agent = Agent(path)
    agent.bind()
    try:
        assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    finally:
        agent.stop()


def test_stopping_agent_leaves_its_successors_socket(tmp_path):
    path = str(tmp_path / "agent.sock")
    old, new = Agent(path), Agent(path)
    old.bind()
    new.bind()  # a restarted agent takes the path over while the old one drains
    old.stop()
    assert os.path.exists(path)
    new.stop()
    assert not os.path.exists(path)


def test_stop_answers_every_call_already_connected(tmp_path, monkeypatch):
    """SIGTERM semantics: every caller whose connect() succeeded before stop() gets its
    answer, including those still in the listen backlog (not yet accept()ed) when the signal
    came; only callers after stop() find no socket (and run in-process)."""
    monkeypatch.setattr(
        plugin, "handle", lambda env, stdin, on_config=None, faults=None: ({"ok": 1}, 0)
    )
    path = str(tmp_path / "agent.sock")
    agent = Agent(path, workers=4)
    agent.bind()
    clients = []
    try:
        for _ in range(6):
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.settimeout(2)
            c.connect(path)  # queued in the backlog: the agent is not accepting yet
            c.sendall(frame(b"CNI_COMMAND=VERSION", b"{}"))
            clients.append(c)
        agent.stop()  # the signal arrives before serve() took them
        server = threading.Thread(target=agent.serve, daemon=True)
        server.start()
        replies = []
        for c in clients:
            try:
                replies.append(c.recv(1000))
            except OSError as exc:
                replies.append(repr(exc).encode())
        server.join(10)
        assert not server.is_alive()
        assert replies == [b'0\n{"ok": 1}\n'] * 6
        assert not os.path.exists(path)
    finally:
        for c in clients:
            c.close()
        agent.stop()


def test_served_agent_answers_health_and_survives_bad_requests(tmp_path, monkeypatch):
    monkeypatch.setattr(
        plugin,
        "handle",
        lambda env, stdin, on_config=None, faults=None: ({"cmd": env.get("CNI_COMMAND")}, 0),
    )
    path = str(tmp_path / "agent.sock")
    agent = Agent(path, workers=2)
    agent.bind()
    server = threading.Thread(target=agent.serve, daemon=True)
    server.start()
    try:
        head, _, body = raw(path, b"PYCNI/1 HEALTH 0 0\n").partition(b"\n")
        health = json.loads(body)
        assert head == b"0" and health["status"] == "ok" and health["pid"] == os.getpid()
        assert health["inflight"] == 1  # this very call
        for bad in (b"junk\n", b"PYCNI/1 CNI 50 0\nA=1", b"", b"PYCNI/1 CNI 0 99999999999\n"):
            head, _, body = raw(path, bad).partition(b"\n")
            assert head == b"1"
            assert json.loads(body)["code"] == 6
        assert raw(path, frame(b"CNI_COMMAND=VERSION", b"")) == b'0\n{"cmd": "VERSION"}\n'
        deadline = time.monotonic() + 5  # a worker leaves just after its caller has the answer
        while agent.inflight and time.monotonic() < deadline:
            time.sleep(0.01)
        assert agent.inflight == 0
    finally:
        agent.stop()
        server.join(10)
    assert not server.is_alive()


# --- the store shared by long-lived agent connections and one-shot plugins -----------------

ONE_SHOT = """
import sys
from pycni.ipam.store import Store
with Store(sys.argv[1]) as s:
    print(s.get_meta("k"))
"""


def one_shot(data_dir: str) -> str:
    """Another process opens the store, reads, closes: what an in-process plugin does."""
    out = subprocess.run(
        [sys.executable, "-c", ONE_SHOT, data_dir],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return out.stdout.strip()


def test_opening_another_connection_keeps_the_store_shared(tmp_path):
    """The agent keeps a connection per worker and opens more as workers start. Opening one
    must not drop the process's SQLite locks (closing any descriptor of the file does), or a
    one-shot plugin closing next deletes the WAL under the agent's connections and every
    write they make afterwards is lost to everyone else (duplicate addresses follow)."""
    data = str(tmp_path / "data")
    first = Store(data)  # worker 1
    second = None
    try:
        first.set_meta("k", "1")
        second = Store(data)  # worker 2 starts
        assert one_shot(data) == "1"  # a plugin in its own process opens and closes
        first.set_meta("k", "2")  # worker 1 writes again
        assert os.path.exists(first.path + "-wal")
        assert one_shot(data) == "2"
        assert second.get_meta("k") == "2"
    finally:
        first.close()
        if second is not None:
            second.close()


# --- the underlay interface without --iface -----------------------------------------------


def test_underlay_is_the_interface_holding_the_node_address():
    from pycni.agent.cluster import choose_underlay

    holders = {"192.0.2.1": "eth1", "fd00::1": "eth2", "127.0.0.1": "lo"}
    assert choose_underlay(["192.0.2.1"], holders, "eth0") == (
        "eth1",
        "it holds the node's address 192.0.2.1",
    )
    # Written in another form, or the second of several known addresses.
    assert choose_underlay(["fd00:0::1"], holders, None)[0] == "eth2"
    assert choose_underlay(["198.51.100.9", "fd00::1"], holders, None)[0] == "eth2"
    # Known but held by no interface (a published address behind NAT): the default route.
    assert choose_underlay(["198.51.100.9"], holders, "eth0") == (
        "eth0",
        "it holds the default route (no interface holds the node's address 198.51.100.9)",
    )
    assert choose_underlay([], holders, "eth0") == ("eth0", "it holds the default route")


def test_underlay_without_address_or_default_route_says_what_to_give():
    from pycni.agent.cluster import choose_underlay
    from pycni.cluster.model import ClusterError

    with pytest.raises(ClusterError, match="no interface holds the node's address 192.0.2.9"):
        choose_underlay(["192.0.2.9"], {}, None)
    with pytest.raises(ClusterError, match="give --iface") as err:
        choose_underlay([], {}, None)
    assert "--node-ip" in str(err.value) and "InternalIP" in str(err.value)


# --- the agent's socket from the node's config ----------------------------------------------


def test_find_agent_socket_reads_the_first_pycni_config(tmp_path):
    from pycni.doctor.status import agent_socket
    from pycni.node_config import DEFAULT_CONF_DIR, find_agent_socket, node_conflist

    assert find_agent_socket(str(tmp_path / "none")) is None
    (tmp_path / "05-other.conflist").write_text(
        json.dumps({"name": "x", "plugins": [{"type": "bridge"}]})
    )
    (tmp_path / "07-broken.conflist").write_text("{")
    (tmp_path / "README").write_text("not a config")
    assert find_agent_socket(str(tmp_path)) is None
    conf = node_conflist("pycni", "10.244.1.0/24", "10.244.0.0/16", agentSocket="/run/a.sock")
    (tmp_path / "10-pycni.conflist").write_text(json.dumps(conf))
    (tmp_path / "20-pycni.conf").write_text(
        json.dumps({"type": "pycni", "name": "n", "agentSocket": "/run/b.sock"})
    )
    path = str(tmp_path / "10-pycni.conflist")
    assert find_agent_socket(str(tmp_path)) == ("/run/a.sock", path)
    # --socket wins; the config's socket is expected to answer; else the default, optional.
    assert agent_socket("/x.sock", str(tmp_path)) == ("/x.sock", "--socket", True)
    assert agent_socket(None, str(tmp_path)) == ("/run/a.sock", path, True)
    assert agent_socket(None, str(tmp_path / "none")) == (shim.DEFAULT_SOCKET, None, False)
    assert DEFAULT_CONF_DIR == "/etc/cni/net.d"
    # A single-plugin config counts too; "" (never an agent) and a relative path are read as
    # the plugin reads them.
    os.unlink(path)
    assert find_agent_socket(str(tmp_path)) == ("/run/b.sock", str(tmp_path / "20-pycni.conf"))
    for value, found in (("", ""), ("rel.sock", None)):
        (tmp_path / "20-pycni.conf").write_text(
            json.dumps({"type": "pycni", "name": "n", "agentSocket": value})
        )
        got = find_agent_socket(str(tmp_path))
        assert (got[0] if got else None) == found
    assert agent_socket(None, str(tmp_path))[2] is False


def test_data_dir_from_the_node_config(tmp_path):
    from pycni.doctor.status import default_data_dirs
    from pycni.node_config import find_data_dir

    def write(plugin: dict) -> None:
        (tmp_path / "10-pycni.conflist").write_text(
            json.dumps({"name": "n", "plugins": [{"type": "pycni", **plugin}]})
        )

    assert find_data_dir(str(tmp_path)) is None
    write({"dataDir": "/var/lib/x"})
    assert find_data_dir(str(tmp_path)) == "/var/lib/x"
    write({"ipam": {"dataDir": "/var/lib/y"}})
    assert find_data_dir(str(tmp_path)) == "/var/lib/y"
    write({"dataDir": "relative"})
    assert find_data_dir(str(tmp_path)) is None
    write({"dataDir": "/var/lib/x"})
    # The running agent's data dirs first, then the config's, then the default.
    assert default_data_dirs({"dataDirs": ["/a"]}, str(tmp_path)) == ["/a"]
    assert default_data_dirs(None, str(tmp_path)) == ["/var/lib/x"]
    assert default_data_dirs(None, str(tmp_path / "none")) == ["/var/lib/pycni"]


def test_status_flags_pods_outside_the_node_subnet():
    from pycni.doctor.status import outside_node_subnet

    networks = [
        {
            "name": "pycni",
            "pods": [
                {"containerId": "a" * 20, "ifname": "eth0", "addresses": ["10.244.7.2/24"]},
                {
                    "containerId": "b" * 20,
                    "ifname": "eth0",
                    "addresses": ["10.244.5.3/24", "fd00:5::3/64"],
                },
            ],
        },
        {
            "name": "other",
            "pods": [{"containerId": "c" * 20, "ifname": "eth0", "addresses": ["10.9.0.2/24"]}],
        },
    ]
    cluster = {"network": "pycni", "subnets": ["10.244.7.0/24"]}
    assert outside_node_subnet(networks, cluster) == [
        f"network pycni: pod {'b' * 12}/eth0: address 10.244.5.3 is outside the node's subnet "
        "10.244.7.0/24 (from an earlier podCIDR; unreachable from other nodes): recreate the pod"
    ]


def test_cluster_status_renders_the_remote_nodes_again_only_when_they_change(tmp_path):
    """Health polls during a pass must not spend the GIL rendering thousands of unchanged
    nodes: the same list gives the same rendering, a changed one (or a new record) a new."""
    from ipaddress import ip_network

    from pycni.agent.cluster import ClusterNode, ClusterOptions
    from pycni.cluster.model import ClusterSettings, NodeRecord

    class Store:
        kind = "sqlite"

    def node(name: str, subnet: str) -> NodeRecord:
        return NodeRecord(name, ("192.0.2.1",), (ip_network(subnet),))

    options = ClusterOptions(ClusterSettings(), "me", data_dir=str(tmp_path), fast_path=False)
    cluster = ClusterNode(options, Store())
    me, other = node("me", "10.244.0.0/24"), node("b", "10.244.1.0/24")
    assert cluster.status()["remoteNodes"] == []
    assert cluster.status()["lastReconcileAt"] == 0.0  # no pass yet
    cluster.record, cluster.nodes = me, [me, other]
    first = cluster.status()["remoteNodes"]
    assert first == [other.to_json()]
    cluster.nodes = [me, other]  # the next pass: a new list of the same records
    assert cluster.status()["remoteNodes"] is first
    cluster.nodes = [me, other, node("c", "10.244.2.0/24")]
    assert [n["name"] for n in cluster.status()["remoteNodes"]] == ["b", "c"]
    cluster.record = node("b", "10.244.1.0/24")  # this node's own entry is never listed
    assert [n["name"] for n in cluster.status()["remoteNodes"]] == ["me", "c"]
