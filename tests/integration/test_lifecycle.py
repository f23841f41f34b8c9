"""The task lifecycle through real daemons and the real CLI (issue 14): later, priorities,
cancel (waiting, granted, running, stubborn, ended), retry, purge and retention."""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import signal
import sqlite3
from collections import defaultdict
from pathlib import Path

import pytest

from tests import ledger
from tests.cluster import Cluster

pytestmark = pytest.mark.kafka


def _ended(cluster: Cluster, task_id: str) -> dict:
    return cluster.client.result(task_id, wait=120)


def test_a_delayed_task_waits_in_the_store_then_runs(cluster: Cluster) -> None:
    cluster.start_server()
    cluster.start_worker("w1")
    task_id = cluster.client.submit("add", 1, 2, delay=2.0)
    view = cluster.client.status(task_id)[task_id]
    assert view["status"] == "scheduled" and "due_at" in view
    assert cluster.client.workers()[0]["granted"] == 0  # no worker holds it
    done = _ended(cluster, task_id)
    assert done["result"] == 3
    assert dt.datetime.fromisoformat(done["started_at"]) >= dt.datetime.fromisoformat(view["due_at"])


def test_the_cli_takes_an_eta_and_a_bad_one_is_named(cluster: Cluster) -> None:
    cluster.start_server()
    cluster.start_worker("w1")
    at = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=2)).isoformat()
    out = cluster.ctl("--json", "submit", "add", "2", "2", "--at", at)
    assert out.returncode == 0, out.stderr
    reply = json.loads(out.stdout)
    assert reply["status"] == "scheduled"
    assert _ended(cluster, reply["task-id"])["result"] == 4
    bad = cluster.ctl("submit", "add", "1", "--at", "tomorrow")
    assert bad.returncode == 2 and "is not an ISO 8601 time" in bad.stderr


def test_a_later_high_priority_task_runs_before_an_earlier_backlog(cluster: Cluster, tmp_path: Path) -> None:
    cluster.write_config(worker={"slots": 1, "prefetch": 0})
    cluster.start_server()
    cluster.start_worker("w1")
    book = tmp_path / "ledger"
    low = [cluster.client.submit("ledger", str(book), 3.0 if i == 0 else 0.05, i) for i in range(10)]
    cluster.wait_for(lambda: cluster.client.status(low[0])[low[0]]["status"] == "processing", "the first to run")
    # (the first runs 3 s: the later task is recorded long before a slot frees)
    high = cluster.client.submit("ledger", str(book), 0.1, "high", priority=10)
    cluster.wait_terminal(low + [high])
    order = [e.task_id for e in ledger.read(book) if e.phase == "start"]
    assert order.index(high) == 1  # right after the one running when it came: by order, not time
    assert order[2:] == low[1:]  # FIFO within a priority


@pytest.mark.parametrize("prefetch", [-1, 8], ids=["adaptive-prefetch", "fixed-prefetch"])
def test_an_urgent_task_granted_into_a_prefetch_starts_before_the_tasks_waiting_there(
        cluster: Cluster, tmp_path: Path, prefetch: int) -> None:
    """Issue 14's bound with prefetch on: a later high-priority task waits for at most one task
    per slot, although lower ones were granted into the worker's prefetch before it came."""
    cluster.write_config(worker={"slots": 1, "prefetch": prefetch})
    cluster.start_server()
    cluster.start_worker("w1")
    book, gate = tmp_path / "ledger", tmp_path / "gate"
    # both names get a short estimate (a moving average: eight each, so one slow run does not
    # make it long), so an adaptive prefetch takes them deep
    cluster.wait_terminal([cluster.client.submit(name, *args, str(tmp_path / "teach"), 0.0)
                           for name, args in [("ledger", ()), ("ledger_after", (None,))] * 8])
    cluster.stop("w1")
    first = cluster.client.submit("ledger", str(book), 0.0, "gate", kwargs={"until": str(gate)},
                                  queue_anyway=True)
    low = [cluster.client.submit("ledger_after", i, str(book), 1.0, queue_anyway=True) for i in range(4)]
    cluster.start_worker("w1")  # its first plan grants all five: one runs, four wait in it
    cluster.wait_for(lambda: all(v["worker"] for v in cluster.status([first] + low).values()),
                     "the five granted")
    cluster.wait_for(lambda: any(e.task_id == first for e in ledger.read(book)), "the gate running")
    high = cluster.client.submit("ledger", str(book), 0.0, "high", priority=10)
    gate.touch()
    cluster.wait_terminal([first, high] + low)
    order = [e.task_id for e in ledger.read(book) if e.phase == "start"]
    assert order[0] == first
    # granted at once (fixed) or as soon as the gate's slot frees (adaptive): before the four,
    # or after the one that took the freed slot first; without the order it would start last
    assert order.index(high) <= 2, order
    assert [t for t in order if t in low] == low  # FIFO within a priority


