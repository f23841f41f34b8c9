"""Bad input on every topic and on the socket: a clear error naming the problem, and the
server keeps serving."""

from __future__ import annotations

import json
import socket
import uuid

import pytest
from confluent_kafka import Producer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.cluster import Cluster
from yadtqd import messages as m
from yadtqd.errors import BadMessage
from yadtqd.transport import partition_for

pytestmark = pytest.mark.kafka


def _produce(cluster: Cluster, topic: str, values: list[bytes | None], key: bytes | None = None) -> None:
    producer = Producer({"bootstrap.servers": cluster.bootstrap})
    for value in values:
        producer.produce(f"{cluster.prefix}.{topic}", value, key=key)
    assert producer.flush(30) == 0


def _still_serving(cluster: Cluster) -> None:
    marker = cluster.client.submit("add", 20, 22)
    assert cluster.client.result(marker, wait=60)["result"] == 42


def test_bad_submissions_fail_by_id_or_are_skipped(cluster: Cluster) -> None:
    cluster.write_config(server={"max_task_bytes": 2048})
    cluster.start_server()
    cluster.start_worker("w1")
    with_id = {
        "missing-task": b'{"task-id": "missing-task", "args": [1]}',
        "wrong-args": b'{"task-id": "wrong-args", "task": "add", "args": "1,2"}',
        "wrong-kwargs": b'{"task-id": "wrong-kwargs", "task": "add", "kwargs": [1]}',
        "bad-timeout": b'{"task-id": "bad-timeout", "task": "add", "options": {"timeout": -1}}',
        "oversized": json.dumps({"task-id": "oversized", "task": "echo", "args": ["x" * 4000]}).encode(),
    }
    without_id = [b"not json at all", b"[1, 2, 3]", b'{"task": "add"}', b"",
                  b'{"task-id": "has space", "task": "add"}', b'{"task-id": 7, "task": "add"}', None]
    _produce(cluster, "tasks", [*with_id.values(), *without_id])
    _still_serving(cluster)
    statuses = cluster.status(list(with_id))
    expected = {"missing-task": "Object missing required field `task`",
                "wrong-args": "Expected `array`, got `str` - at `$.args`",
                "wrong-kwargs": "Expected `object`, got `array` - at `$.kwargs`",
                "bad-timeout": "at `$.options.timeout`",
                "oversized": "over the limit of 2048 bytes"}
    for task_id, words in expected.items():
        view = statuses[task_id]
        assert view["status"] == "failed", task_id
        assert view["error"]["type"] == "BadSubmission"
        assert words in view["error"]["message"], (task_id, view["error"]["message"])
    assert cluster.client.stats()["counters"]["bad_messages"] == len(with_id) + len(without_id)
    log = cluster.log("server")
    assert "skipped bad submission at" in log and "JSON is malformed" in log


def test_bad_events_and_dispatch_messages_are_skipped(cluster: Cluster) -> None:
    cluster.start_server()
    cluster.start_worker("w1")
    _produce(cluster, "events", [b"{}", b"garbage", b'{"type": "hello", "worker": "x"}',
                                 b'{"type": "finished", "worker": "w1", "epoch": "e", "ts": 1,'
                                 b' "task-id": "t", "attempt": 0, "status": "success"}'], key=b"w1")
    _produce(cluster, "dispatch", [b"garbage", b'{"type": "run"}'], key=b"w1")
    _still_serving(cluster)
    cluster.wait_for(lambda: cluster.client.stats()["counters"].get("bad_messages") == 4,
                     "four bad events counted")
    assert "skipped bad event at" in cluster.log("server")
    assert "live" in {w["state"] for w in cluster.client.workers()}


def test_a_worker_parses_only_the_dispatch_messages_keyed_for_it(cluster: Cluster) -> None:
    """Workers whose ids hash to one partition share it: each passes over what is keyed for
    another unread (a bad message included: its own worker reports it), and reports its own."""
    cluster.start_server()
    cluster.start_worker("w1")
    topic = f"{cluster.prefix}.dispatch"
    producer = Producer({"bootstrap.servers": cluster.bootstrap})
    partition = partition_for("w1", len(producer.list_topics(topic, timeout=10).topics[topic].partitions))
    producer.produce(topic, b"garbage for w2", key=b"w2", partition=partition)
    producer.produce(topic, b"garbage for w1", key=b"w1", partition=partition)
    assert producer.flush(30) == 0
    _still_serving(cluster)  # its run lies past both in the partition: both were read
    assert cluster.log("w1").count("skipped dispatch message") == 1


def test_stale_events_are_counted_and_not_applied(cluster: Cluster) -> None:
    cluster.start_server()
    cluster.start_worker("w1")
    task_id = cluster.client.submit("add", 1, 1)
    assert cluster.client.result(task_id, wait=60)["result"] == 2
    forged = {"type": "finished", "worker": "w1", "epoch": "not-the-epoch", "ts": 1.0,
              "task-id": task_id, "attempt": 1, "status": "success", "result": 999}
    _produce(cluster, "events", [json.dumps(forged).encode()], key=b"w1")
    cluster.wait_for(lambda: cluster.client.stats()["counters"].get("stale_events", 0) >= 1,
                     "the stale event to be counted")
    assert cluster.client.result(task_id)["result"] == 2


