"""The durable queue (atomnode.queue.store): schema, recovery, every op, group commit, faults."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from atomnode.queue import store as store_mod
from atomnode.system.doorbell import Doorbell
from atomnode.queue.store import (
    APPLICATION_ID,
    migrate_step,
    SCHEMA_VERSION,
    Store,
    StoredJob,
    StoreOpenError,
    parse_handle,
)

FN = b"0123456789abcdef0123456789abcdef-arObjectMoveJob"
WAIT = 10.0  # generous upper bound for events that normally arrive in milliseconds


class Results:
    """on_result callback that records every report and lets a test wait for tokens."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.calls: list[tuple[list, list]] = []
        self.committed: list = []
        self.failed: list[tuple[object, str]] = []

    def __call__(self, committed: list, failed: list) -> None:
        assert threading.current_thread() is not threading.main_thread()
        with self.cond:
            self.calls.append((list(committed), list(failed)))
            self.committed += committed
            self.failed += failed
            self.cond.notify_all()

    def wait_for(self, *tokens: object) -> None:
        """Block until every token was reported (committed or failed)."""
        def done() -> bool:
            seen = set(map(id, self.committed)) | {id(t) for t, _ in self.failed}
            return all(id(t) in seen for t in tokens)

        with self.cond:
            assert self.cond.wait_for(done, WAIT), f"tokens not reported: {tokens}"

    def message_for(self, token: object) -> str | None:
        return next((m for t, m in self.failed if t is token), None)


class Token:
    """An opaque token like the broker's; retry/purge write attributes on it."""

    def __init__(self, name: str = "") -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<Token {self.name}>"


def insert_op(job_id: int, *, priority: int = 1, seq: int | None = None, data: bytes = b"{}",
              unique: bytes = b"", when: int = 0, token: object = None) -> tuple:
    return ("insert", job_id, FN, unique, data, priority, when,
            job_id if seq is None else seq, 1_700_000_000.0 + job_id, token)  # fmt: skip


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "state" / "atomnode.db")


def opened(path: str, **kw) -> tuple[Store, store_mod.Recovery, Results]:
    s = Store(path, hostname="testhost", **kw)
    rec = s.open()
    res = Results()
    s.start(res)
    return s, rec, res


def commit(path: str, ops: list[tuple]) -> None:
    """Apply ops through a store (started and closed) and require every token committed."""
    s, _, res = opened(path, retention_days=0)  # no pruning of the test's old timestamps
    try:
        s.submit_many(ops)
    finally:
        s.close()
    assert not res.failed, res.failed


def rows(path: str) -> dict[int, StoredJob]:
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {
            r[0]: StoredJob(*r)
            for r in con.execute(f"SELECT {store_mod._COLUMNS} FROM jobs ORDER BY id")
        }
    finally:
        con.close()


def test_a_submit_wakes_the_writer_through_its_doorbell(db: str) -> None:
    # The idle writer's own poll is made longer than the test waits: only the doorbell
    # can bring this insert to the disk in time.
    s = Store(db, hostname="testhost")
    s.open()
    s.idle_poll = 3600.0
    res = Results()
    s.start(res)
    try:
        for n in (1, 2):  # asleep in its poll each time
            token = Token(str(n))
            s.submit(insert_op(n, token=token))
            res.wait_for(token)
    finally:
        s.close()
    assert sorted(rows(db)) == [1, 2]


def test_doorbell_rings_once_for_many_rings() -> None:
    bell = Doorbell()
    bell.ring()
    bell.ring()
    started = time.monotonic()
    bell.wait(3600.0)  # rung: returns at once, and resets
    assert time.monotonic() - started < WAIT
    started = time.monotonic()
    bell.wait(0.01)  # not rung since: waits out its timeout
    assert time.monotonic() - started >= 0.005


def _state_of(path: str, job_id: int) -> str:
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return con.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]
    finally:
        con.close()


