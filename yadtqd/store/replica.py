"""The store's side of replication (DESIGN 13): the row changes not yet in the changelog, and
the row changes a replica is given.

A writer's connection captures changes with temporary triggers (:meth:`Replica.capture`: they
exist on that connection only): every insert, update or delete of a replicated row appends the
row's key to ``changelog_pending``, in the same transaction. :meth:`Replica.pending_changes`
turns the noted keys into :class:`RowChange` values (the whole row as it is now, or ``None``
when it was deleted; a key noted twice is one change); once Kafka committed them,
:meth:`Replica.confirm` deletes the notes it read (a key changed again meanwhile stays noted by
its later note). A replica applies changes with
:meth:`Replica.apply_changes`: an upsert of the whole row, or a delete. A row's latest change is
its whole state, so a replica that applied the latest change of every key holds the same rows
as the writer, which is what a compacted changelog keeps.
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from yadtqd.store import chunks

#: Replicated table → the columns of its key, in order.
KEYS: dict[str, tuple[str, ...]] = {
    "tasks": ("id",),
    "workers": ("epoch",),
    "failures": ("seq",),
    "counters": ("name",),
    "offsets": ("topic", "partition"),
    "terms": ("term",),
    "purged": ("id",),
    "purge_orders": ("seq",),
    "schedules": ("name",),
}
#: The separator of a key's columns in its text form (Kafka topic names cannot contain it).
SEP = "/"


@dataclass(frozen=True)
class RowChange:
    """One row's state after a transaction: ``row`` is None when the row was deleted."""

    table: str
    key: str
    row: dict[str, Any] | None


@dataclass(frozen=True)
class TableChanges:
    """The changed rows of one table as they are now: each key with its row's values, in the
    order of ``columns``, or None when the row was deleted."""

    table: str
    columns: tuple[str, ...]
    rows: list[tuple[str, tuple[Any, ...] | None]]


def _key_sql(table: str, prefix: str) -> str:
    return f" || '{SEP}' || ".join(f"{prefix}.{column}" for column in KEYS[table])


def _key_values(table: str, key: str) -> list[Any]:
    parts = key.split(SEP) if len(KEYS[table]) > 1 else [key]
    if len(parts) != len(KEYS[table]):
        raise ValueError(f"bad {table} key {key!r}")
    return [int(p) if column in ("seq", "partition", "term") else p for column, p in zip(KEYS[table], parts)]


@functools.lru_cache(maxsize=64)
def _delete_sql(table: str) -> str:
    return f"DELETE FROM main.{table} WHERE {' AND '.join(f'{c} = ?' for c in KEYS[table])}"


@functools.lru_cache(maxsize=128)
def _delete_many_sql(table: str, count: int) -> str:
    """The statement that deletes ``count`` rows of a table with a key of one column."""
    return f"DELETE FROM main.{table} WHERE {KEYS[table][0]} IN ({','.join('?' * count)})"


@functools.lru_cache(maxsize=256)
def _upsert_sql(table: str, columns: tuple[str, ...], count: int = 1) -> str:
    """The statement that makes ``count`` rows of ``table`` hold these columns' values."""
    updates = ", ".join(f"{c} = excluded.{c}" for c in columns
                        if c not in KEYS[table]) or f"{columns[0]} = {columns[0]}"
    row = f"({', '.join('?' * len(columns))})"
    return (f"INSERT INTO main.{table} ({', '.join(columns)}) VALUES {', '.join([row] * count)}"
            f" ON CONFLICT ({', '.join(KEYS[table])}) DO UPDATE SET {updates}")


