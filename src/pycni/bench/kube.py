"""`pycnictl bench kube`: pods on a real cluster, pycni against the Go reference, in the same
set-up.

For each pod network (pycni's DaemonSet; the reference bridge + host-local, pinned and
Debian's) a `lab up --kubernetes` cluster of its own (2 nodes, host-gw, one after the other,
never side by side), then `--waves` times: `kubectl apply` of `--pods` Pods at once, the time
until every one is Ready (seen by polling the API), and their deletion. Per pod, the sandbox
set-up as containerd logs it (RunPodSandbox from its request to its answer, CNI ADD
included), median and p99 over every wave; and the kubelet's own mean of the same
(kubelet_run_podsandbox_duration_seconds), read through the apiserver's node proxy.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime

from .common import nearest_rank, ratio, run_and_print, show_ratio
from .cri import cni_metrics_in

DEFAULT_PODS = 30
DEFAULT_WAVES = 3
NAMESPACE = "bench"
READY_TIMEOUT = 300.0
PAUSE = "registry.k8s.io/pause:3.10.2"
_REQUEST = re.compile(r'time="([^"]+)" level=info msg="RunPodSandbox for name:\\"([^\\]+)\\".*'
                      rf'namespace:\\"{NAMESPACE}\\"(.*)"$')  # fmt: skip
_SANDBOX_METRIC = "kubelet_run_podsandbox_duration_seconds"
CNI_ADD = "set_up_pod"  # containerd's operation_type for a sandbox's CNI ADD


class BenchError(Exception):
    pass


def pods_manifest(n: int, wave: int) -> str:
    """n bare Pods, one pause container each: what is timed is the pod network's part."""
    import yaml  # not at import: `pycnictl` builds its parser in images without PyYAML

    docs = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}]
    for i in range(n):
        docs.append({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": f"w{wave}-p{i}", "namespace": NAMESPACE,
                         "labels": {"bench": "kube", "wave": str(wave)}},
            "spec": {
                "containers": [{"name": "pause", "image": PAUSE, "imagePullPolicy": "Never"}],
                "terminationGracePeriodSeconds": 0,
            },
        })  # fmt: skip
    return yaml.safe_dump_all(docs)


def sandbox_seconds(log: str, names: set[str]) -> dict[str, float]:
    """Per pod of `names`, containerd's RunPodSandbox time from its log lines: the request,
    then the answer (`... returns sandbox id`)."""
    started: dict[str, datetime] = {}
    took: dict[str, float] = {}
    for line in log.splitlines():
        m = _REQUEST.search(line)
        if not m or m.group(2) not in names:
            continue
        when = datetime.fromisoformat(m.group(1)[:26].rstrip("Z"))
        if "returns sandbox id" in m.group(3):
            if m.group(2) in started:
                took[m.group(2)] = (when - started[m.group(2)]).total_seconds()
        else:
            started[m.group(2)] = when
    return took


def kubelet_sandbox_metric(kubectl: Callable[..., str], node: str) -> tuple[float, int]:
    """(sum seconds, count) of the kubelet's RunPodSandbox histogram on `node`."""
    text = kubectl("get", "--raw", f"/api/v1/nodes/{node}/proxy/metrics")
    total, count = 0.0, 0
    for line in text.splitlines():
        if line.startswith(_SANDBOX_METRIC + "_sum"):
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith(_SANDBOX_METRIC + "_count"):
            count += int(float(line.rsplit(" ", 1)[1]))
    return total, count


