"""Message shapes: the seed's format, clear errors, and fuzzed input that never escapes as
anything but BadMessage."""

from __future__ import annotations

import json

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from yadtqd import messages as m
from yadtqd.errors import BadMessage


def test_the_seed_format_is_accepted_as_is() -> None:
    sub = m.parse_submission(b'{"task-id": "d5750c0e-ed82", "task": "add", "args": [1, 2]}', 1000)
    assert (sub.task_id, sub.task, sub.args, sub.kwargs) == ("d5750c0e-ed82", "add", [1, 2], {})


def test_unknown_fields_are_ignored_for_mixed_versions() -> None:
    sub = m.parse_submission(b'{"task-id": "a", "task": "add", "v": 2, "priority": 9,'
                             b' "options": {"future": true}}', 1000)
    assert sub.task == "add"


@pytest.mark.parametrize(("raw", "words", "task_id"), [
    (b"", "empty message", None),
    (b"{", "Input data was truncated", None),
    (b"{]", "JSON is malformed", None),
    (b'{"task-id": "a b", "task": "add"}', "at `$.task-id`", None),
    (b'{"task-id": "' + b"x" * 129 + b'", "task": "add"}', "at `$.task-id`", None),
    (b'{"task-id": "ok", "task": ""}', "at `$.task`", "ok"),
    (b'{"task-id": "ok", "task": "add", "options": {"max_retries": -1}}', "at `$.options.max_retries`", "ok"),
])
def test_bad_submissions_name_the_problem(raw: bytes, words: str, task_id: str | None) -> None:
    with pytest.raises(BadMessage) as caught:
        m.parse_submission(raw, 1000)
    assert words in str(caught.value)
    assert caught.value.task_id == task_id


def test_oversized_submission_keeps_its_id() -> None:
    raw = json.dumps({"task-id": "big", "task": "echo", "args": ["x" * 2000]}).encode()
    with pytest.raises(BadMessage, match="over the limit of 1000 bytes") as caught:
        m.parse_submission(raw, 1000)
    assert caught.value.task_id == "big"


def test_payload_is_canonical() -> None:
    a = m.parse_submission(b'{"task-id": "a", "task": "t", "kwargs": {"x": 1, "y": 2}}', 1000)
    b = m.parse_submission(b'{"kwargs": {"y": 2, "x": 1}, "task": "t", "task-id": "a",'
                           b' "submitted_at": 5}', 1000)
    assert a.payload() == b.payload()


def test_events_round_trip() -> None:
    events = [
        m.Hello(worker="w", epoch="e", ts=1.0, host="h", pid=1, slots=2, tasks={"add": m.TaskInfo(plugin="arith")},
                version="0"),
        m.Heartbeat(worker="w", epoch="e", ts=1.0, slots=2, busy=1, running=[m.TaskRef(task_id="t", attempt=1)]),
        m.Started(worker="w", epoch="e", ts=1.0, task_id="t", attempt=1),
        m.Finished(worker="w", epoch="e", ts=1.0, task_id="t", attempt=1, status="failed",
                   error=m.ErrorInfo(type="E", message="x")),
        m.Bye(worker="w", epoch="e", ts=1.0, handed_back=[m.TaskRef(task_id="t", attempt=2)]),
    ]
    for ev in events:
        back = m.parse_event(m.encode(ev))
        assert type(back) is type(ev)
        assert msgspec.structs.asdict(back) == msgspec.structs.asdict(ev)


def test_finished_result_is_raw_json() -> None:
    ev = m.parse_event(b'{"type": "finished", "worker": "w", "epoch": "e", "ts": 1, "task-id": "t",'
                       b' "attempt": 1, "status": "success", "result": {"a": [1, 2]}}')
    assert isinstance(ev, m.Finished)
    assert json.loads(bytes(ev.result)) == {"a": [1, 2]}


@given(st.binary(max_size=400))
def test_arbitrary_bytes_only_ever_raise_bad_message(raw: bytes) -> None:
    for parse in (lambda r: m.parse_submission(r, 300), m.parse_event, m.parse_dispatch):
        try:
            parse(raw)
        except BadMessage:
            pass


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                           | st.text(max_size=10),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                           max_leaves=6)
KEYS = ["type", "worker", "epoch", "ts", "task-id", "attempt", "status", "slots", "busy", "result",
        "error", "tasks", "handed_back", "probe", "grant", "lease", "server", "seq", "runtime"]
# Up to six distinct keys, then a value for each: no draw is rejected for a repeated key and none
# overruns Hypothesis' buffer (dictionaries over sampled keys with deep values threw away about
# one draw in five, and failed the too_slow health check about one run in four).
message_objects = st.lists(st.sampled_from(KEYS), unique=True, max_size=6).flatmap(
    lambda keys: st.fixed_dictionaries({key: json_values for key in keys}))


@given(message_objects)
def test_arbitrary_json_objects_only_ever_raise_bad_message(obj: dict) -> None:
    raw = json.dumps(obj).encode()
    for parse in (lambda r: m.parse_submission(r, 10_000), m.parse_event, m.parse_dispatch):
        try:
            parse(raw)
        except BadMessage:
            pass
