"""arq worker: drain jobs over the inbox partitions, delivery retries, and a sweeping cron.

Why not one arq job per transition: arq costs ~0.5 ms of worker CPU per job, so
a job per transition would cap the whole service near 2,000 transitions/s. The
API instead appends transitions to per-partition Redis streams and enqueues a
``drain`` job only when a partition is not already awake; one drain job then
processes up to ``worker_batch`` transitions per round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import signal
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import orjson
from arq import cron
from arq import worker as arq_worker
from arq.connections import ArqRedis
from arq.connections import log_redis_info as _arq_log_redis_info
from arq.constants import in_progress_key_prefix
from arq.typing import WorkerCoroutine
from arq.worker import Worker
from redis.exceptions import AuthenticationError, RedisError, ResponseError, WatchError

from notifier.delivery import publish_broken
from notifier.models import ExceptionCode, Status, Transition, own_event_id
from notifier.outbound import events as hook_events
from notifier.outbound.sender import HookSender
from notifier.pipeline import BatchReport, Pipeline, inject
from notifier.resources import (
    Clock,
    Resources,
    connect_queue,
    open_resources,
    sync_published,
    utc_now,
)
from notifier.settings import Settings
from notifier.store import InboxEntry, keys, wake
from notifier.store.base import Scope, data_error

log = logging.getLogger(__name__)

#: A drain job yields after this long so other partitions' jobs get their turn;
#: it re-wakes its partition first, so nothing waits for the sweeper.
DRAIN_SLICE_S = 5.0
#: On SIGTERM/SIGINT a worker stops taking jobs; its running drains finish the batch in hand
#: (acknowledged, nothing left to re-claim), hand their partition on and end. What is still
#: running after this long is cancelled: its entries are re-claimed after claim_idle_s.
SHUTDOWN_WAIT_S = 10
#: The partition lock's lease, renewed after every batch.
LOCK_MS = 30_000
#: Batches one worker process works on at once, whatever the number of drain jobs: the work
#: is CPU-bound, so more only interleaves them (each finishes later) and holds more memory.
#: Two lets one batch wait on Redis while the other computes.
BATCHES_AT_ONCE = 2
#: An inbox entry handed out this many times without settling goes to the dead-letter stream.
MAX_DELIVERIES = 5
#: How long a drain caught by a Redis outage waits for it before its job fails (the
#: sweep then wakes the partition again once Redis is back).
OUTAGE_WAIT_S = 60.0
#: How often a worker says it is alive (heartbeat file, WORKERS_KEY) while its polls succeed.
HEARTBEAT_S = 5.0
#: Live workers: a sorted set of worker ids by their last heartbeat (epoch ms).
WORKERS_KEY = keys.WORKERS_KEY
#: Due notifications released per round of the release_due cron.
RELEASE_BATCH = 500
#: Partitions (on a cluster) whose due notifications the release_due cron releases at once.
RELEASE_SCOPES = 8


async def _log_redis_info(redis: Any, log_func: Any) -> None:
    # arq's Worker.main() logs the server's version through INFO at start-up.
    # fakeredis (the embedded in-memory store) has no INFO command, so the call
    # would kill the embedded worker before it ran a job; there is no server to
    # describe there, so say so instead. Real Redis goes through arq's own code.
    try:
        await _arq_log_redis_info(redis, log_func)
    except ResponseError as exc:
        if "info" not in str(exc).lower():
            return  # a Redis refusing the URL's database: start-up says so, naming the setting
        log_func("embedded in-memory store (no INFO command)")
    except AuthenticationError:
        return  # refused credentials: start-up says so, naming the setting
    except (RedisError, OSError) as exc:
        # Redis down at start-up: say so; on_startup waits for it
        log.warning("Redis does not answer yet (%s); waiting for it", type(exc).__name__)


arq_worker.log_redis_info = _log_redis_info  # type: ignore[attr-defined]


def stopping(ctx: dict[str, Any]) -> bool:
    """Whether the worker was told to stop (jobs then end at the next batch boundary)."""
    flag: asyncio.Event | None = ctx.get("stopping")
    return flag is not None and flag.is_set()


async def drain(ctx: dict[str, Any], partition: int) -> int:
    """Process a partition's inbox until it is empty; return how many entries it settled.

    One drain per partition at a time (a lock with a lease), so one shipment's
    events are decided in arrival order. A drain that finds the lock taken
    returns at once: the holder re-checks for new entries after letting go.

    A Redis stall or restart does not end it: it waits for Redis (up to
    ``OUTAGE_WAIT_S``), then goes on, reading its own unacknowledged entries first
    (everything it did is safe to do again: commits compare and set, messages are
    claimed once).
    """
    res: Resources = ctx["res"]
    if not 0 <= partition < res.settings.partitions:
        # Enqueued by a process with another NOTIFIER_PARTITIONS: an API with more, during a
        # rolling change of the count (APIs first). This worker has no consumer group there
        # (on a cluster, no slot: start-up refuses another count there); its entries wait,
        # kept, for a worker with that count, whose sweep wakes the partition.
        log.warning(
            "a drain job for partition %d, but NOTIFIER_PARTITIONS is %d here: left for a "
            "worker with that many (every process should have the same count)",
            partition,
            res.settings.partitions,
        )
        return 0
    token = uuid.uuid4().hex
    started = time.monotonic()
    resume = False
    done = 0
    while True:
        try:
            return done + await _drain(ctx, partition, token, started, resume)
        except (RedisError, OSError) as exc:
            await wait_for_redis(res, exc, f"drain of partition {partition}", OUTAGE_WAIT_S)
            resume = True


async def wait_for_redis(res: Resources, exc: BaseException, what: str, limit_s: float) -> None:
    """Wait, with backoff, until Redis answers again; re-raise ``exc`` after ``limit_s``."""
    log.warning("%s: Redis failed (%s); waiting for it", what, type(exc).__name__)
    deadline = time.monotonic() + limit_s
    delay = 0.05
    while True:
        await asyncio.sleep(delay * random.uniform(0.5, 1.0))
        try:
            await res.redis.ping()
            await res.queue.ping()
            # A restarted Redis without persistence lost the consumer groups: make them
            # again (a write: it also waits out a pause of writes only, as FAILOVER makes)
            await res.store.ensure_groups()
        except (RedisError, OSError):
            if time.monotonic() > deadline:
                raise exc from None
            delay = min(delay * 2, 2.0)
            continue
        log.warning("%s: Redis answers again, going on", what)
        return


async def _drain(
    ctx: dict[str, Any], partition: int, token: str, started: float, resume: bool
) -> int:
    res: Resources = ctx["res"]
    store = res.store
    done = 0
    while await store.lock(partition, token, LOCK_MS):
        try:
            done += await _drain_locked(ctx, partition, token, started, resume)
            resume = False
        finally:
            with contextlib.suppress(RedisError, OSError):  # else the lease runs out
                await store.unlock(partition, token)
        # Let go, forget the wake-up, then look once more: an entry that arrived after
        # our last read either shows up here or its ingest wins the wake flag and
        # enqueues a drain that finds the lock free.
        await store.clear_wake(partition)
        if stopping(ctx) or time.monotonic() - started > DRAIN_SLICE_S:
            # yield to other partitions' jobs, or (shutting down) to another worker
            if await store.needs_drain(partition, _stale_ms(res)) and await store.set_wake(
                partition
            ):
                await wake(res.queue, [partition])
            break
        if not await store.needs_drain(partition, _stale_ms(res)):
            break
    return done


def _stale_ms(res: Resources) -> int:
    return int(res.settings.claim_idle_s * 1000)


async def _drain_locked(
    ctx: dict[str, Any], partition: int, token: str, started: float, resume: bool
) -> int:
    res: Resources = ctx["res"]
    store, settings = res.store, res.settings
    done = 0
    batches: asyncio.Semaphore = ctx["batches"]
    size = settings.worker_batch
    # after an outage: what this drain had read and not settled, before anything new
    entries = await store.read_own_pending(partition, ctx["consumer"], size) if resume else []
    entries += await _reclaim(res, partition, ctx["consumer"])
    while True:
        async with batches:  # read only once it is our turn: the batch holds what came meanwhile
            if len(entries) < size:
                entries += await store.read_inbox(partition, ctx["consumer"], size - len(entries))
            outcome = await _process(ctx["pipeline"], entries) if entries else Processed()
            if outcome.invalid:
                await store.bury(partition, outcome.invalid, "not a valid transition")
            await store.ack(partition, [e.entry_id for e in outcome.settled])
            now_ms = int(res.clock().timestamp() * 1000)
            for until, waiting in outcome.waiting_by_second().items():
                await store.keep_waiting(
                    partition, ctx["consumer"], waiting, _stale_ms(res), until - now_ms
                )
        done += len(outcome.settled)
        dry = len(entries) < size  # the partition had no more than this
        entries = []
        if stopping(ctx) or not await store.lock(partition, token, LOCK_MS):  # renew the lease
            break
        if time.monotonic() - started > DRAIN_SLICE_S:
            break  # (before a linger: what it reads is processed in the next round)
        if dry and not (entries := await _linger(res, partition, ctx["consumer"], started)):
            break
    return done


async def _linger(
    res: Resources, partition: int, consumer: str, started: float
) -> list[InboxEntry]:
    """Wait a moment for a dry partition's next entry, outside the batch semaphore (a quiet
    partition holds no turn): under a trickle the drain picks it up itself instead of a
    new job at arq's next poll. At most half the Redis timeout: it is a blocking read."""
    settings = res.settings
    wait_s = min(
        settings.worker_linger_s,
        settings.redis_timeout_s / 2,
        DRAIN_SLICE_S - (time.monotonic() - started),
    )
    if wait_s <= 0:
        return []
    return await res.store.read_inbox(partition, consumer, 1, block_ms=max(1, int(wait_s * 1000)))


