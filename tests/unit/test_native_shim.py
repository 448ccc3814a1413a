"""The native plugin executable (pycni/native/shim.c) against the Python it mirrors.

Every check runs the compiled executable and compares it with pycni's Python: the socket it
picks with shim.socket_path(), its request bytes and its handling of the agent's reply with
the Python launcher's (both run against one fake agent that records what it is sent), its
answer without an agent with the standalone Python launcher's, and its fallback with an exec
of the launcher on the same stdin bytes. The builds use a private default socket, never the
host's /run/pycni/agent.sock. PYCNI_NATIVE_SANITIZE=1 runs the same tests against an
-fsanitize=address,undefined build (any sanitizer report fails them: stderr must be empty).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import UnixServer
from pycni import shim
from pycni.agent import protocol
from pycni.cni import MAX_CONFIG_BYTES, versions
from pycni.install import launchers, uninstall
from pycni.native import FALLBACK_NAME, build

pytestmark = pytest.mark.skipif(
    build.compiler() is None,
    reason="no C compiler (cc): the native executable cannot be "
    "built here (apt-get install gcc libc6-dev)",
)

SANITIZE = os.environ.get("PYCNI_NATIVE_SANITIZE") == "1"
PYCNICTL = os.path.join(os.path.dirname(sys.executable), "pycnictl")
HINT = (
    ": this node's pycni executable is the standalone launcher, which needs the node "
    "agent (is the pycni pod running on this node?)"
)
LIMITS = build.interpreter_limits()
DEPTH = LIMITS[0]
BASE_ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "CNI_COMMAND": "ADD",
    "CNI_CONTAINERID": "c" * 64,
    "CNI_IFNAME": "eth0",
    "CNI_NETNS": "/run/netns/x",
    "CNI_PATH": "/opt/cni/bin",
}

RECORDER_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
extern char **environ;
static void put(const char *suffix, const void *data, size_t n) {
    char path[4096];
    snprintf(path, sizeof path, "%s%s", getenv("RECORD_TO"), suffix);
    FILE *f = fopen(path, "ab");
    fwrite(data, 1, n, f);
    fclose(f);
}
int main(int argc, char **argv) {
    for (int i = 0; i < argc; i++) put(".argv", argv[i], strlen(argv[i]) + 1);
    for (char **e = environ; *e; e++) put(".env", *e, strlen(*e) + 1);
    put(".stdin", "", 0);
    char buf[65536];
    ssize_t n;
    while ((n = read(0, buf, sizeof buf)) > 0) put(".stdin", buf, (size_t)n);
    puts("{\"recorded\": true}");
    return 3;
}
"""


@dataclass
class Builds:
    root: str
    default_socket: str
    standalone: str  # no fallback: error 11 without an agent
    to_recorder: str  # falls back to `recorder`
    recorder: str
    to_launcher: str  # falls back to the real Python launcher
    short_timeout: str  # standalone, 0.3 s timeout (answer and connect)
    short_to_recorder: str  # falls back to `recorder`, 0.3 s connect timeout
    python_launcher: str  # shim.main() as `pycnictl install` writes it
    python_standalone: str  # the standalone Python launcher


def _python_launcher(default_socket: str) -> str:
    """launchers.launcher_text() with the test's default socket, set at module level (no extra
    frame: the same JSON depth limit as the real launcher)."""
    text = launchers.launcher_text()
    old = "from pycni.shim import main\nmain()\n"
    assert old in text
    return text.replace(
        old, f"from pycni import shim\nshim.DEFAULT_SOCKET = {default_socket!r}\nshim.main()\n"
    )


@pytest.fixture(scope="session")
def native(tmp_path_factory) -> Builds:
    root = str(tmp_path_factory.mktemp("native"))
    default = os.path.join(root, "default", "agent.sock")  # never listened on
    overrides = {"PYCNI_DEFAULT_SOCKET": build.c_string(default)}

    def make(name: str, fallback: str | None = None, **more) -> str:
        path = os.path.join(root, name)
        build.build(
            path, fallback, sanitize=SANITIZE, limits=LIMITS, overrides={**overrides, **more}
        )
        return path

    with open(os.path.join(root, "recorder.c"), "w") as f:
        f.write(RECORDER_C)
    recorder = os.path.join(root, "recorder")
    subprocess.run([*build.compiler(), "-O1", "-o", recorder, f.name], check=True)
    python_launcher = os.path.join(root, "python-launcher")
    with open(python_launcher, "w") as f:
        f.write(_python_launcher(default))
    python_standalone = os.path.join(root, "python-standalone")
    text = launchers.standalone_text()
    old = f"DEFAULT_SOCKET = {json.dumps(shim.DEFAULT_SOCKET)}\n"
    assert text.count(old) == 1
    with open(python_standalone, "w") as f:
        f.write(text.replace(old, f"DEFAULT_SOCKET = {default!r}\n"))
    for path in (python_launcher, python_standalone):
        os.chmod(path, 0o755)
    return Builds(
        root,
        default,
        make("standalone"),
        make("to-recorder", recorder),
        recorder,
        make("to-launcher", python_launcher),
        make("short", PYCNI_TIMEOUT_MS="300", PYCNI_CONNECT_TIMEOUT_MS="300"),
        make("short-to-recorder", recorder, PYCNI_CONNECT_TIMEOUT_MS="300"),
        python_launcher,
        python_standalone,
    )


