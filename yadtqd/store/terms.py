"""The active servers' terms (DESIGN 13): one row per time a server became the active, kept in
the store and replicated like every other row, so any server can say which one is active and
how the last takeover went. Only the last :data:`KEEP` terms are kept (older ones are deleted,
which the changelog carries as tombstones).
"""

from __future__ import annotations

import sqlite3

#: Terms kept; older rows are deleted as new terms begin.
KEEP = 50


class Terms:
    """The ``terms`` table over ``self.db`` (mixed into :class:`yadtqd.store.Store`)."""

    db: sqlite3.Connection

    def begin_term(self, server: str, host: str, pid: int, now: float, took: float,
                   why_previous: str) -> int:
        """Record this server's takeover as a new term and return its number; a previous term
        not ended by its own server is ended now with ``why_previous``. Call inside a
        transaction."""
        self.db.execute("UPDATE terms SET ended_at = ?, ended = ? WHERE ended_at IS NULL",
                        (now, why_previous))
        term = int(self.db.execute("SELECT coalesce(max(term), 0) + 1 FROM terms").fetchone()[0])
        self.db.execute("INSERT INTO terms (term, server, host, pid, started_at, took)"
                        " VALUES (?, ?, ?, ?, ?, ?)", (term, server, host, pid, now, took))
        self.db.execute("DELETE FROM terms WHERE term <= ?", (term - KEEP,))
        return term

    def end_term(self, term: int, now: float, why: str) -> None:
        """This server's term ends (it steps down by itself); call inside a transaction."""
        self.db.execute("UPDATE terms SET ended_at = ?, ended = ? WHERE term = ? AND ended_at IS NULL",
                        (now, why, term))

    def last_terms(self, limit: int = 2) -> list[sqlite3.Row]:
        """The newest terms, newest first."""
        return list(self.db.execute("SELECT * FROM terms ORDER BY term DESC LIMIT ?", (limit,)))
