"""Dead-worker detection, fencing, recovery and graceful stop, with real processes."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections import Counter
from pathlib import Path

import pytest

from tests import ledger
from tests.cluster import Cluster
from tests.notify import NotifySocket
from yadtqd.messages.common import ENVELOPE_BYTES

pytestmark = pytest.mark.kafka


def _fast(cluster: Cluster, **server: object) -> None:
    cluster.write_config(server={"heartbeat_timeout": 2.0, **server},
                         worker={"heartbeat_interval": 0.25})


def _holder(cluster: Cluster, task_id: str, attempt: int = 1) -> str:
    """Wait until the task's attempt is processing; return the worker running it."""
    def started() -> dict | None:
        view = cluster.client.status(task_id)[task_id]
        return view if view["status"] == "processing" and view["attempt"] == attempt else None

    return str(cluster.wait_for(started, f"{task_id} attempt {attempt} to start")["worker"])


def test_killed_worker_is_declared_dead_and_its_task_runs_elsewhere(cluster: Cluster, tmp_path: Path) -> None:
    _fast(cluster)
    cluster.start_server()
    cluster.start_worker("w1")
    cluster.start_worker("w2")
    book = tmp_path / "ledger"
    task_id = cluster.client.submit("ledger", str(book), 3, "done")
    victim = _holder(cluster, task_id)
    cluster.stop(victim, signal.SIGKILL)
    view = cluster.client.result(task_id, wait=60)
    assert view["status"] == "success" and view["worker"] != victim and view["attempt"] == 2
    (failure,) = cluster.client.failures()
    assert failure["worker"] == victim and failure["requeued"] == [task_id]
    assert failure["reason"].startswith("no heartbeat for")
    assert failure["last_heartbeat"] <= failure["detected_at"]
    verdict = ledger.check_contract(cluster, book, {task_id: "done"})
    assert verdict.re_executions == 1
    cluster.stop("server")
    cluster.start_server()
    assert cluster.client.failures() == [failure]  # the history survives a server restart


def test_restarted_worker_fences_its_previous_epoch_at_once(cluster: Cluster, tmp_path: Path) -> None:
    cluster.write_config(server={"heartbeat_timeout": 3600.0})  # only the new hello can tell
    cluster.start_server()
    cluster.start_worker("w1")
    book = tmp_path / "ledger"
    task_id = cluster.client.submit("ledger", str(book), 1, 7)
    _holder(cluster, task_id)
    cluster.stop("w1", signal.SIGKILL)
    cluster.start_worker("w1")
    assert cluster.client.result(task_id, wait=60)["result"] == 7
    (failure,) = cluster.client.failures()
    assert failure["reason"] == "a newer epoch of the same worker said hello"
    ledger.check_contract(cluster, book, {task_id: 7})


def test_task_whose_workers_die_max_attempts_times_fails_with_worker_lost(cluster: Cluster) -> None:
    cluster.write_config(server={"heartbeat_timeout": 3600.0, "max_attempts": 2})
    cluster.start_server()
    cluster.start_worker("w1")
    task_id = cluster.client.submit("sleep", 600)
    for attempt in (1, 2):
        _holder(cluster, task_id, attempt)
        cluster.stop("w1", signal.SIGKILL)
        cluster.start_worker("w1")
    view = cluster.client.result(task_id, wait=60)
    assert view["status"] == "failed"
    assert view["error"]["type"] == "WorkerLost"
    assert "lost while running this task 2 times" in view["error"]["message"]
    assert len(cluster.client.failures()) == 2


def test_wedged_worker_stops_heartbeating_and_is_declared_dead(cluster: Cluster) -> None:
    _fast(cluster)
    cluster.start_server()
    wedged = cluster.start_worker("wedged", env={"YADTQ_TEST_WEDGE_ON_TASK": "echo"})
    task_id = cluster.client.submit("echo", "hi")
    cluster.wait_for(lambda: cluster.client.failures(), "the wedged worker to be declared dead")
    assert wedged.poll() is None  # alive, but its loop is stuck
    cluster.start_worker("healthy")
    view = cluster.client.result(task_id, wait=60)
    assert (view["status"], view["worker"]) == ("success", "healthy")
    assert "wedging the main loop" in cluster.log("wedged")
    cluster.stop("wedged", signal.SIGKILL)  # a wedged loop does not act on SIGTERM


