"""Poison tasks: whatever a task does (a 2 MB exception, os._exit, a segfault, a 10 MB result),
it ends ``failed`` with a reason, its worker keeps its epoch, and the tasks beside it succeed.
A size limit Kafka cannot carry is a configuration error at start (issue 11, defect 2)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.cluster import Cluster

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
