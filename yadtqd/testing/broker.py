"""A real Apache Kafka broker (KRaft) for development and tests: one node that is both broker
and controller, or (:class:`BrokerCluster`) a controller and several brokers on loopback, for
tests that need replication or a broker failure.

The broker's jars come from Maven Central (``mvn dependency:copy-dependencies`` on the small POM
beside this module) into a cache, ``$YADTQ_CACHE`` or ``~/.cache/yadtq``, and are fetched only
once. The broker binds 127.0.0.1 on free ports, keeps its data and log in a directory of its
own, and is stopped by its PID.

Command line::

    python -m yadtqd.testing.broker fetch             # fill the cache, nothing else
    python -m yadtqd.testing.broker start DIR         # start in DIR, print bootstrap servers
    python -m yadtqd.testing.broker stop DIR          # stop the broker started in DIR
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

KAFKA_VERSION = "4.2.2"
POM = Path(__file__).with_name("kafka-pom.xml")
READY_LINE = "Kafka Server started"

LOG4J2 = """<?xml version="1.0" encoding="UTF-8"?>
<Configuration status="warn">
  <Appenders>
    <File name="file" fileName="{log}" append="true">
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
    </File>
  </Appenders>
  <Loggers>
    <Logger name="kafka" level="info"/>
    <Logger name="org.apache.kafka" level="info"/>
    <Logger name="state.change.logger" level="warn"/>
    <Root level="info"><AppenderRef ref="file"/></Root>
  </Loggers>
