"""Worker supervision (atomnode.workers.supervisor) with real child processes and a fake registry.

Time-dependent behaviour (backoff, drain timeouts, age limits) runs under trio's MockClock.
Where a real process must react to a signal before a mock deadline passes, the clock only
jumps after a short real-time pause (``patient_clock``), so the child gets to act first.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
import trio.testing

from atomnode.system.config import PoolConfig, WaitFor
from atomnode.workers.supervisor import Supervisor

PY = sys.executable


@pytest.fixture
def patient_clock() -> trio.testing.MockClock:
    """Mock time that jumps only after 0.3 s of real idleness (children get to run)."""
    return trio.testing.MockClock(autojump_threshold=0.3)


# ---------------------------------------------------------------- fake registry


@dataclass
class FakeConn:
    conn_id: int
    peer: tuple[str, int] = ("127.0.0.1", 1)
    local: tuple[str, int] = ("127.0.0.1", 4730)
    client_id: str = ""
    abilities: tuple[str, ...] = ("f",)
    jobs: tuple[str, ...] = ()
    jobs_done: int = 0
    draining: bool = False


@dataclass
class FakeRegistry:
    conns: dict[int, FakeConn] = field(default_factory=dict)
    drained: list[int] = field(default_factory=list)
    lot: trio.lowlevel.ParkingLot = field(default_factory=trio.lowlevel.ParkingLot)
    next_id: int = 1

    def add(self, **kw: Any) -> FakeConn:
        c = FakeConn(self.next_id, **kw)
        self.next_id += 1
        self.conns[c.conn_id] = c
        return c

    def set(self, conn: FakeConn, **kw: Any) -> None:
        for k, v in kw.items():
            setattr(conn, k, v)
        self.lot.unpark_all()

    def connections(self) -> list[FakeConn]:
        return list(self.conns.values())

    def drain(self, conn_id: int) -> None:
        self.drained.append(conn_id)
        self.conns[conn_id].draining = True

    async def wait_idle(self, conn_id: int) -> None:
        while conn_id in self.conns and self.conns[conn_id].jobs:
            await self.lot.park()


# ---------------------------------------------------------------- helpers


def pool(name: str = "atom", command: tuple[str, ...] = ("sleep", "1000"), **kw: Any) -> PoolConfig:
    return PoolConfig(name=name, command=command, **kw)


def sh(script: str) -> tuple[str, ...]:
    return ("/bin/sh", "-c", script)


@asynccontextmanager
async def running(pools: list[PoolConfig], registry: Any = None, **kw: Any
                  ) -> AsyncIterator[Supervisor]:
    sup = Supervisor(pools, registry, **kw)
    async with trio.open_nursery() as n:
        await n.start(sup.run)
        yield sup
        # No fail_after here: under autojump a mock deadline would fire while a real
        # process is being reaped.
        await sup.shutdown(30)
        n.cancel_scope.cancel()


def events(sup: Supervisor, kind: str, pool_name: str | None = None) -> list[tuple]:
    return [e for e in sup.events if e[3] == kind and (pool_name is None or e[1] == pool_name)]


def live_pids(sup: Supervisor, pool_name: str = "atom") -> list[int]:
    for p in sup.snapshot():
        if p["name"] == pool_name:
            return [w["pid"] for w in p["workers"] if w["pid"] is not None]
    return []


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False

async def exits(pid: int) -> None:
    """Return once ``pid`` has exited (pidfd: an event, not a poll)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        await trio.lowlevel.wait_readable(fd)
    finally:
        os.close(fd)



class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self, logger_prefix: str = "") -> list[str]:
        return [r.getMessage() for r in self.records if r.name.startswith(logger_prefix)]


@pytest.fixture
def logs() -> Any:
    h = Records()
    root = logging.getLogger("atomnode")
    old = root.level
    root.addHandler(h)
    root.setLevel(logging.DEBUG)
    try:
        yield h
    finally:
        root.removeHandler(h)
        root.setLevel(old)


async def wait_log(sup: Supervisor, logs: Records, pred: Callable[[str], bool]) -> str:
    found: list[str] = []

    def check() -> bool:
        found[:] = [m for m in logs.messages("atomnode.worker.") if pred(m)]
        return bool(found)

    await sup.wait_until(check)
    return found[0]