@pytest.fixture
def default_socket(native, monkeypatch):
    """shim.socket_path() in this process with the builds' default socket."""
    monkeypatch.setattr(shim, "DEFAULT_SOCKET", native.default_socket)
    return native.default_socket


def run(
    exe: str, stdin: bytes, env: dict | None = None, argv0: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [argv0 or exe],
        executable=exe,
        input=stdin,
        env=BASE_ENV if env is None else env,
        capture_output=True,
        timeout=timeout,
    )


def native_run(exe: str, stdin: bytes, **kw) -> subprocess.CompletedProcess:
    proc = run(exe, stdin, **kw)
    assert proc.stderr == b"", proc.stderr.decode(errors="replace")[-3000:]
    return proc


def standalone_answer(data: bytes) -> bytes:
    """What the standalone launcher prints without an agent, from the shim's own functions."""
    path = shim.socket_path(data)
    where = f"at {path}" if path else '(the config sets "agentSocket": "")'
    return shim.try_again(data, f"no pycni agent is listening {where}{HINT}")


def config(sock: str | None = None, **more) -> bytes:
    conf = {"cniVersion": "1.0.0", "name": "n", "type": "pycni", **more}
    if sock is not None:
        conf["agentSocket"] = sock
    return json.dumps(conf).encode()


# --- the fake agent -----------------------------------------------------------------------


def read_request(conn) -> bytes:
    """One whole PYCNI/1 request, raw."""
    header = b""
    while not header.endswith(b"\n"):
        chunk = conn.recv(1)
        if not chunk:
            return header
        header += chunk
    _magic, _op, env_len, stdin_len = header.split()
    return header + protocol.read_exactly(conn, int(env_len) + int(stdin_len))


class FakeAgent(UnixServer):
    """A fake agent that records each request and answers `answer`.
    how: "answer" (read, then answer), "refuse" (answer without reading), "drop" (read, then
    close), "hang" (read, then wait `hang` seconds before closing)."""

    def __init__(self, path: str, answer: bytes = b"", how: str = "answer", hang: float = 0):
        self.answer, self.how, self.hang = answer, how, hang
        self.requests: list[bytes] = []
        super().__init__(path, self._behave, timeout=10)

    def _behave(self, conn):
        try:
            if self.how == "refuse":
                conn.sendall(self.answer)
                return
            self.requests.append(read_request(conn))
            if self.how == "answer":
                conn.sendall(self.answer)
            elif self.how == "hang":
                self.done.wait(self.hang)
        except OSError:
            pass


@pytest.fixture
def fake_agent(tmp_path):
    agents = []

    def make(*args, **kw) -> FakeAgent:
        agent = FakeAgent(str(tmp_path / f"agent{len(agents)}.sock"), *args, **kw)
        agents.append(agent)
        return agent

    yield make
    for agent in agents:
        agent.close()


# --- building and installing --------------------------------------------------------------


def test_compiles_without_a_warning_even_pedantic(tmp_path):
    build.build(
        str(tmp_path / "pycni"),
        str(tmp_path / "fallback"),
        static=False,
        limits=LIMITS,
        extra_flags=("-Werror", "-Wpedantic", "-Wshadow", "-Wconversion", "-Wsign-conversion"),
    )
    assert build.marker_of(str(tmp_path / "pycni")).endswith(f" fallback={tmp_path / 'fallback'}")


def has_interpreter(path: str) -> bool:
    """Whether the ELF executable at `path` names a dynamic loader (a PT_INTERP header)."""
    import struct

    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b"\x7fELF" and data[4] == 2, "a 64-bit ELF"
    order = "<" if data[5] == 1 else ">"
    (phoff,) = struct.unpack_from(order + "Q", data, 0x20)
    phentsize, phnum = struct.unpack_from(order + "HH", data, 0x36)
    return any(
        struct.unpack_from(order + "I", data, phoff + i * phentsize)[0] == 3 for i in range(phnum)
    )


def test_the_default_build_is_static_where_libc_allows(tmp_path):
    linkage = build.build(str(tmp_path / "pycni"), limits=LIMITS)
    assert (linkage == "dynamic") == has_interpreter(str(tmp_path / "pycni"))
    static_libc = any(
        os.path.exists(os.path.join(d, "libc.a"))
        for d in (
            "/usr/lib/x86_64-linux-gnu",
            "/usr/lib/aarch64-linux-gnu",
            "/usr/lib",
            "/usr/lib64",
        )
    )
    assert linkage == ("static" if static_libc else "dynamic")


