"""Property tests: hostile CNI environments and network configs, through the pure layers
(env parsing, config parsing, plugin.handle) with the core replaced by a recorder, so
thousands of inputs run in seconds without root. Every input ends in a valid result or a CNI
error object with the right code, and an input refused with an error never reaches the core.

The same inputs go through the real plugin, in a namespace, in tests/netns/test_fuzz_plugin.py.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import subprocess
import sys

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from fuzz_inputs import (
    COMMANDS,
    HOSTILE_NAMES,
    VALIDATION_CODES,
    byte_mutation,
    check_answer,
    check_stdout,
    deep,
    environment_text,
    fuzz_settings,
    json_values,
    spec_container_id,
    spec_ifname,
    spec_name,
    spec_netns,
    spec_path,
    wrong_type,
)
from pycni import core, plugin
from pycni.cni import MAX_CONFIG_BYTES, netconf, result
from pycni.cni import env as cnienv
from pycni.cni.errors import CniError

VALID = netconf.VALID_ATTACHMENTS
BASE = {
    "cniVersion": "1.1.0",
    "name": "fuzznet",
    "type": "pycni",
    "bridge": "cni0",
    "network": "10.244.0.0/16",
    "subnet": "10.244.1.0/24",
    # Never touched: the core is replaced and logging goes nowhere (see offline()).
    "dataDir": "/nonexistent/pycni-fuzz/data",
    "logFile": "",
}
ENV = {
    "CNI_COMMAND": "ADD",
    "CNI_CONTAINERID": "c1",
    "CNI_NETNS": "/run/netns/fuzz",
    "CNI_IFNAME": "eth0",
    "CNI_PATH": "/opt/cni/bin",
}


@contextlib.contextmanager
def offline():
    """plugin.handle with the core replaced by a recorder and logging kept in memory: nothing
    touches the kernel or the file system, whatever paths the config names."""
    calls: list = []

    def fake_run(request, conf):
        calls.append((request, conf))
        return result.Result().to_json(conf.cni_version) if request.command == "ADD" else None

    logger = logging.getLogger("pycni")
    null = logging.NullHandler()  # log.setup() leaves a logger that has a handler alone
    logger.addHandler(null)
    real_run, core.run = core.run, fake_run
    try:
        yield calls
    finally:
        core.run = real_run
        logger.removeHandler(null)


def handle(environ: dict, stdin: bytes | dict) -> tuple[dict | None, int, list]:
    """plugin.handle offline; checks the answer's shape, returns (answer, status, core calls)."""
    if isinstance(stdin, dict):
        stdin = json.dumps(stdin).encode()
    with offline() as calls:
        out, status = plugin.handle(environ, stdin)
    err = check_answer(out, status)
    if err is not None and err["code"] in VALIDATION_CODES:
        assert not calls, (err, "refused input reached the core")
    return out, status, calls


def put(conf: dict, path: tuple, value) -> dict:
    """A deep copy of `conf` with the value at `path` (keys and list indexes) replaced."""
    conf = copy.deepcopy(conf)
    node = conf
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return conf


# --- (b) the environment --------------------------------------------------------------------

maybe = st.one_of(st.none(), environment_text())  # None: the variable is absent
commands = st.one_of(st.sampled_from(COMMANDS), environment_text(8))
cni_args = st.one_of(
    st.none(),
    environment_text(40),
    st.lists(st.tuples(environment_text(8), environment_text(12)), max_size=3).map(
        lambda kv: ";".join(f"{k}={v}" for k, v in kv)
    ),
)


