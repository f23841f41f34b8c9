"""The grant plan: most free capacity first, ties to the least recently granted, routing; the
adaptive prefetch window."""

from __future__ import annotations

import itertools
import random
from collections import Counter
from pathlib import Path

from yadtqd import messages as m
from yadtqd.server.scheduler import (ADAPTIVE, LONG_TASK, PREFETCH_BYTES, PREFETCH_HORIZON,
                                      PREFETCH_MOST, PREFETCH_PER_SLOT, Chooser, Member, Scheduler)
from yadtqd.limits import Limit
from yadtqd.server.limiter import Limiter
from yadtqd.store import Store, Waiting


def _store(tmp_path: Path, names: list[str]) -> Store:
    store = Store(tmp_path / "db.sqlite", create=True)
    for i, name in enumerate(names):
        store.intake(m.Submission(task_id=f"t{i}", task=name), float(i))
    return store


def _held(member: Member, count: int, name: str = "add") -> Member:
    for i in range(count):
        member.hold(f"held{i}", name, None)
    return member


def test_equal_workers_share_grants_evenly(tmp_path: Path) -> None:
    store = _store(tmp_path, ["add"] * 12)
    sched = Scheduler()
    for w in ("a", "b", "c"):
        sched.join(Member(epoch=w, worker=w, slots=4, prefetch=0, tasks=frozenset({"add"}), partition=0))
    grants = sched.plan(store, 100.0)
    assert Counter(g.worker for g in grants) == {"a": 4, "b": 4, "c": 4}
    assert [g.worker for g in grants[:3]] == ["a", "b", "c"]  # round robin on ties


def test_the_worker_with_most_room_gets_the_task(tmp_path: Path) -> None:
    store = _store(tmp_path, ["add"])
    sched = Scheduler()
    sched.join(_held(Member(epoch="busy", worker="busy", slots=4, prefetch=0, tasks=frozenset({"add"}),
                            partition=0), 3))
    sched.join(_held(Member(epoch="idle", worker="idle", slots=4, prefetch=0, tasks=frozenset({"add"}),
                            partition=0), 1))
    (grant,) = sched.plan(store, 100.0)
    assert grant.worker == "idle"


def test_tasks_go_only_to_workers_that_advertise_them(tmp_path: Path) -> None:
    store = _store(tmp_path, ["sleep", "add", "sleep", "nobody"])
    sched = Scheduler()
    sched.join(Member(epoch="a", worker="a", slots=10, prefetch=0, tasks=frozenset({"add"}), partition=0))
    sched.join(Member(epoch="d", worker="d", slots=10, prefetch=0, tasks=frozenset({"sleep"}), partition=0))
    grants = {g.task_id: g.worker for g in sched.plan(store, 100.0)}
    assert grants == {"t0": "d", "t1": "a", "t2": "d"}
    assert store.task_rows(["t3"])["t3"]["status"] == "queued"


def test_no_grants_beyond_capacity_or_to_leaving_workers(tmp_path: Path) -> None:
    store = _store(tmp_path, ["add"] * 5)
    sched = Scheduler()
    sched.join(Member(epoch="a", worker="a", slots=2, prefetch=0, tasks=frozenset({"add"}), partition=0))
    sched.join(Member(epoch="l", worker="l", slots=9, prefetch=0, tasks=frozenset({"add"}), partition=0,
                      accepting=False))
    first = sched.plan(store, 100.0)
    assert len(first) == 2
    assert sched.plan(store, 100.0) == []
    sched.finished("a", first[0].task_id)
    assert [g.task_id for g in sched.plan(store, 100.0)] == ["t2"]


def _adaptive(epoch: str = "a", slots: int = 2) -> Member:
    return Member(epoch=epoch, worker=epoch, slots=slots, prefetch=ADAPTIVE,
                  tasks=frozenset({"add", "sleep"}), partition=0)


def _learn(sched: Scheduler, name: str, seconds: float) -> None:
    sched.estimates.add(name, seconds)


def test_fixed_prefetch_holds_that_many_beyond_the_slots(tmp_path: Path) -> None:
    store = _store(tmp_path, ["add"] * 10)
    sched = Scheduler()
    sched.join(Member(epoch="a", worker="a", slots=2, prefetch=3, tasks=frozenset({"add"}), partition=0))
    _learn(sched, "add", 0.0001)
    assert len(sched.plan(store, 100.0)) == 5


