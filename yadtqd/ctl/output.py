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
