"""`pycnictl lab up` and `down`: a cluster in a box, built from network namespaces.

`lab up` makes N nodes on one or two underlay subnets, an "outside" standing for the internet,
a pycni agent per node (leasing subnets from the embedded sqlite datastore, or etcd), and pods
networked through each node's installed plugin; then it prints each node's subnet and the
measured connectivity matrix. `lab down` removes everything it made.
"""

from __future__ import annotations

import os
import sys
import time

from .build import netns_list
from .lifecycle import bring_up, built_or_removed, teardown
from .model import (
    DEFAULT_PREFIX,
    DEFAULT_STATE_DIR,
    Lab,
    lab_netns_re,
)
from .probes import measure, print_table, summary
from .store import lab_objects
from .verdicts import Policies


def up(args) -> int:
    started = time.monotonic()
    prefix, state_dir = args.prefix, os.path.abspath(args.state_dir)
    hint = _down_hint(prefix, state_dir)
    if os.path.exists(os.path.join(state_dir, "lab.json")):
        print(f"a lab is already up (state in {state_dir}); run `{hint}` first", file=sys.stderr)
        return 1
    present = sorted(n for n in netns_list() if lab_netns_re(prefix).fullmatch(n))
    if present:
        print(
            f"lab namespaces already exist ({', '.join(present)}); run `{hint}` first",
            file=sys.stderr,
        )
        return 1
    if os.path.isdir(state_dir) and os.listdir(state_dir):
        print(
            f"{state_dir} is not empty and holds no lab: choose another --state-dir",
            file=sys.stderr,
        )
        return 1
    if args.backend == "host-gw" and args.underlays > 1:
        print(
            "host-gw needs every node on one L2 segment: use --underlays 1, or --backend "
            "auto (host-gw on-link, VXLAN across the router)",
            file=sys.stderr,
        )
        return 1
    if getattr(args, "kubernetes", False):
        from .kube.commands import up as kube_up

        return kube_up(args, prefix, state_dir, hint, started)
    lab = Lab.plan(
        prefix,
        state_dir,
        args.nodes,
        args.pods,
        backend=args.backend,
        datastore=args.datastore,
        underlays=args.underlays,
        ipv6=args.ipv6,
        fast_path=args.fast_path,
    )
    if not built_or_removed(lab, bring_up):
        return 1
    built = time.monotonic() - started
    print_lab(lab)
    probes = measure(lab, read_policies(lab))
    if probes:
        print_table(probes)
    if getattr(args, "svg", None):
        from .draw import write_svg

        write_svg(lab, probes, args.svg)
        print(f"drew the lab into {args.svg}")
    failed = [p for p in probes if p.failed]
    if probes:
        print()
    print(summary(probes) + ("; the lab is left up for inspection" if failed else ""))
    print(
        f"lab up in {time.monotonic() - started:.1f} s (network built in {built:.1f} s); "
        f"remove it with `{hint}`"
    )
    return 1 if failed else 0


def read_policies(lab: Lab) -> Policies:
    """The lab's stored objects, for judging its paths; invalid ones are reported and left
    out (as the agents leave them out)."""
    with lab_objects(lab) as store:
        policies = Policies(lab, store.snapshot())
    for problem in policies.problems:
        print(f"warning: left out: {problem}", file=sys.stderr)
    return policies


def _down_hint(prefix: str, state_dir: str) -> str:
    return (
        "pycnictl lab down"
        + ("" if prefix == DEFAULT_PREFIX else f" --prefix {prefix}")
        + ("" if state_dir == DEFAULT_STATE_DIR else f" --state-dir {state_dir}")
    )


def print_lab(lab: Lab) -> None:
    store = (
        f"etcd at {lab.etcd_url} (in {lab.router})"
        if lab.datastore == "etcd"
        else f"sqlite {lab.cluster_db}"
    )
    cidrs = f"{lab.network} and {lab.network6}" if lab.ipv6 else lab.network
    print(f"cluster CIDR {cidrs}, backend {lab.backend}, datastore {store}")
    outside = f"{lab.outside_ip} and {lab.outside_ip6}" if lab.ipv6 else lab.outside_ip
    print(
        f"outside: netns {lab.outside}, {outside} (no route to any pod); router: netns {lab.router}"
    )
    print()
    v6 = lab.ipv6
    rows: list[tuple[str, ...]] = [
        ("NODE", "NETNS", "UNDERLAY IP", "POD SUBNET", "GATEWAY", "AGENT SOCKET")
    ]
    rows += [
        (
            n.name,
            n.netns,
            n.lan_ip + (f" {n.lan6_ip}" if v6 else ""),
            n.subnet + (f" {n.subnet6}" if v6 else ""),
            n.gateway,
            n.agent_socket,
        )
        for n in lab.nodes
    ]
    print_rows(rows)
    print()
    if not any(n.pods for n in lab.nodes):
        print("  no pods yet: `pycnictl lab apply -f FILE` makes some")
        print()
        return
    rows = [("POD", "NODE", "ADDRESS", "MAC", "HOST VETH")]
    rows += [
        (p.label, n.name, p.address + (f" {p.address6}" if v6 else ""), p.mac, p.host_veth)
        for n in lab.nodes
        for p in n.pods
    ]
    print_rows(rows)
    print()


def print_rows(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def down(args) -> int:
    from .model import LabError

    try:
        problems = teardown(args.prefix, os.path.abspath(args.state_dir), say=print)
    except LabError as exc:
        print(f"lab down: {exc}", file=sys.stderr)
        return 1
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr)
    print("lab is down" if not problems else "lab is down, with warnings")
    return 1 if problems else 0


def draw(args) -> int:
    """`lab draw`: the running lab as an SVG picture, with its connectivity measured now."""
    from .draw import write_svg
    from .model import LabError

    state_dir = os.path.abspath(args.state_dir)
    try:
        lab = Lab.load(state_dir)
    except LabError as exc:
        print(f"lab draw: {exc}", file=sys.stderr)
        return 1
    if lab is None or lab.prefix != args.prefix:
        print(f"lab draw: no lab {args.prefix} is up in {state_dir}", file=sys.stderr)
        return 1
    if lab.kubernetes:
        print("lab draw: a Kubernetes lab is not drawn (yet)", file=sys.stderr)
        return 1
    probes = [] if args.no_probes else measure(lab, read_policies(lab))
    write_svg(lab, probes, args.svg)
    failed = sum(p.failed for p in probes)
    measured = f", {len(probes)} paths measured, {failed} failed" if probes else ""
    print(f"drew lab {lab.prefix} into {args.svg}{measured}")
    return 0
