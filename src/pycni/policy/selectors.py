"""Label selectors and NetworkPolicy peers: which pods a selector picks.

Owns the two matching rules that the engine and the reference evaluator must agree on, and
nothing else, so both read one definition:

* a label selector (``matchLabels`` and ``matchExpressions``, all ANDed; the empty selector
  matches everything);
* a peer's pod/namespace selectors: ``podSelector`` alone picks pods of the policy's own
  namespace, ``namespaceSelector`` alone picks every pod of the matching namespaces (``{}``: all
  namespaces), both together pick the pods matching ``podSelector`` in the matching namespaces.
  An absent (``null``) selector is not the empty one: absent ``namespaceSelector`` means "the
  policy's namespace", ``{}`` means "every namespace".
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")

# Label syntax as the API server checks it (a qualified name; a value of at most 63).
_NAME = r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]"
_KEY_RE = re.compile(
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?" + _NAME + "$"
)
_VALUE_RE = re.compile(r"^(" + _NAME + ")?$")


class SelectorError(ValueError):
    """An invalid selector; ``field`` is the path of the offending part inside the selector."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class Requirement:
    """One ``matchExpressions`` entry."""

    key: str
    operator: str
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator == "In":
            return self.key in labels and labels[self.key] in self.values
        if self.operator == "NotIn":
            # NotIn also matches objects without the key (as upstream's selectors do).
            return self.key not in labels or labels[self.key] not in self.values
        if self.operator == "Exists":
            return self.key in labels
        return self.key not in labels  # DoesNotExist


@dataclass(frozen=True)
class LabelSelector:
    """``matchLabels`` (sorted pairs) and ``matchExpressions``; all must hold."""

    match_labels: tuple[tuple[str, str], ...] = ()
    match_expressions: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.match_labels) and all(
            r.matches(labels) for r in self.match_expressions
        )

    @property
    def empty(self) -> bool:
        return not self.match_labels and not self.match_expressions

    def canonical(self) -> list:
        """A JSON-able form equal for selectors written differently but meaning the same
        requirements (order, duplicate values, matchLabels vs ``In`` with one value), for
        naming the sets a selector fills."""
        reqs: set[tuple[str, str, tuple[str, ...]]] = {
            (k, "In", (v,)) for k, v in self.match_labels
        }
        reqs |= {(r.key, r.operator, tuple(sorted(set(r.values)))) for r in self.match_expressions}
        return [[k, op, list(vals)] for k, op, vals in sorted(reqs)]


EVERYTHING = LabelSelector()


def peer_selects(
    pod_selector: LabelSelector | None,
    namespace_selector: LabelSelector | None,
    policy_namespace: str,
    pod_namespace: str,
    pod_labels: Mapping[str, str],
    namespace_labels: Mapping[str, str],
) -> bool:
    """Whether a peer with these selectors picks a pod (of ``pod_namespace`` with
    ``pod_labels``; its namespace carries ``namespace_labels``)."""
    if pod_selector is None and namespace_selector is None:
        return False  # not a selector peer (an ipBlock, or invalid)
    if namespace_selector is None:
        in_namespace = pod_namespace == policy_namespace
    else:
        in_namespace = namespace_selector.matches(namespace_labels)
    return in_namespace and (pod_selector is None or pod_selector.matches(pod_labels))


def parse_selector(data: object, field: str) -> LabelSelector:
    """A selector from its Kubernetes JSON form; ``None`` is not accepted here (callers decide
    what absent means). Raises SelectorError naming the offending field."""
    if not isinstance(data, dict):
        raise SelectorError(field, f"must be an object, not {type(data).__name__}")
    unknown = set(data) - {"matchLabels", "matchExpressions"}
    if unknown:
        raise SelectorError(f"{field}.{sorted(unknown)[0]}", "unknown field")
    labels = data.get("matchLabels")
    labels = {} if labels is None else labels
    if not isinstance(labels, dict):
        raise SelectorError(f"{field}.matchLabels", "must be an object of strings")
    for k, v in labels.items():
        _check_key(k, f"{field}.matchLabels")
        _check_value(v, f"{field}.matchLabels.{k}")
    exprs = data.get("matchExpressions")
    exprs = [] if exprs is None else exprs
    if not isinstance(exprs, list):
        raise SelectorError(f"{field}.matchExpressions", "must be a list")
    reqs = tuple(
        _parse_requirement(e, f"{field}.matchExpressions[{i}]") for i, e in enumerate(exprs)
    )
    return LabelSelector(tuple(sorted(labels.items())), reqs)


def _parse_requirement(data: object, field: str) -> Requirement:
    if not isinstance(data, dict):
        raise SelectorError(field, "must be an object")
    key = data.get("key")
    _check_key(key, f"{field}.key")
    op = data.get("operator")
    if op not in OPERATORS:
        raise SelectorError(f"{field}.operator", f"{op!r} is not one of {', '.join(OPERATORS)}")
    values = data.get("values")
    values = [] if values is None else values
    if not isinstance(values, list):
        raise SelectorError(f"{field}.values", "must be a list of strings")
    for i, v in enumerate(values):
        _check_value(v, f"{field}.values[{i}]")
    if op in ("In", "NotIn") and not values:
        raise SelectorError(f"{field}.values", f"must be non-empty for {op}")
    if op in ("Exists", "DoesNotExist") and values:
        raise SelectorError(f"{field}.values", f"must be empty for {op}")
    return Requirement(str(key), op, tuple(values))


def _check_key(key: object, field: str) -> None:
    if not isinstance(key, str) or len(key) > 317 or not _KEY_RE.match(key):
        raise SelectorError(field, f"{key!r} is not a valid label key")
    if len(key.rpartition("/")[2]) > 63 or len(key.rpartition("/")[0]) > 253:
        raise SelectorError(field, f"{key!r} is too long for a label key")


def _check_value(value: object, field: str) -> None:
    if not isinstance(value, str) or len(value) > 63 or not _VALUE_RE.match(value):
        raise SelectorError(field, f"{value!r} is not a valid label value")
