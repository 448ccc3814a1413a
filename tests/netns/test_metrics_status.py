"""The agent's /metrics, /healthz and /readyz, and `pycnictl status` (drift included)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sys
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import AgentProcess
from pycni.ipam.store import Store

pytestmark = pytest.mark.netns

PYCNICTL = os.path.join(os.path.dirname(sys.executable), "pycnictl")
FETCH = """
import json, sys, urllib.error, urllib.request
try:
    r = urllib.request.urlopen(sys.argv[1], timeout=5)
    print(json.dumps([r.status, r.read().decode()]))
except urllib.error.HTTPError as e:
    print(json.dumps([e.code, e.read().decode()]))
except OSError as e:
    print(json.dumps([0, str(e)]))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def metrics_agent(node):
    proc = AgentProcess(node, metrics_port=free_port()).start()
    node.base["agentSocket"] = proc.socket
    try:
        yield proc
    finally:
        proc.kill()


def fetch(agent: AgentProcess, path: str) -> tuple[int, str]:
    """(HTTP status or 0 when unreachable, body), fetched on the node netns' loopback."""
    url = f"http://127.0.0.1:{agent.metrics_port}{path}"
    out = agent.node.exec(sys.executable, "-c", FETCH, url).stdout
    status, body = json.loads(out)
    return status, body


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(metrics: dict, name: str, **labels) -> float | None:
    return metrics.get((name, frozenset(labels.items())))


def test_metrics_count_calls_errors_and_pool(node, metrics_agent):
    conf = node.conf(subnet="10.244.1.0/29", rangeEnd="10.244.1.4")  # .2-.4: 3 pod addresses
    for i in range(3):
        node.add(node.pod(), f"c{i}", conf)
    full = node.run("ADD", conf, container_id="c3", netns=node.pod())
    assert full.rc == 1 and full.code == 100, full
    bad = node.run("ADD", node.conf(subnet="not-a-subnet"), container_id="c4", netns=node.pod())
    assert bad.rc == 1 and bad.code == 7, bad

    status, text = fetch(metrics_agent, "/metrics")
    assert status == 200
    m = samples(text)
    hist = "pycni_cni_request_duration_seconds"
    assert value(m, f"{hist}_count", command="ADD", result="ok") == 3
    assert value(m, f"{hist}_count", command="ADD", result="error") == 2
    assert value(m, f"{hist}_bucket", command="ADD", result="ok", le="10.0") == 3
    assert value(m, f"{hist}_bucket", command="ADD", result="ok", le="0.001") is not None
    assert value(m, "pycni_cni_errors_total", command="ADD", code="100") == 1
    assert value(m, "pycni_cni_errors_total", command="ADD", code="7") == 1
    assert value(m, "pycni_cni_requests_in_flight") == 0

    key = "10.244.1.0/29:10.244.1.1-10.244.1.4"
    pool = {"network": "testnet", "range": key}
    assert value(m, "pycni_ipam_addresses", state="allocated", **pool) == 3
    assert value(m, "pycni_ipam_addresses", state="free", **pool) == 0
    assert value(m, "pycni_ipam_scrape_errors_total", reason="broken") == 0

    with open(f"/proc/{metrics_agent.proc.pid}/statm") as f:
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    reported = value(m, "pycni_agent_resident_memory_bytes")
    assert 10e6 < reported < 1e9
    assert abs(reported - rss) < 0.25 * rss
    assert value(m, "process_resident_memory_bytes") > 10e6
    assert 0 < value(m, "pycni_agent_uptime_seconds") < 600

    # A DEL frees an address: the gauges follow the store at scrape time.
    assert node.run("DEL", conf, container_id="c0", netns="").rc == 0
    m = samples(fetch(metrics_agent, "/metrics")[1])
    assert value(m, "pycni_ipam_addresses", state="allocated", **pool) == 2
    assert value(m, "pycni_ipam_addresses", state="free", **pool) == 1
    assert value(m, f"{hist}_count", command="DEL", result="ok") == 1


def test_health_and_readiness_then_sigterm(node, metrics_agent):
    node.add(node.pod(), "c1")
    status, body = fetch(metrics_agent, "/healthz")
    assert status == 200
    health = json.loads(body)
    assert health["status"] == "ok" and health["pid"] == metrics_agent.proc.pid
    assert os.path.join(node.root, "data") in health["dataDirs"]
    status, body = fetch(metrics_agent, "/readyz")
    assert status == 200, body
    assert json.loads(body)["stores"] == {os.path.join(node.root, "data"): "ok"}
    assert fetch(metrics_agent, "/nope")[0] == 404

    metrics_agent.signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while (status := fetch(metrics_agent, "/healthz")[0]) == 200:
        assert time.monotonic() < deadline, "still healthy after SIGTERM"
        time.sleep(0.05)
    assert status in (503, 0)
    assert metrics_agent.proc.wait(15) == 0


