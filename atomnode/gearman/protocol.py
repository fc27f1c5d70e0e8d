"""Sans-I/O codec for the Gearman protocol (binary packets and the text admin protocol).

Bytes go in with :meth:`Decoder.feed`, events come out of :meth:`Decoder.next_event`:
:class:`Packet` for a binary packet, :class:`AdminLine` for a text admin command (any
message whose first byte is not NUL), or ``None`` when more bytes are needed. Malformed
input raises :class:`ProtocolError`, which carries the Gearman error code to send before
closing the connection. :func:`encode` turns a packet back into bytes.

Nothing here does I/O or imports anything of atomnode: it is tested with plain calls and
fuzzed.
"""

from __future__ import annotations

import struct
from enum import IntEnum
from typing import Any, Final, NamedTuple

REQ = b"\0REQ"
RES = b"\0RES"
HEADER = struct.Struct(">4sII")
HEADER_SIZE = 12

#: gearmand's limits (libgearman-server/constants.h: GEARMAN_MAX_UNIQUE_SIZE 64,
#: GEARMAN_FUNCTION_MAX_SIZE 512).
MAX_UNIQUE_SIZE = 64
MAX_FUNCTION_SIZE = 512
DEFAULT_MAX_PACKET_SIZE = 64 * 1024 * 1024
MAX_ADMIN_LINE = 64 * 1024


class T(IntEnum):
    """Gearman packet types, numbered as on the wire."""

    CAN_DO = 1
    CANT_DO = 2
    RESET_ABILITIES = 3
    PRE_SLEEP = 4
    NOOP = 6
    SUBMIT_JOB = 7
    JOB_CREATED = 8
    GRAB_JOB = 9
    NO_JOB = 10
    JOB_ASSIGN = 11
    WORK_STATUS = 12
    WORK_COMPLETE = 13
    WORK_FAIL = 14
    GET_STATUS = 15
    ECHO_REQ = 16
    ECHO_RES = 17
    SUBMIT_JOB_BG = 18
    ERROR = 19
    STATUS_RES = 20
    SUBMIT_JOB_HIGH = 21
    SET_CLIENT_ID = 22
    CAN_DO_TIMEOUT = 23
    ALL_YOURS = 24
    WORK_EXCEPTION = 25
    OPTION_REQ = 26
    OPTION_RES = 27
    WORK_DATA = 28
    WORK_WARNING = 29
    GRAB_JOB_UNIQ = 30
    JOB_ASSIGN_UNIQ = 31
    SUBMIT_JOB_HIGH_BG = 32
    SUBMIT_JOB_LOW = 33
    SUBMIT_JOB_LOW_BG = 34
    SUBMIT_JOB_SCHED = 35
    SUBMIT_JOB_EPOCH = 36
    SUBMIT_REDUCE_JOB = 37
    SUBMIT_REDUCE_JOB_BACKGROUND = 38
    GRAB_JOB_ALL = 39
    JOB_ASSIGN_ALL = 40
    GET_STATUS_UNIQUE = 41
    STATUS_RES_UNIQUE = 42


