"""Poison tasks: whatever a task does (a 2 MB exception, os._exit, a segfault, a 10 MB result),
it ends ``failed`` with a reason, its worker keeps its epoch, and the tasks beside it succeed.
A size limit Kafka cannot carry is a configuration error at start (issue 11, defect 2)."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path

import pytest
from confluent_kafka import Producer

from tests.cluster import Cluster
from tests.ledger import check_contract, read
from tests.notify import NotifySocket
from yadtqd.messages.common import ENVELOPE_BYTES

pytestmark = pytest.mark.kafka


def test_misbehaving_tasks_fail_alone_and_the_worker_keeps_its_epoch(cluster: Cluster) -> None:
    cluster.write_config(worker={"slots": 2})
    cluster.start_server()
    cluster.start_worker("w1")
    (epoch,) = cluster.epochs("w1", live=True)
    neighbours = [cluster.client.submit("sleep", 0.2) for _ in range(6)]
    poison = {
        "huge_error": cluster.client.submit("fail", "ValueError", "x", 2_000_000),
        "exit": cluster.client.submit("exit", 3),
        "segfault": cluster.client.submit("segfault"),
        "huge_result": cluster.client.submit("blob", 10_000_000),
    }
    neighbours += [cluster.client.submit("add", i, 1) for i in range(6)]
    views = cluster.wait_terminal([*poison.values(), *neighbours])
    huge = views[poison["huge_error"]]
    assert (huge["status"], huge["error"]["type"]) == ("failed", "ValueError")
    assert "bytes cut" in huge["error"]["message"] and len(huge["error"]["message"]) <= 16 * 1024
    assert views[poison["exit"]]["error"]["type"] == "ExecutionProcessDied"
    assert "exited with status 3" in views[poison["exit"]]["error"]["message"]
    assert views[poison["segfault"]]["error"]["type"] == "ExecutionProcessDied"
    assert "killed by signal SIGSEGV" in views[poison["segfault"]]["error"]["message"]
    assert views[poison["huge_result"]]["error"]["type"] == "ResultTooLarge"
    assert all(views[t]["status"] == "success" for t in neighbours)
    assert cluster.epochs("w1", live=True) == {epoch}  # no restart, no new epoch
    assert cluster.client.failures() == []
    assert cluster.processes["w1"].poll() is None


def test_a_crash_inside_a_batch_fails_that_task_alone_and_the_rest_run_once(cluster: Cluster) -> None:
    """Short tasks go to an execution process in batches (issue 15). When one of them ends its
    process, it alone fails; the tasks behind it in its batch never started, and each runs
    once elsewhere (invariant 5): the real broker, server and worker, checked in the ledger.
    The worker's log must name tasks that came back that way, so the test cannot pass without
    a crash inside a batch."""
    ledger = cluster.dir / "ledger"
    cluster.write_config(worker={"slots": 2})
    cluster.start_server()
    cluster.start_worker("w1")
    (epoch,) = cluster.epochs("w1", live=True)
    # the worker times a name first: only names known to be short go in batches
    cluster.wait_terminal([cluster.client.submit("ledger", str(ledger)) for _ in range(20)])
    producer = Producer({"bootstrap.servers": cluster.bootstrap, "linger.ms": 20})
    ids, crashers = [], set()
    for i in range(400):
        task_id = str(uuid.uuid4())
        kwargs = {"path": str(ledger), "value": i}
        if i % 50 == 25:  # eight of them, each most likely amid a batch of 8
            kwargs["exit_status"] = 3
            crashers.add(task_id)
        producer.produce(f"{cluster.prefix}.tasks", json.dumps(
            {"task-id": task_id, "task": "ledger", "kwargs": kwargs}).encode(), key=task_id.encode())
        ids.append(task_id)
    assert producer.flush(30) == 0
    views = cluster.wait_terminal(ids, timeout=300)
    for task_id in crashers:
        assert (views[task_id]["status"], views[task_id]["error"]["type"]) == ("failed", "ExecutionProcessDied")
    check_contract(cluster, ledger, {t: i for i, t in enumerate(ids) if t not in crashers})
    starts = Counter(e.task_id for e in read(ledger) if e.phase == "start" and e.task_id in ids)
    assert {starts[t] for t in ids} == {1}  # the crashers too: a failed task is not run again
    lines = cluster.log("w1").splitlines()
    died = "did not start: its batch's execution process"
    came_back = {_task_of(line) for line in lines if died in line}
    assert came_back and came_back <= set(ids) - crashers, came_back
    assert all(views[t]["attempt"] == 1 for t in came_back)
    said = Counter(_task_of(line) for line in lines if line.endswith("event=task_started]"))
    first_said: dict[str, int] = {}  # task id -> the line where it was first said to have started
    for number, line in enumerate(lines):
        if line.endswith("event=task_started]"):
            first_said.setdefault(_task_of(line), number)
    for number, line in enumerate(lines):  # behind a crash: said to have started only after it
        if died in line:
            assert first_said[_task_of(line)] > number, f"{_task_of(line)} was said to have started before it came back"
    late = Counter(_task_of(line) for line in lines
                   if "did not start: its batch's time to start had passed" in line)
    # each said to have started when it ran, those behind a crash too; an extra "started" only
    # for a job that reached the front as its batch's time to start passed, and said so
    for task_id in ids:
        assert 1 <= said[task_id] <= 1 + late[task_id], (task_id, said[task_id], late[task_id])
    assert cluster.epochs("w1", live=True) == {epoch}  # no restart, no new epoch
    assert cluster.client.failures() == []


def _task_of(line: str) -> str:
    """The task id a worker's "task <id> ..." log line names."""
    return line.split("task ", 1)[1].split(" ", 1)[0]


