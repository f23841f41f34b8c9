"""Logging setup for the daemon: journald-aware lines on stderr and an optional plain file.

Log calls name what they concern with ``extra``: ``task_id``, ``worker_id`` and ``event``
(``task_received``, ``worker_joined`` ...). Under journald (``JOURNAL_STREAM`` set) each stderr
line starts with its syslog priority (``<3>`` for errors) so ``journalctl -p`` filters work.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys

PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
            logging.CRITICAL: 2}
FIELDS = ("task_id", "worker_id", "event")


class _Formatter(logging.Formatter):
    def __init__(self, journal: bool, role: str) -> None:
        fmt = "%(message)s" if journal else "%(asctime)s %(levelname)s %(name)s: %(message)s"
        super().__init__(fmt)
        self.journal = journal
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = " ".join(f"{f}={getattr(record, f)}" for f in FIELDS if getattr(record, f, None))
        if fields:
            text = f"{text} [{fields}]"
        if self.journal:
            return f"<{PRIORITY.get(record.levelno, 6)}>{text}"
        return text


def setup(level: str, file: str, role: str) -> None:
    """Configure the root logger once, at daemon start."""
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(level.upper())
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(_Formatter(bool(os.environ.get("JOURNAL_STREAM")), role))
    root.addHandler(stream)
    if file:
        handler = logging.handlers.WatchedFileHandler(file)
        handler.setFormatter(_Formatter(False, role))
        root.addHandler(handler)

