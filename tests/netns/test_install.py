"""`pycnictl install` and `pycnictl uninstall` on a node without Kubernetes, sandboxed: every
path is an option, every kernel object lives in a namespace the test made.

The plugin is exec'd from where install put it, exactly as a runtime does; the standalone
launcher runs on /usr/bin/python3 without pycni's packages; uninstall runs inside the node's
namespace after a cluster agent, pods with ipMasq (and hostPorts and shaping) and a VTEP made
their marks, and must leave nothing of pycni's and everything of anybody else's.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from conftest import AgentProcess, Node, sh
from pycni.cni.netconf import NetConf
from pycni.install.launchers import MARKER, STANDALONE_PYTHON, launcher_text, standalone_text
from pycni.install.node import NO_CC_HINT
from pycni.native import FALLBACK_NAME
from pycni.native.build import compiler, is_standalone, marker_of, wanted_marker
from pycni.node_config import CONFLIST_NAME

pytestmark = pytest.mark.netns

PYCNICTL = os.path.join(os.path.dirname(sys.executable), "pycnictl")
CID1, CID2, CID3 = ("a" * 64, "b" * 64, "c" * 64)
FEATURES = {f.name for f in dataclasses.fields(NetConf)}
PYTHON_SAID = (
    "{path} is the {kind}Python launcher, {why}: every call pays Python's start-up, which the "
    "native executable does not"
)


def pycnictl(*args: str, ns: str | None = None, timeout: float = 60, env: dict | None = None):
    prefix = ["ip", "netns", "exec", ns] if ns else []
    return subprocess.run(
        [*prefix, PYCNICTL, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=None if env is None else {**os.environ, **env},
    )


@pytest.fixture
def dirs(tmp_path):
    """The node's directories, each where a real node has /opt/cni/bin, /etc/cni/net.d ..."""
    d = SimpleNamespace(
        root=str(tmp_path),
        bin=str(tmp_path / "bin"),
        conf=str(tmp_path / "net.d"),
        data=str(tmp_path / "data"),
        run=str(tmp_path / "run"),
    )
    d.paths = ["--bin-dir", d.bin, "--conf-dir", d.conf, "--data-dir", d.data]
    return d


def install(dirs, *extra: str, env: dict | None = None):
    return pycnictl("install", "--bin-dir", dirs.bin, "--conf-dir", dirs.conf, *extra, env=env)


def runtime_conf(conflist_path: str, root: str, **runtime) -> dict:
    """The conflist's plugin entry with name and cniVersion injected, as libcni does (and a
    private log file)."""
    with open(conflist_path) as f:
        conflist = json.load(f)
    conf = {
        **conflist["plugins"][0],
        "name": conflist["name"],
        "cniVersion": conflist["cniVersion"],
        "logFile": os.path.join(root, "pycni.log"),
    }
    if runtime:
        conf["runtimeConfig"] = runtime
    return conf


def node_in(netns, plugin: str, root: str) -> Node:
    ns = netns.make("node")
    netns.exec(ns, "ip", "link", "set", "lo", "up")
    return Node(ns=ns, root=root, plugin=plugin, spaces=netns, bridge="cni0")


# --- install ---------------------------------------------------------------------------------


