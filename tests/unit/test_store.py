"""The store's state machine and its invariants (DESIGN section 4), on a real SQLite file."""

from __future__ import annotations

import threading
from pathlib import Path

import msgspec
import pytest

from yadtqd import messages as m
from yadtqd.store import Store, runs_counted


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "db.sqlite", create=True)


def sub(task_id: str = "t1", task: str = "add", args: list | None = None, **options: object) -> m.Submission:
    return m.Submission(task_id=task_id, task=task, args=args if args is not None else [1, 2],
                        options=m.Options(**options))  # type: ignore[arg-type]


def hello(store: Store, worker: str = "w", epoch: str = "e1") -> list[str] | None:
    ev = m.Hello(worker=worker, epoch=epoch, ts=0, host="h", pid=1, slots=2, prefetch=2,
                 tasks={"add": m.TaskInfo(plugin="arith")}, version="0")
    return store.hello(ev, 1.0, 0, 0)


def started(task_id: str, attempt: int, worker: str = "w", epoch: str = "e1") -> m.Started:
    return m.Started(worker=worker, epoch=epoch, ts=0, task_id=task_id, attempt=attempt)


def finished(task_id: str, attempt: int, status: str = "success", result: bytes = b"3",
             worker: str = "w", epoch: str = "e1") -> m.Finished:
    error = m.ErrorInfo(type="E", message="boom") if status == "failed" else None
    return m.Finished(worker=worker, epoch=epoch, ts=0, task_id=task_id, attempt=attempt,
                      status=status, result=msgspec.Raw(result), error=error)  # type: ignore[arg-type]


def status(store: Store, task_id: str) -> str:
    return store.task_rows([task_id])[task_id]["status"]


def test_intake_is_idempotent_and_detects_conflicts(store: Store) -> None:
    assert store.intake(sub(), 1.0).outcome == "new"
    assert store.intake(sub(), 2.0).outcome == "duplicate"
    assert store.intake(sub(args=[5, 5]), 3.0).outcome == "conflict"
    row = store.task_rows(["t1"])["t1"]
    assert (row["status"], row["submitted_at"]) == ("queued", 1.0)
    assert row["payload"] == sub().payload()


def test_invalid_intake_never_touches_a_known_id(store: Store) -> None:
    store.intake(sub(), 1.0)
    assert not store.intake_invalid("t1", m.ErrorInfo(type="BadSubmission", message="x"), 2.0)
    assert status(store, "t1") == "queued"
    assert store.intake_invalid("t2", m.ErrorInfo(type="BadSubmission", message="x"), 2.0)
    assert status(store, "t2") == "failed"


def test_full_lifecycle(store: Store) -> None:
    store.intake(sub(), 1.0)
    hello(store)
    grant = store.grant("t1", "w", "e1", 2.0)
    assert grant is not None and grant.attempt == 1
    assert status(store, "t1") == "assigned"
    assert store.start(started("t1", 1), 3.0)
    assert status(store, "t1") == "processing"
    assert store.finish(finished("t1", 1), 4.0) == "success"
    row = store.task_rows(["t1"])["t1"]
    assert (row["status"], row["result"], row["finished_at"]) == ("success", "3", 4.0)
    store.count_runs({"e1": runs_counted("success") or ()})
    worker = store.all_workers()[0]
    assert (worker["executed"], worker["succeeded"], worker["failed_runs"]) == (1, 1, 0)


def test_grant_only_from_queued(store: Store) -> None:
    store.intake(sub(), 1.0)
    assert store.grant("t1", "w", "e1", 2.0) is not None
    assert store.grant("t1", "w2", "e2", 2.0) is None
    assert store.grant("missing", "w", "e1", 2.0) is None


