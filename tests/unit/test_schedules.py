"""Schedules (issue 14): the configuration's [schedules.NAME] tables and which ticks fire."""

from __future__ import annotations

from pathlib import Path

import pytest

from yadtqd import config
from yadtqd.errors import ConfigError
from yadtqd.schedules import GRACE, Schedule


def load(tmp_path: Path, table: str) -> config.Config:
    path = tmp_path / "yadtq.toml"
    path.write_text('[kafka]\n"bootstrap.servers" = "127.0.0.1:9092"\n' + table)
    return config.load(path, env={})


def test_a_schedule_is_read_from_its_table(tmp_path: Path) -> None:
    c = load(tmp_path, '[schedules.nightly]\ntask = "report"\nargs = ["daily"]\ncron = "30 2 * * *"\n'
                       'missed = "once"\npriority = 5\n')
    assert c.schedules == (Schedule("nightly", "report", "30 2 * * *", ("daily",), {}, "once", 5),)
    assert c.schedules[0].task_id(1_000_000.0) == "cron:nightly:1000000"


@pytest.mark.parametrize("table, problem", [
    ('[schedules.x]\ntask = "a"\ncron = "every day"\n', "is not a cron expression"),
    ('[schedules.x]\ncron = "* * * * *"\n', "task: the name of a task is required"),
    ('[schedules.x]\ntask = "a"\ncron = "* * * * *"\nmissed = "never"\n', "missed must be one of skip, once, all"),
    ('[schedules.x]\ntask = "a"\ncron = "* * * * *"\nwhen = 1\n', "unknown key 'when'"),
    ('[schedules."bad name"]\ntask = "a"\ncron = "* * * * *"\n', "a schedule's name is 1 to 64"),
    ('[schedules.x]\ntask = "a"\ncron = "* * * * *"\npriority = 5000000\n',
     "priority must be an integer from -1,000,000 to 1,000,000"),
])
def test_a_bad_schedule_is_named_with_its_problem(tmp_path: Path, table: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem) as caught:
        load(tmp_path, table)
    assert "[schedules." in str(caught.value)


EVERY_2S = "* * * * * */2"  # croniter: a sixth field is seconds


def test_on_time_ticks_fire_once_each() -> None:
    s = Schedule("t", "add", EVERY_2S, missed="skip")
    assert s.due(1000.0, 1003.0) == ([1002.0], 1002.0)
    assert s.due(1002.0, 1003.5) == ([], 1002.0)  # nothing new: the next look starts after 1002
    assert s.due(1002.0, 1004.0) == ([1004.0], 1004.0)


def test_missed_ticks_by_policy() -> None:
    last, now = 1000.0, 1000.0 + 10 * GRACE
    skip, newest = Schedule("t", "add", EVERY_2S, missed="skip").due(last, now)
    assert skip[0] >= now - GRACE and skip[-1] == newest <= now  # only the recent ones
    once, _ = Schedule("t", "add", EVERY_2S, missed="once").due(last, now)
    assert once[1:] == skip and now - GRACE - 2 < once[0] <= now - GRACE  # one for all the older
    every, _ = Schedule("t", "add", EVERY_2S, missed="all").due(last, now)
    assert every == [last + 2 * n for n in range(1, len(every) + 1)] and every[-1] == newest
    hourly = Schedule("t", "add", "0 * * * *", missed="skip")
    assert hourly.due(0.0, 7300.0) == ([], 7200.0)  # both missed by more than the grace: skipped


def test_a_pass_behind_by_a_few_ticks_fires_them_all_whatever_the_policy() -> None:
    for missed in ("skip", "once", "all"):  # a slow turn is not an outage
        assert Schedule("t", "add", EVERY_2S, missed=missed).due(1000.0, 1007.0) == ([1002.0, 1004.0, 1006.0], 1006.0)


def test_an_expression_that_never_fires_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not a cron expression that ever fires"):
        load(tmp_path, '[schedules.x]\ntask = "a"\ncron = "0 0 31 2 *"\n')
