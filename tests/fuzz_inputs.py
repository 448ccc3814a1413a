"""Hostile input for the property tests (tests/unit/test_fuzz_*.py, tests/netns/test_fuzz_*.py):
hypothesis strategies for the CNI environment and network config, and the one check every
answer must pass, whatever went in: a valid result or a valid CNI error object, and nothing
else on stdout."""

from __future__ import annotations

import json
import os
import string

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from pycni.cni import MAX_CONFIG_BYTES, versions

# Profiles: "ci" (default) is derandomized so a failure reproduces on every run; "deep"
# (PYCNI_FUZZ_PROFILE=deep) explores ten times as much, randomly, for a long local run.
settings.register_profile(
    "pycni-fuzz-ci",
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "pycni-fuzz-deep",
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
PROFILE = os.environ.get("PYCNI_FUZZ_PROFILE", "ci")


def fuzz_settings(examples: int, **kw) -> settings:
    """The module's settings for one test: `examples` in the ci profile, 10x in deep."""
    base = settings.get_profile(f"pycni-fuzz-{PROFILE}")
    scale = 10 if PROFILE == "deep" else 1
    return settings(base, max_examples=examples * scale, **kw)


SUPPORTED = set(versions.SUPPORTED)
SPEC_CODES = {1, 2, 3, 4, 5, 6, 7, 11, 50, 51}
# Errors found before anything is allocated or created: nothing may be left after them.
VALIDATION_CODES = {1, 2, 3, 4, 6, 7}
PYCNI_CODES = set(range(100, 107)) | {199}
COMMANDS = ["ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC"]

# --- spec oracles, written from the spec's words, not from the code -------------------------

ID_CHARS = set(string.ascii_letters + string.digits + "_.-")
ALNUM = set(string.ascii_letters + string.digits)


def spec_container_id(cid: str) -> bool:
    return 0 < len(cid) <= 1024 and cid[0] in ALNUM and set(cid) <= ID_CHARS


def spec_ifname(name: str) -> bool:
    """CNI: at most 15 bytes, not '.' or '..', no '/', ':' or whitespace; and what the kernel
    reads differently ('%' patterns) or what cannot be a name (control chars, bad UTF-8)."""
    try:
        size = len(name.encode())
    except UnicodeEncodeError:
        return False
    return (
        0 < size <= 15
        and name not in (".", "..")
        and not any(c in "/:%" or c.isspace() or not c.isprintable() for c in name)
    )


def spec_netns(path: str) -> bool:
    return path.startswith("/") and len(path) <= 4096


def spec_path(value: str, may_be_empty: bool) -> bool:
    if value == "":
        return may_be_empty
    try:
        os.fsencode(value)
    except UnicodeEncodeError:
        return False
    return value.startswith("/") and "\0" not in value and ".." not in value.split("/")


def spec_name(name: str) -> bool:
    return spec_container_id(name) and len(name) <= 128


# --- strings ----------------------------------------------------------------------------------

HOSTILE_NAMES = [
    "",
    ".",
    "..",
    "...",
    "../../etc",
    "../x",
    "a/b",
    "/",
    "/etc/passwd",
    "x" * 16,
    "é" * 8,
    " eth0",
    "eth0 ",
    "eth\t0",
    "eth\n0",
    "eth%d",
    "%s%n",
    "a:b",
    "-a",
    "_a",
    ".hidden",
    "\udcff",
    "\udc80abc",
    "eth\x7f",
    "eth\x00",
    "$(id)",
    "`id`",
    "a;b",
    "a b",
    "\u202eevil",
    "\ufeffeth0",
    "x" * 1025,
    "ÿ",
    "\u0130",
]


def environment_text(max_size: int = 24) -> st.SearchStrategy[str]:
    """What an environment variable can hold: any bytes but NUL, decoded as os.environ does
    (undecodable bytes become lone surrogates), or a hand-picked hostile string."""
    raw = (
        st.binary(max_size=max_size)
        .filter(lambda b: b"\0" not in b)
        .map(lambda b: b.decode("utf-8", "surrogateescape"))
    )
    printable = st.text(alphabet=string.printable + "é%ÿ\u00a0", max_size=max_size)
    hostile = st.sampled_from([s for s in HOSTILE_NAMES if "\0" not in s])
    return st.one_of(raw, printable, hostile)


# --- JSON ------------------------------------------------------------------------------------

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(HOSTILE_NAMES),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


def wrong_type(allowed: tuple[type, ...]) -> st.SearchStrategy:
    """A JSON value of none of the `allowed` types (a bool is not an int here)."""

    def ok(v) -> bool:
        if isinstance(v, bool):
            return bool not in allowed
        return not isinstance(v, allowed)

    return json_values.filter(ok)


def deep(depth: int, kind: str = "[") -> bytes:
    close = {"[": b"]", "{": b"}"}[kind]
    if kind == "[":
        return b"[" * depth + close * depth
    return b'{"a":' * depth + b"1" + close * depth


HUGE_PADDING = MAX_CONFIG_BYTES  # padding that takes any config past the limit


def byte_mutation(data: bytes) -> st.SearchStrategy[bytes]:
    """`data` damaged at the byte level: cut, invalid UTF-8 or NUL inserted, wrapped, padded
    past the limit, or nested too deep."""
    n = len(data)
    return st.one_of(
        st.integers(0, max(n - 1, 0)).map(lambda i: data[:i]),
        st.tuples(
            st.integers(0, n),
            st.sampled_from(
                [b"\xff", b"\xc3", b"\x00", b"\xed\xa0\x80", b"\\", b'"', b"\n", b"\x1b[2J"]
            ),
        ).map(lambda t: data[: t[0]] + t[1] + data[t[0] :]),
        st.just(b"[" + data + b"]"),
        st.just(data + b" " * HUGE_PADDING),
        st.just(data[:-1] + b', "pad": "' + b"a" * HUGE_PADDING + b'"}'),
        st.sampled_from([deep(100_000), deep(100_000, "{"), deep(3000), b"", b"null", b"\xff\xfe"]),
    )


# --- the one check every answer must pass ------------------------------------------------------


def _no_constants(token: str):
    raise ValueError(f"{token} is not JSON")


def check_answer(out: dict | None, status: int) -> dict | None:
    """What plugin.handle (or the agent) answered: (JSON or None, exit status). A CNI error
    object exactly when the status is not zero. Returns the error object, or None."""
    assert status in (0, 1), status
    if out is not None:
        # What reaches stdout: strict JSON, as Go's decoder reads it (no NaN, no Infinity).
        text = json.dumps(out, allow_nan=False)
        assert json.loads(text) == out
    if status == 0:
        assert out is None or ("code" not in out and out.get("cniVersion") in SUPPORTED), out
        return None
    return check_error(out)


def check_error(err) -> dict:
    assert isinstance(err, dict), err
    assert set(err) <= {"cniVersion", "code", "msg", "details"}, err
    assert {"cniVersion", "code", "msg"} <= set(err), err
    assert err["cniVersion"] in SUPPORTED, err
    assert isinstance(err["code"], int) and not isinstance(err["code"], bool), err
    assert err["code"] in SPEC_CODES | PYCNI_CODES, err
    assert isinstance(err["msg"], str) and err["msg"], err
    assert "Traceback" not in err["msg"], err
    assert err["code"] != 199, err  # an internal error is a bug, whatever the input
    if "details" in err:
        assert isinstance(err["details"], str), err
    return err


def check_stdout(rc: int, stdout: bytes, stderr: bytes = b"") -> dict | None:
    """An exec'd plugin: exit status and stdout consistent, stdout nothing but one JSON
    document (or nothing, for a successful DEL, CHECK, GC or STATUS). Returns that JSON."""
    assert b"Traceback" not in stdout, stdout[-2000:]
    assert b"Traceback" not in stderr, stderr[-4000:].decode(errors="replace")
    text = stdout.decode("ascii")  # json.dumps escapes everything else
    if not text:
        assert rc == 0, (rc, stderr[-2000:])
        return None
    assert text.endswith("\n") and text.count("\n") == 1, text[:2000]
    out = json.loads(text, parse_constant=_no_constants)
    assert isinstance(out, dict), out
    if rc == 0:
        assert "code" not in out and out.get("cniVersion") in SUPPORTED, out
    else:
        check_error(out)
    return out
