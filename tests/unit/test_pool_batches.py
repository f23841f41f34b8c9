"""Batches of short jobs to one execution process (issue 15): real execution processes, the
demo plugin's tasks. Each job of a batch runs once, in order, with an outcome of its own; a job
that ends its process fails alone, and the jobs after it come back never run."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from multiprocessing.connection import wait
from pathlib import Path

import pytest

from yadtqd import messages as m
from yadtqd.config import Config, WorkerConfig
from yadtqd.systemd import Notifier
from yadtqd.worker.child import Job, Outcome
from yadtqd.worker.lease import Lease
from yadtqd.worker.main import Worker
from yadtqd.worker.pending import Pending, next_batch
from yadtqd.worker.pool import BATCH_MOST, LATER, SHORT_TASK, STOPPING, Pool


@pytest.fixture
def pool() -> Iterator[Pool]:
    p = Pool(1, 1 << 20)
    p.batch_window = 60.0  # a loaded machine must not cut these batches short (one test does)
    p.start()
    p.wait_ready()
    yield p
    p.close()


def _job(i: int, task: str = "add", args: list[object] | None = None) -> Job:
    return Job(task_id=f"t{i}", attempt=1, task=task, args=[i, 1] if args is None else args,
               kwargs={}, worker="w", epoch="e")


def _collect(pool: Pool, count: int) -> list[Outcome]:
    outcomes: list[Outcome] = []
    deadline = time.monotonic() + 30
    while len(outcomes) < count:
        assert time.monotonic() < deadline, f"only {len(outcomes)} of {count} outcomes came"
        outcomes += pool.collect(wait(pool.waitables(), 1.0))
    return outcomes


def _ledger(path: Path) -> list[tuple[str, str]]:
    return [(e["task-id"], e["phase"]) for e in map(json.loads, path.read_text().splitlines())]


def test_a_batch_runs_each_job_once_in_order_with_an_outcome_each(pool: Pool, tmp_path: Path) -> None:
    ledger = tmp_path / "ledger"
    jobs = [_job(i, "ledger", [str(ledger), 0.0, i]) for i in range(BATCH_MOST)]
    pool.submit(jobs, None)
    assert pool.free == 0 and pool.queued == BATCH_MOST - 1
    assert [j.task_id for j in pool.running()] == [j.task_id for j in jobs]
    outcomes = _collect(pool, BATCH_MOST)
    assert [(o.task_id, o.status, o.result) for o in outcomes] == [
        (f"t{i}", "success", str(i)) for i in range(BATCH_MOST)]
    assert _ledger(ledger) == [(f"t{i}", phase) for i in range(BATCH_MOST) for phase in ("start", "end")]
    assert pool.free == 1 and pool.queued == 0 and pool.take_returned() == []


def test_a_job_that_ends_its_process_fails_alone_and_the_rest_come_back_never_run(
        pool: Pool, tmp_path: Path) -> None:
    ledger = tmp_path / "ledger"
    jobs = [_job(0, "ledger", [str(ledger)]), _job(1, "ledger", [str(ledger)]), _job(2, "exit", [3]),
            _job(3, "ledger", [str(ledger)]), _job(4, "ledger", [str(ledger)])]
    pool.submit(jobs, None)
    outcomes = _collect(pool, 3)
    assert [(o.task_id, o.status) for o in outcomes] == [("t0", "success"), ("t1", "success"), ("t2", "failed")]
    assert outcomes[2].error and outcomes[2].error["type"] == "ExecutionProcessDied"
    assert [j.task_id for j in pool.take_returned()] == ["t3", "t4"]
    assert [t for t, phase in _ledger(ledger) if phase == "start"] == ["t0", "t1"]  # t3, t4 never ran
    pool.wait_ready()  # a fresh process took the slot
    pool.submit(_job(5), None)
    (again,) = _collect(pool, 1)
    assert (again.task_id, again.result) == ("t5", "6")


def test_a_cancel_waits_for_the_batch_s_window_then_stops_the_job_that_runs(pool: Pool, tmp_path: Path) -> None:
    gate, ledger = tmp_path / "gate", tmp_path / "ledger"
    pool.batch_window = 0.5  # room for t0 to start on a loaded machine
    pool.submit([_job(0, "ledger", [str(ledger), 0.0, None, str(gate)]), _job(1), _job(2)], None)
    assert pool.cancel("t0", 1, grace=5.0) == LATER  # the batch may still start jobs
    while time.monotonic() <= pool.slots[0].start_by:  # the window's end: a time, not an event
        time.sleep(0.005)
    assert pool.cancel("t1", 1, grace=5.0) == LATER  # waiting: it will not start, it comes back
    assert pool.cancel("t0", 1, grace=5.0) == STOPPING  # the one running, for sure now
    (outcome,) = _collect(pool, 1)
    assert (outcome.task_id, outcome.status) == ("t0", "cancelled")
    assert [t for t, phase in _ledger(ledger)] == ["t0"]  # it started, and never ended
    deadline = time.monotonic() + 30
    returned: list[Job] = []
    while len(returned) < 2:
        assert time.monotonic() < deadline
        assert pool.collect(wait(pool.waitables(), 0.5)) == []
        returned += pool.take_returned()
    assert sorted(j.task_id for j in returned) == ["t1", "t2"]  # never run: back to the worker


def test_the_jobs_of_a_batch_start_only_within_its_window(pool: Pool, tmp_path: Path) -> None:
    ledger, gate = str(tmp_path / "ledger"), tmp_path / "gate"
    pool.batch_window = 0.5  # room for t0 to start on a loaded machine
    pool.submit([_job(0, "ledger", [ledger, 0.0, None, str(gate)]), _job(1, "ledger", [ledger]), _job(2)], None)
    deadline = time.monotonic() + 30
    returned: list[Job] = []
    while len(returned) < 2:  # back once the window passed, while t0 still runs
        assert time.monotonic() < deadline
        assert pool.collect(wait(pool.waitables(), min(0.5, pool.next_deadline() or 0.5))) == []
        returned += pool.take_returned()
    assert [j.task_id for j in returned] == ["t1", "t2"] and pool.free == 0
    gate.touch()
    (outcome,) = _collect(pool, 1)
    assert outcome.task_id == "t0"
    while pool.free == 0:  # the process says t1 and t2 did not start: the slot is free again
        assert time.monotonic() < deadline
        assert pool.collect(wait(pool.waitables(), 0.5)) == []
    assert pool.take_returned() == []
    assert [t for t, phase in _ledger(tmp_path / "ledger") if phase == "start"] == ["t0"]


def test_a_batch_starts_nothing_past_the_lease_it_was_given(pool: Pool) -> None:
    pool.submit([_job(0), _job(1)], None, start_by=time.monotonic() - 1)  # the lease ran out
    deadline = time.monotonic() + 30
    while pool.free == 0:
        assert time.monotonic() < deadline
        assert pool.collect(wait(pool.waitables(), 0.5)) == []
    assert [j.task_id for j in pool.take_returned()] == ["t0", "t1"]


def test_a_fence_kills_the_batch_and_returns_none_of_it(pool: Pool, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    jobs = [_job(0, "ledger", [str(tmp_path / "ledger"), 0.0, None, str(gate)]), _job(1), _job(2)]
    pool.submit(jobs, None)
    assert [j.task_id for j in pool.kill_running()] == ["t0", "t1", "t2"]
    assert pool.take_returned() == [] and pool.queued == 0


def test_a_name_is_short_once_its_runs_took_little(pool: Pool) -> None:
    assert not pool.short("add")  # not timed yet
    pool.submit(_job(0), None)
    _collect(pool, 1)
    assert pool.short("add")
    pool.submit(_job(1, "sleep", [SHORT_TASK * 20]), None)
    _collect(pool, 1)
    assert not pool.short("sleep")


def _run(i: int, task: str = "add", timeout: float | None = None, args: list[object] | None = None,
         epoch: str = "e") -> m.Run:
    return m.Run(worker="w", epoch=epoch, task_id=f"t{i}", attempt=1, task=task,
                 args=[i, 1] if args is None else args, options=m.Options(timeout=timeout))


class Recorder:
    """The worker's outbox, recording what it sends."""

    def __init__(self) -> None:
        self.sent: list[m.WorkerEvent] = []

    def send(self, message: m.WorkerEvent, urgent: bool = False) -> None:
        self.sent.append(message)


