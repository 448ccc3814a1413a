"""A CRI v1 client, as kubelet speaks to containerd, without crictl or generated code.

Go programs built with protobuf register the gzipped FileDescriptorProto of every .proto file
they use, so the containerd binary itself carries the `runtime.v1` schema (k8s.io/cri-api's
api.proto) of exactly the CRI it serves. We find those gzip members, rebuild the schema in a
private descriptor pool and make message classes from it at run time; requests go over gRPC on
containerd's unix socket. Scanning the 48 MB binary takes about 0.1 s, so nothing is cached.

grpc and protobuf are imported here only: pycnictl's start-up never imports this module.
"""

from __future__ import annotations

import re
import threading
import zlib
from typing import Any

CONTAINERD = "/usr/bin/containerd"
CRI_PACKAGE = "runtime.v1"
RUNTIME_SERVICE = "runtime.v1.RuntimeService"
IMAGE_SERVICE = "runtime.v1.ImageService"
_GZIP_MAGIC = b"\x1f\x8b\x08"  # gzip member, deflate
_MAX_MEMBER = 4 << 20  # no embedded descriptor comes near this
# kubelet's --runtime-request-timeout is 2 minutes.
DEFAULT_TIMEOUT = 120.0


class CriError(Exception):
    """A CRI call failed: the gRPC status code and details, or a schema problem."""

    def __init__(self, method: str, code: str, details: str):
        super().__init__(f"{method}: {code}: {details}")
        self.method = method
        self.code = code
        self.details = details


def embedded_files(binary: str = CONTAINERD) -> list:
    """Every FileDescriptorProto a Go binary embeds, in file order: gzip members (golang/protobuf
    and gogo, as in containerd 1.x), else raw serialized ones (protobuf-go v2, containerd 2.x)."""
    with open(binary, "rb") as f:
        data = f.read()
    files = _gzipped_files(data)
    if not any(f.package == CRI_PACKAGE for f in files):
        files += _raw_files(data)
    return files


def _gzipped_files(data: bytes) -> list:
    from google.protobuf import descriptor_pb2
    from google.protobuf.message import DecodeError

    files = []
    at = data.find(_GZIP_MAGIC)
    while at != -1:
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            raw = inflater.decompress(data[at : at + _MAX_MEMBER])
        except zlib.error:
            raw = b""  # the magic bytes by chance, not a gzip member
        if inflater.eof and raw:
            try:
                fd = descriptor_pb2.FileDescriptorProto.FromString(raw)
            except DecodeError:
                fd = None
            if fd is not None and fd.name:
                files.append(fd)
        at = data.find(_GZIP_MAGIC, at + 1)
    return files


# A raw descriptor starts with its name (field 1), then its package, an import or a message.
_RAW_START = re.compile(rb"\x0a([\x01-\x7f])([\w./-]+?\.proto)(?=[\x12\x1a\x22])")
# FileDescriptorProto's fields: number -> wire type (2 = length-delimited, 0 = varint).
_FILE_FIELDS = {1: 2, 2: 2, 3: 2, 4: 2, 5: 2, 6: 2, 7: 2, 8: 2, 9: 2, 10: 0, 11: 0, 12: 2, 14: 0}
_SINGLE_FIELDS = (1, 2, 12)  # name, package, syntax: a second one is the next file


def _raw_files(data: bytes) -> list:
    """protobuf-go stores each file's descriptor as a serialized FileDescriptorProto with no
    length in front: walk its fields from the name to the first byte that cannot continue it."""
    files = []
    for match in _RAW_START.finditer(data):
        if match.group(1)[0] != len(match.group(2)):
            continue
        fd = _raw_file_at(data, match.start())
        if fd is not None:
            files.append(fd)
    return files


def _raw_file_at(data: bytes, start: int):
    from google.protobuf import descriptor_pb2
    from google.protobuf.message import DecodeError

    ends, seen, pos = [], set(), start
    while True:
        key, at = _varint(data, pos)
        field, wire = (key >> 3, key & 7) if key is not None else (0, -1)
        if _FILE_FIELDS.get(field) != wire or (field in _SINGLE_FIELDS and field in seen):
            break
        size, at = _varint(data, at)
        if size is None or (wire == 2 and at + size > len(data)):
            break
        pos = at + size if wire == 2 else at
        seen.add(field)
        ends.append(pos)
    for end in reversed(ends):  # the longest prefix that parses is the file
        try:
            return descriptor_pb2.FileDescriptorProto.FromString(data[start:end])
        except DecodeError:
            continue
    return None


def _varint(data: bytes, pos: int) -> tuple[int | None, int]:
    value = shift = 0
    for i in range(pos, min(pos + 10, len(data))):
        value |= (data[i] & 0x7F) << shift
        if data[i] < 0x80:
            return value, i + 1
        shift += 7
    return None, pos


