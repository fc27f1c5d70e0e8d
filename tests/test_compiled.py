"""The Gearman hot path runs compiled (setup.py, mypyc) wherever it could be built.

``make test`` installs gcc and the Python headers (scripts/sysdeps.sh), so there the
modules must be the compiled ones: a build that silently fell back to pure Python would
pass every other test and lose ~40% of the server's speed. ``ATOMNODE_PURE_PYTHON=1``
(at install time and here) is the one way to ask for pure Python.
"""

from __future__ import annotations

import importlib
import os

import pytest

HOT_MODULES = ("protocol", "broker", "server")  # as setup.py and tests/conftest.py
pure = os.environ.get("ATOMNODE_PURE_PYTHON") == "1"


@pytest.mark.parametrize("name", HOT_MODULES)
def test_hot_module_is_compiled(name):
    module = importlib.import_module(f"atomnode.gearman.{name}")
    if pure:
        assert module.__file__.endswith(".py")
    else:
        assert module.__file__.endswith(".so"), (
            f"{module.__file__}: not compiled; is gcc or python3-dev missing, or does "
            "`make lint` (mypy) find a type error? (see setup.py)")


def test_the_decoders_fast_path_in_c_is_used():
    """atomnode/gearman/_fastdecode.c, built beside the mypyc modules: the decoder's loop
    over complete packets (tests/test_protocol.py checks it against the checked path)."""
    from atomnode.gearman import protocol

    if pure:
        assert protocol._c_decode is None
    else:
        assert protocol._c_decode is not None, "atomnode.gearman._fastdecode was not built"
        # Misused, it raises instead of crashing the daemon.
        for bad_type in (object, 5):
            with pytest.raises(TypeError):
                protocol._c_decode(b"", 0, 1, bytes(256), 0, 1, bad_type, True)
        with pytest.raises(TypeError):
            protocol._c_decode(None, 0, 1, bytes(256), 0, 1, tuple, True)


def test_the_busy_poll_in_c_is_used():
    """atomnode/gearman/_busypoll.c: the hub's busy poll, which runs without the GIL. Not
    built, the hub does not spin at all (a spin in Python would starve the store's writer
    thread of the GIL)."""
    import select

    from atomnode.gearman import server

    if pure:
        assert not server._spin_built
        return
    assert server._spin_built, "atomnode.gearman._busypoll was not built"
    ep = select.epoll()
    r, w = os.pipe()
    try:
        ep.register(r, select.EPOLLIN)
        assert server._spin(ep.fileno(), 0.001) is False  # nothing ready: runs out
        os.write(w, b"x")
        assert server._spin(ep.fileno(), 10.0) is True  # ready: at once, not in 10 s
        assert ep.poll(0) == [(r, select.EPOLLIN)]  # and it consumed no event
        with pytest.raises(TypeError):
            server._spin("3", 0.1)
    finally:
        ep.close()
        os.close(r)
        os.close(w)


def test_compiled_classes_behave_as_python_ones():
    """What other modules rely on: Job objects can be sorted (heaps) and hashed (sets),
    Conn attributes can be set, packets are tuples."""
    from atomnode.gearman.broker import Broker, Conn
    from atomnode.gearman.protocol import Decoder, Packet, T

    b = Broker(clock=lambda: 1000.0, durable=False)
    c = b.connect(Conn(1))
    c.client_id = b"me"
    job = b.submit(c, b"f", b"u1", b"data", 1, False)
    other = b.submit(c, b"f", b"u2", b"data", 1, False)
    assert job is not None and other is not None
    assert job < other and {job, other} == {other, job}
    dec = Decoder()
    dec.feed(b"\0REQ" + int(T.GRAB_JOB).to_bytes(4, "big") + bytes(4))
    events = dec.next_events()
    assert events == [Packet(T.GRAB_JOB, ())] and type(events[0]) is Packet