def test_cancel_ends_waiting_tasks_at_once_and_says_so(cluster: Cluster) -> None:
    cluster.start_server()
    cluster.start_worker("w1")
    unprovided = cluster.client.submit("nobody-has-this", queue_anyway=True)
    later = cluster.client.submit("add", 1, 1, delay=3600)
    done = cluster.client.submit("add", 2, 2)
    _ended(cluster, done)
    out = cluster.ctl("--json", "cancel", unprovided, later, done)
    assert out.returncode == 0, out.stderr
    outcomes = {i: v["outcome"] for i, v in json.loads(out.stdout).items()}
    assert outcomes == {unprovided: "cancelled", later: "cancelled", done: "ended"}
    assert cluster.client.result(done)["result"] == 4  # it ended first: its result stays
    result = cluster.ctl("result", later)
    assert result.returncode == 1 and f"task {later} was cancelled" in result.stderr
    unknown = cluster.ctl("cancel", "no-such-task")
    assert unknown.returncode == 2 and "unknown task: no-such-task" in unknown.stderr
    assert "cancelled by uid" in cluster.log("server")


def test_cancel_stops_a_running_task_and_drops_a_granted_one(cluster: Cluster, tmp_path: Path) -> None:
    cluster.write_config(worker={"slots": 1, "prefetch": 1})
    cluster.start_server()
    cluster.start_worker("w1")
    book = tmp_path / "ledger"
    running = cluster.client.submit("ledger", str(book), 600, "long")
    granted = cluster.client.submit("ledger", str(book), 0, "never")
    cluster.wait_for(lambda: cluster.client.status(running)[running]["status"] == "processing", "it to run")
    cluster.wait_for(lambda: cluster.client.workers()[0]["granted"] == 1, "the second to be granted")
    replies = cluster.client.cancel(granted, running)
    assert {replies[granted]["outcome"], replies[running]["outcome"]} <= {"cancelled", "cancelling"}
    for task_id in (running, granted):
        assert _ended(cluster, task_id)["status"] == "cancelled"
    entries = ledger.read(book)
    assert [e.phase for e in entries if e.task_id == running] == ["start"]  # stopped, never ended
    assert [e for e in entries if e.task_id == granted] == []  # never started
    assert cluster.client.result(granted)["error"] == {"type": "Cancelled", "message": f"cancelled by uid {os.getuid()}"}
    assert f"task {granted} attempt 1 cancelled before it started" in cluster.log("w1")
    assert _ended(cluster, cluster.client.submit("add", 3, 4))["result"] == 7
    assert cluster.client.failures() == []  # the worker lived through it


def test_a_task_deaf_to_sigterm_is_killed_after_the_grace(cluster: Cluster, tmp_path: Path) -> None:
    cluster.write_config(worker={"slots": 1, "cancel_grace": 1.0})
    cluster.start_server()
    cluster.start_worker("w1")
    notes = tmp_path / "ignored"
    task_id = cluster.client.submit("stubborn", 600, str(notes))
    cluster.wait_for(lambda: cluster.client.status(task_id)[task_id]["status"] == "processing", "it to run")
    cluster.client.cancel(task_id)
    view = _ended(cluster, task_id)
    assert view["status"] == "cancelled"
    assert notes.read_text() == "ignored TaskCancelled\n"  # it was asked first, then killed
    assert _ended(cluster, cluster.client.submit("add", 1, 1))["result"] == 2  # a fresh slot


def test_cancel_in_a_busy_cluster_never_runs_a_task_twice(cluster: Cluster, tmp_path: Path) -> None:
    """The exactly-once ledger under cancels: 200 tasks on three workers, 60 cancelled at
    random in rounds while the others run, so some are waiting, some granted, some running and
    some ended. Each ends success (started once, ended once) or cancelled (started at most
    once, and only if it was cancelled: never as a retry or a second run)."""
    cluster.write_config(worker={"slots": 2})
    cluster.start_server()
    for w in ("w1", "w2", "w3"):
        cluster.start_worker(w)
    rng = random.Random(14)
    book = tmp_path / "ledger"
    ids = [cluster.client.submit("ledger", str(book), rng.uniform(0.05, 0.5), i) for i in range(200)]
    victims = rng.sample(ids, 60)
    for start in range(0, 60, 10):
        done = cluster.client.stats()["tasks"].get("success", 0)
        cluster.wait_for(lambda: cluster.client.stats()["tasks"].get("success", 0) >= done + 10, "progress")
        cluster.client.cancel(*victims[start:start + 10])
    statuses = cluster.wait_terminal(ids, timeout=300)
    starts, ends = defaultdict(list), defaultdict(list)
    for entry in ledger.read(book):
        (starts if entry.phase == "start" else ends)[entry.task_id].append(entry)
    for task_id in ids:
        status = statuses[task_id]["status"]
        assert status == "success" or (status == "cancelled" and task_id in victims), (task_id, status)
        assert len(starts[task_id]) <= 1, f"{task_id} started {len(starts[task_id])} times"
        if status == "success":
            assert len(ends[task_id]) == 1 and statuses[task_id]["result"] == ids.index(task_id)
    cancelled = [i for i in ids if statuses[i]["status"] == "cancelled"]
    running = [i for i in cancelled if starts[i]]
    print(f"{len(cancelled)} of 60 cancelled, {len(running)} of them while running")
    assert cancelled and cluster.client.failures() == []


