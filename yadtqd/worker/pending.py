"""The runs an epoch holds and has not started: the order they start in."""

from __future__ import annotations

from collections import deque

from yadtqd import messages as m


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
