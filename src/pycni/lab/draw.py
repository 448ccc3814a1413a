"""The lab as a picture (`pycnictl lab draw --svg FILE`, `lab up --svg FILE`): the outside and
the router, the underlay(s), each node with its subnets, bridge and pods, and the measured
connectivity as a matrix per address family. Drawn with drawsvg (the optional `draw` extra)."""

from __future__ import annotations

from .model import Lab
from .probes import Probe

NODE_W, NODE_GAP, POD_H, CELL = 250, 28, 34, 22
OK, FAILED, NONE = "#5aa95a", "#d9534f", "#eeeeee"
DENIED = "#5b8bd0"  # closed, as the NetworkPolicies say: an expected denial
FILLS = {"ok": OK, "failed": FAILED, "denied": DENIED}
LEGEND_H = 4 * 22
INK, MUTED, BOX = "#222222", "#666666", "#f6f8fb"


def family_of(probe: Probe) -> int:
    """Probe kinds read "pod->pod6 x-node", "node->pod6", "pod->outside6" over IPv6."""
    return 6 if probe.kind.split()[0].endswith("6") else 4


def matrix(lab: Lab, probes: list[Probe], family: int) -> tuple[list, list, dict]:
    """Rows (sources: pods, then nodes), columns (destinations: pods, then the outside) and
    {(row, column): verdict} ("ok", "denied" or "failed") for the probes of one family."""
    pods = [p.label for n in lab.nodes for p in n.pods]
    rows = pods + [n.name for n in lab.nodes]
    cols = pods + ["outside"]
    cells = {(p.src_label, p.dst_label): p.verdict for p in probes if family_of(p) == family}
    return rows, cols, cells


