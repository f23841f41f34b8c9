"""Who runs what (DESIGN section 5): the live worker epochs and the grant plan.

A queued task, oldest first, goes to a live epoch that advertises the task's name and may take
one more grant; of those, to the one with the most free slots (its slots minus the grants it
holds: below zero while some wait in it), then one whose pipeline is short (no more expected
work than the horizon, no task run long), then the fewest grants of the task's name held, then
the least expected work held, ties going to the epoch granted least recently. Every grant is the store's conditional update; the scheduler only
chooses. It is the server's in-memory view, rebuilt from the store at start.

An epoch with a free slot may always take a grant. Beyond its slots it holds *prefetched*
grants, which start as soon as a slot frees, so the round trip between two grants does not
leave a slot idle. A worker's ``prefetch`` is a fixed number or :data:`ADAPTIVE` (the default).
An adaptive epoch takes a grant beyond its slots only while the work it already holds is
expected to end within :data:`PREFETCH_HORIZON` per slot, judged from how long recent tasks of
the same names held a slot (from applying their ``started`` to applying their ``finished``), and
while the payloads it holds stay under :data:`PREFETCH_BYTES`.
Tiny tasks so get a deep pipeline; nothing waits behind a task whose length is unknown or that
is known to be long, so no task waits in a busy worker while another could run it.

Two rules keep a burst that mixes known and unknown names even (DESIGN 5): when a name's first
task ends, the grants of it every epoch holds count its estimate at once (they stop blocking
prefetch together); and while an epoch cannot take more only because it was just given a task
of a name not timed yet, no other epoch takes more than its slots beyond that one's grants.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import json
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from yadtqd.server.limiter import Limiter
from yadtqd.store import Grant, Held, Store, Waiting
from yadtqd.transport import partition_for

#: The ``prefetch`` a worker advertises to ask for an adaptive window.
ADAPTIVE = -1
#: Seconds of expected work per slot an adaptive epoch may hold before it takes no more. What a
#: burst leaves past the horizon is granted as slots free, so to whichever epochs ran fastest:
#: the horizon is also how much of a burst is shared out evenly. At 50 ms, 150 ``add`` and 150
#: ``sleep(0.002)`` on three workers of 2 slots left a tail of 25 to 70 tasks, and a worker's
#: count strayed 17 to 32 % from the mean in 3 runs of 10 on a loaded machine (DESIGN 5 allows
#: 15 %); at 100 ms, at most 7 % in 10 runs.
PREFETCH_HORIZON = 0.1
#: The most grants an adaptive epoch holds beyond each slot: the bound for tasks so short that
#: the horizon would allow thousands. It must cover a grant's round trip under load (the
#: ``finished`` lingers, a turn that may be recording a burst of submissions, a commit behind
#: the one under way, the fetch: 50-100 ms here), counted in tasks as a worker really runs them,
#: its own work on each included. 32 per slot ran dry when a worker spent 0.3-0.5 ms a task (two
#: workers, 10,000 ``add``: 2,610 -> 3,334 tasks/s at 128). Once it spent under 0.1 ms, 128
#: ran dry in turn: one worker of 2 slots received its grants 258 at a time, every 100 ms, while
#: the server recorded the burst. At 512: one worker 6,440 -> 9,758 tasks/s, two 8,030 -> 8,355
#: (10,000 ``add``, medians of three series alternated); the two cores are then full with one.
PREFETCH_PER_SLOT = 512
#: The most payload an adaptive epoch holds (characters of JSON, the tasks it runs included)
#: and still takes grants beyond its slots. The count caps alone let a worker of 8 slots hold
#: 4,104 tasks of up to 512 KiB each (2 GiB in its memory, and as much in one turn's
#: transaction): a task's payload says nothing of how long it runs. At 8 MiB, 1,000 tasks of
#: 8 KB are held, or 16 of 512 KiB.
PREFETCH_BYTES = 8 * 1024 * 1024
#: The most grants an adaptive epoch holds beyond its slots, however many slots it has: what it
#: holds goes back in ``bye`` messages of 256 when it leaves, and 500 of it are listed in one
#: changelog record when it dies (its ``failures`` row, which counts the rest).
PREFETCH_MOST = 4096
#: A task running longer than this is long, whatever its name's estimate says: its epoch takes
#: no prefetched grants until it ends. (Below it, its ``finished`` may simply be unread yet.)
LONG_TASK = 0.5
#: Reads of the queue per plan at most: each one past the global-limit keys the last one filled.
LIMIT_PASSES = 4
#: Weight of the newest time in a task name's moving average.
SMOOTHING = 0.25


class Estimates:
    """How long tasks of each name hold a slot: a moving average of the recent ones."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def get(self, name: str) -> float | None:
        """The estimate for a task name, or None while none of its tasks has ended."""
        return self.seconds.get(name)

    def shortest(self, names: Iterable[str]) -> float | None:
        """The least estimate among these names (None when none has one)."""
        return min((s for n in names if (s := self.seconds.get(n)) is not None), default=None)

    def add(self, name: str, sample: float) -> None:
        """One task of this name held its slot ``sample`` seconds."""
        average = self.seconds.get(name)
        self.seconds[name] = sample if average is None else average + SMOOTHING * (sample - average)


