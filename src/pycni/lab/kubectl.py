"""`pycnictl lab apply`, `delete`, `get` and `probe`: the lab spoken to in Kubernetes YAML.

`apply -f FILE` creates or updates Namespaces, Pods and NetworkPolicies (a pod networked
through its node's plugin, lab/apply.py), `delete -f FILE` removes them, `get` lists the pods
(with their addresses and labels), the policies (with the pods each selects) or the
namespaces, and `probe` measures the connectivity matrix, judged against the policies.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable

from ..cluster.objects import Objects
from ..policy.objects import load
from .apply import apply, check_apply, check_delete, delete, locked
from .commands import print_rows, read_policies
from .manifests import ManifestError, identify_all, ordered, read_documents, validate_all
from .model import Lab, LabError
from .probes import as_json, measure, print_table, summary
from .store import lab_objects


def running_lab(args, command: str) -> Lab | None:
    """The lab that `--state-dir` and `--prefix` name, or None (and why, on stderr)."""
    try:
        lab = Lab.named(args.state_dir, args.prefix)
    except LabError as exc:
        print(f"lab {command}: {exc}", file=sys.stderr)
        return None
    if lab.kubernetes:
        print(
            f"lab {command}: lab {lab.prefix} runs Kubernetes (lab up --kubernetes): use "
            f"`pycnictl lab kubectl -- {command} ...`",
            file=sys.stderr,
        )
        return None
    return lab


def read_files(paths: Iterable[str]) -> list[tuple[str, object]]:
    """Every document of every -f: a file, `-` (stdin), or a directory's .yaml, .yml and
    .json files in name order."""
    documents: list[tuple[str, object]] = []
    for path in paths:
        if path == "-":
            documents += read_documents(sys.stdin.read(), "stdin")
            continue
        names = [path]
        if os.path.isdir(path):
            names = [
                os.path.join(path, n)
                for n in sorted(os.listdir(path))
                if n.endswith((".yaml", ".yml", ".json"))
            ]
        for name in names:
            try:
                with open(name) as f:
                    text = f.read()
            except OSError as exc:
                raise ManifestError(f"{name}: {exc.strerror or exc}") from None
            documents += read_documents(text, name)
    return documents


def apply_command(args) -> int:
    try:
        manifests = ordered(validate_all(read_files(args.filename)))
    except ManifestError as exc:
        return _refuse("apply", exc)
    lab = running_lab(args, "apply")
    if lab is None:
        return 1
    if not manifests:
        print("lab apply: no objects given", file=sys.stderr)
        return 1
    try:
        with locked(lab), lab_objects(lab) as store:
            lab = Lab.load(lab.state_dir) or lab  # as it is now that we hold the lock
            check_apply(lab, store, manifests)
            apply(lab, store, manifests, say=_say)
    except ManifestError as exc:
        return _refuse("apply", exc)
    except LabError as exc:
        print(f"lab apply: {exc}", file=sys.stderr)
        return 1
    return 0


def delete_command(args) -> int:
    try:
        manifests = ordered(identify_all(read_files(args.filename)), deleting=True)
        check_delete(manifests)
    except ManifestError as exc:
        return _refuse("delete", exc)
    lab = running_lab(args, "delete")
    if lab is None:
        return 1
    try:
        with locked(lab), lab_objects(lab) as store:
            lab = Lab.load(lab.state_dir) or lab
            missing = delete(lab, store, manifests, say=_say)
    except LabError as exc:
        print(f"lab delete: {exc}", file=sys.stderr)
        return 1
    for ref in missing if not args.ignore_not_found else []:
        print(f"lab delete: {ref} not found", file=sys.stderr)
    return 1 if missing and not args.ignore_not_found else 0


def _say(line: str) -> None:
    print(line, flush=True)


def _refuse(command: str, exc: ManifestError) -> int:
    print(f"lab {command}: nothing changed:", file=sys.stderr)
    for line in str(exc).splitlines():
        print(f"  {line}", file=sys.stderr)
    return 1


# ----------------------------------------------------------------------------- get


def pod_entries(lab: Lab, snap: Objects) -> list[dict]:
    """The lab's pods as `get pods --json` lists them; a stored pod the lab did not network
    (none, normally) is listed without netns."""
    stored = {_key(o): o for o in snap.pods}
    out = []
    for node, pod in lab.pods():
        obj = stored.pop((pod.namespace, pod.k8s_name), {})
        out.append(
            {
                "namespace": pod.namespace,
                "name": pod.k8s_name,
                "node": node.name,
                "netns": pod.netns,
                "ips": pod.ips,
                "labels": _meta(obj).get("labels") or {},
            }
        )
    for (namespace, name), obj in stored.items():
        status = obj.get("status")
        status = status if isinstance(status, dict) else {}
        out.append(
            {
                "namespace": namespace,
                "name": name,
                "node": (obj.get("spec") or {}).get("nodeName") or "",
                "netns": "",
                "ips": [e.get("ip") for e in status.get("podIPs") or [] if isinstance(e, dict)],
                "labels": _meta(obj).get("labels") or {},
            }
        )
    return sorted(out, key=lambda e: (e["namespace"], e["name"]))


def policy_entries(snap: Objects) -> tuple[list[dict], list[str]]:
    """Each valid policy with the pods its podSelector selects in its namespace; and the
    problems of the objects left out."""
    inv = load(snap.namespaces, snap.pods, snap.policies)
    out = [
        {
            "namespace": pol.namespace,
            "name": pol.name,
            "policyTypes": list(pol.policy_types or ()),
            "pods": sorted(
                p.name
                for p in inv.pods
                if p.namespace == pol.namespace
                and not p.host_network
                and pol.pod_selector.matches(p.labels)
            ),
        }
        for pol in inv.policies
    ]
    return out, [str(p) for p in inv.problems]


def namespace_entries(snap: Objects) -> list[dict]:
    pods: dict[str, int] = {}
    for obj in snap.pods:
        pods[_key(obj)[0]] = pods.get(_key(obj)[0], 0) + 1
    out = [
        {"name": _meta(o).get("name"), "labels": _meta(o).get("labels") or {}}
        for o in snap.namespaces
    ]
    for entry in out:
        entry["pods"] = pods.get(str(entry["name"]), 0)
    return sorted(out, key=lambda e: str(e["name"]))


def get_command(args) -> int:
    lab = running_lab(args, "get")
    if lab is None:
        return 1
    with lab_objects(lab) as store:
        snap = store.snapshot()
    problems: list[str] = []
    rows: list[tuple[str, ...]]
    header: tuple[str, ...]
    entries: list[dict]
    if args.resource == "pods":
        entries = pod_entries(lab, snap)
        rows = [
            (
                e["namespace"],
                e["name"],
                e["node"],
                e["netns"] or "-",
                ",".join(e["ips"]) or "-",
                _labels(e["labels"]),
            )
            for e in entries
        ]
        header = ("NAMESPACE", "NAME", "NODE", "NETNS", "IPS", "LABELS")
    elif args.resource == "policies":
        entries, problems = policy_entries(snap)
        rows = [
            (
                e["namespace"],
                e["name"],
                ",".join(e["policyTypes"]),
                ",".join(e["pods"]) or "(none)",
            )
            for e in entries
        ]
        header = ("NAMESPACE", "NAME", "POLICY TYPES", "SELECTED PODS")
    else:
        entries = namespace_entries(snap)
        rows = [(str(e["name"]), str(e["pods"]), _labels(e["labels"])) for e in entries]
        header = ("NAME", "PODS", "LABELS")
    for problem in problems:
        print(f"warning: left out: {problem}", file=sys.stderr)
    if args.json:
        print(json.dumps(entries, indent=2))
    elif rows:
        print_rows([header, *rows])
    else:
        print(f"no {args.resource}", file=sys.stderr)
    return 0


def _labels(labels: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "-"


def _meta(obj: dict) -> dict:
    meta = obj.get("metadata")
    return meta if isinstance(meta, dict) else {}


def _key(obj: dict) -> tuple[str, str]:
    meta = _meta(obj)
    return str(meta.get("namespace") or "default"), str(meta.get("name"))


# ----------------------------------------------------------------------------- probe


def probe_command(args) -> int:
    """The connectivity matrix of the running lab, measured now and judged against its
    NetworkPolicies; exit 1 if a path failed (an expected denial is no failure)."""
    lab = running_lab(args, "probe")
    if lab is None:
        return 1
    probes = measure(lab, read_policies(lab))
    if args.json:
        print(json.dumps(as_json(probes), indent=2))
    else:
        if probes:
            print_table(probes)
            print()
        print(summary(probes))
    return 1 if any(p.failed for p in probes) else 0