@fuzz_settings(400)
@given(
    command=commands,
    cid=maybe,
    netns=st.one_of(maybe, environment_text().map(lambda s: "/run/netns/" + s)),
    ifname=maybe,
    args=cni_args,
    path=maybe,
)
@example(
    command="ADD", cid="c1", netns="/run/netns/x", ifname="eth\udcff", args=None, path=None
)  # was: 199 UnicodeEncodeError (undecodable byte in CNI_IFNAME)
@example(
    command="ADD", cid="c1", netns="/run/netns/x", ifname="eth%d", args=None, path=None
)  # was: accepted; the kernel names the pod interface eth0 instead
@example(command="ADD", cid="../../etc", netns="/run/netns/x", ifname="eth0", args=None, path=None)
@example(command="DEL", cid="c1", netns="/run/netns/../../etc", ifname="..", args=None, path=None)
def test_environment_is_parsed_or_refused_with_code_4(command, cid, netns, ifname, args, path):
    environ = {"CNI_COMMAND": command}
    for key, value in (
        ("CNI_CONTAINERID", cid),
        ("CNI_NETNS", netns),
        ("CNI_IFNAME", ifname),
        ("CNI_ARGS", args),
        ("CNI_PATH", path),
    ):
        if value is not None:
            environ[key] = value
    try:
        request = cnienv.from_environ(environ)
    except CniError as exc:
        assert exc.code == 4, exc
        assert "CNI_" in exc.msg, exc
        request = None
    if command not in COMMANDS:
        assert request is None
        return
    if command in ("VERSION", "STATUS", "GC"):
        assert request is not None and request.command == command
        return
    netns_ok = spec_netns(netns) if netns else command == "DEL"
    args_ok = all("=" in p and not p.startswith("=") for p in (args or "").split(";") if p)
    expect_ok = spec_container_id(cid or "") and spec_ifname(ifname or "") and netns_ok and args_ok
    assert (request is not None) == expect_ok, (environ, request)
    if request is not None:
        assert (request.container_id, request.ifname, request.netns) == (cid, ifname, netns or "")


@fuzz_settings(400)
@given(name=st.one_of(environment_text(), st.text(max_size=20)))
@example("\ud800")  # a lone surrogate escaped in JSON ("\ud800"): was 199 as a bridge name
@example("cni%d")
def test_interface_names_follow_the_spec(name):
    try:
        cnienv.validate_ifname(name)
        ok = True
    except CniError as exc:
        assert exc.code == 4
        ok = False
    assert ok == spec_ifname(name), name


# --- (a) the network config -----------------------------------------------------------------

NO_VERSION = {k: v for k, v in BASE.items() if k != "cniVersion"}
IPAM_STYLE = {
    **{k: v for k, v in BASE.items() if k not in ("subnet", "dataDir")},
    "ipam": {
        "type": "host-local",
        "subnet": "10.244.1.0/24",
        "dataDir": "/nonexistent/pycni-fuzz/data",
    },
}
RANGES = {
    **{k: v for k, v in BASE.items() if k != "subnet"},
    "ranges": [[{"subnet": "10.244.1.0/24", "gateway": "10.244.1.1"}]],
}
ROUTES = {**BASE, "routes": [{"dst": "10.96.0.0/12", "gw": "10.244.1.1", "mtu": 1400}]}
RUNTIME = {
    **BASE,
    "runtimeConfig": {
        "ips": ["10.244.1.9"],
        "mac": "0a:58:0a:f4:01:09",
        "bandwidth": {"ingressRate": 1000000},
    },
}
DNS = {
    **BASE,
    "dns": {
        "nameservers": ["10.96.0.10"],
        "domain": "cluster.local",
        "search": ["svc.cluster.local"],
        "options": ["ndots:5"],
    },
}
GC = {**BASE, VALID: [{"containerID": "c1", "ifname": "eth0"}]}
NONE = type(None)

