"""``yadtqctl monitor``: a full-screen live view of the cluster, fed by the server's ``watch``.

It redraws on every snapshot (``--interval``, default 1 s): totals and rates, workers, tasks in
progress, queued tasks oldest first with why they wait, and the worker failure history. Long
lists are cut to the screen with a count of the rest; the terminal size is read at every frame,
so a resize takes effect at the next one. When the server goes away the view says so and
reconnects. Ctrl-C leaves it. ``--once`` prints one frame (or, with ``--json``, the snapshot).
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import Any

from tabulate import tabulate

from yadtqd.client import Client
from yadtqd.ctl import output
from yadtqd.errors import UnreachableError

ENTER, LEAVE, HOME = "\x1b[?1049h\x1b[?25l", "\x1b[?25h\x1b[?1049l", "\x1b[H\x1b[2J"


def run(client: Client, interval: float, once: bool, as_json: bool) -> int:
    """Show the monitor; returns the exit status."""
    if once:
        snap = client.snapshot()
        if as_json:
            output.emit_json(snap)
        else:
            size = shutil.get_terminal_size((120, 50))
            print(render(snap, None, size.columns, size.lines, interval))
        return 0
    sys.stdout.write(ENTER)
    try:
        _live(client, interval)
    except KeyboardInterrupt:
        pass
    finally:
        sys.stdout.write(LEAVE)
        sys.stdout.flush()
    return 0


def _live(client: Client, interval: float) -> None:
    previous: dict[str, Any] | None = None
    lost, note_until = False, 0.0
    while True:
        try:
            for snap in client.watch(interval):
                if lost:  # the note stays a few seconds, however fast frames follow (a server
                    # that just started sends one for each change as it takes over)
                    lost, note_until = False, time.monotonic() + max(3.0, 2 * interval)
                note = "reconnected to the server" if time.monotonic() < note_until else ""
                size = shutil.get_terminal_size()
                _draw(render(snap, previous, size.columns, size.lines, interval, note))
                previous = snap
        except UnreachableError as exc:
            lost = True
            size = shutil.get_terminal_size()
            _draw(_cut([f"YADTQ monitor: {exc}", f"reconnecting every {interval:g} s... (Ctrl-C quits)"],
                       size.columns, size.lines))
            time.sleep(interval)  # the retry pace of a lost connection


def _draw(frame: str) -> None:
    sys.stdout.write(HOME + frame)
    sys.stdout.flush()


def render(snap: dict[str, Any], previous: dict[str, Any] | None, width: int, height: int,
           interval: float, note: str = "") -> str:
    """One frame of the monitor, cut to ``width`` x ``height``."""
    totals = snap["totals"]
    head = [f"YADTQ monitor  {snap['at']}  refresh {interval:g} s  (Ctrl-C quits)", *([note] if note else []),
            "tasks: " + "  ".join(f"{k} {totals[k]}" for k in
                                  ("scheduled", "queued", "processing", "success", "failed",
                                   "cancelled", "submitted") if k in totals),
            "per second: " + _rates(snap, previous),
            *(output.server_lines(snap["server"]) if "server" in snap else [])]
    live = sum(w["state"] == "live" for w in snap["workers"])
    sections = [
        (f"WORKERS ({live} live)", ["worker", "state", "slots", "running", "granted", "succeeded",
                                    "failed", "last_heartbeat", "plugins"],
         [{**w, "last_heartbeat": _clock(w["last_heartbeat"]),
           "plugins": ",".join(sorted({t["plugin"] for t in w["tasks"].values()}))}
          for w in snap["workers"]], len(snap["workers"])),
        (f"IN PROGRESS ({snap['running']['count']})", ["task-id", "task", "worker", "attempt",
                                                       "started_at", "elapsed"],
         [{**t, "started_at": _clock(t["started_at"]), "elapsed": f"{t['elapsed']:.1f}s"}
          for t in snap["running"]["tasks"]], snap["running"]["count"]),
        (f"QUEUED ({snap['queued']['count']}, oldest first)", ["task-id", "task", "age", "waiting"],
         [{**t, "age": f"{t['age']:.1f}s"} for t in snap["queued"]["tasks"]], snap["queued"]["count"]),
        (f"WORKER FAILURES ({snap['failures']['count']})", ["worker", "last_heartbeat", "detected_at",
                                                            "reason", "requeued"],
         [{**f, "last_heartbeat": _clock(f["last_heartbeat"]), "detected_at": _clock(f["detected_at"]),
           "requeued": f.get("requeued_count", len(f["requeued"]))}  # no count before schema 12
          for f in snap["failures"]["items"]], snap["failures"]["count"]),
    ]
    budget = max(3, (height - len(head) - 1) // len(sections) - 3)
    lines = head[:]
    for title, columns, rows, total in sections:
        lines += ["", title]
        shown = rows[:budget] if len(rows) <= budget and total <= budget else rows[:budget - 1]
        if shown:
            lines += tabulate([[output.cell(r.get(c)) for c in columns] for r in shown],
                              headers=columns, tablefmt="plain").splitlines()
        else:
            lines.append("  (none)")
        if total > len(shown):
            lines.append(f"  ... and {total - len(shown)} more")
    return _cut(lines, width, height)


def _rates(snap: dict[str, Any], previous: dict[str, Any] | None) -> str:
    if previous is None or snap["ts"] <= previous["ts"]:
        return "(after the next refresh)"
    span = snap["ts"] - previous["ts"]
    now, before = snap["totals"], previous["totals"]
    return "  ".join(f"{name} {(now[key] - before[key]) / span:.1f}" for name, key in
                     (("submitted", "submitted"), ("succeeded", "success"), ("failed", "failed")))


def _clock(iso: str | None) -> str:
    return iso[11:23] if iso else ""


def _cut(lines: list[str], width: int, height: int) -> str:
    return "\n".join(line[:width] for line in lines[:max(1, height - 1)])
