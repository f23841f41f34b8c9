"""The task state machine (DESIGN sections 3 and 4): a set of named transitions, each one
conditional UPDATE that states the status it expects, so correctness never depends on the
caller being single-threaded::

    intake ──▶ queued ──grant──▶ assigned ──start──▶ processing ──finish──▶ success | failed
                 ▲                   │                    │
                 └──── retry / declare_dead / hand_back ──┘

A transition that matches no row did not happen; the caller treats the event as stale.
Offsets consumed from Kafka are saved in the same transaction as the changes they cause
(invariant 6). Commits use ``synchronous=NORMAL``: a power loss may cost the last ones, which
the changelog still holds (DESIGN 13; docs/design.md, "The changelog"). The server's main loop
is the one writer; queries read through their own connections beside it.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec

from yadtqd import messages as m
from yadtqd.store.batches import Batches
from yadtqd.store.lifecycle import Lifecycle
from yadtqd.store.reads import Reads
from yadtqd.store.records import Grant, Held, Intake, Waiting
from yadtqd.store.replica import Replica
from yadtqd.store.schema import connect, migrate, schema_version
from yadtqd.store.terms import Terms

WORKER_LOST = "WorkerLost"
#: :meth:`Store.waiting` reads the queue's names first when there are at most this many more
#: than the names asked for (one seek each), then only the names that have tasks queued.
QUEUED_NAMES_MORE = 64
#: The most re-queued task ids a worker failure lists (the started ones first; all are
#: counted): 500 ids of at most 128 characters keep its changelog record within the room
#: :func:`yadtqd.changelog.record_bytes` leaves a row beside its payload and result, however
#: small those limits are set.
FAILURE_LISTED = 500


class Store(Batches, Reads, Replica, Terms, Lifecycle):
    """The task state machine, its queries, its replication, the servers' terms and the
    operator's lifecycle orders, over one SQLite connection."""

    def __init__(self, path: str | Path, readonly: bool = False, create: bool = False) -> None:
        self.path = str(path)
        if create:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self.db = connect(self.path, readonly)
        #: The schema version the database had when opened (before any migration).
        self.found_version = migrate(self.db, self.path) if create else schema_version()

    def close(self) -> None:
        """Close the connection."""
        self.db.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """One write transaction: ``BEGIN IMMEDIATE`` takes the write lock at once."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # ------------------------------------------------------------ intake (invariant 1)

    def intake(self, sub: m.Submission, now: float) -> Intake:
        """Record a submission as ``queued`` (``scheduled`` when its delay or eta is still to
        come); the same id again is a no-op or a conflict.

        Precondition: none. An id is inserted once; a second submission with the same payload is
        a ``duplicate`` (no change), with another payload a ``conflict`` (no change).
        """
        return self.intake_many([sub], now)[0]

    def intake_invalid(self, task_id: str, error: m.ErrorInfo, now: float) -> bool:
        """Record a submission that could not be parsed as ``failed`` with the reason.

        Precondition: the id is unknown. A known id is never touched (returns False).
        """
        cur = self.db.execute(
            "INSERT OR IGNORE INTO tasks (id, name, payload, status, submitted_at, finished_at,"
            " error) VALUES (?, '', '', 'failed', ?, ?, ?)",
            (task_id, now, now, _json(error)),
        )
        return cur.rowcount == 1

    # ------------------------------------------------------------ grants (invariant 2)

    def promote_due(self, now: float, limit: int = 5000) -> int:
        """``scheduled`` → ``queued`` for the tasks now due (at most ``limit``, earliest first,
        by their own index: the tasks not yet due are never read); returns how many."""
        cur = self.db.execute(
            "UPDATE tasks SET status = 'queued' WHERE id IN (SELECT id FROM tasks INDEXED BY"
            " tasks_scheduled WHERE status = 'scheduled' AND run_after <= ? ORDER BY run_after LIMIT ?)",
            (now, limit))
        return cur.rowcount

    def waiting(self, names: Iterable[str], limit: int, now: float,
                closed: Mapping[str, set[str | None]] | None = None,
                each: Mapping[str, int] | None = None) -> list[Waiting]:
        """Queued tasks that may run now and that some live worker provides: the highest
        priority first, oldest first within one, at most ``limit`` (and of a name at most what
        ``each`` gives it, when it does); not those of a name's ``closed`` limit keys (None:
        the tasks without a key).

        One indexed query per name that has queued tasks (found by :meth:`queued_names`, so an
        empty queue costs one index seek, not a query per name a worker provides), merged:
        queued tasks of names nobody provides are never read, however many there are.
        """
        found: list[tuple[int, int, str, str, str | None, int]] = []
        wanted = set(names)
        queued = self.queued_names(len(wanted) + QUEUED_NAMES_MORE)
        if len(queued) < len(wanted) + QUEUED_NAMES_MORE:  # all of them: skip the names with none
            wanted.intersection_update(queued)
        for name in wanted:
            shut = (closed or {}).get(name, set())
            keys = sorted(k for k in shut if k is not None)
            where = (" AND limit_key IS NOT NULL" if None in shut else "") + (
                f" AND (limit_key IS NULL OR limit_key NOT IN ({','.join('?' * len(keys))}))" if keys else "")
            rows = self.db.execute(
                "SELECT priority, seq, id, limit_key, length(payload) AS size FROM tasks"
                " WHERE status = 'queued' AND name = ?"
                f" AND run_after <= ?{where} ORDER BY priority DESC, seq LIMIT ?",
                (name, now, *keys, min(limit, each.get(name, limit)) if each else limit))
            found += [(-r["priority"], r["seq"], r["id"], name, r["limit_key"], r["size"]) for r in rows]
        found.sort()
        return [Waiting(task_id, name, key, size) for _, _, task_id, name, key, size in found[:max(limit, 0)]]

    def grant(self, task_id: str, worker: str, epoch: str, now: float, grant_no: int = 0) -> Grant | None:
        """Grant the next attempt of a queued task to a worker epoch, atomically; ``grant_no``
        numbers the grants of one epoch (the caller keeps the count, see :meth:`count_grants`).

        Precondition: the task is ``queued``. Returns None when it is not (someone else won).
        """
        return self.grant_many([(task_id, worker, epoch, grant_no)], now).get(task_id)

    def count_grants(self, counts: Mapping[str, int]) -> None:
        """Save how many grants each epoch has had (epoch → count), with the grants."""
        self.db.executemany("UPDATE workers SET grants = ? WHERE epoch = ? AND grants < ?",
                            [(n, epoch, n) for epoch, n in counts.items()])

    def pending_grants(self) -> list[Grant]:
        """Grants not yet started, oldest first: re-sent after a server restart."""
        rows = self.db.execute(
            "SELECT id, worker, epoch, attempt, payload, grant_no, priority FROM tasks"
            " WHERE status = 'assigned' ORDER BY seq"
        )
        return [Grant(r["id"], r["worker"], r["epoch"], r["attempt"], r["payload"], r["grant_no"],
                      r["priority"]) for r in rows]

    def held(self) -> dict[str, list[Held]]:
        """The granted, unfinished tasks each epoch holds."""
        rows = self.db.execute(
            "SELECT epoch, id, name, limit_key, length(payload) AS size FROM tasks"
            " WHERE status IN ('assigned', 'processing')"
        )
        out: dict[str, list[Held]] = {}
        for r in rows:
            out.setdefault(r["epoch"], []).append(Held(r["id"], r["name"], r["limit_key"], r["size"]))
        return out

    def queued_names(self, most: int = -1) -> list[str]:
        """The distinct names of the queued tasks, in order, at most ``most`` of them (-1: all):
        a skip-scan of the queue's index, named: one index seek per name, however many tasks;
        left to itself, SQLite prefers the equality on status of ``tasks_by_status`` and reads
        every queued row."""
        rows = self.db.execute(
            "WITH RECURSIVE n(name) AS ("
            " SELECT min(name) FROM tasks INDEXED BY tasks_waiting WHERE status = 'queued'"
            " UNION ALL SELECT (SELECT min(name) FROM tasks INDEXED BY tasks_waiting"
            " WHERE status = 'queued' AND name > n.name)"
            " FROM n WHERE n.name IS NOT NULL LIMIT ?)"  # a LIMIT here stops the recursion itself
            " SELECT name FROM n WHERE name IS NOT NULL LIMIT ?", (most + 1 if most >= 0 else -1, most))
        return [r["name"] for r in rows]

    def fail_unroutable(self, name: str, older_than: float, waited: float, now: float,
                        limit: int = 500) -> list[str]:
        """Fail queued tasks of ``name`` (which no live worker has provided for ``waited``
        seconds) that were submitted before ``older_than``, oldest first, at most ``limit``;
        returns their ids."""
        error = _json(m.ErrorInfo(type="Unroutable", message=(
            f"no live worker provided task {name!r} for {waited:.0f} s"
            " ([server] unroutable_timeout)")))
        rows = self.db.execute(
            "UPDATE tasks SET status = 'failed', error = ?, finished_at = ? WHERE id IN"
            " (SELECT id FROM tasks WHERE status = 'queued' AND name = ? AND submitted_at < ?"
            " ORDER BY priority DESC, seq LIMIT ?) RETURNING id", (error, now, name, older_than, limit))
        return [r["id"] for r in rows]

    # ------------------------------------------------------------ worker events (invariant 3)

    def start(self, ref: m.Started, now: float) -> bool:
        """``assigned`` → ``processing``, only for the current grant of a non-terminal task."""
        cur = self.db.execute(
            "UPDATE tasks SET status = 'processing', started_at = ? WHERE id = ? AND attempt = ?"
            " AND worker = ? AND epoch = ? AND status = 'assigned'",
            (now, ref.task_id, ref.attempt, ref.worker, ref.epoch),
        )
        return cur.rowcount == 1

    def finish(self, ev: m.Finished, now: float, at: float | None = None,
               began: float | None = None) -> str:
        """Record a task's end for its current grant, which happened ``at`` (default ``now``,
        the server's clock, which alone times a retry's backoff; ``began``: when it started,
        if its start was not recorded); returns the outcome.

        ``retry`` (failed with retries left: back to ``queued`` after a backoff), ``success``,
        ``failed``, ``cancelled``, or ``stale`` (not the current grant, or already terminal:
        nothing changed). The epoch's run counters are the caller's (:meth:`count_runs`).
        """
        grant = (ev.task_id, ev.attempt, ev.worker, ev.epoch)
        if ev.status == "failed":
            cur = self.db.execute(
                "UPDATE tasks SET status = 'queued', worker = NULL, epoch = NULL, error = ?,"
                " failures = failures + 1, run_after = ? + retry_backoff * (1 << min(failures, 20))"
                " WHERE id = ? AND attempt = ? AND worker = ? AND epoch = ?"
                " AND status IN ('assigned', 'processing') AND failures < max_retries"
                " AND cancel_requested IS NULL",
                (_json(ev.error), now, *grant),
            )
            if cur.rowcount == 1:  # (run_after from the server's clock: waiting() compares it)
                return "retry"
        result = bytes(ev.result).decode() if ev.status == "success" else None
        error = _json(ev.error) if ev.status == "failed" else None
        cancelled = ev.status == "cancelled"
        ended = self.db.execute(  # a cancelled task keeps the reason noted when it was cancelled
            "UPDATE tasks SET status = ?, result = ?, finished_at = ?,"
            " error = CASE WHEN ? THEN error ELSE ? END,"
            " started_at = CASE WHEN ? THEN started_at ELSE coalesce(started_at, ?) END"
            " WHERE id = ? AND attempt = ? AND worker = ? AND epoch = ?"
            " AND status IN ('assigned', 'processing') AND (NOT ? OR cancel_requested IS NOT NULL)"
            " RETURNING then_task IS NOT NULL",
            (ev.status, result, at or now, cancelled, error, cancelled, began or at or now, *grant,
             cancelled),
        ).fetchone()
        if ended is None:
            if ev.status == "success":  # applied before: its follow-up, if lost with a chunk
                self.queue_follow_up(ev.task_id, "null", at or now, only_if_succeeded=True)
            return "stale"
        if ev.status == "success" and ended[0]:  # its follow-up, in the same transaction
            self.queue_follow_up(ev.task_id, result or "null", at or now)
        return ev.status

    def count_runs(self, runs: Mapping[str, Sequence[int]]) -> None:
        """Add to each epoch's run counters (epoch → executed, succeeded, failed runs), in the
        transaction that recorded the runs: one update per epoch for a batch of outcomes (see
        :func:`runs_counted`)."""
        self.db.executemany(
            "UPDATE workers SET executed = executed + ?, succeeded = succeeded + ?,"
            " failed_runs = failed_runs + ? WHERE epoch = ?",
            [(*counts, epoch) for epoch, counts in runs.items()])

    # ------------------------------------------------------------ workers

    def hello(self, ev: m.Hello, now: float, dispatch_partition: int,
              events_partition: int) -> list[str] | None:
        """Register a new worker epoch as live, reading and writing the partitions given;
        returns older live epochs of the same worker id.

        Precondition: the epoch is new. A hello from a known epoch changes nothing (None).
        """
        known = self.db.execute("SELECT 1 FROM workers WHERE epoch = ?", (ev.epoch,)).fetchone()
        if known:
            return None
        older = [r["epoch"] for r in self.db.execute(
            "SELECT epoch FROM workers WHERE worker = ? AND state IN ('live', 'leaving')"
            " AND epoch != ?",
            (ev.worker, ev.epoch),
        )]
        self.db.execute(
            "INSERT INTO workers (epoch, worker, host, pid, slots, prefetch, tasks, version,"
            " state, joined_at, last_heartbeat, boot, dispatch_partition, events_partition)"
            " VALUES (?,?,?,?,?,?,?,?,'live',?,?,?,?,?)",
            (ev.epoch, ev.worker, ev.host, ev.pid, ev.slots, ev.prefetch, _json(_tasks(ev)),
             ev.version, now, now, ev.boot, dispatch_partition, events_partition),
        )
        return older

    def holders(self, worker: str) -> list[sqlite3.Row]:
        """The live (or leaving) epochs of a worker id."""
        return list(self.db.execute(
            "SELECT * FROM workers WHERE worker = ? AND state IN ('live', 'leaving')", (worker,)))

    def worker_row(self, epoch: str) -> sqlite3.Row | None:
        """One epoch's row, whatever its state."""
        row: sqlite3.Row | None = self.db.execute("SELECT * FROM workers WHERE epoch = ?", (epoch,)).fetchone()
        return row

    def readvertise(self, ev: m.Hello) -> bool:
        """A live epoch said ``hello`` again (after reloading its plugins): update what it
        advertises. False when the epoch is not live."""
        cur = self.db.execute(
            "UPDATE workers SET tasks = ?, slots = ?, prefetch = ? WHERE epoch = ?"
            " AND state IN ('live', 'leaving')",
            (_json(_tasks(ev)), ev.slots, ev.prefetch, ev.epoch),
        )
        return cur.rowcount == 1

    def heartbeat(self, ev: m.Heartbeat, now: float) -> bool:
        """Note a live epoch's heartbeat; False when the epoch is not live (a stale event)."""
        cur = self.db.execute(
            "UPDATE workers SET last_heartbeat = ?, busy = ?, done = ?, failed = ?,"
            " undelivered = ? WHERE epoch = ? AND state IN ('live', 'leaving')",
            (now, ev.busy, ev.done, ev.failed, ev.undelivered, ev.epoch),
        )
        return cur.rowcount == 1

    def live_workers(self) -> list[sqlite3.Row]:
        """Every ``live`` or ``leaving`` epoch, with what it advertises."""
        return list(self.db.execute(
            "SELECT * FROM workers WHERE state IN ('live', 'leaving') ORDER BY joined_at"))

    def leave(self, epoch: str) -> bool:
        """A live epoch said ``bye``: ``leaving`` takes no more grants but is still watched
        until its running tasks are done."""
        cur = self.db.execute(
            "UPDATE workers SET state = 'leaving' WHERE epoch = ? AND state = 'live'", (epoch,))
        return cur.rowcount == 1

    def left(self, epoch: str, now: float) -> bool:
        """A ``leaving`` epoch holds no more tasks: it is gone."""
        cur = self.db.execute(
            "UPDATE workers SET state = 'left', left_at = ? WHERE epoch = ? AND state = 'leaving'",
            (now, epoch),
        )
        return cur.rowcount == 1

    def hand_back(self, epoch: str, refs: Sequence[m.TaskRef]) -> tuple[list[str], list[str]]:
        """Unstarted grants handed back in ``bye`` go back to ``queued`` (not counted as lost),
        or end ``cancelled`` when an operator cancelled them meanwhile; returns the ids of
        each."""
        back, cancelled = [], []
        for ref in refs:
            cancelled += [r[0] for r in self.db.execute(
                "UPDATE tasks SET status = 'cancelled', finished_at = cancel_requested"
                " WHERE id = ? AND attempt = ? AND epoch = ? AND status = 'assigned'"
                " AND cancel_requested IS NOT NULL RETURNING id", (ref.task_id, ref.attempt, epoch))]
            cur = self.db.execute(
                "UPDATE tasks SET status = 'queued', worker = NULL, epoch = NULL"
                " WHERE id = ? AND attempt = ? AND epoch = ? AND status = 'assigned'",
                (ref.task_id, ref.attempt, epoch),
            )
            back += [ref.task_id] * cur.rowcount
        return back, cancelled

    def declare_dead(self, epoch: str, reason: str, now: float, max_attempts: int) -> list[str]:
        """Declare a live (or leaving) epoch dead: its unfinished tasks are re-queued or, past
        ``max_attempts`` losses, failed with a ``WorkerLost`` error. Records the failure.

        Only a task that had started counts a loss: a grant the epoch never started (its
        prefetch) goes back to ``queued`` as it was. Returns every re-queued id, the started
        ones first, then in grant order; the failure lists the first :data:`FAILURE_LISTED`.

        Precondition: the epoch is live; otherwise nothing changes and [] is returned.
        """
        row = self.db.execute(
            "SELECT * FROM workers WHERE epoch = ? AND state IN ('live', 'leaving')", (epoch,)
        ).fetchone()
        if row is None:
            return []
        self.db.execute("UPDATE workers SET state = 'dead', left_at = ? WHERE epoch = ?", (now, epoch))
        self.db.execute(  # cancelled by an operator: ends cancelled, never runs again
            "UPDATE tasks SET status = 'cancelled', finished_at = ? WHERE epoch = ?"
            " AND status IN ('assigned', 'processing') AND cancel_requested IS NOT NULL", (now, epoch))
        lost = m.ErrorInfo(type=WORKER_LOST, message=(
            f"worker {row['worker']} was lost while running this task {max_attempts} times"
            f" (last: {reason})"))
        self.db.execute(
            "UPDATE tasks SET status = 'failed', lost = lost + 1, error = ?, finished_at = ?"
            " WHERE epoch = ? AND status = 'processing' AND lost + 1 >= ?",
            (_json(lost), now, epoch, max_attempts),
        )
        started = [r["id"] for r in self.db.execute(
            "UPDATE tasks SET status = 'queued', lost = lost + 1, worker = NULL, epoch = NULL"
            " WHERE epoch = ? AND status = 'processing' RETURNING id", (epoch,)
        )]
        unstarted = self.db.execute(  # RETURNING's order is SQLite's: sorted in grant order
            "UPDATE tasks SET status = 'queued', worker = NULL, epoch = NULL"
            " WHERE epoch = ? AND status = 'assigned' RETURNING id, assigned_at", (epoch,)
        ).fetchall()
        requeued = started + [r["id"] for r in sorted(unstarted, key=lambda r: (r["assigned_at"], r["id"]))]
        self.db.execute(
            "INSERT INTO failures (worker, epoch, host, last_heartbeat, detected_at, reason,"
            " requeued, requeued_count) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (row["worker"], epoch, row["host"], row["last_heartbeat"], now, reason,
             _json(requeued[:FAILURE_LISTED]), len(requeued)),
        )
        return requeued

    # ------------------------------------------------------------ offsets (invariant 6)

    def offsets(self) -> dict[tuple[str, int], int]:
        """The next offset to read of every partition the server has consumed from."""
        rows = self.db.execute("SELECT topic, partition, next_offset FROM offsets")
        return {(r["topic"], r["partition"]): r["next_offset"] for r in rows}

    def save_offsets(self, positions: Mapping[tuple[str, int], int]) -> None:
        """Save consumed positions; call inside the transaction that applied the messages."""
        self.db.executemany(
            "INSERT INTO offsets (topic, partition, next_offset) VALUES (?, ?, ?)"
            " ON CONFLICT (topic, partition) DO UPDATE SET next_offset = excluded.next_offset",
            [(t, p, o) for (t, p), o in positions.items()],
        )

    # ------------------------------------------------------------ counters

    def bump(self, name: str, by: int = 1) -> None:
        """Add to a named counter (stale events and the like)."""
        self.db.execute(
            "INSERT INTO counters (name, value) VALUES (?, ?)"
            " ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
            (name, by),
        )


def runs_counted(outcome: str) -> tuple[int, int, int] | None:
    """What a :meth:`Store.finish` outcome adds to its epoch's run counters (executed,
    succeeded, failed runs): a retried failure counts as failed, not executed; a cancelled or
    stale run counts nothing."""
    return {"success": (1, 1, 0), "failed": (1, 0, 1), "retry": (0, 0, 1)}.get(outcome)


def _tasks(ev: m.Hello) -> dict[str, dict[str, str]]:
    return {name: {"plugin": t.plugin, "version": t.version} for name, t in ev.tasks.items()}


def _json(value: Any) -> str:
    return msgspec.json.encode(value).decode()