# (base config, path, JSON types the key accepts, error code for any other type)
TYPED = [
    (BASE, ("cniVersion",), (str,), 7),
    (NO_VERSION, ("cniVersions",), (list,), 7),
    (BASE, ("name",), (str,), 7),
    (BASE, ("type",), (str, NONE), 7),
    (BASE, ("bridge",), (str, NONE), 7),
    (BASE, ("subnet",), (str,), 7),
    (BASE, ("network",), (str, list, NONE), 7),
    (BASE, ("routes",), (list, NONE), 7),
    (BASE, ("mtu",), (int, NONE), 7),
    (BASE, ("isDefaultGateway",), (bool, NONE), 7),
    (BASE, ("ipMasq",), (bool, NONE), 7),
    (BASE, ("hairpinMode",), (bool, NONE), 7),
    (BASE, ("disableCheck",), (bool, NONE), 7),
    (BASE, ("disableGC",), (bool, NONE), 7),
    (BASE, ("dataDir",), (str, NONE), 7),
    (BASE, ("logFile",), (str, NONE), 7),
    (BASE, ("agentSocket",), (str, NONE), 7),
    (BASE, ("logLevel",), (str, NONE), 7),
    (BASE, ("dns",), (dict, NONE), 7),
    (BASE, ("runtimeConfig",), (dict, NONE), 7),
    (BASE, ("args",), (dict, NONE), 7),
    (BASE, ("ipam",), (dict, NONE), 7),
    (BASE, ("prevResult",), (dict, NONE), 6),
    (GC, (VALID,), (list, NONE), 7),  # null: no live attachment (libcni sends it so)
    (GC, (VALID, 0), (dict,), 7),
    (GC, (VALID, 0, "containerID"), (str,), 7),
    (GC, (VALID, 0, "ifname"), (str,), 7),
    (IPAM_STYLE, ("ipam", "type"), (str,), 7),
    (IPAM_STYLE, ("ipam", "subnet"), (str,), 7),
    (IPAM_STYLE, ("ipam", "dataDir"), (str, NONE), 7),
    (IPAM_STYLE, ("ipam", "rangeStart"), (str, NONE), 7),
    (IPAM_STYLE, ("ipam", "gateway"), (str, NONE), 7),
    (IPAM_STYLE, ("ipam", "routes"), (list, NONE), 7),
    (RANGES, ("ranges",), (list,), 7),
    (RANGES, ("ranges", 0), (list,), 7),
    (RANGES, ("ranges", 0, 0), (dict,), 7),
    (RANGES, ("ranges", 0, 0, "subnet"), (str,), 7),
    (RANGES, ("ranges", 0, 0, "gateway"), (str, NONE), 7),
    (ROUTES, ("routes", 0), (dict,), 7),
    (ROUTES, ("routes", 0, "dst"), (str,), 7),
    (ROUTES, ("routes", 0, "gw"), (str, NONE), 7),
    (ROUTES, ("routes", 0, "mtu"), (int,), 7),
    (RUNTIME, ("runtimeConfig", "ips"), (list, NONE), 7),
    (RUNTIME, ("runtimeConfig", "ips", 0), (str,), 7),
    (RUNTIME, ("runtimeConfig", "mac"), (str, NONE), 7),
    (RUNTIME, ("runtimeConfig", "bandwidth"), (dict, NONE), 7),
    (RUNTIME, ("runtimeConfig", "bandwidth", "ingressRate"), (int, NONE), 7),
    (DNS, ("dns", "nameservers"), (list,), 7),
    (DNS, ("dns", "nameservers", 0), (str,), 7),
    (DNS, ("dns", "search"), (list,), 7),
    (DNS, ("dns", "options"), (list,), 7),
    (DNS, ("dns", "domain"), (str,), 7),
]
# DEL cleans up even when the config no longer validates; it needs only these.
DEL_NEEDS = {
    ("cniVersion",),
    ("cniVersions",),
    ("name",),
    ("dataDir",),
    ("logFile",),
    ("ipam", "dataDir"),
}


@st.composite
def wrongly_typed(draw):
    base, path, allowed, code = draw(st.sampled_from(TYPED))
    value = draw(wrong_type(allowed))
    return put(base, path, value), path, code


@fuzz_settings(600)
@given(case=wrongly_typed(), command=st.sampled_from(["ADD", "CHECK", "DEL"]))
@example(
    case=(put(ROUTES, ("routes", 0, "gw"), 5), ("routes", 0, "gw"), 7), command="ADD"
)  # was: accepted as 0.0.0.5 (ip_address() takes ints)
@example(
    case=(put(ROUTES, ("routes", 0, "gw"), True), ("routes", 0, "gw"), 7), command="ADD"
)  # was: accepted as 0.0.0.1
@example(
    case=(put(ROUTES, ("routes", 0, "mtu"), "x"), ("routes", 0, "mtu"), 7), command="ADD"
)  # was: passed to netlink and into the result
@example(
    case=(
        put(BASE, ("prevResult",), {"interfaces": [{"name": "a", "mtu": float("inf")}]}),
        ("prevResult",),
        6,
    ),
    command="ADD",
)  # was: 199 OverflowError
def test_a_wrongly_typed_key_is_refused_with_its_code(case, command):
    conf, path, code = case
    out, status, calls = handle({**ENV, "CNI_COMMAND": command}, conf)
    if command == "DEL" and path not in DEL_NEEDS:
        assert status == 0 and len(calls) == 1, out  # DEL proceeds on a damaged config
        return
    assert status == 1, (conf, out)
    assert out["code"] == code, (path, out)
    # The message names the key, so the operator can find it (IPAM keys by their own names).
    word = path[0] if path[0] != "ipam" else [k for k in path if isinstance(k, str)][-1]
    assert word in out["msg"], (path, out)


