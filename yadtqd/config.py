"""Configuration: one declarative table, loaded once and validated once (DESIGN section 10).

The section dataclasses below *are* the table: each field is a setting with its type, default
and description (``metadata["help"]``). Values come from the TOML file, then the environment
(``YADTQ_<SECTION>_<KEY>``), then command-line flags, in rising precedence. ``[kafka]`` is passed
to librdkafka unchanged, so TLS and SASL need no code here.

Every problem raises :class:`~yadtqd.errors.ConfigError` naming the key and where it came from.
``python -m yadtqd.config`` prints the settings reference generated from this table.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yadtqd.errors import ConfigError
from yadtqd.messages import ENVELOPE_BYTES, PRODUCER_DEFAULT_MAX
from yadtqd.limits import Limit, parse_limits
from yadtqd.schedules import Schedule, parse_schedules

DEFAULT_PATH = Path("/etc/yadtq/yadtq.toml")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
KafkaValue = str | int | float | bool


def _setting(default: Any, help: str, minimum: float | None = None, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, "minimum": minimum, **kw})


@dataclass(frozen=True)
class ServerConfig:
    """The ``[server]`` section."""

    database: str = _setting("/var/lib/yadtq/yadtq.db", "SQLite result backend (WAL mode).",
                             nonempty=True)
    socket: str = _setting("/run/yadtq/yadtqd.sock", "Unix socket for queries and submits.",
                           nonempty=True)
    socket_group: str = _setting(
        "", "Group of the socket (mode 0660): its members may submit and query; empty = the"
        " daemon's group. The packaged unit sets yadtq-clients."
    )
    name: str = _setting(
        "", "This server's name in stats and takeover records (DESIGN 13); empty means the host"
        " name."
    )
    heartbeat_timeout: float = _setting(
        5.0, "Seconds without a heartbeat before a worker epoch is declared dead.", 0.1
    )
    session_timeout: float = _setting(
        6.0, "Seconds an active server may go unheard before a standby takes over (Kafka's"
        " session.timeout.ms of the servers' group; the broker's group.min.session.timeout.ms,"
        " 6 s by default, is the floor).", 1.0
    )
    max_attempts: int = _setting(
        3, "Executions a task may lose to dead workers before it fails with 'worker lost'.", 1
    )
    partitions: int = _setting(3, "Partitions of each topic the server creates.", 1)
    replication: int = _setting(
        0, "Replication factor of the topics the server creates; 0 = the broker's"
        " default.replication.factor.", 0
    )
    min_insync_replicas: int = _setting(
        0, "min.insync.replicas of the topics the server creates; 0 = 2 where a topic gets 3 or"
        " more replicas, else the broker's default.", 0
    )
    max_task_bytes: int = _setting(
        512 * 1024, "Largest submission (bytes of JSON) the server accepts.", 64
    )
    max_request_bytes: int = _setting(
        1024 * 1024, "Largest socket request line (bytes) the server reads.", 64
    )
    max_connections: int = _setting(
        64, "Socket connections served at once; one more is answered 'busy' and closed.", 1
    )
    idle_timeout: float = _setting(
        30.0, "Seconds a socket connection may stay open without sending a request.", 0.1
    )
    batch_size: int = _setting(
        500, "Kafka messages each of the server's two consumers (events, tasks) hands its loop at"
        " a time; one SQLite transaction applies what both handed.", 1
    )
    unroutable_timeout: float = _setting(
        3600.0, "Seconds a task of a name no live worker provides waits before it fails;"
        " 0 = forever.", 0
    )
    keep_finished: float = _setting(
        7 * 86400.0, "Seconds a task that succeeded or was cancelled is kept after it ended; then"
        " it is deleted (its id answers 'unknown', 'purged'). 0 = forever.", 0
    )
    keep_failures: float = _setting(
        30 * 86400.0, "Seconds a failed task and a worker-failure record are kept; 0 = forever.", 0
    )

    @property
    def server_name(self) -> str:
        """The configured name, or the host name."""
        return self.name or socket.gethostname()


@dataclass(frozen=True)
class WorkerConfig:
    """The ``[worker]`` section."""

    id: str = _setting("", "Worker id; empty means the host name.")
    slots: int = _setting(0, "Concurrent executions; 0 means the CPU count.", 0)
    prefetch: int = _setting(
        -1, "Granted-but-unstarted tasks held beyond slots; -1 = adaptive: as many as the worker"
        " finishes in about 100 ms a slot (none for long tasks, up to 512 per slot, 4,096 in all, for"
        " tiny ones), while the payloads it holds stay under 8 MiB.", -1
    )
    heartbeat_interval: float = _setting(1.0, "Seconds between heartbeats.", 0.05)
    stall_timeout: float = _setting(
        30.0, "Seconds an execution process may go without answering before the worker counts"
        " itself wedged and stops its heartbeats and watchdog pings.", 1.0
    )
    stop_timeout: float = _setting(
        60.0, "Seconds a stopping worker waits for running tasks to finish.", 0
    )
    cancel_grace: float = _setting(
        10.0, "Seconds a cancelled running task has, after SIGTERM, before its process group is"
        " killed.", 0
    )
    max_result_bytes: int = _setting(
        512 * 1024, "Largest task result (bytes of JSON); larger results fail the task.", 64
    )
    plugins: tuple[str, ...] = _setting(
        (), "Plugin entry-point names to load (env: comma-separated); empty loads all installed."
    )
    max_task_memory: int = _setting(
        0, "Address space (bytes) each execution process may use (RLIMIT_AS, applied once its"
        " plugins are loaded); a task that needs more fails with MemoryError. 0 = no limit.", 0
    )

    @property
    def worker_id(self) -> str:
        """The configured id, or the host name."""
        return self.id or socket.gethostname()

    @property
    def slot_count(self) -> int:
        """The configured slots, or the CPU count."""
        return self.slots or os.cpu_count() or 1


@dataclass(frozen=True)
class LoggingConfig:
    """The ``[logging]`` section."""

    level: str = _setting("info", "Lowest priority logged.", choices=LOG_LEVELS)
    file: str = _setting("", "Also append plain log lines to this file (empty: none).")


@dataclass(frozen=True)
class Config:
    """The whole, validated configuration of one process."""

    kafka: Mapping[str, KafkaValue]
    #: Where each ``[kafka]`` key came from (``FILE: [kafka] KEY`` or ``environment: NAME``).
    kafka_sources: Mapping[str, str] = field(default_factory=dict)
    topic_prefix: str = _setting("yadtq", "Prefix of the topic names: <prefix>.tasks and so on.")
    server: ServerConfig = field(default_factory=ServerConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    #: The ``[schedules.NAME]`` tables (:mod:`yadtqd.schedules`).
    schedules: tuple[Schedule, ...] = ()
    #: The ``[limits."NAME"]`` tables (:mod:`yadtqd.limits`).
    limits: tuple[Limit, ...] = ()
    source: str = "defaults"

    def topic(self, name: str) -> str:
        """The full name of one of the project's topics (``tasks``, ``dispatch``, ``events``)."""
        return f"{self.topic_prefix}.{name}"