def pycnictl(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYCNICTL, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def without_shebang(text: str) -> str:
    return text.split("\n", 1)[1]


def test_install_native_is_idempotent_and_replaces_only_its_own(tmp_path):
    bin_dir, conf_dir = str(tmp_path / "bin"), str(tmp_path / "net.d")
    target, fallback = os.path.join(bin_dir, "pycni"), os.path.join(bin_dir, FALLBACK_NAME)
    dirs = ("--bin-dir", bin_dir, "--conf-dir", conf_dir)
    first = pycnictl("install", "--native", *dirs)
    assert first.returncode == 0, first.stderr
    assert f"installed {target} (" in first.stdout
    assert f"without an agent it runs the Python launcher {fallback}" in first.stdout
    with open(fallback) as f:  # the in-process launcher (pycnictl's interpreter in its #!)
        assert without_shebang(f.read()) == without_shebang(launchers.launcher_text())
    assert build.marker_of(target) == build.wanted_marker(fallback)
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o755
    assert launchers.is_pycni_launcher(target) and launchers.is_pycni_launcher(fallback)
    before = os.stat(target).st_mtime_ns
    again = pycnictl("install", "--native", *dirs)
    assert again.returncode == 0 and f"{target} is up to date" in again.stdout
    assert os.stat(target).st_mtime_ns == before  # not even rebuilt

    alone = pycnictl("install", "--native", "--standalone", *dirs)
    assert alone.returncode == 0 and build.is_standalone(build.marker_of(target))
    back = pycnictl("install", "--python", *dirs)  # the Python launcher replaces it
    assert back.returncode == 0
    with open(target) as f:
        assert without_shebang(f.read()) == without_shebang(launchers.launcher_text())

    os.unlink(target)
    shutil.copy("/bin/true", target)  # an executable that is not pycni's
    refused = pycnictl("install", "--native", *dirs)
    assert refused.returncode == 1 and "was not written by pycnictl install" in refused.stderr
    assert not launchers.is_pycni_launcher(target)
    forced = pycnictl("install", "--native", "--force", *dirs)
    assert forced.returncode == 0 and launchers.is_pycni_launcher(target)
    assert [n for n in os.listdir(bin_dir) if n.startswith(".pycni-")] == []  # no temporaries


def test_install_native_without_a_compiler_says_what_to_do(tmp_path):
    proc = pycnictl(
        "install",
        "--native",
        "--bin-dir",
        str(tmp_path / "bin"),
        env={"CC": str(tmp_path / "no-such-cc")},
    )
    assert proc.returncode == 1
    assert "install gcc or drop --native" in proc.stderr
    assert not os.path.exists(tmp_path / "bin" / "pycni")


def test_install_native_from_copies_only_a_standalone_native_build(tmp_path, native):
    bin_dir = str(tmp_path / "bin")
    target = os.path.join(bin_dir, "pycni")
    args = ("--standalone", "--bin-dir", bin_dir)
    for bad, said in (
        (native.to_recorder, "copy only a --standalone build"),
        ("/bin/true", "is not a pycni native executable"),
        (native.python_launcher, "is not a pycni native executable"),
    ):
        proc = pycnictl("install", "--native-from", bad, *args)
        assert proc.returncode == 1 and said in proc.stderr, proc.stderr
        assert not os.path.exists(target)
    proc = pycnictl("install", "--native-from", native.standalone, *args)
    assert proc.returncode == 0, proc.stderr
    with open(target, "rb") as a, open(native.standalone, "rb") as b:
        assert a.read() == b.read()
    assert (
        pycnictl("install", "--native-from", native.standalone, *args).stdout
        == f"{target} is up to date\n"
    )
    both = pycnictl("install", "--native", "--native-from", native.standalone, *args)
    assert both.returncode == 1 and "give one of --native" in both.stderr


def test_uninstall_removes_the_native_executable_and_its_fallback_only(tmp_path, native):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shutil.copy(native.to_launcher, bin_dir / "pycni")
    with open(bin_dir / FALLBACK_NAME, "w") as f:
        f.write(launchers.launcher_text())
    args = SimpleNamespace(
        bin_dir=str(bin_dir), conf_dir=str(tmp_path / "net.d"), run_dir=str(tmp_path / "run")
    )
    known = uninstall.Known([], [str(tmp_path / "data")], [], {}, str(tmp_path / "subnet.env"), {})
    report = uninstall.Report()
    uninstall.remove_files(args, known, report)
    assert sorted(report.removed) == sorted([str(bin_dir / "pycni"), str(bin_dir / FALLBACK_NAME)])
    assert os.listdir(bin_dir) == []
    # An ELF that is not pycni's, under both names, stays.
    for name in ("pycni", FALLBACK_NAME):
        shutil.copy("/bin/true", bin_dir / name)
    report = uninstall.Report()
    uninstall.remove_files(args, known, report)
    assert report.removed == [] and sorted(os.listdir(bin_dir)) == sorted(["pycni", FALLBACK_NAME])


# --- the socket, and the answer without an agent ----------------------------------------------


def nested(depth: int) -> bytes:
    """A config whose deepest value nests `depth` containers (the object itself is one)."""
    return (
        b'{"cniVersion": "0.4.0", "agentSocket": "/nowhere/deep.sock", "x": '
        + b"[" * (depth - 1)
        + b"]" * (depth - 1)
        + b"}"
    )


EDGE_CASES = {
    "empty": b"",
    "no-key": b'{"cniVersion": "1.1.0", "name": "n"}',
    "given": b'{"agentSocket": "/nowhere/a.sock", "name": "n"}',
    "standalone": b'{"agentSocket": ""}',
    "null": b'{"agentSocket": null}',
    "number": b'{"agentSocket": 5}',
    "list": b'{"agentSocket": ["/nowhere/a.sock"]}',
    "bad-json": b'{"agentSocket": "/nowhere/a.sock", ',
    "not-an-object": b'["agentSocket"]',
    "nested": b'{"args": {"agentSocket": "/nowhere/nested.sock"}}',
    "in-a-string": b'{"name": "n", "x": "\\"agentSocket\\""}',
    "undecodable": b'\xff\xfe{"agentSocket": "/nowhere/a"}',
    "overlong-utf8": b'{"agentSocket": "/nowhere/\xc0\xaf"}',
    "encoded-surrogate": b'{"agentSocket": "/nowhere/\xed\xa0\x80"}',
    "relative": b'{"agentSocket": "run/a.sock"}',
    "nul": b'{"agentSocket": "/nowhere/a\\u0000b"}',
    "escaped-key": b'{"agent\\u0053ocket": "/nowhere/esc.sock", "agentSocket": 1, '
    b'"agent\\u0053ocket": "/nowhere/last.sock"}',
    "escaped-key-only": b'{"agent\\u0053ocket": "/nowhere/esc.sock"}',
    "duplicate-last-wins": b'{"agentSocket": "/nowhere/1", "agentSocket": "/nowhere/2"}',
    "duplicate-last-not-a-string": b'{"agentSocket": "/nowhere/1", "agentSocket": false}',
    "escapes": b'{"agentSocket": "\\/nowhere\\/a\\tb\\\\c\\"d\\u00e9\\ud83d\\ude00"}',
    "utf8": '{"agentSocket": "/nowhere/é日本😀"}'.encode(),
    "lone-high-surrogate": b'{"agentSocket": "/nowhere/\\ud800x"}',
    "lone-low-surrogate-escape": b'{"agentSocket": "/nowhere/\\udc80\\udcff"}',
    "high-then-not-low": b'{"agentSocket": "/nowhere/\\ud800\\u0041"}',
    "high-then-bad-hex": b'{"agentSocket": "/nowhere/\\ud800\\u00zz"}',
    "bad-escape": b'{"agentSocket": "/nowhere/\\x"}',
    "short-unicode-escape": b'{"agentSocket": "/nowhere/\\u12"}',
    "raw-control-char": b'{"agentSocket": "/nowhere/a\tb"}',
    "raw-control-elsewhere": b'{"agentSocket": "/nowhere/a", "x": "\x01"}',
    "too-long-for-sun-path": b'{"agentSocket": "/nowhere/' + b"a" * 120 + b'"}',
    "sun-path-exactly": b'{"agentSocket": "/nowhere/' + b"a" * 98 + b'"}',
    "python-whitespace-around": (
        ' \x0b\x1c\u2028\u3000{"agentSocket": "/nowhere/ws"}\x85\xa0 '.encode()
    ),
    "json-whitespace-inside": b'{ \t\n\r"agentSocket"\r\n :\t "/nowhere/ws" \n}',
    "vertical-tab-inside": b'{"agentSocket":\x0b"/nowhere/ws"}',
    "bom": b'\xef\xbb\xbf{"agentSocket": "/nowhere/bom"}',
    "trailing-garbage": b'{"agentSocket": "/nowhere/a"} x',
    "trailing-nul": b'{"agentSocket": "/nowhere/a"}\x00',
    "two-objects": b'{"agentSocket": "/nowhere/a"}{}',
    "trailing-comma-object": b'{"agentSocket": "/nowhere/a",}',
    "trailing-comma-array": b'{"agentSocket": "/nowhere/a", "x": [1,]}',
    "empty-containers": b'{"x": {}, "y": [], "agentSocket": "/nowhere/a", "z": [{}, [[]]]}',
    "constants": b'{"a": NaN, "b": Infinity, "c": -Infinity, "d": [true, false, null], '
    b'"agentSocket": "/nowhere/a"}',
    "bad-constants": b'{"a": nan, "agentSocket": "/nowhere/a"}',
    "minus-nan": b'{"a": -NaN, "agentSocket": "/nowhere/a"}',
    "numbers": b'{"a": [0, -0, 1.5, -2e10, 3E+2, 4e-2, 0.0e0, 12345678901234567890], '
    b'"agentSocket": "/nowhere/a"}',
    "leading-zero": b'{"a": 01, "agentSocket": "/nowhere/a"}',
    "dot-without-digits": b'{"a": 1., "agentSocket": "/nowhere/a"}',
    "exponent-without-digits": b'{"a": 1e, "agentSocket": "/nowhere/a"}',
    "plus-sign": b'{"a": +1, "agentSocket": "/nowhere/a"}',
    "int-at-digit-limit": b'{"a": -' + b"1" * LIMITS[1] + b', "agentSocket": "/nowhere/a"}',
    "int-past-digit-limit": b'{"a": ' + b"1" * (LIMITS[1] + 1) + b', "agentSocket": "/n/a"}',
    "float-past-digit-limit": b'{"a": ' + b"1" * (LIMITS[1] + 1) + b'.5, "agentSocket": "/n"}',
    "depth-limit": nested(DEPTH),
    "past-depth-limit": nested(DEPTH + 1),
    "far-past-depth-limit": nested(DEPTH + 50),
    "deep-and-broken": nested(DEPTH + 1)[:-5],
    "unclosed-deep": b'{"agentSocket": "/nowhere/a", "x": ' + b"[" * 5000,
    "version-unsupported": b'{"cniVersion": "9.9.9", "agentSocket": "/nowhere/a"}',
    "version-not-a-string": b'{"cniVersion": 1, "agentSocket": "/nowhere/a"}',
    "version-escaped": b'{"cniVersion": "0.3\\u002e1", "agentSocket": "/nowhere/a"}',
    "version-nested": b'{"x": {"cniVersion": "0.3.1"}, "agentSocket": "/nowhere/a"}',
    "version-duplicate": b'{"cniVersion": "0.3.1", "cniVersion": "0.2.0"}',
    "huge": b'{"agentSocket": "/nowhere/a", "pad": "' + b"a" * MAX_CONFIG_BYTES + b'"}',
    "huge-valid": b'{"cniVersion": "0.4.0", "pad": "' + b"a" * (MAX_CONFIG_BYTES - 38) + b'"}',
    "binary": bytes(range(256)),
}


# Not "depth-limit": under pytest the shim decodes with far more Python frames on the stack
# than in a launcher, so its limit is lower here (the real launcher is compared below).
IN_PROCESS_CASES = {k: v for k, v in EDGE_CASES.items() if k != "depth-limit"}


@pytest.mark.parametrize("data", IN_PROCESS_CASES.values(), ids=IN_PROCESS_CASES.keys())
def test_without_an_agent_it_answers_as_the_standalone_launcher(native, default_socket, data):
    """Byte for byte what the standalone launcher prints, computed with the shim's own
    socket_path() and try_again() (so the socket and version it chose are the shim's)."""
    proc = native_run(native.standalone, data)
    assert proc.returncode == 1
    assert proc.stdout == standalone_answer(data[: MAX_CONFIG_BYTES + 1])


@pytest.mark.parametrize(
    "name",
    [
        "given",
        "standalone",
        "escapes",
        "lone-high-surrogate",
        "too-long-for-sun-path",
        "python-whitespace-around",
        "int-past-digit-limit",
        "depth-limit",
        "past-depth-limit",
        "version-unsupported",
        "binary",
        "empty",
        "huge",
    ],
)
def test_without_an_agent_it_equals_the_real_standalone_launcher(native, name):
    """The same, against the standalone Python launcher exec'd as runtimes exec it: the
    hint's wording, and the interpreter's own limits (nesting depth, integer digits)."""
    data = EDGE_CASES[name]
    ours = native_run(native.standalone, data)
    theirs = run(native.python_standalone, data)
    assert theirs.stderr == b""
    assert (ours.returncode, ours.stdout) == (theirs.returncode, theirs.stdout)


# Random configs: JSON objects of any shape, serialised in several ways, sometimes broken.
SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text()
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
SOCKET_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40).filter(
    lambda t: ".." not in t
)


