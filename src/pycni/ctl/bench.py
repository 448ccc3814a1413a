"""`pycnictl bench`: the arguments of every benchmark; the measurements are pycni.bench's.

- `pycnictl bench [options]`: ADD/DEL latency and storms (bench/latency.py);
- `pycnictl bench throughput`: TCP throughput of pod paths with iperf3 (bench/throughput.py);
- `pycnictl bench convergence`: the agent's reconcile loop when nodes appear and leave at once;
- `pycnictl bench reconcile`: the route backends alone;
- `pycnictl bench cri`: RunPodSandbox / StopPodSandbox through containerd's CRI;
- `pycnictl bench podman`: `podman run --rm ... true` with pycni against the reference;
- `pycnictl bench soak`: random ADD/DEL/CHECK/GC with the agent SIGKILLed now and then;
- `pycnictl bench watch`: the agent's Kubernetes watches, requests per hour and lost events;
- `pycnictl bench policy`: NetworkPolicy, write to enforcement, ruleset size, data path cost;
- `pycnictl bench kube`: pods on a real cluster to Ready, pycni against the reference.
"""

from __future__ import annotations

import argparse

from ..bench import (
    convergence,
    cri,
    latency,
    podman,
    reconcile,
    soak,
    throughput,
    watch,
)
from ..bench import policy as policy_bench


def register(sub) -> None:
    bench = _latency(sub)
    # Optional: plain `pycnictl bench [options]` keeps running the latency benchmark.
    forms = bench.add_subparsers(
        dest="bench_form",
        metavar="{throughput,convergence,reconcile,cri,podman,soak,watch,policy,kube}",
        title="other benchmarks",
    )
    for add in (
        _throughput,
        _convergence,
        _reconcile,
        _cri,
        _podman,
        _soak,
        _watch,
        _policy,
        _kube,
    ):
        add(forms)