# ---------------------------------------------------------------- restart policy


async def test_planned_exit_restarts_at_once_without_backoff() -> None:
    cfg = pool(command=sh("exit 111"), backoff_initial=50)
    async with running([cfg]) as sup:
        with trio.fail_after(20):
            await sup.wait_until(lambda: len(events(sup, "spawned")) >= 4)
        assert [e[5] for e in events(sup, "exited")][:3] == [111, 111, 111]
        assert events(sup, "backoff") == []


async def test_crash_backs_off_exponentially_capped_and_never_gives_up(
    patient_clock: Any, logs: Records
) -> None:
    cfg = pool(command=sh("exit 1"), backoff_initial=1, backoff_max=8)
    # No monitor ticks and no stability reset: the only deadlines are the backoffs.
    async with running([cfg], check_interval=1e6, stable_after=1e9) as sup:
        await sup.wait_until(lambda: len(events(sup, "spawned")) >= 8)
        spawned = [e[0] for e in events(sup, "spawned")]
        exited = [e[0] for e in events(sup, "exited")]
        gaps = [s - x for x, s in zip(exited, spawned[1:])]
        delays = [e[5] for e in events(sup, "backoff")]
        assert delays[:7] == [1, 2, 4, 8, 8, 8, 8]
        assert all(g >= d - 1e-9 for g, d in zip(gaps, delays))
        msgs = logs.messages("atomnode.supervisor")
        assert any(m.endswith("worker exited with code 1; restarting in 4s") for m in msgs)
        # Seen while backing off: state, detail and the systemd summary.
        await sup.wait_until(lambda: bool(sup.snapshot()[0]["workers"])
                             and sup.snapshot()[0]["workers"][0]["state"] == "backing off")
        w = sup.snapshot()[0]["workers"][0]
        assert w["detail"] == "next try in 8s" and w["pid"] is None
        assert sup.summary() == "atom 0/1 backing off 8s"


async def test_backoff_resets_after_a_stable_run(autojump_clock: Any) -> None:
    # Up 2 s each time, crash: with stable_after 1 s the delay never grows.
    cfg = pool(command=(PY, "-c", "import time; time.sleep(0); raise SystemExit(3)"),
               backoff_initial=1, backoff_max=64)
    async with running([cfg], stable_after=0.0) as sup:
        await sup.wait_until(lambda: len(events(sup, "backoff")) >= 3)
        assert [e[5] for e in events(sup, "backoff")][:3] == [1, 1, 1]


async def test_spawn_failure_backs_off(autojump_clock: Any) -> None:
    cfg = pool(command=("/nonexistent/worker",), backoff_initial=1, backoff_max=4)
    async with running([cfg]) as sup:
        await sup.wait_until(lambda: len(events(sup, "spawn-failed")) >= 4)
        assert [e[5] for e in events(sup, "backoff")][:4] == [1, 2, 4, 4]


async def test_wait_for_a_closed_port_then_start_when_it_opens(autojump_clock: Any) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = pool(wait_for=(WaitFor("mysql", "127.0.0.1", port),))
    async with running([cfg], wait_retry=5) as sup:
        w = sup.snapshot()[0]["workers"][0]
        assert w["state"] == "waiting"
        assert w["detail"] == f"waiting for mysql (127.0.0.1:{port})"
        assert "waiting for mysql" in sup.summary()
        await trio.sleep(62)  # between two probes (every 5 s from 0)
        assert events(sup, "spawned") == [] and events(sup, "backoff") == []
        listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
        try:
            before = len(events(sup, "waiting"))
            await sup.wait_until(lambda: len(events(sup, "spawned")) == 1)
            assert len(events(sup, "waiting")) == before  # started at the next probe
        finally:
            for lst in listeners:
                await lst.aclose()


# ---------------------------------------------------------------- drain and stop


