"""Operations that must be safe (issue 10, points 11 and 12), against the real daemon.

* State-changing admin commands are accepted from loopback and ``operator_networks``
  only; a peer in another network namespace (a real non-loopback address) is refused
  them and still gets the read-only ones.
* A reload from a file that says nothing (0 bytes, only comments, ``null``) while pools
  run is refused loudly and the running configuration stays; ``check-config`` warns.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from daemon_harness import Daemon

ROOT = Path(__file__).resolve().parent.parent


def _wait(predicate, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)  # polling the daemon's log / status: no event to wait on


# --------------------------------------------------------------- network namespace
class NetNS:
    """A network namespace joined to this one by a veth pair: the host side is
    ``host_ip``, the namespace side ``peer_ip`` (a /30 of 10.231.0.0/16)."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.name = f"an-op-{tag}"
        self.host_if = f"anh{tag}"
        self.peer_if = f"anp{tag}"
        n = int(tag, 16) % 16000
        base = (n * 4) & 0xFFFF
        self.host_ip = f"10.231.{base >> 8}.{(base & 0xFF) + 1}"
        self.peer_ip = f"10.231.{base >> 8}.{(base & 0xFF) + 2}"
        self.network = f"10.231.{base >> 8}.{base & 0xFF}/30"

    def __enter__(self) -> NetNS:
        def ip(*args: str) -> None:
            subprocess.run(["ip", *args], check=True, capture_output=True)

        ip("netns", "add", self.name)
        try:
            ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.peer_if)
            ip("link", "set", self.peer_if, "netns", self.name)
            ip("addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
            ip("link", "set", self.host_if, "up")
            ip("-n", self.name, "addr", "add", f"{self.peer_ip}/30", "dev", self.peer_if)
            ip("-n", self.name, "link", "set", self.peer_if, "up")
            ip("-n", self.name, "link", "set", "lo", "up")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)

    def admin(self, host: str, port: int, *lines: str) -> list[str]:
        """Send admin lines from inside the namespace; one reply per line."""
        script = textwrap.dedent("""
            import json, socket, sys
            host, port = sys.argv[1], int(sys.argv[2])
            s = socket.create_connection((host, port), timeout=10)
            for line in sys.argv[3:]:
                s.sendall(line.encode() + b"\\n")
                buf = b""
                while True:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
                    if buf.endswith(b"\\r\\n") or buf.endswith(b"\\n.\\n") or buf == b".\\n" \\
                            or (buf.startswith(b"OK") and buf.endswith(b"\\n")):
                        break
                sys.stdout.write(json.dumps(buf.decode()) + "\\n")
        """)
        out = subprocess.run(
            ["ip", "netns", "exec", self.name, sys.executable, "-c", script, host, str(port),
             *lines],
            check=True, capture_output=True, text=True, timeout=30,
        ).stdout
        return [json.loads(r) for r in out.split("\n") if r]


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")


def _daemon_on(tmp_path: Path, host: str, config: str = "") -> Daemon:
    d = Daemon(tmp_path, config=config or "log_level: info\n")

    def argv() -> list[str]:
        a = Daemon.argv(d)
        a[a.index("--listen") + 1] = f"0.0.0.0:{d.port}"
        return a

    d.argv = argv  # type: ignore[method-assign]
    return d


STATE_CHANGING = [
    "cancel job H:x:1",
    "maxqueue f 5",
    "create function f",
    "drop function f",
    "atomnode-jobs purge 0",
    "atomnode-jobs retry H:x:1",
    "atomnode-jobs cancel H:x:1",
    "shutdown",
]
READ_ONLY = ["status", "workers", "version", "show jobs", "atomnode-jobs list"]


@needs_root
def test_state_changing_admin_commands_refused_from_another_network(tmp_path):
    with NetNS() as ns:
        # allow: lets the namespace connect at all (issue 14); it does not make it an
        # operator.
        d = _daemon_on(tmp_path, ns.host_ip, config=f"allow: [{ns.network}]\n").start()
        try:
            replies = ns.admin(ns.host_ip, d.port, *STATE_CHANGING, *READ_ONLY)
            refused = replies[: len(STATE_CHANGING)]
            for line, reply in zip(STATE_CHANGING, refused):
                assert reply.startswith("ERR PERMISSION_DENIED"), (line, reply)
            for line, reply in zip(READ_ONLY, replies[len(STATE_CHANGING):]):
                assert not reply.startswith("ERR"), (line, reply)
            assert d.proc.poll() is None  # the shutdown was refused
            # One WARNING for the flood from that peer, not one per command.
            assert d.log().count("refused admin command") == 1
            assert ns.peer_ip in d.log()
            # Loopback still may.
            with d.client() as c:
                assert c.admin("create function f").startswith(b"OK")
                assert c.admin("maxqueue f 5").startswith(b"OK")
        finally:
            assert d.stop() == 0


