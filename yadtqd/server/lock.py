"""One server per database file: an exclusive lock held for the process's life."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from yadtqd.errors import ConfigError


def hold_database(database: str) -> int:
    """Hold an exclusive lock on ``<database>.lock`` for the process's life: a second server
    on the same database refuses at once, before it re-sends a single grant."""
    path = f"{Path(database).resolve()}.lock"  # one lock, however the path is spelled
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise ConfigError(f"[server] database {database} is in use by another server (pid"
                          f" {holder}): one server per database") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
