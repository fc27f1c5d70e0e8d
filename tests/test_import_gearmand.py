"""`atomnode import-gearmand-queue` on a queue file written by a real gearmand 1.1.20
(libsqlite3 plugin): order, priorities, payloads with NULs, epoch times; straight into the
store, and through a running atomnode daemon over the Gearman protocol."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from atomnode.cli import main
from atomnode.ops.jobs_cli import read_gearmand_queue
from atomnode.queue.store import Store
from daemon_harness import Daemon, free_port, start_gearmand

GEARMAND = os.environ.get("ATOMNODE_TEST_GEARMAND", "/usr/sbin/gearmand")
GEARMAN = shutil.which("gearman") or "/usr/bin/gearman"

pytestmark = pytest.mark.interop

# (function, priority flag, payload) in submission order
SUBMISSIONS = [
    ("import_a", None, b"normal-1"),
    ("import_a", "-I", b"high-1"),
    ("import_a", "-L", b"low-1"),
    ("import_b", None, b"nul\0inside\0payload"),
    ("import_a", None, b"normal-2"),
    ("import_a", "-I", b"high-2"),
]
PRIO = {None: 1, "-I": 0, "-L": 2}


def kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


@pytest.fixture(scope="module")
def gearmand_queue(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A libsqlite3 queue file written by gearmand 1.1.20, which is then killed -9 so the
    jobs stay in it (as on a site that stops gearmand with jobs pending)."""
    if not os.access(GEARMAND, os.X_OK) or not os.access(GEARMAN, os.X_OK):
        pytest.fail("gearman-job-server and gearman-tools are needed (scripts/sysdeps.sh test)")
    d = tmp_path_factory.mktemp("gearmand")
    qdb = d / "q.db"
    port = free_port()
    proc = start_gearmand(port, "-q", "libsqlite3", f"--libsqlite3-db={qdb}", "-l", "stderr")
    try:
        for function, flag, payload in SUBMISSIONS:
            argv = [GEARMAN, "-h", "127.0.0.1", "-p", str(port), "-f", function, "-b"]
            if flag:
                argv.append(flag)
            # payload on stdin: the only way to get NUL bytes through the gearman tool
            subprocess.run(argv, input=payload, check=True, timeout=10, capture_output=True)
    finally:
        kill(proc)
    # A scheduled job too: gearman(1) cannot submit SUBMIT_JOB_EPOCH, so add the row as
    # gearmand's plugin writes it (same columns, when_to_run in unix seconds).
    con = sqlite3.connect(qdb)
    con.execute(
        "INSERT INTO gearman_queue (unique_key, function_name, priority, data, when_to_run)"
        " VALUES ('later', 'import_a', 1, x'6c61746572', 4102444800)"
    )
    con.commit()
    con.close()
    return qdb


def test_gearmand_file_has_what_we_submitted(gearmand_queue: Path) -> None:
    rows = read_gearmand_queue(str(gearmand_queue))
    assert [(f, p, d) for f, _, p, d, _ in rows[:-1]] == [
        (fn.encode(), PRIO[flag], payload) for fn, flag, payload in SUBMISSIONS
    ]
    assert rows[-1][4] == 4102444800


def expected_queue_order() -> list[bytes]:
    """Payloads in the order atomnode must run them: priority, then submission order."""
    order = sorted(range(len(SUBMISSIONS)), key=lambda i: (PRIO[SUBMISSIONS[i][1]], i))
    return [SUBMISSIONS[i][2] for i in order]


def test_import_without_daemon(gearmand_queue: Path, tmp_path: Path,
                               capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    db = str(tmp_path / "atomnode.db")
    # a job already in atomnode's queue stays first in its priority
    s = Store(db)
    s.open()
    s.submit(("insert", 1, b"import_a", b"", b"existing", 1, 0, 1, time.time(), None))
    s.close()
    code = main(["import-gearmand-queue", str(gearmand_queue), "--db", db])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "imported 7 of 7 jobs" in out
    s = Store(db)
    rec = s.open()
    s.close()
    jobs = [j for j in rec.jobs if j.when_to_run == 0]
    normal_first = expected_queue_order()
    assert [j.data for j in jobs] == normal_first[:2] + [b"existing"] + normal_first[2:]
    by_data = {j.data: j for j in rec.jobs}
    assert by_data[b"nul\0inside\0payload"].function == b"import_b"
    assert by_data[b"later"].when_to_run == 4102444800 and by_data[b"later"].unique == b"later"
    assert all(j.state == "queued" and j.attempts == 0 for j in rec.jobs)
    assert len({j.id for j in rec.jobs}) == 8 and rec.next_id == 9


def test_import_refuses_a_file_without_the_table(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    other = tmp_path / "other.db"
    sqlite3.connect(other).close()
    code = main(["import-gearmand-queue", str(other), "--db", str(tmp_path / "a.db")])
    assert code == 1 and "no table gearman_queue" in capsys.readouterr().err


def test_import_through_running_daemon(gearmand_queue: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    db = str(tmp_path / "atomnode.db")
    port = free_port()
    d = Daemon(tmp_path, port=port, db=Path(db),
               config=f"listen: ['127.0.0.1:{port}']\ndatabase: {db}\n").start()
    try:
        assert Store.is_locked(db)
        code = main(["import-gearmand-queue", str(gearmand_queue), "--config",
                     str(d.config_path)])
        out, err = capsys.readouterr()
        assert code == 0, err
        assert "imported 7 of 7 jobs" in out and f"127.0.0.1:{port}" in out
    finally:
        assert d.stop() == 0
    s = Store(db)
    rec = s.open()
    s.close()
    assert [j.data for j in rec.jobs if j.when_to_run == 0] == expected_queue_order()
    assert [j.priority for j in rec.jobs if j.when_to_run == 0] == sorted(
        PRIO[f] for _, f, _ in SUBMISSIONS)
    later = [j for j in rec.jobs if j.when_to_run]
    assert [(j.data, j.when_to_run) for j in later] == [(b"later", 4102444800)]
