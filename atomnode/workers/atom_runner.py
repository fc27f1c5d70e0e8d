"""Per-job mode for AtoM: atomnode's own worker tasks, one ``php symfony`` process per job.

A :class:`RunnerPool` serves one AtoM site (``atom_runners:`` in the configuration). Each
of its ``concurrency`` slots is a worker inside the daemon: an in-process connection to the
broker (:class:`~atomnode.workers.handlers.LocalConn`: no socket, no TCP round trip) that
registers every function of the site and takes jobs with the handlers' loop
(GRAB_JOB_UNIQ, NO_JOB -> PRE_SLEEP -> NOOP). So ``status`` shows one capable worker per
slot the whole time the runner is healthy, whatever PHP is doing: AtoM's availability
check never fails because a worker is restarting.

Per job, a slot starts ``php -d memory_limit=-1 symfony tools:run <runner script>`` in the
site's root as the site's user, in its own process group, and hands it the job over a
channel of its own: a Unix socket in the abstract namespace whose random name is in
``$ATOMNODE_CHANNEL``; one connection is accepted, from that process only (SO_PEERCRED).
atomnode writes the JOB_ASSIGN packet; the runner script (atom-job-runner.php, beside this
module) boots the site as its release's worker task does, gives the job class that socket
as its Net_Gearman connection, and the job's status()/complete()/fail() write Gearman
packets on it, which the slot relays to the broker: WORK_STATUS, WORK_DATA and
WORK_WARNING at once, the first WORK_COMPLETE / WORK_FAIL / WORK_EXCEPTION as the result
(a WORK_FAIL after the runner reported the exception's message becomes WORK_EXCEPTION with
it, so the message reaches the store; clients that did not ask for exceptions get
WORK_FAIL as before).

Failure policy, stated first:

* a job whose process ends without a result fails with the exit status and the tail of
  its output; a process that cannot be started fails the job with why;
* ``timeout``: the process group gets SIGTERM, then SIGKILL after 5 s; the job fails
  ("timed out after Ns"), or with ``on_timeout: requeue`` goes back to the queue (an
  attempt counted; past ``max_attempts`` it fails);
* ``memory_limit``: the resident memory of the process tree is polled (no cgroups needed);
  past the limit the group is killed and the job fails with the figure;
* stop (shutdown, reload): the slots take no new job; running jobs get the shutdown
  timeout, then their process groups are killed and the jobs go back to the queue;
* the runner cannot work (php or the site's ``symfony`` or the runner script missing, a
  ``wait_for`` service down): the slots unregister (``status`` shows no worker, AtoM says
  "No Gearman worker available" at once instead of queueing jobs nobody runs), say why in
  the log, ``atomnode status`` and ``atomnode doctor``, and check again every 5 s.

The job's output (stdout, stderr) goes to the journal line by line, tagged with the runner,
the job handle and AtoM's job id (the ``id`` of the JSON workload), rate-limited per
runner like the pools' output.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from . import procinfo
from .handlers import ConnectionLost, LocalConn, _req, kill_group
from .supervisor import LOG_BURST, LOG_RATE, MAX_LINE, first_down
from ..gearman.protocol import Decoder, Packet, ProtocolError, T, encode
from ..system.names import atom_job_id

if TYPE_CHECKING:  # pragma: no cover
    from ..system.config import RunnerConfig

log = logging.getLogger("atomnode.runner")  # stable name: operators see it in the journal

#: The runner script shipped inside the package (the .deb also installs it under
#: /usr/share/atomnode; config.RUNNER_SCRIPT is preferred when it exists).
PACKAGE_SCRIPT = str(Path(__file__).with_name("atom-job-runner.php"))
#: How often a slot re-checks that it can work (php, symfony, wait_for) while idle or
#: waiting, and how often it tries again after a problem.
CHECK_INTERVAL = 5.0
#: How often a running job's memory is measured.
MEMORY_POLL = 0.25
#: Largest result (or message) a job may send; more fails the job.
MAX_RESULT = 64 * 1024 * 1024
#: Output kept for the failure message of a process that ends without a result.
OUTPUT_TAIL = 2000
_PEERCRED = struct.Struct("3i")
_STARTED = b"atomnode-runner started "
_ERROR = b"atomnode-runner error "
_RELAYED = (T.WORK_STATUS, T.WORK_DATA, T.WORK_WARNING)
_RESULTS = (T.WORK_COMPLETE, T.WORK_FAIL, T.WORK_EXCEPTION)


def default_script() -> str:
    from ..system.config import RUNNER_SCRIPT

    return RUNNER_SCRIPT if os.path.exists(RUNNER_SCRIPT) else PACKAGE_SCRIPT


def runner_problem(cfg: RunnerConfig, script: str) -> str | None:
    """Why the runner cannot start a job now (not counting ``wait_for``), or None."""
    php = cfg.php if os.path.isabs(cfg.php) else shutil.which(cfg.php, path=procinfo.DEFAULT_PATH)
    if php is None or not os.access(php, os.X_OK):
        return f"PHP not found ({cfg.php}; install php-cli)"
    if not os.path.isdir(cfg.root):
        return f"the AtoM site {cfg.root} does not exist"
    if not os.path.isfile(os.path.join(cfg.root, "symfony")):
        return f"{cfg.root}/symfony is missing (is {cfg.root} an AtoM site?)"
    if not os.access(script, os.R_OK):
        return f"the runner script {script} cannot be read"
    return None


class _Outcome:
    """What became of one job."""

    __slots__ = ("result", "message", "requeue", "ended")

    def __init__(self) -> None:
        self.result: tuple[int, bytes] | None = None  # (packet type, data) relayed
        self.message: bytes | None = None  # the exception message the runner reported
        self.requeue: str | None = None  # give the job back with this reason
        self.ended = False  # a result was relayed


class _Accepting:
    __slots__ = ("scope", "connected")

    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self.connected = False


class _Slot:
    def __init__(self, index: int):
        self.index = index
        self.state = "starting"  # starting | waiting | idle | busy | stopped
        self.handle: str | None = None
        self.atom_id: str | None = None
        self.pid: int | None = None
        self.started_at: float | None = None
        self.proc: trio.Process | None = None
        self.killed_by_stop = False


class RunnerPool:
    """Serves the functions of one AtoM site, one process per job (module docstring)."""

    def __init__(self, cfg: RunnerConfig, server: Any, *, check_interval: float = CHECK_INTERVAL,
                 memory_poll: float = MEMORY_POLL, kill_grace: float = 5.0,
                 on_failed: Callable[[bytes, bytes, bytes, str], None] | None = None):
        self.cfg = cfg
        #: Called when a background job fails here: (function, workload, handle, reason);
        #: the daemon marks AtoM's record of the job failed where configured.
        self.on_failed = on_failed
        self.server = server
        self.script = cfg.script or default_script()
        self.check_interval = check_interval
        self.memory_poll = memory_poll
        self.kill_grace = kill_grace
        self.slots = [_Slot(i) for i in range(cfg.concurrency)]
        self.problem: str | None = None
        self._checked_at = -1e9
        self._stopping = False
        self._scopes: set[trio.CancelScope] = set()
        self._finished = trio.Event()
        self._started = False
        self._changed = trio.lowlevel.ParkingLot()
        self.counts = {"done": 0, "failed": 0, "timed_out": 0, "memory": 0, "requeued": 0}
        #: Seconds from process start to the job's run(), per job (the last 1000).
        self.startup: list[float] = []
        # log rate limit, per runner (lines)
        self._tokens = LOG_BURST
        self._tokens_at = 0.0
        self._dropped = 0
        self._log = logging.getLogger(f"atomnode.runner.{cfg.name}")

    # ------------------------------------------------------------------ public API

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run every slot until :meth:`shutdown`. ``started()`` once each slot has
        registered or found why it cannot."""
        self._started = True
        try:
            async with trio.open_nursery() as nursery:
                ready = [trio.Event() for _ in self.slots]
                for slot, ev in zip(self.slots, ready):
                    nursery.start_soon(self._slot, slot, ev)
                for ev in ready:
                    await ev.wait()
                task_status.started()
        finally:
            self._finished.set()

    def stop_taking(self) -> None:
        """From now on no slot takes a job (the first step of :meth:`shutdown`; the
        daemon calls it the moment it starts stopping)."""
        self._stopping = True
        for scope in list(self._scopes):
            scope.cancel()

    async def shutdown(self, timeout: float) -> None:
        """Take no new job; let running ones finish for up to ``timeout`` seconds, then
        kill their process groups (those jobs go back to the queue)."""
        self.stop_taking()
        with trio.move_on_after(timeout):
            await self.wait_until(lambda: not any(s.proc for s in self.slots))
        for slot in self.slots:
            if slot.proc is not None and slot.proc.returncode is None:
                log.warning("runner %s: job %s (AtoM job %s) still running at shutdown; "
                            "killing pid %d, the job goes back to the queue",
                            self.cfg.name, slot.handle, slot.atom_id or "-", slot.proc.pid)
                slot.killed_by_stop = True
                procinfo.signal_group(slot.proc.pid, signal.SIGKILL)
        if self._started:
            await self._finished.wait()

    def snapshot(self) -> dict[str, Any]:
        """For ``atomnode-status``: the runner, its problem if any, each slot's state
        (job handle, AtoM job id, pid, seconds running, RSS MiB), counters and the
        start-up cost of its jobs (process start to run(), ms)."""
        now = trio.current_time() if self._in_trio() else None
        slots = []
        for s in self.slots:
            rss = None
            if s.pid is not None and s.proc is not None:
                rss = round(procinfo.rss_kb(procinfo.process_tree(s.pid)) / 1024, 1)
            slots.append({
                "state": s.state, "job": s.handle, "atom_job_id": s.atom_id,
                "pid": s.pid if s.proc is not None else None, "rss_mb": rss,
                "running": round(now - s.started_at, 1)
                if now is not None and s.started_at is not None and s.proc is not None
                else None,
            })
        st = sorted(self.startup)
        return {
            "name": self.cfg.name, "root": self.cfg.root, "functions": list(self.cfg.functions),
            "concurrency": self.cfg.concurrency, "problem": self.problem, "slots": slots,
            **self.counts,
            "startup_ms": {
                "jobs": len(st),
                "p50": round(st[len(st) // 2] * 1000, 1) if st else None,
                "max": round(st[-1] * 1000, 1) if st else None,
            },
        }

    def summary(self) -> str:
        """For systemd's STATUS=: ``runner atom busy 1/2`` or why it cannot work."""
        if self.problem:
            return f"runner {self.cfg.name} CANNOT RUN JOBS: {self.problem}"
        busy = sum(1 for s in self.slots if s.state == "busy")
        return f"runner {self.cfg.name} busy {busy}/{len(self.slots)}"

    async def wait_until(self, predicate: Any) -> None:
        """Return once ``predicate()`` is true; re-checked at each slot change."""
        while not predicate():
            await self._changed.park()

    # ------------------------------------------------------------------ internals

    @staticmethod
    def _in_trio() -> bool:
        try:
            trio.current_time()
        except RuntimeError:
            return False
        return True

    def _set(self, slot: _Slot, state: str) -> None:
        slot.state = state
        self._changed.unpark_all()

    async def _check(self) -> str | None:
        """The runner's problem now (cached for ``check_interval`` while nothing changes)."""
        now = trio.current_time()
        if now - self._checked_at < self.check_interval:
            return self.problem
        self._checked_at = now
        problem = runner_problem(self.cfg, self.script)
        if problem is None and self.cfg.wait_for:
            down = await first_down(self.cfg.wait_for)
            if down is not None:
                problem = f"waiting for {down.name} ({down.where})"
        if problem != self.problem:
            if problem:
                log.warning("runner %s cannot run jobs: %s; its functions show no worker until "
                            "this is fixed (checked again every %gs)", self.cfg.name, problem,
                            self.check_interval)
            elif self.problem:
                log.info("runner %s can run jobs again", self.cfg.name)
            self.problem = problem
            self._changed.unpark_all()
        return problem

    async def _pause(self, seconds: float) -> None:
        with trio.move_on_after(seconds) as scope:
            self._scopes.add(scope)
            try:
                if not self._stopping:
                    await trio.sleep_forever()
            finally:
                self._scopes.discard(scope)

    async def _slot(self, slot: _Slot, ready: trio.Event) -> None:
        cfg = self.cfg
        client_id = f"atomnode-runner:{cfg.name}:{slot.index}".encode()
        conn: LocalConn | None = None
        try:
            while not self._stopping:
                problem = await self._check()
                if problem:
                    if conn is not None:
                        await conn.aclose()  # unregistered: `status` shows no worker
                        conn = None
                    self._set(slot, "waiting")
                    ready.set()
                    await self._pause(self.check_interval)
                    continue
                if conn is None:
                    conn = LocalConn(self.server, client_id)
                    await conn.send(*(_req(T.CAN_DO, f.encode()) for f in cfg.functions))
                self._set(slot, "idle")
                ready.set()
                job = await self._grab(conn)
                if job is not None:
                    try:
                        await self._run_job(slot, conn, job)
                    except Exception:  # noqa: BLE001 - a bug must cost one job, not the daemon
                        log.exception("runner %s slot %d: internal error while running job "
                                      "%s", cfg.name, slot.index, job.args[0][:100])
        except ConnectionLost as e:  # pragma: no cover - the broker refused a request
            log.error("runner %s slot %d: %s", cfg.name, slot.index, e)
        finally:
            ready.set()
            if conn is not None:
                await conn.aclose()
            self._set(slot, "stopped")

    async def _grab(self, conn: LocalConn) -> Packet | None:
        """A job, or None after ``check_interval`` without one (or at stop)."""
        with trio.move_on_after(self.check_interval) as scope:
            self._scopes.add(scope)
            try:
                while not self._stopping:
                    await conn.send(_req(T.GRAB_JOB_UNIQ))
                    pkt = await conn.receive({T.JOB_ASSIGN_UNIQ, T.NO_JOB})
                    if pkt.type == T.JOB_ASSIGN_UNIQ:
                        return pkt
                    await conn.send(_req(T.PRE_SLEEP))
                    await conn.receive({T.NOOP})
            finally:
                self._scopes.discard(scope)
        return None

    # --- one job

    async def _run_job(self, slot: _Slot, conn: LocalConn, job: Packet) -> None:
        handle, fn, _unique, data = job.args
        slot.handle = handle.decode("utf-8", "replace")
        atom_id = atom_job_id(data) if data.startswith(b"{") else None
        slot.atom_id = str(atom_id) if atom_id is not None else None
        slot.killed_by_stop = False
        tag = f"{self.cfg.name} {slot.handle}" + (
            f" AtoM job {slot.atom_id}" if slot.atom_id else "")
        self._set(slot, "busy")
        outcome = _Outcome()
        try:
            await self._execute(slot, conn, tag, handle, fn, data, outcome)
        finally:
            slot.proc = None
            slot.started_at = None
            if not outcome.ended and not conn.closed:
                with trio.CancelScope(shield=True):
                    await self._finish(conn, handle, tag, outcome, slot)
            slot.handle = slot.atom_id = None
            slot.pid = None
            self._set(slot, "idle")

    async def _finish(self, conn: LocalConn, handle: bytes, tag: str, outcome: _Outcome,
                      slot: _Slot) -> None:
        """The job had no result: requeue or fail it as decided."""
        if slot.killed_by_stop and outcome.requeue is None:
            outcome.requeue = "stopped at shutdown while running"
        if outcome.requeue is not None:
            self.counts["requeued"] += 1
            log.warning("[%s] %s; the job goes back to the queue", tag, outcome.requeue)
            self.server.broker.release(conn.conn, handle, outcome.requeue)
            self.server.flush()
            outcome.ended = True
            return
        message = outcome.message or b"the job process ended without a result"
        await self._relay_result(conn, handle, tag, T.WORK_EXCEPTION, message, outcome)

    async def _relay_result(self, conn: LocalConn, handle: bytes, tag: str, type_: int,
                            data: bytes, outcome: _Outcome) -> None:
        if outcome.ended:
            return
        outcome.ended = True
        if type_ == T.WORK_FAIL and outcome.message:
            type_, data = T.WORK_EXCEPTION, outcome.message
        if type_ == T.WORK_COMPLETE:
            self.counts["done"] += 1
            log.info("[%s] job done", tag)
        else:
            self.counts["failed"] += 1
            log.warning("[%s] job failed: %s", tag,
                        data.decode("utf-8", "replace")[-500:] if data else "WORK_FAIL")
        args = (handle, data) if type_ != T.WORK_FAIL else (handle,)
        job = self.server.broker.jobs.get(handle) if type_ != T.WORK_COMPLETE else None
        await conn.send(_req(type_, *args))
        if job is not None and job.background and self.on_failed is not None:
            reason = data.decode("utf-8", "replace") if data else "WORK_FAIL from the job"
            self.on_failed(job.function.name, job.data, handle, reason)

    async def _execute(self, slot: _Slot, conn: LocalConn, tag: str, handle: bytes, fn: bytes,
                       data: bytes, outcome: _Outcome) -> None:
        cfg = self.cfg
        name = f"atomnode-runner-{os.getpid()}-{secrets.token_hex(16)}"
        listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await listener.bind("\0" + name)
            listener.listen(1)
            opts = procinfo.spawn_options(
                user=cfg.user, group=cfg.group, directory=cfg.root,
                environment=cfg.environment,
                extra_env={
                    "ATOMNODE_CHANNEL": name,
                    "ATOMNODE_FUNCTION": fn.decode("utf-8", "replace"),
                    "ATOMNODE_JOB_HANDLE": slot.handle or "",
                },
            )
            argv = [cfg.php, "-d", "memory_limit=-1", "symfony", "tools:run", self.script]
            spawned = time.time()
            proc = await trio.lowlevel.open_process(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, **opts)
        except (OSError, KeyError, subprocess.SubprocessError) as exc:
            listener.close()
            outcome.message = f"cannot start the job process: {exc}".encode()
            self._checked_at = -1e9  # check php / symfony again before the next job
            return
        slot.proc = proc
        slot.pid = proc.pid
        slot.started_at = trio.current_time()
        log.info("[%s] started pid %d for %s", tag, proc.pid, fn.decode("utf-8", "replace"))
        tail = bytearray()
        timed_out = False
        try:
            async with trio.open_nursery() as n:
                n.start_soon(self._pump, proc.stdout, tag, logging.INFO, tail)
                n.start_soon(self._pump, proc.stderr, tag, logging.WARNING, tail)
                accepting = _Accepting()
                n.start_soon(self._channel, listener, accepting, proc, conn, handle, fn, data,
                             tag, outcome, spawned)
                if cfg.memory_limit:
                    n.start_soon(self._watch_memory, proc, tag, outcome)
                limit = cfg.timeout if cfg.timeout else float("inf")
                with trio.move_on_after(limit) as scope:
                    await proc.wait()
                if scope.cancelled_caught:
                    timed_out = True
                    await kill_group(proc, self.kill_grace)
                if not accepting.connected:
                    accepting.scope.cancel()  # it died before it connected
                # Leftover children may hold the pipes open: end the group; what is still
                # being read gets a second.
                procinfo.signal_group(proc.pid, signal.SIGKILL)
                n.cancel_scope.deadline = trio.current_time() + 1.0
        finally:
            listener.close()
            if proc.returncode is None:
                with trio.CancelScope(shield=True):
                    procinfo.signal_group(proc.pid, signal.SIGKILL)
                    await proc.wait()
        if outcome.ended:
            return
        if timed_out:
            self.counts["timed_out"] += 1
            why = f"timed out after {cfg.timeout:g}s"
            if cfg.on_timeout == "requeue":
                outcome.requeue = why
            else:
                outcome.message = why.encode()
        elif outcome.message is None or not outcome.message.startswith(b"memory limit"):
            rc = proc.returncode
            text = bytes(tail).decode("utf-8", "replace").strip()
            msg = f"the job process exited with {procinfo.signal_name(rc or 0)} without a result"
            if outcome.message:
                msg = outcome.message.decode("utf-8", "replace")
            elif text:
                msg += ": " + text[-OUTPUT_TAIL:]
            outcome.message = msg.encode()

    async def _channel(self, listener: Any, accepting: _Accepting, proc: trio.Process,
                       conn: LocalConn, handle: bytes, fn: bytes, data: bytes, tag: str,
                       outcome: _Outcome, spawned: float) -> None:
        """Accept the job process's connection, give it the job, relay what it sends."""
        with accepting.scope:
            while True:
                sock, _ = await listener.accept()
                pid, _uid, _gid = _PEERCRED.unpack(
                    sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
                if pid == proc.pid or pid in procinfo.process_tree(proc.pid):
                    break
                log.warning("[%s] refused a connection to the job's channel from pid %d "
                            "(not the job's process)", tag, pid)
                sock.close()
        listener.close()
        if accepting.scope.cancelled_caught:
            return
        accepting.connected = True
        stream = trio.SocketStream(sock)
        try:
            await stream.send_all(encode(T.JOB_ASSIGN, handle, fn, data))
            decoder = Decoder(max_packet_size=MAX_RESULT)
            while True:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return
                decoder.feed(chunk)
                while batch := decoder.next_events():
                    for pkt in batch:
                        if isinstance(pkt, Packet):
                            await self._from_job(pkt, conn, handle, tag, outcome, spawned)
        except ProtocolError as e:
            log.warning("[%s] the job process sent something that is not a Gearman packet "
                        "(%s); the rest of its channel is ignored", tag, e.message)
            if not outcome.ended:
                outcome.message = f"the job process sent a bad packet: {e.message}".encode()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await stream.aclose()

    async def _from_job(self, pkt: Packet, conn: LocalConn, handle: bytes, tag: str,
                        outcome: _Outcome, spawned: float) -> None:
        t = pkt.type
        if t == T.ECHO_REQ:
            text = pkt.args[0]
            if text.startswith(_STARTED):
                try:
                    cost = float(text[len(_STARTED):]) - spawned
                except ValueError:
                    return
                self.startup.append(max(0.0, cost))
                del self.startup[:-1000]
                log.debug("[%s] run() entered %.1f ms after the process started", tag,
                          cost * 1000)
            elif text.startswith(_ERROR):
                outcome.message = text[len(_ERROR):] or None
            return
        if t not in _RELAYED and t not in _RESULTS:
            log.warning("[%s] ignored %s from the job process", tag, pkt.name)
            return
        if pkt.args[0] != handle:
            log.warning("[%s] ignored %s for another job handle %r", tag, pkt.name,
                        pkt.args[0][:100])
            return
        if outcome.ended:
            return
        if t in _RELAYED:
            await conn.send(_req(t, *pkt.args))
            return
        await self._relay_result(conn, handle, tag, t, pkt.args[1] if len(pkt.args) > 1
                                 else b"", outcome)

    async def _watch_memory(self, proc: trio.Process, tag: str, outcome: _Outcome) -> None:
        limit_kb = (self.cfg.memory_limit or 0) // 1024
        while proc.returncode is None:
            rss = procinfo.rss_kb(procinfo.process_tree(proc.pid))
            if rss > limit_kb:
                self.counts["memory"] += 1
                msg = (f"memory limit exceeded: {rss / 1024:.0f} MiB resident > "
                       f"memory_limit {limit_kb / 1024:.0f} MiB; the job process was killed")
                log.warning("[%s] %s", tag, msg)
                if not outcome.ended:
                    outcome.message = msg.encode()
                procinfo.signal_group(proc.pid, signal.SIGKILL)
                return
            await trio.sleep(self.memory_poll)

    async def _pump(self, stream: Any, tag: str, level: int, tail: bytearray) -> None:
        buf = b""
        try:
            while True:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                tail.extend(chunk)
                if len(tail) > OUTPUT_TAIL:
                    del tail[: len(tail) - OUTPUT_TAIL]
                buf += chunk
                *lines, buf = buf.split(b"\n")
                if len(buf) > MAX_LINE:
                    lines.append(buf)
                    buf = b""
                self._emit(tag, level, lines)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass
        finally:
            if buf:
                self._emit(tag, level, [buf])
            self._report_drops()

    def _emit(self, tag: str, level: int, lines: list[bytes]) -> None:
        now = trio.current_time()
        self._tokens = min(LOG_BURST, self._tokens + (now - self._tokens_at) * LOG_RATE)
        self._tokens_at = now
        for raw in lines:
            if self._tokens < 1:
                self._dropped += 1
                continue
            self._tokens -= 1
            line = raw[:MAX_LINE].decode("utf-8", "replace").rstrip("\r")
            self._log.log(level, "[%s] %s", tag, line)

    def _report_drops(self) -> None:
        if self._dropped:
            self._log.warning("runner %s: dropped %d lines of job output (more than %g "
                              "lines/s)", self.cfg.name, self._dropped, LOG_RATE)
            self._dropped = 0