@st.composite
def socket_values(draw, root: str):
    kind = draw(st.sampled_from(["under-root", "relative", "empty", "other", "absent"]))
    if kind == "under-root":  # absolute, and nothing listens there
        return root + "/" + draw(SOCKET_TEXT)
    if kind == "relative":
        return draw(SOCKET_TEXT)
    if kind == "empty":
        return ""
    if kind == "other":
        return draw(VALUES)
    return None


@st.composite
def configs(draw, root: str) -> bytes:
    obj = draw(st.dictionaries(st.text(max_size=12), VALUES, max_size=5))
    pairs = list(obj.items())
    for key, value in (
        ("agentSocket", draw(socket_values(root))),
        ("cniVersion", draw(st.sampled_from([*versions.SUPPORTED, "2.0.0", 1]))),
    ):
        if value is not None:
            pairs.insert(draw(st.integers(0, len(pairs))), (key, value))
    if pairs and draw(st.booleans()):  # a duplicate key: the last one counts
        pairs.append((draw(st.sampled_from([k for k, _ in pairs])), draw(VALUES)))
    ascii_only = draw(st.booleans())
    separators = draw(st.sampled_from([(", ", ": "), (",", ":"), (" ,\n", " :\t")]))
    body = (
        "{"
        + separators[0].join(
            json.dumps(k, ensure_ascii=ascii_only)
            + separators[1]
            + json.dumps(v, ensure_ascii=ascii_only)
            for k, v in pairs
        )
        + "}"
    )
    space = st.text(st.sampled_from(" \t\n\r\x0b\x0c\x1c\x85\xa0\u2028\u3000"), max_size=3)
    data = (draw(space) + body + draw(space)).encode()
    mutation = draw(st.sampled_from(["none"] * 6 + ["cut", "byte", "insert"]))
    if mutation == "cut" and data:
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif mutation in ("byte", "insert") and data:
        at = draw(st.integers(0, len(data) - 1))
        byte = bytes([draw(st.integers(0, 255))])
        data = data[:at] + byte + data[at + (mutation == "byte") :]
    return data


