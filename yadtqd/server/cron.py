"""Firing schedules (issue 14, :mod:`yadtqd.schedules`): once a second the active server fires
the ticks that came due, each as a task with an id derived from the schedule and the tick, in
one transaction with the schedule's new last tick, so a tick fires once across restarts and
takeovers (the changelog carries both; a tick fired again is a duplicate at intake).
"""

from __future__ import annotations

import logging
import time

from yadtqd import messages as m
from yadtqd.schedules import Schedule
from yadtqd.store import Store

log = logging.getLogger("yadtqd.server")

#: Seconds between two looks at the schedules.
EVERY = 0.5


class Cron:
    """Fires the configured schedules."""

    def __init__(self, schedules: tuple[Schedule, ...]) -> None:
        self.schedules = schedules
        self.last = 0.0
        self.tidied = False

    def step(self, store: Store, now: float) -> int:
        """Fire what is due; returns the tasks made (0 when not due to look yet)."""
        mono = time.monotonic()
        if not self.schedules or mono - self.last < EVERY:
            return 0
        self.last = mono
        made = 0
        with store.transaction():
            if not self.tidied:  # once a term: a schedule removed from the configuration is
                self.tidied = True  # forgotten, so one added again later starts afresh
                gone = store.forget_schedules([s.name for s in self.schedules])
                if gone:
                    log.info("forgot %d schedules no longer configured", gone)
            known = store.schedule_ticks()
            for schedule in self.schedules:
                if schedule.name not in known:  # new: its first tick is the next one
                    store.schedule_fired(schedule.name, now, 0)
                    log.info("schedule %s: first tick at %s", schedule.name,
                             time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(schedule.next_after(now))))
                    continue
                last, _ = known[schedule.name]
                ticks, newest = schedule.due(last, now)
                new = 0
                for tick in ticks:
                    sub = m.Submission(task_id=schedule.task_id(tick), task=schedule.task,
                                       args=list(schedule.args), kwargs=dict(schedule.kwargs),
                                       priority=schedule.priority, submitted_at=tick)
                    if store.intake(sub, now).outcome == "new":
                        new += 1
                        log.info("task %s received: %s (schedule %s)", sub.task_id, sub.task, schedule.name,
                                 extra={"task_id": sub.task_id, "event": "task_received"})
                if newest > last:
                    store.schedule_fired(schedule.name, newest, new)
                made += new
        return made