def _until(check, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


def _started_with_job_1(db: str, fact_delay: float) -> tuple[Store, Results]:
    """A started store holding job 1, committed, with facts held ``fact_delay``."""
    s, _, res = opened(db, retention_days=0)
    s.fact_delay = fact_delay
    first = Token("1")
    s.submit(insert_op(1, token=first))
    res.wait_for(first)
    return s, res


def test_facts_ride_in_the_next_acknowledged_transaction(db: str) -> None:
    # The hold is made longer than the test: the facts can reach the disk only with the
    # insert that follows them, in its transaction.
    s, res = _started_with_job_1(db, 3600.0)
    try:
        commits = s.commit_seconds.count
        s.submit_many([("start", 1, 1, "w", 1_700_000_001.0), ("done", 1, 1_700_000_002.0, 0)])
        assert _state_of(db, 1) == "queued"  # held, not written
        second = Token("2")
        s.submit(insert_op(2, token=second))
        res.wait_for(second)
        assert _state_of(db, 1) == "done"
        assert s.commit_seconds.count == commits + 1  # one transaction for both
    finally:
        s.close()


def test_facts_alone_are_written_after_the_delay(db: str) -> None:
    s, _ = _started_with_job_1(db, 0.05)
    try:
        s.submit(("start", 1, 1, "w", 1_700_000_001.0))
        _until(lambda: _state_of(db, 1) == "running", "the held fact was never written")
    finally:
        s.close()


def test_a_large_batch_of_facts_is_not_held(db: str) -> None:
    n = store_mod.FACT_BATCH
    commit(db, [insert_op(i) for i in range(1, n + 1)])
    s, _, _ = opened(db, retention_days=0)
    s.fact_delay = 3600.0
    try:
        s.submit_many([("start", i, 1, "w", 1_700_000_001.0) for i in range(1, n + 1)])
        _until(lambda: all(r.state == "running" for r in rows(db).values()),
               "a full batch of facts was held")
    finally:
        s.close()


def test_held_facts_are_written_at_close(db: str) -> None:
    commit(db, [insert_op(1)])
    s, _, _ = opened(db, retention_days=0)
    s.fact_delay = 3600.0
    s.submit(("start", 1, 1, "w", 1_700_000_001.0))
    s.close()
    assert _state_of(db, 1) == "running"


# -- schema and opening ------------------------------------------------------------------


def test_new_database_is_created_with_schema_and_markers(db: str) -> None:
    s = Store(db, hostname="h")
    rec = s.open()
    s.close()
    assert rec.jobs == [] and rec.next_id == 1 and rec.next_seq == 1
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
    assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    names = {r[0] for r in con.execute("SELECT name FROM sqlite_master")}
    assert {"jobs", "meta", "jobs_active", "jobs_finished"} <= names


def test_empty_existing_file_is_refused(db: str) -> None:
    """A missing file is a new install; an existing empty one is a truncated queue."""
    os.makedirs(os.path.dirname(db))
    Path(db).write_bytes(b"")
    with pytest.raises(StoreOpenError) as e:
        Store(db).open()
    assert db in str(e.value) and "empty file (0 bytes)" in str(e.value)
    assert "Restore it from a backup" in str(e.value)
    assert Path(db).stat().st_size == 0  # untouched
    assert not Store.is_locked(db)


def test_new_database_is_built_aside_and_renamed_into_place(db: str, monkeypatch) -> None:
    """Creation never leaves an empty or half-built file at the path: if it fails midway
    the path stays missing, and the next start creates it again."""
    real = store_mod.Store._check_and_migrate

    def boom(self, conn):
        real(self, conn)
        assert not os.path.exists(db)  # still being built under another name
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(store_mod.Store, "_check_and_migrate", boom)
    with pytest.raises(StoreOpenError) as e:
        Store(db).open()
    assert "cannot create it" in str(e.value)
    assert not os.path.exists(db)
    assert [n for n in os.listdir(os.path.dirname(db)) if ".new-" in n] == []
    monkeypatch.setattr(store_mod.Store, "_check_and_migrate", real)
    s = Store(db)
    assert s.open().jobs == []
    s.close()
    assert Path(db).stat().st_size > 0


@pytest.mark.parametrize("mode,pragma", [("full", 2), ("normal", 1), ("off", 0)])
def test_synchronous_setting_is_applied(db: str, mode: str, pragma: int) -> None:
    s = Store(db, synchronous=mode)
    s.open()
    try:
        assert s._conn.execute("PRAGMA synchronous").fetchone()[0] == pragma
    finally:
        s.close()


@pytest.mark.parametrize("mode", ["full", "normal", "off"])
def test_only_acknowledging_batches_wait_for_an_fsync(db: str, mode: str) -> None:
    """Under ``full``, a batch of facts only (start, done, fail, requeue) commits with
    synchronous NORMAL (no fsync of its own); a batch that acknowledges anything (an
    insert, the id reservation, a cancel, an operator command) with FULL. ``normal`` and
    ``off`` are kept as configured for every batch."""
    s = Store(db, synchronous=mode, hostname="testhost")
    s.open()
    pragma = {"full": 2, "normal": 1, "off": 0}

    def level_after(ops: list[tuple]) -> int:
        assert s._write_batch(ops) == []
        return s._conn.execute("PRAGMA synchronous").fetchone()[0]

    try:
        facts = 1 if mode == "full" else pragma[mode]
        assert level_after([insert_op(1, token=Token())]) == pragma[mode]
        assert level_after([("start", 1, 1, "w", 1_700_000_001.0)]) == facts
        assert level_after([("done", 1, 1_700_000_002.0, 2)]) == facts
        assert level_after([insert_op(2, token=Token()), ("start", 2, 1, "w", 1.0)]) == pragma[mode]
        assert level_after([("requeue", 2, 1, 3, "test")]) == facts
        assert level_after([("reserve_ids", 10_000)]) == pragma[mode]
        assert level_after([("fail", 2, 1_700_000_003.0, "test")]) == facts
        assert level_after([("cancel", 1, 1_700_000_004.0)]) == pragma[mode]
    finally:
        s.close()
    assert rows(db)[2].state == "failed"


def test_bad_synchronous_value_is_refused(db: str) -> None:
    with pytest.raises(ValueError, match="synchronous"):
        Store(db, synchronous="sometimes")


def test_the_log_is_presized_and_its_zeros_are_never_replayed(db: str, tmp_path: Path) -> None:
    """start() gives the write-ahead log its working size (so commits after a start do not
    journal a growing file); a copy of the files taken while the store runs (what kill -9
    leaves) recovers exactly the committed jobs, and the zeros are not taken for damage."""
    from atomnode.queue.walcheck import check_wal_file

    s, _, res = opened(db)
    try:
        conn = sqlite3.connect(db)
        frames, page = (conn.execute(f"PRAGMA {p}").fetchone()[0]
                        for p in ("wal_autocheckpoint", "page_size"))
        conn.close()
        assert os.path.getsize(db + "-wal") >= 32 + (frames + 64) * (page + 24)
        tokens = [Token(str(i)) for i in range(1, 6)]
        s.submit_many([insert_op(i, token=t) for i, t in enumerate(tokens, 1)])
        res.wait_for(*tokens)
        assert res.committed == tokens
        crashed = tmp_path / "crashed"
        crashed.mkdir()
        for suffix in ("", "-wal"):
            with open(db + suffix, "rb") as src, open(crashed / ("q.db" + suffix), "wb") as dst:
                dst.write(src.read())
    finally:
        s.close()
    scan = check_wal_file(str(crashed / "q.db-wal"))
    assert scan is not None and scan.replayed > 0 and not scan.damaged
    assert os.path.getsize(crashed / "q.db-wal") >= 32 + (frames + 64) * (page + 24)
    s2 = Store(str(crashed / "q.db"), hostname="testhost")
    try:
        rec = s2.open()
        assert sorted(r[0] for r in rec.rows) == [1, 2, 3, 4, 5]
    finally:
        s2.close()


def test_reopen_keeps_jobs(db: str) -> None:
    commit(db, [insert_op(1, data=b"a\0b", unique=b"u1"), insert_op(2, when=1_900_000_000)])
    s = Store(db)
    rec = s.open()
    s.close()
    assert [(j.id, j.data, j.unique, j.when_to_run, j.state) for j in rec.jobs] == [
        (1, b"a\0b", b"u1", 0, "queued"),
        (2, b"{}", b"", 1_900_000_000, "queued"),
    ]
    assert rec.jobs[0].function == FN and rec.jobs[0].submitted_at == 1_700_000_001.0


def test_text_values_are_recovered_as_bytes(db: str) -> None:
    """A hand-edited or foreign row may hold TEXT where atomnode writes BLOBs (the columns
    have no type affinity). Recovery hands the broker bytes whatever SQLite stored, so the
    compiled broker, which checks its types, restores the job instead of failing the start."""
    from atomnode.gearman.broker import Broker

    commit(db, [insert_op(1, data=b"kept")])
    con = sqlite3.connect(db)
    con.execute(
        "INSERT INTO jobs (id, function, unique_key, data, priority, seq, state, attempts,"
        " submitted_at) VALUES (2, ?, 'u-2', 'payload', 1, 2, 'queued', 0, 0)",
        (FN.decode(),),
    )
    con.commit()
    con.close()
    s = Store(db)
    rec = s.open()
    s.close()
    assert [row[1:4] for row in rec.rows] == [(FN, b"", b"kept"), (FN, b"u-2", b"payload")]
    broker = Broker(hostname="test", durable=True, clock=lambda: 1000.0)
    assert broker.restore_rows(rec.rows) == 2


def test_migration_from_version_1(db: str) -> None:
    os.makedirs(os.path.dirname(db))
    con = sqlite3.connect(db)
    migrate_step(con, 1)
    con.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    con.execute("PRAGMA user_version = 1")
    con.execute(
        "INSERT INTO jobs (id, function, unique_key, data, priority, seq, state, submitted_at)"
        " VALUES (7, ?, x'', x'01', 0, 3, 'queued', 1.0)",
        (FN,),
    )
    con.commit()
    con.close()
    s = Store(db)
    rec = s.open()
    s.close()
    assert [(j.id, j.seq) for j in rec.jobs] == [(7, 3)]
    assert rec.next_id == 8 and rec.next_seq == 4
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert con.execute(
        "SELECT count(*) FROM sqlite_master WHERE name = 'jobs_finished'"
    ).fetchone()[0] == 1


def test_newer_schema_version_is_refused(tmp_path: Path) -> None:
    db = str(tmp_path / "new.db")
    s = Store(db)
    s.open()
    s.close()
    con = sqlite3.connect(db)
    # What a newer atomnode left: a migrated schema and a queue.
    con.executemany(
        "INSERT INTO jobs (id, function, unique_key, data, priority, seq, state, attempts,"
        " submitted_at) VALUES (?, 'f', '', 'x', 1, ?, 'queued', 0, 0)",
        [(i, i) for i in range(1, 4)],
    )
    con.execute("CREATE TABLE from_the_future (x)")
    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    con.commit()
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    before = Path(db).read_bytes()
    with pytest.raises(StoreOpenError, match="newer atomnode") as exc:
        Store(db).open()
    message = str(exc.value)
    assert db in message
    assert f"schema version {SCHEMA_VERSION + 1}" in message
    assert f"knows up to {SCHEMA_VERSION}" in message
    assert "downgraded" in message and "the queue is untouched" in message
    # Refused before anything was written: the file and its queue are as they were.
    assert Path(db).read_bytes() == before
    con = sqlite3.connect(db)
    assert con.execute("SELECT count(*) FROM jobs WHERE state = 'queued'").fetchone()[0] == 3
    con.close()


def test_foreign_sqlite_database_is_refused_and_untouched(tmp_path: Path) -> None:
    db = str(tmp_path / "other.db")
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE gearman_queue (unique_key TEXT, data BLOB)")
    con.commit()
    con.close()
    before = Path(db).read_bytes()
    with pytest.raises(StoreOpenError, match="not an atomnode database") as exc:
        Store(db).open()
    assert db in str(exc.value) and "gearman_queue" in str(exc.value)
    assert Path(db).read_bytes() == before


def test_garbage_file_is_refused(tmp_path: Path) -> None:
    db = str(tmp_path / "garbage.db")
    Path(db).write_bytes(os.urandom(8192))
    with pytest.raises(StoreOpenError, match="not an SQLite database") as exc:
        Store(db).open()
    assert db in str(exc.value)


def test_damaged_sqlite_file_is_refused(tmp_path: Path) -> None:
    db = str(tmp_path / "damaged.db")
    commit(db, [insert_op(i, data=os.urandom(300)) for i in range(1, 400)])
    size = os.path.getsize(db)
    assert size > 8 * 4096
    with open(db, "r+b") as f:  # keep the header page, trash the b-tree pages after it
        f.seek(4096)
        f.write(b"\xff" * (size - 4096))
    with pytest.raises(StoreOpenError, match="corrupt") as exc:
        Store(db).open()
    assert db in str(exc.value)
    assert not Store.is_locked(db)  # a refused open releases the lock


def test_second_opener_is_refused_while_locked(db: str) -> None:
    first = Store(db)
    first.open()
    try:
        assert Store.is_locked(db)
        with pytest.raises(StoreOpenError, match="in use by another atomnode") as exc:
            Store(db).open()
        assert db in str(exc.value) and f"pid {os.getpid()}" in str(exc.value)
    finally:
        first.close()
    assert not Store.is_locked(db)
    again = Store(db)
    again.open()
    again.close()


def test_is_locked_on_missing_database(tmp_path: Path) -> None:
    assert Store.is_locked(str(tmp_path / "nothing.db")) is False


def test_unwritable_location_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    db = str(blocker / "sub" / "atomnode.db")  # a directory that cannot exist
    with pytest.raises(StoreOpenError) as exc:
        Store(db).open()
    assert db in str(exc.value)


# -- writer: group commit and ops ---------------------------------------------------------


def test_group_commit_many_inserts_one_batch(db: str) -> None:
    s = Store(db)
    s.open()
    res = Results()
    tokens = [Token(str(i)) for i in range(1, 1001)]
    s.submit_many([insert_op(i, token=t) for i, t in enumerate(tokens, 1)])
    assert s.pending == 1000
    s.start(res)  # everything is pending when the writer first wakes
    res.wait_for(*tokens)
    assert len(res.calls) == 1 and res.calls[0] == (tokens, [])
    assert s.pending == 0 and s.healthy and s.last_error is None
    s.close()
    assert len(rows(db)) == 1000


def test_every_state_transition_is_stored(db: str) -> None:
    s, _, res = opened(db, retention_days=0)
    try:
        s.submit_many([insert_op(i) for i in range(1, 6)])
        s.submit_many([
            ("start", 1, 1, "pid_11_a", 10.0), ("done", 1, 11.0, 42),
            ("start", 2, 1, "pid_12_b", 12.0), ("requeue", 2, 1, 99, "worker died"),
            ("start", 3, 5, "pid_13_c", 13.0), ("fail", 3, 14.0, "attempts exhausted"),
            ("cancel", 4, 15.0),
            ("reserve_ids", 50),
        ])  # fmt: skip
    finally:
        s.close()
    r = rows(db)
    assert (r[1].state, r[1].attempts, r[1].worker, r[1].started_at, r[1].finished_at,
            r[1].result_size) == ("done", 1, "pid_11_a", 10.0, 11.0, 42)  # fmt: skip
    assert (r[2].state, r[2].attempts, r[2].seq, r[2].reason, r[2].worker) == (
        "queued", 1, 99, "worker died", None)
    assert (r[3].state, r[3].attempts, r[3].finished_at, r[3].reason) == (
        "failed", 5, 14.0, "attempts exhausted")
    assert (r[4].state, r[4].finished_at) == ("cancelled", 15.0)
    assert r[5].state == "queued"
    s = Store(db)
    rec = s.open()
    s.close()
    assert [j.id for j in rec.jobs] == [5, 2] and rec.next_id == 50 and rec.next_seq == 100


def test_a_start_and_done_in_one_batch_are_one_update(db: str) -> None:
    """When batches grow (workers outrun the disk), a job's START and DONE in one batch
    are written as one UPDATE; anything else about the job in between keeps them apart,
    and the rows end as if each op had been applied in turn."""
    ops = [
        ("start", 1, 1, "w1", 10.0), ("start", 2, 1, "w2", 11.0), ("done", 1, 12.0, 7),
        ("requeue", 2, 1, 50, "worker died"), ("start", 2, 2, "w3", 13.0),
        ("done", 2, 14.0, 8), ("done", 3, 15.0, 9), ("start", 4, 1, "w4", 16.0),
        ("start", 5, 1, "w5", 17.0), ("cancel", 5, 18.0), ("done", 5, 19.0, 0),
    ]
    merged = store_mod._merge_start_done(ops)
    assert [op[0] for op in merged] == [
        "start+done", "start", "requeue", "start+done", "done", "start", "start", "cancel",
        "done"]
    assert merged[0] == ("start+done", 1, 1, "w1", 10.0, 12.0, 7)
    assert merged[3] == ("start+done", 2, 2, "w3", 13.0, 14.0, 8)
    commit(db, [insert_op(i) for i in range(1, 6)] + [("start", 3, 1, "w0", 9.0)])
    commit(db, ops)
    r = rows(db)
    got = {i: (r[i].state, r[i].attempts, r[i].worker, r[i].started_at, r[i].finished_at,
               r[i].result_size, r[i].seq) for i in r}
    assert got == {
        1: ("done", 1, "w1", 10.0, 12.0, 7, 1),
        2: ("done", 2, "w3", 13.0, 14.0, 8, 50),
        3: ("done", 1, "w0", 9.0, 15.0, 9, 3),
        4: ("running", 1, "w4", 16.0, None, None, 4),
        5: ("done", 1, "w5", 17.0, 19.0, 0, 5),
    }


def test_recovery_order_priority_then_seq_and_running_kept(db: str) -> None:
    commit(db, [
        insert_op(1, priority=2, seq=1), insert_op(2, priority=1, seq=2),
        insert_op(3, priority=0, seq=3), insert_op(4, priority=1, seq=4),
        insert_op(5, priority=0, seq=5), insert_op(6, priority=2, seq=6),
        ("start", 4, 1, "w", 20.0),
        ("start", 6, 3, "w", 21.0), ("requeue", 6, 3, 7, "timeout"),
    ])  # fmt: skip
    s = Store(db)
    rec = s.open()
    s.close()
    assert [(j.id, j.priority) for j in rec.jobs] == [(3, 0), (5, 0), (2, 1), (4, 1), (1, 2),
                                                      (6, 2)]
    running = [j for j in rec.jobs if j.state == "running"]
    assert [(j.id, j.attempts) for j in running] == [(4, 1)]
    # The rows the daemon takes: seq order (queue order within each priority), small
    # numbers packed (priority | running << 2 | attempts << 3 | when_to_run << 23).
    assert [(r[0], r[4], r[6]) for r in rec.rows] == [
        (1, 1, 2), (2, 2, 1), (3, 3, 0), (4, 4, 1 | 4 | 1 << 3), (5, 5, 0), (6, 7, 2 | 3 << 3)]
    assert rec.next_seq == 8


def test_handle_high_water_persists_and_covers_inserted_ids(db: str) -> None:
    commit(db, [("reserve_ids", 1000), ("reserve_ids", 500)])
    s = Store(db)
    assert s.open().next_id == 1000
    s.close()
    commit(db, [insert_op(5000)])
    s = Store(db)
    assert s.open().next_id == 5001
    s.close()


def test_same_unique_is_stored_twice(db: str) -> None:
    commit(db, [insert_op(1, unique=b"same", data=b"1"), insert_op(2, unique=b"same", data=b"2")])
    assert [(j.unique, j.data) for j in rows(db).values()] == [(b"same", b"1"), (b"same", b"2")]


def test_retry_token_gets_the_row_and_refusals_are_reported(db: str) -> None:
    s, _, res = opened(db)
    try:
        s.submit_many([insert_op(1), insert_op(2), ("start", 1, 5, "w", 3.0),
                       ("fail", 1, 4.0, "worker died 5 times")])
        ok, queued, missing = Token("ok"), Token("queued"), Token("missing")
        s.submit_many([("retry", 1, 77, ok), ("retry", 2, 78, queued), ("retry", 9, 79, missing)])
        res.wait_for(ok, queued, missing)
    finally:
        s.close()
    assert ok in res.committed
    job = ok.job
    assert (job.id, job.state, job.attempts, job.seq, job.reason, job.finished_at) == (
        1, "queued", 0, 77, None, None)
    assert "H:testhost:2 is queued" in res.message_for(queued)
    assert "H:testhost:9 does not exist" in res.message_for(missing)
    assert not hasattr(queued, "job")
    s = Store(db)
    assert s.open().next_seq == 78  # the retried job's seq counts for the next start
    s.close()


def test_purge_token_counts_only_old_finished_jobs(db: str) -> None:
    now = time.time()
    commit(db, [insert_op(i) for i in range(1, 6)] + [
        ("done", 1, now - 10 * 86400, 1), ("fail", 2, now - 9 * 86400, "x"),
        ("cancel", 3, now - 60, ), ("done", 4, now - 8 * 86400, 1),
    ])  # fmt: skip
    s, _, res = opened(db, retention_days=0)
    try:
        t = Token("purge")
        s.submit(("purge", 7 * 86400, t))
        res.wait_for(t)
    finally:
        s.close()
    assert t.count == 3
    assert sorted(rows(db)) == [3, 5]


def test_history_is_pruned_in_small_chunks(db: str) -> None:
    old = time.time() - 30 * 86400
    commit(db, [insert_op(i) for i in range(1, 31)] + [("done", i, old, 0) for i in range(1, 26)]
           + [("done", 26, time.time(), 0)])
    s = Store(db, retention_days=7)
    s.prune_chunk = 10
    s.prune_catchup_interval = 3600  # one chunk per test run
    s.open()
    s.start(Results())
    s.close()
    left = rows(db)
    assert len([j for j in left.values() if j.finished_at == old]) == 15
    assert {26, 27, 28, 29, 30} <= set(left)


def test_zero_retention_keeps_history(db: str) -> None:
    commit(db, [insert_op(1), ("done", 1, 1.0, 0)])
    s = Store(db, retention_days=0)
    s.open()
    s.start(Results())
    s.close()
    assert list(rows(db)) == [1]


def test_close_without_start_flushes_submitted_ops(db: str) -> None:
    s = Store(db)
    s.open()
    s.submit(insert_op(1))
    s.close()
    assert list(rows(db)) == [1]


def test_unknown_op_kind_does_not_poison_the_queue(db: str) -> None:
    s, _, res = opened(db)
    t = Token()
    try:
        s.submit(("frobnicate", 1))
        s.submit(insert_op(1, token=t))
        res.wait_for(t)
    finally:
        s.close()
    assert t in res.committed


def test_progress_and_pending_are_reported(db: str) -> None:
    s, _, res = opened(db)
    try:
        before = s.last_progress
        t = Token()
        s.submit(insert_op(1, token=t))
        res.wait_for(t)
        assert s.pending == 0 and s.last_progress >= before
    finally:
        s.close()


def test_parse_handle() -> None:
    assert parse_handle("H:host.example:123") == 123
    assert parse_handle("45") == 45
    for bad in ("H:host:", "abc", "H:x:1a", ""):
        with pytest.raises(ValueError):
            parse_handle(bad)


# -- faults ---------------------------------------------------------------------------------


def test_locked_database_fails_inserts_keeps_facts_and_recovers(db: str) -> None:
    commit(db, [insert_op(1)])
    s = Store(db)
    s.busy_timeout_ms = 20
    s.backoff_initial = 0.01
    s.open()
    res = Results()
    s.start(res)
    rogue = sqlite3.connect(db, isolation_level=None)
    try:
        rogue.execute("BEGIN IMMEDIATE")  # another process holding the write lock
        bad = Token("bad")
        s.submit(("start", 1, 1, "w", 5.0))
        s.submit(insert_op(2, token=bad))
        res.wait_for(bad)
        msg = res.message_for(bad)
        assert msg and "locked" in msg and db in msg and "\n" not in msg
        assert not s.healthy and s.last_error == msg
        rogue.execute("ROLLBACK")
        good = Token("good")
        s.submit(insert_op(3, token=good))
        res.wait_for(good)
        assert good in res.committed and s.healthy and s.last_error is None
    finally:
        rogue.close()
        s.close()
    r = rows(db)
    assert sorted(r) == [1, 3]
    assert (r[1].state, r[1].worker) == ("running", "w")  # the kept fact was written


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir()
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                           capture_output=True)  # fmt: skip
    except FileNotFoundError:
        return False
    return r.returncode == 0