class Replica:
    """Change capture and application over ``self.db`` (mixed into :class:`yadtqd.store.Store`)."""

    db: sqlite3.Connection
    _columns: dict[str, list[str]]

    def capture(self) -> None:
        """From now on, note the key of every replicated row this connection changes."""
        for table in KEYS:
            for op, row in (("INSERT", "new"), ("UPDATE", "new"), ("DELETE", "old")):
                self.db.execute(
                    f"CREATE TEMP TRIGGER IF NOT EXISTS pending_{table}_{op.lower()} AFTER {op} ON"
                    f" main.{table} BEGIN INSERT INTO changelog_pending (tbl, key) VALUES"
                    f" ('{table}', {_key_sql(table, row)}); END")

    def stop_capture(self) -> None:
        """No more notes from this connection (a server that stops being the active)."""
        for table in KEYS:
            for op in ("insert", "update", "delete"):
                self.db.execute(f"DROP TRIGGER IF EXISTS temp.pending_{table}_{op}")

    def pending_changes(self, limit: int = 1_000_000) -> tuple[list[RowChange], list[tuple[int]]]:
        """The rows changed and not yet confirmed (from at most ``limit`` notes), as they are
        now, and the notes they answer (for :meth:`confirm`): :meth:`pending_rows` as
        :class:`RowChange` values."""
        tables, notes = self.pending_rows(limit)
        return [RowChange(t.table, key, None if values is None else dict(zip(t.columns, values)))
                for t in tables for key, values in t.rows], notes

    def pending_rows(self, limit: int = 1_000_000) -> tuple[list[TableChanges], list[tuple[int]]]:
        """The rows changed and not yet confirmed (from at most ``limit`` notes), as they are
        now, by table, and the notes they answer (for :meth:`confirm`); one consistent
        snapshot, beside other writers. Each row once, its values as read (the changelog encodes
        them without a dict a row: issue 15). When more are noted than ``limit``, the consumed
        offsets and the schedules' last ticks come last: a changelog that holds them holds what
        they caused (a replay after a crash between two chunks reads those messages again, and
        applying them again is idempotent)."""
        tables: list[TableChanges] = []
        self.db.execute("BEGIN")
        try:
            cursor = self.db.cursor()
            cursor.row_factory = None
            read = cursor.execute(
                "SELECT seq, tbl, key FROM changelog_pending ORDER BY tbl IN ('offsets', 'schedules'),"
                " seq LIMIT ?", (limit,)).fetchall()
            by_table: dict[str, dict[str, None]] = {}
            for _, tbl, key in read:  # each key once, in order
                by_table.setdefault(tbl, {})[key] = None
            every = len(read) < limit  # every note was read: a join finds their rows
            for table, keys in by_table.items():
                columns, found = (self._joined(table) if every and len(KEYS[table]) == 1
                                  else self._listed(table, list(keys)))
                tables.append(TableChanges(table, columns, [(key, found.get(key)) for key in keys]))
        finally:
            self.db.execute("COMMIT")
        return tables, [(seq,) for seq, _, _ in read]

    def _joined(self, table: str) -> tuple[tuple[str, ...], dict[str, tuple[Any, ...]]]:
        """The columns of ``table``, and its rows whose keys are noted, by key: each row once,
        found by the table's one key column (its index), however many times it is noted (a
        task received and granted in one turn is noted twice; issue 15: 11 µs a row where a
        join of every note took 16)."""
        cursor = self.db.cursor()
        cursor.row_factory = None  # plain tuples: half the cost of sqlite3.Row -> dict
        key = KEYS[table][0]
        cursor.execute(f"SELECT CAST(t.{key} AS TEXT), t.* FROM main.{table} t WHERE t.{key}"
                       " IN (SELECT key FROM changelog_pending WHERE tbl = ?)", (table,))
        columns = tuple(column[0] for column in cursor.description[1:])
        return columns, {r[0]: r[1:] for r in cursor}

    def _listed(self, table: str, keys: list[str]) -> tuple[tuple[str, ...], dict[str, tuple[Any, ...]]]:
        """The columns of ``table``, and its rows with these keys, by key (some of the notes
        were read, or a key of several columns)."""
        key_sql = _key_sql(table, table)  # one column: its index serves the IN
        found: dict[str, tuple[Any, ...]] = {}
        cursor = self.db.cursor()
        cursor.row_factory = None
        columns: tuple[str, ...] = ()
        for start in range(0, len(keys), 500):
            part = keys[start:start + 500]
            cursor.execute(f"SELECT CAST({key_sql} AS TEXT), * FROM main.{table} WHERE"
                           f" {key_sql} IN ({','.join('?' * len(part))})", part)
            columns = tuple(column[0] for column in cursor.description[1:])
            found.update({r[0]: r[1:] for r in cursor})
        return columns, found

    def compact_notes(self, above: int) -> int | None:
        """When more than ``above`` notes wait (Kafka refusing commits while the loop goes on),
        keep only the newest of each row's; returns how many there were, or None when fewer.
        Safe beside a read in flight: a row whose note is deleted has a newer one, still noted."""
        if self.db.execute("SELECT 1 FROM changelog_pending LIMIT 1 OFFSET ?", (above,)).fetchone() is None:
            return None
        self.db.execute("BEGIN IMMEDIATE")
        try:
            count = self.db.execute("SELECT count(*) FROM changelog_pending").fetchone()[0]
            self.db.execute("DELETE FROM changelog_pending WHERE seq NOT IN"
                            " (SELECT max(seq) FROM changelog_pending GROUP BY tbl, key)")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")
        return int(count)

    def confirm(self, notes: Iterable[tuple[int]], positions: Mapping[int, int]) -> None:
        """The changes of these notes are committed in the changelog, whose partitions this
        file is now at ``positions``: delete the notes (a row changed since has a later one),
        one transaction."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.executemany("DELETE FROM changelog_pending WHERE seq = ?", list(notes))
            self.save_changelog_positions(positions)
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def publishing(self) -> bool:
        """Whether rows only this file holds are being published to the changelog."""
        row = self.db.execute("SELECT value FROM replication WHERE name = 'publishing'").fetchone()
        return bool(row and row[0])

    def set_publishing(self, on: bool) -> None:
        """Note that a publish started or ended."""
        self.db.execute("INSERT INTO replication (name, value) VALUES ('publishing', ?)"
                        " ON CONFLICT (name) DO UPDATE SET value = excluded.value", (int(on),))

    def salvage(self) -> list[dict[str, Any]]:
        """Unfinished tasks noted as changed: before a wipe, what only this file may know of,
        to be submitted again (intake is idempotent: one the changelog holds is a duplicate; one
        it lacks was never granted in a committed transaction, so no worker ran it)."""
        return [dict(r) for r in self.db.execute(
            "SELECT * FROM tasks WHERE status IN ('queued', 'assigned', 'processing') AND id IN"
            " (SELECT key FROM changelog_pending WHERE tbl = 'tasks')")]

    def has_pending(self) -> bool:
        """Whether changes are noted that the changelog may not hold."""
        return self.db.execute("SELECT 1 FROM changelog_pending LIMIT 1").fetchone() is not None

    def note_all(self) -> None:
        """Note every replicated row as changed (a database from before the changelog, to be
        published whole); call inside a transaction."""
        for table in KEYS:
            self.db.execute(f"INSERT INTO changelog_pending (tbl, key) SELECT '{table}',"
                            f" CAST({_key_sql(table, table)} AS TEXT) FROM main.{table}")

    def wipe(self) -> None:
        """Delete every replicated row, the notes and the positions (before a rebuild from the
        changelog); call inside a transaction."""
        for table in (*KEYS, "changelog_pending", "changelog_positions", "replication"):
            self.db.execute(f"DELETE FROM main.{table}")

    def apply_changes(self, changes: Iterable[RowChange]) -> int:
        """Make each row as given (an upsert of the whole row, or a delete); columns this
        schema does not know are ignored (a newer server's). Of several changes of one row, the
        last alone is applied: it is the row's whole state (a standby's batch holds most tasks'
        intake, grant and end, issue 15). Rows of one table with the same columns are upserted
        many to a statement, and deleted rows many to one (:mod:`~yadtqd.store.chunks`; issue 15: a
        standby's upserts one row a statement took 55 % of its time). Returns how many rows
        were applied."""
        latest: dict[tuple[str, str], RowChange] = {}
        for change in changes:
            if change.table in KEYS:
                latest[change.table, change.key] = change
        deletes: dict[str, list[str]] = {}
        upserts: dict[tuple[str, tuple[str, ...]], list[Any]] = {}
        shapes: dict[tuple[str, tuple[str, ...]], tuple[str, ...]] = {}  # given -> known columns
        for change in latest.values():
            if change.row is None:
                deletes.setdefault(change.table, []).append(change.key)
                continue
            row = change.row
            shape = change.table, tuple(row)
            columns = shapes.get(shape)
            if columns is None:
                columns = shapes[shape] = self._known(*shape)
            upserts.setdefault((change.table, columns), []).extend([row[c] for c in columns])
        for table, keys in deletes.items():
            self._delete_rows(table, keys)
        for (table, columns), values in upserts.items():
            self._upsert_rows(table, columns, values)
        return len(latest)

    def _known(self, table: str, given: tuple[str, ...]) -> tuple[str, ...]:
        """Of a change's columns, those this schema's ``table`` has, in the table's order."""
        named = set(given)
        return tuple(c for c in self._table_columns(table) if c in named)

    def _delete_rows(self, table: str, keys: list[str]) -> None:
        if len(KEYS[table]) > 1:  # a key of several columns: one row a statement
            for key in keys:
                self.db.execute(_delete_sql(table), _key_values(table, key))
            return
        for part in chunks.split([_key_values(table, key)[0] for key in keys], 1):
            self.db.execute(_delete_many_sql(table, len(part)), part)

    def _upsert_rows(self, table: str, columns: tuple[str, ...], values: list[Any]) -> None:
        """Upsert rows given as their values one after the other, in ``columns``' order."""
        width, start = len(columns), 0
        for size in chunks.sizes(len(values) // width, width):
            self.db.execute(_upsert_sql(table, columns, size), values[start:start + size * width])
            start += size * width

    def _table_columns(self, table: str) -> list[str]:
        if not hasattr(self, "_columns"):
            self._columns = {}
        if table not in self._columns:
            self._columns[table] = [r[1] for r in self.db.execute(f"PRAGMA main.table_info({table})")]
        return self._columns[table]

    def changelog_positions(self) -> dict[int, int]:
        """The next changelog offset to apply, per partition."""
        return {r[0]: r[1] for r in self.db.execute(
            "SELECT partition, next_offset FROM changelog_positions")}

    def save_changelog_positions(self, positions: Mapping[int, int]) -> None:
        """Note how far the changelog is applied; call inside the transaction that applied it."""
        self.db.executemany(
            "INSERT INTO changelog_positions (partition, next_offset) VALUES (?, ?)"
            " ON CONFLICT (partition) DO UPDATE SET next_offset = excluded.next_offset",
            list(positions.items()))

    def is_empty(self) -> bool:
        """Whether this file holds no replicated state at all (a new or lost database)."""
        return all(self.db.execute(f"SELECT 1 FROM main.{t} LIMIT 1").fetchone() is None for t in KEYS)