@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_random_configs_pick_the_shims_socket_and_version(native, default_socket, data):
    stdin = data.draw(configs(os.path.join(native.root, "nowhere")))
    proc = native_run(native.standalone, stdin)
    assert proc.returncode == 1
    assert proc.stdout == standalone_answer(stdin)


# --- through an agent: the request, and the reply --------------------------------------------


FORWARD_ENV = {
    **BASE_ENV,
    "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAME=é",
    "DEBUG": "1",
    "DEBUGGER": "yes",
    "PYCNI_FAIL_AFTER": "ipam",
    "PYCNI_": "",
    "CNI_EMPTY": "",
    "CNIX": "not forwarded",
    "HOME": "/root",
    "pycni_lower": "not forwarded",
    "CNI_NL": "a\nb",
}

REPLIES = {
    "result": b'0\n{"cniVersion": "1.0.0", "ips": []}\n',
    "error": b'1\n{"cniVersion": "1.0.0", "code": 7, "msg": "bad"}\n',
    "empty-output": b"0\n",
    "status-7": b"7\nseven",
    "status-300": b"300\nwraps",
    "status-2-to-the-32-plus-256": b"4294967552\nx",
    "status-past-a-long": b"99999999999999999999\nx",
    "leading-zeros": b"007\nx",
    "big-output": b"0\n" + b"x" * (1 << 20),
    "binary-output": b"0\n" + bytes(range(256)) * 4,
    "nothing": b"",
    "no-newline": b"0",
    "garbage": b"hello\n{}",
    "negative": b"-1\n{}",
    "space": b" 0\n{}",
    "plus": b"+0\n{}",
    "non-ascii-digits": "٣\n{}".encode(),
    "status-past-int-digits": b"1" * (LIMITS[1] + 1) + b"\n{}",
}


