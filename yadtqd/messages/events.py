"""The ``events`` topic: what workers tell the server, and the server's own marks."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Raw, Struct, field

from yadtqd.messages.common import ERROR_TEXT_LIMIT, Attempt, Count, TaskId, decode


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
    #: How many ``dispatch`` partitions the server may move this epoch to (their end offsets were
    #: taken before this ``hello``, so it misses nothing on any of them): the server answers
    #: ``placed`` when another live worker reads ``dispatch_partition`` and a partition below
    #: this number has fewer. 0 (older workers, and a worker's later epochs): it stays.
    placeable: Annotated[int, Meta(ge=0)] = 0
    v: int = 1


#: The most task references one event lists: the runs a heartbeat names, the tasks one ``bye``
#: hands back (more go in several). An epoch may hold thousands (up to eight runs a slot in its
#: execution processes' batches; its slots plus 4,096 grants unstarted, more with a fixed
#: prefetch), and every event must fit any ``events`` topic the server accepts: its room is the
#: largest result plus :data:`~yadtqd.messages.common.ENVELOPE_BYTES`, and 256 references with
#: 128-character task ids take about 41 KB.
REFS_MOST = 256


class Heartbeat(Struct, kw_only=True, tag_field="type", tag="heartbeat"):
    """A worker epoch is alive and its loop makes progress."""

    worker: str
    epoch: str
    ts: float
    slots: Annotated[int, Meta(ge=1)]
    busy: Count
    #: The runs the epoch's execution processes hold (running, and waiting in batches behind),
    #: those running first: at most :data:`REFS_MOST` (``busy`` counts the slots running one).
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
    return decode(_event, raw, "event")
