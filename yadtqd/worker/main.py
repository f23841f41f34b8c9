"""The worker role: register an epoch, run what the server grants it, report, heartbeat.

One main loop does everything in order and waits in one place (the pool's pipes, the dispatch
inbox and signals), so its heartbeat proves that the loop turns. Rules from DESIGN sections 2,
4 and 6 enforced here:

- a new epoch (a fresh UUID) at every start and after being fenced; the ``dispatch`` partition
  is read from its end offset taken *before* ``hello``;
- a ``run`` is executed only if addressed to the current epoch, and at most once per grant
  (invariant 5, :mod:`yadtqd.worker.seen`);
- a granted task starts only while the epoch can prove it was not declared dead
  (:mod:`yadtqd.worker.lease`): a worker that was frozen, stalled or cut off starts nothing
  until the server answers that its epoch is live (or fences it);
- heartbeats (and systemd watchdog pings) only while the pool's processes answer, and only once
  the epoch's ``hello`` was delivered;
- a ``hello`` refused because another live process holds the worker id ends the worker with
  exit status 78;
- SIGTERM: stop taking work, hand back unstarted grants in ``bye``, drain within the stop
  timeout.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
import uuid

import msgspec
from confluent_kafka import Message

import yadtqd
from yadtqd import messages as m
from yadtqd import transport
from yadtqd.config import Config
from yadtqd.errors import BadMessage, ConfigError, UnreachableError
from yadtqd.inbox import Inbox
from yadtqd.systemd import Notifier
from yadtqd.worker.child import Outcome
from yadtqd.worker.handover import Handover, started_line
from yadtqd.worker.host import boot_id, scrub_environment
from yadtqd.worker.lease import Lease
from yadtqd.worker.outbox import Outbox
from yadtqd.worker.pending import Pending
from yadtqd.worker.placement import Placement
from yadtqd.worker import pool
from yadtqd.worker.pool import Pool
from yadtqd.worker.seen import Seen
from yadtqd.worker.stop import GracefulStop
from yadtqd.worker.waiter import Waiter

log = logging.getLogger("yadtqd.worker")
#: Test-only fault switch: when set to a task name, a ``run`` of that task wedges the main loop
#: for good, so tests can watch the heartbeat and the watchdog stop. Never set it in production.
WEDGE_ENV = "YADTQ_TEST_WEDGE_ON_TASK"
#: Test-only switch: when set to a task name, a ``run`` of that task has the worker replace its
#: consumer as if librdkafka had left it stuck (no way to make it so on demand was found).
REPLACE_ENV = "YADTQ_TEST_REPLACE_CONSUMER_ON_TASK"


class Worker(GracefulStop, Handover):
    """One worker process."""

    def __init__(self, config: Config, notifier: Notifier) -> None:
        self.config = config
        self.worker_id = config.worker.worker_id
        self._key = self.worker_id.encode()  # the key of the dispatch messages addressed to it
        self.notifier = notifier
        self.epoch = ""
        self.seen = Seen()
        self.lease = Lease(timeout=config.server.heartbeat_timeout)
        self.hello_delivered = ""
        self.pending = Pending()
        #: Runs handed to the pool, until their outcome (or return: :meth:`_take_back`).
        self.handed: dict[tuple[str, int], m.Run] = {}
        #: Cancels of runs in batches, asked of the pool again each turn (:meth:`Pool.cancel`).
        self.deferred: dict[tuple[str, int], m.Cancel] = {}
        #: The ``started`` of running tasks not sent yet, oldest first, with when they are due.
        self.unannounced: dict[tuple[str, int], tuple[m.Started, float]] = {}
        #: Runs waiting in batches behind the one their slot runs: "started" is logged once
        #: they are at the front (:meth:`_log_started`), so the runs that come back from
        #: behind it are not said to have started.
        self.unlogged: set[tuple[str, int]] = set()
        self.done = 0
        self.failed = 0
        #: Outcomes were sent since the last push: pushed once nothing granted waits to start.
        self.unpushed = False
        self.stopping = False
        self.reload_requested = False
        self.reloading = False
        self.stop_deadline = 0.0
        #: The server confirmed this epoch's ``bye`` (``left``): nothing more will be granted.
        self.leave_confirmed = False
        #: Until when a drained worker waits for that confirmation.
        self.confirm_by = 0.0
        self.last_heartbeat = 0.0
        self.last_watchdog = 0.0
        self.last_progress = time.time()
        self.pool = Pool(config.worker.slot_count, config.worker.max_result_bytes,
                         config.worker.plugins, config.worker.max_task_memory)
        self.pool.ping_interval = config.worker.heartbeat_interval
        self.pool.load_grace = max(pool.LOAD_GRACE, config.worker.stall_timeout)
        self.outbox: Outbox | None = None
        self.consumer_monitor = transport.ConnectionMonitor("worker consumer")
        self.placement = Placement(config, self.worker_id)
        self.inbox: Inbox | None = None
        self.wedge_on = os.environ.get(WEDGE_ENV, "")
        self.replace_on, self.replace_asked = os.environ.get(REPLACE_ENV, ""), False

    # ------------------------------------------------------------ life cycle

    def run(self) -> int:
        """Run until SIGTERM and the drain that follows; returns the exit status."""
        scrub_environment()
        self.pool.start()
        self.pool.wait_ready()
        consumer, self.consumer_monitor = transport.make_consumer(self.config, "worker")
        inbox = self.inbox = Inbox(consumer)
        self._install_signals(inbox)
        self.placement.assign(consumer, inbox)
        self.outbox = outbox = Outbox(self.config, self.worker_id, self.placement.events_partition,
                                      self.lease,
                                      current_epoch=lambda: self.epoch,
                                      on_hello_delivered=self._on_hello_delivered)
        inbox.start()
        self._register("start")
        self.notifier.ready(self._status())
        try:
            self._loop(inbox)
        finally:
            ended = inbox.stop()
            self.pool.close()
            outbox.flush(10)
            if ended:  # else the thread may still be using it
                inbox.consumer.close()
        return 0

    def _install_signals(self, inbox: Inbox) -> None:
        signal.set_wakeup_fd(inbox.wakeup_fd, warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self._on_sigterm)
        signal.signal(signal.SIGINT, self._on_sigterm)
        signal.signal(signal.SIGHUP, self._on_sighup)
        # an execution process that exits wakes the loop at once (the wake-up socket), even when
        # something it forked keeps its pipe open
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)

    def _on_sigterm(self, signum: int, frame: object) -> None:
        self.stopping = True  # the main loop acts on it

    def _on_sighup(self, signum: int, frame: object) -> None:
        self.reload_requested = True  # the main loop acts on it

    def _register(self, why: str) -> None:
        if self.epoch:
            self.placement.new_epoch()
        self.epoch = uuid.uuid4().hex
        self.seen = Seen()  # runs of an older epoch are ignored anyway
        self.lease.restart(time.monotonic())
        self._hello(why)

    def _on_hello_delivered(self, epoch: str) -> None:
        if epoch == self.epoch:
            self.hello_delivered = epoch  # heartbeats of this epoch may follow its hello now

    def _hello(self, why: str) -> None:
        """Announce this epoch and what its execution processes can run (again after a reload:
        the server then updates what the epoch advertises)."""
        advertised, problems = self.pool.advertised()
        for plugin, problem in sorted(problems.items()):
            log.error("plugin %s skipped: %s", plugin, problem, extra={"event": "plugin_broken"})
        tasks = {name: m.TaskInfo(**info) for name, info in advertised.items()}
        self._send(m.Hello(worker=self.worker_id, epoch=self.epoch, ts=time.time(),
                           host=socket.gethostname(), pid=os.getpid(),
                           slots=self.pool.size, prefetch=self.config.worker.prefetch,
                           tasks=tasks, version=yadtqd.__version__, boot=boot_id(),
                           dispatch_partition=self.placement.dispatch_partition,
                           placeable=self.placement.placeable), urgent=True)
        log.info("epoch %s (%s) advertises %d tasks: %s", self.epoch, why, len(tasks),
                 ", ".join(sorted(tasks)) or "none",
                 extra={"worker_id": self.worker_id, "event": "worker_registered"})

    def _reload(self) -> None:
        """SIGHUP: start fresh execution processes (plugins loaded anew); re-advertise once
        they are all up. Running tasks finish in their old processes."""
        if self.reload_requested:
            self.reload_requested = False
            self.reloading = True
            self.notifier.reloading()
            self.pool.recycle()
            log.info("reloading plugins", extra={"event": "worker_reloading"})
        if self.reloading and self.pool.settled:
            self.reloading = False
            self._hello("reload")
            self.notifier.ready(self._status())

    # ------------------------------------------------------------ the loop

    def _loop(self, inbox: Inbox) -> None:
        waiter = Waiter()
        try:
            self._turns(inbox, waiter)
        finally:
            waiter.close()

    def _turns(self, inbox: Inbox, waiter: Waiter) -> None:
        stop_announced = False
        while True:
            ready = waiter.wait([*self.pool.waitables(), inbox.reader], self._timeout())
            self.last_progress = time.time()
            if not inbox.alive:
                raise UnreachableError("the thread reading Kafka died (see the log above); stopping")
            self._replace_stuck(inbox)
            if self.stopping and not stop_announced:
                stop_announced = True
                self._begin_stop()
            for msg in inbox.take():
                self._on_dispatch(msg)
            for outcome in self.pool.collect(ready) + self.pool.expire():
                self._on_outcome(outcome)
            self._take_back()
            self._log_started()
            self._start_pending()
            if self.unpushed and not self.pending and (self.pool.free or not self.pool.queued):
                self._push()
            self._announce(every=self.stopping)
            self._reload()
            self.pool.ping()
            self._beat()
            assert self.outbox is not None
            self.outbox.poll()
            if stop_announced and self._stopped(time.monotonic()):
                self._end_stop()
                return

    def _timeout(self) -> float:
        timeout = self.config.worker.heartbeat_interval / 2
        deadline = self.pool.next_deadline()
        waiting = self.pool.waiting() if self.unannounced else set()  # announced once at the front
        due = next((d for key, (_, d) in self.unannounced.items() if key not in waiting), None)
        if self.deferred:  # a cancel asked again once the batch's window passed
            due = min(due or float("inf"), time.monotonic() + pool.BATCH_WINDOW)
        if due is not None:
            deadline = due if deadline is None else min(deadline, due)
        if deadline is not None:
            timeout = min(timeout, max(0.0, deadline - time.monotonic()))
        return timeout

    def _on_dispatch(self, msg: Message) -> None:
        key = msg.key()
        if key is not None and key != self._key:
            return  # keyed for another worker sharing the partition, or a placeholder: not parsed
        try:
            order = m.parse_dispatch(msg.value())
        except BadMessage as exc:
            log.warning("skipped dispatch message at %s[%d]@%d: %s",
                        msg.topic(), msg.partition(), msg.offset(), exc)
            return
        if isinstance(order, m.Prime) or order.worker != self.worker_id or order.epoch != self.epoch:
            return  # a placeholder, for another worker sharing the partition, or for a past epoch
        if isinstance(order, m.Fenced):
            self._on_fenced(order)
        elif isinstance(order, m.Alive):
            self.lease.alive(order.probe)
        elif isinstance(order, m.Left):
            self.leave_confirmed = True
            log.info("the server confirmed the leave: epoch %s is granted nothing more", self.epoch,
                     extra={"worker_id": self.worker_id, "event": "worker_leave_confirmed"})
        elif isinstance(order, m.Refused):
            raise ConfigError(f"the server refused worker {self.worker_id!r}: {order.reason}")
        elif isinstance(order, m.Placed):
            self._on_placed(order)
        elif isinstance(order, m.Cancel):
            self._on_cancel(order)
        else:
            self._on_run(order)

    def _on_placed(self, placed: m.Placed) -> None:
        """The server placed this (first) epoch on another ``dispatch`` partition, where fewer
        workers read: read that one from its end before the ``hello``."""
        if placed.partition == self.placement.dispatch_partition:
            return
        if not self.placement.can_move(placed.partition):
            log.error("the server placed epoch %s on %s[%d], whose end this worker did not take:"
                      " a new epoch, on [%d]", self.epoch, self.placement.topic, placed.partition,
                      self.placement.dispatch_partition,
                      extra={"worker_id": self.worker_id, "event": "worker_misplaced"})
            self._register("placed where it could miss messages")
            return
        assert self.inbox is not None
        self.consumer_monitor = self.placement.move(placed.partition, self.inbox, self.epoch)

    def _replace_stuck(self, inbox: Inbox) -> None:
        """Read on with a new consumer when this one will not connect again (see
        :meth:`~yadtqd.transport.ConnectionMonitor.stuck_beside`; the outbox's producer talks
        to the same brokers), from where it stopped: the tasks running go on."""
        assert self.outbox is not None
        why = self.consumer_monitor.stuck_beside(self.outbox.monitor)
        if self.replace_asked:
            self.replace_asked, why = False, f"was taken for stuck ({REPLACE_ENV})"
        if why:
            log.error("the Kafka consumer %s: a new one reads on from where it stopped", why,
                      extra={"worker_id": self.worker_id, "event": "consumer_replaced"})
            consumer, self.consumer_monitor = transport.make_consumer(self.config, "worker")
            inbox.replace(consumer)

    def _on_run(self, run: m.Run) -> None:
        if not self.seen.take(run.grant, run.task_id, run.attempt):
            log.info("dropped duplicate run of %s attempt %d", run.task_id, run.attempt,
                     extra={"task_id": run.task_id, "event": "task_duplicate"})
            return
        if run.lease is not None:
            self.lease.learn(run.lease)
        if self.stopping:
            self._send_bye([run])
            return
        if self.wedge_on and run.task == self.wedge_on:
            log.critical("test fault %s=%s: wedging the main loop", WEDGE_ENV, self.wedge_on)
            while True:
                time.sleep(3600)
        self.replace_asked |= bool(self.replace_on) and run.task == self.replace_on
        self.pending.hold(run)

    def _on_cancel(self, cancel: m.Cancel) -> None:
        """An operator cancelled a task this epoch holds: drop it if it has not started (or
        never arrived: its run, should it come, is then a repeat), stop it if it runs; a task
        that ended first keeps its outcome, already on its way."""
        extra = {"task_id": cancel.task_id, "event": "task_cancelled"}
        answer = self.pool.cancel(cancel.task_id, cancel.attempt, self.config.worker.cancel_grace)
        if answer == pool.LATER:  # in a batch: asked again each turn (_take_back, or it ends)
            self.deferred[(cancel.task_id, cancel.attempt)] = cancel
            return
        if answer == pool.STOPPING:
            log.info("task %s attempt %d cancelled: stopping it", cancel.task_id, cancel.attempt, extra=extra)
            return
        unstarted = [r for r in self.pending if (r.task_id, r.attempt) == (cancel.task_id, cancel.attempt)]
        if not unstarted and not self.seen.take(cancel.grant, cancel.task_id, cancel.attempt):
            return  # it ran here and ended: its outcome is on its way
        for run in unstarted:
            self.pending.remove(run)
        log.info("task %s attempt %d cancelled before it started", cancel.task_id, cancel.attempt,
                 extra=extra)
        self._send(m.Finished(worker=self.worker_id, epoch=cancel.epoch, ts=time.time(),
                              task_id=cancel.task_id, attempt=cancel.attempt, status="cancelled",
                              error=m.ErrorInfo(type="Cancelled", message="cancelled before it started")))

    def _on_fenced(self, fence: m.Fenced) -> None:
        killed = self.pool.kill_running()
        dropped = len(self.pending)
        self.pending.clear()
        self.unannounced.clear()  # the epoch's tasks are killed: nothing of it is to be said
        self.unlogged.clear()
        self.handed.clear()
        self.deferred.clear()
        log.warning("epoch %s fenced by the server (%s): killed %d running, dropped %d granted",
                    fence.epoch, fence.reason, len(killed), dropped,
                    extra={"worker_id": self.worker_id, "event": "worker_fenced"})
        if fence.reason == m.NEWER_EPOCH:
            # this process is alive, so the newer epoch is another process under our id
            raise ConfigError(f"another process registered worker id {self.worker_id!r} on this"
                              " host: give each worker its own [worker] id")
        if self.stopping:
            self.leave_confirmed = True  # a dead epoch is granted nothing more
            return  # a stopping worker does not start a new epoch; its drain ends it
        self._register("fenced")

    def _on_outcome(self, outcome: Outcome) -> None:
        if outcome.key in self.unlogged:  # it started and ended since the last turn
            self.unlogged.discard(outcome.key)
            started_line(*outcome.key)
        unannounced = self.unannounced.pop(outcome.key, None)
        self.handed.pop(outcome.key, None)
        if outcome.epoch != self.epoch:
            return  # ran for an epoch that was fenced since; the server re-planned it
        error = m.ErrorInfo(**outcome.error).capped() if outcome.error else None
        if outcome.status == "success":
            self.done += 1
        else:
            self.failed += 1
        status = outcome.status if outcome.status in ("success", "cancelled") else "failed"
        self.unpushed = True
        self._send(m.Finished(worker=self.worker_id, epoch=outcome.epoch, ts=time.time(),
                              task_id=outcome.task_id, attempt=outcome.attempt,
                              status=status,  # type: ignore[arg-type]
                              result=msgspec.Raw(outcome.result.encode()), error=error,
                              runtime=outcome.runtime,
                              started=unannounced[0].ts if unannounced else None))
        # a success is the worker's line, not the server's: the server's loop does every
        # task's bookkeeping one at a time and bounds throughput (issue 15, docs/bench.md); a
        # failure says why here, and the server whether it is retried
        extra = {"task_id": outcome.task_id, "event": f"task_{outcome.status}"}
        if outcome.status == "success":
            log.info("task %s attempt %d succeeded in %.1f ms", outcome.task_id, outcome.attempt,
                     (outcome.runtime or 0.0) * 1000, extra=extra)
        else:
            log.warning("task %s attempt %d %s%s", outcome.task_id, outcome.attempt,
                        outcome.status, f": {error.type}: {error.message}" if error else "",
                        extra=extra)

    # ------------------------------------------------------------ liveness

    def _beat(self) -> None:
        now = time.monotonic()
        interval = self.config.worker.heartbeat_interval
        healthy = self.pool.responsive(grace=self.config.worker.stall_timeout)
        if not healthy:
            return  # a wedged pool must look dead to the server and to systemd
        if now - self.last_heartbeat >= interval and self.hello_delivered == self.epoch:
            self.last_heartbeat = now
            running = [m.TaskRef(task_id=j.task_id, attempt=j.attempt)
                       for j in self.pool.running()[:m.REFS_MOST]]
            self._send(m.Heartbeat(worker=self.worker_id, epoch=self.epoch, ts=time.time(),
                                   slots=self.pool.size, busy=self.pool.busy, running=running,
                                   done=self.done, failed=self.failed,
                                   last_progress=self.last_progress,
                                   undelivered=self.outbox.undelivered if self.outbox else 0))
            self.notifier.status(self._status())
        watchdog = self.notifier.watchdog_interval()
        if watchdog and now - self.last_watchdog >= watchdog:
            self.last_watchdog = now
            self.notifier.watchdog()

    def _status(self) -> str:
        return (f"worker {self.worker_id}: busy {self.pool.busy}/{self.pool.size},"
                f" waiting {len(self.pending)}, done {self.done}, failed {self.failed}")

    def _push(self) -> None:
        """Tasks ended and nothing granted waits to start: push their outcomes out now, not
        after the producer's linger. A slot now idle, or one just given the last task held,
        waits for the server to hear of it and grant more (a worker whose prefetch still holds
        tasks lets its outcomes share a request: it has work meanwhile; they are pushed when
        it runs out, whether a task ended then or not)."""
        assert self.outbox is not None
        self.unpushed = False
        self.outbox.push()

    def _send(self, message: m.WorkerEvent, urgent: bool = False) -> None:
        assert self.outbox is not None
        self.outbox.send(message, urgent)