def test_adaptive_epoch_holds_nothing_behind_tasks_of_unknown_length(tmp_path: Path) -> None:
    store = _store(tmp_path, ["add"] * 10)
    sched = Scheduler()
    sched.join(_adaptive(slots=3))
    assert len(sched.plan(store, 100.0)) == 3


def test_adaptive_epoch_holds_a_deep_pipeline_of_tiny_tasks(tmp_path: Path) -> None:
    store = _store(tmp_path, ["add"] * (4 * PREFETCH_PER_SLOT))
    sched = Scheduler()
    sched.join(_adaptive())
    _learn(sched, "add", PREFETCH_HORIZON / PREFETCH_PER_SLOT / 10)
    assert len(sched.plan(store, 4.0 * PREFETCH_PER_SLOT)) == 2 * (1 + PREFETCH_PER_SLOT)  # all due


def test_adaptive_epoch_holds_about_the_horizon_of_middling_tasks(tmp_path: Path) -> None:
    store = _store(tmp_path, ["add"] * 100)
    sched = Scheduler()
    sched.join(_adaptive())
    _learn(sched, "add", PREFETCH_HORIZON / 4)
    # it takes grants while the work it holds is at most 2 slots x the horizon: 8 tasks' worth
    assert len(sched.plan(store, 100.0)) == 9


def test_nothing_waits_behind_a_task_known_to_be_long(tmp_path: Path) -> None:
    store = _store(tmp_path, ["sleep", "add", "add", "add", "add"])
    sched = Scheduler()
    sched.join(_adaptive("a", slots=1))
    sched.join(_adaptive("b", slots=1))
    _learn(sched, "sleep", 5.0)
    _learn(sched, "add", 0.0001)
    grants = [(g.task_id, g.worker) for g in sched.plan(store, 100.0)]
    assert grants == [("t0", "a"), ("t1", "b"), ("t2", "b"), ("t3", "b"), ("t4", "b")]


def test_a_task_running_long_stops_prefetch_before_it_ends(tmp_path: Path) -> None:
    store = _store(tmp_path, ["add"] * 10)
    sched = Scheduler()
    sched.join(_adaptive("a", slots=1))
    _learn(sched, "add", 0.0001)
    (first, *rest) = sched.plan(store, 100.0)
    sched.started("a", first.task_id)
    member = sched.members["a"]
    member.running[first.task_id] -= LONG_TASK * 2  # as if it started a while ago
    for g in rest:
        sched.handed_back("a", [g.task_id])
    assert sched.plan(store, 100.0) == []


def test_finished_tasks_teach_their_names_estimate(tmp_path: Path) -> None:
    store = _store(tmp_path, ["add"] * 100)
    sched = Scheduler()
    sched.join(_adaptive())
    first = sched.plan(store, 100.0)
    assert len(first) == 2
    for g in first:
        sched.started("a", g.task_id)
        sched.finished("a", g.task_id)
    estimate = sched.estimates.get("add")
    assert estimate is not None and estimate < LONG_TASK
    assert sched.members["a"].outstanding == 0
    assert len(sched.plan(store, 100.0)) > 2


def test_free_slots_come_before_prefetch_and_unknown_lengths_stop_it(tmp_path: Path) -> None:
    store = _store(tmp_path, ["add"] * 12)
    sched = Scheduler()
    sched.join(_adaptive("a"))
    sched.join(_adaptive("b"))
    _held(sched.members["b"], 1)  # b holds one grant of unknown length from before a restart
    _learn(sched, "add", 0.0001)
    grants = Counter(g.worker for g in sched.plan(store, 100.0))
    assert grants == {"a": 11, "b": 1}


