"""Applying batches of Kafka messages: submissions, events and their offsets, in one transaction."""

from __future__ import annotations

import itertools
from pathlib import Path

import msgspec
import pytest
from confluent_kafka import Message

from yadtqd import messages as m
from yadtqd.config import Config
from yadtqd.server.evidence import Evidence
from yadtqd.server.ingest import Ingest
from yadtqd.server.scheduler import Scheduler
from yadtqd.store import Store

PREFIX = "yadtq"
_offsets = itertools.count()


@pytest.fixture
def ingest(tmp_path: Path) -> Ingest:
    store = Store(tmp_path / "db.sqlite", create=True)
    return Ingest(store, Scheduler(), Config(kafka={}), Evidence("n", 5.0, 0.0), dispatch_partitions=1)


def _msg(topic: str, body: msgspec.Struct | bytes) -> Message:
    value = body if isinstance(body, bytes) else m.encode(body)
    return Message(topic=f"{PREFIX}.{topic}", partition=0, offset=next(_offsets), value=value)


def _apply(ingest: Ingest, *messages: Message) -> None:
    with ingest.store.transaction():
        ingest.apply(list(messages), 10.0)


def _granted(ingest: Ingest) -> None:
    hello = m.Hello(worker="w", epoch="e1", ts=0, host="h", pid=1, slots=2, prefetch=-1,
                    tasks={"add": m.TaskInfo(plugin="arith")}, version="0")
    _apply(ingest, _msg("tasks", m.Submission(task_id="t1", task="add", args=[1, 2])),
           _msg("events", hello))
    with ingest.store.transaction():
        (grant,) = ingest.scheduler.plan(ingest.store, 11.0)
    assert grant.task_id == "t1"


def _started() -> m.Started:
    return m.Started(worker="w", epoch="e1", ts=0, task_id="t1", attempt=1)


def _finished() -> m.Finished:
    return m.Finished(worker="w", epoch="e1", ts=0, task_id="t1", attempt=1, status="success",
                      result=msgspec.Raw(b"3"))


def test_started_then_finished_in_separate_batches(ingest: Ingest) -> None:
    _granted(ingest)
    _apply(ingest, _msg("events", _started()))
    assert ingest.store.task_rows(["t1"])["t1"]["status"] == "processing"
    _apply(ingest, _msg("events", _finished()))
    row = ingest.store.task_rows(["t1"])["t1"]
    assert (row["status"], row["result"]) == ("success", "3")
    assert row["started_at"] is not None
    assert ingest.scheduler.members["e1"].outstanding == 0


def test_started_and_finished_in_one_batch_end_the_task_with_its_start_recorded(ingest: Ingest) -> None:
    _granted(ingest)
    _apply(ingest, _msg("events", _started()), _msg("events", _finished()))
    row = ingest.store.task_rows(["t1"])["t1"]
    assert (row["status"], row["result"]) == ("success", "3")
    assert row["started_at"] is not None
    assert ingest.store.counter_values().get("stale_events", 0) == 0
    assert ingest.scheduler.members["e1"].outstanding == 0
    assert ingest.scheduler.estimates.get("add") is not None


def test_a_batch_of_outcomes_adds_to_the_epochs_run_counters_once_each(ingest: Ingest) -> None:
    _granted(ingest)
    again = msgspec.structs.replace(_finished(), result=msgspec.Raw(b"4"))  # a repeat: stale
    _apply(ingest, _msg("events", _finished()), _msg("events", again))
    (worker,) = ingest.store.all_workers()
    assert (worker["executed"], worker["succeeded"], worker["failed_runs"]) == (1, 1, 0)
    _apply(ingest, _msg("events", _finished()))  # read again after a crash: counted once
    (worker,) = ingest.store.all_workers()
    assert (worker["executed"], worker["succeeded"], worker["failed_runs"]) == (1, 1, 0)


