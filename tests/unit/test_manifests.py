"""The Kubernetes manifests (deploy/kubernetes) checked against the code they run, without a
cluster: every document is a valid object of the official client's models with no field
lost, the image is the one deploy/IMAGE names, the containers' arguments parse with pycnictl's
own parser and use the paths the code expects on the host, the probes reach the agent's
metrics port, and the RBAC rules grant exactly what the kubernetes datastore calls."""

from __future__ import annotations

import ast
import copy
import inspect
import json
import os
import re

import pytest

yaml = pytest.importorskip("yaml")
client = pytest.importorskip("kubernetes.client")

import pycni  # noqa: E402
from pycni import shim  # noqa: E402
from pycni.agent import metrics  # noqa: E402
from pycni.cluster.kubernetes import KubernetesDatastore  # noqa: E402
from pycni.cluster.model import ClusterSettings  # noqa: E402
from pycni.cni.netconf import DEFAULT_DATA_DIR  # noqa: E402
from pycni.ctl import install, uninstall  # noqa: E402
from pycni.ctl.agent import BACKENDS, run_agent  # noqa: E402
from pycni.ctl.main import build_parser  # noqa: E402
from pycni.install.launchers import PLUGIN_NAME  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
DEPLOY = os.path.join(ROOT, "deploy")
MANIFEST = os.path.join(DEPLOY, "kubernetes", "pycni.yaml")
UNINSTALL = os.path.join(DEPLOY, "kubernetes", "pycni-uninstall.yaml")
SRC = os.path.join(ROOT, "src", "pycni")

# What each generated client method asks of the API server (RBAC verb on nodes).
API_VERBS = {"read_node": "get", "list_node": "list", "patch_node": "patch"}


def docs(path: str) -> list[dict]:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def one(path: str, kind: str) -> dict:
    found = [d for d in docs(path) if d["kind"] == kind]
    assert len(found) == 1, (path, kind)
    return found[0]


def defaults(*argv: str):
    """pycnictl's own defaults for a command."""
    return build_parser().parse_args(list(argv))


def deserialize(doc: dict):
    """The document as the official client's model (V1DaemonSet, V1ClusterRole, ...)."""
    api = client.ApiClient()
    try:
        version = doc["apiVersion"].split("/")[-1]
        model = f"{version.capitalize()}{doc['kind']}"
        assert hasattr(client, model), f"no model {model} in the kubernetes client"
        return api, api.deserialize(json.dumps(doc), model, "application/json")
    finally:
        api.close()


@pytest.mark.parametrize("path", [MANIFEST, UNINSTALL], ids=["pycni", "uninstall"])
def test_every_document_is_a_valid_object_with_no_field_lost(path):
    kinds = []
    for doc in docs(path):
        api, obj = deserialize(doc)
        # The models drop keys they do not know: a misspelt field (mountPropogation) would
        # vanish silently on a real cluster too. Round trip = the same document.
        assert api.sanitize_for_serialization(obj) == doc, doc["kind"]
        kinds.append(doc["kind"])
    assert sorted(kinds) == sorted(
        ["ClusterRole", "ClusterRoleBinding", "DaemonSet", "ServiceAccount"]
        + (["ConfigMap"] if path == MANIFEST else [])
    )


