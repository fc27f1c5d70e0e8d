"""Several hosts for real (issue 14): a server, a worker host, an outsider.

Each host is a network namespace (tests/netns.py); the worker host's atomnode also runs
in a PID namespace with its own /proc, so its supervisor can only find its workers by
looking at its own processes and sockets, as on a separate machine. The workers are
``gearman -w`` (gearman-tools) running a shell script that records each run
(``start``/``end`` lines with the job's payload and the worker's pid) and waits for a
gate file the test creates when it wants the job to end.

Polling is used where the only signal is another host's state (no event crosses the
namespaces); every wait is bounded and says what it waited for.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from atomnode.gearman.protocol import Decoder
from atomnode.ops.client import AdminClient
from tests.daemon_harness import Client
from tests.netns import Hosts, child_pid

PORT = 4730

WORKER_SCRIPT = r"""
read -r x || true
echo "start $x $PPID" >> {runs}
while [ ! -e {gates}/"$x" ]; do sleep 0.02; done
echo "end $x $PPID" >> {runs}
echo "done $x"
"""


def wait_for(pred: Callable[[], object], what: str, timeout: float = 20.0) -> object:
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


class NsClient(Client):
    """The harness's Gearman client on a socket opened inside a namespace."""

    def __init__(self, sock: socket.socket, timeout: float = 10.0):
        self.sock = sock
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.decoder = Decoder(expect_requests=False)
        self.timeout = timeout


