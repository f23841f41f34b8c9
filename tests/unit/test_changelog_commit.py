"""The changelog's transactions in sequence (DESIGN 13): a commit waits in its own thread while
the loop goes on, and what the loop records meanwhile goes in the next transaction, begun only
once the commit is done; a failed commit sends everything again; a fenced one stops the server.

The producer is a stand-in that records what each transaction held: the sequencing is pure
logic. That real transactions commit, fence and survive kills is proved against a real broker
(``tests/integration/test_changelog.py``, ``test_failover.py``, ``tests/chaos``)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from tests.unit.test_store import sub
from yadtqd.config import Config
from yadtqd.server import replication
from yadtqd.server.replication import Changelog, Fenced
from yadtqd.store import Store


class _Delivered:
    def __init__(self, partition: int, offset: int) -> None:
        self._partition, self._offset = partition, offset

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset


class FakeProducer:
    """Transactions recorded; a commit waits until :attr:`release` is set (or times out, as
    librdkafka's does), and fails with :attr:`fail` if set."""

    def __init__(self) -> None:
        self.committed: list[list[tuple[str, bytes]]] = []
        self.aborted: list[list[tuple[str, bytes]]] = []
        self.open: list[tuple[str, bytes]] | None = None
        self.release = threading.Event()
        self.release.set()
        self.committing = threading.Event()
        self.fail: KafkaError | None = None
        self.commit_open = False
        self.offset = 0

    def begin_transaction(self) -> None:
        assert self.open is None, "a transaction begun while another is open"
        self.open = []

    def produce(self, topic: str, value: bytes | None, key: bytes = b"", partition: int = 0,
                on_delivery: Any = None) -> None:
        assert self.open is not None, "produced outside a transaction"
        self.open.append((topic, key))
        if on_delivery is not None:
            on_delivery(None, _Delivered(partition, self.offset))
        self.offset += 1

    def commit_transaction(self, timeout: float) -> None:
        self.committing.set()
        self.commit_open = True
        if not self.release.wait(timeout):
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "not yet", retriable=True))
        self.commit_open = False
        if self.fail is not None:
            raise KafkaException(self.fail)
        assert self.open is not None
        self.committed.append(self.open)
        self.open = None

    def abort_transaction(self, timeout: float) -> None:
        if self.commit_open:  # as librdkafka: a commit call that timed out must be called again
            raise KafkaException(KafkaError(KafkaError._CONFLICT, "commit_transaction in progress",
                                            retriable=True))
        assert self.open is not None
        self.aborted.append(self.open)
        self.open = None

    def purge(self) -> None:
        pass

    def flush(self, timeout: float = 0) -> int:
        return 0

    def poll(self, timeout: float = 0) -> int:
        return 0


@pytest.fixture
def store(tmp_path: Path) -> Store:
    db = Store(tmp_path / "db.sqlite", create=True)
    db.capture()
    return db


@pytest.fixture
def out() -> Iterator[Changelog]:
    changelog = Changelog(Config(kafka={"bootstrap.servers": "127.0.0.1:9"}))
    fake = FakeProducer()  # both turns on one stand-in: the sequencing alone is tested here
    changelog.producers = [fake, fake]  # type: ignore[list-item]
    yield changelog
    changelog.discard()


def submit(store: Store, task_id: str) -> None:
    with store.transaction():
        store.intake(sub(task_id), 1.0)


def keys(transaction: list[tuple[str, bytes]], topic: str = "yadtq.changelog") -> list[bytes]:
    return [key for t, key in transaction if t == topic]


def test_the_loop_goes_on_while_a_commit_is_under_way(store: Store, out: Changelog,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replication, "COMMIT_WAIT", 60.0)  # the commit ends when released, not before
    fake: FakeProducer = out.producer  # type: ignore[assignment]
    woken = threading.Event()
    out.wake = woken.set
    fake.release.clear()
    submit(store, "a")
    assert out.commit(store, timeout=0.0, linger=False) is False  # under way, not waited for
    assert fake.committing.wait(5)
    submit(store, "b")  # the loop records the next turn meanwhile
    out.send("yadtq.dispatch", b"run b", "w", 0)
    assert out.commit(store, timeout=0.0, linger=False) is False  # the first is not done yet
    assert fake.open is not None and keys(fake.open) == [b"tasks/a"]  # b waits for the next one
    fake.release.set()
    assert woken.wait(5), "the loop was not woken when the commit was done"
    assert out.commit(store, timeout=5.0, linger=False) is True
    assert [keys(t) for t in fake.committed] == [[b"tasks/a"], [b"tasks/b"]]
    assert keys(fake.committed[1], "yadtq.dispatch") == [b"w"]
    assert not store.has_pending()
    assert store.changelog_positions() == {0: 2}


