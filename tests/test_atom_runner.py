"""Per-job mode (issue 16): atomnode's own worker tasks run each AtoM job in a fresh
``php symfony tools:run`` process with the shipped runner script.

The AtoM trees are fixtures (tests/atom_trees.py, tests/atom_runtime/): their ``symfony``
implements ``tools:run`` as each release family boots, their Net_Gearman job class writes
real Gearman packets on the socket it is handed, and the job class ``arFixtureJob`` does
what the workload says. PHP is Debian's php-cli; the daemon is a real atomnode process.
Waits are on events: a client's WORK_* packets, a FIFO a job blocks on (opening it for
writing returns when the job has opened it), the daemon's exit.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import threading
from pathlib import Path

import pytest

from atom_trees import RELEASES, add_runtime, make_atom_release
from daemon_harness import Client, Daemon, free_port

from atomnode.gearman.protocol import T

pytestmark = pytest.mark.interop

KEY_PREFIX = "2.5.2+"


def prefix_of(root: Path, family: str) -> str:
    """The site's job prefix as the family's QubitJob::getJobPrefix() builds it."""
    if family in ("2.0.0-2.0.1", "2.0.2-2.1"):
        return ""
    if family == "2.2":
        return f"{root} - "
    if family == "2.3-2.5.1":  # md5(siteTitle . siteBaseUrl . root); no base URL here
        return hashlib.md5(f"Fixture archive{root}".encode()).hexdigest() + "-"
    return hashlib.md5(str(root).encode()).hexdigest() + "-"


def site(tmp_path: Path, family: str = KEY_PREFIX, name: str = "atom") -> tuple[Path, str]:
    root = tmp_path / name
    make_atom_release(root, family)
    add_runtime(root, family)
    return root, prefix_of(root, family) + "arFixtureJob"


def runner_config(root: Path, fn: str, **extra: object) -> str:
    lines = [
        "atom_runners:",
        "  - name: site",
        f"    root: {json.dumps(str(root))}",
        f"    functions: [{json.dumps(fn)}]",
    ]
    for k, v in extra.items():
        lines.append(f"    {k}: {json.dumps(v)}")
    return "\n".join(lines) + "\n"


def run_job(client: Client, fn: str, payload: dict, exceptions: bool = True
            ) -> tuple[str, bytes, list[tuple[bytes, bytes]]]:
    """Submit a foreground job; (final packet name, its data, statuses seen)."""
    if exceptions:
        client.send(T.OPTION_REQ, b"exceptions")
        client.expect(T.OPTION_RES)
    client.send(T.SUBMIT_JOB, fn.encode(), b"", json.dumps(payload).encode())
    client.expect(T.JOB_CREATED)
    statuses = []
    while True:
        p = client.recv(timeout=60)
        if p.type == T.WORK_STATUS:
            statuses.append((p.args[1], p.args[2]))
        elif p.type == T.WORK_DATA:
            statuses.append((b"data", p.args[1]))
        elif p.type in (T.WORK_COMPLETE, T.WORK_EXCEPTION):
            return p.name, p.args[1], statuses
        elif p.type == T.WORK_FAIL:
            return p.name, b"", statuses


def status_doc(admin: Client) -> dict:
    return json.loads(admin.admin("atomnode-status").split(b"\n", 1)[0])


def capable(admin: Client, fn: str) -> int | None:
    """``status``'s capable workers for ``fn`` (what AtoM's availability check reads)."""
    for line in admin.admin("status").decode().splitlines():
        parts = line.split("\t")
        if len(parts) == 4 and parts[0] == fn:
            return int(parts[3])
    return None


@pytest.fixture
def php() -> str:
    path = shutil.which("php")
    if path is None:
        pytest.fail("php missing (scripts/sysdeps.sh test installs php-cli)")
    return path


# ------------------------------------------------------------------------- the basics


@pytest.mark.parametrize("family,version", RELEASES[:5])
def test_every_release_family_boots_and_runs_a_job(tmp_path: Path, php: str, family: str,
                                                  version: str) -> None:
    root, fn = site(tmp_path, family)
    d = Daemon(tmp_path, config=runner_config(root, fn)).start()
    try:
        with Client(d.port) as c:
            kind, data, _ = run_job(c, fn, {"id": 41, "do": "boot"})
            assert kind == "WORK_COMPLETE", (data, d.log())
            doc = json.loads(data)
            assert doc["class"] == "arFixtureJob"
            assert doc["arg"] == {"id": 41, "do": "boot"}
            # The settings are in sfConfig however the release's tools:run booted, and
            # loaded once; Net_Gearman's class prefix is '' as in the worker task.
            assert doc["title"] == "Fixture archive"
            assert doc["boot"].count("settings") == 1
            assert doc["prefix_constant"] == ""
            if family in ("2.0.0-2.0.1", "2.0.2-2.1"):
                # tools:run made no context: the runner made the worker task's.
                assert doc["env"] == "worker"
                assert "context worker" in doc["boot"]
            else:
                assert doc["env"] == "cli"
        log = d.log()
        assert "AtoM job 41" in log
    finally:
        d.stop()


def test_results_statuses_failures_and_logs(tmp_path: Path, php: str) -> None:
    root, fn = site(tmp_path)
    d = Daemon(tmp_path, config=runner_config(root, fn, concurrency=2)).start()
    try:
        with Client(d.port) as c, Client(d.port) as admin:
            assert capable(admin, fn) == 2
            workers = admin.admin("workers").decode()
            assert workers.count("atomnode-runner:site:") == 2, workers

            kind, data, statuses = run_job(c, fn, {"id": 1, "do": "status"})
            assert (kind, json.loads(data)) == ("WORK_COMPLETE", {"result": "counted"})
            assert statuses == [(b"1", b"3"), (b"2", b"3")]
            kind, data, seen = run_job(c, fn, {"id": 1, "do": "data"})
            assert kind == "WORK_COMPLETE" and seen == [(b"data", b"partial output")]

            # run() throws Net_Gearman_Job_Exception: the job's fail(), with the message.
            kind, data, _ = run_job(c, fn, {"id": 2, "do": "fail"})
            assert (kind, data) == ("WORK_EXCEPTION", b"the fixture job failed on purpose")
        with Client(d.port) as c:
            kind, _, _ = run_job(c, fn, {"id": 3, "do": "fail"}, exceptions=False)
            assert kind == "WORK_FAIL"
        with Client(d.port) as c:
            kind, data, _ = run_job(c, fn, {"id": 4, "do": "throw"})
            assert kind == "WORK_EXCEPTION"
            assert data == b"RuntimeException: unexpected trouble in the fixture job"
            kind, data, _ = run_job(c, fn, {"id": 5, "do": "fatal"})
            assert kind == "WORK_EXCEPTION"
            assert data.startswith(b"PHP fatal error: Allowed memory size"), data
            kind, data, _ = run_job(c, fn, {"id": 6, "do": "exit"})
            assert kind == "WORK_EXCEPTION"
            assert b"exited with code 3 without a result" in data, data
            assert b"leaving without a result" in data
            # One process per job.
            pids = {json.loads(run_job(c, fn, {"id": 7, "do": "pid"})[1])["pid"]
                    for _ in range(2)}
            assert len(pids) == 2

            # A background job: the outcome is in the store, the log names AtoM's job id.
            handle = c.submit_bg(fn.encode(), b"", json.dumps({"id": 77, "do": "fail"}).encode())
            while True:  # until the server no longer knows the job (each check a round trip)
                c.send(T.GET_STATUS, handle)
                if c.expect(T.STATUS_RES).args[1] == b"0":
                    break
        with Client(d.port) as admin:
            doc = status_doc(admin)
            (runner,) = doc["runners"]
            assert runner["problem"] is None
            assert runner["startup_ms"]["jobs"] >= 6
        d.stop()
        assert not any(os.path.exists(f"/proc/{p}") for p in pids)
        log = d.log()
        tag = f"[site {handle.decode()} AtoM job 77]"
        assert f"{tag} job failed: the fixture job failed on purpose" in log, log
        assert "[site H:" in log and "AtoM job 4] RuntimeException" in log
        out = subprocess.run(
            [str(Path(".venv/bin/atomnode").resolve()), "jobs", "show", "--db", str(d.db),
             handle.decode()], capture_output=True, text=True)
        assert "the fixture job failed on purpose" in out.stdout + out.stderr, out
    finally:
        d.stop()


def test_timeout_kills_the_process_group_and_fails_or_requeues(tmp_path: Path, php: str
                                                              ) -> None:
    root, fn = site(tmp_path)
    d = Daemon(tmp_path, config=runner_config(root, fn, timeout="1s")).start()
    try:
        with Client(d.port) as c:
            kind, data, _ = run_job(c, fn, {"id": 8, "do": "hang",
                                            "marker": str(tmp_path / "m1")})
            assert (kind, data) == ("WORK_EXCEPTION", b"timed out after 1s")
    finally:
        d.stop()
    config = runner_config(root, fn, timeout="1s", on_timeout="requeue")
    config += "queue: {max_attempts: 2}\n"
    d = Daemon(tmp_path, config=config, db=tmp_path / "q2.db").start()
    try:
        with Client(d.port) as c:
            kind, _, _ = run_job(c, fn, {"id": 9, "do": "hang", "marker": str(tmp_path / "m2")})
            # Requeued once (attempt 1 timed out), then given up after attempt 2.
            assert kind == "WORK_FAIL"
        log = d.log()
        assert "timed out after 1s; the job goes back to the queue" in log
        assert "gave up after 2 attempts" in log
    finally:
        d.stop()


def test_memory_limit_kills_the_job(tmp_path: Path, php: str) -> None:
    root, fn = site(tmp_path)
    d = Daemon(tmp_path, config=runner_config(root, fn, memory_limit="64M")).start()
    try:
        with Client(d.port) as c:
            kind, data, _ = run_job(c, fn, {"id": 10, "do": "grow", "mib": 100,
                                            "marker": str(tmp_path / "g")})
            assert kind == "WORK_EXCEPTION"
            assert data.startswith(b"memory limit exceeded: "), data
            assert b"> memory_limit 64 MiB" in data
            # The next job runs normally.
            kind, data, _ = run_job(c, fn, {"id": 11, "do": "echo"})
            assert kind == "WORK_COMPLETE"
    finally:
        d.stop()


# ------------------------------------------------------------------ availability


def test_atoms_check_passes_at_every_moment_while_jobs_start_and_end(tmp_path: Path, php: str
                                                                    ) -> None:
    """QubitJob::runJob: ``status`` must list the function with capable workers > 0
    before each submission. atomnode's slots stay registered while each job's PHP
    process starts, runs and exits, so the check never fails; ``workers`` shows them."""
    root, fn = site(tmp_path)
    d = Daemon(tmp_path, config=runner_config(root, fn, concurrency=2)).start()
    try:
        with Client(d.port) as admin, Client(d.port) as client:
            handles = []
            for i in range(40):
                assert capable(admin, fn) == 2
                assert admin.admin("workers").decode().count("atomnode-runner:site:") == 2
                handles.append(client.submit_bg(
                    fn.encode(), b"", json.dumps({"id": i, "do": "echo"}).encode()))
            for h in handles:  # checked while the jobs run and end too
                while True:
                    assert capable(admin, fn) == 2
                    client.send(T.GET_STATUS, h)
                    if client.expect(T.STATUS_RES).args[1] == b"0":
                        break
            doc = status_doc(admin)
            assert doc["runners"][0]["done"] == 40
            (f,) = [f for f in doc["functions"] if f["name"] == fn]
            assert f["queued"] == 0 and f["running"] == 0
    finally:
        d.stop()


def test_a_runner_that_cannot_work_shows_no_worker_and_doctor_says_why(tmp_path: Path,
                                                                      php: str) -> None:
    root, fn = site(tmp_path)
    closed = free_port()
    bad_site = tmp_path / "not-atom"
    bad_site.mkdir()
    config = (
        "atom_runners:\n"
        f"  - {{name: nophp, root: {json.dumps(str(root))}, functions: [{json.dumps(fn)}],"
        " php: /nonexistent/php}\n"
        f"  - {{name: nosymfony, root: {json.dumps(str(bad_site))}, functions: [x-arOtherJob]}}\n"
        f"  - {{name: nomysql, root: {json.dumps(str(root))}, functions: [y-arThirdJob],"
        f" wait_for: [{{name: mysql, address: '127.0.0.1:{closed}'}}]}}\n"
    )
    d = Daemon(tmp_path, config=config).start()
    try:
        with Client(d.port) as admin:
            for f in (fn, "x-arOtherJob", "y-arThirdJob"):
                assert not capable(admin, f)  # AtoM refuses at once, nothing waits in vain
            assert "atomnode-runner" not in admin.admin("workers").decode()
        out = subprocess.run(
            [str(Path(".venv/bin/atomnode").resolve()), "doctor", "--host", "127.0.0.1",
             "--port", str(d.port)], capture_output=True, text=True)
        text = out.stdout
        assert out.returncode == 1, text
        assert "FAIL  runner nophp" in text and "PHP not found (/nonexistent/php" in text, text
        assert f"{bad_site}/symfony is missing" in text, text
        assert f"waiting for mysql (127.0.0.1:{closed})" in text, text
        status = subprocess.run(
            [str(Path(".venv/bin/atomnode").resolve()), "status", "--host", "127.0.0.1",
             "--port", str(d.port)], capture_output=True, text=True).stdout
        assert "CANNOT RUN JOBS: PHP not found" in status, status
    finally:
        d.stop()


# ------------------------------------------------------------------------ stopping


def _open_writer(fifo: Path, timeout: float = 60.0) -> int:
    """Open ``fifo`` for writing: returns once the job has opened it to read (the job
    is running). Fails the test if that does not happen within ``timeout``."""
    box: list[int] = []
    t = threading.Thread(target=lambda: box.append(os.open(fifo, os.O_WRONLY)), daemon=True)
    t.start()
    t.join(timeout)
    assert box, "the job did not start"
    return box[0]


def _job_state(d: Daemon, handle: bytes) -> str:
    out = subprocess.run(
        [str(Path(".venv/bin/atomnode").resolve()), "jobs", "show", "--json", "--db",
         str(d.db), handle.decode()], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)["state"]


def test_stop_drains_running_jobs_and_starts_no_new_one(tmp_path: Path, php: str) -> None:
    root, fn = site(tmp_path)
    fifo = tmp_path / "release"
    os.mkfifo(fifo)
    d = Daemon(tmp_path, config=runner_config(root, fn)).start()
    try:
        with Client(d.port) as c:
            a = c.submit_bg(fn.encode(), b"", json.dumps(
                {"id": 1, "do": "wait", "fifo": str(fifo), "marker": str(tmp_path / "a")}
            ).encode())
            b = c.submit_bg(fn.encode(), b"", json.dumps({"id": 2, "do": "echo"}).encode())
        w = _open_writer(fifo)  # job a runs; b waits (concurrency 1)
        assert d.proc is not None and d.notify is not None
        d.proc.send_signal(signal.SIGTERM)
        d.notify.wait_for("STOPPING", 15, proc=d.proc)
        os.write(w, b"go\n")
        os.close(w)
        assert d.proc.wait(30) == 0
        assert _job_state(d, a) == "done"
        assert _job_state(d, b) == "queued"  # not started after the stop began
        log = d.log()
        assert log.index("shutting down") < log.index("AtoM job 1] job done"), log
    finally:
        d.stop()


def test_stop_kills_a_job_past_the_shutdown_timeout_and_requeues_it(tmp_path: Path, php: str
                                                                   ) -> None:
    root, fn = site(tmp_path)
    fifo = tmp_path / "never"
    os.mkfifo(fifo)
    d = Daemon(tmp_path, config=runner_config(root, fn) + "shutdown_timeout: 1s\n").start()
    try:
        with Client(d.port) as c:
            a = c.submit_bg(fn.encode(), b"", json.dumps(
                {"id": 5, "do": "wait", "fifo": str(fifo), "marker": str(tmp_path / "a")}
            ).encode())
        w = _open_writer(fifo)
        assert d.stop() == 0
        os.close(w)
        assert _job_state(d, a) == "queued"  # runs again after the restart
        assert "still running at shutdown; killing pid" in d.log()
    finally:
        d.stop()


# ------------------------------------------------------------------ atom-config --per-job


def test_atom_config_per_job_writes_a_working_runner(tmp_path: Path, php: str) -> None:
    import pwd

    root = tmp_path / "atom"
    make_atom_release(root, "2.5.2+", worker_types={"general": ["arFixtureJob"]},
                      dsn=None, search=None)
    add_runtime(root, "2.5.2+")
    user = pwd.getpwuid(os.getuid()).pw_name
    out = subprocess.run(
        [str(Path(".venv/bin/atomnode").resolve()), "atom-config", str(root), "--per-job",
         "--no-mysql", "--plugins", "", "--user", user, "--workers", "1"],
        capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "pools:" not in text and "atom_runners:" in text
    fn = prefix_of(root, "2.5.2+") + "arFixtureJob"
    from atomnode.system.config import parse_config

    (runner,) = parse_config(text).atom_runners
    assert runner.functions == (fn,) and runner.concurrency == 1 and runner.user == user
    d = Daemon(tmp_path, config=text).start()
    try:
        with Client(d.port) as c:
            assert capable(c, fn) == 1
            kind, data, _ = run_job(c, fn, {"id": 3, "do": "echo"})
            assert (kind, json.loads(data)) == ("WORK_COMPLETE", {"id": 3, "do": "echo"})
    finally:
        d.stop()


def test_concurrency_groups_apply_to_the_runner(tmp_path: Path, php: str) -> None:
    root, fn = site(tmp_path)
    fifos = [tmp_path / "one", tmp_path / "two"]
    for f in fifos:
        os.mkfifo(f)
    config = runner_config(root, fn, concurrency=2) + (
        "concurrency:\n  - {name: serial, functions: [arFixtureJob], max: 1}\n")
    d = Daemon(tmp_path, config=config).start()
    try:
        with Client(d.port) as c:
            c.submit_bg(fn.encode(), b"", json.dumps(
                {"id": 1, "do": "wait", "fifo": str(fifos[0]), "marker": str(tmp_path / "a")}
            ).encode())
            w1 = _open_writer(fifos[0])  # job 1 runs
            c.submit_bg(fn.encode(), b"", json.dumps(
                {"id": 2, "do": "wait", "fifo": str(fifos[1]), "marker": str(tmp_path / "b")}
            ).encode())
            # Committed and queued; the group is full, so the idle slot was not woken.
            (f,) = [f for f in status_doc(c)["functions"] if f["name"] == fn]
            assert (f["running"], f["queued"]) == (1, 1)
            assert capable(c, fn) == 2
            os.write(w1, b"1\n")
            os.close(w1)
            w2 = _open_writer(fifos[1])  # job 2 runs once job 1 has ended
            os.write(w2, b"2\n")
            os.close(w2)
    finally:
        d.stop()


def test_each_job_runs_as_the_sites_user_in_its_root_in_its_own_process_group(
        php: str) -> None:
    """As root (CI), the job process runs as ``www-data``; otherwise as the current user."""
    import pwd
    import tempfile

    user = "www-data" if os.getuid() == 0 else pwd.getpwuid(os.getuid()).pw_name
    # A tree the site's user can read (pytest's tmp_path is private to root).
    work = Path(tempfile.mkdtemp(prefix="atomnode-runner-"))
    try:
        os.chmod(work, 0o755)
        root, fn = site(work)
        d = Daemon(work, config=runner_config(root, fn, user=user)).start()
        try:
            with Client(d.port) as c:
                kind, data, _ = run_job(c, fn, {"id": 1, "do": "who"})
                assert kind == "WORK_COMPLETE", data
                doc = json.loads(data)
                assert doc["user"] == user
                assert doc["cwd"] == str(root)
                assert doc["pgid"] == doc["pid"]  # its own process group: kills reach it all
                assert doc["owner"] == "set"  # the keeper ends it if the daemon dies
        finally:
            d.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
