"""The project's topics on the broker: created with safe defaults, checked at start.

Defaults that are safe on a production cluster (DESIGN section 2, and the operations manual):
a topic the server creates gets the broker's ``default.replication.factor`` (a CreateTopics
request with replication factor -1, KIP-464), like Kafka's own tools, and where that gives it
three or more replicas, ``min.insync.replicas`` 2: an acknowledged message then lives on two
brokers, so losing one broker loses nothing. Every topic of ours can lose work (a lost
submission, ``run`` or ``finished`` leaves a task that never ends), so every one gets it. An
explicit ``[server] replication`` or ``min_insync_replicas`` still wins.

At start the server reads what the topics really have and warns, naming the topic, when a
cluster of three or more brokers keeps one with fewer than three replicas or with
``min.insync.replicas`` 1 (:func:`health`; ``yadtqctl stats`` shows the same).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    ResourceType,
)
from confluent_kafka.cimpl import NewTopic

from yadtqd.changelog import record_bytes
from yadtqd.config import Config
from yadtqd.errors import ConfigError, UnreachableError
from yadtqd.messages import ENVELOPE_BYTES

log = logging.getLogger("yadtqd.kafka")

TOPICS = ("tasks", "dispatch", "events", "changelog", "leader")
#: Topics of one partition: the changelog (one writer, one order) and the election's topic.
SINGLE = ("changelog", "leader")
#: The election's topic keeps the standbys' reports (one a second each) for a minute.
LEADER = (("retention.ms", "60000"), ("segment.ms", "60000"))
#: Replicas from which a topic gets ``min.insync.replicas`` 2 by default.
SAFE_REPLICAS = 3


@dataclass(frozen=True)
class TopicSpec:
    """A topic the server makes sure exists: ``replication`` -1 means the broker's default,
    ``min_insync`` 0 means 2 where the topic gets three or more replicas."""

    name: str
    partitions: int
    replication: int = -1
    min_insync: int = 0
    #: Further topic settings, e.g. the changelog's compaction.
    settings: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class TopicHealth:
    """What a topic really has on the broker, and the warning it deserves, if any."""

    topic: str
    replicas: int
    min_insync: int
    brokers: int
    warning: str = ""

    def view(self) -> dict[str, object]:
        """As ``stats`` shows it."""
        return asdict(self)


def topic_specs(config: Config) -> list[TopicSpec]:
    """The project's topics with the partition count and replication from the config; the
    changelog compacted, taking a whole task row (:func:`yadtqd.changelog.record_bytes`), and
    of one partition: one writer, and every change in one order (DESIGN 13 keys its records so
    that a later split by ``tasks`` partition stays possible)."""
    changelog = (("cleanup.policy", "compact"), ("max.message.bytes", str(record_bytes(config))))
    settings = {"changelog": changelog, "leader": LEADER}
    return [TopicSpec(config.topic(t), 1 if t in SINGLE else config.server.partitions,
                      config.server.replication or -1, config.server.min_insync_replicas,
                      settings.get(t, ()))
            for t in TOPICS]


def ensure_topics(admin: AdminClient, specs: Iterable[TopicSpec], timeout: float = 30.0) -> list[str]:
    """Create the topics that are missing; an existing topic is left as it is. A topic created
    with the broker's replication that got three or more replicas then gets
    ``min.insync.replicas`` 2 (read from the topic itself: in KRaft the controller, not the
    broker asked, decides what -1 means).

    Returns the names of the topics this call created.
    """
    by_name = {s.name: s for s in specs}
    wanted = [NewTopic(s.name, s.partitions, s.replication,
                       config={**({"min.insync.replicas": str(s.min_insync)} if s.min_insync else {}),
                               **dict(s.settings)})
              for s in by_name.values()]
    futures = admin.create_topics(wanted, operation_timeout=timeout, request_timeout=timeout)
    created = []
    for name, future in futures.items():
        try:
            future.result(timeout)
            created.append(name)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise UnreachableError(f"cannot create topic {name}: {exc.args[0].str()}") from None
    for name in created:
        replicas = _replicas(admin, name, timeout)
        safe = not by_name[name].min_insync and replicas >= SAFE_REPLICAS
        if safe:
            _set(admin, name, "min.insync.replicas", "2", timeout)
        log.info("created topic %s: %d replicas%s", name, replicas,
                 ", min.insync.replicas 2" if safe else "")
    return created


def health(admin: AdminClient, names: Iterable[str], timeout: float = 30.0) -> list[TopicHealth]:
    """Each topic's replicas and ``min.insync.replicas``, with a warning where a cluster of
    three or more brokers holds it with fewer than three replicas or ``min.insync.replicas`` 1.
    Warnings are logged, naming the topic."""
    names = list(names)
    meta = admin.list_topics(timeout=timeout)
    brokers = len(meta.brokers)
    configs = _describe(admin, names, timeout)
    found = []
    for name in names:
        info = meta.topics.get(name)
        if info is None or not info.partitions:
            continue
        replicas = min(len(p.replicas) for p in info.partitions.values())
        entry = configs.get(name, {}).get("min.insync.replicas")
        min_insync = int(entry.value) if entry is not None and entry.value is not None else 1
        warning = ""
        if brokers >= SAFE_REPLICAS and replicas < SAFE_REPLICAS:
            warning = (f"topic {name} has {replicas} replica(s) on a cluster of {brokers} brokers:"
                       f" losing one broker can lose work; give it {SAFE_REPLICAS} replicas")
        elif brokers >= SAFE_REPLICAS and min_insync < 2:
            warning = (f"topic {name} has min.insync.replicas {min_insync}: an acknowledged message"
                       " may live on one broker only; set it to 2")
        if warning:
            log.warning("%s", warning, extra={"event": "topic_unsafe"})
        found.append(TopicHealth(name, replicas, min_insync, brokers, warning))
    return found


def check_message_sizes(admin: AdminClient, config: Config, timeout: float = 30.0) -> None:
    """Refuse to start (:class:`ConfigError`) when a task or result the configuration allows
    would not fit in what the broker accepts on its topic (``max.message.bytes``)."""
    wanted = {"tasks": ("server", "max_task_bytes"), "dispatch": ("server", "max_task_bytes"),
              "events": ("worker", "max_result_bytes")}
    _check_changelog(admin, config, timeout)
    try:
        found = _describe(admin, [config.topic(name) for name in wanted], timeout)
    except UnreachableError as exc:
        log.warning("cannot read the topics' max.message.bytes (%s): message sizes unchecked", exc)
        return
    for name, (section, key) in wanted.items():
        entry = found.get(config.topic(name), {}).get("max.message.bytes")
        if entry is None or entry.value is None:
            continue
        limit = int(entry.value)
        value = getattr(getattr(config, section), key)
        if value + ENVELOPE_BYTES > limit:
            raise ConfigError(
                f"{config.source}: [{section}] {key} = {value} does not fit in topic"
                f" {config.topic(name)}, whose max.message.bytes is {limit} (a message needs"
                f" {ENVELOPE_BYTES} bytes around it): use at most {limit - ENVELOPE_BYTES}, or"
                " raise the topic's max.message.bytes")


def keep_leader_short(admin: AdminClient, config: Config, timeout: float = 30.0) -> None:
    """The election's topic carries only the standbys' reports of the last seconds: give it
    :data:`LEADER`'s short retention, also when an older version made it without."""
    name = config.topic("leader")
    resource = ConfigResource(ResourceType.TOPIC, name, incremental_configs=[
        ConfigEntry(key, value, incremental_operation=AlterConfigOpType.SET) for key, value in LEADER])
    try:
        for future in admin.incremental_alter_configs([resource], request_timeout=timeout).values():
            future.result(timeout)
    except KafkaException as exc:
        log.warning("cannot set %s's retention (%s): standby reports kept as the broker's"
                    " default says", name, exc.args[0].str())