#: Number of arguments of each packet type, as gearmand's command table
#: (libgearman/command.cc) counts them, the trailing data argument included.
ARG_COUNT: dict[int, int] = {
    T.CAN_DO: 1,
    T.CANT_DO: 1,
    T.RESET_ABILITIES: 0,
    T.PRE_SLEEP: 0,
    T.NOOP: 0,
    T.SUBMIT_JOB: 3,
    T.JOB_CREATED: 1,
    T.GRAB_JOB: 0,
    T.NO_JOB: 0,
    T.JOB_ASSIGN: 3,
    T.WORK_STATUS: 3,
    T.WORK_COMPLETE: 2,
    T.WORK_FAIL: 1,
    T.GET_STATUS: 1,
    T.ECHO_REQ: 1,
    T.ECHO_RES: 1,
    T.SUBMIT_JOB_BG: 3,
    T.ERROR: 2,
    T.STATUS_RES: 5,
    T.SUBMIT_JOB_HIGH: 3,
    T.SET_CLIENT_ID: 1,
    T.CAN_DO_TIMEOUT: 2,
    T.ALL_YOURS: 0,
    T.WORK_EXCEPTION: 2,
    T.OPTION_REQ: 1,
    T.OPTION_RES: 1,
    T.WORK_DATA: 2,
    T.WORK_WARNING: 2,
    T.GRAB_JOB_UNIQ: 0,
    T.JOB_ASSIGN_UNIQ: 4,
    T.SUBMIT_JOB_HIGH_BG: 3,
    T.SUBMIT_JOB_LOW: 3,
    T.SUBMIT_JOB_LOW_BG: 3,
    T.SUBMIT_JOB_SCHED: 8,
    T.SUBMIT_JOB_EPOCH: 4,
    T.SUBMIT_REDUCE_JOB: 5,
    T.SUBMIT_REDUCE_JOB_BACKGROUND: 5,
    T.GRAB_JOB_ALL: 0,
    T.JOB_ASSIGN_ALL: 5,
    T.GET_STATUS_UNIQUE: 1,
    T.STATUS_RES_UNIQUE: 6,
}

#: Types a client or worker may send (request magic).
REQUEST_TYPES = frozenset(
    {
        T.CAN_DO, T.CANT_DO, T.RESET_ABILITIES, T.PRE_SLEEP, T.SUBMIT_JOB, T.GRAB_JOB,
        T.WORK_STATUS, T.WORK_COMPLETE, T.WORK_FAIL, T.GET_STATUS, T.ECHO_REQ,
        T.SUBMIT_JOB_BG, T.SUBMIT_JOB_HIGH, T.SET_CLIENT_ID, T.CAN_DO_TIMEOUT, T.ALL_YOURS,
        T.WORK_EXCEPTION, T.OPTION_REQ, T.WORK_DATA, T.WORK_WARNING, T.GRAB_JOB_UNIQ,
        T.SUBMIT_JOB_HIGH_BG, T.SUBMIT_JOB_LOW, T.SUBMIT_JOB_LOW_BG, T.SUBMIT_JOB_SCHED,
        T.SUBMIT_JOB_EPOCH, T.SUBMIT_REDUCE_JOB, T.SUBMIT_REDUCE_JOB_BACKGROUND,
        T.GRAB_JOB_ALL, T.GET_STATUS_UNIQUE,
    }
)
#: Types a server sends (response magic).
RESPONSE_TYPES = frozenset(
    {
        T.NOOP, T.JOB_CREATED, T.NO_JOB, T.JOB_ASSIGN, T.WORK_STATUS, T.WORK_COMPLETE,
        T.WORK_FAIL, T.ECHO_RES, T.ERROR, T.STATUS_RES, T.WORK_EXCEPTION, T.OPTION_RES,
        T.WORK_DATA, T.WORK_WARNING, T.JOB_ASSIGN_UNIQ, T.JOB_ASSIGN_ALL, T.STATUS_RES_UNIQUE,
    }
)


class Packet(NamedTuple):
    """One binary packet: its type, its arguments, and whether it carried ``\\0REQ``."""

    type: int
    args: tuple[bytes, ...]
    request: bool = True

    @property
    def name(self) -> str:
        try:
            return T(self.type).name
        except ValueError:
            return f"UNKNOWN_{self.type}"


class AdminLine(NamedTuple):
    """A line of the text admin protocol, without its line ending."""

    line: bytes

    @property
    def words(self) -> list[str]:
        return self.line.decode("utf-8", "replace").split()


