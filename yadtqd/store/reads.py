"""The store's read-only queries: what the socket's operations and the monitor show."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence


class Reads:
    """Queries over ``self.db`` that change nothing (mixed into :class:`yadtqd.store.Store`)."""

    db: sqlite3.Connection

    def task_rows(self, ids: Sequence[str]) -> dict[str, sqlite3.Row]:
        """The rows of these tasks; an id never seen is absent."""
        out: dict[str, sqlite3.Row] = {}
        for chunk in range(0, len(ids), 500):
            part = ids[chunk:chunk + 500]
            rows = self.db.execute(
                f"SELECT * FROM tasks WHERE id IN ({','.join('?' * len(part))})", part)
            out.update({r["id"]: r for r in rows})
        return out

    def list_tasks(self, statuses: Sequence[str], limit: int, oldest_first: bool = False) -> list[sqlite3.Row]:
        """Tasks in these statuses (all when empty), newest first (or oldest first: the
        monitor's "next to run")."""
        order = "ASC" if oldest_first else "DESC"
        if statuses:
            marks = ",".join("?" * len(statuses))
            return list(self.db.execute(
                f"SELECT * FROM tasks WHERE status IN ({marks}) ORDER BY seq {order} LIMIT ?",
                (*statuses, limit)))
        return list(self.db.execute(f"SELECT * FROM tasks ORDER BY seq {order} LIMIT ?", (limit,)))

    def holding(self) -> dict[str, dict[str, int]]:
        """For each epoch holding grants: how many are ``assigned`` and ``processing``."""
        out: dict[str, dict[str, int]] = {}
        for r in self.db.execute(
                "SELECT epoch, status, count(*) AS n FROM tasks"
                " WHERE status IN ('assigned', 'processing') GROUP BY epoch, status"):
            out.setdefault(r["epoch"], {})[r["status"]] = r["n"]
        return out

    def all_workers(self, limit: int = 1000) -> list[sqlite3.Row]:
        """Live epochs first, then the most recent others."""
        return list(self.db.execute(
            "SELECT * FROM workers ORDER BY state NOT IN ('live', 'leaving'), joined_at DESC"
            " LIMIT ?", (limit,)))

    def failure_rows(self, limit: int = 1000) -> list[sqlite3.Row]:
        """Worker failures, newest first."""
        return list(self.db.execute("SELECT * FROM failures ORDER BY seq DESC LIMIT ?", (limit,)))

    def failure_count(self) -> int:
        """How many worker failures are recorded."""
        return int(self.db.execute("SELECT count(*) FROM failures").fetchone()[0])

    def counts(self) -> dict[str, int]:
        """How many tasks are in each status (statuses with none are left out)."""
        rows = self.db.execute("SELECT status, n FROM status_counts WHERE n > 0")
        return {r["status"]: r["n"] for r in rows}

    def running_count(self, name: str, limit_key: str | None) -> int:
        """How many tasks of ``name`` (submitted with ``limit_key``) are granted and unfinished."""
        return int(self.db.execute(
            "SELECT count(*) FROM tasks WHERE status IN ('assigned', 'processing') AND name = ?"
            " AND limit_key IS ?", (name, limit_key)).fetchone()[0])

    def counter_values(self) -> dict[str, int]:
        """Every named counter."""
        return {r["name"]: r["value"] for r in self.db.execute("SELECT name, value FROM counters")}
