"""Tests of the sans-I/O Gearman codec (atomnode.gearman.protocol): bytes <-> events.

The expected bytes are written out independently of the codec (magic, big-endian type and
size, NUL-separated arguments) with the type numbers of the Gearman protocol document, so a
wrong number or a wrong framing in ``protocol`` fails here.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from atomnode.gearman.protocol import (
    ARG_COUNT,
    MAX_ADMIN_LINE,
    REQUEST_TYPES,
    RESPONSE_TYPES,
    AdminLine,
    Decoder,
    Packet,
    ProtocolError,
    T,
    encode,
    encode_packet,
    error_packet,
    pack_size,
    response_prefix,
)

H = b"H:host:1"

#: (name, wire number, example arguments). Numbers from the Gearman protocol document.
TABLE: list[tuple[str, int, tuple[bytes, ...]]] = [
    ("CAN_DO", 1, (b"reverse",)),
    ("CANT_DO", 2, (b"reverse",)),
    ("RESET_ABILITIES", 3, ()),
    ("PRE_SLEEP", 4, ()),
    ("NOOP", 6, ()),
    ("SUBMIT_JOB", 7, (b"reverse", b"u1", b"hello")),
    ("JOB_CREATED", 8, (H,)),
    ("GRAB_JOB", 9, ()),
    ("NO_JOB", 10, ()),
    ("JOB_ASSIGN", 11, (H, b"reverse", b"hello")),
    ("WORK_STATUS", 12, (H, b"1", b"10")),
    ("WORK_COMPLETE", 13, (H, b"olleh")),
    ("WORK_FAIL", 14, (H,)),
    ("GET_STATUS", 15, (H,)),
    ("ECHO_REQ", 16, (b"ping",)),
    ("ECHO_RES", 17, (b"ping",)),
    ("SUBMIT_JOB_BG", 18, (b"reverse", b"u2", b"hello")),
    ("ERROR", 19, (b"QUEUE_ERROR", b"Job queue is full")),
    ("STATUS_RES", 20, (H, b"1", b"0", b"3", b"4")),
    ("SUBMIT_JOB_HIGH", 21, (b"reverse", b"u3", b"hello")),
    ("SET_CLIENT_ID", 22, (b"pid_42_abc",)),
    ("CAN_DO_TIMEOUT", 23, (b"reverse", b"30")),
    ("ALL_YOURS", 24, ()),
    ("WORK_EXCEPTION", 25, (H, b"boom")),
    ("OPTION_REQ", 26, (b"exceptions",)),
    ("OPTION_RES", 27, (b"exceptions",)),
    ("WORK_DATA", 28, (H, b"chunk")),
    ("WORK_WARNING", 29, (H, b"careful")),
    ("GRAB_JOB_UNIQ", 30, ()),
    ("JOB_ASSIGN_UNIQ", 31, (H, b"reverse", b"u1", b"hello")),
    ("SUBMIT_JOB_HIGH_BG", 32, (b"reverse", b"u4", b"hello")),
    ("SUBMIT_JOB_LOW", 33, (b"reverse", b"u5", b"hello")),
    ("SUBMIT_JOB_LOW_BG", 34, (b"reverse", b"u6", b"hello")),
    ("SUBMIT_JOB_SCHED", 35, (b"reverse", b"u7", b"0", b"12", b"1", b"1", b"0", b"hello")),
    ("SUBMIT_JOB_EPOCH", 36, (b"reverse", b"u8", b"1700000000", b"hello")),
    ("SUBMIT_REDUCE_JOB", 37, (b"map", b"u9", b"reduce", b"", b"a b c")),
    ("SUBMIT_REDUCE_JOB_BACKGROUND", 38, (b"map", b"u10", b"reduce", b"", b"a b c")),
    ("GRAB_JOB_ALL", 39, ()),
    ("JOB_ASSIGN_ALL", 40, (H, b"map", b"u9", b"reduce", b"a b c")),
    ("GET_STATUS_UNIQUE", 41, (b"u1",)),
    ("STATUS_RES_UNIQUE", 42, (b"u1", b"1", b"1", b"3", b"4", b"2")),
]


def wire(magic: bytes, number: int, args: tuple[bytes, ...]) -> bytes:
    """The bytes of a packet, built by hand."""
    body = b"\0".join(args)
    return magic + number.to_bytes(4, "big") + len(body).to_bytes(4, "big") + body


def decode_all(data: bytes, *, requests: bool = True, **kw) -> list:
    return list(Decoder(expect_requests=requests, **kw).events(data))


def decode_chunks(chunks, *, requests: bool = True) -> list:
    dec = Decoder(expect_requests=requests)
    out = []
    for c in chunks:
        dec.feed(c)
        while (ev := dec.next_event()) is not None:
            out.append(ev)
    return out


# ----------------------------------------------------------------- the table


def test_table_covers_every_packet_type():
    assert {name for name, _, _ in TABLE} == {t.name for t in T}
    for name, number, args in TABLE:
        assert T[name] == number, name
        assert len(args) == ARG_COUNT[number], name


def test_every_type_is_a_request_or_a_response():
    assert set(T) == REQUEST_TYPES | RESPONSE_TYPES
    # Types both sides send: the work results (a worker sends, the server forwards).
    assert REQUEST_TYPES & RESPONSE_TYPES == {
        T.WORK_STATUS, T.WORK_COMPLETE, T.WORK_FAIL, T.WORK_EXCEPTION, T.WORK_DATA,
        T.WORK_WARNING,
    }
    for t in (T.NOOP, T.JOB_CREATED, T.NO_JOB, T.JOB_ASSIGN, T.ECHO_RES, T.ERROR,
              T.STATUS_RES, T.OPTION_RES, T.JOB_ASSIGN_UNIQ, T.JOB_ASSIGN_ALL,
              T.STATUS_RES_UNIQUE):
        assert t not in REQUEST_TYPES
    for t in (T.SUBMIT_JOB, T.GRAB_JOB, T.PRE_SLEEP, T.CAN_DO, T.ECHO_REQ, T.OPTION_REQ,
              T.GET_STATUS, T.GET_STATUS_UNIQUE, T.SET_CLIENT_ID, T.GRAB_JOB_ALL):
        assert t not in RESPONSE_TYPES


@pytest.mark.parametrize("name,number,args", TABLE, ids=[r[0] for r in TABLE])
def test_encode_and_decode_each_type(name, number, args):
    if number in REQUEST_TYPES:
        expected = wire(b"\0REQ", number, args)
        assert encode(number, *args, request=True) == expected
        assert encode_packet(Packet(number, args, True)) == expected
        assert decode_all(expected, requests=True) == [Packet(number, args, True)]
    if number in RESPONSE_TYPES:
        expected = wire(b"\0RES", number, args)
        assert encode(number, *args) == expected  # responses are the default
        assert encode_packet(Packet(number, args, False)) == expected
        assert decode_all(expected, requests=False) == [Packet(number, args, False)]


def test_known_bytes_literally():
    # SUBMIT_JOB "reverse" "" "test" as in the protocol document's example.
    assert encode(T.SUBMIT_JOB, b"reverse", b"", b"test", request=True) == (
        b"\x00REQ\x00\x00\x00\x07\x00\x00\x00\x0dreverse\x00\x00test"
    )
    assert encode(T.NOOP) == b"\x00RES\x00\x00\x00\x06\x00\x00\x00\x00"
    assert error_packet("INVALID_MAGIC", "Request magic expected") == (
        b"\x00RES\x00\x00\x00\x13\x00\x00\x00\x24INVALID_MAGIC\x00Request magic expected"
    )


@pytest.mark.parametrize(("name", "number", "args"), [r for r in TABLE if T[r[0]] in RESPONSE_TYPES])
def test_pre_encoded_header_gives_the_same_bytes_as_encode(name, number, args):
    """The broker's hot path builds replies as prefix + size + body."""
    body = b"\0".join(args)
    assert response_prefix(number) + pack_size(len(body)) + body == encode(number, *args)


