"""Store faults on the real daemon (issue 10, points 1, 2, 5, 6, 7): every case ends with
every acknowledged job kept, or with a refusal that names the file, the fault and the way
forward; one client's bad value never costs another client anything.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from atomnode.gearman.protocol import T
from daemon_harness import Daemon
from test_durability import drain_all


@pytest.fixture(autouse=True)
def _no_stray_daemons(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A test that fails midway must not leave its daemon running: every daemon started
    here is killed at teardown if it still runs."""
    started: list[Daemon] = []
    real_start = Daemon.start

    def start(self: Daemon, *args: object, **kwargs: object) -> Daemon:
        started.append(self)
        return real_start(self, *args, **kwargs)

    monkeypatch.setattr(Daemon, "start", start)
    yield
    for d in started:
        if d.proc is not None and d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait(10)


def wait_for_log(d: Daemon, text: str, timeout: float = 10.0) -> str:
    """The daemon's log once it contains ``text`` (a file written by another process:
    polled, there is no event to wait on)."""
    deadline = time.monotonic() + timeout
    while True:
        log = d.log()
        if text in log:
            return log
        assert time.monotonic() < deadline, f"{text!r} never logged:\n{log}"
        time.sleep(0.05)


def status_doc(d: Daemon) -> dict:
    with d.client() as c:
        return json.loads(c.admin("atomnode-status").split(b"\n")[0])


def doctor(d: Daemon) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "atomnode", "doctor", "--host", "127.0.0.1", "--port",
         str(d.port)],
        capture_output=True, text=True, timeout=60, cwd=d.workdir, env=d.env,
    )
    return out.stdout + out.stderr


# -- 1. the database deleted or renamed while running -------------------------------------


@pytest.mark.parametrize("how", ["rm", "rm-all", "mv"])
def test_database_removed_while_running_keeps_every_job(tmp_path: Path, how: str) -> None:
    """200 jobs acknowledged, then the file is deleted (alone or with its -wal and -shm) or
    renamed: the daemon notices within a second, logs an ERROR, rebuilds the database at
    its path, reports the incident in status, STATUS= and doctor; after kill -9 and a
    restart all 200 jobs (and one submitted after the fault) are there."""
    d = Daemon(tmp_path).start()
    with d.client() as c:
        for i in range(200):
            c.submit_bg(b"keep", f"u{i}".encode(), b"x")
    db = str(d.db)
    if how == "mv":
        os.rename(db, db + ".moved")
    else:
        for suffix in ("", "-wal", "-shm") if how == "rm-all" else ("",):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(db + suffix)
    t0 = time.monotonic()
    log = wait_for_log(d, "rebuilt from the open copy: 200 live jobs")
    assert time.monotonic() - t0 < 3.0  # idle writer checks every second
    assert "ERROR" in log and "a restart would find the queue missing" in log
    assert os.path.getsize(db) > 0
    with d.client() as c:
        c.submit_bg(b"keep", b"after", b"x")
    doc = status_doc(d)
    assert doc["queue"]["store_healthy"] is True
    assert "deleted or renamed" in doc["queue"]["store_incident"]
    report = doctor(d)
    assert "WARN  the queue database had an incident" in report, report
    d.kill9()
    d.start()
    got = drain_all(d, b"keep")
    assert sorted(u for u, _ in got) == sorted([f"u{i}".encode() for i in range(200)]
                                               + [b"after"])
    d.stop()


def test_database_that_cannot_be_rebuilt_is_reported_unhealthy(tmp_path: Path) -> None:
    """The database's directory removed and a file put in its place: the rebuild cannot
    happen, so the store is unhealthy in status and doctor and new jobs are refused with
    the fault named; once the place is free again everything is rebuilt and kept."""
    state = tmp_path / "state"
    state.mkdir()
    d = Daemon(tmp_path, db=state / "q.db").start()
    with d.client() as c:
        for i in range(50):
            c.submit_bg(b"keep", f"u{i}".encode(), b"x")
    shutil.rmtree(state)
    state.write_text("in the way")
    with d.client() as c:
        c.send(T.SUBMIT_JOB_BG, b"keep", b"refused", b"x")
        p = c.expect(T.ERROR)
        assert p.args[0] == b"QUEUE_ERROR" and b"deleted or renamed" in p.args[1], p.args
    doc = status_doc(d)
    assert doc["queue"]["store_healthy"] is False
    assert "cannot rebuild" in doc["queue"]["store_error"]
    assert "FAIL  the queue database is failing" in doctor(d)
    state.unlink()
    wait_for_log(d, "rebuilt from the open copy: 50 live jobs")
    d.kill9()
    d.start()
    assert len(drain_all(d, b"keep")) == 50
    d.stop()


