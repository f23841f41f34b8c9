"""Schema versions: a database made by the previous release is migrated forward at start, in
one transaction, with its rows kept; a database newer than the code is refused (exit 78)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from yadtqd.errors import ConfigError
from yadtqd.store import Store, schema_version

OLD_SCHEMA = Path(__file__).parent / "data" / "schema-release-0.1.sql"


def _release_0_1_database(path: Path) -> None:
    db = sqlite3.connect(path)
    db.executescript(OLD_SCHEMA.read_text())
    db.execute("INSERT INTO tasks (id, name, payload, status, submitted_at, finished_at, result,"
               " attempt) VALUES ('done-1', 'add', '[]', 'success', 1.0, 2.0, '3', 1)")
    db.execute("INSERT INTO tasks (id, name, payload, status, submitted_at)"
               " VALUES ('waiting-1', 'add', '[]', 'queued', 3.0)")
    db.execute("INSERT INTO offsets VALUES ('yadtq.tasks', 0, 7)")
    db.commit()
    db.close()


def test_a_release_0_1_database_is_migrated_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    _release_0_1_database(path)
    store = Store(path, create=True)
    assert store.found_version == 0
    assert store.db.execute("PRAGMA user_version").fetchone()[0] == schema_version() >= 2
    assert store.offsets() == {("yadtq.tasks", 0): 7}
    assert store.counts() == {"success": 1, "queued": 1}
    assert [w.task_id for w in store.waiting(["add"], 10, now=10.0)] == ["waiting-1"]
    columns = {r["name"] for r in store.db.execute("PRAGMA table_info(workers)")}
    assert {"grants", "boot", "dispatch_partition", "events_partition", "undelivered"} <= columns
    store.close()
    again = Store(path, create=True)  # a second start finds nothing to do
    assert again.found_version == schema_version()
    again.close()


def test_a_version_9_database_keeps_its_changelog_notes(tmp_path: Path) -> None:
    """Notes the last turn before an upgrade left (Kafka may lack those changes) survive the
    move to the append-only list of version 10, so the next start still rebuilds."""
    from yadtqd.store import migrations

    path = tmp_path / "v9.db"
    db = sqlite3.connect(path)
    db.executescript("\n".join(migrations()[:9]) + "\nPRAGMA user_version = 9;")
    db.execute("INSERT INTO changelog_pending (tbl, key, gen) VALUES ('tasks', 't1', 3),"
               " ('offsets', 'yadtq.tasks/0', 1)")
    db.commit()
    db.close()
    store = Store(path, create=True)
    assert store.found_version == 9 and store.has_pending()
    store.capture()
    changes, notes = store.pending_changes()
    assert sorted((c.table, c.key) for c in changes) == [("offsets", "yadtq.tasks/0"), ("tasks", "t1")]
    store.confirm(notes, {})
    assert not store.has_pending()


def test_version_11_indexes_only_the_rows_each_partial_index_serves(tmp_path: Path) -> None:
    """A version 10 database moves to partial indexes: queued tasks alone in tasks_waiting, ended
    ones alone in tasks_ended, and the waiting and retention queries still find theirs."""
    from yadtqd.store import migrations

    path = tmp_path / "v10.db"
    db = sqlite3.connect(path)
    db.executescript("\n".join(migrations()[:10]) + "\nPRAGMA user_version = 10;")
    rows = [("q1", "queued", None), ("q2", "queued", None), ("a1", "assigned", None),
            ("p1", "processing", None), ("s1", "success", 5.0), ("f1", "failed", 6.0)]
    db.executemany("INSERT INTO tasks (id, name, payload, status, submitted_at, finished_at)"
                   " VALUES (?, 'add', '[]', ?, 1.0, ?)", rows)
    db.commit()
    db.close()
    store = Store(path, create=True)
    assert store.found_version == 10
    store.db.execute("ANALYZE")  # sqlite_stat1: the entries each index holds, first
    entries = {r[0]: int(r[1].split()[0]) for r in store.db.execute(
        "SELECT idx, stat FROM sqlite_stat1 WHERE idx IN ('tasks_waiting', 'tasks_ended', 'tasks_by_status')")}
    assert entries == {"tasks_waiting": 2, "tasks_ended": 2, "tasks_by_status": 6}
    sql = {r[0]: r[1] for r in store.db.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index'")}
    assert "WHERE status = 'queued'" in sql["tasks_waiting"]
    assert "WHERE finished_at IS NOT NULL" in sql["tasks_ended"]
    assert [w.task_id for w in store.waiting(["add"], 10, now=10.0)] == ["q1", "q2"]
    with store.transaction():
        assert store.purge_tasks(["success", "failed", "cancelled"], 10.0, 10.0) == 2
    assert sorted(store.counts().items()) == [("assigned", 1), ("processing", 1), ("queued", 2)]


def test_a_fresh_database_gets_the_current_schema(tmp_path: Path) -> None:
    store = Store(tmp_path / "new.db", create=True)
    assert store.found_version == 0
    assert store.db.execute("PRAGMA user_version").fetchone()[0] == schema_version()


def test_a_database_newer_than_the_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    Store(path, create=True).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {schema_version() + 1}")
    db.close()
    with pytest.raises(ConfigError, match="newer than this yadtqd") as caught:
        Store(path, create=True)
    assert caught.value.exit_code == 78


def test_a_failed_migration_changes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "old.db"
    _release_0_1_database(path)
    from yadtqd.store import schema as store_module

    real = store_module.migrations()
    monkeypatch.setattr(store_module, "migrations", lambda: [*real, "ALTER TABLE nope ADD x INT;"])
    with pytest.raises(sqlite3.OperationalError):
        Store(path, create=True)
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == 0
    assert "grants" not in {r[1] for r in db.execute("PRAGMA table_info(workers)")}
