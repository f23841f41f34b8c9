"""The database file: opening it (WAL) and its versioned schema (``PRAGMA user_version``).

The schema scripts live in ``yadtqd/schema/``, one numbered script per version, applied in
order: a server migrates an older database forward at start, in one transaction, and refuses
one newer than itself.
"""

from __future__ import annotations

import importlib.resources
import sqlite3
from pathlib import Path

from yadtqd.errors import ConfigError


def migrations() -> list[str]:
    """The schema scripts, in order: script *i* takes a database from version *i* to *i + 1*."""
    folder = importlib.resources.files("yadtqd") / "schema"
    names = sorted(p.name for p in folder.iterdir() if p.name.endswith(".sql"))
    return [(folder / name).read_text() for name in names]


def schema_version() -> int:
    """The schema version this code writes and reads."""
    return len(migrations())


def migrate(db: sqlite3.Connection, path: str) -> int:
    """Bring the database to this code's schema version in one transaction; return the version
    it had. A database newer than the code is refused (:class:`ConfigError`, exit 78)."""
    scripts = migrations()
    found = int(db.execute("PRAGMA user_version").fetchone()[0])
    if found > len(scripts):
        raise ConfigError(f"{path}: the database has schema version {found}, newer than this"
                          f" yadtqd's ({len(scripts)}): run a newer yadtqd, or restore an older"
                          " database")
    if found < len(scripts):
        body = "\n".join(scripts[found:])
        try:
            db.executescript(f"BEGIN IMMEDIATE;\n{body}\nPRAGMA user_version = {len(scripts)};\nCOMMIT;")
        except sqlite3.Error:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
    return found


def connect(path: str | Path, readonly: bool = False) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), WAL, with a busy timeout."""
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None,
                               check_same_thread=False, timeout=30)
    else:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")  # the changelog is the truth (DESIGN 13)
    conn.row_factory = sqlite3.Row
    return conn
