"""What every benchmark command does around its measurements: SIGTERM and SIGHUP become
KeyboardInterrupt (so the cleanup in `finally` blocks runs and nothing is left behind), progress
goes to stderr, the report to stdout as a table or JSON."""

from __future__ import annotations

import json
import math
import signal
import sys
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
    as_json: bool,
    errors: tuple[type[Exception], ...],
    on_interrupt: str,
) -> int:
    """``measure(progress)`` -> report (with "ok"); 0 when ok, 1 on failure, 130 when stopped."""
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
    print(json.dumps(report, indent=2) if as_json else format_table(report))
    return 0 if report["ok"] else 1
