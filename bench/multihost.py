#!/usr/bin/env python3
"""How many remote workers and jobs/s one atomnode serves across hosts (issue 14).

    sudo .venv/bin/python bench/multihost.py            # HOSTS=4, defaults below
    HOSTS=8 IDLE=500 JOBS=200000 sudo .venv/bin/python bench/multihost.py

Needs root (network namespaces), gcc (loadgen) and gearman-tools. Not part of `make test`.

One *server* namespace runs atomnode (``listen: 0.0.0.0:4730``, ``allow:`` the test
networks); HOSTS worker-host namespaces reach it over their own veth link (tests/netns.py).
Three measurements, each printed as a ``RESULT`` line and summarised at the end:

1. ``roundtrip``: on every worker host at once, loadgen runs WORKERS worker and CLIENTS
   client connections doing foreground jobs (``roundtrip``), each host its own function;
   jobs/s is the sum over hosts. The same total load from the server's own loopback is
   run first, for the ratio.
2. ``remote-workers``: every host holds IDLE idle worker connections (polling
   ``GRAB_JOB``/``PRE_SLEEP`` every IDLE_INTERVAL s, default 1) plus WORKERS busy
   workers, while one client per host submits background jobs flat out for DURATION s (loadgen ``grab-latency``):
   submits/s summed over hosts, and GRAB latency with HOSTS*IDLE remote workers attached.
3. ``worker-hosts``: every host runs atomnode with a pool of POOL real ``gearman -w``
   workers (a process per job) and job awareness (``atomnode-host`` polls); JOBS_REAL
   background jobs are submitted on the server and timed until all have completed.

Each figure depends on the machine (cores shared with everything else on it); compare the
loopback row of the same run, not absolute numbers across machines.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from tests.netns import Hosts, child_pid  # noqa: E402

PORT = 4730
HOSTS = int(os.environ.get("HOSTS", "4"))
WORKERS = int(os.environ.get("WORKERS", "4"))  # roundtrip workers per host
CLIENTS = int(os.environ.get("CLIENTS", "2"))  # roundtrip clients per host
JOBS = int(os.environ.get("JOBS", "100000"))  # roundtrip jobs per host
IDLE = int(os.environ.get("IDLE", "250"))  # idle remote workers per host
DURATION = float(os.environ.get("DURATION", "5"))
IDLE_INTERVAL = os.environ.get("IDLE_INTERVAL", "1")  # seconds between an idle worker's polls
POOL = int(os.environ.get("POOL", "25"))  # gearman -w workers per worker host
JOBS_REAL = int(os.environ.get("JOBS_REAL", "2000"))
LOADGEN = HERE / "out" / "loadgen"


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, file=sys.stderr, flush=True)


def build_loadgen() -> None:
    LOADGEN.parent.mkdir(exist_ok=True)
    src = HERE / "loadgen.c"
    if not LOADGEN.exists() or src.stat().st_mtime > LOADGEN.stat().st_mtime:
        subprocess.run([os.environ.get("CC", "gcc"), "-O2", "-Wall", "-std=gnu11", "-o",
                        str(LOADGEN), str(src), "-lm"], check=True)


def result(line: str) -> dict[str, str]:
    m = re.search(r"^RESULT (.*)$", line, re.M)
    if not m:
        raise RuntimeError(f"no RESULT line in:\n{line}")
    return dict(kv.split("=", 1) for kv in m.group(1).split())


def admin(hosts: Hosts, line: str) -> bytes:
    s = hosts.connect("server", "127.0.0.1", PORT)
    s.sendall(line.encode() + b"\n")
    buf = b""
    while not buf.endswith(b"\n.\n"):
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
    s.close()
    return buf


def status(hosts: Hosts) -> dict:
    return json.loads(admin(hosts, "atomnode-status").split(b"\n")[0])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    build_loadgen()
    tmp = Path(tempfile.mkdtemp(prefix="an-multihost-"))
    names = [f"h{i}" for i in range(1, HOSTS + 1)]
    results: list[dict[str, str]] = []
    with Hosts(names, net=232) as hosts:
        cfg = tmp / "server.yml"
        cfg.write_text(f"listen: ['0.0.0.0:{PORT}']\nallow: ['10.232.0.0/16']\n"
                       f"database: {tmp / 'server.db'}\nlog_level: warning\n"
                       "http: {listen: none}\n")
        logf = open(tmp / "server.log", "ab")
        server = subprocess.Popen(
            hosts.exec_argv("server", [sys.executable, "-m", "atomnode", "run", "--config",
                                       str(cfg)]), stdout=logf, stderr=logf)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    hosts.connect("server", "127.0.0.1", PORT, timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            # ---------------------------------------------------------- 1. roundtrip
            log(f"roundtrip on loopback: {CLIENTS * HOSTS} clients, {WORKERS * HOSTS} "
                f"workers, {JOBS * HOSTS} jobs")
            out = subprocess.run(hosts.exec_argv("server", [
                str(LOADGEN), "roundtrip", "-H", "127.0.0.1", "-p", str(PORT),
                "-c", str(CLIENTS * HOSTS), "-k", str(WORKERS * HOSTS), "-n",
                str(JOBS * HOSTS), "-f", "loop", "--label", "loopback"]),
                capture_output=True, text=True, check=True).stdout
            loop = result(out)
            results.append(loop)
            log(f"roundtrip from {HOSTS} hosts at once")
            t0 = time.monotonic()
            cpu0 = cpu_seconds(server.pid)
            procs = [subprocess.Popen(hosts.exec_argv(n, [
                str(LOADGEN), "roundtrip", "-H", hosts.server_addr[n], "-p", str(PORT),
                "-c", str(CLIENTS), "-k", str(WORKERS), "-n", str(JOBS), "-f", f"fn_{n}",
                "--label", f"remote_{n}"]), stdout=subprocess.PIPE, text=True)
                for n in names]
            outs = [p.communicate()[0] for p in procs]
            wall = time.monotonic() - t0
            cpu = cpu_seconds(server.pid) - cpu0
            rows = [result(o) for o in outs]
            results.extend(rows)
            remote_rate = JOBS * HOSTS / wall
            # ----------------------------------------------------- 2. idle workers
            log(f"{HOSTS} x {IDLE} idle remote workers, background submits for {DURATION}s")
            procs = []
            for i, n in enumerate(names):
                argv = [str(LOADGEN), "grab-latency", "-H", hosts.server_addr[n], "-p",
                        str(PORT), "--idle-workers", str(IDLE), "--idle-interval", IDLE_INTERVAL,
                        "--duration", str(DURATION), "-f", f"gl_{n}", "-k", str(WORKERS),
                        "-c", "1", "--label", f"idle_{n}"]
                procs.append(subprocess.Popen(hosts.exec_argv(n, argv),
                                              stdout=subprocess.PIPE, text=True))
            gl = [result(p.communicate()[0]) for p in procs]
            results.extend(gl)
            # ------------------------------------------------------ 3. worker hosts
            log(f"{HOSTS} worker hosts running atomnode, {POOL} gearman -w workers each")
            wprocs = []
            for n in names:
                wcfg = tmp / f"{n}.yml"
                argv = ["gearman", "-w", "-h", hosts.server_addr[n], "-p", str(PORT), "-f",
                        "real", "--", "cat"]
                wcfg.write_text(
                    f"listen: []\ndatabase: {tmp / (n + '.db')}\n"
                    f"control_socket: {tmp / (n + '.sock')}\nlog_level: warning\n"
                    "http: {listen: none}\n"
                    f"pools:\n  - name: real\n    count: {POOL}\n"
                    f"    servers: ['{hosts.server_addr[n]}:{PORT}']\n"
                    f"    command: {json.dumps(argv)}\n")
                lf = open(tmp / f"{n}.log", "ab")
                wprocs.append(subprocess.Popen(hosts.exec_argv(n, [
                    sys.executable, "-m", "atomnode", "run", "--config", str(wcfg)],
                    own_pids=True), stdout=lf, stderr=lf))
            deadline = time.monotonic() + 60
            while True:
                fn = {f["name"]: f for f in status(hosts)["functions"]}
                if fn.get("real", {}).get("workers", 0) >= POOL * HOSTS:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"only {fn.get('real')} workers after 60s")
                time.sleep(0.2)
            done0 = status(hosts)["stats"]["completed"]
            cpu0 = cpu_seconds(server.pid)
            t0 = time.monotonic()
            subprocess.run(hosts.exec_argv("server", [
                str(LOADGEN), "submit-bg", "-H", "127.0.0.1", "-p", str(PORT), "-c", "2",
                "-n", str(JOBS_REAL), "-f", "real", "--label", "real_submit"]),
                capture_output=True, text=True, check=True)
            while status(hosts)["stats"]["completed"] - done0 < JOBS_REAL:
                if time.monotonic() - t0 > 600:
                    raise RuntimeError("real jobs did not complete in 600s")
                time.sleep(0.2)
            real_wall = time.monotonic() - t0
            real_cpu = cpu_seconds(server.pid) - cpu0
            st = status(hosts)
            aware = sum(1 for h in st["remote_hosts"] if h["aware"])
            for p in wprocs:
                pid = child_pid(p.pid)
                if pid:
                    os.kill(pid, 15)
            for p in wprocs:
                p.wait(120)
        finally:
            server.terminate()
            server.wait(60)
    for r in results:
        print("RESULT " + " ".join(f"{k}={v}" for k, v in r.items()))
    idle_total = HOSTS * IDLE
    gl_rate = sum(float(r["jobs_per_s"]) for r in gl)
    gl_p99 = max(int(r["grab_p99_us"]) for r in gl)
    idle_p99 = max(int(r["idle_p99_us"]) for r in gl)
    print()
    print(f"## atomnode across {HOSTS} hosts (network namespaces, veth)")
    print()
    print("| measurement | figure |")
    print("|---|---|")
    print(f"| roundtrip, loopback ({CLIENTS * HOSTS} clients, {WORKERS * HOSTS} workers) | "
          f"{float(loop['jobs_per_s']):,.0f} jobs/s |")
    print(f"| roundtrip, {HOSTS} hosts x ({CLIENTS} clients, {WORKERS} workers) | "
          f"{remote_rate:,.0f} jobs/s (server CPU {cpu / (JOBS * HOSTS) * 1e6:.0f} us/job) |")
    print(f"| background submits/s with {idle_total} idle + {HOSTS * WORKERS} busy remote "
          f"workers ({HOSTS} clients, one per host) | {gl_rate:,.0f} (GRAB p99 "
          f"{gl_p99 / 1000:.1f} ms, idle workers' GRAB p99 {idle_p99 / 1000:.1f} ms) |")
    print(f"| {HOSTS} worker hosts x {POOL} `gearman -w` (atomnode, job aware: {aware}) | "
          f"{JOBS_REAL / real_wall:,.0f} jobs/s, server CPU {real_cpu:.1f}s for "
          f"{JOBS_REAL} jobs |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