@needs_root
def test_operator_networks_widen_the_rule(tmp_path):
    with NetNS() as ns:
        d = _daemon_on(tmp_path, ns.host_ip,
                       config=f"allow: [{ns.network}]\noperator_networks: [{ns.network}]\n"
                       ).start()
        try:
            replies = ns.admin(ns.host_ip, d.port, "create function g", "maxqueue g 3",
                               "atomnode-jobs purge 999999")
            assert replies[0].startswith("OK") and replies[1].startswith("OK"), replies
            assert replies[2].startswith("OK"), replies
            assert "refused admin command" not in d.log()
            # A reload that drops the network closes it again.
            assert d.config_path is not None
            d.config_path.write_text(f"allow: [{ns.network}]\n"
                                     "operator_networks: [192.0.2.0/24]\n")
            d.proc.send_signal(signal.SIGHUP)
            _wait(lambda: "configuration reloaded" in d.log(), "reload")
            assert ns.admin(ns.host_ip, d.port, "maxqueue g 4")[0].startswith(
                "ERR PERMISSION_DENIED")
            assert ns.admin(ns.host_ip, d.port, "shutdown")[0].startswith(
                "ERR PERMISSION_DENIED")
        finally:
            assert d.stop() == 0


def test_operator_networks_validated(tmp_path):
    from atomnode.system.config import ConfigError, parse_config

    cfg = parse_config("operator_networks: [10.0.0.0/8, '192.168.1.7', '2001:db8::/32']\n")
    assert cfg.operator_networks == ("10.0.0.0/8", "192.168.1.7/32", "2001:db8::/32")
    with pytest.raises(ConfigError, match=r"operator_networks\[1\].*is not an IP network"):
        parse_config("operator_networks: [10.0.0.0/8, 10.0.0/33]\n")


# ------------------------------------------------------------------ point 12: reload
def _pool_pids(d: Daemon) -> list:
    with d.client() as c:
        doc = json.loads(c.admin("atomnode-status").split(b"\n")[0])
    return [w["pid"] for p in doc["pools"] for w in p["workers"]]


def _pool(name: str) -> str:
    return textwrap.dedent(f"""\
        pools:
          - name: {name}
            command: [sleep, "3600"]
            count: 2
        """)


@pytest.mark.parametrize("content", ["", "# all commented out\n# pools: []\n", "null\n",
                                     "---\n...\n"],
                         ids=["zero-bytes", "only-comments", "null", "empty-document"])
def test_reload_from_an_empty_file_is_refused(tmp_path, content):
    d = Daemon(tmp_path, config=_pool("keep")).start()
    try:
        _wait(lambda: d.log().count("worker started") == 2, "2 workers")
        pids = _pool_pids(d)
        assert len(pids) == 2 and None not in pids
        assert d.config_path is not None
        d.config_path.write_text(content)
        d.proc.send_signal(signal.SIGHUP)
        _wait(lambda: "reload REFUSED" in d.log(), "refusal")
        assert " ERROR " in next(line for line in d.log().splitlines()
                                 if "reload REFUSED" in line)
        # Still running, both workers untouched.
        assert "worker stopped" not in d.log()
        assert _pool_pids(d) == pids
        # An explicit empty list is a real instruction: it is applied.
        d.config_path.write_text("pools: []\n")
        d.proc.send_signal(signal.SIGHUP)
        _wait(lambda: d.log().count("worker stopped") == 2, "pool stopped on explicit []")
    finally:
        assert d.stop() == 0


