"""PyPI ``gear`` client and worker (the worker fetches with GRAB_JOB_UNIQ)."""

from __future__ import annotations

import queue
import random
import threading
from collections.abc import Callable, Iterator

import gear
import pytest
from gearwire import wait_for, wait_status

TIMEOUT = 10
pytestmark = pytest.mark.filterwarnings("ignore:notifyAll:DeprecationWarning")


class RecordingClient(gear.Client):
    """A gear client that reports every job event on a queue, in arrival order."""

    def __init__(self) -> None:
        super().__init__("interop-client")
        self.events: queue.Queue = queue.Queue()

    def _record(self, kind: str, job: gear.Job, *extra: object) -> gear.Job:
        self.events.put((kind, job, *extra))
        return job

    def handleWorkComplete(self, packet):
        return self._record("complete", super().handleWorkComplete(packet))

    def handleWorkFail(self, packet):
        return self._record("fail", super().handleWorkFail(packet))

    def handleWorkException(self, packet):
        return self._record("exception", super().handleWorkException(packet))

    def handleWorkData(self, packet):
        return self._record("data", super().handleWorkData(packet), packet.getArgument(1, True))

    def handleWorkWarning(self, packet):
        return self._record(
            "warning", super().handleWorkWarning(packet), packet.getArgument(1, True)
        )

    def handleWorkStatus(self, packet):
        job = super().handleWorkStatus(packet)
        return self._record("status", job, job.numerator, job.denominator)

    def next_event(self) -> tuple:
        try:
            return self.events.get(timeout=TIMEOUT)
        except queue.Empty:
            raise AssertionError("no job event from the server in time") from None

    def wait_done(self, job: gear.Job) -> list[tuple]:
        """Events up to and including the job's terminal one (complete/fail/exception)."""
        seen = []
        while True:
            ev = self.next_event()
            if ev[1] is not job:
                continue
            seen.append(ev)
            if ev[0] in ("complete", "fail", "exception"):
                return seen


@pytest.fixture
def gclient(server) -> Iterator[RecordingClient]:
    c = RecordingClient()
    c.addServer(server.host, server.port)
    try:
        c.waitForServer(TIMEOUT)
        yield c
    finally:
        c.shutdown()


@pytest.fixture
def gworker(server) -> Iterator[Callable[[str, Callable], queue.Queue]]:
    """Start gear workers: ``gworker(func, handler)``; handler(job) must finish the job.

    Returns a queue that receives every job the worker took.
    """
    workers: list[gear.Worker] = []
    threads: list[threading.Thread] = []

    def start(func: str, handler: Callable[[gear.WorkerJob], None]) -> queue.Queue:
        taken: queue.Queue = queue.Queue()
        w = gear.Worker("interop-worker")
        w.addServer(server.host, server.port)
        w.waitForServer(TIMEOUT)
        w.registerFunction(func)
        workers.append(w)

        def loop() -> None:
            while True:
                try:
                    job = w.getJob()
                except Exception:  # noqa: BLE001 -- InterruptedError on shutdown, or a lost server
                    return
                taken.put(job)
                handler(job)

        t = threading.Thread(target=loop, daemon=True)
        t.start()
        threads.append(t)
        wait_status(server.host, server.port, func, lambda r: r[2] >= 1)
        return taken

    yield start
    for w in workers:
        # gear's shutdown waits up to 5 s for a GRAB_JOB_UNIQ in flight to be answered, and
        # its poll thread stops reading first: let the worker settle asleep before stopping it.
        try:
            wait_for(lambda w=w: all(c.state == "SLEEP" for c in w.active_connections), timeout=2)
        except AssertionError:
            pass
        w.shutdown()
    for t in threads:
        t.join(TIMEOUT)


def echo(job: gear.WorkerJob) -> None:
    job.sendWorkComplete(job.arguments)


def test_gear_foreground_with_unique(server, func, gclient, gworker) -> None:
    taken = gworker(func, echo)
    job = gear.Job(func, b"gear-data", unique="gear-unique-1")
    gclient.submitJob(job, timeout=TIMEOUT)
    assert job.handle.startswith(b"H:")
    events = gclient.wait_done(job)
    assert [e[0] for e in events] == ["complete"]
    assert b"".join(job.data) == b"gear-data"
    got = taken.get(timeout=TIMEOUT)
    assert got.handle == job.handle
    assert got.unique == b"gear-unique-1"  # JOB_ASSIGN_UNIQ carries the unique


def test_gear_background_then_worker(server, func, gclient, gworker) -> None:
    job = gear.Job(func, b"bg", unique="gear-bg-1")
    gclient.submitJob(job, background=True, precedence=gear.PRECEDENCE_LOW, timeout=TIMEOUT)
    wait_status(server.host, server.port, func, lambda r: r == (1, 0, 0))
    taken = gworker(func, echo)
    got = taken.get(timeout=TIMEOUT)
    assert (got.handle, got.arguments, got.unique) == (job.handle, b"bg", b"gear-bg-1")
    wait_status(server.host, server.port, func, lambda r: r[0] == 0)


@pytest.mark.parametrize("size", [3, 1 << 20])
def test_gear_binary_payload_byte_for_byte(server, func, gclient, gworker, size) -> None:
    payload = b"\0" + random.Random(size).randbytes(size - 2) + b"\0"
    taken = gworker(func, echo)
    job = gear.Job(func, payload)
    gclient.submitJob(job, timeout=TIMEOUT)
    gclient.wait_done(job)
    assert taken.get(timeout=TIMEOUT).arguments == payload
    assert b"".join(job.data) == payload


def test_gear_status_data_warning_in_order(server, func, gclient, gworker) -> None:
    def progress(job: gear.WorkerJob) -> None:
        job.sendWorkStatus(1, 3)
        job.sendWorkData(b"chunk\0one")
        job.sendWorkWarning(b"careful")
        job.sendWorkStatus(3, 3)
        job.sendWorkComplete(b"final")

    gworker(func, progress)
    job = gear.Job(func, b"x")
    gclient.submitJob(job, timeout=TIMEOUT)
    events = [(e[0], *e[2:]) for e in gclient.wait_done(job)]
    assert events == [
        ("status", b"1", b"3"),
        ("data", b"chunk\0one"),
        ("warning", b"careful"),
        ("status", b"3", b"3"),
        ("complete",),
    ]
    assert job.data == [b"chunk\0one", b"careful", b"final"]


def test_gear_fail(server, func, gclient, gworker) -> None:
    gworker(func, lambda job: job.sendWorkFail())
    job = gear.Job(func, b"x")
    gclient.submitJob(job, timeout=TIMEOUT)
    assert [e[0] for e in gclient.wait_done(job)] == ["fail"]
    assert job.failure


def test_gear_exception_with_option(server, func, gclient, gworker) -> None:
    assert gclient.setOption(b"exceptions", timeout=TIMEOUT)
    gworker(func, lambda job: job.sendWorkException(b"trace\0back"))
    job = gear.Job(func, b"x")
    gclient.submitJob(job, timeout=TIMEOUT)
    assert [e[0] for e in gclient.wait_done(job)] == ["exception"]
    assert job.exception == b"trace\0back"
