"""Storage faults: the dataDir's filesystem full or read-only, the IPAM database or its
write-ahead log damaged. In-process and through the agent, ADD, DEL, CHECK and GC must answer
with a CNI error naming the database and the cause (11 when full, 5 otherwise), print no
traceback and change nothing, except that DEL removes the pod's interfaces (and still fails,
so the runtime retries until the store can release the addresses). After the operator's
recovery (free space; remount read-write; for damage, the README's procedure) the node is
back at pycni's invariant: pycni.doctor.check(...) == [].

Each test mounts a small tmpfs of its own as the node's dataDir (unmounted whatever happens).
The agent runs in the node's network namespace but in the test's mount namespace (nsenter, not
`ip netns exec`), so that it sees the test's remounts as a node's processes would."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from contextlib import closing
from dataclasses import dataclass

import pytest

from conftest import AgentProcess, Node, Reply, sh
from pycni.dataplane.names import host_veth_name, ifb_name
from pycni.ipam.faults import StoreError
from pycni.ipam.store import Store

pytestmark = pytest.mark.netns

VALID = "cni.dev/valid-attachments"
PYCNICTL = (sys.executable, "-c", "from pycni.ctl.main import main; main()")
TMPFS_SIZE = "1m"

CHECK = """
import json, sys
from pycni.doctor import DoctorError, check
live = {tuple(p) for p in json.loads(sys.argv[2])}
try:
    print(json.dumps({"findings": [str(f) for f in check(sys.argv[1], live)]}))
except DoctorError as exc:
    print(json.dumps({"error": str(exc)}))