def cri_file_set(binary: str = CONTAINERD):
    """The runtime.v1 api.proto and the files it imports, ready for a descriptor pool.

    Go registers files under the path they were compiled with, which need not be the path
    importers use (api.proto imports "github.com/gogo/protobuf/gogoproto/gogo.proto", which the
    binary holds as "gogo.proto", itself importing descriptor.proto): a missing import is
    matched by its base name and renamed to what the importer asked for.
    """
    from google.protobuf import descriptor_pb2

    files = embedded_files(binary)
    api = next(
        (
            f
            for f in files
            if f.package == CRI_PACKAGE and any(s.name == "RuntimeService" for s in f.service)
        ),
        None,
    )
    if api is None:
        raise CriError("schema", "NOT_FOUND", f"{binary} embeds no {CRI_PACKAGE} RuntimeService")
    by_name = {f.name: f for f in files}
    ordered: list = []  # dependencies before their importers
    seen: set[str] = set()

    def visit(fd) -> None:
        for dep in fd.dependency:
            if dep in seen:
                continue
            seen.add(dep)
            found = by_name.get(dep) or _by_base_name(files, dep)
            if found is None:
                raise CriError(
                    "schema", "NOT_FOUND", f"{fd.name} imports {dep}, which {binary} does not embed"
                )
            copy = descriptor_pb2.FileDescriptorProto()
            copy.CopyFrom(found)
            copy.name = dep
            visit(copy)
            ordered.append(copy)

    seen.add(api.name)
    visit(api)
    ordered.append(api)
    out = descriptor_pb2.FileDescriptorSet()
    out.file.extend(ordered)
    return out


def _by_base_name(files: list, wanted: str):
    base = wanted.rsplit("/", 1)[-1]
    package = {"descriptor.proto": "google.protobuf", "gogo.proto": "gogoproto"}.get(base)
    for fd in files:
        if fd.name.rsplit("/", 1)[-1] == base and (package is None or fd.package == package):
            return fd
    return None


class Schema:
    """Message classes and method signatures of runtime.v1, built from a FileDescriptorSet."""

    def __init__(self, file_set) -> None:
        from google.protobuf import descriptor_pool, message_factory

        self.pool = descriptor_pool.DescriptorPool()
        for fd in file_set.file:
            self.pool.Add(fd)
        self._classes: dict[str, type] = {}
        self._get_class = message_factory.GetMessageClass

    def message_class(self, full_name: str) -> type:
        cls = self._classes.get(full_name)
        if cls is None:
            cls = self._get_class(self.pool.FindMessageTypeByName(full_name))
            self._classes[full_name] = cls
        return cls

    def method(self, service: str, name: str) -> tuple[type, type]:
        """(request class, response class) of service/name."""
        desc = self.pool.FindServiceByName(service).methods_by_name.get(name)
        if desc is None:
            raise CriError(name, "UNIMPLEMENTED", f"{service} has no method {name}")
        return (
            self.message_class(desc.input_type.full_name),
            self.message_class(desc.output_type.full_name),
        )


_schemas: dict[str, Schema] = {}
_schemas_lock = threading.Lock()


def schema_for(binary: str = CONTAINERD) -> Schema:
    """The schema of `binary`, built once per process."""
    with _schemas_lock:
        schema = _schemas.get(binary)
        if schema is None:
            schema = _schemas[binary] = Schema(cri_file_set(binary))
        return schema


