"""`lab apply` and `lab delete` on a running lab: objects into and out of its datastore, and a
Pod's network made or unmade through its node's installed plugin, as a kubelet would.

A new pod is recorded in lab.json first (so `lab down` finds whatever follows), then stored
without status, ADDed in a new namespace <prefix>-nIpodJ, and stored again with its status.
Re-applying a pod only updates its object (new labels are a relabel, never a new ADD); moving
it to another node is refused. Deleting a pod DELs it, removes its namespace, then its object;
deleting a namespace deletes its pods and policies first, as Kubernetes does.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from .build import add_pod, del_pod, delete_netns, netns_list
from .manifests import Manifest, ManifestError
from .model import POD_NAMESPACE, Lab, LabError, Node, Pod
from .objects import normalized, pod_object, ref
from .store import LabObjects

LOCK_NAME = "lab.lock"
Say = Callable[[str], None]


@contextmanager
def locked(lab: Lab) -> Iterator[None]:
    """One apply or delete at a time per lab: each rewrites lab.json."""
    fd = os.open(os.path.join(lab.state_dir, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def check_apply(lab: Lab, store: LabObjects, manifests: list[Manifest]) -> None:
    """What only the running lab can judge, for every document before anything changes: the
    node a pod names, a pod that would move, a namespace that does not exist."""
    namespaces = {(n.get("metadata") or {}).get("name") for n in store.snapshot().namespaces}
    namespaces |= {POD_NAMESPACE} | {m.name for m in manifests if m.kind == "Namespace"}
    errors = []
    for m in manifests:
        if m.kind != "Namespace" and m.namespace not in namespaces:
            errors.append(f"{m.where}: {m.ref}: namespace {m.namespace!r} does not exist")
        if m.kind != "Pod":
            continue
        spec = m.obj.get("spec") or {}
        wanted = spec.get("nodeName") or ""
        if wanted and wanted not in {n.name for n in lab.nodes}:
            nodes = ", ".join(n.name for n in lab.nodes) or "none"
            errors.append(f"{m.where}: {m.ref}: spec.nodeName {wanted!r} is no lab node ({nodes})")
        found = lab.find_pod(m.namespace, m.name)
        if found and wanted and wanted != found[0].name:
            errors.append(
                f"{m.where}: {m.ref} runs on {found[0].name}, not {wanted}: a pod cannot move; "
                "delete it first"
            )
        node = lab.node(wanted) if wanted in {n.name for n in lab.nodes} else None
        if not found and node is not None and not os.path.exists(node.conflist_path):
            errors.append(f"{m.where}: {m.ref}: {node.name} has no CNI config (is its agent up?)")
    if errors:
        raise ManifestError("\n".join(errors))


def apply(lab: Lab, store: LabObjects, manifests: list[Manifest], say: Say) -> None:
    """Apply each (checked, ordered) manifest, saying what happened as kubectl does."""
    live = netns_list()
    for m in manifests:
        if m.kind == "Pod":
            result = _apply_pod(lab, store, m, live)
        else:
            result = store.apply(normalized(m.obj))
        say(f"{m.ref} {result}")


def _apply_pod(lab: Lab, store: LabObjects, m: Manifest, live: set[str]) -> str:
    found = lab.find_pod(m.namespace, m.name)
    if found is not None:
        node, pod = found
        return store.apply(pod_object(m.obj, node, pod))
    node = _schedule(lab, m.obj)
    pod = lab.plan_pod(node, m.namespace, m.name, avoid=live)
    lab.save()  # first: `lab down` undoes what follows
    try:
        store.apply(pod_object(m.obj, node, pod))  # its labels, before the plugin runs
        add_pod(node, pod)
        lab.save()
        store.apply(pod_object(m.obj, node, pod))  # and its addresses
    except BaseException:
        problems = _unmake(lab, store, node, pod)
        if problems:
            raise LabError(f"{m.ref}: undoing a failed ADD: {'; '.join(problems)}") from None
        raise
    return "created"


def _schedule(lab: Lab, obj: dict) -> Node:
    """spec.nodeName, or (no name given) the node with the fewest pods, as a scheduler might."""
    wanted = (obj.get("spec") or {}).get("nodeName")
    if wanted:
        return lab.node(wanted)
    if not lab.nodes:
        raise LabError("the lab has no nodes")
    return min(lab.nodes, key=lambda n: len(n.pods))


def _unmake(lab: Lab, store: LabObjects, node: Node, pod: Pod) -> list[str]:
    """DEL through the plugin, remove the pod's namespace, forget it, drop its object."""
    live = netns_list()
    problems = [p for p in (del_pod(node, pod, live),) if p]
    if pod.netns in live:
        problem = delete_netns(pod.netns)
        if problem:
            problems.append(problem)
    if pod in node.pods:
        node.pods.remove(pod)
    lab.save()
    try:
        if pod.cache and os.path.exists(pod.cache):
            os.unlink(pod.cache)
    except OSError:
        pass
    store.delete("Pod", pod.namespace, pod.k8s_name)
    return problems


def check_delete(manifests: list[Manifest]) -> None:
    errors = [
        f"{m.where}: {m.ref}: the default namespace may not be deleted"
        for m in manifests
        if m.kind == "Namespace" and m.name == POD_NAMESPACE
    ]
    if errors:
        raise ManifestError("\n".join(errors))


def delete(lab: Lab, store: LabObjects, manifests: list[Manifest], say: Say) -> list[str]:
    """Delete each (ordered) manifest's object; returns the refs that were not found."""
    missing: list[str] = []
    for m in manifests:
        if m.kind == "Namespace":
            found = _delete_namespace(lab, store, m.name, say)
        elif m.kind == "Pod":
            found = _delete_pod(lab, store, m.namespace, m.name)
        else:
            found = store.delete(m.kind, m.namespace, m.name)
        if found:
            say(f"{m.ref} deleted")
        else:
            missing.append(m.ref)
    return missing


def _delete_pod(lab: Lab, store: LabObjects, namespace: str, name: str) -> bool:
    found = lab.find_pod(namespace, name)
    problems = _unmake(lab, store, *found) if found else []
    stored = store.delete("Pod", namespace, name)  # an object without a network, if any
    if problems:
        raise LabError(f"{ref('Pod', namespace, name)}: {'; '.join(problems)}")
    return found is not None or stored


def _delete_namespace(lab: Lab, store: LabObjects, name: str, say: Say) -> bool:
    snap = store.snapshot()
    pods = {p.k8s_name for _, p in lab.pods() if p.namespace == name}
    pods |= {o["metadata"]["name"] for o in snap.pods if _namespace_of(o) == name}
    for pod in sorted(pods):
        if _delete_pod(lab, store, name, pod):
            say(f"{ref('Pod', name, pod)} deleted")
    for policy in snap.policies:
        if _namespace_of(policy) == name:
            policy_name = policy["metadata"]["name"]
            if store.delete("NetworkPolicy", name, policy_name):
                say(f"{ref('NetworkPolicy', name, policy_name)} deleted")
    return store.delete("Namespace", "", name)


def _namespace_of(obj: dict) -> str:
    return (obj.get("metadata") or {}).get("namespace") or POD_NAMESPACE
