"""The operations of the socket protocol (:mod:`yadtqd.protocol`), run by the socket's threads.

Reads use the calling connection's own read-only store (WAL lets them run beside the writer).
A socket ``submit`` records the task as ``queued`` first, then produces it to ``tasks`` and
replies only once Kafka accepted it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import msgspec
from confluent_kafka import Producer

from yadtqd import messages as m
from yadtqd import protocol, transport
from yadtqd.limits import Limit
from yadtqd.schedules import Schedule
from yadtqd.store import Store

log = logging.getLogger("yadtqd.server")
Reply = dict[str, Any]
MAX_WAIT = 3600.0
WAITING_FOR_SLOT = "waiting for a free slot"
#: Seconds a cancel or retry waits to see its outcome in the store before it answers.
ORDER_WAIT = 5.0
#: The most rows one request may ask for.
MAX_LIMIT = 10_000
#: Seconds a socket submit waits for Kafka's acknowledgement: well inside a client's own
#: timeout (30 s by default), so the client hears "unavailable, recorded" rather than nothing.
KAFKA_WAIT = 10.0


class Changes:
    """A condition the main loop signals after every commit, for ``result`` waits."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.version = 0

    def signal(self) -> None:
        """Something was committed."""
        with self._cond:
            self.version += 1
            self._cond.notify_all()

    def wait(self, seen: int, timeout: float) -> int:
        """Wait until the version moves past ``seen`` or the timeout ends; return it."""
        with self._cond:
            self._cond.wait_for(lambda: self.version != seen, timeout)
            return self.version


class Submitter:
    """The write path of socket submits: one write connection and one producer."""

    def __init__(self, db_path: str, producer: Producer, topic: str, timeout: float = KAFKA_WAIT,
                 on_recorded: Callable[[], None] = lambda: None) -> None:
        self.store = Store(db_path)
        self.store.capture()  # the main loop's next transaction sends what this one records
        self.lock = threading.Lock()
        self.producer = producer
        self.topic = topic
        self.timeout = timeout
        self.on_recorded = on_recorded
        #: True while this server is the active: it records submits; a standby forwards them.
        #: Flipped by the server under :attr:`lock`.
        self.recording = False

    def submit(self, sub: m.Submission, uid: int = -1) -> Reply:
        """Record (and tell the main loop, which may grant it at once), then produce; reply
        once Kafka accepted the task. A standby only produces: the active records the task
        when it reads it from ``tasks``."""
        with self.lock:  # the server flips `recording` under this lock too
            if not self.recording:
                intake = None
            else:
                with self.store.transaction():
                    intake = self.store.intake(sub, time.time())
        if intake is None:
            return self._forward(sub, uid)
        if intake.outcome == "conflict":
            return protocol.error("conflict", f"task id {sub.task_id!r} was submitted before with"
                                  " another payload")
        if intake.outcome == "new":
            log.info("task %s received: %s (socket, uid %d)", sub.task_id, sub.task, uid,
                     extra={"task_id": sub.task_id, "event": "task_received"})
            self.on_recorded()
            problem = transport.deliver(self.producer, self.topic, m.encode(sub), sub.task_id,
                                        self.timeout)
            if problem:
                return protocol.error("unavailable", f"Kafka did not accept task {sub.task_id}"
                                      f" within {self.timeout:g} s ({problem}); it is recorded as"
                                      " queued and will run: do not submit it again under another id")
        now = time.time()
        return {"ok": True, "task-id": sub.task_id, "status": "scheduled" if sub.due(now) > now else "queued",
                "created": intake.outcome == "new"}

    def order(self, *controls: m.Control) -> str | None:
        """Produce operator's orders to ``tasks``, each keyed like its task (so it is read after
        the task's submission), and wait for Kafka to take them all; returns the problem if it
        did not in time."""
        return transport.deliver_all(self.producer, self.topic,
                                     [(m.encode(c), c.task_id or "purge") for c in controls], self.timeout)

    def _forward(self, sub: m.Submission, uid: int) -> Reply:
        known = self.store.task_rows([sub.task_id]).get(sub.task_id)  # this replica's view
        if known is not None and known["payload"] != sub.payload():
            return protocol.error("conflict", f"task id {sub.task_id!r} was submitted before with"
                                  " another payload")
        if known is None:
            problem = transport.deliver(self.producer, self.topic, m.encode(sub), sub.task_id,
                                        self.timeout)
            if problem:
                return protocol.error("unavailable", f"Kafka did not accept task {sub.task_id}"
                                      f" within {self.timeout:g} s ({problem}); it may have been"
                                      " accepted: submit it again with the same id, never another")
            log.info("task %s forwarded to the active server: %s (socket, uid %d)", sub.task_id,
                     sub.task, uid, extra={"task_id": sub.task_id, "event": "task_forwarded"})
        return {"ok": True, "task-id": sub.task_id,
                "status": "queued" if known is None else known["status"], "created": known is None}


