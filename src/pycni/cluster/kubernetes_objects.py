"""NetworkPolicy's objects from the API server: Namespaces, Pods (of every node: peers on other
nodes matter) and NetworkPolicies, each kept by one informer (cluster/informer.py): one list,
then one long-lived watch per kind, resumed from the last resourceVersion.

Each object is kept trimmed to what the policy engine reads (labels, node, addresses, named
ports, the policy's spec), in the Kubernetes JSON form: a kubelet's status heartbeat or an
annotation that changes none of that wakes nobody and costs no compile. The RBAC this needs is
list and watch on namespaces, pods and networking.k8s.io/networkpolicies (deploy/kubernetes).
"""

from __future__ import annotations

import time
from typing import Any

from .informer import Informer
from .kubernetes import _load_config
from .kv import KVError
from .objects import Objects, ObjectSource

SYNC_TIMEOUT = 30.0  # seconds snapshot() waits for the first lists
_SLICE = 0.05  # seconds between looks at the other informers while waiting


class KubernetesObjects(ObjectSource):
    def __init__(self, kubeconfig: str | None = None, api_client: Any = None) -> None:
        from kubernetes import client

        self._owns_client = api_client is None
        self._client = api_client or client.ApiClient(_load_config(kubeconfig))
        core, net = client.CoreV1Api(self._client), client.NetworkingV1Api(self._client)
        serialize = self._client.sanitize_for_serialization
        self._informers: list[Informer[dict]] = [
            Informer("namespaces", core.list_namespace, lambda o: namespace_view(serialize(o))),
            Informer("pods", core.list_pod_for_all_namespaces, lambda o: pod_view(serialize(o))),
            Informer(
                "networkpolicies",
                net.list_network_policy_for_all_namespaces,
                lambda o: policy_view(serialize(o)),
            ),
        ]
        self._seen: list[int] | None = None

    def _started(self) -> list[Informer[dict]]:
        if self._seen is None:
            for informer in self._informers:
                informer.start()
            self._seen = [-1] * len(self._informers)
        return self._informers

    def snapshot(self) -> Objects:
        """The three kinds as of now; waits for their first lists, and refuses (KVError, so
        the caller retries) to hand out an empty view of a kind never listed: enforcing that
        would drop every policy."""
        informers = self._started()
        deadline = time.monotonic() + SYNC_TIMEOUT
        for informer in informers:
            if not informer.wait_synced(max(0.0, deadline - time.monotonic())):
                failure = informer.failure
                why = f": {failure.what}: {failure.error}" if failure else ""
                raise KVError(f"kubernetes API server: {informer.kind} not listed yet{why}")
        views = []
        for i, informer in enumerate(informers):
            version, records = informer.snapshot()
            assert self._seen is not None
            self._seen[i] = version
            views.append(tuple(records[k] for k in sorted(records)))
        return Objects(*views)

    def wait(self, timeout: float) -> bool:
        informers = self._started()
        assert self._seen is not None
        deadline = time.monotonic() + timeout
        while True:
            for i, informer in enumerate(informers):
                if informer.version != self._seen[i]:
                    return True
            left = deadline - time.monotonic()
            if left <= 0 or informers[0].stopped:
                return False
            # Wake at once for the first kind, within a slice for the others.
            informers[0].wait_changed(self._seen[0], min(left, _SLICE))

    def close(self) -> None:
        for informer in self._informers:
            informer.stop()
        if self._owns_client:
            self._client.close()

    def stats(self) -> dict[str, dict[str, int]]:
        return {i.kind: dict(i.stats) for i in self._informers}


def _meta(obj: dict, *keys: str) -> dict:
    meta = obj.get("metadata") or {}
    return {k: meta[k] for k in keys if meta.get(k) not in (None, {}, "")}


def namespace_view(obj: dict) -> dict:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": _meta(obj, "name", "labels")}


def pod_view(obj: dict) -> dict:
    spec, status = obj.get("spec") or {}, obj.get("status") or {}
    containers = [
        {"name": c.get("name"), "ports": c.get("ports") or []}
        for c in spec.get("containers") or []
        if c.get("ports")
    ]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": _meta(obj, "name", "namespace", "labels"),
        "spec": {
            k: v
            for k, v in (
                ("nodeName", spec.get("nodeName")),
                ("hostNetwork", spec.get("hostNetwork")),
                ("containers", containers),
            )
            if v
        },
        "status": {
            k: status[k] for k in ("phase", "podIP", "podIPs") if status.get(k) not in (None, [])
        },
    }


def policy_view(obj: dict) -> dict:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(obj, "name", "namespace"),
        "spec": obj.get("spec") or {},
    }
