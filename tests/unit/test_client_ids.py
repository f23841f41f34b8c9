"""The task ids the client makes: UUIDs of version 7 (RFC 9562), in the order they were made."""

from __future__ import annotations

import time
import uuid

from yadtqd.client import new_task_id, submission


def test_an_id_is_a_uuid_of_version_7_holding_the_time_in_milliseconds() -> None:
    before = time.time_ns() // 1_000_000
    task_id = new_task_id()
    after = time.time_ns() // 1_000_000
    parsed = uuid.UUID(task_id)
    assert str(parsed) == task_id  # the canonical form: 36 characters, lower case
    assert parsed.version == 7
    assert parsed.variant == uuid.RFC_4122
    assert before <= parsed.int >> 80 <= after


def test_ids_made_in_different_milliseconds_sort_in_the_order_they_were_made() -> None:
    made = []
    for _ in range(5):
        start = time.time_ns() // 1_000_000
        while time.time_ns() // 1_000_000 == start:  # the next millisecond
            pass
        made.append(new_task_id())
    assert made == sorted(made)


def test_ids_are_unique_and_their_random_bits_vary() -> None:
    ids = [new_task_id() for _ in range(20_000)]
    assert len(set(ids)) == len(ids)
    random = (1 << 62) - 1 | 0xFFF << 64  # rand_b and rand_a: 74 bits
    seen_one = seen_zero = 0
    for task_id in ids:
        value = uuid.UUID(task_id).int
        seen_one |= value & random
        seen_zero |= ~value & random
    assert seen_one == seen_zero == random  # each random bit was 1 in some id and 0 in another


def test_a_submission_gets_a_new_id_unless_given_one() -> None:
    assert uuid.UUID(submission("add", [1, 2])["task-id"]).version == 7
    assert submission("add", [1, 2], task_id="mine")["task-id"] == "mine"
