"""The ``dispatch`` topic: what the server tells one worker epoch."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import Meta, Struct, field

from yadtqd.messages.common import Attempt, TaskId, TaskName, decode
from yadtqd.messages.tasks import Options

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


class Placed(Struct, kw_only=True, tag_field="type", tag="placed"):
    """The answer to a ``hello`` that was ``placeable``, sent on the partition the ``hello``
    named: read ``partition`` instead, from the offset it had before the ``hello``. Everything
    else for the epoch goes there (workers sharing a partition each fetch all of its messages)."""

    worker: str
    epoch: str
    partition: Annotated[int, Meta(ge=0)]
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


Dispatch = Run | Fenced | Alive | Left | Refused | Placed | Cancel | Prime
_dispatch: msgspec.json.Decoder[Dispatch] = msgspec.json.Decoder(Dispatch)


def parse_dispatch(raw: bytes | None) -> Dispatch:
    """Parse a message read from the ``dispatch`` topic."""
    return decode(_dispatch, raw, "dispatch message")