def test_frozen_worker_is_fenced_and_its_late_result_never_applied(cluster: Cluster, tmp_path: Path) -> None:
    _fast(cluster)
    cluster.start_server()
    frozen = cluster.start_worker("w1")
    book = tmp_path / "ledger"
    task_id = cluster.client.submit("ledger", str(book), 1, "once")
    _holder(cluster, task_id)
    old_epochs = cluster.epochs("w1")
    os.killpg(frozen.pid, signal.SIGSTOP)  # no heartbeats now, but it will wake up
    try:
        cluster.wait_for(lambda: cluster.client.failures(), "w1 to be declared dead")
        cluster.start_worker("w2")
        view = cluster.client.result(task_id, wait=60)
        assert (view["worker"], view["attempt"]) == ("w2", 2)
    finally:
        os.killpg(frozen.pid, signal.SIGCONT)
    cluster.wait_for(lambda: cluster.epochs("w1", live=True) - old_epochs, "w1 to register anew")
    # Whether w1 sends anything under its old epoch after waking (a heartbeat, the finished
    # event) depends on which it reads first, its pool's pipe or the fence; if it does, the event
    # is stale. The partition test, where the late events are sent for sure, asserts the count.
    assert "fenced by the server" in cluster.log("w1")
    assert cluster.client.result(task_id)["worker"] == "w2"
    ledger.check_contract(cluster, book, {task_id: "once"})


def test_graceful_stop_drains_running_and_hands_back_unstarted(cluster: Cluster, tmp_path: Path) -> None:
    cluster.write_config(worker={"slots": 1, "prefetch": 2})
    cluster.start_server()
    cluster.start_worker("w1")
    book = tmp_path / "ledger"
    ids = [cluster.client.submit("ledger", str(book), 2, i) for i in range(3)]
    cluster.wait_for(lambda: all(v["worker"] == "w1" for v in cluster.client.status(*ids).values())
                     and any(v["status"] == "processing" for v in cluster.client.status(*ids).values()),
                     "all three granted to w1, one running")
    # stopped while its first task runs (signalled within milliseconds of seeing it start, far
    # inside its 2 s); w2 starts only after, so how fast it starts cannot change who ran what
    assert cluster.stop("w1", signal.SIGTERM) == 0
    cluster.start_worker("w2")
    statuses = cluster.wait_terminal(ids)
    on_w1 = [t for t in ids if statuses[t]["worker"] == "w1"]
    assert len(on_w1) == 1 and statuses[on_w1[0]]["attempt"] == 1
    assert all(statuses[t]["worker"] == "w2" for t in ids if t not in on_w1)
    assert cluster.client.failures() == []
    assert {w["worker"]: w["state"] for w in cluster.client.workers()}["w1"] == "left"
    ledger.check_contract(cluster, book, {t: i for i, t in enumerate(ids)})
    # both unstarted grants were handed back (in one bye, or two when a run was still on its
    # way when the stop began: a run reaching a stopping worker goes back with another bye)
    assert cluster.log("server").count("re-queued: handed back by w1") == 2
    assert "draining 1 running" in cluster.log("w1")


def test_a_stopping_worker_waits_for_the_server_and_hands_back_the_runs_on_their_way(
        cluster: Cluster, tmp_path: Path) -> None:
    # The runs are granted while w1 is frozen, so they are in Kafka, unread, when w1 begins its
    # stop; the server is frozen too, so it cannot confirm w1's bye at once. A worker that exited
    # once drained (it runs nothing) would leave the runs with its epoch: a failure record when
    # the heartbeat timeout declared it dead. It must read on until the server answers its bye.
    cluster.write_config(server={"heartbeat_timeout": 20.0}, worker={"slots": 1, "prefetch": 2})
    server = cluster.start_server()
    w1 = cluster.start_worker("w1")
    book = tmp_path / "ledger"
    os.kill(w1.pid, signal.SIGSTOP)
    try:
        ids = [cluster.client.submit("ledger", str(book), 0, i) for i in range(3)]
        cluster.wait_for(lambda: all(v["status"] == "queued" and v["worker"] == "w1"
                                     for v in cluster.client.status(*ids).values()),
                         "all three granted to the frozen w1")
        os.kill(server.pid, signal.SIGSTOP)
        try:
            w1.send_signal(signal.SIGTERM)
        finally:
            os.kill(w1.pid, signal.SIGCONT)
        cluster.wait_for(lambda: "stopping: handed back" in cluster.log("w1"), "w1 to begin its stop")
    finally:
        os.kill(server.pid, signal.SIGCONT)
    assert cluster.wait_exit("w1") == 0
    cluster.start_worker("w2")
    statuses = cluster.wait_terminal(ids)
    assert cluster.client.failures() == []
    assert {v["worker"] for v in statuses.values()} == {"w2"}
    assert {w["worker"]: w["state"] for w in cluster.client.workers()}["w1"] == "left"
    assert cluster.log("server").count("re-queued: handed back by w1") == 3
    assert "the server confirmed the leave" in cluster.log("w1")
    ledger.check_contract(cluster, book, {t: i for i, t in enumerate(ids)})