path_like = st.one_of(
    environment_text(),
    st.lists(
        st.sampled_from(
            ["", ".", "..", "a", "é", "\udcff", "\ud800", " ", "\x00", "%d", "pycni", "..."]
        ),
        max_size=5,
    ).map(lambda p: "/".join(p)),
    st.lists(st.sampled_from(["", ".", "..", "a", "\x00", "\ud800"]), max_size=4).map(
        lambda p: "/" + "/".join(p)
    ),
)
STRING_KEYS = {
    "name": spec_name,
    "bridge": spec_ifname,
    "dataDir": lambda v: spec_path(v, False),
    "logFile": lambda v: spec_path(v, True),
    "agentSocket": lambda v: spec_path(v, True),
}


@fuzz_settings(500)
@given(
    key=st.sampled_from(sorted(STRING_KEYS)),
    value=st.one_of(path_like, st.text(max_size=20), st.sampled_from(HOSTILE_NAMES)),
)
@example(key="name", value="../../x")
@example(key="dataDir", value="/tmp/\ud800")  # was: 199 UnicodeEncodeError in makedirs
@example(key="logFile", value="/tmp/\ud800/log")  # was: 199 UnicodeEncodeError
@example(key="agentSocket", value="/run/\ud800")  # was: 199 here, a traceback in the shim
@example(key="bridge", value="\ud800")  # was: 199 UnicodeEncodeError
@example(key="bridge", value="cni%d")  # was: accepted; the kernel makes cni0 (or cni1...)
@example(key="dataDir", value="var/lib/pycni")
@example(key="dataDir", value="/var/lib/../../etc")
def test_names_and_paths_in_the_config_follow_the_rules(key, value):
    out, status, calls = handle(ENV, {**BASE, key: value})
    if STRING_KEYS[key](value):
        assert status == 0 and calls, (key, value, out)
        conf = calls[0][1]
        assert (
            getattr(
                conf,
                {
                    "name": "name",
                    "bridge": "bridge",
                    "dataDir": "data_dir",
                    "logFile": "log_file",
                    "agentSocket": "agent_socket",
                }[key],
            )
            == value
        )
    else:
        assert status == 1 and out["code"] == 7 and key in out["msg"], (key, value, out)


# --- any bytes, any document ---------------------------------------------------------------

VALID_BYTES = json.dumps(BASE).encode()
environments = st.fixed_dictionaries(
    {"CNI_COMMAND": st.one_of(st.sampled_from(COMMANDS), environment_text(6))},
    optional={
        "CNI_CONTAINERID": st.one_of(st.just("c1"), environment_text()),
        "CNI_NETNS": st.one_of(st.just("/run/netns/fuzz"), environment_text()),
        "CNI_IFNAME": st.one_of(st.just("eth0"), environment_text()),
        "CNI_ARGS": st.one_of(st.just("IgnoreUnknown=1;IP=10.244.1.9"), environment_text()),
        "DEBUG": st.sampled_from(["1", "", "true"]),
    },
)


@fuzz_settings(400)
@given(
    environ=environments,
    stdin=st.one_of(
        byte_mutation(VALID_BYTES),
        st.binary(max_size=64),
        json_values.map(lambda v: json.dumps(v).encode()),
    ),
)
@example(environ=dict(ENV), stdin=deep(100_000))  # was: RecursionError escaped handle()
@example(environ=dict(ENV, CNI_COMMAND="VERSION"), stdin=deep(100_000, "{"))  # same
@example(environ=dict(ENV), stdin=VALID_BYTES + b" " * MAX_CONFIG_BYTES)
@example(environ=dict(ENV), stdin=VALID_BYTES.replace(b'"fuzznet"', b'"fuzz\\u0000net"'))
@example(environ=dict(ENV), stdin=VALID_BYTES.replace(b'"fuzznet"', b'"fuzz\xffnet"'))
def test_any_bytes_get_a_cni_answer(environ, stdin):
    out, status, calls = handle(environ, stdin)
    if calls:
        assert status == 0  # the recorder never fails


