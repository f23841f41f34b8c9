"""Transitions of many tasks a statement: the server's loop records a run of submissions,
grants a plan's tasks and ends a run of successes each in conditional statements over a
``VALUES`` list of up to 512 rows, in the sizes :mod:`~yadtqd.store.chunks` gives (issue 15: 20
to 24 µs a row one statement at a time, 10 to 13 many to one).

Each row keeps the condition of its one-row transition (:class:`~yadtqd.store.Store`'s
``intake`` and ``grant`` are these given one row; its ``finish``, for every status), so a batch
changes exactly the rows those would, one after the other, and invariants 1, 2 and 3 hold as
they do row by row. What a row's condition
refused is handed back, and the caller treats it as the one-row transition's refusal: a
duplicate or conflicting submission, a grant not made, a stale ``finished``. (The rows noted
for the changelog are the same; a success's follow-up is noted after the run's updates rather
than after its own, which changes no record: the changelog reads each noted row as it is.)
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from yadtqd import messages as m
from yadtqd.store import chunks
from yadtqd.store.records import Grant, Intake

#: Rows in one statement at most, and then in sizes of powers of two (:mod:`~yadtqd.store.chunks`).
CHUNK = chunks.MOST

_INTAKE = (
    "INSERT OR IGNORE INTO tasks (id, name, payload, status, max_retries, retry_backoff,"
    " submitted_at, priority, run_after, then_task, limit_key)"
    " SELECT * FROM (VALUES {rows}) AS v WHERE NOT EXISTS"
    " (SELECT 1 FROM purged WHERE purged.id = v.column1) RETURNING id")
_GRANT = (
    "UPDATE tasks SET status = 'assigned', worker = v.column2, epoch = v.column3,"
    " attempt = attempt + 1, assigned_at = ?, started_at = NULL, grant_no = v.column4"
    " FROM (VALUES {rows}) AS v WHERE tasks.id = v.column1 AND tasks.status = 'queued'"
    " RETURNING tasks.id, tasks.worker, tasks.epoch, tasks.attempt, tasks.payload,"
    " tasks.grant_no, tasks.priority")
_SUCCEED = (
    "UPDATE tasks SET status = 'success', result = v.column5, finished_at = v.column6,"
    " error = NULL, started_at = coalesce(started_at, v.column7)"
    " FROM (VALUES {rows}) AS v WHERE tasks.id = v.column1 AND tasks.attempt = v.column2"
    " AND tasks.worker = v.column3 AND tasks.epoch = v.column4"
    " AND tasks.status IN ('assigned', 'processing') RETURNING tasks.id, then_task IS NOT NULL")


def _values(count: int, width: int) -> str:
    row = "(" + ",".join("?" * width) + ")"
    return ",".join([row] * count)


class Batches:
    """Intake, grants and successes of many tasks (mixed into :class:`yadtqd.store.Store`)."""

    db: sqlite3.Connection

    if TYPE_CHECKING:  # the store's own (yadtqd.store.lifecycle)
        def queue_follow_up(self, parent: str, result: str, now: float,
                            only_if_succeeded: bool = False) -> str | None: ...

    def intake_many(self, subs: Sequence[m.Submission], now: float) -> list[Intake]:
        """Record submissions as :meth:`~yadtqd.store.Store.intake` would one after the other,
        in order (an id twice is new once, then a duplicate or a conflict); what intake made of
        each, in the same order."""
        out: list[Intake] = []
        for part in chunks.split(subs, 11):
            rows: list[Any] = []
            for sub in part:
                due = sub.due(now)
                rows += (sub.task_id, sub.task, sub.payload(), "scheduled" if due > now else "queued",
                         sub.options.max_retries, sub.options.retry_backoff, now, sub.priority, due,
                         _then(sub), sub.limit_key)
            new = {r[0] for r in self.db.execute(_INTAKE.format(rows=_values(len(part), 11)), rows)}
            for sub in part:
                if sub.task_id in new:
                    new.discard(sub.task_id)  # the first of an id twice: the second is not new
                    out.append(Intake(sub.task_id, "new"))
                else:
                    out.append(self.not_new(sub))
        return out

    def not_new(self, sub: m.Submission) -> Intake:
        """What a submission whose id is known is: a ``duplicate`` (the same payload, or the
        task ran and was purged: once is once) or a ``conflict`` (another payload)."""
        if self.db.execute("SELECT 1 FROM purged WHERE id = ?", (sub.task_id,)).fetchone():
            return Intake(sub.task_id, "duplicate")
        row = self.db.execute("SELECT payload, then_task FROM tasks WHERE id = ?",
                              (sub.task_id,)).fetchone()
        same = row is not None and row["payload"] == sub.payload() and row["then_task"] == _then(sub)
        return Intake(sub.task_id, "duplicate" if same else "conflict")

    def grant_many(self, grants: Sequence[tuple[str, str, str, int]], now: float) -> dict[str, Grant]:
        """Grant queued tasks, each ``(task id, worker, epoch, grant number)`` as
        :meth:`~yadtqd.store.Store.grant` would; the grants made, by task id (a task that was
        not ``queued`` is not among them).

        Precondition: no task id twice."""
        if len({task_id for task_id, *_ in grants}) != len(grants):
            raise ValueError("a task granted twice in one batch")
        made: dict[str, Grant] = {}
        for part in chunks.split(grants, 4):
            rows = [value for grant in part for value in grant]
            for r in self.db.execute(_GRANT.format(rows=_values(len(part), 4)), [now, *rows]):
                made[r[0]] = Grant(*r)
        return made

    def renumber_grant(self, task_id: str, grant_no: int) -> None:
        """Give a grant made in this transaction another number (the numbers of an epoch's
        grants must follow each other, and one of a batch was not made)."""
        self.db.execute("UPDATE tasks SET grant_no = ? WHERE id = ? AND status = 'assigned'",
                        (grant_no, task_id))

    def succeed_many(self, ends: Sequence[tuple[m.Finished, float, float | None]], now: float) -> list[str]:
        """Record successes, each ``(finished, when it ended, when it began if known)``, as
        :meth:`~yadtqd.store.Store.finish` would one after the other: ``success``, or ``stale``
        (not the current grant, or ended already); in order. A success queues its task's
        follow-up, if any, in the same transaction."""
        out: list[str] = []
        part: list[tuple[m.Finished, float, float | None]] = []
        ids: set[str] = set()
        for end in ends:
            if end[0].task_id in ids:  # one row of a task a statement
                out += self._succeed_all(part, now)
                part, ids = [], set()
            part.append(end)
            ids.add(end[0].task_id)
        return out + self._succeed_all(part, now)

    def _succeed_all(self, part: Sequence[tuple[m.Finished, float, float | None]], now: float) -> list[str]:
        return [outcome for piece in chunks.split(part, 7) for outcome in self._succeed(piece, now)]

    def _succeed(self, part: Sequence[tuple[m.Finished, float, float | None]], now: float) -> list[str]:
        rows: list[Any] = []
        for ev, at, began in part:
            rows += (ev.task_id, ev.attempt, ev.worker, ev.epoch, bytes(ev.result).decode(), at,
                     began or at)
        ended = dict(self.db.execute(_SUCCEED.format(rows=_values(len(part), 7)), rows).fetchall())
        out = []
        for ev, at, _ in part:
            if ev.task_id not in ended:  # applied before: its follow-up, if lost with a chunk
                self.queue_follow_up(ev.task_id, "null", at, only_if_succeeded=True)
                out.append("stale")
                continue
            if ended[ev.task_id]:  # its follow-up, in the same transaction
                self.queue_follow_up(ev.task_id, bytes(ev.result).decode() or "null", at)
            out.append("success")
        return out


def _then(sub: m.Submission) -> str | None:
    return msgspec.json.encode(sub.then).decode() if sub.then is not None else None
