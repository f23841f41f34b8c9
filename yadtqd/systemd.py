"""Every contact with systemd: sd_notify messages through sdnotify, guarded against its faults.

``sdnotify.SystemdNotifier(debug=True)`` raises when ``NOTIFY_SOCKET`` is unset, and with
``debug=False`` it swallows every error; so a :class:`Notifier` is a no-op without
``NOTIFY_SOCKET`` and logs (once) a failure to send, never raising into the daemon.
"""

from __future__ import annotations

import logging
import os

import sdnotify

log = logging.getLogger("yadtqd.systemd")


class Notifier:
    """Sends ``READY=1``, ``STATUS=``, ``WATCHDOG=1``, ``RELOADING=1`` and ``STOPPING=1``."""

    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._notifier = sdnotify.SystemdNotifier(debug=True) if self.enabled else None
        self._failed = False

    def watchdog_interval(self) -> float | None:
        """Seconds between ``WATCHDOG=1`` pings (half of ``WATCHDOG_USEC``), or None."""
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if not usec or (pid and pid != str(os.getpid())):
            return None
        try:
            return int(usec) / 2_000_000
        except ValueError:
            return None

    def ready(self, status: str) -> None:
        """The daemon serves."""
        self._send(f"READY=1\nSTATUS={status}")

    def status(self, status: str) -> None:
        """A one-line status for ``systemctl status``."""
        self._send(f"STATUS={status}")

    def watchdog(self) -> None:
        """The main loop made progress."""
        self._send("WATCHDOG=1")

    def reloading(self) -> None:
        """A reload began; :meth:`ready` ends it."""
        self._send("RELOADING=1")

    def stopping(self) -> None:
        """A graceful stop began."""
        self._send("STOPPING=1")

    def _send(self, message: str) -> None:
        if self._notifier is None:
            return
        try:
            self._notifier.notify(message)
        except OSError as exc:
            if not self._failed:
                log.error("cannot notify systemd: %s", exc)
            self._failed = True