def test_no_epoch_runs_ahead_of_one_just_given_a_task_of_unknown_length(tmp_path: Path) -> None:
    """DESIGN 5's mixed burst: b may not prefetch far past a, which cannot take more only until
    the first ``sleep`` ends; then a, its held ``sleep`` timed, takes its share at once."""
    store = _store(tmp_path, ["sleep"] + ["add"] * 20)
    sched = Scheduler()
    sched.join(_adaptive("a"))
    sched.join(_adaptive("b"))
    _learn(sched, "add", 0.0001)
    first = sched.plan(store, 100.0)
    assert [(g.task_id, g.worker) for g in first[:1]] == [("t0", "a")]
    held = Counter(g.worker for g in first)
    assert held == {"a": 2, "b": 4}  # b: its 2 slots, and 2 (its slots) ahead of a's 2
    sched.started("a", "t0")
    sched.finished("a", "t0", runtime=0.001)  # sleep is timed now: a's held grants are known
    assert sched.members["a"].unknown == 0
    second = Counter(g.worker for g in sched.plan(store, 100.0))
    assert second["a"] > 0 and sum(second.values()) == 20 - 5


def test_a_names_first_end_times_every_grant_of_it_held(tmp_path: Path) -> None:
    """Member.learn: a's second ``sleep``, granted while the name was not timed, counts the
    estimate once b's ends, so a may prefetch behind it (it no longer blocks)."""
    store = _store(tmp_path, ["sleep", "sleep", "sleep"] + ["add"] * 10)
    sched = Scheduler()
    sched.join(_adaptive("a"))
    sched.join(_adaptive("b", slots=1))
    _learn(sched, "add", 0.0001)
    first = sched.plan(store, 100.0)
    a, b = sched.members["a"], sched.members["b"]
    assert (a.unknown, b.unknown) == (2, 1) and not a.may_take()
    (b_sleep,) = [g.task_id for g in first if g.worker == "b"]
    sched.started("b", b_sleep)
    sched.finished("b", b_sleep, runtime=0.001)
    assert a.unknown == 0 and a.work > 0 and a.may_take()


def test_the_fast_choice_is_the_choice_of_a_look_at_every_epoch() -> None:
    """Chooser stands in for Scheduler._pick while no epoch waits on a name not timed yet:
    over random epochs (slots, fixed or adaptive prefetch, names, work held, ties) and random
    runs of grants, both choose the same epoch every time."""
    rng = random.Random(15)
    names = ["a", "b", "c", "d"]
    for _ in range(200):
        sched = Scheduler()
        for i in range(rng.randint(1, 12)):
            mb = Member(epoch=f"e{i}", worker=f"w{i}", slots=rng.randint(1, 4),
                        prefetch=rng.choice([0, 2, ADAPTIVE]),
                        tasks=frozenset(rng.sample(names, rng.randint(1, 3))), partition=0,
                        accepting=rng.random() > 0.1, last_granted=rng.choice([0, 0, i]))
            for k in range(rng.randint(0, 5)):
                mb.hold(f"h{i}.{k}", rng.choice(sorted(mb.tasks)), rng.choice([0.001, 0.004, 0.02]))
            sched.join(mb)
        order = itertools.count(100)
        chooser = Chooser([mb for mb in sched.members.values() if mb.may_take()])
        for g in range(rng.randint(1, 60)):
            name = rng.choice(names)
            expected = sched._pick(name, 0.0)
            assert chooser.pick(name) is expected
            if expected is not None and rng.random() > 0.1:  # a grant; sometimes the task was gone
                expected.hold(f"g{g}", name, rng.choice([0.001, 0.004, 0.02]))
                expected.last_granted = next(order)


def test_an_epoch_just_given_a_task_of_unknown_length_holds_the_others_back_in_later_plans_too(
        tmp_path: Path) -> None:
    """The hold-back of DESIGN 5 outlives the plan that granted the untimed task: the next
    plan, moments later, also keeps b within its slots of a (the fast choice, which knows no
    such rule, must not decide it)."""
    store = _store(tmp_path, ["sleep"])
    sched = Scheduler()
    sched.join(_adaptive("a"))
    sched.join(_adaptive("b"))
    _learn(sched, "add", 0.0001)
    assert [(g.task_id, g.worker) for g in sched.plan(store, 100.0, mono=1000.0)] == [("t0", "a")]
    for i in range(20):
        store.intake(m.Submission(task_id=f"more{i}", task="add"), 101.0)
    held = Counter(g.worker for g in sched.plan(store, 102.0, mono=1000.1))
    assert held == {"a": 1, "b": 4}  # a: its free slot; b: its 2 slots, and 2 ahead of a's 2


