"""A task's whole process tree ends with it (issue 17, item 2): what a task starts dies at its
timeout, with a fence, and with its worker; an execution process that dies while a child it
forked holds its pipe is noticed by its exit."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from tests.cluster import Cluster

pytestmark = pytest.mark.kafka


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


def _pids(cluster: Cluster, path: Path) -> dict[str, int]:
    return cluster.wait_for(lambda: path.exists() and path.stat().st_size and
                            json.loads(path.read_text()), f"the task to write {path.name}")


def test_a_timeout_ends_what_the_task_started(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_server()
    cluster.start_worker("w1")
    pids = tmp_path / "pids"
    task_id = cluster.client.submit("spawn", str(pids), timeout=2.0)
    started = _pids(cluster, pids)
    view = cluster.client.result(task_id, wait=60)
    assert view["error"]["type"] == "TimeoutError"
    cluster.wait_for(lambda: not _alive(started["child"]), "the task's sleep 600 to end")
    assert not _alive(started["execution"])


def test_a_forked_child_holding_the_pipe_does_not_hide_the_death(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_server()
    cluster.start_worker("w1", slots=1)
    pids = tmp_path / "pids"
    task_id = cluster.client.submit("fork_and_exit", str(pids))
    view = cluster.client.result(task_id, wait=60)
    assert view["error"]["type"] == "ExecutionProcessDied"
    assert "exited with status 3" in view["error"]["message"]
    cluster.wait_for(lambda: not _alive(_pids(cluster, pids)["child"]), "the forked child to end")
    assert cluster.client.result(cluster.client.submit("add", 1, 1), wait=60)["result"] == 2  # the slot serves


def test_a_killed_worker_leaves_no_execution_process_behind(cluster: Cluster, tmp_path: Path) -> None:
    """Chaos kills end the worker's whole process group; here only its main process dies."""
    cluster.start_server()
    worker = cluster.start_worker("w1")
    pids = tmp_path / "pids"
    cluster.client.submit("spawn", str(pids))
    started = _pids(cluster, pids)
    os.kill(worker.pid, signal.SIGKILL)
    cluster.wait_for(lambda: not _alive(started["execution"]), "the execution process to end")
    cluster.wait_for(lambda: not _alive(started["child"]), "the task's sleep 600 to end")


def test_a_fence_ends_what_the_task_started(cluster: Cluster, tmp_path: Path) -> None:
    cluster.write_config(server={"heartbeat_timeout": 2.0}, worker={"heartbeat_interval": 0.25})
    cluster.start_server()
    worker = cluster.start_worker("w1")
    pids = tmp_path / "pids"
    cluster.client.submit("spawn", str(pids))
    started = _pids(cluster, pids)
    os.kill(worker.pid, signal.SIGSTOP)  # the main process only: its execution process runs on
    try:
        cluster.wait_for(lambda: cluster.client.failures(), "w1 to be declared dead")
    finally:
        os.kill(worker.pid, signal.SIGCONT)
    cluster.wait_for(lambda: "fenced by the server" in cluster.log("w1"), "w1 to read its fence")
    cluster.wait_for(lambda: not _alive(started["child"]), "the task's sleep 600 to end")
    cluster.stop("w1", signal.SIGKILL)  # its new attempt of the 600 s task need not drain


def test_a_task_over_its_memory_limit_fails_alone(cluster: Cluster) -> None:
    """[worker] max_task_memory: the task that needs more fails with a clear error; the worker,
    its epoch and the next task in the same slot are fine (issue 17, item 3)."""
    cluster.write_config(worker={"slots": 1, "max_task_memory": 400 * 1024 * 1024})
    cluster.start_server()
    cluster.start_worker("w1")
    (epoch,) = cluster.epochs("w1", live=True)
    greedy = cluster.client.result(cluster.client.submit("allocate", 1024), wait=60)
    assert greedy["error"]["type"] == "MemoryError"
    assert "ran out of memory ([worker] max_task_memory = 419430400 bytes)" in greedy["error"]["message"]
    modest = cluster.client.result(cluster.client.submit("allocate", 50), wait=60)
    assert (modest["status"], modest["result"]) == ("success", 50)
    assert cluster.epochs("w1", live=True) == {epoch} and cluster.client.failures() == []


def test_tasks_do_not_inherit_the_daemons_settings(cluster: Cluster) -> None:
    """Kafka credentials given as YADTQ_KAFKA_* must not reach task code (issue 17, item 4)."""
    cluster.start_server()
    cluster.start_worker("w1", env={"YADTQ_KAFKA_CLIENT_RACK": "stand-in-for-a-secret"})
    names = cluster.client.result(cluster.client.submit("environment"), wait=60)["result"]
    assert "PATH" in names and not [n for n in names if n.startswith("YADTQ_")]
