"""Operator CLI (status, submit, check-config, doctor) against a fake daemon started in the
test: a tiny threaded TCP server answering the admin commands and Gearman submits."""

from __future__ import annotations

import io
import os
import json
import socket
import socketserver
import subprocess
import sys
import threading
from collections import namedtuple
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from atom_trees import make_atom_release
from test_systemd import running_daemon

from atomnode.system import config as config_mod
from atomnode.ops import doctor
from atomnode.cli import main
from atomnode.ops.client import AdminClient, DaemonUnreachable
from atomnode.ops.atom_site import atom_function_prefix, read_atom_site
from atomnode.gearman.protocol import AdminLine, Decoder, Packet, T, encode, error_packet
from daemon_harness import free_port



def full_status(functions: list[dict[str, Any]] | None = None, **over: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "version": "0.1.0",
        "pid": 4242,
        "uptime": 3725,
        "queue": {"queued": 3, "running": 1, "failed": 0, "store_healthy": True, "store_error": None},
        "functions": functions
        if functions is not None
        else [{"name": "reverse", "queued": 3, "running": 1, "workers": 2, "max_queue": None}],
        "pools": [
            {
                "name": "atom",
                "count": 2,
                "workers": [
                    {"pid": 101, "state": "busy", "job": "H:host:7", "jobs_done": 12, "rss_mb": 81.5,
                     "uptime": 600, "detail": None},
                    {"pid": 102, "state": "idle", "job": None, "jobs_done": 3, "rss_mb": 60.0,
                     "uptime": 90, "detail": None},
                ],
            }
        ],
        "handlers": [{"function": "echo-upper", "concurrency": 2, "running": 0}],
        "connections": 3,
    }  # fmt: skip
    data.update(over)
    return data


Submitted = namedtuple("Submitted", "type function unique data")


class FakeDaemon(socketserver.ThreadingTCPServer):
    """Answers ``status``, ``workers``, ``atomnode-status`` (or ERR, as an older daemon),
    ``version``, and Gearman submits with a scripted outcome."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.port = self.server_address[1]
        self.status_json: dict[str, Any] | None = full_status()
        self.status_lines = ["reverse\t4\t1\t2"]
        self.worker_lines = ["12 127.0.0.1 pid_101_abc : reverse", "13 127.0.0.1 - :"]
        self.outcome = "complete"  # complete | fail | exception | queue_full
        self.submitted: list[Submitted] = []
        self.commands: list[str] = []


class _Handler(socketserver.BaseRequestHandler):
    server: FakeDaemon

    def handle(self) -> None:
        dec = Decoder()
        sock = self.request
        while True:
            try:
                data = sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            for ev in dec.events(data):
                sock.sendall(self.answer(ev))

    def answer(self, ev: AdminLine | Packet) -> bytes:
        srv = self.server
        if isinstance(ev, AdminLine):
            cmd = ev.line.decode().strip()
            srv.commands.append(cmd)
            if cmd == "status":
                return "".join(f"{line}\n" for line in srv.status_lines + ["."]).encode()
            if cmd == "workers":
                return "".join(f"{line}\n" for line in srv.worker_lines + ["."]).encode()
            if cmd == "atomnode-status" and srv.status_json is not None:
                return (json.dumps(srv.status_json) + "\n.\n").encode()
            if cmd == "version":
                return b"OK 0.1.0\n"
            return b"ERR UNKNOWN_COMMAND Unknown+server+command\r\n"
        if ev.type == T.OPTION_REQ:
            return encode(T.OPTION_RES, ev.args[0])
        function, unique, payload = ev.args
        srv.submitted.append(Submitted(T(ev.type).name, function.decode(), unique, payload))
        if srv.outcome == "queue_full":
            return error_packet("QUEUE_ERROR", "Job queue is full")
        h = b"H:fake:1"
        out = encode(T.JOB_CREATED, h)
        if ev.type in (T.SUBMIT_JOB_BG, T.SUBMIT_JOB_HIGH_BG, T.SUBMIT_JOB_LOW_BG):
            return out
        if srv.outcome == "fail":
            return out + encode(T.WORK_FAIL, h)
        if srv.outcome == "exception":
            return out + encode(T.WORK_EXCEPTION, h, b"Division by zero")
        return (
            out
            + encode(T.WORK_STATUS, b"H:other:9", b"1", b"9")  # someone else's job: ignored
            + encode(T.WORK_STATUS, h, b"1", b"2")
            + encode(T.WORK_DATA, h, b"part-")
            + encode(T.WORK_WARNING, h, b"slow disk")
            + encode(T.WORK_STATUS, h, b"2", b"2")
            + encode(T.WORK_COMPLETE, h, payload[::-1])
        )


@pytest.fixture
def fake() -> Iterator[FakeDaemon]:
    srv = FakeDaemon()
    # poll_interval only bounds how long shutdown() takes at teardown.
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(5)


@pytest.fixture(autouse=True)
def isolated_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No system config; AtoM's port-4730 check looks at a port nobody uses."""
    monkeypatch.delenv("ATOMNODE_CONFIG", raising=False)
    monkeypatch.setattr(config_mod, "DEFAULT_CONFIG_PATH", str(tmp_path / "absent.yml"))


