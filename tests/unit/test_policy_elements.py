"""Pod changes installed as set-element deltas (rules/nft.render_policy_elements and
rules/sync.apply_policy_elements): a relabel becomes element additions or deletions plus the
digest rule, anything else (a policy more or less, another part of the table) a new table."""

from __future__ import annotations

import dataclasses

from policy_world import World, policy
from pycni.rules.model import PolicyFragment, RuleSet
from pycni.rules.policy import render

DENY_A = policy("deny-a", "x", {"podSelector": {"matchLabels": {"pod": "a"}}})
ALLOW_Y = policy(
    "allow-y",
    "x",
    {
        "podSelector": {"matchLabels": {"pod": "a"}},
        "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}],
    },
)


def test_a_relabel_becomes_an_element_delta_and_a_new_policy_a_new_table():
    from pycni.rules.nft import render_policy_elements

    base = World([DENY_A, ALLOW_Y])
    relabelled = [
        p if p.key != "x/b" else dataclasses.replace(p, labels={"pod": "a"})
        for p in base.inventory.pods
    ]
    other = World([DENY_A, ALLOW_Y], pods=relabelled)
    node = "node2"  # where x/b runs
    before, after = render(base.compiled[node]), render(other.compiled[node])
    new = PolicyFragment(after.statements)
    script = render_policy_elements(before.statements, new)
    assert script is not None
    lines = script.splitlines()
    # x/b (10.0.0.2, fd00::2) joins the sets of pod=a's policies: additions only, per family.
    assert all(line.startswith("add element inet pycni ") for line in lines[:-2]), lines
    assert any("10.0.0.2" in line for line in lines[:-2])
    assert any("fd00::2" in line for line in lines[:-2])
    assert lines[-2:] == [
        "flush chain inet pycni policy_digest",
        f'add rule inet pycni policy_digest return comment "{new.digest}"',
    ]
    # Back out: the same elements deleted.
    back = render_policy_elements(after.statements, PolicyFragment(before.statements))
    assert back is not None
    deletes = [line for line in back.splitlines() if line.startswith("delete element")]
    assert deletes and len(deletes) == len(lines) - 2
    assert not any(line.startswith("add element") for line in back.splitlines())
    # A policy more (or less) changes the shape: no delta.
    more = render(World([DENY_A]).compiled[node])
    assert render_policy_elements(before.statements, PolicyFragment(more.statements)) is None
    assert render_policy_elements(more.statements, new) is None


def test_an_element_delta_needs_everything_else_equal(monkeypatch):
    from pycni.rules import sync

    monkeypatch.setattr(sync, "resolve_backend", lambda backend=None: "nft")
    ran: list[str] = []
    monkeypatch.setattr(sync, "_must", lambda argv, stdin=None: ran.append(stdin or ""))
    base = World([DENY_A, ALLOW_Y])
    relabelled = [
        p if p.key != "x/b" else dataclasses.replace(p, labels={"pod": "a"})
        for p in base.inventory.pods
    ]
    before = PolicyFragment(render(base.compiled["node2"]).statements)
    after = PolicyFragment(
        render(World([DENY_A, ALLOW_Y], pods=relabelled).compiled["node2"]).statements
    )
    assert sync.apply_policy_elements(RuleSet(policy=before), RuleSet(policy=after))
    assert len(ran) == 1 and "add element" in ran[0]
    # A forward accept more, or no policy on either side: the table is replaced instead.
    import ipaddress

    wider = RuleSet(forward=(ipaddress.ip_network("10.0.0.0/16"),), policy=after)
    assert not sync.apply_policy_elements(RuleSet(policy=before), wider)
    assert not sync.apply_policy_elements(RuleSet(), RuleSet(policy=after))
    assert not sync.apply_policy_elements(RuleSet(policy=before), RuleSet())
    assert len(ran) == 1