def test_offsets_of_every_message_are_saved_bad_ones_included(ingest: Ingest) -> None:
    _apply(ingest, _msg("tasks", b"not json"), _msg("events", b"{}"),
           _msg("tasks", m.Submission(task_id="t9", task="add")))
    saved = ingest.store.offsets()
    assert set(saved) == {(f"{PREFIX}.tasks", 0), (f"{PREFIX}.events", 0)}
    assert ingest.store.counter_values()["bad_messages"] == 2
    assert ingest.store.task_rows(["t9"])["t9"]["status"] == "queued"


def _bye(confirm: bool, epoch: str = "e1", handed_back: tuple[str, ...] = (),
         dispatch_partition: int = -1) -> Message:
    refs = [m.TaskRef(task_id=t, attempt=1) for t in handed_back]
    return _msg("events", m.Bye(worker="w", epoch=epoch, ts=0, handed_back=refs, confirm=confirm,
                                dispatch_partition=dispatch_partition))


def _granted_on_partition_3(ingest: Ingest) -> None:
    hello = m.Hello(worker="w", epoch="e1", ts=0, host="h", pid=1, slots=2, prefetch=-1,
                    tasks={"add": m.TaskInfo(plugin="arith")}, version="0", dispatch_partition=3)
    _apply(ingest, _msg("tasks", m.Submission(task_id="t1", task="add", args=[1, 2])),
           _msg("events", hello))
    with ingest.store.transaction():
        (grant,) = ingest.scheduler.plan(ingest.store, 11.0)
    assert grant.task_id == "t1"


def test_a_bye_that_asks_is_answered_left_after_the_turn_applied_it(ingest: Ingest) -> None:
    _granted_on_partition_3(ingest)
    with ingest.store.transaction():
        effects = ingest.apply([_bye(confirm=True, handed_back=("t1",))], 12.0)
    (answer,) = effects.answers
    assert (answer.worker, answer.epoch, answer.left, answer.probe) == ("w", "e1", True, 0)
    assert answer.partition == 3  # the epoch's dispatch partition, where its runs went
    assert ingest.store.task_rows(["t1"])["t1"]["status"] == "queued"  # handed back
    with ingest.store.transaction():  # the epoch takes no new grant after its bye
        assert ingest.scheduler.plan(ingest.store, 13.0) == []
    with ingest.store.transaction():  # gone now: its row still says where it reads
        (again,) = ingest.apply([_bye(confirm=True)], 14.0).answers
    assert (again.epoch, again.left, again.partition) == ("e1", True, 3)


def test_a_bye_that_does_not_ask_gets_no_answer_and_a_stale_one_that_asks_does(ingest: Ingest) -> None:
    _granted(ingest)
    with ingest.store.transaction():
        assert ingest.apply([_bye(confirm=False)], 12.0).answers == []
    with ingest.store.transaction():  # an epoch the server never knew: told where it said it reads
        (answer,) = ingest.apply([_bye(confirm=True, epoch="e9", dispatch_partition=5)], 12.0).answers
    assert (answer.epoch, answer.left, answer.partition) == ("e9", True, 5)


def _hello(worker: str, epoch: str, home: int, placeable: int) -> Message:
    return _msg("events", m.Hello(worker=worker, epoch=epoch, ts=0, host="h", pid=1, slots=2,
                                  tasks={}, version="0", dispatch_partition=home,
                                  placeable=placeable))


@pytest.fixture
def ingest3(tmp_path: Path) -> Ingest:
    store = Store(tmp_path / "db.sqlite", create=True)
    return Ingest(store, Scheduler(), Config(kafka={}), Evidence("n", 5.0, 0.0), dispatch_partitions=3)


