"""Label selectors and the peer selector rules (pycni.policy.selectors)."""

from __future__ import annotations

import pytest

from pycni.policy.selectors import (
    EVERYTHING,
    LabelSelector,
    Requirement,
    SelectorError,
    parse_selector,
    peer_selects,
)


def sel(**data) -> LabelSelector:
    return parse_selector(data, "s")


@pytest.mark.parametrize(
    "op,values,labels,want",
    [
        ("In", ("a", "b"), {"k": "a"}, True),
        ("In", ("a", "b"), {"k": "c"}, False),
        ("In", ("a",), {}, False),
        ("NotIn", ("a",), {"k": "b"}, True),
        ("NotIn", ("a",), {"k": "a"}, False),
        ("NotIn", ("a",), {}, True),  # absent key: NotIn holds
        ("Exists", (), {"k": ""}, True),
        ("Exists", (), {"j": "x"}, False),
        ("DoesNotExist", (), {}, True),
        ("DoesNotExist", (), {"k": "x"}, False),
    ],
)
def test_requirement(op, values, labels, want):
    assert Requirement("k", op, values).matches(labels) is want


def test_empty_selector_matches_everything():
    assert sel().matches({}) and sel().matches({"a": "b"})
    assert EVERYTHING.empty and sel().empty
    assert parse_selector({"matchLabels": None, "matchExpressions": None}, "s") == EVERYTHING


def test_all_parts_are_anded():
    s = sel(
        matchLabels={"app": "web", "tier": "front"},
        matchExpressions=[{"key": "env", "operator": "In", "values": ["prod"]}],
    )
    assert s.matches({"app": "web", "tier": "front", "env": "prod"})
    assert not s.matches({"app": "web", "tier": "front", "env": "dev"})
    assert not s.matches({"app": "web", "env": "prod"})


def test_canonical_ignores_spelling():
    a = sel(
        matchLabels={"b": "1", "a": "2"},
        matchExpressions=[{"key": "c", "operator": "In", "values": ["y", "x", "x"]}],
    )
    b = sel(
        matchExpressions=[
            {"key": "c", "operator": "In", "values": ["x", "y"]},
            {"key": "a", "operator": "In", "values": ["2"]},
        ],
        matchLabels={"b": "1"},
    )
    assert a.canonical() == b.canonical()
    assert a.canonical() != sel(matchLabels={"a": "2"}).canonical()


@pytest.mark.parametrize(
    "data,field",
    [
        ([], "s"),
        ({"matchLabels": []}, "s.matchLabels"),
        ({"matchLabels": {"a": 1}}, "s.matchLabels.a"),
        ({"matchLabels": {"bad key!": "x"}}, "s.matchLabels"),
        ({"matchLabels": {"k": "-bad"}}, "s.matchLabels.k"),
        ({"matchLabels": {"k": "v" * 64}}, "s.matchLabels.k"),
        ({"matchExpressions": {}}, "s.matchExpressions"),
        ({"matchExpressions": ["x"]}, "s.matchExpressions[0]"),
        ({"matchExpressions": [{"key": "k", "operator": "Has"}]}, "s.matchExpressions[0].operator"),
        ({"matchExpressions": [{"key": "k", "operator": "In"}]}, "s.matchExpressions[0].values"),
        (
            {"matchExpressions": [{"key": "k", "operator": "Exists", "values": ["a"]}]},
            "s.matchExpressions[0].values",
        ),
        ({"matchExpressions": [{"operator": "Exists"}]}, "s.matchExpressions[0].key"),
        (
            {"matchExpressions": [{"key": "k", "operator": "In", "values": "a"}]},
            "s.matchExpressions[0].values",
        ),
        ({"matchLabel": {}}, "s.matchLabel"),
    ],
)
def test_invalid_selectors_name_the_field(data, field):
    with pytest.raises(SelectorError) as exc:
        parse_selector(data, "s")
    assert exc.value.field == field


def test_prefixed_keys_are_valid():
    s = sel(matchLabels={"kubernetes.io/metadata.name": "x", "app.example.com/tier": "a_b.c"})
    assert s.matches({"kubernetes.io/metadata.name": "x", "app.example.com/tier": "a_b.c"})


POD_B = {"pod": "b"}
NS_Y = {"ns": "y"}


@pytest.mark.parametrize(
    "pods,nss,pod_ns,pod_labels,ns_labels,want",
    [
        # podSelector alone: pods of the policy's own namespace (x).
        (sel(matchLabels=POD_B), None, "x", POD_B, {"ns": "x"}, True),
        (sel(matchLabels=POD_B), None, "y", POD_B, NS_Y, False),
        (sel(), None, "x", {}, {}, True),  # {}: every pod of the namespace
        (sel(), None, "y", {}, NS_Y, False),
        # namespaceSelector alone: every pod of matching namespaces.
        (None, sel(matchLabels=NS_Y), "y", {"pod": "anything"}, NS_Y, True),
        (None, sel(matchLabels=NS_Y), "x", {}, {"ns": "x"}, False),
        (None, sel(), "z", {}, {"ns": "z"}, True),  # {}: every namespace
        # Both: AND.
        (sel(matchLabels=POD_B), sel(matchLabels=NS_Y), "y", POD_B, NS_Y, True),
        (sel(matchLabels=POD_B), sel(matchLabels=NS_Y), "y", {"pod": "a"}, NS_Y, False),
        (sel(matchLabels=POD_B), sel(matchLabels=NS_Y), "x", POD_B, {"ns": "x"}, False),
        (sel(matchLabels=POD_B), sel(), "z", POD_B, {"ns": "z"}, True),
        # Neither (an ipBlock peer) never selects pods.
        (None, None, "x", {}, {}, False),
    ],
)
def test_peer_selects(pods, nss, pod_ns, pod_labels, ns_labels, want):
    assert peer_selects(pods, nss, "x", pod_ns, pod_labels, ns_labels) is want
