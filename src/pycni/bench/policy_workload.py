"""The objects `pycnictl bench policy` feeds NetworkPolicy enforcement: namespaces, pods and
policies shaped like a small company's cluster, deterministic for a given size.

Five namespaces (labelled by team and environment), pods of 20 apps in three tiers, each
declaring the container ports ``http`` (8080) and ``metrics`` (9090). Policy ``i`` selects the
pods of one app (``app=app<i % 20>``) in its namespace and is one of six kinds, in turn:

0. ingress from the next app's pods, TCP 8080;
1. ingress from the namespaces of team ``frontend``, TCP 443 and 8443-8450 (``endPort``);
2. ingress from web-tier pods of production namespaces, to the named port ``http``;
3. ingress from the ``monitoring`` namespace to the named port ``metrics``, and egress to
   a database range (10.0.0.0/8 except 10.96.0.0/12, TCP 5432) and DNS in ``kube-system``;
4. ingress from an ipBlock (192.168.0.0/16, TCP 80) or from the web and api tiers (any port);
5. deny all ingress to the app's non-canary pods (``ingress: []``, matchExpressions).

Pure: no kernel, no datastore. The lab writes these objects into its datastore; the scale
measurement hands them to the agent's controller directly.
"""

from __future__ import annotations

import ipaddress

NAMESPACES = (
    ("shop", {"team": "frontend", "env": "prod"}),
    ("payments", {"team": "backend", "env": "prod"}),
    ("catalog", {"team": "backend", "env": "staging"}),
    ("monitoring", {"team": "ops", "env": "prod"}),
    ("kube-system", {"team": "ops", "env": "prod"}),
)
APPS = 20
TIERS = ("web", "api", "db")
KINDS = 6
HTTP_PORT, METRICS_PORT = 8080, 9090
NETWORKING_API = "networking.k8s.io/v1"
# An app no policy selects: what a relabelled pod leaves or joins.
UNSELECTED_APP = "batch"


def namespace_objects() -> list[dict]:
    return [
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": name, "labels": {**labels, "kubernetes.io/metadata.name": name}},
        }
        for name, labels in NAMESPACES
    ]


def pod_labels(i: int) -> dict[str, str]:
    return {
        "app": f"app{i % APPS}",
        "tier": TIERS[i % len(TIERS)],
        "version": "canary" if i % 10 == 9 else "stable",
    }


