"""`pycnictl bench throughput` end to end, short (1 s, one repeat): every path is measured with
a positive rate, the JSON and the table are well formed, and nothing is left behind. No timing
is asserted: the machine is too noisy for that, and this is not the place."""

from __future__ import annotations

import glob
import json
import subprocess

import pytest

from conftest import namespaces_named, run_bench

pytestmark = [pytest.mark.netns, pytest.mark.reference, pytest.mark.serial]

PATHS = {
    "baseline-veth",
    "underlay",
    "pycni-same-node",
    "pycni-host-gw",
    "pycni-vxlan",
    "pycni-same-node-nofp",
    "pycni-host-gw-nofp",
    "pycni-vxlan-nofp",
    "reference-same-node",
    "reference-host-gw",
}


def _iperf_servers(names: list[str]) -> list[str]:
    out = subprocess.run(["pgrep", "-a", "iperf3"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if any(n in line for n in names)]


def test_throughput_tiny(reference_plugins):
    from pycni.bench.throughput import format_table

    before = set(glob.glob("/tmp/pycni-bench-throughput-*"))
    pid, status, stdout, stderr = run_bench(
        "throughput",
        "--seconds",
        "1",
        "--repeat",
        "1",
        "--round-trips",
        "50",
        "--json",
        "--reference-dir",
        reference_plugins,
    )
    # Its namespaces (the labs' included) are named after its pid: none may be left.
    assert namespaces_named(f"pycnib{pid}") == []
    assert set(glob.glob("/tmp/pycni-bench-throughput-*")) <= before
    assert status == 0, stdout + stderr
    report = json.loads(stdout)
    assert report["ok"] and report["seconds"] == 1 and report["repeat"] == 1
    assert report["statistic"] == "median"
    assert {p["name"] for p in report["paths"]} == PATHS
    assert not _iperf_servers([p["server"] for p in report["paths"]])
    for p in report["paths"]:
        assert p["client"] != p["server"] and p["address"] and p["mtu"] > 0, p
    rows = {(r["path"], r["streams"]): r for r in report["results"]}
    assert set(rows) == {(p, s) for p in PATHS for s in (1, 4)}
    for key, row in rows.items():
        assert row["gbps"] > 0 and len(row["samples"]) == 1 and not row["errors"], (key, row)
        assert row["ratio"] > 0, (key, row)
    assert rows[("baseline-veth", 1)]["ratio"] == rows[("baseline-veth", 4)]["ratio"] == 1.0
    targets = report["targets"]
    assert len(targets) == 6 and all(isinstance(t["pass"], bool) for t in targets)
    assert all(t["value"] > 0 for t in targets)
    assert {(v["pycni"], v["reference"]) for v in report["versus_reference"]} == {
        ("pycni-same-node", "reference-same-node"),
        ("pycni-host-gw", "reference-host-gw"),
        ("pycni-same-node-nofp", "reference-same-node"),
        ("pycni-host-gw-nofp", "reference-host-gw"),
    }
    # The fast-path labs' agents carried their pods (this kernel allows it).
    assert report["fast_path"] and set(report["fast_path"].values()) == {"on"}, report["fast_path"]
    latency = report["latency"]
    assert {r["path"] for r in latency["results"]} == PATHS
    for row in latency["results"]:
        assert row["median_us"] > 0 and row["p99_us"] >= row["median_us"] and not row["errors"]
    assert len(latency["targets"]) == 3 and all(t["value"] > 0 for t in latency["targets"])
    assert all(v["ratio"] > 0 for v in report["versus_reference"])
    assert {(u["path"], u["streams"]) for u in report["versus_underlay"]} == {
        (p, s) for p in PATHS if "host-gw" in p or "vxlan" in p for s in (1, 4)
    }
    assert all(u["ratio"] > 0 for u in report["versus_underlay"])

    table = format_table(report)
    assert "median of 1" in table and "interleaved" in table
    lines = [line.split() for line in table.splitlines()]
    measured = [w for w in lines if w and w[0] in PATHS and len(w) >= 5 and w[1] in ("1", "4")]
    assert {(w[0], int(w[1])) for w in measured} == set(rows)
    assert all(float(w[2]) > 0 for w in measured)
    assert table.count("PASS") + table.count("FAIL") == 9
    assert "TCP request/response round trip" in table
    assert "cross-node paths / the underlay alone" in table