def _raw_request(path: str, payload: bytes, expect_close: bool) -> tuple[dict, bool]:
    """Send raw bytes; return the reply and whether the server closed the connection."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(path)
        sock.sendall(payload)
        reader = sock.makefile("rb")
        reply = json.loads(reader.readline())
        closed = expect_close and reader.readline() == b""
    return reply, closed


def test_malformed_socket_requests_get_error_replies(cluster: Cluster) -> None:
    cluster.write_config(server={"max_request_bytes": 4096})
    cluster.start_server()
    cases = {
        b"not json\n": "bad_request",
        b"[1, 2]\n": "bad_request",
        b'{"op": "explode"}\n': "unknown_op",
        b'{"no-op": 1}\n': "unknown_op",
        b'{"op": "status", "ids": 5}\n': "bad_request",
        b'{"op": "tasks", "limit": "ten"}\n': "bad_request",
        b'{"op": "submit", "task": {"task-id": "bad id!", "task": "add"}}\n': "bad_task",
        b"\xff\xfe\n": "bad_request",
        b"x" * 10000 + b"\n": "too_large",
    }
    for payload, code in cases.items():
        closes = code != "bad_task"
        reply, closed = _raw_request(cluster.socket, payload, expect_close=closes)
        assert reply["ok"] is False
        assert reply["error"]["code"] == code, (payload[:40], reply)
        assert reply["error"]["message"]
        assert closed == closes, payload[:40]
    assert cluster.client.stats()["tasks"] == {}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.one_of(
    st.binary(max_size=300),
    st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                 lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                 max_leaves=12).map(lambda v: json.dumps(v).encode()),
))
def test_fuzzed_socket_requests_never_disturb_the_server(fuzz_cluster: Cluster, payload: bytes) -> None:
    line = payload.replace(b"\n", b" ") + b"\n"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(fuzz_cluster.socket)
        sock.sendall(line)
        reply = json.loads(sock.makefile("rb").readline())
    assert isinstance(reply, dict) and "ok" in reply
    if not reply["ok"]:
        assert reply["error"]["code"] != "internal", reply
    assert fuzz_cluster.client.stats()["workers_live"] == 0


@pytest.fixture(scope="module")
def fuzz_cluster(bootstrap: str, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    cluster = Cluster(bootstrap, tmp_path_factory.mktemp("fuzz"))
    cluster.start_server()
    yield cluster
    cluster.stop_all()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.dictionaries(st.sampled_from(["task-id", "task", "args", "kwargs", "options", "x"]),
                            st.none() | st.integers() | st.text(max_size=10)
                            | st.lists(st.integers(), max_size=3), max_size=5))
def test_fuzzed_submissions_over_kafka_are_recorded_or_skipped(fuzz_cluster: Cluster, body: dict) -> None:
    """Each fuzzed submission is recorded as queued (valid), recorded as failed by its id
    (invalid, id readable), or skipped and counted (no readable id). A marker sent after it on
    the same partition proves the server has read it."""
    task_id = body.get("task-id", "")
    if isinstance(task_id, str):  # unique across examples, valid or not as the fuzz made it
        body["task-id"] = uuid.uuid4().hex[:8] + task_id
    raw = json.dumps(body).encode()
    try:
        expected = "queued" if m.parse_submission(raw, 512 * 1024) else ""
    except BadMessage as exc:
        expected = "failed" if exc.task_id else "skipped"
    bad_before = fuzz_cluster.client.stats()["counters"].get("bad_messages", 0)
    marker = str(uuid.uuid4())
    producer = Producer({"bootstrap.servers": fuzz_cluster.bootstrap})
    producer.produce(f"{fuzz_cluster.prefix}.tasks", raw, partition=0)
    producer.produce(f"{fuzz_cluster.prefix}.tasks", json.dumps(
        {"task-id": marker, "task": "add", "args": [1, 1]}).encode(), partition=0)
    assert producer.flush(30) == 0
    fuzz_cluster.wait_for(lambda: fuzz_cluster.client.status(marker)[marker]["status"] == "queued",
                          "the marker, sent through Kafka after the fuzzed body, to be recorded")
    bad_after = fuzz_cluster.client.stats()["counters"].get("bad_messages", 0)
    if expected == "skipped":
        assert bad_after == bad_before + 1
        if isinstance(body.get("task-id"), str):
            assert fuzz_cluster.client.status(body["task-id"])[body["task-id"]]["status"] == "unknown"
        return
    view = fuzz_cluster.client.status(body["task-id"])[body["task-id"]]
    assert view["status"] == expected, (body, view)
    if expected == "failed":
        assert view["error"]["type"] == "BadSubmission" and bad_after == bad_before + 1
    else:
        assert bad_after == bad_before


def _connect(path: str) -> socket.socket:
    """A connected client socket (a blocking connect waits while the listen backlog is full)."""
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(path)
    sock.settimeout(30)
    return sock


def test_no_client_can_exhaust_the_socket(cluster: Cluster) -> None:
    """500 connections at once, one that never sends, a limit too large: each gets a clear
    answer and the server keeps serving everyone else (issue 11, defect 12)."""
    cluster.write_config(server={"max_connections": 16, "idle_timeout": 5.0})
    cluster.start_server()
    cluster.start_worker("w1")
    silent = _connect(cluster.socket)
    crowd = [_connect(cluster.socket) for _ in range(500)]
    answers = []
    for sock in crowd:
        line = sock.makefile("rb").readline()  # the cap's "busy", or the idle timeout's close
        answers.append(json.loads(line)["error"]["code"] if line else "closed")
        sock.close()
    assert set(answers) <= {"busy", "closed"} and answers.count("busy") >= 500 - 16
    assert silent.makefile("rb").readline() == b""  # closed by the server after 5 s idle
    silent.close()
    _still_serving(cluster)
    reply, _ = _raw_request(cluster.socket, b'{"op": "tasks", "limit": 1000000}\n', expect_close=False)
    assert reply["error"]["code"] == "bad_request" and "at most 10000" in reply["error"]["message"]
    assert "socket connection refused" in cluster.log("server")
