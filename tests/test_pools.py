"""Worker pools and handlers run by the real daemon, against its own listener.

An AtoM-like PHP worker (php-gearman, SET_CLIENT_ID pid_<PID>_..., exit 111 after
--max-jobs, killed at once by SIGTERM) is supervised by atomnode; the daemon knows which
process holds which job, drains before stopping, restarts planned exits at once and
crashes with backoff, enforces concurrency groups named without AtoM's site prefix, and
serves functions with command handlers that AtoM's availability check can see.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from atomnode.gearman.protocol import T
from daemon_harness import Client, Daemon

WORKER_PHP = Path(__file__).parent / "workers" / "atom_like_worker.php"
PREFIX = "0123456789abcdef0123456789abcdef-"


def status_json(d: Daemon) -> dict:
    with d.client() as c:
        raw = c.admin("atomnode-status")
    return json.loads(raw.split(b"\n", 1)[0])


def wait_until(pred, what: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)  # polling the daemon's status from outside


def pool_workers(d: Daemon, name: str = "atom") -> list[dict]:
    for p in status_json(d)["pools"]:
        if p["name"] == name:
            return p["workers"]
    return []


def php_pool(function: str, *, count: int = 2, max_jobs: int = 0, extra: str = "") -> str:
    cmd = ["php", str(WORKER_PHP), "--server", "{server}", "--function", function]
    if max_jobs:
        cmd += ["--max-jobs", str(max_jobs)]
    return (
        "pools:\n"
        "  - name: atom\n"
        f"    command: {json.dumps(cmd)}\n"
        f"    count: {count}\n"
        "    stop_grace: 2\n"
        "    backoff_initial: 1\n"
        f"{extra}"
    )


def foreground(d: Daemon, function: str, data: bytes, timeout: float = 20.0) -> bytes:
    with Client(d.port, timeout=timeout) as c:
        c.send(T.SUBMIT_JOB, function.encode(), b"", data)
        handle = c.expect(T.JOB_CREATED).args[0]
        while True:
            p = c.expect(T.WORK_COMPLETE, T.WORK_DATA, T.WORK_STATUS, T.WORK_FAIL)
            if p.type == T.WORK_FAIL:
                raise AssertionError(f"job {handle!r} failed")
            if p.type == T.WORK_COMPLETE:
                return p.args[1]


def test_php_pool_serves_jobs_and_restarts_planned_exits_at_once(tmp_path):
    fn = PREFIX + "arFindingAidJob"
    d = Daemon(tmp_path, config=php_pool(fn, count=2, max_jobs=2)).start()
    try:
        wait_until(lambda: d.status().get(fn, (0, 0, 0))[2] == 2, "2 workers registered")
        workers = pool_workers(d)
        assert len(workers) == 2 and all(w["pid"] for w in workers)
        first_pids = {w["pid"] for w in workers}
        for i in range(6):
            assert foreground(d, fn, f"job{i}".encode()) == f"JOB{i}".encode()
        # After --max-jobs 2 each worker exits 111 (AtoM's planned exit): replaced at
        # once, never "backing off".
        wait_until(lambda: not first_pids & {w["pid"] for w in pool_workers(d)},
                   "workers replaced after exit 111")
        states = {w["state"] for w in pool_workers(d)}
        assert "backing off" not in states
        assert "planned" in d.log() or "111" in d.log()
    finally:
        assert d.stop() == 0


def test_status_shows_which_worker_holds_which_job_and_crashes_back_off(tmp_path):
    fn = PREFIX + "arObjectMoveJob"
    d = Daemon(tmp_path, config=php_pool(fn, count=1)).start()
    try:
        wait_until(lambda: d.status().get(fn, (0, 0, 0))[2] == 1, "worker registered")
        with d.client() as c:
            handle = c.submit_bg(fn.encode(), b"h1", b"hang")
        busy = wait_until(
            lambda: [w for w in pool_workers(d) if w["state"] == "busy"], "a busy worker")
        assert busy[0]["job"] == handle.decode()
        pid = busy[0]["pid"]
        # The CLI shows the same.
        out = subprocess.run([sys.executable, "-m", "atomnode", "status", "--port",
                              str(d.port)], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0 and str(pid) in out.stdout and "busy" in out.stdout
        # Kill it mid-job: the job is requeued with the attempt counted, and the pool
        # backs off before respawning (a crash, not a planned exit).
        import os

        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: any(w["state"] == "backing off" for w in pool_workers(d)),
                   "backing off")
        detail = [w["detail"] for w in pool_workers(d) if w["state"] == "backing off"][0]
        assert "next try" in detail
        rows = wait_until(
            lambda: [j for j in json.loads(
                d.client().admin("atomnode-jobs list json").split(b"\n", 1)[0])
                if j["handle"] == handle.decode() and j["attempts"] >= 1], "job requeued")
        assert rows[0]["attempts"] >= 1
    finally:
        assert d.stop() == 0


def test_stop_drains_a_busy_worker_before_signalling_it(tmp_path):
    """Daemon shutdown drains: the worker finishes the job it holds (no new ones are
    handed out), then it is stopped; the client gets the result."""
    config = (
        "shutdown_timeout: 20\n"
        "handlers:\n"
        "  - function: slowjob\n"
        "    command: [sh, -c, 'read x; sleep 1; echo done-$x']\n"
        "    concurrency: 1\n"
    )
    d = Daemon(tmp_path, config=config).start()
    wait_until(lambda: d.status().get("slowjob", (0, 0, 0))[2] == 1, "handler registered")
    c = Client(d.port, timeout=20)
    c.send(T.SUBMIT_JOB, b"slowjob", b"", b"abc\n")
    handle = c.expect(T.JOB_CREATED).args[0]
    wait_until(lambda: d.status()["slowjob"][1] == 1, "job running")
    d.proc.send_signal(signal.SIGTERM)
    p = c.expect(T.WORK_COMPLETE)
    assert p.args == (handle, b"done-abc\n")
    assert d.proc.wait(20) == 0
    c.close()


def test_handler_is_visible_to_atoms_availability_check_and_runs_jobs(tmp_path):
    fn = PREFIX + "arGenerateReportJob"
    config = (
        "handlers:\n"
        f"  - function: {fn}\n"
        "    command: [tr, a-z, A-Z]\n"
        "    concurrency: 2\n"
        "  - function: failing\n"
        "    command: [sh, -c, 'echo broken >&2; exit 3']\n"
    )
    d = Daemon(tmp_path, config=config).start()
    try:
        # AtoM's web request reads `status` and refuses to submit if workers == 0.
        total, running, workers = wait_until(lambda: d.status().get(fn), "handler in status")
        assert workers == 2
        assert foreground(d, fn, b"finding aid") == b"FINDING AID"
        with Client(d.port) as c:
            c.send(T.OPTION_REQ, b"exceptions")
            c.expect(T.OPTION_RES)
            c.send(T.SUBMIT_JOB, b"failing", b"", b"x")
            c.expect(T.JOB_CREATED)
            p = c.expect(T.WORK_EXCEPTION, T.WORK_FAIL)
            assert p.type == T.WORK_EXCEPTION and b"broken" in p.args[1]
        handlers = status_json(d)["handlers"]
        assert {h["function"] for h in handlers} == {fn, "failing"}
    finally:
        assert d.stop() == 0


def test_concurrency_group_named_without_site_prefix(tmp_path):
    """At most one arObjectMoveJob runs at a time, whatever the workers: the second
    worker gets NO_JOB while the first job runs, and is woken when it ends."""
    fn = (PREFIX + "arObjectMoveJob").encode()
    config = "concurrency:\n  - {name: moves, functions: [arObjectMoveJob], max: 1}\n"
    d = Daemon(tmp_path, config=config).start()
    with d.client() as c:
        h1 = c.submit_bg(fn, b"m1", b"1")
        h2 = c.submit_bg(fn, b"m2", b"2")
    w1 = d.worker(fn)
    w2 = d.worker(fn)
    p1 = w1.grab()
    assert p1 is not None and p1.args[0] == h1
    w2.send(T.GRAB_JOB_UNIQ)
    assert w2.expect(T.NO_JOB, T.JOB_ASSIGN_UNIQ).type == T.NO_JOB
    w2.send(T.PRE_SLEEP)
    w1.complete(h1, b"ok")
    w2.expect(T.NOOP)
    p2 = w2.grab()
    assert p2 is not None and p2.args[0] == h2
    w2.complete(h2, b"ok")
    w1.close()
    w2.close()
    assert d.stop() == 0


def test_sighup_resizes_pool_and_refuses_invalid_config(tmp_path):
    fn = "resizable"
    d = Daemon(tmp_path, config=php_pool(fn, count=1)).start()
    try:
        wait_until(lambda: d.status().get(fn, (0, 0, 0))[2] == 1, "1 worker")
        assert d.config_path is not None
        d.config_path.write_text(php_pool(fn, count=2))
        d.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: d.status().get(fn, (0, 0, 0))[2] == 2, "2 workers after reload")
        d.config_path.write_text("pools: [{name: atom, count: -1}]\nbogus_key: 1\n")
        d.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "reload refused" in d.log(), "refusal logged")
        assert "bogus_key" in d.log()
        assert d.status()[fn][2] == 2 and d.proc.poll() is None
    finally:
        assert d.stop() == 0


def test_supervisor_only_mode_against_external_gearmand(tmp_path):
    """No embedded listener: the pool's workers talk to an existing gearmand."""
    from daemon_harness import free_port

    port = free_port()
    gd = subprocess.Popen(["/usr/sbin/gearmand", "-L", "127.0.0.1", "-p", str(port), "-t", "1",
                           "-l", "stderr", "--verbose", "ERROR"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        cmd = ["php", str(WORKER_PHP), "--function", "ext"]
        config = (
            "listen: []\n"
            "pools:\n"
            "  - name: remote\n"
            f"    command: {json.dumps(cmd)}\n"
            f"    servers: ['127.0.0.1:{port}']\n"
        )
        (tmp_path / "atomnode.yml").write_text(config)
        log = open(tmp_path / "sup.log", "wb")
        sup = subprocess.Popen([sys.executable, "-m", "atomnode", "run", "--config",
                                str(tmp_path / "atomnode.yml"), "--db",
                                str(tmp_path / "q.db")], stdout=log, stderr=log)
        try:
            def ext_workers():
                try:
                    with Client(port, timeout=2) as c:
                        out = c.admin("status").decode()
                except OSError:
                    return False
                return any(line.startswith("ext\t") and line.split("\t")[3] != "0"
                           for line in out.splitlines())
            wait_until(ext_workers, "a worker registered at gearmand")
            with Client(port) as c:
                c.send(T.SUBMIT_JOB, b"ext", b"", b"remote")
                c.expect(T.JOB_CREATED)
                assert c.expect(T.WORK_COMPLETE).args[1] == b"REMOTE"
        finally:
            sup.send_signal(signal.SIGTERM)
            assert sup.wait(30) == 0, (tmp_path / "sup.log").read_text()
            log.close()
    finally:
        gd.kill()
        gd.wait()


def test_gearman_cli_workers_are_mapped_through_proc(tmp_path):
    """`gearman -w` sends no client id: the daemon still finds which process holds the
    job by its socket (/proc), so status shows that worker busy with that job. Child
    output lands in the daemon's log with pool and pid."""
    script = tmp_path / "gw.sh"
    script.write_text(
        "#!/bin/sh\n"
        "echo starting gearman worker\n"
        'exec gearman -w -h 127.0.0.1 -p "${ATOMNODE_SERVERS##*:}" -f gw -- '
        "sh -c 'read x; sleep 1; echo got-$x'\n"
    )
    script.chmod(0o755)
    config = f"pools:\n  - name: cli\n    command: [{str(script)!r}]\n    count: 1\n"
    d = Daemon(tmp_path, config=config).start()
    try:
        wait_until(lambda: d.status().get("gw", (0, 0, 0))[2] == 1, "gearman -w registered")
        c = Client(d.port, timeout=20)
        c.send(T.SUBMIT_JOB, b"gw", b"", b"payload\n")
        handle = c.expect(T.JOB_CREATED).args[0]
        busy = wait_until(
            lambda: [w for w in pool_workers(d, "cli") if w["state"] == "busy"], "busy")
        assert busy[0]["job"] == handle.decode()
        assert c.expect(T.WORK_COMPLETE).args[1] == b"got-payload\n"
        c.close()
        pid = busy[0]["pid"]
        assert f"[cli pid {pid}] starting gearman worker" in d.log()
    finally:
        assert d.stop() == 0


def test_sighup_adds_changes_and_removes_handlers(tmp_path):
    d = Daemon(tmp_path, config="handlers:\n  - {function: h1, command: [tr, a-z, A-Z]}\n").start()
    try:
        wait_until(lambda: d.status().get("h1", (0, 0, 0))[2] == 1, "h1 registered")
        assert d.config_path is not None
        d.config_path.write_text(
            "handlers:\n  - {function: h2, command: [rev]}\n")
        d.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: d.status().get("h2", (0, 0, 0))[2] == 1, "h2 after reload")
        wait_until(lambda: d.status().get("h1", (0, 0, 0))[2] == 0, "h1 gone after reload")
        assert foreground(d, "h2", b"abc\n") == b"cba\n"
    finally:
        assert d.stop() == 0