def test_the_runs_after_a_job_that_ended_its_process_start_again_and_run_once_each(tmp_path: Path) -> None:
    worker = Worker(Config(kafka={}, worker=WorkerConfig(id="w", slots=1)), Notifier())
    worker.epoch, worker.lease = "e1", Lease(timeout=None)
    worker.outbox = outbox = Recorder()  # type: ignore[assignment]
    worker.pool.batch_window = 60.0
    worker.pool.start()
    try:
        worker.pool.wait_ready()
        worker.pool.runtimes.update(ledger=0.0001, exit=0.0001)  # both timed short here
        ledger = str(tmp_path / "ledger")
        worker.pending.extend([_run(i, "ledger", args=[ledger], epoch="e1") for i in range(3)]
                              + [_run(3, "exit", args=[3], epoch="e1")]
                              + [_run(i, "ledger", args=[ledger], epoch="e1") for i in range(4, 8)])
        worker._start_pending()
        assert worker.pool.queued == 7 and not worker.pending  # one batch of 8 for the one slot
        worker._announce(every=True)  # as when stopping: only the job at the front has started
        assert [e.task_id for e in outbox.sent if isinstance(e, m.Started)] == ["t0"]
        worker._on_cancel(m.Cancel(worker="w", epoch="e1", task_id="t5", attempt=1))
        assert list(worker.deferred) == [("t5", 1)]  # waiting in the batch: asked again later
        deadline = time.monotonic() + 30
        while len([e for e in outbox.sent if isinstance(e, m.Finished)]) < 8:
            assert time.monotonic() < deadline, outbox.sent
            for outcome in worker.pool.collect(wait(worker.pool.waitables(), 1.0)):
                worker._on_outcome(outcome)
            worker._take_back()
            worker._start_pending()
        ended = {e.task_id: e.status for e in outbox.sent if isinstance(e, m.Finished)}
        assert ended == {f"t{i}": {3: "failed", 5: "cancelled"}.get(i, "success") for i in range(8)}
        assert sorted(t for t, phase in _ledger(tmp_path / "ledger") if phase == "start") == [
            f"t{i}" for i in (0, 1, 2, 4, 6, 7)]  # each once: t4..t7 came back; t5 never ran
        assert not worker.handed and not worker.pending and not worker.deferred
    finally:
        worker.pool.close()


def test_free_slots_share_the_queue_in_batches_of_short_runs_without_a_timeout() -> None:
    short = {"add"}.__contains__
    pending = Pending(_run(i) for i in range(20))
    assert len(next_batch(pending, 2, short)) == BATCH_MOST  # 20 waiting, 2 slots free
    assert len(next_batch(pending, 2, short)) == 6  # 12 left: a share each
    assert len(next_batch(pending, 1, short)) == BATCH_MOST - 2  # the 6 left to one slot
    assert len(next_batch(Pending([_run(0), _run(1)]), 2, short)) == 1  # no more than slots: alone
    mixed = Pending([_run(0), _run(1), _run(2, "sleep"), _run(3), _run(4, timeout=5.0), _run(5)])
    assert [r.task_id for r in next_batch(mixed, 1, short)] == ["t0", "t1"]  # up to a name not short
    assert [r.task_id for r in next_batch(mixed, 1, short)] == ["t2"]
    assert [r.task_id for r in next_batch(mixed, 1, short)] == ["t3"]  # a timeout goes alone
    assert [r.task_id for r in next_batch(mixed, 1, short)] == ["t4"]
