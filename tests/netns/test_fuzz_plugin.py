"""Property test through the real plugin: hostile environments and configs exec'd as a runtime
would, in a sandboxed node (its own netns and data dir), through the in-process plugin and
through the node agent. Whatever goes in: a valid CNI answer with a consistent exit status,
nothing else on stdout, no traceback, no hang; and an input that ends in an error leaves
nothing behind: no veth, bridge or ifb, no attachment in the store, no nftables rule. An ADD
that succeeds is deleted again, and its DEL must leave the node as clean.

Fewer examples than the pure-layer tests (tests/unit/test_fuzz_config.py): each is an exec."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, event, example, given
from hypothesis import strategies as st

from conftest import Node
from fuzz_inputs import (
    COMMANDS,
    HOSTILE_NAMES,
    HUGE_PADDING,
    check_stdout,
    deep,
    environment_text,
    fuzz_settings,
    spec_container_id,
    spec_ifname,
    spec_name,
    spec_netns,
    spec_path,
    wrong_type,
)
from pycni.ipam.store import Store

pytestmark = pytest.mark.netns
BOTH_MODES = True
TIMEOUT = 60  # per exec: a hang fails the example instead of the whole run


@dataclass(frozen=True)
class Root:
    """A path under the node's private root (the strategies cannot know it)."""

    suffix: str


@dataclass
class Case:
    command: str = "ADD"
    env: dict = field(default_factory=dict)  # CNI_* overrides; None removes the variable
    conf: dict = field(default_factory=dict)  # top-level overrides; None removes the key
    raw: str | None = None  # a byte-level damage applied to the encoded config


# --- strategies ------------------------------------------------------------------------------

FIFO = Root("fifo")  # made by run_case: nobody ever writes to it
NOT_NETNS = ["/proc/self/ns/mnt", "/dev/null", "/dev/zero", Root(""), FIFO]  # code 4, unopened
NETNS = [
    "",
    "run/netns/x",
    "/run/netns/../../etc/passwd",
    "/run/netns/pycni-fuzz-no-such-ns",
    "/" + "x" * 5000,
    "/run/netns/\udcff",
    *NOT_NETNS,
]
env_overrides = st.dictionaries(
    st.sampled_from(["CNI_CONTAINERID", "CNI_IFNAME", "CNI_NETNS", "CNI_ARGS"]),
    st.one_of(
        st.none(),
        environment_text(),
        st.sampled_from(HOSTILE_NAMES),
        st.sampled_from(NETNS),
        st.sampled_from(["IP=10.244.1.77", "IP=1.2.3.4;A=1", "IgnoreUnknown=1", "IP"]),
    ),
    max_size=2,
)
TOP_KEYS = {
    "cniVersion": (str,),
    "name": (str,),
    "bridge": (str, type(None)),
    "subnet": (str,),
    "mtu": (int, type(None)),
    "ipMasq": (bool, type(None)),
    "routes": (list, type(None)),
    "dns": (dict, type(None)),
    "runtimeConfig": (dict, type(None)),
    "ipam": (dict, type(None)),
    "prevResult": (dict, type(None)),
    "dataDir": (str, type(None)),
    "logFile": (str, type(None)),
    "agentSocket": (str, type(None)),
}
CHOICES = {
    "cniVersion": ["0.1.0", "0.3.1", "1.0.0", "9.9.9", ""],
    "name": ["../../x", "a/b", "x" * 129, "n2", "\u0000", "fuzz%d"],
    "bridge": ["../x", "a b", "cni%d", "x" * 16, ".", "\ud800", "cni0"],
    "subnet": ["10.244.1.0/31", "10.244.1.5/24", "ten", "10.244.1.0/28"],
    "mtu": [100, 70000, 1400, 2**64],
    "routes": [
        [{"dst": "10.96.0.0/12", "gw": 5}],
        [{"dst": "x"}],
        [{"dst": "10.96.0.0/12"}],
        [{"dst": "10.96.0.0/12", "mtu": "x"}],
    ],
    "dns": [{"nameservers": ["dns.example"]}, {"domain": "\ud800"}],
    "runtimeConfig": [
        {"ips": ["10.244.1.250"]},
        {"ips": ["1.2.3.4"]},
        {"mac": "ff:ff:ff:ff:ff:ff"},
        {"mac": "0a:58:0a:f4:01:63"},
        {"ips": "10.244.1.9"},
        {"bandwidth": {"ingressRate": -1}},
        {"portMappings": [{"hostPort": "x"}]},
    ],
    "prevResult": [{"interfaces": [{"name": "a", "mtu": 1e300}]}, [1], {"ips": [{"x": 1}]}],
    "dataDir": [
        "var/lib/pycni",
        "/var/lib/../../etc",
        "/tmp/\ud800",
        Root("data/../x"),
        Root("data2"),
        Root("d ir/./x"),
        Root("data//y"),
        "/x\u0000y",
    ],
    "logFile": [
        "/dev/stdout",
        "/proc/self/fd/1",
        "/dev/null",
        Root(""),
        Root("log2"),
        "relative.log",
    ],
    "agentSocket": ["", "rel.sock", "\u0000pycni-fuzz", Root("no-agent.sock"), "/run/\ud800"],
    "ipam": [{"type": "dhcp"}, {"type": "host-local", "dataDir": "x"}],
}
conf_overrides = st.dictionaries(
    st.sampled_from(sorted(TOP_KEYS)),
    st.one_of(
        st.none(),
        st.sampled_from(sorted(TOP_KEYS)).flatmap(lambda k: wrong_type(TOP_KEYS[k])),
        st.sampled_from([v for values in CHOICES.values() for v in values]),
    ),
    max_size=3,
)
RAW = ["cut", "bad-utf8", "nul", "deep", "huge", "empty", "array"]
cases = st.builds(
    Case,
    command=st.sampled_from(
        ["ADD"] * 12 + ["DEL", "DEL", "CHECK", "VERSION", "STATUS", "GC", "add", "\udcff"]
    ),
    env=st.one_of(st.just({}), st.just({}), env_overrides),
    conf=conf_overrides,
    raw=st.one_of(*[st.none()] * 5, st.sampled_from(RAW)),
)


