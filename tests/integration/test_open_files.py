"""The open-files limit (``RLIMIT_NOFILE``) against what the configuration needs: a worker with
more slots than its soft limit allows raises it, a hard limit too low is a config error, and
task code keeps the soft limit the worker started with (yadtqd/openfiles.py)."""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.cluster import Cluster

pytestmark = pytest.mark.kafka

#: More execution slots than a soft limit of :data:`SOFT` open files leaves room for (5 each).
SLOTS = 30
SOFT = 128


def _limited(soft: int, hard: int) -> Callable[[list[str]], list[str]]:
    return lambda command: ["prlimit", f"--nofile={soft}:{hard}", *command]


def _open_files(pid: int) -> tuple[str, str]:
    """A process's soft and hard open-files limits, as /proc shows them."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return soft, hard
    raise AssertionError(f"no open-files line in /proc/{pid}/limits")


def _execution_processes(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid), "-f", "spawn_main"], capture_output=True, text=True)
    return [int(p) for p in found.stdout.split()]


def test_a_worker_with_more_slots_than_its_soft_limit_allows_raises_it(cluster: Cluster) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert hard > 1000, "the machine's hard limit leaves no room to raise to"
    cluster.start_server()
    worker = cluster.start_worker("w1", slots=SLOTS, wrap=_limited(SOFT, hard))
    ids = [cluster.client.submit("add", i, 1) for i in range(3 * SLOTS)]
    statuses = cluster.wait_terminal(ids)
    assert {v["status"] for v in statuses.values()} == {"success"}
    assert _open_files(worker.pid) == (str(hard), str(hard))
    assert len(os.listdir(f"/proc/{worker.pid}/fd")) > SOFT  # it needed the room
    assert f"open files limit raised from {SOFT} to {hard}" in cluster.log("w1")
    children = _execution_processes(worker.pid)
    assert len(children) == SLOTS
    assert {_open_files(child) for child in children} == {(str(SOFT), str(hard))}


def test_a_hard_limit_too_low_for_the_slots_is_a_config_error(cluster: Cluster) -> None:
    cluster.start_server()
    cluster.start_worker("w1", slots=SLOTS, wrap=_limited(SOFT, SOFT), wait=False)
    assert cluster.wait_exit("w1") == 78
    told = cluster.log("w1")
    assert f"[worker] slots = {SLOTS} needs about" in told and f"at most {SOFT} (RLIMIT_NOFILE" in told
    assert "LimitNOFILE=" in told and "Traceback" not in told


def test_a_server_raises_its_soft_limit_for_its_connections(cluster: Cluster) -> None:
    """64 connections served at once (the default) take about 3 files each, beside the 75 or so
    the server holds: over a soft limit of 128."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    server = cluster.start_server(wrap=_limited(SOFT, hard))
    assert _open_files(server.pid) == (str(hard), str(hard))
    connections = []
    try:
        for _ in range(60):  # all open at once, each answered
            conn = socket.socket(socket.AF_UNIX)
            connections.append(conn)
            conn.connect(cluster.socket)
            conn.sendall(b'{"op": "stats"}\n')
            assert json.loads(conn.makefile("rb").readline())["ok"] is True
        assert len(os.listdir(f"/proc/{server.pid}/fd")) > SOFT
    finally:
        for conn in connections:
            conn.close()
    assert f"open files limit raised from {SOFT} to {hard}" in cluster.log("server")


def test_a_server_whose_descriptors_pass_1023_still_serves(cluster: Cluster) -> None:
    """Once its limit is raised, a server's descriptors may pass 1,023, where ``select()``
    cannot wait (it raised ValueError on the loop's first turn). Started holding 1,098
    inherited descriptors, all it opens is past them."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    occupy = 'for fd in $(seq 3 1100); do eval "exec $fd</dev/null"; done; exec "$@"'
    server = cluster.start_server(
        wrap=lambda command: ["prlimit", f"--nofile={hard}:{hard}", "bash", "-c", occupy, "bash", *command])
    opened = [int(fd) for fd in os.listdir(f"/proc/{server.pid}/fd")
              if os.readlink(f"/proc/{server.pid}/fd/{fd}").startswith("socket:")]
    assert opened and min(opened) > 1100
    cluster.start_worker("w1")
    task = cluster.client.submit("add", 2, 3)
    assert cluster.client.result(task, wait=60)["result"] == 5
