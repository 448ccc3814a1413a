"""A benchmark's ratios as an SVG bar chart (`--chart FILE`), with drawsvg (the optional
`draw` extra). A report holds its ratios under "ratio" keys, a number or {metric: number};
the bars are named by the row's identifying fields, so every benchmark gets a chart for free."""

from __future__ import annotations

# Fields that name a row in the benchmarks' reports, in the order they read best.
ROW_NAMES = ("plugin", "containerd", "path", "pycni", "row", "network", "ipMasq", "streams")
SECTIONS = ("storm", "burst")  # nested measurements whose ratios read "storm add"


def ratios(report: dict) -> list[tuple[str, float]]:
    """(label, ratio) for every ratio in the report, in report order; missing ones skipped."""
    found: list[tuple[str, float]] = []

    def name_of(row: dict) -> list[str]:
        parts = []
        for key in ROW_NAMES:
            value = row.get(key)
            if isinstance(value, bool):
                parts.append(f"{key}={'on' if value else 'off'}")
            elif key == "streams" and isinstance(value, int):
                parts.append(f"{value} stream{'s' if value != 1 else ''}")
            elif key == "reference" or isinstance(value, str):
                parts.append(str(value))
        if isinstance(row.get("reference"), str):
            parts.insert(1, f"vs {row['reference']}")
        return parts

    def walk(node, label: list[str]) -> None:
        if isinstance(node, list):
            for item in node:
                walk(item, label)
        elif isinstance(node, dict):
            here = label + name_of(node)
            for key, value in node.items():
                if key == "ratio":
                    metrics = value.items() if isinstance(value, dict) else [("", value)]
                    for metric, number in metrics:
                        if isinstance(number, int | float) and not isinstance(number, bool):
                            found.append((" ".join(p for p in [*here, metric] if p), number))
                elif key in SECTIONS:
                    walk(value, here + [key])
                elif isinstance(value, list | dict) and key not in ("samples", "targets"):
                    walk(value, here)

    walk(report, [])
    return found


def chart_svg(title: str, bars: list[tuple[str, float]], note: str = "") -> str:
    """Horizontal bars, a line at 1.0 (parity with what the ratio divides by)."""
    import drawsvg as draw

    label_w, bar_w, row_h, top = 330, 420, 22, 58
    top_value = max([1.2, *(v for _, v in bars)]) * 1.05
    height = top + row_h * max(1, len(bars)) + 40
    d = draw.Drawing(label_w + bar_w + 90, height, font_family="sans-serif", font_size=12)
    d.append(draw.Rectangle(0, 0, label_w + bar_w + 90, height, fill="white"))
    d.append(draw.Text(title, 16, 12, 22, font_weight="bold"))
    if note:
        d.append(draw.Text(note, 11, 12, 40, fill="#555"))

    def x_of(v: float) -> float:
        return label_w + bar_w * v / top_value

    for i, (label, value) in enumerate(bars):
        y = top + i * row_h
        d.append(draw.Text(label, 12, label_w - 8, y + 15, text_anchor="end"))
        colour = "#4c9a2a" if value <= 1.0 else "#d9822b"
        d.append(draw.Rectangle(label_w, y + 3, x_of(value) - label_w, row_h - 6, fill=colour))
        d.append(draw.Text(f"{value:.2f}x", 11, x_of(value) + 4, y + 15))
    bottom = top + row_h * max(1, len(bars))
    d.append(
        draw.Line(x_of(1.0), top - 4, x_of(1.0), bottom + 4, stroke="#333", stroke_dasharray="4")
    )
    d.append(draw.Text("1.0x", 11, x_of(1.0), bottom + 18, text_anchor="middle"))
    if not bars:
        d.append(draw.Text("no ratios in this report", 12, label_w, top + 15))
    return d.as_svg()