@dataclass
class Member:
    """One live (or leaving) worker epoch as the scheduler sees it."""

    epoch: str
    worker: str
    slots: int
    prefetch: int
    tasks: frozenset[str]
    #: The ``events`` partition it writes to and the ``dispatch`` partition it reads.
    partition: int
    dispatch: int = -1
    accepting: bool = True
    #: Grants made to it so far: the next one is numbered ``grants + 1``.
    grants: int = 0
    last_granted: int = 0
    last_heartbeat: float = field(default_factory=time.monotonic)
    #: When this server process last applied a *fresh* heartbeat of it (one sent less than two
    #: timeouts ago by the worker's clock), -inf until then: a holder restored from the store,
    #: or only heard of through a backlog, is not known to be alive.
    heard: float = float("-inf")
    #: The grants it holds: task id → (task name, estimated seconds when granted, None = unknown,
    #: payload size).
    held: dict[str, tuple[str, float | None, int]] = field(default_factory=dict)
    #: Task id → when its ``started`` was applied (monotonic), for the tasks running now.
    running: dict[str, float] = field(default_factory=dict)
    #: How many grants of each task name it holds.
    names: dict[str, int] = field(default_factory=dict)
    #: Sum of the known estimates of the held grants, and how many have none.
    work: float = 0.0
    unknown: int = 0
    #: Sum of the payload sizes of the held grants.
    payload: int = 0
    #: Whether a running task has been running longer than :data:`LONG_TASK` (see :meth:`refresh`).
    long_running: bool = False
    #: When this server last granted it a task of a name not timed yet (monotonic).
    unknown_granted: float = float("-inf")

    @property
    def outstanding(self) -> int:
        """Grants held: granted, not yet finished or handed back."""
        return len(self.held)

    @property
    def free(self) -> int:
        """Slots not taken by the grants it holds; negative while some wait in it."""
        return self.slots - len(self.held)

    @property
    def most(self) -> int:
        """The most grants it may ever hold: slots plus the fixed prefetch, or plus the adaptive
        one's cap."""
        if self.prefetch != ADAPTIVE:
            return self.slots + self.prefetch
        return self.slots + min(self.slots * PREFETCH_PER_SLOT, PREFETCH_MOST)

    def room(self, shortest: float | None) -> int:
        """At most how many grants it may take now, ``shortest`` being the least estimate of the
        names it provides (None: none has one): how much of the queue a plan need read for it.
        Beyond its slots, an adaptive epoch's every grant adds at least ``shortest`` of work or
        is of unknown length, which stops it, so the horizon bounds the count too."""
        if not self.may_take():
            return 0
        left = self.most - len(self.held)
        if self.prefetch != ADAPTIVE or not shortest:
            return left
        free = max(0, self.slots - len(self.held))
        budget = max(0.0, PREFETCH_HORIZON * self.slots - self.work)
        return min(left, free + int(budget / shortest) + 2)

    def may_take(self) -> bool:
        """Whether one more grant may go to this epoch now."""
        held = len(self.held)
        if not self.accepting or held >= self.most:
            return False
        if held < self.slots or self.prefetch != ADAPTIVE:
            return True
        return (self.unknown == 0 and not self.long_running
                and self.work <= PREFETCH_HORIZON * self.slots and self.payload < PREFETCH_BYTES)

    def refresh(self, mono: float) -> None:
        """Note whether a running task has turned out long (call before planning)."""
        self.long_running = any(mono - began > LONG_TASK for began in self.running.values())

    def hold(self, task_id: str, name: str, estimate: float | None, size: int = 0) -> None:
        """A grant now held (``size``: its payload's)."""
        self.held[task_id] = (name, estimate, size)
        self.payload += size
        self.names[name] = self.names.get(name, 0) + 1
        if estimate is None:
            self.unknown += 1
        else:
            self.work += estimate

    def learn(self, name: str, estimate: float) -> None:
        """Tasks of ``name`` now have an estimate: the grants of it held as of unknown length
        count it from now on."""
        for task_id, (held_name, known, size) in self.held.items():
            if held_name == name and known is None:
                self.held[task_id] = (name, estimate, size)
                self.unknown -= 1
                self.work += estimate

    def release(self, task_id: str) -> str | None:
        """A held grant finished or was handed back; returns its task name."""
        self.running.pop(task_id, None)
        entry = self.held.pop(task_id, None)
        if entry is None:
            return None
        name, estimate, size = entry
        self.payload -= size
        self.names[name] -= 1
        if estimate is None:
            self.unknown -= 1
        else:
            self.work = max(0.0, self.work - estimate) if self.held else 0.0
        return name


