"""systemd integration: sd_notify, the watchdog heartbeat, socket activation.

sd_notify messages (newline-separated ``KEY=value`` in one datagram to the AF_UNIX socket
named by ``$NOTIFY_SOCKET``; a leading ``@`` means the abstract namespace) travel through
the ``sdnotify`` package's :class:`~sdnotify.SystemdNotifier`. What to say and when (READY,
STATUS, RELOADING, the watchdog's health-gated pings) and socket activation are ours.
Without ``$NOTIFY_SOCKET`` every call is a no-op, so the daemon calls these unconditionally.

How the daemon uses it::

    notifier = Notifier()
    ...recover queue, bind listener, start pools...
    notifier.ready()
    if (wd := watchdog_interval()) is not None:
        nursery.start_soon(watchdog_task, notifier, wd / 3, healthy)
    nursery.start_soon(status_task, notifier, cfg.status_interval, status_line)
    ...on SIGHUP: notifier.reloading(); reload; notifier.ready()
    ...on SIGTERM: notifier.stopping()
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable

import sdnotify
import trio

log = logging.getLogger("atomnode.systemd")  # stable name: operators see it in the journal

#: First file descriptor passed by socket activation (SD_LISTEN_FDS_START).
LISTEN_FDS_START = 3

#: A health check: ``True``/``False``, or ``(ok, reason)`` where ``reason`` says why not.
Health = bool | tuple[bool, str]


class Notifier:
    """Sends sd_notify messages. Never raises: a failed send is logged once."""

    def __init__(self) -> None:
        """Talks to ``$NOTIFY_SOCKET``; unset or empty disables notifying."""
        self._address = os.environ.get("NOTIFY_SOCKET") or None
        self._transport: sdnotify.SystemdNotifier | None = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        """Whether there is a NOTIFY_SOCKET to talk to."""
        return self._address is not None

    def notify(self, **fields: object) -> bool:
        """Send ``KEY=value`` fields (keys are upper-cased) in one datagram.

        Returns True if sent, False if disabled or the send failed.
        """
        if self._address is None or not fields:
            return False
        payload = "".join(f"{k.upper()}={v}\n" for k, v in fields.items()).encode()
        try:
            if self._transport is None:
                # debug=True: sdnotify raises instead of swallowing errors, so they are
                # seen (and logged once) here; it connects to $NOTIFY_SOCKET at creation.
                self._transport = sdnotify.SystemdNotifier(debug=True)
            # sdnotify encodes the text as Latin-1: handing it our UTF-8 bytes decoded as
            # Latin-1 puts exactly those bytes on the wire (STATUS may hold any name).
            self._transport.notify(payload.decode("latin-1"))
            return True
        except Exception as e:  # OSError, or whatever the transport raises: never raise
            self.close()
            if not self._warned:
                self._warned = True
                log.warning("cannot notify systemd at %s: %s (further errors not logged)",
                            self._address, e)
            return False

    def ready(self, status: str | None = None) -> bool:
        """READY=1: the service is up (queue recovered, port served, pools started)."""
        return self.notify(READY=1, **({"STATUS": status} if status else {}))

    def status(self, text: str) -> bool:
        """STATUS=text, shown by ``systemctl status``."""
        return self.notify(STATUS=text.replace("\n", " "))

    def watchdog(self) -> bool:
        """WATCHDOG=1: a heartbeat."""
        return self.notify(WATCHDOG=1)

    def stopping(self) -> bool:
        """STOPPING=1: shutdown has begun."""
        return self.notify(STOPPING=1)

    def reloading(self) -> bool:
        """RELOADING=1 with MONOTONIC_USEC (as Type=notify-reload requires); send
        :meth:`ready` when the reload is done."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify(RELOADING=1, MONOTONIC_USEC=usec)

    def close(self) -> None:
        """Close the socket (the notifier stays usable: it reconnects on the next send)."""
        transport, self._transport = self._transport, None
        if transport is not None and transport.socket is not None:
            transport.socket.close()


def watchdog_interval() -> float | None:
    """The watchdog timeout systemd set (``WatchdogSec=``), in seconds, or None.

    Read from ``$WATCHDOG_USEC``; if ``$WATCHDOG_PID`` is set it must be our pid. Ping at
    a third of it: ``watchdog_task(notifier, watchdog_interval() / 3, healthy)``.
    """
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not a number", usec)
        return None
    if value <= 0:
        return None
    return value / 1_000_000


def _normalize(result: Health) -> tuple[bool, str]:
    if isinstance(result, tuple):
        ok, reason = result
        return bool(ok), str(reason or "")
    return bool(result), ""


async def watchdog_task(notifier: Notifier, interval: float, healthy: Callable[[], Health]) -> None:
    """Forever: sleep ``interval`` seconds, then send WATCHDOG=1 if ``healthy()`` says so.

    ``healthy()`` returns a bool, or ``(ok, reason)``: the reason is logged (once per
    episode) when pings are withheld. That the trio loop is responsive is implied: if it is
    blocked this task cannot run, so the pings stop and systemd restarts the daemon.
    """
    withheld: str | None = None
    while True:
        await trio.sleep(interval)
        try:
            ok, reason = _normalize(healthy())
        except Exception as e:  # a broken check must not kill the daemon, but withholds
            ok, reason = False, f"health check raised {e!r}"
        if ok:
            if withheld is not None:
                log.warning("healthy again: watchdog pings resumed")
                withheld = None
            notifier.watchdog()
        elif withheld != reason:
            withheld = reason
            log.error(
                "withholding watchdog pings: %s; systemd will restart atomnode if this lasts",
                reason or "unhealthy",
            )


async def status_task(notifier: Notifier, interval: float, text: Callable[[], str]) -> None:
    """Forever: send ``STATUS=text()`` now and then every ``interval`` seconds."""
    while True:
        try:
            line = text()
        except Exception as e:
            line = f"status unavailable: {e!r}"
        notifier.status(line)
        await trio.sleep(interval)


def listen_fds(unset_environment: bool = True) -> list[socket.socket]:
    """Sockets passed by systemd socket activation (``LISTEN_FDS``), or [].

    Only taken if ``LISTEN_PID`` is our pid. The fds (3, 4, ...) become close-on-exec so
    worker processes do not inherit them; the ``LISTEN_*`` variables are removed so children
    do not see them either.
    """
    pid = os.environ.get("LISTEN_PID")
    count = os.environ.get("LISTEN_FDS")
    if unset_environment:
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(name, None)
    if not pid or not count:
        return []
    try:
        if int(pid) != os.getpid():
            return []
        n = int(count)
    except ValueError:
        log.warning("ignoring LISTEN_FDS=%r LISTEN_PID=%r: not numbers", count, pid)
        return []
    out: list[socket.socket] = []
    for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + n):
        os.set_inheritable(fd, False)
        out.append(socket.socket(fileno=fd))
    return out
