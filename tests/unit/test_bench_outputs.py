"""The benchmarks' Markdown sections and ratio charts (`--markdown FILE`, `--chart FILE`)."""

from __future__ import annotations

import argparse
import os
import xml.etree.ElementTree as ET
from ipaddress import ip_address

from pycni.bench.chart import chart_svg, ratios
from pycni.bench.common import bench_name, run_and_print, write_section

THROUGHPUT_LIKE = {
    "ok": True,
    "results": [
        {"path": "pycni-same-node", "streams": 1, "gbps": 40.0, "ratio": 0.93, "samples": [1.0]},
        {"path": "pycni-host-gw", "streams": 4, "gbps": 30.0, "ratio": None},
    ],
    "versus": [{"pycni": "pycni-host-gw", "reference": "ref-host-gw", "streams": 1, "ratio": 0.91}],
}
LATENCY_LIKE = {
    "ok": False,
    "rows": [
        {
            "plugin": "pycni-agent",
            "ipMasq": True,
            "ratio": {"add": 0.5, "del": 0.35},
            "storm": {"ratio": {"add": 0.77, "del": None}},
        }
    ],
}


def test_ratios_are_named_by_their_rows():
    assert ratios(THROUGHPUT_LIKE) == [
        ("pycni-same-node 1 stream", 0.93),
        ("pycni-host-gw vs ref-host-gw 1 stream", 0.91),
    ]
    assert ratios(LATENCY_LIKE) == [
        ("pycni-agent ipMasq=on add", 0.5),
        ("pycni-agent ipMasq=on del", 0.35),
        ("pycni-agent ipMasq=on storm add", 0.77),
    ]


def test_the_chart_is_svg_naming_every_bar():
    bars = ratios(LATENCY_LIKE)
    root = ET.fromstring(chart_svg("pycnictl bench: ratios", bars, "note"))
    assert root.tag.endswith("svg")
    texts = {t.text for t in root.iter() if t.tag.endswith("text")}
    for label, value in bars:
        assert label in texts and f"{value:.2f}x" in texts
    assert "1.0x" in texts


def test_a_section_is_replaced_in_place_and_the_rest_of_the_file_kept(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text(
        "# Benchmarks\n\nintro\n\n<!-- BEGIN pycnictl bench latency -->\nold\n"
        "<!-- END pycnictl bench latency -->\n\nafter\n"
    )
    write_section(str(doc), "latency", "new table")
    write_section(str(doc), "throughput", "tp table")
    text = doc.read_text()
    assert "old" not in text and "intro" in text and "after" in text
    assert text.count("<!-- BEGIN pycnictl bench latency -->") == 1
    assert "<!-- BEGIN pycnictl bench latency -->\nnew table\n<!-- END pycnictl" in text
    assert text.rstrip().endswith(
        "<!-- BEGIN pycnictl bench throughput -->\ntp table\n<!-- END pycnictl bench throughput -->"
    )


def test_run_and_print_writes_the_table_and_the_chart(tmp_path, capsys):
    md, svg = tmp_path / "b.md", tmp_path / "c.svg"
    args = argparse.Namespace(json=False, markdown=str(md), chart=str(svg))
    code = run_and_print(
        "pycnictl bench throughput",
        lambda progress: THROUGHPUT_LIKE,
        lambda report: "PATH  RATIO\nsame  0.93x",
        args,
        (RuntimeError,),
        "",
    )
    assert code == 0
    assert "PATH  RATIO\nsame  0.93x" in capsys.readouterr().out
    text = md.read_text()
    assert "<!-- BEGIN pycnictl bench throughput -->" in text and "same  0.93x" in text
    assert "pycni-same-node 1 stream" in svg.read_text()
    assert bench_name("pycnictl bench") == "latency"


def test_the_convergence_cluster_cidr_holds_every_node_clear_of_the_underlay():
    """`bench convergence --nodes N` up to 5,000: a cluster CIDR with a /24 for each remote
    node, the agent's own and spare ones, the smallest that does (a /16 at least), never
    overlapping the underlay its nodes' addresses come from."""
    from pycni.bench import convergence

    assert convergence.MAX_NODES >= 5000
    for nodes, prefix in ((1, 16), (250, 16), (251, 15), (1000, 14), (5000, 11)):
        cidr = convergence.cluster_cidr(nodes)
        assert cidr.prefixlen == prefix, nodes
        assert 2 ** (24 - prefix) >= nodes + 1 + convergence.SPARE_SUBNETS
        assert not cidr.overlaps(convergence.UNDERLAY)
    records = convergence.fake_records(convergence.MAX_NODES, "vxlan")
    addresses = [r.node_ips[0] for r in records]
    assert len(set(addresses)) == len(addresses)
    assert all(ip_address(a) in convergence.UNDERLAY for a in addresses)
    assert str(convergence.NODE_IP) not in addresses and str(convergence.PEER_IP) not in addresses


def test_the_convergence_prefix_names_its_namespaces_and_is_checked(capsys):
    """`--prefix` (default pycnicv) starts every namespace and directory name the run makes, so
    runs on a shared machine are told apart; a prefix that cannot be a name is refused before
    anything is made."""
    from pycni.bench import convergence
    from pycni.ctl.main import build_parser

    parser = build_parser()
    assert parser.parse_args(["bench", "convergence"]).prefix == "pycnicv"
    args = parser.parse_args(["bench", "convergence", "--prefix", "Nop-1"])
    assert convergence.run(args) == 2
    assert "--prefix" in capsys.readouterr().err or os.geteuid() != 0
