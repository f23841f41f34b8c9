"""``yadtqctl``: the operator's CLI over the server's socket (DESIGN section 12).

Exit codes: 0 done; 1 the awaited task failed; 2 usage or bad input; 3 the server or broker
cannot be reached; 4 timed out waiting.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from yadtqd.client import Client
from yadtqd.ctl import monitor, output
from yadtqd.errors import UsageError, WaitTimeout, YadtqError

FOREVER = 10 * 365 * 86400.0


def parser() -> argparse.ArgumentParser:
    """The command line."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--socket", metavar="PATH", default=argparse.SUPPRESS,
                        help="server socket (default: $YADTQ_SERVER_SOCKET or /run/yadtq/yadtqd.sock)")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print JSON instead of tables")
    p = argparse.ArgumentParser(prog="yadtqctl", parents=[common],
                                description="Submit and inspect YADTQ tasks.",
                                epilog="Exit status: 0 done, 1 the awaited task failed, 2 usage "
                                       "or bad input, 3 server or broker unreachable, 4 timed out.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    s = sub.add_parser("submit", parents=[common], help="submit a task")
    s.add_argument("task")
    s.add_argument("args", nargs="*", metavar="ARG", help="arguments, read as JSON where they parse")
    s.add_argument("--kwargs", metavar="JSON", help="keyword arguments as a JSON object")
    s.add_argument("--id", help="task id (default: a new UUID4)")
    s.add_argument("--timeout", type=float, metavar="S", help="kill the task after S seconds")
    s.add_argument("--retries", type=int, metavar="N", help="retry a failing task N times")
    s.add_argument("--wait", nargs="?", type=float, const=FOREVER, metavar="S",
                   help="wait (up to S seconds) for the result")
    st = sub.add_parser("status", parents=[common], help="status of tasks")
    st.add_argument("ids", nargs="+", metavar="ID")
    r = sub.add_parser("result", parents=[common], help="result of a task")
    r.add_argument("id")
    r.add_argument("--wait", nargs="?", type=float, const=FOREVER, metavar="S",
                   help="wait (up to S seconds) until the task is done")
    t = sub.add_parser("tasks", parents=[common], help="list tasks")
    t.add_argument("--status", choices=("queued", "processing", "success", "failed"))
    t.add_argument("--limit", type=int, default=100)
    mon = sub.add_parser("monitor", parents=[common], help="live view of the cluster")
    mon.add_argument("--once", action="store_true", help="print one snapshot and exit")
    mon.add_argument("--interval", type=float, default=1.0, metavar="S", help="refresh period")
    for name, text in (("workers", "list workers"), ("failures", "worker failure history"),
                       ("stats", "task counts and counters"), ("plugins", "tasks live workers provide")):
        sub.add_parser(name, parents=[common], help=text)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command; return the exit status."""
    args = parser().parse_args(argv)
    client = Client(getattr(args, "socket", None))
    as_json = getattr(args, "json", False)
    try:
        return COMMANDS[args.command](client, args, as_json)
    except YadtqError as exc:
        output.fail(str(exc))
        return exc.exit_code


def _submit(client: Client, args: argparse.Namespace, as_json: bool) -> int:
    kwargs = _kwargs(args.kwargs)
    task_id = client.submit(args.task, *[_arg(a) for a in args.args], kwargs=kwargs,
                            task_id=args.id, timeout=args.timeout, max_retries=args.retries)
    if args.wait is None:
        if as_json:
            output.emit_json({"task-id": task_id, "status": "queued"})
        else:
            print(task_id)
        return 0
    return _show_result(task_id, client.result(task_id, wait=args.wait), as_json)


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
    view = client.result(args.id, wait=args.wait)
    if view["status"] == "unknown" and not args.wait:
        raise UsageError(f"unknown task {args.id}")
    if view["status"] not in ("success", "failed"):
        if as_json:
            output.emit_json({args.id: view})
        else:
            print(f"{args.id} is {view['status']}" + (f": {view['waiting']}" if view.get("waiting") else ""))
        return 0
    return _show_result(args.id, view, as_json)


def _show_result(task_id: str, view: dict[str, Any], as_json: bool) -> int:
    if as_json:
        output.emit_json({task_id: view})
    elif view["status"] == "success":
        print(json.dumps(view["result"]))
    else:
        err = view.get("error") or {}
        output.fail(f"task {task_id} failed: {err.get('type')}: {err.get('message')}")
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
        output.emit_table(rows, ["worker", "state", "host", "pid", "slots", "busy", "executed",
                                 "failed", "last_heartbeat", "tasks"], "no workers")
    return 0


def _failures(client: Client, args: argparse.Namespace, as_json: bool) -> int:
    failures = client.failures()
    if as_json:
        output.emit_json(failures)
    else:
        rows = [{**f, "requeued": len(f["requeued"])} for f in failures]
        output.emit_table(rows, ["worker", "epoch", "last_heartbeat", "detected_at", "reason",
                                 "requeued"], "no worker failures")
    return 0


def _stats(client: Client, args: argparse.Namespace, as_json: bool) -> int:
    stats = client.stats()
    if as_json:
        output.emit_json(stats)
    else:
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
    return monitor.run(client, args.interval, args.once, as_json)


COMMANDS = {"monitor": _monitor, "submit": _submit, "status": _status, "result": _result, "tasks": _tasks,
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
