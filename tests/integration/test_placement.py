"""Workers whose ids hash to one ``dispatch`` partition are placed on partitions of their own
(each worker fetches every message of the partition it reads, its own or not)."""

from __future__ import annotations

from collections import Counter

import pytest

from tests.cluster import Cluster, read_partitions
from yadtqd import messages as m
from yadtqd.transport import partition_for

pytestmark = pytest.mark.kafka

WORKERS = ("w1", "w2", "w3")


def test_workers_sharing_a_hashed_partition_are_placed_on_one_each_and_run_tasks_there(
        cluster: Cluster) -> None:
    assert {partition_for(w, 3) for w in WORKERS} == {1}  # the premise: three topics' partitions
    cluster.start_server()
    # queued before any worker: each newcomer is granted tasks in the turn that places it, so
    # its first runs are in the transaction that carries its placed, and reach it only if it
    # reads its new partition from the offset it took before its hello
    ids = [cluster.client.submit("sleep", 0.05, queue_anyway=True) for _ in range(240)]
    for worker in WORKERS:
        cluster.start_worker(worker)
    live = {w["worker"]: w for w in cluster.client.workers() if w["state"] == "live"}
    assert sorted(w["dispatch_partition"] for w in live.values()) == [0, 1, 2]
    moved = [w for w in WORKERS if live[w]["dispatch_partition"] != 1]
    assert len(moved) == 2
    for worker in moved:
        cluster.wait_for(lambda w=worker: "the server placed epoch" in cluster.log(w),
                         f"{worker} to read the partition it was placed on")
    statuses = cluster.wait_terminal(ids, timeout=120)
    assert all(v["status"] == "success" for v in statuses.values())
    assert set(Counter(v["worker"] for v in statuses.values())) == set(WORKERS)
    # each worker's runs went to the partition it reads, and nothing else of it to its home
    for name in (*WORKERS, "server"):  # (a live server keeps a transaction open on each)
        assert cluster.stop(name) == 0
    for partition, key, value in read_partitions(cluster.bootstrap, f"{cluster.prefix}.dispatch"):
        if not key:
            continue  # the server's placeholders
        order = m.parse_dispatch(value)
        if isinstance(order, m.Placed):
            assert partition == 1 and order.partition == live[order.worker]["dispatch_partition"]
        else:
            assert partition == live[order.worker]["dispatch_partition"], order