@pytest.mark.parametrize("reply", REPLIES.values(), ids=REPLIES.keys())
def test_request_and_answer_equal_the_python_launchers(native, fake_agent, reply):
    agent = fake_agent(reply)
    stdin = config(agent.path, pad="é" * 100)
    ours = native_run(native.standalone, stdin, env=FORWARD_ENV)
    theirs = run(native.python_launcher, stdin, env=FORWARD_ENV)
    assert len(agent.requests) == 2
    assert agent.requests[0] == agent.requests[1]  # the same bytes on the wire
    assert (ours.returncode, ours.stdout) == (theirs.returncode, theirs.stdout)


def test_the_request_is_what_the_agent_reads(native, fake_agent):
    agent = fake_agent(b"0\n")
    stdin = config(agent.path)
    native_run(native.standalone, stdin, env=FORWARD_ENV)
    left, right = socket.socketpair()
    with left, right:
        left.sendall(agent.requests[0])
        left.shutdown(socket.SHUT_WR)
        call = protocol.read_call(right)
    assert call.op == "CNI" and call.stdin == stdin
    assert call.environ == {
        k: v for k, v in FORWARD_ENV.items() if k.startswith(("CNI_", "DEBUG", "PYCNI_"))
    }


@pytest.mark.parametrize("size", [10, 1 << 20], ids=["small", "bigger-than-the-buffer"])
def test_an_answer_given_without_reading_the_request_passes(native, fake_agent, size):
    refusal = b'1\n{"cniVersion": "1.1.0", "code": 106, "msg": "root only"}\n'
    agent = fake_agent(refusal, how="refuse")
    stdin = config(agent.path, pad="a" * size)
    ours = native_run(native.standalone, stdin)
    theirs = run(native.python_launcher, stdin)
    assert (ours.returncode, ours.stdout) == (theirs.returncode, theirs.stdout) == (1, refusal[2:])


