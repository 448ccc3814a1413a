"""A crash at every step. The process doing the work, the plugin in-process or the node agent
behind the thin executable, SIGKILLs itself at each named checkpoint of ADD, DEL and GC
(core.faults, PYCNI_TEST_KILL_AT). Then the runtime does what it does after a failed call
(containerd tears a failed sandbox down with DEL, a failed DEL is retried, kubelet's GC passes
the attachments it still considers live) and the node must be back at pycni's invariant,
pycni.doctor.check(...) == [], with the same container able to start again.

One node per mode for the whole module (a pod that lives through every test, which no GC may
take); every test uses its own containers and pod namespaces."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

import pytest

from conftest import TEST_FAULTS, AgentProcess, DoctorProcess, Namespaces, Node, Reply
from pycni.cni.env import KILL_AT_ENV
from pycni.core.faults import ADD_STEPS, DEL_STEPS, GC_STEPS

pytestmark = pytest.mark.netns

VALID = "cni.dev/valid-attachments"
KEEPER = ("keeper", "eth0")  # live all along: GC must never take it


@dataclass
class FaultNode:
    node: Node
    agent: AgentProcess | None
    doctor: DoctorProcess

    def conf(self, cid: str, **overrides) -> dict:
        """A pod with everything a step can make: hostPort DNAT, shaping with an ifb, and
        masquerade. Host ports differ per container: they are the node's."""
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

    def run(
        self,
        command: str,
        cid: str,
        pod: str | None,
        env: dict | None = None,
        conf: dict | None = None,
    ) -> Reply:
        return self.node.run(
            command, conf or self.conf(cid), container_id=cid, netns=pod or "", env=env
        )

    def gc(self, live: set[tuple[str, str]], env: dict | None = None) -> Reply:
        conf = self.node.conf(**{VALID: [{"containerID": c, "ifname": i} for c, i in live]})
        return self.node.run("GC", conf, container_id=None, ifname=None, netns=None, env=env)

    def killed(self, reply: Reply) -> None:
        """The call died with its worker; an agent is started again, as its supervisor
        (kubelet's DaemonSet, systemd) would."""
        if self.agent is None:
            # What the runtime sees of a plugin killed mid-call: a signal, no answer at all.
            assert reply.rc == -signal.SIGKILL and reply.stdout == "", reply
            return
        # The executable saw the connection drop: a proper CNI error, try again later.
        assert reply.rc == 1 and reply.stderr == "", reply
        lines = reply.stdout.splitlines()
        assert len(lines) == 1 and reply.out is not None, reply
        assert reply.out["code"] == 11 and set(reply.out) == {"cniVersion", "code", "msg"}
        assert "try again" in reply.out["msg"] and reply.out["cniVersion"] == "1.1.0"
        assert self.agent.proc.wait(10) == -signal.SIGKILL
        restart(self.agent)


def restart(agent: AgentProcess) -> None:
    if os.path.exists(agent.socket):
        os.unlink(agent.socket)  # left by the killed agent: wait for the new one's
    agent.start()


def ok(reply: Reply) -> Reply:
    assert reply.rc == 0, reply
    return reply


@pytest.fixture(scope="module", params=["in-process", "agent"])
def fault_node(request, plugin_bin, tmp_path_factory):
    spaces = Namespaces()
    agent = doctor = None
    try:
        ns = spaces.make("fk")
        spaces.exec(ns, "ip", "link", "set", "lo", "up")
        root = tmp_path_factory.mktemp("fault")
        # agentSocket "": in-process whatever listens on the machine's default socket.
        node = Node(
            ns=ns,
            root=str(root),
            plugin=plugin_bin,
            spaces=spaces,
            bridge="cni0",
            base={"ipMasq": True, "agentSocket": ""},
        )
        if request.param == "agent":
            agent = AgentProcess(node).start()
            node.base["agentSocket"] = agent.socket
        doctor = DoctorProcess(node)
        fn = FaultNode(node, agent, doctor)
        ok(fn.run("ADD", KEEPER[0], node.pod("k")))
        assert doctor.check({KEEPER}) == []
        yield fn
    finally:
        if doctor is not None:
            doctor.close()
        if agent is not None:
            agent.kill()
        spaces.cleanup()


@pytest.fixture
def fn(fault_node):
    """The shared node, checked sound after each test (a failing test does not leave its
    mess to the next: everything but the keeper is collected)."""
    yield fault_node
    if fault_node.doctor.check({KEEPER}):
        fault_node.gc({KEEPER})


