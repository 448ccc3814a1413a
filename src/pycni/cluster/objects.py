"""Where NetworkPolicy enforcement gets its objects: Namespaces, Pods and NetworkPolicies in
their Kubernetes JSON form, from the API server (a cluster with Kubernetes) or stored in the
sqlite or etcd datastore (the lab, and clusters without Kubernetes, written by pycnictl).

The agent only reads (``snapshot`` and ``wait``, like a datastore's ``nodes`` and ``wait``);
``KVObjects`` can also be written (``apply``, ``delete``). The policy engine validates what it
gets, so a source passes objects on as they are stored.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass

from .kv import KV

KINDS = ("Namespace", "Pod", "NetworkPolicy")
OBJECTS_DIR = "objects/"


@dataclass(frozen=True)
class Objects:
    """One consistent view of the three kinds, as dicts."""

    namespaces: tuple[dict, ...] = ()
    pods: tuple[dict, ...] = ()
    policies: tuple[dict, ...] = ()


class ObjectSource(ABC):
    @abstractmethod
    def snapshot(self) -> Objects:
        """Every object of the three kinds as of now."""

    @abstractmethod
    def wait(self, timeout: float) -> bool:
        """Block until an object may have changed (True) or ``timeout`` passes (False)."""

    def close(self) -> None:  # noqa: B027 (optional hook, not abstract)
        """Stop watching."""


class ObjectError(ValueError):
    """An object that cannot be stored: not a dict, an unknown kind, no name."""


def identify(obj: object) -> tuple[str, str, str]:
    """(kind, namespace, name) of an object as kubectl reads it; Namespaces have no namespace,
    the others default to ``default``."""
    if not isinstance(obj, dict):
        raise ObjectError(f"an object must be a mapping, not {type(obj).__name__}")
    kind = obj.get("kind")
    if kind not in KINDS:
        raise ObjectError(f"kind {kind!r} is not one of {', '.join(KINDS)}")
    meta = obj.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    if not isinstance(name, str) or not name or "/" in name:
        raise ObjectError(f"a {kind} needs metadata.name (a non-empty name without '/')")
    if kind == "Namespace":
        return kind, "", name
    namespace = meta.get("namespace") or "default"  # type: ignore[union-attr]
    if not isinstance(namespace, str) or "/" in namespace:
        raise ObjectError(f"{kind} {name}: metadata.namespace must be a name")
    return kind, namespace, name


class KVObjects(ObjectSource):
    """The objects under ``<prefix>objects/<kind>/[<namespace>/]<name>`` of a KV datastore,
    stored with ``put`` (bound to no lease: they stay until deleted)."""

    def __init__(self, kv: KV, prefix: str = "/pycni/") -> None:
        self.kv = kv
        self.prefix = prefix + OBJECTS_DIR
        self._revision: int | None = None

    def key(self, kind: str, namespace: str, name: str) -> str:
        return self.prefix + "/".join(p for p in (kind, namespace, name) if p)

    def snapshot(self) -> Objects:
        found, self._revision = self.kv.list(self.prefix)
        by_kind: dict[str, list[dict]] = {kind: [] for kind in KINDS}
        for key in sorted(found):
            kind = key[len(self.prefix) :].split("/", 1)[0]
            try:
                obj = json.loads(found[key])
            except ValueError:
                continue  # not ours to judge further: the engine reports what it cannot use
            if kind in by_kind and isinstance(obj, dict):
                by_kind[kind].append(obj)
        return Objects(
            tuple(by_kind["Namespace"]), tuple(by_kind["Pod"]), tuple(by_kind["NetworkPolicy"])
        )

    def wait(self, timeout: float) -> bool:
        if self._revision is None:
            self.snapshot()
        assert self._revision is not None
        return self.kv.wait(self.prefix, self._revision, timeout) != self._revision

    def get(self, kind: str, namespace: str, name: str) -> dict | None:
        found, _ = self.kv.list(self.key(kind, namespace, name))
        value = found.get(self.key(kind, namespace, name))
        return None if value is None else json.loads(value)

    def apply(self, obj: dict) -> str:
        """Create or replace one object; "created", "configured" or "unchanged", as kubectl."""
        kind, namespace, name = identify(obj)
        old = self.get(kind, namespace, name)
        if old == obj:
            return "unchanged"
        self.kv.put(self.key(kind, namespace, name), json.dumps(obj, sort_keys=True))
        return "created" if old is None else "configured"

    def delete(self, kind: str, namespace: str, name: str) -> bool:
        return self.kv.delete(self.key(kind, namespace, name))

    def close(self) -> None:
        self.kv.close()
