"""The C reader recovery uses at a restart (atomnode/queue/_rowreader.c) returns what the
sqlite3 module returns (with TEXT as bytes), and fails the way it fails.

``make test`` builds it (libsqlite3-dev, scripts/sysdeps.sh): here it must be the compiled
one, as for the mypyc modules (tests/test_compiled.py), unless ATOMNODE_PURE_PYTHON=1.
"""

from __future__ import annotations

import os
import sqlite3
import sys

import pytest

from atomnode.queue import store as store_mod
from atomnode.queue.store import SQL_RECOVER, Store, read_live

pure = os.environ.get("ATOMNODE_PURE_PYTHON") == "1"
needs_c = pytest.mark.skipif(store_mod._c_read_rows is None, reason="pure-Python install")


def test_reader_is_built_unless_pure_python_was_asked_for():
    if pure:
        assert store_mod._c_read_rows is None
    else:
        assert store_mod._c_read_rows is not None, (
            "atomnode.queue._rowreader was not built: is libsqlite3-dev missing? (setup.py)")


def _python_rows(path: str, sql: str) -> list[tuple]:
    conn = sqlite3.connect(path)
    conn.text_factory = bytes
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


_JOB_COLUMNS = ("id, function, unique_key, data, priority, when_to_run, seq, submitted_at, "
                "state, attempts")


def _store_with(path: str, jobs: list[tuple]) -> None:
    """A new store's database holding ``jobs`` (rows of _JOB_COLUMNS), written by hand."""
    s = Store(path)
    s.open()
    s.close()
    conn = sqlite3.connect(path)
    conn.executemany(f"INSERT INTO jobs ({_JOB_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                     jobs)
    conn.commit()
    conn.close()


@pytest.fixture
def mixed(tmp_path) -> str:
    """A table holding every storage class, in the columns recovery reads."""
    path = str(tmp_path / "mixed.db")
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, fn, u, d, n, f)")
    values = [
        (1, b"fn-a", b"u1", b"a\0b\xff", 0, 1.5),
        (2, b"fn-a", "u-\u00e9", "text \u2603", -1, -0.0),
        (3, "fn-a", b"", b"", 2**62, 1e300),
        (4, b"fn-b", None, None, -(2**63), None),
        (5, b"fn-b", b"x" * 70000, "", None, 3),
        (6, b"fn-a", "", b"\0", 7, 2.25),
    ]
    conn.executemany("INSERT INTO t VALUES (?, ?, ?, ?, ?, ?)", values)
    conn.commit()
    conn.close()
    return path


@needs_c
def test_same_rows_as_the_sqlite3_module(mixed: str):
    sql = "SELECT id, fn, u, d, n, f FROM t ORDER BY id"
    fast = store_mod._c_read_rows(mixed, sql, 1000, 1)
    assert fast == _python_rows(mixed, sql)
    for a, b in zip(fast, _python_rows(mixed, sql)):
        assert [type(x) for x in a] == [type(x) for x in b]
    assert fast[2][1] == b"fn-a" and fast[1][2] == "u-\u00e9".encode()


@needs_c
def test_equal_values_of_the_shared_column_are_one_object(mixed: str):
    sql = "SELECT id, fn, u FROM t ORDER BY id"
    rows = store_mod._c_read_rows(mixed, sql, 1000, 1)
    # TEXT 'fn-a' and BLOB b'fn-a' have the same bytes: one object for rows 1-3.
    assert rows[0][1] is rows[1][1] is rows[2][1]
    assert rows[3][1] is rows[4][1] and rows[3][1] is not rows[2][1]
    assert rows[5][1] == b"fn-a" and rows[5][1] is not rows[0][1]
    # Other columns are never shared, and references are counted right.
    assert rows[0][2] is not rows[1][2]
    shared = rows[3][1]
    before = sys.getrefcount(shared)
    del rows
    assert sys.getrefcount(shared) == before - 2
    no_share = store_mod._c_read_rows(mixed, sql, 1000, -1)
    assert no_share[0][1] is not no_share[1][1]