def pod_object(
    namespace: str, name: str, labels: dict[str, str], node: str, ip: str | None
) -> dict:
    """A running pod as the API server holds it (status only when it has an address)."""
    obj: dict = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels)},
        "spec": {
            "nodeName": node,
            "containers": [
                {
                    "name": "main",
                    "image": "bench/app",
                    "ports": [
                        {"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"},
                        {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
                    ],
                }
            ],
        },
    }
    if ip is not None:
        obj["status"] = {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
    return obj


def app_namespace(app: int) -> str:
    """Where the pods of app number ``app`` run (all but kube-system hold apps)."""
    spaces = [name for name, _ in NAMESPACES if name != "kube-system"]
    return spaces[app % len(spaces)]


def pod_objects(count: int, node: str, addresses: list[str], start: int = 0) -> list[dict]:
    """``count`` pods on ``node``, pod ``start + j`` taking ``addresses[j]``, spread over the
    namespaces (all but kube-system) and apps."""
    if len(addresses) < count:
        raise ValueError(f"{count} pods need {count} addresses, got {len(addresses)}")
    out = []
    for j in range(count):
        i = start + j
        labels = pod_labels(i)
        namespace = app_namespace(i % APPS)
        out.append(pod_object(namespace, f"{labels['app']}-{i}", labels, node, addresses[j]))
    return out


def addresses(subnet: str, count: int, skip: int = 0) -> list[str]:
    """``count`` host addresses of ``subnet`` from its top down, after skipping ``skip`` (the
    bottom is where IPAM allocates the lab's real pods)."""
    net = ipaddress.ip_network(subnet)
    if count + skip > net.num_addresses - 3:
        raise ValueError(f"{subnet} has no room for {count} more pods")
    top = int(net.broadcast_address) - 1 - skip
    return [str(ipaddress.ip_address(top - j)) for j in range(count)]


def policy_object(i: int, name: str | None = None, namespace: str | None = None) -> dict:
    """Policy number ``i`` of the workload (see the module's docstring for its kinds)."""
    app = f"app{i % APPS}"
    ns = namespace or app_namespace(i % APPS)
    selector: dict = {"matchLabels": {"app": app}}
    spec: dict = {"podSelector": selector}
    kind = i % KINDS
    if kind == 0:
        spec["ingress"] = [
            {
                "from": [{"podSelector": {"matchLabels": {"app": f"app{(i + 1) % APPS}"}}}],
                "ports": [{"protocol": "TCP", "port": HTTP_PORT}],
            }
        ]
    elif kind == 1:
        spec["ingress"] = [
            {
                "from": [{"namespaceSelector": {"matchLabels": {"team": "frontend"}}}],
                "ports": [
                    {"protocol": "TCP", "port": 443},
                    {"protocol": "TCP", "port": 8443, "endPort": 8450},
                ],
            }
        ]
    elif kind == 2:
        spec["ingress"] = [
            {
                "from": [
                    {
                        "podSelector": {"matchLabels": {"tier": "web"}},
                        "namespaceSelector": {"matchLabels": {"env": "prod"}},
                    }
                ],
                "ports": [{"protocol": "TCP", "port": "http"}],
            }
        ]
    elif kind == 3:
        spec["policyTypes"] = ["Ingress", "Egress"]
        spec["ingress"] = [
            {
                "from": [
                    {
                        "namespaceSelector": {
                            "matchLabels": {"kubernetes.io/metadata.name": "monitoring"}
                        }
                    }
                ],
                "ports": [{"protocol": "TCP", "port": "metrics"}],
            }
        ]
        spec["egress"] = [
            {
                "to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.96.0.0/12"]}}],
                "ports": [{"protocol": "TCP", "port": 5432}],
            },
            {
                "to": [
                    {
                        "namespaceSelector": {
                            "matchLabels": {"kubernetes.io/metadata.name": "kube-system"}
                        }
                    }
                ],
                "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
            },
        ]
    elif kind == 4:
        spec["ingress"] = [
            {"from": [{"ipBlock": {"cidr": "192.168.0.0/16"}}], "ports": [{"port": 80}]},
            {
                "from": [
                    {
                        "podSelector": {
                            "matchExpressions": [
                                {"key": "tier", "operator": "In", "values": ["web", "api"]}
                            ]
                        }
                    }
                ]
            },
        ]
    else:
        spec["podSelector"] = {
            "matchLabels": {"app": app},
            "matchExpressions": [{"key": "version", "operator": "NotIn", "values": ["canary"]}],
        }
        spec["policyTypes"] = ["Ingress"]
        spec["ingress"] = []
    return {
        "apiVersion": NETWORKING_API,
        "kind": "NetworkPolicy",
        "metadata": {"name": name or f"pol-{i:03d}", "namespace": ns},
        "spec": spec,
    }


def policy_objects(count: int) -> list[dict]:
    return [policy_object(i) for i in range(count)]


def server_policies(
    count: int, namespace: str, servers: list[str], client: str, ports: list[int]
) -> list[dict]:
    """``count`` ingress policies that all select the ``servers`` (pods labelled
    ``pod=<name>``, as the lab's own), each with the rules of the workload's policy of the same
    number; the last in chain order (names sort) also allows ``client`` on ``ports``: a new
    connection from it walks past every other policy's rules first."""
    out = []
    selector = {"matchExpressions": [{"key": "pod", "operator": "In", "values": sorted(servers)}]}
    for i in range(count):
        obj = policy_object(i, name=f"srv-{i:03d}", namespace=namespace)
        spec = obj["spec"]
        spec["podSelector"] = selector
        spec["policyTypes"] = ["Ingress"]
        spec.pop("egress", None)
        if i == count - 1:
            spec["ingress"] = [
                *spec.get("ingress", []),
                {
                    "from": [{"podSelector": {"matchLabels": {"pod": client}}}],
                    "ports": [{"protocol": "TCP", "port": p} for p in ports],
                },
            ]
        out.append(obj)
    return out
