"""Global limits (issue 14): the [limits."NAME"] tables and the active's count at grant time."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from yadtqd import config
from yadtqd import messages as m
from yadtqd.errors import ConfigError
from yadtqd.limits import Limit
from yadtqd.server.limiter import Limiter
from yadtqd.server.scheduler import Member, Scheduler
from yadtqd.store import Store


def load(tmp_path: Path, table: str) -> config.Config:
    path = tmp_path / "yadtq.toml"
    path.write_text('[kafka]\n"bootstrap.servers" = "127.0.0.1:9092"\n' + table)
    return config.load(path, env={})


def test_limits_are_read_from_their_tables(tmp_path: Path) -> None:
    c = load(tmp_path, '[limits."send-mail"]\nconcurrency = 5\nrate = "100/m"\n[limits.add]\nrate = "10/s"\n')
    assert c.limits == (Limit("send-mail", 5, 100, 60.0, "100/m"), Limit("add", None, 10, 1.0, "10/s"))
    assert c.limits[0].describe() == "at most 5 granted at once and at most 100/m"


@pytest.mark.parametrize("table, problem", [
    ('[limits.a]\nconcurrency = 0\n', "concurrency must be an integer of at least 1"),
    ('[limits.a]\nrate = "fast"\n', "is not a rate like"),
    ('[limits.a]\n', "give concurrency, rate or both"),
    ('[limits.a]\nburst = 3\n', "unknown key 'burst'"),
])
def test_a_bad_limit_is_named_with_its_problem(tmp_path: Path, table: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        load(tmp_path, table)


def test_concurrency_counts_grants_until_they_are_released() -> None:
    limiter = Limiter((Limit("a", concurrency=2),))
    limiter.granted("t1", "a", None, 0.0)
    assert limiter.allows("a", None, 0.0)
    limiter.granted("t2", "a", None, 0.0)
    assert not limiter.allows("a", None, 0.0) and limiter.closed(0.0) == {"a": {None}}
    assert limiter.allows("a", "customer-1", 0.0)  # a key has a budget of its own
    assert limiter.allows("b", None, 0.0)  # an unlimited name
    limiter.released("t1")
    limiter.released("t1")  # twice (a finish after a death, say): counted once
    assert limiter.allows("a", None, 0.0)


def test_rate_counts_grants_in_a_sliding_window() -> None:
    limiter = Limiter((Limit("a", rate_count=3, rate_period=1.0, rate="3/s"),))
    for n, at in enumerate((10.0, 10.2, 10.4)):
        limiter.granted(f"t{n}", "a", None, at)
        limiter.released(f"t{n}")  # ended at once: the rate still counts it
    assert not limiter.allows("a", None, 10.9)
    assert limiter.allows("a", None, 11.05)  # the first grant left the window


def test_an_earlier_terms_grants_count_for_concurrency_not_rate() -> None:
    limiter = Limiter((Limit("a", concurrency=1, rate_count=1, rate_period=60.0, rate="1/m"),))
    limiter.granted("old", "a", None, None)
    assert not limiter.allows("a", None, 0.0)
    limiter.released("old")
    assert limiter.allows("a", None, 0.0)


def test_a_full_key_does_not_hold_back_the_tasks_behind_it(tmp_path: Path) -> None:
    """50 tasks of key "a" (concurrency 1) queued first, then key "b", then an unlimited name,
    one worker with two slots: the second slot goes to "b", then to the unlimited name, though
    "a"'s tasks come first in the queue."""
    store = Store(tmp_path / "db.sqlite", create=True)
    subs = [("mail", "a")] * 50 + [("mail", "b")] * 5 + [("other", None)] * 5
    with store.transaction():
        for n, (name, key) in enumerate(subs):
            store.intake(msgspec.convert({"task-id": f"t{n}", "task": name, "limit_key": key}, m.Submission), 1.0)
    scheduler = Scheduler(Limiter((Limit("mail", concurrency=1),)))
    scheduler.join(Member(epoch="e1", worker="w", slots=2, prefetch=0, tasks=frozenset({"mail", "other"}),
                          partition=0))
    with store.transaction():
        first = [g.task_id for g in scheduler.plan(store, 2.0, 0.0)]
    assert first == ["t0", "t50"]  # a's first, then b's first (a's next would break the limit)
    scheduler.finished("e1", "t50")
    with store.transaction():
        second = [g.task_id for g in scheduler.plan(store, 3.0, 0.0)]
    assert second == ["t51"]  # "b" has room again; "a" still runs t0
    scheduler.finished("e1", "t51")
    scheduler.finished("e1", "t0")
    with store.transaction():
        third = [g.task_id for g in scheduler.plan(store, 4.0, 0.0)]
    assert third == ["t1", "t52"]


def test_a_spent_budget_without_a_key_leaves_keyed_tasks_free(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite", create=True)
    with store.transaction():
        for n, key in enumerate([None, None, "a"]):
            store.intake(msgspec.convert({"task-id": f"t{n}", "task": "mail", "limit_key": key}, m.Submission), 1.0)
    scheduler = Scheduler(Limiter((Limit("mail", concurrency=1),)))
    scheduler.join(Member(epoch="e1", worker="w", slots=3, prefetch=0, tasks=frozenset({"mail"}), partition=0))
    with store.transaction():
        assert [g.task_id for g in scheduler.plan(store, 2.0, 0.0)] == ["t0", "t2"]