def test_packet_name():
    assert Packet(T.GRAB_JOB_ALL, ()).name == "GRAB_JOB_ALL"
    assert Packet(99, ()).name == "UNKNOWN_99"


# ------------------------------------------------------------------- framing


def _stream() -> tuple[bytes, list]:
    """A multi-packet request stream with admin lines mixed in, and its events."""
    items = [
        Packet(T.SET_CLIENT_ID, (b"pid_1_x",)),
        Packet(T.CAN_DO, (b"reverse",)),
        AdminLine(b"status"),
        Packet(T.SUBMIT_JOB, (b"reverse", b"", b"data\0with\0nuls")),
        Packet(T.GRAB_JOB, ()),
        AdminLine(b"workers"),
        Packet(T.WORK_COMPLETE, (H, b"")),
        Packet(T.SUBMIT_JOB_EPOCH, (b"reverse", b"u", b"123", b"x" * 300)),
        AdminLine(b"show unique jobs"),
        Packet(T.PRE_SLEEP, ()),
    ]
    endings = iter([b"\n", b"\r\n", b"\n"])
    data = b"".join(
        it.line + next(endings) if isinstance(it, AdminLine) else encode_packet(it)
        for it in items
    )
    return data, items


def test_whole_stream_decodes_in_order():
    data, items = _stream()
    assert decode_all(data) == items