def test_check_config_warns_about_an_empty_file(tmp_path):
    f = tmp_path / "empty.yml"
    f.write_text("# nothing here\n")
    r = subprocess.run([sys.executable, "-m", "atomnode", "check-config", str(f)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0
    assert "warning" in r.stderr and "is empty" in r.stderr
    f.write_text("log_level: info\n")
    r = subprocess.run([sys.executable, "-m", "atomnode", "check-config", str(f)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "is empty" not in r.stderr


# ------------------------------------------------------------ point 13: log volume
FLOOD_WORKER = textwrap.dedent("""\
    import os, sys
    for i in (1, 2):  # each of the pool's two workers floods once
        try:
            os.close(os.open(f"{sys.argv[1]}.{i}", os.O_CREAT | os.O_EXCL))
            break
        except FileExistsError:
            continue
    else:
        os.execvp("sleep", ["sleep", "3600"])
    out = sys.stdout.buffer
    out.write(b"x" * (8 * 1024 * 1024))                 # 8 MiB without a newline
    out.write(b"\\n" + (b"y" * 8000 + b"\\n") * 1000)     # 8 MB of long lines
    out.write(b"z\\n" * 400000)                          # 400,000 short lines
    out.flush()
    sys.exit(111)                                        # planned: restart at once
    """)


def test_worker_output_is_bounded_per_pool_whatever_it_looks_like(tmp_path):
    """Two workers of one pool each print 16.8 MB (no newline, long lines, short lines):
    the daemon logs at most the pool's burst plus its rate (64 KiB/s) of it, and says how
    much it dropped."""
    script = tmp_path / "flood.py"
    script.write_text(FLOOD_WORKER)
    marker = tmp_path / "flooded"
    config = textwrap.dedent(f"""\
        pools:
          - name: noisy
            command: [{sys.executable}, {script}, {marker}]
            count: 2
        """)
    d = Daemon(tmp_path, config=config)
    t0 = time.monotonic()
    d.start()
    try:
        _wait(lambda: d.log().count("exited with code 111 (planned)") == 2, "both floods done",
              timeout=60)
        elapsed = time.monotonic() - t0
        lines = [x for x in d.log().splitlines()
                 if "atomnode.worker.noisy: [noisy pid" in x and "dropped" not in x]
        logged = sum(len(x) for x in lines)
        print(f"\nlogged {logged / 1024:.0f} KiB of 2 x 16.8 MB of output in {elapsed:.1f} s")
        assert logged <= 512 * 1024 + 64 * 1024 * elapsed + 64 * 1024, logged
        assert any(x.endswith("x" * 100) for x in lines)  # a piece of the newline-less run
        assert "dropped" in d.log() and "KiB/s per pool" in d.log()
    finally:
        assert d.stop() == 0


# --------------------------------------------------------- point 14: orphaned workers
# A wrapper that starts a grandchild, as AtoM's units do (sh -c "... php ..."): the
# grandchild is what a parent-death signal never reaches.
WRAPPER_POOL = textwrap.dedent("""\
    pools:
      - name: wrapped
        command: [sh, -c, "sleep 3600 & wait"]
        count: 2
    """)
NOBODY_POOL = ("  - name: wrapped-nobody\n"
               "    command: [sh, -c, \"sleep 3600 & wait\"]\n"
               "    count: 1\n"
               "    user: nobody\n")


def _owned(prefix: str) -> dict[int, str]:
    from atomnode.workers.keeper import owned_processes

    return owned_processes(prefix)


def _daemon_procs(d: Daemon) -> dict[int, str]:
    """Every process carrying this daemon's ATOMNODE_OWNER instance (any run)."""
    from atomnode.workers.keeper import instance_id

    return _owned(instance_id(str(d.db)) + ".")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _keeper_pid(d: Daemon) -> int:
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().split(")")[-1].split()[1])
            except OSError:
                continue
            if ppid == d.proc.pid and b"atomnode-keeper" in argv:
                return int(name)
    raise AssertionError("no keeper process")


def _kill_leftovers(*daemons: Daemon) -> None:
    """After a failed test: no process of these daemons' instances survives it."""
    for d in daemons:
        if d.proc is not None and d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()
        for pid in _daemon_procs(d):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def _two_wrapped(d: Daemon, n_pools: int = 2) -> dict[int, str]:
    want = 2 * (2 + (1 if n_pools > 1 else 0))  # each worker: sh + its sleep
    _wait(lambda: len(_daemon_procs(d)) == want, f"{want} worker processes")
    return _daemon_procs(d)


@needs_root
def test_workers_and_their_children_die_with_a_killed_daemon(tmp_path):
    """kill -9 of the daemon outside systemd: its workers (one pool running as nobody:
    setuid clears a parent-death signal) and their grandchildren die with it."""
    d = Daemon(tmp_path, config=WRAPPER_POOL + NOBODY_POOL).start()
    try:
        procs = _two_wrapped(d)
        assert len({v for v in procs.values()}) == 1  # one run token
        d.kill9()
        _wait(lambda: not any(_alive(p) for p in procs), "every worker process gone",
              timeout=10)
        # A restart starts fresh workers and finds nothing to clean up.
        d.start()
        fresh = _two_wrapped(d)
        assert not set(fresh) & set(procs)
        assert "stray process" not in d.log()
        assert d.stop() == 0
        _wait(lambda: not _daemon_procs(d), "workers stopped with the daemon")
    finally:
        _kill_leftovers(d)


@needs_root
def test_a_restarted_daemon_kills_its_own_strays_only(tmp_path):
    """Keeper and daemon both killed: the strays survive, and the next start of the same
    daemon (same database) kills them before it starts its pools; another daemon's
    workers are left alone."""
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    other = Daemon(other_dir, config=WRAPPER_POOL).start()
    d = Daemon(tmp_path, config=WRAPPER_POOL).start()
    try:
        others = _two_wrapped(other, 1)
        strays = _two_wrapped(d, 1)
        os.kill(_keeper_pid(d), signal.SIGKILL)
        d.kill9()
        time.sleep(0.5)  # an observation window: nothing kills the strays now
        assert all(_alive(p) for p in strays)
        d.start()
        assert all(not _alive(p) for p in strays)  # killed before "serving"
        assert "killed 4 stray process(es) left by an earlier run" in d.log()
        _two_wrapped(d, 1)
        assert all(_alive(p) for p in others)
        assert other.proc.poll() is None
        assert d.stop() == 0
        assert other.stop() == 0
    finally:
        _kill_leftovers(d, other)