def status(node, *args: str):
    return node.exec(
        PYCNICTL, "status", "--data-dir", os.path.join(node.root, "data"), *args, check=False
    )


def test_status_shows_pods_and_flags_drift(node, agent):
    pods = {f"cid{i}-0123456789abcdef": node.pod() for i in range(3)}
    for cid, pod in pods.items():
        node.add(pod, cid)

    text = status(node, "--socket", agent.socket)
    assert text.returncode == 0, text.stdout + text.stderr
    out = text.stdout
    assert f"pid {agent.proc.pid}" in out
    assert "bridge   cni0: up" in out
    assert "3/253 allocated (1.2%)" in out
    with Store(os.path.join(node.root, "data")) as store:
        atts = store.list_attachments("testnet")
    assert len(atts) == 3
    for att in atts:
        assert att.container_id[:12] in out and att.container_id not in out
        assert att.host_veth in out and att.netns in out
        assert f"{att.allocations[0].ip}/24" in out
    assert "status: healthy" in out

    js = status(node, "--socket", agent.socket, "--json")
    assert js.returncode == 0
    report = json.loads(js.stdout)
    assert report["healthy"] and report["problems"] == []
    assert report["agent"]["running"] and report["agent"]["health"]["pid"] == agent.proc.pid
    [net] = report["networks"]
    assert net["name"] == "testnet" and net["bridge"] == {
        "name": "cni0",
        "exists": True,
        "up": True,
    }
    assert net["subnets"] == ["10.244.1.0/24"]
    assert net["rangeSets"] == [
        {
            "key": "10.244.1.0/24:10.244.1.1-10.244.1.254",
            "allocated": 3,
            "capacity": 253,
            "percent": 1.2,
        }
    ]
    assert [
        (p["containerId"], p["ifname"], p["addresses"], p["hostVeth"], p["netns"])
        for p in net["pods"]
    ] == [
        (
            a.container_id,
            a.ifname,
            [f"{x.ip}/{x.prefixlen}" for x in a.allocations],
            a.host_veth,
            a.netns,
        )
        for a in atts
    ]
    assert all(p["hostVethExists"] and p["netnsExists"] for p in net["pods"])

    # Drift: a host veth removed behind pycni's back.
    gone = atts[1]
    node.exec("ip", "link", "del", gone.host_veth)
    text = status(node, "--socket", agent.socket)
    assert text.returncode == 1
    assert f"{gone.host_veth} MISSING (drift)" in text.stdout
    assert "1 problem(s)" in text.stdout
    report = json.loads(status(node, "--json").stdout)
    assert not report["healthy"]
    assert [p["hostVethExists"] for p in report["networks"][0]["pods"]] == [True, False, True]
    assert report["problems"] == [
        f"network testnet: pod {gone.container_id[:12]}/eth0: host veth {gone.host_veth} "
        "is missing (drift)"
    ]


def test_status_without_an_agent(node):
    node.add(node.pod(), "c1")
    missing = os.path.join(node.root, "no-agent.sock")
    named = status(node, "--socket", missing)
    assert named.returncode == 1
    assert "agent: not running" in named.stdout
    assert f"agent at {missing}: not running" in named.stdout
    if not os.path.exists("/run/pycni/agent.sock"):
        # The agent is optional: without --socket its absence is reported, not a failure.
        default = status(node)
        assert default.returncode == 0, default.stdout
        assert "agent: not running" in default.stdout and "1/253 allocated" in default.stdout


@pytest.mark.skipif(not shutil.which("nft"), reason="needs nft")
def test_status_flags_missing_masquerade_rules(node):
    node.base["agentSocket"] = ""
    node.add(node.pod(), "c1", node.conf(ipMasq=True))
    report = json.loads(status(node, "--json").stdout)
    assert report["masquerade"] == {"backend": "nft", "expected": True, "present": True}
    assert report["healthy"] and report["networks"][0]["ipMasq"]

    node.exec("nft", "delete", "table", "inet", "pycni")
    text = status(node)
    assert text.returncode == 1
    assert "masquerade: expected; rules (nft) absent" in text.stdout
    assert "masquerade rules (nft) are missing (drift)" in text.stdout
