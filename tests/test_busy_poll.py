"""The hub's busy poll (config ``busy_poll``; gearman/server.py, Server._hub), against the
real daemon: it catches the next request of a client that waits for each reply, it stays
off after quiet spells longer than itself and after rounds that replied nothing, and
``busy_poll: 0`` turns it off. The
figures are the daemon's own (``atomnode-status``, ``loop``).

The gaps here are real time, on purpose: the busy poll is about how long the daemon's
peers take to answer. Each test is built so that a slow machine only lengthens gaps,
which cannot make a test pass that should fail.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from daemon_harness import Client, Daemon

from atomnode.gearman.protocol import T

ONE_CPU = (os.cpu_count() or 1) == 1


def _ping_pong(c: Client, n: int, pause: float = 0.0) -> None:
    for i in range(n):
        if pause:
            time.sleep(pause)  # the quiet spell under test, not a wait for an event
        c.send(T.ECHO_REQ, b"%d" % i)
        assert c.expect(T.ECHO_RES).args[0] == b"%d" % i


def test_a_client_waiting_for_each_reply_is_caught_without_sleeping(tmp_path: Path) -> None:
    """Back-to-back round trips: the client's next request comes well within 5 ms, so
    (nearly) every wait after the first is a busy poll that catches it. On a machine with
    one CPU the hub never spins (the client needs that CPU)."""
    d = Daemon(tmp_path, config="busy_poll: 5ms\n").start()
    try:
        with d.client() as c:
            _ping_pong(c, 200)
        loop = d.atomnode_status()["loop"]
        if ONE_CPU:
            assert loop["busy_poll_ms"] == 0 and loop["busy_poll_hits"] == 0, loop
        else:
            assert loop["busy_poll_ms"] == 5, loop
            assert loop["busy_poll_hits"] >= 100, loop
    finally:
        assert d.stop() == 0


def test_quiet_spells_longer_than_the_busy_poll_turn_it_off(tmp_path: Path) -> None:
    """Requests 20 ms apart, with busy_poll 2 ms: each spell before a request was longer
    than the busy poll, so the hub sleeps at once instead of spinning 2 ms in vain after
    every reply (a busy poll that always spun would miss 15 times here)."""
    d = Daemon(tmp_path, config="busy_poll: 2ms\n").start()
    try:
        with d.client() as c:
            _ping_pong(c, 15, pause=0.020)
        loop = d.atomnode_status()["loop"]
        assert loop["busy_poll_misses"] <= 1, loop
        assert loop["busy_poll_ms"] == (0 if ONE_CPU else 2), loop
    finally:
        assert d.stop() == 0


def test_rounds_that_reply_nothing_do_not_spin(tmp_path: Path) -> None:
    """A worker's packets that get no reply (CAN_DO here, PRE_SLEEP in life), 1 ms apart:
    the gaps are short, but nobody waits to answer a reply, so the hub sleeps at once (a
    busy poll on short gaps alone would spin after each of them)."""
    d = Daemon(tmp_path, config="busy_poll: 5ms\n").start()
    try:
        with d.client() as c:
            for i in range(50):
                time.sleep(0.001)  # the load's rhythm, not a wait for an event
                c.send(T.CAN_DO, b"f%d" % i)
            c.send(T.ECHO_REQ, b"done")  # all handled (and one reply: no spin before it)
            c.expect(T.ECHO_RES)
            loop = d.atomnode_status()["loop"]
        assert loop["busy_poll_hits"] <= 1 and loop["busy_poll_misses"] <= 1, loop
    finally:
        assert d.stop() == 0


def test_busy_poll_0_turns_it_off(tmp_path: Path) -> None:
    d = Daemon(tmp_path, config="busy_poll: 0\n").start()
    try:
        with d.client() as c:
            _ping_pong(c, 200)
        loop = d.atomnode_status()["loop"]
        assert loop["busy_poll_ms"] == 0, loop
        assert loop["busy_poll_hits"] == 0 and loop["busy_poll_misses"] == 0, loop
    finally:
        assert d.stop() == 0


def test_the_default_is_200us_and_a_reload_changes_it(tmp_path: Path) -> None:
    """No setting: 200 us. A reload (SIGHUP) applies a new value to the running hub."""
    d = Daemon(tmp_path, config="log_level: info\n").start()
    try:
        assert d.atomnode_status()["loop"]["busy_poll_ms"] == (0 if ONE_CPU else 0.2)
        assert d.config_path is not None and d.notify is not None and d.proc is not None
        d.config_path.write_text("busy_poll: 0\n")
        d.proc.send_signal(signal.SIGHUP)
        d.notify.wait_for("RELOADING")
        d.notify.wait_for("READY")
        assert d.atomnode_status()["loop"]["busy_poll_ms"] == 0
    finally:
        assert d.stop() == 0
