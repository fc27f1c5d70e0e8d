"""The store's read API (atomnode.queue.reads.StoreReader) on a real database file."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from atomnode.queue import commands
from atomnode.queue.reads import StoreReader, StoreReadError
from atomnode.queue.store import Store

FN = b"0123456789abcdef0123456789abcdef-arObjectMoveJob"
OTHER = b"0123456789abcdef0123456789abcdef-arFindingAidJob"
T0 = 1_700_000_000.0


@pytest.fixture
def db(tmp_path: Path) -> str:
    """Jobs 1-3 queued (2 high), 4 running, 5-7 done at T0+5..7, 8 failed, 9 cancelled;
    9 is OTHER's, its payload not UTF-8."""
    path = str(tmp_path / "q.db")
    s = Store(path, retention_days=0, hostname="h")
    s.open()
    ops = [commands.insert(i, FN if i < 9 else OTHER, b"u%d" % i, b'{"id":%d}' % i,
                           0 if i == 2 else 1, 0, i, T0 + i, None) for i in range(1, 9)]
    ops.append(commands.insert(9, OTHER, b"", b"\xff\x00", 2, 0, 9, T0 + 9, None))
    ops += [(commands.START, i, 1, "pid_1_w", T0 + 10) for i in (4, 5, 6, 7, 8)]
    ops += [(commands.DONE, i, T0 + i, 3) for i in (5, 6, 7)]
    ops += [(commands.FAIL, 8, T0 + 8, "WORK_FAIL from worker"), commands.cancel(9, T0 + 9.5)]
    s.submit_many(ops)
    s.close()
    return path


def test_list_orders_queue_by_priority_and_history_by_id(db: str) -> None:
    with StoreReader(db, hostname="h") as r:
        assert [j["id"] for j in r.list(state="queued")] == [2, 1, 3]
        assert [j["id"] for j in r.list(limit=3)] == [7, 8, 9]
        assert [j["id"] for j in r.list(limit=0)] == list(range(1, 10))
        assert [j["id"] for j in r.list(function="arFindingAidJob")] == [9]
        job = r.list(state="failed")[0]
        assert job["handle"] == "H:h:8" and job["reason"] == "WORK_FAIL from worker"
        assert job["priority"] == "normal" and "data" not in job
        with pytest.raises(ValueError, match="unknown state"):
            r.list(state="lost")


def test_show_with_payload_text_or_base64(db: str) -> None:
    with StoreReader(db, hostname="h") as r:
        assert r.show(1)["data"] == '{"id":1}'
        assert r.show(9)["data"] is None and r.show(9)["data_base64"] == "/wA="
        assert r.show(99) is None
        assert r.state(9) == "cancelled" and r.state(99) is None


def test_counts_and_failed_count(db: str) -> None:
    with StoreReader(db) as r:
        counts = r.counts()
        assert counts[FN.decode()] == {
            "queued": 3, "running": 1, "done": 3, "failed": 1, "cancelled": 0}
        assert counts[OTHER.decode()]["cancelled"] == 1
        assert r.failed_count() == 1


def test_history_filters_and_pages_newest_first(db: str) -> None:
    with StoreReader(db) as r:
        page = r.history(limit=2)
        assert page["total"] == 5 and [j["id"] for j in page["jobs"]] == [9, 8]
        assert [j["id"] for j in r.history(limit=2, offset=2)["jobs"]] == [7, 6]
        assert [j["id"] for j in r.history(limit=2, offset=4)["jobs"]] == [5]
        assert r.history(state="done")["total"] == 3
        assert [j["id"] for j in r.history(since=T0 + 6, until=T0 + 8)["jobs"]] == [7, 6]
        assert r.history(function="arFindingAidJob")["total"] == 1
        with pytest.raises(ValueError, match="finished jobs only"):
            r.history(state="queued")


def test_export_json_and_csv(db: str) -> None:
    with StoreReader(db, hostname="h") as r:
        out = io.StringIO()
        assert r.export(out, "json", state="done") == 3
        jobs = json.loads(out.getvalue())
        assert [j["id"] for j in jobs] == [5, 6, 7] and jobs[0]["data"] == '{"id":5}'
        out = io.StringIO()
        assert r.export(out, "csv") == 9
        rows = list(csv.DictReader(io.StringIO(out.getvalue())))
        assert len(rows) == 9 and rows[8]["data_base64"] == "/wA=" and rows[0]["state"] == "queued"
        out = io.StringIO()
        assert r.export(out, "json", function="nothing") == 0
        assert json.loads(out.getvalue()) == []
        with pytest.raises(ValueError, match="unknown export format"):
            r.export(io.StringIO(), "xml")


def test_export_pages_through_many_jobs(db: str) -> None:
    with StoreReader(db) as r:
        assert [j["id"] for j in r.iter_jobs(batch=2)] == list(range(1, 10))


def test_reader_is_read_only_and_refuses_other_files(db: str, tmp_path: Path) -> None:
    with StoreReader(db) as r:
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            r.db.execute("DELETE FROM jobs")
    with pytest.raises(StoreReadError, match="no queue database"):
        StoreReader(str(tmp_path / "missing.db"))
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.commit()
    with pytest.raises(StoreReadError, match="not an atomnode queue database"):
        StoreReader(str(other))


def test_reader_does_not_block_the_writer_and_works_from_a_thread(db: str) -> None:
    s = Store(db, retention_days=0)
    s.open()
    done = threading.Event()
    s.start(lambda committed, failed: done.set())
    with StoreReader(db) as r:
        before = r.failed_count()
        s.submit_many([commands.insert(10, FN, b"", b"x", 1, 0, 10, time.time(), "t")])
        assert done.wait(5)  # committed while the reader is open
        counted: list[int] = []
        t = threading.Thread(target=lambda: counted.append(len(r.list(state="queued"))))
        t.start()
        t.join()
        assert before == 1 and counted == [4]
    s.close()


def test_counts_for_some_states_only(db: str) -> None:
    with StoreReader(db) as r:
        assert r.counts(("failed",)) == {FN.decode(): {"failed": 1}}
        assert r.counts(("cancelled", "failed")) == {
            FN.decode(): {"cancelled": 0, "failed": 1},
            OTHER.decode(): {"cancelled": 1, "failed": 0}}


def test_the_daemons_periodic_reads_do_not_import_sqlite_utils(tmp_path):
    """Opening (or creating) a store and the failed counts the daemon reads every few
    seconds stay off sqlite-utils: importing it costs a daemon ~8 MiB of RSS for good."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import sys
        from atomnode.queue.store import Store
        from atomnode.queue.reads import StoreReader
        s = Store({str(tmp_path / "q.db")!r})
        s.open()
        s.close()
        with StoreReader({str(tmp_path / "q.db")!r}) as r:
            assert r.failed_by_function() == {{}}
            assert r.failed_count() == 0
        assert "sqlite_utils" not in sys.modules, "sqlite_utils imported"
        with StoreReader({str(tmp_path / "q.db")!r}) as r:
            r.history()  # the console's reads still use it
        assert "sqlite_utils" in sys.modules
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
