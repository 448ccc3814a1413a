import multiprocessing
import os
import sqlite3
import stat
import threading
from ipaddress import ip_address

import pytest

from pycni.cni.errors import (
    ADDRESS_UNAVAILABLE,
    ATTACHMENT_EXISTS,
    IO_FAILURE,
    POOL_EXHAUSTED,
    TRY_AGAIN_LATER,
    CniError,
)
from pycni.ipam import schema
from pycni.ipam.ranges import parse_range_set
from pycni.ipam.store import Store

NET = "pods"
V4 = parse_range_set([{"subnet": "10.244.1.0/24"}], "r")
V6 = parse_range_set([{"subnet": "fd00:10:244:1::/64"}], "r")


@pytest.fixture
def store(tmp_path):
    s = Store(str(tmp_path / "data"))
    yield s
    s.close()


def add(store, cid, sets=(V4,), requested=(), net=NET, ifname="eth0"):
    allocs = store.add_attachment(
        net, cid, ifname, f"veth{cid}", f"/proc/1/ns/{cid}", list(sets), list(requested)
    )
    return [str(a.ip) for a in allocs]


def test_open_creates_private_db(tmp_path):
    d = tmp_path / "data"
    Store(str(d)).close()
    assert stat.S_IMODE(os.stat(d / "pycni.db").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    conn = sqlite3.connect(d / "pycni.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1


def test_creating_after_another_process_made_and_used_the_db(tmp_path):
    """The race CI met with fifty concurrent ADDs: one process finds no pycni.db, another
    links its new one into place, a third opens it and writes the log; the first must open
    that database, not call the log an orphan."""
    d = tmp_path / "data"
    with Store(str(d)) as holder:  # made, and left open with a log on disk
        add(holder, "c1")
        assert os.path.getsize(d / "pycni.db-wal") > 0
        schema.create(str(d / "pycni.db"))  # what the late process runs: no error
        with Store(str(d)) as late:
            assert add(late, "c2") == ["10.244.1.3"]


def test_a_log_without_its_database_is_refused(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    (d / "pycni.db-wal").write_bytes(b"x" * 100)
    with pytest.raises(CniError) as ei:
        Store(str(d))
    assert ei.value.code == IO_FAILURE and "is missing but its write-ahead log" in ei.value.msg


def test_open_errors_name_the_path(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(CniError) as ei:
        Store(str(f))  # a file where the directory should be
    assert ei.value.code == IO_FAILURE and str(f / "pycni.db") in ei.value.msg
    d = tmp_path / "bad"
    d.mkdir()
    (d / "pycni.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(CniError) as ei:
        Store(str(d))
    assert ei.value.code == IO_FAILURE and str(d / "pycni.db") in ei.value.msg


def test_first_and_fields(store):
    allocs = store.add_attachment(NET, "c1", "eth0", "veth1", "/ns/1", [V4], [])
    (a,) = allocs
    assert a.ip == ip_address("10.244.1.2")
    assert a.prefixlen == 24 and a.gateway == ip_address("10.244.1.1") and a.range_set == V4.key
    att = store.get_attachment(NET, "c1", "eth0")
    assert (att.host_veth, att.netns, att.allocations) == ("veth1", "/ns/1", allocs)
    assert att.created > 0
    assert store.get_attachment(NET, "c1", "eth1") is None


def test_round_robin_does_not_reuse_freed_address_at_once(store):
    assert add(store, "a") == ["10.244.1.2"]
    assert add(store, "b") == ["10.244.1.3"]
    store.remove_attachment(NET, "a", "eth0")
    assert add(store, "c") == ["10.244.1.4"]


def test_round_robin_wraps_around(tmp_path):
    s = Store(str(tmp_path))
    small = parse_range_set([{"subnet": "10.0.0.0/29"}], "r")  # .2 - .6
    got = [add(s, f"c{i}", [small])[0] for i in range(5)]
    assert got == [f"10.0.0.{i}" for i in range(2, 7)]
    s.remove_attachment(NET, "c1", "eth0")  # frees .3
    s.remove_attachment(NET, "c3", "eth0")  # frees .5
    assert add(s, "x", [small]) == ["10.0.0.3"]  # wraps past .6 to the first free one
    assert add(s, "y", [small]) == ["10.0.0.5"]


def test_exhaustion(tmp_path):
    s = Store(str(tmp_path))
    tiny = parse_range_set([{"subnet": "10.0.0.0/30"}], "r")
    assert add(s, "a", [tiny]) == ["10.0.0.2"]
    with pytest.raises(CniError) as ei:
        add(s, "b", [tiny])
    assert ei.value.code == POOL_EXHAUSTED
    assert tiny.key in ei.value.msg and "(1 addresses, all in use)" in ei.value.msg
    assert s.get_attachment(NET, "b", "eth0") is None  # nothing half-recorded
    s.remove_attachment(NET, "a", "eth0")
    assert add(s, "b", [tiny]) == ["10.0.0.2"]


def test_requested_addresses(store):
    assert add(store, "a", requested=[ip_address("10.244.1.50")]) == ["10.244.1.50"]
    # round robin continues after a requested address, as in host-local
    assert add(store, "b") == ["10.244.1.51"]
    cases = {
        "10.244.1.50": "in use by container a",
        "10.244.1.1": "reserved",
        "10.244.1.0": "not in any range",  # the network address is outside [start, end]
        "10.244.1.255": "not in any range",
        "10.9.9.9": "not in any range",
    }
    for ip, text in cases.items():
        with pytest.raises(CniError) as ei:
            add(store, "z", requested=[ip_address(ip)])
        assert ei.value.code == ADDRESS_UNAVAILABLE and text in ei.value.msg, ei.value.msg
    with pytest.raises(CniError) as ei:
        add(store, "z", requested=[ip_address("10.244.1.60"), ip_address("10.244.1.61")])
    assert ei.value.code == ADDRESS_UNAVAILABLE
    assert store.get_attachment(NET, "z", "eth0") is None


def test_duplicate_attachment(store):
    add(store, "a")
    with pytest.raises(CniError) as ei:
        add(store, "a")
    assert ei.value.code == ATTACHMENT_EXISTS
    assert "container a already has an attachment on interface eth0 in network pods" in str(
        ei.value
    )
    assert add(store, "a", ifname="eth1") == ["10.244.1.3"]  # another interface is fine
    assert add(store, "a", net="other") == ["10.244.1.2"]  # networks are independent


def test_release_idempotent_and_precise(store):
    ips = [add(store, f"c{i}")[0] for i in range(30)]
    assert ips[0] == "10.244.1.2" and ips[18:28] == [f"10.244.1.{i}" for i in range(20, 30)]
    removed = store.remove_attachment(NET, "c0", "eth0")
    assert [str(a.ip) for a in removed.allocations] == ["10.244.1.2"]
    assert store.remove_attachment(NET, "c0", "eth0") is None
    left = {str(a.ip) for att in store.list_attachments(NET) for a in att.allocations}
    assert left == set(ips[1:])
    assert store.used_count(NET, V4.key) == 29
    assert store.count_attachments(NET) == 29


def test_dual_stack(store):
    allocs = store.add_attachment(NET, "a", "eth0", "v", "/ns", [V4, V6], [])
    assert [str(a.ip) for a in allocs] == ["10.244.1.2", "fd00:10:244:1::2"]
    assert [a.prefixlen for a in allocs] == [24, 64]
    got = add(store, "b", [V4, V6], requested=[ip_address("fd00:10:244:1::99")])
    assert got == ["10.244.1.3", "fd00:10:244:1::99"]
    assert store.used_count(NET, V6.key) == 2
    assert store.get_attachment(NET, "b", "eth0").allocations[1].range_set == V6.key


def test_persistence_across_instances(tmp_path):
    d = str(tmp_path)
    with Store(d) as s:
        add(s, "a")
        add(s, "b")
        s.remove_attachment(NET, "b", "eth0")
        s.set_meta("rules", "abc")
        s.set_network(NET, {"masquerade": True, "subnets": ["10.244.1.0/24"]})
    with Store(d) as s:
        assert [a.container_id for a in s.list_attachments()] == ["a"]
        assert add(s, "c") == ["10.244.1.4"]  # the round-robin cursor survived
        assert s.get_meta("rules") == "abc"
        assert s.get_network(NET) == {"masquerade": True, "subnets": ["10.244.1.0/24"]}


def test_meta_and_networks(store):
    assert store.get_meta("k") is None
    store.set_meta("k", "v1")
    store.set_meta("k", "v2")
    assert store.get_meta("k") == "v2"
    store.set_meta("k", None)
    assert store.get_meta("k") is None
    store.set_meta("k", None)  # deleting twice is fine
    store.set_network("b", {"x": 1})
    store.set_network("a", {"y": [1, 2]})
    assert store.list_networks() == {"a": {"y": [1, 2]}, "b": {"x": 1}}
    store.set_network("a", None)
    assert store.get_network("a") is None and list(store.list_networks()) == ["b"]


def test_list_attachments_filters(store):
    add(store, "a")
    add(store, "b", net="other")
    assert [a.network for a in store.list_attachments()] == ["other", "pods"]
    assert [a.container_id for a in store.list_attachments("other")] == ["b"]
    assert store.list_attachments("none") == []


def test_transaction_rollback_and_reentrancy(store):
    with pytest.raises(RuntimeError):
        with store.transaction():
            add(store, "a")  # nested transaction joins the outer one
            store.set_meta("k", "v")
            raise RuntimeError("boom")
    assert store.get_attachment(NET, "a", "eth0") is None and store.get_meta("k") is None
    assert not store.conn.in_transaction
    with store.transaction():
        add(store, "a")
        with store.transaction():
            store.set_meta("k", "v")
    assert store.count_attachments(NET) == 1 and store.get_meta("k") == "v"


def test_locked_database_is_try_again(tmp_path):
    d = str(tmp_path)
    with Store(d) as a, Store(d) as b:
        b.conn.execute("PRAGMA busy_timeout=50")
        with a.transaction():
            with pytest.raises(CniError) as ei:
                add(b, "x")
            assert ei.value.code == TRY_AGAIN_LATER
            assert not b.conn.in_transaction
        assert add(b, "x") == ["10.244.1.2"]


def test_readonly_database_is_io_failure(tmp_path):
    d = str(tmp_path)
    Store(d).close()
    s = Store(d)
    s.conn.execute("PRAGMA query_only=ON")  # stands in for a read-only file system
    with pytest.raises(CniError) as ei:
        add(s, "a")
    assert ei.value.code == IO_FAILURE and os.path.join(d, "pycni.db") in ei.value.msg
    assert not s.conn.in_transaction
    s.close()


def test_concurrent_threads(tmp_path):
    d = str(tmp_path)
    results: list[str] = []
    errors: list[BaseException] = []
    start = threading.Barrier(50)

    def worker(i: int) -> None:
        try:
            start.wait()
            with Store(d) as s:
                results.extend(add(s, f"t{i}"))
        except BaseException as e:  # collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(results) == 50 and len(set(results)) == 50
    with Store(d) as s:
        assert s.used_count(NET, V4.key) == 50
        for i in range(50):
            assert s.remove_attachment(NET, f"t{i}", "eth0") is not None
        assert s.used_count(NET, V4.key) == 0


def _proc_worker(d: str, i: int, barrier, queue) -> None:
    try:
        barrier.wait()
        with Store(d) as s:  # opened concurrently: also exercises schema creation races
            queue.put(("ok", [add(s, f"p{i}-{j}")[0] for j in range(5)]))
    except BaseException as e:
        queue.put(("err", repr(e)))


def test_concurrent_processes(tmp_path):
    d = str(tmp_path / "shared")
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(20)
    queue = ctx.Queue()
    procs = [ctx.Process(target=_proc_worker, args=(d, i, barrier, queue)) for i in range(20)]
    for p in procs:
        p.start()
    got = [queue.get(timeout=120) for _ in range(20)]  # one message per process
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert [g for g in got if g[0] == "err"] == []
    ips = [ip for _, batch in got for ip in batch]
    assert len(ips) == 100 and len(set(ips)) == 100
    with Store(d) as s:
        assert s.used_count(NET, V4.key) == 100
        for att in s.list_attachments(NET):
            s.remove_attachment(NET, att.container_id, att.ifname)
        assert s.used_count(NET, V4.key) == 0
        assert s.count_attachments(NET) == 0
