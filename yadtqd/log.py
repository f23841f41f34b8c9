"""Logging setup for the daemon: journald with fields, or timestamped lines, and an optional file.

Log calls name what they concern with ``extra``: ``task_id``, ``worker_id`` and ``event``
(``task_received``, ``worker_joined`` ...). Under journald (``JOURNAL_STREAM`` set) records go
through journald's native protocol with ``PRIORITY`` and the fields ``TASK_ID``, ``WORKER_ID``,
``ROLE`` and ``EVENT``, so ``journalctl TASK_ID=<id>`` shows one task's trail across the server
and its workers and ``journalctl -p warning`` filters by priority. If the journal socket cannot
be written, the line goes to stderr with its ``<N>`` priority prefix instead. Off journald,
stderr gets readable timestamped lines; ``[logging] file`` adds a plain file that logrotate
can rotate (it is reopened when moved).
"""

from __future__ import annotations

import datetime as dt
import logging
import logging.handlers
import os
import re
import socket
import struct
import sys
import time
from collections.abc import Callable

from yadtqd.errors import ConfigError

PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
            logging.CRITICAL: 2}
FIELDS = {"task_id": "TASK_ID", "worker_id": "WORKER_ID", "event": "EVENT"}
JOURNAL_SOCKET = "/run/systemd/journal/socket"
MAX_FIELD = 64 * 1024
#: The logger librdkafka's own lines go to (set on every client by :mod:`yadtqd.transport`).
LIBRDKAFKA = "yadtqd.kafka.librdkafka"
#: Seconds a repeated librdkafka warning or error is held back after it was let through.
REPEAT_WINDOW = 60.0
#: What differs between lines alike: their numbers (ports, milliseconds, counts).
_NUMBERS = re.compile(r"\d+")


class _Defaults(logging.Filter):
    """Gives every record the process's role (and worker id) unless the call named its own."""

    def __init__(self, role: str, worker_id: str) -> None:
        super().__init__()
        self.role = role
        self.worker_id = worker_id

    def filter(self, record: logging.LogRecord) -> bool:
        record.role = self.role
        if self.worker_id and not getattr(record, "worker_id", None):
            record.worker_id = self.worker_id
        return True


