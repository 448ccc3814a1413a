"""Property tests: the agent's wire format (PYCNI/1) under hostile callers, and the shim's
choice of socket under hostile configs. Truncated headers, wrong and huge lengths, garbage,
connections closed midway, callers that trickle bytes: the agent answers each with a valid
reply (a CNI result or error object; malformed requests are code 6), never hangs a worker
past its deadline, and keeps serving. The core is replaced by a recorder: no root needed."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from fuzz_inputs import (
    COMMANDS,
    HOSTILE_NAMES,
    check_answer,
    check_stdout,
    deep,
    environment_text,
    fuzz_settings,
    json_values,
)
from pycni import core, plugin, shim
from pycni.agent import protocol, server
from pycni.agent.server import Agent
from pycni.cni import MAX_CONFIG_BYTES, result, versions

READ_TIMEOUT = 0.5  # the agent's deadline for a whole request, shortened for the tests
CONF = {
    "cniVersion": "1.1.0",
    "name": "fuzznet",
    "subnet": "10.244.1.0/24",
    "dataDir": "/nonexistent/pycni-fuzz/data",
    "logFile": "",
}
ENV = {
    "CNI_COMMAND": "ADD",
    "CNI_CONTAINERID": "c1",
    "CNI_NETNS": "/run/netns/fuzz",
    "CNI_IFNAME": "eth0",
}


def frame(
    env: bytes,
    stdin: bytes,
    op: bytes = b"CNI",
    env_len: int | None = None,
    stdin_len: int | None = None,
) -> bytes:
    return b"PYCNI/1 %s %d %d\n%s%s" % (
        op,
        len(env) if env_len is None else env_len,
        len(stdin) if stdin_len is None else stdin_len,
        env,
        stdin,
    )


def encode_env(environ: dict[str, str]) -> bytes:
    return b"\0".join(
        k.encode() + b"=" + v.encode("utf-8", "surrogateescape") for k, v in environ.items()
    )


@contextlib.contextmanager
def offline_core():
    """The core replaced by a recorder and logging kept in memory (see test_fuzz_config)."""

    def fake_run(request, conf):
        return result.Result().to_json(conf.cni_version) if request.command == "ADD" else None

    logger = logging.getLogger("pycni")
    null = logging.NullHandler()
    logger.addHandler(null)
    real_run, core.run = core.run, fake_run
    try:
        yield
    finally:
        core.run = real_run
        logger.removeHandler(null)


class ServedAgent:
    def __init__(self, path: str, workers: int):
        self.agent = Agent(path, workers=workers)
        self.agent.bind()
        self.thread = threading.Thread(target=self.agent.serve, daemon=True)
        self.thread.start()
        self.path = path

    def stop(self) -> None:
        self.agent.stop()
        self.thread.join(15)
        assert not self.thread.is_alive()


@pytest.fixture(scope="module")
def served():
    """One agent for the module, serving on a thread, the core offline. peer_uid is faked to
    root so this runs without root (tests/netns/test_permissions.py covers the real check)."""
    directory = tempfile.mkdtemp(prefix="pycni-fuzz-")
    with pytest.MonkeyPatch.context() as mp, offline_core():
        mp.setattr(server, "READ_TIMEOUT", READ_TIMEOUT)
        mp.setattr(server, "peer_uid", lambda conn: 0)
        agent = ServedAgent(os.path.join(directory, "agent.sock"), workers=4)
        try:
            yield agent
        finally:
            agent.stop()
            os.rmdir(directory)


def exchange(path: str, chunks: list[bytes], ending: str, timeout: float = 10) -> bytes | None:
    """Send `chunks`, then: "shutdown" (half-close, read the answer), "close" (hang up without
    reading: None) or "wait" (stay silent, read what comes)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        try:
            for chunk in chunks:
                s.sendall(chunk)
            if ending == "close":
                return None
            if ending == "shutdown":
                s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the agent answered early (a refused header) and closed
        out = []
        try:
            while chunk := s.recv(65536):
                out.append(chunk)
        except ConnectionResetError:
            pass  # it closed with part of our request unread: what came is the answer
        return b"".join(out)


def check_reply(data: bytes) -> tuple[int, dict | None]:
    """b"<status>\\n" + what the plugin would print: valid, and consistent with the status."""
    head, sep, body = data.partition(b"\n")
    assert sep and head.isdigit(), data[:200]
    status = int(head)
    return status, check_stdout(status, body)


def wait_idle(agent: Agent, seconds: float = 5) -> None:
    deadline = time.monotonic() + seconds
    while agent.inflight and time.monotonic() < deadline:
        time.sleep(0.01)
    assert agent.inflight == 0


