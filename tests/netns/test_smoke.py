"""The basic life cycle through the installed plugin, in a sandboxed node."""

import pytest

from conftest import pod_name

pytestmark = pytest.mark.netns


def test_add_ping_del(node):
    pod1, pod2 = node.pod(), node.pod()
    r1 = node.add(pod1, "c1")
    r2 = node.add(pod2, "c2")
    assert r1["ips"][0]["address"] == "10.244.1.2/24"
    assert r2["ips"][0]["address"] == "10.244.1.3/24"
    node.spaces.exec(pod_name(pod1), "ping", "-c1", "-W2", "10.244.1.3")
    node.spaces.exec(pod_name(pod1), "ping", "-c1", "-W2", "10.244.1.1")
    for cid in ("c1", "c2"):
        assert node.run("DEL", container_id=cid, netns=pod1 if cid == "c1" else pod2).rc == 0
    assert not [link for link in node.links() if link.startswith("veth")]