@st.composite
def damaged_documents(draw):
    """A config whose known keys (and a few unknown ones) hold arbitrary JSON."""
    base = draw(st.sampled_from([BASE, IPAM_STYLE, RANGES, ROUTES, RUNTIME, DNS, GC]))
    conf = copy.deepcopy(base)
    keys = sorted(
        {path[0] for _, path, _, _ in TYPED}
        | {"portMappings", "capabilities", "cni.dev/attachments", "plugins"}
    )
    for key in draw(st.lists(st.sampled_from(keys), max_size=4, unique=True)):
        conf[key] = draw(json_values)
    rc = conf.get("runtimeConfig")
    if isinstance(rc, dict) and draw(st.booleans()):
        rc["portMappings"] = draw(
            st.one_of(
                json_values,
                st.lists(
                    st.dictionaries(
                        st.sampled_from(
                            ["hostPort", "containerPort", "protocol", "hostIP", "HostPort"]
                        ),
                        json_values,
                    ),
                    max_size=2,
                ),
            )
        )
    return conf


@fuzz_settings(500)
@given(conf=damaged_documents(), command=st.sampled_from(COMMANDS))
def test_any_config_document_gets_a_cni_answer(conf, command):
    handle({**ENV, "CNI_COMMAND": command}, conf)


# --- where the log goes ---------------------------------------------------------------------


SRC = os.path.join(os.path.dirname(__file__), "..", "..", "src")
LOG_SETUP = """
import logging, sys
sys.path.insert(0, sys.argv[1])
from pycni import log
log.setup(sys.argv[2], "info")
(handler,) = logging.getLogger("pycni").handlers
print(type(handler).__name__, getattr(handler, "baseFilename", None) or handler.stream.name)
"""


@pytest.mark.parametrize("make", ["directory", "fifo", "missing-parent", "devnull"])
def test_log_setup_never_blocks_or_fails(tmp_path, make):
    """In a child with a timeout: opening a FIFO without a reader for writing used to block
    the plugin forever."""
    path = str(tmp_path / "log")
    if make == "directory":
        os.mkdir(path)
    elif make == "fifo":
        os.mkfifo(path)
    elif make == "missing-parent":
        path = str(tmp_path / "a" / "b" / "pycni.log")
    else:
        path = os.devnull
    proc = subprocess.run(
        [sys.executable, "-c", LOG_SETUP, SRC, path], capture_output=True, text=True, timeout=20
    )
    assert proc.returncode == 0, proc.stderr
    kind, target = proc.stdout.split()
    if make in ("directory", "fifo"):
        assert (kind, target) == ("StreamHandler", "<stderr>")
    else:
        assert (kind, target) == ("FileHandler", path)
    if make == "missing-parent":
        assert oct(os.stat(path).st_mode & 0o777) == oct(0o600)


@pytest.mark.parametrize("log_file", ["/dev/stdout", "/proc/self/fd/1"])
def test_a_log_file_that_is_stdout_is_not_used(tmp_path, log_file):
    """Was: every log line went to stdout ahead of the CNI error object."""
    conf = {**BASE, "cniVersion": "0.3.1", "logFile": log_file, "dataDir": str(tmp_path / "data")}
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; sys.path.insert(0, sys.argv[1]);from pycni.plugin import main; main()",
            SRC,
        ],
        input=json.dumps(conf).encode(),
        capture_output=True,
        timeout=30,
        env={**ENV, "CNI_COMMAND": "CHECK", "PATH": os.environ.get("PATH", "")},
    )
    out = check_stdout(proc.returncode, proc.stdout, proc.stderr)
    assert out["code"] == 1, out  # CHECK needs 0.4.0: an error after the log was set up
    assert b"WARNING" in proc.stderr  # the log went to stderr instead
