"""Per-job runner (issue 16): what each job's own process costs before the job runs.

Runs N jobs one after another through an ``atom_runners`` entry on a fixture AtoM tree
(tests/atom_trees.py: its ``symfony`` implements ``tools:run`` with the release family's
boot, but loads none of AtoM's real code) and reports:

* start-up: process start -> the job class's run() entry, as the runner script reports it
  (``startup_ms`` in atomnode-status; p50 / p90 / max);
* round trip: a client's SUBMIT_JOB -> WORK_COMPLETE, the whole per-job path;
* for comparison, the same jobs on a long-lived PHP worker connected over TCP
  (tests/workers/atom_like_worker.php: no process start per job);
* ``php -r ''``: the floor any PHP process pays.

    .venv/bin/python bench/atom_runner_startup.py [--jobs 50] [--family 2.5.2+]

On a real AtoM site the start-up also loads symfony, AtoM's configuration and plugins
and opens MySQL: measure it there with ``atomnode status`` (runner line, "start-up p50").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from atom_trees import add_runtime, make_atom_release  # noqa: E402
from daemon_harness import Client, Daemon  # noqa: E402

from atomnode.gearman.protocol import T  # noqa: E402


def _pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(p * len(s)))]


def _roundtrips(port: int, fn: str, n: int) -> list[float]:
    out = []
    with Client(port, timeout=60) as c:
        for i in range(n):
            t0 = time.perf_counter()
            c.send(T.SUBMIT_JOB, fn.encode(), b"", json.dumps({"id": i, "do": "echo"}).encode())
            c.expect(T.JOB_CREATED)
            c.expect(T.WORK_COMPLETE, timeout=60)
            out.append(time.perf_counter() - t0)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=50)
    ap.add_argument("--family", default="2.5.2+")
    args = ap.parse_args()
    import hashlib

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        root = work / "atom"
        make_atom_release(root, args.family)
        add_runtime(root, args.family)
        fn = hashlib.md5(str(root).encode()).hexdigest() + "-arFixtureJob"
        if args.family != "2.5.2+":
            raise SystemExit("only the 2.5.2+ prefix is computed here")
        config = (f"atom_runners:\n  - name: bench\n    root: {json.dumps(str(root))}\n"
                  f"    functions: [{json.dumps(fn)}]\n")
        d = Daemon(work, config=config).start()
        try:
            per_job = _roundtrips(d.port, fn, args.jobs)
            with Client(d.port) as admin:
                doc = json.loads(admin.admin("atomnode-status").split(b"\n", 1)[0])
        finally:
            d.stop()
        worker_php = HERE.parent / "tests" / "workers" / "atom_like_worker.php"
        d2 = Daemon(work, config=None, db=work / "q2.db").start()
        w = subprocess.Popen(["php", str(worker_php), "--server", f"127.0.0.1:{d2.port}",
                              "--function", fn], stdout=subprocess.DEVNULL)
        try:
            long_lived = _roundtrips(d2.port, fn, args.jobs)
        finally:
            w.kill()
            w.wait()
            d2.stop()
    floor = []
    for _ in range(10):
        t0 = time.perf_counter()
        subprocess.run(["php", "-r", ""], check=True)
        floor.append(time.perf_counter() - t0)
    st = doc["runners"][0]["startup_ms"]
    load = os.getloadavg()
    print(f"jobs: {args.jobs} ({args.family} fixture tree); load average {load[0]:.2f} "
          f"on {os.cpu_count()} CPUs")
    print(f"per-job runner   start-up (process start -> run()): p50 {st['p50']} ms, "
          f"max {st['max']} ms")
    print(f"per-job runner   round trip SUBMIT_JOB -> WORK_COMPLETE: p50 "
          f"{statistics.median(per_job) * 1000:.1f} ms, p90 {_pct(per_job, 0.9) * 1000:.1f} ms")
    print(f"long-lived worker round trip SUBMIT_JOB -> WORK_COMPLETE: p50 "
          f"{statistics.median(long_lived) * 1000:.2f} ms, p90 "
          f"{_pct(long_lived, 0.9) * 1000:.2f} ms")
    print(f"php -r '' (any PHP process): p50 {statistics.median(floor) * 1000:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