class Queries:
    """Runs one request against a read-only store."""

    def __init__(self, submitter: Submitter, changes: Changes, max_task_bytes: int,
                 topics: list[dict[str, Any]] | None = None,
                 role: dict[str, Any] | None = None, schedules: tuple[Schedule, ...] = (),
                 limits: tuple[Limit, ...] = ()) -> None:
        self.submitter = submitter
        #: This server's role (``active`` or ``standby``) and a standby's lag, kept by the server.
        self.role = role if role is not None else {"role": "active", "lag": 0}
        self.changes = changes
        self.max_task_bytes = max_task_bytes
        self.schedules = schedules
        self.limits = {limit.task: limit for limit in limits}
        #: The topics' replicas and min.insync.replicas as read at start (yadtqd.topics).
        self.topics = topics or []
        self.ops: dict[str, Callable[[Store, dict[str, Any]], Reply]] = {
            "submit": self.submit, "status": self.status, "result": self.result,
            "tasks": self.tasks, "workers": self.workers, "failures": self.failures,
            "stats": self.stats, "plugins": self.plugins, "snapshot": self.snapshot,
            "schedules": self.schedules_view,
        }
        self.orders: dict[str, Callable[[Store, dict[str, Any], int], Reply]] = {
            "submit": self.submit, "cancel": self.cancel, "retry": self.retry, "purge": self.purge}

    def handle(self, store: Store, request: dict[str, Any], uid: int = -1) -> Reply:
        """Run one request from the user ``uid`` (the socket's peer; -1 unknown)."""
        op = request.get("op")
        order = self.orders.get(op) if isinstance(op, str) else None
        handler = self.ops.get(op) if isinstance(op, str) else None
        if handler is None and order is None:
            return protocol.error("unknown_op", f"unknown op {op!r}; known:"
                                  f" {', '.join(sorted({*self.ops, *self.orders}))}")
        log.debug("socket request %s from uid %d", op, uid)
        try:
            if order is not None:  # who asked is logged with what they ordered
                return order(store, request, uid)
            assert handler is not None
            return handler(store, request)
        except _BadRequest as exc:
            return protocol.error("bad_request", str(exc))

    def submit(self, store: Store, req: dict[str, Any], uid: int = -1) -> Reply:
        raw = json.dumps(req.get("task")).encode()
        if len(raw) > self.max_task_bytes:
            return protocol.error("too_large", f"task of {len(raw)} bytes is over the limit of"
                                  f" {self.max_task_bytes} bytes")
        try:
            sub = msgspec.convert(req.get("task"), m.Submission)
        except msgspec.ValidationError as exc:
            return protocol.error("bad_task", f"invalid task: {exc}")
        if not req.get("queue_anyway") and not store.task_rows([sub.task_id]):
            provided = _provided(store)  # (a known id: intake says duplicate or conflict)
            if sub.task not in provided:
                return protocol.error("unroutable", (
                    f"no live worker provides task {sub.task!r} (provided: "
                    f"{', '.join(sorted(provided)) or 'none'}); to queue it for a worker that will"
                    " provide it, submit with --queue-anyway (queue_anyway)"))
        at = time.time() if sub.submitted_at is None else sub.submitted_at
        sub = msgspec.structs.replace(sub, submitted_at=at, via="socket")
        return self.submitter.submit(sub, uid)

    def cancel(self, store: Store, req: dict[str, Any], uid: int = -1) -> Reply:
        """Cancel tasks: an order on ``tasks`` per id, then each one's outcome as the store
        shows it within :data:`ORDER_WAIT` (``requested`` if not yet)."""
        return self._order_each(store, "cancel", _strings(req, "ids"), uid, _cancel_outcome)

    def retry(self, store: Store, req: dict[str, Any], uid: int = -1) -> Reply:
        """Retry failed or cancelled tasks as new attempts, their history kept."""
        return self._order_each(store, "retry", _strings(req, "ids"), uid, _retry_outcome)

    def purge(self, store: Store, req: dict[str, Any], uid: int = -1) -> Reply:
        """Order the deletion of tasks that ended more than ``older_than`` seconds ago (in
        ``status``, all terminal ones by default); worked through in batches by the active."""
        older_than = _number(req, "older_than", -1.0)
        if older_than < 0:
            raise _BadRequest("'older_than' must be a number of seconds, at least 0")
        statuses = _strings(req, "status", required=False)
        wrong = [s for s in statuses if s not in protocol.TERMINAL]
        if wrong:
            raise _BadRequest(f"a purge takes terminal statuses ({', '.join(protocol.TERMINAL)}),"
                              f" not {', '.join(wrong)}")
        now = time.time()
        order = m.Control(op="purge", older_than=older_than, statuses=statuses, ts=now, uid=uid)  # type: ignore[arg-type]
        problem = self.submitter.order(order)
        if problem:
            return protocol.error("unavailable", f"Kafka did not accept the purge: {problem}")
        return {"ok": True, "ordered": True, "before": protocol.iso(now - older_than),
                "matching": store.count_ended(statuses or protocol.TERMINAL, now - older_than)}

    def _order_each(self, store: Store, op: str, ids: list[str], uid: int,
                    outcome: Callable[[Any, Any], str]) -> Reply:
        before = store.task_rows(ids)
        now = time.time()
        problem = self.submitter.order(*[  # a retry names the attempt it retries: asked twice, done once
            m.Control(op=op, task_id=i, ts=now, uid=uid,  # type: ignore[arg-type]
                      attempt=before[i]["attempt"] if op == "retry" and i in before else None)
            for i in ids])
        if problem:
            return protocol.error("unavailable", f"Kafka did not accept the {op} orders: {problem};"
                                  " asking again is safe")
        deadline = time.monotonic() + ORDER_WAIT
        seen = self.changes.version
        while True:
            rows = store.task_rows(ids)
            found = {i: outcome(before.get(i), rows.get(i)) for i in ids}
            left = deadline - time.monotonic()
            if left <= 0 or "requested" not in found.values():
                break
            seen = self.changes.wait(seen, min(left, 1.0))
        return {"ok": True, "tasks": {i: {"outcome": "unknown" if rows.get(i) is None else o,
                                          **protocol.task_view(rows.get(i))} for i, o in found.items()}}

    def status(self, store: Store, req: dict[str, Any]) -> Reply:
        ids = _strings(req, "ids")
        rows = store.task_rows(ids)
        provided = _provided(store)
        now = time.time()
        purged = store.purged([i for i in ids if i not in rows])
        return {"ok": True, "tasks": {i: protocol.task_view(rows.get(i), self._why(store, rows.get(i), provided, now),
                                                            purged.get(i))
                                      for i in ids}}

    def result(self, store: Store, req: dict[str, Any]) -> Reply:
        task_id = req.get("id")
        if not isinstance(task_id, str):
            raise _BadRequest("'id' must be a string")
        wait = _number(req, "wait", 0.0)
        deadline = time.monotonic() + min(wait, MAX_WAIT)
        seen = self.changes.version
        while True:
            row = store.task_rows([task_id]).get(task_id)
            terminal = row is not None and row["status"] in protocol.TERMINAL
            left = deadline - time.monotonic()
            if terminal or left <= 0:
                queued = row is not None and row["status"] == "queued"
                provided = _provided(store) if queued else set()  # only a queued task's wait names them
                view = protocol.task_view(row, self._why(store, row, provided, time.time()))
                return {"ok": True, "task-id": task_id, "task": view,
                        "timed_out": not terminal and wait > 0}
            seen = self.changes.wait(seen, min(left, 1.0))

    def tasks(self, store: Store, req: dict[str, Any]) -> Reply:
        statuses = _strings(req, "status", required=False)
        wanted = [s for st in statuses for s in (("queued", "assigned") if st == "queued" else (st,))]
        limit = _limit(req, 100)
        provided = _provided(store)
        now = time.time()
        rows = store.list_tasks(wanted, limit)
        return {"ok": True, "tasks": [{"task-id": r["id"], **protocol.task_view(r, self._why(store, r, provided, now))}
                                      for r in rows]}

    def workers(self, store: Store, req: dict[str, Any]) -> Reply:
        holding = store.holding()
        return {"ok": True, "workers": [protocol.worker_view(r, holding.get(r["epoch"]))
                                        for r in store.all_workers()]}

    def failures(self, store: Store, req: dict[str, Any]) -> Reply:
        limit = _limit(req, 100)
        return {"ok": True, "failures": [protocol.failure_view(r) for r in store.failure_rows(limit)]}

    def stats(self, store: Store, req: dict[str, Any]) -> Reply:
        counts = store.counts()
        visible: dict[str, int] = {}
        for status, n in counts.items():
            key = protocol.VISIBLE_STATUS[status]
            visible[key] = visible.get(key, 0) + n
        live = [r for r in store.live_workers() if r["state"] == "live"]
        counters = store.counter_values()
        undelivered = counters.get("undelivered", 0) + sum(r["undelivered"] for r in live)
        return {"ok": True, "stats": {"tasks": visible, "workers_live": len(live),
                                      "slots": sum(r["slots"] for r in live),
                                      "counters": counters, "undelivered": undelivered,
                                      "topics": self.topics, "server": self.server(store),
                                      "warnings": [t["warning"] for t in self.topics if t["warning"]]}}

    def _why(self, store: Store, row: Any, provided: set[str], now: float) -> str | None:
        """Why a task waits (:func:`_waiting`), with the global limit that holds it, if one
        does."""
        reason = _waiting(row, provided, now)
        limit = self.limits.get(row["name"]) if reason == WAITING_FOR_SLOT else None
        if limit is None:
            return reason
        running = store.running_count(row["name"], row["limit_key"])
        key = f" for key {row['limit_key']!r}" if row["limit_key"] is not None else ""
        if limit.concurrency is not None and running >= limit.concurrency:
            return f"global limit of {row['name']!r}{key}: {limit.describe()}; {running} granted"
        return f"waiting for a free slot, or for the global limit of {row['name']!r}{key}: {limit.describe()}"

    def schedules_view(self, store: Store, req: dict[str, Any]) -> Reply:
        """The configured schedules, each with its last tick fired, the tasks it made and its
        next tick."""
        ticks = store.schedule_ticks()
        now = time.time()
        out = []
        for s in self.schedules:
            last, fired = ticks.get(s.name, (None, 0))
            out.append({"name": s.name, "task": s.task, "args": list(s.args), "cron": s.cron,
                        "missed": s.missed, "last_tick": protocol.iso(last), "fired": fired,
                        "next_tick": protocol.iso(s.next_after(max(now, last or now)))})
        return {"ok": True, "schedules": out}

    def plugins(self, store: Store, req: dict[str, Any]) -> Reply:
        tasks: dict[str, list[dict[str, str]]] = {}
        for row in store.live_workers():
            for name, info in json.loads(row["tasks"]).items():
                tasks.setdefault(name, []).append({"worker": row["worker"], **info})
        return {"ok": True, "tasks": tasks}


    def snapshot(self, store: Store, req: dict[str, Any]) -> Reply:
        """Everything the live monitor shows, read from the store in one go."""
        limit = _limit(req, 50)
        now = time.time()
        provided = _provided(store)
        counts = store.counts()
        totals = {s: 0 for s in dict.fromkeys(protocol.VISIBLE_STATUS.values())}
        for status, n in counts.items():
            totals[protocol.VISIBLE_STATUS[status]] += n
        holding = store.holding()
        queued = store.list_tasks(["queued", "assigned"], limit, oldest_first=True)
        running = store.list_tasks(["processing"], limit, oldest_first=True)
        snap = {
            "ts": now, "at": protocol.iso(now),
            "totals": {**totals, "submitted": sum(counts.values())},
            "queued": {"count": totals["queued"], "tasks": [
                {"task-id": r["id"], "task": r["name"], "age": round(now - r["submitted_at"], 3),
                 "waiting": self._why(store, r, provided, now)} for r in queued]},
            "running": {"count": totals["processing"], "tasks": [
                {"task-id": r["id"], "task": r["name"], "worker": r["worker"], "attempt": r["attempt"],
                 "started_at": protocol.iso(r["started_at"]),
                 "elapsed": round(now - (r["started_at"] or now), 3)} for r in running]},
            "workers": [protocol.worker_view(r, holding.get(r["epoch"])) for r in store.all_workers(limit)],
            "failures": {"count": store.failure_count(),
                         "items": [protocol.failure_view(r) for r in store.failure_rows(limit)]},
            "counters": store.counter_values(),
            "server": self.server(store),
        }
        return {"ok": True, "snapshot": snap}

    def server(self, store: Store) -> dict[str, Any]:
        """This server's role and lag, the standbys the active heard from, which server is
        active and how the last takeover went (DESIGN 13)."""
        return {**self.role, **protocol.servers_view(store.last_terms(2))}

    def watch(self, store: Store, req: dict[str, Any], send: Callable[[Reply], None]) -> None:
        """Send a snapshot every ``interval`` seconds until the client goes away."""
        try:
            interval = max(0.1, _number(req, "interval", 1.0))
            _limit(req, 50)
        except _BadRequest as exc:
            send(protocol.error("bad_request", str(exc)))
            return
        while True:
            send(self.snapshot(store, req))
            time.sleep(interval)  # the refresh rate the client asked for