def _check_changelog(admin: AdminClient, config: Config, timeout: float) -> None:
    """A changelog made elsewhere must be compacted and take a whole task row."""
    name = config.topic("changelog")
    try:
        entries = _describe(admin, [name], timeout).get(name, {})
    except UnreachableError as exc:
        log.warning("cannot read the changelog's settings (%s): unchecked", exc)
        return
    policy = entries.get("cleanup.policy")
    if policy is not None and "compact" not in str(policy.value):
        raise ConfigError(f"topic {name} has cleanup.policy={policy.value}: the changelog must be"
                          " compacted (cleanup.policy=compact), or the store's history is deleted")
    size = entries.get("max.message.bytes")
    if size is not None and size.value is not None and int(size.value) < record_bytes(config):
        raise ConfigError(f"topic {name} has max.message.bytes={size.value}, less than a task"
                          f" row can take with these limits ({record_bytes(config)}): raise it, or"
                          " lower [server] max_task_bytes or [worker] max_result_bytes")


def _describe(admin: AdminClient, names: list[str], timeout: float) -> dict[str, dict]:  # type: ignore[type-arg]
    """The configuration entries of these topics (waits for a topic just created to be known)."""
    resources = [ConfigResource(ResourceType.TOPIC, name) for name in names]
    deadline = time.monotonic() + timeout
    while True:
        try:
            futures = admin.describe_configs(resources, request_timeout=timeout)
            return {r.name: f.result(timeout) for r, f in futures.items()}
        except KafkaException as exc:
            if time.monotonic() >= deadline:
                raise UnreachableError(f"cannot describe topics {', '.join(names)}:"
                                       f" {exc.args[0].str()}") from None
        time.sleep(0.2)  # a topic just created is not known to every broker yet


def _replicas(admin: AdminClient, name: str, timeout: float) -> int:
    """The fewest replicas any partition of the topic has (waits for a new topic's metadata)."""
    deadline = time.monotonic() + timeout
    while True:
        info = admin.list_topics(name, timeout=timeout).topics.get(name)
        if info is not None and info.error is None and info.partitions:
            return min(len(p.replicas) for p in info.partitions.values())
        if time.monotonic() >= deadline:
            raise UnreachableError(f"cannot read the replicas of topic {name}")
        time.sleep(0.2)  # a topic just created is not in every broker's metadata yet


def _set(admin: AdminClient, name: str, key: str, value: str, timeout: float) -> None:
    """Set one configuration entry of a topic."""
    entry = ConfigEntry(key, value, incremental_operation=AlterConfigOpType.SET)
    resource = ConfigResource(ResourceType.TOPIC, name, incremental_configs=[entry])
    try:
        for future in admin.incremental_alter_configs([resource], request_timeout=timeout).values():
            future.result(timeout)
    except KafkaException as exc:
        raise UnreachableError(f"cannot set {key} of topic {name}: {exc.args[0].str()}") from None
    deadline = time.monotonic() + timeout
    while _describe(admin, [name], timeout).get(name, {}).get(key, ConfigEntry(key, None)).value != value:
        if time.monotonic() >= deadline:  # every broker reads it soon; say what we set anyway
            log.warning("topic %s: %s set to %s, not yet visible everywhere", name, key, value)
            return
        time.sleep(0.2)  # the change reaching the broker that answers; there is no event
