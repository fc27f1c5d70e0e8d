"""The allow: list and the atomnode-host admin extension (issue 14), without sockets.

The same rules across real hosts (network namespaces) are in tests/test_multihost.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from atomnode.gearman.broker import NO_JOB, NOOP
from atomnode.gearman.protocol import Packet, T
from atomnode.system.access import (
    RefusalLog,
    is_loopback,
    listen_problem,
    loopback_only,
    parse_networks,
    peer_allowed,
)
from atomnode.system.config import ConfigError, parse_config
from tests.daemon_harness import free_port
from tests.test_admin import Env


# ------------------------------------------------------------------ allow: list


def test_loopback_is_always_allowed():
    for ip in ("127.0.0.1", "127.9.9.9", "::1", "::ffff:127.0.0.1", "unix"):
        assert peer_allowed(ip, ())
        assert is_loopback(ip)


def test_other_peers_only_inside_allow():
    allow = parse_networks(["10.1.0.0/16", "fd00:1::/64", "192.0.2.7"])
    assert peer_allowed("10.1.200.3", allow)
    assert peer_allowed("::ffff:10.1.0.1", allow)  # IPv4-mapped on a dual-stack socket
    assert peer_allowed("fd00:1::5", allow)
    assert peer_allowed("192.0.2.7", allow)
    assert not peer_allowed("192.0.2.8", allow)
    assert not peer_allowed("10.2.0.1", allow)
    assert not peer_allowed("fd00:2::5", allow)
    assert not peer_allowed("10.1.0.1", ())
    assert not peer_allowed("garbage", allow)


def test_config_allow_normalised_and_bad_entries_reported():
    cfg = parse_config("allow: [10.0.0.7/24, 'fd00::1']\n")
    assert cfg.allow == ("10.0.0.0/24", "fd00::1/128")
    assert parse_config("allow: 10.0.0.0/8\n").allow == ("10.0.0.0/8",)
    with pytest.raises(ConfigError) as e:
        parse_config("allow: [10.0.0.0/8, nonsense, 10.0.0.0/33]\n", "f.yml")
    text = str(e.value)
    assert "allow[1]" in text and "'nonsense' is not an IP network" in text
    assert "allow[2]" in text


def test_listen_problem_names_the_line_to_add():
    assert listen_problem(["127.0.0.1:4730", "[::1]:4730", "localhost:4730"], ()) is None
    assert listen_problem(["0.0.0.0:4730"], ("10.0.0.0/8",)) is None
    p = listen_problem(["0.0.0.0:4730"], ())
    assert p is not None and "0.0.0.0:4730" in p and "allow: [192.0.2.0/24]" in p
    p = listen_problem(["127.0.0.1:4730", "10.20.30.40:4730"], ())
    assert p is not None and "allow: [10.20.30.0/24]" in p


def test_loopback_only_keeps_the_ports():
    assert loopback_only(["0.0.0.0:4730", "127.0.0.1:4730", "[::]:4731", "10.0.0.1:4732"]) == (
        "127.0.0.1:4730", "[::1]:4731", "127.0.0.1:4732")


def test_refusals_are_counted_and_logged_at_most_once_per_interval():
    r = RefusalLog(interval=10.0)
    first = r.note("10.9.9.9", 100.0)
    assert first is not None and "10.9.9.9" in first
    assert all(r.note(f"10.9.9.{i}", 100.0 + i / 1000) is None for i in range(500))
    later = r.note("10.9.9.9", 111.0)
    assert later is not None and "refused 501 connection(s)" in later and "more" in later
    assert r.total == 502
    snap = r.snapshot()
    assert snap["refused"] == 502 and len(snap["refused_from"]) <= 10


# ----------------------------------------------------------- atomnode-host


def _listing(reply: bytes) -> list[dict]:
    body, _, rest = reply.partition(b"\n")
    assert rest == b".\n"
    return json.loads(body)


def test_host_conns_lists_only_the_callers_own_connections():
    e = Env()
    mine = e.conn(peer="10.0.0.2")
    other = e.conn(peer="10.0.0.3")
    client = e.conn()
    e.send(mine, T.CAN_DO, b"F")
    e.send(other, T.CAN_DO, b"F")
    e.bg(client, b"F")
    e.send(mine, T.GRAB_JOB)
    admin = e.conn(peer="10.0.0.2")
    rows = _listing(e.cmd(b"atomnode-host conns", admin))
    assert [r["id"] for r in rows] == [mine.id]
    assert rows[0]["jobs"] == ["H:test:1"] and rows[0]["abilities"] == ["F"]
    assert rows[0]["peer"][0] == "10.0.0.2" and rows[0]["draining"] is False


def test_host_may_drain_and_release_its_own_connections_only():
    e = Env()
    mine = e.conn(peer="10.0.0.2")
    other = e.conn(peer="10.0.0.3")
    admin = e.conn(peer="10.0.0.2")
    assert e.cmd(b"atomnode-host drain %d" % mine.id, admin) == b"OK\r\n"
    assert mine.draining
    denied = e.cmd(b"atomnode-host drain %d" % other.id, admin)
    assert denied.startswith(b"ERR PERMISSION_DENIED") and not other.draining
    assert e.cmd(b"atomnode-host release %d" % mine.id, admin) == b"OK\r\n"
    assert not mine.draining
    # A gone connection: nothing runs there, the drain is trivially done.
    assert e.cmd(b"atomnode-host drain 999", admin) == b"OK\r\n"
    assert e.cmd(b"atomnode-host drain x", admin).startswith(b"ERR INVALID_ARGUMENTS")
    # An operator (loopback) may drain any connection.
    assert e.cmd(b"atomnode-host drain %d" % other.id) == b"OK\r\n" and other.draining


def test_drained_connection_gets_no_job_and_release_wakes_it():
    e = Env()
    w = e.conn(peer="10.0.0.2")
    client = e.conn()
    admin = e.conn(peer="10.0.0.2")
    e.send(w, T.CAN_DO, b"F")
    e.cmd(b"atomnode-host drain %d" % w.id, admin)
    e.bg(client, b"F")
    e.b.handle(w, Packet(T.GRAB_JOB, ()))
    assert e.take(w) == NO_JOB
    e.send(w, T.PRE_SLEEP)
    e.cmd(b"atomnode-host release %d" % w.id, admin)
    assert e.take(w) == NOOP


def test_host_report_shows_in_status_with_plain_remote_workers():
    e = Env()
    w = e.conn(peer="10.0.0.2")
    e.send(w, T.CAN_DO, b"F")
    plain = e.conn(peer="10.0.0.9")
    e.send(plain, T.CAN_DO, b"F")
    admin = e.conn(peer="10.0.0.2")
    report = {"host": "wh1", "pools": [{"name": "atom", "count": 1, "workers": [
        {"pid": 42, "state": "idle", "job": None, "jobs_done": 3}]}]}
    assert e.cmd(b"atomnode-host report " + json.dumps(report).encode(), admin) == b"OK\r\n"
    assert e.cmd(b"atomnode-host report {nope", admin).startswith(b"ERR INVALID_ARGUMENTS")
    doc = json.loads(e.cmd(b"atomnode-status").split(b"\n")[0])
    hosts = {h["address"]: h for h in doc["remote_hosts"]}
    assert hosts["10.0.0.2"]["host"] == "wh1" and hosts["10.0.0.2"]["workers"] == 1
    assert hosts["10.0.0.2"]["pools"][0]["workers"][0]["pid"] == 42
    assert hosts["10.0.0.9"]["host"] is None and hosts["10.0.0.9"]["pools"] == []
    assert doc["access"]["allow"] == [] and doc["access"]["refused"] == 0


def test_unknown_host_subcommand():
    e = Env()
    assert e.cmd(b"atomnode-host").startswith(b"ERR INVALID_ARGUMENTS")
    assert e.cmd(b"atomnode-host frobnicate").startswith(b"ERR UNKNOWN_COMMAND")


# ------------------------------------------------------- the daemon and the CLI


def _atomnode(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("ATOMNODE_CONFIG", "NOTIFY_SOCKET")}
    return subprocess.run([sys.executable, "-m", "atomnode", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_check_config_refuses_an_open_listen_without_allow(tmp_path: Path) -> None:
    f = tmp_path / "a.yml"
    f.write_text("listen: ['0.0.0.0:4730']\n")
    r = _atomnode("check-config", str(f))
    assert r.returncode == 1
    assert "0.0.0.0:4730 accepts connections from other hosts" in r.stderr
    assert "  allow: [192.0.2.0/24]" in r.stderr
    f.write_text("listen: ['0.0.0.0:4730']\nallow: [10.0.0.0/8]\n")
    r = _atomnode("check-config", str(f))
    assert r.returncode == 0, r.stderr
    assert "allow:\n- 10.0.0.0/8" in r.stdout


def test_daemon_without_allow_serves_loopback_only_and_says_so(tmp_path: Path) -> None:
    port = free_port()
    cfg = tmp_path / "a.yml"
    cfg.write_text(f"listen: ['0.0.0.0:{port}']\ndatabase: {tmp_path / 'q.db'}\n"
                   "http: {listen: none}\n")
    log = tmp_path / "daemon.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "atomnode", "run", "--config", str(cfg)],
                                stdout=out, stderr=out, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while "ready" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        text = log.read_text()
        assert f"ERROR atomnode: listen: 0.0.0.0:{port} accepts connections" in text
        assert "allow: [192.0.2.0/24]" in text
        status = _atomnode("status", "--config", str(cfg))
        assert status.returncode == 0, status.stderr
        assert "ERROR: serving loopback only" in status.stdout
        js = json.loads(_atomnode("status", "--json", "--config", str(cfg)).stdout)
        assert js["listen"] == [f"127.0.0.1:{port}"]
        doctor = _atomnode("doctor", "--config", str(cfg))
        assert doctor.returncode == 1
        assert "FAIL  the daemon serves loopback only" in doctor.stdout
    finally:
        proc.terminate()
        proc.wait(30)


def test_worker_host_status_on_its_control_socket(tmp_path: Path) -> None:
    """listen: [] opens the control socket; `atomnode status` finds it from the config.
    The server its pool names is down: status and doctor say so, the pool still runs."""
    dead = free_port()
    sock = tmp_path / "ctl.sock"
    cfg = tmp_path / "w.yml"
    cfg.write_text(
        "listen: []\n"
        f"database: {tmp_path / 'q.db'}\n"
        f"control_socket: {sock}\n"
        "http: {listen: none}\n"
        "pools:\n"
        "  - name: p\n"
        f"    servers: ['127.0.0.1:{dead}']\n"
        "    command: [sleep, '3600']\n"
    )
    log = tmp_path / "daemon.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "atomnode", "run", "--config", str(cfg)],
                                stdout=out, stderr=out, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while "cannot reach" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        st = _atomnode("status", "--config", str(cfg))
        assert st.returncode == 0, st.stderr
        assert f"server 127.0.0.1:{dead}: cannot reach 127.0.0.1:{dead}" in st.stdout
        assert "running" in st.stdout  # no job awareness yet: state "running"
        doc = _atomnode("doctor", "--config", str(cfg))
        assert f"the daemon answers at the control socket {sock}" in doc.stdout
        assert f"FAIL  this worker host cannot reach the server 127.0.0.1:{dead}" in doc.stdout
    finally:
        proc.terminate()
        proc.wait(30)
    assert not proc.returncode, log.read_text()


def test_daemon_peer_allowed_is_the_check_the_console_uses():
    from atomnode.daemon import Daemon

    d = Daemon(parse_config("allow: [10.0.0.0/8]\n"))
    assert d.peer_allowed("127.0.0.1") and d.peer_allowed("10.1.2.3")
    assert not d.peer_allowed("192.168.1.1")


def test_worker_host_pools_must_name_their_server():
    with pytest.raises(ConfigError) as e:
        parse_config("listen: []\npools:\n  - {name: a, command: [x]}\n"
                     "  - {name: b, command: [x], servers: ['10.0.0.1:4730']}\n", "w.yml")
    assert "pools[0].servers" in str(e.value) and "pools[1]" not in str(e.value)
    assert "servers: [jobs1:4730]" in str(e.value)


def test_host_report_is_reduced_to_known_fields():
    e = Env()
    admin = e.conn(loopback=False, peer="10.0.0.2")
    bad = [{"pools": [1, 2]}, {"pools": [{"name": "a", "workers": "x"}]}, {"pools": "x"}]
    for doc in bad:
        reply = e.cmd(b"atomnode-host report " + json.dumps(doc).encode(), admin)
        assert reply.startswith(b"ERR INVALID_ARGUMENTS"), doc
    odd = {"host": "h", "pools": [{"name": "a", "count": "2", "evil": "<script>", "workers": [
        {"pid": "1", "state": "idle", "jobs_done": 3, "uptime": 5, "x": 1}, 7]}]}
    assert e.cmd(b"atomnode-host report " + json.dumps(odd).encode(), admin) == b"OK\r\n"
    (pool,) = e.b.remote_hosts["10.0.0.2"]["pools"]
    assert pool == {"name": "a", "count": None, "workers": [
        {"pid": None, "state": "idle", "job": None, "jobs_done": 3, "rss_mb": None,
         "uptime": 5.0, "detail": None}]}


def test_operator_rule_exception_covers_atomnode_host_only():
    from atomnode.gearman.hosts import exempt_from_operator_rule

    assert exempt_from_operator_rule([b"ATOMNODE-HOST", b"drain", b"7"])
    for words in ([b"shutdown"], [b"cancel", b"job", b"H:x:1"], [b"atomnode-jobs", b"purge",
                                                                 b"0"], []):
        assert not exempt_from_operator_rule(words)
    # An operator (as the admin's rule decides) may drain another host's connection.
    e = Env()
    other = e.conn(loopback=False, peer="10.0.0.3")
    admin = e.conn(loopback=False, peer="10.0.0.9")
    from atomnode.gearman.hosts import command

    assert command(e.server, admin, [b"drain", b"%d" % other.id]).startswith(
        b"ERR PERMISSION_DENIED")
    assert command(e.server, admin, [b"drain", b"%d" % other.id], operator=True) == b"OK\r\n"
    assert other.draining