# -- 2. an empty file where a queue used to be ---------------------------------------------


def test_truncated_database_is_refused(tmp_path: Path) -> None:
    d = Daemon(tmp_path).start()
    with d.client() as c:
        c.submit_bg(b"keep", b"u", b"x")
    d.stop()
    os.truncate(d.db, 0)
    rc, log = Daemon(tmp_path, db=d.db).run_to_exit()
    assert rc == 1
    assert f"queue database {d.db} is an empty file (0 bytes)" in log
    assert "Restore it from a backup" in log
    assert os.path.getsize(d.db) == 0


def test_database_deleted_while_stopped_with_its_log_left_is_refused(tmp_path: Path) -> None:
    d = Daemon(tmp_path).start()
    with d.client() as c:
        c.submit_bg(b"keep", b"u", b"x")
    d.kill9()
    wal = Path(f"{d.db}-wal")
    assert wal.stat().st_size > 0
    os.unlink(d.db)
    rc, log = Daemon(tmp_path, db=d.db).run_to_exit()
    assert rc == 1
    assert f"queue database {d.db} does not exist, but its write-ahead log {wal} does" in log
    assert not d.db.exists()


def test_missing_database_is_a_new_install(tmp_path: Path) -> None:
    db = tmp_path / "new" / "q.db"
    d = Daemon(tmp_path, db=db).start()
    assert db.stat().st_size > 0
    assert sorted(p.name for p in db.parent.iterdir() if ".new-" in p.name) == []
    d.stop()


# -- 5. values that cannot be stored ------------------------------------------------------


