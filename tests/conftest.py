"""Shared fixtures: uniquely named network namespaces that are removed whatever happens, and a
sandboxed "node" (its own netns, data dir and log) that execs the installed plugin exactly as a
runtime would, so tests never touch the machine's cni0 or /etc/cni."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from pycni.cluster.etcd_server import ETCD, EtcdServer
from pycni.cluster.kv import KV

RUN_ID = f"{os.getpid() % 100000:05d}"
# What an in-process plugin needs in its environment to honour the fault-injection variables
# (PYCNI_FAIL_AFTER, ...); a test's agent is started with --test-faults (AgentProcess).
TEST_FAULTS = {"PYCNI_TEST_FAULTS": "1"}
_counter = itertools.count()


def unique(tag: str) -> str:
    """A name unique to this test run (netns names may exceed the 15 bytes of an interface
    name; cutting them would make two names collide once the counter grows)."""
    return f"pt{RUN_ID}{tag}{next(_counter)}"


def is_root() -> bool:
    return os.geteuid() == 0


def pytest_addoption(parser):
    parser.addoption(
        "--phase",
        choices=("parallel", "serial"),
        help="one of ./dev test's two phases: 'parallel' leaves out the tests marked serial "
        "(run on xdist workers), 'serial' runs only them (alone)",
    )


# First, so that `-m serial` (applied by pytest's own hook) sees the marks added here.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        # The Kubernetes lab (tests/kube, tests/runtimes/test_kube_build.py): module-scoped
        # clusters and images, fixed lab prefixes, minutes of the whole machine's CPU.
        if item.get_closest_marker("kube") is not None:
            item.add_marker(pytest.mark.serial)
    phase = config.getoption("phase")
    if phase is not None:
        wanted = phase == "serial"
        kept, dropped = [], []
        for item in items:
            (kept if (item.get_closest_marker("serial") is not None) == wanted else dropped).append(
                item
            )
        if dropped:
            config.hook.pytest_deselected(items=dropped)
            items[:] = kept
    if is_root():
        return
    skip = pytest.mark.skip(reason="needs root for network namespaces")
    for item in items:
        if "netns" in item.keywords:
            item.add_marker(skip)


def sh(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=check, capture_output=True, text=True, **kw)


class Namespaces:
    def __init__(self) -> None:
        self.names: list[str] = []

    def make(self, tag: str = "n") -> str:
        name = unique(tag)
        sh("ip", "netns", "add", name)
        self.names.append(name)
        return name

    def exec(self, ns: str, *args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        return sh("ip", "netns", "exec", ns, *args, check=check, **kw)

    def remove(self, name: str) -> None:
        sh("ip", "netns", "del", name, check=False)

    def cleanup(self) -> None:
        for name in reversed(self.names):
            # Kill anything a test left running inside (servers), then drop the namespace.
            pids = sh("ip", "netns", "pids", name, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            self.remove(name)


@pytest.fixture
def netns():
    spaces = Namespaces()
    try:
        yield spaces
    finally:
        spaces.cleanup()


@pytest.fixture(scope="session")
def plugin_bin(tmp_path_factory) -> str:
    """The plugin as `pycnictl install` writes it, in a private bin dir."""
    from pycni.install.launchers import write_launcher

    src = os.path.join(os.path.dirname(__file__), "..", "src")
    subprocess.run([sys.executable, "-m", "compileall", "-q", src], check=True, capture_output=True)
    bindir = tmp_path_factory.mktemp("bin")
    return write_launcher(str(bindir / "pycni"))


@dataclass
class Reply:
    rc: int
    out: dict | None
    stdout: str
    stderr: str

    @property
    def code(self) -> int | None:
        return self.out.get("code") if isinstance(self.out, dict) else None


@dataclass
class Node:
    """A sandboxed node: the plugin runs inside `ns`, with state under `root`."""

    ns: str
    root: str
    plugin: str
    spaces: Namespaces
    bridge: str
    name: str = "testnet"
    subnet: str = "10.244.1.0/24"
    base: dict = field(default_factory=dict)

    def conf(self, **overrides) -> dict:
        conf = {
            "cniVersion": "1.1.0",
            "name": self.name,
            "type": "pycni",
            "bridge": self.bridge,
            "network": "10.244.0.0/16",
            "subnet": self.subnet,
            "dataDir": os.path.join(self.root, "data"),
            "logFile": os.path.join(self.root, "pycni.log"),
        }
        conf.update(self.base)
        for key, value in overrides.items():
            if value is None:
                conf.pop(key, None)
            else:
                conf[key] = value
        return conf

    def run(
        self,
        command: str,
        conf: dict | bytes | str | None = None,
        *,
        container_id: str | None = "",
        ifname: str | None = "eth0",
        netns: str | None = "",
        env: dict | None = None,
        timeout: float = 60,
    ) -> Reply:
        environ = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "CNI_COMMAND": command,
            "CNI_PATH": os.path.dirname(self.plugin),
        }
        for key, value in (
            ("CNI_CONTAINERID", container_id),
            ("CNI_IFNAME", ifname),
            ("CNI_NETNS", netns),
        ):
            if value is not None:
                environ[key] = value
        environ.update(env or {})
        if conf is None:
            conf = self.conf()
        data = (
            conf
            if isinstance(conf, bytes)
            else (conf.encode() if isinstance(conf, str) else json.dumps(conf).encode())
        )
        return self.exec_plugin(environ, data, timeout)

    def exec_plugin(self, environ: dict, data: bytes, timeout: float = 60) -> Reply:
        """Exec the installed plugin in the node with exactly this environment."""
        proc = subprocess.run(
            ["ip", "netns", "exec", self.ns, self.plugin],
            input=data,
            env=environ,
            capture_output=True,
            timeout=timeout,
        )
        stdout = proc.stdout.decode()
        try:
            out = json.loads(stdout) if stdout.strip() else None
        except ValueError:
            out = None
        return Reply(proc.returncode, out, stdout, proc.stderr.decode())

    def pod(self, tag: str = "p") -> str:
        """A new pod network namespace; returns its path for CNI_NETNS."""
        return "/run/netns/" + self.spaces.make(tag)

    def add(self, netns_path: str, container_id: str, conf: dict | None = None, **kw) -> dict:
        reply = self.run("ADD", conf, container_id=container_id, netns=netns_path, **kw)
        assert reply.rc == 0, reply
        return reply.out

    def exec(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.spaces.exec(self.ns, *args, check=check)

    def links(self) -> list[str]:
        out = self.exec("ip", "-o", "link", "show").stdout
        return [line.split(": ")[1].split("@")[0] for line in out.splitlines()]

    def log(self) -> str:
        """What the core logged, whether it ran in-process or in an agent."""
        text = ""
        for name in ("pycni.log", "agent.log"):
            path = os.path.join(self.root, name)
            if os.path.exists(path):
                text += open(path).read()
        return text


def pytest_generate_tests(metafunc):
    """Modules with `BOTH_MODES = True` run every node test twice: the plugin working
    in-process, and the same plugin forwarding to a node agent."""
    if "node" in metafunc.fixturenames and getattr(metafunc.module, "BOTH_MODES", False):
        metafunc.parametrize("node", ["standalone", "agent"], indirect=True)


@pytest.fixture
def node(request, netns, plugin_bin, tmp_path):
    ns = netns.make("node")
    netns.exec(ns, "ip", "link", "set", "lo", "up")
    n = Node(ns=ns, root=str(tmp_path), plugin=plugin_bin, spaces=netns, bridge="cni0")
    if getattr(request, "param", "standalone") != "agent":
        yield n
        return
    with agent_for(n):
        yield n


def pod_name(netns_path: str) -> str:
    return os.path.basename(netns_path)


@pytest.fixture(scope="session")
def reference_plugins() -> str:
    path = "/usr/lib/cni"
    if not os.path.exists(os.path.join(path, "bridge")):
        pytest.skip("Go reference plugins (containernetworking-plugins) are not installed")
    return path


def peer_params(kind: str) -> list:
    """pytest params for every version of a peer: "containerd" (Debian's 1.6, the pinned 2.x)
    or "plugins" (Debian's reference plugins 1.1.1, the pinned newest). A pinned one not built
    is a skip, or a failure under ./dev test (PYCNI_REQUIRE_PEERS=1), which builds them."""
    from pycni.harness import peers

    def missing(label: str, why: str):
        if peers.required():
            pytest.fail(f"{why} (PYCNI_REQUIRE_PEERS=1)", pytrace=False)
        return pytest.param(None, id=label, marks=pytest.mark.skip(reason=why))

    if kind == "containerd":
        debian = peers.debian_containerd()
        params = [
            pytest.param(debian, id="containerd1.6")
            if debian
            else missing(
                "containerd1.6", "containerd 1.6 is not installed (Debian containerd, runc)"
            )
        ]
        try:
            pinned = peers.pinned_containerd()
            params.append(pytest.param(pinned, id=f"containerd{pinned.label}"))
        except peers.MissingPeer as exc:
            params.append(missing("containerd" + peers.pins()["containerd"].version, str(exc)))
        return params
    dirs = peers.plugin_dirs()
    params = [pytest.param(d, id=f"plugins{v}") for v, d in dirs.items()]
    pin = peers.pins()["cni-plugins"]
    if pin.version.removeprefix("v") not in dirs:
        params.append(
            missing(
                f"plugins{pin.version}",
                f"reference plugins {pin.version} are not built: run ./dev peers",
            )
        )
    return params


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


class AgentProcess:
    """`pycnictl agent` running inside a node's netns, with private socket, log and data dir."""

    def __init__(self, node: Node, metrics_port: int = 0, test_faults: bool = True):
        self.node = node
        # A test's agent honours the fault-injection variables (`--test-faults`) unless told
        # not to, as the in-process plugin does with TEST_FAULTS in its environment.
        self.test_faults = test_faults
        self.socket = os.path.join(node.root, "agent", "agent.sock")
        self.log_file = os.path.join(node.root, "agent.log")
        self.metrics_port = metrics_port
        self.proc: subprocess.Popen | None = None

    def start(self, wait: float = 15.0) -> AgentProcess:
        from pycni.agent.launch import agent_argv, wait_until_listening

        argv = agent_argv(
            self.socket,
            os.path.join(self.node.root, "data"),
            self.log_file,
            self.metrics_port,
            test_faults=self.test_faults,
        )
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.node.ns, *argv],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            wait_until_listening(self.proc, self.socket, wait)
        except RuntimeError as exc:
            stderr = self.proc.stderr.read().decode() if self.proc.poll() is not None else ""
            raise RuntimeError(f"{exc}: {stderr}") from None
        return self

    def signal(self, sig: int) -> None:
        # `ip netns exec` execs the agent, so the Popen pid is the agent itself.
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def stop(self, timeout: float = 30.0) -> int | None:
        import signal

        if self.proc is None:
            return None
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def log(self) -> str:
        return open(self.log_file).read() if os.path.exists(self.log_file) else ""


@contextlib.contextmanager
def agent_for(node: Node):
    """A running agent for `node`; the node's configs point the plugin at its socket."""
    proc = AgentProcess(node).start()
    node.base["agentSocket"] = proc.socket
    try:
        yield proc
    finally:
        proc.kill()


@pytest.fixture
def agent(node):
    with agent_for(node) as proc:
        yield proc


# --- the cluster's datastores (tests/cluster): one etcd server for the session, and factories
# that make clients of one shared store, so each KV contract test runs on SQLite and on etcd.
# (Here and not in tests/cluster/conftest.py: two conftest modules would shadow each other for
# the tests that import from `conftest`.)


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory) -> Iterator[EtcdServer]:
    if not os.path.exists(ETCD):
        pytest.skip(f"{ETCD} is not installed (Debian package etcd-server)")
    server = EtcdServer(str(tmp_path_factory.mktemp("etcd") / "data"))
    try:
        server.start()
        yield server
    finally:
        server.remove_data()


