"""The global limits at grant time (issue 14, :mod:`yadtqd.limits`): the active server's count
of the granted, unfinished tasks of each limited (name, limit key), and the times of their recent
grants. Rebuilt from the store at each term: the running counts exactly (the store holds every
grant); the rate windows start empty, so a takeover may let one extra window's worth through.
"""

from __future__ import annotations

from collections import Counter, deque

from yadtqd.limits import Limit

Bucket = tuple[str, str | None]


class Limiter:
    """Whether one more task of a name (and key) may be granted now."""

    def __init__(self, limits: tuple[Limit, ...]) -> None:
        self.limits = {limit.task: limit for limit in limits}
        self.running: Counter[Bucket] = Counter()
        self.held: dict[str, Bucket] = {}
        self.recent: dict[Bucket, deque[float]] = {}

    def allows(self, name: str, key: str | None, mono: float) -> bool:
        """Whether a grant of a task of ``name`` (submitted with ``key``) keeps every limit."""
        limit = self.limits.get(name)
        if limit is None:
            return True
        bucket = (name, key)
        if limit.concurrency is not None and self.running[bucket] >= limit.concurrency:
            return False
        if limit.rate_count is not None:
            times = self.recent.setdefault(bucket, deque())
            while times and times[0] <= mono - limit.rate_period:
                times.popleft()
            if len(times) >= limit.rate_count:
                return False
        return True

    def closed(self, mono: float) -> dict[str, set[str | None]]:
        """The buckets that may take no grant now, by name: the queue is read past their tasks
        (a busy key must not hold back the tasks behind it)."""
        out: dict[str, set[str | None]] = {}
        for name, key in {*self.running, *self.recent}:
            if not self.allows(name, key, mono):
                out.setdefault(name, set()).add(key)
        for bucket in [b for b, times in self.recent.items() if not times and not self.running[b]]:
            del self.recent[bucket]  # idle keys are forgotten
        return out

    def granted(self, task_id: str, name: str, key: str | None, mono: float | None) -> None:
        """A task of a limited name was granted (``mono`` None: an earlier term's grant)."""
        if name not in self.limits:
            return
        bucket = (name, key)
        self.running[bucket] += 1
        self.held[task_id] = bucket
        if mono is not None:
            self.recent.setdefault(bucket, deque()).append(mono)

    def released(self, task_id: str) -> None:
        """A granted task ended, went back to the queue, or its worker died."""
        bucket = self.held.pop(task_id, None)
        if bucket is not None:
            self.running[bucket] -= 1
            if self.running[bucket] <= 0:
                del self.running[bucket]

    def ungranted(self, task_id: str, mono: float) -> None:
        """A grant noted at ``mono`` (:meth:`granted`) was not made after all: as if never
        noted, its time in the rate window included."""
        bucket = self.held.get(task_id)
        self.released(task_id)
        times = self.recent.get(bucket) if bucket is not None else None
        if times and mono in times:
            times.remove(mono)