class ProtocolError(Exception):
    """Input that cannot be parsed. ``code`` is the Gearman ERROR code to answer with;
    the connection is closed afterwards."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def encode(type_: int, *args: bytes, request: bool = False) -> bytes:
    """Encode one packet. Servers send responses (the default)."""
    body = b"\0".join(args)
    return HEADER.pack(REQ if request else RES, type_, len(body)) + body


#: ``pack_size(n)``: a body length as the header's last four bytes.
pack_size = struct.Struct(">I").pack


def response_prefix(type_: int) -> bytes:
    """The first eight bytes of every response of this type (magic and type): a hot path
    builds a packet as ``prefix + pack_size(len(body)) + body``, the same bytes as
    :func:`encode` without its per-call work."""
    return RES + struct.pack(">I", type_)


def encode_packet(packet: Packet) -> bytes:
    return encode(packet.type, *packet.args, request=packet.request)


def error_packet(code: str, message: str) -> bytes:
    """An ERROR response (code, text)."""
    return encode(T.ERROR, code.encode(), message.encode())


def split_args(type_: int, body: bytes) -> tuple[bytes, ...]:
    """Split a packet body into its arguments; the last argument keeps any NULs."""
    n = ARG_COUNT[type_]
    if n == 0:
        if body:
            raise ProtocolError("INVALID_PACKET", f"{T(type_).name} takes no arguments")
        return ()
    if n == 1:
        return (body,)
    args = body.split(b"\0", n - 1)
    if len(args) != n:
        # Tolerate a missing empty data argument ("func\0unique" for an empty payload),
        # as libgearman does; anything shorter is malformed.
        if len(args) == n - 1 and _has_data(type_):
            args.append(b"")
        else:
            raise ProtocolError(
                "INVALID_PACKET",
                f"{T(type_).name} needs {n} arguments, got {len(args)}",
            )
    return tuple(args)


_DATA_TYPES = frozenset(
    {
        T.SUBMIT_JOB, T.SUBMIT_JOB_BG, T.SUBMIT_JOB_HIGH, T.SUBMIT_JOB_HIGH_BG,
        T.SUBMIT_JOB_LOW, T.SUBMIT_JOB_LOW_BG, T.SUBMIT_JOB_SCHED, T.SUBMIT_JOB_EPOCH,
        T.SUBMIT_REDUCE_JOB, T.SUBMIT_REDUCE_JOB_BACKGROUND, T.JOB_ASSIGN, T.JOB_ASSIGN_UNIQ,
        T.JOB_ASSIGN_ALL, T.WORK_COMPLETE, T.WORK_EXCEPTION, T.WORK_DATA, T.WORK_WARNING,
        T.ECHO_REQ, T.ECHO_RES,
    }
)


def _has_data(type_: int) -> bool:
    return type_ in _DATA_TYPES


#: Argument counts of the types each side may receive, for the decoder's fast path.
_REQUEST_NARGS: dict[int, int] = {int(t): ARG_COUNT[t] for t in REQUEST_TYPES}
_RESPONSE_NARGS: dict[int, int] = {int(t): ARG_COUNT[t] for t in RESPONSE_TYPES}
#: The fast path reads the magic as an integer: no 4-byte object and no bytes comparison
#: per packet.
_unpack_header_ints = struct.Struct(">III").unpack_from
_REQ_INT: Final = int.from_bytes(REQ, "big")
_RES_INT: Final = int.from_bytes(RES, "big")
_new_tuple = tuple.__new__
_c_decode: Any = None
try:  # the fast path in C (setup.py builds it; the same loop in Python serves without it)
    from . import _fastdecode

    _c_decode = _fastdecode.decode
except ImportError:  # pragma: no cover - pure-Python installs
    pass


def _nargs_table(nargs: dict[int, int]) -> bytes:
    """The argument counts by packet type as 256 bytes (255: not accepted), for C."""
    table = bytearray(b"\xff" * 256)
    for type_, count in nargs.items():
        table[type_] = count
    return bytes(table)


_REQUEST_TABLE: Final = _nargs_table(_REQUEST_NARGS)
_RESPONSE_TABLE: Final = _nargs_table(_RESPONSE_NARGS)
#: A partial packet up to this size is carried into the next read's buffer by copying it.
_CARRY_MAX = 65536


class Decoder:
    """Incremental decoder for one connection.

    ``expect_requests`` is True on the server side: packets must carry ``\\0REQ`` and be
    request types. A client-side decoder (used by atomnode's own CLI and tests) sets it
    False. Text lines are only recognised on the server side.
    """

    __slots__ = ("_buf", "_pos", "max_packet_size", "expect_requests", "_magic", "_nargs",
                 "_table")

    def __init__(
        self, *, expect_requests: bool = True, max_packet_size: int = DEFAULT_MAX_PACKET_SIZE
    ):
        self._buf: bytes | bytearray = b""
        self._pos = 0
        self.max_packet_size = max_packet_size
        self.expect_requests = expect_requests
        # The fast path: the magic and the types this side accepts, with argument counts.
        self._magic = _REQ_INT if expect_requests else _RES_INT
        self._nargs = _REQUEST_NARGS if expect_requests else _RESPONSE_NARGS
        self._table = _REQUEST_TABLE if expect_requests else _RESPONSE_TABLE

    def feed(self, data: bytes) -> None:
        # The buffer is the bytes object just read whenever the previous read was used up
        # (the common case: no copy, and slices of it are bytes at once); a short partial
        # packet is carried into the next buffer by one concatenation. A long partial
        # packet (a large payload arriving read by read) accumulates in a bytearray
        # instead, so that it is not copied again at every read.
        buf = self._buf
        pos = self._pos
        left = len(buf) - pos
        if not left:
            self._buf = data if type(data) is bytes else bytes(data)
            self._pos = 0
        elif type(buf) is bytes and left <= _CARRY_MAX:
            self._buf = buf[pos:] + data
            self._pos = 0
        else:
            if type(buf) is bytes:
                grown = self._buf = bytearray(buf[pos:])
                self._pos = 0
            else:
                grown = buf  # type: ignore[assignment]  # a bytearray: carried above
                if pos > 65536:
                    # Compact lazily: only when the consumed prefix is large.
                    del grown[:pos]
                    self._pos = 0
            grown += data

    def compact(self) -> None:
        """Drop the bytes already decoded now rather than at the next :meth:`feed` (an
        idle connection then keeps no buffer, however large its last packet was)."""
        if self._pos:
            buf = self._buf
            if self._pos == len(buf) or type(buf) is bytes:
                self._buf = buf[self._pos :]
            else:
                del buf[: self._pos]  # type: ignore[union-attr]  # a bytearray
            self._pos = 0

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def next_event(self) -> Packet | AdminLine | None:
        """The next complete event, or None when more bytes are needed."""
        return self._next_event_checked()

    def next_events(self, limit: int = 1 << 30) -> list[Packet | AdminLine]:
        """The complete events buffered, in order, at most ``limit`` of them; an empty list
        when more bytes are needed. A text admin line ends a batch (it is the last event
        of the list), so that a caller can ration admin work without handing events
        back. Malformed input raises :class:`ProtocolError`, but only once the events
        before it have been returned: call again until the list is empty."""
        buf = self._buf
        pos = self._pos
        n = len(buf)
        if pos == n:
            return []
        # Fast path, one loop for a whole read: complete, well-formed packets of an
        # expected type whose arguments split as they should. Anything else (text, a
        # partial header, a bad magic or type, a wrong argument count) goes to
        # _next_event_checked, which decides and explains.
        magic_ok = self._magic
        max_size = self.max_packet_size
        request = self.expect_requests
        out: list[Packet | AdminLine]
        if _c_decode is not None:
            # The same fast path in C: it stops where this loop would leave it, and the
            # loop goes on from there (a partial packet, text, anything to check).
            out, pos = _c_decode(buf, pos, limit, self._table, magic_ok, max_size, Packet,
                                 request)
            limit -= len(out)
        else:
            out = []
        append = out.append
        nargs_of = self._nargs
        while pos < n and limit:
            limit -= 1
            start = pos + HEADER_SIZE
            if n >= start and not buf[pos]:
                magic, type_, size = _unpack_header_ints(buf, pos)
                nargs = nargs_of.get(type_)
                if nargs is not None and magic == magic_ok and size <= max_size:
                    end = start + size
                    if n < end:
                        break  # a partial packet: more bytes needed
                    if nargs == 1:
                        append(_new_tuple(Packet, (type_, (bytes(buf[start:end]),), request)))
                        pos = end
                        continue
                    if nargs == 0:
                        if not size:
                            append(_new_tuple(Packet, (type_, (), request)))
                            pos = end
                            continue
                    else:
                        args = bytes(buf[start:end]).split(b"\0", nargs - 1)
                        if len(args) == nargs:
                            append(_new_tuple(Packet, (type_, tuple(args), request)))
                            pos = end
                            continue
            self._pos = pos
            try:
                ev = self._next_event_checked()
            except ProtocolError:
                if out:
                    # The events before it first; the next call meets it again and raises.
                    self._pos = pos
                    return out
                raise
            if ev is None:
                return out
            append(ev)
            if type(ev) is AdminLine:
                return out
            buf = self._buf
            pos = self._pos
            n = len(buf)
        self._pos = pos
        return out

    def _next_event_checked(self) -> Packet | AdminLine | None:
        buf = self._buf
        pos = self._pos
        avail = len(buf) - pos
        if avail == 0:
            return None
        if buf[pos] != 0:
            if not self.expect_requests:
                raise ProtocolError("INVALID_MAGIC", "expected a packet, got text")
            end = buf.find(b"\n", pos)
            if end < 0:
                if avail > MAX_ADMIN_LINE:
                    raise ProtocolError("INVALID_COMMAND", "admin line too long")
                return None
            if end - pos > MAX_ADMIN_LINE:
                raise ProtocolError("INVALID_COMMAND", "admin line too long")
            line = bytes(buf[pos:end]).rstrip(b"\r")
            self._pos = end + 1
            return AdminLine(line)
        if avail < HEADER_SIZE:
            # Reject a bad magic as soon as the 4 bytes are there, without waiting.
            if avail >= 4:
                self._check_magic(bytes(buf[pos : pos + 4]))
            return None
        magic, type_, size = HEADER.unpack_from(buf, pos)
        request = self._check_magic(magic)
        if type_ not in ARG_COUNT:
            raise ProtocolError("INVALID_COMMAND", f"unknown packet type {type_}")
        if self.expect_requests and type_ not in REQUEST_TYPES:
            raise ProtocolError("INVALID_COMMAND", f"{T(type_).name} is not a request")
        if size > self.max_packet_size:
            raise ProtocolError(
                "PACKET_TOO_LARGE",
                f"packet of {size} bytes exceeds the limit of {self.max_packet_size}",
            )
        end = pos + HEADER_SIZE + size
        if len(buf) < end:
            return None
        body = bytes(buf[pos + HEADER_SIZE : end])
        self._pos = end
        return Packet(type_, split_args(type_, body), request)

    def _check_magic(self, magic: bytes) -> bool:
        if magic == REQ:
            if not self.expect_requests:
                raise ProtocolError("INVALID_MAGIC", "request magic from a server")
            return True
        if magic == RES:
            if self.expect_requests:
                raise ProtocolError("INVALID_MAGIC", "Request magic expected")
            return False
        raise ProtocolError("INVALID_MAGIC", f"bad magic {magic!r}")

    def events(self, data: bytes = b""):
        """Feed ``data`` and yield every complete event (raises ProtocolError)."""
        if data:
            self.feed(data)
        while batch := self.next_events():
            yield from batch
