"""`pycnictl bench watch` end to end, short: 4 s at 300x (20 simulated minutes, watches of 1-2 s)
against the in-process fake API server on loopback, so no root. Every kind stays within the
issue's target, and no check loses an event."""

from __future__ import annotations

import json

import pytest

from conftest import run_bench
from pycni.bench.watch import KINDS, format_table

# Simulated time runs 300 times faster than the clock: a busy machine stretches it.
pytestmark = pytest.mark.serial


def test_bench_watch_short():
    pid, status, stdout, stderr = run_bench(
        "watch", "--duration", "4", "--speedup", "300", "--nodes", "8", "--json", timeout=120
    )
    assert status == 0, stdout + stderr
    report = json.loads(stdout)
    assert report["ok"], report
    assert report["settings"]["speedup"] == 300 and report["settings"]["nodes"] == 8
    assert 0.3 <= report["simulated_hours"] <= 0.4
    rows = {row["kind"]: row for row in report["kinds"]}
    assert set(rows) == set(KINDS)
    for row in rows.values():
        # One watch renewed every 5-10 (simulated) minutes; nothing listed, nothing read.
        assert row["list"] == row["get"] == row["patch"] == 0, row
        assert 1 <= row["watch"] <= 5 and row["per_hour"] <= row["target"] == 15, row
    # The agent's start: its own Node read (and published), then one list and one watch a kind.
    assert report["startup"]["nodes"]["get"] == 1 and report["startup"]["nodes"]["patch"] == 1
    assert all(report["startup"][kind]["list"] == 1 for kind in KINDS), report["startup"]
    checks = {c["check"]: c for c in report["checks"]}
    assert set(checks) == {"renewal", "410", "restart"}
    assert all(c["ok"] and c["stale"] == [] for c in checks.values()), checks
    assert (checks["renewal"]["lists"], checks["410"]["lists"], checks["restart"]["lists"]) == (
        0,
        len(KINDS),
        0,
    )
    assert report["informers"]["nodes"]["relists"] == 1  # the 410, and only it
    assert report["loop_errors"] == []
    table = format_table(report)
    assert table.count("PASS") == len(KINDS) + 3 and "FAIL" not in table