def addr(srv: FakeDaemon) -> list[str]:
    return ["--host", "127.0.0.1", "--port", str(srv.port)]


# ----------------------------------------------------------------------------- client


def test_admin_client_reads_listings_and_single_lines(fake: FakeDaemon) -> None:
    with AdminClient("127.0.0.1", fake.port, 5) as c:
        assert c.command("status") == ["reverse\t4\t1\t2"]
        assert c.command("version") == ["OK 0.1.0"]
        assert c.command("bogus") == ["ERR UNKNOWN_COMMAND Unknown+server+command"]
        assert c.command("workers") == fake.worker_lines
        fake.status_json = None
        assert c.command("atomnode-status")[0].startswith("ERR UNKNOWN_COMMAND")


def test_admin_client_unreachable_says_how_to_start() -> None:
    port = free_port()
    with pytest.raises(DaemonUnreachable) as exc:
        AdminClient("127.0.0.1", port, 2).command("status")
    msg = str(exc.value)
    assert f"127.0.0.1:{port}" in msg
    assert "not running" in msg
    assert "systemctl start atomnode" in msg and "atomnode run" in msg


# ----------------------------------------------------------------------------- status


def test_status_table(fake: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    fake.status_json["pools"][0]["workers"].append(  # type: ignore[index]
        {"pid": None, "state": "backing off", "job": None, "jobs_done": 0, "rss_mb": None,
         "uptime": None, "detail": "backing off, next try in 8s (exit code 255)"}
    )  # fmt: skip
    assert main(["status", *addr(fake)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "atomnode 0.1.0, pid 4242, up 1h 2m"
    assert lines[1] == "queue: 3 queued, 1 running, 0 failed, store healthy"
    assert lines[3].split() == ["FUNCTION", "QUEUED", "RUNNING", "WORKERS", "MAX", "QUEUE"]
    assert lines[4].split() == ["reverse", "3", "1", "2", "-"]
    pool_rows = [line.split() for line in lines if line.startswith("atom ")]
    assert pool_rows[0] == ["atom", "101", "busy", "H:host:7", "12", "82", "10m", "0s"]
    assert pool_rows[1][:5] == ["atom", "102", "idle", "-", "3"]
    assert "backing off, next try in 8s (exit code 255)" in out
    assert "echo-upper" in out
    assert "3 client/worker connection(s)" in out
    assert fake.commands == ["atomnode-status"]


def test_status_json(fake: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--json", *addr(fake)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data == {**full_status(), "degraded": False}


def test_status_degrades_for_an_older_daemon(
    fake: FakeDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.status_json = None
    assert main(["status", *addr(fake)]) == 0
    out = capsys.readouterr().out
    assert "does not answer atomnode-status" in out
    assert "queue: 3 queued, 1 running" in out
    row = next(line for line in out.splitlines() if line.startswith("reverse"))
    assert row.split() == ["reverse", "3", "1", "2", "-"]
    assert "pid_101_abc : reverse" in out
    assert main(["status", "--json", *addr(fake)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["degraded"] is True
    assert data["functions"] == [
        {"name": "reverse", "queued": 3, "running": 1, "workers": 2, "max_queue": None}
    ]


def test_status_uses_the_configured_listen_address(
    fake: FakeDaemon,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cfg = tmp_path / "atomnode.yml"
    cfg.write_text(f"listen: [0.0.0.0:{fake.port}]\n")
    monkeypatch.setenv("ATOMNODE_CONFIG", str(cfg))
    assert main(["status"]) == 0
    assert "atomnode 0.1.0" in capsys.readouterr().out


def test_status_with_an_invalid_explicit_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "bad.yml"
    cfg.write_text("listen: nowhere\n")
    assert main(["status", "--config", str(cfg)]) == 1
    assert "bad.yml:1: listen" in capsys.readouterr().err


def test_status_unreachable(capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    assert main(["status", "--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert f"nothing answers at 127.0.0.1:{port}" in err
    assert "start it with `systemctl start atomnode`, or `atomnode run`" in err


def test_status_unreachable_in_a_real_process(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.run(
        [sys.executable, "-m", "atomnode", "status", "--port", str(port)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"ATOMNODE_CONFIG": str(tmp_path / "none.yml"), "PATH": "/usr/bin:/bin"},
    )
    # An explicit (missing) config file is an error before anything is contacted.
    assert proc.returncode == 1
    assert "configuration file not found" in proc.stderr
    cfg = tmp_path / "atomnode.yml"
    cfg.write_text(f"listen: [127.0.0.1:{port}]\n")
    proc = subprocess.run(
        [sys.executable, "-m", "atomnode", "status"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"ATOMNODE_CONFIG": str(cfg), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 1
    assert "not running" in proc.stderr and proc.stdout == ""


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        ["status", "--port", "notanumber"],
        ["submit"],
        ["submit", "f", "--priority", "urgent"],
    ):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2


# ----------------------------------------------------------------------------- submit


def test_submit_foreground_shows_progress_and_result(
    fake: FakeDaemon, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    assert main(["submit", "reverse", "hello", "--unique", "u1", *addr(fake)]) == 0
    cap = capsysbinary.readouterr()
    assert cap.out == b"part-olleh"
    assert cap.err.decode().splitlines() == ["50% (1/2)", "warning: slow disk", "100% (2/2)"]
    assert fake.submitted == [Submitted("SUBMIT_JOB", "reverse", b"u1", b"hello")]


def test_submit_reads_stdin_and_priorities(
    fake: FakeDaemon, monkeypatch: pytest.MonkeyPatch, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"from\0stdin")))
    assert main(["submit", "reverse", "-", "--priority", "high", *addr(fake)]) == 0
    assert capsysbinary.readouterr().out == b"part-nidts\0morf"
    assert main(["submit", "reverse", "x", "--priority", "low", *addr(fake)]) == 0
    assert [s.type for s in fake.submitted] == ["SUBMIT_JOB_HIGH", "SUBMIT_JOB_LOW"]
    assert fake.submitted[0].data == b"from\0stdin"


def test_submit_background_prints_the_handle(
    fake: FakeDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["submit", "reverse", "x", "--background", "--priority", "low", *addr(fake)]) == 0
    assert capsys.readouterr().out == "H:fake:1\n"
    assert fake.submitted[0].type == "SUBMIT_JOB_LOW_BG"


@pytest.mark.parametrize(
    ("outcome", "message"),
    [
        ("fail", "job H:fake:1 failed"),
        ("exception", "job failed with an exception: Division by zero"),
        ("queue_full", "the server refused the job: QUEUE_ERROR: Job queue is full"),
    ],
)
def test_submit_failures_exit_1(
    fake: FakeDaemon, capsys: pytest.CaptureFixture[str], outcome: str, message: str
) -> None:
    fake.outcome = outcome
    assert main(["submit", "reverse", "x", *addr(fake)]) == 1
    cap = capsys.readouterr()
    assert message in cap.err
    assert cap.out == ""


def test_submit_unreachable(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["submit", "f", "x", "--port", str(free_port())]) == 1
    assert "not running" in capsys.readouterr().err


# ----------------------------------------------------------------------------- check-config


def test_check_config_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "atomnode.yml"
    cfg.write_text("listen: [127.0.0.1:4731]\nshutdown_timeout: 1m\n")
    assert main(["check-config", str(cfg)]) == 0
    cap = capsys.readouterr()
    assert "shutdown_timeout: 60.0" in cap.out
    assert "- 127.0.0.1:4731" in cap.out
    assert f"configuration OK ({cfg})" in cap.err


def test_check_config_invalid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "atomnode.yml"
    cfg.write_text("listen: [127.0.0.1:4731]\npools:\n  - name: a\n    comand: [x]\n")
    assert main(["check-config", str(cfg)]) == 1
    cap = capsys.readouterr()
    assert cap.out == ""
    assert f"{cfg}:4: pools[0].comand: unknown key 'comand'; did you mean 'command'?" in cap.err
    assert f"{cfg}:3: pools[0]: missing required key 'command'" in cap.err


def test_check_config_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config"]) == 0
    cap = capsys.readouterr()
    assert "embedded defaults" in cap.err
    assert "- 127.0.0.1:4730" in cap.out


# ----------------------------------------------------------------------------- doctor


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Pretend free space (the real disk's is not ours to decide)."""
    free = {"bytes": 50 * 1024**3}
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(
        doctor.shutil, "disk_usage", lambda p: Usage(100 * 1024**3, 0, free["bytes"])
    )
    return free


def doctor_lines(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, list[str]]:
    rc = main(["doctor", *argv])
    return rc, capsys.readouterr().out.splitlines()


#: The AtoM tree's job classes (tests/atom_trees.py WORKER_TYPES_29 without SWORD).
CLASSES = ["arFindingAidJob", "arInheritRightsJob", "arObjectMoveJob",
           "arUpdatePublicationStatusJob", "arFileImportJob"]
#: Site values that would come from MySQL: SWORD disabled (AtoM's default).
NO_MYSQL = ["--plugins", ""]


def atom_setup(
    tmp_path: Path, fake: FakeDaemon, monkeypatch: pytest.MonkeyPatch, **kw: Any
) -> tuple[Path, str]:
    """A newest-release AtoM tree served on the fake daemon's (random, not 4730) port; its
    MySQL and Elasticsearch are stood in for by listening sockets."""
    es = socket.socket()
    es.bind(("127.0.0.1", 0))
    es.listen()
    monkeypatch.setattr(doctor, "check_mysql", lambda db, timeout=3.0: None)
    root = make_atom_release(
        tmp_path / "atom", server=f"127.0.0.1:{fake.port}", workers_key="k",
        search=("127.0.0.1", es.getsockname()[1]), **kw,
    )
    monkeypatch.setattr(doctor, "_es_listener", es, raising=False)  # closed with the test
    cfg = tmp_path / "atomnode.yml"
    cfg.write_text(f"listen: [127.0.0.1:{fake.port}]\ndatabase: {tmp_path}/q.db\n")
    return root, str(cfg)


def test_doctor_all_good(
    fake: FakeDaemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, disk: dict[str, int],
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    root, cfg = atom_setup(tmp_path, fake, monkeypatch)
    prefix = read_atom_site(str(root), mysql=False, plugins=[]).prefix
    fake.status_lines = [f"{prefix}{c}\t0\t0\t1" for c in CLASSES]
    rc, lines = doctor_lines(capsys, [str(root), "--config", cfg, *NO_MYSQL])
    assert rc == 0, lines
    # A healthy site served on another port than 4730: no FAIL, no WARN.
    assert all(line.startswith("OK") for line in lines), lines
    text = "\n".join(lines)
    assert f"the daemon answers at 127.0.0.1:{fake.port} (atomnode 0.1.0, pid 4242)" in text
    assert "AtoM 2.9.0 at " in text and "release family 2.5.2+" in text
    assert f"AtoM's web app and workers use 127.0.0.1:{fake.port}, which answers" in text
    assert "MySQL at /var/run/mysqld/mysqld.sock answers to 'atom'" in text
    assert "Elasticsearch at 127.0.0.1:" in text
    assert "qtSwordPluginWorker not checked: qtSwordPlugin is disabled" in text
    assert f"all 5 enabled AtoM job classes have a worker under {prefix!r}" in text
    assert "pool atom: 2 worker(s) registered" in text
    assert "4730" not in text.replace(str(fake.port), "")
    assert "the queue database is healthy" in text
    assert "50.0 GiB free" in text


def test_doctor_nothing_listening(
    tmp_path: Path, disk: dict[str, int], capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    rc, lines = doctor_lines(capsys, ["--port", str(port)])
    assert rc == 1
    assert lines[0].startswith(f"FAIL  nothing answers at 127.0.0.1:{port}")
    assert "systemctl start atomnode" in lines[0]


def test_doctor_explains_no_gearman_worker_available(
    fake: FakeDaemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, disk: dict[str, int],
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    root, cfg = atom_setup(tmp_path, fake, monkeypatch)
    prefix = read_atom_site(str(root), mysql=False, plugins=[]).prefix
    wrong = atom_function_prefix("/var/www/other-path", "k")
    fake.status_lines = [
        f"{prefix}arFindingAidJob\t0\t0\t1",
        f"{prefix}arInheritRightsJob\t0\t0\t1",
        f"{prefix}arObjectMoveJob\t2\t0\t0",  # known, but its worker went away
        f"{prefix}arUpdatePublicationStatusJob\t0\t0\t1",
        f"{wrong}arFileImportJob\t0\t0\t1",  # a worker started from another root
    ]
    fake.status_json = full_status(
        functions=[
            {
                "name": f"{prefix}arObjectMoveJob",
                "queued": 2,
                "running": 0,
                "workers": 0,
                "max_queue": None,
            }
        ]
    )
    rc, lines = doctor_lines(capsys, [str(root), "--config", cfg, *NO_MYSQL])
    assert rc == 1
    fails = [line for line in lines if line.startswith("FAIL")]
    assert len(fails) == 2, lines
    assert "no worker for arObjectMoveJob" in fails[0]
    assert (
        'AtoM will say "No Gearman worker available that can handle the job arObjectMoveJob"'
        in fails[0]
    )
    assert f"expected function '{prefix}arObjectMoveJob'" in fails[0]
    assert "no worker for arFileImportJob" in fails[1]
    assert f"registered under another prefix ('{wrong}')" in fails[1]
    assert any(
        line.startswith("WARN") and f"2 job(s) wait for {prefix}arObjectMoveJob" in line
        for line in lines
    )


def test_doctor_reports_pools_store_and_disk(
    fake: FakeDaemon, tmp_path: Path, disk: dict[str, int], capsys: pytest.CaptureFixture[str]
) -> None:
    fake.status_json = full_status(
        queue={"queued": 5, "running": 0, "failed": 2, "store_healthy": False,
               "store_error": "database or disk is full"},
        pools=[
            {"name": "atom", "count": 1, "workers": [
                {"pid": None, "state": "backing off", "job": None, "jobs_done": 0, "rss_mb": None,
                 "uptime": None, "detail": "backing off, next try in 32s (exit code 255)"}]},
            {"name": "sword", "count": 1, "workers": [
                {"pid": None, "state": "waiting", "job": None, "jobs_done": 0, "rss_mb": None,
                 "uptime": None, "detail": "waiting for mysql (127.0.0.1:3306)"}]},
        ],
    )  # fmt: skip
    disk["bytes"] = 50 * 1024 * 1024
    cfg = tmp_path / "atomnode.yml"
    cfg.write_text(f"listen: [127.0.0.1:{fake.port}]\ndatabase: {tmp_path}/sub/q.db\n")
    rc, lines = doctor_lines(capsys, ["--config", str(cfg)])
    assert rc == 1
    text = "\n".join(lines)
    assert (
        "WARN  pool atom: workers are not running: pid -: backing off, next try in 32s (exit code 255)"
        in text
    )
    assert (
        "WARN  pool sword: workers are not running: pid -: waiting for mysql (127.0.0.1:3306)"
        in text
    )
    assert "FAIL  the queue database is failing: database or disk is full" in text
    assert "WARN  2 background job(s) failed for good (their worker reported a failure" in text
    assert "poison" not in text
    assert f"FAIL  only 50 MiB free on the disk holding the queue ({tmp_path}/sub/q.db)" in text
    # A state and a detail that does not repeat it are both shown.
    fake.status_json["pools"][0]["workers"][0]["detail"] = "next try in 8s"  # type: ignore[index]
    _, lines = doctor_lines(capsys, ["--config", str(cfg)])
    assert (
        "WARN  pool atom: workers are not running: pid -: backing off, next try in 8s"
        in "\n".join(lines)
    )
    # The database the daemon reports wins over the local configuration's.
    fake.status_json["queue"]["database"] = "/daemon/side/q.db"  # type: ignore[index]
    _, lines = doctor_lines(capsys, ["--config", str(cfg)])
    assert "FAIL  only 50 MiB free on the disk holding the queue (/daemon/side/q.db)" in "\n".join(
        lines
    )
    disk["bytes"] = 512 * 1024 * 1024
    fake.status_json = full_status()
    rc, lines = doctor_lines(capsys, ["--config", str(cfg)])
    assert rc == 0
    assert any(line.startswith("WARN  only 512 MiB free") for line in lines)


def test_doctor_atom_server_not_answering(
    fake: FakeDaemon, tmp_path: Path, disk: dict[str, int], capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    dead = free_port()
    root, _cfg = atom_setup(tmp_path, fake, monkeypatch)
    (root / "config" / "gearman.yml").write_text(
        (root / "config" / "gearman.yml").read_text().replace(str(fake.port), str(dead)))
    rc, lines = doctor_lines(capsys, [str(root), *addr(fake), *NO_MYSQL])
    assert rc == 1
    text = "\n".join(lines)
    assert (
        f"FAIL  AtoM's web app and workers use 127.0.0.1:{dead} (config/gearman.yml) but nothing "
        f"answers there: make atomnode listen on 127.0.0.1:{dead}" in text
    )
    assert "also checks port" not in text


def test_doctor_mysql_elasticsearch_and_stale_cache(
    fake: FakeDaemon, tmp_path: Path, disk: dict[str, int], capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    dead = free_port()
    root, cfg = atom_setup(
        tmp_path, fake, monkeypatch, cached_servers={"cli": f"127.0.0.1:{dead}"})
    monkeypatch.undo()  # the real MySQL check: nothing at the socket path of this tree
    disk_free = {"bytes": 50 * 1024**3}
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(doctor.shutil, "disk_usage", lambda p: Usage(1, 0, disk_free["bytes"]))
    config_php = root / "config" / "config.php"
    config_php.write_text(config_php.read_text().replace(
        "mysql:dbname=atom;port=3306", f"mysql:dbname=atom;unix_socket={tmp_path}/no.sock"))
    (root / "config" / "search.yml").write_text(f"all:\n  server:\n    port: {dead}\n")
    prefix = read_atom_site(str(root), mysql=False, plugins=[]).prefix
    fake.status_lines = [f"{prefix}{c}\t0\t0\t1" for c in CLASSES]
    rc, lines = doctor_lines(capsys, [str(root), "--config", cfg, "--plugins", ""])
    assert rc == 1
    fails = [line for line in lines if line.startswith("FAIL")]
    assert len(fails) == 3, lines
    assert fails[0].startswith(
        f"FAIL  cannot connect to MySQL at {tmp_path}/no.sock as 'atom' (from config/config.php)")
    assert "start MySQL or fix the DSN and credentials in" in fails[0]
    # No host in config/search.yml: the plugin default (127.0.0.1) applies, as in symfony.
    assert fails[1].startswith(f"FAIL  Elasticsearch at 127.0.0.1:{dead} (config/search.yml) "
                               "does not answer")
    assert fails[2] == (
        "FAIL  symfony's cache (cache/qubit/cli/config/config_gearman.yml.php) still says "
        f"servers 127.0.0.1:{dead} but config/gearman.yml says 127.0.0.1:{fake.port}: clear the "
        f"cache with `php symfony cc` in {os.path.realpath(root)}, then `systemctl reload atomnode`"
    )


def test_doctor_notices_workers_that_never_registered(
    fake: FakeDaemon, tmp_path: Path, disk: dict[str, int], capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    # A worker reading a stale cached gearman.yml connects elsewhere: it runs but never
    # registers. "1 worker running" would be a false OK.
    root, cfg = atom_setup(tmp_path, fake, monkeypatch)
    fake.status_json = full_status(pools=[{"name": "atom", "count": 1, "workers": [
        {"pid": 321, "state": "starting", "job": None, "jobs_done": 0, "rss_mb": 30.0,
         "uptime": 95.0, "detail": ""}]}])  # fmt: skip
    rc, lines = doctor_lines(capsys, [str(root), "--config", cfg, *NO_MYSQL])
    assert rc == 1
    text = "\n".join(lines)
    assert (
        "FAIL  pool atom: worker(s) 321 have run for over 60s without registering with atomnode"
        in text
    )
    assert f"`php symfony cc` in {os.path.realpath(root)}, then `systemctl reload atomnode`" in text
    assert "worker(s) registered" not in text


def test_doctor_sword_checked_when_its_plugin_is_enabled(
    fake: FakeDaemon, tmp_path: Path, disk: dict[str, int], capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    root, cfg = atom_setup(tmp_path, fake, monkeypatch)
    prefix = read_atom_site(str(root), mysql=False, plugins=[]).prefix
    fake.status_lines = [f"{prefix}{c}\t0\t0\t1" for c in CLASSES]
    rc, lines = doctor_lines(capsys, [str(root), "--config", cfg, "--plugins", "qtSwordPlugin"])
    assert rc == 1
    assert [line for line in lines if line.startswith("FAIL")] == [
        'FAIL  no worker for qtSwordPluginWorker: AtoM will say "No Gearman worker available '
        'that can handle the job qtSwordPluginWorker" (expected function '
        f"'{prefix}qtSwordPluginWorker')"
    ]


def test_doctor_old_releases(
    fake: FakeDaemon, tmp_path: Path, disk: dict[str, int], capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setattr(doctor, "check_mysql", lambda db, timeout=3.0: None)
    root = make_atom_release(tmp_path / "a", "2.0.2-2.1", server=f"127.0.0.1:{fake.port}",
                             search=None)
    fake.status_lines = ["qtSwordPluginWorker\t0\t0\t1"]
    rc, lines = doctor_lines(capsys, [str(root), *addr(fake)])
    assert rc == 0, lines
    text = "\n".join(lines)
    assert "worker task tools:gearman-worker): no function prefix" in text
    assert "all 1 enabled AtoM job classes have a worker" in text
    root = make_atom_release(tmp_path / "b", "2.2", server=f"127.0.0.1:{fake.port}", search=None)
    real = os.path.realpath(root)
    fake.status_lines = [f"{real} - arGenerateFindingAidJob\t0\t0\t1",
                         f"{real} - arInheritRightsJob\t0\t0\t0"]
    rc, lines = doctor_lines(capsys, [str(root), *addr(fake), *NO_MYSQL])
    assert rc == 1
    assert [line for line in lines if line.startswith("FAIL")] == [
        'FAIL  no worker for arInheritRightsJob: AtoM will say "No Gearman worker available that '
        f"can handle the job arInheritRightsJob\" (expected function '{real} - arInheritRightsJob')"
    ]


def test_doctor_bad_atom_root(
    fake: FakeDaemon, tmp_path: Path, disk: dict[str, int], capsys: pytest.CaptureFixture[str]
) -> None:
    rc, lines = doctor_lines(capsys, [str(tmp_path / "nope"), *addr(fake)])
    assert rc == 1
    assert any(line.startswith("FAIL") and "no such directory" in line for line in lines)


# ----------------------------------------------------------------------------- the real daemon


def test_against_the_real_daemon(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], disk: dict[str, int]
) -> None:
    with running_daemon(tmp_path) as (_proc, port, _sock, _seen):
        where = ["--host", "127.0.0.1", "--port", str(port)]
        assert main(["submit", "--background", "ops-cli-fn", "payload", *where]) == 0
        handle = capsys.readouterr().out.strip()
        assert handle.startswith("H:")
        assert main(["status", *where]) == 0
        out = capsys.readouterr().out
        assert out.startswith("atomnode ")
        row = next(line for line in out.splitlines() if line.startswith("ops-cli-fn"))
        assert row.split()[:4] == ["ops-cli-fn", "1", "0", "0"]
        assert main(["status", "--json", *where]) == 0
        data = json.loads(capsys.readouterr().out)
        assert data["degraded"] is False
        assert data["queue"]["queued"] == 1
        rc, lines = doctor_lines(capsys, where)
        assert rc == 0, lines
        assert lines[0].startswith(f"OK    the daemon answers at 127.0.0.1:{port} (atomnode")
        assert any(
            line.startswith("WARN  1 job(s) wait for ops-cli-fn but no worker") for line in lines
        )
        assert any("the queue database is healthy" in line for line in lines)
