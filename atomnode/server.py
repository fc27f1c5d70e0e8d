"""The trio listener: one task per connection, bytes <-> codec <-> broker.

Each connection task reads what is available, decodes every complete packet, lets the
broker process them, then flushes: outgoing bytes are written straight to the socket
when it can take them (no task switch on the common path); a per-connection writer task
takes over only when the kernel buffer is full. Durable-queue operations produced by
the batch go to the store in one call. So a read of 64 pipelined submits costs one
``receive``, one store hand-off and one ``write`` per peer touched.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import trio

from . import protocol
from .broker import Broker, Conn
from .protocol import AdminLine, Decoder, ProtocolError, error_packet

log = logging.getLogger("atomnode.server")

#: A peer that stops reading gets this much buffered before it is disconnected.
MAX_OUTBUF = 256 * 1024 * 1024
READ_SIZE = 256 * 1024


class _Peer:
    """I/O state of one connection, beside the broker's :class:`Conn`."""

    __slots__ = ("conn", "fd", "stream", "pending", "wakeup", "closing", "decoder", "is_loopback")

    def __init__(self, conn: Conn, fd: int, stream: trio.SocketStream, decoder: Decoder,
                 is_loopback: bool):
        self.conn = conn
        self.fd = fd
        self.stream = stream
        self.pending = bytearray()  # bytes the kernel did not take yet
        self.wakeup = trio.Event()
        self.closing = False
        self.decoder = decoder
        self.is_loopback = is_loopback