"""

# A pycni process that dies holding the database open (SIGKILL): its write-ahead log stays,
# with every transaction since the last checkpoint in it, as after a crash.
HOLDER = """
import sqlite3, sys, time
conn = sqlite3.connect(f"file:{sys.argv[1]}?mode=rw", uri=True)  # never creates it
conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchall()
print("open", flush=True)
time.sleep(600)
"""


class HostMountAgent(AgentProcess):
    """`pycnictl agent` in the node's netns, in this process's mount namespace."""

    def start(self, wait: float = 15.0) -> HostMountAgent:
        from pycni.agent.launch import agent_argv, wait_until_listening

        if os.path.lexists(self.socket):
            os.unlink(self.socket)  # a killed agent's: wait for the new one's
        argv = agent_argv(self.socket, os.path.join(self.node.root, "data"), self.log_file)
        # nsenter execs the agent (no fork for a network namespace): the pid is the agent's.
        self.proc = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{self.node.ns}", *argv],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            wait_until_listening(self.proc, self.socket, wait)
        except RuntimeError as exc:
            stderr = self.proc.stderr.read().decode() if self.proc.poll() is not None else ""
            raise RuntimeError(f"{exc}: {stderr}") from None
        return self


@dataclass
class Fs:
    """A node whose dataDir is a small tmpfs of its own."""

    node: Node
    data: str
    mode: str
    agent: HostMountAgent | None = None

    @property
    def db(self) -> str:
        return os.path.join(self.data, "pycni.db")

    def conf(self, cid: str, **overrides) -> dict:
        """A pod with all ADD makes: masquerade, a hostPort, shaping with an ifb."""
        port = 20000 + sum(map(ord, cid)) % 20000
        runtime = {
            "portMappings": [{"hostPort": port, "containerPort": 80, "protocol": "tcp"}],
            "bandwidth": {
                "ingressRate": 10**7,
                "ingressBurst": 10**5,
                "egressRate": 10**7,
                "egressBurst": 10**5,
            },
        }
        return self.node.conf(runtimeConfig=runtime, **overrides)

    def run(self, command: str, cid: str, pod: str, prev: dict | None = None) -> Reply:
        conf = self.conf(cid, **({"prevResult": prev} if prev else {}))
        return self.node.run(command, conf, container_id=cid, netns=pod)

    def gc(self, live: set[str]) -> Reply:
        conf = self.node.conf(**{VALID: [{"containerID": c, "ifname": "eth0"} for c in live]})
        return self.node.run("GC", conf, container_id=None, ifname=None, netns=None)

    def add(self, cid: str, pod: str) -> dict:
        reply = self.run("ADD", cid, pod)
        assert reply.rc == 0, reply
        return reply.out

    def kernel(self) -> tuple:
        """Links, qdiscs and packet rules of the node: what no failed call may change."""
        return (
            sorted(self.node.links()),
            self.node.exec("tc", "qdisc", "show").stdout,
            self.node.exec("nft", "list", "ruleset").stdout,
        )

    def rows(self) -> list[tuple]:
        """(container, ifname, address) in the store, read as a bystander would."""
        with closing(sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=30)) as conn:
            return sorted(
                conn.execute(
                    "SELECT at.container_id, at.ifname, al.ip FROM attachments at"
                    " JOIN allocations al ON al.attachment_id = at.id"
                )
            )

    def check(self, live: set[str]) -> list[str] | str:
        """pycni.doctor.check in the node: the findings, or the error text if it could not."""
        proc = sh(
            "ip",
            "netns",
            "exec",
            self.node.ns,
            sys.executable,
            "-c",
            CHECK,
            self.data,
            json.dumps(sorted([c, "eth0"] for c in live)),
            check=False,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        return out.get("error") or out["findings"]

    def restart_agent(self) -> None:
        """A crash of the agent (SIGKILL, its files left as they are) and its supervisor
        starting it again."""
        if self.agent is not None:
            self.agent.kill()
            self.agent.start()


@pytest.fixture(params=["standalone", "agent"])
def fs(request, node):
    data = os.path.join(node.root, "data")
    os.makedirs(data)
    sh("mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0700", "pycni-test", data)
    node.base["ipMasq"] = True
    node.base["agentSocket"] = ""  # in-process, whatever listens on the machine's socket
    result = Fs(node, data, request.param)
    try:
        if request.param == "agent":
            result.agent = HostMountAgent(node).start()
            node.base["agentSocket"] = result.agent.socket
        yield result
    finally:
        if result.agent is not None:
            result.agent.kill()
        if sh("umount", data, check=False).returncode:
            sh("umount", "-l", data, check=False)


def fill(fs: Fs) -> str:
    """Take every free block of the dataDir's filesystem; returns the filler's path."""
    filler = os.path.join(fs.data, "filler")
    subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=4k"], capture_output=True)
    st = os.statvfs(fs.data)
    assert st.f_bfree == 0, st
    return filler


def failed(reply: Reply, code: int, *words: str) -> dict:
    """A CNI error with `code` whose message has `words`; nothing else on stdout or stderr."""
    assert reply.rc == 1 and reply.out is not None, reply
    assert "Traceback" not in reply.stderr + reply.stdout, reply
    assert len(reply.stdout.strip().splitlines()) == 1, reply
    assert reply.out["code"] == code, reply
    for word in words:
        assert word in reply.out["msg"], reply
    return reply.out


def ok(reply: Reply) -> Reply:
    assert reply.rc == 0, reply
    return reply


def gone(fs: Fs, cid: str) -> bool:
    links = fs.node.links()
    return (
        host_veth_name(fs.node.name, cid, "eth0") not in links
        and ifb_name(fs.node.name, cid, "eth0") not in links
    )


def pods(fs: Fs) -> tuple[list[str], dict]:
    """Three pod namespaces; c0 and c1 added (c2 is the ADD that meets the fault)."""
    netns = [fs.node.pod() for _ in range(3)]
    results = {cid: fs.add(cid, netns[i]) for i, cid in enumerate(("c0", "c1"))}
    return netns, results


def status(fs: Fs) -> Reply:
    return fs.node.run("STATUS", fs.node.conf(), container_id=None, ifname=None, netns=None)


def not_ready(fs: Fs, *words: str) -> None:
    """STATUS says the node cannot take pods: code 50, naming the database and why."""
    out = failed(status(fs), 50, "not ready", fs.db, *words)
    assert out.get("details"), out


def recovered(fs: Fs, netns: list[str]) -> None:
    """What the runtime's retries do once the store can be used again: STATUS is ready, DEL
    c1 (its earlier DEL failed), ADD c2; then the invariant holds for the pods the runtime
    has."""
    ok(status(fs))
    ok(fs.run("DEL", "c1", netns[1]))
    ok(fs.run("ADD", "c2", netns[2]))
    ips = [ip for _, _, ip in fs.rows()]
    assert len(ips) == len(set(ips)) == 2, fs.rows()
    assert fs.check({"c0", "c2"}) == []


# --- full ---------------------------------------------------------------------------------


def test_full_filesystem(fs):
    netns, results = pods(fs)
    rows = fs.rows()
    ok(status(fs))
    filler = fill(fs)
    before = fs.kernel()
    not_ready(fs, "no space left")

    out = failed(fs.run("ADD", "c2", netns[2]), 11, fs.db, "no space left")
    assert out["details"].startswith(f"free space on {fs.data}")
    assert fs.kernel() == before
    # CHECK and GC (nothing stale) only read: they work when SQLite's shared memory is
    # already set up (an agent's open connection), else fail like ADD.
    for reply in (fs.run("CHECK", "c0", netns[0], prev=results["c0"]), fs.gc({"c0", "c1"})):
        if reply.rc or fs.mode == "standalone":
            assert reply.rc == 0 or failed(reply, 11, fs.db, "no space left"), reply
    assert fs.kernel() == before

    failed(
        fs.run("DEL", "c1", netns[1]),
        11,
        fs.db,
        "no space left",
        "DEL removed the pod's interfaces",
    )
    assert gone(fs, "c1") and not gone(fs, "c0")

    os.unlink(filler)
    assert fs.rows() == rows  # no allocation made, none released
    recovered(fs, netns)


# --- read-only ----------------------------------------------------------------------------


def test_read_only_filesystem(fs):
    netns, results = pods(fs)
    rows = fs.rows()
    # A filesystem holding files open for writing cannot be remounted read-only by hand (the
    # kernel does it on errors): the agent is stopped meanwhile, as when the node rebooted.
    if fs.agent is not None:
        assert fs.agent.stop() == 0
    sh("mount", "-o", "remount,ro", fs.data)
    try:
        if fs.agent is not None:
            fs.agent.start()
        before = fs.kernel()
        not_ready(fs, "read-only")
        out = failed(fs.run("ADD", "c2", netns[2]), 5, fs.db, "read-only")
        assert out["details"] == f"remount {fs.data} read-write, then retry"
        # CHECK and GC with nothing stale only read, which SQLite can on a read-only
        # filesystem; if it cannot, the error says why.
        for reply in (fs.run("CHECK", "c0", netns[0], prev=results["c0"]), fs.gc({"c0", "c1"})):
            assert reply.rc == 0 or failed(reply, 5, fs.db, "read-only"), reply
        assert fs.kernel() == before
        # GC with something stale has to write: as DEL, it removes the stale pod's
        # interfaces and fails.
        failed(fs.gc({"c0"}), 5, fs.db, "read-only", "GC removed the interfaces")
        assert gone(fs, "c1") and not gone(fs, "c0")
        failed(
            fs.run("DEL", "c1", netns[1]), 5, fs.db, "read-only", "DEL removed the pod's interfaces"
        )
        assert gone(fs, "c1") and not gone(fs, "c0")
    finally:
        sh("mount", "-o", "remount,rw", fs.data)
    assert fs.rows() == rows
    recovered(fs, netns)


# --- damaged ------------------------------------------------------------------------------


def _garbage_over_db(fs: Fs) -> str:
    with open(fs.db, "r+b") as f:
        f.write(os.urandom(os.path.getsize(fs.db)))
    return "is damaged (cannot open it: file is not a database)"


def _truncated_empty(fs: Fs) -> str:
    os.truncate(fs.db, 0)
    return "is empty (truncated?)"


def _truncated_half(fs: Fs) -> str:
    with closing(sqlite3.connect(fs.db)) as conn:  # every row in the file, then cut it in two
        assert conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
    os.truncate(fs.db, os.path.getsize(fs.db) // 2)
    return "is damaged"


def _garbage_wal(fs: Fs) -> str:
    wal = fs.db + "-wal"
    with open(wal, "r+b") as f:
        f.write(os.urandom(os.path.getsize(wal)))
    return f"has a damaged write-ahead log: {wal} has no SQLite WAL header"


def _hole_in_wal(fs: Fs) -> str:
    wal = fs.db + "-wal"
    with open(wal, "r+b") as f:  # the second frame, page and header (4 KiB pages)
        f.seek(32 + 4120)
        f.write(os.urandom(4120))
    return f"has a damaged write-ahead log: frame 2 of {wal} belongs to it"


DAMAGE = {
    "garbage": _garbage_over_db,
    "empty": _truncated_empty,
    "half": _truncated_half,
    "wal-garbage": _garbage_wal,
    "wal-hole": _hole_in_wal,
}


def crash_holding_the_store(fs: Fs, work, damage) -> None:
    """`work`, then a crash of the pycni process holding the store open (the agent, or a
    stand-in for a plugin), then `damage` to the files as the crash left them: the
    write-ahead log with every transaction since the last checkpoint."""
    if fs.agent is not None:
        work()
        fs.agent.kill()
        damage()
        fs.agent.start()
        return
    Store(fs.data).close()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, fs.db], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "open\n"
        work()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stdout.close()
    damage()


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_store(fs, damage):
    netns = [fs.node.pod() for _ in range(3)]
    results = {}
    expected: list[str] = []

    def work():
        for i, cid in enumerate(("c0", "c1")):
            results[cid] = fs.add(cid, netns[i])
        if damage.startswith("wal"):
            assert os.path.getsize(fs.db + "-wal") > 3 * 4120  # the pods are in the log

    crash_holding_the_store(fs, work, lambda: expected.append(DAMAGE[damage](fs)))
    what = expected[0]
    before = fs.kernel()

    failed(fs.run("ADD", "c2", netns[2]), 5, fs.db, what)
    out = failed(fs.run("CHECK", "c0", netns[0], prev=results["c0"]), 5, fs.db, what)
    assert "When the IPAM store cannot be used" in out["details"]
    failed(fs.gc({"c0", "c1"}), 5, fs.db, what)
    assert fs.kernel() == before
    failed(fs.run("DEL", "c1", netns[1]), 5, fs.db, what, "DEL removed the pod's interfaces")
    assert gone(fs, "c1") and not gone(fs, "c0")
    # The doctor cannot check such a store, and says why rather than guess.
    error = fs.check({"c0"})
    assert isinstance(error, str) and fs.db in error, error

    recover_by_draining(fs, netns)


def move_aside(fs: Fs, cleanup: bool = True) -> None:
    """The README's first steps: stop the agent, move the database and its log aside; without
    a rebuild, drop the packet rules the old database wanted (`pycnictl cleanup`) and start
    the agent again."""
    if fs.agent is not None:
        assert fs.agent.stop() == 0
    aside = os.path.join(fs.data, "damaged")
    os.mkdir(aside)
    for name in ("pycni.db", "pycni.db-wal", "pycni.db-shm"):
        if os.path.exists(os.path.join(fs.data, name)):
            os.rename(os.path.join(fs.data, name), os.path.join(aside, name))
    if cleanup:
        fs.node.exec(*PYCNICTL, "cleanup", "--data-dir", fs.data)
        if fs.agent is not None:
            fs.agent.start()


def recover_by_draining(fs: Fs, netns: list[str]) -> None:
    """The README's procedure without a rebuild: move the store aside, let the node's pods
    go (their DELs now succeed), and start again."""
    move_aside(fs)
    ok(fs.run("DEL", "c1", netns[1]))  # the runtime's retry
    ok(fs.run("DEL", "c0", netns[0]))  # the drain
    assert fs.check(set()) == []
    ok(fs.run("ADD", "c2", netns[2]))
    assert fs.check({"c2"}) == []


# --- how a database comes to be ------------------------------------------------------------


def test_a_database_moved_aside_without_its_log_is_refused(fs):
    """SQLite would replay the old log into the new, empty database."""
    netns = [fs.node.pod() for _ in range(3)]
    crash_holding_the_store(
        fs, lambda: fs.add("c0", netns[0]), lambda: os.rename(fs.db, fs.db + ".moved")
    )
    failed(fs.run("ADD", "c2", netns[2]), 5, fs.db, "is missing but its write-ahead log")
    assert not os.path.exists(fs.db) and gone(fs, "c2")


@pytest.mark.parametrize("damage", ["garbage", "wal-hole"])
def test_damaged_store_rebuilt_from_the_node(fs, damage, tmp_path):
    """The procedure with `pycnictl doctor --rebuild-store`: the live pod keeps its address
    and hostPort, no pod is drained."""
    netns = [fs.node.pod() for _ in range(3)]
    results = {}

    def work():
        for i, cid in enumerate(("c0", "c1")):
            results[cid] = fs.add(cid, netns[i])

    crash_holding_the_store(fs, work, lambda: DAMAGE[damage](fs))
    failed(fs.run("DEL", "c1", netns[1]), 5, fs.db)  # c1 goes meanwhile: its DEL fails
    conf = tmp_path / "10-pycni.conflist"
    plugin = {k: v for k, v in fs.node.conf().items() if k not in ("name", "cniVersion")}
    conf.write_text(
        json.dumps(
            {
                "cniVersion": "1.0.0",
                "cniVersions": ["1.0.0", "1.1.0"],
                "name": fs.node.name,
                "plugins": [plugin],
            }
        )
    )

    def rebuild() -> subprocess.CompletedProcess:
        return fs.node.exec(
            *PYCNICTL,
            "doctor",
            "--rebuild-store",
            "--conf",
            str(conf),
            "--data-dir",
            fs.data,
            "--socket",
            str(tmp_path / "none"),
            check=False,
        )

    refused = rebuild()  # the damaged store is still in place
    assert refused.returncode == 2 and "move it aside first" in refused.stdout, refused
    move_aside(fs, cleanup=False)
    proc = rebuild()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert rebuild().returncode == 2  # a store holding attachments is never touched
    c0_ip = results["c0"]["ips"][0]["address"].split("/")[0]
    port = fs.conf("c0")["runtimeConfig"]["portMappings"][0]["hostPort"]
    assert f"restored: {fs.node.name} c0 eth0: {c0_ip} (" in proc.stdout, proc.stdout
    assert f"hostPorts {port})" in proc.stdout and "1 attachments restored" in proc.stdout
    assert "ok: 1 attachment, 1 address" in proc.stdout, proc.stdout
    if fs.agent is not None:
        fs.agent.start()

    ok(fs.run("DEL", "c1", netns[1]))  # the runtime's retry
    assert fs.check({"c0"}) == []
    ok(fs.run("CHECK", "c0", netns[0], prev=results["c0"]))
    ok(fs.run("ADD", "c2", netns[2]))
    assert fs.check({"c0", "c2"}) == []
    ips = {cid: ip for cid, _, ip in fs.rows()}
    assert ips["c0"] == c0_ip and ips["c2"] != c0_ip, ips
    # Its hostPort is the node's again: another pod asking for it is refused.
    clash = fs.node.conf(
        runtimeConfig={"portMappings": [{"hostPort": port, "containerPort": 80, "protocol": "tcp"}]}
    )
    reply = fs.node.run("ADD", clash, container_id="c3", netns=fs.node.pod())
    failed(reply, 101, f"host port {port}/tcp", "c0")


# --- what SQLite leaves is never damage -----------------------------------------------------


def _many_transactions(path: str, count: int) -> sqlite3.Connection:
    """A connection (left open: its log stays) that wrote `count` transactions without a
    checkpoint."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA wal_autocheckpoint=0")
    for i in range(count):
        conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (f"k{i}", "v"))
    return conn


