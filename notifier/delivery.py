"""Delivery: claim notifications in the ledger, render them, hand them to their channel, record."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from redis.exceptions import RedisError

from notifier import metrics
from notifier.channels import Channel, Outcome, Outgoing, Receipt
from notifier.channels.base import ClaimLapsed, Lease, lease_clock
from notifier.errors import PermanentDeliveryError, RenderError, TemporaryDeliveryError
from notifier.insights import counts
from notifier.insights.counts import Count
from notifier.models import (
    UNREADABLE,
    ChannelKind,
    Decision,
    Notification,
    message_name,
    news_rank,
    notification_id,
    notification_of,
    unreadable,
    waiting_payload,
)
from notifier.models import Outcome as Decided
from notifier.outbound import events as hook_events
from notifier.policy.engine import no_longer_news, opt_out_key
from notifier.render import Message, SmsMessageOut
from notifier.resources import Resources, sync_published
from notifier.state import ShipmentState
from notifier.store import Claim, ClaimResult, Scope

log = logging.getLogger(__name__)

#: How long a claim protects a notification being sent, plus one provider timeout; after
#: it, another worker may retry. Fixed, whatever the size of a round: the holder renews its
#: claims every ``RENEW_EVERY_S`` while its round runs, so a worker that died holds its
#: messages up for about a minute, not for as long as its round might have taken.
LEASE_MS = 60_000
#: How often a round renews the claims it still holds.
RENEW_EVERY_S = 20.0
MAX_ATTEMPTS = 8
#: Sends in flight at once per channel (the provider channels' own limit).
SEND_CONCURRENCY = 16
#: A round whose rendering took longer than this renews its claims before it sends.
RENEW_AFTER_S = 5.0
#: How much sooner than its claims' lease runs out a round stops handing messages to a
#: channel (``channels.Lease``): other workers judge the lease by their own clocks.
LEASE_MARGIN_S = 5.0
#: how soon a stopping worker tries Redis again, at first, to record what was accepted
SETTLE_RETRY_S = 0.2


def backoff_s(attempt: int, retry_after_s: float | None = None) -> float:
    """Exponential backoff with full jitter, never sooner than the provider asked."""
    ceiling = min(3600.0, 5.0 * 2 ** max(attempt - 1, 0))
    delay = random.uniform(ceiling / 2, ceiling)
    return max(delay, retry_after_s or 0.0)


@dataclass
class DeliveryReport:
    """What one delivery round did."""

    sent: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    retrying: list[str] = field(default_factory=list)
    #: not settled yet: claimed by another worker whose lease is still running, or claimed
    #: by this round without the replicas confirming it (undone; also in ``unconfirmed``)
    busy: list[str] = field(default_factory=list)
    #: each busy one's time (epoch ms): when the lease it waits for runs out unless
    #: renewed, or its undone claim is worth trying again
    busy_until: dict[str, int] = field(default_factory=dict)
    #: claims the replicas did not confirm in time (``NOTIFIER_INGEST_WAIT_REPLICAS``)
    unconfirmed: list[str] = field(default_factory=list)
    #: waiting for their due time on the due index
    deferred: list[str] = field(default_factory=list)
    #: dropped before sending: superseded by a newer state, or opted out
    cancelled: list[str] = field(default_factory=list)
    skipped: int = 0
    #: the channel of each notification claimed (metrics)
    channels: dict[str, str] = field(default_factory=dict)


@dataclass(eq=False)
class _Unrecorded:
    """Messages a channel accepted, to record as sent (``Ledger.mark_sent``'s arguments):
    kept until Redis took the record, so a Redis failure never hands them back to be sent
    again."""

    owner: str
    scope: Scope
    sent: list[tuple[str, str, str]]
    said: dict[str, str]
    where: dict[str, tuple[str, str]]
    counted: dict[str, str]
    day: str
    last_sms: dict[str, tuple[str, str]]
    #: each one's channel (metrics)
    channels: dict[str, str]
    #: the round's lease: recording them still counts while it holds (afterwards another
    #: worker may take the claims over, and send them)
    fence: Lease | None = None


async def publish_broken(res: Resources) -> None:
    """Tell ``/healthz`` the merchants whose own files this process met broken, and those
    whose files it saw change (to be judged again), since the last call."""
    hits, cleared = res.renderer.take_changes()
    if hits or cleared:
        try:
            await res.store.publish_overrides(hits, cleared, int(res.clock().timestamp() * 1000))
        except BaseException:
            res.renderer.put_back(hits, cleared)  # told next time
            raise


class Deliverer:
    """Sends notifications at most once each: the ledger claim is the gate."""

    def __init__(self, res: Resources) -> None:
        self.res = res
        #: Messages a provider accepted whose record Redis failed in the middle of a round:
        #: recorded first thing in the next round, under the claims that round made (they
        #: are not handed back, so nobody sends them again while the claims last).
        self._unrecorded: list[_Unrecorded] = []
        #: The claims of rounds Redis failed in the middle of, by owner token: nobody sends
        #: them any more, so they are handed back at the next round instead of waiting out
        #: their lease (a minute or more), which held back their inbox entries until those
        #: were buried as failing. (Any other failure keeps the lease: it may repeat.)
        self._abandoned: dict[str, tuple[Scope, list[str]]] = {}
        #: a round's taking up of other partitions' leftovers, on the side (one at a time)
        self._others: asyncio.Task[None] | None = None
        #: per round (owner token), the notifications it handed to a channel so far
        self._handed: dict[str, set[str]] = {}

    async def deliver(
        self,
        notification_ids: Sequence[str],
        *,
        due: bool = False,
        states: Mapping[tuple[str, str], ShipmentState] | None = None,
        built: Mapping[str, Notification] | None = None,
        timing: Mapping[str, tuple[float, float]] | None = None,
        scope: Scope = None,
    ) -> DeliveryReport:
        """Claim, check, render and send; failures are recorded, retries scheduled.

        ``due=True`` (the release_due cron) also claims deferred notifications whose
        time has come. Before sending, a notification overtaken by a newer message on
        its channel, or whose address has opted out since, is cancelled instead.
        ``states`` saves a read when the caller already holds the shipments' states, and
        ``built`` a parse when it holds the notifications (as committed to the ledger);
        ``timing`` (when the API accepted each one's transition, and when it was decided:
        Unix seconds) times them for the metrics. ``scope``: the partition of every one of
        them, on a Redis Cluster (``Store.scope_of``).
        """
        # What earlier rounds left: this partition's first (a failure raises, as Redis is
        # what this round needs); on a cluster, the other partitions' on the side, so a
        # partition whose master is away holds up no round of another, and what its
        # providers accepted is still recorded as soon as it is back, by whichever round
        await self._take_up(scope, raising=True)
        if (self._others is None or self._others.done()) and self._leftovers() - {scope}:
            self._others = asyncio.create_task(self._take_up_others(scope))
        # Whoever holds a claim owns it; a claim carries its holder's token.
        owner = uuid.uuid4().hex
        try:
            report = await self._round(
                owner, notification_ids, due, states or {}, built or {}, scope
            )
        except (RedisError, OSError, asyncio.CancelledError):
            # The claims of messages never handed to a channel go back (at the next round,
            # or as a stopping worker ends: ``stop``); those handed to one stay claimed:
            # what was accepted is recorded from ``_unrecorded``, and the rest waits out
            # the lease (an answer lost in flight may have been an acceptance).
            handed = self._handed.get(owner, set())
            rest = [nid for nid in notification_ids if nid not in handed]
            if rest:
                self._abandoned[owner] = (scope, rest)
            raise
        finally:
            self._handed.pop(owner, None)
        _count(report, timing or {})
        return report

    def _leftovers(self) -> set[Scope]:
        """The partitions earlier rounds left something of (``_take_up``)."""
        return {r.scope for r in self._unrecorded} | {a[0] for a in self._abandoned.values()}

    async def _take_up(self, scope: Scope, *, raising: bool) -> None:
        """Record as sent what a provider accepted in a round Redis failed in, then hand
        back the rest of such rounds' claims: those of ``scope``. Each is taken off its
        list first, so concurrent rounds never do one twice; one Redis still fails is put
        back, and raised when ``raising``."""
        for record in list(self._unrecorded):
            if record.scope != scope or record not in self._unrecorded:
                continue
            self._unrecorded.remove(record)
            try:
                await self._mark_sent(record)
            except (RedisError, OSError, asyncio.CancelledError) as exc:
                self._unrecorded.append(record)  # (cancelled: a stop; ``stop`` records it)
                if raising or isinstance(exc, asyncio.CancelledError):
                    raise
                return  # the partition is still away: its leftovers wait
            for nid, _, _ in record.sent:
                metrics.deliveries(record.channels.get(nid, "unknown"), "sent")
            log.info(
                "recorded as sent now: %d messages a provider accepted while Redis did not "
                "answer (each whose claim this worker still held)",
                len(record.sent),
            )
        for token in list(self._abandoned):
            # as if claimed long ago: the next claim takes over those this token still
            # holds, as possibly sent (the outbox looks for its file first)
            abandoned = self._abandoned.get(token)
            if abandoned is None or abandoned[0] != scope:
                continue
            del self._abandoned[token]
            try:
                await self.res.store.release(abandoned[1], token, abandoned[0])
            except (RedisError, OSError, asyncio.CancelledError) as exc:
                self._abandoned[token] = abandoned
                if raising or isinstance(exc, asyncio.CancelledError):
                    raise
                return

    async def _take_up_others(self, scope: Scope) -> None:
        """``_take_up`` for every partition but ``scope``, one after another, keeping what
        still fails for a later round (a round of another partition started this)."""
        try:
            for other in self._leftovers() - {scope}:
                await self._take_up(other, raising=False)
        except Exception as exc:  # a bug: the leftovers wait for their own partition's round
            log.error("taking up other partitions' leftovers failed: %s", type(exc).__name__)

    async def settle(self) -> None:
        """Let the taking up of other partitions' leftovers under way end."""
        if self._others is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._others

    async def stop(self) -> None:
        """Shutting down: ``settle``, then record what providers accepted in rounds Redis
        failed in (a drain cancelled by the stop while Redis hung too), trying again while
        Redis is away, for as long as their claims are still this worker's: gone with the
        process, they were sent again once the claims lapsed. Then hand back such rounds'
        other claims, if Redis answers (else their lease ends them)."""
        await self.settle()
        delay, told = SETTLE_RETRY_S, False
        while self._unrecorded:
            for scope in {r.scope for r in self._unrecorded}:
                await self._take_up(scope, raising=False)
            lapsed = [r for r in self._unrecorded if r.fence is None or not r.fence.open()]
            for record in lapsed:
                self._unrecorded.remove(record)
                log.error(
                    "%d messages a provider accepted could not be recorded as sent before "
                    "their claims lapsed (Redis did not answer): another worker may send "
                    "them again",
                    len(record.sent),
                )
            if not self._unrecorded:
                break
            if not told:
                waiting = sum(len(r.sent) for r in self._unrecorded)
                longest = max(r.fence.until for r in self._unrecorded if r.fence is not None)
                log.warning(
                    "stopping: %d messages a provider accepted wait for Redis to record them "
                    "as sent (for up to %.0f s, while their claims last)",
                    waiting,
                    max(0.0, longest - lease_clock()),
                )
                told = True
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
        for scope in {a[0] for a in self._abandoned.values()}:
            await self._take_up(scope, raising=False)  # one try: else their lease ends them

    async def _mark_sent(self, record: _Unrecorded) -> None:
        await self.res.store.mark_sent(
            record.sent,
            record.owner,
            record.said,
            record.scope,
            where=record.where,
            counted=record.counted,
            day=record.day,
            last_sms=record.last_sms,
        )

    async def _round(
        self,
        owner: str,
        notification_ids: Sequence[str],
        due: bool,
        states: Mapping[tuple[str, str], ShipmentState],
        built: Mapping[str, Notification],
        scope: Scope,
    ) -> DeliveryReport:
        report = DeliveryReport()
        now = self.res.clock()
        now_ms = int(now.timestamp() * 1000)
        lease = self._lease_ms()
        fence = _fence(lease_clock())
        claims = await self.res.store.claim(
            notification_ids, now_ms, lease, due=due, owner=owner, scope=scope
        )
        held = [
            nid
            for nid, (result, *_) in zip(notification_ids, claims, strict=True)
            if result in (ClaimResult.FRESH, ClaimResult.RECLAIMED)
        ]
        keeper = asyncio.create_task(self._keep(held, owner, scope, fence)) if held else None
        try:
            return await self._send_claimed(
                owner, notification_ids, claims, report, now, states, built, scope, fence
            )
        finally:
            if keeper is not None:
                keeper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await keeper

    def _lease_ms(self) -> int:
        """A claim is another worker's once it was neither made nor renewed for this long
        (one send may take the provider timeout); a round renews its own while it runs."""
        return LEASE_MS + int(self.res.settings.provider_timeout_s * 1000)

    async def _keep(self, ids: list[str], owner: str, scope: Scope, fence: Lease) -> None:
        """Renew, every ``RENEW_EVERY_S``, the claims of ``ids`` that ``owner`` still
        holds, until the round cancels this (settled ones are no longer held: their entries
        left the ledger, or no longer carry the owner); ``fence`` moves with them."""
        while ids:
            await asyncio.sleep(RENEW_EVERY_S)
            try:
                ids = await self._renew(ids, owner, scope, fence)
            except (RedisError, OSError) as exc:  # the next tick tries again
                log.warning(
                    "renewing %d claims failed (%s); tried again in %g s (a claim lapses about a "
                    "minute after its last renewal)",
                    len(ids),
                    type(exc).__name__,
                    RENEW_EVERY_S,
                )

    async def _renew(self, ids: list[str], owner: str, scope: Scope, fence: Lease) -> list[str]:
        """Renew the claims of ``ids`` that ``owner`` still holds (those it returns), and
        move ``fence`` on: from when the renewal was asked, for those."""
        asked = lease_clock()
        now_ms = int(self.res.clock().timestamp() * 1000)
        held = await self.res.store.renew(ids, owner, now_ms, scope)
        fence.lost.update(set(ids) - set(held))
        fence.until = _fence(asked).until
        return held

    def _held_back(
        self, report: DeliveryReport, nid: str, result: ClaimResult, payload: bytes | None
    ) -> None:
        """A notification this round does not send, its entry to wait: claimed by another
        worker (its payload: when that claim was made or last renewed), or claimed without
        the replicas confirming it, and undone (its payload: when to try again)."""
        report.busy.append(nid)
        until = int(payload or 0)
        if result is ClaimResult.UNCONFIRMED:
            report.unconfirmed.append(nid)
        else:
            until += self._lease_ms()
        report.busy_until[nid] = until

    async def _send_claimed(
        self,
        owner: str,
        notification_ids: Sequence[str],
        claims: list[Claim],
        report: DeliveryReport,
        now: datetime,
        states: Mapping[tuple[str, str], ShipmentState],
        built: Mapping[str, Notification],
        scope: Scope,
        fence: Lease,
    ) -> DeliveryReport:
        """The rest of a round, once its notifications are claimed: check, render, send,
        record (each message only while ``fence`` allows)."""
        claimed: list[tuple[Notification, ClaimResult]] = []
        for nid, (result, payload, created_at) in zip(notification_ids, claims, strict=True):
            if result in (ClaimResult.BUSY, ClaimResult.UNCONFIRMED):
                self._held_back(report, nid, result, payload)
            elif result is ClaimResult.DEFERRED:
                report.deferred.append(nid)  # on the due index; release_due sends it in time
            elif result is ClaimResult.NONE or payload is None:
                report.skipped += 1
            else:
                try:
                    n = built.get(nid) or notification_of(nid, payload, created_at)
                except UNREADABLE as exc:
                    # one message that cannot be read never holds the others up (the due
                    # sweep takes the oldest first: it would come back every round)
                    await self._unreadable(nid, exc, owner, scope, report)
                    continue
                claimed.append((n, result))
                report.channels[nid] = str(n.channel)
        claimed = await self._still_wanted(claimed, states, report, owner, scope)

        batches: dict[str, list[Outgoing]] = {}
        by_id = {n.notification_id: n for n, _ in claimed}
        await sync_published(self.res, {n.merchant_id for n, _ in claimed})
        rendering = time.monotonic()
        messages = await self.res.renderer.render_many([n for n, _ in claimed])
        await publish_broken(self.res)
        if claimed and time.monotonic() - rendering > RENEW_AFTER_S:
            # Slow templates can outlast the lease: send only what is still ours, now
            # renewed (another worker may have taken over a lapsed claim, and sent it).
            ids = [n.notification_id for n, _ in claimed]
            now_ms = int(self.res.clock().timestamp() * 1000)
            ours = set(await self._renew(ids, owner, scope, fence))
            lost = [n.notification_id for n, _ in claimed if n.notification_id not in ours]
            if lost:
                log.warning("%d claims lapsed while rendering; left to their new holder", len(lost))
                report.busy += lost
                report.busy_until.update(dict.fromkeys(lost, now_ms + self._lease_ms()))
            kept = [
                (c, m)
                for c, m in zip(claimed, messages, strict=True)
                if c[0].notification_id in ours
            ]
            claimed, messages = [c for c, _ in kept], [m for _, m in kept]
        for (n, result), message in zip(claimed, messages, strict=True):
            if isinstance(message, RenderError):
                await self._fail(n, message, report, owner, scope)
                continue
            outgoing = Outgoing(
                message, now, recovering=result is ClaimResult.RECLAIMED, lease=fence
            )
            batches.setdefault(self._channel_name(n), []).append(outgoing)

        for name, items in batches.items():
            await self._send_batch(name, items, owner, scope, now, report, by_id)
        return report

    async def _send_batch(
        self,
        name: str,
        items: list[Outgoing],
        owner: str,
        scope: Scope,
        now: datetime,
        report: DeliveryReport,
        by_id: dict[str, Notification],
    ) -> None:
        """Send one channel's messages, then record each outcome: what was accepted is
        marked sent at once (not after the round), the rest retried or failed.

        A cancellation (a stop's wait ran out) does not cut the sends under way: they end
        (each within the provider timeout), and what they accepted is kept to record
        (``stop``), as when Redis fails; the round's claims handed to a channel are never
        handed back (``deliver``)."""
        self._handed.setdefault(owner, set()).update(i.message.notification_id for i in items)
        sending = asyncio.ensure_future(self._send(name, items))
        try:
            outcomes = await asyncio.shield(sending)
        except asyncio.CancelledError:
            outcomes = await sending
            _, _, record = self._accepted(items, outcomes, owner, scope, now, report, by_id)
            self._unrecorded.append(record)
            raise
        items, outcomes, record = self._accepted(items, outcomes, owner, scope, now, report, by_id)
        try:
            # an SMS through Twilio is the last to its number: a reply to it (Twilio's
            # inbound webhook) is counted as its (``webhooks``); no other channel gets one
            if self._channel(name).name == "twilio":
                secret = await self.res.digest_secret()
                record.last_sms = {
                    m.notification_id: (counts.recipient_digest(secret, m.to), m.stats_tag)
                    for m in (item.message for item in items)
                    if isinstance(m, SmsMessageOut)
                }
            await self._record(items, outcomes, report, by_id, owner, scope)
            await self._mark_sent(record)
        except (RedisError, OSError, asyncio.CancelledError):
            # known sent: recorded at the next round (or as the worker stops), never handed
            # back to be sent again; a drain cancelled while Redis hangs (a stop) the same
            self._unrecorded.append(record)
            raise
        report.sent += [nid for nid, _, _ in record.sent]

    def _accepted(
        self,
        items: list[Outgoing],
        outcomes: list[Outcome],
        owner: str,
        scope: Scope,
        now: datetime,
        report: DeliveryReport,
        by_id: dict[str, Notification],
    ) -> tuple[list[Outgoing], list[Outcome], _Unrecorded]:
        """The messages to record and their outcomes (not those whose claim lapsed before
        they were handed over: their new holder's), and the record of what a channel
        accepted, to mark sent (no Redis here: a cancelled round builds it too)."""
        lapsed = [o.notification_id for o in outcomes if isinstance(o, ClaimLapsed)]
        if lapsed:
            # paused past the lease (another worker may hold them, and have sent them):
            # nothing to record, as for claims lost while rendering
            log.warning(
                "%d claims lapsed before they were sent; left to their new holder", len(lapsed)
            )
            report.busy += lapsed
            until = int(self.res.clock().timestamp() * 1000) + self._lease_ms()
            report.busy_until.update(dict.fromkeys(lapsed, until))
            kept = [
                (i, o)
                for i, o in zip(items, outcomes, strict=True)
                if not isinstance(o, ClaimLapsed)
            ]
            items, outcomes = [i for i, _ in kept], [o for _, o in kept]
        at = now.isoformat()
        sent = [
            (item.message.notification_id, at, f"{outcome.channel}:{outcome.detail}")
            for item, outcome in zip(items, outcomes, strict=True)
            if isinstance(outcome, Receipt)
        ]
        said = {item.message.notification_id: summary(item.message) for item in items}
        where = {item.message.notification_id: _shipment(item) for item in items}
        # each one accepted counts in its merchant's analytics (with the record: no trip)
        # (in the variant it was rendered in, which its tag says)
        tags = {item.message.notification_id: item.message.stats_tag for item in items}
        counted = {
            nid: counts.of_tag(tags[nid], by_id[nid].channel.value, Count.ACCEPTED)
            for nid, _, _ in sent
        }
        fence = items[0].lease if items else None
        record = _Unrecorded(
            owner, scope, sent, said, where, counted, counts.day_of(now), {}, report.channels, fence
        )
        return items, outcomes, record

    async def _still_wanted(
        self,
        claimed: list[tuple[Notification, ClaimResult]],
        states: Mapping[tuple[str, str], ShipmentState],
        report: DeliveryReport,
        owner: str,
        scope: Scope,
    ) -> list[tuple[Notification, ClaimResult]]:
        """Drop (cancel) notifications overtaken by a newer one, or to opted-out addresses."""
        if not claimed:
            return []
        missing = sorted({(n.merchant_id, n.shipment_id) for n, _ in claimed} - set(states))
        loaded = dict(zip(missing, await self.res.store.load_states(missing), strict=True))
        by_merchant: dict[str, list[str]] = {}
        for n, _ in claimed:
            by_merchant.setdefault(n.merchant_id, []).append(opt_out_key(n.channel, n.to))
        opted = {m: await self.res.store.opted_out(m, keys) for m, keys in by_merchant.items()}
        now = self.res.clock()
        wanted = []
        for n, result in claimed:
            key = (n.merchant_id, n.shipment_id)
            state = states.get(key) or loaded[key][1]
            t = n.transition
            why = (
                state.superseded(n.channel, t.event_id, t.milestone, _rank_of(state, n))
                if state
                else None
            )
            if why is None and opt_out_key(n.channel, n.to) in opted[n.merchant_id]:
                why = f"recipient opted out of {n.channel}"
            deadline = t.pickup_deadline
            if why is None and deadline is not None and deadline <= now:
                # it waited (quiet hours) past the time it asks the customer to come by
                why = f"stale: its pickup deadline {deadline.isoformat()} passed while it waited"
            if why is None:
                wanted.append((n, result))
                continue
            where = (n.merchant_id, n.shipment_id)
            await self.res.store.cancel(n.notification_id, why, where, owner, scope)
            report.cancelled.append(n.notification_id)
        return wanted

    async def _record(
        self,
        items: list[Outgoing],
        outcomes: list[Outcome],
        report: DeliveryReport,
        notifications: dict[str, Notification],
        owner: str,
        scope: Scope,
    ) -> None:
        """Retry or fail each message a channel did not accept (those it accepted are
        marked sent by the caller)."""
        for item, outcome in zip(items, outcomes, strict=True):
            nid = item.message.notification_id
            if isinstance(outcome, Receipt):
                continue
            if isinstance(outcome, TemporaryDeliveryError):
                tag = item.message.stats_tag
                if await self._retry_later(notifications[nid], outcome, owner, scope, tag):
                    report.retrying.append(nid)
                else:
                    report.failed.append(nid)
            else:
                if isinstance(outcome, PermanentDeliveryError) and outcome.opted_out:
                    await self._record_opt_out(item)
                n = notifications[nid]
                await self._fail(n, outcome, report, owner, scope, item.message.stats_tag)
                if isinstance(outcome, PermanentDeliveryError):
                    await self._fall_back(notifications[nid], outcome)

    async def _fall_back(self, n: Notification, failure: PermanentDeliveryError) -> None:
        """An SMS that failed for good goes out as email, when policy and recipient allow."""
        if n.channel is ChannelKind.SMS:
            await fall_back_to_email(self.res, n, failure.reason)

    def _channel_name(self, n: Notification) -> str:
        """The merchant's chosen channel (brand.yaml), else the service default."""
        chosen = self.res.renderer.brand(n.merchant_id).channels
        name = chosen.email if n.channel is ChannelKind.EMAIL else chosen.sms
        if name and name in self.res.providers:
            return name
        return f"default:{n.channel}"

    def _channel(self, name: str) -> Channel:
        if name.startswith("default:"):
            return self.res.channels[ChannelKind(name.removeprefix("default:"))]
        return self.res.providers[name]

    async def _send(self, name: str, items: list[Outgoing]) -> list[Outcome]:
        """The channel's outcomes; a channel that breaks its no-raise contract costs a retry."""
        channel = self._channel(name)
        try:
            return await channel.send_many(items)
        except Exception as exc:
            log.error(
                "channel %s raised %s; its batch will be retried", channel.name, type(exc).__name__
            )
            return [
                TemporaryDeliveryError(
                    f"channel raised {type(exc).__name__}",
                    item.message.notification_id,
                    channel.name,
                )
                for item in items
            ]

    async def _unreadable(
        self, nid: str, exc: Exception, owner: str, scope: Scope, report: DeliveryReport
    ) -> None:
        """A claimed notification whose stored payload does not read as one (damaged, or
        refused by a newer version's checks): failed for good, on the dead-letter list with
        what is wrong (`notifier dead-letters show` prints the payload). The log names the
        fields only: a payload's values are a recipient's details."""
        why = unreadable(exc)
        log.error("notification %s: its stored payload cannot be read (%s)", nid, why)
        if await self.res.store.mark_failed(nid, f"stored payload unreadable: {why}", owner, scope):
            report.failed.append(nid)

    async def _fail(
        self,
        n: Notification,
        exc: Exception,
        report: DeliveryReport,
        owner: str,
        scope: Scope,
        tag: str = "",
    ) -> None:
        # The reason (which may quote the provider's words about an address) goes to the
        # ledger, readable in the history; the log names only the kind of failure.
        nid = n.notification_id
        log.error("notification %s failed permanently (%s)", nid, type(exc).__name__)
        await self._failed(n, str(exc), owner, scope, tag)
        report.failed.append(nid)

    async def _failed(
        self, n: Notification, reason: str, owner: str, scope: Scope, tag: str = ""
    ) -> None:
        """Record a notification that failed for good, and tell the merchant's webhook
        endpoints that take ``delivery.failed``; ``tag``: the rendered message's stats tag
        (none when it did not render)."""
        if not await self.res.store.mark_failed(n.notification_id, reason, owner, scope):
            return  # another worker holds it now: its outcome is that worker's to tell
        await self._count_failed(n, scope, tag)
        now = self.res.clock()
        event = hook_events.delivery_failed(
            n.merchant_id,
            n.shipment_id,
            n.notification_id,
            n.channel.value,
            reason,
            now,
            self.res.settings.public_url,
            n.transition,
        )
        await self.res.hooks.emit(n.merchant_id, n.shipment_id, event, now)

    async def _count_failed(self, n: Notification, scope: Scope, tag: str) -> None:
        """Count a message that failed for good in its merchant's analytics: in the variant
        it was rendered in (``tag``), or outside any test when it did not render. A Redis
        failure loses the count, not the failure (recorded already)."""
        day = counts.day_of(self.res.clock())
        channel = n.channel.value
        name = (
            counts.of_tag(tag, channel, Count.FAILED)
            if tag
            else counts.of_message(
                n.transition.milestone, channel, n.recipient.locale, Count.FAILED
            )
        )
        try:
            await self.res.store.count(n.merchant_id, scope, day, {name: 1})
        except (RedisError, OSError) as exc:
            log.warning("a failed count lost: Redis failed (%s)", type(exc).__name__)

    async def _record_opt_out(self, item: Outgoing) -> None:
        """The provider told us the recipient opted out: never use that address again."""
        m = item.message
        if isinstance(m, SmsMessageOut):
            # the number blocked our shared sender (Twilio 21610): like a STOP, it holds for
            # every merchant, and a START texted to us undoes it
            key = opt_out_key(ChannelKind.SMS, m.to)
            new = await self.res.store.set_opt_out(self.res.store.EVERY_MERCHANT, key, True)
        else:
            key = opt_out_key(ChannelKind.EMAIL, m.to)
            new = await self.res.store.set_opt_out(m.merchant_id, key, True)
        if new:  # the merchant whose message found it out is told
            at = self.res.clock()
            await self.res.hooks.opted_out(m.merchant_id, key, "provider", at, m.shipment_id)

    async def _retry_later(
        self, n: Notification, exc: TemporaryDeliveryError, owner: str, scope: Scope, tag: str
    ) -> bool:
        """Schedule the next attempt; False when the notification is out of attempts (then
        it failed for good)."""
        nid = n.notification_id
        attempts = int((await self.res.store.ledger([nid], scope))[nid].get("attempts", "1"))
        if attempts >= MAX_ATTEMPTS:
            log.error("notification %s out of attempts: %s", nid, exc.reason)
            reason = f"gave up after {attempts} attempts: {exc.reason}"
            await self._failed(n, reason, owner, scope, tag)
            return False
        delay = backoff_s(attempts, exc.retry_after_s)
        log.warning("notification %s: %s; retry %d in %.0f s", nid, exc.reason, attempts, delay)
        due = self.res.clock() + timedelta(seconds=delay)
        due_ms = int(due.timestamp() * 1000)
        await self.res.store.reschedule(nid, due_ms, exc.reason, owner, scope)
        return True


def _count(report: DeliveryReport, timing: Mapping[str, tuple[float, float]]) -> None:
    """A round's metrics: results by channel, and for messages sent in the round that
    decided them (those with ``timing``) the time from ingest and from the decision."""
    for result, ids in (
        ("sent", report.sent),
        ("failed", report.failed),
        ("retrying", report.retrying),
        ("cancelled", report.cancelled),
        ("unconfirmed", report.unconfirmed),
    ):
        for nid in ids:
            metrics.deliveries(report.channels.get(nid, "unknown"), result)
    for nid in report.sent:
        if nid in timing:
            accepted_at, decided_at = timing[nid]
            metrics.provider_accepted(report.channels.get(nid, "unknown"), decided_at, accepted_at)


#: A ledger value of up to 64 bytes keeps a settled entry in Redis's compact encoding.
SUMMARY_BYTES = 60


def _shipment(item: Outgoing) -> tuple[str, str]:
    return item.message.merchant_id, item.message.shipment_id


def summary(message: Message) -> str:
    """What a message said, in at most SUMMARY_BYTES bytes: an email's subject, an SMS'
    text (cut on a character boundary, with an ellipsis)."""
    text = message.body if isinstance(message, SmsMessageOut) else message.subject
    if len(text.encode()) <= SUMMARY_BYTES:
        return text
    cut = text.encode()[: SUMMARY_BYTES - 3].decode(errors="ignore")
    return cut.rstrip() + "…"


def _rank_of(state: ShipmentState, n: Notification) -> int:
    """How far along ``n`` is as news: as its decision recorded it in the message log (an
    exception at the step it happened at, ``news_rank``), else by its status."""
    t = n.transition
    for m in state.messages:
        if m.event_id == t.event_id and m.channel is n.channel:
            return m.rank
    return news_rank(t, -1)


async def fall_back_to_email(res: Resources, sms: Notification, why: str) -> bool:
    """The update an SMS failed to carry for good (``why``) goes out as email, due now, when
    the merchant's policy allows it (``sms_fallback_to_email``) and the recipient has an
    email address that has not opted out; never twice, and never when that update was emailed
    already (the email's id is the update's: ``add_notification`` finds it). False when no
    email is sent."""
    email = sms.recipient.email
    if not email or not res.policies.for_merchant(sms.merchant_id).sms_fallback_to_email:
        return False
    key = opt_out_key(ChannelKind.EMAIL, email)
    if await res.store.opted_out(sms.merchant_id, [key]):
        return False
    now = res.clock()
    nid = notification_id(sms.transition, ChannelKind.EMAIL)
    fallback = sms.model_copy(
        update={
            "notification_id": nid,
            "channel": ChannelKind.EMAIL,
            "to": email,
            "created_at": now,
            "alone": None,  # (an SMS's flag)
        }
    )
    decision = Decision.about(
        sms.transition,
        channel=ChannelKind.EMAIL,
        outcome=Decided.SENT,
        reason=f"fallback: the SMS failed for good ({why}); sent by email",
        notification_id=nid,
        decided_at=now,
    )
    added = await res.store.add_notification(
        sms.merchant_id,
        sms.shipment_id,
        nid,
        waiting_payload(fallback),
        int(now.timestamp() * 1000),
        decision.history_entry(),
    )
    if added:
        log.info("notification %s: SMS failed for good, email %s instead", sms.notification_id, nid)
        scope = res.store.scope_of(sms.merchant_id, sms.shipment_id)
        await res.store.note_fallback(sms.notification_id, nid, scope)  # for the dead letters
    return added


async def fall_back_later(
    res: Resources, merchant_id: str, shipment_id: str, sms_id: str, why: str
) -> bool:
    """An SMS the provider took, then reported undeliverable for good (a status callback:
    a landline, an unknown number, a carrier's STOP): the update goes out by email as
    ``fall_back_to_email`` sends it at once for a refusal at sending. The SMS's own payload
    left the ledger when it was sent, so the update is rebuilt from the shipment's state,
    and only while the SMS is about its current step and that is still news (as a late
    address catches up: ``no_longer_news``); a shipment that
    moved on has newer news, which went or goes out as decided. False when no email is sent."""
    [(_, state)] = await res.store.load_states([(merchant_id, shipment_id)])
    current = state.current_transition() if state is not None else None
    if state is None or state.recipient is None or current is None:
        return False
    if notification_id(current, ChannelKind.SMS) != sms_id:
        return False
    now = res.clock()
    if no_longer_news(current, now) is not None:
        return False
    policy = res.policies.for_merchant(merchant_id)
    test = policy.experiment_of.get(message_name(current)) if policy.experiments else None
    sms = Notification(
        notification_id=sms_id,
        merchant_id=merchant_id,
        shipment_id=shipment_id,
        channel=ChannelKind.SMS,
        to=state.recipient.phone or "",
        transition=current,
        recipient=state.recipient,
        created_at=now,
        experiment=test.name if test is not None else None,
        variant=test.variant(merchant_id, shipment_id) if test else None,
        collected=True if state.collected else None,
    )
    return await fall_back_to_email(res, sms, why)


def _fence(asked: float) -> Lease:
    """The fence of claims made or renewed at ``asked`` (``lease_clock``): a send is
    started only while it can end before the lease runs out (the lease allows a send the
    provider timeout on top of ``LEASE_MS``)."""
    return Lease(asked + LEASE_MS / 1000 - LEASE_MARGIN_S)