class KVFactory:
    """Makes clients of one store; every key a test uses starts with ``prefix``."""

    def __init__(self, kind: str, make: Callable[[float], KV], short_ttl: float) -> None:
        self.kind = kind
        self.prefix = f"/test/{uuid.uuid4().hex[:12]}/"
        self.short_ttl = short_ttl  # the shortest TTL the store honours exactly
        self._make = make
        self.clients: list[KV] = []

    def __call__(self, ttl: float = 60.0) -> KV:
        kv = self._make(ttl)
        self.clients.append(kv)
        return kv

    def close(self) -> None:
        for kv in self.clients:
            kv.close()


@pytest.fixture(params=["sqlite", "etcd"])
def kv_factory(request, tmp_path) -> Iterator[KVFactory]:
    if request.param == "sqlite":
        from pycni.cluster.sqlite import SqliteKV

        path = str(tmp_path / "db" / "cluster.db")
        factory = KVFactory("sqlite", lambda ttl: SqliteKV(path, ttl), short_ttl=1.0)
    else:
        from pycni.cluster.etcd import EtcdKV

        server = request.getfixturevalue("etcd_server")
        # etcd rounds lease TTLs up to whole seconds and to its minimum, 2 s by default.
        factory = KVFactory("etcd", lambda ttl: EtcdKV(server.client_url, ttl), short_ttl=2.0)
    try:
        yield factory
    finally:
        if factory.kind == "etcd":
            from etcd3gw.client import Etcd3Client

            from pycni.cluster.etcd import parse_endpoints

            _, host, port = parse_endpoints(server.client_url)[0]
            client = Etcd3Client(host=host, port=port, api_path="/v3/", timeout=5)
            client.delete_prefix(factory.prefix)
            client.session.close()
        factory.close()


