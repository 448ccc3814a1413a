"""The kubernetes datastore: the API server's Node objects are the cluster state.

kube-controller-manager allocates each node's pod CIDR(s) into ``spec.podCIDRs``; we only read
them, and publish what other nodes need to reach our pods in two annotations on our own Node.
Nothing is claimed or leased here: a node's subnets live exactly as long as its Node object.

The official client does the talking. It takes a noticeable time to import, so it is imported
on first construction, never when this module is imported.
"""

from __future__ import annotations

import ipaddress
import json
import math
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from .datastore import Datastore
from .kv import KVError
from .model import ClusterError, Network, NodeRecord

if TYPE_CHECKING:
    from kubernetes.client import ApiClient, Configuration, CoreV1Api, V1Node
    from kubernetes.watch import Watch

ANN_NODE_IPS = "pycni.io/node-ips"
ANN_VTEP_MAC = "pycni.io/vtep-mac"
# The generated client would pick application/json-patch+json for a dict body, which the API
# server rejects; a JSON merge patch is what we mean (null deletes a key).
MERGE_PATCH = "application/merge-patch+json"

NO_POD_CIDR = (
    "node {name} has no podCIDR: the pod network takes each node's subnet from the API server, "
    "so kube-controller-manager must allocate them: run it with --allocate-node-cidrs=true and "
    "--cluster-cidr=<pod network CIDR> (kubeadm: kubeadm init --pod-network-cidr=10.244.0.0/16)"
)
NOT_REGISTERED = (
    "node {name} is not registered in the API server (is its kubelet running, and is the "
    "agent's node name the kubelet's?)"
)


class KubernetesDatastore(Datastore):
    kind = "kubernetes"
    # (connect, read) seconds for ordinary calls: an unreachable API server must not stall the
    # agent's loop for the kernel's TCP timeout.
    request_timeout: tuple[float, float] = (5.0, 30.0)

    def __init__(
        self, node_name: str, kubeconfig: str | None = None, api_client: ApiClient | None = None
    ) -> None:
        from kubernetes import client

        self.node_name = node_name
        self._owns_client = api_client is None
        if api_client is None:
            api_client = client.ApiClient(_load_config(kubeconfig))
        self._client = api_client
        self._api: CoreV1Api = client.CoreV1Api(api_client)
        self._watch: Watch | None = None
        self._local: NodeRecord | None = None
        # The relevant part of every node as of _rv: wait() compares watch events against it.
        self._known: dict[str, NodeRecord] = {}
        self._rv: str | None = None

    # -- Datastore ----------------------------------------------------------------------------

    def register(self, local: NodeRecord) -> NodeRecord:
        self._local = local
        return self._sync()

    def node_addresses(self) -> tuple[str, ...]:
        node = self._call("read node", self._api.read_node, self.node_name)
        return internal_ips(node)

    def nodes(self) -> list[NodeRecord]:
        listed = self._call("list nodes", self._api.list_node)
        known = {}
        for node in listed.items or ():
            if (rec := node_record(node)) is not None:
                known[rec.name] = rec
        self._known, self._rv = known, listed.metadata.resource_version
        return sorted(known.values(), key=lambda r: r.name)

    def wait(self, timeout: float) -> bool:
        from kubernetes.client import ApiException
        from kubernetes.watch import Watch
        from urllib3.exceptions import HTTPError, ReadTimeoutError

        if timeout <= 0:
            return False
        if self._rv is None:
            self.nodes()  # nothing to compare events with yet
        deadline = time.monotonic() + timeout
        if self._watch is None:
            self._watch = Watch()
        # The server ends the watch after timeoutSeconds (whole seconds); the read timeout
        # ends it at ``timeout`` when nothing at all arrives.
        events = self._watch.stream(
            self._api.list_node,
            resource_version=self._rv,
            timeout_seconds=max(1, math.ceil(timeout)),
            _request_timeout=(self.request_timeout[0], timeout),
        )
        try:
            for event in events:
                changed = self._apply(event)
                self._rv = self._watch.resource_version or self._rv
                if changed:
                    return True
                if time.monotonic() >= deadline:
                    return False
            return False
        except ApiException as e:
            if e.status == 410:  # our resourceVersion was compacted away: start over
                self.nodes()
                return True
            raise KVError(f"kubernetes API server: watch nodes: {_describe(e)}") from e
        except ReadTimeoutError:
            return False
        except HTTPError as e:
            raise KVError(self._unreachable("watch nodes", e)) from e
        finally:
            events.close()  # closes the response, and so the connection, if we left early

    def keepalive(self) -> NodeRecord:
        if self._local is None:
            raise ClusterError("keepalive before register")
        return self._sync()

    def release(self) -> None:
        # The Node object and its podCIDR are Kubernetes's; we only take back what we wrote.
        body = {"metadata": {"annotations": {ANN_NODE_IPS: None, ANN_VTEP_MAC: None}}}
        try:
            self._call(
                "remove annotations",
                self._api.patch_node,
                self.node_name,
                body,
                _content_type=MERGE_PATCH,
            )
        except ClusterError:
            pass  # the node is gone already, and its annotations with it

    def close(self) -> None:
        if self._owns_client:
            self._client.close()

    # -- internals ----------------------------------------------------------------------------

    def _sync(self) -> NodeRecord:
        """Read our Node, publish our annotations where they differ, return our record."""
        assert self._local is not None
        node = self._call("read node", self._api.read_node, self.node_name)
        subnets = pod_cidrs(node)
        if not subnets:
            raise ClusterError(NO_POD_CIDR.format(name=self.node_name))
        ips = self._local.node_ips or internal_ips(node)
        if not ips:
            raise ClusterError(
                f"node {self.node_name} reports no InternalIP address; "
                "give the agent this node's IP address(es) explicitly"
            )
        want = {ANN_NODE_IPS: ",".join(ips), ANN_VTEP_MAC: self._local.vtep_mac or None}
        have = node.metadata.annotations or {}
        if any(have.get(k) != v for k, v in want.items()):
            self._call(
                "publish annotations",
                self._api.patch_node,
                self.node_name,
                {"metadata": {"annotations": want}},
                _content_type=MERGE_PATCH,
            )
        return NodeRecord(
            name=self.node_name, node_ips=ips, subnets=subnets, vtep_mac=self._local.vtep_mac
        )

    def _apply(self, event: dict[str, Any]) -> bool:
        """Fold one watch event into _known; True if it changed what nodes() would return."""
        kind, obj = event.get("type"), event.get("object")
        if kind not in ("ADDED", "MODIFIED", "DELETED") or obj is None:
            return False  # BOOKMARK and the like
        name = obj.metadata.name
        old = self._known.get(name)
        new = None if kind == "DELETED" else node_record(obj)
        if new is None:
            self._known.pop(name, None)
        else:
            self._known[name] = new
        return new != old

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        from kubernetes.client import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return fn(*args, _request_timeout=self.request_timeout, **kwargs)
        except ApiException as e:
            # read_node/patch_node of our own node: a 404 is a setup problem, not an outage
            if e.status == 404 and args and args[0] == self.node_name:
                raise ClusterError(NOT_REGISTERED.format(name=self.node_name)) from e
            raise KVError(f"kubernetes API server: {what}: {_describe(e)}") from e
        except HTTPError as e:
            raise KVError(self._unreachable(what, e)) from e

    def _unreachable(self, what: str, e: Exception) -> str:
        reason = getattr(e, "reason", None) or e  # MaxRetryError wraps the useful part
        return (
            f"cannot reach the kubernetes API server at {self._client.configuration.host} "
            f"({what}): {reason}"
        )