def test_install_writes_both_files_and_is_idempotent(dirs):
    args = (
        "--python",
        "--subnet",
        "10.244.1.0/24",
        "--network",
        "10.244.0.0/16",
        "--name",
        "testnet",
        "--data-dir",
        dirs.data,
    )
    first = install(dirs, *args)
    assert first.returncode == 0, first.stderr
    launcher = os.path.join(dirs.bin, "pycni")
    conflist = os.path.join(dirs.conf, CONFLIST_NAME)
    said = PYTHON_SAID.format(path=launcher, kind="", why="as --python asks")
    assert first.stdout.splitlines() == [f"installed {launcher}", said, f"installed {conflist}"]
    assert os.stat(launcher).st_mode & 0o777 == 0o755
    assert os.stat(conflist).st_mode & 0o777 == 0o644
    with open(launcher) as f:
        text = f.read()
    python, flags = text.splitlines()[0][2:].split()
    assert os.path.dirname(python) == os.path.dirname(sys.executable) and flags == "-IS"
    assert MARKER in text
    with open(conflist) as f:
        conf = json.load(f)
    plugin = conf["plugins"][0]
    assert (
        conf["name"],
        plugin["type"],
        plugin["subnet"],
        plugin["network"],
        plugin["dataDir"],
        plugin["ipMasq"],
    ) == ("testnet", "pycni", "10.244.1.0/24", "10.244.0.0/16", dirs.data, True)
    before = {p: os.stat(p).st_mtime_ns for p in (launcher, conflist)}
    second = install(dirs, *args)
    assert second.returncode == 0, second.stderr
    assert second.stdout.splitlines() == [
        f"{launcher} is up to date",
        said,
        f"{conflist} is up to date",
    ]
    assert {p: os.stat(p).st_mtime_ns for p in (launcher, conflist)} == before
    # A new subnet replaces the config list.
    third = install(dirs, "--python", "--subnet", "10.244.2.0/24", "--name", "testnet")
    assert third.returncode == 0 and f"installed {conflist}" in third.stdout
    with open(conflist) as f:
        assert json.load(f)["plugins"][0]["subnet"] == "10.244.2.0/24"


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--subnet", "10.244.1.1/24"], "subnet"),  # host bits set
        (["--subnet", "banana"], "subnet"),
        (["--subnet", "10.244.1.0/24", "--network", "10.245.0.0/16"], "not inside --network"),
        (["--subnet", "10.244.1.0/24", "--network", "fd00::/56"], "not inside --network"),
        (["--subnet", "10.244.1.0/24", "--network", "10.244.0.0/33"], "network"),
        (["--subnet", "10.244.1.0/24", "--name", "no spaces"], "name"),
        (["--subnet", "10.244.1.0/24", "--data-dir", "relative/dir"], "dataDir"),
        (["--network", "10.244.0.0/16"], "need --subnet"),
    ],
    ids=[
        "host-bits",
        "not-a-cidr",
        "outside",
        "family",
        "bad-network",
        "bad-name",
        "relative-data-dir",
        "network-alone",
    ],
)
def test_install_refuses_bad_input_and_writes_nothing(dirs, args, said):
    proc = install(dirs, *args)
    assert proc.returncode != 0
    assert proc.stderr.startswith("pycnictl install: ") and said in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(dirs.bin) and not os.path.exists(dirs.conf)


def test_install_never_overwrites_files_it_did_not_write(dirs):
    os.makedirs(dirs.bin)
    os.makedirs(dirs.conf)
    foreign = os.path.join(dirs.bin, "pycni")
    with open(foreign, "w") as f:
        f.write("#!/bin/sh\necho somebody else's pycni\n")
    proc = install(dirs, "--python")
    assert proc.returncode == 1 and "was not written by pycnictl install" in proc.stderr
    assert open(foreign).read().startswith("#!/bin/sh")
    assert install(dirs, "--python", "--force").returncode == 0
    assert MARKER in open(foreign).read()
    # The same for a config list of the same name that is not pycni's.
    conflist = os.path.join(dirs.conf, CONFLIST_NAME)
    other = {"cniVersion": "1.0.0", "name": "x", "plugins": [{"type": "bridge"}]}
    with open(conflist, "w") as f:
        json.dump(other, f)
    proc = install(dirs, "--subnet", "10.244.1.0/24")
    assert proc.returncode == 1 and conflist in proc.stderr
    assert json.load(open(conflist)) == other


@pytest.mark.skipif(compiler() is None, reason="no C compiler (cc)")
def test_install_writes_the_native_executable_where_a_compiler_is(dirs):
    """The default: the native executable, with the Python launcher as its stated fallback."""
    proc = install(dirs)
    assert proc.returncode == 0, proc.stderr
    target, fallback = os.path.join(dirs.bin, "pycni"), os.path.join(dirs.bin, FALLBACK_NAME)
    assert marker_of(target) == wanted_marker(fallback)
    assert MARKER in open(fallback).read()
    assert proc.stdout.splitlines()[-1].startswith(f"installed {target} (")
    assert f"without an agent it runs the Python launcher {fallback}" in proc.stdout
    alone = install(dirs, "--standalone")
    assert alone.returncode == 0, alone.stderr
    assert is_standalone(marker_of(target)) and "forwarding to the agent only" in alone.stdout


