"""Tests of bench/loadgen: it measures real servers, and it catches servers that misbehave.

Run: .venv/bin/python -m pytest bench/test_loadgen.py

A small fake Gearman server (trio, in this file) can be told to misbehave in one way; loadgen
must then exit 1 and say why. The same workloads also run against gearmand 1.1.20 when
/usr/sbin/gearmand exists. Nothing here imports atomnode: loadgen is a third party to it.
"""

from __future__ import annotations

import collections
import os
import signal
import socket
import struct
import subprocess
import tempfile
from functools import partial
from pathlib import Path

import pytest
import trio

HERE = Path(__file__).resolve().parent
LOADGEN = HERE / "out" / "loadgen"
GEARMAND = "/usr/sbin/gearmand"

JOB_CREATED, NO_JOB, JOB_ASSIGN, NOOP, ERROR, JOB_ASSIGN_UNIQ, WORK_COMPLETE = 8, 10, 11, 6, 19, 31, 13


@pytest.fixture(scope="session", autouse=True)
def build_loadgen() -> None:
    """Compile loadgen as run.sh does (gcc -O2)."""
    LOADGEN.parent.mkdir(exist_ok=True)
    subprocess.run(
        ["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-std=gnu11", "-o", str(LOADGEN),
         str(HERE / "loadgen.c"), "-lm"],
        check=True,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def result_fields(stdout: str) -> dict[str, str]:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    assert len(lines) == 1, stdout
    return dict(kv.split("=", 1) for kv in lines[0].split()[1:])


def res(ptype: int, *args: bytes) -> bytes:
    body = b"\0".join(args)
    return b"\0RES" + struct.pack(">II", ptype, len(body)) + body


class FakeServer:
    """Just enough of a Gearman server for loadgen, with one optional fault."""

    def __init__(self, fault: str = "") -> None:
        self.fault = fault
        self.queue: collections.deque[tuple[bytes, bytes, bytes, bytes]] = collections.deque()
        self.sleepers: list[trio.SocketStream] = []
        self.waiting: dict[bytes, trio.SocketStream] = {}  # handle -> foreground client
        self.locks: dict[trio.SocketStream, trio.Lock] = {}
        self.abilities: dict[trio.SocketStream, set[bytes]] = collections.defaultdict(set)
        self.counter = 0
        self.assigned = 0

    async def send(self, stream: trio.SocketStream, data: bytes) -> None:
        async with self.locks[stream]:
            await stream.send_all(data)

    async def handle(self, stream: trio.SocketStream) -> None:
        self.locks[stream] = trio.Lock()
        buf = b""
        try:
            while True:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return
                buf += chunk
                if not buf.startswith(b"\0"):
                    if b"\n" in buf:
                        await self.send(stream, self.status_reply())
                        return
                    continue
                while len(buf) >= 12:
                    ptype, size = struct.unpack(">II", buf[4:12])
                    if len(buf) < 12 + size:
                        break
                    body, buf = buf[12 : 12 + size], buf[12 + size :]
                    await self.packet(stream, ptype, body)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        finally:
            if stream in self.sleepers:
                self.sleepers.remove(stream)

    def status_reply(self) -> bytes:
        if self.fault == "bad-status":
            return b"loadgen\tmany\t0\t0\n.\n"
        return b"loadgen\t%d\t0\t0\n.\n" % len(self.queue)

    async def packet(self, stream: trio.SocketStream, ptype: int, body: bytes) -> None:
        if ptype in (7, 18):  # SUBMIT_JOB, SUBMIT_JOB_BG
            func, uniq, data = body.split(b"\0", 2)
            self.counter += 1
            n = 1 if self.fault == "same-handle" else self.counter
            handle = b"H:fake:%d" % n
            if self.fault == "error" and self.counter == 3:
                await self.send(stream, res(ERROR, b"QUEUE_ERROR", b"Job queue is full"))
                return
            await self.send(stream, res(JOB_CREATED, handle))
            if ptype == 7:
                self.waiting[handle] = stream
            self.queue.append((handle, func, uniq, data))
            # Take the sleepers out before any await: other tasks run during a send.
            woken = [w for w in self.sleepers if func in self.abilities[w]]
            self.sleepers = [w for w in self.sleepers if w not in woken]
            for w in woken:
                await self.send(w, res(NOOP))
        elif ptype in (9, 30):  # GRAB_JOB, GRAB_JOB_UNIQ
            mine = [job for job in self.queue if job[1] in self.abilities[stream]]
            if not mine:
                await self.send(stream, res(NO_JOB))
                return
            self.queue.remove(mine[0])
            handle, func, uniq, data = mine[0]
            self.assigned += 1
            if self.fault == "duplicate" and self.assigned == 2:
                self.queue.append((handle, func, uniq, data))
            if self.fault == "corrupt" and self.assigned == 2:
                data = data[:-1] + b"!"
            if self.fault == "wrong-unique" and self.assigned == 2:
                uniq = uniq + b"x"
            if ptype == 30:
                await self.send(stream, res(JOB_ASSIGN_UNIQ, handle, func, uniq, data))
            else:
                await self.send(stream, res(JOB_ASSIGN, handle, func, data))
        elif ptype == 4:  # PRE_SLEEP
            if any(job[1] in self.abilities[stream] for job in self.queue):
                await self.send(stream, res(NOOP))
            else:
                self.sleepers.append(stream)
        elif ptype == 13:  # WORK_COMPLETE
            handle, result = body.split(b"\0", 1)
            client = self.waiting.pop(handle, None)
            if client is not None:
                if self.fault == "wrong-result":
                    result = result[::-1]
                await self.send(client, res(WORK_COMPLETE, handle, result))
        elif ptype == 1:  # CAN_DO
            self.abilities[stream].add(body)
        # SET_CLIENT_ID: nothing to answer


async def run_loadgen(port: int, *args: str) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process(
        [str(LOADGEN), *args, "-p", str(port), "-t", "20"], capture_stdout=True,
        capture_stderr=True, check=False,
    )


async def with_fake(fault: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    server = FakeServer(fault)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, server.handle, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        proc = await run_loadgen(port, *args)
        nursery.cancel_scope.cancel()
    return proc


WORKLOADS = [
    ("submit-bg", "-n", "300", "-c", "3", "-w", "4"),
    ("drain", "-n", "300", "-c", "2", "-k", "3"),
    ("roundtrip", "-n", "300", "-c", "2", "-w", "4", "-k", "2"),
    ("roundtrip", "-n", "50", "-c", "1", "-w", "1", "-k", "1", "--grab", "plain"),
    ("depth", "-n", "100", "--depth", "300"),
]


@pytest.mark.parametrize("args", WORKLOADS, ids=lambda a: " ".join(a[:1] + a[-2:]))
async def test_workloads_pass_against_a_correct_server(args: tuple[str, ...]) -> None:
    proc = await with_fake("", *args)
    assert proc.returncode == 0, proc.stderr.decode()
    fields = result_fields(proc.stdout.decode())
    assert fields["workload"] == args[0]
    assert int(fields["jobs"]) == int(args[2])
    assert float(fields["jobs_per_s"]) > 0


@pytest.mark.parametrize(
    ("fault", "args", "message"),
    [
        ("duplicate", ("drain", "-n", "50", "-k", "2"), "delivered twice"),
        ("corrupt", ("drain", "-n", "50", "-k", "2"), "payload corrupted"),
        ("wrong-unique", ("drain", "-n", "50", "-k", "2"), "has unique"),
        ("same-handle", ("submit-bg", "-n", "50"), "given to two jobs"),
        ("error", ("submit-bg", "-n", "50"), "QUEUE_ERROR"),
        ("wrong-result", ("roundtrip", "-n", "50", "-k", "1"), "wrong result"),
        ("bad-status", ("status", "-f", "loadgen"), "non-numeric"),
    ],
)
async def test_misbehaving_server_is_caught(fault: str, args: tuple[str, ...], message: str) -> None:
    proc = await with_fake(fault, *args)
    assert proc.returncode == 1, proc.stdout.decode()
    assert message in proc.stderr.decode()
    assert b"RESULT" not in proc.stdout


@pytest.mark.parametrize("mode", [(), ("--foreground",)], ids=["background", "foreground"])
async def test_grab_latency_counts_idle_and_busy_grabs(mode: tuple[str, ...]) -> None:
    proc = await with_fake(
        "", "grab-latency", "--duration", "0.3", "-c", "1", "-w", "2", "-k", "1",
        "--idle-workers", "1", "--grab", "plain", *mode,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    fields = result_fields(proc.stdout.decode())
    assert int(fields["idle_samples"]) > 0
    assert int(fields["busy_samples"]) > 0
    assert int(fields["grab_samples"]) == int(fields["idle_samples"]) + int(fields["busy_samples"])
    assert fields["foreground"] == ("1" if mode else "0")
    assert int(fields["jobs"]) > 0  # acknowledged (background) or completed (foreground)


async def test_bg_latency_paces_submits_and_times_each_job_to_its_assignment() -> None:
    proc = await with_fake(
        "", "bg-latency", "-n", "40", "--rate", "400", "-c", "1", "-k", "1", "--grab", "plain",
    )
    assert proc.returncode == 0, proc.stderr.decode()
    fields = result_fields(proc.stdout.decode())
    assert fields["workload"] == "bg-latency"
    assert int(fields["assign_samples"]) == 40
    assert int(fields["submit_samples"]) == 40
    # Job i is released at i/400 s: 40 jobs cannot take less than 39/400 s.
    assert float(fields["seconds"]) >= 39 / 400
    assert int(fields["assign_p50_us"]) <= int(fields["assign_p99_us"])
    # The worker slept between jobs (PRE_SLEEP, woken by NOOP): an idle worker each time.
    assert int(fields["worker_sleeps"]) >= 2


async def test_bg_latency_needs_a_rate() -> None:
    proc = await with_fake("", "bg-latency", "-n", "10", "-c", "1", "-k", "1")
    assert proc.returncode == 3
    assert b"--rate" in proc.stderr


async def test_status_waits_for_a_server_that_starts_later() -> None:
    port = free_port()
    server = FakeServer()
    async with trio.open_nursery() as nursery:
        started = trio.Event()

        async def late_server() -> None:
            # The listener is opened only once loadgen has been started and is retrying.
            await started.wait()
            await trio.serve_tcp(server.handle, port, host="127.0.0.1")

        nursery.start_soon(late_server)

        async def probe() -> subprocess.CompletedProcess[bytes]:
            started.set()
            return await run_loadgen(port, "status", "--wait", "-f", "loadgen")

        proc = await probe()
        nursery.cancel_scope.cancel()
    assert proc.returncode == 0, proc.stderr.decode()
    assert result_fields(proc.stdout.decode())["found"] == "1"


async def test_no_server_is_a_timeout_with_wait_and_an_error_without() -> None:
    port = free_port()
    proc = await run_loadgen(port, "status")
    assert proc.returncode == 1
    proc = await trio.run_process(
        [str(LOADGEN), "status", "--wait", "-p", str(port), "-t", "0.2"],
        capture_stdout=True, capture_stderr=True, check=False,
    )
    assert proc.returncode == 2


def test_freeport_is_bindable_and_not_4730() -> None:
    port = int(subprocess.run([str(LOADGEN), "freeport"], capture_output=True, check=True).stdout)
    assert port != 4730
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


@pytest.fixture
def gearmand_port():
    """A real gearmand 1.1.20 (-t 1, in memory) on a free port, killed afterwards."""
    if not os.access(GEARMAND, os.X_OK):
        pytest.skip("gearmand (gearman-job-server) not installed")
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen(
            [GEARMAND, "-L", "127.0.0.1", "-p", str(port), "-t", "1", "-l", f"{tmp}/log"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            subprocess.run(
                [str(LOADGEN), "status", "--wait", "-p", str(port), "-t", "10", "-f", ""],
                check=True, capture_output=True,
            )
            yield port, proc.pid
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()


def lg(port: int, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([str(LOADGEN), *args, "-p", str(port), "-t", "30"],
                          capture_output=True, check=False)


@pytest.mark.interop
def test_submit_and_status_against_gearmand(gearmand_port) -> None:
    port, pid = gearmand_port
    out = lg(port, "submit-bg", "-n", "2000", "-f", "a", "--pid", str(pid))
    assert out.returncode == 0, out.stderr.decode()
    fields = result_fields(out.stdout.decode())
    assert int(fields["rss_end_kb"]) > int(fields["rss_start_kb"])
    out = lg(port, "status", "-f", "a")
    assert result_fields(out.stdout.decode())["total"] == "2000"


@pytest.mark.interop
def test_drain_refuses_jobs_of_another_run_and_accepts_its_own(gearmand_port) -> None:
    port, _ = gearmand_port
    assert lg(port, "submit-bg", "-n", "500", "-f", "b", "--unique-prefix", "run1").returncode == 0
    other = lg(port, "drain", "--no-prefill", "-n", "500", "-k", "2", "-f", "b",
               "--unique-prefix", "run2")
    assert other.returncode == 1
    assert b"has unique" in other.stderr
    assert lg(port, "submit-bg", "-n", "500", "-f", "c", "--unique-prefix", "run1").returncode == 0
    own = lg(port, "drain", "--no-prefill", "-n", "500", "-k", "2", "-f", "c",
             "--unique-prefix", "run1")
    assert own.returncode == 0, own.stderr.decode()
    assert result_fields(own.stdout.decode())["jobs"] == "500"


@pytest.mark.interop
@pytest.mark.parametrize(
    "args", [
        ("roundtrip", "-n", "3000"),
        ("grab-latency", "--duration", "0.5", "--grab", "plain"),
        ("bg-latency", "-n", "100", "--rate", "500", "-c", "1", "-k", "1", "--grab", "plain",
         "--poll", "1"),
    ],
)
def test_roundtrip_and_grab_latency_against_gearmand(gearmand_port, args: tuple[str, ...]) -> None:
    port, pid = gearmand_port
    out = lg(port, *args, "-f", "rt", "--pid", str(pid))
    assert out.returncode == 0, out.stderr.decode()
    fields = result_fields(out.stdout.decode())
    assert fields["workload"] == args[0]
    assert float(fields["cpu_us_per_job"]) >= 0