def _load_config(kubeconfig: str | None) -> Configuration:
    from kubernetes import client, config

    cfg = client.Configuration()
    try:
        if kubeconfig:
            # persist_config=False: never rewrite the operator's file (token refreshes)
            config.load_kube_config(
                config_file=kubeconfig, client_configuration=cfg, persist_config=False
            )
        else:
            config.load_incluster_config(client_configuration=cfg)
    except Exception as e:  # ConfigException, OSError, YAML errors: all mean "bad config"
        where = (
            f"kubeconfig {kubeconfig}"
            if kubeconfig
            else ("in-cluster config (not running in a pod? give a kubeconfig)")
        )
        raise ClusterError(f"cannot load {where}: {e}") from e
    return cfg


def _describe(e: Any) -> str:
    """``403 Forbidden: nodes "a" is forbidden: ...``, from the Status the server sent back."""
    message = ""
    try:
        message = json.loads(e.body).get("message", "")
    except (TypeError, ValueError, AttributeError):
        pass
    text = f"{e.status} {e.reason}".strip()
    return f"{text}: {message}" if message else text


def pod_cidrs(node: V1Node) -> tuple[Network, ...]:
    """``spec.podCIDRs`` (``spec.podCIDR`` on old objects), at most one per family."""
    spec = node.spec
    raw = (spec.pod_cidrs or ([spec.pod_cidr] if spec.pod_cidr else [])) if spec else []
    out: dict[int, Network] = {}
    for text in raw:
        try:
            net = ipaddress.ip_network(text, strict=False)
        except ValueError:
            continue
        out.setdefault(net.version, net)
    return tuple(out.values())


def _one_per_family(addresses: Iterable[str]) -> tuple[str, ...]:
    out: dict[int, str] = {}
    for text in addresses:
        try:
            addr = ipaddress.ip_address(text.strip())
        except ValueError:
            continue
        out.setdefault(addr.version, str(addr))
    return tuple(out.values())


def internal_ips(node: V1Node) -> tuple[str, ...]:
    addresses = (node.status.addresses or []) if node.status else []
    return _one_per_family([a.address for a in addresses if a.type == "InternalIP"])


def node_record(node: V1Node) -> NodeRecord | None:
    """The node as other nodes see it, or None while it has no podCIDR."""
    subnets = pod_cidrs(node)
    if not subnets:
        return None
    ann = node.metadata.annotations or {}
    # A garbled annotation falls back to the addresses the kubelet reports.
    ips = _one_per_family(ann.get(ANN_NODE_IPS, "").split(",")) or internal_ips(node)
    return NodeRecord(
        name=node.metadata.name, node_ips=ips, subnets=subnets, vtep_mac=ann.get(ANN_VTEP_MAC, "")
    )