def containers(ds: dict) -> list[dict]:
    spec = ds["spec"]["template"]["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def test_one_image_everywhere_and_it_is_the_containerfiles():
    with open(os.path.join(DEPLOY, "IMAGE")) as f:
        image = f.read().strip()
    name, _, tag = image.rpartition(":")
    assert name and tag == pycni.__version__
    for path in (MANIFEST, UNINSTALL):
        for c in containers(one(path, "DaemonSet")):
            assert c["image"] == image, (path, c["name"])
            assert c["imagePullPolicy"] == "IfNotPresent"  # a locally loaded image works
    with open(os.path.join(DEPLOY, "Containerfile")) as f:
        containerfile = f.read()
    assert f'org.opencontainers.image.version="{tag}"' in containerfile
    assert 'ENTRYPOINT ["pycnictl"]' in containerfile
    assert '-t "$(cat deploy/IMAGE)"' in containerfile
    for package in ("iproute2", "nftables", "iptables"):
        assert package in containerfile


def expand(args: list[str], container: dict, configmap: dict | None) -> list[str]:
    """Kubernetes' $(VAR) expansion of a container's args from its env."""
    env = {}
    for var in container.get("env", []):
        source = var.get("valueFrom", {})
        if "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            assert configmap is not None and ref["name"] == configmap["metadata"]["name"]
            env[var["name"]] = configmap["data"][ref["key"]]
        elif "fieldRef" in source:
            assert source["fieldRef"]["fieldPath"] == "spec.nodeName"
            env[var["name"]] = "node-1"
        else:
            env[var["name"]] = var["value"]

    def one_var(match: re.Match) -> str:
        assert match.group(1) in env, f"$({match.group(1)}) is not in the container's env"
        return env[match.group(1)]

    return [re.sub(r"\$\((\w+)\)", one_var, a) for a in args]


def host_path(ds: dict, container: dict, path: str) -> str | None:
    """Where `path` in the container is on the host, through its hostPath mounts."""
    volumes = {v["name"]: v for v in ds["spec"]["template"]["spec"]["volumes"]}
    best = None
    for mount in container.get("volumeMounts", []):
        where = mount["mountPath"].rstrip("/")
        if path == where or path.startswith(where + "/"):
            if best is None or len(where) > len(best[0]):
                best = (where, volumes[mount["name"]]["hostPath"]["path"])
    if best is None:
        return None
    return best[1].rstrip("/") + path[len(best[0]) :]


def mount(container: dict, path: str) -> dict:
    found = [m for m in container["volumeMounts"] if m["mountPath"] == path]
    assert len(found) == 1, path
    return found[0]


def agent_and_args():
    ds = one(MANIFEST, "DaemonSet")
    agent = ds["spec"]["template"]["spec"]["containers"][0]
    args = build_parser().parse_args(expand(agent["args"], agent, one(MANIFEST, "ConfigMap")))
    return ds, agent, args


def test_the_agent_runs_with_the_cluster_settings_and_the_hosts_paths():
    ds, agent, args = agent_and_args()
    assert args.func is run_agent
    assert args.datastore == "kubernetes" and args.node_name == "node-1"
    assert args.cluster_cidr == ["10.244.0.0/16"] and args.backend in BACKENDS
    agent_defaults = defaults("agent")
    # The plugin on the host connects to the socket its config names: same path both sides.
    assert args.socket == shim.DEFAULT_SOCKET
    assert host_path(ds, agent, args.socket) == shim.DEFAULT_SOCKET
    assert host_path(ds, agent, args.subnet_file) == agent_defaults.subnet_file
    assert args.data_dir == DEFAULT_DATA_DIR
    assert host_path(ds, agent, args.data_dir) == DEFAULT_DATA_DIR
    assert host_path(ds, agent, args.conf_dir) == agent_defaults.conf_dir
    # Pods' namespaces are entered by path; new ones must show up in the running container.
    netns = mount(agent, "/run/netns")
    assert netns["mountPropagation"] == "HostToContainer"
    assert host_path(ds, agent, "/run/netns/cni-1234") == "/run/netns/cni-1234"
    assert host_path(ds, agent, "/run/xtables.lock") == "/run/xtables.lock"
    assert args.log_file == ""  # kubectl logs
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True and agent["securityContext"]["privileged"] is True
    assert pod["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in pod["tolerations"]  # control plane, not-ready nodes
    assert ds["spec"]["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 1},
    }
    assert agent["resources"]["requests"]


def test_the_configmap_speaks_dual_stack_and_the_manifest_passes_it_on():
    ds = one(MANIFEST, "DaemonSet")
    agent = ds["spec"]["template"]["spec"]["containers"][0]
    configmap = copy.deepcopy(one(MANIFEST, "ConfigMap"))
    assert configmap["data"]["cluster-cidr-ipv6"] == ""  # IPv4 only as shipped
    configmap["data"]["cluster-cidr-ipv6"] = "fd00:10:244::/56"
    args = build_parser().parse_args(expand(agent["args"], agent, configmap))
    assert args.cluster_cidr == ["10.244.0.0/16", "fd00:10:244::/56"]
    settings = ClusterSettings(tuple(args.cluster_cidr))
    assert [str(settings.cidr(v)) for v in (4, 6)] == ["10.244.0.0/16", "fd00:10:244::/56"]
    # kubeadm's own form, both in cluster-cidr, works as well.
    configmap["data"].update({"cluster-cidr": "10.244.0.0/16,fd00:10:244::/56"})
    configmap["data"]["cluster-cidr-ipv6"] = ""
    args = build_parser().parse_args(expand(agent["args"], agent, configmap))
    assert args.cluster_cidr == ["10.244.0.0/16", "fd00:10:244::/56"]


def test_cluster_cidrs_repeat_or_come_comma_separated():
    parse = build_parser().parse_args
    assert parse(
        ["agent", "--cluster-cidr", "10.1.0.0/16", "--cluster-cidr", "fd00::/48"]
    ).cluster_cidr == ["10.1.0.0/16", "fd00::/48"]
    assert parse(["agent", "--cluster-cidr=10.1.0.0/16, fd00::/48,"]).cluster_cidr == [
        "10.1.0.0/16",
        "fd00::/48",
    ]
    assert parse(["agent", "--cluster-cidr="]).cluster_cidr == []  # no cluster side


def test_the_init_container_installs_the_standalone_launcher_on_the_host():
    ds = one(MANIFEST, "DaemonSet")
    init = ds["spec"]["template"]["spec"]["initContainers"][0]
    args = build_parser().parse_args(expand(init["args"], init, None))
    assert args.func is install._install and args.standalone
    assert args.subnet is None  # the agent writes the config list once the subnet is known
    assert host_path(ds, init, args.bin_dir) == defaults("install").bin_dir
    # The native executable it copies is the one the image's build stage made, standalone.
    build_args, copied = containerfile_native_build()
    assert build_args.func is install._install and build_args.native
    assert build_args.standalone and build_args.native_from is None
    source, destination = copied
    assert source == os.path.join(build_args.bin_dir, PLUGIN_NAME)
    assert args.native_from == destination


def containerfile_native_build():
    """(the parsed `pycnictl install` of the Containerfile's native stage, (source, target)
    of the COPY that brings its executable into the final image)."""
    import shlex

    with open(os.path.join(DEPLOY, "Containerfile")) as f:
        text = f.read().replace("\\\n", " ")
    stages = re.split(r"^FROM ", text, flags=re.M)[1:]
    native = [s for s in stages if s.split("\n", 1)[0].split()[-2:] == ["AS", "native"]]
    assert len(native) == 1, "a build stage named native"
    assert "gcc" in native[0] and "libc6-dev" in native[0]
    runs = [
        cmd
        for line in native[0].splitlines()
        if line.startswith("RUN ")
        for cmd in line[4:].split("&&")
        if cmd.split()[:2] == ["pycnictl", "install"]
    ]
    assert len(runs) == 1, runs
    parsed = build_parser().parse_args(shlex.split(runs[0])[1:])
    copies = [
        line.split()[2:]
        for line in stages[-1].splitlines()
        if line.startswith("COPY --from=native ")
    ]
    assert len(copies) == 1 and len(copies[0]) == 2, copies
    return parsed, tuple(copies[0])


def test_the_probes_reach_the_agents_metrics_endpoint():
    ds, agent, args = agent_and_args()
    assert args.metrics_port > 0
    # run_agent's address when none is given; the probes must ask there, on the node's
    # loopback (hostNetwork: the kubelet's own).
    listen = args.metrics_addr or "127.0.0.1"
    assert 'args.metrics_addr or "127.0.0.1"' in inspect.getsource(run_agent)
    assert metrics.is_loopback(listen)
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = agent[probe]["httpGet"]
        assert (get["host"], get["port"], get["path"]) == (listen, args.metrics_port, path)


def test_the_uninstall_daemonset_removes_pycnis_own_directories_from_the_host():
    ds = one(UNINSTALL, "DaemonSet")
    c = ds["spec"]["template"]["spec"]["containers"][0]
    # sh -c 'until pycnictl "$@" ...' pycnictl ARGS: the args are pycnictl's.
    assert c["command"][:2] == ["/bin/sh", "-c"] and 'pycnictl "$@"' in c["command"][2]
    args = build_parser().parse_args(expand(c["args"], c, None))
    assert args.func is uninstall.run_uninstall
    assert host_path(ds, c, args.bin_dir) == defaults("install").bin_dir
    assert host_path(ds, c, args.conf_dir) == defaults("agent").conf_dir
    assert host_path(ds, c, args.data_dir) == DEFAULT_DATA_DIR
    assert host_path(ds, c, args.run_dir) == os.path.dirname(shim.DEFAULT_SOCKET)
    assert host_path(ds, c, os.path.join(args.run_dir, "agent.sock")) == shim.DEFAULT_SOCKET
    # Not mount points themselves, so that they can be removed.
    mounted = {m["mountPath"] for m in c["volumeMounts"]}
    assert args.data_dir not in mounted and args.run_dir not in mounted
    assert args.datastore == "kubernetes" and args.node_name == "node-1"
    assert ds["spec"]["template"]["spec"]["hostNetwork"] is True
    assert c["securityContext"]["privileged"] is True


# --- RBAC: derived from the code's calls --------------------------------------------------------


def _class(path: str, name: str) -> ast.ClassDef:
    with open(path) as f:
        tree = ast.parse(f.read())
    return next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name)


def datastore_methods_used(path: str, owner: str, skip: tuple[str, ...] = ()) -> set[str]:
    """Methods called as `<owner>.store.<m>` (or `self.store.<m>`) in `path`."""
    with open(path) as f:
        tree = ast.parse(f.read())
    skipped = {
        id(n)
        for fn in ast.walk(tree)
        if isinstance(fn, ast.FunctionDef) and fn.name in skip
        for n in ast.walk(fn)
    }
    used = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Attribute)
            and node.value.attr == "store"
            and isinstance(node.value.value, ast.Name)
            and node.value.value.id == owner
            and id(node) not in skipped
        ):
            used.add(node.attr)
    return used