def _latency(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "bench",
        help="ADD/DEL latency of pycni (agent, standalone) against the "
        "reference bridge; `bench throughput`: TCP throughput of pod paths",
    )
    p.add_argument(
        "--pods",
        type=int,
        default=latency.DEFAULT_PODS,
        help=f"sequential ADDs (then DELs) per row (default {latency.DEFAULT_PODS})",
    )
    p.add_argument(
        "--storm",
        type=int,
        default=latency.DEFAULT_STORM,
        help=f"concurrent ADDs (then DELs) per row (default {latency.DEFAULT_STORM}, "
        "kubelet's max pods per node); 0 skips the storm",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument(
        "--launch",
        choices=latency.LAUNCH_METHODS,
        default="setns",
        help="how plugins are exec'd in the node namespace (default: setns, the "
        "cheapest; all three floors are measured and reported)",
    )
    p.add_argument(
        "--reference-dir",
        default="/usr/lib/cni",
        help="where the reference bridge and host-local are",
    )
    p.add_argument("--cni-version", default="1.0.0", help="cniVersion of all configs")
    p.add_argument("--subnet", default="10.244.1.0/24", help="the node's pod subnet")
    _output_options(p)
    p.set_defaults(func=latency.run)
    return p


def _throughput(forms) -> argparse.ArgumentParser:
    p = forms.add_parser(
        "throughput",
        help="TCP throughput (iperf3) of pod paths: pycni same "
        "node, host-gw and VXLAN against a bare veth and the Go reference",
    )
    p.add_argument(
        "--seconds",
        type=int,
        default=throughput.DEFAULT_SECONDS,
        help=f"length of each iperf3 measurement (default {throughput.DEFAULT_SECONDS})",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=throughput.DEFAULT_REPEAT,
        help=f"measurements per path and stream count, the median is reported "
        f"(default {throughput.DEFAULT_REPEAT})",
    )
    p.add_argument(
        "--round-trips",
        type=int,
        default=throughput.DEFAULT_ROUND_TRIPS,
        help="TCP ping-pong round trips per latency run "
        f"(default {throughput.DEFAULT_ROUND_TRIPS})",
    )
    p.add_argument(
        "--prefix",
        default=None,
        help="name prefix of its namespaces and labs (default pycnib<pid><random>)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument(
        "--reference-dir",
        default="/usr/lib/cni",
        help="where the reference bridge and host-local are",
    )
    _output_options(p)
    p.set_defaults(func=throughput.run)
    return p


def _convergence_arguments(parser) -> None:
    parser.add_argument(
        "--nodes",
        type=int,
        default=100,
        help="remote nodes that appear and leave at once "
        f"(default 100, at most {convergence.MAX_NODES})",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="fresh agent and namespaces per repetition (default 3)",
    )
    parser.add_argument(
        "--backend",
        action="append",
        choices=convergence.BACKENDS,
        dest="backends",
        help="backend to measure (repeatable; default host-gw and vxlan)",
    )
    parser.add_argument(
        "--register",
        choices=(*convergence.REGISTER_MODES, "both"),
        default="both",
        help="how the remote nodes write the datastore: clients (one lease "
        "client each, in turn, as real agents), batch (one transaction), or "
        "both (default)",
    )
    parser.add_argument(
        "--noop-samples",
        type=int,
        default=5,
        help="no-op passes measured per repetition (default 5)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="seconds a phase may take before it counts as not converged",
    )
    parser.add_argument(
        "--prefix",
        default=convergence.NAME_PREFIX,
        help="name prefix of its namespaces and temporary directories, followed by this "
        f"process's id (default {convergence.NAME_PREFIX})",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def _convergence(forms) -> None:
    p = forms.add_parser(
        "convergence",
        help="how long the agent's reconcile loop takes when "
        "100 remote nodes appear at once, and leave at once",
    )
    _convergence_arguments(p)
    _output_options(p)
    p.set_defaults(func=convergence.run)


def _reconcile(forms) -> None:
    p = forms.add_parser(
        "reconcile",
        help="the route backends alone: one reconcile_once pass "
        "from empty to N peers, a no-op pass, and removing them all",
    )
    p.add_argument("--nodes", type=int, default=100, help="fake peers (1-250; 100)")
    p.add_argument("--repeat", type=int, default=3, help="fresh namespaces per run (3)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _output_options(p)
    p.set_defaults(func=reconcile.run)


def _cri(sub) -> None:
    p = sub.add_parser(
        "cri",
        help="RunPodSandbox / StopPodSandbox latency through containerd's "
        "CRI: pycni (agent) against the reference bridge + host-local",
    )
    p.add_argument(
        "--pods",
        type=int,
        default=cri.DEFAULT_PODS,
        help=f"sequential pods per row (default {cri.DEFAULT_PODS})",
    )
    p.add_argument(
        "--burst",
        type=int,
        default=cri.DEFAULT_BURST,
        help=f"pods started at once per row (default {cri.DEFAULT_BURST}); 0 skips it",
    )
    p.add_argument(
        "--repeat", type=int, default=3, help="bursts per row, the median reported (default 3)"
    )
    p.add_argument(
        "--reference-dir",
        default="/usr/lib/cni",
        help="where the reference bridge, host-local and loopback are",
    )
    p.add_argument("--subnet", default="10.244.1.0/24", help="the node's pod subnet")
    p.add_argument(
        "--launcher",
        dest="plugin_launcher",
        choices=("python", "native"),
        default=None,
        help="pycni's executable: by default what `pycnictl install` writes (native where a "
        "C compiler is found, else the Python launcher)",
    )
    p.add_argument(
        "--containerd",
        choices=cri.CONTAINERDS,
        default="both",
        help="Debian's containerd 1.6, the pinned 2.x (./dev peers builds it), or both "
        "(default), each with its own rows in one run",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _output_options(p)
    p.set_defaults(func=cri.run)


def _podman(forms) -> None:
    p = forms.add_parser(
        "podman",
        help="`podman run --rm ... true` with pycni (agent, "
        "standalone) against the Go bridge + host-local (+ portmap), and "
        "--network none",
    )
    p.add_argument(
        "--runs",
        type=int,
        default=podman.DEFAULT_RUNS,
        help=f"timed runs per row (default {podman.DEFAULT_RUNS})",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument(
        "--reference-dir",
        default="/usr/lib/cni",
        help="where the reference bridge, host-local and portmap are",
    )
    p.add_argument(
        "--launcher",
        dest="plugin_launcher",
        choices=("python", "native"),
        default="python",
        help="pycni's executable: the Python launcher (default) "
        "or the native one (`pycnictl install --native`; needs cc)",
    )
    _output_options(p)
    p.set_defaults(func=podman.run)


def _soak(forms) -> None:
    p = forms.add_parser(
        "soak",
        help="random ADD/DEL/CHECK/GC against a node whose agent "
        "keeps being SIGKILLed, pycni's invariant checked at quiet points",
    )
    p.add_argument("--ops", type=int, default=10000, help="operations (10000)")
    p.add_argument("--containers", type=int, default=200, help="container slots (200)")
    p.add_argument("--in-flight", type=int, default=16, help="calls at once (16)")
    p.add_argument(
        "--kill-every",
        type=int,
        default=1000,
        help="SIGKILL the agent about every N operations (1000; 0 = never)",
    )
    p.add_argument(
        "--check-every",
        type=int,
        default=500,
        help="check the invariant every N operations (500; 0 = only at the end)",
    )
    p.add_argument("--seed", type=int, default=1, help="of the random choices (1)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _output_options(p)
    p.set_defaults(func=soak.run)


def _watch(forms) -> None:
    defaults = watch.Settings()
    p = forms.add_parser(
        "watch",
        help="one agent's Kubernetes watches against the fake API server: requests "
        "per kind per hour in a steady cluster, and no event lost across a watch's "
        "renewal, a 410 or an API server restart (no root needed)",
    )
    p.add_argument(
        "--duration",
        type=float,
        default=defaults.duration,
        help=f"real seconds measured (default {defaults.duration:.0f})",
    )
    p.add_argument(
        "--speedup",
        type=float,
        default=defaults.speedup,
        help="every period (watch timeouts, keepalive, resync, bookmarks, kubelets' status "
        f"posts) divided by this: --duration stands for duration x speedup seconds "
        f"(1-300; default {defaults.speedup:.0f}, so 60 s is an hour)",
    )
    p.add_argument(
        "--nodes",
        type=int,
        default=defaults.nodes,
        help=f"nodes in the cluster (default {defaults.nodes})",
    )
    p.add_argument(
        "--server-timeout",
        type=float,
        default=defaults.server_timeout,
        help="simulated seconds after which the API server ends any watch, whatever the "
        "client asked (default 0: it honours the client's 5-10 minutes)",
    )
    p.add_argument(
        "--bookmark-every",
        type=float,
        default=defaults.bookmark_every,
        help=f"simulated seconds between the server's bookmarks (default "
        f"{defaults.bookmark_every:.0f}, as kube-apiserver)",
    )
    p.add_argument(
        "--converge",
        type=float,
        default=defaults.converge,
        help=f"real seconds each check may take to converge (default {defaults.converge:.0f})",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _output_options(p)
    p.set_defaults(func=watch.run)


def _policy(forms) -> None:
    b = policy_bench
    p = forms.add_parser(
        "policy",
        help="NetworkPolicy: time from a policy write to enforcement on every node of a lab, "
        "the ruleset and one pod change's apply time with 1,000 pods and 100 policies, and "
        "pod-to-pod throughput and connect latency with 100 policies against none",
    )
    p.add_argument(
        "--part",
        action="append",
        choices=("enforce", "scale", "datapath"),
        dest="parts",
        help="measure only this part (repeatable; default all three)",
    )
    p.add_argument(
        "--nodes", type=int, default=b.DEFAULT_NODES, help=f"lab nodes (default {b.DEFAULT_NODES})"
    )
    p.add_argument(
        "--counts",
        type=int,
        nargs="+",
        default=list(b.COUNTS),
        metavar="N",
        help="policies stored before each measured write (default 1 10 100)",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=b.DEFAULT_REPEAT,
        help=f"policy writes (and deletes) timed per count (default {b.DEFAULT_REPEAT})",
    )
    p.add_argument(
        "--fake-pods",
        type=int,
        default=b.DEFAULT_FAKE_PODS,
        help="Pod objects per lab node, with addresses but no network namespace "
        f"(default {b.DEFAULT_FAKE_PODS})",
    )
    p.add_argument(
        "--scale-pods",
        type=int,
        default=b.DEFAULT_SCALE_PODS,
        help=f"pods of the one node in the scale part (default {b.DEFAULT_SCALE_PODS})",
    )
    p.add_argument(
        "--scale-policies",
        type=int,
        default=b.DEFAULT_SCALE_POLICIES,
        help=f"policies in the scale part (default {b.DEFAULT_SCALE_POLICIES})",
    )
    p.add_argument(
        "--scale-repeat",
        type=int,
        default=b.DEFAULT_SCALE_REPEAT,
        help=f"pod changes timed per size (default {b.DEFAULT_SCALE_REPEAT})",
    )
    p.add_argument(
        "--datapath-policies",
        type=int,
        default=b.DEFAULT_DATAPATH_POLICIES,
        help="policies selecting the servers in the data-path part "
        f"(default {b.DEFAULT_DATAPATH_POLICIES})",
    )
    p.add_argument(
        "--seconds",
        type=int,
        default=b.DEFAULT_SECONDS,
        help=f"length of each iperf3 measurement (default {b.DEFAULT_SECONDS})",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=b.DEFAULT_ROUNDS,
        help=f"data-path rounds, each state measured once a round (default {b.DEFAULT_ROUNDS})",
    )
    p.add_argument(
        "--connects",
        type=int,
        default=b.DEFAULT_CONNECTS,
        help=f"TCP connects timed per path, state and round (default {b.DEFAULT_CONNECTS})",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _output_options(p)
    p.set_defaults(func=policy_bench.run)


def _kube(forms) -> None:
    from ..bench import kube

    p = forms.add_parser(
        "kube",
        help="pods on a real cluster (lab up --kubernetes): kubectl apply of N pods to all "
        "Ready, and each pod's sandbox set-up, pycni against the reference bridge + host-local",
    )
    p.add_argument(
        "--pods",
        type=int,
        default=kube.DEFAULT_PODS,
        help=f"pods applied at once (default {kube.DEFAULT_PODS})",
    )
    p.add_argument(
        "--waves",
        type=int,
        default=kube.DEFAULT_WAVES,
        help=f"times the pods are applied and deleted per cluster (default {kube.DEFAULT_WAVES})",
    )
    p.add_argument("--nodes", type=int, default=2, help="nodes per cluster (default 2)")
    p.add_argument(
        "--cni",
        action="append",
        metavar="NAME",
        help="a pod network to measure, repeatable: pycni, reference-1.10.0 (the pinned "
        "plugins), reference-1.1.1 (Debian's); default every one built here",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _output_options(p)
    p.set_defaults(func=kube.run)


def _output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--markdown",
        metavar="FILE",
        help="also write the table into FILE, between this benchmark's markers "
        "(<!-- BEGIN pycnictl bench NAME --> ... END), e.g. docs/benchmarks.md",
    )
    p.add_argument(
        "--chart",
        metavar="FILE",
        help="also draw the report's ratios as an SVG bar chart into FILE (needs drawsvg: "
        "pip install 'pycni[draw]')",
    )