def test_retry_runs_a_failed_task_again_and_keeps_its_history(cluster: Cluster) -> None:
    cluster.start_server()
    cluster.start_worker("w1")
    task_id = cluster.client.submit("fail", "ValueError", "first")
    assert _ended(cluster, task_id)["status"] == "failed"
    out = cluster.ctl("--json", "retry", task_id)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)[task_id]["outcome"] == "retried"
    cluster.wait_for(lambda: cluster.client.status(task_id)[task_id]["attempt"] == 2
                     and cluster.client.status(task_id)[task_id]["status"] == "failed", "the second run")
    view = cluster.client.status(task_id)[task_id]
    assert [(h["attempt"], h["status"], h["error"]["type"]) for h in view["history"]] == [(1, "failed", "ValueError")]
    done = cluster.client.submit("add", 1, 1)
    _ended(cluster, done)
    assert cluster.client.retry(done)[done]["outcome"] == "succeeded"


def test_purge_and_retention_delete_ended_tasks_and_ids_say_purged(cluster: Cluster) -> None:
    cluster.write_config(server={"keep_finished": 3600.0, "keep_failures": 1.0})
    cluster.start_server()
    cluster.start_worker("w1")
    ok = [cluster.client.submit("add", i, i) for i in range(5)]
    bad = cluster.client.submit("fail")
    cluster.wait_terminal(ok + [bad])
    # retention: the failure is older than keep_failures a second later; the successes stay
    cluster.wait_for(lambda: cluster.client.status(bad)[bad].get("purged"), "the failed task to be purged")
    assert all(v["status"] == "success" for v in cluster.status(ok).values())
    out = cluster.ctl("purge", "--older-than", "0s", "--status", "success")
    assert out.returncode == 0 and "purge ordered: 5 tasks (success)" in out.stdout, out.stdout
    cluster.wait_for(lambda: all(v.get("purged") for v in cluster.status(ok).values()), "the purge")
    assert cluster.client.status(ok[0])[ok[0]]["status"] == "unknown"
    assert cluster.client.stats()["counters"]["purged"] >= 6
    assert "purge done: 5 tasks deleted" in cluster.log("server")
    bad_duration = cluster.ctl("purge", "--older-than", "soon")
    assert bad_duration.returncode == 2 and "is not a duration" in bad_duration.stderr


def test_a_chain_through_the_cli_links_both_ways(cluster: Cluster) -> None:
    cluster.start_server()
    cluster.start_worker("w1")
    out = cluster.ctl("submit", "add", "1", "2", "--then", "mul", "10")
    assert out.returncode == 0, out.stderr
    parent = out.stdout.strip()
    child = f"{parent}.then"
    assert _ended(cluster, parent)["then"] == child
    view = _ended(cluster, child)
    assert (view["status"], view["result"], view["parent"]) == ("success", 30, parent)


def test_chains_link_once_across_server_kills(cluster: Cluster, tmp_path: Path) -> None:
    """The exactly-once ledger for chains: 150 parents, each naming a follow-up, while the
    server is SIGKILLed twice: every parent and every follow-up runs once, and no follow-up is
    lost or doubled (it is queued in the transaction that records its parent's success)."""
    cluster.write_config(worker={"slots": 2})
    cluster.start_server()
    for w in ("w1", "w2"):
        cluster.start_worker(w)
    book = tmp_path / "ledger"
    parents = {cluster.client.submit("ledger", str(book), 0.02, i,
                                     then={"task": "ledger_after", "args": [str(book), 0.02]}): i
               for i in range(150)}
    for round_ in range(2):
        cluster.wait_for(lambda: cluster.client.stats()["tasks"].get("success", 0) >= 60 * (round_ + 1),
                         f"progress before kill {round_ + 1}")
        cluster.stop("server", signal.SIGKILL)
        cluster.start_server()
    children = {f"{p}.then": i for p, i in parents.items()}
    cluster.wait_terminal([*parents, *children], timeout=300)  # (an id not seen yet is waited for)
    verdict = ledger.check_contract(cluster, book, {**parents, **children})
    assert verdict.re_executions == 0 and verdict.tasks == 300
    assert cluster.client.stats()["tasks"]["success"] == 300  # no follow-up doubled


