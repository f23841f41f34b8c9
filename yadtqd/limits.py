"""Global limits (issue 14): ``[limits."NAME"]`` tables of the configuration bound the tasks of
one name across the whole cluster, enforced by the active server at grant time::

    [limits."send-mail"]
    concurrency = 5      # at most 5 granted and not yet ended at once, in the cluster
    rate = "100/m"       # at most 100 granted per minute (also "10/s", "1000/h")

A task submitted with a ``limit_key`` counts against the limits of its name for that key
alone (one budget per customer, say); tasks without one share the name's budget.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from yadtqd.errors import ConfigError

_RATE = re.compile(r"\s*(\d+)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*")
_PERIOD = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0,
           "h": 3600.0, "hour": 3600.0}


@dataclass(frozen=True)
class Limit:
    """The limits of one task name."""

    task: str
    concurrency: int | None = None
    #: At most ``rate_count`` grants per ``rate_period`` seconds.
    rate_count: int | None = None
    rate_period: float = 60.0
    rate: str = ""

    def describe(self) -> str:
        """In words, as ``monitor`` shows why a task waits."""
        parts = ([f"at most {self.concurrency} granted at once"] if self.concurrency else []) + \
                ([f"at most {self.rate}"] if self.rate else [])
        return " and ".join(parts)


def parse_limits(tables: dict[str, Any], where: str) -> tuple[Limit, ...]:
    """The ``[limits]`` tables, checked (:class:`ConfigError` naming the table and problem)."""
    out = []
    for task, table in tables.items():
        at = f"{where}: [limits.{task!r}]"
        if not isinstance(table, dict):
            raise ConfigError(f"{at} must be a table")
        unknown = set(table) - {"concurrency", "rate"}
        if unknown:
            raise ConfigError(f"{at}: unknown key {sorted(unknown)[0]!r} (known: concurrency, rate)")
        concurrency = table.get("concurrency")
        if concurrency is not None and (not isinstance(concurrency, int) or isinstance(concurrency, bool)
                                        or concurrency < 1):
            raise ConfigError(f"{at}: concurrency must be an integer of at least 1")
        rate = table.get("rate")
        count, period = None, 60.0
        if rate is not None:
            match = _RATE.fullmatch(rate) if isinstance(rate, str) else None
            if match is None or int(match.group(1)) < 1:
                raise ConfigError(f"{at}: rate {rate!r} is not a rate like \"100/m\", \"10/s\" or \"1000/h\"")
            count, period = int(match.group(1)), _PERIOD[match.group(2)]
        if concurrency is None and rate is None:
            raise ConfigError(f"{at}: give concurrency, rate or both")
        out.append(Limit(task, concurrency, count, period, rate or ""))
    return tuple(out)
