"""The store behind a Kafka changelog (DESIGN 13), with one server: a database lost, or made
before the changelog existed, is rebuilt from the changelog row for row."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests import ledger
from tests.cluster import Cluster
from tests.unit.test_store import sub
from yadtqd import topics, transport
from yadtqd.client import KafkaSubmitter
from yadtqd.config import load
from yadtqd.server.replication import Changelog, Fenced
from yadtqd.server.standby import Follower
from yadtqd.store import Store

pytestmark = pytest.mark.kafka
#: The replicated rows compared. (Offsets too are replicated, but a server started again reads
#: on at once, its own markers on ``events`` if nothing else, so they move before one can look.)
TABLES = {"tasks": "seq", "workers": "epoch", "failures": "seq", "counters": "name"}


def rows(database: str) -> dict[str, list[tuple[object, ...]]]:
    with sqlite3.connect(database) as db:
        return {t: db.execute(f"SELECT * FROM {t} ORDER BY {order}").fetchall() for t, order in TABLES.items()}


def _remove(database: str) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(database + suffix).unlink(missing_ok=True)


def _history(cluster: Cluster, tmp_path: Path) -> list[str]:
    """Tasks that succeed, fail, retry and are lost with a worker killed, then every worker
    stopped, so that the rows stay as they are."""
    cluster.start_server()
    cluster.start_worker("w1")
    cluster.start_worker("w2")
    book = tmp_path / "ledger"
    ids = [cluster.client.submit("add", i, 1) for i in range(30)]
    ids += [cluster.client.submit("fail", "ValueError", "no", max_retries=1) for _ in range(3)]
    with KafkaSubmitter({"bootstrap.servers": cluster.bootstrap}, cluster.prefix) as kafka:
        for _ in range(2):  # the second is a duplicate: a counter moves
            kafka.submit("add", 1, 1, task_id="twice")
    ids.append("twice")
    slow = [cluster.client.submit("ledger", str(book), 5.0, i) for i in range(2)]
    cluster.wait_for(lambda: any(v["status"] == "processing" for v in cluster.status(slow).values()),
                     "a slow task to start")
    cluster.stop("w1", signal.SIGKILL)  # a failure record, tasks re-queued
    cluster.wait_for(lambda: cluster.client.failures(), "w1 to be declared dead")
    cluster.wait_terminal(ids)  # before w2 stops: a retry granted to it as it leaves would wait
    cluster.stop("w2")
    cluster.stop("server")
    return ids + slow


def test_a_deleted_database_is_rebuilt_row_for_row(cluster: Cluster, tmp_path: Path) -> None:
    _history(cluster, tmp_path)
    before = rows(cluster.database)
    assert all(before[t] for t in TABLES)
    _remove(cluster.database)
    cluster.start_server()
    assert "restored" in cluster.log("server")
    cluster.stop("server")
    assert rows(cluster.database) == before


def test_a_sigkill_mid_flow_loses_nothing_and_runs_each_task_once(cluster: Cluster, tmp_path: Path) -> None:
    """SIGKILL while tasks flow, at whatever point of a turn it lands (between SQLite's commit
    and Kafka's, the next start rebuilds and reads the causes again; otherwise it applies the
    tail): every task runs exactly once, and the database then rebuilds to the same rows."""
    cluster.start_server()
    cluster.start_worker("w1")
    book = tmp_path / "ledger"
    ids = [cluster.client.submit("ledger", str(book), 0.01, i) for i in range(200)]
    cluster.wait_for(lambda: sum(v["status"] == "success" for v in cluster.status(ids).values()) >= 20,
                     "tasks to flow")
    cluster.stop("server", signal.SIGKILL)
    cluster.start_server()
    print("the start after the kill:", "rebuilt" if "store_rebuild" in cluster.log("server")
          else "applied the tail")
    statuses = cluster.wait_terminal(ids, timeout=180)
    assert all(v["status"] == "success" for v in statuses.values())
    verdict = ledger.check_contract(cluster, book, {t: i for i, t in enumerate(ids)})
    assert verdict.re_executions == 0
    cluster.stop("w1")
    cluster.stop("server")
    settled = rows(cluster.database)
    _remove(cluster.database)
    cluster.start_server()
    cluster.stop("server")
    assert rows(cluster.database) == settled


def test_a_database_older_than_the_changelog_is_published_whole(cluster: Cluster, tmp_path: Path) -> None:
    _history(cluster, tmp_path)
    before = rows(cluster.database)
    config = load(str(cluster.config))
    admin = transport.make_admin(config)
    for future in admin.delete_topics([config.topic("changelog")], operation_timeout=30).values():
        future.result(30)
    with sqlite3.connect(cluster.database) as db:  # as a database of schema 3 would be
        db.execute("DELETE FROM changelog_positions")
    cluster.wait_for(lambda: config.topic("changelog") not in admin.list_topics(timeout=10).topics,
                     "the changelog to be deleted")
    cluster.start_server()
    assert "publishing the whole database" in cluster.log("server")
    cluster.stop("server")
    _remove(cluster.database)
    cluster.start_server()
    cluster.stop("server")
    assert rows(cluster.database) == before
    assert os.path.exists(cluster.database)


def test_a_standby_never_waits_for_the_broker_to_say_where_the_changelog_ends(
        bootstrap: str, tmp_path: Path) -> None:
    """A standby's lag is the changelog's end less what it applied. The end is asked through
    the admin client and taken once the answer came: asked on the standby's consumer, the
    question waited in the broker behind the fetch parked there (up to 100 ms, every tenth of a
    second), and the standby's loop with it. Here the answer is held back: the lag is not known
    yet, and each call returns at once; once the answer comes, the lag is counted."""
    config = load(None, env={"YADTQ_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
                             "YADTQ_TOPIC_PREFIX": f"lag{uuid.uuid4().hex[:10]}"})
    admin = transport.make_admin(config)
    topics.ensure_topics(admin, topics.topic_specs(config))
    asked: list[dict[Any, concurrent.futures.Future[Any]]] = []
    held: dict[Any, concurrent.futures.Future[Any]] = {}

    class HeldBack:
        """The standby's admin client: its answers wait until the test hands them over."""

        def list_offsets(self, *args: Any, **kwargs: Any) -> dict[Any, concurrent.futures.Future[Any]]:
            asked.append(admin.list_offsets(*args, **kwargs))
            held.clear()
            held.update({tp: concurrent.futures.Future() for tp in asked[-1]})
            return dict(held)

    store = Store(str(tmp_path / "standby.db"), create=True)
    follower = Follower(config, store, HeldBack())  # type: ignore[arg-type]
    try:
        assert follower.lag() == -1 and len(asked) == 1  # asked; not known until the answer
        assert follower.lag() == -1 and len(asked) == 1  # the answer is awaited, not asked again
        for tp, future in asked[-1].items():
            held[tp].set_result(future.result(30))
        assert follower.lag() == 0  # an empty changelog, all of it applied
    finally:
        follower.close()
        store.close()