def test_every_split_point_gives_the_same_events():
    data, items = _stream()
    for i in range(len(data) + 1):
        assert decode_chunks([data[:i], data[i:]]) == items, f"split at {i}"


def test_every_pair_of_split_points_in_a_short_stream():
    data = (encode(T.CAN_DO, b"f", request=True) + b"status\r\n"
            + encode(T.SUBMIT_JOB, b"f", b"u", b"d\0d", request=True))
    expected = decode_all(data)
    assert len(expected) == 3
    for i in range(len(data) + 1):
        for j in range(i, len(data) + 1):
            assert decode_chunks([data[:i], data[i:j], data[j:]]) == expected, (i, j)


def test_byte_by_byte():
    data, items = _stream()
    assert decode_chunks([data[i : i + 1] for i in range(len(data))]) == items


def test_random_chunks():
    data, items = _stream()
    rnd = random.Random(1234)
    for _ in range(200):
        chunks, i = [], 0
        while i < len(data):
            n = rnd.randint(1, 40)
            chunks.append(data[i : i + n])
            i += n
        assert decode_chunks(chunks) == items


def test_incomplete_packet_waits_and_keeps_its_bytes():
    pkt = encode(T.SUBMIT_JOB, b"f", b"u", b"payload", request=True)
    dec = Decoder()
    dec.feed(pkt[:5])
    assert dec.next_event() is None
    assert dec.buffered == 5
    dec.feed(pkt[5:-1])
    assert dec.next_event() is None
    dec.feed(pkt[-1:])
    assert dec.next_event() == Packet(T.SUBMIT_JOB, (b"f", b"u", b"payload"))
    assert dec.next_event() is None
    assert dec.buffered == 0


def test_large_stream_through_buffer_compaction():
    # More than 64 KiB consumed: the decoder compacts its buffer on the way.
    big = bytes(range(256)) * 400  # 100 KiB, NULs included
    pkts = [Packet(T.WORK_DATA, (b"H:h:%d" % i, big)) for i in range(3)]
    pkts += [Packet(T.ECHO_REQ, (b"e%d" % i,)) for i in range(50)]
    data = b"".join(encode_packet(p) for p in pkts)
    rnd = random.Random(7)
    chunks, i = [], 0
    while i < len(data):
        n = rnd.randint(1, 20000)
        chunks.append(data[i : i + n])
        i += n
    assert decode_chunks(chunks) == pkts


def test_client_side_decoder_reads_responses():
    data = (encode(T.JOB_CREATED, H) + encode(T.WORK_DATA, H, b"a")
            + encode(T.WORK_COMPLETE, H, b"b"))
    assert decode_all(data, requests=False) == [
        Packet(T.JOB_CREATED, (H,), False),
        Packet(T.WORK_DATA, (H, b"a"), False),
        Packet(T.WORK_COMPLETE, (H, b"b"), False),
    ]


# ---------------------------------------------------------------- admin lines


@pytest.mark.parametrize("ending", [b"\n", b"\r\n"])
def test_admin_line_endings(ending):
    assert decode_all(b"status" + ending) == [AdminLine(b"status")]
    assert decode_all(b"cancel job H:x:1" + ending)[0].words == ["cancel", "job", "H:x:1"]


