"""Whole-lab operations: bring it up, add a node, remove a node, restart an agent, tear down.

Used by `pycnictl lab` and by the tests, which drive the same lab through these functions.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable

from .build import (
    add_pod,
    build_node,
    build_router_and_outside,
    del_pod,
    delete_netns,
    leave,
    netns_list,
    start_agent,
    start_etcd,
    stop_agent,
    wait_converged,
    wait_ready,
)
from .model import POD_NAMESPACE, Lab, LabError, Node, lab_netns_re
from .objects import builtin_pod_object, namespace_object
from .store import LabObjects, lab_objects

# Entries of a state directory that the lab made and may remove.
_STATE_ENTRIES = (
    "nodes",
    "bin",  # the native plugin executable, compiled once and copied to every node
    "cluster.db",
    "cluster.db-wal",
    "cluster.db-shm",
    "etcd",
    "etcd.log",
    "lab.lock",
    "kube",  # the Kubernetes lab's certificates, etcd, logs, pids (lab/kube/)
    "kubeconfig",
    "e2e",  # `lab e2e`'s reports
)


def bring_up(lab: Lab) -> None:
    """Build everything `lab` plans; on failure the caller tears down (lab.json says what)."""
    os.makedirs(lab.state_dir, exist_ok=True)
    lab.save()  # first, so that `lab down` can undo whatever follows
    build_router_and_outside(lab)
    if lab.datastore == "etcd":
        start_etcd(lab)
    for node in lab.nodes:
        build_node(lab, node)
    with lab_objects(lab) as store:
        store.apply(namespace_object(POD_NAMESPACE))
        for node in lab.nodes:
            _network_pods(lab, node, store)
    wait_converged(lab)


def _network_pods(lab: Lab, node: Node, store: LabObjects) -> None:
    """ADD the node's planned pods, each stored as a Pod object before (its labels) and after
    (its addresses), as the API server and the kubelet would have it."""
    wait_ready(node)
    lab.save()
    for pod in node.pods:
        store.apply(builtin_pod_object(node, pod))
        add_pod(node, pod)
        lab.save()
        store.apply(builtin_pod_object(node, pod))


def join(lab: Lab) -> Node:
    """A node joining the running cluster: the others learn of it through the datastore."""
    node = lab.plan_node()
    lab.save()
    build_node(lab, node)
    with lab_objects(lab) as store:
        _network_pods(lab, node, store)
    wait_converged(lab)
    return node


def remove_node(lab: Lab, node: Node) -> None:
    """Clean removal: DEL its pods, stop its agent, `pycnictl leave`, delete its namespaces."""
    live = netns_list()
    problems = [p for p in (del_pod(node, pod, live) for pod in node.pods) if p]
    stop_agent(node)
    leave(lab, node)
    for name in [p.netns for p in node.pods] + [node.netns]:
        problem = delete_netns(name) if name in live else None
        if problem:
            problems.append(problem)
    lab.nodes.remove(node)
    lab.save()
    shutil.rmtree(node.root, ignore_errors=True)
    try:
        with lab_objects(lab) as store:  # its pods are gone with it
            for pod in node.pods:
                store.delete("Pod", pod.namespace, pod.k8s_name)
    except Exception as exc:  # noqa: BLE001 - the node is gone; say why its objects stay
        problems.append(f"{node.name}'s pod objects stay in the datastore: {exc}")
    if problems:
        raise LabError("; ".join(problems))


def restart_agent(lab: Lab, node: Node, sig: int = 15) -> None:
    """Stop the node's agent (SIGTERM, or SIGKILL with sig=9) and start a new one."""
    stop_agent(node, sig)
    start_agent(lab, node)


def built_or_removed(lab: Lab, build: Callable[[Lab], object]) -> bool:
    """`lab up`'s build (plain or Kubernetes); on any failure, say so and remove what was
    made. True when it was built."""
    try:
        build(lab)
    except BaseException as exc:
        print(f"lab up failed: {exc}", file=sys.stderr)
        print("removing what was made", file=sys.stderr)
        teardown(lab.prefix, lab.state_dir)
        return False
    return True


def teardown(prefix: str, state_dir: str, say=lambda *a: None) -> list[str]:
    problems: list[str] = []
    lab = Lab.load(state_dir)
    live = netns_list()
    names: list[str] = []
    if lab is not None and lab.kubernetes:
        from .kube.lifecycle import teardown as kube_teardown

        problems += kube_teardown(lab, say)
    if lab is not None:
        for node in lab.nodes:
            for pod in node.pods:
                problem = del_pod(node, pod, live)
                if problem:
                    problems.append(problem)
                elif node.netns in live and pod.address:
                    say(f"DEL {pod.netns}")
            if node.netns in live and not lab.kubernetes:
                try:
                    stop_agent(node)
                except LabError as exc:
                    problems.append(str(exc))
        names = lab.namespaces()
    pattern = lab_netns_re(prefix)
    names += sorted(n for n in live if pattern.fullmatch(n) and n not in names)
    for name in names:
        if name not in live:
            continue
        problem = delete_netns(name)  # the router's etcd dies with it
        if problem:
            problems.append(problem)
        else:
            say(f"removed netns {name}")
    problems += _remove_state(state_dir, lab is not None, say)
    return problems


def _remove_state(state_dir: str, owned: bool, say) -> list[str]:
    if not os.path.isdir(state_dir):
        return []
    if owned:
        for entry in _STATE_ENTRIES:
            path = os.path.join(state_dir, entry)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.lexists(path):
                os.unlink(path)
        # lab.json last: until now a new `lab down` could still find everything.
        os.unlink(os.path.join(state_dir, "lab.json"))
    try:
        os.rmdir(state_dir)
        say(f"removed {state_dir}")
    except OSError:
        if owned:
            return [f"{state_dir} still holds files the lab did not make; left in place"]
    return []