def test_transactions_take_turns_on_the_two_producers(store: Store, out: Changelog,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The next transaction goes on the other ``transactional.id``, so that it never waits for
    the coordinator to write the last one's markers (told "not yet", librdkafka asks again 20 ms
    later); the one opened ahead of need after a commit, and one sent again after an abort, too."""
    monkeypatch.setattr(replication, "SETTLE", 0.0)
    first, second = FakeProducer(), FakeProducer()
    out.producers = [first, second]  # type: ignore[list-item]
    for task_id in ("a", "b", "c"):
        submit(store, task_id)
        assert out.commit(store, timeout=5.0, linger=False) is True
    assert [keys(t) for t in first.committed] == [[b"tasks/a"], [b"tasks/c"]]
    assert [keys(t) for t in second.committed] == [[b"tasks/b"]]
    out.prime([("yadtq.dispatch", 0)])
    assert out.state == "primed" and first.open is None and second.open is not None
    second.fail = KafkaError(KafkaError._INCONSISTENT, "refused", txn_requires_abort=True)
    submit(store, "d")
    assert out.commit(store, timeout=5.0, linger=False) is False
    assert len(second.aborted) == 1 and b"tasks/d" in keys(second.aborted[0])
    assert out.commit(store, timeout=5.0, linger=False) is True
    assert keys(first.committed[-1]) == [b"tasks/d"] and len(second.committed) == 1
    assert not store.has_pending()


def test_a_commit_that_timed_out_is_called_again_on_the_producer_that_holds_it(
        store: Store, out: Changelog, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replication, "COMMIT_WAIT", 0.05)  # the first call times out at once
    first, second = FakeProducer(), FakeProducer()
    out.producers = [first, second]  # type: ignore[list-item]
    first.release.clear()
    submit(store, "a")
    assert out.commit(store, timeout=5.0, linger=False) is False  # timed out: tried again later
    assert out.producer is first and second.open is None
    first.release.set()
    assert out.commit(store, timeout=5.0, linger=False) is True
    assert [keys(t) for t in first.committed] == [[b"tasks/a"]] and second.committed == []
    assert out.producer is second  # the next one's turn


def test_a_failed_commit_is_aborted_and_all_of_it_sent_again(store: Store, out: Changelog) -> None:
    fake: FakeProducer = out.producer  # type: ignore[assignment]
    fake.fail = KafkaError(KafkaError._INCONSISTENT, "refused", txn_requires_abort=True)
    submit(store, "a")
    out.send("yadtq.dispatch", b"run a", "w", 0)
    assert out.commit(store, timeout=5.0, linger=False) is False
    assert [keys(t) for t in fake.aborted] == [[b"tasks/a"]]
    assert store.has_pending()
    fake.fail = None
    submit(store, "b")
    assert out.commit(store, timeout=5.0, linger=False) is True
    assert [keys(t) for t in fake.committed] == [[b"tasks/a", b"tasks/b"]]
    assert keys(fake.committed[0], "yadtq.dispatch") == [b"w"]
    assert out.take_undelivered() == 1
    assert not store.has_pending()


def test_a_fenced_commit_stops_the_active(store: Store, out: Changelog) -> None:
    fake: FakeProducer = out.producer  # type: ignore[assignment]
    fake.fail = KafkaError(KafkaError._FENCED, "fenced", fatal=True)
    submit(store, "a")
    with pytest.raises(Fenced):
        out.commit(store, timeout=5.0, linger=False)
    assert store.has_pending()  # never confirmed: the next active's changelog decides


def test_a_commit_too_long_under_way_goes_on_when_librdkafka_refuses_to_abort_it(
        store: Store, out: Changelog, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replication, "COMMIT_WAIT", 0.05)  # each commit call times out at once
    fake: FakeProducer = out.producer  # type: ignore[assignment]
    fake.release.clear()
    submit(store, "a")
    assert out.commit(store, timeout=5.0, linger=False) is False  # the call timed out
    monkeypatch.setattr(replication, "OPEN_LIMIT", 0.0)  # and now the transaction is open too long
    assert out.commit(store, timeout=5.0, linger=False) is False  # abort refused: the call is open
    assert out.state == "committing"
    fake.release.set()
    assert out.commit(store, timeout=5.0, linger=False) is True  # the call, made again, ends it
    assert [keys(t) for t in fake.committed] == [[b"tasks/a"]] and fake.aborted == []
    assert not store.has_pending()


def test_the_positions_saved_are_past_the_last_record_of_the_transaction(store: Store,
                                                                          out: Changelog) -> None:
    for task_id in ("a", "b", "c"):
        submit(store, task_id)
    assert out.commit(store, timeout=5.0, linger=False) is True
    fake: FakeProducer = out.producer  # type: ignore[assignment]
    assert [keys(t) for t in fake.committed] == [[b"tasks/a", b"tasks/b", b"tasks/c"]]
    assert store.changelog_positions() == {0: 3}  # one delivery report read: the last one's


def test_a_backlog_goes_in_chunks_and_the_messages_with_the_last(
        store: Store, out: Changelog, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run must not reach a worker before the record of its grant: with the grant's row in
    a later chunk, a crash between the two would grant the task again (DESIGN 13)."""
    monkeypatch.setattr(replication, "CHUNK", 2)
    for task_id in ("a", "b", "c"):
        submit(store, task_id)
    out.send("yadtq.dispatch", b"run c", "w", 0)
    assert out.commit(store, timeout=5.0, linger=False) is True  # the oldest two, no message
    assert out.commit(store, timeout=5.0, linger=False) is True  # the rest, with the message
    fake: FakeProducer = out.producer  # type: ignore[assignment]
    assert [keys(t) for t in fake.committed] == [[b"tasks/a", b"tasks/b"], [b"tasks/c"]]
    assert [keys(t, "yadtq.dispatch") for t in fake.committed] == [[], [b"w"]]
    assert not store.has_pending() and not out.queued
