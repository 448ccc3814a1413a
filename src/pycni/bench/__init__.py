"""`pycnictl bench`: how fast pycni is, beside a baseline and the Go reference plugins.

- `pycnictl bench [options]`: ADD/DEL latency and storms (latency.py);
- `pycnictl bench throughput [options]`: TCP throughput of pod paths with iperf3
  (throughput.py);
- `pycnictl bench convergence [options]`: the agent's reconcile loop when 100 nodes appear
  and leave at once (convergence.py);
- `pycnictl bench reconcile [options]`: the route backends alone (reconcile.py);
- `pycnictl bench cri [options]`: RunPodSandbox / StopPodSandbox through containerd's CRI
  (cri.py);
- `pycnictl bench podman [options]`: `podman run --rm ... true` with pycni against the
  reference plugins and no network (podman.py);
- `pycnictl bench soak [options]`: random ADD/DEL/CHECK/GC with the agent SIGKILLed now and
  then, the invariant checked at quiet points (soak.py).
"""

from __future__ import annotations

from . import convergence, cri, latency, podman, reconcile, soak, throughput


def register(sub) -> None:
    bench = latency.register(sub)
    # Optional: plain `pycnictl bench [options]` keeps running the latency benchmark.
    forms = bench.add_subparsers(
        dest="bench_form",
        metavar="{throughput,convergence,reconcile,cri,podman,soak}",
        title="other benchmarks",
    )
    throughput.register(forms)
    convergence.register(forms)
    reconcile.register(forms)
    cri.register(forms)
    podman.register(forms)
    soak.register(forms)


__all__ = ["register"]
