"""AtoM's own flow, emulated on raw sockets exactly as its vendored Net_Gearman behaves.

Web request (QubitJob::runJob): admin ``status`` parsed strictly, then SUBMIT_JOB_BG with a
JSON payload to ``<md5>-<JobClass>`` and a per-job unique, socket closed without reading
JOB_CREATED. Worker (``php symfony jobs:worker``): SET_CLIENT_ID, CAN_DO, then the
GRAB_JOB / NO_JOB / PRE_SLEEP / NOOP loop, each reply read with a 250 ms timeout; any late or
unexpected packet is fatal to it.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid

import pytest
from gearwire import (
    CAN_DO,
    GRAB_JOB,
    JOB_ASSIGN,
    NO_JOB,
    NOOP,
    PRE_SLEEP,
    SET_CLIENT_ID,
    SUBMIT_JOB_BG,
    WORK_COMPLETE,
    Conn,
    Packet,
    wait_status,
)

REPLY_TIMEOUT = 0.25  # Net_Gearman worker: blocking read with a 250 ms timeout


def site_function(job_class: str) -> str:
    """``md5(sf_root_dir . workers_key) . '-' . JobClass`` as AtoM names its functions."""
    prefix = hashlib.md5(f"/usr/share/nginx/atom{uuid.uuid4()}".encode()).hexdigest()
    return f"{prefix}-{job_class}"


def atom_status(host: str, port: int) -> dict[str, tuple[int, int, int]]:
    """Net_Gearman_Manager::status(): read lines until exactly '.', 4 TAB fields each."""
    with Conn(host, port, timeout=2) as c:
        c.send_raw(b"status\n")
        table = {}
        while True:
            line = c.read_until(b"\n").decode()
            assert not line.startswith("ERR"), line
            line = line.rstrip("\n")
            if line == ".":
                return table
            fields = line.split("\t")
            assert len(fields) == 4, f"status line not 4 TAB fields: {line!r}"
            table[fields[0]] = (int(fields[1]), int(fields[2]), int(fields[3]))


def atom_submit(host: str, port: int, func: str, job_id: int) -> None:
    """Check a worker exists (else AtoM fails the request), submit, close at once."""
    status = atom_status(host, port)
    assert func in status and status[func][2] > 0, "No Gearman worker available"
    payload = json.dumps(
        {"id": job_id, "name": func.split("-", 1)[1], "objectId": 42, "delete": False}
    ).encode()
    unique = f"{job_id}-{uuid.uuid4().hex}".encode()
    with Conn(host, port) as c:
        c.send(SUBMIT_JOB_BG, func.encode(), unique, payload)
    # closed without reading JOB_CREATED


class AtomWorker:
    """The Net_Gearman worker's side of the protocol, strict about timing and packet types."""

    def __init__(self, host: str, port: int, funcs: list[str]) -> None:
        self.conn = Conn(host, port)
        self.conn.send(SET_CLIENT_ID, f"pid_{os.getpid()}_{uuid.uuid4().hex[:13]}".encode())
        for f in funcs:
            self.conn.send(CAN_DO, f.encode())

    def reply(self, timeout: float = REPLY_TIMEOUT) -> Packet:
        try:
            p = self.conn.recv(timeout)
        except TimeoutError:
            raise AssertionError(f"reply later than {timeout * 1000:.0f} ms") from None
        assert p.type in (NOOP, NO_JOB, JOB_ASSIGN), f"fatal to Net_Gearman: {p.name}"
        return p

    def grab(self) -> Packet:
        self.conn.send(GRAB_JOB)
        p = self.reply()
        assert p.type in (NO_JOB, JOB_ASSIGN), f"GRAB_JOB answered with {p.name}"
        return p

    def sleep_until_noop(self, timeout: float) -> None:
        self.conn.send(PRE_SLEEP)
        assert self.reply(timeout).type == NOOP

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def atom_worker(server):
    workers: list[AtomWorker] = []

    def start(funcs: list[str]) -> AtomWorker:
        w = AtomWorker(server.host, server.port, funcs)
        workers.append(w)
        return w

    yield start
    for w in workers:
        w.close()


def test_atom_web_submit_reaches_sleeping_worker(server, atom_worker) -> None:
    func = site_function("arFindingAidJob")
    other = site_function("arObjectMoveJob")
    w = atom_worker([func, other])
    assert w.grab().type == NO_JOB  # also proves CAN_DO was processed before status below
    wait_status(server.host, server.port, func, lambda r: r[2] >= 1)
    atom_submit(server.host, server.port, func, 123)
    w.sleep_until_noop(timeout=5)  # NOOP comes when work arrives
    job = w.grab()
    assert job.type == JOB_ASSIGN
    handle, fname, payload = job.args
    assert fname == func.encode()
    assert json.loads(payload)["id"] == 123
    assert json.loads(payload)["name"] == "arFindingAidJob"
    w.conn.send(WORK_COMPLETE, handle, json.dumps({"result": "ok"}).encode())
    assert w.grab().type == NO_JOB
    wait_status(server.host, server.port, func, lambda r: r[0] == 0)


def test_atom_jobs_queued_while_worker_busy_and_loop_stays_fast(server, atom_worker) -> None:
    """Several closing submissions in a row; the worker's loop never waits past 250 ms."""
    func = site_function("arObjectMoveJob")
    w = atom_worker([func])
    assert w.grab().type == NO_JOB
    wait_status(server.host, server.port, func, lambda r: r[2] >= 1)
    for job_id in (1, 2, 3):
        atom_submit(server.host, server.port, func, job_id)
    w.sleep_until_noop(timeout=5)
    ids = []
    while len(ids) < 3:
        p = w.grab()
        if p.type == NO_JOB:  # submissions still in flight: sleep again, as AtoM does
            w.sleep_until_noop(timeout=5)
            continue
        ids.append(json.loads(p.args[2])["id"])
        w.conn.send(WORK_COMPLETE, p.args[0], b'{"ok":true}')
    # separate connections: the server may read them in any order
    assert sorted(ids) == [1, 2, 3]
    assert w.grab().type == NO_JOB


def test_atom_status_refuses_function_without_workers(server) -> None:
    """With no worker, AtoM's check fails (the 'No Gearman worker available' error)."""
    func = site_function("arFileImportJob")
    status = atom_status(server.host, server.port)
    assert func not in status or status[func][2] == 0