def test_admin_line_waits_for_its_newline():
    dec = Decoder()
    dec.feed(b"stat")
    assert dec.next_event() is None
    dec.feed(b"us\r")
    assert dec.next_event() is None
    dec.feed(b"\nversion\n")
    assert list(dec.events()) == [AdminLine(b"status"), AdminLine(b"version")]


def test_empty_admin_line():
    assert decode_all(b"\n") == [AdminLine(b"")]
    assert decode_all(b"\r\n") == [AdminLine(b"")]


def test_admin_lines_mixed_with_packets():
    data = (b"status\n" + encode(T.ECHO_REQ, b"x", request=True) + b"version\r\n"
            + encode(T.GRAB_JOB, request=True) + b"workers\n")
    assert decode_all(data) == [
        AdminLine(b"status"), Packet(T.ECHO_REQ, (b"x",)), AdminLine(b"version"),
        Packet(T.GRAB_JOB, ()), AdminLine(b"workers"),
    ]


def test_admin_line_too_long_without_newline():
    dec = Decoder()
    dec.feed(b"x" * MAX_ADMIN_LINE)
    assert dec.next_event() is None  # at the limit: still waiting
    dec.feed(b"x")
    with pytest.raises(ProtocolError) as e:
        dec.next_event()
    assert e.value.code == "INVALID_COMMAND"


def test_admin_line_too_long_arriving_in_one_read():
    # The limit must not depend on how the bytes were split by TCP: a line longer than
    # MAX_ADMIN_LINE is refused whether or not its newline is already in the buffer.
    data = b"x" * (MAX_ADMIN_LINE + 10) + b"\n"
    with pytest.raises(ProtocolError):
        decode_chunks([data[: MAX_ADMIN_LINE + 1], data[MAX_ADMIN_LINE + 1 :]])
    with pytest.raises(ProtocolError):
        decode_all(data)


def test_text_on_the_client_side_is_an_error():
    with pytest.raises(ProtocolError) as e:
        decode_all(b"OK\r\n", requests=False)
    assert e.value.code == "INVALID_MAGIC"


# ---------------------------------------------------------------- validation


def _error(data: bytes, *, requests: bool = True, **kw) -> ProtocolError:
    with pytest.raises(ProtocolError) as e:
        decode_all(data, requests=requests, **kw)
    return e.value


def test_response_magic_on_the_server_side():
    assert _error(encode(T.WORK_COMPLETE, H, b"x")).code == "INVALID_MAGIC"
    assert _error(encode(T.SUBMIT_JOB, b"f", b"", b"x")).code == "INVALID_MAGIC"


def test_request_magic_on_the_client_side():
    assert _error(encode(T.NOOP, request=True), requests=False).code == "INVALID_MAGIC"


def test_bad_magic_rejected_from_its_four_bytes():
    dec = Decoder()
    dec.feed(b"\0RE")
    assert dec.next_event() is None  # cannot tell yet
    dec.feed(b"X")
    with pytest.raises(ProtocolError) as e:
        dec.next_event()
    assert e.value.code == "INVALID_MAGIC"
    assert _error(b"\0XYZ" + bytes(8)).code == "INVALID_MAGIC"


@pytest.mark.parametrize("number", [0, 5, 43, 1000, 2**32 - 1])
def test_unknown_type(number):
    err = _error(b"\0REQ" + number.to_bytes(4, "big") + bytes(4))
    assert err.code == "INVALID_COMMAND"


@pytest.mark.parametrize("t", sorted(RESPONSE_TYPES - REQUEST_TYPES))
def test_response_only_type_sent_as_a_request(t):
    args = next(a for _, n, a in TABLE if n == t)
    assert _error(encode(t, *args, request=True)).code == "INVALID_COMMAND"


def test_packet_larger_than_the_limit_rejected_from_its_header():
    dec = Decoder(max_packet_size=1000)
    dec.feed(b"\0REQ" + int(T.SUBMIT_JOB_BG).to_bytes(4, "big") + (1001).to_bytes(4, "big"))
    with pytest.raises(ProtocolError) as e:
        dec.next_event()  # no body sent at all
    assert e.value.code == "PACKET_TOO_LARGE"
    # A 4 GiB announcement is refused at once with the default limit too.
    assert _error(b"\0REQ" + int(T.ECHO_REQ).to_bytes(4, "big") + b"\xff\xff\xff\xff").code \
        == "PACKET_TOO_LARGE"


