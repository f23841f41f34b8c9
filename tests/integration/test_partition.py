"""A worker cut off the network (its own network namespace) past heartbeat_timeout while it runs
a task, then reconnected: declared dead, its late result fenced, the task completed once
elsewhere."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import ledger
from tests.cluster import Cluster
from tests.netns import Netns

pytestmark = pytest.mark.kafka


def test_partitioned_worker_is_fenced_and_task_completes_once_elsewhere(
        cluster: Cluster, netns: Netns, tmp_path: Path) -> None:
    cluster.write_config(server={"heartbeat_timeout": 2.0}, worker={"heartbeat_interval": 0.25})
    cluster.start_server()
    cluster.start_worker("island", wrap=netns.wrap)
    book = tmp_path / "ledger"
    task_id = cluster.client.submit("ledger", str(book), 3, "survived")
    cluster.wait_for(lambda: cluster.client.status(task_id)[task_id]["status"] == "processing",
                     "the task to start on the island")
    old = cluster.epochs("island")
    netns.cut()
    try:
        (failure,) = cluster.wait_for(lambda: cluster.client.failures(), "the island to be declared dead")
        assert failure["worker"] == "island" and failure["requeued"] == [task_id]
        cluster.start_worker("mainland")
        view = cluster.client.result(task_id, wait=60)
        assert (view["worker"], view["attempt"]) == ("mainland", 2)
        cluster.wait_for(lambda: len([e for e in ledger.read(book) if e.phase == "end"]) == 2,
                         "the island's execution to end too")
    finally:
        netns.heal()
    cluster.wait_for(lambda: cluster.epochs("island", live=True) - old, "the island to register anew")
    cluster.wait_for(lambda: cluster.client.stats()["counters"].get("stale_events", 0) >= 1,
                     "the island's late result to be fenced")
    assert cluster.client.result(task_id)["worker"] == "mainland"
    assert "fenced by the server" in cluster.log("island")
    verdict = ledger.check_contract(cluster, book, {task_id: "survived"})
    assert verdict.re_executions == 1
