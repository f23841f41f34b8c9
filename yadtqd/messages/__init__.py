"""Every message shape on every topic (DESIGN section 2), with its parser and its encoder:
one module per topic, all of it importable from here (``from yadtqd import messages as m``).

Messages are UTF-8 JSON objects. Unknown fields are ignored, so versions can be mixed; a
message of the wrong shape raises :class:`~yadtqd.errors.BadMessage` with a sentence that names
the field and the problem (``Expected `int`, got `str` - at `$.attempt```).

Topics and their messages:

- ``tasks``: :class:`Submission` (the seed's ``{"task-id": ..., "task": ..., "args": [...]}``).
- ``dispatch``: :class:`Run`, :class:`Cancel`, :class:`Fenced`, :class:`Alive`, :class:`Left`,
  :class:`Refused`, :class:`Placed` and the server's :class:`Prime`, tagged by ``"type"``.
- ``events``: :class:`Hello`, :class:`Heartbeat`, :class:`Started`, :class:`Finished` and
  :class:`Bye` from workers, and the server's own :class:`Mark`, tagged by ``"type"``.
- ``changelog``: the store's row changes, in their own codec, :mod:`yadtqd.changelog`.

Fields added after the first release are optional with a default that means "not sent", so a
message from an older peer still parses (see docs/design.md, "Liveness" and "Grants").
"""

from __future__ import annotations

from yadtqd.messages.common import (ENVELOPE_BYTES, ERROR_TEXT_LIMIT, MAX_DELAY, MOST_PRIORITY,
                                    PRODUCER_DEFAULT_MAX, TASK_ID_PATTERN, Attempt, Count,
                                    Priority, TaskId, TaskName, encode)
from yadtqd.messages.dispatch import (NEWER_EPOCH, Alive, Cancel, Dispatch, Fenced, Left, Placed,
                                      Prime, Refused, Run, parse_dispatch)
from yadtqd.messages.events import (REFS_MOST, Bye, ErrorInfo, Event, Finished, Hello, Heartbeat,
                                    Mark, Started, TaskInfo, TaskRef, WorkerEvent, cap, parse_event)
from yadtqd.messages.leader import StandbyReport, parse_report
from yadtqd.messages.tasks import (ORDERS, Control, Ended, FollowUp, Options, Submission,
                                   follow_up_id, parse_submission, parse_tasks_message)

__all__ = [
    "ENVELOPE_BYTES", "ERROR_TEXT_LIMIT", "MAX_DELAY", "MOST_PRIORITY", "PRODUCER_DEFAULT_MAX",
    "TASK_ID_PATTERN", "Attempt", "Count", "Priority", "TaskId", "TaskName", "encode",
    "NEWER_EPOCH", "Alive", "Cancel", "Dispatch", "Fenced", "Left", "Placed", "Prime", "Refused", "Run",
    "parse_dispatch",
    "REFS_MOST", "Bye", "ErrorInfo", "Event", "Finished", "Hello", "Heartbeat", "Mark", "Started",
    "TaskInfo", "TaskRef", "WorkerEvent", "cap", "parse_event",
    "StandbyReport", "parse_report",
    "ORDERS", "Control", "Ended", "FollowUp", "Options", "Submission", "follow_up_id",
    "parse_submission", "parse_tasks_message",
]
