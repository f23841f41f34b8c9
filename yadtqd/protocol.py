"""The query protocol on the server's Unix socket (DESIGN section 7).

Requests and replies are JSON objects, one per line (UTF-8, ``\\n``-terminated). A request
names its operation in ``op``; a connection may carry many requests in turn. Replies are
``{"ok": true, ...}`` or ``{"ok": false, "error": {"code": ..., "message": ...}}``. A request
that is not JSON, too long, or of the wrong shape gets an error reply and the connection is
closed; the server is not disturbed.

Operations, with examples::

    {"op": "submit", "task": {"task-id": "t1", "task": "add", "args": [1, 2]}}
      -> {"ok": true, "task-id": "t1", "status": "queued", "created": true}
         (a name no live worker provides is refused, code "unroutable", unless the request
          says "queue_anyway": true)
    {"op": "status", "ids": ["t1", "nope"]}
      -> {"ok": true, "tasks": {"t1": {"status": "success", "result": 3, ...},
                                 "nope": {"status": "unknown", "result": null}}}
    {"op": "result", "id": "t1", "wait": 10}
      -> {"ok": true, "task-id": "t1", "task": {"status": "success", "result": 3, ...}}
         (with "wait", replies once the task is terminal or the wait ran out;
          "timed_out": true then)
    {"op": "tasks", "status": ["queued"], "limit": 100}    -> {"ok": true, "tasks": [...]}
    {"op": "workers"}                                       -> {"ok": true, "workers": [...]}
    {"op": "failures", "limit": 100}                        -> {"ok": true, "failures": [...]}
    {"op": "stats"}                                         -> {"ok": true, "stats": {...}}
    {"op": "plugins"}                                       -> {"ok": true, "tasks": {...}}
    {"op": "snapshot", "limit": 50}                         -> {"ok": true, "snapshot": {...}}
    {"op": "watch", "interval": 1.0, "limit": 50}
      -> a snapshot reply every interval seconds, until the client closes the connection

A snapshot has ``ts``, ``at``, ``totals`` (per status, and ``submitted``), ``queued`` and
``running`` (``count`` and the oldest ``tasks``), ``workers``, ``failures`` (``count`` and the
newest ``items``), ``counters`` and ``server`` (as in ``stats``).

``stats`` has ``server``: this server's ``name``, ``role`` (``active`` or ``standby``), ``lag``
(changelog records not yet applied; -1 unknown) and ``lag_seconds``; ``standbys`` (on the
active: each standby heard from in the last 5 s, with its lag); ``active`` (the active server's
name, host, pid, term and since when; null when none is) and ``last_takeover`` (``at``, the
``server`` that took over, ``from`` whom, ``why`` the previous term ended, and how long it
``took``, in seconds).

Error codes: ``bad_request`` (not JSON, not an object, wrong fields), ``too_large`` (line over
the limit), ``unknown_op``, ``bad_task`` (a submit whose task is malformed), ``unroutable`` (no
live worker provides the task's name), ``conflict`` (the
id was submitted before with another payload), ``unavailable`` (Kafka did not accept the
task in time; it is recorded and will run), ``busy`` (the server serves its most connections
already; sent right after connecting, then the connection is closed), ``internal``. ``limit``
is at most 10,000; a connection idle (no request) for ``[server] idle_timeout`` is closed.
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
from collections.abc import Sequence
from typing import Any

from yadtqd import messages as m

VISIBLE_STATUS = {"scheduled": "scheduled", "queued": "queued", "assigned": "queued",
                  "processing": "processing", "success": "success", "failed": "failed",
                  "cancelled": "cancelled"}
#: The statuses a task never leaves.
TERMINAL = ("success", "failed", "cancelled")


def error(code: str, message: str) -> dict[str, Any]:
    """An error reply."""
    return {"ok": False, "error": {"code": code, "message": message}}


def encode(obj: dict[str, Any]) -> bytes:
    """One protocol line."""
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode() + b"\n"


def iso(ts: float | None) -> str | None:
    """A stored timestamp as ISO 8601 in UTC."""
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(timespec="milliseconds")


def task_view(row: sqlite3.Row | None, reason: str | None = None,
              purged_at: float | None = None) -> dict[str, Any]:
    """A task in the result-backend shape: ``{"status": ..., "result": ..., ...}``; an id
    deleted by retention or a purge is ``unknown`` with ``purged`` (and when), while that is
    remembered."""
    if row is None:
        if purged_at is not None:
            return {"status": "unknown", "result": None, "purged": True, "purged_at": iso(purged_at)}
        return {"status": "unknown", "result": None}
    view: dict[str, Any] = {
        "status": VISIBLE_STATUS[row["status"]],
        "result": json.loads(row["result"]) if row["result"] is not None else None,
        "task": row["name"],
        "worker": row["worker"],
        "attempt": row["attempt"],
        "submitted_at": iso(row["submitted_at"]),
        "started_at": iso(row["started_at"]),
        "finished_at": iso(row["finished_at"]),
    }
    if row["priority"]:
        view["priority"] = row["priority"]
    if row["status"] == "scheduled":
        view["due_at"] = iso(row["run_after"])
    if row["cancel_requested"] is not None and row["status"] in ("assigned", "processing"):
        view["cancelling"] = True  # the worker holding it is stopping it
    if row["then_task"] is not None:
        view["then"] = m.follow_up_id(row["id"])  # queued once this task succeeds
    if row["parent"] is not None:
        view["parent"] = row["parent"]
    if row["history"]:
        view["history"] = [{**h, "started_at": iso(h.get("started_at")),
                            "finished_at": iso(h.get("finished_at")),
                            "retried_at": iso(h.get("retried_at"))} for h in json.loads(row["history"])]
    if row["error"] is not None:
        view["error"] = json.loads(row["error"])
    if reason:
        view["waiting"] = reason
    return view


def servers_view(terms: Sequence[sqlite3.Row]) -> dict[str, Any]:
    """Which server is active and how the last takeover went, from the newest two terms
    (newest first; DESIGN 13)."""
    if not terms:
        return {"active": None, "last_takeover": None}
    term, previous = terms[0], (terms[1] if len(terms) > 1 else None)
    active = None if term["ended_at"] is not None else {
        "server": term["server"], "host": term["host"], "pid": term["pid"], "term": term["term"],
        "since": iso(term["started_at"])}
    takeover = {"at": iso(term["started_at"]), "server": term["server"], "term": term["term"],
                "took": term["took"], "from": previous["server"] if previous else None,
                "why": (previous["ended"] or "") if previous else "the first active server"}
    return {"active": active, "last_takeover": takeover}


def worker_view(row: sqlite3.Row, holding: dict[str, int] | None = None) -> dict[str, Any]:
    """A worker epoch as the ``workers`` operation shows it. Every figure comes from the store:
    ``running`` its tasks in ``processing``, ``granted`` those granted and waiting in it (both
    0 once it is dead or gone), ``succeeded`` and ``failed`` the outcomes recorded from it
    (every failed attempt, retried or not), ``executed`` their sum; ``dispatch_partition`` the
    partition of ``dispatch`` it reads (the server places a new worker on one fewer read)."""
    holding = holding or {}
    return {
        "worker": row["worker"], "epoch": row["epoch"], "state": row["state"],
        "host": row["host"], "pid": row["pid"], "slots": row["slots"],
        "running": holding.get("processing", 0), "granted": holding.get("assigned", 0),
        "succeeded": row["succeeded"], "failed": row["failed_runs"],
        "executed": row["succeeded"] + row["failed_runs"],
        "undelivered": row["undelivered"], "dispatch_partition": row["dispatch_partition"],
        "joined_at": iso(row["joined_at"]), "last_heartbeat": iso(row["last_heartbeat"]),
        "left_at": iso(row["left_at"]), "tasks": json.loads(row["tasks"]), "version": row["version"],
    }


def failure_view(row: sqlite3.Row) -> dict[str, Any]:
    """A worker failure as the ``failures`` operation shows it: ``requeued`` lists the first
    500 tasks it re-queued (the started ones first), ``requeued_count`` counts them all."""
    listed = json.loads(row["requeued"])
    return {
        "worker": row["worker"], "epoch": row["epoch"], "host": row["host"],
        "last_heartbeat": iso(row["last_heartbeat"]), "detected_at": iso(row["detected_at"]),
        "reason": row["reason"], "requeued": listed,
        "requeued_count": len(listed) if row["requeued_count"] is None else row["requeued_count"],
    }