@pytest.mark.parametrize("standalone", [False, True])
def test_install_without_a_compiler_writes_the_python_launcher_and_says_why(dirs, standalone):
    extra = ("--standalone",) if standalone else ()
    proc = install(dirs, *extra, env={"CC": os.path.join(dirs.root, "no-such-cc")})
    assert proc.returncode == 0, proc.stderr
    target = os.path.join(dirs.bin, "pycni")
    with open(target) as f:
        text = f.read()
    want = standalone_text() if standalone else launcher_text()
    # The same launcher but for its #! (pycnictl's interpreter, maybe python3 for python).
    assert text.split("\n", 1)[1] == want.split("\n", 1)[1] and MARKER in text
    why = f"no C compiler found ({NO_CC_HINT})"
    kind = "standalone " if standalone else ""
    assert PYTHON_SAID.format(path=target, kind=kind, why=why) in proc.stdout.splitlines()


def test_install_refuses_two_kinds_at_once(dirs):
    proc = install(dirs, "--native", "--python")
    assert proc.returncode == 1 and "give one of --native" in proc.stderr
    assert not os.path.exists(dirs.bin)


def test_install_notes_a_config_that_sorts_first(dirs):
    os.makedirs(dirs.conf)
    open(os.path.join(dirs.conf, "05-other.conflist"), "w").close()
    proc = install(dirs, "--subnet", "10.244.1.0/24")
    assert proc.returncode == 0
    assert "05-other.conflist sorts before 10-pycni.conflist" in proc.stderr


def test_installed_launcher_networks_a_pod_as_a_runtime_execs_it(netns, dirs):
    proc = install(
        dirs,
        "--subnet",
        "10.244.1.0/24",
        "--network",
        "10.244.0.0/16",
        "--name",
        "testnet",
        "--data-dir",
        dirs.data,
    )
    assert proc.returncode == 0, proc.stderr
    node = node_in(netns, os.path.join(dirs.bin, "pycni"), dirs.root)
    conf = runtime_conf(os.path.join(dirs.conf, CONFLIST_NAME), dirs.root)
    pod = node.pod()
    result = node.add(pod, CID1, conf)
    assert result["ips"][0]["address"] == "10.244.1.2/24"
    assert "10.244.1.2/24" in sh("ip", "-n", os.path.basename(pod), "addr", "show", "eth0").stdout
    assert os.path.exists(os.path.join(dirs.data, "pycni.db"))
    assert node.run("DEL", conf, container_id=CID1, netns=pod).rc == 0


# --- the standalone launcher ------------------------------------------------------------------


def standalone(dirs) -> str:
    proc = install(dirs, "--standalone", "--python")
    assert proc.returncode == 0, proc.stderr
    return os.path.join(dirs.bin, "pycni")


