"""The runs an epoch holds and has not started: the order they start in, and how many go to a
slot at once."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from yadtqd import messages as m
from yadtqd.worker.pool import BATCH_MOST


def hold_in_order(pending: deque[m.Run], run: m.Run) -> None:
    """Queue a granted run among the unstarted ones this epoch holds: highest priority first,
    in arrival order within one, so an urgent task granted into a deep prefetch starts at the
    next free slot rather than behind the whole pipeline (issue 14)."""
    if not pending or pending[-1].priority >= run.priority:
        pending.append(run)
        return
    for index, held in enumerate(pending):
        if held.priority < run.priority:
            pending.insert(index, run)
            return


def next_batch(pending: deque[m.Run], free: int, short: Callable[[str], bool]) -> list[m.Run]:
    """Take the next run for a free slot, or a batch of them (issue 15): when more wait than
    ``free`` slots, each slot takes its share, at most :data:`~yadtqd.worker.pool.BATCH_MOST`,
    of the runs at the front that have no timeout and whose task names ran ``short`` here
    (:meth:`~yadtqd.worker.pool.Pool.short`). A lone task, or one of a name not yet timed, goes
    alone, as does a task with a timeout (it bounds one job)."""
    def batchable(run: m.Run) -> bool:
        return not run.options.timeout and short(run.task)

    share = min(BATCH_MOST, len(pending) // max(free, 1))
    runs = [pending.popleft()]
    while len(runs) < share and pending and batchable(runs[0]) and batchable(pending[0]):
        runs.append(pending.popleft())
    return runs
