"""Every message shape on every topic (DESIGN section 2), with its parser and its encoder.

Messages are UTF-8 JSON objects. Unknown fields are ignored, so versions can be mixed; a
message of the wrong shape raises :class:`~yadtqd.errors.BadMessage` with a sentence that names
the field and the problem (``Expected `int`, got `str` - at `$.attempt```).

Topics and their messages:

- ``tasks``: :class:`Submission` (the seed's ``{"task-id": ..., "task": ..., "args": [...]}``).
- ``dispatch``: :class:`Run`, :class:`Cancel`, :class:`Fenced`, :class:`Alive`, :class:`Left`,
  :class:`Refused` and the server's :class:`Prime`, tagged by ``"type"``.
- ``events``: :class:`Hello`, :class:`Heartbeat`, :class:`Started`, :class:`Finished` and
  :class:`Bye` from workers, and the server's own :class:`Mark`, tagged by ``"type"``.
- ``changelog``: the store's row changes, in their own codec, :mod:`yadtqd.changelog`.

Fields added after the first release are optional with a default that means "not sent", so a
message from an older peer still parses (see docs/design.md, "Liveness" and "Grants").
"""

from __future__ import annotations

import datetime as dt
import hashlib
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Raw, Struct, field

from yadtqd.errors import BadMessage

#: The most bytes of an error's message, and of its traceback, that an event carries.
ERROR_TEXT_LIMIT = 16 * 1024
#: Room for everything around a task's payload or result in the message that carries it (the
#: other fields, and a failed task's capped message and traceback).
ENVELOPE_BYTES = 64 * 1024
#: librdkafka's own default ``message.max.bytes``.
PRODUCER_DEFAULT_MAX = 1_000_000

TASK_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
TaskId = Annotated[str, Meta(pattern=TASK_ID_PATTERN)]
TaskName = Annotated[str, Meta(min_length=1, max_length=200)]
Attempt = Annotated[int, Meta(ge=1)]
Count = Annotated[int, Meta(ge=0)]
#: The range of a task's priority (a submission outside it is refused, naming it).
MOST_PRIORITY = 1_000_000
Priority = Annotated[int, Meta(ge=-MOST_PRIORITY, le=MOST_PRIORITY)]
#: The longest ``delay`` a submission may ask for: ten years, in seconds.
MAX_DELAY = 10 * 366 * 86400.0


# ---------------------------------------------------------------- tasks topic


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


# ---------------------------------------------------------------- dispatch topic


class Run(Struct, kw_only=True, tag_field="type", tag="run"):
    """The server grants one attempt of a task to one worker epoch."""

    worker: str
    epoch: str
    task_id: TaskId = field(name="task-id")
    attempt: Attempt
    task: TaskName
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    options: Options = Options()
    #: The server's ``heartbeat_timeout``: the worker starts this run only while it can prove
    #: its epoch was not declared dead (docs/design.md, "Liveness"). None from older servers.
    lease: Annotated[float, Meta(gt=0)] | None = None
    #: The grant's number within the epoch (1, 2, ...): a re-sent run repeats it, so the worker
    #: drops repeats exactly with bounded memory. None from older servers.
    grant: Annotated[int, Meta(ge=1)] | None = None
    #: The task's priority: of the grants a worker holds, it starts the highest first (FIFO
    #: within one), so a prefetch does not make a later urgent task wait. 0 from older servers.
    #: Not range-checked here: a grant is never dropped for its priority.
    priority: int = 0
    v: int = 1


#: The ``reason`` of a fence sent because a newer epoch of the same worker id said ``hello``: a
#: live worker that receives it knows another process holds its id.
NEWER_EPOCH = "a newer epoch of the same worker said hello"


class Fenced(Struct, kw_only=True, tag_field="type", tag="fenced"):
    """The server declared this epoch dead; the worker stops its tasks and registers anew."""

    worker: str
    epoch: str
    reason: str
    v: int = 1


class Alive(Struct, kw_only=True, tag_field="type", tag="alive"):
    """The answer to a heartbeat that asked (``probe``): the epoch was live when the server
    applied it. A worker whose proof of liveness lapsed starts tasks again only after this."""

    worker: str
    epoch: str
    probe: Annotated[int, Meta(ge=1)]
    v: int = 1


