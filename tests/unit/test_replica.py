"""Change capture and application (DESIGN 13): a replica given the writer's row changes holds
the same rows, whatever the order of keys and however often a key changed (compaction)."""

from __future__ import annotations

import collections
import random
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.unit.test_store import finished, hello, started, sub
from yadtqd import changelog
from yadtqd import messages as m
from yadtqd.errors import BadMessage
from yadtqd.store import RowChange, Store, TableChanges

TABLES = ("tasks", "workers", "failures", "counters", "offsets", "status_counts")


def rows(store: Store) -> dict[str, list[tuple[object, ...]]]:
    """Every replicated row, and the per-status counts derived from them (zeros left out)."""
    out = {t: [tuple(r) for r in store.db.execute(f"SELECT * FROM {t} ORDER BY 1, 2")] for t in TABLES}
    out["status_counts"] = [r for r in out["status_counts"] if r[1]]
    return out


def sent(writer: Store) -> list[RowChange]:
    """What the server would send to the changelog now, confirmed as committed."""
    changes, notes = writer.pending_changes()
    writer.confirm(notes, {})
    return changes


@pytest.fixture
def writer(tmp_path: Path) -> Store:
    store = Store(tmp_path / "writer.db", create=True)
    store.capture()
    return store


def history(writer: Store) -> list[list[RowChange]]:
    """A busy life: intake, grants, starts, ends, a retry, a worker's death, counters, offsets;
    one list of changes per transaction."""
    steps: list[list[RowChange]] = []

    def step() -> None:
        steps.append(sent(writer))

    with writer.transaction():
        for i in range(6):
            writer.intake(sub(f"t{i}", max_retries=1), 1.0 + i)
        hello(writer)
        writer.save_offsets({("p.tasks", 0): 6, ("p.events", 1): 1})
    step()
    with writer.transaction():
        for i in range(4):
            writer.grant(f"t{i}", "w", "e1", 10.0)
        writer.start(started("t0", 1), 11.0)
        writer.bump("stale_events", 2)
    step()
    with writer.transaction():
        writer.finish(finished("t0", 1), 12.0)
        writer.finish(finished("t1", 1, "failed"), 12.0)  # retried
        writer.save_offsets({("p.events", 1): 9})
    step()
    with writer.transaction():
        writer.start(started("t2", 1), 13.0)
        writer.declare_dead("e1", "no heartbeat", 14.0, 3)
        writer.bump("stale_events")
    step()
    return steps


def test_a_replica_given_every_change_in_order_holds_the_same_rows(writer: Store, tmp_path: Path) -> None:
    replica = Store(tmp_path / "replica.db", create=True)
    for changes in history(writer):
        with replica.transaction():
            replica.apply_changes(changes)
    assert rows(replica) == rows(writer)
    assert rows(writer)["failures"] and rows(writer)["counters"]  # the history touched them all


def test_the_latest_change_per_key_in_any_order_is_enough(writer: Store, tmp_path: Path) -> None:
    latest: dict[tuple[str, str], RowChange] = {}
    for changes in history(writer):
        latest.update({(c.table, c.key): c for c in changes})
    shuffled = list(latest.values())
    random.Random(7).shuffle(shuffled)
    replica = Store(tmp_path / "replica.db", create=True)
    with replica.transaction():
        replica.apply_changes(shuffled)
    assert rows(replica) == rows(writer)


def counting(store: Store) -> list[str]:
    """The statements ``store`` runs from now on (a trace would also name each trigger's)."""
    db, written = store.db, []

    class Counting:
        def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
            written.append(sql)
            return db.execute(sql, *args)

        def __getattr__(self, name: str) -> Any:
            return getattr(db, name)

    store.db = Counting()  # type: ignore[assignment]
    return written