def to_dict(message) -> dict:
    """A response as a plain dict with the .proto field names (e.g. status.network.ip), zero
    values included (SANDBOX_READY is the enum's 0)."""
    from google.protobuf import json_format

    try:
        return json_format.MessageToDict(
            message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
    except TypeError:  # protobuf before 5.26 named it differently
        return json_format.MessageToDict(
            message, preserving_proto_field_name=True, including_default_value_fields=True
        )


def pod_sandbox_config(
    name: str,
    namespace: str,
    uid: str,
    log_directory: str,
    cgroup_parent: str = "",
    port_mappings: list[dict] | None = None,
) -> dict:
    """A PodSandboxConfig as kubelet fills it in for a pod on the pod network."""
    config = {
        "metadata": {"name": name, "uid": uid, "namespace": namespace, "attempt": 0},
        "hostname": name,
        "log_directory": log_directory,
        "dns_config": {
            "servers": ["10.96.0.10"],
            "options": ["ndots:5"],
            "searches": [f"{namespace}.svc.cluster.local", "svc.cluster.local", "cluster.local"],
        },
        "labels": {
            "io.kubernetes.pod.name": name,
            "io.kubernetes.pod.namespace": namespace,
            "io.kubernetes.pod.uid": uid,
        },
        "linux": {
            "cgroup_parent": cgroup_parent,
            "security_context": {
                "namespace_options": {"network": "POD", "pid": "CONTAINER", "ipc": "POD"}
            },
        },
    }
    if port_mappings:
        config["port_mappings"] = port_mappings
    return config


def container_config(name: str, image: str, command: list[str]) -> dict:
    """A ContainerConfig for a container joining its sandbox's network namespace."""
    return {
        "metadata": {"name": name, "attempt": 0},
        "image": {"image": image},
        "command": command,
        "log_path": f"{name}/0.log",
        "linux": {
            "security_context": {"namespace_options": {"network": "POD", "pid": "CONTAINER"}}
        },
    }


class CriClient:
    """Calls RuntimeService and ImageService on a CRI socket. Requests are dicts in the
    .proto's field names (or its JSON names); answers are the response messages.
    Thread-safe: one gRPC channel, shared by every caller."""

    def __init__(
        self, socket: str, binary: str = CONTAINERD, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        import grpc

        self.socket = socket
        self.timeout = timeout
        self.schema = schema_for(binary)
        self._grpc = grpc
        self._channel = grpc.insecure_channel(f"unix://{socket}")
        self._stubs: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> CriClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(
        self, service: str, method: str, request: dict | None = None, timeout: float | None = None
    ):
        from google.protobuf import json_format

        request_cls, response_cls = self.schema.method(service, method)
        with self._lock:
            stub = self._stubs.get((service, method))
            if stub is None:
                stub = self._stubs[(service, method)] = self._channel.unary_unary(
                    f"/{service}/{method}",
                    request_serializer=request_cls.SerializeToString,
                    response_deserializer=response_cls.FromString,
                )
        message = request_cls()
        if request:
            try:
                json_format.ParseDict(request, message)
            except json_format.ParseError as exc:
                raise CriError(method, "INVALID_ARGUMENT", str(exc)) from None
        try:
            return stub(message, timeout=self.timeout if timeout is None else timeout)
        except self._grpc.RpcError as exc:
            raise CriError(method, exc.code().name, exc.details() or "") from None

    def runtime(self, method: str, request: dict | None = None, timeout: float | None = None):
        return self.call(RUNTIME_SERVICE, method, request, timeout)

    def image(self, method: str, request: dict | None = None, timeout: float | None = None):
        return self.call(IMAGE_SERVICE, method, request, timeout)

    # --- what kubelet calls, in the order it calls them -------------------------------------

    def version(self, timeout: float | None = None):
        return self.runtime("Version", {"version": "v1"}, timeout)

    def run_pod_sandbox(self, config: dict, runtime_handler: str = "") -> str:
        reply = self.runtime(
            "RunPodSandbox", {"config": config, "runtime_handler": runtime_handler}
        )
        return reply.pod_sandbox_id

    def pod_sandbox_status(self, sandbox_id: str, verbose: bool = False):
        return self.runtime("PodSandboxStatus", {"pod_sandbox_id": sandbox_id, "verbose": verbose})

    def list_pod_sandbox(self, label_selector: dict[str, str] | None = None) -> list:
        request = {"filter": {"label_selector": label_selector}} if label_selector else {}
        return list(self.runtime("ListPodSandbox", request).items)

    def stop_pod_sandbox(self, sandbox_id: str) -> None:
        self.runtime("StopPodSandbox", {"pod_sandbox_id": sandbox_id})

    def remove_pod_sandbox(self, sandbox_id: str) -> None:
        self.runtime("RemovePodSandbox", {"pod_sandbox_id": sandbox_id})

    def create_container(self, sandbox_id: str, config: dict, sandbox_config: dict) -> str:
        reply = self.runtime(
            "CreateContainer",
            {"pod_sandbox_id": sandbox_id, "config": config, "sandbox_config": sandbox_config},
        )
        return reply.container_id

    def start_container(self, container_id: str) -> None:
        self.runtime("StartContainer", {"container_id": container_id})

    def exec_sync(self, container_id: str, cmd: list[str], timeout: int = 10):
        """(exit code, stdout, stderr) of cmd run in the container."""
        reply = self.runtime(
            "ExecSync",
            {"container_id": container_id, "cmd": cmd, "timeout": str(timeout)},
            timeout=timeout + 30,
        )
        return (
            reply.exit_code,
            reply.stdout.decode(errors="replace"),
            reply.stderr.decode(errors="replace"),
        )

    def list_containers(self, sandbox_id: str | None = None) -> list:
        request = {"filter": {"pod_sandbox_id": sandbox_id}} if sandbox_id else {}
        return list(self.runtime("ListContainers", request).containers)

    def stop_container(self, container_id: str, timeout: int = 0) -> None:
        self.runtime("StopContainer", {"container_id": container_id, "timeout": str(timeout)})

    def remove_container(self, container_id: str) -> None:
        self.runtime("RemoveContainer", {"container_id": container_id})

    def image_status(self, ref: str):
        """The image's status message, or None when containerd does not have it."""
        reply = self.image("ImageStatus", {"image": {"image": ref}})
        return reply.image if reply.HasField("image") else None

    def pull_image(self, ref: str) -> str:
        return self.image("PullImage", {"image": {"image": ref}}).image_ref