def test_a_stop_hands_back_a_deep_pipeline_through_an_events_topic_with_the_least_room(
        cluster: Cluster, tmp_path: Path) -> None:
    """The ``events`` topic made beforehand with no more room than the start-up check asks (the
    largest result plus the envelope, 65,600 bytes here), and a worker holding 1,000 unstarted
    grants of 128-character ids when it stops: about 150 KB of handed-back references. Each
    ``bye``, and each batch of them Kafka receives, must fit, or the tasks stay with the epoch
    until it is declared dead, and the stop is never confirmed."""
    result_bytes, held = 64, 1_000
    cluster.make_topic("events", **{"max.message.bytes": str(result_bytes + ENVELOPE_BYTES)})
    cluster.write_config(server={"heartbeat_timeout": 20.0},
                         worker={"slots": 1, "prefetch": held, "max_result_bytes": result_bytes})
    cluster.start_server()
    notify = NotifySocket(tmp_path / "notify.sock")  # its STATUS= tells what w1 holds
    try:
        _stop_holding(cluster, tmp_path, notify, held)
    finally:
        notify.close()


def _stop_holding(cluster: Cluster, tmp_path: Path, notify: NotifySocket, held: int) -> None:
    w1 = cluster.start_worker("w1", env=notify.env())
    book, gate = tmp_path / "ledger", tmp_path / "gate"
    first = cluster.client.submit("ledger", str(book), 0, "first", str(gate))
    assert _holder(cluster, first) == "w1"
    ids = [cluster.client.submit("ledger", str(book), 0, i, task_id=f"{i:0128d}") for i in range(held)]
    cluster.wait_for(lambda: notify.seen(f"busy 1/1, waiting {held},"),
                     f"w1 to hold all {held}, behind the task it runs")
    w1.send_signal(signal.SIGTERM)
    cluster.wait_for(lambda: f"stopping: handed back {held} unstarted" in cluster.log("w1"),
                     "w1 to begin its stop")
    gate.touch()
    assert cluster.wait_exit("w1") == 0
    assert "the server confirmed the leave" in cluster.log("w1")
    assert cluster.log("server").count("re-queued: handed back by w1") == held
    assert cluster.client.failures() == []
    cluster.start_worker("w2")
    statuses = cluster.wait_terminal(ids)
    assert {v["worker"] for v in statuses.values()} == {"w2"}
    assert {v["status"] for v in statuses.values()} == {"success"}
    assert cluster.client.result(first)["worker"] == "w1"
    ledger.check_contract(cluster, book, {first: "first", **{t: i for i, t in enumerate(ids)}})


def test_pool_that_stops_answering_is_a_stall_but_a_long_task_is_not(cluster: Cluster) -> None:
    cluster.write_config(server={"heartbeat_timeout": 2.0, "max_attempts": 2},
                         worker={"heartbeat_interval": 0.25, "stall_timeout": 1.0, "slots": 1})
    cluster.start_server()
    proc = cluster.start_worker("w1")
    long = cluster.client.submit("sleep", 4)
    assert cluster.client.result(long, wait=60)["status"] == "success"
    assert cluster.client.failures() == []  # 4 s asleep, well past the stall timeout: not a stall
    hog = cluster.client.submit("hog", 6)
    view = cluster.client.result(hog, wait=120)
    assert (view["status"], view["error"]["type"]) == ("failed", "WorkerLost")
    failures = cluster.client.failures()
    assert len(failures) == 2 and all(f["reason"].startswith("no heartbeat") for f in failures)
    assert proc.poll() is None and "fenced by the server" in cluster.log("w1")
    cluster.wait_for(lambda: cluster.epochs("w1", live=True), "w1 to register anew")
    after = cluster.client.submit("add", 1, 1)
    assert cluster.client.result(after, wait=60)["result"] == 2  # it registered anew and serves


