"""The values the store's transitions hand back: what intake made of a submission, a queued
task the scheduler may grant, a grant held, a grant made."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Intake:
    """What intake made of one submission: ``new``, ``duplicate`` or ``conflict``."""

    task_id: str
    outcome: str


@dataclass(frozen=True)
class Waiting:
    """A queued task the scheduler may grant; ``size``: its payload's length (characters of
    JSON), which an epoch's prefetch counts against its byte budget."""

    task_id: str
    name: str
    limit_key: str | None = None
    size: int = 0


@dataclass(frozen=True)
class Held:
    """A granted, unfinished task as the scheduler restores it (``size`` as in :class:`Waiting`)."""

    task_id: str
    name: str
    limit_key: str | None = None
    size: int = 0


@dataclass(frozen=True)
class Grant:
    """A granted attempt, with what the worker needs to run it."""

    task_id: str
    worker: str
    epoch: str
    attempt: int
    payload: str
    grant_no: int = 0
    #: The task's priority: the worker starts the grants it holds highest first.
    priority: int = 0
