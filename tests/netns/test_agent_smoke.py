"""The thin executable goes through the agent when one listens, and works alone when not."""

import pytest

pytestmark = pytest.mark.netns


def test_add_del_through_the_agent(node, agent):
    pod = node.pod()
    out = node.add(pod, "c1")
    assert out["ips"][0]["address"] == "10.244.1.2/24"
    assert "ADD c1/eth0" in agent.log()
    assert node.run("DEL", container_id="c1", netns=pod).rc == 0
    assert "DEL c1/eth0" in agent.log()


def test_falls_back_to_in_process_without_an_agent(node):
    node.base["agentSocket"] = node.root + "/no-agent.sock"
    pod = node.pod()
    out = node.add(pod, "c1")
    assert out["ips"][0]["address"] == "10.244.1.2/24"
    assert "ADD c1/eth0" in node.log()
    assert node.run("DEL", container_id="c1", netns=pod).rc == 0