class Left(Struct, kw_only=True, tag_field="type", tag="left"):
    """The answer to a ``bye`` that asked (``confirm``): the server applied it and grants the
    epoch nothing more. Every ``run`` it granted the epoch is before this in the partition, so a
    stopping worker that has read this far has handed back all it will ever be sent."""

    worker: str
    epoch: str
    v: int = 1


class Refused(Struct, kw_only=True, tag_field="type", tag="refused"):
    """A ``hello`` the server will not register: another live process holds the worker id."""

    worker: str
    epoch: str
    reason: str
    v: int = 1


class Cancel(Struct, kw_only=True, tag_field="type", tag="cancel"):
    """An operator cancelled a task this epoch holds: drop it if not started, else stop its
    execution process (SIGTERM, SIGKILL after ``[worker] cancel_grace``); either way answer
    ``finished`` with status ``cancelled``, unless the task ended first."""

    worker: str
    epoch: str
    task_id: TaskId = field(name="task-id")
    attempt: Attempt
    #: The grant's number within the epoch, as its ``run`` had it (None from a grant without).
    grant: Annotated[int, Meta(ge=1)] | None = None
    v: int = 1


class Prime(Struct, kw_only=True, tag_field="type", tag="prime"):
    """A placeholder addressed to no worker: the server opens its next Kafka transaction ahead
    of need with one on each ``dispatch`` partition a grant may go to, so that registering
    the partitions (a round trip to the transaction coordinator) is not on a grant's path.
    Workers skip it (it names no worker)."""

    worker: str = ""
    epoch: str = ""
    v: int = 1


Dispatch = Run | Fenced | Alive | Left | Refused | Cancel | Prime
_dispatch: msgspec.json.Decoder[Dispatch] = msgspec.json.Decoder(Dispatch)


def parse_dispatch(raw: bytes | None) -> Dispatch:
    """Parse a message read from the ``dispatch`` topic."""
    try:
        return _dispatch.decode(raw or b"")
    except msgspec.DecodeError as exc:
        raise BadMessage(f"invalid dispatch message: {exc}") from None


# ---------------------------------------------------------------- events topic


class TaskRef(Struct, kw_only=True):
    """One attempt of one task."""

    task_id: TaskId = field(name="task-id")
    attempt: Attempt


class TaskInfo(Struct, kw_only=True):
    """Where a task a worker can run comes from."""

    plugin: str
    version: str = ""


class ErrorInfo(Struct, kw_only=True, omit_defaults=True):
    """Why a task failed."""

    type: str
    message: str
    traceback: str = ""

    def capped(self) -> ErrorInfo:
        """The same error with its type, message and traceback cut to
        :data:`ERROR_TEXT_LIMIT` bytes each, the cut marked (see :func:`cap`)."""
        return ErrorInfo(type=cap(self.type, 200), message=cap(self.message, ERROR_TEXT_LIMIT),
                         traceback=cap(self.traceback, ERROR_TEXT_LIMIT, keep_end=True))


def cap(text: str, limit: int, keep_end: bool = False) -> str:
    """``text`` if it fits in ``limit`` UTF-8 bytes; else its start (or, with ``keep_end``, its
    end: a traceback's last lines say the most), marked ``[... N bytes cut ...]``."""
    raw = text.encode()
    if len(raw) <= limit:
        return text
    room = max(0, limit - 40)
    marker = f"[... {len(raw) - room} bytes cut ...]"
    if keep_end:
        return marker + "\n" + raw[-room:].decode(errors="ignore")
    return raw[:room].decode(errors="ignore") + " " + marker


class Hello(Struct, kw_only=True, tag_field="type", tag="hello"):
    """A worker epoch announces itself and what it can run."""

    worker: str
    epoch: str
    ts: float
    host: str
    pid: int
    slots: Annotated[int, Meta(ge=1)]
    #: Grants to hold beyond the slots; -1 asks the server for an adaptive number.
    prefetch: Annotated[int, Meta(ge=-1)] = 0
    tasks: dict[str, TaskInfo]
    version: str
    #: The machine's boot id: with ``host``, tells a restart from a second process with the id.
    boot: str = ""
    #: The ``dispatch`` partition this epoch reads (-1 from older workers: the server hashes).
    dispatch_partition: Annotated[int, Meta(ge=-1)] = -1
    v: int = 1


