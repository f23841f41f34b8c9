"""The grant plan: most free capacity first, ties to the least recently granted, routing."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from yadtqd import messages as m
from yadtqd.server.scheduler import Member, Scheduler
from yadtqd.store import Store


def _store(tmp_path: Path, names: list[str]) -> Store:
    store = Store(tmp_path / "db.sqlite", create=True)
    for i, name in enumerate(names):
        store.intake(m.Submission(task_id=f"t{i}", task=name), float(i))
    return store


def test_equal_workers_share_grants_evenly(tmp_path: Path) -> None:
    store = _store(tmp_path, ["add"] * 12)
    sched = Scheduler()
    for w in ("a", "b", "c"):
        sched.join(Member(epoch=w, worker=w, capacity=4, tasks=frozenset({"add"}), partition=0))
    grants = sched.plan(store, 100.0)
    assert Counter(g.worker for g in grants) == {"a": 4, "b": 4, "c": 4}
    assert [g.worker for g in grants[:3]] == ["a", "b", "c"]  # round robin on ties


def test_the_worker_with_most_room_gets_the_task(tmp_path: Path) -> None:
    store = _store(tmp_path, ["add"])
    sched = Scheduler()
    sched.join(Member(epoch="busy", worker="busy", capacity=4, tasks=frozenset({"add"}), partition=0,
                      outstanding=3))
    sched.join(Member(epoch="idle", worker="idle", capacity=4, tasks=frozenset({"add"}), partition=0,
                      outstanding=1))
    (grant,) = sched.plan(store, 100.0)
    assert grant.worker == "idle"


def test_tasks_go_only_to_workers_that_advertise_them(tmp_path: Path) -> None:
    store = _store(tmp_path, ["sleep", "add", "sleep", "nobody"])
    sched = Scheduler()
    sched.join(Member(epoch="a", worker="a", capacity=10, tasks=frozenset({"add"}), partition=0))
    sched.join(Member(epoch="d", worker="d", capacity=10, tasks=frozenset({"sleep"}), partition=0))
    grants = {g.task_id: g.worker for g in sched.plan(store, 100.0)}
    assert grants == {"t0": "d", "t1": "a", "t2": "d"}
    assert store.task_rows(["t3"])["t3"]["status"] == "queued"


def test_no_grants_beyond_capacity_or_to_leaving_workers(tmp_path: Path) -> None:
    store = _store(tmp_path, ["add"] * 5)
    sched = Scheduler()
    sched.join(Member(epoch="a", worker="a", capacity=2, tasks=frozenset({"add"}), partition=0))
    sched.join(Member(epoch="l", worker="l", capacity=9, tasks=frozenset({"add"}), partition=0,
                      accepting=False))
    assert len(sched.plan(store, 100.0)) == 2
    assert sched.plan(store, 100.0) == []
    sched.released("a")
    assert [g.task_id for g in sched.plan(store, 100.0)] == ["t2"]