async def test_drain_waits_until_idle_before_sigterm(patient_clock: Any) -> None:
    reg = FakeRegistry()
    cfg = pool(drain_timeout=300, stop_grace=10)
    async with running([cfg], reg, check_interval=50) as sup:
        (pid,) = live_pids(sup)
        conn = reg.add(client_id=f"pid_{pid}_5f1e0b2c", jobs=("H:test:1",), jobs_done=4)
        await sup.wait_until(lambda: sup.snapshot()[0]["workers"][0]["state"] == "busy")
        w = sup.snapshot()[0]["workers"][0]
        assert w["job"] == "H:test:1" and w["jobs_done"] == 4
        assert sup.summary() == "atom 1/1 busy 1"
        async with trio.open_nursery() as n:
            n.start_soon(sup.shutdown, 1000)
            await sup.wait_until(lambda: reg.drained == [conn.conn_id])
            assert sup.snapshot()[0]["workers"][0]["state"] == "draining"
            await trio.sleep(100)  # the job is still running: nothing is signalled
            assert alive(pid) and events(sup, "sigterm") == []
            t_idle = trio.current_time()
            reg.set(conn, jobs=())
        (sigterm,) = events(sup, "sigterm")
        assert sigterm[0] == pytest.approx(t_idle)
        assert events(sup, "exited")[-1][5] == -15
        assert not alive(pid)


async def test_drain_timeout_bounds_the_wait(autojump_clock: Any) -> None:
    reg = FakeRegistry()
    cfg = pool(drain_timeout=30, stop_grace=10)
    async with running([cfg], reg) as sup:
        (pid,) = live_pids(sup)
        reg.add(client_id=f"pid_{pid}_x", jobs=("H:test:2",))
        t0 = trio.current_time()
        await sup.shutdown(1000)
        (sigterm,) = events(sup, "sigterm")
        assert sigterm[0] - t0 == pytest.approx(30)


async def test_sigkill_after_grace_for_a_child_that_ignores_sigterm(
    patient_clock: Any, logs: Records
) -> None:
    cfg = pool(command=sh("trap '' TERM; echo ready; exec sleep 1000"), stop_grace=7)
    async with running([cfg], check_interval=1e6) as sup:
        (pid,) = live_pids(sup)
        await wait_log(sup, logs, lambda m: m.endswith("] ready"))
        await sup.shutdown(5)
        assert events(sup, "exited")[-1][5] == -9
        assert events(sup, "exited")[-1][0] - events(sup, "sigterm")[0][0] == pytest.approx(
            7, abs=0.01)
        assert not alive(pid)
        assert any("sending SIGKILL" in m for m in logs.messages())
    assert sup.snapshot() == [{"name": "atom", "count": 1, "workers": []}]


async def test_cancelling_run_kills_the_workers() -> None:
    sup = Supervisor([pool(count=2)], None)
    async with trio.open_nursery() as n:
        await n.start(sup.run)
        pids = live_pids(sup)
        assert len(pids) == 2
        n.cancel_scope.cancel()
    assert not any(alive(p) for p in pids)


# ---------------------------------------------------------------- recycling


async def test_recycle_by_max_jobs_only_when_idle(patient_clock: Any) -> None:
    reg = FakeRegistry()
    cfg = pool(max_jobs=3, backoff_initial=100)
    async with running([cfg], reg, check_interval=5) as sup:
        (pid,) = live_pids(sup)
        conn = reg.add(client_id=f"pid_{pid}_a", jobs=("H:t:9",), jobs_done=3)
        await trio.sleep(20)
        assert events(sup, "recycle") == [] and live_pids(sup) == [pid]
        reg.set(conn, jobs=())
        # The replacement starts first; the old worker keeps serving until it registers.
        await sup.wait_until(lambda: len(events(sup, "spawned")) == 2)
        (rec,) = events(sup, "recycle")
        assert "3 jobs done (max_jobs 3)" in rec[5]
        assert reg.drained == [] and alive(pid)
        new_pid = events(sup, "spawned")[-1][5]
        reg.add(client_id=f"pid_{new_pid}_b", abilities=("F",))
        await exits(pid)
        assert reg.drained == [conn.conn_id]
        await sup.wait_until(lambda: live_pids(sup) == [new_pid])
        assert events(sup, "backoff") == []  # a recycle is not a failure
        del reg.conns[conn.conn_id]


