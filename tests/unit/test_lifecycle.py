"""The task lifecycle in the store (issue 14): priorities, delays, cancel, retry, retention;
and the orders on the ``tasks`` topic. Real SQLite files; the flow through real daemons is
tests/integration/test_lifecycle.py."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from yadtqd import messages as m
from yadtqd import protocol
from yadtqd.errors import BadMessage
from yadtqd.store import Store
from tests.unit.test_store import finished, hello, started


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "db.sqlite", create=True)
    hello(s)
    return s


def submit(store: Store, task_id: str, now: float = 10.0, **fields: object) -> None:
    sub = msgspec.convert({"task-id": task_id, "task": "add", "args": [1, 2], **fields}, m.Submission)
    with store.transaction():
        store.intake(sub, now)


def status(store: Store, task_id: str) -> str:
    row = store.task_rows([task_id]).get(task_id)
    return row["status"] if row is not None else "unknown"


def test_higher_priority_first_then_oldest_first(store: Store) -> None:
    for task_id, priority in (("low1", 0), ("high1", 5), ("low2", 0), ("high2", 5), ("urgent", 9),
                              ("neg", -1)):
        submit(store, task_id, priority=priority)
    assert [w.task_id for w in store.waiting(["add"], 10, 10.0)] == ["urgent", "high1", "high2", "low1",
                                                                      "low2", "neg"]
    assert [w.task_id for w in store.waiting(["add"], 2, 10.0)] == ["urgent", "high1"]


def test_a_delayed_task_is_scheduled_until_due_then_queued(store: Store) -> None:
    submit(store, "later", now=10.0, delay=5)
    submit(store, "at", now=10.0, eta="1970-01-01T00:00:12+00:00")
    submit(store, "past", now=10.0, eta="1970-01-01T00:00:01Z")  # due already: queued at once
    assert [status(store, t) for t in ("later", "at", "past")] == ["scheduled", "scheduled", "queued"]
    assert [w.task_id for w in store.waiting(["add"], 10, 20.0)] == ["past"]  # never read while scheduled
    with store.transaction():
        assert store.promote_due(12.0) == 1
    assert [status(store, t) for t in ("later", "at")] == ["scheduled", "queued"]
    with store.transaction():
        assert store.promote_due(15.0) == 1
    assert status(store, "later") == "queued"
    view = protocol.task_view(store.task_rows(["later"])["later"])
    assert view["status"] == "queued" and "due_at" not in view


def test_a_scheduled_task_shows_when_it_is_due(store: Store) -> None:
    submit(store, "later", now=10.0, delay=5)
    view = protocol.task_view(store.task_rows(["later"])["later"])
    assert view["status"] == "scheduled" and view["due_at"] == protocol.iso(15.0)


@pytest.mark.parametrize("body, problem", [
    ({"eta": "tomorrow"}, "is not an ISO 8601 time"),
    ({"eta": "2026-12-01T10:00:00Z", "delay": 1}, "give delay or eta, not both"),
    ({"delay": -1}, "Expected `float` >= 0"),
    ({"priority": 10**9}, "Expected `int` <= 1000000"),
])
def test_bad_timing_fields_fail_the_submission_naming_the_problem(body: dict, problem: str) -> None:
    raw = json.dumps({"task-id": "t1", "task": "add", **body}).encode()
    with pytest.raises(BadMessage, match=problem) as caught:
        m.parse_submission(raw, 10_000)
    assert caught.value.task_id == "t1"  # recorded as failed, not skipped


def test_orders_are_told_from_submissions() -> None:
    assert isinstance(m.parse_tasks_message(b'{"task-id": "t1", "task": "add", "args": [1, 2]}', 1000),
                      m.Submission)
    order = m.parse_tasks_message(b'{"op": "cancel", "task-id": "t1", "ts": 5}', 1000)
    assert isinstance(order, m.Control) and (order.op, order.task_id) == ("cancel", "t1")
    with pytest.raises(BadMessage, match="invalid order") as caught:
        m.parse_tasks_message(b'{"op": "cancel"}', 1000)  # no task-id
    assert caught.value.task_id is None  # a bad order fails no task
    with pytest.raises(BadMessage, match="invalid submission"):  # not an order: a submission
        m.parse_tasks_message(b'{"op": "explode", "task-id": "t1"}', 1000)
    sub = m.parse_tasks_message(b'{"op": "submit", "task-id": "t1", "task": "add"}', 1000)
    assert isinstance(sub, m.Submission) and sub.task == "add"
    with pytest.raises(BadMessage, match="a purge needs older_than"):
        m.parse_tasks_message(b'{"op": "purge"}', 1000)


def test_cancel_of_a_waiting_task_ends_it_at_once(store: Store) -> None:
    submit(store, "queued")
    submit(store, "scheduled", delay=100)
    with store.transaction():
        assert store.cancel("queued", 11.0, "by test")[0] == "cancelled"
        assert store.cancel("scheduled", 11.0, "by test")[0] == "cancelled"
        assert store.cancel("nope", 11.0, "by test") == ("unknown", None)
    view = protocol.task_view(store.task_rows(["queued"])["queued"])
    assert view["status"] == "cancelled" and view["error"] == {"type": "Cancelled", "message": "by test"}
    assert store.waiting(["add"], 10, 20.0) == []


def test_cancel_of_a_held_task_waits_for_the_worker(store: Store) -> None:
    submit(store, "t1")
    with store.transaction():
        store.grant("t1", "w", "e1", 11.0, 1)
        store.start(started("t1", 1), 11.5)
        outcome, row = store.cancel("t1", 12.0, "by test")
    assert outcome == "cancelling" and row is not None and (row["epoch"], row["attempt"]) == ("e1", 1)
    assert status(store, "t1") == "processing"
    assert protocol.task_view(store.task_rows(["t1"])["t1"])["cancelling"] is True
    assert [r["id"] for r in store.cancelling()] == ["t1"]
    with store.transaction():
        assert store.finish(finished("t1", 1, status="cancelled"), 13.0) == "cancelled"
    view = protocol.task_view(store.task_rows(["t1"])["t1"])
    assert view["status"] == "cancelled" and view["error"]["message"] == "by test"
    assert store.cancelling() == []


def test_a_task_that_ends_first_keeps_its_result(store: Store) -> None:
    submit(store, "t1")
    with store.transaction():
        store.grant("t1", "w", "e1", 11.0, 1)
        store.cancel("t1", 12.0, "by test")
        assert store.finish(finished("t1", 1, result=b"3"), 13.0) == "success"
        assert store.cancel("t1", 14.0, "by test")[0] == "ended"
    view = protocol.task_view(store.task_rows(["t1"])["t1"])
    assert (view["status"], view["result"]) == ("success", 3) and "error" not in view


def test_a_cancelled_task_is_not_retried_after_a_failure(store: Store) -> None:
    sub = msgspec.convert({"task-id": "t1", "task": "add", "options": {"max_retries": 5}}, m.Submission)
    with store.transaction():
        store.intake(sub, 10.0)
        store.grant("t1", "w", "e1", 11.0, 1)
        store.cancel("t1", 12.0, "by test")
        assert store.finish(finished("t1", 1, status="failed"), 13.0) == "failed"


def test_a_dead_workers_cancelled_task_ends_cancelled_not_requeued(store: Store) -> None:
    submit(store, "t1")
    submit(store, "t2")
    with store.transaction():
        store.grant("t1", "w", "e1", 11.0, 1)
        store.grant("t2", "w", "e1", 11.0, 2)
        store.start(started("t1", 1), 11.5)
        store.cancel("t1", 12.0, "by test")
        assert store.declare_dead("e1", "test", 13.0, 3) == ["t2"]
    assert (status(store, "t1"), status(store, "t2")) == ("cancelled", "queued")


def test_a_handed_back_cancelled_grant_ends_cancelled(store: Store) -> None:
    submit(store, "t1")
    with store.transaction():
        store.grant("t1", "w", "e1", 11.0, 1)
        store.cancel("t1", 12.0, "by test")
        assert store.hand_back("e1", [m.TaskRef(task_id="t1", attempt=1)]) == ([], ["t1"])
    assert status(store, "t1") == "cancelled"


def test_retry_queues_a_new_attempt_and_keeps_the_history(store: Store) -> None:
    submit(store, "t1")
    with store.transaction():
        store.grant("t1", "w", "e1", 11.0, 1)
        store.finish(finished("t1", 1, status="failed"), 12.0)
        assert store.retry_task("t1", 13.0) == "retried"
    row = store.task_rows(["t1"])["t1"]
    assert (row["status"], row["error"], row["finished_at"]) == ("queued", None, None)
    with store.transaction():
        grant = store.grant("t1", "w", "e1", 14.0, 2)
    assert grant is not None and grant.attempt == 2
    view = protocol.task_view(store.task_rows(["t1"])["t1"])
    assert [(h["attempt"], h["status"], h["error"]["type"]) for h in view["history"]] == [(1, "failed", "E")]
    with store.transaction():
        assert store.retry_task("t1", 15.0) == "not_ended"
        store.finish(finished("t1", 2), 16.0)
        assert store.retry_task("t1", 17.0) == "succeeded"
        assert store.retry_task("nope", 17.0) == "unknown"


def test_retention_deletes_old_terminal_tasks_in_batches_and_remembers_them(store: Store) -> None:
    for n in range(7):
        submit(store, f"t{n}")
        with store.transaction():
            store.grant(f"t{n}", "w", "e1", 11.0, n + 1)
            store.finish(finished(f"t{n}", 1), 20.0 + n)
    submit(store, "waiting")
    with store.transaction():
        assert store.purge_tasks(("success",), 25.0, 100.0, limit=3) == 3  # t0, t1, t2: oldest first
        assert store.purge_tasks(("success",), 25.0, 100.0, limit=3) == 2
        assert store.purge_tasks(("success",), 25.0, 100.0, limit=3) == 0
    assert sorted(store.task_rows([f"t{n}" for n in range(7)])) == ["t5", "t6"]
    assert status(store, "waiting") == "queued"  # never a task that has not ended
    assert set(store.purged(["t0", "t4", "t5", "nope"])) == {"t0", "t4"}
    view = protocol.task_view(None, purged_at=store.purged(["t0"])["t0"])
    assert view == {"status": "unknown", "result": None, "purged": True, "purged_at": protocol.iso(100.0)}
    with store.transaction():
        assert store.forget_purged(101.0) == 5
    assert store.purged(["t0"]) == {}


def test_a_purge_order_is_kept_until_done(store: Store) -> None:
    with store.transaction():
        store.order_purge(50.0, [], 60.0)
    order = store.next_purge_order()
    assert order is not None and json.loads(order["statuses"]) == ["success", "failed", "cancelled"]
    with store.transaction():
        store.purge_order_progress(order["seq"], 500, done=False)
    assert store.next_purge_order()["deleted"] == 500
    with store.transaction():
        store.purge_order_progress(order["seq"], 3, done=True)
    assert store.next_purge_order() is None


def test_a_success_queues_its_follow_up_once_with_the_result_first(store: Store) -> None:
    submit(store, "p", then={"task": "mul", "args": [10], "then": {"task": "echo"}})
    with store.transaction():
        store.grant("p", "w", "e1", 11.0, 1)
        assert store.finish(finished("p", 1, result=b"3"), 12.0) == "success"
        assert store.queue_follow_up("p", "3", 13.0) == "p.then"  # again: nothing new
    child = store.task_rows(["p.then"])["p.then"]
    assert (child["status"], child["name"], child["parent"]) == ("queued", "mul", "p")
    assert json.loads(child["payload"])[:2] == ["mul", [3, 10]]
    assert protocol.task_view(store.task_rows(["p"])["p"])["then"] == "p.then"
    assert protocol.task_view(child)["parent"] == "p"
    with store.transaction():
        store.grant("p.then", "w", "e1", 14.0, 2)
        store.finish(finished("p.then", 1, result=b"30"), 15.0)
    grandchild = store.task_rows(["p.then.then"])["p.then.then"]
    assert json.loads(grandchild["payload"])[:2] == ["echo", [30]] and grandchild["then_task"] is None


def test_a_failure_or_a_cancel_queues_no_follow_up(store: Store) -> None:
    submit(store, "f", then={"task": "mul"})
    submit(store, "c", then={"task": "mul"})
    with store.transaction():
        store.grant("f", "w", "e1", 11.0, 1)
        store.finish(finished("f", 1, status="failed"), 12.0)
        store.cancel("c", 12.0, "by test")
    assert store.task_rows(["f.then", "c.then"]) == {}


def test_a_long_id_gets_a_follow_up_id_that_fits() -> None:
    long_id = "x" * 128
    child = m.follow_up_id(long_id)
    assert len(child) <= 128 and child.endswith(".then") and child == m.follow_up_id(long_id)
    assert m.parse_submission(json.dumps({"task-id": child, "task": "add"}).encode(), 1000).task_id == child


def test_the_same_id_with_another_follow_up_is_a_conflict(store: Store) -> None:
    submit(store, "p", then={"task": "mul"})
    sub = msgspec.convert({"task-id": "p", "task": "add", "args": [1, 2], "then": {"task": "div"}}, m.Submission)
    with store.transaction():
        assert store.intake(sub, 11.0).outcome == "conflict"


def test_the_queued_names_are_a_skip_scan_of_the_queue_index(store: Store) -> None:
    """queued_names reads one index entry per name, not every queued task (SQLite, left to
    itself, took the equality on status of tasks_by_status: 534 ms for 200,000 queued tasks)."""
    for i in range(30):
        submit(store, f"t{i}", task=f"n{i % 3}")
    executed: list[str] = []
    store.db.set_trace_callback(executed.append)
    assert store.queued_names() == ["n0", "n1", "n2"]
    store.db.set_trace_callback(None)
    plan = [r[3] for r in store.db.execute(f"EXPLAIN QUERY PLAN {executed[-1]}")]
    assert sum("tasks_waiting" in step for step in plan) == 2, plan
    assert not any("tasks_by_status" in step for step in plan), plan


@pytest.mark.parametrize("query, index", [
    ("SELECT id FROM tasks INDEXED BY tasks_scheduled WHERE status = 'scheduled' AND run_after <= 5"
     " ORDER BY run_after LIMIT 10", "tasks_scheduled"),
    ("SELECT id FROM tasks WHERE status = 'success' AND finished_at < 5 ORDER BY finished_at LIMIT 10",
     "tasks_ended (status=? AND finished_at<?)"),
    ("SELECT priority, seq, id FROM tasks WHERE status = 'queued' AND name = 'a' AND run_after <= 5"
     " ORDER BY priority DESC, seq LIMIT 5", "tasks_waiting (name=?)"),
    ("SELECT id FROM tasks WHERE status = 'queued' AND name = 'a' AND submitted_at < 5"
     " ORDER BY priority DESC, seq LIMIT 5", "tasks_waiting (name=?)"),
])
def test_the_lifecycle_queries_read_by_their_index(store: Store, query: str, index: str) -> None:
    """The shapes of promote_due, purge_tasks, waiting and fail_unroutable: an index range, no
    scan, no sort (100,000 scheduled or a week of successes must cost nothing until due). The
    last two read a partial index (queued tasks only): their "status = 'queued'" is its WHERE."""
    plan = " ".join(r[3] for r in store.db.execute(f"EXPLAIN QUERY PLAN {query}"))
    assert f"USING INDEX {index}" in plan and "TEMP B-TREE" not in plan, plan


def test_a_purged_id_submitted_again_is_a_duplicate(store: Store) -> None:
    submit(store, "t1")
    with store.transaction():
        store.grant("t1", "w", "e1", 11.0, 1)
        store.finish(finished("t1", 1), 12.0)
        store.purge_tasks(("success",), 13.0, 14.0)
    sub = msgspec.convert({"task-id": "t1", "task": "add", "args": [1, 2]}, m.Submission)
    with store.transaction():
        assert store.intake(sub, 15.0).outcome == "duplicate"  # it ran once: not again
    assert status(store, "t1") == "unknown"


def test_a_retry_order_delivered_twice_retries_once(store: Store) -> None:
    submit(store, "t1")
    with store.transaction():
        store.grant("t1", "w", "e1", 11.0, 1)
        store.finish(finished("t1", 1, status="failed"), 12.0)
        assert store.retry_task("t1", 13.0, attempt=1) == "retried"
        store.grant("t1", "w", "e1", 14.0, 2)
        store.finish(finished("t1", 2, status="failed"), 15.0)
        assert store.retry_task("t1", 16.0, attempt=1) == "stale"  # the same order again
    assert status(store, "t1") == "failed"


def test_a_cancelled_finish_without_a_cancel_is_stale(store: Store) -> None:
    submit(store, "t1")
    with store.transaction():
        store.grant("t1", "w", "e1", 11.0, 1)
        assert store.finish(finished("t1", 1, status="cancelled"), 12.0) == "stale"
    assert status(store, "t1") == "assigned"
