"""`pycnictl bench` end to end with three pods: it measures, verifies and cleans up."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.netns, pytest.mark.reference]


def _namespaces(prefix: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(prefix)]


def test_bench_three_pods(reference_plugins):
    from pycni.ctl.bench import format_table

    proc = subprocess.Popen(
        [sys.executable, "-c", "from pycni.ctl.main import main; main()",
         "bench", "--pods", "3", "--json", "--reference-dir", reference_plugins],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    # Its namespaces are named after its pid: none may be left.
    assert _namespaces(f"pycnib{proc.pid}") == []
    assert proc.returncode == 0, stdout + stderr
    report = json.loads(stdout)
    assert report["ok"] and report["pods"] == 3
    assert set(report["exec_floor_ms"]) == {"setns", "nsenter", "ip-netns-exec"}
    rows = {(r["plugin"], r["ipMasq"]): r for r in report["rows"]}
    assert set(rows) == {(p, m) for p in ("pycni", "reference") for m in (False, True)}
    for key, row in rows.items():
        assert row["ok"] and not row["problems"], (key, row["problems"])
        for op in ("add", "del"):
            assert row[op]["n"] == 3 and 0 < row[op]["median"] <= row[op]["p95"], (key, row)
        if key[0] == "reference":
            assert row["ratio"] == {"add": 1.0, "del": 1.0}
        else:
            assert row["ratio"]["add"] > 0 and row["ratio"]["del"] > 0
    table = format_table(report)
    assert "ADD med" in table and "DEL p95" in table
    assert len([line for line in table.splitlines()
                if line.startswith(("pycni ", "reference "))]) == 4
