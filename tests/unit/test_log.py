"""The log line format: the fast path for plain records gives what the general one gives; and
librdkafka's repeated failures held back."""

from __future__ import annotations

import datetime as dt
import logging
import sys

import pytest

from yadtqd.log import LIBRDKAFKA, Repeats, _LineFormatter


def _record(created: float, exc: bool = False) -> logging.LogRecord:
    info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            info = sys.exc_info()
    record = logging.LogRecord("yadtqd.server", logging.INFO, __file__, 1, "task %s received: %s",
                               ("t1", "add"), info)
    record.created, record.msecs = created, int((created - int(created)) * 1000) + 0.0
    record.task_id, record.event = "t1", "task_received"
    return record


def _general(record: logging.LogRecord) -> str:
    """The line the general machinery (logging.Formatter) makes, with ISO time in UTC."""
    general = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    general.formatTime = lambda r, datefmt=None: dt.datetime.fromtimestamp(  # type: ignore[method-assign]
        r.created, dt.timezone.utc).isoformat(timespec="milliseconds")
    return general.format(record) + " [task_id=t1 event=task_received]"


@pytest.mark.parametrize("created", [1796276579.5, 1796276579.999, 1796276580.0004, 86399.25])
def test_a_plain_record_reads_as_the_general_format_makes_it(created: float) -> None:
    formatter = _LineFormatter(priority_prefix=False)
    assert formatter.format(_record(created)) == _general(_record(created))
    assert formatter.format(_record(created + 1)) == _general(_record(created + 1))  # next second


def test_under_journald_a_line_is_its_priority_and_message() -> None:
    line = _LineFormatter(priority_prefix=True).format(_record(1796276579.5))
    assert line == "<6>task t1 received: add [task_id=t1 event=task_received]"


def test_a_record_with_an_exception_keeps_its_traceback() -> None:
    line = _LineFormatter(priority_prefix=False).format(_record(1796276579.5, exc=True))
    assert line.startswith("2026-12-03T05:42:59.500+00:00 INFO yadtqd.server: task t1 received: add\n")
    assert "ValueError: boom" in line and line.endswith("[task_id=t1 event=task_received]")


def test_librdkafka_repeating_a_failure_is_let_through_once_a_window_with_a_count() -> None:
    """A broker outage: librdkafka logs the same failure at every reconnect attempt (1,242
    lines in a minute from one client). One line a window per client, facility and text (but
    for its numbers), the next saying how many were held back; debug lines all pass."""
    now = [0.0]
    repeats = Repeats(window=60.0, clock=lambda: now[0])

    def line(level: int, client: str, text: str) -> logging.LogRecord:
        return logging.LogRecord(LIBRDKAFKA, level, __file__, 1, "%s [%s] %s",
                                 ("FAIL", client, text), None)

    refused = "127.0.0.1:{}/bootstrap: Connect failed: Connection refused (after {}ms in state CONNECT)"
    passed = []
    for second in range(130):  # two attempts a second, for 130 s
        now[0] = float(second)
        for attempt in range(2):
            record = line(logging.ERROR, "yadtq-server-election#consumer-5", refused.format(9092, attempt))
            if repeats.filter(record):
                passed.append((second, record.getMessage()))
    assert [second for second, _ in passed] == [0, 60, 120]
    assert passed[0][1].endswith("(after 0ms in state CONNECT)")
    assert passed[1][1].endswith("(119 like it held back in 60 s)")
    assert passed[2][1].endswith("(119 like it held back in 60 s)")
    # another client, another failure, a debug line: each of its own
    assert repeats.filter(line(logging.ERROR, "yadtq-worker#producer-2", refused.format(9092, 0)))
    assert repeats.filter(line(logging.ERROR, "yadtq-server-election#consumer-5",
                               "127.0.0.1:9092/1: SASL authentication error: Authentication failed"))
    assert all(repeats.filter(line(logging.DEBUG, "yadtq-server-election#consumer-5", refused.format(9092, 0)))
               for _ in range(3))
