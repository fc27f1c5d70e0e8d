"""A worker host against gearmand (issue 14, layout 4): pools keep working, without job
awareness, and status/doctor say so. Against atomnode, see tests/test_multihost.py."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import ServerProc
from atomnode.ops.client import AdminClient


def _atomnode(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "atomnode", *args], capture_output=True,
                          text=True, timeout=60)


def _wait(pred, what: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)  # another process's state: no event to wait on


def test_worker_host_against_gearmand_runs_jobs_without_job_awareness(tmp_path: Path) -> None:
    gm = ServerProc("gearmand", tmp_path)
    gm.wait_ready()
    proc = None
    try:
        out = tmp_path / "runs"
        sock = tmp_path / "ctl.sock"
        cfg = tmp_path / "w.yml"
        argv = ["gearman", "-w", "-h", "127.0.0.1", "-p", str(gm.port), "-f", "gmjob", "--",
                "sh", "-c", f'x=$(cat); echo "$x" >> {out}']  # one append: two workers interleave
        cfg.write_text(
            "listen: []\n"
            f"database: {tmp_path / 'q.db'}\n"
            f"control_socket: {sock}\n"
            "http: {listen: none}\n"
            "pools:\n"
            "  - name: gm\n"
            "    count: 2\n"
            f"    servers: ['127.0.0.1:{gm.port}']\n"
            f"    command: {json.dumps(argv)}\n"
            "    max_jobs: 1\n"
        )
        log = tmp_path / "daemon.log"
        with open(log, "ab") as f:
            proc = subprocess.Popen([sys.executable, "-m", "atomnode", "run", "--config",
                                     str(cfg)], stdout=f, stderr=f, stdin=subprocess.DEVNULL)
        _wait(lambda: "is not an atomnode server" in log.read_text(), "the gearmand notice")
        for i in range(4):
            subprocess.run(["gearman", "-h", "127.0.0.1", "-p", str(gm.port), "-f", "gmjob",
                            "-b", f"job{i}"], check=True, timeout=30)
        _wait(lambda: out.exists() and len(out.read_text().split()) == 4, "4 jobs on gearmand")
        assert sorted(out.read_text().split()) == [f"job{i}" for i in range(4)]

        with AdminClient(str(sock), 0, 5.0) as c:
            st = json.loads(c.command("atomnode-status")[0])
        (link,) = st["worker_host"]["servers"]
        assert link["aware"] is False and "not an atomnode server" in link["error"]
        # No job awareness: plain "running", and max_jobs is not applied (nobody recycled).
        assert {w["state"] for w in st["pools"][0]["workers"]} == {"running"}
        assert "recycling" not in log.read_text()
        status = _atomnode("status", "--config", str(cfg))
        assert f"server 127.0.0.1:{gm.port}: 127.0.0.1:{gm.port} is not an atomnode" \
            in status.stdout
        doctor = _atomnode("doctor", "--config", str(cfg))
        assert f"WARN  the server 127.0.0.1:{gm.port} is not an atomnode" in doctor.stdout

        proc.terminate()
        assert proc.wait(30) == 0, log.read_text()
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)
        gm.stop()