def test_a_schedule_fires_each_tick_once_across_a_takeover(cluster: Cluster, tmp_path: Path) -> None:
    """A schedule every 2 s (missed = "all") writing to the ledger, two servers; the active is
    SIGKILLed mid-run and the standby takes over: the ticks fired are consecutive, with none
    lost across the takeover and none fired twice, and each ran once."""
    book = tmp_path / "ledger"
    cluster.write_config(schedules={"tick": {"task": "ledger", "args": [str(book)], "cron": "* * * * * */2",
                                             "missed": "all"}})
    cluster.start_server()
    standby = cluster.start_standby("server2")
    cluster.start_worker("w1")

    def fired() -> list[str]:
        return sorted(t["task-id"] for t in cluster.client.tasks(None, 10_000) if t["task-id"].startswith("cron:tick:"))

    cluster.wait_for(lambda: len(fired()) >= 3, "three ticks")
    cluster.stop("server", signal.SIGKILL)
    cluster.client = standby
    cluster.wait_for(lambda: standby.stats()["server"]["role"] == "active", "the standby to take over")
    before = len(fired())
    cluster.wait_for(lambda: len(fired()) >= before + 3, "three more ticks from the new active")
    ids = fired()
    ticks = sorted(int(i.rsplit(":", 1)[1]) for i in ids)
    assert ticks == list(range(ticks[0], ticks[-1] + 1, 2))  # every tick, the missed ones too
    cluster.wait_terminal(ids)
    verdict = ledger.check_contract(cluster, book, {i: None for i in ids})
    assert verdict.re_executions == 0
    (schedule,) = json.loads(cluster.ctl("--json", "--socket", standby.socket_path, "schedules").stdout)
    assert schedule["name"] == "tick" and schedule["fired"] >= len(ids) and schedule["next_tick"]


def _most_at_once(entries: list[ledger.Entry], task_ids: set[str]) -> int:
    """The most of these tasks running at once, by the ledger's start and end lines (counts of
    events in order, not durations)."""
    events = sorted((e.ts, 0 if e.phase == "end" else 1) for e in entries if e.task_id in task_ids)
    running = most = 0
    for _, starting in events:
        running += 1 if starting else -1
        most = max(most, running)
    return most


def test_global_limits_hold_across_three_workers(cluster: Cluster, tmp_path: Path) -> None:
    """Three workers of two slots. ledger: at most 2 running in the cluster; ledger_after: at
    most 1 per limit key; add: at most 5 granted a second (by the server's grant times)."""
    cluster.write_config(worker={"slots": 2}, limits={"ledger": {"concurrency": 2},
                                                      "ledger_after": {"concurrency": 1},
                                                      "add": {"rate": "5/s"}})
    cluster.start_server()
    for w in ("w1", "w2", "w3"):
        cluster.start_worker(w)
    book = tmp_path / "ledger"
    limited = [cluster.client.submit("ledger", str(book), 0.2, i) for i in range(12)]
    keyed = {key: [cluster.client.submit("ledger_after", i, str(book), 0.2, limit_key=key) for i in range(4)]
             for key in ("a", "b")}
    waiting = cluster.wait_for(lambda: [v for v in cluster.status(limited).values() if v["status"] == "queued"
                                        and "global limit" in (v.get("waiting") or "")], "a task held by the limit")
    assert "at most 2 granted at once" in waiting[0]["waiting"]
    added = [cluster.client.submit("add", i, i) for i in range(15)]
    cluster.wait_terminal(limited + keyed["a"] + keyed["b"] + added)
    entries = ledger.read(book)
    assert _most_at_once(entries, set(limited)) == 2  # the limit, and used
    assert _most_at_once(entries, set(keyed["a"])) == 1 and _most_at_once(entries, set(keyed["b"])) == 1
    assert _most_at_once(entries, set(keyed["a"] + keyed["b"])) == 2  # a budget per key
    with sqlite3.connect(cluster.database) as db:
        granted = sorted(r[0] for r in db.execute(
            f"SELECT assigned_at FROM tasks WHERE id IN ({','.join('?' * len(added))})", added))
    # at most 5 in any second: the sixth grant after a first one comes a second later (the
    # limiter's monotonic clock is read with the wall time assigned_at records)
    assert all(later - earlier >= 1.0 - 1e-3 for earlier, later in zip(granted, granted[5:]))
