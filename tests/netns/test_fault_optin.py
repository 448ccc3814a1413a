"""The fault-injection variables (PYCNI_FAIL_AFTER, PYCNI_TEST_KILL_AT, PYCNI_TEST_PAUSE_AT) are
honoured only under an explicit opt-in: by an agent started with --test-faults, and by the
in-process plugin only with PYCNI_TEST_FAULTS=1 in its own environment. A production agent
ignores them whatever the request says, PYCNI_TEST_FAULTS included."""

from __future__ import annotations

import os

import pytest

from conftest import TEST_FAULTS, AgentProcess, Node
from pycni.cni.env import FAIL_AFTER_ENV, KILL_AT_ENV

pytestmark = pytest.mark.netns


def added_and_deleted(node: Node, cid: str, env: dict) -> None:
    """ADD succeeds despite `env` (its faults ignored) and DEL removes it again."""
    pod = node.pod()
    reply = node.run("ADD", container_id=cid, netns=pod, env=env)
    assert reply.rc == 0, reply
    reply = node.run("DEL", container_id=cid, netns=pod)
    assert reply.rc == 0, reply


def test_in_process_ignores_them_without_the_opt_in(node):
    added_and_deleted(node, "plain", {FAIL_AFTER_ENV: "ipam", KILL_AT_ENV: "veth"})
    reply = node.run(
        "ADD", container_id="opted", netns=node.pod(), env={**TEST_FAULTS, FAIL_AFTER_ENV: "ipam"}
    )
    assert reply.code == 199 and "ipam" in reply.out["msg"], reply


def test_an_agent_without_the_flag_ignores_them_whatever_the_request_says(node):
    production = AgentProcess(node, test_faults=False).start()
    node.base["agentSocket"] = production.socket
    try:
        # Even PYCNI_TEST_FAULTS=1 in the request (the shim forwards PYCNI_ variables) is no
        # opt-in for the agent: only its own flag is. Had KILL_AT been honoured the agent
        # would be dead and the ADD answered with error 11.
        added_and_deleted(node, "ignored", {**TEST_FAULTS, KILL_AT_ENV: "veth"})
        added_and_deleted(node, "ignored2", {**TEST_FAULTS, FAIL_AFTER_ENV: "ipam"})
        assert production.proc is not None and production.proc.poll() is None
        with open(production.log_file) as f:
            assert "ignoring the test-only fault-injection variables" in f.read()
    finally:
        production.kill()
    os.unlink(production.socket)  # so that start() waits for the new agent's
    tester = AgentProcess(node, test_faults=True).start()
    try:
        reply = node.run(
            "ADD", container_id="failed", netns=node.pod(), env={FAIL_AFTER_ENV: "ipam"}
        )
        assert reply.code == 199 and "ipam" in reply.out["msg"], reply
    finally:
        tester.kill()
