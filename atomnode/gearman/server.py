"""The trio listener: every connection served by one I/O hub, bytes <-> codec <-> broker.

Connections are not one trio task each. Their sockets sit, level-triggered, in an epoll
set of our own, and one hub task waits (through trio) for that set to become readable.
Each round it reads what every ready connection has sent (up to ``READ_SIZE`` each, so no
connection can starve another), lets the broker process every complete packet, then
takes the broker's outbox (:class:`~atomnode.gearman.broker.Outbox`) in one call: the
round's store commands go to the store in one call, each touched peer's replies out in one
write. A round costs one trio wake-up, however many connections are busy: with many
pipelined clients and workers, per-connection tasks spent more time being scheduled (and
re-arming epoll for each socket) than the broker spent on the jobs.
A socket the kernel cannot take more bytes from is watched for EPOLLOUT until its
buffer drains.

Memory is bounded whatever the peers do (docs/durability.md, "Greedy clients"):

* replies a peer does not read: per connection (``max_output_per_connection``) and in
  total (``max_output_total``). A connection past its own limit is closed at once; past
  the total, the connections holding the most are closed until it holds again;
* unfinished input packets: each at most ``max_packet_size``, all together at most
  ``max_input_total`` (past it, the connections holding the largest unfinished packets
  are closed);
* a connection whose unread replies pass :data:`PAUSE_OUTPUT` is not read from until
  they are written: a client pipelining requests without reading the answers waits for
  itself instead of growing the daemon;
* admin work is rationed per round: at most :data:`ADMIN_ROUND_LINES` lines or
  :data:`ADMIN_ROUND_BYTES` of replies per connection, then the connection waits for the
  next round (after every other ready peer); listings of the whole queue come as a
  stream of chunks, at most :data:`MAX_STREAMS` at once, one chunk per round each.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, Final

import trio

from . import protocol
from .broker import Broker, Conn
from ..system.access import Network, RefusalLog, peer_allowed
from ..system.doorbell import Doorbell
from ..system.logs import Repeats
from ..system.values import parse_address
from .protocol import AdminLine, Decoder, ProtocolError, error_packet

log = logging.getLogger("atomnode.server")

#: Defaults of the memory limits (config ``limits``; see the module docstring).
MAX_OUTPUT_PER_CONNECTION = 96 * 1024 * 1024
MAX_OUTPUT_TOTAL = 256 * 1024 * 1024
MAX_INPUT_TOTAL = 256 * 1024 * 1024
#: A connection with more unread replies than this is not read from until they drain.
PAUSE_OUTPUT: Final = 1024 * 1024
#: Work one connection gets per round: seconds (checked every 64 packets and after each
#: admin line), admin lines, bytes of admin replies. The rest waits for the next round,
#: after every other ready connection had its turn.
ROUND_BUDGET: Final = 0.002
ADMIN_ROUND_LINES: Final = 8
ADMIN_ROUND_BYTES: Final = 64 * 1024
#: Streamed listings (show jobs ...) produced at once; more wait their turn.
MAX_STREAMS = 4
READ_SIZE: Final = 256 * 1024
#: Packets decoded and handled per call (the round's time budget is checked between).
BATCH: Final = 64
#: Rounds served back to back, without writing, while more input is already waiting:
#: each connection's replies of those rounds then go out in one write.
COALESCE_ROUNDS: Final = 2
#: How long the hub may keep the thread before it goes back through trio's scheduler:
#: serving rounds back to back, and, when its connections are quiet, waiting for them in
#: the kernel (while no trio task is runnable, no other thread or signal has handed trio
#: work and no new connection waits). What only trio watches (worker pipes, the console,
#: timers) waits at most this long while Gearman traffic keeps the hub busy. 10 ms spans
#: the gap between jobs of a steady flow of 100/s or more, so such a flow never pays a
#: pass through trio's scheduler per job. See :meth:`Server._hub`.
HUB_HOLD: Final = 0.010
#: Default of ``busy_poll`` (config): how long the hub polls its connections without
#: sleeping before it waits in the kernel, when its last round replied to someone and its
#: last quiet spell was shorter than this. An idle CPU of a virtual machine halts, and
#: waking it costs more than a round of work: a serial round trip (a client waiting for
#: each job) paid that three times. See :meth:`Server._hub`. 0 turns it off; it is off on
#: a machine with one CPU.
BUSY_POLL: Final = 0.0002
#: A failing accept (EMFILE...) is logged at most once per this many seconds.
ACCEPT_LOG_INTERVAL = 30.0
#: A hub round that takes more CPU than this is counted as slow (atomnode-status).
SLOW_ROUND: Final = 0.020
#: After this many bytes of buffers were freed, memory is handed back to the system.
TRIM_AFTER: Final = 16 * 1024 * 1024

_IN: Final = select.EPOLLIN | select.EPOLLRDHUP
_IN_OUT: Final = _IN | select.EPOLLOUT
# Paused or streaming: write, do not read. Not EPOLLRDHUP either: a peer that sent its
# last request and shut down its side (``printf 'show jobs\n' | nc``) still reads the
# answer; EPOLLHUP and EPOLLERR (gone for good) are always reported.
_OUT: Final = select.EPOLLOUT
_HUP: Final = 0  # waiting for a stream slot: only notice the peer going away
# Used at every event or packet. Final: compiled (setup.py), these are C constants, not a
# lookup in a module's dict at each use.
_EPOLLIN: Final = select.EPOLLIN
_EPOLLOUT: Final = select.EPOLLOUT
_GONE: Final = select.EPOLLHUP | select.EPOLLERR
_os_read: Final = os.read
_os_write: Final = os.write
_perf_counter: Final = time.perf_counter
try:  # the busy poll, in C without the GIL (setup.py; without it the hub does not spin)
    from ._busypoll import spin as _spin

    _spin_built = True
except ImportError:  # pragma: no cover - pure-Python installs
    _spin_built = False

    def _spin(epfd: int, seconds: float) -> bool:
        return False


def _trio_wakeup() -> tuple[int, Any]:
    """For :meth:`Server._hub`: the file descriptor of trio's wake-up socket (readable when
    another thread or a signal hands trio work) and trio's queue of runnable tasks; or
    (-1, None) where either cannot be found (another trio version): the hub then goes
    back to trio after every round, as a plain trio task would. Trio keeps both
    private; they are only read (and the socket watched, never read)."""
    try:
        from trio._core._run import GLOBAL_RUN_CONTEXT

        runner = GLOBAL_RUN_CONTEXT.runner
        fd = runner.entry_queue.wakeup.wakeup_sock.fileno()
        runq = runner.runq
        len(runq)
    except Exception:  # noqa: BLE001 - any change inside trio: fall back, never fail
        return -1, None
    if not isinstance(fd, int) or fd < 0:
        return -1, None
    return fd, runq


class _Peer:
    """I/O state of one connection, beside the broker's :class:`Conn`."""

    __slots__ = ("conn", "fd", "sock", "pending", "closing", "decoder", "inbuf", "paused",
                 "stream", "stream_waiting", "mask")

    def __init__(self, conn: Conn, fd: int, sock: Any, decoder: Decoder):
        self.conn = conn
        self.fd = fd
        self.sock = sock  # the trio socket, kept to close it
        self.pending = bytearray()  # bytes the kernel did not take yet
        self.closing = False
        self.decoder = decoder
        self.inbuf = 0  # unprocessed input bytes, as counted in Server.in_total
        self.paused = False  # complete requests wait in the decoder (rationed or backlogged)
        self.stream: Iterator[bytes] | None = None  # an admin listing being produced
        self.stream_waiting = False  # ... waiting for a stream slot
        self.mask = _IN  # what the epoll set watches for


