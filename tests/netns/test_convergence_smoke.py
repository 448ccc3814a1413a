"""`pycnictl bench convergence` end to end, tiny (10 remote nodes, one repetition): a real agent
per backend and register mode converges on the nodes appearing and leaving, the report is well
formed, and nothing it made is left behind. No timing is asserted."""

from __future__ import annotations

import glob
import json
import os
import tempfile

import pytest

from conftest import namespaces_named, run_bench

pytestmark = [pytest.mark.netns, pytest.mark.serial]

NODES = 10
NOOP_SAMPLES = 2
PHASE_KEYS = {
    "written_ms",
    "first_ms",
    "all_ms",
    "lag_ms",
    "passes",
    "last_pass_ms",
    "events",
    "problems",
    "converged",
}


def test_convergence_tiny():
    from pycni.bench.convergence import format_table

    pid, status, stdout, stderr = run_bench(
        "convergence",
        "--nodes",
        str(NODES),
        "--repeat",
        "1",
        "--noop-samples",
        str(NOOP_SAMPLES),
        "--json",
    )
    # Its namespaces and temporary directories are named after its pid: none may be left.
    tag = f"pycnicv{pid}"
    assert namespaces_named(tag) == []
    assert glob.glob(os.path.join(tempfile.gettempdir(), f"pycni-conv-{tag}-*")) == []
    assert status == 0, stdout + stderr
    report = json.loads(stdout)
    assert report["ok"] and report["problems"] == []
    assert report["nodes"] == NODES and report["repeat"] == 1
    assert report["backends"] == ["host-gw", "vxlan"]
    assert report["register"] == ["clients", "batch"]

    runs = report["runs"]
    assert {(r["backend"], r["register"]) for r in runs} == {
        (b, m) for b in ("host-gw", "vxlan") for m in ("clients", "batch")
    }
    for run in runs:
        where = (run["backend"], run["register"])
        per_node = 1 if run["backend"] == "host-gw" else 3  # route (+ neighbour + FDB entry)
        for phase in ("add", "remove"):
            result = run[phase]
            assert set(result) == PHASE_KEYS, (where, phase)
            assert result["converged"] and result["problems"] == [], (where, phase, result)
            assert result["events"] == NODES * per_node, (where, phase)
            assert result["passes"] >= 1 and result["last_pass_ms"] > 0, (where, phase)
            assert 0 <= result["written_ms"] and 0 <= result["lag_ms"], (where, phase)
            assert 0 < result["first_ms"] <= result["all_ms"], (where, phase)
        assert len(run["noop"]) == NOOP_SAMPLES
        for sample in run["noop"]:
            assert sample["problems"] == [] and sample["pass_ms"] > 0 and sample["wake_ms"] > 0
        assert run["agent_log_problems"] == []

    summary = report["summary"]
    for backend in ("host-gw", "vxlan"):
        for mode in ("clients", "batch"):
            entry = summary[backend][mode]
            for phase in ("add", "remove"):
                stat = entry[phase]["all_ms"]
                assert stat["n"] == 1 and stat["median"] == stat["max"] > 0
            assert entry["noop"]["pass_ms"]["n"] == NOOP_SAMPLES

    table = format_table(report)
    rows = [line for line in table.splitlines() if line.startswith(("host-gw ", "vxlan "))]
    assert len(rows) == 4 * 2 + 4  # (backend, mode) x (add, remove), then the no-op rows
    assert "OK:" in table and "PROBLEMS" not in table


def test_backends_alone_tiny():
    """`pycnictl bench reconcile`: every phase ran and was checked (counts, no errors)."""
    pid, status, stdout, stderr = run_bench(
        "reconcile", "--nodes", "5", "--repeat", "1", "--json", timeout=120
    )
    assert status == 0, stdout + stderr
    report = json.loads(stdout)
    assert report["ok"] and report["nodes"] == 5
    for mode in ("host-gw", "vxlan"):
        assert set(report[mode]) == {"converge", "noop", "remove"}
        assert all(ms > 0 for ms in report[mode].values())
    assert namespaces_named(f"pycni-bbe-{pid}-") == []
