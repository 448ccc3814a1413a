"""A DaemonSet's pod template read from a manifest, resolved as kubelet resolves it for a node.

Pure: YAML in, plain dataclasses out; nothing runs. What kubelet would compute for the pod on
node `node_name` is computed here: each container's environment (values, `fieldRef`s of the
pod, `configMapKeyRef`s into the manifest's own ConfigMaps, then kubelet's service variables),
`$(VAR)` expanded in command and args, the volume behind each mount, the service-account
volume kubelet adds, and the probes with kubelet's defaults. What the template asks for and
this cannot honour is an error, never silently skipped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

import yaml

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
HOST_PATH_TYPES = ("", "DirectoryOrCreate", "Directory", "FileOrCreate", "File", "Socket")
PROPAGATION = {
    None: "PROPAGATION_PRIVATE",
    "None": "PROPAGATION_PRIVATE",
    "HostToContainer": "PROPAGATION_HOST_TO_CONTAINER",
    "Bidirectional": "PROPAGATION_BIDIRECTIONAL",
}
_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


class PodSpecError(ValueError):
    pass


@dataclass(frozen=True)
class HostPath:
    path: str
    type: str = ""


@dataclass(frozen=True)
class Mount:
    container_path: str
    volume: str
    host_path: HostPath | None  # None: the service-account volume (kubelet's own files)
    read_only: bool = False
    propagation: str = "PROPAGATION_PRIVATE"  # CRI's MountPropagation name


@dataclass(frozen=True)
class Probe:
    kind: str  # "http", "tcp" or "exec"
    host: str = ""
    port: int = 0
    path: str = "/"
    scheme: str = "HTTP"
    command: tuple[str, ...] = ()
    initial_delay: float = 0.0
    period: float = 10.0
    timeout: float = 1.0
    failure_threshold: int = 3
    success_threshold: int = 1


@dataclass
class Container:
    name: str
    image: str
    command: list[str]  # [] : the image's ENTRYPOINT
    args: list[str]  # [] with no command: the image's CMD
    env: dict[str, str]
    mounts: list[Mount]
    privileged: bool = False
    liveness: Probe | None = None
    readiness: Probe | None = None
    image_pull_policy: str = "IfNotPresent"
    resources: dict = field(default_factory=dict)  # requests and limits, as written


@dataclass
class PodSpec:
    name: str
    namespace: str
    uid: str
    labels: dict[str, str]
    node_name: str
    host_network: bool
    host_pid: bool
    service_account: str
    termination_grace: int
    priority_class: str = ""
    init_containers: list[Container] = field(default_factory=list)
    containers: list[Container] = field(default_factory=list)

    def images(self) -> set[str]:
        return {c.image for c in self.init_containers + self.containers}

    def host_paths(self) -> set[str]:
        return {
            m.host_path.path
            for c in self.init_containers + self.containers
            for m in c.mounts
            if m.host_path is not None
        }


def load(path: str) -> list[dict]:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def find(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d.get("kind") == kind and name in (None, d["metadata"].get("name"))]
    if len(found) != 1:
        raise PodSpecError(f"{len(found)} {kind} objects named {name or 'anything'}, not one")
    return found[0]


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: a defined variable is replaced, `$$` is a literal `$`,
    anything else stays as written."""

    def one(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env[name] if name in env else match.group(0)

    return _VAR.sub(one, text)


def daemonset_pod(
    docs: list[dict],
    node_name: str,
    *,
    daemonset: str | None = None,
    uid: str,
    service_env: dict[str, str] | None = None,
    image: str | None = None,
) -> PodSpec:
    """The pod the DaemonSet controller would create for `node_name`, as its kubelet sees it.
    `service_env` is kubelet's service variables (KUBERNETES_SERVICE_HOST, ...); `image`
    replaces every container's image (a new version rolled out)."""
    ds = find(docs, "DaemonSet", daemonset)
    meta = ds["metadata"]
    template = ds["spec"]["template"]
    spec = template["spec"]
    namespace = meta.get("namespace", "default")
    name = f"{meta['name']}-{uid[:5]}"
    pod_fields = {
        "metadata.name": name,
        "metadata.namespace": namespace,
        "metadata.uid": uid,
        "spec.nodeName": node_name,
        "spec.serviceAccountName": spec.get("serviceAccountName", "default"),
    }
    configmaps = {
        d["metadata"]["name"]: d.get("data", {})
        for d in docs
        if d.get("kind") == "ConfigMap" and d["metadata"].get("namespace", "default") == namespace
    }
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    automount = spec.get("automountServiceAccountToken", True)

    def container(c: dict) -> Container:
        env: dict[str, str] = {}
        for var in c.get("env", []):
            env[var["name"]] = _env_value(var, env, pod_fields, configmaps)
        if c.get("envFrom"):
            raise PodSpecError(f"{c['name']}: envFrom is not supported")
        # kubelet adds the service variables after the container's own.
        for key, value in (service_env or {}).items():
            env.setdefault(key, value)
        mounts = [_mount(m, volumes, c["name"]) for m in c.get("volumeMounts", [])]
        if automount and spec.get("serviceAccountName"):
            mounts.append(Mount(SERVICE_ACCOUNT_DIR, "kube-api-access", None, read_only=True))
        security = c.get("securityContext", {})
        return Container(
            name=c["name"],
            image=image or c["image"],
            command=[expand(a, env) for a in c.get("command", [])],
            args=[expand(a, env) for a in c.get("args", [])],
            env=env,
            mounts=mounts,
            privileged=bool(security.get("privileged", False)),
            liveness=_probe(c.get("livenessProbe")),
            readiness=_probe(c.get("readinessProbe")),
            image_pull_policy=c.get("imagePullPolicy", "IfNotPresent"),
            resources=dict(c.get("resources", {})),
        )

    return PodSpec(
        name=name,
        namespace=namespace,
        uid=uid,
        labels=dict(template.get("metadata", {}).get("labels", {})),
        node_name=node_name,
        host_network=bool(spec.get("hostNetwork", False)),
        host_pid=bool(spec.get("hostPID", False)),
        service_account=spec.get("serviceAccountName", "default"),
        termination_grace=int(spec.get("terminationGracePeriodSeconds", 30)),
        priority_class=spec.get("priorityClassName", ""),
        init_containers=[container(c) for c in spec.get("initContainers", [])],
        containers=[container(c) for c in spec["containers"]],
    )


def _env_value(var: dict, env: dict, pod_fields: dict, configmaps: dict) -> str:
    if "value" in var:
        return expand(str(var["value"]), env)
    source = var.get("valueFrom", {})
    if "fieldRef" in source:
        path = source["fieldRef"]["fieldPath"]
        if path not in pod_fields:
            raise PodSpecError(f"env {var['name']}: fieldRef {path} is not supported")
        return pod_fields[path]
    if "configMapKeyRef" in source:
        ref = source["configMapKeyRef"]
        data = configmaps.get(ref["name"])
        if data is None or ref["key"] not in data:
            if ref.get("optional"):
                return ""
            raise PodSpecError(f"env {var['name']}: no ConfigMap key {ref['name']}/{ref['key']}")
        return str(data[ref["key"]])
    raise PodSpecError(f"env {var['name']}: {sorted(source)} is not supported")


def _mount(m: dict, volumes: dict, container: str) -> Mount:
    volume = volumes.get(m["name"])
    if volume is None:
        raise PodSpecError(f"{container}: volumeMount {m['name']} names no volume")
    if "hostPath" not in volume:
        raise PodSpecError(f"volume {m['name']}: only hostPath volumes are supported")
    host = volume["hostPath"]
    kind = host.get("type", "")
    if kind not in HOST_PATH_TYPES:
        raise PodSpecError(f"volume {m['name']}: hostPath type {kind} is not supported")
    propagation = m.get("mountPropagation")
    if propagation not in PROPAGATION:
        raise PodSpecError(f"{container}: mountPropagation {propagation} is not supported")
    if m.get("subPath"):
        raise PodSpecError(f"{container}: subPath is not supported")
    return Mount(
        m["mountPath"],
        m["name"],
        HostPath(host["path"], kind),
        bool(m.get("readOnly", False)),
        PROPAGATION[propagation],
    )


def _probe(p: dict | None) -> Probe | None:
    if not p:
        return None
    kinds = [k for k in ("httpGet", "tcpSocket", "exec") if k in p]
    if len(kinds) != 1:
        raise PodSpecError(f"probe: {sorted(p)} is not supported")
    probe = Probe(
        {"httpGet": "http", "tcpSocket": "tcp", "exec": "exec"}[kinds[0]],
        initial_delay=float(p.get("initialDelaySeconds", 0)),
        period=float(p.get("periodSeconds", 10)),
        timeout=float(p.get("timeoutSeconds", 1)),
        failure_threshold=int(p.get("failureThreshold", 3)),
        success_threshold=int(p.get("successThreshold", 1)),
    )
    if probe.kind == "exec":
        return replace(probe, command=tuple(p["exec"]["command"]))
    where = p[kinds[0]]
    if not isinstance(where["port"], int):
        raise PodSpecError(f"probe: named port {where['port']} is not supported")
    probe = replace(probe, host=where.get("host", ""), port=where["port"])
    if probe.kind == "http":
        probe = replace(probe, path=where.get("path", "/"), scheme=where.get("scheme", "HTTP"))
    return probe
