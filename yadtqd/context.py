"""What a task function can know about the execution it runs in.

Inside a task function, :func:`current` returns the task id, the attempt, and the worker and
epoch running it; outside an execution it returns None::

    from yadtqd.context import current

    def my_task():
        ctx = current()
        return {"ran as": ctx.task_id, "attempt": ctx.attempt}
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TaskContext:
    """One execution of one attempt of a task."""

    task_id: str
    attempt: int
    worker: str
    epoch: str


_current: TaskContext | None = None


def current() -> TaskContext | None:
    """The execution this process is running now, if any."""
    return _current


def _set(ctx: TaskContext | None) -> None:
    global _current
    _current = ctx
