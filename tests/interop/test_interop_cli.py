"""The gearman command-line tool (libgearman) as client and worker."""

from __future__ import annotations

from gearwire import Conn, wait_status
from peerproc import Peer


def cli(server, *args: str) -> list[str]:
    return ["gearman", "-h", server.host, "-p", str(server.port), *args]


def test_foreground_job_with_cli_worker(server, func, peers) -> None:
    """`gearman -w` (GRAB_JOB_ALL) runs a command per job; `gearman` waits for its output."""
    worker: Peer = peers(cli(server, "-w", "-c", "1", "-f", func, "--", "tr", "a-z", "A-Z"))
    wait_status(server.host, server.port, func, lambda r: r[2] >= 1)
    out, _ = peers(cli(server, "-f", func, "--", "hello world")).communicate()
    assert out == b"HELLO WORLD"
    worker.communicate()  # -c 1: exits after one job
    assert worker.proc.returncode == 0


def test_background_job_then_worker(server, func, peers) -> None:
    """A background job submitted with no worker waits in the queue, then runs."""
    out, _ = peers(cli(server, "-b", "-f", func, "--", "queued data")).communicate()
    assert out == b"" and worker_free(server, func)
    wait_status(server.host, server.port, func, lambda r: r == (1, 0, 0))
    worker = peers(cli(server, "-w", "-c", "1", "-f", func, "--", "cat"))
    worker.communicate()
    assert worker.proc.returncode == 0
    wait_status(server.host, server.port, func, lambda r: r[0] == 0)


def worker_free(server, func: str) -> bool:
    """True when nobody is registered for ``func`` (sanity check of the test setup)."""
    with Conn(server.host, server.port) as c:
        return func.encode() not in c.admin_list("workers")


def test_stdin_payload_and_priorities(server, func, peers) -> None:
    """Payload read from stdin (with a NUL byte), high and low priority foreground jobs."""
    worker = peers(cli(server, "-w", "-c", "2", "-f", func, "--", "od", "-An", "-tx1"))
    wait_status(server.host, server.port, func, lambda r: r[2] >= 1)
    out, _ = peers(cli(server, "-I", "-f", func), stdin=b"a\0b").communicate()
    assert out.split() == [b"61", b"00", b"62"]
    out, _ = peers(cli(server, "-L", "-f", func), stdin=b"\0").communicate()
    assert out.split() == [b"00"]
    worker.communicate()
