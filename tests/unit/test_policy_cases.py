"""Named cases after the upstream NetworkPolicy e2e tests (test/e2e/network/netpol), as
(policies, expected truth table): documentation of the semantics, checked against the reference
evaluator and against the interpreter over the engine's compiled rules.

World: namespaces x, y, z; pods a, b, c in each; ports 80/81 over TCP/UDP/SCTP named
serve-<port>-<protocol> (see tests/policy_world.py). Rows are sources, columns destinations,
"." allowed, "X" denied. A pod can always reach itself (the diagonal).
"""

from __future__ import annotations

import pytest

from policy_world import World, format_table, parse_table, policy

NS_NAME = "kubernetes.io/metadata.name"
HEAD = "x/a x/b x/c y/a y/b y/c z/a z/b z/c"

ALL_ALLOWED = f"""
    {HEAD}
x/a  .   .   .   .   .   .   .   .   .
x/b  .   .   .   .   .   .   .   .   .
x/c  .   .   .   .   .   .   .   .   .
y/a  .   .   .   .   .   .   .   .   .
y/b  .   .   .   .   .   .   .   .   .
y/c  .   .   .   .   .   .   .   .   .
z/a  .   .   .   .   .   .   .   .   .
z/b  .   .   .   .   .   .   .   .   .
z/c  .   .   .   .   .   .   .   .   .
"""

X_INGRESS_DENIED = f"""
    {HEAD}
x/a  .   X   X   .   .   .   .   .   .
x/b  X   .   X   .   .   .   .   .   .
x/c  X   X   .   .   .   .   .   .   .
y/a  X   X   X   .   .   .   .   .   .
y/b  X   X   X   .   .   .   .   .   .
y/c  X   X   X   .   .   .   .   .   .
z/a  X   X   X   .   .   .   .   .   .
z/b  X   X   X   .   .   .   .   .   .
z/c  X   X   X   .   .   .   .   .   .
"""

XA_INGRESS_DENIED = f"""
    {HEAD}
x/a  .   .   .   .   .   .   .   .   .
x/b  X   .   .   .   .   .   .   .   .
x/c  X   .   .   .   .   .   .   .   .
y/a  X   .   .   .   .   .   .   .   .
y/b  X   .   .   .   .   .   .   .   .
y/c  X   .   .   .   .   .   .   .   .
z/a  X   .   .   .   .   .   .   .   .
z/b  X   .   .   .   .   .   .   .   .
z/c  X   .   .   .   .   .   .   .   .
"""

XA_FROM_Y_ONLY = f"""
    {HEAD}
x/a  .   .   .   .   .   .   .   .   .
x/b  X   .   .   .   .   .   .   .   .
x/c  X   .   .   .   .   .   .   .   .
y/a  .   .   .   .   .   .   .   .   .
y/b  .   .   .   .   .   .   .   .   .
y/c  .   .   .   .   .   .   .   .   .
z/a  X   .   .   .   .   .   .   .   .
z/b  X   .   .   .   .   .   .   .   .
z/c  X   .   .   .   .   .   .   .   .
"""

X_EGRESS_DENIED = f"""
    {HEAD}
x/a  .   X   X   X   X   X   X   X   X
x/b  X   .   X   X   X   X   X   X   X
x/c  X   X   .   X   X   X   X   X   X
y/a  .   .   .   .   .   .   .   .   .
y/b  .   .   .   .   .   .   .   .   .
y/c  .   .   .   .   .   .   .   .   .
z/a  .   .   .   .   .   .   .   .   .
z/b  .   .   .   .   .   .   .   .   .
z/c  .   .   .   .   .   .   .   .   .
"""


