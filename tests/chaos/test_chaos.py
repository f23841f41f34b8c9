"""The chaos suite: real faults during real runs, then the exactly-once contract checked
against the execution ledger and the store (tests/ledger.py). Scenario 4 (a worker cut off the
network) is tests/integration/test_partition.py; scenario 5 (graceful stop of a busy worker)
is the last test here.
"""

from __future__ import annotations

import random
import signal
import threading
from pathlib import Path

import pytest

from tests import ledger
from tests.cluster import Cluster
from yadtqd.client import KafkaSubmitter
from yadtqd.testing.broker import Broker

pytestmark = pytest.mark.kafka

WORKERS = ("w1", "w2", "w3")


def _start(cluster: Cluster, workers: tuple[str, ...]) -> None:
    """Chaos settings (fast detection, room for many losses), a server and the workers."""
    cluster.write_config(server={"heartbeat_timeout": 2.0, "max_attempts": 20},
                         worker={"heartbeat_interval": 0.25, "slots": 2})
    cluster.start_server()
    for w in workers:
        cluster.start_worker(w)


def _submit(cluster: Cluster, book: Path, count: int, rng: random.Random, start: int) -> dict[str, int]:
    return {cluster.client.submit("ledger", str(book), rng.uniform(0.05, 0.4), i): i
            for i in range(start, start + count)}


def _busy_worker(cluster: Cluster, expected: dict[str, int], rng: random.Random) -> str | None:
    """A worker running a task, chosen at random: always killing the holder of the oldest task
    would hunt that one task from worker to worker until it ran out of attempts."""
    running = sorted({v["worker"] for v in cluster.status(list(expected)).values()
                      if v["status"] == "processing"})
    return rng.choice(running) if running else None


def test_scenario_1_twenty_worker_kills_mid_task(cluster: Cluster, tmp_path: Path) -> None:
    _start(cluster, WORKERS)
    rng = random.Random(1)
    book = tmp_path / "ledger"
    expected = _submit(cluster, book, 300, rng, 0)
    kills = 0
    while kills < 20:
        victim = cluster.wait_for(lambda: _busy_worker(cluster, expected, rng) or
                                  (expected.update(_submit(cluster, book, 30, rng, len(expected))) and None),
                                  "a worker running a task")
        # every other kill hits the worker's main process only: its execution processes (and
        # what their tasks started) must end by themselves, not outlive it
        cluster.stop(victim, signal.SIGKILL, group=kills % 2 == 0)
        cluster.start_worker(victim)
        kills += 1
    cluster.wait_terminal(list(expected), timeout=300)
    verdict = ledger.check_contract(cluster, book, expected)
    print(f"scenario 1: {verdict}")
    assert verdict.dead_epochs >= 20
    assert verdict.re_executions >= 1


def test_scenario_2_server_killed_three_times_while_submissions_continue(cluster: Cluster, tmp_path: Path) -> None:
    _start(cluster, WORKERS[:2])
    book = tmp_path / "ledger"
    expected: dict[str, int] = {}
    done = threading.Event()

    def producer() -> None:
        with KafkaSubmitter({"bootstrap.servers": cluster.bootstrap}, cluster.prefix) as kafka:
            for i in range(400):
                expected[kafka.submit("ledger", str(book), 0.02, i)] = i
                if done.wait(0.01):
                    return

    thread = threading.Thread(target=producer)
    thread.start()
    try:
        for round_ in range(3):
            cluster.wait_for(lambda: len(expected) >= 100 * (round_ + 1) and
                             cluster.client.stats()["tasks"].get("success", 0) >= 50 * (round_ + 1),
                             f"progress before kill {round_ + 1}", timeout=120)
            cluster.stop("server", signal.SIGKILL)
            cluster.start_server()
    finally:
        thread.join(300)
        done.set()
    assert len(expected) == 400
    cluster.wait_terminal(list(expected), timeout=300)
    verdict = ledger.check_contract(cluster, book, expected)
    print(f"scenario 2: {verdict}")
    assert cluster.client.failures() == []  # killing the server kills no worker
    assert verdict.re_executions == 0


