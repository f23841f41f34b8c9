"""The ``leader`` topic (DESIGN 13): standby servers' reports to the active."""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta, Struct

from yadtqd.messages.common import decode


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
    return decode(_report, raw, "standby report")
