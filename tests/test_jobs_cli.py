"""`atomnode jobs ...`: reading the queue database, and changes applied directly or sent to
the daemon's admin protocol (a fake admin server here checks the exact lines)."""

from __future__ import annotations

import json
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from atomnode.cli import main
from atomnode.ops.jobs_cli import parse_duration
from atomnode.queue.store import Store

FN = b"0123456789abcdef0123456789abcdef-arObjectMoveJob"
OTHER = b"0123456789abcdef0123456789abcdef-arFindingAidJob"


def build_db(path: str) -> None:
    """Jobs 1..6: 1 queued normal, 2 queued high, 3 running, 4 done (old), 5 failed,
    6 cancelled (old); 7 queued with a NUL in its payload (other function)."""
    s = Store(path, retention_days=0, hostname="h")
    s.open()
    old = time.time() - 30 * 86400
    s.submit_many([
        ("insert", 1, FN, b"u1", b'{"id":1}', 1, 0, 1, old, None),
        ("insert", 2, FN, b"u2", b'{"id":2}', 0, 0, 2, old, None),
        ("insert", 3, FN, b"u3", b'{"id":3}', 1, 0, 3, old, None),
        ("insert", 4, FN, b"u4", b'{"id":4}', 1, 0, 4, old, None),
        ("insert", 5, FN, b"u5", b'{"id":5}', 1, 0, 5, old, None),
        ("insert", 6, FN, b"u6", b'{"id":6}', 2, 0, 6, old, None),
        ("insert", 7, OTHER, b"", b"a\0b", 1, 0, 7, old, None),
        ("start", 3, 1, "pid_42_abc", old + 1),
        ("start", 4, 1, "pid_42_abc", old + 1), ("done", 4, old + 2, 17),
        ("start", 5, 5, "pid_43_def", old + 1), ("fail", 5, time.time(), "worker died 5 times"),
        ("cancel", 6, old + 3),
    ])  # fmt: skip
    s.close()


@pytest.fixture
def db(tmp_path: Path) -> str:
    path = str(tmp_path / "atomnode.db")
    build_db(path)
    return path


def states(path: str) -> dict[int, str]:
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return dict(con.execute("SELECT id, state FROM jobs"))
    finally:
        con.close()


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# -- reading ----------------------------------------------------------------------------------


