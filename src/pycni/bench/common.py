"""What every benchmark command does around its measurements: SIGTERM and SIGHUP become
KeyboardInterrupt (so the cleanup in `finally` blocks runs and nothing is left behind), progress
goes to stderr, the report to stdout as a table or JSON, and on request into a Markdown file
(`--markdown FILE`, its own section between markers, so docs/benchmarks.md is regenerated,
never hand-edited) and an SVG chart of its ratios (`--chart FILE`)."""

from __future__ import annotations

import json
import math
import os
import platform
import re
import signal
import sys
import time
from collections.abc import Callable


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b to two decimals, None when either is missing (or b is 0)."""
    return round(a / b, 2) if a is not None and b else None


def show_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def nearest_rank(ordered: list[float], q: float) -> float:
    """The q-quantile of sorted, non-empty samples by the nearest-rank method."""
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def run_and_print(
    command: str,
    measure: Callable[[Callable[[str], None]], dict],
    format_table: Callable[[dict], str],
    args,
    errors: tuple[type[Exception], ...],
    on_interrupt: str,
) -> int:
    """``measure(progress)`` -> report (with "ok"); 0 when ok, 1 on failure, 130 when stopped.
    `args` carries the output options: json, and markdown and chart (files, or None)."""
    old = {s: signal.signal(s, _raise_interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        report = measure(lambda m: print(m, file=sys.stderr, flush=True))
    except errors as exc:
        print(f"{command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{command}: interrupted; {on_interrupt}", file=sys.stderr)
        return 130
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    table = format_table(report)
    print(json.dumps(report, indent=2) if args.json else table)
    name = bench_name(command)
    if getattr(args, "markdown", None):
        write_section(args.markdown, name, markdown_section(command, table, report["ok"]))
        print(f"{command}: wrote its section of {args.markdown}", file=sys.stderr)
    if getattr(args, "chart", None):
        from .chart import chart_svg, ratios

        svg = chart_svg(f"{command}: ratios", ratios(report), provenance())
        with open(args.chart, "w") as f:
            f.write(svg)
        print(f"{command}: wrote the chart {args.chart}", file=sys.stderr)
    return 0 if report["ok"] else 1


def bench_name(command: str) -> str:
    """ "pycnictl bench throughput" -> "throughput"; plain "pycnictl bench" is "latency"."""
    words = command.split()
    return words[2] if len(words) > 2 else "latency"


def provenance() -> str:
    # The load average says how busy the machine was: ratios hold up under load, absolutes don't.
    return (
        f"measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {os.cpu_count()} "
        f"CPUs (load {os.getloadavg()[0]:.1f}), kernel {platform.release()}"
    )


def markdown_section(command: str, table: str, ok: bool) -> str:
    verdict = "all checks passed" if ok else "some checks FAILED"
    return (
        f"`{command}`, {provenance()}; {verdict}. Regenerate with `{command} --markdown FILE`.\n"
        f"\n```\n{table.rstrip()}\n```\n"
    )


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- BEGIN pycnictl bench {name} -->", f"<!-- END pycnictl bench {name} -->"


def write_section(path: str, name: str, body: str) -> None:
    """Replace the text between this benchmark's markers in `path` (appending the section,
    markers and all, when the file has none), leaving the rest of the file as it was."""
    begin, end = _markers(name)
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        text = ""
    block = f"{begin}\n{body.rstrip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = (text.rstrip() + "\n\n" if text.strip() else "") + block + "\n"
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
