"""The runs an epoch holds and has not started: the order they start in, and how many go to a
slot at once."""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Callable, Iterable, Iterator

from yadtqd import messages as m
from yadtqd.worker.pool import BATCH_MOST


class Pending:
    """The granted runs an epoch holds and has not started: highest priority first, in arrival
    order within one, so an urgent task granted into a deep prefetch starts at the next free
    slot rather than behind the whole pipeline (issue 14). A queue per priority in use: holding
    or taking a run costs the same however many wait (one sorted list scanned for each run held
    made a burst of 1,000 urgent runs into a prefetch of 4,096 quadratic)."""

    def __init__(self, runs: Iterable[m.Run] = ()) -> None:
        self._queues: dict[int, deque[m.Run]] = {}
        #: The priorities that have runs, negated and sorted: the highest first.
        self._order: list[int] = []
        self._count = 0
        self.extend(runs)

    def hold(self, run: m.Run) -> None:
        """Hold a run granted now: behind the others of its priority."""
        self._queue(run.priority).append(run)
        self._count += 1

    def extend(self, runs: Iterable[m.Run]) -> None:
        """Hold these runs, in this order."""
        for run in runs:
            self.hold(run)

    def put_back(self, runs: Iterable[m.Run]) -> None:
        """Runs taken but not started come back: ahead of the others of their priority, in
        the order given."""
        for run in reversed(list(runs)):
            self._queue(run.priority).appendleft(run)
            self._count += 1

    def first(self) -> m.Run:
        """The run that starts next (IndexError when none waits)."""
        if not self._order:
            raise IndexError("no run waits")
        return self._queues[-self._order[0]][0]

    def popleft(self) -> m.Run:
        """Take the run that starts next (IndexError when none waits)."""
        run = self.first()
        self._queues[run.priority].popleft()
        self._count -= 1
        self._drop_if_empty(run.priority)
        return run

    def remove(self, run: m.Run) -> None:
        """Let go of a held run (ValueError when it is not held)."""
        queue = self._queues.get(run.priority)
        if queue is None:
            raise ValueError("run not held")
        queue.remove(run)
        self._count -= 1
        self._drop_if_empty(run.priority)

    def clear(self) -> None:
        """Let go of every run."""
        self._queues.clear()
        self._order.clear()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[m.Run]:
        """The runs in the order they would start."""
        for negated in list(self._order):
            yield from list(self._queues[-negated])

    def __contains__(self, run: object) -> bool:
        return isinstance(run, m.Run) and run in self._queues.get(run.priority, ())

    def _queue(self, priority: int) -> deque[m.Run]:
        queue = self._queues.get(priority)
        if queue is None:
            queue = self._queues[priority] = deque()
            bisect.insort(self._order, -priority)
        return queue

    def _drop_if_empty(self, priority: int) -> None:
        if not self._queues[priority]:
            del self._queues[priority]
            self._order.pop(bisect.bisect_left(self._order, -priority))


def next_batch(pending: Pending, free: int, short: Callable[[str], bool]) -> list[m.Run]:
    """Take the next run for a free slot, or a batch of them (issue 15): when more wait than
    ``free`` slots, each slot takes its share, at most :data:`~yadtqd.worker.pool.BATCH_MOST`,
    of the runs at the front that have no timeout and whose task names ran ``short`` here
    (:meth:`~yadtqd.worker.pool.Pool.short`). A lone task, or one of a name not yet timed, goes
    alone, as does a task with a timeout (it bounds one job)."""
    def batchable(run: m.Run) -> bool:
        return not run.options.timeout and short(run.task)

    share = min(BATCH_MOST, len(pending) // max(free, 1))
    runs = [pending.popleft()]
    while len(runs) < share and pending and batchable(runs[0]) and batchable(pending.first()):
        runs.append(pending.popleft())
    return runs