def api_verbs(entry_points: set[str]) -> set[str]:
    """The RBAC verbs on nodes the kubernetes datastore needs for these methods, following
    its calls to its own methods."""
    cls = _class(os.path.join(SRC, "cluster", "kubernetes.py"), "KubernetesDatastore")
    methods = {f.name: f for f in cls.body if isinstance(f, ast.FunctionDef)}
    todo, seen, verbs = [m for m in entry_points if m in methods], set(), set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for node in ast.walk(methods[name]):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Attribute)
                and node.value.attr == "_api"
            ):
                assert node.attr in API_VERBS, f"{node.attr}: which RBAC verb? extend API_VERBS"
                verbs.add(API_VERBS[node.attr])
            elif (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "self"
                and node.attr in methods
            ):
                todo.append(node.attr)
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "Informer"
            ):
                verbs.add("watch")  # Informer(kind, list_node, ...) lists and watches
    return verbs


def rbac_verbs(path: str) -> set[str]:
    """The verbs on nodes (the other rules are NetworkPolicy's, checked on their own)."""
    rules = [r for r in one(path, "ClusterRole")["rules"] if "nodes" in r["resources"]]
    assert all(r["apiGroups"] == [""] and r["resources"] == ["nodes"] for r in rules), rules
    return {verb for r in rules for verb in r["verbs"]}


