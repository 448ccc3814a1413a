"""The doctor's fast-path comparison, from hand-made views: the kernel against what the
agent's last pass wanted."""

from __future__ import annotations

from pycni.doctor import model as m
from pycni.doctor.compare import check_fast_path
from pycni.doctor.model import FastPathView, Link

LINKS = {n: Link(n, i) for i, n in enumerate(("eth0", "vetha", "vethb", "vethc"), 2)}
WANT = dict(
    enabled=True,
    want_interfaces=frozenset({"eth0", "vetha", "vethb"}),
    want_pods=frozenset({"10.244.0.2", "10.244.0.3"}),
    want_remote=frozenset({"10.244.1.0/24"}),
)
HELD = (("eth0", "pycni_fp_underlay"), ("vetha", "pycni_fp_pod"), ("vethb", "pycni_fp_pod"))


def view(**kw) -> FastPathView:
    base = dict(WANT, attached=HELD, pods=WANT["want_pods"], remote=WANT["want_remote"])
    return FastPathView(**{**base, **kw})


def kinds(findings) -> list[tuple[str, str]]:
    return [(f.kind, f.subject) for f in findings]


def test_as_wanted_is_no_finding():
    assert check_fast_path(view(), LINKS) == []


def test_a_missing_program_is_found_unless_its_interface_is_gone():
    assert kinds(check_fast_path(view(attached=HELD[:2]), LINKS)) == [
        (m.FAST_PATH_PROGRAM_MISSING, "vethb")
    ]
    gone = {k: v for k, v in LINKS.items() if k != "vethb"}
    assert check_fast_path(view(attached=HELD[:2]), gone) == []


def test_an_extra_program_and_one_beside_shaping_are_found():
    extra = (*HELD, ("vethc", "pycni_fp_pod"))
    assert kinds(check_fast_path(view(attached=extra), LINKS)) == [
        (m.FAST_PATH_PROGRAM_EXTRA, "vethc")
    ]
    shaped = check_fast_path(view(shaped=frozenset({"vetha"})), LINKS)
    assert kinds(shaped) == [(m.FAST_PATH_PROGRAM_EXTRA, "vetha")]


def test_map_differences_name_what_is_missing_and_extra():
    found = check_fast_path(view(pods=frozenset({"10.244.0.2", "10.244.0.9"})), LINKS)
    assert kinds(found) == [(m.FAST_PATH_MAP_DIFFERS, "pycni_fp_pods")]
    assert "missing 10.244.0.3" in found[0].actual and "extra 10.244.0.9" in found[0].actual
    none = check_fast_path(view(pods=None, remote=None), LINKS)
    assert kinds(none) == [
        (m.FAST_PATH_MAP_DIFFERS, "pycni_fp_pods"),
        (m.FAST_PATH_MAP_DIFFERS, "pycni_fp_remote"),
    ]


def test_off_means_no_program_anywhere():
    off = FastPathView(False, attached=(("eth0", "pycni_fp_underlay"),))
    assert kinds(check_fast_path(off, LINKS)) == [(m.FAST_PATH_STALE, "eth0")]
    assert check_fast_path(FastPathView(False), LINKS) == []