async def test_recycle_by_max_rss(patient_clock: Any, logs: Records) -> None:
    reg = FakeRegistry()
    script = ("import time; b = bytearray(80 * 2**20); print('ready', flush=True); "
              "time.sleep(1000)")
    cfg = pool(command=(PY, "-c", script), max_rss_mb=40)
    async with running([cfg], reg, check_interval=5) as sup:
        (pid,) = live_pids(sup)
        await wait_log(sup, logs, lambda m: m.endswith("] ready"))
        reg.add(client_id=f"pid_{pid}_b")
        await sup.wait_until(lambda: len(events(sup, "recycle")) == 1)
        assert "max_rss_mb 40" in events(sup, "recycle")[0][5]
        await sup.wait_until(lambda: len(events(sup, "spawned")) == 2)


async def test_rss_under_the_limit_is_not_recycled(autojump_clock: Any) -> None:
    reg = FakeRegistry()
    async with running([pool(max_rss_mb=500)], reg) as sup:
        (pid,) = live_pids(sup)
        reg.add(client_id=f"pid_{pid}_c")
        await trio.sleep(30)
        assert events(sup, "recycle") == []
        assert sup.snapshot()[0]["workers"][0]["rss_mb"] < 500


async def test_recycle_by_max_age_is_jittered(autojump_clock: Any) -> None:
    reg = FakeRegistry()
    cfg = pool(count=3, max_age=100, age_jitter=0.5)
    async with running([cfg], reg, rng=random.Random(4)) as sup:
        t0 = trio.current_time()
        for pid in live_pids(sup):
            reg.add(client_id=f"pid_{pid}_d")
        await sup.wait_until(lambda: len(events(sup, "recycle")) == 3)
        times = sorted(e[0] - t0 for e in events(sup, "recycle"))
        assert all(50 <= t <= 151 for t in times)
        assert times[1] - times[0] >= 1 and times[2] - times[1] >= 1  # not all at once
        await sup.wait_until(lambda: len(live_pids(sup)) == 3
                             and len(events(sup, "spawned")) == 6)


async def test_recycle_limits_do_not_apply_without_a_registry(autojump_clock: Any) -> None:
    async with running([pool(max_age=10, max_jobs=1)], None) as sup:
        (pid,) = live_pids(sup)
        await trio.sleep(100)
        assert live_pids(sup) == [pid]
        assert sup.snapshot()[0]["workers"][0]["state"] == "running"


# ---------------------------------------------------------------- logs


async def test_output_lines_are_logged_with_pool_and_pid(logs: Records) -> None:
    cfg = pool(command=sh("echo hello; echo oops >&2; exec sleep 1000"))
    async with running([cfg]) as sup:
        (pid,) = live_pids(sup)
        await wait_log(sup, logs, lambda m: m.endswith("oops"))
        await wait_log(sup, logs, lambda m: m.endswith("hello"))
        recs = [r for r in logs.records if r.name == "atomnode.worker.atom"]
        by_msg = {r.getMessage(): r.levelno for r in recs}
        assert by_msg[f"[atom pid {pid}] hello"] == logging.INFO
        assert by_msg[f"[atom pid {pid}] oops"] == logging.WARNING


async def test_a_flooding_child_does_not_block_the_loop(logs: Records) -> None:
    cfg = pool(command=("yes", "flood"))
    async with running([cfg], log_rate=50, log_burst=50, drop_report_interval=0.2) as sup:
        worst = 0.0
        for _ in range(25):
            t = trio.current_time()
            await trio.sleep(0.02)
            worst = max(worst, trio.current_time() - t - 0.02)
        assert worst < 0.5
        msg = await wait_log(sup, logs, lambda m: "dropped" in m)
        assert msg.startswith(f"[atom pid {live_pids(sup)[0]}] dropped ")
        logged = [m for m in logs.messages("atomnode.worker") if m.endswith("] flood")]
        # 0.5 s at 50 lines/s plus the burst: far fewer than what `yes` wrote.
        assert 50 <= len(logged) <= 200
        w = sup._pools["atom"].workers[0]
        assert w.dropped_total > 10_000


# ---------------------------------------------------------------- mapping to connections


