"""The order in which a worker starts the grants it holds (issue 14: priorities under prefetch)."""

from __future__ import annotations

from yadtqd import messages as m
from yadtqd.worker.pending import Pending


def _run(task_id: str, priority: int = 0) -> m.Run:
    return m.Run(worker="w", epoch="e", task_id=task_id, attempt=1, task="add", priority=priority)


def test_held_grants_start_highest_priority_first_and_in_arrival_order_within_one() -> None:
    pending = Pending()
    for run in (_run("low1"), _run("low2"), _run("high1", 10), _run("mid", 5), _run("high2", 10),
                _run("low3"), _run("below", -1)):
        pending.hold(run)
    assert [r.task_id for r in pending] == ["high1", "high2", "mid", "low1", "low2", "low3", "below"]
    assert len(pending) == 7 and _run("mid", 5) in pending and _run("mid", 0) not in pending
    taken = [pending.popleft(), pending.popleft(), pending.popleft()]
    assert [r.task_id for r in taken] == ["high1", "high2", "mid"]
    pending.remove(_run("low2"))
    pending.put_back(taken[1:])  # taken, not started: ahead of their priority's others
    pending.hold(_run("high3", 10))
    assert [r.task_id for r in pending] == ["high2", "high3", "mid", "low1", "low3", "below"]
    assert pending.first().task_id == "high2" and len(pending) == 6
    pending.clear()
    assert not pending and list(pending) == []


def test_an_urgent_burst_goes_ahead_of_a_deep_pipeline_in_arrival_order() -> None:
    pending = Pending(_run(f"n{i}") for i in range(4096))
    for i in range(1000):
        pending.hold(_run(f"u{i}", 10))
    assert [r.task_id for r in pending] == [f"u{i}" for i in range(1000)] + [f"n{i}" for i in range(4096)]


def test_a_run_from_an_older_server_has_priority_zero() -> None:
    raw = (b'{"type":"run","worker":"w","epoch":"e","task-id":"t","attempt":1,"task":"add",'
           b'"args":[1,2]}')
    run = m.parse_dispatch(raw)
    assert isinstance(run, m.Run) and run.priority == 0


def test_a_run_whose_priority_is_out_of_the_submission_range_is_still_taken() -> None:
    """A grant is never dropped for its priority (a bad one held by the store would otherwise
    leave its task granted and never run)."""
    raw = m.encode(_run("t", 5_000_000))
    run = m.parse_dispatch(raw)
    assert isinstance(run, m.Run) and run.priority == 5_000_000
