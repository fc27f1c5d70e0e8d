"""The floor under the durable background latency row: how long one small write plus
``fdatasync`` takes on the disk the bench's databases live on, paced like that row.

A durable background job is offered to a worker only after its commit, and a commit in
SQLite's WAL mode under ``synchronous=FULL`` is one append to the log and one
``fdatasync`` of it. No design that acknowledges after the data is on disk can answer
faster than that call; this measures it in the same run, in the same directory, so that
the row's figure can be read against it. Prints one RESULT line like loadgen's.

    python fsync_probe.py DIR [--count N] [--rate R]
"""

from __future__ import annotations

import argparse
import os
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir")
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=200.0)
    args = ap.parse_args()
    path = os.path.join(args.dir, "fsync-probe.log")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    frame = b"\x5a" * 4120  # a WAL frame: 24-byte header and one 4 KiB page
    try:
        # The log already has its size, as SQLite's WAL has once in use: appends at
        # the front overwrite it, and fdatasync need not journal a new file size.
        os.write(fd, frame * 64)
        os.fsync(fd)
        took = []
        interval = 1.0 / args.rate
        next_at = time.perf_counter()
        for i in range(args.count):
            os.pwrite(fd, frame, (i % 64) * len(frame))
            t0 = time.perf_counter()
            os.fdatasync(fd)
            took.append(time.perf_counter() - t0)
            next_at += interval
            pause = next_at - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
    finally:
        os.close(fd)
        os.unlink(path)
    took.sort()
    n = len(took)
    print(f"RESULT workload=fsync label=disk/fsync jobs={n} "
          f"p50_us={took[n // 2] * 1e6:.0f} p99_us={took[min(n - 1, n * 99 // 100)] * 1e6:.0f} "
          f"max_us={took[-1] * 1e6:.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