async def test_connection_found_through_proc_sockets(logs: Records) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    script = (f"import socket, time; s = socket.create_connection(('127.0.0.1', {port})); "
              "time.sleep(1000)")
    # Through sh without exec: the connection belongs to a grandchild of the supervisor.
    cfg = pool(command=sh(f"'{PY}' -c \"{script}\"; true"))
    reg = FakeRegistry()
    try:
        async with running([cfg], reg, check_interval=0.05) as sup:
            stream = await listeners[0].accept()
            peer = stream.socket.getpeername()[:2]
            local = stream.socket.getsockname()[:2]
            other = reg.add(peer=("127.0.0.1", 9), local=local)  # not ours
            conn = reg.add(peer=peer, local=local, jobs=("H:t:7",), jobs_done=2)
            with trio.fail_after(10):
                await sup.wait_until(lambda: sup.snapshot()[0]["workers"][0]["job"] == "H:t:7")
            (pid,) = live_pids(sup)
            assert sup.worker_for_connection(conn.conn_id) == ("atom", pid)
            assert sup.worker_for_connection(other.conn_id) is None
            w = sup.snapshot()[0]["workers"][0]
            assert w["state"] == "busy" and w["jobs_done"] == 2
            reg.set(conn, jobs=())
            await stream.aclose()
    finally:
        for lst in listeners:
            await lst.aclose()


async def test_connection_found_by_atom_client_id(autojump_clock: Any) -> None:
    reg = FakeRegistry()
    async with running([pool(count=2)], reg) as sup:
        a, b = live_pids(sup)
        ca = reg.add(client_id=f"pid_{a}_65f0c1d2e3a4b")
        cb = reg.add(client_id=f"pid_{b}_65f0c1d2e3a4c", jobs=("H:t:1",))
        await trio.sleep(2)
        assert sup.worker_for_connection(ca.conn_id) == ("atom", a)
        assert sup.worker_for_connection(cb.conn_id) == ("atom", b)
        states = sorted(w["state"] for w in sup.snapshot()[0]["workers"])
        assert states == ["busy", "idle"]
        reg.set(cb, jobs=())


# ---------------------------------------------------------------- spawning


async def test_user_group_environment_and_directory(logs: Records, tmp_path: Any) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root")
    os.chmod(tmp_path, 0o755)
    cfg = pool(command=sh('echo "$(id -un):$(id -gn) home=$HOME pwd=$(pwd) x=$X '
                          'srv=$ATOMNODE_SERVERS"; exec sleep 1000'),
               user="nobody", group="nogroup", directory=str(tmp_path),
               environment={"X": "42"})
    async with running([cfg], default_servers=("127.0.0.1:7777",)) as sup:
        msg = await wait_log(sup, logs, lambda m: m.startswith("[atom pid") and "home=" in m)
        assert msg.endswith(f"nobody:nogroup home=/nonexistent pwd={tmp_path} x=42 "
                            "srv=127.0.0.1:7777")


async def test_own_process_group_and_tree_is_killed(logs: Records) -> None:
    cfg = pool(command=sh("sleep 1000 & echo child=$!; wait"))
    async with running([cfg]) as sup:
        (pid,) = live_pids(sup)
        assert os.getpgid(pid) == pid
        msg = await wait_log(sup, logs, lambda m: m.startswith("[atom pid") and "] child=" in m)
        child = int(msg.rsplit("=", 1)[1])
        await sup.shutdown(5)
        assert not alive(pid)
        with trio.fail_after(5):
            await exits(child)


# ---------------------------------------------------------------- reload


async def test_reload_adds_removes_resizes_and_replaces(autojump_clock: Any) -> None:
    a = pool("a", count=1)
    b = pool("b", count=2)
    async with running([a, b]) as sup:
        b_pids = live_pids(sup, "b")
        assert len(live_pids(sup, "a")) == 1 and len(b_pids) == 2
        await sup.reload([pool("a", count=3), pool("c", count=1)])
        await sup.wait_until(lambda: len(live_pids(sup, "a")) == 3
                             and len(live_pids(sup, "c")) == 1
                             and [p["name"] for p in sup.snapshot()] == ["a", "c"])
        await sup.wait_until(lambda: not any(alive(p) for p in b_pids))
        # Shrink.
        await sup.reload([pool("a", count=1), pool("c", count=1)])
        await sup.wait_until(lambda: len(sup.snapshot()[0]["workers"]) == 1)
        # Changed command: replaced, one at a time.
        old_c = live_pids(sup, "c")
        await sup.reload([pool("a", count=1), pool("c", command=("sleep", "999"), count=1)])
        await sup.wait_until(lambda: len(live_pids(sup, "c")) == 1
                             and live_pids(sup, "c") != old_c)
        assert not alive(old_c[0])
        assert sup.summary() == "a 1/1; c 1/1"