def check_health(data: bytes) -> None:
    head, _, body = data.partition(b"\n")
    assert head == b"0" and json.loads(body)["status"] == "ok", data[:200]


def assert_serving(path: str) -> None:
    check_health(exchange(path, [b"PYCNI/1 HEALTH 0 0\n"], "shutdown"))


# --- requests as bytes ------------------------------------------------------------------------

env_entries = st.dictionaries(
    st.sampled_from(
        ["CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "DEBUG", "X"]
    ),
    environment_text(),
    max_size=5,
)
stdin_bytes = st.one_of(
    st.just(json.dumps(CONF).encode()),
    st.binary(max_size=40),
    json_values.map(lambda v: json.dumps(v).encode()),
)
header_garbage = st.one_of(
    st.binary(max_size=140),
    st.sampled_from(
        [
            b"",
            b"\n",
            b"PYCNI/1\n",
            b"PYCNI/1 CNI\n",
            b"PYCNI/1 CNI 0\n",
            b"PYCNI/1 CNI -1 0\n",
            b"PYCNI/1 CNI 0 -0\n",
            b"PYCNI/1 CNI 1e3 0\n",
            b"PYCNI/1 CNI \xd9\xa3 0\n",
            b"PYCNI/1 CNI 0 0 0\n",
            b"PYCNI/2 CNI 0 0\n",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            b"PYCNI/1 CNI 00000000000 0\n",
            b"PYCNI/1 CNI 99999999999999999999999999 0\n",
            b"PYCNI/1 HEALTH 5 5\n",
            b"PYCNI/1 CNI 0 %d\n" % (MAX_CONFIG_BYTES + 2),
            b"PYCNI/1\tCNI\t0\t0\r\n",
            b"X" * 129,
        ]
    ),
)


@st.composite
def requests(draw):
    """(bytes on the wire, True if they are a complete well-formed request, False if they
    are certainly not, None if that depends on the draw)."""
    environ = draw(env_entries)
    env, stdin = encode_env(environ), draw(stdin_bytes)
    kind = draw(
        st.sampled_from(
            ["exact", "lengths-off", "garbage-header", "cut", "env-entry-broken", "huge-lengths"]
        )
    )
    if kind == "exact":
        return frame(env, stdin, draw(st.sampled_from([b"CNI", b"HEALTH"]))), True
    if kind == "lengths-off":
        de, ds = draw(st.integers(-5, 5)), draw(st.integers(-5, 5))
        env_len, stdin_len = max(len(env) + de, 0), max(len(stdin) + ds, 0)
        # Asking for more than is sent always fails; less may still parse (shifted).
        short = env_len + stdin_len > len(env) + len(stdin)
        return frame(env, stdin, env_len=env_len, stdin_len=stdin_len), False if short else None
    if kind == "garbage-header":
        return draw(header_garbage) + env + stdin, None
    if kind == "cut":
        whole = frame(env, stdin)
        return whole[: draw(st.integers(0, max(len(whole) - 1, 0)))], False
    if kind == "env-entry-broken":
        broken = env + draw(st.sampled_from([b"\0", b"\0NOEQUALS", b"\0\0A=1"]))
        return frame(broken, stdin), False
    return frame(
        env,
        stdin,
        env_len=draw(st.sampled_from([protocol.MAX_ENV_BYTES + 1, 2**63, 10**30])),
        stdin_len=0,
    ), False


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


@fuzz_settings(300)
@given(request=requests(), cuts=st.lists(st.integers(0, 10**6), max_size=4))
@example(request=(b"PYCNI/1 CNI 3 10\nA=1{}", False), cuts=[])
@example(
    request=(b"PYCNI/1 CNI 0 %d\n" % (MAX_CONFIG_BYTES + 1) + b"[" * (MAX_CONFIG_BYTES + 1), True),
    cuts=[7, 100],
)
def test_read_call_returns_the_request_or_refuses_it(request, cuts):
    data, well_formed = request
    ours, theirs = socket.socketpair()

    def send():
        try:
            for chunk in split(data, cuts):
                theirs.sendall(chunk)
            theirs.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # refused early

    writer = threading.Thread(target=send, daemon=True)
    writer.start()
    try:
        call = protocol.read_call(ours, deadline=time.monotonic() + 5)
    except protocol.ProtocolError:
        call = None
    finally:
        ours.close()
        writer.join(5)
        theirs.close()
    if well_formed:
        assert call is not None
        assert call.op in ("CNI", "HEALTH")
        assert encode_env(call.environ) + call.stdin == data[data.index(b"\n") + 1 :]
    elif well_formed is False:
        assert call is None


@fuzz_settings(250)
@given(request=requests(), cuts=st.lists(st.integers(0, 10**6), max_size=3))
@example(request=(b"junk\n", False), cuts=[])
@example(request=(frame(b"CNI_COMMAND=ADD", deep(100_000)), True), cuts=[])
def test_the_agent_answers_every_request(served, request, cuts):
    data, well_formed = request
    reply = exchange(served.path, split(data, cuts), "shutdown")
    if reply.startswith(b'0\n{"status"'):
        assert well_formed is not False
        check_health(reply)  # a HEALTH request, or garbage that happens to read as one
        return
    status, out = check_reply(reply)
    if well_formed is False:
        assert status == 1 and out["code"] == 6 and "malformed request" in out["msg"], out


@fuzz_settings(150)
@given(
    environ=st.fixed_dictionaries(
        {"CNI_COMMAND": st.sampled_from(COMMANDS)},
        optional={
            k: st.one_of(st.just(v), environment_text())
            for k, v in ENV.items()
            if k != "CNI_COMMAND"
        },
    ),
    stdin=stdin_bytes,
)
@example(environ=dict(ENV, CNI_IFNAME="eth\udcff"), stdin=json.dumps(CONF).encode())
def test_the_agent_answers_as_the_plugin_would(served, environ, stdin):
    """One core, two ways to run it: the agent's answer is plugin.handle's, byte for byte."""
    reply = exchange(served.path, [frame(encode_env(environ), stdin)], "shutdown")
    expected, status = plugin.handle(environ, stdin)
    check_answer(expected, status)
    body = (json.dumps(expected) + "\n").encode() if expected is not None else b""
    assert reply == b"%d\n%s" % (status, body)


@fuzz_settings(60)
@given(request=requests(), cut=st.integers(0, 10**6))
def test_callers_hanging_up_midway_do_not_hurt_the_agent(served, request, cut):
    data, _ = request
    exchange(served.path, [data[: cut % (len(data) + 1)]], "close")
    wait_idle(served.agent)
    assert_serving(served.path)


def test_a_silent_caller_is_cut_off_at_the_deadline(served):
    started = time.monotonic()
    status, err = check_reply(exchange(served.path, [b"PYCNI/1 CNI 10 10\nA="], "wait"))
    assert status == 1 and err["code"] == 6 and "in time" in err["msg"], err
    assert READ_TIMEOUT - 0.1 < time.monotonic() - started < READ_TIMEOUT + 2


def test_trickling_callers_cannot_hold_the_workers(served):
    """Slowloris: callers sending a byte every 0.1 s used to keep a worker each for as long as
    they kept trickling (the timeout was per recv). Now the whole request has a deadline:
    with all four workers taken by tricklers, a health check is still answered promptly,
    and each trickler gets a code-6 answer at the deadline."""
    data = frame(encode_env(ENV), json.dumps(CONF).encode())  # ~200 bytes: 20 s at 0.1 s/byte
    answers: list = []

    def trickle():
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(served.path)
            got = b""
            try:
                for byte in data:
                    s.sendall(bytes([byte]))
                    time.sleep(0.1)
            except (BrokenPipeError, ConnectionResetError):
                pass
            with contextlib.suppress(ConnectionResetError):
                while chunk := s.recv(65536):
                    got += chunk
            answers.append(got)

    started = time.monotonic()
    threads = [threading.Thread(target=trickle) for _ in range(served.agent.workers + 2)]
    for t in threads:
        t.start()
    time.sleep(0.2)  # every worker is now busy with a trickler
    assert_serving(served.path)
    for t in threads:
        t.join(15)
    elapsed = time.monotonic() - started
    assert len(answers) == len(threads)
    for got in answers:
        status, err = check_reply(got)
        assert status == 1 and err["code"] == 6 and "in time" in err["msg"], err
    # Two rounds of deadlines (six tricklers on four workers), not 20 s of trickling.
    assert elapsed < 3 * READ_TIMEOUT + 3, elapsed


def test_a_status_refused_for_an_unready_node_answers_in_a_version_pycni_speaks(tmp_path):
    """Was: {"cniVersion": "9.9.9"} came back as the error's version, and a config nested too
    deep killed the connection (RecursionError) so the runtime saw "try again"."""
    agent = Agent(str(tmp_path / "a.sock"))

    class Unready:
        def not_ready_reason(self):
            return "this node has no pod subnet yet"

    agent.cluster = Unready()
    for stdin, version in [
        (b'{"cniVersion": "9.9.9"}', versions.LATEST),
        (deep(100_000), versions.LATEST),
        (b"[1]", versions.LATEST),
        (b'{"cniVersion": "0.4.0"}', "0.4.0"),
    ]:
        out, status = agent.execute({"CNI_COMMAND": "STATUS"}, stdin)
        assert check_answer(out, status)["code"] == 50
        assert out["cniVersion"] == version, out


# --- the shim's choice of socket ------------------------------------------------------------

agent_socket_values = st.one_of(
    json_values,
    st.sampled_from(HOSTILE_NAMES),
    environment_text(),
    st.sampled_from(
        ["\u0000pycni", "agent.sock", "./a", "/run/x", "/run/\ud800", "/a\u0000b", "//x", "/"]
    ),
)


@fuzz_settings(300)
@given(
    value=agent_socket_values, extra=st.dictionaries(st.text(max_size=5), json_values, max_size=2)
)
@example(value="\u0000pycni-agent", extra={})  # was: connected to an abstract socket
@example(value="agent.sock", extra={})  # was: connected to a socket in the runtime's cwd
@example(value="/run/\ud800", extra={})  # was: a traceback (UnicodeEncodeError) in the shim
def test_the_shim_picks_only_an_absolute_socket_path(value, extra):
    stdin = json.dumps({**CONF, **extra, "agentSocket": value}).encode()
    path = shim.socket_path(stdin)
    if value == "":
        assert path == ""
    elif isinstance(value, str) and value.startswith("/") and "\0" not in value:
        assert path == value
    else:
        assert path == shim.DEFAULT_SOCKET
    if path:
        # Nothing listens there: the shim falls back to running the core itself.
        assert (
            shim.call_agent(path if path != shim.DEFAULT_SOCKET else "/nonexistent/s", stdin)
            is None
        )


@fuzz_settings(200)
@given(
    stdin=st.one_of(
        st.binary(max_size=80),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.sampled_from([deep(100_000), deep(50_000, "{")]),
    )
)
def test_the_shim_never_raises_on_any_stdin(stdin):
    shim.socket_path(stdin)
    err = json.loads(shim.try_again(stdin, "x"))
    assert err["code"] == 11 and err["cniVersion"] in versions.SUPPORTED


def test_the_shim_never_connects_to_an_abstract_socket():
    """Any user can listen on an abstract name; a config naming one must not hand the CNI
    request (and its answer) to whoever does."""
    name = f"\0pycni-fuzz-{os.getpid()}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(name)
    listener.listen(1)
    listener.settimeout(0.2)
    try:
        stdin = json.dumps({**CONF, "agentSocket": name}).encode()
        assert shim.socket_path(stdin) == shim.DEFAULT_SOCKET
        with pytest.raises(TimeoutError):
            listener.accept()
    finally:
        listener.close()


SHIM_CORPUS = [
    b"",
    b"{",
    b"[" * 100_000,
    b'{"a":' * 50_000,
    b'{"agentSocket": "\\ud800"}',
    b'{"agentSocket": "\\u0000x"}',
    b'{"agentSocket": ["/x"]}',
    b'{"agentSocket": "/x"',
    b"\xff\xfe" + b'{"agentSocket": "/x"}',
    b'{"agentSocket": 1e400}',
    b"NaN",
    b'"agentSocket"',
    b'{"agentSocket": "/x", "agentSocket": "\\u0000y"}',
    b'{"cniVersion": {"a": 1}}',
]
SHIM_RUNNER = r"""
import sys
sys.path[:0] = [sys.argv[1]]
from pycni import shim
data = sys.stdin.buffer.read()
for item in data.split(b"\0\0\0SEP\0\0\0"):
    path = shim.socket_path(item)
    assert path == "" or path.startswith("/") and "\0" not in path, path
    shim.try_again(item, "x")
print("ok")
"""


def test_the_shim_survives_hostile_configs_as_the_launcher_runs_it():
    """-IS and nothing imported, as runtimes exec it: pytest has json imported, which hides
    problems of the shim's import-free decoder."""
    src = os.path.join(os.path.dirname(__file__), "..", "..", "src")
    proc = subprocess.run(
        [sys.executable, "-IS", "-c", SHIM_RUNNER, src],
        input=b"\0\0\0SEP\0\0\0".join(SHIM_CORPUS),
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 0 and proc.stdout == b"ok\n", proc.stderr.decode()[-3000:]