def _wave(lab, kubectl, n: int, wave: int, progress) -> dict:
    from ..lab.kube.node import NodeContainerd

    names = {f"w{wave}-p{i}" for i in range(n)}
    before = {node.name: kubelet_sandbox_metric(kubectl, node.name) for node in lab.nodes}
    cni_before = {node.name: cni_metrics_in(node.netns) for node in lab.nodes}
    started = time.monotonic()
    kubectl("apply", "-f", "-", input=pods_manifest(n, wave))
    ready: set[str] = set()
    while ready != names:
        if time.monotonic() - started > READY_TIMEOUT:
            raise BenchError(f"wave {wave}: {len(names - ready)} pods not Ready in "
                             f"{READY_TIMEOUT:.0f} s")  # fmt: skip
        items = json.loads(kubectl("get", "pods", "-n", NAMESPACE, "-l", f"wave={wave}",
                                   "-o", "json"))["items"]  # fmt: skip
        ready = {
            p["metadata"]["name"]
            for p in items
            if any(
                c["type"] == "Ready" and c["status"] == "True"
                for c in p.get("status", {}).get("conditions", [])
            )  # fmt: skip
        }
        time.sleep(0.1)
    all_ready = time.monotonic() - started
    after = {node.name: kubelet_sandbox_metric(kubectl, node.name) for node in lab.nodes}
    cni_after = {node.name: cni_metrics_in(node.netns) for node in lab.nodes}
    sandboxes: dict[str, float] = {}
    for node in lab.nodes:
        with open(NodeContainerd(node).log_file, errors="replace") as f:
            sandboxes.update(sandbox_seconds(f.read(), names))
    if set(sandboxes) != names:
        raise BenchError(f"wave {wave}: containerd logged {len(sandboxes)} of {n} sandboxes")
    deleting = time.monotonic()
    kubectl("delete", "pods", "-n", NAMESPACE, "-l", f"wave={wave}", "--wait=true",
            "--timeout=300s")  # fmt: skip
    deleted = time.monotonic() - deleting
    add = [  # (seconds, calls) of CNI ADD in this wave, summed over the nodes
        sum(cni_after[x].get(CNI_ADD, (0.0, 0.0))[i] - cni_before[x].get(CNI_ADD, (0.0, 0.0))[i]
            for x in cni_after)
        for i in (0, 1)
    ]  # fmt: skip
    k_sum = sum(after[x][0] - before[x][0] for x in after)
    k_count = sum(after[x][1] - before[x][1] for x in after)
    progress(f"  wave {wave}: {n} pods Ready in {all_ready:.2f} s, deleted in {deleted:.2f} s")
    return {
        "all_ready_s": round(all_ready, 3),
        "deleted_s": round(deleted, 3),
        "sandbox_ms": sorted(round(s * 1000, 1) for s in sandboxes.values()),
        "kubelet_sandbox_mean_ms": round(k_sum / k_count * 1000, 1) if k_count else None,
        # containerd's CNI ADD: the pod network's own part of each sandbox
        "cni_add_mean_ms": round(add[0] / add[1] * 1000, 1) if add[1] else None,
    }


def _mean_of(values: list) -> float | None:
    known = [v for v in values if v is not None]
    return round(statistics.mean(known), 1) if known else None


def measure_variant(cni: str, pods: int, waves: int, nodes: int, progress) -> dict:
    from ..lab.kube import controlplane as cp
    from ..lab.kube.lifecycle import bring_up
    from ..lab.lifecycle import teardown
    from ..lab.model import Lab

    prefix = f"pycnik{os.getpid() % 100000}"
    state = tempfile.mkdtemp(prefix=f"{prefix}-", dir="/tmp")  # short: socket paths live there
    lab = Lab.plan(prefix, state, nodes, 0, backend="host-gw")
    lab.kubernetes, lab.cni = True, cni
    progress(f"{cni}: bringing up a {nodes}-node cluster")
    try:
        marks = bring_up(lab, say=lambda m: None)

        def kubectl(*args: str, input: str | None = None) -> str:
            return cp.kubectl(lab, *args, input=input, timeout=READY_TIMEOUT).stdout

        results = [_wave(lab, kubectl, pods, w, progress) for w in range(waves)]
    finally:
        teardown(lab.prefix, lab.state_dir)
        shutil.rmtree(state, ignore_errors=True)
    samples = sorted(s for r in results for s in r["sandbox_ms"])
    kubelet = [r["kubelet_sandbox_mean_ms"] for r in results if r["kubelet_sandbox_mean_ms"]]
    return {
        "cni": cni,
        "up_s": round(max(marks.values()), 1),
        "waves": results,
        "all_ready_s": statistics.median(r["all_ready_s"] for r in results),
        "deleted_s": statistics.median(r["deleted_s"] for r in results),
        "sandbox_median_ms": statistics.median(samples),
        "sandbox_p99_ms": nearest_rank(samples, 0.99),
        "kubelet_sandbox_mean_ms": round(statistics.mean(kubelet), 1) if kubelet else None,
        "cni_add_mean_ms": _mean_of([r["cni_add_mean_ms"] for r in results]),
    }