# The official client's list functions and the resource each one reads.
LIST_FUNCTIONS = {
    "list_namespace": ("", "namespaces"),
    "list_pod_for_all_namespaces": ("", "pods"),
    "list_network_policy_for_all_namespaces": ("networking.k8s.io", "networkpolicies"),
}


def test_rbac_grants_exactly_the_networkpolicy_watches():
    """Informers list and watch; the policy source calls nothing else of the API."""
    tree = ast.parse(open(os.path.join(SRC, "cluster", "kubernetes_objects.py")).read())
    called = {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and node.attr.startswith(("list_", "read_", "patch_"))
    }
    assert called == set(LIST_FUNCTIONS)
    granted = {
        (group, resource): set(r["verbs"])
        for r in one(MANIFEST, "ClusterRole")["rules"]
        for group in r["apiGroups"]
        for resource in r["resources"]
        if resource != "nodes"
    }
    assert granted == {want: {"list", "watch"} for want in LIST_FUNCTIONS.values()}


def test_rbac_grants_exactly_what_the_agent_calls():
    used = datastore_methods_used(
        os.path.join(SRC, "agent", "cluster.py"), "self", skip=("leave",)
    )  # leave runs outside the DaemonSet
    assert {"register", "nodes", "wait", "keepalive"} <= used
    assert rbac_verbs(MANIFEST) == api_verbs(used) == {"get", "list", "watch", "patch"}
    binding = one(MANIFEST, "ClusterRoleBinding")
    account = one(MANIFEST, "ServiceAccount")
    ds = one(MANIFEST, "DaemonSet")
    assert binding["roleRef"]["name"] == one(MANIFEST, "ClusterRole")["metadata"]["name"]
    assert binding["subjects"] == [
        {
            "kind": "ServiceAccount",
            "name": account["metadata"]["name"],
            "namespace": account["metadata"]["namespace"],
        }
    ]
    assert ds["spec"]["template"]["spec"]["serviceAccountName"] == account["metadata"]["name"]
    assert ds["metadata"]["namespace"] == account["metadata"]["namespace"] == "kube-system"


def test_rbac_grants_exactly_what_uninstall_calls():
    used = datastore_methods_used(os.path.join(SRC, "install", "uninstall.py"), "node")
    assert "release" in used
    assert rbac_verbs(UNINSTALL) == api_verbs(used)
    binding = one(UNINSTALL, "ClusterRoleBinding")
    account = one(UNINSTALL, "ServiceAccount")
    assert binding["subjects"][0]["name"] == account["metadata"]["name"]
    assert (
        one(UNINSTALL, "DaemonSet")["spec"]["template"]["spec"]["serviceAccountName"]
        == account["metadata"]["name"]
    )


def test_datastore_entry_points_exist():
    """The names the RBAC derivation follows are the datastore's real methods."""
    for name in ("register", "nodes", "wait", "keepalive", "release"):
        assert callable(getattr(KubernetesDatastore, name))
