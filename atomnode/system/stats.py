"""Per-function job counters and time histograms, kept by the broker on the job path.

Pure state, no I/O and no third-party import: an update is one integer increment or one
bisect over a short tuple of bucket bounds. The web console's ``/metrics`` reads these at
scrape time (atomnode.console.metrics) and its charts sample them on a timer, so nothing
on a job's path ever waits on a lock, a registry or the disk.
"""

from __future__ import annotations

from bisect import bisect_left

#: Upper bounds (seconds) of the time buckets: queue waits of AtoM jobs range from
#: milliseconds (idle workers) to hours (a backlog); run times likewise.
TIME_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
    300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0,
)


class Histogram:
    """Counts of observations per bucket (Prometheus semantics: ``le`` upper bounds, the
    last bucket is +Inf) and their sum. ``counts`` are per bucket, not cumulative."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = TIME_BUCKETS):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def copy(self) -> Histogram:
        h = Histogram(self.bounds)
        h.counts = list(self.counts)
        h.sum = self.sum
        return h

    def quantile(self, q: float, since: Histogram | None = None) -> float | None:
        """The q-quantile of the observations (those after ``since``, a copy taken
        earlier), linearly interpolated inside its bucket; None without observations."""
        counts = self.counts
        if since is not None:
            counts = [a - b for a, b in zip(counts, since.counts)]
        total = sum(counts)
        if total <= 0:
            return None
        rank = q * total
        seen = 0
        for i, c in enumerate(counts):
            if c and seen + c >= rank:
                lo = self.bounds[i - 1] if i > 0 else 0.0
                hi = self.bounds[i] if i < len(self.bounds) else lo * 2 or 1.0
                return lo + (hi - lo) * ((rank - seen) / c)
            seen += c
        return self.bounds[-1]


class FunctionStats:
    """What happened to one function's jobs since the daemon started."""

    __slots__ = ("cancelled", "completed", "failed", "retried", "run", "submitted", "wait")

    def __init__(self) -> None:
        self.submitted = 0  # new jobs (a coalesced submission is not a new job)
        self.completed = 0  # WORK_COMPLETE
        self.failed = 0  # WORK_FAIL/EXCEPTION, or given up after max attempts
        self.retried = 0  # a running job went back to the queue (worker lost, timeout)
        self.cancelled = 0
        self.wait = Histogram()  # submission -> first start
        self.run = Histogram()  # start -> end of the attempt that finished it
