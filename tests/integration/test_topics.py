"""The server follows its topics as they change under it: partitions added while it runs, and
offsets that fell out of retention while it was away (issue 11, defects 5 and 9)."""

from __future__ import annotations

import json
import signal
import uuid
import zlib

import pytest
from confluent_kafka import Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewPartitions

from tests.cluster import Cluster

pytestmark = pytest.mark.kafka


def _produce(cluster: Cluster, partition: int, count: int, task: str = "add") -> list[str]:
    producer = Producer({"bootstrap.servers": cluster.bootstrap})
    ids = [str(uuid.uuid4()) for _ in range(count)]
    for i, task_id in enumerate(ids):
        body = {"task-id": task_id, "task": task, "args": [i, 1] if task == "add" else [i]}
        producer.produce(f"{cluster.prefix}.tasks", json.dumps(body).encode(), partition=partition)
    assert producer.flush(30) == 0
    return ids


def test_partitions_added_while_running_are_followed(cluster: Cluster) -> None:
    cluster.write_config(server={"heartbeat_timeout": 3.0}, worker={"heartbeat_interval": 0.5})
    cluster.start_server()
    cluster.start_worker("w1", plugins="arith")
    # the server's producers have read the topics' metadata (3 partitions) before they grow
    cluster.wait_terminal([cluster.client.submit("add", i, 1) for i in range(10)])
    admin = AdminClient({"bootstrap.servers": cluster.bootstrap})
    grown = [NewPartitions(f"{cluster.prefix}.{t}", 8) for t in ("tasks", "dispatch", "events")]
    for future in admin.create_partitions(grown).values():
        future.result(30)
    newcomer = "w-new-1"  # writes events and reads dispatch on partition 6: one of the new ones
    assert zlib.crc32(newcomer.encode()) % 8 == 6
    cluster.start_worker(newcomer, plugins="demo")  # waits until the server counts it live
    on_new = _produce(cluster, 7, 5, task="echo")  # only the newcomer runs echo
    on_old = _produce(cluster, 0, 5)
    statuses = cluster.wait_terminal(on_new + on_old)
    assert all(statuses[t]["worker"] == newcomer and statuses[t]["status"] == "success" for t in on_new)
    assert all(statuses[t]["worker"] == "w1" and statuses[t]["status"] == "success" for t in on_old)
    assert "grew from 3 to 8 partitions" in cluster.log("server")
    # the new partitions carry markers too: a worker that dies there is declared dead
    cluster.stop(newcomer, signal.SIGKILL)
    (failure,) = cluster.wait_for(lambda: cluster.client.failures(), f"{newcomer} to be declared dead")
    assert failure["worker"] == newcomer and failure["reason"].startswith("no heartbeat")


def test_offsets_lost_to_retention_are_logged_and_the_rest_is_read(cluster: Cluster) -> None:
    cluster.start_server()
    cluster.start_worker("w1")
    first = _produce(cluster, 0, 3)
    cluster.wait_terminal(first)
    cluster.stop("server")
    waiting = _produce(cluster, 0, 10)
    admin = AdminClient({"bootstrap.servers": cluster.bootstrap})
    topic = f"{cluster.prefix}.tasks"
    # retention takes the oldest 4 of the 10 the server has not read: offsets 3 to 6
    for future in admin.delete_records([TopicPartition(topic, 0, 7)]).values():
        future.result(30)
    cluster.start_server()
    statuses = cluster.wait_terminal(waiting[4:])
    assert all(v["status"] == "success" for v in statuses.values())
    assert all(v["status"] == "unknown" for v in cluster.status(waiting[:4]).values())
    assert f"{topic}[0]: offsets 3 to 6 were deleted before this server read them" in cluster.log("server")
    assert cluster.client.stats()["counters"]["offsets_lost"] == 4
