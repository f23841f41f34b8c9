"""The real ``yadtqctl`` as a newcomer meets it (issue 12): where it finds the socket, what it
says about task names nobody provides, its exit codes, its order and its help, and the config
errors the daemons give for a misplaced or unknown ``[kafka]`` key."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from typing import Any

import pytest

from tests.cluster import Cluster
from yadtqd.client import KafkaSubmitter
from yadtqd.ctl.main import parser
from yadtqd.errors import UsageError

pytestmark = pytest.mark.kafka


def _ctl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """yadtqctl without --socket: it must find the socket itself."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("YADTQ_")}
    return subprocess.run([sys.executable, "-m", "yadtqd.ctl.main", *args], capture_output=True,
                          text=True, timeout=60, env={**clean, **(env or {})})


def test_the_socket_comes_from_the_daemons_configuration(cluster: Cluster) -> None:
    cluster.start_server()
    nowhere = _ctl("stats", env={"YADTQ_SERVER_SOCKET": str(cluster.dir / "nowhere.sock")})
    assert nowhere.returncode == 3  # named directly, nothing there: said at once
    by_flag = _ctl("--config", str(cluster.config), "stats")
    by_env = _ctl("stats", env={"YADTQ_CONFIG": str(cluster.config)})
    after = _ctl("stats", "--config", str(cluster.config))  # either position
    assert by_flag.returncode == by_env.returncode == after.returncode == 0, by_flag.stderr
    missing = _ctl("--config", "/nonexistent.toml", "stats")
    assert missing.returncode == 78 and "config file not found" in missing.stderr


def test_a_task_nobody_provides_is_refused_unless_queued_anyway(cluster: Cluster) -> None:
    cluster.write_config(server={"unroutable_timeout": 2.0})
    cluster.start_server()
    cluster.start_worker("w1", plugins="arith")
    refused = cluster.ctl("submit", "nosuchtask", "1")
    assert refused.returncode == 2
    assert "no live worker provides task 'nosuchtask'" in refused.stderr
    assert "add, div, mul, sub" in refused.stderr and "--queue-anyway" in refused.stderr
    queued = cluster.ctl("submit", "nosuchtask", "1", "--queue-anyway")
    assert queued.returncode == 0
    task_id = queued.stdout.strip()
    view = cluster.client.result(task_id, wait=60)  # failed after unroutable_timeout: it ended
    assert view["status"] == "failed" and view["error"]["type"] == "Unroutable"
    assert re.fullmatch(r"no live worker provided task 'nosuchtask' for \d+ s \(\[server\]"
                        r" unroutable_timeout\)", view["error"]["message"])
    with KafkaSubmitter({"bootstrap.servers": cluster.bootstrap}, cluster.prefix) as kafka:
        through_kafka = kafka.submit("alsonobody")
    assert cluster.client.result(through_kafka, wait=60)["error"]["type"] == "Unroutable"


def test_result_exit_codes_match_the_table(cluster: Cluster) -> None:
    cluster.start_server()
    cluster.start_worker("w1")
    done = cluster.client.submit("add", 1, 2)
    failed = cluster.client.submit("fail")
    cluster.wait_terminal([done, failed])
    running = cluster.client.submit("sleep", 30)
    assert cluster.ctl("result", done).returncode == 0
    assert cluster.ctl("result", failed).returncode == 1
    not_yet = cluster.ctl("result", running)
    assert not_yet.returncode == 4 and f"{running} is " in not_yet.stdout
    assert cluster.ctl("result", running, "--wait", "0.5").returncode == 4
    bogus = cluster.ctl("result", "no-such-id")
    assert bogus.returncode == 2 and "unknown task no-such-id" in bogus.stderr
    # with --wait an unknown id is waited for (it may be on its way through Kafka), then exit 2
    waited = cluster.ctl("result", "no-such-id", "--wait", "1")
    assert waited.returncode == 2 and "unknown task no-such-id (waited 1 s)" in waited.stderr


def test_tasks_are_listed_newest_first_with_or_without_a_status(cluster: Cluster) -> None:
    cluster.start_server()
    cluster.start_worker("w1")
    ids = [cluster.client.submit("add", i, 0) for i in range(5)]
    cluster.wait_terminal(ids)
    every = json.loads(cluster.ctl("--json", "tasks").stdout)
    succeeded = json.loads(cluster.ctl("--json", "tasks", "--status", "success").stdout)
    assert [t["task-id"] for t in every] == [t["task-id"] for t in succeeded] == ids[::-1]