@needs_c
def test_errors_are_the_sqlite3_modules(tmp_path, mixed: str):
    read = store_mod._c_read_rows
    with pytest.raises(sqlite3.OperationalError, match="cannot open"):
        read(str(tmp_path / "missing.db"), "SELECT 1", 1000, -1)
    assert not (tmp_path / "missing.db").exists()  # never created
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database" * 400)
    with pytest.raises(sqlite3.DatabaseError, match="not a database"):
        read(str(junk), "SELECT * FROM sqlite_master", 1000, -1)
    with pytest.raises(sqlite3.DatabaseError, match="no such table"):
        read(mixed, "SELECT * FROM missing_table", 1000, -1)
    with pytest.raises(ValueError, match="read-only"):
        read(mixed, "DELETE FROM t", 1000, -1)
    assert len(_python_rows(mixed, "SELECT * FROM t")) == 6
    with pytest.raises(TypeError):
        read(mixed, None, 1000, -1)


@needs_c
def test_a_damaged_table_page_fails_both_readers_alike(tmp_path):
    """A page of the table overwritten with junk: neither reader returns a partial list."""
    path = str(tmp_path / "bad.db")
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, d)")
    conn.executemany("INSERT INTO t VALUES (?, ?)", [(i, os.urandom(300)) for i in range(2000)])
    conn.commit()
    conn.close()
    with open(path, "r+b") as f:
        f.seek(4096 * 3)
        f.write(b"\xee" * 4096)
    sql = "SELECT id, d FROM t"
    with pytest.raises(sqlite3.DatabaseError) as python_error:
        _python_rows(path, sql)
    with pytest.raises(sqlite3.DatabaseError) as c_error:
        store_mod._c_read_rows(path, sql, 1000, -1)
    assert str(python_error.value) in str(c_error.value)


def test_recovery_reads_the_same_with_either_reader(tmp_path):
    """read_live through the C reader and through the sqlite3 module, on a store's own
    database with plain, retried, running and scheduled jobs and a TEXT row."""
    path = str(tmp_path / "q.db")
    _store_with(path, [
        (1, b"f", b"u1", b"d1", 1, 0, 1, 100.5, "queued", 0),
        (2, b"f", b"-", b"d2", 0, 0, 7, 101.0, "queued", 2),
        (3, "g", "u3", "text data", 2, 0, 3, 102.0, "running", 1),
        (4, b"g", b"", b"", 1, 1_900_000_000, 4, 103.0, "queued", 0),
        (5, b"g", b"u5", b"done", 1, 0, 5, 104.0, "done", 1),
    ])
    conn = sqlite3.connect(path)
    slow = read_live(conn, path, 1000, fast=False)
    fast = read_live(conn, path, 1000)
    assert conn.text_factory is str  # put back
    conn.close()
    assert fast == slow == _python_rows(path, SQL_RECOVER)
    assert [r[0] for r in fast] == [1, 2, 3, 4]
    assert fast[2][1:4] == (b"g", b"u3", b"text data")


# -- recovery in batches (Store.open(on_rows=...), Broker.restore_batch/finish_restore) --

def _seed(path: str) -> None:
    """A store holding plain jobs of two functions and priorities, a job requeued before
    the restart (old id, late seq), one running, one tried before, one scheduled, one
    finished, and a duplicate unique key."""
    rows = []
    for i in range(1, 41):
        fn = b"fa" if i % 3 else b"fb"
        rows.append((i, fn, b"u%d" % i, b"d%d" % i, i % 3, 0, i, 1000.0 + i, "queued", 0))
    rows += [
        (41, b"fa", b"late", b"x", 1, 0, 90, 1041.0, "queued", 0),  # requeued, attempt not counted
        (42, b"fa", b"run", b"x", 1, 0, 42, 1042.0, "running", 1),
        (43, b"fb", b"again", b"x", 0, 0, 43, 1043.0, "queued", 2),
        (44, b"fb", b"later", b"x", 1, 2_000_000_000, 44, 1044.0, "queued", 0),
        (45, b"fa", b"gone", b"x", 1, 0, 45, 1045.0, "done", 1),
        (46, b"fa", b"u7", b"dup", 1, 0, 46, 1046.0, "queued", 0),
    ]
    rows.insert(3, rows.pop())  # a queue whose id order is not its seq order either way
    _store_with(path, rows)


