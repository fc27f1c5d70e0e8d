"""/metrics in the Prometheus text format, collected at scrape time.

Nothing here runs on a job's path: the broker keeps plain counters and bucket arrays per
function (atomnode.system.stats), the store its commit-latency histogram, the supervisor
its exit counts; this collector turns them into prometheus_client metric families when
Prometheus asks, with prometheus_client's own exposition code.
"""

from __future__ import annotations

import weakref
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

from ..system.names import strip_atom_prefix
from ..system.stats import Histogram


def _buckets(h: Histogram) -> list[tuple[str, float]]:
    out, total = [], 0
    for bound, c in zip(list(h.bounds) + [float("inf")], h.counts):
        total += c
        out.append(("+Inf" if bound == float("inf") else repr(float(bound)), total))
    return out


class DaemonCollector(Collector):
    """Reads the running daemon's state; registered in a registry of its own (no process
    or platform collectors from the global one: the console is not the only user)."""

    def __init__(self, daemon: Any):
        self.daemon = daemon

    def collect(self):  # type: ignore[override]
        d = self.daemon
        broker = d.broker
        if broker is None:
            return
        labels = ["function", "job_class"]
        fam = {
            "submitted": CounterMetricFamily(
                "atomnode_jobs_submitted", "New jobs submitted (coalesced ones not counted)",
                labels=labels),
            "completed": CounterMetricFamily(
                "atomnode_jobs_completed", "Jobs a worker completed", labels=labels),
            "failed": CounterMetricFamily(
                "atomnode_jobs_failed",
                "Jobs that failed (WORK_FAIL, WORK_EXCEPTION, or past max_attempts)",
                labels=labels),
            "retried": CounterMetricFamily(
                "atomnode_jobs_retried",
                "Running jobs put back in the queue (worker lost, timeout)", labels=labels),
            "cancelled": CounterMetricFamily(
                "atomnode_jobs_cancelled", "Queued jobs cancelled by an operator",
                labels=labels),
        }
        queued = GaugeMetricFamily("atomnode_jobs_queued", "Jobs waiting for a worker",
                                   labels=labels)
        running = GaugeMetricFamily("atomnode_jobs_running", "Jobs a worker holds",
                                    labels=labels)
        fworkers = GaugeMetricFamily("atomnode_function_workers",
                                     "Connections that can do the function", labels=labels)
        wait = HistogramMetricFamily(
            "atomnode_job_queue_wait_seconds",
            "Seconds from submission to the first start", labels=labels)
        run = HistogramMetricFamily(
            "atomnode_job_run_seconds", "Seconds from start to the end of the attempt",
            labels=labels)
        for fn in list(broker.functions.values()):
            name = fn.name.decode("utf-8", "replace")
            lv = [name, strip_atom_prefix(name)]
            st = fn.stats
            for key, f in fam.items():
                f.add_metric(lv, getattr(st, key))
            queued.add_metric(lv, fn.queued)
            running.add_metric(lv, fn.running)
            fworkers.add_metric(lv, len(fn.workers))
            wait.add_metric(lv, _buckets(st.wait), st.wait.sum)
            run.add_metric(lv, _buckets(st.run), st.run.sum)
        yield from fam.values()
        yield from (queued, running, fworkers, wait, run)

        conns = GaugeMetricFamily("atomnode_connections", "Open Gearman connections",
                                  labels=["kind"])
        n_workers = sum(1 for c in broker.conns.values() if c.functions)
        conns.add_metric(["worker"], n_workers)
        conns.add_metric(["client"], len(broker.conns) - n_workers)
        yield conns

        store = d.store
        if store is not None:
            h = store.commit_seconds
            commit = HistogramMetricFamily(
                "atomnode_store_commit_seconds", "Seconds from BEGIN to COMMIT of a batch")
            commit.add_metric([], _buckets(h), h.sum)
            yield commit
            yield GaugeMetricFamily("atomnode_store_healthy",
                                    "1 when the last write to the queue database succeeded",
                                    value=1 if store.healthy else 0)
            yield GaugeMetricFamily("atomnode_store_pending",
                                    "State changes waiting for the writer", value=store.pending)

        sup = d.supervisor
        if sup is not None:
            states = GaugeMetricFamily("atomnode_pool_workers", "Pool workers by state",
                                       labels=["pool", "state"])
            for pool in sup.snapshot():
                counts: dict[str, int] = {}
                for w in pool["workers"]:
                    counts[w["state"]] = counts.get(w["state"], 0) + 1
                for state in ("starting", "idle", "busy", "running", "draining", "waiting",
                              "backing off"):
                    states.add_metric([pool["name"], state], counts.get(state, 0))
            yield states
            exits = CounterMetricFamily(
                "atomnode_pool_worker_exits",
                "Worker process exits by pool and kind (planned, crash, signal, stopped)",
                labels=["pool", "kind"])
            for (pool_name, kind), n in sorted(sup.exits.items()):
                exits.add_metric([pool_name, kind], n)
            yield exits

        up = GaugeMetricFamily("atomnode_start_time_seconds",
                               "Unix time the daemon started", value=d.started_at)
        yield up


#: One collector registry per daemon, kept here rather than on the daemon object.
_REGISTRIES: weakref.WeakKeyDictionary[Any, CollectorRegistry] = weakref.WeakKeyDictionary()


def render_metrics(daemon: Any) -> tuple[bytes, str]:
    """The exposition text and its content type."""
    registry = _REGISTRIES.get(daemon)
    if registry is None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(DaemonCollector(daemon))
        _REGISTRIES[daemon] = registry
    return generate_latest(registry), CONTENT_TYPE_LATEST