def test_frozen_worker_starts_none_of_its_prefetched_grants_after_its_death(
        cluster: Cluster, tmp_path: Path) -> None:
    """A worker frozen while it holds prefetched grants is declared dead and its grants run
    elsewhere; once it wakes it must not start any of them (issue 11, defect 3)."""
    cluster.write_config(server={"heartbeat_timeout": 2.0},
                         worker={"heartbeat_interval": 0.25, "slots": 2, "prefetch": 8})
    cluster.start_server()
    frozen = cluster.start_worker("w1")
    book = tmp_path / "ledger"
    expected = {cluster.client.submit("ledger", str(book), 0.05, i): i for i in range(400)}

    def prefetched() -> bool:
        views = cluster.status(list(expected)).values()
        return sum(v.get("waiting", "").startswith("granted to w1") for v in views) >= 4

    cluster.wait_for(prefetched, "w1 to hold prefetched grants")
    os.killpg(frozen.pid, signal.SIGSTOP)
    frozen_at = time.time()  # (after: a task ending as the signal lands counts as ended)
    try:
        cluster.wait_for(lambda: cluster.client.failures(), "w1 to be declared dead")
        cluster.start_worker("w2", slots=2)
        time.sleep(5)  # the freeze itself is what is tested: 9 s in all, as reported
    finally:
        os.killpg(frozen.pid, signal.SIGCONT)
    cluster.wait_terminal(list(expected), timeout=180)
    assert ledger.starts_after_death(cluster, book) == []
    ledger.check_contract(cluster, book, expected)  # each re-run answers w1's death
    # A task runs again if w1 started it before the freeze and the server never applied its
    # outcome: it was running (at most its 2 slots), or it had ended with its outcome still in
    # w1's producer (batched up to 20 ms: one a slot, a task lasting 50 ms; two a slot allowed
    # for a slow machine's scheduling). No prefetched grant may be among them.
    entries = ledger.read(book)
    dead = {f["epoch"] for f in cluster.client.failures()}
    again = {t for t, n in Counter(e.task_id for e in entries if e.phase == "start").items() if n > 1}
    ended = {e.task_id for e in entries if e.phase == "end" and e.epoch in dead and e.ts < frozen_at}
    assert len(again - ended) <= 2, f"{len(again - ended)} tasks were running on w1 at the freeze"
    assert len(again & ended) <= 4, f"{len(again & ended)} outcomes of w1 were lost at the freeze"


def test_a_second_live_process_with_the_same_worker_id_is_refused(cluster: Cluster) -> None:
    """Two hosts configured with one worker id must not fence each other forever: the newcomer
    exits 78 naming the id and the host that holds it (issue 11, defect 8)."""
    cluster.start_server()
    cluster.start_worker("twin")
    (epoch,) = cluster.epochs("twin", live=True)
    other_host = cluster.start("twin-elsewhere", "worker", {"YADTQ_WORKER_ID": "twin"},
                               wrap=lambda cmd: ["unshare", "--uts", "sh", "-c",
                                                 'hostname other-host && exec "$@"', "sh", *cmd])
    assert other_host.wait(60) == 78
    log = cluster.log("twin-elsewhere")
    assert "worker id 'twin' is held by a live process on host" in log
    assert socket.gethostname() in log
    assert cluster.epochs("twin", live=True) == {epoch}
    assert cluster.client.failures() == []
    assert cluster.client.result(cluster.client.submit("add", 2, 2), wait=60)["result"] == 4
    cluster.stop("twin", signal.SIGKILL)  # a restart on the same host still takes over at once
    cluster.start_worker("twin")
    (failure,) = cluster.client.failures()
    assert failure["reason"] == "a newer epoch of the same worker said hello"


def test_a_worker_reads_on_with_a_new_consumer_and_its_tasks_go_on(cluster: Cluster,
                                                                    tmp_path: Path) -> None:
    """A worker whose consumer is replaced (as when librdkafka leaves one that never connects
    again) reads on from where the old one stopped, in the same process and epoch: the task
    running meanwhile ends, every task granted before and after the change runs once, and no
    ``run`` is read twice."""
    cluster.start_server()
    worker = cluster.start_worker("w1", env={"YADTQ_TEST_REPLACE_CONSUMER_ON_TASK": "echo"})
    epochs = cluster.epochs("w1")
    book = tmp_path / "ledger"
    # 10 s: the 21 tasks ahead of the echo are granted one at a time beside it (a task run long
    # stops the prefetch), which a loaded machine can stretch past a few seconds
    running = cluster.client.submit("ledger", str(book), 10.0, "running")
    _holder(cluster, running)
    before = {cluster.client.submit("ledger", str(book), 0.01, f"b{i}"): f"b{i}" for i in range(20)}
    trigger = cluster.client.submit("echo", "replace")
    cluster.wait_for(lambda: "a new one reads on" in cluster.log("w1"), "the consumer's replacement")
    assert cluster.status([running])[running]["status"] == "processing"  # it goes on meanwhile
    after = {cluster.client.submit("ledger", str(book), 0.01, f"a{i}"): f"a{i}" for i in range(20)}
    ids = {running: "running", **before, **after}
    statuses = cluster.wait_terminal([*ids, trigger])
    assert {v["status"] for v in statuses.values()} == {"success"}
    assert {v["attempt"] for v in statuses.values()} == {1}
    assert ledger.check_contract(cluster, book, ids).re_executions == 0
    assert worker.poll() is None and cluster.epochs("w1") == epochs
    assert cluster.log("w1").count("event=consumer_replaced") == 1
    assert "event=task_duplicate" not in cluster.log("w1")  # nothing read twice, either
