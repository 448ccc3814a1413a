"""The lab's picture: valid SVG that names every node, subnet, pod and address, and whose
matrix cells say what the probes measured."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from pycni.lab.draw import lab_svg
from pycni.lab.model import Lab
from pycni.lab.probes import plan_probes


def _lab(ipv6: bool = False, underlays: int = 1) -> Lab:
    lab = Lab.plan("drawtest", "/nonexistent", 3, 2, underlays=underlays, ipv6=ipv6)
    for i, node in enumerate(lab.nodes, start=1):
        node.subnet = f"10.244.{i}.0/24"
        node.subnet6 = f"fd00:10:244:{i}::/64" if ipv6 else ""
        for j, pod in enumerate(node.pods, start=2):
            pod.address = f"10.244.{i}.{j}/24"
            pod.address6 = f"fd00:10:244:{i}::{j}/64" if ipv6 else ""
    return lab


def _texts(svg: str) -> tuple[ET.Element, str]:
    root = ET.fromstring(svg)
    return root, "\n".join(t.text or "" for t in root.iter() if t.tag.endswith("text"))


def test_the_picture_names_every_node_and_pod_with_their_addresses():
    lab = _lab()
    root, texts = _texts(lab_svg(lab, []))
    assert root.tag.endswith("svg")
    for node in lab.nodes:
        assert node.name in texts and node.subnet in texts and node.lan_ip in texts
        for pod in node.pods:
            assert pod.k8s_name in texts and pod.ip in texts
    assert "outside" in texts and lab.outside_ip in texts and "underlay 192.0.2.0/24" in texts


def test_the_matrix_shows_each_measured_path():
    lab = _lab(ipv6=True, underlays=2)
    probes = plan_probes(lab)
    broken = next(p for p in probes if p.kind == "pod->pod x-node")
    for p in probes:
        p.icmp_ok = p.tcp_ok = p is not broken
        p.peer = p.expect[0]
    root, texts = _texts(lab_svg(lab, probes))
    assert "connectivity over IPv4" in texts and "connectivity over IPv6" in texts
    assert "underlay 198.51.100.0/24" in texts
    for node in lab.nodes:
        assert node.subnet6 in texts
    cells = [e for e in root.iter() if e.get("data-cell")]
    # per family: rows are 6 pods + 3 nodes, columns 6 pods + the outside
    assert len(cells) == 2 * 9 * 7
    red = [e.get("data-cell") for e in cells if e.get("fill") == "#d9534f"]
    assert red == [f"{broken.src_label}>{broken.dst_label}"]
    probed = {(p.src_label, p.dst_label) for p in probes}
    grey = [e.get("data-cell") for e in cells if e.get("fill") == "#eeeeee"]
    assert all(tuple(c.split(">")) not in probed for c in grey)
