"""`pycnictl lab up --kubernetes`, `lab kubectl` and `lab e2e`: the commands' own parts."""

from __future__ import annotations

import subprocess
import sys
import time

from ...harness.kube import VERSION, KubeNotBuilt, binary, images
from ..model import Lab, LabError
from . import controlplane as cp
from . import procs
from .node import NODE_DIRS

NEEDED = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet",
          "kube-proxy", "kubectl")  # fmt: skip


def refuse(args, state_dir: str) -> str | None:
    """Why this `lab up --kubernetes` cannot be, or None."""
    if args.underlays != 1:
        return "--kubernetes puts every node on one underlay: use --underlays 1"
    if args.datastore != "sqlite":
        return "--kubernetes: pycni's datastore is the cluster's API; leave --datastore out"
    hidden = [d for d in NODE_DIRS if state_dir == d or state_dir.startswith(d + "/")]
    if hidden:
        return (f"--state-dir {state_dir} is under {hidden[0]}, which each node replaces "
                "with its own: choose another")  # fmt: skip
    try:
        for name in NEEDED:
            binary(name)
        images(pycni=False)  # pycni's own is built (or found) once the lab starts
    except KubeNotBuilt as exc:
        return f"{exc} (Kubernetes {VERSION})"
    return None


def up(args, prefix: str, state_dir: str, hint: str, started: float) -> int:
    from ..lifecycle import built_or_removed
    from .lifecycle import bring_up

    why = refuse(args, state_dir)
    if why:
        print(f"lab up: {why}", file=sys.stderr)
        return 1
    lab = Lab.plan(prefix, state_dir, args.nodes, 0, backend=args.backend,
                   fast_path=args.fast_path, ipv6=args.ipv6)  # fmt: skip
    lab.kubernetes = True
    stack = "dual-stack IPv4/IPv6" if lab.ipv6 else "IPv4"
    print(f"Kubernetes {VERSION}: {args.nodes} node(s), {stack}, pycni backend {lab.backend}, "
          f"kube-proxy nftables, control plane in {cp.cp_netns(lab)} at {cp.cp_ip()}")  # fmt: skip
    if not built_or_removed(lab, bring_up):
        return 1
    print()
    print(cp.kubectl(lab, "get", "nodes", "-o", "wide").stdout.rstrip())
    print()
    kubectl = "pycnictl lab kubectl" + hint.removeprefix("pycnictl lab down")
    print(f"kubeconfig: {cp.admin_kubeconfig(lab)} (the apiserver is reachable from "
          f"{cp.cp_netns(lab)} only: `{kubectl} -- get pods -A`)")  # fmt: skip
    print(f"lab up in {time.monotonic() - started:.1f} s; remove it with `{hint}`")
    return 0


def _kube_lab(args, command: str) -> Lab | None:
    """The --kubernetes lab that --state-dir and --prefix name, or None (and why)."""
    try:
        lab = Lab.named(args.state_dir, args.prefix)
    except LabError as exc:
        print(f"lab {command}: {exc}", file=sys.stderr)
        return None
    if not lab.kubernetes:
        print(
            f"lab {command}: lab {lab.prefix} was not brought up with --kubernetes: "
            "its objects are `pycnictl lab get/apply/delete`'s",
            file=sys.stderr,
        )
        return None
    return lab


def kubectl_command(args) -> int:
    lab = _kube_lab(args, "kubectl")
    if lab is None:
        return 1
    argv = cp.kubectl_argv(lab, *_rest(args.args))
    return subprocess.run(argv).returncode


def _rest(args: list[str]) -> list[str]:
    return args[1:] if args[:1] == ["--"] else args


def e2e_command(args) -> int:
    from .e2e import run_e2e

    lab = _kube_lab(args, "e2e")
    if lab is None:
        return 1
    return run_e2e(lab, args.focus, args.skip, args.include_slow, args.ginkgo_args or [])


def rss_table(lab: Lab) -> list[tuple[str, float]]:
    """Resident memory of every daemon the lab started, in MiB."""
    out = []
    for name, info in procs.recorded(lab.state_dir).items():
        if procs.running(info):
            out.append((name, procs.rss_mib(info["pid"])))
    return out
