"""Reading what `lab apply -f` and `lab delete -f` are given: multi-document YAML (or JSON,
which is YAML), a `kind: List` unpacked into its items, each object validated the way the API
server would (its identity, its apiVersion, and the policy package's parsing of Namespaces,
Pods and NetworkPolicies), all before anything is changed. Pure: no lab, no datastore.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import yaml

from ..cluster.objects import KINDS, ObjectError, identify
from ..policy.objects import PolicyError, parse_namespace, parse_pod, parse_policy
from .objects import API_VERSIONS, ref

_PARSERS = {"Namespace": parse_namespace, "Pod": parse_pod, "NetworkPolicy": parse_policy}


class ManifestError(ValueError):
    """Documents that cannot be applied or deleted; the message names each of them."""


@dataclass(frozen=True)
class Manifest:
    kind: str
    namespace: str  # "" for a Namespace
    name: str
    obj: dict
    where: str  # "FILE, document N", for messages

    @property
    def ref(self) -> str:
        return ref(self.kind, self.namespace, self.name)


class _Loader(yaml.SafeLoader):
    """YAML as Kubernetes reads it: a timestamp-looking scalar stays a string."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def read_documents(text: str, source: str) -> list[tuple[str, object]]:
    """(where, document) for every non-empty document, `kind: List` items in their place."""
    try:
        docs = list(yaml.load_all(text, Loader=_Loader))
    except yaml.YAMLError as exc:
        raise ManifestError(f"{source}: not YAML: {exc}") from None
    out: list[tuple[str, object]] = []
    for i, doc in enumerate(docs, start=1):
        if doc is None:
            continue
        where = f"{source}, document {i}"
        if isinstance(doc, dict) and isinstance(doc.get("kind"), str) and doc["kind"] == "List":
            items = doc.get("items")
            if not isinstance(items, list):
                raise ManifestError(f"{where}: a List needs items (a list)")
            out += [(f"{where}, item {j}", item) for j, item in enumerate(items, start=1)]
        else:
            out.append((where, doc))
    return out


def identify_all(documents: list[tuple[str, object]]) -> list[Manifest]:
    """Every document's kind, namespace and name (all `delete` needs), or one error naming
    every document that has none; a document given twice is an error too."""
    return _check(documents, judge=False)


def validate_all(documents: list[tuple[str, object]]) -> list[Manifest]:
    """identify_all, and each object judged as the API server would; one error naming every
    document that fails, in their order."""
    return _check(documents, judge=True)


def _check(documents: list[tuple[str, object]], judge: bool) -> list[Manifest]:
    found: list[Manifest] = []
    errors: list[str] = []
    seen: dict[tuple[str, str, str], str] = {}
    for where, doc in documents:
        try:
            kind, namespace, name = identify(doc)
        except ObjectError as exc:
            errors.append(f"{where}: {exc}")
            continue
        assert isinstance(doc, dict)
        key = (kind, namespace, name)
        if key in seen:
            errors.append(f"{where}: {ref(*key)} is given twice (first in {seen[key]})")
            continue
        seen[key] = where
        manifest = Manifest(kind, namespace, name, doc, where)
        problems = _problems(manifest) if judge else []
        errors += [f"{where}: {problem}" for problem in problems]
        found.append(manifest)
    if errors:
        raise ManifestError("\n".join(errors))
    return found


def _problems(m: Manifest) -> list[str]:
    want = API_VERSIONS[m.kind]
    api = m.obj.get("apiVersion")
    if api != want:
        return [
            f"{m.ref}: apiVersion {api!r} is not {want!r}" if api else f"{m.ref}: no apiVersion"
        ]
    try:
        json.dumps(m.obj)
    except (TypeError, ValueError) as exc:
        return [f"{m.ref}: not representable as JSON ({exc})"]
    try:
        parsed = _PARSERS[m.kind](m.obj)
    except PolicyError as exc:
        field = f"{exc.problem.field}: " if exc.problem.field else ""
        return [f"{m.ref}: {field}{exc.problem.message}"]
    if m.kind == "Pod" and getattr(parsed, "host_network", False):
        return [f"{m.ref}: spec.hostNetwork: the lab networks pods; a host-network pod is its node"]
    return []


def ordered(manifests: list[Manifest], deleting: bool = False) -> list[Manifest]:
    """Namespaces first, then NetworkPolicies, then Pods (so a pod starts with its policies in
    place); deleting, the other way round. File order within a kind."""
    rank = {kind: i for i, kind in enumerate(("Namespace", "NetworkPolicy", "Pod"))}
    assert set(rank) == set(KINDS)
    return sorted(manifests, key=lambda m: -rank[m.kind] if deleting else rank[m.kind])