def test_a_batch_applies_each_rows_last_change_once_many_to_a_statement(writer: Store,
                                                                          tmp_path: Path) -> None:
    every = [c for changes in history(writer) for c in changes]  # intakes, grants, ends...
    keys = {(c.table, c.key) for c in every}
    assert len(keys) < len(every)  # rows changed in several transactions
    replica = Store(tmp_path / "replica.db", create=True)
    db = replica.db
    written = counting(replica)
    with replica.transaction():
        assert replica.apply_changes(every) == len(keys)
    replica.db = db
    assert rows(replica) == rows(writer)
    applied = [s for s in written if s.startswith(("INSERT INTO main.", "DELETE FROM main."))]
    per_table = collections.Counter(table for table, _ in keys)  # no row deleted: upserts
    assert len(applied) == sum(bin(n).count("1") for n in per_table.values()) < len(keys)


def test_many_rows_and_rows_of_other_columns_go_in_chunks(tmp_path: Path) -> None:
    """1,603 tasks: rows from an older server (a column fewer) and a newer one (a column more),
    others deleted: each row as given, in statements of at most 500 rows."""
    source = Store(tmp_path / "source.db", create=True)
    with source.transaction():
        source.intake_many([sub(f"t{i:04}") for i in range(1603)], 1.0)
    full = [RowChange("tasks", r["id"], dict(r)) for r in source.db.execute("SELECT * FROM tasks")]
    older = [RowChange(c.table, c.key, {k: v for k, v in c.row.items() if k != "limit_key"})
             for c in full[:300] if c.row]
    newer = [RowChange(c.table, c.key, {**c.row, "shiny": 1}) for c in full[300:900] if c.row]
    gone = [RowChange("tasks", c.key, None) for c in full[900:1500]]
    replica = Store(tmp_path / "replica.db", create=True)
    with replica.transaction():  # every row there before, with other values
        replica.apply_changes([RowChange(c.table, c.key, {**(c.row or {}), "status": "failed",
                                                          "limit_key": "k"}) for c in full])
    db = replica.db
    written = counting(replica)
    with replica.transaction():
        assert replica.apply_changes([*older, *newer, *gone, *full[1500:]]) == 1603
    replica.db = db
    got = {r["id"]: dict(r) for r in replica.db.execute("SELECT * FROM tasks")}
    assert len(got) == 1603 - 600
    for i, change in enumerate(full[:900] + full[1500:]):
        want = dict(change.row or {})
        if i < 300:
            want["limit_key"] = "k"  # an older server's row leaves a column it lacks as it was
        assert got[change.key] == want
    counts = {r[0]: r[1] for r in replica.db.execute("SELECT status, count(*) FROM tasks GROUP BY status")}
    assert {status: n for status, n in rows(replica)["status_counts"]} == counts  # its triggers
    upserts = [s.count("(?") for s in written if s.startswith("INSERT INTO main.")]
    deletes = [s.count("?") for s in written if s.startswith("DELETE FROM main.")]
    assert upserts == [256, 32, 8, 4, 512, 128, 32, 16, 8, 4, 2, 1]  # 300 older rows, 703 others
    assert deletes == [512, 64, 16, 8]


def test_batches_of_any_size_take_few_statements(tmp_path: Path) -> None:
    """However many rows a batch holds, its statements are of a few sizes (a connection
    prepares and caches each once, issue 15)."""
    source = Store(tmp_path / "source.db", create=True)
    with source.transaction():
        source.intake_many([sub(f"t{i:04}") for i in range(1100)], 1.0)
    full = [RowChange("tasks", r["id"], dict(r)) for r in source.db.execute("SELECT * FROM tasks")]
    replica = Store(tmp_path / "replica.db", create=True)
    db = replica.db
    written = counting(replica)
    for size in range(1, 1100, 37):
        with replica.transaction():
            replica.apply_changes(full[:size])
            replica.apply_changes([RowChange("tasks", c.key, None) for c in full[:size]])
    replica.db = db
    applied = [s for s in written if s.startswith(("INSERT INTO main.", "DELETE FROM main."))]
    assert len(applied) > 200 and len(set(applied)) == 2 * 10  # 512, 256, ... 1 rows