def test_a_placeable_epoch_on_a_partition_another_worker_reads_is_placed_on_a_free_one(
        ingest3: Ingest) -> None:
    with ingest3.store.transaction():
        first = ingest3.apply([_hello("a", "ea", 1, placeable=3)], 10.0)
        second = ingest3.apply([_hello("b", "eb", 1, placeable=3)], 10.0)
        third = ingest3.apply([_hello("c", "ec", 1, placeable=3)], 10.0)
        fourth = ingest3.apply([_hello("d", "ed", 2, placeable=3)], 10.0)
    assert first.answers == []  # alone on its own partition: it stays
    (placed,) = second.answers
    assert (placed.worker, placed.epoch, placed.partition, placed.placed) == ("b", "eb", 1, 0)
    assert third.answers[0].placed == 2  # 0 and 1 are read: the one left
    assert fourth.answers == []  # every partition read once: its own is as good as any
    members = ingest3.scheduler.members
    assert [members[e].dispatch for e in ("ea", "eb", "ec", "ed")] == [1, 0, 2, 2]
    dispatch = {r["epoch"]: r["dispatch_partition"] for r in ingest3.store.db.execute(
        "SELECT epoch, dispatch_partition FROM workers")}
    assert dispatch == {"ea": 1, "eb": 0, "ec": 2, "ed": 2}  # replicated with the row


def test_an_epoch_is_placed_only_when_placeable_and_within_the_partitions_it_can_read(
        ingest3: Ingest) -> None:
    with ingest3.store.transaction():
        ingest3.apply([_hello("a", "ea", 0, placeable=3)], 10.0)
        stays = ingest3.apply([_hello("b", "eb", 0, placeable=0)], 10.0)  # an older worker
        ingest3.apply([_hello("c", "ec", 2, placeable=3)], 10.0)
        narrow = ingest3.apply([_hello("d", "ed", 0, placeable=1)], 10.0)  # knew one partition
    assert stays.answers == [] and narrow.answers == []
    assert ingest3.scheduler.members["eb"].dispatch == 0
    assert ingest3.scheduler.members["ed"].dispatch == 0


def test_a_workers_older_epoch_and_leaving_epochs_do_not_count_as_readers(ingest3: Ingest) -> None:
    with ingest3.store.transaction():
        ingest3.apply([_hello("a", "ea", 0, placeable=3)], 10.0)
        again = ingest3.apply([_hello("a", "ea2", 0, placeable=3)], 10.0)  # a's next life
        ingest3.apply([_hello("b", "eb", 1, placeable=3)], 10.0)
        ingest3.apply([_msg("events", m.Bye(worker="b", epoch="eb", ts=0, handed_back=[]))], 10.0)
        after_bye = ingest3.apply([_hello("c", "ec", 1, placeable=3)], 10.0)
    assert again.answers == []  # ea, about to be fenced, is not another reader of 0
    assert ingest3.scheduler.members["ea2"].dispatch == 0
    assert after_bye.answers == []  # eb said bye: 1 is c's, as its hash says


def test_least_read_keeps_home_on_a_tie_and_picks_the_lowest_of_the_fewest() -> None:
    from yadtqd.transport import least_read
    assert least_read(2, {}, 3) == 2
    assert least_read(2, {2: 1}, 3) == 0
    assert least_read(2, {0: 1, 2: 1}, 3) == 1
    assert least_read(2, {0: 1, 1: 1, 2: 1}, 3) == 2
    assert least_read(0, {0: 2, 1: 1, 2: 1}, 3) == 1
    assert least_read(5, {5: 3}, 3) == 5  # outside what the epoch can read: where it is


def test_an_order_is_applied_after_the_submissions_before_it_and_before_those_after(
        ingest: Ingest) -> None:
    """Consecutive submissions are recorded in one statement, and any other message first
    records those before it: a cancel read right after its task's submission finds it."""
    def submit(task_id: str, args: list[int]) -> Message:
        return _msg("tasks", m.Submission(task_id=task_id, task="add", args=args))

    _apply(ingest, submit("t1", [1]), submit("t2", [2]), _msg("tasks", m.Control(op="cancel", task_id="t1")),
           submit("t3", [3]), submit("t1", [1]), submit("t2", [9]), _msg("tasks", b"{not json"),
           submit("t4", [4]), _msg("tasks", b'{"task-id": "t4", "task": 5}'), submit("t5", [5]))
    rows = ingest.store.task_rows(["t1", "t2", "t3", "t4", "t5"])
    assert {t: r["status"] for t, r in rows.items()} == {  # t4's bad copy came after it: no change
        "t1": "cancelled", "t2": "queued", "t3": "queued", "t4": "queued", "t5": "queued"}
    assert rows["t2"]["payload"] == m.Submission(task_id="t2", task="add", args=[2]).payload()
    counters = ingest.store.counter_values()
    assert (counters.get("duplicates"), counters.get("conflicts"), counters.get("bad_messages")) == (1, 1, 2)
    assert [r[0] for r in ingest.store.db.execute("SELECT id FROM tasks ORDER BY seq")] == [
        "t1", "t2", "t3", "t4", "t5"]