class _BadRequest(Exception):
    pass


def _strings(req: dict[str, Any], key: str, required: bool = True) -> list[str]:
    value = req.get(key)
    if value is None and not required:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _BadRequest(f"{key!r} must be a list of strings")
    return value


def _number(req: dict[str, Any], key: str, default: float) -> float:
    value = req.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise _BadRequest(f"{key!r} must be a number >= 0")
    return float(value)


def _limit(req: dict[str, Any], default: int) -> int:
    value = _number(req, "limit", default)
    if value > MAX_LIMIT:
        raise _BadRequest(f"'limit' must be at most {MAX_LIMIT}, got {value:g}")
    return int(value)


def _provided(store: Store) -> set[str]:
    return {name for row in store.live_workers() if row["state"] == "live"
            for name in json.loads(row["tasks"])}


def _waiting(row: Any, provided: set[str], now: float) -> str | None:
    """Why a queued task waits, in words for the operator."""
    if row is not None and row["status"] == "assigned":
        return f"granted to {row['worker']}; starts when one of its slots is free"
    if row is not None and row["status"] == "scheduled":
        return f"scheduled: due in {max(0.0, row['run_after'] - now):.1f} s"
    if row is None or row["status"] != "queued":
        return None
    if row["name"] not in provided:
        return f"no live worker provides task {row['name']!r}"
    if row["run_after"] > now:
        return f"retry after a failure, in {row['run_after'] - now:.1f} s"
    return WAITING_FOR_SLOT


def _cancel_outcome(before: Any, row: Any) -> str:
    """What came of a cancel, as the store shows it: ``cancelled``, ``cancelling`` (the worker
    holding it is stopping it), ``ended`` (it ended first and keeps its outcome), or
    ``requested`` (not applied yet)."""
    if row is None:
        return "requested"
    if row["status"] == "cancelled":
        return "cancelled"
    if row["status"] in ("success", "failed"):
        return "ended"
    if row["cancel_requested"] is not None:
        return "cancelling"
    return "requested"


def _retry_outcome(before: Any, row: Any) -> str:
    """What came of a retry: ``retried`` (a new attempt is queued), ``succeeded`` or
    ``not_ended`` (nothing to retry), or ``requested`` (not applied yet)."""
    if row is None:
        return "requested"
    runs = len(json.loads(row["history"] or "[]"))
    if before is not None and runs > len(json.loads(before["history"] or "[]")):
        return "retried"
    if row["status"] == "success":
        return "succeeded"
    if row["status"] in ("failed", "cancelled"):
        return "requested"
    return "not_ended"
