"""The fast path's maps as bytes (the C structs' layout) and the change from one content to
another: pure, no kernel."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import pytest

from pycni.dataplane import fastpath as fp


def test_pod_entries_encode_struct_pod_and_decode_back():
    entry = fp.PodEntry(IPv4Address("10.244.0.2"), 7, "0a:58:0a:f4:00:02", "0a:58:0a:f4:00:01")
    assert entry.key() == bytes([10, 244, 0, 2])
    value = entry.value()
    assert len(value) == 16 and value[:4] == (7).to_bytes(4, "little")
    assert fp.decode_pods({entry.key(): value}) == {
        IPv4Address("10.244.0.2"): (7, "0a:58:0a:f4:00:02", "0a:58:0a:f4:00:01")
    }
    with pytest.raises(ValueError):
        fp.PodEntry(IPv4Address("10.244.0.2"), 7, "0a:58", "0a:58:0a:f4:00:01").value()


def test_remote_keys_are_lpm_keys_and_decode_back():
    nets = [IPv4Network("10.244.1.0/24"), IPv4Network("10.245.0.0/16")]
    content = fp.remote_map(nets)
    assert fp.remote_key(nets[0]) == (24).to_bytes(4, "little") + bytes([10, 244, 1, 0])
    assert fp.decode_remote(content) == set(nets)


def test_plan_writes_what_differs_and_deletes_what_is_not_wanted():
    have = {b"a": b"1", b"b": b"2", b"c": b"3"}
    want = {b"a": b"1", b"b": b"9", b"d": b"4"}
    put, delete = fp.plan(have, want)
    assert put == [(b"b", b"9"), (b"d", b"4")]
    assert delete == [b"c"]
    assert fp.plan(want, want) == ([], [])


def test_the_object_name_follows_the_source(tmp_path):
    path = fp.object_path(str(tmp_path))
    assert path.startswith(str(tmp_path)) and fp.source_digest() in path


def test_the_agent_option_is_on_by_default_and_off_by_either_spelling():
    from pycni.ctl.main import build_parser

    parser = build_parser()
    assert parser.parse_args(["agent"]).fast_path == "on"
    assert parser.parse_args(["agent", "--fast-path=off"]).fast_path == "off"
    assert parser.parse_args(["agent", "--no-fast-path"]).fast_path == "off"