def test_a_result_limit_kafka_cannot_carry_is_a_config_error(cluster: Cluster) -> None:
    cluster.write_config(worker={"max_result_bytes": 2_000_000})
    done = subprocess.run([sys.executable, "-m", "yadtqd.cli", "worker", "--config", str(cluster.config)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 78
    assert "max_result_bytes" in done.stderr
    assert "2000000" in done.stderr and "1000000" in done.stderr  # both numbers named
    assert "Traceback" not in done.stderr


def test_a_task_limit_over_the_topics_max_message_bytes_is_a_config_error(cluster: Cluster) -> None:
    """The producer would take it, the broker would not: the server reads the topic's limit."""
    cluster.write_config(server={"max_task_bytes": 1_500_000},
                         kafka={"message.max.bytes": 4_000_000})
    done = subprocess.run([sys.executable, "-m", "yadtqd.cli", "server", "--config", str(cluster.config)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 78, done.stderr
    assert "max_task_bytes = 1500000" in done.stderr and "max.message.bytes is 1048588" in done.stderr


def test_outcomes_batched_together_fit_an_events_topic_with_the_least_room(
        cluster: Cluster, tmp_path: Path) -> None:
    """A topic's ``max.message.bytes`` bounds a batch of messages, not one. With an ``events``
    topic made with no more room than the start-up check asks (the largest result plus the
    envelope), a worker running short tasks with results of half that limit, its outcomes
    batched by the linger, must not send a batch the broker refuses: the broker drops every
    event in it, and each task that succeeded would be failed as too large to report."""
    result_bytes, count = 60_000, 40
    cluster.make_topic("events", **{"max.message.bytes": str(result_bytes + ENVELOPE_BYTES)})
    cluster.write_config(worker={"slots": 1, "prefetch": count, "max_result_bytes": result_bytes})
    cluster.start_server()
    notify = NotifySocket(tmp_path / "notify.sock")  # its STATUS= tells what the worker holds
    try:
        cluster.start_worker("w1", env=notify.env())
        gate = tmp_path / "gate"
        first = cluster.client.submit("ledger", str(tmp_path / "ledger"), 0, "first", str(gate))
        cluster.wait_for(lambda: cluster.client.status(first)[first]["status"] == "processing",
                         "the gated task to start")
        ids = [cluster.client.submit("blob", result_bytes // 2) for _ in range(count)]
        cluster.wait_for(lambda: notify.seen(f"busy 1/1, waiting {count},"),
                         f"w1 to hold all {count}, behind the gated task")
        gate.touch()  # then they run back to back, each outcome lingering to share a request
        statuses = cluster.wait_terminal(ids + [first])
    finally:
        notify.close()
    assert {statuses[t]["status"] for t in ids + [first]} == {"success"}, cluster.log("w1")
    assert {len(cluster.client.result(t)["result"]) for t in ids} == {result_bytes // 2}
    assert "EventTooLarge" not in cluster.log("w1")
