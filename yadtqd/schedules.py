"""Schedules (issue 14): tasks submitted on a calendar, from ``[schedules.NAME]`` tables of the
configuration::

    [schedules.nightly-report]
    task = "report"
    args = ["daily"]
    cron = "30 2 * * *"        # minute hour day month weekday, UTC; a sixth field is seconds
    missed = "skip"            # "skip" | "once" | "all"

The active server fires each tick once: its task id is ``cron:<name>:<tick in epoch seconds>``,
so a tick fired twice (after a takeover, say) is one task (idempotent intake), and the last tick
fired is a row of the store, replicated with the task it made. Cron expressions are read by
croniter. ``missed`` says what a server does with ticks that passed while no server was active: every
tick at most :data:`GRACE` seconds late fires; of those later than that, ``skip`` fires none,
``once`` the newest only, ``all`` every one (at most :data:`MOST` per pass).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

from croniter import croniter

from yadtqd.errors import ConfigError
from yadtqd.messages import MOST_PRIORITY

#: Seconds late a tick may be and still fire under ``missed = "skip"``.
GRACE = 60.0
#: Ticks fired per schedule per pass at most (``missed = "all"`` after a long outage).
MOST = 1000
MISSED = ("skip", "once", "all")
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass(frozen=True)
class Schedule:
    """One ``[schedules.NAME]`` table."""

    name: str
    task: str
    cron: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    missed: str = "skip"
    priority: int = 0

    def task_id(self, tick: float) -> str:
        """The id of the task a tick makes."""
        return f"cron:{self.name}:{int(tick)}"

    def due(self, last: float, now: float) -> tuple[list[float], float]:
        """The ticks to fire now, oldest first, after ``last`` (the last tick fired or
        considered) up to ``now``, by the ``missed`` policy; and the newest tick considered
        (the next call starts after it)."""
        if self.missed == "all":
            ticks = self._ticks(last, now)
            return ticks, ticks[-1] if ticks else last
        newest = self._latest(now)
        if newest <= last:
            return [], last
        recent = self._ticks(max(last, now - GRACE), now)  # on time, or nearly: every one fires
        if self.missed == "once":
            older = self._latest(now - GRACE)  # the newest tick missed by more than the grace
            if older > last and (not recent or older < recent[0]):
                recent = [older, *recent]
        return recent, max([newest, *recent])

    def _latest(self, now: float) -> float:
        """The newest tick at or before ``now`` (croniter's ``get_prev`` excludes its start)."""
        it = croniter(self.cron, now + 1.0)
        tick = float(it.get_prev(float))
        while tick > now:
            tick = float(it.get_prev(float))
        return tick

    def _ticks(self, after: float, now: float) -> list[float]:
        """The ticks after ``after`` up to ``now``, at most :data:`MOST`."""
        ticks: list[float] = []
        it = croniter(self.cron, after)
        while len(ticks) < MOST:
            tick = float(it.get_next(float))
            if tick > now:
                break
            ticks.append(tick)
        return ticks

    def next_after(self, when: float) -> float:
        """The first tick after ``when``."""
        return float(croniter(self.cron, when).get_next(float))


def _ever(cron: str) -> bool:
    """Whether the expression has a tick before and after now (``0 0 31 2 *`` has none)."""
    try:
        it = croniter(cron, time.time())
        it.get_next(float)
        croniter(cron, time.time()).get_prev(float)
    except Exception:  # croniter raises its own errors for dates that never come
        return False
    return True


def parse_schedules(tables: dict[str, Any], where: str) -> tuple[Schedule, ...]:
    """The ``[schedules]`` tables of a configuration file, checked (:class:`ConfigError`
    naming the schedule and the problem)."""
    out = []
    for name, table in tables.items():
        at = f"{where}: [schedules.{name}]"
        if not _NAME.fullmatch(name):
            raise ConfigError(f"{at}: a schedule's name is 1 to 64 of A-Z a-z 0-9 . _ -")
        if not isinstance(table, dict):
            raise ConfigError(f"{at} must be a table")
        unknown = set(table) - {"task", "cron", "args", "kwargs", "missed", "priority"}
        if unknown:
            raise ConfigError(f"{at}: unknown key {sorted(unknown)[0]!r} (known: args, cron, kwargs,"
                              " missed, priority, task)")
        task, cron = table.get("task"), table.get("cron")
        if not isinstance(task, str) or not task:
            raise ConfigError(f"{at}: task: the name of a task is required")
        if not isinstance(cron, str) or not croniter.is_valid(cron) or not _ever(cron):
            raise ConfigError(f"{at}: cron: {cron!r} is not a cron expression that ever fires"
                              " (minute hour day month weekday, and optionally seconds)")
        args, kwargs = table.get("args", []), table.get("kwargs", {})
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise ConfigError(f"{at}: args must be a list and kwargs a table")
        missed = table.get("missed", "skip")
        if missed not in MISSED:
            raise ConfigError(f"{at}: missed must be one of {', '.join(MISSED)}, got {missed!r}")
        priority = table.get("priority", 0)
        if not isinstance(priority, int) or isinstance(priority, bool) or abs(priority) > MOST_PRIORITY:
            raise ConfigError(f"{at}: priority must be an integer from {-MOST_PRIORITY:,} to"
                              f" {MOST_PRIORITY:,}")
        out.append(Schedule(name, task, cron, tuple(args), dict(kwargs), missed, priority))
    return tuple(out)