def test_a_run_of_successes_goes_on_past_a_marker_a_bad_event_and_a_folded_start(
        ingest: Ingest) -> None:
    """Messages that touch no row a run changes do not cut it: one statement ends them all."""
    _granted(ingest)
    _apply(ingest, _msg("tasks", m.Submission(task_id="t2", task="add", args=[3, 4])))
    ingest.scheduler.estimates.add("add", 0.001)
    ingest.scheduler.members["e1"].learn("add", 0.001)
    with ingest.store.transaction():
        assert len(ingest.scheduler.plan(ingest.store, 12.0)) == 1
    runs: list[int] = []
    real = ingest.store.succeed_many
    ingest.store.succeed_many = lambda ends, now: runs.append(len(ends)) or real(ends, now)  # type: ignore[method-assign]
    second = m.Finished(worker="w", epoch="e1", ts=0, task_id="t2", attempt=1, status="success",
                        result=msgspec.Raw(b"7"))
    _apply(ingest, _msg("events", _finished()), _msg("events", m.Mark(server="another", seq=1, ts=0)),
           _msg("events", b"{not json"), _msg("events", m.Started(worker="w", epoch="e1", ts=0, task_id="t2", attempt=1)),
           _msg("events", second))
    assert runs == [2]
    rows = ingest.store.task_rows(["t1", "t2"])
    assert {t: (r["status"], r["result"]) for t, r in rows.items()} == {"t1": ("success", "3"), "t2": ("success", "7")}
    assert ingest.store.counter_values().get("bad_messages") == 1


def test_successes_are_recorded_before_the_event_that_follows_them(ingest: Ingest) -> None:
    """A run of successes is one statement, recorded before the next other event is applied:
    a newer epoch's hello after them declares the old epoch dead without re-queueing them."""
    _granted(ingest)
    _apply(ingest, _msg("tasks", m.Submission(task_id="t2", task="add", args=[3, 4])),
           _msg("tasks", m.Submission(task_id="t3", task="add", args=[5, 6])))
    ingest.scheduler.estimates.add("add", 0.001)  # timed: the epoch may hold more than its slots
    ingest.scheduler.members["e1"].learn("add", 0.001)
    with ingest.store.transaction():
        assert len(ingest.scheduler.plan(ingest.store, 12.0)) == 2
    failed = m.Finished(worker="w", epoch="e1", ts=0, task_id="t2", attempt=1, status="failed",
                        result=msgspec.Raw(b"null"), error=m.ErrorInfo(type="E", message="boom"))
    success3 = m.Finished(worker="w", epoch="e1", ts=0, task_id="t3", attempt=1, status="success",
                          result=msgspec.Raw(b"11"))
    newer = m.Hello(worker="w", epoch="e2", ts=0, host="h", pid=2, slots=2, prefetch=-1,
                    tasks={"add": m.TaskInfo(plugin="arith")}, version="0")
    _apply(ingest, _msg("events", _finished()), _msg("events", failed), _msg("events", success3),
           _msg("events", newer), _msg("events", _finished()))
    rows = ingest.store.task_rows(["t1", "t2", "t3"])
    assert {t: (r["status"], r["result"]) for t, r in rows.items()} == {
        "t1": ("success", "3"), "t2": ("failed", None), "t3": ("success", "11")}
    assert ingest.store.counter_values().get("stale_events") == 1  # t1's repeat, after the hello
    assert set(ingest.scheduler.members) == {"e2"}