def start_again(fn: FaultNode, cid: str, pod: str) -> None:
    """The same container starts (ADD), is sound, and goes (DEL), leaving the node sound."""
    result = ok(fn.run("ADD", cid, pod)).out
    assert result["ips"][0]["address"].startswith("10.244.1."), result
    assert fn.doctor.check({KEEPER, (cid, "eth0")}) == []
    ok(fn.run("DEL", cid, pod))
    assert fn.doctor.check({KEEPER}) == []


@pytest.mark.parametrize("step", ADD_STEPS)
def test_killed_during_add(fn, step):
    cid, pod = f"add-{step}", fn.node.pod("a")
    fn.killed(fn.run("ADD", cid, pod, env={**TEST_FAULTS, KILL_AT_ENV: step}))
    # Every step comes after the allocation: the doctor sees an attachment the runtime, for
    # which the ADD failed, does not know.
    found = fn.doctor.check({KEEPER})
    assert any(f.startswith("unknown-to-runtime:") and cid in f for f in found), found
    # The runtime tears the failed sandbox down, then GCs with what it considers live.
    ok(fn.run("DEL", cid, pod))
    ok(fn.gc({KEEPER}))
    assert fn.doctor.check({KEEPER}) == []
    start_again(fn, cid, pod)


@pytest.mark.parametrize("step", ADD_STEPS)
def test_killed_during_add_and_only_gc_follows(fn, step):
    """The runtime lost the failed sandbox (it crashed too): its next GC alone cleans up, and
    a DEL arriving after that finds nothing and succeeds."""
    cid, pod = f"addgc-{step}", fn.node.pod("a")
    fn.killed(fn.run("ADD", cid, pod, env={**TEST_FAULTS, KILL_AT_ENV: step}))
    ok(fn.gc({KEEPER}))
    assert fn.doctor.check({KEEPER}) == []
    ok(fn.run("DEL", cid, pod))
    start_again(fn, cid, pod)


@pytest.mark.parametrize("step", DEL_STEPS)
def test_killed_during_del(fn, step):
    cid, pod = f"del-{step}", fn.node.pod("d")
    ok(fn.run("ADD", cid, pod))
    fn.killed(fn.run("DEL", cid, pod, env={**TEST_FAULTS, KILL_AT_ENV: step}))
    found = fn.doctor.check({KEEPER})
    if step in ("del-veth", "del-ifb"):
        assert any(f.startswith("host-veth-missing:") and cid in f for f in found), found
    elif step == "del-store" and fn.agent is None:
        # Its hostPort is still in the rules. (A restarted agent may have repaired them.)
        assert found and all(f.startswith("rule-extra:") for f in found), found
    elif step == "del-rules":
        assert found == []  # it had done everything: only its answer was lost
    # The runtime retries a failed DEL until it succeeds.
    ok(fn.run("DEL", cid, pod))
    ok(fn.gc({KEEPER}))
    assert fn.doctor.check({KEEPER}) == []
    start_again(fn, cid, pod)


@pytest.mark.parametrize("step", [*GC_STEPS, "del-veth", "del-store"])
def test_killed_during_gc(fn, step):
    """GC with work to do: a pod the runtime forgot, and the remains of an ADD that crashed
    after making the veth (its DEL never came). Killed at `step` (the del-* steps: in the
    middle of releasing the first of them), the runtime's next GC finishes the job."""
    forgotten, forgotten_pod = f"gc-{step}-f", fn.node.pod("g")
    crashed, crashed_pod = f"gc-{step}-c", fn.node.pod("g")
    ok(fn.run("ADD", forgotten, forgotten_pod))
    in_process = fn.conf(crashed, agentSocket="")
    reply = fn.run(
        "ADD", crashed, crashed_pod, env={**TEST_FAULTS, KILL_AT_ENV: "veth"}, conf=in_process
    )
    assert reply.rc == -signal.SIGKILL, reply
    assert len(fn.doctor.check({KEEPER})) >= 2
    fn.killed(fn.gc({KEEPER}, env={**TEST_FAULTS, KILL_AT_ENV: step}))
    left = fn.doctor.check({KEEPER})
    if step == "gc-rules":
        assert left == []
    elif step.startswith("del-") or fn.agent is None:
        # After gc-store only rules are stale, which a restarted agent may have repaired.
        assert left, step
    ok(fn.gc({KEEPER}))
    assert fn.doctor.check({KEEPER}) == []
    for cid, pod in ((forgotten, forgotten_pod), (crashed, crashed_pod)):
        ok(fn.run("DEL", cid, pod))  # the runtime's own DEL, late: nothing left to do
        start_again(fn, cid, pod)