class Server:
    """Serves the Gearman protocol (binary and text admin) for one :class:`Broker`.

    ``admin`` is a callable ``(server, peer, line) -> bytes`` answering a text command
    (see :mod:`atomnode.gearman.admin`). ``store`` has ``submit_many(commands)`` (or is None
    when the broker is not durable); its reports come back through :meth:`store_listener`.
    Every time (uptime, timers) is read from the broker's clock.
    """

    def __init__(
        self,
        broker: Broker,
        *,
        store: Any = None,
        admin: Callable[[Server, Conn, bytes], bytes] | None = None,
        max_packet_size: int = protocol.DEFAULT_MAX_PACKET_SIZE,
        allow: tuple[Network, ...] = (),
        max_output_per_connection: int = MAX_OUTPUT_PER_CONNECTION,
        max_output_total: int = MAX_OUTPUT_TOTAL,
        max_input_total: int = MAX_INPUT_TOTAL,
        busy_poll: float = BUSY_POLL,
    ):
        self.broker = broker
        self.busy_poll = 0.0
        self.set_busy_poll(busy_poll)
        #: Busy polls that caught the next input, and those that ran out (each spent
        #: ``busy_poll`` of CPU in vain before the hub slept): in atomnode-status.
        self.busy_hits = 0
        self.busy_misses = 0
        #: Networks allowed to connect besides loopback (``allow:``); see system/access.py.
        self.allow = allow
        self.refusals = RefusalLog()
        self.store = store
        self.admin = admin
        # An admin object with a ``stream`` method may answer with chunks (Admin.stream).
        self._admin_reply: Callable[[Server, Conn, bytes], bytes | Iterator[bytes]] | None = (
            getattr(admin, "stream", None) or admin)
        self.max_packet_size = max_packet_size
        self.max_output_per_connection = max_output_per_connection
        self.max_output_total = max_output_total
        self.max_input_total = max_input_total
        self.out_total = 0  # bytes of every peer's ``pending``
        self.in_total = 0  # bytes of every peer's unprocessed input
        self._backlogged: set[_Peer] = set()  # peers with pending output
        self._partial: set[_Peer] = set()  # peers with unprocessed input
        self._streams = 0  # listings being produced
        self._stream_queue: deque[_Peer] = deque()  # listings waiting for a slot
        self._limit_log = Repeats(10.0)
        #: Called (without arguments) when a lot of buffered memory was just freed; the
        #: daemon hands it back to the system (malloc_trim).
        self.on_memory_freed: Callable[[], None] | None = None
        self.freed_since_trim = 0
        #: CPU seconds of the longest hub round, and rounds longer than SLOW_ROUND: every
        #: peer waits for a round, so these bound what one peer's work costs the others.
        self.longest_round = 0.0
        self.slow_rounds = 0
        self.peers: dict[Conn, _Peer] = {}
        self._next_id = 1
        self._timer_wakeup = trio.Event()
        self._accept_scope = trio.CancelScope()
        self._ep = select.epoll()
        self._by_fd: dict[int, _Peer] = {}
        # The store's reports (store_listener): queued by the writer thread, which then
        # rings this doorbell, watched in the hub's own epoll set.
        self._reports: deque[tuple[list, list]] = deque()
        self._report_bell = Doorbell()
        self._ep.register(self._report_bell.fileno(), _EPOLLIN)
        self.listeners: list[trio.SocketListener] = []
        self.bound: list[tuple[str, int]] = []
        self.idle_events: dict[Conn, trio.Event] = {}
        #: In-process workers (:meth:`attach_local`): connection -> where its replies go.
        self.local: dict[Conn, Callable[[bytes], None]] = {}
        self.started_at = broker.clock()
        self.control_path: str | None = None
        self._accept_errors = Repeats(ACCEPT_LOG_INTERVAL)

    # ------------------------------------------------------------- listening
    def set_busy_poll(self, seconds: float) -> None:
        """How long the hub polls before it sleeps (0 = never; see :meth:`_hub`). It stays
        0 on a machine with one CPU, where the peer that sends the next request needs the
        CPU the hub would spin on, and where atomnode.gearman._busypoll was not built."""
        self.busy_poll = seconds if (os.cpu_count() or 1) > 1 and _spin_built else 0.0

    async def open_listeners(
        self, addresses: list[str], sockets: list[socket.socket] | None = None
    ) -> None:
        """Bind every address (and adopt sockets from systemd socket activation)."""
        for address in addresses:
            host, port = parse_address(address)
            try:
                lst = await trio.open_tcp_listeners(port, host=host, backlog=1024)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    hint = ""
                    if port == 4730:
                        hint = (
                            " — is gearman-job-server (gearmand) still running? Stop it with "
                            "'systemctl disable --now gearman-job-server'"
                        )
                    raise OSError(e.errno, f"cannot listen on {address}: port {port} is "
                                  f"already in use{hint}") from None
                raise OSError(e.errno, f"cannot listen on {address}: {e.strerror}") from None
            self.listeners.extend(lst)
        for s in sockets or []:
            self.listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(s)))
        for listener in self.listeners:
            name = listener.socket.getsockname()
            if isinstance(name, tuple):
                self.bound.append((name[0], name[1]))

    async def open_control_socket(self, path: str) -> None:
        """Also serve admin commands on a unix socket (a worker host's ``atomnode
        status``); mode 0660, a stale file from an earlier run is replaced."""
        import stat

        try:
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)
        except FileNotFoundError:
            pass
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.bind(path)
            os.chmod(path, 0o660)
            sock.listen(64)
        except OSError as e:
            sock.close()
            raise OSError(e.errno, f"cannot open the control socket {path}: "
                          f"{e.strerror}") from None
        self.listeners.append(trio.SocketListener(sock))
        self.control_path = path

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        """Accept and serve connections until cancelled. Listeners must be open already."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._timer_task)
                nursery.start_soon(self._hub)
                nursery.start_soon(self._accept_all)
                task_status.started()
        finally:
            for peer in list(self.peers.values()):
                self._forget_peer(peer)
            self._ep.close()

    async def _accept_all(self) -> None:
        with self._accept_scope:
            async with trio.open_nursery() as nursery:
                for lst in self.listeners:
                    nursery.start_soon(self._accept_loop, lst)

    async def _accept_loop(self, listener: trio.SocketListener) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of file descriptors (or memory): new peers wait in the backlog
                    # until a connection closes. Said once, then every ACCEPT_LOG_INTERVAL
                    # with a count, not ten times a second.
                    if self._accept_errors.should_log(e.errno):
                        more = self._accept_errors.suppressed
                        log.error("cannot accept connections: %s (%d open); retrying every "
                                  "100 ms%s", os.strerror(e.errno or 0), len(self.peers),
                                  f"; {more} more failures since the last message"
                                  if more else "")
                    await trio.sleep(0.1)
                    continue
                raise
            self._add(stream.socket)

    async def stop_accepting(self) -> None:
        self._accept_scope.cancel()
        for lst in self.listeners:
            await lst.aclose()
        self.listeners = []

    # ------------------------------------------------------------ connections
    def _add(self, sock: Any) -> None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass  # AF_UNIX, or already reset by the peer
        try:
            peername = sock.getpeername()
            local = sock.getsockname()
        except OSError:
            sock.close()
            return
        peer_ip = peername[0] if isinstance(peername, tuple) else "unix"
        if not peer_allowed(peer_ip, self.allow):
            # Closed at accept, before a byte is read: Gearman has no authentication.
            sock.close()
            msg = self.refusals.note(peer_ip, time.monotonic())
            if msg:
                log.warning("%s", msg)
            return
        fd = sock.fileno()
        conn = Conn(self._next_id, peer=peer_ip, fd=fd,
                    local=(local[0], local[1]) if isinstance(local, tuple) else ("unix", 0))
        conn.peer_port = peername[1] if isinstance(peername, tuple) else 0
        self._next_id += 1
        peer = _Peer(conn, fd, sock, Decoder(max_packet_size=self.max_packet_size))
        self.peers[conn] = peer
        self._by_fd[fd] = peer
        self.broker.connect(conn)
        self._ep.register(fd, _IN)

    def _forget_peer(self, peer: _Peer) -> None:
        """Unregister and close a connection (the broker is told separately)."""
        self._release(peer)
        if self._by_fd.get(peer.fd) is peer:
            del self._by_fd[peer.fd]
            try:
                self._ep.unregister(peer.fd)
            except (OSError, ValueError):
                pass
        self.peers.pop(peer.conn, None)
        peer.closing = True
        try:
            peer.sock.close()
        except OSError:
            pass

    def _release(self, peer: _Peer) -> None:
        """Drop what a closing peer holds from the memory accounting (and free it)."""
        if peer.pending:
            self.out_total -= len(peer.pending)
            self.freed_since_trim += len(peer.pending)
            peer.pending = bytearray()
        self._backlogged.discard(peer)
        if peer.inbuf:
            self.in_total -= peer.inbuf
            self.freed_since_trim += peer.inbuf
            peer.inbuf = 0
        self._partial.discard(peer)
        peer.decoder = Decoder(max_packet_size=self.max_packet_size)  # frees its buffer
        if peer.stream is not None:
            peer.stream = None
            if peer.stream_waiting:
                peer.stream_waiting = False
                try:
                    self._stream_queue.remove(peer)
                except ValueError:
                    pass
            else:
                self._stream_done()

    def _close(self, peer: _Peer) -> None:
        """A connection ends: the broker requeues what it held, drops what it waited for."""
        if peer.closing and peer.conn not in self.peers:
            return
        self._forget_peer(peer)
        self.broker.disconnect(peer.conn)
        ev = self.idle_events.pop(peer.conn, None)
        if ev is not None:
            ev.set()

    async def _hub(self) -> None:
        """Serve every connection's I/O, in rounds, until cancelled.

        A trio wake-up (its scheduler, in Python) costs more than a job's own work: a
        serial round trip (a client waits for each job, as AtoM's web requests do) takes
        five of them, and spent most of its CPU there. So once trio wakes the hub, it
        keeps the thread for up to :data:`HUB_HOLD`: it serves round after round, and
        when its connections are quiet it waits for them in the kernel, in its own epoll
        set. That set also holds the store's doorbell (its acknowledgements are applied
        in the hub's next round, see :meth:`store_listener`) and trio's wake-up socket,
        through which every other thread reaches trio (signals, the supervisor's
        threads): the hub goes back to trio as soon as that socket is readable, or when
        a round made a trio task runnable, or when a new connection waits on a listener,
        or when HUB_HOLD is over. What else trio watches itself (worker pipes, the
        console, timers) may wait up to HUB_HOLD. A quiet daemon sleeps in trio as
        before; a busy one pays one trio wake-up per HUB_HOLD instead of one per packet.

        Waiting in the kernel has its own price: the CPU goes idle, and on a virtual
        machine an idle CPU halts, so the next packet pays the wake-up of the CPU, and
        then of the thread, before the hub sees it. A client that waits for each reply
        (AtoM's web requests, a worker between jobs) pays it at every step. So, when the
        last round replied to someone (who may well answer at once) and the last quiet
        spell was shorter than :attr:`busy_poll`, the hub first polls for up to that long
        without sleeping. A round that replied nothing (a worker's PRE_SLEEP, a
        background submission waiting for its commit) leaves nobody to answer soon, and a
        long spell turns the poll off until a short one is seen again: so a daemon
        between bursts spends at most one ``busy_poll`` per burst, an idle one nothing
        (it sleeps in trio), and the store's writer does not compete with a spinning hub
        while it commits a submission (the two may share a CPU).
        """
        ep = self._ep
        by_fd = self._by_fd
        report_fd = self._report_bell.fileno()
        wait_readable = trio.lowlevel.wait_readable
        thread_time = time.thread_time
        kick_fd, runq = _trio_wakeup()
        if kick_fd >= 0:
            try:
                ep.register(kick_fd, select.EPOLLIN)
            except OSError:
                kick_fd, runq = -1, None
        # A new connection ends the hold too: trio accepts it.
        kicks: set[int] = set()
        if kick_fd >= 0:
            kicks.add(kick_fd)
            for listener in self.listeners:
                fd = listener.socket.fileno()
                try:
                    ep.register(fd, select.EPOLLIN)
                except OSError:
                    continue
                kicks.add(fd)
        ep_fd = ep.fileno()
        quiet_since = 0.0  # when the last round ended (gap: how long the quiet spell was)
        while True:
            await wait_readable(ep)
            started = _perf_counter()
            gap = started - quiet_since
            until = started + HUB_HOLD
            hold_cpu = thread_time()
            events = ep.poll(0)
            deferred = 0
            while events:
                kicked = False
                urgent = False  # replies to flush now (the store's acknowledgements)
                for fd, ev in events:
                    peer = by_fd.get(fd)
                    if peer is None:
                        if fd in kicks:
                            kicked = True  # trio has work: this round, then back to it
                        elif fd == report_fd:
                            self._take_reports()
                            urgent = True
                        continue
                    if ev & _EPOLLOUT:
                        self._writable(peer)
                    if ev & ~_EPOLLOUT and peer.conn in self.peers:
                        if peer.mask & _EPOLLIN:
                            self._read(peer)
                        elif ev & _GONE:
                            self._close(peer)  # a paused peer is gone
                if not (kicked or urgent or self._backlogged) and deferred < COALESCE_ROUNDS:
                    # More input already waiting (pipelining peers): serve it before
                    # writing, so that each connection's replies of these rounds go out in
                    # one write. A peer waiting for its reply has sent nothing more, and
                    # waits at most COALESCE_ROUNDS more rounds. Not while a connection's
                    # replies are backlogged: whether it is read on (PAUSE_OUTPUT) is
                    # decided on its pending bytes, which must then be current each round.
                    more = ep.poll(0)
                    if more:
                        deferred += 1
                        events = more
                        continue
                deferred = 0
                replied = bool(self.broker.out.sends)
                self.flush()
                if self.freed_since_trim >= TRIM_AFTER and self.on_memory_freed is not None:
                    self.freed_since_trim = 0
                    self.on_memory_freed()
                now = _perf_counter()
                took = now - started
                if took > self.longest_round or took > SLOW_ROUND:
                    # Long in wall time (rare once longest_round has settled): count its
                    # CPU, not time the thread was preempted. The CPU clock is a system
                    # call, so it is read once per trio wake-up, not per round: the CPU
                    # since then is this round's plus at most HUB_HOLD of earlier ones.
                    took = min(took, thread_time() - hold_cpu)
                    if took > self.longest_round:
                        self.longest_round = took
                    if took > SLOW_ROUND:
                        self.slow_rounds += 1
                quiet_since = now
                if kicked or runq is None or runq or now >= until:
                    break
                # Quiet: if this round replied and the last quiet spell was short, poll
                # without sleeping for a while; else, or when that ran out, wait in the
                # kernel for the rest of HUB_HOLD (at once if ready).
                busy_poll = self.busy_poll
                spin = replied and gap < busy_poll
                if spin and _spin(ep_fd, min(busy_poll, until - now)):
                    self.busy_hits += 1
                    events = ep.poll(0)
                else:
                    if spin:
                        self.busy_misses += 1
                    events = ep.poll(until - _perf_counter())
                started = _perf_counter()
                gap = started - now

    def _read(self, peer: _Peer) -> None:
        try:
            data = _os_read(peer.fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            self._close(peer)
            return
        if not data:
            self._close(peer)
            return
        peer.decoder.feed(data)
        self._process(peer)

    def _process(self, peer: _Peer) -> None:
        """Handle the complete requests buffered for ``peer``, until none is left or the
        peer must wait (its replies are backlogged, its admin ration for this round is
        used, or a listing is being streamed to it)."""
        conn = peer.conn
        broker = self.broker
        decoder = peer.decoder
        admin_lines = 0
        admin_bytes = 0
        handled = 0
        started = _perf_counter()
        paused = False
        try:
            while True:
                if peer.stream is not None or len(peer.pending) > PAUSE_OUTPUT:
                    paused = True
                    break
                # A batch of packets, decoded in one call; an admin line ends a batch.
                batch = decoder.next_events(BATCH)
                if not batch:
                    break
                ev = batch[-1]
                if type(ev) is not AdminLine:
                    broker.handle_many(conn, batch)  # type: ignore[arg-type]  # packets only
                    handled += len(batch)
                    if handled >= BATCH:
                        # The round's time budget, checked once per BATCH packets.
                        if _perf_counter() - started > ROUND_BUDGET:
                            paused = decoder.buffered > 0
                            break
                        handled = 0
                    continue
                if len(batch) > 1:
                    batch.pop()
                    broker.handle_many(conn, batch)  # type: ignore[arg-type]  # packets only
                if self._admin_reply is None:
                    reply: Any = b"ERR UNKNOWN_COMMAND Unknown+server+command\r\n"
                else:
                    reply = self._admin_reply(self, conn, ev.line)
                if type(reply) is bytes:
                    if reply:
                        broker.send(conn, reply)
                        admin_bytes += len(reply)
                else:
                    self._start_stream(peer, reply)
                admin_lines += 1
                if (admin_lines >= ADMIN_ROUND_LINES or admin_bytes >= ADMIN_ROUND_BYTES
                        or _perf_counter() - started > ROUND_BUDGET):
                    paused = decoder.buffered > 0 or peer.stream is not None
                    break
        except ProtocolError as e:
            log.warning("closing connection %d from %s: %s", conn.id, conn.peer, e)
            broker.send(conn, error_packet(e.code, e.message))
            self.flush()  # best effort: the ERROR goes out before the close
            self._close(peer)
            return
        except Exception:  # noqa: BLE001 - a bug must cost one connection, not the daemon
            log.exception("internal error on connection %d from %s; closing it",
                          conn.id, conn.peer)
            self._close(peer)
            return
        peer.paused = paused
        self._account_input(peer)
        self._rearm(peer)

    # ------------------------------------------------------------ flow control
    def _rearm(self, peer: _Peer) -> None:
        """Watch ``peer`` for what it needs now: input unless paused or streaming,
        writability while replies are pending or it has work waiting."""
        if peer.closing:
            return
        if peer.stream_waiting:
            mask = _HUP
        elif peer.paused or peer.stream is not None:
            mask = _OUT
        elif peer.pending:
            mask = _IN_OUT
        else:
            mask = _IN
        if mask != peer.mask:
            peer.mask = mask
            try:
                self._ep.modify(peer.fd, mask)
            except OSError:
                pass

    def _writable(self, peer: _Peer) -> None:
        """EPOLLOUT: write what is pending; once it is all written, make the next chunk
        of a listing, or carry on with requests that were waiting."""
        if peer.pending:
            self._write_pending(peer)
            if peer.pending or peer.closing:
                return
        if peer.stream is not None and not peer.stream_waiting:
            chunk = next(peer.stream, None)
            if chunk is None:
                peer.stream = None
                self._stream_done()
            else:
                self.broker.send(peer.conn, chunk)
                return
        if peer.paused:
            self._process(peer)
        else:
            self._rearm(peer)

    def _start_stream(self, peer: _Peer, stream: Iterator[bytes]) -> None:
        peer.stream = stream
        if self._streams < MAX_STREAMS:
            self._streams += 1
        else:
            peer.stream_waiting = True
            self._stream_queue.append(peer)

    def _stream_done(self) -> None:
        """A listing ended (or its peer left): the next waiting one gets the slot."""
        self._streams -= 1
        while self._stream_queue:
            nxt = self._stream_queue.popleft()
            if nxt.stream is not None and not nxt.closing:
                nxt.stream_waiting = False
                self._streams += 1
                self._rearm(nxt)
                return

    def _account_input(self, peer: _Peer) -> None:
        """Count ``peer``'s unprocessed input in the total; enforce max_input_total."""
        decoder = peer.decoder
        n = decoder.buffered
        if n == 0:
            decoder.compact()  # an idle connection keeps no buffer
        if n != peer.inbuf:
            self.in_total += n - peer.inbuf
            if n < peer.inbuf:
                self.freed_since_trim += peer.inbuf - n
            peer.inbuf = n
            if n:
                self._partial.add(peer)
            else:
                self._partial.discard(peer)
        if self.in_total > self.max_input_total:
            self._shed(self._partial, lambda p: p.inbuf, lambda: self.in_total,
                       self.max_input_total, "unfinished input packets")

    def _shed(self, candidates: set[_Peer], size: Callable[[_Peer], int],
              total: Callable[[], int], limit: int, what: str) -> None:
        """Close the connections holding the most until ``total()`` <= ``limit``."""
        for victim in sorted(candidates, key=size, reverse=True):
            if total() <= limit:
                break
            held = size(victim)
            if self._limit_log.should_log(what):
                more = self._limit_log.suppressed
                log.warning("closing connection %d from %s: it holds %d bytes of %s and "
                            "all connections together hold more than the limit of %d "
                            "(limits in the configuration)%s", victim.conn.id,
                            victim.conn.peer, held, what, limit,
                            f"; {more} more closed for this since" if more else "")
            self._close(victim)

    def _add_pending(self, peer: _Peer, data: bytes) -> None:
        """Keep bytes the kernel did not take; enforce the output limits."""
        peer.pending += data
        self.out_total += len(data)
        self._backlogged.add(peer)
        if len(peer.pending) > self.max_output_per_connection:
            if self._limit_log.should_log(peer.conn.peer):
                log.warning("closing connection %d from %s: it does not read its replies "
                            "(%d bytes unread, limit %d per connection)", peer.conn.id,
                            peer.conn.peer, len(peer.pending), self.max_output_per_connection)
            self._close(peer)
            return
        if self.out_total > self.max_output_total:
            self._shed(self._backlogged, lambda p: len(p.pending), lambda: self.out_total,
                       self.max_output_total, "unread replies")

    def _write_pending(self, peer: _Peer) -> None:
        try:
            n = _os_write(peer.fd, peer.pending)
        except BlockingIOError:
            return
        except OSError:
            self._close(peer)
            return
        self.out_total -= n
        if n == len(peer.pending):
            if n > PAUSE_OUTPUT:
                self.freed_since_trim += n
            peer.pending = bytearray()  # not del[:n]: that may keep the allocation
            self._backlogged.discard(peer)
            self._rearm(peer)
        else:
            del peer.pending[:n]

    def flush(self) -> None:
        """After the broker ran: take its outbox, hand the store commands to the store,
        write every reply, wake whoever waits for an idle worker, re-arm timers."""
        out = self.broker.take_outbox()
        # Replies first: handing commands to the store wakes its writer thread, which then
        # wants the GIL; a JOB_ASSIGN written after that waited for the handover (0.1-0.3
        # ms of a durable background job's latency). Nothing here needs the order: what a
        # reply acknowledges was committed before the broker sent it (an INSERT's
        # JOB_CREATED waits for its commit), and a START may be stored after its
        # JOB_ASSIGN went out, as it may be lost in a crash anyway (the job then runs again).
        if out.sends:
            self._write(out.sends)
        if out.store and self.store is not None:
            self.store.submit_many(out.store)
        if out.idle:
            for conn in out.idle:
                ev = self.idle_events.pop(conn, None)
                if ev is not None:
                    ev.set()
        if out.timers:
            self._timer_wakeup.set()

    def _write(self, sends: dict[Conn, list[bytes]]) -> None:
        """Write each connection's replies (straight to the socket when it takes them)."""
        peers = self.peers
        for conn, out in sends.items():
            data = out[0] if len(out) == 1 else b"".join(out)
            peer = peers.get(conn)
            if peer is None:
                deliver = self.local.get(conn)
                if deliver is not None:
                    deliver(data)
                continue
            if peer.pending:
                self._add_pending(peer, data)
                continue
            try:
                n = _os_write(peer.fd, data)
            except BlockingIOError:
                n = 0
            except OSError:
                continue  # the hub sees the error on the next read and cleans up
            if n < len(data):
                self._add_pending(peer, data[n:] if n else data)
                if not peer.closing:
                    self._rearm(peer)

    # ------------------------------------------------------- in-process workers
    def attach_local(self, deliver: Callable[[bytes], None], client_id: bytes = b"-") -> Conn:
        """A connection that lives inside the daemon (atomnode's own workers): it talks
        to the broker directly, without a socket. Its requests go in through
        :meth:`handle_local`; the broker's replies (encoded packets) are passed to
        ``deliver`` when the round's outbox is written. It shows in ``workers`` with
        address ``local`` and counts in ``status`` like any worker."""
        conn = Conn(self._next_id, peer="local")
        conn.client_id = client_id
        self._next_id += 1
        self.local[conn] = deliver
        self.broker.connect(conn)
        return conn

    def handle_local(self, conn: Conn, packets: list[Any]) -> None:
        """Requests from an in-process connection: the broker handles them now, and the
        outbox is written (replies delivered, store commands handed on)."""
        if conn not in self.local:
            return
        self.broker.handle_many(conn, packets)
        self.flush()

    def detach_local(self, conn: Conn) -> None:
        """An in-process connection ends: as when a socket closes, the broker requeues
        the jobs it still holds."""
        if self.local.pop(conn, None) is None:
            return
        self.broker.disconnect(conn)
        ev = self.idle_events.pop(conn, None)
        if ev is not None:
            ev.set()
        self.flush()

    # ------------------------------------------------------------------ timers
    async def _timer_task(self) -> None:
        broker = self.broker
        while True:
            deadline = broker.next_deadline()
            with trio.move_on_after(
                max(0.0, deadline - broker.clock()) if deadline is not None else 3600
            ):
                await self._timer_wakeup.wait()
            self._timer_wakeup = trio.Event()
            broker.tick()
            self.flush()

    # ------------------------------------------------------------- store glue
    def store_listener(self) -> Callable[[list, list], None]:
        """The ``on_result`` callback to give the store's writer.

        The writer calls it from its own thread after each batch that carried tokens.
        It queues the report and rings an eventfd in the hub's epoll set: the hub
        applies it in its next round (:meth:`_take_reports`), at once if it is holding
        the thread, else as soon as trio wakes it; an acknowledgement does not wait for
        a pass of trio's scheduler. Reports that arrive once the hub has stopped are
        never applied (nothing is left to acknowledge)."""
        reports = self._reports
        bell = self._report_bell

        def on_result(committed: list, failed: list) -> None:
            reports.append((committed, failed))
            bell.ring()

        return on_result

    def _take_reports(self) -> None:
        """In the hub: apply every report the store's writer has queued."""
        self._report_bell.reset()
        reports = self._reports
        while reports:
            committed, failed = reports.popleft()
            if committed:
                self.broker.committed(committed)
            if failed:
                self.broker.commit_failed(failed)

    # ------------------------------------------------------------------ drain
    async def wait_idle(self, conn: Conn) -> None:
        """Return when ``conn`` holds no job (or has closed)."""
        while conn.held and not conn.closed:
            ev = self.idle_events.get(conn)
            if ev is None:
                ev = self.idle_events[conn] = trio.Event()
            await ev.wait()

    async def drain_all(self, timeout: float) -> bool:
        """Stop handing out jobs and wait up to ``timeout`` s for running ones to end.
        True if every job finished in time."""
        self.broker.shutdown_drain_all()
        busy = [c for c in list(self.broker.conns.values()) if c.held]
        if busy:
            log.info("waiting up to %gs for %d worker(s) to finish their jobs",
                     timeout, len(busy))
        with trio.move_on_after(timeout):
            for c in busy:
                await self.wait_idle(c)
            return True
        left = sum(len(c.held) for c in self.broker.conns.values())
        log.warning("shutdown: %d job(s) still running after %gs; they will run again "
                    "after the restart", left, timeout)
        return False

