"""Workers die with their daemon, even after a kill -9 and outside systemd.

Under systemd the unit's cgroup takes every process of the service down with it. Outside
it, a worker pool survives a ``kill -9`` of the daemon, and so does everything the
workers started (``php`` under ``sh -c``): a parent-death signal reaches only the direct
child, and setuid to the pool's user clears it. So:

* every process atomnode starts carries ``ATOMNODE_OWNER=<instance>.<run>`` in its
  environment, which its own children inherit: ``instance`` names this daemon (a hash of
  its database path: a second daemon on another database is another instance), ``run``
  this run of it;
* the **keeper**, a small shell process started in its own session, waits on a pipe
  the daemon holds open. When the daemon is gone, however it went, the pipe closes and
  the keeper kills every process carrying this run's token, then exits;
* at start-up, before its pools start, the daemon kills the processes carrying its
  instance's token from an earlier run (:func:`kill_strays`): if the keeper was killed
  too, a restart still finds no strays of its own. Other instances' processes are never
  touched.

A process that clears its environment (``env -i``) escapes the token; the supervisor
still kills the worker's process group when the worker itself exits.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import subprocess

from . import procinfo

log = logging.getLogger("atomnode.supervisor")

OWNER_ENV = "ATOMNODE_OWNER"

#: The keeper: ignores the signals a terminal or an init script sends to everybody, waits
#: for EOF on stdin (the daemon's end of the pipe closed), then kills every process whose
#: environment holds ATOMNODE_OWNER=$1, scanning again until none is left (a process may
#: fork while it is being killed).
_KEEPER_SCRIPT = r"""
trap '' INT TERM HUP QUIT
cat >/dev/null
n=0
while [ $n -lt 20 ]; do
  found=
  for e in $(grep -lzxF "ATOMNODE_OWNER=$1" /proc/[0-9]*/environ 2>/dev/null); do
    p=${e#/proc/}
    kill -9 "${p%/environ}" 2>/dev/null && found=1
  done
  [ -z "$found" ] && exit 0
  n=$((n + 1))
done
"""


def instance_id(database: str) -> str:
    """This daemon's identity across restarts: a hash of its database's real path."""
    path = os.path.realpath(database)
    return hashlib.sha256(path.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def new_token(database: str) -> str:
    """``<instance>.<run>``: the value of ATOMNODE_OWNER for this run."""
    return f"{instance_id(database)}.{os.urandom(6).hex()}"


def owned_processes(prefix: str) -> dict[int, str]:
    """pid -> ATOMNODE_OWNER value, for every readable process whose value starts with
    ``prefix``."""
    want = f"{OWNER_ENV}={prefix}".encode()
    me = os.getpid()
    out: dict[int, str] = {}
    for pid, env in procinfo.each_process("environ"):
        if pid == me:
            continue
        for item in env.split(b"\0"):
            if item.startswith(want):
                out[pid] = item.split(b"=", 1)[1].decode("ascii", "replace")
                break
    return out


def kill_strays(token: str) -> list[int]:
    """Kill this instance's processes left by an earlier run (not this run's); returns
    their pids. Never raises."""
    instance, _, _run = token.partition(".")
    killed: list[int] = []
    try:
        for _ in range(20):
            strays = [p for p, v in owned_processes(instance + ".").items() if v != token]
            if not strays:
                break
            for pid in strays:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                except OSError:
                    pass
    except OSError as e:  # /proc unreadable: nothing we can do, say so
        log.warning("cannot look for stray workers of an earlier run: %s", e)
    if killed:
        log.warning("killed %d stray process(es) left by an earlier run of this daemon "
                    "(its workers and what they started): pids %s", len(set(killed)),
                    " ".join(str(p) for p in sorted(set(killed))))
    return sorted(set(killed))


class Keeper:
    """The keeper process of this run (see the module docstring). ``close()`` at a clean
    exit, after the workers were stopped; a kill -9 closes the pipe just the same."""

    def __init__(self, token: str):
        self.token = token
        r, self._w = os.pipe()  # both non-inheritable: children never hold the write end
        try:
            self.proc = subprocess.Popen(
                ["/bin/sh", "-c", _KEEPER_SCRIPT, "atomnode-keeper", token],
                stdin=r, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                close_fds=True, start_new_session=True,
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"},
            )
        finally:
            os.close(r)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def close(self) -> None:
        """Release the keeper: it sweeps once (finding nothing after a clean stop) and
        exits. Never raises."""
        if self._w >= 0:
            try:
                os.close(self._w)
            except OSError:
                pass
            self._w = -1
        # Not waited for: its sweep takes a moment and finds nothing after a clean stop.