def test_the_live_monitor_piped_into_head_ends_cleanly(cluster: Cluster) -> None:
    cluster.start_server()
    done = subprocess.run(f"set -o pipefail; {sys.executable} -m yadtqd.ctl.main --socket"
                          f" {cluster.socket} monitor | head -c 100", shell=True,
                          capture_output=True, timeout=60, executable="/bin/bash")
    assert done.returncode == 0
    assert b"BrokenPipeError" not in done.stderr and b"Traceback" not in done.stderr


def test_every_option_has_help() -> None:
    def walk(p: Any) -> list[Any]:
        out = [p]
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    out += walk(sub)
        return out

    for p in walk(parser()):
        for action in p._actions:
            if action.dest in ("help", "command"):
                continue
            assert action.help, f"{p.prog}: {action.option_strings or action.dest} has no help"


def test_a_kafka_submitter_with_a_wrong_prefix_says_so_at_once(cluster: Cluster) -> None:
    cluster.start_server()
    with KafkaSubmitter({"bootstrap.servers": cluster.bootstrap}, "nosuchprefix") as kafka:
        # before: UnreachableError "no acknowledgement within 30 s"
        with pytest.raises(UsageError, match="topic nosuchprefix.tasks does not exist"):
            kafka.submit("add", 1, 2)


@pytest.mark.parametrize(("kafka_line", "words"), [
    ('"bogus.setting" = 1', 'No such configuration property: "bogus.setting"'),
    ('topic_prefix = "demo"', "topic_prefix is a top-level key"),
])
def test_an_unknown_kafka_setting_is_a_config_error(cluster: Cluster, kafka_line: str, words: str) -> None:
    text = cluster.config.read_text().replace("[kafka]\n", f"[kafka]\n{kafka_line}\n")
    cluster.config.write_text(text)
    for role in ("server", "worker"):
        done = subprocess.run([sys.executable, "-m", "yadtqd.cli", role, "--config", str(cluster.config)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 78, done.stderr
        (line,) = done.stderr.strip().splitlines()  # one line, no traceback
        assert str(cluster.config) in line and words in line


def test_a_task_resubmitted_under_its_id_is_not_refused_while_nobody_provides_it(cluster: Cluster) -> None:
    """A client retrying after a lost reply must hear "recorded", not "unroutable": the task is
    known, and a refusal would invite a second submission under a new id."""
    cluster.start_server()
    cluster.start_worker("w1", plugins="arith")
    first = cluster.ctl("submit", "sleep", "1", "--id", "known-task", "--queue-anyway")
    assert first.returncode == 0
    again = cluster.ctl("submit", "sleep", "1", "--id", "known-task")
    assert again.returncode == 0 and again.stdout.strip() == "known-task"


def test_a_backlog_older_than_the_timeout_survives_its_worker_restarting(cluster: Cluster) -> None:
    """unroutable_timeout counts how long a name has gone unprovided, not how old a task is: a
    routable backlog must not fail while its only worker restarts."""
    cluster.write_config(server={"unroutable_timeout": 10.0}, worker={"slots": 1})
    cluster.start_server()
    cluster.start_worker("w1")
    long = cluster.client.submit("sleep", 14)
    waiting = cluster.client.submit("sleep", 0)  # queued behind it, older than 10 s soon
    cluster.wait_for(lambda: cluster.client.status(long)[long]["status"] == "processing", "the long task")
    cluster.wait_for(lambda: "queued" == cluster.client.status(waiting)[waiting]["status"] and
                     time.time() - _submitted(cluster, waiting) > 11, "the backlog to outlive the timeout",
                     timeout=30)
    assert cluster.stop("w1") == 0  # drains the long task: sleep unprovided meanwhile
    cluster.start_worker("w1")
    assert cluster.client.result(waiting, wait=60)["status"] == "success"


def _submitted(cluster: Cluster, task_id: str) -> float:
    import datetime as dt

    return dt.datetime.fromisoformat(cluster.client.status(task_id)[task_id]["submitted_at"]).timestamp()
