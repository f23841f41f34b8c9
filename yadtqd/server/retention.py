"""Retention (issue 14): terminal tasks and worker-failure records older than ``[server]
keep_finished`` / ``keep_failures`` are deleted, and the purges an operator orders are worked
through, in batches of at most :data:`BATCH` rows, each in a short transaction of its own, so the
write lock is never held for long and grants go on between batches. Deleted rows become
tombstones in the changelog (DESIGN 13). Run by the active server, once a second, or at every
turn while a backlog remains.
"""

from __future__ import annotations

import json
import logging
import time

from yadtqd.config import Config
from yadtqd.store import Store

log = logging.getLogger("yadtqd.server")

#: Rows deleted per transaction at most.
BATCH = 500
#: Seconds between two passes when nothing is left over.
EVERY = 1.0
#: Seconds a purged id is remembered when tasks are kept for ever (``keep_finished = 0``).
REMEMBER = 7 * 86400.0


class Retention:
    """Deletes what is past its keeping time, a batch per call."""

    def __init__(self, config: Config) -> None:
        self.keep_finished = config.server.keep_finished
        self.keep_failures = config.server.keep_failures
        self.last = 0.0

    def step(self, store: Store, now: float) -> int:
        """One batch of each kind that is due; returns the rows deleted (0 when not due yet)."""
        mono = time.monotonic()
        if mono - self.last < EVERY:
            return 0
        tasks = other = 0
        with store.transaction():
            if self.keep_finished:
                tasks += store.purge_tasks(("success", "cancelled"), now - self.keep_finished, now, BATCH)
            if self.keep_failures:
                tasks += store.purge_tasks(("failed",), now - self.keep_failures, now, BATCH)
                other += store.purge_failures(now - self.keep_failures, BATCH)
            tasks += self._order(store, now)
            # purged ids are remembered as long as tasks are kept (a week when kept for ever)
            other += store.forget_purged(now - (self.keep_finished or self.keep_failures or REMEMBER), BATCH)
            if tasks:
                store.bump("purged", tasks)
        deleted = tasks + other
        self.last = 0.0 if max(tasks, other) >= BATCH else mono  # a backlog: go on at the next turn
        if deleted:
            log.debug("retention: deleted %d rows", deleted)
        return deleted

    def _order(self, store: Store, now: float) -> int:
        """A batch of the oldest purge an operator ordered."""
        order = store.next_purge_order()
        if order is None:
            return 0
        deleted = store.purge_tasks(json.loads(order["statuses"]), order["before"], now, BATCH)
        done = deleted < BATCH
        store.purge_order_progress(order["seq"], deleted, done)
        if done:
            log.warning("purge done: %d tasks deleted", order["deleted"] + deleted,
                        extra={"event": "purge_done"})
        return deleted