def test_disk_full_on_tmpfs(tmp_path: Path) -> None:
    mnt = tmp_path / "small"
    if not _mount_tmpfs(mnt, "4m"):
        pytest.skip("cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN)")
    db = str(mnt / "atomnode.db")
    s = None
    try:
        s = Store(db)
        s.backoff_initial = 0.01
        s.open()
        res = Results()
        s.start(res)
        first = [Token(f"a{i}") for i in range(20)]
        s.submit_many([insert_op(i + 1, data=b"x" * 1000, token=t) for i, t in enumerate(first)])
        res.wait_for(*first)
        assert all(t in res.committed for t in first)
        filler = mnt / "filler"
        with open(filler, "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        full = Token("full")
        s.submit(insert_op(100, data=os.urandom(512 * 1024), token=full))
        res.wait_for(full)
        msg = res.message_for(full)
        assert msg and "disk full" in msg and db in msg
        assert not s.healthy
        filler.unlink()
        back = Token("back")
        s.submit(insert_op(101, data=b"y" * 1000, token=back))
        res.wait_for(back)
        assert back in res.committed and s.healthy
        s.close()
        s = None
        again = Store(db)
        rec = again.open()
        again.close()
        assert [j.id for j in rec.jobs] == list(range(1, 21)) + [101]
    finally:
        if s is not None:
            s.close()
        subprocess.run(["umount", "-l", str(mnt)], check=False)


FSIZE_SCRIPT = textwrap.dedent(r"""
    import json, os, resource, signal, sys, threading
    from atomnode.queue.store import Store

    db = sys.argv[1]
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
    out = {}
    s = Store(db)
    s.backoff_initial = 0.01
    s.open()
    cond = threading.Condition()
    seen = {}
    def cb(committed, failed):
        with cond:
            for t in committed:
                seen[t] = None
            for t, m in failed:
                seen[t] = m
            cond.notify_all()
    def put(token, job_id, size):
        s.submit(("insert", job_id, b"f", b"", b"z" * size, 1, 0, job_id, 1.0, token))
        with cond:
            assert cond.wait_for(lambda: token in seen, 10)
        return seen[token]
    s.start(cb)
    out["before"] = put("a", 1, 100)
    biggest = max(os.path.getsize(p) for p in (db, db + "-wal") if os.path.exists(p))
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (biggest + 8192, hard))
    # Larger than the write-ahead log start() pre-sized, so that the log must grow.
    out["full"] = put("b", 2, 8 << 20)
    out["healthy_when_full"] = s.healthy
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    out["after"] = put("c", 3, 100)
    out["healthy_after"] = s.healthy
    s.close()
    s = Store(db)
    out["recovered"] = [j.id for j in s.open().jobs]
    s.close()
    print(json.dumps(out))
""")


def test_file_size_limit_fails_inserts_then_recovers(tmp_path: Path) -> None:
    db = str(tmp_path / "atomnode.db")
    proc = subprocess.run([sys.executable, "-c", FSIZE_SCRIPT, db], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["before"] is None and out["after"] is None
    assert out["full"] and db in out["full"]
    assert out["healthy_when_full"] is False and out["healthy_after"] is True
    assert out["recovered"] == [1, 3]


def test_read_only_database_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "ro"
    db = str(d / "atomnode.db")
    commit(db, [insert_op(1)])
    if os.geteuid() != 0:
        os.chmod(db, 0o444)
        os.chmod(d, 0o555)
        undo = lambda: (os.chmod(d, 0o755), os.chmod(db, 0o644))  # noqa: E731
    else:
        r = subprocess.run(["mount", "--bind", "-o", "ro", str(d), str(d)], capture_output=True)
        if r.returncode != 0:
            pytest.skip("root cannot be denied writes without a read-only mount here")
        undo = lambda: subprocess.run(["umount", str(d)], check=False)  # noqa: E731
    try:
        with pytest.raises(StoreOpenError, match="read-only|Read-only|readonly") as exc:
            Store(db).open()
        assert db in str(exc.value)
    finally:
        undo()


# -- values that cannot be stored, a database that moves -----------------------------------


def test_one_bad_value_fails_only_its_own_op(db: str) -> None:
    """An integer SQLite cannot hold (the broker refuses it first; this is the store's own
    guard) fails its insert alone; the other inserts of the batch commit at once, and the
    writer stays healthy (no backoff)."""
    s, _, res = opened(db, retention_days=0)
    good = [Token(f"g{i}") for i in range(5)]
    bad = Token("bad")
    ops = [insert_op(i + 1, token=good[i]) for i in range(2)]
    ops.append(insert_op(3, when=2**63, token=bad))
    ops += [insert_op(i + 4, token=good[i + 2]) for i in range(3)]
    s.submit_many(ops + [("start", 1, 1, "w", 1.0), ("done", 1, 2.0, 0)])
    res.wait_for(*good, bad)
    s.close()
    assert [t for t in res.committed if t in good] == good
    message = res.message_for(bad)
    assert message is not None and "cannot be stored" in message and db in message
    assert s.healthy and s.last_error is None
    stored = rows(db)
    assert sorted(stored) == [1, 2, 4, 5, 6]
    assert stored[1].state == "done"


def test_deleted_database_is_rebuilt_at_its_path(db: str, caplog) -> None:
    """rm of the open database: noticed at the next batch, logged at ERROR, rebuilt from
    the open copy (every job and the history) at the configured path."""
    s, _, res = opened(db, retention_days=0)
    toks = [Token(str(i)) for i in range(200)]
    s.submit_many([insert_op(i + 1, token=toks[i]) for i in range(200)])
    res.wait_for(*toks)
    s.submit_many([("start", 1, 1, "w", 1.0), ("done", 1, 2.0, 0)])
    os.unlink(db)
    more = Token("after")
    s.submit(insert_op(201, token=more))
    res.wait_for(more)
    assert more in res.committed
    assert s.healthy and s.incident is not None and "deleted or renamed" in s.incident
    assert any(r.levelname == "ERROR" and "a restart would find the queue missing"
               in r.getMessage() for r in caplog.records)
    s.close()
    again = Store(db)
    rec = again.open()
    again.close()
    assert len(rec.jobs) == 200  # 201 inserted, job 1 done
    assert rows(db)[1].state == "done"


def test_renamed_and_replaced_database_is_rebuilt_and_the_other_file_kept(db: str) -> None:
    s, _, res = opened(db, retention_days=0)
    toks = [Token(str(i)) for i in range(20)]
    s.submit_many([insert_op(i + 1, token=toks[i]) for i in range(20)])
    res.wait_for(*toks)
    os.rename(db, db + ".old")
    Path(db).write_bytes(b"someone else's file")
    t = Token("x")
    s.submit(insert_op(21, token=t))
    res.wait_for(t)
    assert t in res.committed
    assert s.incident is not None and ".replaced-" in s.incident
    kept = [n for n in os.listdir(os.path.dirname(db)) if ".replaced-" in n]
    assert len(kept) == 1
    assert Path(os.path.dirname(db), kept[0]).read_bytes() == b"someone else's file"
    s.close()
    again = Store(db)
    assert len(again.open().jobs) == 21
    again.close()


def test_database_that_cannot_be_rebuilt_refuses_jobs_until_it_can(tmp_path: Path) -> None:
    """The directory itself is gone and a file took its name: inserts are refused with the
    fault named (the writer is unhealthy), facts are kept; once the name is free the
    database is rebuilt with everything."""
    d = tmp_path / "state"
    db = str(d / "q.db")
    s, _, res = opened(db, retention_days=0)
    s.backoff_initial = s.backoff_max = 0.05
    toks = [Token(str(i)) for i in range(10)]
    s.submit_many([insert_op(i + 1, token=toks[i]) for i in range(10)])
    res.wait_for(*toks)
    for name in os.listdir(d):
        os.unlink(d / name)
    d.rmdir()
    d.write_text("not a directory")
    refused = Token("refused")
    s.submit_many([("start", 2, 1, "w", 1.0), insert_op(11, token=refused)])
    res.wait_for(refused)
    message = res.message_for(refused)
    assert message is not None and "deleted or renamed" in message and "cannot rebuild" in message
    assert not s.healthy
    d.unlink()
    ok = Token("ok")
    s.submit(insert_op(12, token=ok))
    res.wait_for(ok)
    assert ok in res.committed and s.healthy
    s.close()
    stored = rows(db)
    assert sorted(stored) == [*range(1, 11), 12]
    assert stored[2].state == "running"


def test_schema_step_1_columns_are_as_shipped() -> None:
    # Step 1's table is the statement sqlite-utils wrote for it (SQL_CREATE_JOBS): the
    # same statement, byte for byte, from the same definition today, and the table the
    # first release created (name, type, not null, default, primary key).
    import sqlite_utils

    ref = sqlite3.connect(":memory:")
    sqlite_utils.Database(ref).create_table(
        "jobs",
        {"id": int, "function": bytes, "unique_key": bytes, "data": bytes, "priority": int,
         "when_to_run": int, "seq": int, "state": str, "attempts": int, "worker": str,
         "submitted_at": float, "started_at": float, "finished_at": float,
         "result_size": int, "reason": str},
        pk="id",
        not_null={"function", "unique_key", "data", "priority", "when_to_run", "seq", "state",
                  "attempts", "submitted_at"},
        defaults={"when_to_run": 0, "attempts": 0},
    )
    assert ref.execute("SELECT sql FROM sqlite_master WHERE name = 'jobs'").fetchone()[0] == (
        store_mod.SQL_CREATE_JOBS)
    con = sqlite3.connect(":memory:", isolation_level=None)
    con.execute("BEGIN")
    migrate_step(con, 1)
    assert con.in_transaction  # nothing commits behind the migration's back
    con.execute("ROLLBACK")
    assert con.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
    migrate_step(con, 1)
    assert [r[1:] for r in con.execute("PRAGMA table_info(jobs)")] == [
        ("id", "INTEGER", 0, None, 1), ("function", "BLOB", 1, None, 0),
        ("unique_key", "BLOB", 1, None, 0), ("data", "BLOB", 1, None, 0),
        ("priority", "INTEGER", 1, None, 0), ("when_to_run", "INTEGER", 1, "0", 0),
        ("seq", "INTEGER", 1, None, 0), ("state", "TEXT", 1, None, 0),
        ("attempts", "INTEGER", 1, "0", 0), ("worker", "TEXT", 0, None, 0),
        ("submitted_at", "REAL", 1, None, 0), ("started_at", "REAL", 0, None, 0),
        ("finished_at", "REAL", 0, None, 0), ("result_size", "INTEGER", 0, None, 0),
        ("reason", "TEXT", 0, None, 0),
    ]
    assert con.execute("SELECT sql FROM sqlite_master WHERE name = 'meta'").fetchone()[0] == (
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID")
