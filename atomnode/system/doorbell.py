"""A doorbell between threads: an eventfd that one side rings and the other waits on.

Ringing is one ``write(2)``; the waiting side either blocks in one ``poll(2)``
(:meth:`Doorbell.wait`, the store's writer thread) or watches :meth:`Doorbell.fileno`
in an epoll set and calls :meth:`Doorbell.reset` when it is readable (the server's
hub). ``threading.Event`` takes a Python lock and a condition variable on both sides,
which costs a durable submit tens of microseconds on its way to the disk and back.

Rings before the wait are not lost (the counter stays readable), and many rings wake
once. The descriptor is closed only with the object, never before: a thread that still
holds the doorbell can never ring a closed number that has become another file.
"""

from __future__ import annotations

import os
import select


class Doorbell:
    def __init__(self) -> None:
        # A file object, so that the descriptor is closed with its last reference.
        self._file = open(  # noqa: SIM115 - closed with the object
            os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC), "rb", buffering=0)
        self._fd = self._file.fileno()
        self._poll: select.poll | None = None

    def fileno(self) -> int:
        return self._fd

    def ring(self) -> None:
        try:
            os.eventfd_write(self._fd, 1)
        except OSError:
            pass  # the counter is full: the other side will wake anyway

    def reset(self) -> None:
        """Take the rings so far (the descriptor is no longer readable)."""
        try:
            os.eventfd_read(self._fd)
        except OSError:
            pass  # not rung since the last reset

    def wait(self, timeout: float) -> None:
        """Until rung (then reset) or ``timeout`` seconds have passed."""
        if self._poll is None:
            self._poll = select.poll()
            self._poll.register(self._fd, select.POLLIN)
        if self._poll.poll(timeout * 1000):
            self.reset()
