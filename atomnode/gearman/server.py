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
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import time
from collections.abc import Callable
from typing import Any

import trio

from . import protocol
from .broker import Broker, Conn
from ..system.access import Network, RefusalLog, peer_allowed
from ..system.values import parse_address
from .protocol import AdminLine, Decoder, ProtocolError, error_packet

log = logging.getLogger("atomnode.server")

#: A peer that stops reading gets this much buffered before it is disconnected.
MAX_OUTBUF = 256 * 1024 * 1024
READ_SIZE = 256 * 1024
#: Rounds the hub may serve back to back before yielding to trio's scheduler.
HUB_SPIN = 8

_IN = select.EPOLLIN | select.EPOLLRDHUP
_IN_OUT = _IN | select.EPOLLOUT


class _Peer:
    """I/O state of one connection, beside the broker's :class:`Conn`."""

    __slots__ = ("conn", "fd", "sock", "pending", "closing", "decoder")

    def __init__(self, conn: Conn, fd: int, sock: Any, decoder: Decoder):
        self.conn = conn
        self.fd = fd
        self.sock = sock  # the trio socket, kept to close it
        self.pending = bytearray()  # bytes the kernel did not take yet
        self.closing = False
        self.decoder = decoder


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
    ):
        self.broker = broker
        #: Networks allowed to connect besides loopback (``allow:``); see system/access.py.
        self.allow = allow
        self.refusals = RefusalLog()
        self.store = store
        self.admin = admin
        self.max_packet_size = max_packet_size
        self.peers: dict[Conn, _Peer] = {}
        self._next_id = 1
        self._timer_wakeup = trio.Event()
        self._accept_scope = trio.CancelScope()
        self._ep = select.epoll()
        self._by_fd: dict[int, _Peer] = {}
        self.listeners: list[trio.SocketListener] = []
        self.bound: list[tuple[str, int]] = []
        self.idle_events: dict[Conn, trio.Event] = {}
        self.started_at = broker.clock()
        self.control_path: str | None = None

    # ------------------------------------------------------------- listening
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
        for lst in self.listeners:
            name = lst.socket.getsockname()
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
                    log.error("accept failed (%s); retrying in 100 ms", e)
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
        ep = self._ep
        by_fd = self._by_fd
        wait_readable = trio.lowlevel.wait_readable
        while True:
            await wait_readable(ep)
            # Under load, more bytes arrive while a round is processed: poll again at
            # once, a few times, before going back through trio's scheduler (a trio
            # round costs more than the jobs in it). Bounded, so timers, the store's
            # acknowledgements and new connections wait at most a few rounds.
            for _ in range(HUB_SPIN):
                events = ep.poll(0)
                if not events:
                    break
                for fd, ev in events:
                    peer = by_fd.get(fd)
                    if peer is None:
                        continue
                    if ev & select.EPOLLOUT:
                        self._write_pending(peer)
                    if ev & ~select.EPOLLOUT:
                        self._read(peer)
                self.flush()

    def _read(self, peer: _Peer) -> None:
        try:
            data = os.read(peer.fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            self._close(peer)
            return
        if not data:
            self._close(peer)
            return
        conn = peer.conn
        broker = self.broker
        decoder = peer.decoder
        try:
            for ev in decoder.events(data):
                if type(ev) is AdminLine:
                    if self.admin is None:
                        reply = b"ERR UNKNOWN_COMMAND Unknown+server+command\r\n"
                    else:
                        reply = self.admin(self, conn, ev.line)
                    if reply:
                        broker.send(conn, reply)
                else:
                    broker.handle(conn, ev)
        except ProtocolError as e:
            log.warning("closing connection %d from %s: %s", conn.id, conn.peer, e)
            broker.send(conn, error_packet(e.code, e.message))
            self.flush()  # best effort: the ERROR goes out before the close
            self._close(peer)
        except Exception:  # noqa: BLE001 - a bug must cost one connection, not the daemon
            log.exception("internal error on connection %d from %s; closing it",
                          conn.id, conn.peer)
            self._close(peer)

    def _write_pending(self, peer: _Peer) -> None:
        try:
            n = os.write(peer.fd, peer.pending)
        except BlockingIOError:
            return
        except OSError:
            self._close(peer)
            return
        del peer.pending[:n]
        if not peer.pending:
            self._ep.modify(peer.fd, _IN)

    def flush(self) -> None:
        """After the broker ran: take its outbox, hand the store commands to the store,
        write every reply, wake whoever waits for an idle worker, re-arm timers."""
        out = self.broker.take_outbox()
        if out.store and self.store is not None:
            self.store.submit_many(out.store)
        if out.sends:
            self._write(out.sends)
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
                continue
            if peer.pending:
                peer.pending += data
                if len(peer.pending) > MAX_OUTBUF:
                    log.warning("connection %d from %s does not read its replies; closing",
                                conn.id, conn.peer)
                    self._close(peer)
                continue
            try:
                n = os.write(peer.fd, data)
            except BlockingIOError:
                n = 0
            except OSError:
                continue  # the hub sees the error on the next read and cleans up
            if n < len(data):
                peer.pending += data[n:]
                try:
                    self._ep.modify(peer.fd, _IN_OUT)
                except OSError:
                    pass

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
        """The ``on_result`` callback to give the store's writer (call from inside trio).

        The writer calls it from its own thread; it hands the report to
        :meth:`on_store_result` in the trio thread. After the trio run has ended, reports
        are dropped (nothing is left to acknowledge)."""
        token = trio.lowlevel.current_trio_token()

        def on_result(committed: list, failed: list) -> None:
            try:
                token.run_sync_soon(self.on_store_result, committed, failed)
            except trio.RunFinishedError:
                pass

        return on_result

    def on_store_result(self, committed: list, failed: list) -> None:
        """In the trio thread after each store batch: the broker acknowledges what was
        committed (jobs, operator commands) and reports what was not."""
        if committed:
            self.broker.committed(committed)
        if failed:
            self.broker.commit_failed(failed)
        self.flush()

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