def lab_svg(lab: Lab, probes: list[Probe] | None = None) -> str:
    import drawsvg as draw

    probes = probes or []
    families = [4, 6] if lab.ipv6 else [4]
    n = max(1, len(lab.nodes))
    pods_max = max([len(node.pods) for node in lab.nodes] + [1])
    pods_all = sum(len(node.pods) for node in lab.nodes)
    legend_w = 210
    width = max(
        n * (NODE_W + NODE_GAP) + NODE_GAP, 720, 110 + (pods_all + 1) * CELL + 30 + legend_w
    )
    underlays = sorted({node.lan for node in lab.nodes})
    bus_y = {lan: 150 + 26 * i for i, lan in enumerate(underlays)}
    nodes_y = 150 + 26 * len(underlays) + 24
    node_h = 96 + pods_max * (POD_H + 6)
    sources = sum(len(node.pods) for node in lab.nodes) + len(lab.nodes)
    matrix_h = (70 + max(sources * CELL, LEGEND_H) + 50) * (len(families) if probes else 0)
    height = nodes_y + node_h + 40 + matrix_h
    d = draw.Drawing(width, height, font_family="sans-serif", font_size=12)
    d.append(draw.Rectangle(0, 0, width, height, fill="white"))

    def text(s: str, x: float, y: float, size: int = 12, **kw) -> None:
        d.append(draw.Text(s, size, x, y, fill=kw.pop("fill", INK), **kw))

    def box(x: float, y: float, w: float, h: float, **kw) -> None:
        d.append(draw.Rectangle(x, y, w, h, rx=6, stroke=kw.pop("stroke", "#8899aa"), **kw))

    cidrs = f"{lab.network} and {lab.network6}" if lab.ipv6 else lab.network
    title = f"pycni lab {lab.prefix}: {len(lab.nodes)} nodes, backend {lab.backend}"
    text(title, 16, 24, 16, font_weight="bold")
    text(f"cluster CIDR {cidrs}, datastore {lab.datastore}", 16, 42, 12, fill=MUTED)

    # The outside (the "internet") and the router that joins it to the underlays.
    mid = width / 2
    box(16, 58, 210, 54, fill="#fff7e6")
    text("outside", 26, 78, 13, font_weight="bold")
    outside = lab.outside_ip + (f"  {lab.outside_ip6}" if lab.ipv6 else "")
    text(outside, 26, 96, 11)
    box(mid - 90, 58, 180, 54, fill="#eef3ff")
    text("router", mid - 80, 78, 13, font_weight="bold")
    text(f"netns {lab.router}", mid - 80, 96, 11, fill=MUTED)
    d.append(draw.Line(226, 85, mid - 90, 85, stroke=INK, stroke_width=2))
    for lan, y in bus_y.items():
        d.append(draw.Line(NODE_GAP / 2, y, width - NODE_GAP / 2, y, stroke=INK, stroke_width=3))
        d.append(draw.Line(mid, 112, mid, y, stroke=INK, stroke_width=2))
        text(f"underlay {lan}", width - NODE_GAP, y - 6, 11, text_anchor="end", fill=MUTED)

    for i, node in enumerate(lab.nodes):
        x = NODE_GAP + i * (NODE_W + NODE_GAP)
        cx = x + NODE_W / 2
        d.append(draw.Line(cx, bus_y[node.lan], cx, nodes_y, stroke=INK, stroke_width=2))
        box(x, nodes_y, NODE_W, node_h, fill=BOX)
        text(node.name, x + 10, nodes_y + 20, 14, font_weight="bold")
        text(
            f"netns {node.netns}", x + NODE_W - 10, nodes_y + 20, 10, text_anchor="end", fill=MUTED
        )
        lan = node.lan_ip + (f"  {node.lan6_ip}" if lab.ipv6 and node.lan6_ip else "")
        text(f"underlay {lan}", x + 10, nodes_y + 38, 11)
        text(f"pods {node.subnet or '?'}", x + 10, nodes_y + 54, 11)
        if lab.ipv6 and node.subnet6:
            text(f"pods {node.subnet6}", x + 10, nodes_y + 68, 11)
        bridge_y = nodes_y + 82
        d.append(
            draw.Line(x + 10, bridge_y, x + NODE_W - 10, bridge_y, stroke="#336", stroke_width=2)
        )
        text(f"cni0 {node.gateway or ''}", x + NODE_W - 10, bridge_y - 4, 10, text_anchor="end")
        for j, pod in enumerate(node.pods):
            py = bridge_y + 10 + j * (POD_H + 6)
            d.append(draw.Line(x + 24, bridge_y, x + 24, py + POD_H / 2, stroke="#336"))
            box(x + 34, py, NODE_W - 46, POD_H, fill="white", stroke="#99aabb")
            text(pod.label, x + 42, py + 14, 12, font_weight="bold")
            addresses = pod.ip + (f"  {pod.ip6}" if lab.ipv6 and pod.address6 else "")
            text(addresses or "(no address)", x + 42, py + 28, 10)

    y = nodes_y + node_h + 40
    for family in families if probes else []:
        rows, cols, cells = matrix(lab, probes, family)
        heading = (
            f"connectivity over IPv{family}: row reaches column (measured, judged against "
            "the policies)"
        )
        text(heading, 16, y, 13, font_weight="bold")
        left, top = 110, y + 70
        for c, name in enumerate(cols):
            cx = left + c * CELL + CELL / 2
            text(name, cx, top - 6, 10, transform=f"rotate(-45 {cx} {top - 6})")
        for r, name in enumerate(rows):
            ry = top + r * CELL
            text(name, left - 6, ry + 15, 10, text_anchor="end")
            for c, col in enumerate(cols):
                fill = FILLS.get(cells.get((name, col), ""), NONE)
                d.append(
                    draw.Rectangle(
                        left + c * CELL,
                        ry,
                        CELL - 2,
                        CELL - 2,
                        fill=fill,
                        data_cell=f"{name}>{col}",
                    )
                )
        legend_x = left + len(cols) * CELL + 30
        for k, (fill, label) in enumerate(
            (
                (OK, "reachable"),
                (DENIED, "denied by policy (expected)"),
                (FAILED, "FAILED"),
                (NONE, "not probed"),
            )
        ):
            d.append(draw.Rectangle(legend_x, top + k * 22, 14, 14, fill=fill))
            text(label, legend_x + 20, top + k * 22 + 12, 11)
        y = top + max(len(rows) * CELL, LEGEND_H) + 50
    return d.as_svg()


def write_svg(lab: Lab, probes: list[Probe] | None, path: str) -> None:
    svg = lab_svg(lab, probes)
    with open(path, "w") as f:
        f.write(svg)