def parse_listen(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"listen address {address!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host or "0.0.0.0", int(port)


class Server:
    """Serves the Gearman protocol (binary and text admin) for one :class:`Broker`.

    ``admin`` is a callable ``(server, peer, line) -> bytes`` answering a text command
    (see :mod:`atomnode.admin`). ``store`` has ``submit_many(ops)`` (or is None when the
    broker is not durable).
    """

    def __init__(
        self,
        broker: Broker,
        *,
        store: Any = None,
        admin: Callable[[Server, Conn, bytes], bytes] | None = None,
        max_packet_size: int = protocol.DEFAULT_MAX_PACKET_SIZE,
    ):
        self.broker = broker
        self.store = store
        self.admin = admin
        self.max_packet_size = max_packet_size
        self.peers: dict[Conn, _Peer] = {}
        self._next_id = 1
        self._timer_wakeup = trio.Event()
        self._flush_wakeup = trio.Event()
        self._accept_scope = trio.CancelScope()
        self.listeners: list[trio.SocketListener] = []
        self.bound: list[tuple[str, int]] = []
        self.shutdown_requested = trio.Event()
        self.graceful_shutdown = False
        self.idle_events: dict[Conn, trio.Event] = {}
        self.started_at = time.time()
        self._nursery: trio.Nursery | None = None

    # ------------------------------------------------------------- listening
    async def open_listeners(
        self, addresses: list[str], sockets: list[socket.socket] | None = None
    ) -> None:
        """Bind every address (and adopt sockets from systemd socket activation)."""
        for address in addresses:
            host, port = parse_listen(address)
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
            self.bound.append((name[0], name[1]))

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        """Accept connections until cancelled. Listeners must be open already."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._timer_task)
            nursery.start_soon(self._flusher)
            nursery.start_soon(self._accept_all, nursery)
            task_status.started()

    async def _accept_all(self, conn_nursery: trio.Nursery) -> None:
        with self._accept_scope:
            async with trio.open_nursery() as nursery:
                for lst in self.listeners:
                    nursery.start_soon(self._accept_loop, lst, conn_nursery)

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("accept failed (%s); retrying in 100 ms", e)
                    await trio.sleep(0.1)
                    continue
                raise
            nursery.start_soon(self._connection, stream)

    async def stop_accepting(self) -> None:
        self._accept_scope.cancel()
        for lst in self.listeners:
            await lst.aclose()
        self.listeners = []

    # ------------------------------------------------------------ connections
    async def _connection(self, stream: trio.SocketStream) -> None:
        sock = stream.socket
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass  # AF_UNIX or already closed
        try:
            peername = sock.getpeername()
            local = sock.getsockname()
        except OSError:
            await stream.aclose()
            return
        peer_ip = peername[0] if isinstance(peername, tuple) else "unix"
        conn = Conn(self._next_id, peer=peer_ip, fd=sock.fileno(),
                    local=(local[0], local[1]) if isinstance(local, tuple) else ("unix", 0))
        conn.peer_port = peername[1] if isinstance(peername, tuple) else 0
        self._next_id += 1
        decoder = Decoder(max_packet_size=self.max_packet_size)
        peer = _Peer(conn, sock.fileno(), stream, decoder, _is_loopback(peer_ip))
        self.peers[conn] = peer
        self.broker.connect(conn)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer, peer)
                await self._reader(peer)
                nursery.cancel_scope.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            self.peers.pop(conn, None)
            self.broker.disconnect(conn)
            self.flush()
            ev = self.idle_events.pop(conn, None)
            if ev is not None:
                ev.set()
            with trio.CancelScope(shield=True):
                try:
                    await stream.aclose()
                except Exception:  # noqa: BLE001 - closing a broken socket
                    pass

    async def _reader(self, peer: _Peer) -> None:
        stream = peer.stream
        decoder = peer.decoder
        broker = self.broker
        conn = peer.conn
        handle = broker.handle
        sock = stream.socket
        fd = peer.fd
        wait_readable = trio.lowlevel.wait_readable
        while not peer.closing:
            # Wait first, then read once: a read that would block costs a system call
            # as dear as handling a packet, and SocketStream.receive_some tries one.
            try:
                await wait_readable(sock)
                data = os.read(fd, READ_SIZE)
            except BlockingIOError:
                continue
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return
            if not data:
                return
            decoder.feed(data)
            try:
                while True:
                    ev = decoder.next_event()
                    if ev is None:
                        break
                    if type(ev) is AdminLine:
                        if self.admin is None:
                            reply = b"ERR UNKNOWN_COMMAND Unknown+server+command\r\n"
                        else:
                            reply = self.admin(self, conn, ev.line)
                        if reply:
                            broker._send(conn, reply)
                    else:
                        handle(conn, ev)
            except ProtocolError as e:
                log.warning("closing connection %d from %s: %s", conn.id, conn.peer, e)
                broker._send(conn, error_packet(e.code, e.message))
                self.flush()
                peer.closing = True
                await self._drain_out(peer)
                return
            except Exception:  # noqa: BLE001 - a bug must cost one connection, not the daemon
                log.exception("internal error on connection %d from %s; closing it",
                              conn.id, conn.peer)
                self.flush()
                return
            self.flush()

    async def _drain_out(self, peer: _Peer) -> None:
        """Give a connection we are about to close a moment to receive its last bytes."""
        self.write_dirty()
        with trio.move_on_after(1):
            while peer.pending:
                await trio.sleep(0.01)

    async def _writer(self, peer: _Peer) -> None:
        fd = peer.fd
        while True:
            await peer.wakeup.wait()
            peer.wakeup = trio.Event()
            while peer.pending:
                await trio.lowlevel.wait_writable(peer.stream.socket)
                try:
                    n = os.write(fd, peer.pending)
                except BlockingIOError:
                    continue
                del peer.pending[:n]

    def flush(self) -> None:
        """Hand the broker's store ops to the store, and schedule the writes.

        Writes are deferred to the flusher task, which runs after every connection task
        made runnable in the same scheduler round: bytes for one peer produced by many
        reads go out in one write system call (each costs as much as handling a packet).
        """
        broker = self.broker
        if broker.store_ops:
            ops = broker.store_ops
            broker.store_ops = []
            if self.store is not None:
                self.store.submit_many(ops)
        if broker.dirty:
            self._flush_wakeup.set()
        if broker.became_idle:
            for conn in broker.take_idle():
                ev = self.idle_events.pop(conn, None)
                if ev is not None:
                    ev.set()
        if broker.timers_changed:
            self._timer_wakeup.set()

    async def _flusher(self) -> None:
        while True:
            await self._flush_wakeup.wait()
            self._flush_wakeup = trio.Event()
            self.write_dirty()

    def write_dirty(self) -> None:
        """Write every pending reply now (straight to the socket when it takes it)."""
        broker = self.broker
        if not broker.dirty:
            return
        dirty = broker.dirty
        broker.dirty = set()
        for conn in dirty:
            out = conn.out
            if not out:
                continue
            data = out[0] if len(out) == 1 else b"".join(out)
            out.clear()
            peer = self.peers.get(conn)
            if peer is None:
                continue
            if peer.pending:
                peer.pending += data
                if len(peer.pending) > MAX_OUTBUF:
                    log.warning("connection %d from %s does not read its replies; closing",
                                conn.id, conn.peer)
                    peer.closing = True
                    peer.stream.socket.close()
                continue
            try:
                n = os.write(peer.fd, data)
            except BlockingIOError:
                n = 0
            except OSError:
                continue  # the reader sees the error and cleans up
            if n < len(data):
                peer.pending += data[n:]
                peer.wakeup.set()

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
    def on_store_result(self, committed: list, failed: list) -> None:
        """Called in the trio thread after each store batch."""
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


def _is_loopback(ip: str) -> bool:
    return ip.startswith("127.") or ip in ("::1", "unix") or ip.startswith("::ffff:127.")
