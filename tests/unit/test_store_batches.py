"""Transitions of many tasks in one statement (:mod:`yadtqd.store.batches`) make exactly what
the one-row transitions make one after the other: the same outcomes, the same rows (sequence
numbers included), the same counts and the same rows noted for the changelog (not always in the
same order: a follow-up's note comes after the run's updates, which changes nothing, as the
changelog reads each noted row as it is). Each test runs the same steps on two stores, one row
at a time and batched, and compares them. (``Store.intake`` and ``Store.grant`` are the batch
transitions given one row: for them this compares one row a statement with many; ``finish`` has
its own statements.)"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from yadtqd import messages as m
from yadtqd.store import Store
from yadtqd.store.batches import CHUNK


def sub(task_id: str, args: list[Any] | None = None, **fields: Any) -> m.Submission:
    return m.Submission(task_id=task_id, task="add", args=[1, 2] if args is None else args, **fields)


def finished(task_id: str, attempt: int = 1, result: bytes = b"3", epoch: str = "e1",
             ts: float = 0.0, started: float | None = None) -> m.Finished:
    return m.Finished(worker="w", epoch=epoch, ts=ts, task_id=task_id, attempt=attempt,
                      status="success", result=msgspec.Raw(result), started=started)


def state(store: Store) -> tuple[list[tuple[Any, ...]], ...]:
    """Everything the transitions write, in order."""
    return tuple([tuple(r) for r in store.db.execute(sql)] for sql in (
        "SELECT * FROM tasks ORDER BY seq", "SELECT * FROM status_counts ORDER BY status",
        "SELECT tbl, key, count(*) FROM changelog_pending GROUP BY tbl, key ORDER BY tbl, key"))


def twins(tmp_path: Path, setup: Callable[[Store], None]) -> tuple[Store, Store]:
    """Two stores alike, changes noted as the active server notes them."""
    stores = []
    for name in ("one", "many"):
        store = Store(tmp_path / f"{name}.sqlite", create=True)
        store.capture()
        with store.transaction():
            setup(store)
        stores.append(store)
    assert state(stores[0]) == state(stores[1])
    return stores[0], stores[1]


def test_intake_many_makes_what_intake_makes_one_by_one(tmp_path: Path) -> None:
    def setup(store: Store) -> None:
        store.intake(sub("old"), 1.0)
        store.intake(sub("gone"), 1.0)
        store.db.execute("UPDATE tasks SET status = 'success', finished_at = 1.0 WHERE id = 'gone'")
        store.purge_tasks(["success"], 2.0, 2.0)

    one, many = twins(tmp_path, setup)
    subs = [sub("a"), sub("old"), sub("old", [9]), sub("b", priority=3), sub("a"), sub("a", [7]),
            sub("gone"), sub("later", delay=60.0), sub("c", limit_key="k"),
            sub("chain", then=m.FollowUp(task="add", args=[1])), sub("chain")]
    with one.transaction():
        alone = [one.intake(s, 10.0) for s in subs]
    with many.transaction():
        batched = many.intake_many(subs, 10.0)
    assert batched == alone
    assert [i.outcome for i in batched] == ["new", "duplicate", "conflict", "new", "duplicate",
                                            "conflict", "duplicate", "new", "new", "new", "conflict"]
    assert state(many) == state(one)


def test_intake_many_past_one_statement_keeps_the_order(tmp_path: Path) -> None:
    one, many = twins(tmp_path, lambda store: None)
    subs = [sub(f"t{i:05d}") for i in range(CHUNK * 2 + 7)]
    subs += [sub("t00000"), sub(f"t{CHUNK:05d}", [5])]  # ids of earlier statements again
    with one.transaction():
        alone = [one.intake(s, 5.0) for s in subs]
    with many.transaction():
        batched = many.intake_many(subs, 5.0)
    assert batched == alone
    assert [i.outcome for i in batched[-3:]] == ["new", "duplicate", "conflict"]
    assert state(many) == state(one)
    assert [r[0] for r in many.db.execute("SELECT id FROM tasks ORDER BY seq")] == [
        s.task_id for s in subs[:-2]]


def test_grant_many_grants_what_grant_grants_one_by_one(tmp_path: Path) -> None:
    def setup(store: Store) -> None:
        for i in range(6):
            store.intake(sub(f"t{i}"), float(i))
        store.grant("t5", "w", "e0", 6.0, 1)  # not queued any more

    one, many = twins(tmp_path, setup)
    wanted = [("t0", "w", "e1", 1), ("t5", "w", "e1", 2), ("t1", "v", "e2", 1), ("t2", "w", "e1", 3),
              ("nope", "w", "e1", 4)]
    with one.transaction():
        alone = {t: g for t, w, e, n in wanted if (g := one.grant(t, w, e, 10.0, n)) is not None}
    with many.transaction():
        batched = many.grant_many(wanted, 10.0)
    assert batched == alone
    assert sorted(batched) == ["t0", "t1", "t2"]
    assert state(many) == state(one)


def test_grant_many_refuses_a_task_twice(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite", create=True)
    store.intake(sub("t"), 1.0)
    with pytest.raises(ValueError, match="twice"):
        store.grant_many([("t", "w", "e1", 1), ("t", "v", "e2", 1)], 2.0)
    assert store.task_rows(["t"])["t"]["status"] == "queued"


def test_succeed_many_ends_what_finish_ends_one_by_one(tmp_path: Path) -> None:
    chained = ("chain", "lost")

    def setup(store: Store) -> None:
        for i, task_id in enumerate(("a", "b", "c", "d", "chain", "done", "e", "lost", "asked")):
            store.intake(sub(task_id, then=m.FollowUp(task="add") if task_id in chained else None),
                         float(i))
            store.grant(task_id, "w", "e1", 10.0 + i, i + 1)
        store.start(m.Started(worker="w", epoch="e1", ts=20.0, task_id="b", attempt=1), 20.0)
        store.finish(finished("done"), 30.0, 30.0)
        store.finish(finished("lost", result=b"7"), 30.0, 30.0)
        store.db.execute("DELETE FROM tasks WHERE id = ?", (m.follow_up_id("lost"),))  # lost with a chunk
        assert store.cancel("asked", 31.0, "cancelled by a test")[0] == "cancelling"

    one, many = twins(tmp_path, setup)
    ends = [(finished("a", ts=40.0), 40.0, 39.5), (finished("b", result=b'"x"', ts=41.0), 41.0, None),
            (finished("c", attempt=2), 42.0, None), (finished("d", epoch="e0"), 42.0, None),
            (finished("a", ts=40.0), 40.0, 39.5), (finished("chain", result=b"[1]"), 43.0, None),
            (finished("e"), 43.5, None), (finished("done"), 44.0, None),
            (finished("never"), 45.0, None), (finished("lost", result=b"7"), 46.0, None),
            (finished("asked"), 47.0, None)]
    with one.transaction():
        alone = [one.finish(ev, 50.0, at, began) for ev, at, began in ends]
    with many.transaction():
        batched = many.succeed_many(ends, 50.0)
    assert batched == alone
    assert batched == ["success", "success", "stale", "stale", "stale", "success", "success", "stale",
                       "stale", "stale", "success"]
    assert state(many) == state(one)
    rows = many.task_rows(["a", "b", "asked", m.follow_up_id("chain"), m.follow_up_id("lost")])
    assert (rows["a"]["started_at"], rows["a"]["result"]) == (39.5, "3")
    assert rows["b"]["started_at"] == 20.0  # its start applied before keeps its time
    assert rows["asked"]["status"] == "success"  # it ended before it could be cancelled
    assert rows[m.follow_up_id("chain")]["payload"] == m.Submission(task_id="x", task="add", args=[[1]]).payload()
    assert rows[m.follow_up_id("lost")]["status"] == "queued"  # queued again by the repeat


def test_succeed_many_past_one_statement(tmp_path: Path) -> None:
    count = CHUNK + 3

    def setup(store: Store) -> None:
        for i in range(count):
            store.intake(sub(f"t{i}"), 1.0)
            store.grant(f"t{i}", "w", "e1", 2.0, i + 1)

    one, many = twins(tmp_path, setup)
    ends = [(finished(f"t{i}"), 3.0, None) for i in range(count)]
    with one.transaction():
        alone = [one.finish(ev, 3.0, at, began) for ev, at, began in ends]
    with many.transaction():
        assert many.succeed_many(ends, 3.0) == alone == ["success"] * count
    assert state(many) == state(one)


def test_batches_of_any_size_are_statements_of_a_few_texts(tmp_path: Path) -> None:
    """However many rows a turn brings, intake, grants and successes run statements of at most
    ten texts each (a connection prepares and caches each once: :mod:`yadtqd.store.chunks`)."""
    store = Store(tmp_path / "s.sqlite", create=True)
    db, texts = store.db, []

    class Counting:
        def execute(self, sql: str, *args: Any) -> Any:
            texts.append(sql)
            return db.execute(sql, *args)

        def __getattr__(self, name: str) -> Any:
            return getattr(db, name)

    store.db = Counting()  # type: ignore[assignment]
    done = 0
    for size in range(1, 1200, 41):
        ids = [f"t{done + i:06d}" for i in range(size)]
        done += size
        with store.transaction():
            intake = store.intake_many([sub(t) for t in ids], 1.0)
            assert [(i.task_id, i.outcome) for i in intake] == [(t, "new") for t in ids]
            assert len(store.grant_many([(t, "w", "e1", n) for n, t in enumerate(ids)], 2.0)) == size
            assert store.succeed_many([(finished(t), 3.0, None) for t in ids], 3.0) == ["success"] * size
    store.db = db
    for verb in ("INSERT OR IGNORE INTO tasks", "UPDATE tasks SET status = 'assigned'",
                 "UPDATE tasks SET status = 'success'"):
        used = [t for t in texts if t.startswith(verb)]
        assert len(used) > 100 and len(set(used)) == 10, verb  # 512, 256, ... 1 rows