# ---------------------------------------------------------------- the AtoM-like PHP worker


@pytest.mark.interop
async def test_atom_like_php_worker_against_gearmand(tmp_path: Any) -> None:
    """Supervisor-only mode with AtoM's kind of worker on a real gearmand: exit 111 is a
    planned restart, a crash mid-job backs off."""
    from daemon_harness import free_port
    from test_handlers import Gearmand, RawClient

    g = await trio.to_thread.run_sync(Gearmand, free_port())
    php = os.path.join(os.path.dirname(__file__), "workers", "atom_like_worker.php")
    cfg = pool(command=("php", php, "--server", "{server}", "--function", "sv-f"),
               backoff_initial=0.2)
    try:
        async with running([cfg], None, default_servers=(g.address,)) as sup:
            c = await RawClient.connect(g.port)
            with trio.fail_after(20):
                p = await c.submit("sv-f", b"hello")
                assert p.args[1] == b"HELLO"
                await c.submit_bg("sv-f", b"exit111")
                await sup.wait_until(lambda: len(events(sup, "spawned")) == 2)
                assert events(sup, "exited")[0][5] == 111 and events(sup, "backoff") == []
                await c.submit_bg("sv-f", b"crash")
                await sup.wait_until(lambda: len(events(sup, "backoff")) == 1)
                await sup.wait_until(lambda: len(events(sup, "spawned")) == 3)
                assert events(sup, "exited")[1][5] == 1
    finally:
        g.stop()


# ---------------------------------------------------------------- capacity for `status`


async def test_capacity_counts_a_proven_pool_while_its_worker_restarts(
    patient_clock: Any, tmp_path: Any,
) -> None:
    reg = FakeRegistry()
    fn = "0123456789abcdef0123456789abcdef-arFindingAidJob"
    # The first worker exits 111 (planned) after a while, the next one stays up (and never
    # registers); another pool crashes.
    flag = tmp_path / "second"
    script = f"if [ -e {flag} ]; then sleep 1000; else touch {flag}; sleep 5; exit 111; fi"
    cfg = pool(command=sh(script), count=1, functions=("arFindingAidJob",))
    bad = pool("bad", command=sh("exit 3"), functions=(fn,), backoff_initial=100)
    async with running([cfg, bad], reg, check_interval=1, register_grace=30) as sup:
        # Not proven yet: no worker has registered the function.
        assert sup.capacity(fn) == 0
        (pid,) = live_pids(sup)
        reg.add(client_id=f"pid_{pid}_a", abilities=(fn,))
        sup.function_registered(fn.encode())
        assert sup.capacity(fn) == 1 + 0  # the crashing pool never counts
        assert sup.capacity("0123456789abcdef0123456789abcdef-arOtherJob") == 0
        # Planned exit: the slot restarts, and counts all the while.
        await exits(pid)
        reg.conns.clear()
        await sup.wait_until(lambda: len(events(sup, "spawned", "atom")) == 2)
        assert sup.capacity(fn) == 1
        # A process that never registers stops counting after register_grace.
        await trio.sleep(31)
        assert sup.capacity(fn) == 0


async def test_a_given_up_job_ends_the_crash_backoff(patient_clock: Any) -> None:
    reg = FakeRegistry()
    cfg = pool(command=sh("sleep 2; exit 1"), backoff_initial=100, backoff_max=100)
    async with running([cfg], reg, check_interval=1) as sup:
        (pid,) = live_pids(sup)
        conn = reg.add(client_id=f"pid_{pid}_a", jobs=("H:t:1",))
        await sup.wait_until(lambda: bool(events(sup, "backoff")))  # the first crash backs off
        t0 = trio.current_time()
        del reg.conns[conn.conn_id]
        sup.job_given_up(conn.conn_id, f"pid_{pid}_a")
        await sup.wait_until(lambda: len(events(sup, "spawned")) == 2)
        assert trio.current_time() - t0 < 1  # not the 100 s backoff