def test_tombstones_delete_rows_of_every_kind_of_key(writer: Store, tmp_path: Path) -> None:
    """Keys of a text column (tasks), an integer one (failures) and two columns (offsets)."""
    replica = Store(tmp_path / "replica.db", create=True)
    for changes in history(writer):
        with replica.transaction():
            replica.apply_changes(changes)
    db = replica.db
    keys = ([("tasks", r[0]) for r in db.execute("SELECT id FROM tasks")]
            + [("failures", str(r[0])) for r in db.execute("SELECT seq FROM failures")]
            + [("offsets", f"{r[0]}/{r[1]}") for r in db.execute("SELECT topic, partition FROM offsets")])
    assert {t for t, _ in keys} == {"tasks", "failures", "offsets"}
    with replica.transaction():
        assert replica.apply_changes([RowChange(t, k, None) for t, k in keys]) == len(keys)
    assert not any(rows(replica)[t] for t in ("tasks", "failures", "offsets", "status_counts"))


def test_a_rolled_back_transaction_leaves_no_changes(writer: Store) -> None:
    with pytest.raises(RuntimeError), writer.transaction():
        writer.intake(sub("gone"), 1.0)
        raise RuntimeError
    assert writer.pending_changes() == ([], []) and not writer.has_pending()


def test_a_change_made_after_the_read_stays_pending(writer: Store, tmp_path: Path) -> None:
    other = Store(writer.path)  # the socket's writer, say
    other.capture()
    with other.transaction():
        other.intake(sub("t1"), 1.0)
    changes, notes = writer.pending_changes()
    with writer.transaction():
        writer.grant("t1", "w", "e1", 2.0)  # after the read, before the confirmation
    writer.confirm(notes, {0: 3})
    (again,), _ = writer.pending_changes()
    assert changes[0].row is not None and changes[0].row["status"] == "queued"
    assert again.row is not None and again.row["status"] == "assigned"
    assert writer.changelog_positions() == {0: 3}


def test_a_row_changed_twice_is_one_change_and_one_confirmation_forgets_both(writer: Store) -> None:
    with writer.transaction():
        writer.intake(sub("t1"), 1.0)
        writer.grant("t1", "w", "e1", 2.0)
    changes, notes = writer.pending_changes()
    assert [(c.table, c.key) for c in changes if c.table == "tasks"] == [("tasks", "t1")]
    assert len(notes) > len(changes)  # the two changes of t1 were noted apart
    writer.confirm(notes, {})
    assert writer.pending_changes() == ([], []) and not writer.has_pending()


def test_a_deleted_row_is_a_tombstone_and_deletes(writer: Store, tmp_path: Path) -> None:
    replica = Store(tmp_path / "replica.db", create=True)
    with writer.transaction():
        writer.intake(sub("t1"), 1.0)
    created = sent(writer)
    with writer.transaction():
        writer.db.execute("DELETE FROM tasks WHERE id = 't1'")  # a purge, later
    (tombstone,) = sent(writer)
    assert tombstone == RowChange("tasks", "t1", None)
    with replica.transaction():
        replica.apply_changes(created)
        assert replica.task_rows(["t1"])
        replica.apply_changes([tombstone])
    assert not replica.task_rows(["t1"]) and rows(replica)["status_counts"] == []


def test_columns_a_newer_server_added_are_ignored(tmp_path: Path) -> None:
    replica = Store(tmp_path / "replica.db", create=True)
    row = {"name": "stale_events", "value": 3, "colour": "blue"}
    with replica.transaction():
        replica.apply_changes([RowChange("counters", "stale_events", row)])
    assert replica.counter_values() == {"stale_events": 3}


def test_positions_are_kept_and_a_wiped_file_is_empty(writer: Store) -> None:
    assert writer.is_empty()
    with writer.transaction():
        writer.save_changelog_positions({0: 5, 1: 7})
    assert writer.changelog_positions() == {0: 5, 1: 7}
    assert writer.is_empty() and not writer.has_pending()  # positions alone are not state
    with writer.transaction():
        writer.bump("x")
    assert not writer.is_empty() and writer.has_pending()
    with writer.transaction():
        writer.wipe()
    assert writer.is_empty() and not writer.has_pending() and writer.changelog_positions() == {}


