"""A store brought to the changelog's end when a server becomes the active (DESIGN 13).

The tail after this file's positions; or the whole changelog when the file is new, or when it
holds changes the changelog may lack (noted at start: the last turn before a crash). Those are
dropped, and what caused them is read again from ``tasks`` and ``events``, whose offsets come
from the changelog too; tasks never granted that only the file knew of (a socket submit during an
outage) are submitted again to ``tasks`` first. A file with rows the changelog lacks entirely (a
database from before it) is published, in chunks, resumed after a restart.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError

from yadtqd import transport
from yadtqd.config import Config
from yadtqd.errors import UnreachableError
from yadtqd.server.standby import RESTORE_BATCH, apply_batch, resubmit
from yadtqd.store import Store

log = logging.getLogger("yadtqd.server")


def restore(config: Config, store: Store, timeout: float = 3600.0,
            tick: Callable[[], None] = lambda: None) -> int:
    """Bring the store to the changelog's end; returns the records applied. ``tick`` is
    called after every batch (the watchdog is fed while a long changelog is read)."""
    monitor = transport.ConnectionMonitor("server-restore consumer")
    settings = transport.consumer_settings(config, "server-restore", monitor)
    settings["enable.partition.eof"] = True  # the end is where the last commit marker lies
    consumer = Consumer(settings)
    try:
        return _restore(config, store, consumer, timeout, tick)
    finally:
        consumer.close()


def _restore(config: Config, store: Store, consumer: Consumer, timeout: float,
             tick: Callable[[], None]) -> int:
    topic = config.topic("changelog")
    partitions = transport.partition_count(consumer, topic, 10.0)
    ends = {p: transport.end_offset(consumer, topic, p, 10.0) for p in range(partitions)}
    positions = store.changelog_positions()
    if store.publishing():
        log.info("%s: publishing to %s goes on", store.path, topic)
        return 0
    if store.has_pending():
        log.warning("%s: its last changes may not have reached %s (the server stopped"
                    " between the two): rebuilding it from the changelog", store.path, topic,
                    extra={"event": "store_rebuild"})
        _rebuild(config, store)
    elif not store.is_empty() and (not any(ends.values())
                                   or any(positions.get(p, 0) > ends[p] for p in ends)):
        log.warning("%s: publishing the whole database to %s, which lacks it (new, made"
                    " again, or shorter than this file has read)", store.path, topic,
                    extra={"event": "store_publish"})
        with store.transaction():
            store.note_all()
            store.set_publishing(True)
        return 0
    elif not store.is_empty() and not positions:
        log.warning("%s: holds rows but no changelog positions, and %s is not empty:"
                    " rebuilding it from the changelog", store.path, topic,
                    extra={"event": "store_rebuild"})
        _rebuild(config, store)
    positions = store.changelog_positions()
    todo = {p for p in range(partitions) if positions.get(p, 0) < ends[p]}
    if not todo:
        return 0
    transport.assign(consumer, {(topic, p): positions.get(p, OFFSET_BEGINNING)
                                for p in range(partitions)})
    applied, started = 0, time.monotonic()
    deadline = started + timeout
    while todo:
        batch = consumer.consume(RESTORE_BATCH, 0.05)  # a full batch, or what came: no idle wait
        applied += apply_batch(store, topic, batch)
        tick()
        for msg in batch:
            err, partition, offset = msg.error(), msg.partition() or 0, msg.offset() or 0
            if (err is not None and err.code() == KafkaError._PARTITION_EOF
                    or err is None and offset + 1 >= ends[partition]):
                todo.discard(partition)
        if time.monotonic() > deadline:
            raise UnreachableError(f"cannot read {topic} to its end within {timeout:g} s"
                                   f" ({applied} records applied)")
    log.info("restored %d changelog records from %s in %.1f s", applied, topic,
             time.monotonic() - started, extra={"event": "store_restored"})
    return applied


def _rebuild(config: Config, store: Store) -> None:
    """Wipe the file for a rebuild, submitting again the never-granted tasks that only it
    may know of (a socket submit during an outage, say)."""
    resubmit(config, store)
    with store.transaction():
        store.wipe()
