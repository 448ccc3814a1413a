"""`pycnictl bench` end to end, tiny (3 pods, a storm of 5): it measures all the plugins
(pycni through its agent, from the Python launcher and the native executable, pycni
standalone, the Go reference), verifies and cleans up."""

from __future__ import annotations

import json

import pytest

from conftest import namespaces_named, run_bench
from pycni.native.build import compiler

pytestmark = [pytest.mark.netns, pytest.mark.reference, pytest.mark.serial]

# The pycni-native rows are measured where a C compiler is found.
PLUGINS = (
    "pycni-agent",
    *(("pycni-native",) if compiler() else ()),
    "pycni-standalone",
    "reference",
)
ROWS = {(p, m) for p in PLUGINS for m in (False, True)}


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "State:\tZ" not in f.read()
    except FileNotFoundError:
        return False


def test_bench_tiny(reference_plugins):
    from pycni.bench.latency import format_table

    pid, status, stdout, stderr = run_bench(
        "--pods", "3", "--storm", "5", "--json", "--reference-dir", reference_plugins
    )
    # Its namespaces are named after its pid: none may be left.
    assert namespaces_named(f"pycnib{pid}") == []
    assert status == 0, stdout + stderr
    report = json.loads(stdout)
    assert report["ok"] and report["pods"] == 3 and report["storm"] == 5
    assert set(report["exec_floor_ms"]) == {"setns", "nsenter", "ip-netns-exec"}
    rows = {(r["plugin"], r["ipMasq"]): r for r in report["rows"]}
    assert set(rows) == ROWS
    for key, row in rows.items():
        assert row["ok"] and not row["problems"], (key, row["problems"])
        for op in ("add", "del"):
            assert row[op]["n"] == 3 and 0 < row[op]["median"] <= row[op]["p95"], (key, row)
            assert len(row["samples"][op]) == 3
        storm = row["storm"]
        assert storm["n"] == 5 and storm["add_failures"] == 0 and storm["del_failures"] == 0
        assert storm["addresses_distinct"] and storm["freed"], (key, storm)
        assert storm["add_wall_ms"] > 0 and storm["del_wall_ms"] > 0
        if key[0] == "reference":
            assert row["ratio"] == {"add": 1.0, "del": 1.0}
            assert storm["ratio"] == {"add": 1.0, "del": 1.0}
            assert row["agent"] is None
        else:
            assert row["ratio"]["add"] > 0 and row["ratio"]["del"] > 0
            assert storm["ratio"]["add"] > 0 and storm["ratio"]["del"] > 0
        if key[0] in ("pycni-agent", "pycni-native"):
            agent = row["agent"]
            assert 0 < agent["rss_mb_after_storm"] < 1024
            assert set(agent["memory_kb"]) >= {"start", "sequential", "storm", "end"}
            assert not _alive(agent["pid"])  # the bench stopped its agents
        else:
            assert row["agent"] is None
    targets = report["targets"]
    assert len(targets) == 5 and all(isinstance(t["pass"], bool) for t in targets)
    assert all(t["value"] is not None for t in targets)
    # For what `pycnictl install` writes here: native where a compiler is found.
    assert {t["plugin"] for t in targets} == {"pycni-native" if compiler() else "pycni-agent"}
    table = format_table(report)
    assert "ADD med" in table and "DEL p95" in table and "ADD wall" in table
    assert len(
        [line for line in table.splitlines() if line.startswith(tuple(p + " " for p in PLUGINS))]
    ) == 2 * len(ROWS)
    assert table.count("PASS") + table.count("FAIL") == 5
