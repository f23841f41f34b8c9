"""A real YADTQ cluster for integration tests: ``yadtqd`` processes and the ``yadtqctl`` CLI.

Each cluster has topics, a database and a socket of its own, so tests share the broker without
seeing each other. Processes are started with their own process group and stopped by PID.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from yadtqd.client import Client
from yadtqd.errors import WaitTimeout

WAIT = 60.0
#: A line librdkafka logged, through the daemon's logger or straight to stderr.
_LIBRDKAFKA_LINE = re.compile(r"yadtqd\.kafka\.librdkafka:|^%\d\|")


class Cluster:
    """Server and workers of one test, with their config, logs and a client."""

    def __init__(self, bootstrap: str, directory: Path) -> None:
        self.bootstrap = bootstrap
        self.dir = directory
        self.prefix = f"t{uuid.uuid4().hex[:12]}"
        self.socket = str(directory / "yadtqd.sock")
        self.database = str(directory / "yadtq.db")
        self.config = directory / "yadtq.toml"
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.roles: dict[str, str] = {}
        self.client = Client(self.socket, timeout=30)
        self.log_level = "debug"  # tests want the whole story in a failing test's report
        self.write_config()

    def write_config(self, server: dict[str, Any] | None = None, worker: dict[str, Any] | None = None,
                     kafka: dict[str, Any] | None = None,
                     schedules: dict[str, dict[str, Any]] | None = None,
                     limits: dict[str, dict[str, Any]] | None = None) -> None:
        """(Re)write the cluster's TOML config."""
        server = {"database": self.database, "socket": self.socket, "heartbeat_timeout": 5.0,
                  **(server or {})}
        worker = {"slots": 2, "heartbeat_interval": 0.5, "stop_timeout": 30.0, **(worker or {})}
        lines = [f'topic_prefix = "{self.prefix}"', "[kafka]",
                 f'"bootstrap.servers" = "{self.bootstrap}"']
        lines += [f'"{k}" = {json.dumps(v)}' for k, v in (kafka or {}).items()]
        lines += ["[server]"]
        lines += [f"{k} = {json.dumps(v)}" for k, v in server.items()]
        lines += ["[worker]"] + [f"{k} = {json.dumps(v)}" for k, v in worker.items()]
        for section, tables in (("schedules", schedules), ("limits", limits)):
            for name, table in (tables or {}).items():
                lines += [f"[{section}.{json.dumps(name)}]"] + [f"{k} = {json.dumps(v)}" for k, v in table.items()]
        self.config.write_text("\n".join(lines) + "\n")

    def make_topic(self, name: str, partitions: int = 3, **settings: str) -> None:
        """Make one of the cluster's topics (``name`` without the prefix) before a server does,
        as an operator may, with these topic settings."""
        topic = f"{self.prefix}.{name}"
        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        admin.create_topics([NewTopic(topic, partitions, 1, config=settings)])[topic].result(30)

    # ------------------------------------------------------------ processes

    def start(self, name: str, role: str, env: dict[str, str] | None = None,
              wrap: Callable[[list[str]], list[str]] | None = None) -> subprocess.Popen[bytes]:
        """Start ``yadtqd ROLE`` as process ``name``; its output goes to ``name.log``."""
        full_env = {**os.environ, "YADTQ_CONFIG": str(self.config), **(env or {})}
        log = (self.dir / f"{name}.log").open("ab")
        command = [sys.executable, "-m", "yadtqd.cli", role, "--log-level", self.log_level]
        proc = subprocess.Popen(wrap(command) if wrap else command,
                                env=full_env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.processes[name] = proc
        self.roles[name] = role
        return proc

    def start_server(self, wrap: Callable[[list[str]], list[str]] | None = None) -> subprocess.Popen[bytes]:
        """Start the server and wait until it is the active one (the servers' group elected it,
        and it read the changelog to its end)."""
        proc = self.start("server", "server", {"YADTQ_SERVER_NAME": "server"}, wrap)
        self.wait_for(lambda: self.client.stats()["server"]["role"] == "active",
                      "the server to be active", alive=proc)
        return proc

    def start_standby(self, name: str) -> Client:
        """Start server ``name`` without waiting to see it elected: ``server`` on the cluster's
        database and socket, any other name on its own (``NAME.db``, ``NAME.sock``). Returns
        its client once its socket answers."""
        env = {"YADTQ_SERVER_NAME": name}
        if name != "server":
            env.update(YADTQ_SERVER_DATABASE=str(self.dir / f"{name}.db"),
                       YADTQ_SERVER_SOCKET=str(self.dir / f"{name}.sock"))
        proc = self.start(name, "server", env)
        client = Client(env.get("YADTQ_SERVER_SOCKET", self.socket), timeout=30)
        self.wait_for(lambda: client.stats(), f"{name}'s socket to answer", alive=proc)
        return client

    def start_worker(self, worker_id: str, plugins: str | None = None, slots: int | None = None,
                     wait: bool = True, env: dict[str, str] | None = None,
                     wrap: Callable[[list[str]], list[str]] | None = None) -> subprocess.Popen[bytes]:
        """Start a worker and (by default) wait until the server counts it live."""
        extra = {"YADTQ_WORKER_ID": worker_id, **(env or {})}
        if plugins is not None:
            extra["YADTQ_WORKER_PLUGINS"] = plugins
        if slots is not None:
            extra["YADTQ_WORKER_SLOTS"] = str(slots)
        known = self.epochs(worker_id) if wait else set()
        proc = self.start(worker_id, "worker", extra, wrap)
        if wait:
            self.wait_for(lambda: self.epochs(worker_id, live=True) - known,
                          f"a new epoch of worker {worker_id} to join", alive=proc)
        return proc

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 60.0, group: bool = True) -> int:
        """Signal a process (its whole group for SIGKILL, unless ``group`` is False: then its
        execution processes must end by themselves) and wait for it to exit."""
        proc = self.processes.pop(name)
        if proc.poll() is None:
            if sig == signal.SIGKILL and group:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.send_signal(sig)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            return proc.wait()

    def wait_exit(self, name: str, timeout: float = 60.0) -> int:
        """Wait for a process that is ending by itself; its exit status (it is killed, with
        its group, if it does not end in time)."""
        try:
            status = self.processes[name].wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop(name, signal.SIGKILL)
            raise
        del self.processes[name]
        return status

    def stop_all(self) -> None:
        """Stop every process the cluster started (SIGTERM, then SIGKILL): the workers first,
        all at once, while a server is there to confirm their leave."""
        workers = [n for n in self.processes if self.roles.get(n) == "worker"]
        for name in workers:
            if self.processes[name].poll() is None:
                self.processes[name].send_signal(signal.SIGTERM)
        for name in workers:
            try:
                self.wait_exit(name, timeout=20)
            except subprocess.TimeoutExpired:
                pass  # killed
        for name in list(self.processes):
            self.stop(name, timeout=20)
        self.client.close()

    # ------------------------------------------------------------ observation

    def ctl(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run the real ``yadtqctl`` against this cluster's socket."""
        return subprocess.run([sys.executable, "-m", "yadtqd.ctl.main", "--socket", self.socket, *args],
                              capture_output=True, text=True, timeout=timeout)

    def epochs(self, worker_id: str, live: bool = False) -> set[str]:
        """The epochs of a worker id the server knows (only live ones, if ``live``)."""
        try:
            workers = self.client.workers()
        except Exception:  # the server may not run (yet)
            return set()
        return {w["epoch"] for w in workers
                if w["worker"] == worker_id and (w["state"] == "live" or not live)}

    def live_workers(self) -> set[str]:
        """Worker ids the server counts live."""
        return {w["worker"] for w in self.client.workers() if w["state"] == "live"}

    def wait_for(self, condition: Callable[[], Any], what: str, timeout: float = WAIT,
                 alive: subprocess.Popen[bytes] | None = None) -> Any:
        """Poll ``condition`` until it is truthy; fail naming ``what`` after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = condition()
            except Exception:  # the server may not answer yet
                value = None
            if value:
                return value
            if alive is not None and alive.poll() is not None:
                raise AssertionError(f"process exited with {alive.returncode} while waiting for"
                                     f" {what}\n{self.logs_tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}\n{self.logs_tail()}")
            time.sleep(0.05)

    def wait_terminal(self, ids: list[str], timeout: float = 120.0) -> dict[str, dict[str, Any]]:
        """Wait until every task is terminal; return their statuses. A task still not
        terminal fails the test with its trail in every log and the logs' tails."""
        for task_id in ids:
            try:
                self.client.result(task_id, wait=timeout)
            except WaitTimeout as exc:
                raise AssertionError(f"{exc}\n{self.trail(task_id)}\n{self.logs_tail()}") from None
        return self.status(ids)

    def trail(self, task_id: str) -> str:
        """Every log line that names a task, process by process."""
        parts = []
        for path in sorted(self.dir.glob("*.log")):
            lines = [line for line in path.read_text(errors="replace").splitlines() if task_id in line]
            parts.append(f"----- {path.name}, lines naming {task_id}\n" + "\n".join(lines))
        return "\n".join(parts)

    def status(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        """Statuses of many tasks, in chunks."""
        out: dict[str, dict[str, Any]] = {}
        for i in range(0, len(ids), 500):
            out.update(self.client.status(*ids[i:i + 500]))
        return out

    def log(self, name: str) -> str:
        """A process's log so far."""
        path = self.dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def logs_tail(self, lines: int = 40) -> str:
        """The last lines of every process log, for a failing test's report. librdkafka's own
        lines are left out: during an outage they repeat each second for every client and
        would fill the tail, hiding what the daemon itself said."""
        parts = []
        for path in sorted(self.dir.glob("*.log")):
            own = [line for line in path.read_text(errors="replace").splitlines()
                   if not _LIBRDKAFKA_LINE.search(line)]
            parts.append(f"----- {path.name}, without librdkafka's lines\n" + "\n".join(own[-lines:]))
        return "\n".join(parts)


def read_topic(bootstrap: str, topic: str) -> list[tuple[bytes | None, bytes | None]]:
    """Every committed record of a topic, in each partition's order: (key, value)."""
    return [(key, value) for _, key, value in read_partitions(bootstrap, topic)]


def read_partitions(bootstrap: str, topic: str) -> list[tuple[int, bytes | None, bytes | None]]:
    """Every committed record of a topic, in each partition's order: (partition, key, value)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "test-read",
                         "isolation.level": "read_committed", "enable.partition.eof": True,
                         "enable.auto.commit": False})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        records, ended = [], set()
        while len(ended) < len(partitions):
            msg = consumer.poll(10)
            assert msg is not None, f"{topic} was not read to its end"
            if msg.error() is not None:
                ended.add(msg.partition())
            else:
                records.append((msg.partition(), msg.key(), msg.value()))
        return records
    finally:
        consumer.close()
