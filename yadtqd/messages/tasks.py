"""The ``tasks`` topic: submissions (the seed's format among them) and the operator's orders."""

from __future__ import annotations

import datetime as dt
import hashlib
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct, field

from yadtqd.errors import BadMessage
from yadtqd.messages.common import MAX_DELAY, Priority, TaskId, TaskName

class Options(Struct, kw_only=True, omit_defaults=True, frozen=True):
    """Per-task options of a submission."""

    timeout: Annotated[float, Meta(gt=0)] | None = None
    max_retries: Annotated[int, Meta(ge=0, le=1000)] = 0
    retry_backoff: Annotated[float, Meta(ge=0, le=86400)] = 1.0


class FollowUp(Struct, kw_only=True, omit_defaults=True):
    """A chain's next task: queued when the task that names it succeeds, with that task's result
    as its first argument (before ``args``); it may name a follow-up of its own."""

    task: TaskName
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    options: Options = Options()
    then: FollowUp | None = None


def follow_up_id(parent: str) -> str:
    """The id of the follow-up of task ``parent``: ``<parent>.then``, or, when that would be
    too long for an id, a digest of the parent's id with ``.then``."""
    if len(parent) + 5 <= 128:
        return f"{parent}.then"
    return f"{hashlib.sha256(parent.encode()).hexdigest()[:40]}.then"


class Submission(Struct, kw_only=True, omit_defaults=True):
    """A task submitted on the ``tasks`` topic or through the socket."""

    task_id: TaskId = field(name="task-id")
    task: TaskName
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    options: Options = Options()
    submitted_at: float | str | None = None
    #: Higher runs first; FIFO within one priority.
    priority: Priority = 0
    #: Seconds after intake before the task may run (``scheduled`` until then).
    delay: Annotated[float, Meta(ge=0, le=MAX_DELAY)] | None = None
    #: When the task may run, ISO 8601 (UTC when no offset is given); not with ``delay``.
    eta: str | None = None
    #: The task to queue when this one succeeds (a chain).
    then: FollowUp | None = None
    #: The global limits of this task's name apply to the tasks of each key apart.
    limit_key: Annotated[str, Meta(min_length=1, max_length=200)] | None = None
    #: "socket" on the copy a server produces of a socket submit it recorded already.
    via: str = ""
    v: int = 1

    def __post_init__(self) -> None:
        if self.delay is not None and self.eta is not None:
            raise ValueError("give delay or eta, not both")
        if self.eta is not None:
            self.due(0.0)

    def due(self, now: float) -> float:
        """When the task may run: ``now``, ``now + delay``, or its ``eta`` (epoch seconds)."""
        if self.eta is not None:
            try:
                at = dt.datetime.fromisoformat(self.eta)
            except ValueError:
                raise ValueError(f"eta {self.eta[:60]!r} is not an ISO 8601 time") from None
            return (at if at.tzinfo else at.replace(tzinfo=dt.timezone.utc)).timestamp()
        return now + (self.delay or 0.0)

    def payload(self) -> str:
        """The canonical text of what the task is, to tell a resubmit from a conflict."""
        body = [self.task, self.args, self.kwargs, self.options]
        return msgspec.json.encode(body, order="sorted").decode()


class _IdOnly(Struct):
    task_id: TaskId = field(name="task-id")


_submission = msgspec.json.Decoder(Submission)
_id_only = msgspec.json.Decoder(_IdOnly)


def parse_submission(raw: bytes | None, max_bytes: int) -> Submission:
    """Parse a submission; on failure the error carries the task id if one can be read."""
    if not raw:
        raise BadMessage("empty message: a submission is a JSON object with task-id and task")
    if len(raw) > max_bytes:
        raise BadMessage(f"submission of {len(raw)} bytes is over the limit of {max_bytes} bytes",
                         task_id=_peek_id(raw))
    try:
        return _submission.decode(raw)
    except msgspec.DecodeError as exc:
        raise BadMessage(f"invalid submission: {exc}", task_id=_peek_id(raw)) from None


def _peek_id(raw: bytes) -> str | None:
    try:
        return _id_only.decode(raw).task_id
    except msgspec.DecodeError:
        return None


#: The terminal statuses a purge may name.
Ended = Literal["success", "failed", "cancelled"]


class Control(Struct, kw_only=True, omit_defaults=True):
    """An operator's order on the ``tasks`` topic (``yadtqctl cancel``, ``retry``, ``purge``),
    keyed like a submission of the same task, so it is read after that submission. Told apart
    from a submission by its ``op``, which no submission has."""

    op: Literal["cancel", "retry", "purge"]
    task_id: TaskId | None = field(name="task-id", default=None)
    #: purge: tasks that ended more than this many seconds before ``ts``.
    older_than: Annotated[float, Meta(ge=0)] | None = None
    #: purge: only these statuses (all terminal ones when empty).
    statuses: list[Ended] = []
    ts: float = 0.0
    #: The user who asked, as the socket saw them (-1: unknown).
    uid: int = -1
    #: retry: the attempt it retries (an order delivered twice then retries once).
    attempt: int | None = None
    v: int = 1

    def __post_init__(self) -> None:
        if self.op == "purge" and self.older_than is None:
            raise ValueError("a purge needs older_than")
        if self.op != "purge" and self.task_id is None:
            raise ValueError(f"{self.op} needs a task-id")


#: The operator's orders on ``tasks``; a message with another ``op`` is read as a submission.
ORDERS = ("cancel", "retry", "purge")


class _Op(Struct):
    op: str = ""


_control = msgspec.json.Decoder(Control)
_op = msgspec.json.Decoder(_Op)


def parse_tasks_message(raw: bytes | None, max_bytes: int) -> Submission | Control:
    """Parse a message read from the ``tasks`` topic: a submission, or an operator's order."""
    try:
        is_order = bool(raw) and _op.decode(raw or b"").op in ORDERS
    except msgspec.DecodeError:
        is_order = False  # not even JSON: the submission parser says what is wrong
    if not is_order:
        return parse_submission(raw, max_bytes)
    try:
        return _control.decode(raw or b"")
    except msgspec.DecodeError as exc:
        raise BadMessage(f"invalid order: {exc}", task_id=None) from None
