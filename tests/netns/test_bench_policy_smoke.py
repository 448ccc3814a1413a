"""`pycnictl bench policy` end to end, tiny (a two-node lab, a few policies, 20 pods on the scale
node, one short data-path round): every part measures something, the JSON, the table and the
Markdown section are well formed, and nothing is left behind (namespaces, nft monitors,
servers, the temporary directory). No timing is asserted: the machine is too noisy for that."""

from __future__ import annotations

import glob
import json
import subprocess

import pytest

from conftest import namespaces_named, run_bench

pytestmark = [pytest.mark.netns, pytest.mark.serial]


def _helpers() -> set[str]:
    """Pids of what the benchmark runs beside the labs: `nft monitor` (execed in place by `ip
    netns exec`, so its command line names no namespace) and the connect servers."""
    pids = set()
    for pattern in ("^nft monitor$", "s.listen\\(128\\)"):
        out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
        pids |= set(out.split())
    return pids


def test_bench_policy_tiny(tmp_path):
    from pycni.bench.policy import format_table

    before = set(glob.glob("/tmp/pycni-bench-policy-*"))
    helpers = _helpers()
    markdown = tmp_path / "bench.md"
    markdown.write_text("# Benchmarks\n\nprose\n")
    pid, status, stdout, stderr = run_bench(
        "policy",
        *("--nodes", "2", "--counts", "1", "3", "--repeat", "2", "--fake-pods", "3"),
        *("--scale-pods", "20", "--scale-policies", "6", "--scale-repeat", "2"),
        *("--datapath-policies", "3", "--rounds", "1", "--seconds", "1", "--connects", "20"),
        *("--json", "--markdown", str(markdown)),
    )
    assert namespaces_named(f"pycnib{pid}") == []
    assert set(glob.glob("/tmp/pycni-bench-policy-*")) <= before
    assert _helpers() <= helpers  # its nft monitors and servers are gone
    assert status == 0, stdout + stderr
    report = json.loads(stdout)
    assert report["ok"]

    enforce = report["enforce"]
    assert enforce["nodes"] == 2 and [r["policies"] for r in enforce["rows"]] == [1, 3]
    for row in enforce["rows"]:
        for op in ("add", "delete"):
            assert row[op]["n"] == 2 and 0 <= row[op]["median_ms"] <= row[op]["max_ms"], row
        assert len(row["per_node_add_median_ms"]) == 2

    scale = report["scale"]["results"]
    assert (scale[0]["pods"], scale[0]["policies"]) == (20, 6)
    for row in scale:
        table = row["table"]
        assert table["lines"] > 0 and table["bytes"] > 0 and table["rules"] > 0
        assert table["sets"] > 0 and table["set_elements"] >= row["pods"]
        assert row["sizes"]["pods"] == row["pods"] and row["sizes"]["policies"] == row["policies"]
        change = row["pod_change"]
        assert change["n"] == 2 and 0 < change["median_ms"] <= change["max_ms"]
        assert {"load", "compile", "render", "install"} <= set(change["steps_median_ms"])
        assert "unchanged" in row["noop"]["steps_median_ms"]  # nothing changed: no compile

    data = report["datapath"]
    assert data["enforced"] and data["policies"] == 3
    assert {p["path"] for p in data["paths"]} == {"same-node", "cross-node"}
    for row in data["paths"]:
        assert not row["errors"], row
        for state in ("none", "policies"):
            v = row[state]
            assert v["gbps"] > 0 and v["connects"] == 20
            assert 0 < v["connect_median_us"] <= v["connect_p99_us"]
        assert row["throughput_ratio"] > 0 and row["connect_median_ratio"] > 0

    targets = report["targets"]
    assert len(targets) == 2 + 2 + 1 and all(isinstance(t["pass"], bool) for t in targets)
    text = format_table(report)
    assert text.count("PASS") + text.count("FAIL") == 5
    assert "write to enforcement" in text and "data path" in text
    written = markdown.read_text()
    assert written.startswith("# Benchmarks\n\nprose\n")
    assert "<!-- BEGIN pycnictl bench policy -->" in written
    assert "<!-- END pycnictl bench policy -->" in written