</Configuration>
"""


class BrokerError(RuntimeError):
    """The broker could not be fetched or started."""


def cache_dir() -> Path:
    """Where fetched jars are kept between runs."""
    return Path(os.environ.get("YADTQ_CACHE") or Path.home() / ".cache" / "yadtq")


def fetch(version: str = KAFKA_VERSION) -> Path:
    """Return the directory of the broker's jars, fetching them from Maven Central if needed."""
    libs = cache_dir() / f"kafka-{version}" / "libs"
    if (libs / ".complete").exists():
        return libs
    libs.parent.mkdir(parents=True, exist_ok=True)
    print(f"fetching Apache Kafka {version} from Maven Central into {libs.parent} (once)...",
          file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=libs.parent) as tmp:
        shutil.copy(POM, Path(tmp) / "pom.xml")
        out = Path(tmp) / "libs"
        cmd = ["mvn", "-B", "-q", f"-Dkafka.version={version}", "dependency:copy-dependencies",
               f"-DoutputDirectory={out}", "-DincludeScope=runtime"]
        done = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
        if done.returncode != 0:
            raise BrokerError(f"fetching Kafka {version} with Maven failed:\n{done.stdout}{done.stderr}")
        (out / ".complete").touch()
        shutil.rmtree(libs, ignore_errors=True)
        out.rename(libs)
    return libs


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Broker:
    """One Kafka process with its own directory, ports and log: by default a single node that
    is broker and controller; with ``roles`` and ``quorum``, one node of a :class:`BrokerCluster`."""

    def __init__(self, directory: Path, version: str = KAFKA_VERSION, node_id: int = 1,
                 roles: str = "broker,controller", quorum: str = "", cluster_id: str = "",
                 replicas: int = 1) -> None:
        self.directory = Path(directory)
        self.version = version
        self.node_id = node_id
        self.roles = roles
        self.quorum = quorum
        self.cluster_id = cluster_id
        self.replicas = replicas
        self.port = 0
        self.controller_port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        """The ``bootstrap.servers`` value for clients."""
        return f"127.0.0.1:{self.port}"

    @property
    def controller(self) -> str:
        """The controller listener's address (nodes with the controller role)."""
        return f"127.0.0.1:{self.controller_port}"

    @property
    def log_path(self) -> Path:
        """The broker's own log file."""
        return self.directory / "broker.log"

    def start(self, timeout: float = 120.0) -> None:
        """Start the broker (formatting its storage the first time) and wait until it serves."""
        offset = self.launch()
        self.wait_ready(offset, timeout)

    def launch(self) -> int:
        """Start the process without waiting; returns where its log stood (for
        :meth:`wait_ready`)."""
        libs = fetch(self.version)
        self.directory.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port, self.controller_port = free_port(), free_port()
        props = self._write_config()
        classpath = f"{libs}/*"
        if not (self.directory / "data" / "meta.properties").exists():
            self._format(classpath, props)
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with (self.directory / "stdout.log").open("ab") as out:
            self.process = subprocess.Popen(
                ["java", "-Xms256m", "-Xmx512m", "-XX:+UseSerialGC", "-cp", classpath,
                 f"-Dlog4j2.configurationFile=file:{self.directory / 'log4j2.xml'}",
                 "kafka.Kafka", str(props)],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        self._write_state()
        return offset

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the broker by its PID: SIGTERM, then SIGKILL if it does not exit in time."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def log_tail(self, lines: int = 80, min_level: str = "") -> str:
        """The last lines of the broker's log (of ``min_level`` WARN or ERROR and above, if
        given), for a failing test's report."""
        if not self.log_path.exists():
            return "(no broker log)"
        kept = self.log_path.read_text(errors="replace").splitlines()
        if min_level:
            levels = {"WARN": (" WARN ", " ERROR ", " FATAL "), "ERROR": (" ERROR ", " FATAL ")}
            kept = [line for line in kept if any(level in line for level in levels[min_level])]
        return "\n".join(kept[-lines:]) or "(nothing at that level)"

    def _write_config(self) -> Path:
        props = self.directory / "server.properties"
        listeners = []
        if "broker" in self.roles:
            listeners.append(f"PLAINTEXT://127.0.0.1:{self.port}")
        if "controller" in self.roles:
            listeners.append(f"CONTROLLER://127.0.0.1:{self.controller_port}")
        replicas, isr = str(self.replicas), str(min(2, self.replicas))
        settings = {
            "process.roles": self.roles,
            "node.id": str(self.node_id),
            "controller.quorum.bootstrap.servers": self.quorum or self.controller,
            "listeners": ",".join(listeners),
            "advertised.listeners": ",".join(listeners),
            "controller.listener.names": "CONTROLLER",
            **({"inter.broker.listener.name": "PLAINTEXT"} if "broker" in self.roles else {}),
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(self.directory / "data"),
            "default.replication.factor": replicas,
            "offsets.topic.replication.factor": replicas,
            "transaction.state.log.replication.factor": replicas,
            "transaction.state.log.min.isr": isr,
            "share.coordinator.state.topic.replication.factor": replicas,
            "share.coordinator.state.topic.min.isr": isr,
            "group.initial.rebalance.delay.ms": "0",
            "num.network.threads": "2",
            "num.io.threads": "4",
            "num.partitions": "1",
            "auto.create.topics.enable": "false",
        }
        props.write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
        (self.directory / "log4j2.xml").write_text(LOG4J2.format(log=self.log_path))
        return props

    def _format(self, classpath: str, props: Path) -> None:
        cluster_id = self.cluster_id or random_cluster_id(classpath)
        quorum = "--no-initial-controllers" if self.roles == "broker" else "--standalone"
        done = subprocess.run(
            ["java", "-cp", classpath, "kafka.tools.StorageTool", "format", quorum, "-t", cluster_id,
             "-c", str(props)], capture_output=True, text=True,
        )
        if done.returncode != 0:
            raise BrokerError(f"formatting KRaft storage failed:\n{done.stdout}{done.stderr}")

    def wait_ready(self, offset: int, timeout: float = 120.0) -> None:
        """Wait until the process logged that it started and its port accepts connections."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BrokerError(f"broker exited with {self.process.returncode}:\n{self.log_tail()}")
            if self._log_says_ready(offset) and self._port_open():
                return
            time.sleep(0.1)  # polling a child's log file: there is no event to wait on
        self.stop()
        raise BrokerError(f"broker not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def _log_says_ready(self, offset: int) -> bool:
        if not self.log_path.exists():
            return False
        with self.log_path.open("rb") as f:
            f.seek(offset)
            return READY_LINE.encode() in f.read()

    def _port_open(self) -> bool:
        port = self.port if "broker" in self.roles else self.controller_port
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    def _write_state(self) -> None:
        assert self.process is not None
        state = {"pid": self.process.pid, "bootstrap": self.bootstrap, "port": self.port,
                 "controller_port": self.controller_port}
        (self.directory / "broker.json").write_text(json.dumps(state))


def random_cluster_id(classpath: str) -> str:
    """A new KRaft cluster id, from Kafka's own tool."""
    done = subprocess.run(["java", "-cp", classpath, "kafka.tools.StorageTool", "random-uuid"],
                          capture_output=True, text=True, check=True)
    return done.stdout.strip()


class BrokerCluster:
    """A KRaft controller and ``size`` brokers on loopback, each with its own ports, directory
    and log: topics replicate across the brokers, and a test can stop or kill any of them."""

    def __init__(self, directory: Path, size: int = 3, version: str = KAFKA_VERSION) -> None:
        self.directory = Path(directory)
        self.size = size
        self.version = version
        self.controller: Broker | None = None
        self.brokers: list[Broker] = []

    @property
    def bootstrap(self) -> str:
        """``bootstrap.servers`` naming every broker."""
        return ",".join(b.bootstrap for b in self.brokers)

    def start(self, timeout: float = 180.0) -> None:
        """Start the controller, then the brokers side by side, and wait for all of them."""
        cluster_id = random_cluster_id(f"{fetch(self.version)}/*")
        # in KRaft the controller decides what a topic created with replication -1 gets: it
        # needs the cluster's default.replication.factor too
        self.controller = Broker(self.directory / "controller", self.version, node_id=100,
                                 roles="controller", cluster_id=cluster_id, replicas=self.size)
        self.controller.wait_ready(self.controller.launch(), timeout)
        self.brokers = [Broker(self.directory / f"broker-{n}", self.version, node_id=n,
                               roles="broker", quorum=self.controller.controller,
                               cluster_id=cluster_id, replicas=self.size)
                        for n in range(1, self.size + 1)]
        offsets = [b.launch() for b in self.brokers]
        for broker, offset in zip(self.brokers, offsets):
            broker.wait_ready(offset, timeout)

    def stop(self) -> None:
        """Stop every process (brokers first)."""
        for node in [*self.brokers, *([self.controller] if self.controller else [])]:
            node.stop()

    def log_tail(self, lines: int = 40, min_level: str = "WARN") -> str:
        """The tails of every node's log."""
        nodes = [*self.brokers, *([self.controller] if self.controller else [])]
        return "\n".join(f"--- node {n.node_id}\n{n.log_tail(lines, min_level)}" for n in nodes)


def wait_gone(pid: int, seconds: float) -> bool:
    """Wait until process ``pid`` (not a child of ours: its parent reaps it) is gone, at most
    ``seconds``; whether it is."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def _stop_dir(directory: Path) -> None:
    state = json.loads((directory / "broker.json").read_text())
    try:
        os.kill(state["pid"], signal.SIGTERM)
    except ProcessLookupError:
        return
    if not wait_gone(state["pid"], 30.0):
        os.kill(state["pid"], signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    """``python -m yadtqd.testing.broker``: fetch, start or stop a development broker."""
    parser = argparse.ArgumentParser(prog="python -m yadtqd.testing.broker")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("fetch", help="fetch the broker's jars into the cache")
    start = sub.add_parser("start", help="start a broker in DIR and print its bootstrap servers")
    start.add_argument("directory", type=Path)
    stop = sub.add_parser("stop", help="stop the broker started in DIR")
    stop.add_argument("directory", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "fetch":
            print(fetch())
        elif args.command == "start":
            broker = Broker(args.directory)
            broker.start()
            print(broker.bootstrap)
        else:
            _stop_dir(args.directory)
    except BrokerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
