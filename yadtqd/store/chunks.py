"""Statements over many rows in a few sizes: as many of :data:`MOST` rows as fit, then powers of
two. Python's ``sqlite3`` caches 128 prepared statements a connection, by their text; a statement
of a size not seen before is prepared again (one of some hundreds of rows took about 2.2 ms and
0.9 MB), and a size for every batch filled the cache with statements used once (issue 15: a
standby's memory grew from 67 to 122 MiB over 80,000 tasks). In these sizes, a statement of one
shape has at most ten texts whatever the batches."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeVar

#: Rows in one statement at most (a power of two), and the values SQLite binds in one at most.
MOST = 512
MAX_BOUND = 32_766

T = TypeVar("T")


def sizes(count: int, width: int) -> list[int]:
    """The rows each statement takes of ``count`` rows of ``width`` bound values each."""
    most = MOST
    while most > 1 and most * width > MAX_BOUND:
        most //= 2
    rest = count % most
    return [most] * (count // most) + [1 << bit for bit in reversed(range(rest.bit_length()))
                                       if rest >> bit & 1]


def split(items: Sequence[T], width: int) -> Iterator[Sequence[T]]:
    """``items`` (rows of ``width`` bound values each) in the slices :func:`sizes` gives, in order."""
    start = 0
    for size in sizes(len(items), width):
        yield items[start:start + size]
        start += size