def test_packet_at_the_limit_is_accepted():
    body = b"f\0u\0" + b"d" * 996
    pkt = b"\0REQ" + int(T.SUBMIT_JOB).to_bytes(4, "big") + (1000).to_bytes(4, "big") + body
    assert decode_all(pkt, max_packet_size=1000) == [Packet(T.SUBMIT_JOB, (b"f", b"u", b"d" * 996))]


@pytest.mark.parametrize(
    "t,body",
    [
        (T.SUBMIT_JOB, b"func"),  # 1 of 3
        (T.SUBMIT_JOB_EPOCH, b"func\0unique"),  # 2 of 4
        (T.CAN_DO_TIMEOUT, b"func"),  # 1 of 2, no data argument to tolerate
        (T.WORK_STATUS, H + b"\0" + b"1"),  # 2 of 3
        (T.SUBMIT_JOB_SCHED, b"f\0u\0" + b"1\0" * 3),
    ],
)
def test_too_few_arguments(t, body):
    err = _error(wire(b"\0REQ", t, (body,)))
    assert err.code == "INVALID_PACKET"


def test_arguments_to_a_type_that_takes_none():
    assert _error(wire(b"\0REQ", T.GRAB_JOB, (b"x",))).code == "INVALID_PACKET"


def test_empty_data_argument():
    assert decode_all(wire(b"\0REQ", T.SUBMIT_JOB, (b"f", b"u", b""))) == [
        Packet(T.SUBMIT_JOB, (b"f", b"u", b""))
    ]
    # libgearman may omit the separator before an empty payload: tolerated.
    assert decode_all(b"\0REQ" + int(T.SUBMIT_JOB).to_bytes(4, "big") + (3).to_bytes(4, "big")
                      + b"f\0u") == [Packet(T.SUBMIT_JOB, (b"f", b"u", b""))]
    assert decode_all(wire(b"\0REQ", T.ECHO_REQ, (b"",))) == [Packet(T.ECHO_REQ, (b"",))]
    assert decode_all(wire(b"\0REQ", T.WORK_COMPLETE, (H, b""))) == [
        Packet(T.WORK_COMPLETE, (H, b""))
    ]


def test_nul_bytes_inside_the_data_argument_are_kept():
    data = b"\0a\0\0b\0"
    assert decode_all(wire(b"\0REQ", T.SUBMIT_JOB_BG, (b"f", b"u", data))) == [
        Packet(T.SUBMIT_JOB_BG, (b"f", b"u", data))
    ]
    assert decode_all(wire(b"\0REQ", T.WORK_DATA, (H, data))) == [
        Packet(T.WORK_DATA, (H, data))
    ]
    # A one-argument packet keeps the whole body, NULs included.
    assert decode_all(wire(b"\0REQ", T.ECHO_REQ, (data,))) == [Packet(T.ECHO_REQ, (data,))]


def test_protocol_error_carries_code_and_message():
    err = ProtocolError("INVALID_MAGIC", "bad magic")
    assert err.code == "INVALID_MAGIC" and err.message == "bad magic"
    assert "INVALID_MAGIC" in str(err)


# ---------------------------------------------------------------- properties


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, prev = [], 0
    for p in points:
        out.append(data[prev:p])
        prev = p
    out.append(data[prev:])
    return out


def _run(chunks: list[bytes], requests: bool) -> tuple[list, str | None]:
    """Events produced before the first error, and that error's code."""
    dec = Decoder(expect_requests=requests, max_packet_size=4096)
    events: list = []
    try:
        for c in chunks:
            dec.feed(c)
            while (ev := dec.next_event()) is not None:
                events.append(ev)
    except ProtocolError as e:
        return events, e.code
    return events, None


_FAST = settings(max_examples=300, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.too_slow])