def damage(data: bytes, how: str | None) -> bytes:
    if how is None:
        return data
    return {
        "cut": data[: len(data) // 2],
        "bad-utf8": data[:10] + b"\xff" + data[10:],
        "nul": data[:10] + b"\x00" + data[10:],
        "deep": deep(100_000),
        "huge": data[:-1] + b', "pad": "' + b"a" * HUGE_PADDING + b'"}',
        "empty": b"",
        "array": b"[" + data + b"]",
    }[how]


# --- the node's state --------------------------------------------------------------------------


def links(ns: str) -> list[str]:
    out = subprocess.run(
        ["ip", "-n", ns, "-o", "link", "show"], capture_output=True, text=True, check=True
    ).stdout
    return [line.split(": ")[1].split("@")[0] for line in out.splitlines()]


def bridges(ns: str) -> set[str]:
    out = subprocess.run(
        ["ip", "-n", ns, "-o", "link", "show", "type", "bridge"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {line.split(": ")[1] for line in out.splitlines()}


def ruleset(node: Node) -> str:
    return node.exec("nft", "list", "ruleset").stdout


def attachments(data_dirs: set[str]) -> list:
    found = []
    for d in data_dirs:
        if os.path.exists(os.path.join(d, "pycni.db")):
            with Store(d) as store:
                found += store.list_attachments()
    return found


def resolve(value, root: str):
    if isinstance(value, Root):
        return os.path.join(root, "odd", value.suffix) if value.suffix else root
    if isinstance(value, dict):
        return {k: resolve(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v, root) for v in value]
    return value


def exec_case(node: Node, environ: dict, data: bytes):
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), **environ}
    return subprocess.run(
        ["ip", "netns", "exec", node.ns, node.plugin],
        input=data,
        env={
            k.encode("utf-8", "surrogateescape"): v.encode("utf-8", "surrogateescape")
            for k, v in env.items()
        },
        capture_output=True,
        timeout=TIMEOUT,
    )


# --- the property ----------------------------------------------------------------------------


@fuzz_settings(
    60, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(case=cases)
@example(case=Case(env={"CNI_IFNAME": "eth%d"}))  # was: 103 after the kernel made it eth0
@example(case=Case(conf={"bridge": "cni%d"}))  # was: a bridge named cni1 (or cni0), kept
@example(case=Case(env={"CNI_IFNAME": "eth\udcff"}))  # was: 199 UnicodeEncodeError
@example(case=Case(raw="deep"))  # was: a traceback, nothing on stdout
@example(case=Case(conf={"agentSocket": "/run/\ud800"}))  # was: a traceback in the shim
@example(case=Case(conf={"logFile": "/dev/stdout", "runtimeConfig": {"ips": ["1.2.3.4"]}}))
@example(case=Case(conf={"dataDir": Root("d ir/./x")}))  # odd but valid: works, and is undone
@example(case=Case(conf={"routes": [{"dst": "10.96.0.0/12", "gw": 5}]}))
@example(case=Case(raw="huge"))
@example(case=Case(env={"CNI_NETNS": FIFO}))  # was: ADD blocked for ever opening the FIFO
@example(
    case=Case(
        command="CHECK", env={"CNI_NETNS": FIFO}, conf={"prevResult": {"cniVersion": "1.1.0"}}
    )
)  # the same
@example(case=Case(env={"CNI_CONTAINERID": "../../etc", "CNI_NETNS": "/run/netns/../../x"}))
def test_hostile_input_gets_a_cni_answer_and_leaves_nothing(node, case):
    pod = node.pod("fz")
    try:
        run_case(node, pod, case)
    finally:
        node.spaces.remove(os.path.basename(pod))


def run_case(node: Node, pod: str, case: Case) -> None:
    conf = node.conf()
    for key, value in case.conf.items():
        if value is None:
            conf.pop(key, None)
        else:
            conf[key] = resolve(value, node.root)
    fifo = resolve(FIFO, node.root)
    if not os.path.exists(fifo):
        os.makedirs(os.path.dirname(fifo), exist_ok=True)
        os.mkfifo(fifo)
    environ = {
        "CNI_COMMAND": case.command,
        "CNI_CONTAINERID": "fz1",
        "CNI_IFNAME": "eth0",
        "CNI_NETNS": pod,
        "CNI_PATH": os.path.dirname(node.plugin),
    }
    for key, value in case.env.items():
        if value is None:
            environ.pop(key, None)
        else:
            environ[key] = resolve(value, node.root)
    data = damage(json.dumps(conf).encode(), case.raw)
    data_dirs = {node.conf()["dataDir"]} | (
        {conf["dataDir"]} if isinstance(conf.get("dataDir"), str) else set()
    )

    bridges_before, rules_before = bridges(node.ns), ruleset(node)
    proc = exec_case(node, environ, data)
    out = check_stdout(proc.returncode, proc.stdout, proc.stderr)
    event(f"{case.command[:6]!r} -> {out['code'] if proc.returncode else 'ok'}")
    want = expected_code(case, environ, node.root)
    if want is not None:
        assert proc.returncode != 0 and out["code"] == want, (case, want, out)
    if proc.returncode == 0 and case.command == "ADD":
        # It was valid after all: undo it, and the DEL must leave the node as clean.
        delete = exec_case(node, {**environ, "CNI_COMMAND": "DEL"}, data)
        assert check_stdout(delete.returncode, delete.stdout, delete.stderr) is None
        assert delete.returncode == 0
    leftovers = [name for name in links(node.ns) if name.startswith(("veth", "ifb"))]
    assert not leftovers, (case, out, leftovers)
    assert links(pod.rsplit("/", 1)[1]) == ["lo"], (case, out)
    assert not attachments(data_dirs), (case, out)
    if proc.returncode != 0 and out["code"] < 100:
        # Refused before any work: not even a bridge or a rule.
        assert bridges(node.ns) == bridges_before, (case, out)
        assert ruleset(node) == rules_before, (case, out)
    if proc.returncode == 0 or out["code"] >= 100:
        assert ruleset(node) == rules_before, (case, out)  # DEL or rollback took them back


STRING_RULES = {
    "name": spec_name,
    "bridge": spec_ifname,
    "dataDir": lambda v: spec_path(v, False),
    "logFile": lambda v: spec_path(v, True),
    "agentSocket": lambda v: spec_path(v, True),
}


def expected_code(case: Case, environ: dict, root: str) -> int | None:
    """The code the spec's rules demand where they are simple to state, else None."""
    command = case.command
    if command not in COMMANDS:
        return 4
    if command in ("ADD", "CHECK", "DEL"):
        netns = environ.get("CNI_NETNS", "")
        netns_ok = spec_netns(netns) if netns else command == "DEL"
        if not (
            spec_container_id(environ.get("CNI_CONTAINERID", ""))
            and spec_ifname(environ.get("CNI_IFNAME", ""))
            and netns_ok
        ):
            return 4
        if any(
            not ("=" in p and not p.startswith("="))
            for p in environ.get("CNI_ARGS", "").split(";")
            if p
        ):
            return 4
    if command == "VERSION":
        return None
    if case.raw is not None:
        return 6
    if (
        command == "ADD"
        and not case.conf
        and environ.get("CNI_NETNS") in [resolve(p, root) for p in NOT_NETNS]
    ):
        return 4  # found before anything is opened: a FIFO would block, a device act
    if command in ("ADD", "CHECK") and len(case.conf) == 1:
        ((key, value),) = case.conf.items()
        if key in STRING_RULES and isinstance(value, str) and not STRING_RULES[key](value):
            return 7
    return None