def test_scenario_6_three_takeovers_in_a_row_with_worker_kills(cluster: Cluster, tmp_path: Path) -> None:
    """Two servers (DESIGN 13): the active SIGKILLed three times in a row, each time after two
    busy workers were SIGKILLed, while submissions continue; each killed server comes back as
    the standby. The contract holds on the ledger, and the terms count every takeover."""
    _start(cluster, WORKERS)
    clients = {"server": cluster.client, "server2": cluster.start_standby("server2")}
    rng = random.Random(6)
    book = tmp_path / "ledger"
    expected: dict[str, int] = {}
    done = threading.Event()

    def producer() -> None:
        with KafkaSubmitter({"bootstrap.servers": cluster.bootstrap}, cluster.prefix) as kafka:
            for i in range(600):
                expected[kafka.submit("ledger", str(book), rng.uniform(0.02, 0.2), i)] = i
                if done.wait(0.03):
                    return

    def busy() -> str | None:
        running = sorted(w["worker"] for w in cluster.client.workers() if w["state"] == "live" and w["running"])
        return rng.choice(running) if running else None

    thread = threading.Thread(target=producer)
    thread.start()
    active, standby = "server", "server2"
    try:
        for round_ in range(3):
            cluster.wait_for(lambda: cluster.client.stats()["tasks"].get("success", 0) >= 60 * (round_ + 1),
                             f"progress before takeover {round_ + 1}", timeout=120)
            for _ in range(2):
                victim = cluster.wait_for(busy, "a worker running a task")
                cluster.stop(victim, signal.SIGKILL)
                cluster.start_worker(victim)
            cluster.wait_for(lambda: clients[standby].stats()["server"]["lag"] >= 0, f"{standby} to follow")
            cluster.stop(active, signal.SIGKILL)
            cluster.wait_for(lambda: clients[standby].stats()["server"]["role"] == "active",
                             f"{standby} to take over from {active}")
            cluster.client = clients[standby]
            clients[active] = cluster.start_standby(active)
            active, standby = standby, active
        thread.join(300)
    finally:
        done.set()
        thread.join(300)
    assert len(expected) == 600
    cluster.wait_terminal(list(expected), timeout=300)
    verdict = ledger.check_contract(cluster, book, expected)
    print(f"scenario 6: {verdict}")
    server = cluster.client.stats()["server"]
    assert server["active"]["term"] == 4 and server["active"]["server"] == active
    assert server["last_takeover"]["from"] == standby
    assert verdict.dead_epochs >= 6  # each killed worker declared dead, whichever server was active


def test_scenario_3_broker_stopped_and_started_during_a_run(own_cluster: Cluster, own_broker: Broker,
                                                             tmp_path: Path) -> None:
    cluster = own_cluster
    _start(cluster, WORKERS[:2])
    book = tmp_path / "ledger"
    expected = _submit(cluster, book, 150, random.Random(3), 0)
    cluster.wait_for(lambda: cluster.client.stats()["tasks"].get("success", 0) >= 20, "a running start")
    own_broker.stop()
    cluster.wait_for(lambda: "broker connection lost" in cluster.log("server"), "the server to see it")
    own_broker.start()
    cluster.wait_terminal(list(expected), timeout=300)
    verdict = ledger.check_contract(cluster, book, expected)
    print(f"scenario 3: {verdict}")
    assert cluster.client.failures() == []  # a broker restart kills no worker
    assert verdict.re_executions == 0


def test_scenario_5_graceful_stop_of_busy_workers(cluster: Cluster, tmp_path: Path) -> None:
    _start(cluster, WORKERS)
    rng = random.Random(5)
    book = tmp_path / "ledger"
    expected = _submit(cluster, book, 200, rng, 0)
    for victim in ("w1", "w2", "w1", "w3"):
        cluster.wait_for(lambda: _busy_worker(cluster, expected, rng), "a busy cluster")
        assert cluster.stop(victim, signal.SIGTERM) == 0
        cluster.start_worker(victim)
    cluster.wait_terminal(list(expected), timeout=300)
    verdict = ledger.check_contract(cluster, book, expected)
    print(f"scenario 5: {verdict}")
    assert verdict.re_executions == 0  # a graceful stop never runs anything twice
    assert cluster.client.failures() == []