@pytest.mark.parametrize("version", ["0.4.0", "9.9.9"])
def test_an_agent_gone_midway_is_try_again(native, fake_agent, version):
    agent = fake_agent(how="drop")
    stdin = config(agent.path, cniVersion=version)
    ours = native_run(native.standalone, stdin)
    theirs = run(native.python_launcher, stdin)
    assert (ours.returncode, ours.stdout) == (theirs.returncode, theirs.stdout)
    err = json.loads(ours.stdout)
    assert err["code"] == 11 and agent.path in err["msg"]
    assert err["cniVersion"] == (version if version in versions.SUPPORTED else versions.LATEST)


def test_at_the_depth_limit_a_lost_agent_answers_in_the_latest_version(native, fake_agent):
    """shim.try_again() decodes the config one Python frame deeper when called from
    call_agent(): a config exactly at the depth limit reaches the agent, but its version is
    no longer read for the error. The native executable mirrors that too."""
    agent = fake_agent(how="drop")
    stdin = nested(DEPTH).replace(b"/nowhere/deep.sock", agent.path.encode())
    ours = native_run(native.standalone, stdin)
    theirs = run(native.python_launcher, stdin)
    assert (ours.returncode, ours.stdout) == (theirs.returncode, theirs.stdout)
    assert len(agent.requests) == 2
    assert json.loads(ours.stdout)["cniVersion"] == versions.LATEST


def test_an_agent_that_never_answers_times_out(native, fake_agent, monkeypatch):
    agent = fake_agent(how="hang", hang=3)
    stdin = config(agent.path, cniVersion="0.3.1")
    started = time.monotonic()
    ours = native_run(native.short_timeout, stdin)
    assert time.monotonic() - started < 2.5
    monkeypatch.setattr(shim, "TIMEOUT", 0.3)
    assert (ours.returncode, ours.stdout) == shim.call_agent(agent.path, stdin)
    assert b"timed out; try again" in ours.stdout


