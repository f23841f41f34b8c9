"""The changelog's records (DESIGN 13): a store row change as a Kafka record, and back.

``<prefix>.changelog`` is compacted, so each record is a whole row's state under its key:

- key: ``<table>/<row key>`` in UTF-8, e.g. ``tasks/0c1f…``, ``workers/<epoch>``,
  ``failures/12``, ``counters/stale_events``, ``offsets/<topic>/<partition>``;
- value: the row as a JSON object of its columns, or no value (a tombstone) for a deleted row.

One key names no row: :data:`PRIME`, the placeholder with which the server opens its next
transaction ahead of need (:meth:`yadtqd.server.replication.Changelog.prime`); a tombstone,
skipped by every reader, that compaction removes.

Records that do not decode raise :class:`~yadtqd.errors.BadMessage`, naming the problem: a
replica skips them (and counts them) rather than stopping.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import msgspec

from yadtqd.config import Config
from yadtqd.errors import BadMessage
from yadtqd.messages import ENVELOPE_BYTES
from yadtqd.store import RowChange, TableChanges
from yadtqd.store.replica import KEYS, SEP

_row = msgspec.json.Decoder(dict[str, Any])
_encoder = msgspec.json.Encoder()


#: The key of the placeholder record (no ``/``: it can be no table's row).
PRIME = b"prime"


def record_bytes(config: Config) -> int:
    """The most bytes one record can take: a task row holds a payload and a result as JSON
    text inside JSON (escaping at most doubles them), an error and the other columns."""
    return 2 * (config.server.max_task_bytes + config.worker.max_result_bytes) + 2 * ENVELOPE_BYTES


def encode(change: RowChange) -> tuple[bytes, bytes | None]:
    """The record's key and value (None: a tombstone)."""
    key = f"{change.table}{SEP}{change.key}".encode()
    return key, None if change.row is None else msgspec.json.encode(change.row)


def encode_rows(changes: TableChanges) -> list[tuple[bytes, bytes | None]]:
    """The records of one table's changed rows, each as :func:`encode` makes it: the same
    bytes, without a dict a row (issue 15: 3 µs a row of 11 read back)."""
    columns = changes.columns
    row: Callable[..., Any] = _row_type(columns) or (lambda *values: dict(zip(columns, values)))
    prefix = f"{changes.table}{SEP}"
    return [((prefix + key).encode(), None if values is None else _encoder.encode(row(*values)))
            for key, values in changes.rows]


@functools.lru_cache(maxsize=64)
def _row_type(columns: tuple[str, ...]) -> type[msgspec.Struct] | None:
    """A struct of these fields, in this order: it encodes as the JSON object of a dict of them
    (None for names a struct cannot have, which are then encoded through a dict)."""
    try:
        return msgspec.defstruct("Row", columns)
    except TypeError:
        return None


def decode(key: bytes | None, value: bytes | None) -> RowChange:
    """The row change a record carries."""
    if not key:
        raise BadMessage("changelog record without a key")
    try:
        table, _, row_key = key.decode().partition(SEP)
    except UnicodeDecodeError:
        raise BadMessage("changelog key is not UTF-8") from None
    if table not in KEYS or not row_key:
        raise BadMessage(f"changelog key {key[:80]!r} names no replicated table")
    if value is None:
        return RowChange(table, row_key, None)
    try:
        row = _row.decode(value)
    except msgspec.DecodeError as exc:
        raise BadMessage(f"changelog record {table}/{row_key[:80]}: {exc}") from None
    missing = [c for c in KEYS[table] if c not in row]
    if missing:
        raise BadMessage(f"changelog record {table}/{row_key[:80]} lacks {', '.join(missing)}")
    return RowChange(table, row_key, row)