async def _reclaim(res: Resources, partition: int, consumer: str) -> list[InboxEntry]:
    """Entries a dead or stuck drain left behind; those failing again and again are buried."""
    entries = await res.store.claim_stale(
        partition, consumer, _stale_ms(res), res.settings.worker_batch
    )
    if not entries:
        return []
    counts = await res.store.delivery_counts(partition, [e.entry_id for e in entries])
    poison = [e for e in entries if counts.get(e.entry_id, 0) > MAX_DELIVERIES]
    if poison:
        log.error(
            "partition %d: %d entries failed %d times; moved to %s",
            partition,
            len(poison),
            MAX_DELIVERIES,
            "the inbox dead letters",
        )
        await res.store.bury(partition, poison, f"failed {MAX_DELIVERIES} times")
    return [e for e in entries if e not in poison]


@dataclass
class Processed:
    """What became of a batch's entries: settled (to acknowledge), no valid transition (to
    set aside), or waiting for another claim on one of their messages (pending still)."""

    settled: list[InboxEntry] = field(default_factory=list)
    invalid: list[InboxEntry] = field(default_factory=list)
    waiting: list[InboxEntry] = field(default_factory=list)
    #: per waiting entry, when the last claim it waits for runs out unless renewed, or its
    #: messages' undone claims are worth trying again (epoch ms)
    waiting_until: dict[str, int] = field(default_factory=dict)

    def add(self, entries: list[InboxEntry], report: BatchReport) -> None:
        for e in entries:
            if e in report.invalid:
                self.invalid.append(e)
            elif e.entry_id in report.unsettled:
                self.waiting.append(e)
                self.waiting_until[e.entry_id] = report.unsettled_until[e.entry_id]
            else:
                self.settled.append(e)

    def waiting_by_second(self) -> dict[int, list[str]]:
        """The waiting entries' ids by when they are worth trying again (epoch ms, rounded
        up to the second: a few calls of ``keep_waiting`` a batch)."""
        by: dict[int, list[str]] = {}
        for e in self.waiting:
            until = self.waiting_until.get(e.entry_id, 0)
            by.setdefault(-(-until // 1000) * 1000, []).append(e.entry_id)
        return by


async def _process(pipeline: Pipeline, entries: list[InboxEntry]) -> Processed:
    """Run a batch; if it fails for a reason other than Redis, run its entries one by one
    so a single bad entry cannot hold back the rest (an entry that fails alone stays
    pending, is retried later, and is set aside once it failed ``MAX_DELIVERIES`` times).
    A script of the store failing on what it read (a damaged shipment record) is such a
    reason (``data_error``), not a Redis outage: waiting for Redis would retry the same
    batch forever, and hold up its partition."""
    outcome = Processed()
    try:
        outcome.add(entries, await pipeline.process(entries))
        return outcome
    except Exception as exc:
        if isinstance(exc, (RedisError, OSError)) and not data_error(exc):
            raise
        _log_failure(f"a batch of {len(entries)} entries", exc)
    #: the shipments whose entries a script failed on alone, and the last such failure
    failed_on: set[bytes] = set()
    last: BaseException | None = None
    for entry in entries:
        try:
            report = await pipeline.process([entry])
        except Exception as exc:
            if isinstance(exc, (RedisError, OSError)):
                if not data_error(exc):
                    raise
                failed_on.add(_shipment_of(entry))
                last = exc
            _log_failure(f"entry {entry.entry_id} (stays pending, retried later)", exc)
            continue
        outcome.add([entry], report)
    if last is not None and not outcome.settled and len(failed_on) > 1:
        # Every entry failed in a script, on more than one shipment: not one damaged record
        # but the scripts themselves (a release's bug, a version that cannot read what a
        # newer one wrote). Hold the entries, as for an outage, instead of setting them
        # all aside one by one.
        raise last
    return outcome


def _shipment_of(entry: InboxEntry) -> bytes:
    """An entry's merchant and shipment, as it came in (whatever else it holds)."""
    try:
        t = orjson.loads(entry.payload)
        return orjson.dumps([t.get("merchant_id"), t.get("shipment_id")])
    except (orjson.JSONDecodeError, AttributeError):
        return entry.entry_id.encode()


def _log_failure(what: str, exc: BaseException) -> None:
    # The frames, not the message: an exception message may quote customer data.
    frames = "".join(traceback.format_tb(exc.__traceback__))
    log.error("%s failed with %s\n%s", what, type(exc).__name__, frames)


def _tick(job: Callable[[dict[str, Any]], Awaitable[int]]) -> WorkerCoroutine:
    """A cron job that a Redis outage skips with one line (the next tick tries again),
    instead of a failed job and its traceback every few seconds."""

    @functools.wraps(job)
    async def tick(ctx: dict[str, Any]) -> int:
        try:
            return await job(ctx)
        except (RedisError, OSError) as exc:
            log.warning("%s: Redis failed (%s); the next tick tries again", job.__name__, exc)
            return 0

    return cast(WorkerCoroutine, tick)


@_tick
async def release_due(ctx: dict[str, Any]) -> int:
    """Send what is due: messages held for quiet hours or coalescing, and retries.

    The due index is written by the same script that records the decision, so a
    deferred message cannot be lost between deciding and scheduling. Each is
    claimed, checked (a newer state or an opt-out cancels it) and sent.

    On a cluster each partition's index is released side by side (``RELEASE_SCOPES``
    at once): a partition whose master is slow to answer, or whose replica does not
    confirm a claim in time (``NOTIFIER_INGEST_WAIT_REPLICAS``), holds up only its own.
    One that fails fails the tick once the others are done (the next tick tries again).
    """
    res: Resources = ctx["res"]
    pipeline: Pipeline = ctx["pipeline"]
    now_ms = int(res.clock().timestamp() * 1000)
    at_once = asyncio.Semaphore(RELEASE_SCOPES)

    async def release(scope: Scope) -> int:
        done = 0
        async with at_once:
            while not stopping(ctx) and (ids := await res.store.due(now_ms, RELEASE_BATCH, scope)):
                report = await pipeline.deliverer.deliver(ids, due=True, scope=scope)
                waiting = set(report.busy) | set(report.deferred)
                settled = [i for i in ids if i not in waiting]
                await res.store.unschedule(settled, now_ms, scope)
                done += len(settled)
                if len(settled) < len(ids) or len(ids) < RELEASE_BATCH:
                    break  # the rest waits for a live claim elsewhere: next tick
        return done

    # one due index, or one per partition on a cluster
    scopes = res.store.scopes
    outcomes = await asyncio.gather(*(release(s) for s in scopes), return_exceptions=True)
    failed = {s: o for s, o in zip(scopes, outcomes, strict=True) if isinstance(o, BaseException)}
    if failed:  # a bug's error before an outage's: the tick skips only an outage
        raised = next(
            (e for e in failed.values() if not isinstance(e, (RedisError, OSError))),
            next(iter(failed.values())),
        )
        for scope, exc in failed.items():
            if exc is not raised:  # the tick reports the one raised
                log.warning("release_due: partition %s failed too (%s)", scope, type(exc).__name__)
        raise raised
    return sum(cast(list[int], outcomes))


@_tick
async def find_stalled(ctx: dict[str, Any]) -> int:
    """Turn shipments that stopped moving into one ``exception/delayed`` transition each.

    The stall index (a sorted set by deadline, kept by the commit script) is read, not
    every shipment. The transition goes through ingest with an event id fixed by the
    stall's deadline, so a shipment stalled once is told once, however often this runs.
    """
    res: Resources = ctx["res"]
    now = res.clock()
    due = await res.store.due_stalls(int(now.timestamp() * 1000), limit=500)
    tick = timedelta(milliseconds=1)
    if not due:
        return 0
    states = await res.store.load_states([(m, s) for m, s, _ in due])
    items = []
    for (merchant_id, shipment_id, deadline_ms), (_, state) in zip(due, states, strict=True):
        last_scan = state.last_scan_at if state is not None else None
        if state is None or last_scan is None or state.tracking_number is None or not state.carrier:
            await res.store.drop_stall(merchant_id, shipment_id, deadline_ms)
            continue
        t = Transition(
            event_id=own_event_id(hook_events.STALLED_PREFIX, deadline_ms, shipment_id),
            merchant_id=merchant_id,
            shipment_id=shipment_id,
            tracking_number=state.tracking_number,
            carrier=state.carrier,
            status=Status.EXCEPTION,
            exception_code=ExceptionCode.DELAYED,
            # Just after the last real scan, not "now": a scan the carrier uploads late
            # must still count as news and move the shipment on.
            occurred_at=last_scan + tick,
            estimated_delivery=state.estimated_delivery,
            tracking_url=state.tracking_url,
            order=state.order,
            carrier_description=state.stall_reason(
                deadline_ms, res.policies.for_merchant(merchant_id).stalled.no_scan_hours
            ),
        )
        items.append(t)
    await inject(res, items, "stall-check")
    for merchant_id, shipment_id, deadline_ms in due:
        await res.store.drop_stall(merchant_id, shipment_id, deadline_ms)
    log.info("%d stalled shipments found", len(items))
    return len(items)


@_tick
async def send_hooks(ctx: dict[str, Any]) -> int:
    """Post the merchant webhook events that are due (``outbound.sender``)."""
    sender: HookSender = ctx["hooks"]
    return await sender.run(lambda: stopping(ctx))


@_tick
async def send_digests(ctx: dict[str, Any]) -> int:
    """Send the weekly digests that are due (``insights.digest``)."""
    from notifier.insights import digest  # imported by this tick only

    return await digest.send_due(ctx["res"])


@_tick
async def sweep(ctx: dict[str, Any]) -> int:
    """Wake partitions with unread or abandoned entries (a lost wake-up, a crashed worker)."""
    res: Resources = ctx["res"]
    stale_ms = int(res.settings.claim_idle_s * 1000)
    woken = [
        p
        for p in range(res.settings.partitions)
        if await res.store.needs_drain(p, stale_ms) and await res.store.set_wake(p)
    ]
    await wake(res.queue, woken)
    # an idle worker too tells /healthz of merchants' files fixed or removed meanwhile, on
    # disk or published from the editor (on the loop, as renders look: in a thread the
    # look would drop caches under a render)
    await sync_published(res, list(res.renderer.disabled))
    res.renderer.refresh()
    await publish_broken(res)
    return len(woken)


#: a consumer idle this long with no entry pending is a stopped worker's (a live one removed
#: while idle is made again by its next read)
CONSUMER_IDLE_MS = 3600 * 1000


@_tick
async def forget_consumers(ctx: dict[str, Any]) -> int:
    """Remove stopped workers' consumers from the inbox groups (each start reads under a
    new name); those still holding entries stay until another worker takes them over."""
    res: Resources = ctx["res"]
    removed = 0
    for p in range(res.settings.partitions):
        removed += await res.store.forget_consumers(p, CONSUMER_IDLE_MS, ctx["consumer"])
    if removed:
        log.info("removed %d idle consumers of stopped workers from the inbox groups", removed)
    return removed


class ResilientWorker(Worker):
    """arq's Worker, riding out Redis stalls and restarts instead of exiting.

    arq's poll loop lets any Redis error escape ``main()``: a 3-second ``CLIENT PAUSE``
    ended the process. Here a failed poll waits (backoff up to 5 s) and polls again;
    running jobs carry on, and a drain caught by the outage waits for Redis itself.
    """

    _outage_since: float | None = None
    _outage_delay = 0.05
    #: set once the worker is told to stop (``handle_sig``), and the task that waits for
    #: the running jobs before that (held here: arq does not keep it)
    _stop_now = False
    _stopping_task: asyncio.Task[None] | None = None
    #: a file touched every few seconds while polls succeed (a container's health check)
    heartbeat: Path | None = None
    _last_beat = 0.0

    async def _poll_iteration(self) -> None:
        if self._stop_now:
            # told to stop, yet polling: the cancellation was lost (asyncio's timeouts inside
            # redis-py can turn a cancel into a TimeoutError, which reads as an outage), and
            # the worker would poll on for good, taking no job
            raise asyncio.CancelledError
        # a poll asks Redis only while the worker takes jobs and has a free slot: one that
        # did not proves nothing ("Redis answers again after 0.1 s", with Redis dead and
        # every slot's drain waiting for it, or after a stop signal)
        asks = self.allow_pick_jobs and self.job_counter < self.max_jobs
        try:
            await super()._poll_iteration()
        except (RedisError, OSError) as exc:
            now = time.monotonic()
            if self._outage_since is None:
                self._outage_since = now
                log.warning("Redis failed (%s); the worker waits for it", type(exc).__name__)
            await asyncio.sleep(self._outage_delay * random.uniform(0.5, 1.0))
            self._outage_delay = min(self._outage_delay * 2, 5.0)
            return
        if self._outage_since is not None and asks:
            log.warning("Redis answers again after %.1f s", time.monotonic() - self._outage_since)
            self._outage_since, self._outage_delay = None, 0.05
        if time.monotonic() - self._last_beat >= HEARTBEAT_S:
            self._last_beat = time.monotonic()
            await self._beat()

    async def _beat(self) -> None:
        """Say this worker is alive: in Redis (the API's /readyz counts live workers) and
        in the heartbeat file, if any (a container's health check)."""
        res: Resources | None = self.ctx.get("res")
        if res is not None:
            now_ms = int(res.clock().timestamp() * 1000)
            with contextlib.suppress(RedisError, OSError):  # the next poll says it
                async with res.redis.pipeline(transaction=False) as pipe:
                    pipe.zadd(WORKERS_KEY, {self.ctx["consumer"]: now_ms})
                    pipe.zremrangebyscore(WORKERS_KEY, "-inf", now_ms - 3600_000)
                    await pipe.execute()
        if self.heartbeat is not None:
            try:
                self.heartbeat.touch()
            except OSError as exc:  # the health check will say so; the work goes on
                log.error("cannot touch the heartbeat file %s: %s", self.heartbeat, exc.strerror)

    def handle_sig_wait_for_completion(self, signum: signal.Signals) -> None:
        """SIGTERM/SIGINT: take no new job; running drains end after the batch in hand (the
        flag is one object: every job's ctx is a copy of this one)."""
        log.info(
            "%s: taking no new jobs; %d running end after their batch (at most %d s; while "
            "Redis does not answer, longer: what a provider accepted is recorded first)",
            signal.Signals(signum).name,
            sum(not t.done() for t in self.tasks.values()),
            SHUTDOWN_WAIT_S,
        )
        self.ctx["stopping"].set()
        self.allow_pick_jobs = False
        waiting = self._wait_for_tasks_to_complete(signum=signal.Signals(signum))
        self._stopping_task = self.loop.create_task(waiting)

    def handle_sig(self, signum: signal.Signals) -> None:
        self._stop_now = True
        super().handle_sig(signum)

    async def _wait_for_tasks_to_complete(self, signum: signal.Signals) -> None:
        try:
            await super()._wait_for_tasks_to_complete(signum)  # then cancels the poll loop
        finally:
            self._stop_now = True

    async def close(self) -> None:
        res: Resources | None = self.ctx.get("res")
        if res is not None and "consumer" in self.ctx:
            with contextlib.suppress(RedisError, OSError):
                await res.redis.zrem(WORKERS_KEY, self.ctx["consumer"])
        try:
            await super().close()
        except (RedisError, OSError) as exc:
            # stopped while Redis is down: arq's health-check key cannot be deleted (it
            # expires by itself); the rest of arq's close still runs, and the exit is 0
            if not isinstance(exc, (AuthenticationError, ResponseError)):  # (refused: said)
                log.warning("stopping while Redis is down (%s)", type(exc).__name__)
            if self.on_shutdown:
                await self.on_shutdown(self.ctx)
            with contextlib.suppress(RedisError, OSError):
                await self.pool.close(close_connection_pool=True)
            self._pool = None

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """arq's job start, with the job slot (semaphore and counter) owned explicitly: the
        slot goes to the job's task once that task exists, and is given back otherwise,
        whatever fails. arq gives it back on a WATCH conflict only, so a Redis error kept it
        for good (after max_jobs of them the worker never started a job again); releasing it
        on every error instead released twice when the error came after the slot was given
        back already (UNWATCH on a dead connection)."""
        for raw in job_ids:
            await self.sem.acquire()
            if self.job_counter >= self.max_jobs:
                self.sem.release()
                return
            self.job_counter += 1
            score: int | None = None
            try:
                score = await self._claim_job(raw.decode())
            finally:
                if score is None:
                    self.job_counter -= 1
                    self.sem.release()
            if score is not None:
                job_id = raw.decode()
                task = asyncio.get_running_loop().create_task(self.run_job(job_id, score))
                task.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
                self.tasks[job_id] = task

    async def _claim_job(self, job_id: str) -> int | None:
        """Mark the job in progress (the queue's score when this worker got it), or None when
        it runs elsewhere, is gone, or is due later."""
        in_progress = in_progress_key_prefix + job_id
        async with self.pool.pipeline(transaction=True) as pipe:
            await pipe.watch(in_progress)
            running = await pipe.exists(in_progress)
            score = await pipe.zscore(self.queue_name, job_id)
            if running or not score or score > time.time() * 1000:
                return None
            pipe.multi()  # type: ignore[no-untyped-call]
            pipe.psetex(in_progress, int(self.in_progress_timeout_s * 1000), b"1")
            try:
                await pipe.execute()
            except (ResponseError, WatchError):
                return None  # started elsewhere meanwhile
        return int(score)


#: at most this many listed merchants are judged again at start-up (about a second each)
JUDGE_AT_START = 50


async def judge_listed(res: Resources) -> None:
    """At start-up, judge again the merchants ``/healthz`` counts as having broken files.

    A running worker clears a merchant when it sees the files edited or removed; a worker
    started after the fix (or the folder's removal) never saw the files broken, so without
    this the merchant stayed counted for up to a day. Files still broken stay counted, and
    a worker that meets them again counts them again."""
    from notifier.check import unusable_files  # the checker's renderer: only when needed

    try:
        now_ms = int(res.clock().timestamp() * 1000)
        listed = (await res.store.overrides_listed(now_ms))[:JUDGE_AT_START]
        if not listed:
            return
        await res.published.sync(listed)
        fixed = []
        for merchant_id in listed:
            files = res.published.files(merchant_id)
            try:
                problems = await asyncio.to_thread(unusable_files, res.settings, merchant_id, files)
            except Exception as exc:  # a check that fails leaves the merchant counted
                log.warning("merchant %s: files not judged (%r)", merchant_id, exc)
                continue
            if not problems:
                fixed.append(merchant_id)
        if fixed:
            await res.store.publish_overrides((), fixed, now_ms)
        log.info(
            "start-up: %d merchants counted with broken files judged again, %d of them fixed",
            len(listed),
            len(fixed),
        )
    except Exception as exc:  # Redis went away (or a bug): they stay counted, as before
        log.warning("start-up: merchants' broken files not judged again (%r)", exc)


def build_worker(
    settings: Settings,
    *,
    resources: Resources | None = None,
    burst: bool = False,
    handle_signals: bool = True,
    poll_delay_s: float | None = None,
    clock: Clock = utc_now,
    heartbeat: Path | None = None,
) -> Worker:
    """An arq Worker for ``settings``.

    With ``resources`` (embedded mode, tests) the worker shares them and gets its
    own connection to the same Redis; otherwise it builds its own at start-up.
    """

    async def on_startup(ctx: dict[str, Any]) -> None:
        stack = AsyncExitStack()
        res = (
            resources
            if resources is not None
            else await stack.enter_async_context(open_resources(settings, clock=clock))
        )
        ctx.update(
            res=res,
            stack=stack,
            pipeline=Pipeline(res),
            hooks=HookSender(
                res.store, res.clock, allow_private=settings.merchant_hooks_allow_private
            ),
            consumer=uuid.uuid4().hex,
            # arq hands every job a copy of ctx: this one object is what they share
            batches=asyncio.Semaphore(BATCHES_AT_ONCE),
        )
        delay = 0.1
        while True:  # Redis down at start-up: wait for it rather than exit
            try:
                await res.store.ensure_groups()
                await res.link_secret()  # the key this worker signs unsubscribe links with
                break
            except (RedisError, OSError) as exc:
                log.warning("start-up: Redis does not answer (%s); retrying", type(exc).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

        ctx["judging"] = asyncio.create_task(judge_listed(res))

    async def on_shutdown(ctx: dict[str, Any]) -> None:
        if "judging" in ctx:
            ctx["judging"].cancel()
        if "pipeline" in ctx:
            await ctx["pipeline"].deliverer.stop()
        if "hooks" in ctx:  # else start-up stopped before (a refused setting)
            await ctx["hooks"].close()
            await ctx["stack"].aclose()

    pool: ArqRedis = connect_queue(settings, resources.server if resources else None)
    worker = ResilientWorker(
        functions=[drain],
        cron_jobs=[
            cron(sweep, second=set(range(0, 60, 15)), run_at_startup=True),
            cron(release_due, second=set(range(0, 60, 5)), run_at_startup=True),
            cron(find_stalled, second={30}, run_at_startup=True),
            cron(send_hooks, second=set(range(2, 60, 5))),
            cron(send_digests, minute={7}, second={0}),
            cron(forget_consumers, minute={23}, second={0}),
        ],
        redis_pool=pool,
        on_startup=on_startup,
        on_shutdown=on_shutdown,
        burst=burst,
        handle_signals=handle_signals,
        poll_delay=settings.worker_poll_delay_s if poll_delay_s is None else poll_delay_s,
        max_jobs=settings.worker_max_jobs,
        job_completion_wait=SHUTDOWN_WAIT_S,
        keep_result=60,
        max_tries=5,
        ctx={"stopping": asyncio.Event()},
    )
    worker.heartbeat = heartbeat
    return worker
