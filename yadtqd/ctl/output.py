"""How yadtqctl prints: tables through tabulate, or JSON for scripts (``--json``)."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from tabulate import tabulate

MAX_CELL = 60


def emit_json(value: Any) -> None:
    """Print a JSON document."""
    print(json.dumps(value, indent=2, sort_keys=False))


def emit_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], empty: str) -> None:
    """Print rows as a table of the given columns, or a line saying there is nothing."""
    if not rows:
        print(empty)
        return
    body = [[cell(row.get(c)) for c in columns] for row in rows]
    print(tabulate(body, headers=list(columns), tablefmt="simple"))


def cell(value: Any) -> str:
    """One table cell: JSON for structures, cut to a readable width."""
    if value is None:
        return ""
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= MAX_CELL else text[: MAX_CELL - 1] + "…"


def fail(message: str) -> None:
    """Print an error line to stderr."""
    print(f"yadtqctl: {message}", file=sys.stderr)


def server_lines(server: dict[str, Any]) -> list[str]:
    """The servers as ``stats``, ``workers`` and ``monitor`` print them (DESIGN 13): this
    server's role, the active, each standby's lag and the last takeover."""
    lines = [f"this server: {server.get('name', '?')}, {server.get('role', 'active')}"
             + (f", lag {_lag(server)}" if server.get("role") == "standby" else "")]
    active = server.get("active")
    if active is not None or "active" in server:
        lines.append("active server: " + (f"{active['server']} on {active['host']} (pid {active['pid']}),"
                                          f" term {active['term']}, since {active['since']}"
                                          if active else "none"))
    for standby in server.get("standbys") or []:
        lines.append(f"standby {standby['server']} on {standby['host']}: lag {_lag(standby)},"
                     f" heard {standby['heard']:g} s ago")
    takeover = server.get("last_takeover")
    if takeover:
        source = f" from {takeover['from']}" if takeover.get("from") else ""
        lines.append(f"last takeover: {takeover['at']}, {takeover['server']}{source} in"
                     f" {takeover['took']:g} s ({takeover['why']})")
    return lines


def _lag(server: dict[str, Any]) -> str:
    lag, seconds = server.get("lag", -1), server.get("lag_seconds")
    records = "unknown" if lag is None or lag < 0 else f"{lag} records"
    return records + (f" ({seconds:g} s)" if seconds is not None else "")