def test_many_threads_racing_to_grant_one_task_exactly_one_wins(tmp_path: Path) -> None:
    path = tmp_path / "race.sqlite"
    Store(path, create=True).intake(sub(), 1.0)
    barrier = threading.Barrier(16)
    wins: list[str] = []

    def contender(n: int) -> None:
        mine = Store(path)
        barrier.wait()
        with mine.transaction():
            if mine.grant("t1", f"w{n}", f"e{n}", 2.0) is not None:
                wins.append(f"w{n}")
        mine.close()

    threads = [threading.Thread(target=contender, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    row = Store(path).task_rows(["t1"])["t1"]
    assert (row["worker"], row["attempt"]) == (wins[0], 1)


def test_events_for_another_grant_are_stale_and_change_nothing(store: Store) -> None:
    store.intake(sub(), 1.0)
    store.grant("t1", "w", "e1", 2.0)
    assert not store.start(started("t1", 1, epoch="old"), 3.0)
    assert not store.start(started("t1", 2), 3.0)
    assert not store.start(started("t1", 1, worker="other"), 3.0)
    assert store.finish(finished("t1", 1, epoch="old"), 3.0) == "stale"
    assert status(store, "t1") == "assigned"


def test_terminal_status_is_never_overwritten(store: Store) -> None:
    store.intake(sub(), 1.0)
    store.grant("t1", "w", "e1", 2.0)
    assert store.finish(finished("t1", 1), 3.0) == "success"
    assert store.finish(finished("t1", 1, status="failed"), 4.0) == "stale"
    assert store.finish(finished("t1", 1, result=b"99"), 4.0) == "stale"
    assert not store.start(started("t1", 1), 5.0)
    row = store.task_rows(["t1"])["t1"]
    assert (row["status"], row["result"]) == ("success", "3")


def test_failure_with_retries_left_requeues_after_backoff(store: Store) -> None:
    store.intake(sub(max_retries=2, retry_backoff=10.0), 1.0)
    store.grant("t1", "w", "e1", 2.0)
    assert store.finish(finished("t1", 1, status="failed"), 100.0) == "retry"
    row = store.task_rows(["t1"])["t1"]
    assert (row["status"], row["failures"], row["run_after"]) == ("queued", 1, 110.0)
    assert store.waiting(["add"], 10, 105.0) == []
    assert [w.task_id for w in store.waiting(["add"], 10, 110.0)] == ["t1"]
    store.grant("t1", "w", "e1", 110.0)
    assert store.finish(finished("t1", 2, status="failed"), 200.0) == "retry"
    assert store.task_rows(["t1"])["t1"]["run_after"] == 220.0  # backoff doubles
    store.grant("t1", "w", "e1", 220.0)
    assert store.finish(finished("t1", 3, status="failed"), 300.0) == "failed"
    assert status(store, "t1") == "failed"


def test_waiting_is_oldest_first_and_only_for_provided_names(store: Store) -> None:
    for i, name in enumerate(["add", "sleep", "add", "echo", "add"]):
        store.intake(sub(f"t{i}", task=name), float(i))
    assert [w.task_id for w in store.waiting(["add", "echo"], 10, 9.0)] == ["t0", "t2", "t3", "t4"]
    assert [w.task_id for w in store.waiting(["add"], 2, 9.0)] == ["t0", "t2"]
    assert store.waiting([], 10, 9.0) == []


def test_waiting_reads_only_the_names_that_have_tasks_queued(store: Store) -> None:
    provided = ["add", "echo", "sleep", "mul", "div", "fail"]
    statements: list[str] = []
    store.db.set_trace_callback(statements.append)
    assert store.waiting(provided, 10, 9.0) == []
    assert len(statements) == 1  # the queue's names: none, so no query per provided name
    store.db.set_trace_callback(None)
    for i, name in enumerate(["echo", "add", "echo"]):
        store.intake(sub(f"t{i}", task=name), float(i))
    statements.clear()
    store.db.set_trace_callback(statements.append)
    assert [w.task_id for w in store.waiting(provided, 10, 9.0)] == ["t0", "t1", "t2"]
    store.db.set_trace_callback(None)
    assert len(statements) == 3  # the names, then one query each for add and echo


def test_waiting_past_many_queued_names_reads_each_provided_name(store: Store) -> None:
    from yadtqd.store.transitions import QUEUED_NAMES_MORE

    with store.transaction():
        for i in range(QUEUED_NAMES_MORE + 10):  # more names queued than it reads first
            store.intake(sub(f"other{i}", task=f"a{i:03d}"), float(i))
        store.intake(sub("mine", task="zzz"), 500.0)  # its name sorts after all of them
    assert [w.task_id for w in store.waiting(["zzz", "none"], 10, 999.0)] == ["mine"]
    assert [w.task_id for w in store.waiting(["a001", "zzz"], 10, 999.0)] == ["other1", "mine"]


def test_declare_dead_requeues_then_fails_after_max_attempts(store: Store) -> None:
    store.intake(sub(), 1.0)
    for life in range(1, 4):
        epoch = f"e{life}"
        hello(store, epoch=epoch)
        store.grant("t1", "w", epoch, 2.0)
        store.start(started("t1", life, epoch=epoch), 2.5)
        requeued = store.declare_dead(epoch, "no heartbeat", 3.0, max_attempts=3)
        if life < 3:
            assert requeued == ["t1"] and status(store, "t1") == "queued"
    row = store.task_rows(["t1"])["t1"]
    assert (row["status"], row["lost"]) == ("failed", 3)
    assert "WorkerLost" in row["error"]
    failures = store.failure_rows()
    assert len(failures) == 3
    assert failures[0]["reason"] == "no heartbeat"


def test_a_failure_lists_the_started_tasks_first_and_counts_every_requeued_one(tmp_path: Path) -> None:
    """An epoch holding far more grants than a failure lists (a deep prefetch): the failure
    lists :data:`FAILURE_LISTED` ids, the started ones first, counts them all, and its
    changelog record fits what :func:`record_bytes` allows with the smallest size limits."""
    from yadtqd.changelog import encode, record_bytes
    from yadtqd.config import Config, ServerConfig, WorkerConfig
    from yadtqd.protocol import failure_view
    from yadtqd.store.transitions import FAILURE_LISTED

    store = Store(tmp_path / "db.sqlite", create=True)
    store.capture()
    held = 2 * FAILURE_LISTED + 100  # listing all would outgrow the record below
    ids = [f"{i:04d}" + "x" * 124 for i in range(held)]  # the longest ids a client may make
    with store.transaction():
        hello(store)
        for i, task_id in enumerate(ids):
            store.intake(sub(task_id), 1.0)
            store.grant(task_id, "w", "e1", 2.0 + i)
        for task_id in ids[-2:]:  # granted last, started first
            store.start(started(task_id, 1), 3.0)
        requeued = store.declare_dead("e1", "no heartbeat", 4.0, max_attempts=3)
    assert requeued == ids[-2:] + ids[:-2]
    view = failure_view(store.failure_rows()[0])
    assert view["requeued"] == requeued[:FAILURE_LISTED] and view["requeued_count"] == held
    changes, _ = store.pending_changes()
    (failure,) = [c for c in changes if c.table == "failures"]
    smallest = Config(kafka={}, server=ServerConfig(max_task_bytes=64),
                      worker=WorkerConfig(max_result_bytes=64))
    assert len(encode(failure)[1] or b"") <= record_bytes(smallest)


def test_declare_dead_requeues_unstarted_grants_without_counting_a_loss(store: Store) -> None:
    store.intake(sub(), 1.0)
    for life in range(1, 6):
        epoch = f"e{life}"
        hello(store, epoch=epoch)
        store.grant("t1", "w", epoch, 2.0)
        assert store.declare_dead(epoch, "no heartbeat", 3.0, max_attempts=3) == ["t1"]
    row = store.task_rows(["t1"])["t1"]
    assert (row["status"], row["lost"], row["attempt"]) == ("queued", 0, 5)


def test_declare_dead_only_once_and_dead_epochs_are_fenced(store: Store) -> None:
    store.intake(sub(), 1.0)
    hello(store)
    store.grant("t1", "w", "e1", 2.0)
    store.start(started("t1", 1), 2.5)
    assert store.declare_dead("e1", "gone", 3.0, 3) == ["t1"]
    assert store.declare_dead("e1", "gone", 3.0, 3) == []
    assert store.finish(finished("t1", 1), 4.0) == "stale"
    assert not store.heartbeat(m.Heartbeat(worker="w", epoch="e1", ts=0, slots=2, busy=0), 4.0)
    assert hello(store, epoch="e1") is None  # a dead epoch cannot come back
    assert len(store.failure_rows()) == 1


def test_hello_of_a_newer_epoch_names_the_older_live_ones(store: Store) -> None:
    assert hello(store, epoch="e1") == []
    assert hello(store, epoch="e2") == ["e1"]
    assert hello(store, worker="other", epoch="x1") == []


def test_hand_back_requeues_unstarted_grants_without_counting_a_loss(store: Store) -> None:
    store.intake(sub("a"), 1.0)
    store.intake(sub("b"), 1.0)
    hello(store)
    store.grant("a", "w", "e1", 2.0)
    store.grant("b", "w", "e1", 2.0)
    store.start(started("b", 1), 3.0)
    assert store.leave("e1")
    refs = [m.TaskRef(task_id="a", attempt=1), m.TaskRef(task_id="b", attempt=1)]
    assert store.hand_back("e1", refs) == (["a"], [])
    row = store.task_rows(["a"])["a"]
    assert (row["status"], row["lost"]) == ("queued", 0)
    assert status(store, "b") == "processing"


def test_offsets_are_saved_in_the_same_transaction(store: Store) -> None:
    with pytest.raises(RuntimeError):
        with store.transaction():
            store.intake(sub(), 1.0)
            store.save_offsets({("tasks", 0): 11})
            raise RuntimeError("crash before commit")
    assert store.offsets() == {}
    assert store.task_rows(["t1"]) == {}
    with store.transaction():
        store.intake(sub(), 1.0)
        store.save_offsets({("tasks", 0): 11, ("events", 2): 5})
    with store.transaction():
        store.save_offsets({("tasks", 0): 12})
    assert store.offsets() == {("tasks", 0): 12, ("events", 2): 5}


def test_database_is_in_wal_mode(store: Store) -> None:
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_status_counts_follow_every_transition(store: Store) -> None:
    def truth() -> dict[str, int]:
        rows = store.db.execute("SELECT status, count(*) FROM tasks GROUP BY status")
        return {r[0]: r[1] for r in rows}

    for i in range(4):
        store.intake(sub(f"t{i}"), 1.0)
    hello(store)
    store.intake_invalid("bad", m.ErrorInfo(type="BadSubmission", message="x"), 1.0)
    store.grant("t0", "w", "e1", 2.0)
    store.grant("t1", "w", "e1", 2.0)
    store.start(started("t0", 1), 3.0)
    store.finish(finished("t0", 1), 4.0)
    assert store.counts() == truth() == {"queued": 2, "assigned": 1, "success": 1, "failed": 1}
    store.declare_dead("e1", "gone", 5.0, 3)
    assert store.counts() == truth() == {"queued": 3, "success": 1, "failed": 1}


def test_waiting_never_reads_the_queued_tasks_of_names_nobody_provides(store: Store) -> None:
    """300,000 queued tasks no live worker can run must not be rescanned at every planning
    turn (issue 11, defect 11): the work is counted in SQLite VM steps, not in time."""
    with store.transaction():
        store.db.executemany(
            "INSERT INTO tasks (id, name, payload, status, submitted_at) VALUES (?, 'orphan', '[]',"
            " 'queued', 0)", [(f"o{i}",) for i in range(300_000)])
        store.intake(sub("mine", "add"), 1.0)
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    store.db.set_progress_handler(count, 100)
    found = store.waiting(["add"], 10, now=2.0)
    store.db.set_progress_handler(None, 0)
    assert [w.task_id for w in found] == ["mine"]
    assert steps < 10  # about 1,000 VM steps; a scan of the orphans takes millions


def test_grant_numbers_are_saved_and_resent_with_pending_grants(store: Store) -> None:
    hello(store)
    with store.transaction():
        store.intake(sub("a"), 1.0)
        grant = store.grant("a", "w", "e1", 2.0, grant_no=7)
        store.count_grants({"e1": 7})
    assert grant is not None and grant.grant_no == 7
    assert [g.grant_no for g in store.pending_grants()] == [7]
    assert store.live_workers()[0]["grants"] == 7
