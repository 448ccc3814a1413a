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


def test_the_agent_reads_a_map_back_only_when_its_content_changes_or_is_old(tmp_path, monkeypatch):
    """Reading a map forks bpftool: a pass that wants what the controller last wrote (or found)
    there trusts it, until VERIFY_EVERY has passed; a failed write is never trusted."""
    from pycni.agent.fastpath import FastPathController
    from pycni.backends.watch import VERIFY_EVERY

    maps: dict[int, dict[bytes, bytes]] = {5: {b"old": b"1"}}
    reads: list[int] = []
    fail = [False]

    def read_map(map_id):
        reads.append(map_id)
        return dict(maps[map_id])

    def write_map(map_id, have, want):
        if fail[0]:
            raise fp.FastPathError("update failed: No space left on device")
        maps[map_id] = dict(want)
        put, delete = fp.plan(have, want)
        return len(put) + len(delete)

    now = [100.0]
    monkeypatch.setattr(fp, "read_map", read_map)
    monkeypatch.setattr(fp, "write_map", write_map)
    monkeypatch.setattr("pycni.agent.fastpath.time.monotonic", lambda: now[0])
    ctl = FastPathController(str(tmp_path), "pycni", "cni0")
    want = {b"a": b"1"}
    assert ctl._sync(5, want) == 2 and reads == [5]
    assert ctl._sync(5, dict(want)) == 0 and reads == [5]  # the same content: trusted
    maps[5] = {}  # someone else's change is repaired once the trust runs out
    now[0] += VERIFY_EVERY
    assert ctl._sync(5, want) == 1 and reads == [5, 5] and maps[5] == want
    fail[0] = True
    with pytest.raises(fp.FastPathError):
        ctl._sync(5, {b"b": b"2"})
    fail[0] = False
    assert ctl._sync(5, want) == 0 and reads == [5, 5, 5, 5]  # after a failure: read again


def test_the_agent_plans_the_remote_map_again_only_when_the_nodes_change(tmp_path):
    from pycni.agent.fastpath import FastPathController
    from pycni.cluster.model import NodeRecord

    def node(name, *subnets):
        return NodeRecord(name, ("192.0.2.1",), tuple(IPv4Network(s) for s in subnets))

    local = node("me", "10.244.0.0/24")
    remotes = [local, node("b", "10.244.2.0/24"), node("a", "10.244.1.0/24")]
    ctl = FastPathController(str(tmp_path), "pycni", "cni0")
    nets, content = ctl._remote_plan(local, remotes)
    assert nets == ["10.244.1.0/24", "10.244.2.0/24"]
    assert content == fp.remote_map([IPv4Network(n) for n in nets])
    assert ctl._remote_plan(local, list(remotes))[1] is content  # the same nodes: no work
    remotes.append(node("c", "10.244.3.0/24"))
    assert ctl._remote_plan(local, remotes)[0] == [*nets, "10.244.3.0/24"]
