"""The kubernetes datastore: the API server's Node objects are the cluster state.

kube-controller-manager allocates each node's pod CIDR(s) into ``spec.podCIDRs``; we only read
them, and publish what other nodes need to reach our pods in two annotations on our own Node.
Nothing is claimed or leased here: a node's subnets live as long as its Node object, but
a node that vanished without `pycnictl leave` (its Node stays, its kubelet silent) is left out
of ``nodes()`` once its Ready condition has been Unknown for ``node_timeout`` seconds (the
node lifecycle controller sets Unknown when the kubelet stops renewing its lease), and is back
as soon as it reports again. That judgement is only made on a current view: while the watch
is failing (an API server outage) the last one stands, so an outage never removes a node.

``nodes()`` lists, until somebody waits for changes: from the first ``wait()`` on, an informer
(cluster/informer.py) goes on from the last list with one long-lived watch, renewed every 5-10
minutes, and ``nodes()`` and ``wait()`` cost no request, nor does a ``keepalive()`` that finds
our own Node, in that cache, as we published it. So the agent's loop makes about 8 requests an
hour in a steady cluster, where it used to make about 7,600 (issue 19), and a one-shot caller
(uninstall) lists once and never watches.

The official client does the talking. It takes a noticeable time to import, so it is imported
on first construction, never when this module is imported.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from .datastore import Datastore
from .informer import BACKOFF, WATCH_TIMEOUT, Informer
from .kv import KVError
from .model import ClusterError, Network, NodeRecord

if TYPE_CHECKING:
    from kubernetes.client import ApiClient, Configuration, CoreV1Api, V1Node

log = logging.getLogger("pycni")

# How long a Node's Ready condition may stay Unknown before its routes go (with the kubelet's
# grace of about 50 s before Unknown, and one resync, within 5 minutes).
DEFAULT_NODE_TIMEOUT = 240.0

ANN_NODE_IPS = "pycni.io/node-ips"
ANN_VTEP_MAC = "pycni.io/vtep-mac"
# The generated client would pick application/json-patch+json for a dict body, which the API
# server rejects; a JSON merge patch is what we mean (null deletes a key).
MERGE_PATCH = "application/merge-patch+json"
# After publishing our annotations, how long nodes() may wait for the watch to bring them back,
# so that it answers with what was just written.
READ_YOUR_WRITES = 2.0

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
    # The node informer's watch timeout range and failure backoff (tests and the benchmark
    # shorten them).
    watch_timeout: tuple[float, float] = WATCH_TIMEOUT
    backoff: tuple[float, float] = BACKOFF

    def __init__(
        self,
        node_name: str,
        kubeconfig: str | None = None,
        api_client: ApiClient | None = None,
        node_timeout: float = DEFAULT_NODE_TIMEOUT,
        clock: Callable[[], float] = time.time,
    ) -> None:
        from kubernetes import client

        self.node_name = node_name
        self.node_timeout = node_timeout
        self._clock = clock
        # When each Node's Ready condition turned Unknown (its lastTransitionTime), for those
        # where it is; and the nodes left out as vanished, as last judged on a current view.
        self._unknown_since: dict[str, float] = {}
        self._vanished: frozenset[str] = frozenset()
        self._owns_client = api_client is None
        if api_client is None:
            api_client = client.ApiClient(_load_config(kubeconfig))
        self._client = api_client
        self._api: CoreV1Api = client.CoreV1Api(api_client)
        self._local: NodeRecord | None = None
        # Every node with a podCIDR, as other nodes see it; started by the first wait().
        self._informer: Informer[NodeRecord] | None = None
        self._seen = 0  # the informer's change counter as of our last look
        self._listed: Any = None  # nodes()' last list, while there is no informer

    # -- Datastore ----------------------------------------------------------------------------

    def register(self, local: NodeRecord) -> NodeRecord:
        self._local = local
        return self._sync()

    def node_addresses(self) -> tuple[str, ...]:
        node = self._call("read node", self._api.read_node, self.node_name)
        return internal_ips(node)

    def nodes(self) -> list[NodeRecord]:
        if self._informer is None:
            self._listed = self._call("list nodes", self._api.list_node)
            found = [self._derive(node) for node in self._listed.items or ()]
            records = [r for r in found if r is not None]
            current = True  # just listed
        else:
            # From the cache: during an outage it may be stale, as client-go's listers are.
            self._seen, cache = self._informer.snapshot()
            records, current = list(cache.values()), self._informer.healthy
        if current:
            self._judge({r.name for r in records})
        return sorted((r for r in records if r.name not in self._vanished), key=lambda r: r.name)

    def _derive(self, node: V1Node) -> NodeRecord | None:
        """node_record, noting whether the Node's Ready condition is Unknown and since when
        (the informer calls it for every version of every Node it sees)."""
        name = node.metadata.name
        since = unknown_since(node)
        if since is None:
            self._unknown_since.pop(name, None)
        elif since > 0:
            self._unknown_since[name] = since
        else:  # no transition time given: from when we first saw it so
            self._unknown_since.setdefault(name, self._clock())
        return node_record(node)

    def _judge(self, names: set[str]) -> None:
        """Which of ``names`` vanished: Ready Unknown for longer than node_timeout (this node
        never: its agent is the one asking)."""
        now = self._clock()
        vanished = frozenset(
            name
            for name in names
            if name != self.node_name
            and name in self._unknown_since
            and now - self._unknown_since[name] > self.node_timeout
        )
        for name in sorted(vanished - self._vanished):
            log.warning(
                "node %s: Ready has been Unknown for over %.0f s (it vanished without "
                "`pycnictl leave`?): its routes go until it reports again",
                name,
                self.node_timeout,
            )
        for name in sorted((self._vanished - vanished) & names):
            log.info("node %s reports again: its routes come back", name)
        self._vanished = vanished

    def wait(self, timeout: float) -> bool:
        if timeout <= 0:
            return False
        informer = self._informer or self._watch_from_last_list()
        version = informer.wait_changed(self._seen, timeout)
        changed, self._seen = version != self._seen, version
        return changed

    def keepalive(self) -> NodeRecord:
        if self._local is None:
            raise ClusterError("keepalive before register")
        return self._cached_self() or self._sync()

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

    @property
    def informer(self) -> Informer[NodeRecord] | None:
        """The node informer, once a wait() has started it (for its stats)."""
        return self._informer

    def close(self) -> None:
        if self._informer is not None:
            self._informer.stop()
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
            patched = self._call(
                "publish annotations",
                self._api.patch_node,
                self.node_name,
                {"metadata": {"annotations": want}},
                _content_type=MERGE_PATCH,
            )
            self._await_in_cache(node_record(patched))
        return NodeRecord(
            name=self.node_name, node_ips=ips, subnets=subnets, vtep_mac=self._local.vtep_mac
        )

    def _cached_self(self) -> NodeRecord | None:
        """Our record from the informer's cache, when that is as good as reading our Node: the
        cache is as current as its watch, and shows the addresses and VTEP MAC we would
        publish, so _sync would write nothing. Else None (and _sync reads and writes)."""
        informer, local = self._informer, self._local
        if informer is None or local is None or not informer.healthy or not local.node_ips:
            return None  # without our own addresses, _sync compares with the kubelet's
        cached = informer.get(self.node_name)
        if cached is None:
            return None  # deleted, or no podCIDR: _sync says which
        want = NodeRecord(self.node_name, local.node_ips, cached.subnets, local.vtep_mac)
        return cached if cached == want else None

    def _await_in_cache(self, record: NodeRecord | None) -> None:
        """Until the watch has brought what we just wrote, so nodes() answers with it."""
        informer = self._informer
        if informer is not None and informer.healthy:
            informer.wait_until(lambda cache: cache.get(self.node_name) == record, READ_YOUR_WRITES)

    def _watch_from_last_list(self) -> Informer[NodeRecord]:
        """Start the node informer from nodes()' last list (listing first if there is none):
        its watch goes on from there, so every change after what the caller saw wakes it."""
        if self._listed is None:
            self.nodes()
        informer = Informer(
            "nodes",
            self._api.list_node,
            self._derive,
            watch_timeout=self.watch_timeout,
            backoff=self.backoff,
            request_timeout=self.request_timeout,
        ).seed(self._listed)
        self._informer, self._seen, self._listed = informer, informer.version, None
        return informer.start()

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        from kubernetes.client import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return fn(*args, _request_timeout=self.request_timeout, **kwargs)
        except ApiException as e:
            # read_node/patch_node of our own node: a 404 is a setup problem, not an outage
            if e.status == 404 and args and args[0] == self.node_name:
                raise ClusterError(NOT_REGISTERED.format(name=self.node_name)) from e
            raise self._kv_error(what, e) from e
        except HTTPError as e:
            raise self._kv_error(what, e) from e

    def _kv_error(self, what: str, e: BaseException) -> KVError:
        from kubernetes.client import ApiException
        from urllib3.exceptions import HTTPError

        if isinstance(e, ApiException):
            return KVError(f"kubernetes API server: {what}: {_describe(e)}")
        if isinstance(e, HTTPError | OSError):
            return KVError(self._unreachable(what, e))
        return KVError(f"kubernetes API server: {what}: {e}")

    def _unreachable(self, what: str, e: BaseException) -> str:
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


def unknown_since(node: V1Node) -> float | None:
    """When the Node's Ready condition turned Unknown (epoch seconds; 0 when it does not say),
    or None when it is not Unknown (True, False, or not reported yet)."""
    for condition in (node.status.conditions or []) if node.status else []:
        if condition.type == "Ready":
            if condition.status != "Unknown":
                return None
            when = condition.last_transition_time
            return when.timestamp() if when is not None else 0.0
    return None


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