class Site:
    """The three hosts, the server's atomnode, and (once started) the worker host's."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.hosts = Hosts(["worker", "outsider"])
        self.server_ip = self.hosts.server_addr["worker"]
        self.runs = tmp / "runs"
        self.gates = tmp / "gates"
        self.gates.mkdir()
        self.runs.touch()
        self.procs: list[subprocess.Popen] = []
        srv_cfg = tmp / "server.yml"
        srv_cfg.write_text(
            f"listen: ['0.0.0.0:{PORT}', '[::]:{PORT}']\n"
            f"allow: ['{self.hosts.addr['worker']}/32', '{self.hosts.addr6['worker']}/128']\n"
            f"database: {tmp / 'server.db'}\n"
            "http: {listen: none}\n"
        )
        self.server = self._spawn("server", srv_cfg, tmp / "server.log")
        wait_for(self._server_up, "the server's atomnode to listen")
        self.worker: subprocess.Popen | None = None
        self.worker_cfg = tmp / "worker.yml"
        self.control = tmp / "worker.sock"

    def _spawn(self, host: str, cfg: Path, logfile: Path, own_pids: bool = False
               ) -> subprocess.Popen:
        argv = self.hosts.exec_argv(
            host, [sys.executable, "-m", "atomnode", "run", "--config", str(cfg)],
            own_pids=own_pids)
        env = {k: v for k, v in os.environ.items()
               if k not in ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "ATOMNODE_CONFIG",
                            "WATCHDOG_USEC")}
        with open(logfile, "ab") as log:
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                 env=env, cwd=self.tmp)
        self.procs.append(p)
        return p

    def _server_up(self) -> bool:
        assert self.server.poll() is None, self.log("server")
        try:
            self.hosts.connect("server", "127.0.0.1", PORT, timeout=1).close()
            return True
        except OSError:
            return False

    def log(self, name: str) -> str:
        p = self.tmp / f"{name}.log"
        return p.read_text(errors="replace") if p.exists() else ""

    # ------------------------------------------------------------- server side
    def client(self) -> NsClient:
        """A connection to the server from its own loopback (an operator)."""
        return NsClient(self.hosts.connect("server", "127.0.0.1", PORT))

    def status(self) -> dict:
        with self.client() as c:
            return json.loads(c.admin("atomnode-status").split(b"\n")[0])

    def live_jobs(self) -> list[dict]:
        with self.client() as c:
            return json.loads(c.admin("atomnode-jobs list json").split(b"\n")[0])

    def submit(self, function: str, payload: str) -> bytes:
        with self.client() as c:
            return c.submit_bg(function.encode(), payload.encode(), payload.encode())

    # -------------------------------------------------------- the worker host
    def start_worker_host(self, pools: str) -> None:
        self.worker_cfg.write_text(
            "listen: []\n"
            f"database: {self.tmp / 'worker.db'}\n"
            f"control_socket: {self.control}\n"
            "shutdown_timeout: 60\n"
            "http: {listen: none}\n"
            f"pools:\n{pools}"
        )
        self.worker = self._spawn("worker", self.worker_cfg, self.tmp / "worker.log",
                                  own_pids=True)

    def pool(self, name: str, function: str, *, count: int = 1, extra: str = "") -> str:
        script = WORKER_SCRIPT.format(runs=self.runs, gates=self.gates)
        argv = ["gearman", "-w", "-h", self.server_ip, "-p", str(PORT), "-f", function,
                "--", "sh", "-c", script]
        return (f"  - name: {name}\n    count: {count}\n"
                f"    servers: ['{self.server_ip}:{PORT}']\n"
                f"    command: {json.dumps(argv)}\n{extra}")

    def worker_status(self) -> dict | None:
        try:
            with AdminClient(str(self.control), 0, 5.0) as c:
                return json.loads(c.command("atomnode-status")[0])
        except Exception:  # noqa: BLE001 - not up yet
            return None

    def worker_daemon_pid(self) -> int:
        assert self.worker is not None
        pid = wait_for(lambda: child_pid(self.worker.pid), "the worker host's daemon")
        return int(pid)  # type: ignore[arg-type]

    def run_lines(self) -> list[list[str]]:
        return [ln.split() for ln in self.runs.read_text().splitlines() if ln.strip()]

    def open_gate(self, payload: str) -> None:
        (self.gates / payload).touch()

    def close(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                # `unshare` does not pass signals on: the daemon is its child.
                pid = child_pid(p.pid) if p is self.worker else None
                os.kill(pid or p.pid, signal.SIGTERM)
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
        self.hosts.close()


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    s = Site(tmp_path)
    try:
        yield s
    finally:
        s.close()


def remote_workers(status: dict) -> list[dict]:
    return [w for h in status.get("remote_hosts") or [] for p in h.get("pools") or []
            for w in p.get("workers") or []]


def test_outsider_refused_and_worker_host_runs_the_servers_jobs(site: Site) -> None:
    # The outsider reaches the port but is closed at accept, before any byte is read.
    s = site.hosts.connect("outsider", site.hosts.server_addr["outsider"], PORT)
    s.settimeout(5)
    try:
        s.sendall(b"status\n")
        assert s.recv(100) == b""
    except (ConnectionResetError, BrokenPipeError):
        pass
    s.close()
    # Over IPv6 too: the outsider is refused, the worker host (allowed by its /128) is in.
    s6 = site.hosts.connect("outsider", site.hosts.server_addr6["outsider"], PORT)
    s6.settimeout(5)
    try:
        s6.sendall(b"version\n")
        assert s6.recv(100) == b""
    except (ConnectionResetError, BrokenPipeError):
        pass
    s6.close()
    with NsClient(site.hosts.connect("worker", site.hosts.server_addr6["worker"], PORT)) as c:
        assert c.admin("version").startswith(b"OK ")
    wait_for(lambda: site.status()["access"]["refused"] >= 2, "the refusals to be counted")
    refused = site.status()["access"]["refused_from"]
    assert "10.231.2.2" in refused and site.hosts.addr6["outsider"] in refused
    assert "not in allow:" in site.log("server")

    for i in range(5):
        site.open_gate(f"q{i}")
    site.start_worker_host(site.pool("quick", "quick", count=2))
    for i in range(5):
        site.submit("quick", f"q{i}")
    wait_for(lambda: len([r for r in site.run_lines() if r[0] == "end"]) == 5,
             "5 jobs to run on the worker host")
    wait_for(lambda: site.status()["stats"]["completed"] == 5, "5 completions on the server")
    runs = site.run_lines()
    assert sorted(r[1] for r in runs if r[0] == "start") == [f"q{i}" for i in range(5)]

    # The server lists the worker host's pool (reported over atomnode-host report).
    st = wait_for(lambda: (lambda s: s if len(remote_workers(s)) == 2 else None)(
        site.status()), "the worker host's report")
    (host,) = st["remote_hosts"]
    assert host["address"] == site.hosts.addr["worker"] and host["aware"]
    assert {p["name"] for p in host["pools"]} == {"quick"}

    # The worker host answers its own status on its control socket, job aware.
    ws = wait_for(lambda: (lambda ws: ws if ws and {w["state"] for w in ws["pools"][0][
        "workers"]} == {"idle"} else None)(site.worker_status()),
        "the worker host to see both its workers idle (control socket)")
    assert ws["listen"] == []
    (link,) = ws["worker_host"]["servers"]
    assert link["aware"] and link["connected"] and link["error"] is None

    # doctor on the worker host: it reaches the server and is allowed; from the
    # outsider, the same check fails and says what to add.
    doc = subprocess.run(
        site.hosts.exec_argv("worker", [sys.executable, "-m", "atomnode", "doctor",
                                        "--config", str(site.worker_cfg)]),
        capture_output=True, text=True, timeout=60)
    assert f"OK    the server {site.server_ip}:{PORT} is reachable and allows this host" \
        in doc.stdout, doc.stdout + doc.stderr
    out_cfg = site.tmp / "outsider.yml"
    out_cfg.write_text(site.worker_cfg.read_text().replace(
        site.server_ip, site.hosts.server_addr["outsider"]).replace(
        str(site.control), str(site.tmp / "outsider.sock")))
    doc = subprocess.run(
        site.hosts.exec_argv("outsider", [sys.executable, "-m", "atomnode", "doctor",
                                          "--config", str(out_cfg)]),
        capture_output=True, text=True, timeout=60)
    assert doc.returncode == 1
    assert "add this host's address to allow:" in doc.stdout, doc.stdout


def test_stopping_the_worker_host_drains_a_long_job_first(site: Site) -> None:
    site.start_worker_host(site.pool("slow", "slow"))
    wait_for(lambda: (site.worker_status() or {}).get("ready"), "the worker host")
    handle = site.submit("slow", "long1").decode()
    wait_for(lambda: any(j["handle"] == handle and j["state"] == "running"
                         for j in site.live_jobs()), "the long job to start")
    daemon = site.worker_daemon_pid()
    os.kill(daemon, signal.SIGTERM)
    # The server stops assigning to that worker; the job keeps running there.
    wait_for(lambda: any(h["draining"] for h in site.status()["remote_hosts"]),
             "the worker's connection to be drained on the server")
    site.submit("slow", "after")  # must wait for another worker, not go to this one
    assert site.worker.poll() is None, site.log("worker")
    assert [r[0] for r in site.run_lines()] == ["start"]
    running = {j["handle"]: j["state"] for j in site.live_jobs()}
    assert running[handle] == "running"

    site.open_gate("long1")
    assert site.worker.wait(30) == 0, site.log("worker")
    assert [r[:2] for r in site.run_lines()] == [["start", "long1"], ["end", "long1"]]
    st = site.status()
    assert st["stats"]["completed"] == 1 and st["stats"]["requeued"] == 0
    # Nothing lost: the job submitted during the drain waits, queued, for a worker.
    assert [(j["function"], j["state"]) for j in site.live_jobs()] == [("slow", "queued")]
    log = site.log("worker")
    assert "still busy" not in log and "SIGKILL" not in log


def test_recycling_by_max_jobs_waits_until_the_worker_is_idle(site: Site) -> None:
    # Two jobs queued before the worker host starts: the worker takes the first, is
    # then past max_jobs (1), and takes the second at once. It must not be stopped
    # while the second runs; it is recycled once idle.
    site.open_gate("a")
    site.submit("recyc", "a")
    site.submit("recyc", "b")
    site.start_worker_host(site.pool("recyc", "recyc", extra="    max_jobs: 1\n"))
    wait_for(lambda: any(r[:2] == ["start", "b"] for r in site.run_lines()), "job b to start")
    first_pid = [r for r in site.run_lines() if r[:2] == ["start", "a"]][0][2]

    def busy_past_limit() -> bool:
        ws = site.worker_status() or {}
        ws_workers = [w for p in ws.get("pools") or [] for w in p["workers"]]
        return any(w["state"] == "busy" and w["jobs_done"] >= 1 for w in ws_workers)

    # The supervisor sees the worker busy with its limit reached: it must wait...
    wait_for(busy_past_limit, "the worker host to see its worker busy past max_jobs")
    ws = site.worker_status()
    before = ws["pools"][0]["workers"][0]
    # ...through several monitor passes (1 s each): same process, still busy on b.
    wait_for(lambda: (site.worker_status() or {"uptime": 0})["uptime"] >= ws["uptime"] + 2.5,
             "a few supervisor passes", timeout=30)
    now = site.worker_status()["pools"][0]["workers"][0]
    assert now["pid"] == before["pid"] and now["state"] == "busy", now
    assert [r[:2] for r in site.run_lines()] == [["start", "a"], ["end", "a"], ["start", "b"]]

    site.open_gate("b")
    site.open_gate("c")
    # Idle now: recycled (a new process), and the next job runs on the new one.
    wait_for(lambda: (lambda w: w and w["pid"] not in (None, before["pid"]))(
        ((site.worker_status() or {}).get("pools") or [{"workers": [None]}])[0]["workers"][0]),
        "the worker to be recycled")
    site.submit("recyc", "c")
    wait_for(lambda: any(r[:2] == ["end", "c"] for r in site.run_lines()), "job c")
    lines = site.run_lines()
    assert [r[:2] for r in lines] == [["start", "a"], ["end", "a"], ["start", "b"],
                                      ["end", "b"], ["start", "c"], ["end", "c"]]
    assert lines[2][2] == first_pid and lines[4][2] != first_pid
    assert site.status()["stats"] == {"submitted": 3, "completed": 3, "failed": 0,
                                      "requeued": 0}
    # Past the limit after a, recycled only after b, once idle.
    assert "recycling worker: 2 jobs done (max_jobs 1)" in site.log("worker")


def test_socket_activated_listener_obeys_allow(site: Site, tmp_path: Path) -> None:
    """A socket systemd passes (LISTEN_FDS) is filtered like a configured one."""
    def bind() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("0.0.0.0", PORT + 1))
        s.listen(16)
        return s

    listener = site.hosts.in_ns("server", bind)
    cfg = tmp_path / "activated.yml"
    cfg.write_text(f"allow: ['{site.hosts.addr['worker']}']\n"
                   f"database: {tmp_path / 'activated.db'}\nhttp: {{listen: none}}\n")
    fd = listener.fileno()
    launcher = (
        "import os, sys; fd = int(sys.argv[1]); os.dup2(fd, 3); os.close(fd); "
        "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1'); "
        "os.execv(sys.executable, [sys.executable, '-m', 'atomnode', 'run', '--config', "
        "sys.argv[2]])"
    )
    with open(tmp_path / "activated.log", "ab") as log:
        proc = subprocess.Popen(
            site.hosts.exec_argv("server", [sys.executable, "-c", launcher, str(fd),
                                            str(cfg)]),
            pass_fds=(fd,), stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    site.procs.append(proc)
    listener.close()
    worker_side = site.hosts.server_addr["worker"]

    def answers() -> bytes | None:
        try:
            with NsClient(site.hosts.connect("worker", worker_side, PORT + 1)) as c:
                return c.admin("version")
        except OSError:
            return None

    assert b"atomnode" in wait_for(answers, "the activated daemon to answer the worker host")
    s = site.hosts.connect("outsider", site.hosts.server_addr["outsider"], PORT + 1)
    s.settimeout(5)
    try:
        s.sendall(b"version\n")
        assert s.recv(100) == b""
    except (ConnectionResetError, BrokenPipeError):
        pass
    s.close()
    assert "using 1 socket(s) passed by systemd" in site.log("activated")
    wait_for(lambda: "not in allow:" in site.log("activated"), "the refusal in the log")


def test_exit_111_on_a_worker_host_is_a_planned_restart(site: Site) -> None:
    """AtoM's worker exits 111 after --max-job-count: restarted at once, as on one box."""
    argv = ["sh", "-c", f"gearman -w -c 1 -h {site.server_ip} -p {PORT} -f once -- tee -a "
            f"{site.runs}; exit 111"]
    site.start_worker_host(
        f"  - name: once\n    count: 1\n    servers: ['{site.server_ip}:{PORT}']\n"
        f"    command: {json.dumps(argv)}\n")
    for i in range(3):
        site.submit("once", f"o{i} ")
    wait_for(lambda: site.status()["stats"]["completed"] == 3, "3 jobs, one per process")
    log = site.log("worker")
    assert log.count("worker exited with code 111 (planned); restarting") >= 2, log
    assert "restarting in" not in log  # no crash backoff
    assert sorted(site.runs.read_text().split()) == ["o0", "o1", "o2"]