def test_standalone_launcher_is_one_stdlib_file_for_the_system_python(dirs):
    path = standalone(dirs)
    with open(path) as f:
        text = f.read()
    assert text == standalone_text()
    assert text.startswith(f"#!{STANDALONE_PYTHON} -IS\n") and MARKER in text
    ast.parse(text, feature_version=(3, 6))  # what the header promises
    imports = {
        alias.name
        for node in ast.walk(ast.parse(text))
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    assert imports <= {"_socket", "_struct", "os", "sys", "_json", "json"}, imports
    # Every name it uses is defined in it (what the shim imports from pycni was inlined).
    ruff = os.path.join(os.path.dirname(sys.executable), "ruff")
    if os.path.exists(ruff):
        lint = subprocess.run(
            [
                ruff,
                "check",
                "--no-cache",
                "--isolated",
                "--select",
                "F,E9",
                "--stdin-filename",
                "standalone.py",
                "-",
            ],
            input=text,
            capture_output=True,
            text=True,
        )
        assert lint.returncode == 0, lint.stdout
    # The system interpreter cannot import pycni: the file really stands alone.
    probe = subprocess.run(
        [STANDALONE_PYTHON, "-IS", "-c", "import pycni"], capture_output=True, text=True
    )
    assert probe.returncode != 0


@pytest.mark.parametrize(
    "stdin",
    [
        b'{"cniVersion": "0.4.0", "name": "n", "type": "pycni", "agentSocket": "%s"}',
        b"",
        b"not json",
    ],
    ids=["config", "empty", "garbage"],
)
def test_standalone_launcher_without_agent_answers_try_again(dirs, stdin):
    path = standalone(dirs)
    sock = os.path.join(dirs.root, "nobody.sock")
    data = stdin.replace(b"%s", sock.encode())
    env = {
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": CID1,
        "CNI_IFNAME": "eth0",
        "CNI_NETNS": "/run/netns/x",
        "CNI_PATH": dirs.bin,
    }
    proc = subprocess.run([path], input=data, env=env, capture_output=True)
    assert proc.returncode == 1
    assert proc.stderr == b""  # never a traceback
    err = json.loads(proc.stdout)
    assert err["code"] == 11
    want_socket = sock if b"agentSocket" in data else "/run/pycni/agent.sock"
    assert f"no pycni agent is listening at {want_socket}" in err["msg"]
    assert err["cniVersion"] == ("0.4.0" if b"0.4.0" in data else "1.1.0")


def test_standalone_launcher_forwards_to_a_real_agent(netns, dirs):
    node = node_in(netns, standalone(dirs), dirs.root)
    agent = AgentProcess(node).start()
    try:
        conf = node.conf(agentSocket=agent.socket)
        pod = node.pod()
        result = node.add(pod, CID1, conf)
        assert result["ips"][0]["address"] == "10.244.1.2/24"
        assert (
            node.run("CHECK", {**conf, "prevResult": result}, container_id=CID1, netns=pod).rc == 0
        )
        assert node.run("DEL", conf, container_id=CID1, netns=pod).rc == 0
        agent.stop()
        gone = node.run("ADD", conf, container_id=CID2, netns=node.pod())
        assert gone.rc == 1 and gone.code == 11 and agent.socket in gone.out["msg"]
    finally:
        agent.kill()


# --- uninstall --------------------------------------------------------------------------------


def links(ns: str) -> set[str]:
    out = sh("ip", "-n", ns, "-o", "link", "show").stdout
    return {line.split(": ")[1].split("@")[0] for line in out.splitlines()}


def wait_for(what, check, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


def underlay(netns, ns: str) -> None:
    """eth0 192.0.2.1/24 with a default route: what the agent finds its node address on."""
    sh("ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0peer")
    sh("ip", "-n", ns, "addr", "add", "192.0.2.1/24", "dev", "eth0")
    for dev in ("eth0", "eth0peer"):
        sh("ip", "-n", ns, "link", "set", dev, "up")
    sh("ip", "-n", ns, "route", "add", "default", "via", "192.0.2.254")


def fake_remote_node(path: str):
    """Another node in the sqlite datastore, so the agent routes to its subnet via the VTEP."""
    from pycni.backends import vtep_mac
    from pycni.cluster.leases import LeaseDatastore
    from pycni.cluster.model import ClusterSettings, NodeRecord
    from pycni.cluster.sqlite import SqliteKV

    store = LeaseDatastore(
        SqliteKV(path, 3600), ClusterSettings(("10.244.0.0/16",)), "sqlite", node_name="n2"
    )
    return store, store.register(NodeRecord("n2", ("192.0.2.2",), (), vtep_mac("n2")))


def lease_holders(path: str) -> set[str]:
    from pycni.cluster.leases import LeaseDatastore
    from pycni.cluster.model import ClusterSettings
    from pycni.cluster.sqlite import SqliteKV

    store = LeaseDatastore(
        SqliteKV(path, 3600), ClusterSettings(("10.244.0.0/16",)), "sqlite", node_name="probe"
    )
    try:
        return {n.name for n in store.nodes()}
    finally:
        store.close()


def start_cluster_agent(ns: str, dirs, datastore: str) -> subprocess.Popen:
    sock = os.path.join(dirs.run, "agent.sock")
    argv = [
        PYCNICTL,
        "agent",
        "--socket",
        sock,
        "--data-dir",
        dirs.data,
        "--log-file",
        os.path.join(dirs.root, "agent.log"),
        "--metrics-port",
        "0",
        "--cluster-cidr",
        "10.244.0.0/16",
        "--datastore",
        "sqlite",
        "--datastore-path",
        datastore,
        "--backend",
        "vxlan",
        "--node-name",
        "n1",
        "--iface",
        "eth0",
        "--conf-dir",
        dirs.conf,
        "--subnet-file",
        os.path.join(dirs.run, "subnet.env"),
        "--network-name",
        "testnet",
        "--resync",
        "1",
    ]
    return subprocess.Popen(
        ["ip", "netns", "exec", ns, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def test_uninstall_removes_everything_pycni_made_and_nothing_else(netns, dirs):
    assert install(dirs).returncode == 0  # the launcher; the agent writes the config list
    node = node_in(netns, os.path.join(dirs.bin, "pycni"), dirs.root)
    ns = node.ns
    underlay(netns, ns)
    datastore = os.path.join(dirs.root, "cluster.db")
    remote, remote_record = fake_remote_node(datastore)
    remote_subnet = str(remote_record.subnets[0])
    # What is not pycni's, and must stay.
    foreign_bin = os.path.join(dirs.bin, "bridge")
    with open(foreign_bin, "w") as f:
        f.write("not pycni's\n")
    os.makedirs(dirs.conf, exist_ok=True)
    foreign_conf = os.path.join(dirs.conf, "99-other.conflist")
    with open(foreign_conf, "w") as f:
        f.write("{}\n")
    sh("ip", "-n", ns, "link", "add", "brforeign", "type", "bridge")
    sh("ip", "-n", ns, "link", "add", "vethforeign", "type", "veth", "peer", "name", "vethfpeer")
    sh("ip", "-n", ns, "link", "set", "vethfpeer", "master", "brforeign")
    sh("ip", "-n", ns, "route", "add", "203.0.113.0/24", "via", "192.0.2.254", "proto", "static")

    agent = start_cluster_agent(ns, dirs, datastore)
    try:
        conflist = os.path.join(dirs.conf, CONFLIST_NAME)
        wait_for("the agent's config list", lambda: os.path.exists(conflist))
        wait_for(
            "the route to n2",
            lambda: remote_subnet in sh("ip", "-n", ns, "route", "show", "proto", "120").stdout,
        )
        pods = []
        for cid in (CID1, CID2):
            pods.append(node.pod())
            node.add(pods[-1], cid, runtime_conf(conflist, dirs.root))
        extras = {}
        if "port_mappings" in FEATURES:
            extras["portMappings"] = [{"hostPort": 18080, "containerPort": 80, "protocol": "tcp"}]
        if "bandwidth" in FEATURES:
            extras["bandwidth"] = {
                "ingressRate": 10_000_000,
                "ingressBurst": 1_000_000,
                "egressRate": 10_000_000,
                "egressBurst": 1_000_000,
            }
        pods.append(node.pod())
        node.add(pods[-1], CID3, runtime_conf(conflist, dirs.root, **extras))

        refused = pycnictl("uninstall", *dirs.paths, "--run-dir", dirs.run, ns=ns)
        assert refused.returncode == 1 and "agent answers" in refused.stderr
        assert os.path.exists(conflist)  # refused before touching anything
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(30) == 0
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    # A route pycni's protocol marks as its own, as if left by an older agent. Added once the
    # agent is gone: a running agent's resync would rightly remove it first (a race the full
    # suite's load lost once).
    sh("ip", "-n", ns, "route", "add", "198.51.100.0/24", "via", "192.0.2.254", "proto", "120")

    before = links(ns)
    assert {"cni0", "pycni.1"} <= before
    assert any(name.startswith("ifb") for name in before) == ("bandwidth" in FEATURES)
    assert "inet pycni" in sh("ip", "netns", "exec", ns, "nft", "list", "tables").stdout
    assert os.path.exists(os.path.join(dirs.run, "subnet.env"))
    assert lease_holders(datastore) == {"n1", "n2"}

    proc = pycnictl(
        "uninstall",
        *dirs.paths,
        "--run-dir",
        dirs.run,
        "--datastore",
        "sqlite",
        "--datastore-path",
        datastore,
        ns=ns,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    removed = proc.stdout
    for what in (
        "node n1's lease of 10.244.",
        "veth veth",
        "bridge cni0",
        "vxlan pycni.1",
        "route 198.51.100.0/24 via 192.0.2.254",
        f"route {remote_subnet}",
        "packet rules",
        os.path.join(dirs.bin, "pycni"),
        conflist,
        os.path.join(dirs.run, "subnet.env"),
        dirs.data + "/",
        dirs.run + "/",
    ):
        assert what in removed, (what, removed)

    # Nothing of pycni's is left: links, routes, rules, files, lease.
    after = links(ns)
    assert after == {"lo", "eth0", "eth0peer", "brforeign", "vethforeign", "vethfpeer"}, after
    assert not any(
        alias
        for alias in sh("ip", "-n", ns, "-o", "link", "show").stdout.split("\n")
        if "alias pycni" in alias
    )
    for pod in pods:
        assert links(os.path.basename(pod)) == {"lo"}  # the pod end went with its host end
    assert sh("ip", "-n", ns, "route", "show", "table", "all", "proto", "120").stdout == ""
    assert (
        "203.0.113.0/24 via 192.0.2.254 dev eth0 proto static" in sh("ip", "-n", ns, "route").stdout
    )
    assert "pycni" not in sh("ip", "netns", "exec", ns, "nft", "list", "ruleset").stdout
    if os.path.exists("/usr/sbin/iptables"):
        for table in ("nat", "filter"):
            assert (
                "PYCNI" not in sh("ip", "netns", "exec", ns, "iptables", "-t", table, "-S").stdout
            )
    assert sorted(os.listdir(dirs.bin)) == ["bridge"]
    assert sorted(os.listdir(dirs.conf)) == ["99-other.conflist"]
    assert not os.path.exists(dirs.data) and not os.path.exists(dirs.run)
    assert lease_holders(datastore) == {"n2"}
    remote.close()

    again = pycnictl(
        "uninstall",
        *dirs.paths,
        "--run-dir",
        dirs.run,
        "--datastore",
        "sqlite",
        "--datastore-path",
        datastore,
        ns=ns,
    )
    assert again.returncode == 0, again.stderr
    assert again.stdout == "nothing of pycni's to remove\n"


def test_uninstall_keeps_what_only_looks_like_pycnis(netns, dirs):
    """A bridge with pycni's default name but not its signature, a file named pycni without
    the launcher's marker, and foreign files in pycni's directories all stay."""
    ns = netns.make("node")
    sh("ip", "-n", ns, "link", "add", "cni0", "type", "bridge")
    sh("ip", "-n", ns, "addr", "add", "10.244.1.1/24", "dev", "cni0")
    os.makedirs(dirs.bin)
    with open(os.path.join(dirs.bin, "pycni"), "w") as f:
        f.write("#!/bin/sh\n")
    os.makedirs(dirs.data)
    for name in ("pycni.db", "gc.lock", "notes.txt"):
        open(os.path.join(dirs.data, name), "w").close()
    proc = pycnictl("uninstall", *dirs.paths, "--run-dir", dirs.run, ns=ns)
    assert proc.returncode == 0, proc.stderr
    assert "kept bridge cni0: not made by pycni" in proc.stdout
    assert f"kept {os.path.join(dirs.bin, 'pycni')}: not written by pycnictl install" in proc.stdout
    assert f"kept {dirs.data}: it holds files pycni did not make: notes.txt" in proc.stdout
    assert "cni0" in links(ns)
    assert os.listdir(dirs.bin) == ["pycni"]
    assert os.listdir(dirs.data) == ["notes.txt"]


@pytest.mark.skipif(not os.path.exists("/usr/sbin/iptables"), reason="iptables is not installed")
def test_uninstall_removes_the_iptables_rules_too(netns, dirs):
    assert (
        install(
            dirs, "--subnet", "10.244.1.0/24", "--network", "10.244.0.0/16", "--data-dir", dirs.data
        ).returncode
        == 0
    )
    node = node_in(netns, os.path.join(dirs.bin, "pycni"), dirs.root)
    conf = runtime_conf(os.path.join(dirs.conf, CONFLIST_NAME), dirs.root)
    node.add(node.pod(), CID1, conf, env={"PYCNI_RULES_BACKEND": "iptables"})
    assert "PYCNI-MASQ" in node.exec("iptables", "-t", "nat", "-S").stdout
    proc = pycnictl("uninstall", *dirs.paths, "--run-dir", dirs.run, ns=node.ns)
    assert proc.returncode == 0, proc.stderr
    assert "removed pycni's packet rules" in proc.stdout
    assert "PYCNI" not in node.exec("iptables", "-t", "nat", "-S").stdout
    assert links(node.ns) == {"lo"}
    assert not os.path.exists(dirs.data)