@pytest.fixture
def hung_agent(tmp_path):
    """A listener that never accepts, its backlog full (listen(0) holds one queued caller): a
    connect() to it waits for room, as it does to an agent that is hung or swamped."""
    path = str(tmp_path / "hung.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    queued = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with listener, queued:
        listener.bind(path)
        listener.listen(0)
        queued.connect(path)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with probe:  # the backlog is really full: a non-blocking connect finds no room
            probe.setblocking(False)
            with pytest.raises(BlockingIOError):
                probe.connect(path)
        yield path


@pytest.mark.parametrize("build_name", ["short_timeout", "short_to_recorder"])
def test_a_hung_agent_is_try_again_never_a_wait_nor_the_fallback(
    native, hung_agent, monkeypatch, tmp_path, build_name
):
    """A connect that finds no room for the connect timeout answers CNI error 11 (kubelet
    retries), also where the build falls back without an agent: the hung agent may resume."""
    stdin = config(hung_agent, cniVersion="0.4.0")
    env = {**BASE_ENV, "RECORD_TO": str(tmp_path / "rec")}
    ours = native_run(getattr(native, build_name), stdin, env=env, timeout=30)
    assert not os.path.exists(tmp_path / "rec.stdin")  # the fallback never ran
    monkeypatch.setattr(shim, "CONNECT_TIMEOUT", 0.3)
    assert (ours.returncode, ours.stdout) == shim.call_agent(hung_agent, stdin)
    err = json.loads(ours.stdout)
    assert ours.returncode == 1 and err["code"] == 11 and err["cniVersion"] == "0.4.0"
    assert err["msg"] == f"{shim.hung_message(hung_agent)}; try again"
    assert "within 0.3 s" in err["msg"]


@pytest.mark.parametrize("launcher", ["python_launcher", "python_standalone"])
def test_the_python_launchers_time_out_on_a_hung_agent(native, hung_agent, launcher):
    """As installed (the real CONNECT_TIMEOUT): error 11 after it, not a wait for ever."""
    stdin = config(hung_agent)
    proc = run(getattr(native, launcher), stdin, timeout=shim.CONNECT_TIMEOUT + 25)
    assert proc.returncode == 1
    assert json.loads(proc.stdout) == {
        "cniVersion": "1.0.0",
        "code": 11,
        "msg": f"{shim.hung_message(hung_agent)}; try again",
    }


def test_a_socket_of_another_user_is_not_an_agent(native, tmp_path):
    """A listener of another uid (a squatted path) is ignored, as shim.peer_uid() has it."""
    if os.geteuid() != 0:
        pytest.skip("needs root to listen as another user")
    path = str(tmp_path / "squatted.sock")
    squatter = subprocess.Popen(
        [
            sys.executable,
            "-c",
            """
import os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(sys.argv[1])
os.setresgid(65534, 65534, 65534)
os.setresuid(65534, 65534, 65534)
s.listen(8)  # the peer credentials are the listener's at listen()
print("ready", flush=True)
while True:
    conn, _ = s.accept()
    conn.sendall(b'0\\n{"squatter": true}')
    conn.close()
""",
            path,
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert squatter.stdout.readline() == b"ready\n"
        stdin = config(path)
        ours = native_run(native.standalone, stdin)
        theirs = run(native.python_standalone, stdin)
        assert (ours.returncode, ours.stdout) == (theirs.returncode, theirs.stdout)
        assert f"no pycni agent is listening at {path}".encode() in ours.stdout
    finally:
        squatter.kill()
        squatter.wait()


# --- without an agent: the fallback launcher ---------------------------------------------------


def recorded(base: str) -> tuple[list[bytes], bytes, dict[bytes, bytes]]:
    def read(suffix: str) -> bytes:
        with open(base + suffix, "rb") as f:
            return f.read()

    argv = read(".argv").split(b"\0")[:-1]
    env = dict(e.split(b"=", 1) for e in read(".env").split(b"\0")[:-1])
    return argv, read(".stdin"), env


def no_agent_paths(tmp_path) -> dict[str, str | None]:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "stale.sock"))
    stale.close()  # the file stays, nobody listens
    (tmp_path / "file.sock").write_text("")
    return {
        "absent": str(tmp_path / "absent.sock"),
        "stale": str(tmp_path / "stale.sock"),
        "not-a-socket": str(tmp_path / "file.sock"),
        "empty": "",
        "unencodable": str(tmp_path) + "/\ud800",
        "too-long": "/" + "a" * 200,
        "default": None,
    }


@pytest.mark.parametrize(
    "case", ["absent", "stale", "not-a-socket", "empty", "unencodable", "too-long", "default"]
)
def test_without_an_agent_it_execs_the_fallback_with_the_same_stdin(native, tmp_path, case):
    sock = no_agent_paths(tmp_path)[case]
    stdin = config(sock, pad="\0é" * 1000) if sock is not None else config(pad="x")
    record = str(tmp_path / "rec")
    env = {**FORWARD_ENV, "RECORD_TO": record}
    proc = native_run(native.to_recorder, stdin, env=env, argv0="/opt/cni/bin/pycni")
    assert (proc.returncode, proc.stdout) == (3, b'{"recorded": true}\n')
    argv, got_stdin, got_env = recorded(record)
    assert argv == [b"/opt/cni/bin/pycni"]  # argv[0] kept
    assert got_stdin == stdin
    assert got_env == {k.encode(): v.encode() for k, v in env.items()}


@pytest.mark.parametrize(
    "size",
    [1 << 20, MAX_CONFIG_BYTES + 1, MAX_CONFIG_BYTES + 100],
    ids=["1MiB", "limit-plus-one", "past-the-limit"],
)
def test_the_fallback_gets_big_stdin_as_the_shim_reads_it(native, tmp_path, size):
    """Up to one byte past the limit, as shim.main() reads it (the core then reports the
    config as too large)."""
    head = b'{"agentSocket": "", "pad": "'
    stdin = head + bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    record = str(tmp_path / "rec")
    proc = native_run(native.to_recorder, stdin[:size], env={**BASE_ENV, "RECORD_TO": record})
    assert proc.returncode == 3
    assert recorded(record)[1] == stdin[: min(size, MAX_CONFIG_BYTES + 1)]


@pytest.mark.parametrize(
    "command, stdin",
    [
        ("VERSION", b'{"cniVersion": "0.4.0", "agentSocket": ""}'),
        (
            "ADD",
            b'{"cniVersion": "0.4.0", "agentSocket": "", "name": "n", "type": "pycni", '
            b'"subnet": "not a subnet"}',
        ),
        ("ADD", b"not json"),
    ],
    ids=["version", "bad-config", "garbage"],
)
def test_the_fallback_runs_the_plugin_as_the_python_launcher_does(native, command, stdin):
    env = {**BASE_ENV, "CNI_COMMAND": command}
    ours = run(native.to_launcher, stdin, env=env)
    theirs = run(native.python_launcher, stdin, env=env)
    assert (ours.returncode, ours.stdout) == (theirs.returncode, theirs.stdout)
    out = json.loads(ours.stdout)
    assert ("supportedVersions" in out) if command == "VERSION" else out["code"] in (6, 7)


def test_a_missing_fallback_is_try_again_naming_it(tmp_path):
    missing = str(tmp_path / "gone" / FALLBACK_NAME)
    exe = str(tmp_path / "pycni")
    build.build(
        exe,
        missing,
        sanitize=SANITIZE,
        limits=LIMITS,
        overrides={"PYCNI_DEFAULT_SOCKET": build.c_string(str(tmp_path / "d.sock"))},
    )
    proc = native_run(exe, b'{"cniVersion": "0.4.0", "agentSocket": ""}')
    assert proc.returncode == 1
    err = json.loads(proc.stdout)
    assert err["code"] == 11 and err["cniVersion"] == "0.4.0"
    assert missing in err["msg"] and "No such file or directory" in err["msg"]
