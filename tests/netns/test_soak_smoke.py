"""`pycnictl bench soak` end to end, small: 300 random operations over 30 containers, 8 in
flight, the agent SIGKILLed twice, the invariant checked every 100 operations. It must find
nothing, count what it did, and leave nothing behind."""

from __future__ import annotations

import glob
import json
import tempfile

import pytest

from conftest import namespaces_named, run_bench

pytestmark = [pytest.mark.netns, pytest.mark.serial]


def test_soak_small():
    pid, status, stdout, stderr = run_bench(
        "soak",
        "--ops",
        "300",
        "--containers",
        "30",
        "--in-flight",
        "8",
        "--kill-every",
        "150",
        "--check-every",
        "100",
        "--seed",
        "7",
        "--json",
        timeout=600,
    )
    # Its namespaces and temporary directory are named after its pid: none may be left.
    assert namespaces_named(f"pycnib{pid}") == []
    assert glob.glob(f"{tempfile.gettempdir()}/pycni-soak-{pid}-*") == []
    assert status == 0, stdout + stderr
    report = json.loads(stdout)
    assert report["ok"] and report["violations"] == [] and report["errors"] == [], report
    assert (report["ops"], report["containers"], report["in_flight"]) == (300, 30, 8)
    assert report["kills"] == 2 and report["checks"] == 3, report
    latency = report["latency_ms"]
    assert set(latency) == {"ADD", "DEL", "CHECK", "GC"}
    calls = sum(p["n"] for p in latency.values())
    assert calls == report["calls"] >= 300
    # Every retry is a call beyond the 300 operations.
    assert calls == 300 + sum(report["retried"].values()), report
    for command in ("ADD", "DEL", "CHECK"):
        p = latency[command]
        assert p["n"] > 10 and 0 < p["p50"] <= p["p90"] <= p["p99"] <= p["max"], (command, p)
    assert report["ops_per_second"] > 0 and 0 <= report["live_at_end"] <= 30