def _rank(mb: Member, name: str) -> tuple[int, bool, int, float, int]:
    """An epoch's place in the order of choice for a task of ``name``, lowest first: the most
    free slots, then one whose pipeline is short (no more expected work than the horizon, no
    task run long), then the fewest grants of that name held, then the least expected work
    held, then granted least recently. The name comes before the work: in a queue mixing names
    at random, work alone sends a run of tiny tasks to one epoch and a run of long ones to the
    others, and the epochs then reach the horizon at different times, the last one open taking
    the tiny tasks meanwhile (three epochs, 300 tasks, one plan: 30 to 64 ``add`` each; by name,
    40 to 50). But not before a long pipeline (a fixed prefetch past the horizon, or a task run
    long): a task must not wait behind a long one there while another epoch's is short."""
    long = mb.long_running or mb.work > PREFETCH_HORIZON * mb.slots
    return (-mb.free, long, mb.names.get(name, 0), mb.work, mb.last_granted)


def _floors(mb: Member, mono: float) -> bool:
    """Whether the epoch may hold the others back on the names it provides (see
    :meth:`Scheduler._pick`): it was just granted a task of a name not timed yet."""
    return bool(mb.unknown) and mono - mb.unknown_granted < LONG_TASK


class Chooser:
    """The epochs one plan may grant to, best first for each task name: a heap per name, kept
    lazily. Within a plan an epoch only gets worse, as a choice (a grant takes a slot, adds a
    grant of its name and its work, makes it the one granted last) and as a taker (it never takes again once it may not),
    so an entry that no longer matches its epoch's rank is put back where it now belongs, and
    one that may not take is dropped. Ties go to the epoch first in the scheduler's order, as
    in :meth:`Scheduler._pick`, which it stands in for: the same choice for O(log n) a grant."""

    def __init__(self, takers: list[Member]) -> None:
        self.takers = takers
        self.heaps: dict[str, list[tuple[tuple[int, bool, int, float, int], int, Member]]] = {}

    def pick(self, name: str) -> Member | None:
        """The epoch the next task of ``name`` goes to, if any may take it."""
        heap = self.heaps.get(name)
        if heap is None:
            heap = [(_rank(mb, name), i, mb) for i, mb in enumerate(self.takers) if name in mb.tasks]
            heapq.heapify(heap)
            self.heaps[name] = heap
        while heap:
            rank, i, mb = heap[0]
            if not mb.may_take():
                heapq.heappop(heap)
            elif rank != _rank(mb, name):
                heapq.heapreplace(heap, (_rank(mb, name), i, mb))
            else:
                return mb
        return None


