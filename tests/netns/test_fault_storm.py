"""The node agent restarted three times in the middle of a 110-pod storm (SIGKILL, SIGTERM,
SIGKILL), with 16 runtime threads each execing the plugin. A call the agent dropped is answered
"try again" (11) by the executable; the runtime then does what kubelet does with a failed
sandbox: DEL (until it succeeds) and ADD again. In the gaps between agents the executable does
the work in-process. At the end every pod has one address, all distinct, and the node is at
pycni's invariant with the runtime's 110 live pods; after DEL of them all, nothing is left.

(tests/netns/test_agent.py restarts the agent once in a 60-pod storm and checks the node by
hand; this one restarts it three times and checks with the doctor.)"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import AgentProcess, DoctorProcess, Node, Reply

pytestmark = pytest.mark.netns

PODS = 110
THREADS = 16
# After how many pods are up the agent is restarted, and how.
RESTARTS = ((20, signal.SIGKILL), (50, signal.SIGTERM), (80, signal.SIGKILL))


class Runtime:
    """One kubelet and container runtime: a failed ADD is a failed sandbox, torn down with DEL
    (retried until it succeeds) before the pod is tried again."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.lock = threading.Lock()
        self.failures: Counter = Counter()  # (command, code) -> count
        self.started: dict[str, dict] = {}

    def call(self, command: str, cid: str, pod: str) -> Reply:
        try:
            reply = self.node.run(command, container_id=cid, netns=pod, timeout=90)
        except subprocess.TimeoutExpired:
            reply = Reply(-1, None, "", "timed out")
        assert "Traceback" not in reply.stdout + reply.stderr, reply
        if reply.rc != 0:
            # Whoever answered, the answer is one CNI error object and nothing else.
            assert reply.out is not None and len(reply.stdout.splitlines()) == 1, reply
            with self.lock:
                self.failures[(command, reply.code)] += 1
        return reply

    def delete(self, cid: str, pod: str) -> None:
        for _ in range(50):
            if self.call("DEL", cid, pod).rc == 0:
                return
            time.sleep(0.05)
        raise AssertionError(f"DEL {cid} never succeeded")

    def start(self, cid: str, pod: str) -> None:
        for _ in range(20):
            reply = self.call("ADD", cid, pod)
            if reply.rc == 0:
                with self.lock:
                    self.started[cid] = reply.out
                return
            self.delete(cid, pod)
        raise AssertionError(f"pod {cid} never started")


def freeze_until_queued(node: Node, agent: AgentProcess, n: int, timeout: float = 10) -> int:
    """SIGSTOP the agent and wait until `n` callers wait in its listen backlog (ss shows it as
    the listener's Recv-Q), so that the signal that follows drops calls for certain. Returns
    how many were queued (fewer if the storm is nearly over)."""
    agent.signal(signal.SIGSTOP)
    deadline = time.monotonic() + timeout
    queued = 0
    while time.monotonic() < deadline and queued < n:
        for line in node.exec("ss", "-xlnH").stdout.splitlines():
            fields = line.split()
            if fields[4] == agent.socket or fields[4].startswith(agent.socket + "."):
                queued = int(fields[2])
        time.sleep(0.02)
    return queued


def restart(node: Node, agent: AgentProcess, sig: int) -> int:
    """Stop the agent with `sig` and start a new one; returns how many callers were queued."""
    queued = 0
    if sig == signal.SIGKILL:
        queued = freeze_until_queued(node, agent, 4)
        agent.kill()  # a stopped process dies of SIGKILL all the same
        os.unlink(agent.socket)  # the dead agent's: wait for the new one's below
    else:
        assert agent.stop() == 0, agent.log()[-2000:]
    agent.start()
    return queued


def test_agent_restarts_in_a_110_pod_storm(node, agent):
    started = time.monotonic()
    node.base["ipMasq"] = True
    pods = {f"storm{i:03d}": node.pod("s") for i in range(PODS)}
    runtime = Runtime(node)
    queued = []
    with DoctorProcess(node) as doctor, ThreadPoolExecutor(THREADS) as pool:
        futures = [pool.submit(runtime.start, cid, pod) for cid, pod in pods.items()]
        try:
            for after, sig in RESTARTS:
                while sum(f.done() for f in futures) < after:
                    assert time.monotonic() - started < 240, "the storm does not progress"
                    time.sleep(0.01)
                queued.append(restart(node, agent, sig))
        finally:
            agent.signal(signal.SIGCONT)
            for f in futures:
                f.result()
        storm = time.monotonic() - started

        assert sorted(runtime.started) == sorted(pods)
        addresses = [out["ips"][0]["address"] for out in runtime.started.values()]
        assert len(set(addresses)) == PODS, Counter(addresses).most_common(3)
        live = {(cid, "eth0") for cid in pods}
        assert doctor.check(live) == []
        # Only dropped calls failed, and the SIGKILLs did drop some.
        assert {code for _, code in runtime.failures} <= {11}, runtime.failures
        assert runtime.failures[("ADD", 11)] >= 1, (queued, runtime.failures)
        log = agent.log()
        assert log.count("listening on") == 1 + len(RESTARTS)
        assert log.count("agent stopped") == 1  # the SIGTERM: finished what it had accepted

        with ThreadPoolExecutor(THREADS) as pool:
            list(pool.map(lambda item: runtime.delete(*item), pods.items()))
        assert doctor.check(set()) == []
        veths = [name for name in node.links() if name.startswith("veth")]
        assert veths == []
        assert node.exec("nft", "list", "tables").stdout.count("pycni") == 0
    print(
        f"storm of {PODS} pods with {len(RESTARTS)} agent restarts: {storm:.1f} s; "
        f"callers queued at the SIGKILLs {queued}; failed calls {dict(runtime.failures)}; "
        f"total {time.monotonic() - started:.1f} s"
    )