# --- which source address a TCP connection arrives from (masquerade or not) ------------------

_SOURCE_SERVER = """
import socket, sys
host = sys.argv[1]
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, 0))
s.listen(1)
s.settimeout(15)
print(s.getsockname()[1], flush=True)
c, addr = s.accept()
print(addr[0], flush=True)
c.close()
"""

_CONNECT = """
import socket, sys
socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()
"""


def source_seen(server_ns: str, client_ns: str, dst: str, timeout: float = 10.0) -> str | None:
    """Connect from client_ns to dst (an address in server_ns): the source address the server
    saw, or None when no connection could be made."""
    server = subprocess.Popen(
        ["ip", "netns", "exec", server_ns, sys.executable, "-c", _SOURCE_SERVER, dst],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        port = server.stdout.readline().strip()
        assert port, server.stderr.read()
        client = sh(
            "ip",
            "netns",
            "exec",
            client_ns,
            sys.executable,
            "-c",
            _CONNECT,
            dst,
            port,
            str(timeout),
            check=False,
        )
        if client.returncode != 0:
            return None
        peer = server.stdout.readline().strip()
        assert peer, server.stderr.read()
        return peer
    finally:
        if server.poll() is None:
            server.kill()
        server.wait(timeout=10)
        server.stdout.close()
        server.stderr.close()


# --- benchmark commands run end to end, and what they may leave behind -------------------------


def run_bench(*args: str, timeout: float = 300) -> tuple[int, int, str, str]:
    """`pycnictl bench ARGS` as a child process: (its pid, exit status, stdout, stderr). The
    pid is what the benchmark names its namespaces and temp dirs after."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "from pycni.ctl.main import main; main()", "bench", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
    return proc.pid, proc.returncode, stdout, stderr


def namespaces_named(prefix: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(prefix)]


# --- datastore clients racing ---------------------------------------------------------------


def register_racing(stores: list, records: list) -> dict:
    """stores[i].register(records[i]), all at once from threads released together; returns
    {name: registered record} and fails the test if any register raised."""
    import threading

    got: dict = {}
    errors: list[Exception] = []
    barrier = threading.Barrier(len(stores))

    def claim(store, record) -> None:
        barrier.wait()
        try:
            got[record.name] = store.register(record)
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [
        threading.Thread(target=claim, args=pair) for pair in zip(stores, records, strict=True)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return got


# --- pycni's invariant, checked from inside a node (tests/netns/test_fault_*.py) ----------------

_DOCTOR_LOOP = """
import json, sys
from pycni.doctor import DoctorError, check
for line in sys.stdin:
    req = json.loads(line)
    live = None if req["live"] is None else {tuple(p) for p in req["live"]}
    try:
        out = {"findings": [str(f) for f in check(req["dir"], live)]}
    except DoctorError as exc:
        out = {"error": str(exc)}
    print(json.dumps(out), flush=True)
"""


class DoctorProcess:
    """pycni.doctor.check in a node's namespace (it checks the one it runs in), kept running so
    that a check costs a snapshot, not a Python start-up. Use as a context manager."""

    def __init__(self, node: Node) -> None:
        self.data_dir = os.path.join(node.root, "data")
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", node.ns, sys.executable, "-c", _DOCTOR_LOOP],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def check(self, live: set[tuple[str, str]] | None) -> list[str]:
        """The findings as text (`live`: the runtime's live attachments, None to leave the
        runtime out); fails the test when the doctor cannot check."""
        req = {"dir": self.data_dir, "live": None if live is None else sorted(live)}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the doctor process died"
        answer = json.loads(line)
        assert "error" not in answer, answer["error"]
        return answer["findings"]

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()

    def __enter__(self) -> DoctorProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class UnixServer:
    """A unix-socket server on a thread (a fake or broken agent): `behave(conn)` handles each
    connection, whose timeout is `timeout`; `accepted` counts them."""

    def __init__(self, path: str, behave, timeout: float = 5.0):
        self.path = path
        self.behave = behave
        self.timeout = timeout
        self.accepted = 0
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(64)
        self.sock.settimeout(0.1)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        while not self.done.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:  # TimeoutError included: look at `done` again
                continue
            self.accepted += 1
            with conn:
                conn.settimeout(self.timeout)
                try:
                    self.behave(conn)
                except OSError:  # the client went away: the next connection still gets served
                    pass

    def close(self):
        self.done.set()
        self.thread.join(self.timeout)
        self.sock.close()


def tear_down_labs(made: list[tuple[str, str]]) -> None:
    """Tear down the labs a test made, as (prefix, state dir), and assert none left anything."""
    from pycni.lab import lifecycle

    for prefix, state in made:
        problems = lifecycle.teardown(prefix, state)
        shutil.rmtree(state, ignore_errors=True)
        leftovers = [n for n in sh("ip", "netns", "list").stdout.split() if n.startswith(prefix)]
        for name in leftovers:
            sh("ip", "netns", "del", name, check=False)
        assert not problems and not leftovers, (problems, leftovers)


# --- an echo server in a pod (hostPorts, Services) -----------------------------------------

# Echo server in a pod: answers "<tag> <peer address>" on TCP and UDP, on every address.
_ECHO_SERVER = """
import socket, sys, threading
tag, tport, uport = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def sock(kind):
    s = socket.socket(socket.AF_INET6, kind)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::", tport if kind == socket.SOCK_STREAM else uport))
    return s
t, u = sock(socket.SOCK_STREAM), sock(socket.SOCK_DGRAM)
t.listen(16)
def peer(addr):
    return addr[0].removeprefix("::ffff:")
def udp():
    while True:
        data, addr = u.recvfrom(100)
        u.sendto(f"{tag} {peer(addr)}".encode(), addr)
threading.Thread(target=udp, daemon=True).start()
print("ready", flush=True)
while True:
    c, addr = t.accept()
    c.sendall(f"{tag} {peer(addr)}".encode())
    c.close()
"""

# One request: prints the answer, or exits 1.
_ECHO_CLIENT = """
import socket, sys
proto, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
try:
    if proto == "tcp":
        s = socket.create_connection((host, port), timeout=2)
        print(s.recv(100).decode())
    else:
        s = socket.socket(family, socket.SOCK_DGRAM)
        s.settimeout(2)
        s.sendto(b"hi", (host, port))
        print(s.recv(100).decode())
except OSError as exc:
    print(exc, file=sys.stderr)
    sys.exit(1)
"""


@contextlib.contextmanager
def server(ns: str, tag: str, tport: int = 80, uport: int = 5353) -> Iterator[None]:
    proc = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            ns,
            sys.executable,
            "-c",
            _ECHO_SERVER,
            tag,
            str(tport),
            str(uport),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline().strip()
        assert line == "ready", proc.stderr.read() if proc.poll() is not None else line
        yield
    finally:
        proc.kill()
        proc.wait(timeout=10)
        proc.stdout.close()
        proc.stderr.close()


def ask(ns: str, proto: str, host: str, port: int) -> str | None:
    """The server's answer to a request from `ns`, or None when none came."""
    proc = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", _ECHO_CLIENT, proto, host, str(port)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return proc.stdout.strip() if proc.returncode == 0 else None


# --- the lab, driven as a person drives it -------------------------------------------------


def lab_pycnictl(
    *args: str, stdin: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    """pycnictl from this installation, as a person runs it."""
    return subprocess.run(
        [sys.executable, "-c", "from pycni.ctl.main import main; main()", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        input=stdin,
    )


def lab_namespaces(prefix: str) -> list[str]:
    out = sh("ip", "netns", "list").stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(prefix + "-")]


@contextlib.contextmanager
def private_lab(tag: str):
    """(prefix, state dir, their options) of a lab of this test's own; brought down after,
    its namespaces removed even if `lab down` itself is broken. The state dir is a short one
    in /tmp, not under tmp_path: the agents' unix sockets live in it (a path limit), and an
    xdist worker's tmp_path is longer by its `popen-gwN/`."""
    prefix = f"pt{RUN_ID}{tag}"
    state = tempfile.mkdtemp(prefix="pylab", dir="/tmp")
    opts = ("--prefix", prefix, "--state-dir", state)
    try:
        yield prefix, state, opts
    finally:
        lab_pycnictl("lab", "down", *opts)
        for ns in lab_namespaces(prefix):
            sh("ip", "netns", "del", ns, check=False)
        shutil.rmtree(state, ignore_errors=True)