def test_list_table(db: str, capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run(capsys, "jobs", "list", "--db", db, "--hostname", "h")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["HANDLE", "FUNCTION", "STATE", "PRIORITY", "ATTEMPTS",
                                "SUBMITTED", "FINISHED", "WORKER", "REASON"]
    assert [ln.split()[0] for ln in lines[1:]] == [f"H:h:{i}" for i in range(1, 8)]
    assert "worker died 5 times" in lines[5] and "failed" in lines[5]
    # aligned: every row starts its STATE column at the same offset
    col = lines[0].index("STATE")
    assert {ln[col:].split()[0] for ln in lines[1:]} == {
        "queued", "running", "done", "failed", "cancelled"}


def test_list_filters_and_queue_order(db: str, capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run(capsys, "jobs", "list", "--db", db, "--state", "queued", "--json")
    assert code == 0
    assert [j["id"] for j in json.loads(out)] == [2, 1, 7]  # high first, then FIFO
    _, out, _ = run(capsys, "jobs", "list", "--db", db, "--function", "arFindingAidJob",
                    "--json")  # fmt: skip
    assert [j["id"] for j in json.loads(out)] == [7]
    _, out, _ = run(capsys, "jobs", "list", "--db", db, "--limit", "2", "--json")
    assert [j["id"] for j in json.loads(out)] == [6, 7]  # the most recent two
    _, out, _ = run(capsys, "jobs", "list", "--db", db, "--state", "done", "--json")
    (job,) = json.loads(out)
    assert (job["id"], job["worker"], job["result_size"], job["attempts"]) == (
        4, "pid_42_abc", 17, 1)


def test_export_json_csv_and_file(db: str, tmp_path: Path,
                                  capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    code, out, _ = run(capsys, "jobs", "export", "--db", db, "--hostname", "h")
    assert code == 0
    jobs = json.loads(out)
    assert [j["id"] for j in jobs] == list(range(1, 8))
    assert jobs[0]["handle"] == "H:h:1" and jobs[0]["data"] == '{"id":1}'
    assert jobs[6]["data"] == "a\x00b"
    code, out, _ = run(capsys, "jobs", "export", "--db", db, "--format", "csv", "--state",
                       "failed")  # fmt: skip
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith("handle,id,function,") and len(lines) == 2
    assert ",failed," in lines[1] and "worker died 5 times" in lines[1]
    target = tmp_path / "jobs.json"
    code, out, err = run(capsys, "jobs", "export", "--db", db, "-o", str(target))
    assert code == 0 and out == "" and f"exported 7 jobs to {target}" in err
    assert len(json.loads(target.read_text())) == 7
    code, _, err = run(capsys, "jobs", "export", "--db", db, "-o", str(tmp_path / "no/x"))
    assert code == 1 and "cannot write" in err


def test_list_empty_and_missing_db(tmp_path: Path, db: str,
                                   capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    code, out, _ = run(capsys, "jobs", "list", "--db", db, "--state", "running",
                       "--function", "nothing")  # fmt: skip
    assert code == 0 and "no jobs in state running" in out
    missing = str(tmp_path / "missing.db")
    code, _, err = run(capsys, "jobs", "list", "--db", missing)
    assert code == 1 and missing in err


def test_list_refuses_a_foreign_database(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    other = tmp_path / "other.db"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE t (x)")
    con.commit()
    con.close()
    code, _, err = run(capsys, "jobs", "list", "--db", str(other))
    assert code == 1 and "not an atomnode queue database" in err


def test_show_text_and_json(db: str, capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run(capsys, "jobs", "show", "H:anyhost:7", "--db", db)
    assert code == 0
    assert "arFindingAidJob" in out and "'a\\x00b'" in out  # the NUL is shown escaped
    code, out, _ = run(capsys, "jobs", "show", "5", "--db", db, "--json", "--hostname", "h")
    job = json.loads(out)
    assert (job["handle"], job["state"], job["attempts"], job["reason"], job["data"]) == (
        "H:h:5", "failed", 5, "worker died 5 times", '{"id":5}')


def test_show_unknown_and_bad_handle(db: str, capsys: pytest.CaptureFixture) -> None:
    code, _, err = run(capsys, "jobs", "show", "99", "--db", db)
    assert code == 1 and "no job 99" in err
    code, _, err = run(capsys, "jobs", "show", "H:x:abc", "--db", db)
    assert code == 1 and "not a job handle" in err


def test_reading_works_while_a_daemon_holds_the_db(db: str,
                                                   capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    holder = Store(db)
    holder.open()
    try:
        code, out, _ = run(capsys, "jobs", "list", "--db", db, "--json")
        assert code == 0 and len(json.loads(out)) == 7
    finally:
        holder.close()


# -- changes without a daemon --------------------------------------------------------------


def test_direct_retry(db: str, capsys: pytest.CaptureFixture) -> None:
    code, out, err = run(capsys, "jobs", "retry", "5", "H:h:6", "--db", db)
    assert code == 0, err
    assert "retried" in out
    assert states(db)[5] == "queued" and states(db)[6] == "queued"
    s = Store(db)
    rec = s.open()
    s.close()
    assert [j.id for j in rec.jobs if j.priority == 1][-1] == 5  # back of its priority
    assert next(j for j in rec.jobs if j.id == 5).attempts == 0


def test_direct_retry_refuses_a_queued_job(db: str, capsys: pytest.CaptureFixture) -> None:
    code, _, err = run(capsys, "jobs", "retry", "1", "--db", db)
    assert code == 1 and "is queued" in err
    assert states(db)[1] == "queued"


def test_direct_cancel(db: str, capsys: pytest.CaptureFixture) -> None:
    code, out, err = run(capsys, "jobs", "cancel", "1", "4", "--db", db)
    assert code == 1  # job 4 is done
    assert "cancelled" in out and "H:" in err and "not queued" in err
    assert states(db)[1] == "cancelled" and states(db)[4] == "done"


def test_direct_purge(db: str, capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run(capsys, "jobs", "purge", "--older-than", "7d", "--db", db)
    assert code == 0 and "purged 2 finished jobs" in out  # 4 and 6; 5 failed just now
    assert sorted(states(db)) == [1, 2, 3, 5, 7]


def test_parse_duration() -> None:
    assert parse_duration("7d") == 7 * 86400
    assert parse_duration("12h") == 12 * 3600
    assert parse_duration("30m") == 1800
    assert parse_duration("90") == 90
    assert parse_duration("2w") == 14 * 86400
    with pytest.raises(Exception, match="not a duration"):
        parse_duration("soon")


def test_purge_needs_a_valid_duration(db: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["jobs", "purge", "--older-than", "soon", "--db", db])
    assert exc.value.code == 2
    assert "not a duration" in capsys.readouterr().err


# -- changes through the daemon ------------------------------------------------------------


class FakeAdmin:
    """A one-thread TCP server speaking enough of the admin protocol: records each line and
    answers from ``replies`` (by line) or with ``OK``."""

    def __init__(self, replies: dict[str, str]) -> None:
        self.replies = replies
        self.lines: list[str] = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed by close()
            with conn:
                self._talk(conn)

    def _talk(self, conn: socket.socket) -> None:
        buf = b""
        while True:
            data = conn.recv(4096)
            if not data:
                return
            buf += data
            while b"\n" in buf:
                raw, _, buf = buf.partition(b"\n")
                line = raw.decode().rstrip("\r")
                self.lines.append(line)
                conn.sendall(self.replies.get(line, "OK").encode() + b"\r\n")

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self.sock.close()
        self.thread.join(5)
        assert not self.thread.is_alive()


@pytest.fixture
def held(db: str) -> Iterator[str]:
    """The database locked as a running daemon would hold it."""
    s = Store(db)
    s.open()
    try:
        yield db
    finally:
        s.close()


def config_for(tmp_path: Path, db: str, port: int) -> str:
    cfg = tmp_path / "atomnode.yml"
    cfg.write_text(f"listen: [127.0.0.1:{port}]\ndatabase: {db}\n")
    return str(cfg)


def test_changes_go_through_the_daemon(tmp_path: Path, held: str,
                                       capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    fake = FakeAdmin({
        "atomnode-jobs retry H:h:5": "OK H:h:5",
        "atomnode-jobs retry 1": "ERR JOB_ACTIVE the+job+is+still+queued+or+running",
        "atomnode-jobs purge 604800": "OK 2",
    })  # fmt: skip
    try:
        cfg = config_for(tmp_path, held, fake.port)
        code, out, err = run(capsys, "jobs", "retry", "H:h:5", "1", "--config", cfg)
        assert code == 1
        assert "H:h:5: retried" in out
        assert "1: ERR JOB_ACTIVE the job is still queued or running" in err
        code, out, _ = run(capsys, "jobs", "cancel", "H:h:2", "--config", cfg)
        assert code == 0 and "cancelled" in out
        code, out, _ = run(capsys, "jobs", "purge", "--older-than", "7d", "--config", cfg)
        assert code == 0 and "purged 2 finished jobs" in out
    finally:
        fake.close()
    assert fake.lines == [
        "atomnode-jobs retry H:h:5",
        "atomnode-jobs retry 1",
        "atomnode-jobs cancel H:h:2",
        "atomnode-jobs purge 604800",
    ]
    # the store was not touched by the CLI: the daemon owns the changes
    assert states(held)[5] == "failed" and states(held)[2] == "queued"


def test_each_command_line_sent_to_the_daemon(tmp_path: Path, held: str,
                                              capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    for argv, expected in [
        (["jobs", "cancel", "H:h:2"], "atomnode-jobs cancel H:h:2"),
        (["jobs", "purge", "--older-than", "12h"], "atomnode-jobs purge 43200"),
    ]:
        fake = FakeAdmin({})
        try:
            cfg = config_for(tmp_path, held, fake.port)
            code, _, err = run(capsys, *argv, "--config", cfg)
            assert code == 0, err
        finally:
            fake.close()
        assert fake.lines == [expected]


def test_daemon_holding_the_db_but_unreachable(tmp_path: Path, held: str,
                                               capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    cfg = config_for(tmp_path, held, port)
    code, _, err = run(capsys, "jobs", "retry", "5", "--config", cfg)
    assert code == 1
    assert held in err and f"127.0.0.1:{port}" in err and "does not answer" in err
    assert states(held)[5] == "failed"
