"""The runs a worker epoch has taken, to run each grant at most once (invariant 5) with memory
that does not grow with the number of tasks.

The server numbers the grants of each epoch 1, 2, 3, ... and a ``run`` sent again (after a
server restart, or a delivery failure) repeats its number. Runs arrive nearly in order (two
producers may swap neighbours), so the set of numbers taken is kept as a floor (every number up
to it was taken) plus the few numbers above it: exact, and as small as the reordering.
A run from an older server carries no number; those are remembered by ``(task id, attempt)``.
"""

from __future__ import annotations

import logging

log = logging.getLogger("yadtqd.worker")

#: Numbers kept above the floor at most. More means a run was lost for good (every run is
#: re-sent until delivered, so this is a bug or a lost message): the floor then moves past the
#: gap, logged at error, so memory stays bounded; the lost run, should it ever come, is dropped.
MOST_ABOVE = 100_000


class Seen:
    """The grants one epoch has taken."""

    def __init__(self) -> None:
        self.floor = 0
        self.above: set[int] = set()
        self.unnumbered: set[tuple[str, int]] = set()

    def take(self, grant: int | None, task_id: str, attempt: int) -> bool:
        """Note a run; False when it was taken before (a repeat to drop)."""
        if grant is None:
            key = (task_id, attempt)
            if key in self.unnumbered:
                return False
            self.unnumbered.add(key)
            return True
        if grant <= self.floor or grant in self.above:
            return False
        self.above.add(grant)
        while self.floor + 1 in self.above:
            self.floor += 1
            self.above.remove(self.floor)
        if len(self.above) > MOST_ABOVE:
            lowest = min(self.above)
            log.error("grants %d to %d of this epoch never arrived; no longer waiting for them",
                      self.floor + 1, lowest - 1, extra={"event": "grants_lost"})
            self.floor = lowest
            self.above.remove(lowest)
            while self.floor + 1 in self.above:
                self.floor += 1
                self.above.remove(self.floor)
        return True
