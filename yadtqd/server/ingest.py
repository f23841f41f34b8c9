"""Apply what the server reads from ``tasks`` and ``events`` to the store, one batch per call.

Data flows one way: Kafka message → :mod:`yadtqd.messages` parses it → a named store
transition → effects (the scheduler's view, logs, epochs to fence). The caller wraps a batch in
one transaction together with the offsets it consumed (invariant 6).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Message

from yadtqd import messages as m
from yadtqd.config import Config
from yadtqd.errors import BadMessage
from yadtqd.server.evidence import Evidence
from yadtqd.server.scheduler import Member, Scheduler
from yadtqd.store import Intake, Store, runs_counted
from yadtqd.transport import least_read, partition_for

#: Seconds between two ``fenced`` answers to the heartbeats of one epoch that is not live.
REFENCE_EVERY = 2.0

log = logging.getLogger("yadtqd.server")


@dataclass(frozen=True)
class Fence:
    """An epoch to tell that it was declared dead."""

    worker: str
    epoch: str
    reason: str
    #: The ``dispatch`` partition the epoch reads (-1: the hash of its worker id).
    partition: int = -1


@dataclass(frozen=True)
class Answer:
    """A dispatch message answering an event: ``alive`` (``probe`` set), ``left`` (``left``
    set), ``placed`` (``placed`` set) or ``refused``."""

    worker: str
    epoch: str
    partition: int
    probe: int = 0
    left: bool = False
    reason: str = ""
    #: The partition a new epoch is to read instead of ``partition`` (-1: none).
    placed: int = -1

    def message(self) -> m.Alive | m.Left | m.Placed | m.Refused:
        """The answer as sent: ``alive`` to a heartbeat that asked whether its epoch is live
        (it is); ``left`` to confirm a ``bye`` (the epoch is granted nothing more); ``placed``
        to tell a new epoch, on the partition its ``hello`` named, to read another instead;
        ``refused`` to tell it its ``hello`` was refused."""
        if self.probe:
            return m.Alive(worker=self.worker, epoch=self.epoch, probe=self.probe)
        if self.left:
            return m.Left(worker=self.worker, epoch=self.epoch)
        if self.placed >= 0:
            return m.Placed(worker=self.worker, epoch=self.epoch, partition=self.placed)
        return m.Refused(worker=self.worker, epoch=self.epoch, reason=self.reason)


@dataclass(frozen=True)
class CancelHeld:
    """A cancelled task a worker epoch holds: the epoch is to be told."""

    worker: str
    epoch: str
    task_id: str
    attempt: int
    grant: int | None
    partition: int


@dataclass
class Effects:
    """What a batch changed beyond the store."""

    fences: list[Fence] = field(default_factory=list)
    answers: list[Answer] = field(default_factory=list)
    cancels: list[CancelHeld] = field(default_factory=list)
    positions: dict[tuple[str, int], int] = field(default_factory=dict)


class Ingest:
    """Applies batches of Kafka messages to the store and the scheduler's view."""

    def __init__(self, store: Store, scheduler: Scheduler, config: Config, evidence: Evidence,
                 dispatch_partitions: int) -> None:
        self.store = store
        self.scheduler = scheduler
        self.config = config
        self.evidence = evidence
        self.tasks_topic = config.topic("tasks")
        #: The partition count of ``dispatch``, for workers too old to say which one they read.
        self.dispatch_partitions = dispatch_partitions
        self._refenced: dict[str, float] = {}
        #: When tasks that end in the batch being applied started (their ``started`` not applied).
        self._began: dict[tuple[str, int, str], float] = {}
        #: The batch's outcomes per epoch: executed, succeeded, failed runs (one update each).
        self._runs: dict[str, list[int]] = {}
        #: The run of consecutive submissions (``intake``) or successes (``success``) gathered,
        #: to be recorded in one statement (:meth:`_flush`).
        self._run: list[Any] = []
        self._run_kind = ""

    def apply(self, batch: list[Message], now: float) -> Effects:
        """Apply a batch and save its offsets; call inside a transaction.

        A ``started`` whose ``finished`` is in the same batch is not applied on its own: the
        task goes from ``assigned`` to its end in one update (nobody could have seen it
        ``processing`` in between), and ``started_at`` is set with the end, to the worker's time
        in the ``started`` (so the row is the same however the events were batched: a replay
        after a crash batches them otherwise).

        Consecutive submissions, and consecutive successes, are recorded in one statement each
        (:mod:`yadtqd.store.batches`), in order: any other message that reads or changes the
        store's rows (an order, a bad submission, any other event) first records the run before
        it. A bad event, a marker and a ``started`` folded into its ``finished`` do not.
        """
        try:
            return self._apply(batch, now)
        finally:  # what one batch gathered is never counted again with the next
            self._began.clear()
            self._runs.clear()
            self._run.clear()

    def _apply(self, batch: list[Message], now: float) -> Effects:
        effects = Effects()
        positions = effects.positions
        events = [self._parse_event(msg) if msg.topic() != self.tasks_topic else None for msg in batch]
        ended = {(ev.task_id, ev.attempt, ev.epoch) for ev in events if isinstance(ev, m.Finished)}
        for msg, ev in zip(batch, events):
            if ev is None:
                self._submission(msg, now, effects)
            elif isinstance(ev, m.Finished) and ev.status == "success":
                began = self._began.pop((ev.task_id, ev.attempt, ev.epoch), None) or ev.started
                self._join("success", (ev, _when(ev, now), began), now)
            elif isinstance(ev, BadMessage):  # (these three touch no row a run changes)
                self.store.bump("bad_messages")
                log.warning("skipped bad event at %s[%d]@%d: %s", msg.topic(), msg.partition(),
                            msg.offset(), ev, extra={"event": "bad_message"})
            elif isinstance(ev, m.Mark):
                if ev.server == self.evidence.nonce:
                    self.evidence.read_back(msg.partition() or 0, ev.seq)
            elif isinstance(ev, m.Started) and (ev.task_id, ev.attempt, ev.epoch) in ended:
                self.scheduler.started(ev.epoch, ev.task_id)
                self._began[(ev.task_id, ev.attempt, ev.epoch)] = _when(ev, now)
            else:
                self._flush(now)
                self._event(ev, msg.partition() or 0, now, effects)
            topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
            assert topic is not None and partition is not None and offset is not None
            positions[(topic, partition)] = offset + 1
        self._flush(now)
        self.store.count_runs(self._runs)
        self.store.save_offsets(positions)
        return effects

    def _join(self, kind: str, item: Any, now: float) -> None:
        """Add a submission (``intake``) or a success (``success``) to the run being gathered,
        recording the run before it first if it is of the other kind."""
        if self._run and self._run_kind != kind:
            self._flush(now)
        self._run_kind = kind
        self._run.append(item)

    def _flush(self, now: float) -> None:
        """Record the run gathered, in one statement, and act on each of its outcomes in order."""
        run, self._run = self._run, []
        if not run:
            return
        if self._run_kind == "intake":
            for sub, intake in zip(run, self.store.intake_many(run, now)):
                self._received(sub, intake)
        else:
            for (ev, _, _), outcome in zip(run, self.store.succeed_many(run, now)):
                self._ended(ev, outcome, now)

    def _submission(self, msg: Message, now: float, effects: Effects) -> None:
        try:
            sub = m.parse_tasks_message(msg.value(), self.config.server.max_task_bytes)
        except BadMessage as exc:
            self._flush(now)
            self._bad_submission(msg, exc, now)
            return
        if isinstance(sub, m.Control):
            self._flush(now)
            self._order(sub, now, effects)
            return
        self._join("intake", sub, now)

    def _received(self, sub: m.Submission, intake: Intake) -> None:
        if intake.outcome == "new":
            log.info("task %s received: %s", sub.task_id, sub.task,
                     extra={"task_id": sub.task_id, "event": "task_received"})
        elif intake.outcome == "duplicate" and sub.via != "socket":
            self.store.bump("duplicates")  # a resubmit, or a message read twice
        elif intake.outcome == "conflict":
            self.store.bump("conflicts")
            log.warning("task %s rejected: the id was submitted before with another payload",
                        sub.task_id, extra={"task_id": sub.task_id, "event": "task_conflict"})

    def _order(self, order: m.Control, now: float, effects: Effects) -> None:
        """An operator's cancel, retry or purge (``yadtqctl``), read in order with the
        submissions of the same task."""
        who = f"uid {order.uid}" if order.uid >= 0 else "a client"
        if order.op == "purge":
            before = (order.ts or now) - (order.older_than or 0.0)
            self.store.order_purge(before, order.statuses, now)
            log.warning("purge ordered by %s: tasks %s that ended before %s", who,
                        "/".join(order.statuses) or "success/failed/cancelled",
                        time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(before)),
                        extra={"event": "purge_ordered"})
            return
        task_id = order.task_id or ""
        extra = {"task_id": task_id, "event": f"task_{order.op}"}
        if order.op == "retry":
            outcome = self.store.retry_task(task_id, now, order.attempt)
            log.log(logging.WARNING if outcome == "retried" else logging.INFO,
                    "task %s %s by %s", task_id, outcome.replace("_", " "), who, extra=extra)
            return
        outcome, row = self.store.cancel(task_id, now, f"cancelled by {who}")
        log.log(logging.WARNING if outcome in ("cancelled", "cancelling") else logging.INFO,
                "task %s %s by %s", task_id, {"ended": "had ended: not cancelled"}.get(outcome, outcome),
                who, extra=extra)
        if row is not None:
            member = self.scheduler.members.get(row["epoch"])
            effects.cancels.append(CancelHeld(row["worker"], row["epoch"], task_id, row["attempt"],
                                              row["grant_no"] or None, member.dispatch if member else -1))

    def _bad_submission(self, msg: Message, exc: BadMessage, now: float) -> None:
        where = f"{msg.topic()}[{msg.partition()}]@{msg.offset()}"
        self.store.bump("bad_messages")
        if exc.task_id and self.store.intake_invalid(
                exc.task_id, m.ErrorInfo(type="BadSubmission", message=str(exc)), now):
            log.warning("task %s failed at intake (%s): %s", exc.task_id, where, exc,
                        extra={"task_id": exc.task_id, "event": "task_failed"})
        else:
            log.warning("skipped bad submission at %s: %s", where, exc,
                        extra={"event": "bad_message"})

    # ------------------------------------------------------------ events

    @staticmethod
    def _parse_event(msg: Message) -> m.Event | BadMessage:
        try:
            return m.parse_event(msg.value())
        except BadMessage as exc:
            return exc

    def _event(self, ev: m.WorkerEvent, partition: int, now: float, effects: Effects) -> None:
        if isinstance(ev, m.Hello):
            self._hello(ev, partition, now, effects)
        elif isinstance(ev, m.Heartbeat):
            self._heartbeat(ev, now, effects)
        elif isinstance(ev, m.Started):
            self._started(ev, now)
        elif isinstance(ev, m.Finished):
            self._finished(ev, now)
        else:
            self._bye(ev, now, effects)

    def _hello(self, ev: m.Hello, partition: int, now: float, effects: Effects) -> None:
        member = self.scheduler.members.get(ev.epoch)
        if member is not None and self.store.readvertise(ev):
            member.tasks = frozenset(ev.tasks)
            member.slots, member.prefetch = ev.slots, ev.prefetch
            log.info("worker %s now provides: %s", ev.worker, ", ".join(sorted(ev.tasks)) or "none",
                     extra={"worker_id": ev.worker, "event": "worker_reloaded"})
            return
        holder = self._other_holder(ev)
        if holder is not None:
            reason = (f"worker id {ev.worker!r} is held by a live process on host {holder['host']}"
                      f" (pid {holder['pid']}): give this worker another [worker] id")
            log.error("hello of worker %s from %s refused: %s", ev.worker, ev.host, reason,
                      extra={"worker_id": ev.worker, "event": "worker_refused"})
            effects.answers.append(Answer(ev.worker, ev.epoch, ev.dispatch_partition, reason=reason))
            return
        home = (ev.dispatch_partition if ev.dispatch_partition >= 0
                else partition_for(ev.worker, self.dispatch_partitions))
        dispatch = self._place(ev, home)
        older = self.store.hello(ev, now, dispatch, partition)
        if older is None:
            self._stale(ev, "hello from a known epoch")
            return
        if dispatch != home:
            effects.answers.append(Answer(ev.worker, ev.epoch, home, placed=dispatch))
        self.scheduler.join(Member(
            epoch=ev.epoch, worker=ev.worker, slots=ev.slots, prefetch=ev.prefetch,
            tasks=frozenset(ev.tasks), partition=partition, dispatch=dispatch))
        log.info("worker %s joined: epoch %s on %s pid %d, %d slots, dispatch partition %d%s,"
                 " tasks %s", ev.worker, ev.epoch, ev.host, ev.pid, ev.slots, dispatch,
                 f" (placed there from {home})" if dispatch != home else "",
                 ", ".join(sorted(ev.tasks)) or "none",
                 extra={"worker_id": ev.worker, "event": "worker_joined"})
        for epoch in older:
            reason = m.NEWER_EPOCH
            gone = self.scheduler.members.get(epoch)
            self.declare_dead(epoch, reason, now)
            effects.fences.append(Fence(ev.worker, epoch, reason, gone.dispatch if gone else -1))

    def _place(self, ev: m.Hello, home: int) -> int:
        """The ``dispatch`` partition a new epoch reads: its own, unless it is ``placeable`` and
        another has fewer live epochs of other workers reading it (a leaving epoch reads for a
        moment only; an older epoch of the same worker is about to be fenced)."""
        if not ev.placeable:
            return home
        readers = Counter(member.dispatch for member in self.scheduler.members.values()
                          if member.worker != ev.worker and member.accepting)
        return least_read(home, readers, min(ev.placeable, self.dispatch_partitions))

    def _other_holder(self, ev: m.Hello) -> dict[str, object] | None:
        """A live epoch of the same worker id in *another* process that is still heartbeating
        (another host, or the same host name after another boot), if any: that hello is refused.
        The same host and boot is a restart, which takes over at once. "Still heartbeating"
        means this server process applied a fresh heartbeat of it within the timeout: an epoch
        restored from the store after a restart (its host may have rebooted meanwhile) is not
        taken for a live holder until it is heard from."""
        mono = time.monotonic()
        for row in self.store.holders(ev.worker):
            member = self.scheduler.members.get(row["epoch"])
            if member is None or mono - member.heard > self.config.server.heartbeat_timeout:
                continue
            if row["host"] != ev.host or (row["boot"] and ev.boot and row["boot"] != ev.boot):
                return {"host": row["host"], "pid": row["pid"]}
        return None

    def _heartbeat(self, ev: m.Heartbeat, now: float, effects: Effects) -> None:
        member = self.scheduler.members.get(ev.epoch)
        if member is None or not self.store.heartbeat(ev, now):
            self._stale(ev, "heartbeat from an epoch that is not live")
            self._refence(ev, effects)
            return
        member.last_heartbeat = time.monotonic()
        if time.time() - ev.ts < 2 * self.config.server.heartbeat_timeout:
            member.heard = member.last_heartbeat
        if ev.probe:
            effects.answers.append(Answer(ev.worker, ev.epoch, member.dispatch, probe=ev.probe))

    def _refence(self, ev: m.Heartbeat, effects: Effects) -> None:
        """A heartbeat from an epoch that is not live (declared dead, its ``fenced`` lost, or
        unknown to this database): tell it again, so the worker registers anew."""
        mono = time.monotonic()
        if mono - self._refenced.get(ev.epoch, float("-inf")) < REFENCE_EVERY:
            return
        if len(self._refenced) > 10_000:
            self._refenced = {e: t for e, t in self._refenced.items() if mono - t < REFENCE_EVERY}
        self._refenced[ev.epoch] = mono
        row = self.store.worker_row(ev.epoch)
        effects.fences.append(Fence(ev.worker, ev.epoch, "this epoch is not live: register anew",
                                    row["dispatch_partition"] if row else -1))

    def _started(self, ev: m.Started, now: float) -> None:
        if not self.store.start(ev, _when(ev, now)):
            self._stale(ev, f"started {ev.task_id} attempt {ev.attempt} is not the current grant")
            return
        self.scheduler.started(ev.epoch, ev.task_id)
        # the worker logs "started" at info for the task's trail; here it would say it twice
        log.debug("task %s attempt %d started on %s", ev.task_id, ev.attempt, ev.worker,
                 extra={"task_id": ev.task_id, "worker_id": ev.worker, "event": "task_started"})

    def _finished(self, ev: m.Finished, now: float) -> None:
        began = self._began.pop((ev.task_id, ev.attempt, ev.epoch), None) or ev.started
        self._ended(ev, self.store.finish(ev, now, _when(ev, now), began), now)

    def _ended(self, ev: m.Finished, outcome: str, now: float) -> None:
        """Act on what the store made of a ``finished``."""
        if outcome == "stale":
            self._stale(ev, f"finished {ev.task_id} attempt {ev.attempt} is not the current grant")
            return
        counted = runs_counted(outcome)
        if counted:
            runs = self._runs.setdefault(ev.epoch, [0, 0, 0])
            for i, n in enumerate(counted):
                runs[i] += n
        # a cancelled run's length says nothing of the task's
        self.scheduler.finished(ev.epoch, ev.task_id, ev.runtime, measured=outcome != "cancelled")
        extra = {"task_id": ev.task_id, "worker_id": ev.worker, "event": f"task_{outcome}"}
        if outcome == "success":  # the worker's line says it at info, with the task's time
            log.debug("task %s succeeded on %s", ev.task_id, ev.worker, extra=extra)
        elif outcome == "cancelled":
            log.info("task %s cancelled on %s", ev.task_id, ev.worker, extra=extra)
        elif outcome == "retry":
            log.info("task %s failed on %s (%s), retrying", ev.task_id, ev.worker,
                     ev.error.type if ev.error else "?", extra=extra)
        else:
            log.warning("task %s failed on %s: %s: %s", ev.task_id, ev.worker,
                        ev.error.type if ev.error else "?", ev.error.message if ev.error else "",
                        extra=extra)
        self._maybe_gone(ev.epoch, now)

    def _bye(self, ev: m.Bye, now: float, effects: Effects) -> None:
        member = self.scheduler.members.get(ev.epoch)
        if ev.confirm:  # after this turn's messages, none of which is a grant to this epoch
            row = None if member else self.store.worker_row(ev.epoch)
            partition = (member.dispatch if member else row["dispatch_partition"] if row
                         else ev.dispatch_partition)
            effects.answers.append(Answer(ev.worker, ev.epoch, partition, left=True))
        if member is None:
            self._stale(ev, "bye from an epoch that is not live")
            return
        if member.accepting:
            self.store.leave(ev.epoch)
            member.accepting = False
            log.info("worker %s leaving: epoch %s handed back %d tasks", ev.worker, ev.epoch,
                     len(ev.handed_back), extra={"worker_id": ev.worker, "event": "worker_leaving"})
        elif ev.handed_back:  # a later part of its bye, or a run that reached it stopping
            log.info("worker %s handed back %d more tasks: epoch %s", ev.worker,
                     len(ev.handed_back), ev.epoch, extra={"worker_id": ev.worker})
        back, cancelled = self.store.hand_back(ev.epoch, ev.handed_back)
        self.scheduler.handed_back(ev.epoch, back + cancelled)
        for task_id in back:
            log.info("task %s re-queued: handed back by %s", task_id, ev.worker,
                     extra={"task_id": task_id, "event": "task_requeued"})
        self._maybe_gone(ev.epoch, now)

    def _maybe_gone(self, epoch: str, now: float) -> None:
        member = self.scheduler.members.get(epoch)
        if member and not member.accepting and member.outstanding == 0:
            self.store.left(epoch, now)
            self.scheduler.remove(epoch)
            log.info("worker %s left: epoch %s", member.worker, epoch,
                     extra={"worker_id": member.worker, "event": "worker_left"})

    def declare_dead(self, epoch: str, reason: str, now: float) -> list[str]:
        """Declare an epoch dead: re-queue (or fail) its tasks and record the failure."""
        member = self.scheduler.remove(epoch)
        requeued = self.store.declare_dead(epoch, reason, now, self.config.server.max_attempts)
        worker = member.worker if member else "?"
        log.warning("worker %s declared dead: epoch %s, %s; %d tasks re-queued", worker, epoch,
                    reason, len(requeued), extra={"worker_id": worker, "event": "worker_dead"})
        for task_id in requeued:
            log.info("task %s re-queued: worker %s declared dead", task_id, worker,
                     extra={"task_id": task_id, "event": "task_requeued"})
        return requeued

    def _stale(self, ev: m.WorkerEvent, why: str) -> None:
        self.store.bump("stale_events")
        task_id = getattr(ev, "task_id", None)
        log.info("stale event from %s epoch %s: %s", ev.worker, ev.epoch, why,
                 extra={"task_id": task_id, "worker_id": ev.worker, "event": "stale_event"})


def _when(ev: m.Started | m.Finished, now: float) -> float:
    """When a task started or ended: the worker's own time in its event, so that an event
    applied again (after a crash, from the changelog's offsets) makes the same row (DESIGN 13);
    the server's time for an event without one."""
    return ev.ts if ev.ts > 0 else now
