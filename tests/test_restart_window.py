"""No "No Gearman worker available" because of atomnode.

AtoM's QubitJob::runJob() first asks the server's admin ``status`` whether any worker can
do the function (``capable_workers`` > 0), refuses the job if not, and otherwise submits
it in the background. Here a pool of ``count: 1`` runs an AtoM-like worker that takes
1.5 s to start (AtoM loads symfony before it connects) and exits 111 after every job
(``--max-job-count=1``): after each job there is a window in which no worker process is
connected. A client does AtoM's check-then-submit in a loop, and also asks ``workers``
(what is really connected) before and after each check: the check must pass every time,
including the many times it runs inside each window, and the queued jobs must be run by
the next workers.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from daemon_harness import Client, Daemon

from atomnode.gearman.protocol import T

WORKER_PHP = Path(__file__).parent / "workers" / "atom_like_worker.php"
FN = "0123456789abcdef0123456789abcdef-arFindingAidJob"


def connected(admin: Client, fn: str) -> bool:
    """A worker connection that can do ``fn`` (the admin ``workers`` listing)."""
    for line in admin.admin("workers").decode().splitlines():
        if " : " in line and fn in line.split(" : ", 1)[1].split():
            return True
    return False


def worker_pid(admin: Client) -> int | None:
    """The pid of the pool's current worker process (atomnode-status), None between two."""
    doc = json.loads(admin.admin("atomnode-status").split(b"\n", 1)[0])
    return doc["pools"][0]["workers"][0]["pid"] if doc["pools"][0]["workers"] else None


def atom_check(admin: Client, fn: str) -> bool:
    """QubitJob::checkWorkerAvailable: the function is in ``status`` with workers > 0."""
    for line in admin.admin("status").decode().splitlines():
        parts = line.split("\t")
        if len(parts) == 4 and parts[0] == fn:
            return int(parts[3]) > 0
    return False


def test_atoms_check_passes_while_the_only_worker_restarts(tmp_path: Path) -> None:
    cmd = ["php", str(WORKER_PHP), "--server", "{server}", "--function", FN,
           "--max-jobs", "1", "--start-delay", "1.5"]
    config = (
        "pools:\n  - name: atom\n"
        f"    command: {json.dumps(cmd)}\n"
        "    count: 1\n"
        f"    functions: [{FN}]\n"
        "    stop_grace: 2\n"
    )
    d = Daemon(tmp_path, config=config).start()
    try:
        with Client(d.port) as admin, Client(d.port) as client:
            deadline = time.monotonic() + 30
            while not connected(admin, FN):
                assert time.monotonic() < deadline, d.log()
                time.sleep(0.05)  # the first worker starts (polling from outside)
            refusals = 0
            submitted = 0
            pids: list[int] = []  # the pool's worker processes, in order
            unconnected: dict[int | None, int] = {}  # checks made with no worker connected
            deadline = time.monotonic() + 60
            while len(pids) < 6:
                assert time.monotonic() < deadline, f"{pids} {unconnected}\n{d.log()}"
                before = connected(admin, FN)
                ok = atom_check(admin, FN)
                after = connected(admin, FN)
                pid = worker_pid(admin)
                if ok:
                    client.submit_bg(FN.encode(), b"", b'{"id": %d}' % submitted)
                    submitted += 1
                else:
                    refusals += 1
                if pid is not None and pid not in pids:
                    pids.append(pid)
                if not before and not after:
                    unconnected[pid] = unconnected.get(pid, 0) + 1
            assert refusals == 0
            # Each worker started in the loop (its whole start-up seen) was a window with no
            # worker connected, and AtoM's check ran many times inside it.
            windows = [unconnected.get(p, 0) for p in pids[1:-1]]
            assert len(windows) == 4 and min(windows) >= 10, (pids, unconnected)
            # The jobs queued meanwhile are run by the next workers (one each).
            assert d.log().count("max job count 1 reached") >= len(windows)
            # `status` counted the pool's capacity; what is really connected stays visible
            # in `workers` and in atomnode-status.
            doc = json.loads(admin.admin("atomnode-status").split(b"\n", 1)[0])
            (fn_doc,) = [f for f in doc["functions"] if f["name"] == FN]
            assert fn_doc["workers"] in (0, 1)
            assert 0 < fn_doc["queued"] + fn_doc["running"] < submitted
    finally:
        d.stop()


def test_a_crashing_pool_is_not_counted(tmp_path: Path) -> None:
    """Honest for gearadmin users: a pool that crashes (backs off) or never registered its
    functions adds nothing to ``status``."""
    fn = "0123456789abcdef0123456789abcdef-arCrashJob"
    config = (
        "pools:\n  - name: broken\n"
        '    command: ["/bin/sh", "-c", "exit 3"]\n'
        "    count: 1\n"
        f"    functions: [{fn}]\n"
        "    backoff_initial: 60\n"
    )
    d = Daemon(tmp_path, config=config).start()
    try:
        with Client(d.port) as admin:
            admin.send(T.SUBMIT_JOB_BG, fn.encode(), b"", b"x")
            admin.expect(T.JOB_CREATED)
            assert not atom_check(admin, fn)
            assert not connected(admin, fn)
    finally:
        d.stop()