class Heartbeat(Struct, kw_only=True, tag_field="type", tag="heartbeat"):
    """A worker epoch is alive and its loop makes progress."""

    worker: str
    epoch: str
    ts: float
    slots: Annotated[int, Meta(ge=1)]
    busy: Count
    running: list[TaskRef] = []
    done: Count = 0
    failed: Count = 0
    last_progress: float = 0.0
    #: Non-zero asks the server for an :class:`Alive` answer carrying this number.
    probe: Count = 0
    #: Events this epoch's producer failed to deliver (and sent again), so far.
    undelivered: Count = 0
    v: int = 1


class Started(Struct, kw_only=True, tag_field="type", tag="started"):
    """A granted task took a slot."""

    worker: str
    epoch: str
    ts: float
    task_id: TaskId = field(name="task-id")
    attempt: Attempt
    v: int = 1


class Finished(Struct, kw_only=True, tag_field="type", tag="finished", omit_defaults=True):
    """A task ended: ``result`` (raw JSON) on success, ``error`` on failure."""

    worker: str
    epoch: str
    ts: float
    task_id: TaskId = field(name="task-id")
    attempt: Attempt
    status: Literal["success", "failed", "cancelled"]
    result: Raw = Raw(b"null")
    error: ErrorInfo | None = None
    #: Seconds the execution ran, measured by the worker (None from older workers).
    runtime: Annotated[float, Meta(ge=0)] | None = None
    #: When it started (the worker's clock), for a task that ended before its ``started`` was
    #: sent: one event says both. None when a ``started`` was sent, or from older workers.
    started: float | None = None
    v: int = 1


class Bye(Struct, kw_only=True, tag_field="type", tag="bye"):
    """A worker epoch leaves gracefully, handing back the tasks it never started."""

    worker: str
    epoch: str
    ts: float
    handed_back: list[TaskRef] = []
    #: Ask the server to answer ``left`` once it applied this: the worker exits only then, so
    #: a ``run`` granted while the ``bye`` was on its way is handed back, not left behind.
    confirm: bool = False
    #: The ``dispatch`` partition the epoch reads, as its ``hello`` said: where ``left`` goes
    #: when the server no longer knows the epoch (-1: the hash of the worker id).
    dispatch_partition: Annotated[int, Meta(ge=-1)] = -1
    v: int = 1


class Mark(Struct, kw_only=True, tag_field="type", tag="mark"):
    """A marker the server writes to each ``events`` partition and reads back: proof that the
    partition is readable and that everything before it has been applied (docs/design.md,
    "Failure detection"). Only the server instance named in ``server`` acts on it."""

    server: str
    seq: Annotated[int, Meta(ge=1)]
    ts: float
    v: int = 1


Event = Hello | Heartbeat | Started | Finished | Bye | Mark
WorkerEvent = Hello | Heartbeat | Started | Finished | Bye
_event: msgspec.json.Decoder[Event] = msgspec.json.Decoder(Event)


def parse_event(raw: bytes | None) -> Event:
    """Parse a message read from the ``events`` topic."""
    try:
        return _event.decode(raw or b"")
    except msgspec.DecodeError as exc:
        raise BadMessage(f"invalid event: {exc}") from None


# ---------------------------------------------------------------- leader (DESIGN 13)


class StandbyReport(Struct, kw_only=True, tag_field="type", tag="standby"):
    """A standby server says how far its replica is behind, every second, on ``leader``: the
    active server (the one member of the servers' group that reads the topic) shows it."""

    server: str
    host: str
    pid: int
    ts: float
    #: Changelog records not yet applied (-1: not known yet).
    lag: Annotated[int, Meta(ge=-1)]
    #: Seconds since the active wrote the newest change applied here (None: not known yet).
    lag_seconds: Annotated[float, Meta(ge=0)] | None = None
    v: int = 1


_report: msgspec.json.Decoder[StandbyReport] = msgspec.json.Decoder(StandbyReport)


def parse_report(raw: bytes | None) -> StandbyReport:
    """Parse a message read from the ``leader`` topic."""
    try:
        return _report.decode(raw or b"")
    except msgspec.DecodeError as exc:
        raise BadMessage(f"invalid standby report: {exc}") from None


# ---------------------------------------------------------------- encoding

_encoder = msgspec.json.Encoder()


def encode(message: Struct) -> bytes:
    """The wire form of any message of this module."""
    return _encoder.encode(message)