class Scheduler:
    """The set of live epochs, the task time estimates, and the choice of grants."""

    def __init__(self, limiter: Limiter | None = None) -> None:
        self.members: dict[str, Member] = {}
        #: The current plan's fast choice, None when the slow one must decide.
        self._chooser: Chooser | None = None
        self.estimates = Estimates()
        self.limiter = limiter or Limiter(())
        self._order = itertools.count(1)

    def load(self, rows: Iterable[sqlite3.Row], held: dict[str, list[Held]],
             events_partitions: int, dispatch_partitions: int) -> None:
        """Rebuild the view from the store after a restart (held grants count as of unknown
        length until they end). Epochs registered before the store kept their partitions get
        the hash of their worker id over the partition counts given."""
        for row in rows:
            member = Member(
                epoch=row["epoch"], worker=row["worker"], slots=row["slots"], prefetch=row["prefetch"],
                tasks=frozenset(json.loads(row["tasks"])),
                partition=_or_hash(row["events_partition"], row["worker"], events_partitions),
                dispatch=_or_hash(row["dispatch_partition"], row["worker"], dispatch_partitions),
                accepting=row["state"] == "live", grants=row["grants"],
            )
            for grant in held.get(member.epoch, []):
                member.hold(grant.task_id, grant.name, None, grant.size)
                self.limiter.granted(grant.task_id, grant.name, grant.limit_key, None)
            self.members[member.epoch] = member

    def join(self, member: Member) -> None:
        """A new epoch said hello."""
        self.members[member.epoch] = member

    def remove(self, epoch: str) -> Member | None:
        """An epoch left or was declared dead."""
        member = self.members.pop(epoch, None)
        for task_id in member.held if member else ():
            self.limiter.released(task_id)
        return member

    def routes(self) -> dict[str, int]:
        """The ``dispatch`` partition of each epoch."""
        return {epoch: mb.dispatch for epoch, mb in self.members.items()}

    def open_routes(self) -> set[int]:
        """The ``dispatch`` partitions of the epochs that may take a grant now."""
        return {mb.dispatch for mb in self.members.values() if mb.may_take()}

    def provided(self) -> set[str]:
        """Every task name some live, accepting epoch advertises."""
        return {n for mb in self.members.values() if mb.accepting for n in mb.tasks}

    def plan(self, store: Store, now: float, mono: float | None = None) -> list[Grant]:
        """Grant as many queued tasks as the epochs may take; call inside a transaction.
        ``mono``: the monotonic time read with ``now`` (the rate limits count on it)."""
        mono = time.monotonic() if mono is None else mono
        for mb in self.members.values():
            mb.refresh(mono)
        takers = [mb for mb in self.members.values() if mb.may_take()]
        if not takers:
            return []
        self._chooser = None if any(_floors(mb, mono) for mb in self.members.values()) else Chooser(takers)
        grants: list[Grant] = []
        counts: dict[str, int] = {}
        for _ in range(LIMIT_PASSES):  # again, past the limit keys the last pass filled
            limit, each = self._room(takers)  # the most they may take: no more of the queue is read
            held_back, before = False, len(grants)
            chosen: list[tuple[Waiting, Member]] = []
            for waiting in store.waiting(each, limit, now, self.limiter.closed(mono), each):
                if not self.limiter.allows(waiting.name, waiting.limit_key, mono):
                    held_back = True  # a global limit (issue 14): it waits in the queue, in its place
                    continue
                member = self._choose(waiting, mono)
                if member is not None:
                    chosen.append((waiting, member))
            grants += self._record(store, chosen, now, mono, counts)  # before the next pass reads the queue
            if not held_back or len(grants) == before or not any(mb.may_take() for mb in takers):
                break
        store.count_grants(counts)
        return grants

    def _room(self, takers: list[Member]) -> tuple[int, dict[str, int]]:
        """How many grants the takers may take at most, in all and of each name they provide."""
        total, each = 0, dict[str, int]()
        for mb in takers:
            room = mb.room(self.estimates.shortest(mb.tasks))
            total += room
            for name in mb.tasks if room else ():
                each[name] = each.get(name, 0) + room
        return total, each

    def _choose(self, waiting: Waiting, mono: float) -> Member | None:
        """The epoch a queued task goes to, which holds it from now on (numbered, counted
        against its room and the limits), if any may take it: the next task's choice depends
        on this one. :meth:`_record` makes the grants, or undoes this for a grant not made."""
        member = self._pick(waiting.name, mono) if self._chooser is None else self._chooser.pick(waiting.name)
        if member is None:
            return None
        member.grants += 1
        estimate = self.estimates.get(waiting.name)
        member.hold(waiting.task_id, waiting.name, estimate, waiting.size)
        if estimate is None:
            member.unknown_granted = mono
            self._chooser = None  # the rule on names not timed yet applies from now on
        self.limiter.granted(waiting.task_id, waiting.name, waiting.limit_key, mono)
        member.last_granted = next(self._order)
        return member

    def _record(self, store: Store, chosen: list[tuple[Waiting, Member]], now: float, mono: float,
                counts: dict[str, int]) -> list[Grant]:
        """Make the chosen grants, in one conditional update (each task's own condition: still
        ``queued``). A task that was not is let go again (its epoch and the limits as if it was
        never chosen; the choices made after it stand), and the grants after it to the same
        epoch are numbered again, so that an epoch's grant numbers still follow each other (its
        worker's :class:`~yadtqd.worker.seen.Seen` counts on it)."""
        numbered = _numbered(chosen)
        made = store.grant_many([(w.task_id, mb.worker, mb.epoch, no) for w, mb, no in numbered], now)
        grants: list[Grant] = []
        shifted: dict[str, tuple[Member, int]] = {}  # epoch → (it, the number its next grant takes)
        for waiting, member, number in numbered:
            grant = made.get(waiting.task_id)
            if grant is None:  # not queued any more: nobody else writes, so never expected
                member.release(waiting.task_id)
                self.limiter.ungranted(waiting.task_id, mono)
                shifted.setdefault(member.epoch, (member, number))
                self._chooser = None  # an epoch got better: the fast choice assumes none does
                continue
            if member.epoch in shifted:
                _, next_no = shifted[member.epoch]
                store.renumber_grant(grant.task_id, next_no)
                grants.append(dataclasses.replace(grant, grant_no=next_no))
                shifted[member.epoch] = (member, next_no + 1)
                continue
            grants.append(grant)
        for member, next_no in shifted.values():
            member.grants = next_no - 1
        for _, member in chosen:
            counts[member.epoch] = member.grants
        return grants

    def _pick(self, name: str, mono: float) -> Member | None:
        """The epoch a task of ``name`` goes to (the module's order), by a look at every epoch;
        :class:`Chooser` finds the same one faster while no epoch :func:`_floors`."""
        # beyond its slots, an epoch takes no more than its slots ahead of a peer that cannot
        # take now only because it was just granted a task of a name not timed yet: that one
        # catches up first, within moments, so a burst mixing known and unknown names ends in
        # even shares (DESIGN 5)
        floor = min((mb.outstanding for mb in self.members.values()
                     if name in mb.tasks and mb.accepting and _floors(mb, mono)), default=None)
        best: Member | None = None
        for mb in self.members.values():
            if name not in mb.tasks or not mb.may_take():
                continue
            if floor is not None and mb.outstanding >= max(mb.slots, floor + mb.slots):
                continue
            if best is None or _rank(mb, name) < _rank(best, name):
                best = mb
        return best

    def started(self, epoch: str, task_id: str) -> None:
        """A task granted to an epoch took a slot."""
        member = self.members.get(epoch)
        if member is not None and task_id in member.held:
            member.running[task_id] = time.monotonic()

    def finished(self, epoch: str, task_id: str, runtime: float | None = None,
                 measured: bool = True) -> None:
        """A task held by an epoch ended: its time updates its name's estimate (unless not
        ``measured``: a cancelled run). ``runtime`` is the worker's own measure; without it
        (older workers), the time between applying its ``started`` and its ``finished``, which
        a backlog or a replay squeezes."""
        self.limiter.released(task_id)  # (also when its epoch is gone)
        member = self.members.get(epoch)
        if member is None:
            return
        began = member.running.get(task_id)
        name = member.release(task_id)
        if name is None or not measured:
            return
        if runtime is None and began is not None:
            runtime = time.monotonic() - began
        if runtime is not None:
            first = self.estimates.get(name) is None
            self.estimates.add(name, runtime)
            if first:  # every epoch holding tasks of this name may prefetch again at once
                estimate = self.estimates.get(name) or 0.0
                for mb in self.members.values():
                    mb.learn(name, estimate)

    def handed_back(self, epoch: str, task_ids: Iterable[str]) -> None:
        """Unstarted grants held by an epoch went back to the queue."""
        member = self.members.get(epoch)
        if member is not None:
            for task_id in task_ids:
                member.release(task_id)
                self.limiter.released(task_id)


def _numbered(chosen: list[tuple[Waiting, Member]]) -> list[tuple[Waiting, Member, int]]:
    """The chosen grants with their numbers: each epoch's last one takes the number it counts
    now, those before it the ones before that."""
    left = {mb.epoch: mb.grants for _, mb in chosen}
    out = []
    for waiting, member in reversed(chosen):
        out.append((waiting, member, left[member.epoch]))
        left[member.epoch] -= 1
    return out[::-1]


def _or_hash(stored: int, worker: str, count: int) -> int:
    return stored if stored >= 0 else partition_for(worker, count)