def test_a_newer_active_fences_both_producers_that_take_turns(bootstrap: str, tmp_path: Path) -> None:
    """The active's transactions take turns on two ``transactional.id``: all commit and are read.
    A newer active takes both ids before it reads the changelog's end: what an older one
    committed on the second id before it was taken is in that end (here a server that took only
    the first, frozen say, lets the old one go on there), and afterwards the old one can commit
    nothing on either (it stops: :class:`Fenced`)."""
    config = load(None, env={"YADTQ_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
                             "YADTQ_TOPIC_PREFIX": f"turns{uuid.uuid4().hex[:10]}"})
    topics.ensure_topics(transport.make_admin(config), topics.topic_specs(config))
    store = Store(str(tmp_path / "old.db"), create=True)
    store.capture()

    def commit(task_id: str) -> bool:
        with store.transaction():
            store.intake(sub(task_id), 1.0)
        return old.commit(store, timeout=30, linger=False)

    def restored(name: str) -> set[str]:
        replica = Store(str(tmp_path / name), create=True)
        new.restore(replica, timeout=30)
        return set(replica.task_rows(["a", "b", "c", "m", "late0", "late1"]))

    old, half, new = Changelog(config), Changelog(config), Changelog(config)
    try:
        old.start(timeout=30)
        assert all(commit(task_id) for task_id in ("a", "b", "c"))
        assert old.turn == 1  # the first id, the second, the first: the second's turn
        half.producers[0].init_transactions(30)  # the first id taken, not yet the second
        assert commit("m")  # on the second, still the old one's
        new.start(timeout=30)
        assert restored("new.db") == {"a", "b", "c", "m"}
        for turn in (0, 1):  # whichever producer's turn it is
            old.turn, old.state = turn, "idle"
            with pytest.raises(Fenced):
                commit(f"late{turn}")
                old.commit(store, timeout=30, linger=False)  # (if the first call only began it)
    finally:
        for changelog in (old, half, new):
            changelog.discard()
    assert restored("after.db") == {"a", "b", "c", "m"}