class Repeats(logging.Filter):
    """librdkafka logs a failure again at every reconnect attempt: a one-minute broker outage
    wrote 2,500 lines at ERROR to the server's log, 1,242 of them from one client (the
    :class:`~yadtqd.transport.ConnectionMonitor` already says once that the connection was lost,
    and that it is back). Of the lines at warning and above that are alike (the same client,
    facility and text but for its numbers), one is let through a :data:`REPEAT_WINDOW`; the
    next one let through says how many were held back meanwhile. Debug lines all pass."""

    MOST_KEPT = 1000

    def __init__(self, window: float = REPEAT_WINDOW,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.window = window
        self.clock = clock
        #: alike key -> (when one was last let through, how many held back since)
        self._seen: dict[tuple[str, ...], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.levelname, *(_NUMBERS.sub("#", str(a)) for a in (record.args or ())))
        now = self.clock()
        passed, held = self._seen.get(key, (float("-inf"), 0))
        if now - passed < self.window:
            self._seen[key] = (passed, held + 1)
            return False
        if len(self._seen) >= self.MOST_KEPT:
            self._seen.clear()
        self._seen[key] = (now, 0)
        if held:
            record.msg = f"{record.msg} ({held} like it held back in {self.window:g} s)"
        return True


class _LineFormatter(logging.Formatter):
    """``2026-11-27T21:00:00.000+00:00 INFO yadtqd.server: message [task_id=... event=...]``:
    timestamps in UTC with their offset, so lines from hosts in other zones sort together."""

    def __init__(self, priority_prefix: bool) -> None:
        fmt = "%(message)s" if priority_prefix else "%(asctime)s %(levelname)s %(name)s: %(message)s"
        super().__init__(fmt)
        self.priority_prefix = priority_prefix
        #: The whole second last formatted, and its text up to the seconds.
        self._second = -1
        self._second_text = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        # the date and time up to the second once a second: per-task lines come by thousands
        second = int(record.created)
        if second != self._second:
            when = dt.datetime.fromtimestamp(second, dt.timezone.utc)
            self._second, self._second_text = second, when.strftime("%Y-%m-%dT%H:%M:%S")
        return f"{self._second_text}.{int(record.msecs):03d}+00:00"

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info or record.exc_text or record.stack_info:
            text = super().format(record)
        else:  # what the format above gives, without the general machinery (issue 15)
            record.message = record.getMessage()
            text = record.message if self.priority_prefix else (
                f"{self.formatTime(record)} {record.levelname} {record.name}: {record.message}")
        fields = [f"{f}={value}" for f in FIELDS if (value := getattr(record, f, None))]
        if fields:
            text = f"{text} [{' '.join(fields)}]"
        if self.priority_prefix:
            return f"<{PRIORITY.get(record.levelno, 6)}>{text}"
        return text


class JournalHandler(logging.Handler):
    """Sends records to journald over its native datagram protocol, fields included."""

    def __init__(self, identifier: str = "yadtqd", path: str = JOURNAL_SOCKET) -> None:
        super().__init__()
        self.identifier = identifier
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.fallback = logging.StreamHandler(sys.stderr)
        self.fallback.setFormatter(_LineFormatter(priority_prefix=True))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.sock.sendto(encode_entry(self.fields(record)), self.path)
        except OSError:
            self.fallback.handle(record)

    def fields(self, record: logging.LogRecord) -> dict[str, str]:
        """The journal entry of one record."""
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + logging.Formatter().formatException(record.exc_info)
        fields = {"MESSAGE": message, "PRIORITY": str(PRIORITY.get(record.levelno, 6)),
                  "SYSLOG_IDENTIFIER": self.identifier, "LOGGER": record.name,
                  "ROLE": str(getattr(record, "role", ""))}
        for attr, name in FIELDS.items():
            value = getattr(record, attr, None)
            if value:
                fields[name] = str(value)
        return fields

    def close(self) -> None:
        self.sock.close()
        super().close()


def encode_entry(fields: dict[str, str]) -> bytes:
    """journald's native format: ``KEY=value`` lines; values with newlines length-prefixed."""
    out = bytearray()
    for key, value in fields.items():
        data = value.encode("utf-8", "replace")[:MAX_FIELD]
        if b"\n" in data:
            out += key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


def setup(level: str, file: str, role: str, worker_id: str = "") -> None:
    """Configure the root logger once, at daemon start."""
    # Per-task lines are logged at thousands a second: skip what no handler here uses, as the
    # logging HOWTO's "Optimization" section describes. Looking up the caller's file and line
    # alone was 37 % of the cost of a record.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    root.handlers.clear()
    root.filters.clear()
    root.setLevel(level.upper())
    defaults = _Defaults(role, worker_id)
    handler: logging.Handler
    if os.environ.get("JOURNAL_STREAM"):
        handler = JournalHandler()
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_LineFormatter(priority_prefix=False))
    handler.addFilter(defaults)
    root.addHandler(handler)
    librdkafka = logging.getLogger(LIBRDKAFKA)
    librdkafka.filters.clear()
    librdkafka.addFilter(Repeats())
    if file:
        try:
            plain = logging.handlers.WatchedFileHandler(file)
        except OSError as exc:
            raise ConfigError(f"[logging] file {file}: cannot be opened: {exc.strerror} (under"
                              " systemd the unit may write only /var/log/yadtq: LogsDirectory=)") from None
        plain.setFormatter(_LineFormatter(priority_prefix=False))
        plain.addFilter(defaults)
        root.addHandler(plain)