@_FAST
@given(st.binary(max_size=400), st.lists(st.integers(min_value=0), max_size=12), st.booleans())
def test_random_bytes_never_crash_the_decoder(data, cuts, requests):
    events, _code = _run(_split(data, cuts), requests)
    for ev in events:
        assert isinstance(ev, (Packet, AdminLine))


_HEADERS = st.sampled_from([b"\0REQ", b"\0RES"]).flatmap(
    lambda magic: st.tuples(
        st.just(magic), st.sampled_from(sorted(ARG_COUNT) + [0, 5, 50]),
        st.integers(min_value=0, max_value=60),
    )
)


@st.composite
def near_valid_streams(draw) -> bytes:
    """Streams of plausible headers with random bodies and admin lines: the random bytes
    alone rarely get past the magic."""
    parts = []
    for _ in range(draw(st.integers(min_value=1, max_value=6))):
        if draw(st.booleans()):
            magic, t, size = draw(_HEADERS)
            parts.append(magic + t.to_bytes(4, "big") + size.to_bytes(4, "big")
                         + draw(st.binary(min_size=size, max_size=size)))
        else:
            parts.append(draw(st.binary(max_size=20)).replace(b"\n", b"") + b"\n")
    return b"".join(parts)


@_FAST
@given(near_valid_streams(), st.lists(st.integers(min_value=0), max_size=12), st.booleans())
def test_split_streams_give_the_same_events_as_whole(data, cuts, requests):
    whole = _run([data], requests)
    split = _run(_split(data, cuts), requests)
    assert split == whole
    bytewise = _run([data[i : i + 1] for i in range(len(data))], requests)
    assert bytewise == whole


def _run_batched(chunks: list[bytes], requests: bool) -> tuple[list, str | None]:
    """As _run, through next_events (the server's fast path, one call per read)."""
    dec = Decoder(expect_requests=requests, max_packet_size=4096)
    events: list = []
    try:
        for c in chunks:
            dec.feed(c)
            while batch := dec.next_events():
                events.extend(batch)
    except ProtocolError as e:
        return events, e.code
    return events, None


@_FAST
@given(near_valid_streams(), st.lists(st.integers(min_value=0), max_size=12), st.booleans())
def test_batched_decoding_gives_the_same_events_and_errors(data, cuts, requests):
    """next_events (fast path) agrees with next_event (every check, one event at a time)
    on events, their order, and the error after them, however the reads are cut."""
    chunks = _split(data, cuts)
    assert _run_batched(chunks, requests) == _run(chunks, requests)
    assert _run_batched([data], requests) == _run([data], requests)


def _run_limited(chunks: list[bytes], requests: bool, limit: int) -> tuple[list, str | None]:
    """As _run_batched, at most ``limit`` events per call; checks that every batch keeps
    to the limit and that a text line is always the last event of its batch."""
    dec = Decoder(expect_requests=requests, max_packet_size=4096)
    events: list = []
    try:
        for c in chunks:
            dec.feed(c)
            while batch := dec.next_events(limit):
                assert len(batch) <= limit
                assert not any(type(ev) is AdminLine for ev in batch[:-1])
                events.extend(batch)
    except ProtocolError as e:
        return events, e.code
    return events, None


@_FAST
@given(near_valid_streams(), st.lists(st.integers(min_value=0), max_size=12), st.booleans(),
       st.integers(min_value=1, max_value=4))
def test_limited_batches_give_the_same_events_and_errors(data, cuts, requests, limit):
    """next_events(limit), the server's rationed path, loses and reorders nothing."""
    chunks = _split(data, cuts)
    assert _run_limited(chunks, requests, limit) == _run(chunks, requests)