def ingress_to_xa(rule: dict, name: str = "to-x-a") -> dict:
    return policy(name, "x", {"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [rule]})


NOT_IN_X = {"matchExpressions": [{"key": NS_NAME, "operator": "NotIn", "values": ["x"]}]}

# (name, policies, protocol, port, family, expected table)
CASES = [
    (
        "default-deny-ingress",
        [policy("deny-ingress", "x", {"podSelector": {}, "policyTypes": ["Ingress"]})],
        "TCP",
        80,
        4,
        X_INGRESS_DENIED,
    ),
    (
        "default-deny-all",
        [policy("deny-all", "x", {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]})],
        "TCP",
        80,
        4,
        f"""
    {HEAD}
x/a  .   X   X   X   X   X   X   X   X
x/b  X   .   X   X   X   X   X   X   X
x/c  X   X   .   X   X   X   X   X   X
y/a  X   X   X   .   .   .   .   .   .
y/b  X   X   X   .   .   .   .   .   .
y/c  X   X   X   .   .   .   .   .   .
z/a  X   X   X   .   .   .   .   .   .
z/b  X   X   X   .   .   .   .   .   .
z/c  X   X   X   .   .   .   .   .   .
""",
    ),
    (
        "podSelector alone: pods of the policy's namespace",
        [ingress_to_xa({"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]})],
        "TCP",
        80,
        4,
        f"""
    {HEAD}
x/a  .   .   .   .   .   .   .   .   .
x/b  .   .   .   .   .   .   .   .   .
x/c  X   .   .   .   .   .   .   .   .
y/a  X   .   .   .   .   .   .   .   .
y/b  X   .   .   .   .   .   .   .   .
y/c  X   .   .   .   .   .   .   .   .
z/a  X   .   .   .   .   .   .   .   .
z/b  X   .   .   .   .   .   .   .   .
z/c  X   .   .   .   .   .   .   .   .
""",
    ),
    (
        "namespaceSelector {} with podSelector: those pods in every namespace",
        [
            ingress_to_xa(
                {"from": [{"podSelector": {"matchLabels": {"pod": "b"}}, "namespaceSelector": {}}]}
            )
        ],
        "TCP",
        80,
        4,
        f"""
    {HEAD}
x/a  .   .   .   .   .   .   .   .   .
x/b  .   .   .   .   .   .   .   .   .
x/c  X   .   .   .   .   .   .   .   .
y/a  X   .   .   .   .   .   .   .   .
y/b  .   .   .   .   .   .   .   .   .
y/c  X   .   .   .   .   .   .   .   .
z/a  X   .   .   .   .   .   .   .   .
z/b  .   .   .   .   .   .   .   .   .
z/c  X   .   .   .   .   .   .   .   .
""",
    ),
    (
        "namespaceSelector alone, by the default namespace label",
        [ingress_to_xa({"from": [{"namespaceSelector": {"matchLabels": {NS_NAME: "y"}}}]})],
        "TCP",
        80,
        4,
        XA_FROM_Y_ONLY,
    ),
    (
        "two peers are OR: namespace other than x, or pod b of x",
        [
            ingress_to_xa(
                {
                    "from": [
                        {"namespaceSelector": NOT_IN_X},
                        {"podSelector": {"matchLabels": {"pod": "b"}}},
                    ]
                }
            )
        ],
        "TCP",
        80,
        4,
        f"""
    {HEAD}
x/a  .   .   .   .   .   .   .   .   .
x/b  .   .   .   .   .   .   .   .   .
x/c  X   .   .   .   .   .   .   .   .
y/a  .   .   .   .   .   .   .   .   .
y/b  .   .   .   .   .   .   .   .   .
y/c  .   .   .   .   .   .   .   .   .
z/a  .   .   .   .   .   .   .   .   .
z/b  .   .   .   .   .   .   .   .   .
z/c  .   .   .   .   .   .   .   .   .
""",
    ),
    (
        "both selectors in one peer are AND: pod b of a namespace other than x",
        [
            ingress_to_xa(
                {
                    "from": [
                        {
                            "namespaceSelector": NOT_IN_X,
                            "podSelector": {"matchLabels": {"pod": "b"}},
                        }
                    ]
                }
            )
        ],
        "TCP",
        80,
        4,
        f"""
    {HEAD}
x/a  .   .   .   .   .   .   .   .   .
x/b  X   .   .   .   .   .   .   .   .
x/c  X   .   .   .   .   .   .   .   .
y/a  X   .   .   .   .   .   .   .   .
y/b  .   .   .   .   .   .   .   .   .
y/c  X   .   .   .   .   .   .   .   .
z/a  X   .   .   .   .   .   .   .   .
z/b  .   .   .   .   .   .   .   .   .
z/c  X   .   .   .   .   .   .   .   .
""",
    ),
    (
        "port 81 from y: 81 allowed from y",
        [
            ingress_to_xa(
                {
                    "from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}],
                    "ports": [{"port": 81}],
                }
            )
        ],
        "TCP",
        81,
        4,
        XA_FROM_Y_ONLY,
    ),
    (
        "port 81 from y: 80 denied to all",
        [
            ingress_to_xa(
                {
                    "from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}],
                    "ports": [{"port": 81}],
                }
            )
        ],
        "TCP",
        80,
        4,
        XA_INGRESS_DENIED,
    ),
    (
        "stacked policies add up: 80 and 81 from y",
        [
            ingress_to_xa(
                {
                    "from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}],
                    "ports": [{"port": 81}],
                },
                "p81",
            ),
            ingress_to_xa(
                {
                    "from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}],
                    "ports": [{"port": 80}],
                },
                "p80",
            ),
        ],
        "TCP",
        80,
        4,
        XA_FROM_Y_ONLY,
    ),
    (
        "allow-all: the empty rule {}",
        [policy("allow-all", "x", {"podSelector": {}, "ingress": [{}]})],
        "TCP",
        81,
        4,
        ALL_ALLOWED,
    ),
    (
        "named ingress port serve-81-tcp: 81 allowed",
        [
            policy(
                "named",
                "x",
                {"podSelector": {}, "ingress": [{"ports": [{"port": "serve-81-tcp"}]}]},
            )
        ],
        "TCP",
        81,
        4,
        ALL_ALLOWED,
    ),
    (
        "named ingress port serve-81-tcp: 80 denied",
        [
            policy(
                "named",
                "x",
                {"podSelector": {}, "ingress": [{"ports": [{"port": "serve-81-tcp"}]}]},
            )
        ],
        "TCP",
        80,
        4,
        X_INGRESS_DENIED,
    ),
    (
        "named egress port serve-80-tcp: 80 allowed",
        [
            policy(
                "named-egress",
                "x",
                {
                    "podSelector": {},
                    "policyTypes": ["Egress"],
                    "egress": [{"ports": [{"port": "serve-80-tcp"}]}],
                },
            )
        ],
        "TCP",
        80,
        4,
        ALL_ALLOWED,
    ),
    (
        "named egress port serve-80-tcp: 81 denied",
        [
            policy(
                "named-egress",
                "x",
                {
                    "podSelector": {},
                    "policyTypes": ["Egress"],
                    "egress": [{"ports": [{"port": "serve-80-tcp"}]}],
                },
            )
        ],
        "TCP",
        81,
        4,
        X_EGRESS_DENIED,
    ),
    (
        "egress rules without policyTypes also isolate ingress (Ingress is always defaulted)",
        [
            policy(
                "egress-only-rules",
                "x",
                {
                    "podSelector": {},
                    "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}],
                },
            )
        ],
        "TCP",
        80,
        4,
        f"""
    {HEAD}
x/a  .   X   X   .   .   .   X   X   X
x/b  X   .   X   .   .   .   X   X   X
x/c  X   X   .   .   .   .   X   X   X
y/a  X   X   X   .   .   .   .   .   .
y/b  X   X   X   .   .   .   .   .   .
y/c  X   X   X   .   .   .   .   .   .
z/a  X   X   X   .   .   .   .   .   .
z/b  X   X   X   .   .   .   .   .   .
z/c  X   X   X   .   .   .   .   .   .
""",
    ),
    (
        "SCTP is not TCP: an SCTP-only policy denies TCP",
        [ingress_to_xa({"ports": [{"protocol": "SCTP", "port": 80}]})],
        "TCP",
        80,
        4,
        XA_INGRESS_DENIED,
    ),
    (
        "SCTP is not TCP: SCTP 80 allowed",
        [ingress_to_xa({"ports": [{"protocol": "SCTP", "port": 80}]})],
        "SCTP",
        80,
        4,
        ALL_ALLOWED,
    ),
    (
        "protocol without port: every UDP port",
        [ingress_to_xa({"ports": [{"protocol": "UDP"}]})],
        "UDP",
        81,
        4,
        ALL_ALLOWED,
    ),
    (
        "protocol without port: TCP denied",
        [ingress_to_xa({"ports": [{"protocol": "UDP"}]})],
        "TCP",
        81,
        4,
        XA_INGRESS_DENIED,
    ),
    (
        "endPort: 80-81 includes 81",
        [ingress_to_xa({"ports": [{"port": 80, "endPort": 81}]})],
        "TCP",
        81,
        4,
        ALL_ALLOWED,
    ),
    (
        "endPort: 80-81 excludes 82",
        [ingress_to_xa({"ports": [{"port": 80, "endPort": 81}]})],
        "TCP",
        82,
        4,
        XA_INGRESS_DENIED,
    ),
    (
        "ipBlock with except: egress of x/a to 10.0.0.0/16 except y's 10.0.1.0/24",
        [
            policy(
                "cidr",
                "x",
                {
                    "podSelector": {"matchLabels": {"pod": "a"}},
                    "policyTypes": ["Egress"],
                    "egress": [
                        {"to": [{"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.0.1.0/24"]}}]}
                    ],
                },
            )
        ],
        "TCP",
        80,
        4,
        f"""
    {HEAD}
x/a  .   .   .   X   X   X   .   .   .
x/b  .   .   .   .   .   .   .   .   .
x/c  .   .   .   .   .   .   .   .   .
y/a  .   .   .   .   .   .   .   .   .
y/b  .   .   .   .   .   .   .   .   .
y/c  .   .   .   .   .   .   .   .   .
z/a  .   .   .   .   .   .   .   .   .
z/b  .   .   .   .   .   .   .   .   .
z/c  .   .   .   .   .   .   .   .   .
""",
    ),
    (
        "an IPv4 ipBlock allows nothing over IPv6",
        [
            policy(
                "cidr",
                "x",
                {
                    "podSelector": {"matchLabels": {"pod": "a"}},
                    "policyTypes": ["Egress"],
                    "egress": [
                        {"to": [{"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.0.1.0/24"]}}]}
                    ],
                },
            )
        ],
        "TCP",
        80,
        6,
        f"""
    {HEAD}
x/a  .   X   X   X   X   X   X   X   X
x/b  .   .   .   .   .   .   .   .   .
x/c  .   .   .   .   .   .   .   .   .
y/a  .   .   .   .   .   .   .   .   .
y/b  .   .   .   .   .   .   .   .   .
y/c  .   .   .   .   .   .   .   .   .
z/a  .   .   .   .   .   .   .   .   .
z/b  .   .   .   .   .   .   .   .   .
z/c  .   .   .   .   .   .   .   .   .
""",
    ),
    (
        "an address in one policy's except and another's cidr is allowed (union)",
        [
            policy(
                "cidr",
                "x",
                {
                    "podSelector": {"matchLabels": {"pod": "a"}},
                    "policyTypes": ["Egress"],
                    "egress": [
                        {"to": [{"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.0.1.0/24"]}}]}
                    ],
                },
            ),
            policy(
                "y-b",
                "x",
                {
                    "podSelector": {"matchLabels": {"pod": "a"}},
                    "policyTypes": ["Egress"],
                    "egress": [{"to": [{"ipBlock": {"cidr": "10.0.1.2/32"}}]}],
                },
            ),
        ],
        "TCP",
        80,
        4,
        f"""
    {HEAD}
x/a  .   .   .   X   .   X   .   .   .
x/b  .   .   .   .   .   .   .   .   .
x/c  .   .   .   .   .   .   .   .   .
y/a  .   .   .   .   .   .   .   .   .
y/b  .   .   .   .   .   .   .   .   .
y/c  .   .   .   .   .   .   .   .   .
z/a  .   .   .   .   .   .   .   .   .
z/b  .   .   .   .   .   .   .   .   .
z/c  .   .   .   .   .   .   .   .   .
""",
    ),
    (
        "IPv6 ipBlock: egress of x/a to y's fd00::1:0/112",
        [
            policy(
                "cidr6",
                "x",
                {
                    "podSelector": {"matchLabels": {"pod": "a"}},
                    "policyTypes": ["Egress"],
                    "egress": [{"to": [{"ipBlock": {"cidr": "fd00::1:0/112"}}]}],
                },
            )
        ],
        "UDP",
        81,
        6,
        f"""
    {HEAD}
x/a  .   X   X   .   .   .   X   X   X
x/b  .   .   .   .   .   .   .   .   .
x/c  .   .   .   .   .   .   .   .   .
y/a  .   .   .   .   .   .   .   .   .
y/b  .   .   .   .   .   .   .   .   .
y/c  .   .   .   .   .   .   .   .   .
z/a  .   .   .   .   .   .   .   .   .
z/b  .   .   .   .   .   .   .   .   .
z/c  .   .   .   .   .   .   .   .   .
""",
    ),
]


@pytest.mark.parametrize(
    "name,policies,protocol,port,family,expected", CASES, ids=[c[0] for c in CASES]
)
def test_case(name, policies, protocol, port, family, expected):
    world = World(policies)
    want = parse_table(expected)
    names = HEAD.split()
    got = world.evaluated(protocol, port, family)
    assert got == want, f"evaluator:\n{format_table(got, names)}"
    compiled = world.interpreted(protocol, port, family)
    assert compiled == want, f"compiled rules:\n{format_table(compiled, names)}"
