"""``yadtqctl``: the operator's CLI over the server's socket (DESIGN section 12).

Exit codes: 0 done; 1 the awaited task failed or was cancelled; 2 usage or bad input (an
unknown task id, a task name no live worker provides); 3 the server or broker cannot be reached; 4 not done yet (timed
out waiting, or asked without waiting about a task that is still queued or running).

The socket: ``--socket``, else ``$YADTQ_SERVER_SOCKET``, else ``[server] socket`` of the daemons'
configuration file (``--config``, else ``$YADTQ_CONFIG``, else ``/etc/yadtq/yadtq.toml``), else
``/run/yadtq/yadtqd.sock``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from yadtqd import config as configuration
from yadtqd.client import TERMINAL, Client
from yadtqd.ctl import monitor, output
from yadtqd.errors import UsageError, WaitTimeout, YadtqError

FOREVER = 10 * 365 * 86400.0


def parser() -> argparse.ArgumentParser:
    """The command line."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--socket", metavar="PATH", default=argparse.SUPPRESS,
                        help="server socket (default: $YADTQ_SERVER_SOCKET, else [server] socket"
                             " of the configuration file, else /run/yadtq/yadtqd.sock)")
    common.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS,
                        help="the daemons' configuration file, read for [server] socket (default:"
                             " $YADTQ_CONFIG, else /etc/yadtq/yadtq.toml)")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print JSON instead of tables")
    p = argparse.ArgumentParser(prog="yadtqctl", parents=[common],
                                description="Submit and inspect YADTQ tasks.",
                                epilog="Exit status: 0 done, 1 the awaited task failed or was"
                                       " cancelled, 2 usage or bad input, 3 server or broker"
                                       " unreachable, 4 timed out.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    s = sub.add_parser("submit", parents=[common], help="submit a task")
    s.add_argument("task", help="the task's name, as a plugin registered it")
    s.add_argument("args", nargs="*", metavar="ARG", help="arguments, read as JSON where they parse")
    s.add_argument("--kwargs", metavar="JSON", help="keyword arguments as a JSON object")
    s.add_argument("--id", help="task id (default: a new time-ordered UUID, version 7)")
    s.add_argument("--timeout", type=float, metavar="S", help="kill the task after S seconds")
    s.add_argument("--retries", type=int, metavar="N", help="retry a failing task N times")
    s.add_argument("--wait", nargs="?", type=float, const=FOREVER, metavar="S",
                   help="wait (up to S seconds) for the result")
    s.add_argument("--priority", type=int, default=0, metavar="N",
                   help="higher runs first (default 0; FIFO within one priority)")
    when = s.add_mutually_exclusive_group()
    when.add_argument("--delay", type=float, metavar="S", help="run no sooner than S seconds from now")
    when.add_argument("--at", metavar="TIME",
                      help="run no sooner than TIME, ISO 8601 (UTC unless it names an offset)")
    s.add_argument("--limit-key", metavar="KEY",
                   help="the task name's global limits apply to this key's tasks apart")
    s.add_argument("--then", nargs="+", metavar=("TASK", "ARG"),
                   help="a follow-up queued when this task succeeds, its result first (then ARGs)")
    s.add_argument("--queue-anyway", action="store_true",
                   help="queue a task no live worker provides (its plugin will be installed later)")
    st = sub.add_parser("status", parents=[common], help="status of tasks")
    st.add_argument("ids", nargs="+", metavar="ID", help="task ids")
    r = sub.add_parser("result", parents=[common], help="result of a task")
    r.add_argument("id", help="a task id")
    r.add_argument("--wait", nargs="?", type=float, const=FOREVER, metavar="S",
                   help="wait (up to S seconds) until the task is done; an id not seen yet is"
                        " waited for too (it may still be on its way through Kafka)")
    t = sub.add_parser("tasks", parents=[common], help="list tasks, newest first")
    t.add_argument("--status", choices=("scheduled", "queued", "processing", "success", "failed",
                                        "cancelled"),
                   help="only tasks in this status")
    t.add_argument("--limit", type=int, default=100, metavar="N",
                   help="at most N tasks (default 100, at most 10000)")
    c = sub.add_parser("cancel", parents=[common], help="cancel tasks (a running one is stopped)")
    c.add_argument("ids", nargs="+", metavar="ID", help="task ids")
    rt = sub.add_parser("retry", parents=[common], help="run failed or cancelled tasks again")
    rt.add_argument("ids", nargs="+", metavar="ID", help="task ids")
    pg = sub.add_parser("purge", parents=[common], help="delete tasks that ended long ago")
    pg.add_argument("--older-than", required=True, type=_duration, metavar="DURATION",
                    help="ended more than DURATION ago: seconds, or a number with s, m, h or d")
    pg.add_argument("--status", action="append", choices=("success", "failed", "cancelled"),
                    help="only tasks in this status (repeat for several; default: all three)")
    mon = sub.add_parser("monitor", parents=[common], help="live view of the cluster")
    mon.add_argument("--once", action="store_true", help="print one frame and exit")
    mon.add_argument("--interval", type=float, default=1.0, metavar="S",
                     help="seconds between two frames (default 1)")
    for name, text in (("workers", "list workers"), ("failures", "worker failure history"),
                       ("schedules", "the schedules in the configuration, with their ticks"),
                       ("stats", "task counts and counters"), ("plugins", "tasks live workers provide")):
        sub.add_parser(name, parents=[common], help=text)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command; return the exit status."""
    args = parser().parse_args(argv)
    as_json = getattr(args, "json", False)
    try:
        socket = getattr(args, "socket", None) or configuration.client_socket(getattr(args, "config", None))
        with Client(socket) as client:
            return COMMANDS[args.command](client, args, as_json)
    except YadtqError as exc:
        output.fail(str(exc))
        return exc.exit_code
    except BrokenPipeError:  # the reader went away (yadtqctl ... | head): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _submit(client: Client, args: argparse.Namespace, as_json: bool) -> int:
    kwargs = _kwargs(args.kwargs)
    task_id = client.submit(args.task, *[_arg(a) for a in args.args], kwargs=kwargs,
                            task_id=args.id, timeout=args.timeout, max_retries=args.retries,
                            queue_anyway=args.queue_anyway, priority=args.priority,
                            delay=args.delay, eta=args.at, limit_key=args.limit_key,
                            then={"task": args.then[0], "args": [_arg(a) for a in args.then[1:]]}
                            if args.then else None)
    if args.wait is None:
        if as_json:
            later = args.delay is not None or args.at is not None
            output.emit_json({"task-id": task_id, "status": "scheduled" if later else "queued"})
        else:
            print(task_id)
        return 0
    return _show_result(task_id, client.result(task_id, wait=args.wait), as_json)


def _cancel(client: Client, args: argparse.Namespace, as_json: bool) -> int:
    return _orders(client.cancel(*args.ids), as_json)


def _retry(client: Client, args: argparse.Namespace, as_json: bool) -> int:
    return _orders(client.retry(*args.ids), as_json)


def _orders(tasks: dict[str, dict[str, Any]], as_json: bool) -> int:
    """What came of a cancel or retry per id; exit 2 when an id is unknown."""
    if as_json:
        output.emit_json(tasks)
    else:
        output.emit_table([{"id": i, **v} for i, v in tasks.items()],
                          ["id", "outcome", "status", "task", "worker", "attempt"], "no tasks")
    unknown = [i for i, v in tasks.items() if v["outcome"] == "unknown"]
    if unknown:
        output.fail(f"unknown task{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)}")
        return UsageError.exit_code
    return 0


def _purge(client: Client, args: argparse.Namespace, as_json: bool) -> int:
    reply = client.purge(args.older_than, tuple(args.status or ()))
    if as_json:
        output.emit_json({k: v for k, v in reply.items() if k != "ok"})
    else:
        print(f"purge ordered: {reply['matching']} tasks ({'/'.join(args.status or ['success', 'failed', 'cancelled'])})"
              f" that ended before {reply['before']}; the active server deletes them in batches")
    return 0


def _duration(text: str) -> float:
    """``90``, ``90s``, ``30m``, ``1h``, ``7d``: seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    try:
        value = float(number) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (e.g. 90, 30m, 1h, 7d)") from None
    if value < 0:
        raise argparse.ArgumentTypeError("a duration cannot be negative")
    return value


def _status(client: Client, args: argparse.Namespace, as_json: bool) -> int:
    tasks = client.status(*args.ids)
    if as_json:
        output.emit_json(tasks)
    else:
        rows = [{"id": i, **v, "result/error": _outcome(v)} for i, v in tasks.items()]
        output.emit_table(rows, ["id", "status", "task", "worker", "attempt", "result/error",
                                 "waiting"], "no tasks")
    return 0


def _result(client: Client, args: argparse.Namespace, as_json: bool) -> int:
    """Exit 0 or 1 once the task is done; 4 while it is not (after waiting, if asked); 2 for an
    id the server has not seen (after waiting for it, if asked: it may be on its way)."""
    try:
        view = client.result(args.id, wait=args.wait)
    except WaitTimeout:
        view = client.result(args.id)
    if view["status"] == "unknown":
        raise UsageError(f"unknown task {args.id}" + (f" (waited {args.wait:g} s)" if args.wait else ""))
    if view["status"] not in TERMINAL:
        if as_json:
            output.emit_json({args.id: view})
        else:
            print(f"{args.id} is {view['status']}" + (f": {view['waiting']}" if view.get("waiting") else ""))
        return WaitTimeout.exit_code
    return _show_result(args.id, view, as_json)


def _show_result(task_id: str, view: dict[str, Any], as_json: bool) -> int:
    if as_json:
        output.emit_json({task_id: view})
    elif view["status"] == "success":
        print(json.dumps(view["result"]))
    else:
        err = view.get("error") or {}
        verb = "was cancelled" if view["status"] == "cancelled" else "failed"
        output.fail(f"task {task_id} {verb}: {err.get('type')}: {err.get('message')}")
    return 0 if view["status"] == "success" else 1


def _tasks(client: Client, args: argparse.Namespace, as_json: bool) -> int:
    tasks = client.tasks(args.status, args.limit)
    if as_json:
        output.emit_json(tasks)
    else:
        rows = [{**t, "result/error": _outcome(t)} for t in tasks]
        output.emit_table(rows, ["task-id", "status", "task", "worker", "attempt", "submitted_at",
                                 "result/error", "waiting"], "no tasks")
    return 0


def _workers(client: Client, args: argparse.Namespace, as_json: bool) -> int:
    workers = client.workers()
    if as_json:
        output.emit_json(workers)
    else:
        rows = [{**w, "tasks": len(w["tasks"])} for w in workers]
        output.emit_table(rows, ["worker", "state", "host", "pid", "slots", "running", "granted",
                                 "succeeded", "failed", "last_heartbeat", "tasks"], "no workers")
        print("\n" + "\n".join(output.server_lines(client.stats().get("server", {}))))
    return 0


def _failures(client: Client, args: argparse.Namespace, as_json: bool) -> int:
    failures = client.failures()
    if as_json:
        output.emit_json(failures)
    else:
        # a server before schema 12 lists every task re-queued and sends no count
        rows = [{**f, "requeued": f.get("requeued_count", len(f["requeued"]))} for f in failures]
        output.emit_table(rows, ["worker", "epoch", "last_heartbeat", "detected_at", "reason",
                                 "requeued"], "no worker failures")
    return 0


def _schedules(client: Client, args: argparse.Namespace, as_json: bool) -> int:
    schedules = client.schedules()
    if as_json:
        output.emit_json(schedules)
    else:
        output.emit_table(schedules, ["name", "task", "args", "cron", "missed", "last_tick", "next_tick",
                                      "fired"], "no schedules ([schedules.NAME] in the configuration)")
    return 0


def _stats(client: Client, args: argparse.Namespace, as_json: bool) -> int:
    stats = client.stats()
    if as_json:
        output.emit_json(stats)
    else:
        print("\n".join(output.server_lines(stats.get("server", {}))) + "\n")
        rows = [{"figure": f"tasks {k}", "value": v} for k, v in sorted(stats["tasks"].items())]
        rows += [{"figure": "live workers", "value": stats["workers_live"]},
                 {"figure": "slots", "value": stats["slots"]}]
        rows += [{"figure": k.replace("_", " "), "value": v} for k, v in sorted(stats["counters"].items())]
        rows += [{"figure": "undelivered (server and live workers)", "value": stats.get("undelivered", 0)}]
        rows += [{"figure": f"topic {t['topic']}",
                  "value": f"{t['replicas']} replicas, min.insync.replicas {t['min_insync']}"}
                 for t in stats.get("topics", [])]
        output.emit_table(rows, ["figure", "value"], "no figures")
        for warning in stats.get("warnings", []):
            output.fail(f"warning: {warning}")
    return 0


def _plugins(client: Client, args: argparse.Namespace, as_json: bool) -> int:
    tasks = client.plugins()
    if as_json:
        output.emit_json(tasks)
    else:
        rows = [{"task": name, "plugin": p.get("plugin"), "version": p.get("version"),
                 "worker": p.get("worker")} for name, providers in sorted(tasks.items()) for p in providers]
        output.emit_table(rows, ["task", "plugin", "version", "worker"], "no live worker provides any task")
    return 0


def _monitor(client: Client, args: argparse.Namespace, as_json: bool) -> int:
    if args.interval <= 0:
        raise UsageError("--interval must be above 0")
    return monitor.run(client, args.interval, args.once or as_json, as_json)


COMMANDS = {"monitor": _monitor, "submit": _submit, "cancel": _cancel, "retry": _retry, "purge": _purge,
            "schedules": _schedules, "status": _status, "result": _result, "tasks": _tasks,
            "workers": _workers, "failures": _failures, "stats": _stats, "plugins": _plugins}


def _arg(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _kwargs(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--kwargs is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise UsageError("--kwargs must be a JSON object")
    return value


def _outcome(view: dict[str, Any]) -> Any:
    if view.get("status") == "success":
        return view.get("result")
    if view.get("error"):
        return f"{view['error'].get('type')}: {view['error'].get('message')}"
    return None


if __name__ == "__main__":
    sys.exit(main())