def test_a_plan_reads_no_more_of_the_queue_than_the_horizon_lets_it_grant(tmp_path: Path) -> None:
    """Tasks a tenth of an epoch's horizon long: an epoch of 2 slots may take its 2 and about
    10 more, so the plan reads 14 rows of a queue of 600, not the 1,026 its count allows."""
    store = _store(tmp_path, ["sleep"] * 600)
    sched = Scheduler()
    sched.join(_adaptive("a"))
    _learn(sched, "sleep", PREFETCH_HORIZON * 2 / 10)
    limits: list[int] = []
    read = store.waiting
    store.waiting = lambda *a, **k: limits.append(a[1]) or read(*a, **k)  # type: ignore[method-assign]
    grants = sched.plan(store, 1000.0)
    assert 10 <= len(grants) <= limits[0] <= 2 + 10 + 2
    assert limits[0] < sched.members["a"].most


def test_a_name_no_epoch_can_take_more_of_does_not_hide_the_rest_of_the_queue(tmp_path: Path) -> None:
    """a runs only x, b only y, one slot each: the x queued ahead of y must not fill the
    plan's read, so both take a task in the same plan."""
    store = _store(tmp_path, ["x", "x", "x", "y"])
    sched = Scheduler()
    sched.join(Member(epoch="a", worker="a", slots=1, prefetch=0, tasks=frozenset({"x"}), partition=0))
    sched.join(Member(epoch="b", worker="b", slots=1, prefetch=0, tasks=frozenset({"y"}), partition=0))
    assert sorted((g.worker, g.task_id) for g in sched.plan(store, 100.0)) == [("a", "t0"), ("b", "t3")]


def test_an_adaptive_epoch_of_many_slots_holds_at_most_prefetch_most_beyond_them() -> None:
    """What an epoch holds goes in one ``bye`` and one ``failures`` row: bounded, however many
    slots it has."""
    assert _adaptive("a", slots=2).most == 2 + 2 * PREFETCH_PER_SLOT
    assert _adaptive("a", slots=256).most == 256 + PREFETCH_MOST


