"""What every message module shares: the limits, the field types, the encoder and the decoding."""

from __future__ import annotations

from typing import Annotated, TypeVar

import msgspec
from msgspec import Meta, Struct

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

_encoder = msgspec.json.Encoder()


def encode(message: Struct) -> bytes:
    """The wire form of any message of :mod:`yadtqd.messages`."""
    return _encoder.encode(message)


T = TypeVar("T")


def decode(decoder: msgspec.json.Decoder[T], raw: bytes | None, what: str) -> T:
    """A message read from a topic (no value reads as empty), or :class:`BadMessage` naming
    ``what`` it should have been and the problem (``invalid event: Expected ...``)."""
    try:
        return decoder.decode(raw or b"")
    except msgspec.DecodeError as exc:
        raise BadMessage(f"invalid {what}: {exc}") from None
