"""Who runs what (DESIGN section 5): the live worker epochs and the grant plan.

A queued task, oldest first, goes to the live epoch that (a) advertises the task's name and
(b) has the most free capacity (``slots + prefetch`` minus what it holds), ties going to the
epoch granted least recently. Every grant is the store's conditional update; the scheduler only
chooses. It is the server's in-memory view, rebuilt from the store at start.
"""

from __future__ import annotations

import itertools
import json
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from yadtqd.store import Grant, Store


@dataclass
class Member:
    """One live (or leaving) worker epoch as the scheduler sees it."""

    epoch: str
    worker: str
    capacity: int
    tasks: frozenset[str]
    partition: int
    outstanding: int = 0
    accepting: bool = True
    last_granted: int = 0
    last_heartbeat: float = field(default_factory=time.monotonic)

    @property
    def room(self) -> int:
        """How many more grants this epoch may hold now."""
        return self.capacity - self.outstanding if self.accepting else 0


class Scheduler:
    """The set of live epochs and the choice of grants."""

    def __init__(self) -> None:
        self.members: dict[str, Member] = {}
        self._order = itertools.count(1)

    def load(self, rows: Iterable[sqlite3.Row], outstanding: dict[str, int], partition_of: dict[str, int]) -> None:
        """Rebuild the view from the store after a restart."""
        for row in rows:
            member = Member(
                epoch=row["epoch"], worker=row["worker"], capacity=row["slots"] + row["prefetch"],
                tasks=frozenset(json.loads(row["tasks"])), partition=partition_of[row["worker"]],
                outstanding=outstanding.get(row["epoch"], 0), accepting=row["state"] == "live",
            )
            self.members[member.epoch] = member

    def join(self, member: Member) -> None:
        """A new epoch said hello."""
        self.members[member.epoch] = member

    def remove(self, epoch: str) -> Member | None:
        """An epoch left or was declared dead."""
        return self.members.pop(epoch, None)

    def provided(self) -> set[str]:
        """Every task name some live, accepting epoch advertises."""
        return {n for mb in self.members.values() if mb.accepting for n in mb.tasks}

    def plan(self, store: Store, now: float) -> list[Grant]:
        """Grant as many queued tasks as there is room for; call inside a transaction."""
        with_room = [mb for mb in self.members.values() if mb.room > 0]
        if not with_room:
            return []
        names = {n for mb in with_room for n in mb.tasks}
        limit = sum(mb.room for mb in with_room)
        grants = []
        for waiting in store.waiting(names, limit, now):
            member = self._pick(waiting.name)
            if member is None:
                continue
            grant = store.grant(waiting.task_id, member.worker, member.epoch, now)
            if grant is not None:
                member.outstanding += 1
                member.last_granted = next(self._order)
                grants.append(grant)
        return grants

    def _pick(self, name: str) -> Member | None:
        best: Member | None = None
        for mb in self.members.values():
            if mb.room <= 0 or name not in mb.tasks:
                continue
            if best is None or (mb.room, -mb.last_granted) > (best.room, -best.last_granted):
                best = mb
        return best

    def released(self, epoch: str | None, count: int = 1) -> None:
        """Tasks held by an epoch finished or were handed back."""
        member = self.members.get(epoch or "")
        if member is not None:
            member.outstanding = max(0, member.outstanding - count)