def test_an_adaptive_epoch_prefetches_large_payloads_only_up_to_its_byte_budget(tmp_path: Path) -> None:
    """Tiny tasks with 100 KB arguments: the count caps would let 2 slots hold 1,026 of them
    (100 MB); the payloads held stop the prefetch past 8 MiB, the running ones counted."""
    store = Store(tmp_path / "db.sqlite", create=True)
    subs = [m.Submission(task_id=f"t{i}", task="add", args=["x" * 100_000]) for i in range(300)]
    for i, sub in enumerate(subs):
        store.intake(sub, float(i))
    size = len(subs[0].payload())
    assert [w.size for w in store.waiting(["add"], 3, 1000.0)] == [size] * 3
    store.hello(m.Hello(worker="a", epoch="a", ts=0, host="h", pid=1, slots=2, prefetch=ADAPTIVE,
                        tasks={"add": m.TaskInfo(plugin="arith")}, version="0"), 0.0, 0, 0)
    sched = Scheduler()
    sched.join(_adaptive())
    _learn(sched, "add", PREFETCH_HORIZON / PREFETCH_PER_SLOT / 10)
    first = sched.plan(store, 1000.0)
    most = -(-PREFETCH_BYTES // size)  # it takes one more while under the budget
    assert len(first) == most and sched.members["a"].payload == most * size
    assert sched.plan(store, 1000.0) == []
    restored = Scheduler()  # after a restart, the sizes of what it holds still count
    restored.load(store.live_workers(), store.held(), 1, 1)
    assert restored.members["a"].payload == most * size
    sched.finished("a", first[0].task_id, runtime=0.0001)
    assert len(sched.plan(store, 1000.0)) == 1  # one ended, one more taken


def test_a_queue_mixing_names_at_random_is_shared_by_name_when_the_horizon_binds(
        tmp_path: Path) -> None:
    """DESIGN 5's mixed burst in one plan: 150 ``add`` and 150 ``sleep`` in random order (as
    the tasks topic's partitions deliver them), three epochs whose horizon holds about 40
    ``sleep`` each. Every epoch gets as many ``add`` as another, give or take 6 (ranked by
    expected work alone, a run of ``add`` went to one epoch: 30 to 64 each)."""
    for seed in range(8):
        kinds = ["add", "sleep"] * 150
        random.Random(seed).shuffle(kinds)
        (tmp_path / str(seed)).mkdir()
        store = _store(tmp_path / str(seed), kinds)
        sched = Scheduler()
        for epoch in "abc":
            sched.join(_adaptive(epoch))
        _learn(sched, "add", 0.00005)
        _learn(sched, "sleep", PREFETCH_HORIZON * 2 / 40)
        grants = sched.plan(store, 1000.0)
        assert 200 < len(grants) < 300  # the horizon binds
        adds = Counter(g.worker for g in grants if kinds[int(g.task_id[1:])] == "add")
        sleeps = Counter(g.worker for g in grants if kinds[int(g.task_id[1:])] == "sleep")
        assert max(sleeps.values()) - min(sleeps.values()) <= 1, (seed, sleeps)
        assert max(adds.values()) - min(adds.values()) <= 6, (seed, adds)


def test_a_fixed_prefetch_does_not_send_a_task_behind_a_long_one(tmp_path: Path) -> None:
    """By name alone, the next ``add`` would go to x, which holds no ``add`` but a task of 10 s,
    rather than to y, whose pipeline is one short ``add``: work past the horizon comes first."""
    store = _store(tmp_path, ["add"])
    sched = Scheduler()
    for epoch in ("x", "y"):
        sched.join(Member(epoch=epoch, worker=epoch, slots=1, prefetch=2,
                          tasks=frozenset({"add", "long"}), partition=0))
    sched.members["x"].hold("running-long", "long", 10.0)
    sched.members["y"].hold("running-add", "add", 0.0001)
    (grant,) = sched.plan(store, 100.0)
    assert grant.worker == "y"


def test_a_task_no_longer_queued_is_let_go_and_each_epochs_numbers_still_follow(tmp_path: Path) -> None:
    """A plan's grants are one conditional update: a task read as waiting that is not queued
    any more is not granted, and the later grants to the same epoch close the gap in its
    numbers (its worker takes each number once, counting on them following each other)."""
    store = _store(tmp_path, ["add"] * 6)
    store.grant("t2", "x", "ex", 1.0, 1)  # taken meanwhile (nothing else writes: never expected)
    real = store.waiting

    def waiting(*args: object, **kwargs: object) -> list[Waiting]:
        found = real(*args, **kwargs)  # type: ignore[arg-type]
        return found[:2] + [Waiting("t2", "add")] + found[2:]

    store.waiting = waiting  # type: ignore[method-assign]
    sched = Scheduler(Limiter((Limit(task="add", rate_count=100, rate_period=60.0),)))
    for w in ("a", "b"):
        store.hello(m.Hello(worker=w, epoch=w, ts=0, host="h", pid=1, slots=10, prefetch=0,
                            tasks={"add": m.TaskInfo(plugin="arith")}, version="0"), 1.0, 0, 0)
        sched.join(Member(epoch=w, worker=w, slots=10, prefetch=0, tasks=frozenset({"add"}), partition=0))
    with store.transaction():
        grants = sched.plan(store, 100.0, 5.0)
    assert [(g.task_id, g.epoch, g.grant_no) for g in grants] == [
        ("t0", "a", 1), ("t1", "b", 1), ("t3", "b", 2), ("t4", "a", 2), ("t5", "b", 3)]
    rows = store.task_rows([g.task_id for g in grants] + ["t2"])
    assert [(rows[g.task_id]["epoch"], rows[g.task_id]["grant_no"]) for g in grants] == [
        (g.epoch, g.grant_no) for g in grants]
    assert (rows["t2"]["epoch"], rows["t2"]["grant_no"]) == ("ex", 1)
    assert {e: (mb.grants, sorted(mb.held)) for e, mb in sched.members.items()} == {
        "a": (2, ["t0", "t4"]), "b": (3, ["t1", "t3", "t5"])}
    assert dict(store.db.execute("SELECT epoch, grants FROM workers").fetchall()) == {"a": 2, "b": 3}
    assert (sched.limiter.running, list(sched.limiter.recent[("add", None)])) == ({("add", None): 5}, [5.0] * 5)
    assert "t2" not in sched.limiter.held
