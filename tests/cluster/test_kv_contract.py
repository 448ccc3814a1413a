"""The KV contract (cluster/kv.py), identical for SQLite and etcd, then what only one of them has
to show: processes sharing a SQLite file; etcd unreachable, failing over, restarting."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import pytest

from pycni.cluster.kv import KVError

SRC = os.path.join(os.path.dirname(__file__), "..", "..", "src")


def eventually(
    check: Callable[[], bool],
    timeout: float,
    step: float = 0.1,
    between: Callable[[], object] | None = None,
) -> float:
    """Seconds until ``check()`` held; fails after ``timeout``."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            pytest.fail(f"condition not met within {timeout} s")
        if between is not None:
            between()
        time.sleep(step)
    return time.monotonic() - start


# --- create / replace / delete -------------------------------------------------------------


def test_create_only_if_absent(kv_factory):
    a, b = kv_factory(), kv_factory()
    key = kv_factory.prefix + "k"
    assert a.create(key, "a")
    assert not b.create(key, "b")
    assert not a.create(key, "again")
    assert a.list(kv_factory.prefix)[0] == {key: "a"}
    assert b.list(kv_factory.prefix + "other/")[0] == {}


def test_create_race_has_one_winner(kv_factory):
    a, b = kv_factory(), kv_factory()
    for i in range(50):
        key = f"{kv_factory.prefix}race/{i}"
        barrier = threading.Barrier(2)
        won: dict[str, bool] = {}

        def claim(kv, name, key=key, barrier=barrier, won=won):
            barrier.wait()
            won[name] = kv.create(key, name)

        threads = [
            threading.Thread(target=claim, args=(kv, name)) for kv, name in ((a, "a"), (b, "b"))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(won.values()) == [False, True], (i, won)
        winner = next(name for name, ok in won.items() if ok)
        assert a.list(key)[0] == {key: winner}


def test_replace_is_compare_and_swap(kv_factory):
    a, b = kv_factory(), kv_factory()
    key = kv_factory.prefix + "k"
    assert not b.replace(key, "x", "y")  # absent
    assert a.create(key, "v1")
    assert not b.replace(key, "wrong", "v2")
    assert a.list(kv_factory.prefix)[0] == {key: "v1"}
    assert b.replace(key, "v1", "v2")
    assert not a.replace(key, "v1", "v3")  # the old value is gone
    assert a.list(kv_factory.prefix)[0] == {key: "v2"}


def test_replace_rebinds_the_key_to_the_replacing_client(kv_factory):
    ttl = kv_factory.short_ttl
    old, new = kv_factory(ttl), kv_factory(ttl)
    key, canary = kv_factory.prefix + "subnet", kv_factory.prefix + "canary"
    assert old.create(key, "v") and old.create(canary, "c")
    assert new.replace(key, "v", "v2")
    # `old` stops renewing (its agent died); `new` renews. When old's lease expires, its
    # canary goes, the replaced key stays.
    eventually(
        lambda: canary not in new.list(kv_factory.prefix)[0],
        ttl + 5,
        step=0.3,
        between=lambda: new.keepalive(),
    )
    assert new.keepalive()
    assert new.list(kv_factory.prefix)[0] == {key: "v2"}
    assert not old.keepalive()


def test_delete(kv_factory):
    a, b = kv_factory(), kv_factory()
    key = kv_factory.prefix + "k"
    assert not a.delete(key)
    assert a.create(key, "v")
    assert not b.delete(key, "other")
    assert key in a.list(kv_factory.prefix)[0]
    assert b.delete(key, "v")
    assert not b.delete(key, "v")
    assert a.list(kv_factory.prefix)[0] == {}
    assert a.create(key, "w")
    assert b.delete(key)  # unconditional, and not only the owner's
    assert not a.delete(key)
    assert a.create(key, "again")  # a deleted key can be created again


def test_put_overwrites_and_outlives_every_lease(kv_factory):
    ttl = kv_factory.short_ttl
    writer, reader = kv_factory(ttl), kv_factory()
    key, leased = kv_factory.prefix + "objects/p", kv_factory.prefix + "leased"
    _, before = reader.list(kv_factory.prefix)
    writer.put(key, "one")
    writer.put(key, "two")  # unconditional
    assert writer.create(leased, "x")
    assert reader.wait(kv_factory.prefix, before, 5) > before
    # The writer's lease runs out: its leased key goes, the put one stays.
    eventually(lambda: leased not in reader.list(kv_factory.prefix)[0], ttl + 5)
    assert reader.list(kv_factory.prefix)[0] == {key: "two"}
    assert not reader.create(key, "three")  # a put key is live: create sees it
    assert reader.replace(key, "two", "three")
    assert reader.delete(key)
    assert reader.list(kv_factory.prefix)[0] == {}


# --- leases --------------------------------------------------------------------------------


def test_expired_keys_vanish_and_are_free(kv_factory):
    a, b = kv_factory(kv_factory.short_ttl), kv_factory()
    key = kv_factory.prefix + "k"
    assert a.create(key, "a")
    assert not b.create(key, "b")
    eventually(lambda: key not in b.list(kv_factory.prefix)[0], kv_factory.short_ttl + 5)
    assert b.create(key, "b")
    assert not b.replace(key, "a", "x")
    assert a.list(kv_factory.prefix)[0] == {key: "b"}


def test_keepalive_keeps_keys_then_reports_expiry(kv_factory):
    ttl = kv_factory.short_ttl
    a, b = kv_factory(ttl), kv_factory()
    key = kv_factory.prefix + "k"
    assert a.keepalive()  # nothing bound yet: nothing lost
    assert a.create(key, "a")
    end = time.monotonic() + 2.5 * ttl
    while time.monotonic() < end:
        assert a.keepalive()
        assert key in b.list(kv_factory.prefix)[0]
        time.sleep(ttl / 4)
    eventually(lambda: key not in b.list(kv_factory.prefix)[0], ttl + 5)
    assert not a.keepalive()
    # A fresh lease for what comes next.
    assert a.create(key + "2", "a")
    assert a.keepalive()
    time.sleep(ttl / 2)
    assert a.keepalive()
    time.sleep(ttl / 2 + 0.3)
    assert b.list(kv_factory.prefix)[0] == {key + "2": "a"}


def test_keepalive_reports_a_lease_lost_before_a_write(kv_factory):
    ttl = kv_factory.short_ttl
    a, b = kv_factory(ttl), kv_factory()
    key = kv_factory.prefix + "k"
    assert a.create(key, "a")
    eventually(lambda: key not in b.list(kv_factory.prefix)[0], ttl + 5)
    assert a.create(key + "2", "a")  # binds to a fresh lease...
    assert not a.keepalive()  # ...but the owner still learns that the old one was lost
    assert a.keepalive()
    assert b.list(kv_factory.prefix)[0] == {key + "2": "a"}


# --- revisions and wait --------------------------------------------------------------------


def test_revision_increases_with_every_change(kv_factory):
    a = kv_factory()
    p = kv_factory.prefix
    revs = [a.list(p)[1]]
    assert a.create(p + "k", "1")
    revs.append(a.list(p)[1])
    assert a.replace(p + "k", "1", "2")
    revs.append(a.list(p)[1])
    assert a.delete(p + "k")
    revs.append(a.list(p)[1])
    assert revs == sorted(set(revs)), revs
    assert a.list(p)[1] == revs[-1]  # reading changes nothing


def test_wait_returns_promptly_after_a_change(kv_factory):
    a, b = kv_factory(), kv_factory()
    p = kv_factory.prefix
    _, rev = a.list(p)
    timer = threading.Timer(0.3, b.create, (p + "k", "b"))
    timer.start()
    try:
        start = time.monotonic()
        new = a.wait(p, rev, 10)
        took = time.monotonic() - start
    finally:
        timer.join()
    assert took < 1.0, took
    assert new > rev
    values, now = a.list(p)
    assert values == {p + "k": "b"} and now >= new
    # A change made before the wait (after the list) is not missed.
    assert b.delete(p + "k")
    start = time.monotonic()
    assert a.wait(p, now, 10) > now
    assert time.monotonic() - start < 1.0


def test_wait_times_out_without_a_change_under_its_prefix(kv_factory):
    a, b = kv_factory(), kv_factory()
    p = kv_factory.prefix
    _, rev = a.list(p + "watched/")
    assert b.create(p + "elsewhere/k", "b")  # another prefix: not a change for the waiter
    timer = threading.Timer(0.2, b.create, (p + "elsewhere/j", "b"))
    timer.start()
    try:
        start = time.monotonic()
        assert a.wait(p + "watched/", rev, 0.8) == rev
        took = time.monotonic() - start
    finally:
        timer.join()
    assert 0.7 <= took < 2.0, took


def test_wait_notices_expiry(kv_factory):
    ttl = kv_factory.short_ttl
    a, b = kv_factory(), kv_factory(ttl)
    p = kv_factory.prefix
    assert b.create(p + "k", "b")
    values, rev = a.list(p)
    assert values == {p + "k": "b"}
    start = time.monotonic()
    new = a.wait(p, rev, ttl + 10)
    assert time.monotonic() - start < ttl + 5
    assert new > rev
    assert a.list(p)[0] == {}


# --- SQLite only ---------------------------------------------------------------------------

_RACER = """
import json, sys, time
from pycni.cluster.sqlite import SqliteKV
path, prefix, name, start = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
kv = SqliteKV(path, 60)
while time.time() < start:
    time.sleep(0.001)
won = [i for i in range(20) if kv.create(f"{prefix}{i}", name)]
print(json.dumps(won))
"""


def test_sqlite_processes_race_for_keys(tmp_path):
    from pycni.cluster.sqlite import SqliteKV

    path, prefix = str(tmp_path / "cluster.db"), "/race/"
    SqliteKV(path, 60).close()  # the schema exists before the race
    start = time.time() + 1.0
    env = {**os.environ, "PYTHONPATH": os.path.abspath(SRC)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, path, prefix, name, str(start)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for name in ("a", "b")
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        results.append(set(json.loads(out)))
    assert not results[0] & results[1]
    assert results[0] | results[1] == set(range(20))
    kv = SqliteKV(path, 60)
    try:
        values = kv.list(prefix)[0]
    finally:
        kv.close()
    assert {int(k[len(prefix) :]) for k, v in values.items() if v == "a"} == results[0]


def test_sqlite_makes_a_private_file_and_its_directory(tmp_path):
    from pycni.cluster.sqlite import SqliteKV

    path = tmp_path / "new" / "dir" / "cluster.db"
    kv = SqliteKV(str(path), 60)
    try:
        assert kv.create("/k", "v")
        for name in os.listdir(path.parent):
            assert stat.S_IMODE(os.stat(path.parent / name).st_mode) == 0o600, name
    finally:
        kv.close()


def test_sqlite_second_client_in_one_process_keeps_seeing_other_writers(tmp_path):
    """Two clients of one file in one process (the agent's leases and its NetworkPolicy
    objects): opening the second must not drop the first's locks, or a writer process that
    closes resets the WAL under it and the first reads a stale revision for ever."""
    from pycni.cluster.sqlite import SqliteKV

    path = str(tmp_path / "cluster.db")
    first = SqliteKV(path, 60)
    second = SqliteKV(path, 60)
    write = (
        "import sys; from pycni.cluster.sqlite import SqliteKV; "
        "kv = SqliteKV(sys.argv[1], 60); kv.put(sys.argv[2], 'v'); kv.close()"
    )
    env = {**os.environ, "PYTHONPATH": SRC}
    try:
        first.create("/lease", "mine")
        for key in ("/objects/a", "/objects/b"):
            _, rev = second.list("/objects/")
            subprocess.run([sys.executable, "-c", write, path, key], check=True, env=env)
            assert second.wait("/objects/", rev, 5) > rev
            assert key in second.list("/objects/")[0]
    finally:
        first.close()
        second.close()


def test_sqlite_expiry_follows_the_clock(tmp_path):
    from pycni.cluster.sqlite import SqliteKV

    now = [1000.0]
    path = str(tmp_path / "cluster.db")
    a, b = (SqliteKV(path, 10, clock=lambda: now[0]) for _ in range(2))
    try:
        assert a.create("/p/k", "a")
        _, rev = b.list("/p/")
        for _ in range(3):  # both renew every third of the TTL, as agents do
            now[0] += 3
            assert a.keepalive() and b.keepalive()  # a's renewed until 1019
        for _ in range(3):  # a falls silent; b goes on
            now[0] += 3
            assert b.keepalive()
        assert b.list("/p/")[0] == {"/p/k": "a"}
        assert b.wait("/p/", rev, 0) == rev
        now[0] += 1
        assert b.wait("/p/", rev, 5) > rev  # the expiry, noticed without any write
        assert b.list("/p/")[0] == {}
        assert not a.keepalive()
    finally:
        a.close()
        b.close()


def test_sqlite_an_outage_expires_nothing(tmp_path):
    """While nobody writes (the file unreachable, or every agent down) time stands still:
    after a silence of ten TTLs every lease is still there, and only a client that stays
    silent once the others write again expires, a TTL later."""
    from pycni.cluster.sqlite import SqliteKV

    now = [1000.0]
    path = str(tmp_path / "cluster.db")
    a, b = (SqliteKV(path, 10, clock=lambda: now[0]) for _ in range(2))
    try:
        assert a.create("/p/a", "a") and b.create("/p/b", "b")
        _, rev = a.list("/p/")
        now[0] += 100
        assert a.list("/p/")[0] == {"/p/a": "a", "/p/b": "b"}  # read before any write
        assert a.wait("/p/", rev, 0.2) == rev
        assert a.keepalive()  # the first write: every lease is extended by the silence
        assert a.list("/p/")[0] == {"/p/a": "a", "/p/b": "b"}
        for _ in range(3):
            now[0] += 3
            assert a.keepalive()
        assert a.list("/p/")[0] == {"/p/a": "a", "/p/b": "b"}  # b's lease runs to 1110
        now[0] += 2
        assert a.keepalive()
        assert a.list("/p/")[0] == {"/p/a": "a"}  # b stayed silent while a wrote
        assert not b.keepalive()
    finally:
        a.close()
        b.close()


def test_sqlite_list_reads_only_changes_yet_matches_a_full_read(tmp_path):
    """A client that lists a prefix again reads only the keys changed since (writes, deletes,
    rebinds, expiries, from any client): after every step its answer equals that of a client
    listing the file for the first time, and the caller may change what it got."""
    import random

    from pycni.cluster.sqlite import SqliteKV

    now = [1000.0]
    path = str(tmp_path / "cluster.db")
    clients = [SqliteKV(path, 10, clock=lambda: now[0]) for _ in range(3)]
    reader = clients[0]
    rng = random.Random(7)
    try:
        for step in range(300):
            kv, key = rng.choice(clients), f"/p/{rng.randrange(12)}"
            op = rng.randrange(7)
            if op == 0:
                kv.create(key, f"c{step}")
            elif op == 1:
                kv.put(key, f"p{step}")
            elif op == 2:
                current = reader.list("/p/")[0].get(key)
                if current is not None:
                    kv.replace(key, current, f"r{step}")
            elif op == 3:
                kv.delete(key)
            elif op == 4:
                kv.keepalive()
            elif op == 5:
                kv.put(f"/q/{step % 5}", "elsewhere")  # another prefix
            else:
                now[0] += rng.choice((1, 4, 9))  # leases of clients that stay silent expire
            got, rev = reader.list("/p/")
            assert (got, rev) == fresh_list(path, now), step
            got.clear()  # the caller's copy
            assert reader.list("/p/") == fresh_list(path, now), step
    finally:
        for kv in clients:
            kv.close()


def fresh_list(path: str, now: list[float]) -> tuple[dict[str, str], int]:
    from pycni.cluster.sqlite import SqliteKV

    kv = SqliteKV(path, 10, clock=lambda: now[0])
    try:
        return kv.list("/p/")
    finally:
        kv.close()


def test_sqlite_unusable_path_is_a_kv_error(tmp_path):
    from pycni.cluster.sqlite import SqliteKV

    (tmp_path / "file").write_text("")
    with pytest.raises(KVError, match="cannot open"):
        SqliteKV(str(tmp_path / "file" / "cluster.db"), 60)


# --- etcd only -----------------------------------------------------------------------------


def test_etcd_unreachable_is_a_readable_kv_error():
    from pycni.cluster.etcd import EtcdKV
    from pycni.cluster.etcd_server import free_port

    url = f"http://127.0.0.1:{free_port()}"
    kv = EtcdKV(url, 10, timeout=2)
    try:
        for call in (
            lambda: kv.list("/p/"),
            lambda: kv.create("/p/k", "v"),
            lambda: kv.delete("/p/k"),
            lambda: kv.wait("/p/", 1, 1),
        ):
            start = time.monotonic()
            with pytest.raises(KVError) as info:
                call()
            assert time.monotonic() - start < 2
            message = str(info.value)
            assert url in message and "refused" in message.lower(), message
    finally:
        kv.close()


def test_etcd_fails_over_to_the_next_endpoint(etcd_server):
    from pycni.cluster.etcd import EtcdKV
    from pycni.cluster.etcd_server import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    kv = EtcdKV([dead, etcd_server.client_url], 10)
    try:
        key = f"/test/failover-{os.getpid()}"
        assert kv.create(key, "v")
        assert kv.list(key)[0] == {key: "v"}
        assert kv.keepalive()
        assert kv.delete(key, "v")
    finally:
        kv.close()


def test_etcd_wait_after_compaction_returns(etcd_server):
    from pycni.cluster.etcd import EtcdKV

    kv = EtcdKV(etcd_server.client_url, 10)
    try:
        p = f"/test/compact-{os.getpid()}/"
        _, old = kv.list(p)
        assert kv.create(p + "k", "1") and kv.replace(p + "k", "1", "2")
        _, rev = kv.list(p)
        client = kv._clients[0]
        client.post(client.get_url("/kv/compaction"), json={"revision": rev})
        start = time.monotonic()
        assert kv.wait(p, old, 10) > old  # history is gone: the caller must list again
        assert time.monotonic() - start < 1
        assert kv.delete(p + "k")
    finally:
        kv.close()


def test_etcd_wait_leaks_no_threads_or_sockets(etcd_server):
    from pycni.cluster.etcd import EtcdKV

    kv = EtcdKV(etcd_server.client_url, 10)
    p = f"/test/leak-{os.getpid()}/"
    try:
        _, rev = kv.list(p)
        kv.wait(p, rev, 0.05)
        fds, threads = len(os.listdir("/proc/self/fd")), threading.active_count()
        for i in range(20):
            kv.wait(p, rev, 0.05)  # timeouts
            assert kv.create(f"{p}{i}", "v")
            rev = kv.wait(p, rev, 5)  # changes
        assert len(os.listdir("/proc/self/fd")) <= fds + 1
        assert threading.active_count() == threads
    finally:
        kv.close()


def test_etcd_keys_survive_a_server_crash(tmp_path):
    from pycni.cluster.etcd import EtcdKV
    from pycni.cluster.etcd_server import ETCD, EtcdServer

    if not os.path.exists(ETCD):
        pytest.skip(f"{ETCD} is not installed")
    server = EtcdServer(str(tmp_path / "data"))
    kv = None
    try:
        server.start()
        kv = EtcdKV(server.client_url, 30, timeout=2)
        assert kv.create("/p/k", "v")
        pid = server.pid
        server.kill()
        with pytest.raises(KVError, match=server.client_url):
            kv.list("/p/")
        server.restart()
        assert server.pid != pid
        assert kv.list("/p/")[0] == {"/p/k": "v"}
        assert kv.keepalive()  # the lease survived too
        assert not kv.create("/p/k", "w")
        assert kv.replace("/p/k", "v", "w")
    finally:
        if kv is not None:
            kv.close()
        server.remove_data()
    assert not server.running()