def test_json_columns_survive_the_trip(writer: Store, tmp_path: Path) -> None:
    with writer.transaction():
        writer.intake_invalid("bad", m.ErrorInfo(type="BadSubmission", message="é"), 1.0)
    (change,) = sent(writer)
    replica = Store(tmp_path / "replica.db", create=True)
    with replica.transaction():
        replica.apply_changes([change])
    assert replica.task_rows(["bad"])["bad"]["error"] == writer.task_rows(["bad"])["bad"]["error"]


def test_records_carry_changes_there_and_back(writer: Store) -> None:
    for changes in history(writer):
        for change in changes:
            assert changelog.decode(*changelog.encode(change)) == change


def test_records_from_rows_are_byte_for_byte_those_from_changes(writer: Store,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop's records (``pending_rows`` -> ``encode_rows``, no dict a row) are the bytes of
    ``pending_changes`` -> ``encode``, for the tables of a busy history, tombstones, reals of 17
    digits and text outside ASCII; with every note read (a join) and with fewer (a list of
    keys); and a record carries the row as a plain read of the table finds it."""
    compared: list[int] = []

    def compare(store: Store, limit: int) -> None:
        tables, notes = store.pending_rows(limit)
        changes, same_notes = store.pending_changes(limit)
        assert notes == same_notes
        records = [record for table in tables for record in changelog.encode_rows(table)]
        assert records == [changelog.encode(change) for change in changes]
        compared.extend(len(table.rows) for table in tables)

    def sent_compared(store: Store, send: Callable[[Store], list[RowChange]] = sent) -> list[RowChange]:
        compare(store, 3)
        compare(store, 1_000_000)
        return send(store)

    monkeypatch.setitem(globals(), "sent", sent_compared)
    history(writer)
    with writer.transaction():
        writer.intake(sub("precise"), 1764880000.1234567)
        writer.intake_invalid("accented", m.ErrorInfo(type="BadSubmission", message="é \u2028 \x01"), 0.1)
        writer.db.execute("DELETE FROM tasks WHERE id = 't5'")
    compare(writer, 1_000_000)
    tables, _ = writer.pending_rows()
    records = dict(record for table in tables for record in changelog.encode_rows(table))
    assert records[b"tasks/t5"] is None
    for task_id in ("precise", "accented"):
        row = changelog.decode(f"tasks/{task_id}".encode(), records[f"tasks/{task_id}".encode()]).row
        assert row == dict(writer.task_rows([task_id])[task_id])
    assert sum(compared) > 30


def test_records_of_columns_a_struct_cannot_have_are_encoded_through_a_dict() -> None:
    changes = TableChanges("counters", ("name", "a b"), [("x", ("x", 1.5)), ("y", None)])
    assert changelog.encode_rows(changes) == [(b"counters/x", b'{"name":"x","a b":1.5}'),
                                             (b"counters/y", None)]


@pytest.mark.parametrize(("key", "value", "problem"), [
    (None, b"{}", "without a key"),
    (b"\xff", b"{}", "not UTF-8"),
    (b"nope/1", b"{}", "names no replicated table"),
    (b"tasks/t1", b"[1]", "tasks/t1"),
    (b"tasks/t1", b"{\"name\": \"x\"}", "lacks id"),
])
def test_bad_records_are_named(key: bytes | None, value: bytes, problem: str) -> None:
    with pytest.raises(BadMessage, match=problem):
        changelog.decode(key, value)


def test_a_backlog_of_notes_goes_in_chunks(writer: Store) -> None:
    with writer.transaction():
        for i in range(12):
            writer.intake(sub(f"t{i}"), 1.0)
    sizes = []
    while writer.has_pending():
        changes, notes = writer.pending_changes(5)
        sizes.append(len(changes))
        writer.confirm(notes, {})
    assert sizes == [5, 5, 2]


def test_a_chunk_of_notes_with_repeated_rows_keeps_the_offsets_last(writer: Store) -> None:
    with writer.transaction():
        writer.save_offsets({("yadtq.tasks", 0): 1})  # noted first, read last
        for i in range(4):
            writer.intake(sub(f"t{i}"), 1.0)
        hello(writer)
        for i in range(4):
            writer.grant(f"t{i}", "w", "e1", 2.0)  # each task noted twice
    chunks = []
    while writer.has_pending():
        changes, notes = writer.pending_changes(5)
        chunks.append([c.table for c in changes])
        writer.confirm(notes, {})
    assert "offsets" in chunks[-1] and all("offsets" not in c for c in chunks[:-1])
    tasks = [t for chunk in chunks for t in chunk if t == "tasks"]
    assert 4 <= len(tasks) <= 8  # a row whose notes fall into two chunks is sent with each


def test_a_backlog_past_the_limit_keeps_the_newest_note_of_each_row(writer: Store) -> None:
    hello(writer)
    for beat in range(30):
        with writer.transaction():
            writer.heartbeat(m.Heartbeat(worker="w", epoch="e1", ts=beat, slots=2, busy=0), float(beat))
    _, before = writer.pending_changes()
    assert writer.compact_notes(1000) is None  # under the limit: nothing done
    assert writer.compact_notes(10) == len(before) > 10
    changes, notes = writer.pending_changes()
    assert len(notes) == len(changes)  # one note a row
    assert any(c.table == "workers" and c.row and c.row["last_heartbeat"] == 29.0 for c in changes)
    writer.confirm(before, {})  # a read from before the compaction confirms every note left
    assert not writer.has_pending()


def test_salvage_finds_the_unfinished_tasks_only_this_file_noted(writer: Store) -> None:
    with writer.transaction():
        writer.intake(sub("sent"), 1.0)
    sent(writer)  # in the changelog already
    with writer.transaction():
        writer.intake(sub("granted"), 1.0)
        hello(writer)
        writer.grant("granted", "w", "e1", 2.0)
        writer.intake(sub("only-here"), 3.0)
    assert sorted(row["id"] for row in writer.salvage()) == ["granted", "only-here"]


def test_publishing_is_noted_and_wiped(writer: Store) -> None:
    with writer.transaction():
        writer.intake(sub("old"), 1.0)
    sent(writer)
    with writer.transaction():
        writer.note_all()
        writer.set_publishing(True)
    assert writer.publishing() and writer.has_pending()
    with writer.transaction():
        writer.wipe()
    assert not writer.publishing()


def test_every_note_read_by_a_join_gives_the_rows_a_list_of_keys_gives(writer: Store) -> None:
    """The two ways of reading noted rows back: a join with the key column when every note is
    read, a list of keys otherwise (or for keys of several columns). Same rows, tombstones too."""
    with writer.transaction():
        for i in range(4):
            writer.intake(sub(f"t{i}", max_retries=1), 1.0 + i)
        hello(writer)
        writer.save_offsets({("p.tasks", 0): 4})
        writer.grant("t0", "w", "e1", 10.0)
        writer.bump("stale_events", 2)
        writer.declare_dead("e1", "no heartbeat", 14.0, 3)  # a failures row (an integer key)
        writer.db.execute("DELETE FROM tasks WHERE id = 't3'")  # a tombstone
    notes = writer.db.execute("SELECT count(*) FROM changelog_pending").fetchone()[0]
    joined, _ = writer.pending_changes(notes + 1)
    listed, _ = writer.pending_changes(notes)  # the limit reached: read by a list of keys

    def by_key(changes: list[RowChange]) -> dict[tuple[str, str], object]:
        return {(c.table, c.key): c.row for c in changes}

    assert by_key(joined) == by_key(listed)
    assert {t for t, _ in by_key(joined)} >= {"tasks", "workers", "failures", "counters", "offsets"}
    assert by_key(joined)[("tasks", "t3")] is None and by_key(joined)[("tasks", "t0")] is not None