def _queues(broker) -> dict:
    return {(name, p): [(j.id, j.seq) for j in q]
            for name, fn in sorted(broker.functions.items()) for p, q in enumerate(fn.queues)}


def _counters(broker) -> dict:
    return {name: (fn.queued, fn.total, tuple(fn.by_priority))
            for name, fn in sorted(broker.functions.items())}


@pytest.mark.parametrize("batch", [1, 7, 5000])
def test_batched_recovery_restores_what_the_whole_read_does(tmp_path, monkeypatch, batch):
    from atomnode.gearman.broker import Broker

    whole_db, batch_db = str(tmp_path / "a.db"), str(tmp_path / "b.db")
    _seed(whole_db)
    _seed(batch_db)
    s = Store(whole_db)
    rec = s.open()
    s.close()
    whole = Broker(hostname="t", durable=True, clock=lambda: 5000.0,
                   first_id=rec.next_id, first_seq=rec.next_seq)
    n_whole = whole.restore_rows(rec.rows)

    monkeypatch.setattr(store_mod, "RECOVERY_BATCH", batch)
    seen: list[int] = []
    batched = Broker(hostname="t", durable=True, clock=lambda: 5000.0)

    def take(rows):
        seen.append(len(rows))
        batched.restore_batch(rows)

    s = Store(batch_db)
    rec2 = s.open(on_rows=take)
    s.close()
    batched.next_id = max(batched.next_id, rec2.next_id)
    batched.next_seq = max(batched.next_seq, rec2.next_seq)
    n_batched = batched.finish_restore()
    assert rec2.rows == [] and sum(map(len, rec2.batches)) == sum(seen) == len(rec.rows) == 45
    if store_mod._c_read_batches is not None:
        assert max(seen) <= batch and len(seen) == -(-45 // batch)
    assert n_batched == n_whole
    qb, qw = _queues(batched), _queues(whole)
    assert qb == qw, [(k, str(qb[k]), str(qw[k])) for k in qw if qb.get(k) != qw[k]]
    assert _counters(batched) == _counters(whole)
    assert set(batched.jobs) == set(whole.jobs)
    assert batched.uniques.keys() == whole.uniques.keys()
    assert batched.next_id == whole.next_id and batched.next_seq == whole.next_seq
    # The job running at the restart was requeued above every stored seq, in both.
    requeued = [j for j in batched.jobs.values() if j.id == 42]
    assert requeued and requeued[0].seq > 90
    # Scheduled, not queued.
    assert all(j.id != 44 for q in batched.functions[b"fb"].queues for j in q)


def test_a_failing_consumer_stops_the_read(tmp_path, monkeypatch):
    path = str(tmp_path / "q.db")
    _seed(path)
    monkeypatch.setattr(store_mod, "RECOVERY_BATCH", 2)
    calls = []

    def take(rows):
        calls.append(rows)
        if len(calls) == 3:
            raise KeyError("broken consumer")

    s = Store(path)
    with pytest.raises(KeyError, match="broken consumer"):
        s.open(on_rows=take)
    assert len(calls) == 3
    import threading
    assert not [t for t in threading.enumerate() if t.name == "atomnode-store-read"]
    s2 = Store(path)  # the lock was released, the file is intact
    assert len(s2.open().rows) == 45
    s2.close()


@needs_c
def test_a_damaged_table_refuses_the_batched_start(tmp_path, monkeypatch):
    path = str(tmp_path / "q.db")
    _store_with(path, [(i, b"f", b"", os.urandom(300), 1, 0, i, 0.0, "queued", 0)
                       for i in range(1, 3001)])
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    size = os.path.getsize(path)
    with open(path, "r+b") as f:  # a page in the middle of the table
        f.seek((size // 4096 // 2) * 4096)
        f.write(b"\xee" * 4096)
    monkeypatch.setattr(store_mod, "RECOVERY_BATCH", 100)
    got = []
    with pytest.raises(store_mod.StoreOpenError, match="corrupt"):
        Store(path).open(on_rows=got.append)