def test_bad_epoch_costs_only_its_own_submission(tmp_path: Path) -> None:
    """4 clients submit flat out while a fifth sends SUBMIT_JOB_EPOCH with times SQLite
    cannot hold (2^63, 10^30, negative, garbage): each bad packet gets its own ERROR naming
    the range; every innocent submission is acknowledged, none gets QUEUE_ERROR."""
    d = Daemon(tmp_path).start()
    per_client = 500
    errors: list[tuple] = []
    acked = [0]
    lock = threading.Lock()

    def innocent(k: int) -> None:
        with d.client() as c:
            for i in range(per_client):
                c.send(T.SUBMIT_JOB_BG, b"innocent", f"c{k}-{i}".encode(), b"x")
            for _ in range(per_client):
                p = c.expect(T.JOB_CREATED, T.ERROR)
                with lock:
                    if p.type == T.ERROR:
                        errors.append(p.args)
                    else:
                        acked[0] += 1

    threads = [threading.Thread(target=innocent, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    bad_values = [str(2**63).encode(), b"1" + b"0" * 30, b"-5", b"soon", b"9" * 400]
    with d.client() as c:
        for n in range(200):
            c.send(T.SUBMIT_JOB_EPOCH, b"innocent", f"bad{n}".encode(),
                   bad_values[n % len(bad_values)], b"x")
            p = c.expect(T.ERROR)
            assert p.args[0] == b"INVALID_PACKET"
            assert b"SUBMIT_JOB_EPOCH needs a unix time from 0 to 253402300799" in p.args[1]
        c.send(T.ECHO_REQ, b"alive")
        assert c.expect(T.ECHO_RES).args[0] == b"alive"
    for t in threads:
        t.join(60)
    assert errors == []
    assert acked[0] == 4 * per_client
    assert status_doc(d)["queue"]["store_healthy"] is True
    assert "write failed" not in d.log()
    d.stop()


# -- 6. bad values from a worker ----------------------------------------------------------


def test_bad_can_do_timeout_is_refused_at_the_packet(tmp_path: Path) -> None:
    """CAN_DO_TIMEOUT of 2^63 (or negative, or garbage) gets an ERROR and registers
    nothing; the job is never handed to that worker, never has an attempt counted, and runs
    once on a good worker."""
    d = Daemon(tmp_path).start()
    with d.client() as c:
        c.submit_bg(b"timed", b"j1", b"x")
    with d.worker() as w:
        for value in (str(2**63).encode(), b"-1", b"1e9", b"9" * 400):
            w.send(T.CAN_DO_TIMEOUT, b"timed", value)
            p = w.expect(T.ERROR)
            assert p.args[0] == b"INVALID_PACKET"
            assert b"from 0 to 2147483647" in p.args[1]
        for _ in range(6):
            w.send(T.GRAB_JOB_UNIQ)
            assert w.expect(T.NO_JOB, T.JOB_ASSIGN_UNIQ).type == T.NO_JOB
        with d.client() as c:
            jobs = c.admin("show jobs")
        assert jobs.count(b"\t0\t0\t1\n") == 1  # no attempt counted
        w.send(T.CAN_DO_TIMEOUT, b"timed", b"30")  # a sane value still works
        w.send(T.GRAB_JOB_UNIQ)
        p = w.expect(T.JOB_ASSIGN_UNIQ)
        assert p.args[2] == b"j1"
        w.complete(p.args[0])
        w.send(T.ECHO_REQ, b"fence")
        w.expect(T.ECHO_RES)
    assert "Traceback" not in d.log()
    d.stop()


# -- 7. no disk access on the event loop ---------------------------------------------------


@contextlib.contextmanager
def frozen_filesystem(tmp_path: Path) -> Iterator[tuple[Path, Callable, Callable]]:
    """A loop-mounted ext4 at tmp_path/mnt and functions that freeze (fsfreeze) and thaw
    it; always thawed and unmounted afterwards. Needs root and loop devices."""
    if os.geteuid() != 0 or not shutil.which("fsfreeze"):
        pytest.fail("this test needs root and util-linux (fsfreeze, mount)")
    image = tmp_path / "fs.img"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(64 * 1024 * 1024)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    frozen = [False]

    def freeze() -> None:
        subprocess.run(["fsfreeze", "-f", str(mnt)], check=True)
        frozen[0] = True

    def thaw() -> None:
        if frozen[0]:
            subprocess.run(["fsfreeze", "-u", str(mnt)], check=True)
            frozen[0] = False

    try:
        yield mnt, freeze, thaw
    finally:
        thaw()
        for _ in range(50):
            if subprocess.run(["umount", str(mnt)], check=False).returncode == 0:
                break
            time.sleep(0.1)  # the daemon may still be closing its files


def test_status_and_workers_are_served_while_the_disk_is_frozen(tmp_path: Path) -> None:
    """fsfreeze on the database's filesystem: the writer thread blocks on the disk, but
    atomnode-status, status and a worker's GRAB_JOB each answer within 0.5 s (they never
    touch the disk on the event loop)."""
    with frozen_filesystem(tmp_path) as (mnt, freeze, thaw):
        d = Daemon(tmp_path, db=mnt / "q.db").start()
        try:
            with d.client() as c:
                for i in range(20):
                    c.submit_bg(b"frozen", f"u{i}".encode(), b"x")
            freeze()
            with d.client() as c:
                c.send(T.SUBMIT_JOB_BG, b"frozen", b"stuck", b"x")  # the writer blocks
                for _ in range(5):
                    t0 = time.monotonic()
                    doc = json.loads(c.admin("atomnode-status").split(b"\n")[0])
                    assert time.monotonic() - t0 < 0.5
                    assert doc["queue"]["queued"] == 20
                    t0 = time.monotonic()
                    c.admin("status")
                    assert time.monotonic() - t0 < 0.5
                with d.worker(b"frozen") as w:
                    t0 = time.monotonic()
                    p = w.grab(timeout=2)
                    assert p is not None and time.monotonic() - t0 < 0.5
                    w.complete(p.args[0])
        finally:
            thaw()
            d.stop()


# -- 4. a damaged write-ahead log after a crash -------------------------------------------


def _submit_in_commits(d: Daemon, n: int, per_round: int = 100) -> None:
    """``n`` background jobs in rounds of ``per_round`` (each round a few commits)."""
    with d.client() as c:
        for start in range(0, n, per_round):
            for i in range(start, min(start + per_round, n)):
                c.send(T.SUBMIT_JOB_BG, b"walfn", f"u{i}".encode(), b"p" * 200)
            for _ in range(start, min(start + per_round, n)):
                c.expect(T.JOB_CREATED)


def test_damaged_wal_after_a_crash_is_refused_with_a_copy_kept(tmp_path: Path) -> None:
    """5000 jobs acknowledged, kill -9, one bit flipped in an early frame of the log: the
    restart refuses (SQLite alone would have served a fraction of the jobs), names the
    file, the frame and the way forward, and keeps a copy of both files. Following the
    way forward (truncate at the damage) starts with what preceded it."""
    from atomnode.queue.walcheck import check_wal_file

    d = Daemon(tmp_path).start()
    _submit_in_commits(d, 5000)
    d.kill9()
    wal = Path(f"{d.db}-wal")
    scan = check_wal_file(str(wal))
    assert scan is not None and scan.replayed > 8 and not scan.damaged
    bad_frame = scan.replayed // 4
    offset = scan.offset(bad_frame) + 24 + 500
    data = bytearray(wal.read_bytes())
    data[offset] ^= 0x10
    wal.write_bytes(data)
    rc, log = Daemon(tmp_path, db=d.db).run_to_exit()
    assert rc == 1
    assert f"its write-ahead log {wal} is damaged: frame {bad_frame + 1}" in log
    assert "refuses to start" in log and "truncate -s" in log
    kept = [p for p in tmp_path.iterdir() if ".damaged-" in p.name]
    assert len(kept) == 1
    assert (kept[0] / wal.name).read_bytes() == bytes(data)
    assert (kept[0] / d.db.name).stat().st_size == d.db.stat().st_size
    assert wal.read_bytes() == bytes(data)  # untouched: SQLite never opened it
    # The way forward the message gives.
    cmd = log[log.index("truncate -s"):].split("\n")[0].split()
    subprocess.run(cmd, check=True)
    d2 = Daemon(tmp_path, db=d.db).start()
    left = d2.status().get("walfn", (0, 0, 0))[0]
    assert 0 < left < 5000
    d2.stop()


def test_torn_wal_tail_after_a_crash_is_normal(tmp_path: Path) -> None:
    """A log cut in the middle of its last frame (a crash during a write): the restart
    goes ahead and every acknowledged job is there."""
    d = Daemon(tmp_path).start()
    _submit_in_commits(d, 2000)
    d.kill9()
    wal = Path(f"{d.db}-wal")
    with open(wal, "ab") as f:
        f.write(b"\x00" * 1000)  # a frame begun and never finished
    d2 = Daemon(tmp_path, db=d.db).start()
    assert d2.status()["walfn"][0] == 2000
    d2.stop()


# -- 3. a lost write in an index page ------------------------------------------------------


def _pages(db: Path, name: str) -> set[int]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return {r[0] for r in con.execute("SELECT pageno FROM dbstat WHERE name = ?", (name,))}
    finally:
        con.close()


def lose_an_index_write(db: Path, jobs: int = 20000, lost: int = 47) -> None:
    """Build a queue of ``jobs`` live jobs whose jobs_active index misses ``lost`` of them,
    the way a lost write leaves it: those jobs became live in a later transaction, and the
    index page that recorded it is put back to its earlier content (the table's pages keep
    the later one). quick_check still passes; only integrity_check sees it."""
    from atomnode.queue.store import Store

    s = Store(str(db))
    s.open()
    s.close()
    fn = b"0123456789abcdef0123456789abcdef-arObjectMoveJob"
    con = sqlite3.connect(db, isolation_level=None)
    con.execute("BEGIN")
    con.executemany(
        "INSERT INTO jobs (id, function, unique_key, data, priority, when_to_run, seq, "
        "submitted_at, state) VALUES (?, ?, X'', ?, 1, 0, ?, 1.7e9, ?)",
        [(i, fn, b'{"objectId":%d}' % i, i, "queued") for i in range(1, jobs + 1)],
    )
    con.execute("COMMIT")
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    index_pages = _pages(db, "jobs_active")
    page_size = con.execute("PRAGMA page_size").fetchone()[0]
    con.close()
    # Try ranges until one fits in its leaf without a split (deterministic per SQLite).
    for first in range(jobs // 4, jobs, 97):
        ids = (first, first + lost)
        con = sqlite3.connect(db, isolation_level=None)
        con.execute("UPDATE jobs SET state = 'done', finished_at = 1.7e9 "
                    "WHERE id >= ? AND id < ?", ids)
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        con.close()
        before = db.read_bytes()
        con = sqlite3.connect(db, isolation_level=None)
        con.execute("UPDATE jobs SET state = 'queued', finished_at = NULL "
                    "WHERE id >= ? AND id < ?", ids)
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        con.close()
        after = bytearray(db.read_bytes())
        if _pages(db, "jobs_active") != index_pages or len(after) != len(before):
            continue  # the index split: try another place
        changed = [p for p in index_pages
                   if before[(p - 1) * page_size:p * page_size]
                   != after[(p - 1) * page_size:p * page_size]]
        for p in changed:
            after[(p - 1) * page_size:p * page_size] = before[(p - 1) * page_size:p * page_size]
        db.write_bytes(after)
        return
    raise AssertionError("no place found to lose an index write")


def test_lost_index_write_costs_no_job(tmp_path: Path) -> None:
    """The issue's case: quick_check passes and a read through jobs_active returns 19,953
    of 20,000 jobs. The daemon reads the table, notices the index disagrees (ERROR), rebuilds
    it, and serves all 20,000; the incident shows in status and doctor."""
    db = tmp_path / "queue.db"
    lose_an_index_write(db)
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    assert con.execute("PRAGMA quick_check").fetchall() == [("ok",)]
    through_index = con.execute(
        "SELECT count(*) FROM jobs INDEXED BY jobs_active WHERE state IN ('queued', 'running')"
    ).fetchone()[0]
    assert con.execute("PRAGMA integrity_check").fetchall() != [("ok",)]
    con.close()
    assert through_index == 20000 - 47
    d = Daemon(tmp_path, db=db).start()
    assert d.status()["0123456789abcdef0123456789abcdef-arObjectMoveJob"][0] == 20000
    log = d.log()
    assert "ERROR" in log and "the index jobs_active disagrees with the table (it lists " \
        "19953 live jobs, the table holds 20000)" in log
    assert "index jobs_active was damaged" in status_doc(d)["queue"]["store_incident"]
    assert "WARN  the queue database had an incident" in doctor(d)
    d.stop()
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    con.close()


def lose_a_table_write(db: Path, jobs: int = 2000, lost: int = 3) -> list[int]:
    """The other way round: ``lost`` live jobs, added in a later transaction, are in the
    jobs_active index but the table page that recorded them is put back to its earlier
    content, as a lost write leaves it. A read of the table misses them; the index lists
    them. Returns their ids."""
    from atomnode.queue.store import Store

    s = Store(str(db))
    s.open()
    s.close()
    con = sqlite3.connect(db, isolation_level=None)
    row = ("INSERT INTO jobs (id, function, unique_key, data, priority, when_to_run, seq, "
           "submitted_at, state) VALUES (?, 'tfn', '', x'00', 1, 0, ?, 1.7e9, 'queued')")
    con.executemany(row, [(i, i) for i in range(1, jobs + 1)])
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    table_pages = _pages(db, "jobs")
    page_size = con.execute("PRAGMA page_size").fetchone()[0]
    before = db.read_bytes()
    ids = list(range(jobs + 1, jobs + 1 + lost))
    con.executemany(row, [(i, i) for i in ids])  # small rows: they fit in the last leaf
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    assert _pages(db, "jobs") == table_pages, "the table grew a page: no lost write to fake"
    after = bytearray(db.read_bytes())
    for p in table_pages:
        after[(p - 1) * page_size:p * page_size] = before[(p - 1) * page_size:p * page_size]
    db.write_bytes(after)
    return ids


def test_lost_table_write_is_refused_naming_the_jobs(tmp_path: Path) -> None:
    """Live jobs the table lost but its index still lists: serving would drop them without
    a word (quick_check passes), so the start is refused, naming them and the way forward;
    the index is not "repaired" from the table."""
    from atomnode.queue.store import Store, StoreOpenError

    db = tmp_path / "queue.db"
    ids = lose_a_table_write(db)
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    assert con.execute("PRAGMA quick_check").fetchall() == [("ok",)]
    assert con.execute("SELECT count(*) FROM jobs NOT INDEXED").fetchone()[0] == 2000
    con.close()
    with pytest.raises(StoreOpenError) as exc:
        Store(str(db), hostname="h").open()
    msg = str(exc.value)
    assert str(db) in msg and "lists 3 live job(s) that the jobs table does not hold" in msg
    assert ", ".join(f"H:h:{i}" for i in ids) in msg and "REINDEX jobs" in msg
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)  # nothing rewritten
    assert con.execute("SELECT count(*) FROM jobs INDEXED BY jobs_active "
                       "WHERE state IN ('queued', 'running')").fetchone()[0] == 2003
    con.close()


def test_first_start_on_a_new_database_is_not_called_unclean(tmp_path: Path) -> None:
    """A database atomnode has just built was never used: its first open must not be
    reported (nor integrity-checked) as "after an unclean shutdown"."""
    d = Daemon(tmp_path).start()
    with d.client() as c:
        c.submit_bg(b"fresh", b"u", b"x")
    d.stop()
    log = d.log()
    assert "does not exist: creating it" in log
    assert "unclean shutdown" not in log, log


def test_every_start_checks_the_file_structure_in_the_background(tmp_path: Path) -> None:
    """After a clean stop too, the daemon serves first and then runs quick_check (the
    whole file's structure) in a thread: damage it finds (here a page no b-tree uses, which
    recovery cannot see) is reported as it would be after an unclean shutdown."""
    import struct

    d = Daemon(tmp_path).start()
    with d.client() as c:
        c.submit_bg(b"qc", b"u", b"x")
    d.stop()
    con = sqlite3.connect(d.db, isolation_level=None)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    raw = bytearray(Path(d.db).read_bytes())
    page_size = struct.unpack(">H", raw[16:18])[0]
    pages = struct.unpack(">I", raw[28:32])[0]
    raw[28:32] = struct.pack(">I", pages + 1)  # one page more, used by nothing
    Path(d.db).write_bytes(bytes(raw) + bytes(page_size))
    d2 = Daemon(tmp_path, db=d.db).start()
    assert d2.status()["qc"][0] == 1  # served first
    log = wait_for_log(d2, "quick_check found damage")
    assert "never used" in log and "unclean" not in log
    assert status_doc(d2)["queue"]["store_damage"].startswith("quick_check:")
    assert "FAIL  the queue database file is damaged" in doctor(d2)
    d2.stop()


def test_unclean_shutdown_runs_a_full_integrity_check_in_the_background(tmp_path: Path) -> None:
    """After kill -9 the restart serves first and then runs integrity_check in a thread;
    damage it finds (here: a stale index page of the finished-jobs index, which recovery
    does not read) is reported as FAIL in doctor and in status. A clean stop skips it."""
    d = Daemon(tmp_path).start()
    with d.client() as c:
        c.submit_bg(b"ic", b"u", b"x")
    d.stop()
    d2 = Daemon(tmp_path, db=d.db).start()
    d2.kill9()
    assert "integrity check" not in d2.log()
    d3 = Daemon(tmp_path, db=d.db).start()
    wait_for_log(d3, "integrity check passed")
    assert status_doc(d3)["queue"]["store_damage"] is None
    d3.kill9()
    # Damage the finished-jobs index behind SQLite's back: mark its rows as another state.
    con = sqlite3.connect(d.db, isolation_level=None)
    con.execute("PRAGMA writable_schema = ON")
    con.execute("UPDATE sqlite_master SET sql = replace(sql, \"'cancelled')\", "
                "\"'cancelled', 'queued')\") WHERE name = 'jobs_finished'")
    con.close()
    d4 = Daemon(tmp_path, db=d.db).start()
    wait_for_log(d4, "integrity_check found damage")
    assert status_doc(d4)["queue"]["store_damage"].startswith("integrity_check:")
    assert "FAIL  the queue database file is damaged" in doctor(d4)
    d4.stop()
