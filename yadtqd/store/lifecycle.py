"""The task lifecycle an operator drives (issue 14): cancel, retry, and retention (purges).

Each is a conditional statement, like the transitions: a cancel of a task nobody holds ends it at
once; one a worker holds is noted (``cancel_requested``) and ends when the worker confirms, or
when the worker is declared dead (never re-queued). Retention deletes terminal tasks and old
failure records in small batches, each its own short transaction (the caller's), oldest first by
their own index; deleted ids are remembered in ``purged`` for as long as the tasks were kept.
SQLite reuses the freed pages for new rows, so a database under steady retention stays the same
size (the file does not shrink; ``VACUUM`` offline does that).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from typing import Any

import msgspec

from yadtqd import messages as m

_follow_up = msgspec.json.Decoder(m.FollowUp)


#: The statuses a task never leaves.
TERMINAL = ("success", "failed", "cancelled")
HELD = ("assigned", "processing")


def _json(value: Any) -> str:
    return msgspec.json.encode(value).decode()


class Lifecycle:
    """Cancel, retry and purge over ``self.db`` (mixed into :class:`yadtqd.store.Store`)."""

    db: sqlite3.Connection

    # ------------------------------------------------------------ cancel

    def cancel(self, task_id: str, now: float, why: str) -> tuple[str, sqlite3.Row | None]:
        """Cancel a task; returns the outcome and, when a worker holds it, its row (to tell the
        worker). Outcomes: ``cancelled`` (it was scheduled or queued: ended now),
        ``cancelling`` (a worker holds it: noted, ends when the worker confirms), ``ended`` (it
        had ended: nothing changed), ``unknown``. Call inside a transaction."""
        row = self.db.execute("SELECT id, status, worker, epoch, attempt, grant_no, cancel_requested"
                              " FROM tasks WHERE id = ?", (task_id,)).fetchone()
        if row is None:
            return "unknown", None
        if row["status"] in TERMINAL:
            return "ended", None
        if row["status"] in ("scheduled", "queued"):
            self.db.execute(
                "UPDATE tasks SET status = 'cancelled', finished_at = ?, error = ?, worker = NULL,"
                " epoch = NULL WHERE id = ? AND status IN ('scheduled', 'queued')",
                (now, _json(m.ErrorInfo(type="Cancelled", message=why)), task_id))
            return "cancelled", None
        self.db.execute("UPDATE tasks SET cancel_requested = coalesce(cancel_requested, ?),"
                        " error = ? WHERE id = ?",
                        (now, _json(m.ErrorInfo(type="Cancelled", message=why)), task_id))
        return "cancelling", row

    def next_due(self) -> float | None:
        """When the next scheduled task is due (None: none is scheduled)."""
        row = self.db.execute("SELECT min(run_after) FROM tasks INDEXED BY tasks_scheduled"
                              " WHERE status = 'scheduled'").fetchone()
        return None if row[0] is None else float(row[0])

    def cancelling(self) -> list[sqlite3.Row]:
        """Held tasks whose cancel the worker has not confirmed (told again after a restart)."""
        return list(self.db.execute(
            "SELECT id, worker, epoch, attempt, grant_no FROM tasks WHERE status IN"
            " ('assigned', 'processing') AND cancel_requested IS NOT NULL"))

    # ------------------------------------------------------------ chains

    def queue_follow_up(self, parent: str, result: str, now: float,
                        only_if_succeeded: bool = False) -> str | None:
        """When ``parent`` (which just succeeded with ``result``, JSON text) names a follow-up,
        queue it, in the caller's transaction, under an id derived from the parent's (so a
        second call queues nothing); returns its id. ``only_if_succeeded``: a finish applied
        again: queue it (with the recorded result) only if the parent is ``success`` and the
        follow-up missing."""
        row = self.db.execute("SELECT then_task, priority, status, result, limit_key FROM tasks"
                              " WHERE id = ?", (parent,)).fetchone()
        if row is None or row["then_task"] is None:
            return None
        if only_if_succeeded:
            if row["status"] != "success" or self.db.execute(
                    "SELECT 1 FROM tasks WHERE id = ?", (m.follow_up_id(parent),)).fetchone():
                return None
            result = row["result"] or "null"
        follow = _follow_up.decode(row["then_task"])
        sub = m.Submission(task_id=m.follow_up_id(parent), task=follow.task,
                           args=[json.loads(result), *follow.args], kwargs=follow.kwargs,
                           options=follow.options, then=follow.then)
        self.db.execute(
            "INSERT OR IGNORE INTO tasks (id, name, payload, status, max_retries, retry_backoff,"
            " submitted_at, run_after, then_task, parent, priority, limit_key)"
            " VALUES (?, ?, ?, 'queued', ?, ?, ?, 0, ?, ?, ?, ?)",
            (sub.task_id, sub.task, sub.payload(), sub.options.max_retries, sub.options.retry_backoff,
             now, _json(sub.then) if sub.then is not None else None, parent, row["priority"],
             row["limit_key"]))
        return sub.task_id

    # ------------------------------------------------------------ schedules

    def schedule_ticks(self) -> dict[str, tuple[float, int]]:
        """Each schedule's last tick fired (or considered) and how many tasks it made."""
        return {r[0]: (r[1], r[2]) for r in self.db.execute(
            "SELECT name, last_tick, fired FROM schedules")}

    def forget_schedules(self, keep: list[str]) -> int:
        """Delete the rows of the schedules not named in ``keep``; returns how many."""
        return self.db.execute(f"DELETE FROM schedules WHERE name NOT IN ({','.join('?' * len(keep))})",
                               keep).rowcount

    def schedule_fired(self, name: str, last_tick: float, fired: int) -> None:
        """Note a schedule's newest tick considered and the tasks it made just now; call in the
        transaction that recorded those tasks."""
        self.db.execute(
            "INSERT INTO schedules (name, last_tick, fired) VALUES (?, ?, ?) ON CONFLICT (name)"
            " DO UPDATE SET last_tick = excluded.last_tick, fired = fired + excluded.fired",
            (name, last_tick, fired))

    # ------------------------------------------------------------ retry

    def retry_task(self, task_id: str, now: float, attempt: int | None = None) -> str:
        """A failed or cancelled task back to ``queued`` as a new attempt, its last run kept in
        ``history``; only while its attempt is still ``attempt``, if given (an order sent twice
        retries once); returns ``retried``, ``not_ended`` (still to run or running),
        ``succeeded``, ``stale`` (retried since) or ``unknown``. Call inside a transaction."""
        row = self.db.execute("SELECT * FROM tasks WHERE id = ?", (task_id,)).fetchone()
        if row is None:
            return "unknown"
        if attempt is not None and row["attempt"] != attempt:
            return "stale"
        if row["status"] not in ("failed", "cancelled"):
            return "succeeded" if row["status"] == "success" else "not_ended"
        history = json.loads(row["history"] or "[]")
        history.append({"attempt": row["attempt"], "status": row["status"], "worker": row["worker"],
                        "started_at": row["started_at"], "finished_at": row["finished_at"],
                        "error": json.loads(row["error"]) if row["error"] else None,
                        "retried_at": now})
        self.db.execute(
            "UPDATE tasks SET status = 'queued', worker = NULL, epoch = NULL, result = NULL,"
            " error = NULL, started_at = NULL, finished_at = NULL, assigned_at = NULL,"
            " failures = 0, lost = 0, cancel_requested = NULL, run_after = 0, history = ?"
            " WHERE id = ? AND status IN ('failed', 'cancelled')", (json.dumps(history), task_id))
        return "retried"

    # ------------------------------------------------------------ retention

    def purge_tasks(self, statuses: Sequence[str], before: float, now: float, limit: int = 500) -> int:
        """Delete at most ``limit`` tasks in these terminal statuses that ended before
        ``before``, oldest first, remembering their ids; returns how many. Call inside a
        transaction."""
        ids: list[str] = []
        for status in statuses:  # one (status, finished_at) index range each: nothing kept is read
            ids += [r[0] for r in self.db.execute(
                "DELETE FROM tasks WHERE id IN (SELECT id FROM tasks WHERE status = ? AND finished_at < ?"
                " ORDER BY finished_at LIMIT ?) RETURNING id", (status, before, limit - len(ids)))]
        self.db.executemany("INSERT OR REPLACE INTO purged (id, purged_at) VALUES (?, ?)",
                            [(i, now) for i in ids])
        return len(ids)

    def purge_failures(self, before: float, limit: int = 500) -> int:
        """Delete at most ``limit`` worker-failure records detected before ``before``."""
        return self.db.execute(
            "DELETE FROM failures WHERE seq IN (SELECT seq FROM failures WHERE detected_at < ?"
            " ORDER BY detected_at LIMIT ?)", (before, limit)).rowcount

    def forget_purged(self, before: float, limit: int = 500) -> int:
        """Forget at most ``limit`` purged ids noted before ``before``."""
        return self.db.execute(
            "DELETE FROM purged WHERE id IN (SELECT id FROM purged WHERE purged_at < ?"
            " ORDER BY purged_at LIMIT ?)", (before, limit)).rowcount

    def purged(self, ids: Sequence[str]) -> dict[str, float]:
        """When each of these ids was purged, for those that were (and are still remembered)."""
        out: dict[str, float] = {}
        for start in range(0, len(ids), 500):
            part = ids[start:start + 500]
            out.update({r[0]: r[1] for r in self.db.execute(
                f"SELECT id, purged_at FROM purged WHERE id IN ({','.join('?' * len(part))})", part)})
        return out

    def order_purge(self, before: float, statuses: Sequence[str], now: float) -> None:
        """Note an operator's purge, to be worked through in batches."""
        self.db.execute("INSERT INTO purge_orders (before, statuses, ordered) VALUES (?, ?, ?)",
                        (before, json.dumps(list(statuses) or list(TERMINAL)), now))

    def next_purge_order(self) -> sqlite3.Row | None:
        """The oldest purge not yet worked through."""
        row: sqlite3.Row | None = self.db.execute(
            "SELECT * FROM purge_orders ORDER BY seq LIMIT 1").fetchone()
        return row

    def purge_order_progress(self, seq: int, deleted: int, done: bool) -> None:
        """Count what a batch of an order deleted; forget the order once done."""
        if done:
            self.db.execute("DELETE FROM purge_orders WHERE seq = ?", (seq,))
        else:
            self.db.execute("UPDATE purge_orders SET deleted = deleted + ? WHERE seq = ?", (deleted, seq))

    def count_ended(self, statuses: Sequence[str], before: float) -> int:
        """How many tasks in these terminal statuses ended before ``before``."""
        marks = ",".join("?" * len(statuses))
        return int(self.db.execute(f"SELECT count(*) FROM tasks WHERE finished_at < ? AND status IN"
                                   f" ({marks})", (before, *statuses)).fetchone()[0])