def _version(cni: str) -> tuple[int, ...]:
    return tuple(int(x) for x in cni.removeprefix("reference-").split(".") if x.isdigit())


def bench(cnis: list[str], pods: int, waves: int, nodes: int, progress) -> dict:
    rows = [measure_variant(c, pods, waves, nodes, progress) for c in cnis]
    # The baseline: the newest reference measured (the pinned one, beside Debian's).
    refs = [r for r in rows if r["cni"].startswith("reference-")]
    base = max(refs, key=lambda r: _version(r["cni"]), default=None)
    for row in rows:
        for key in ("all_ready_s", "sandbox_median_ms", "sandbox_p99_ms", "cni_add_mean_ms"):
            row[f"{key}_ratio"] = ratio(row[key], base[key]) if base else None
    return {
        "ok": True,
        "pods": pods,
        "waves": waves,
        "nodes": nodes,
        "baseline": base["cni"] if base else None,
        "rows": rows,
    }


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def format_table(report: dict) -> str:
    head = (f"{report['pods']} pods applied at once, {report['waves']} waves, "
            f"{report['nodes']} nodes (host-gw); ratios against {report['baseline']}")  # fmt: skip
    lines = [
        head,
        "",
        f"{'pod network':<18} {'all Ready s':>12} {'ratio':>6} {'sandbox median ms':>18} "
        f"{'ratio':>6} {'p99 ms':>8} {'ratio':>6} {'kubelet mean ms':>16} "
        f"{'CNI ADD ms':>11} {'ratio':>6} {'deleted s':>10}",
    ]
    for r in report["rows"]:
        kubelet = "-" if r["kubelet_sandbox_mean_ms"] is None else f"{r['kubelet_sandbox_mean_ms']}"
        lines.append(
            f"{r['cni']:<18} {r['all_ready_s']:>12.2f} {show_ratio(r['all_ready_s_ratio']):>6} "
            f"{r['sandbox_median_ms']:>18.1f} {show_ratio(r['sandbox_median_ms_ratio']):>6} "
            f"{r['sandbox_p99_ms']:>8.1f} {show_ratio(r['sandbox_p99_ms_ratio']):>6} "
            f"{kubelet:>16} {_ms(r['cni_add_mean_ms']):>11} "
            f"{show_ratio(r['cni_add_mean_ms_ratio']):>6} {r['deleted_s']:>10.2f}"
        )
    return "\n".join(lines) + "\n"


def run(args) -> int:
    if os.geteuid() != 0:
        print("pycnictl bench kube: needs root (network namespaces)", file=sys.stderr)
        return 2
    from ..harness.kube import KubeNotBuilt
    from ..lab.kube.commands import NEEDED
    from ..lab.kube.reference import variants
    from ..lab.model import LabError

    known = ["pycni", *variants()]
    cnis = args.cni or known
    unknown = [c for c in cnis if c not in known]
    if unknown or args.pods < 1 or args.waves < 1 or args.nodes < 1:
        print(f"pycnictl bench kube: --cni one of {', '.join(known)}; --pods, --waves and "
              "--nodes at least 1", file=sys.stderr)  # fmt: skip
        return 2
    try:
        from ..harness.kube import binary

        for name in NEEDED:
            binary(name)
    except KubeNotBuilt as exc:
        print(f"pycnictl bench kube: {exc}", file=sys.stderr)
        return 2
    return run_and_print(
        "pycnictl bench kube",
        lambda progress: bench(cnis, args.pods, args.waves, args.nodes, progress),
        format_table,
        args,
        (BenchError, LabError, KubeNotBuilt, subprocess.CalledProcessError),
        "clusters torn down",
    )


__all__ = ["bench", "format_table", "run"]