def test_a_log_sqlite_wrote_is_never_damage(tmp_path):
    data = str(tmp_path)
    Store(data).close()
    db = os.path.join(data, "pycni.db")
    conn = _many_transactions(db, 40)
    try:
        # A restarted log: the new generation's frames first, the old one's after them.
        assert conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()[0] == 0
        conn.execute("INSERT INTO meta (key, value) VALUES ('new', 'generation')")
        wal = db + "-wal"
        frames = (os.path.getsize(wal) - 32) // 4120
        assert frames > 10
        with Store(data) as store:
            assert store.get_meta("new") == "generation" and store.get_meta("k39") == "v"
        # The same log with a hole: the first frame of the new generation damaged.
        with open(wal, "r+b") as f:
            f.seek(32 + 8)
            f.write(b"\xff" * 8)  # its salts
        with pytest.raises(StoreError) as info:
            Store(data)
        assert info.value.kind == "corrupt" and f"frame 1 of {wal}" in info.value.msg
    finally:
        conn.close()


@pytest.mark.parametrize("log", [b"", b"\0" * 4096])
def test_an_empty_or_zeroed_log_is_no_damage(tmp_path, log):
    """What a power cut can leave of a log never synced: nothing SQLite would use."""
    data = str(tmp_path)
    with Store(data) as store:
        store.set_meta("kept", "yes")
    with open(os.path.join(data, "pycni.db-wal"), "wb") as f:
        f.write(log)
    with Store(data) as store:
        assert store.get_meta("kept") == "yes"