SECTIONS: dict[str, type] = {
    "server": ServerConfig,
    "worker": WorkerConfig,
    "logging": LoggingConfig,
}
TOP_LEVEL = ("topic_prefix",)
FLAG_KEYS = {"log_level": ("logging", "level")}


def load(
    path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Config:
    """Load the file, the environment and the flags, in rising precedence, and validate."""
    env = os.environ if env is None else env
    path, required = _find(path, env)
    raw = _read_toml(path, required)
    layered: dict[str, dict[str, tuple[Any, str]]] = {}
    _merge_file(layered, raw, str(path))
    _merge_env(layered, env)
    _merge_flags(layered, flags or {})
    return _build(layered, str(path) if raw else "defaults")


def client_socket(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> str:
    """The server socket a client uses: ``$YADTQ_SERVER_SOCKET``, else ``[server] socket`` of the
    configuration file the daemons use (``path``, else ``$YADTQ_CONFIG``, else the default file,
    skipped when unreadable), else the default socket. (A ``--socket`` flag goes before all.)

    Only that key is read, so a client needs neither the broker setting nor read access to a
    file it has no use for; a file named explicitly must be readable TOML.
    """
    env = os.environ if env is None else env
    if env.get("YADTQ_SERVER_SOCKET"):
        return env["YADTQ_SERVER_SOCKET"]
    file, required = _find(path, env)
    try:
        raw = _read_toml(file, required)
    except ConfigError:
        if required:
            raise
        raw = {}
    value = raw.get("server", {}).get("socket") if isinstance(raw.get("server"), dict) else None
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"{file}: [server] socket: expected a string, got {_type_name(value)}")
    return value or ServerConfig.socket


def _find(path: str | Path | None, env: Mapping[str, str]) -> tuple[Path, bool]:
    if path:
        return Path(path), True
    if env.get("YADTQ_CONFIG"):
        return Path(env["YADTQ_CONFIG"]), True
    return DEFAULT_PATH, False


def _read_toml(path: Path, required: bool) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        if required:
            raise ConfigError(f"{path}: config file not found") from None
        return {}
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None


def _merge_file(layered: dict[str, dict[str, tuple[Any, str]]], raw: dict[str, Any], where: str) -> None:
    for key, value in raw.items():
        if key == "kafka" or key in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: [{key}] must be a table")
            for sub, subvalue in value.items():
                layered.setdefault(key, {})[sub] = (subvalue, f"{where}: [{key}] {sub}")
        elif key in ("schedules", "limits"):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: [{key}] must hold tables: [{key}.NAME]")
            layered[key] = {"": (value, where)}
        elif key in TOP_LEVEL:
            layered.setdefault("", {})[key] = (value, f"{where}: {key}")
        else:
            raise ConfigError(f"{where}: unknown key {key!r} (known: {_known_top()})")


class _EnvText(str):
    """A value from the environment: text to parse, unlike a TOML string."""


def _merge_env(layered: dict[str, dict[str, tuple[Any, str]]], env: Mapping[str, str]) -> None:
    for name, value in env.items():
        if not name.startswith("YADTQ_"):
            continue
        rest = name[len("YADTQ_"):].lower()
        value = _EnvText(value)
        if rest == "topic_prefix":
            layered.setdefault("", {})["topic_prefix"] = (value, f"environment: {name}")
            continue
        section, _, key = rest.partition("_")
        if section == "kafka" and key:
            layered.setdefault("kafka", {})[key.replace("_", ".")] = (value, f"environment: {name}")
        elif section in SECTIONS and key:
            layered.setdefault(section, {})[key] = (value, f"environment: {name}")


def _merge_flags(layered: dict[str, dict[str, tuple[Any, str]]], flags: Mapping[str, Any]) -> None:
    for flag, value in flags.items():
        if value is None:
            continue
        section, key = FLAG_KEYS[flag]
        layered.setdefault(section, {})[key] = (value, f"flag --{flag.replace('_', '-')}")


def _build(layered: dict[str, dict[str, tuple[Any, str]]], source: str) -> Config:
    kafka = _kafka(layered.get("kafka", {}), source)
    sections = {name: _section(cls, layered.get(name, {})) for name, cls in SECTIONS.items()}
    top = {k: _coerce(Config, k, v, where) for k, (v, where) in layered.get("", {}).items()}
    sources = {key: where for key, (_, where) in layered.get("kafka", {}).items()}
    tables, where = layered.get("schedules", {}).get("", ({}, source))
    limits, limits_where = layered.get("limits", {}).get("", ({}, source))
    config = Config(kafka=kafka, kafka_sources=sources, source=source,
                    schedules=parse_schedules(tables, where), limits=parse_limits(limits, limits_where),
                    **top, **sections)
    _check_sizes(config, layered)
    return config


def _check_sizes(config: Config, layered: dict[str, dict[str, tuple[Any, str]]]) -> None:
    """A task or result must fit in one Kafka message with room around it: a limit the producer
    cannot send is a configuration error, not a task that can never be delivered."""
    raw = config.kafka.get("message.max.bytes", PRODUCER_DEFAULT_MAX)
    try:
        producer_max = int(raw)
    except ValueError:
        raise ConfigError(f"{config.source}: [kafka] \"message.max.bytes\" must be an integer,"
                          f" got {raw!r}") from None
    for section, key in (("server", "max_task_bytes"), ("worker", "max_result_bytes")):
        value = getattr(getattr(config, section), key)
        if value + ENVELOPE_BYTES > producer_max:
            where = layered.get(section, {}).get(key, (None, f"{config.source}: [{section}] {key}"))[1]
            raise ConfigError(
                f"{where}: {value} bytes do not fit in a Kafka message: the producer's"
                f" message.max.bytes is {producer_max}, and a message needs {ENVELOPE_BYTES}"
                f" bytes around the {key.split('_')[1]}; use at most"
                f" {producer_max - ENVELOPE_BYTES}, or raise [kafka] \"message.max.bytes\""
                " (and the topics' max.message.bytes)")


def _kafka(values: dict[str, tuple[Any, str]], source: str) -> dict[str, KafkaValue]:
    kafka: dict[str, KafkaValue] = {}
    for key, (value, where) in values.items():
        if not isinstance(value, (str, int, float, bool)):
            raise ConfigError(f"{where}: librdkafka settings must be strings, numbers or booleans")
        kafka[key] = str(value) if isinstance(value, _EnvText) else value
    if not kafka.get("bootstrap.servers"):
        raise ConfigError(
            f"{source}: missing required [kafka] \"bootstrap.servers\" "
            "(or the environment variable YADTQ_KAFKA_BOOTSTRAP_SERVERS)"
        )
    return kafka


def _section(cls: type, values: dict[str, tuple[Any, str]]) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, (value, where) in values.items():
        if key not in names:
            raise ConfigError(f"{where}: unknown key {key!r} (known: {', '.join(sorted(names))})")
        kwargs[key] = _coerce(cls, key, value, where)
    return cls(**kwargs)


def _coerce(cls: type, key: str, value: Any, where: str) -> Any:
    spec = {f.name: f for f in dataclasses.fields(cls)}[key]
    kind = typing.get_type_hints(cls)[key]
    converted = _convert(kind, value, where)
    if spec.metadata.get("nonempty") and converted == "":
        raise ConfigError(f"{where}: must not be empty")
    minimum = spec.metadata.get("minimum")
    if minimum is not None and converted < minimum:
        raise ConfigError(f"{where}: must be at least {minimum:g}, got {converted!r}")
    choices = spec.metadata.get("choices")
    if choices and converted not in choices:
        raise ConfigError(f"{where}: must be one of {', '.join(choices)}, got {converted!r}")
    return converted


def _convert(kind: Any, value: Any, where: str) -> Any:
    from_env = isinstance(value, _EnvText)
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {_type_name(value)}")
        return str(value)
    if kind is int:
        if from_env:
            try:
                return int(value)
            except ValueError:
                raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {_type_name(value)}")
        return value
    if kind is float:
        if from_env:
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {_type_name(value)}")
        return float(value)
    if kind == tuple[str, ...]:
        if from_env:
            return tuple(part.strip() for part in value.split(",") if part.strip())
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: expected an array of strings, got {_type_name(value)}")
        return tuple(value)
    raise AssertionError(f"unsupported setting type {kind!r}")  # pragma: no cover


def _type_name(value: Any) -> str:
    kinds = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             list: "an array", dict: "a table"}
    return next((name for kind, name in kinds.items() if isinstance(value, kind)),
                type(value).__name__)


def _known_top() -> str:
    return ", ".join(["kafka", *SECTIONS, *TOP_LEVEL])


def reference() -> str:
    """The settings reference, generated from the table, as TOML with every setting commented.
    Top-level keys come first: in TOML, a key after a ``[table]`` header belongs to that table."""
    lines = ["# YADTQ settings reference (generated by `python -m yadtqd.config`).", ""]
    kafka = ['[kafka]', '# librdkafka settings, passed through unchanged. Required:',
             '"bootstrap.servers" = "127.0.0.1:9092"', ""]
    for name, cls in {"": Config, **SECTIONS}.items():
        if name:
            lines.append(f"[{name}]")
        for f in dataclasses.fields(cls):
            if "help" not in f.metadata:
                continue
            env = f"YADTQ_{name.upper()}_{f.name.upper()}" if name else f"YADTQ_{f.name.upper()}"
            lines.append(f"# {f.metadata['help']} (env {env})")
            lines.append(f"# {f.name} = {_toml_value(f.default)}")
        lines.append("")
        if not name:
            lines += kafka
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


if __name__ == "__main__":
    print(reference())
