"""The metrics endpoint without a network namespace: address policy, health states, pools."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pycni.agent import metrics
from pycni.agent.server import Agent
from pycni.ipam.ranges import parse_ranges
from pycni.ipam.store import Store


def get(server, path: str) -> tuple[int, str]:
    url = f"http://127.0.0.1:{server.server_address[1]}{path}"
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.fixture
def served(tmp_path):
    agent = Agent(str(tmp_path / "agent.sock"), data_dir=str(tmp_path / "data"))
    server = metrics.start(agent, "127.0.0.1", 0)
    try:
        yield agent, server
    finally:
        server.shutdown()
        server.server_close()


def test_refuses_a_non_loopback_address_unless_asked(tmp_path):
    agent = Agent(str(tmp_path / "agent.sock"))
    with pytest.raises(ValueError, match="not loopback"):
        metrics.start(agent, "0.0.0.0", 0)
    assert metrics.is_loopback("127.0.0.1") and metrics.is_loopback("::1")
    assert metrics.is_loopback("localhost")
    assert not metrics.is_loopback("0.0.0.0") and not metrics.is_loopback("192.0.2.1")


def test_health_follows_the_agent_life_cycle(served):
    agent, server = served
    status, body = get(server, "/healthz")
    assert status == 503 and json.loads(body)["status"] == "starting"  # not bound yet
    agent.bind()
    try:
        assert get(server, "/healthz")[0] == 200
        status, body = get(server, "/readyz")
        assert status == 200 and json.loads(body)["stores"] == {
            next(iter(agent.data_dirs)): "none yet"
        }
    finally:
        agent.stop()
    status, body = get(server, "/healthz")
    assert status == 503 and json.loads(body)["status"] == "stopping"
    assert get(server, "/readyz")[0] == 503


def test_pool_gauges_and_broken_stores(served, tmp_path):
    agent, server = served
    sets = parse_ranges([[{"subnet": "10.0.0.0/29"}]])
    with Store(str(tmp_path / "data")) as store:
        store.set_network("n1", {"rangeSets": [{"key": sets[0].key, "capacity": 5}]})
        store.add_attachment("n1", "c1", "eth0", "veth1", "/run/netns/x", sets, [])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "pycni.db").write_text("not a database, just text " * 100)
    agent.data_dirs |= {str(broken), str(tmp_path / "missing")}

    status, text = get(server, "/metrics")
    assert status == 200
    got = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }
    pool = (("network", "n1"), ("range", sets[0].key))
    assert got[("pycni_ipam_addresses", (*pool, ("state", "allocated")))] == 1
    assert got[("pycni_ipam_addresses", (*pool, ("state", "free")))] == 4
    assert got[("pycni_ipam_scrape_errors_total", (("reason", "broken"),))] == 1
    assert got[("pycni_ipam_scrape_errors_total", (("reason", "missing"),))] == 1
    assert not os.path.exists(tmp_path / "missing")  # a scrape never creates a store
    assert get(server, "/readyz")[0] == 503  # not serving, and a store is broken


def test_observer_feeds_the_histogram_and_error_counter(served):
    agent, server = served
    [observe] = agent.observers
    observe("ADD", 0, 0.002)
    observe("ADD", 100, 0.5)
    observe("", 4, 0.0001)
    text = get(server, "/metrics")[1]
    assert 'pycni_cni_request_duration_seconds_count{command="ADD",result="ok"} 1.0' in text
    assert 'pycni_cni_request_duration_seconds_count{command="ADD",result="error"} 1.0' in text
    assert 'pycni_cni_errors_total{code="100",command="ADD"} 1.0' in text
    assert 'pycni_cni_errors_total{code="4",command="unknown"} 1.0' in text