@pytest.mark.parametrize("header", [
    b"\0REQ" + (0xFFFFFFFF).to_bytes(4, "big") + bytes(4),  # a type far past the table
    b"\0REQ" + (256 + int(T.GRAB_JOB)).to_bytes(4, "big") + bytes(4),  # wraps a byte
    b"\0REQ" + int(T.SUBMIT_JOB).to_bytes(4, "big") + (0xFFFFFFFF).to_bytes(4, "big"),
    b"\0REQ" + int(T.SUBMIT_JOB).to_bytes(4, "big") + (4097).to_bytes(4, "big"),  # > max
    # complete, but larger than max_packet_size (4096 here)
    b"\0REQ" + int(T.SUBMIT_JOB).to_bytes(4, "big") + (4097).to_bytes(4, "big") + b"f\0u\0"
    + b"x" * 4093,
    b"\0REQ" + int(T.SUBMIT_JOB).to_bytes(4, "big") + (2).to_bytes(4, "big") + b"f\0",
    b"\0REQ" + int(T.GRAB_JOB).to_bytes(4, "big") + (3).to_bytes(4, "big") + b"abc",
    b"\0RES" + int(T.GRAB_JOB).to_bytes(4, "big") + bytes(4),
    b"\0REQ" + int(T.SUBMIT_JOB).to_bytes(4, "big") + (100).to_bytes(4, "big") + b"f\0u",
])
def test_hostile_headers_after_good_packets_give_what_the_checked_path_gives(header):
    """The fast path (in C where built) stops at anything unusual and leaves it to the
    checked path: the same events, then the same error or the same wait for more."""
    good = wire(b"\0REQ", T.SUBMIT_JOB, (b"f", b"u", b"data"))
    for chunks in ([good + good + header], [good, good + header[:7], header[7:]]):
        assert _run_batched(chunks, True) == _run(chunks, True)


def test_a_text_line_ends_a_batch():
    grab = wire(b"\0REQ", T.GRAB_JOB, ())
    dec = Decoder()
    dec.feed(grab + b"status\r\n" + grab + grab)
    assert dec.next_events() == [Packet(T.GRAB_JOB, ()), AdminLine(b"status")]
    assert dec.next_events(1) == [Packet(T.GRAB_JOB, ())]
    assert dec.next_events() == [Packet(T.GRAB_JOB, ())]
    assert dec.next_events() == []


def test_events_before_a_malformed_packet_come_first_then_the_error():
    good = wire(b"\0REQ", T.SUBMIT_JOB, (b"f", b"u", b"data"))
    dec = Decoder()
    dec.feed(good + good + b"\0REQ" + (999).to_bytes(4, "big") + bytes(4))
    assert [ev.type for ev in dec.next_events()] == [T.SUBMIT_JOB, T.SUBMIT_JOB]
    with pytest.raises(ProtocolError) as e:
        dec.next_events()
    assert e.value.code == "INVALID_COMMAND"


def test_large_payload_arriving_in_many_reads():
    """A partial packet longer than what is carried by copying accumulates in place."""
    payload = bytes(range(256)) * 2048  # 512 KiB
    data = wire(b"\0REQ", T.SUBMIT_JOB_BG, (b"f", b"u", payload)) + wire(b"\0REQ", T.GRAB_JOB, ())
    dec = Decoder()
    events = []
    for i in range(0, len(data), 4096):
        dec.feed(data[i : i + 4096])
        events.extend(dec.next_events())
    assert [ev.type for ev in events] == [T.SUBMIT_JOB_BG, T.GRAB_JOB]
    assert events[0].args == (b"f", b"u", payload)
    assert dec.buffered == 0


@st.composite
def packets(draw) -> Packet:
    t = draw(st.sampled_from(sorted(ARG_COUNT)))
    n = ARG_COUNT[t]
    no_nul = st.binary(max_size=30).map(lambda b: b.replace(b"\0", b""))
    args = [draw(no_nul) for _ in range(max(n - 1, 0))]
    if n:
        args.append(draw(st.binary(max_size=200)))  # the last argument may hold NULs
    if t in REQUEST_TYPES and t in RESPONSE_TYPES:
        request = draw(st.booleans())
    else:
        request = t in REQUEST_TYPES
    return Packet(t, tuple(args), request)


@_FAST
@given(st.lists(packets(), min_size=1, max_size=8), st.lists(st.integers(min_value=0), max_size=8))
def test_encode_decode_round_trip(pkts, cuts):
    for p in pkts:
        assert decode_all(encode_packet(p), requests=p.request) == [p]
    # A stream of one direction, split anywhere, gives the packets back.
    for direction in (True, False):
        same = [p for p in pkts if p.request is direction]
        if same:
            data = b"".join(encode_packet(p) for p in same)
            assert decode_chunks(_split(data, cuts), requests=direction) == same
