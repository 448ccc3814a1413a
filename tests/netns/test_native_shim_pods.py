"""The native plugin executable networking real pods: exec'd as a runtime execs it, in a node
namespace, forwarding to a real `pycnictl agent`, or without one answering "try again"
(--standalone) or running the plugin in-process through its fallback launcher; and installed
and uninstalled by pycnictl like the Python launchers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import AgentProcess, Node, sh
from pycni.install.launchers import launcher_text
from pycni.native import FALLBACK_NAME, build
from pycni.node_config import CONFLIST_NAME

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(
        build.compiler() is None,
        reason="no C compiler (cc): the native executable cannot be "
        "built here (apt-get install gcc libc6-dev)",
    ),
]

SANITIZE = os.environ.get("PYCNI_NATIVE_SANITIZE") == "1"
PYCNICTL = os.path.join(os.path.dirname(sys.executable), "pycnictl")
CID1, CID2, CID3 = ("a" * 64, "b" * 64, "c" * 64)


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> dict[str, str]:
    """Two builds: "standalone" (no fallback) and "fallback" (to the Python launcher)."""
    root = tmp_path_factory.mktemp("native-bin")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "compileall",
            "-q",
            os.path.join(os.path.dirname(__file__), "..", "..", "src"),
        ],
        check=True,
        capture_output=True,
    )
    fallback = str(root / FALLBACK_NAME)
    with open(fallback, "w") as f:
        f.write(launcher_text())
    os.chmod(fallback, 0o755)
    out = {
        "standalone": str(root / "standalone" / "pycni"),
        "fallback": str(root / "fallback" / "pycni"),
    }
    build.build(out["standalone"], sanitize=SANITIZE)
    build.build(out["fallback"], fallback, sanitize=SANITIZE)
    return out


def node_with(netns, plugin: str, root: str) -> Node:
    ns = netns.make("node")
    netns.exec(ns, "ip", "link", "set", "lo", "up")
    return Node(ns=ns, root=root, plugin=plugin, spaces=netns, bridge="cni0")


@pytest.mark.parametrize("kind", ["standalone", "fallback"])
def test_add_check_del_through_a_real_agent(netns, tmp_path, builds, kind):
    node = node_with(netns, builds[kind], str(tmp_path))
    agent = AgentProcess(node).start()
    try:
        conf = node.conf(agentSocket=agent.socket)
        pod = node.pod()
        added = node.run("ADD", conf, container_id=CID1, netns=pod)
        assert added.rc == 0 and added.stderr == "", added
        result = added.out
        assert result["ips"][0]["address"] == "10.244.1.2/24"
        assert (
            "10.244.1.2/24" in sh("ip", "-n", os.path.basename(pod), "addr", "show", "eth0").stdout
        )
        assert CID1[:12] in agent.log()  # the agent did the work
        checked = node.run("CHECK", {**conf, "prevResult": result}, container_id=CID1, netns=pod)
        assert (checked.rc, checked.stdout) == (0, "")
        for _ in range(2):  # containerd's second DEL, without netns: still success
            assert node.run("DEL", conf, container_id=CID1, netns=pod).rc == 0
        assert node.run("DEL", conf, container_id=CID1, netns="").rc == 0
        assert "veth" not in " ".join(node.links())
        agent.stop()
        alone = node.run("ADD", conf, container_id=CID2, netns=node.pod())
        if kind == "standalone":
            assert alone.rc == 1 and alone.code == 11 and agent.socket in alone.out["msg"]
        else:  # the plugin ran in-process, in the node, as the Python launcher does
            assert alone.rc == 0, alone
            assert alone.out["ips"][0]["address"].startswith("10.244.1.")
            assert "veth" in " ".join(node.links())
            assert node.run("DEL", conf, container_id=CID2, netns="").rc == 0
    finally:
        agent.kill()


def test_installed_native_executable_networks_a_pod_and_uninstall_removes_it(netns, tmp_path):
    bin_dir, conf_dir = str(tmp_path / "bin"), str(tmp_path / "net.d")
    data, run_dir = str(tmp_path / "data"), str(tmp_path / "run")
    proc = subprocess.run(
        [
            PYCNICTL,
            "install",
            "--native",
            "--bin-dir",
            bin_dir,
            "--conf-dir",
            conf_dir,
            "--subnet",
            "10.244.1.0/24",
            "--network",
            "10.244.0.0/16",
            "--name",
            "testnet",
            "--data-dir",
            data,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    node = node_with(netns, os.path.join(bin_dir, "pycni"), str(tmp_path))
    with open(os.path.join(conf_dir, CONFLIST_NAME)) as f:
        conflist = json.load(f)
    conf = {
        **conflist["plugins"][0],
        "name": conflist["name"],
        "cniVersion": conflist["cniVersion"],
        "logFile": str(tmp_path / "pycni.log"),
        "agentSocket": str(tmp_path / "no-agent.sock"),
    }
    pod = node.pod()
    result = node.add(pod, CID3, conf)  # no agent: the fallback launcher, in-process
    assert result["ips"][0]["address"] == "10.244.1.2/24"
    assert node.run("DEL", conf, container_id=CID3, netns=pod).rc == 0

    gone = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            node.ns,
            PYCNICTL,
            "uninstall",
            "--bin-dir",
            bin_dir,
            "--conf-dir",
            conf_dir,
            "--data-dir",
            data,
            "--run-dir",
            run_dir,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert gone.returncode == 0, gone.stderr
    for path in (os.path.join(bin_dir, "pycni"), os.path.join(bin_dir, FALLBACK_NAME)):
        assert f"removed {path}" in gone.stdout
    assert os.listdir(bin_dir) == []
