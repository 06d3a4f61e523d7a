"""The notification ledger: one hash per notification, from its decision to its outcome.

A notification is claimed before it is handed to a channel (``claim``: two workers never
send the same one), then settled by the worker that still holds the claim (sent, failed,
cancelled) or given back to wait (``reschedule``, the due index). Providers' message ids
lead their status callbacks back to it. Settled for good (sent or cancelled), it leaves the
ledger for a record on its shipment's outcome list (``lua/fold.lua``; a part of the
shipment's record, ``record``), which the worker later folds into chunks with the others
(``chunks``, ``merge_outcomes``).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, NamedTuple

import orjson
from redis.exceptions import ResponseError

from notifier.packing import HISTORY, OUTCOME, pack, unpack
from notifier.store import chunks, keys
from notifier.store.base import Scope, StoreBase, WaitRefused, awaited, data_error, decode
from notifier.store.stats import add_counts

log = logging.getLogger(__name__)

#: (merchant id, shipment id): where a notification's outcome list is
Shipment = tuple[str, str]
#: notifications to settle for good: (id, its shipment, the fields it is settled with)
Settling = Sequence[tuple[str, Shipment, dict[str, str]]]
#: how many due buckets a read of the due index asks for at once
_BUCKETS_READ = 16
#: how long a number's last SMS is remembered, for a reply to find it (``last_sms``)
LAST_SMS_S = 7 * 86_400


class LastSms(NamedTuple):
    """The last SMS sent to a number: what a reply to it answers."""

    notification_id: str
    merchant_id: str
    shipment_id: str
    #: what the message carried for the analytics (``insights.counts.tag``)
    stats_tag: str


class Claim(NamedTuple):
    """What ``claim`` found for one notification."""

    result: ClaimResult
    #: its payload when claimed; when busy, the epoch ms it was claimed; when deferred, the
    #: epoch ms it is due; None: nothing
    payload: bytes | None
    #: when claimed, the entry's ``created`` as the API shows it (None: it has none), which
    #: a waiting message's payload leaves out (``models.notification_of`` takes it)
    created_at: str | None = None


class LedgerState(StrEnum):
    """Where a notification is in its life (ledger ``st`` field)."""

    PENDING = "pending"  #: decided, not yet handed to a channel
    SENDING = "sending"  #: claimed by a worker, being handed to a channel
    DEFERRED = "deferred"  #: held until ``due`` (quiet hours, coalescing); not yet claimable
    SENT = "sent"  #: the channel accepted it
    CANCELLED = "cancelled"  #: never sent: superseded by a newer state, or the recipient opted out
    FAILED = "failed"  #: permanently failed or out of attempts; in the dead-letter list


class ClaimResult(StrEnum):
    """What ``claim`` found for one notification."""

    NONE = "none"  #: settled (sent or failed) or unknown: nothing left to do
    FRESH = "fresh"  #: was pending
    RECLAIMED = "reclaimed"  #: a previous claim's lease expired; it may have been sent already
    BUSY = "busy"  #: another worker holds a live claim; not settled yet
    DEFERRED = "deferred"  #: waiting for its due time (payload holds the due epoch ms)
    #: claimed, but fewer replicas than required confirmed it in time
    #: (``NOTIFIER_INGEST_WAIT_REPLICAS``): undone, for a later round (payload holds the
    #: epoch ms it is worth trying again)
    UNCONFIRMED = "unconfirmed"


#: How long after claims the replicas did not confirm they are worth trying again (their
#: inbox entries wait that long, then for the worker's next sweep).
UNCONFIRMED_RETRY_MS = 1000

#: the claim script's codes
_CLAIMS = {
    1: ClaimResult.FRESH,
    2: ClaimResult.RECLAIMED,
    3: ClaimResult.BUSY,
    4: ClaimResult.DEFERRED,
}
#: ledger field -> its name in ``Ledger.ledger``'s answer (the API's)
_SHOWN = {
    "st": "status",
    "created": "created_at",
    "sent": "sent_at",
    "detail": "detail",
    "error": "error",
    "attempts": "attempts",
    "due": "due_at",
    "provider_status": "provider_status",
    "provider_error": "provider_error",
    "summary": "summary",
}


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def created_stamp(now_iso: str) -> str:
    """A ledger entry's ``created`` as it is stored: the moment in epoch microseconds (16
    digits; the ISO text, 32 characters, was stored before). A waiting entry's hash then
    fits Redis's next smaller allocation: 344 bytes instead of 408 (measured). A text that
    would not read back as it is (not UTC, no zone, before 1970) is kept as it is."""
    try:
        stamp = str((datetime.fromisoformat(now_iso) - _EPOCH) // _MICROSECOND)
    except (TypeError, ValueError):  # no zone, or not a moment at all
        return now_iso
    return stamp if created_iso(stamp) == now_iso else now_iso


def created_iso(stored: str) -> str:
    """``created`` as the API shows it (ISO, UTC), from either way it was stored."""
    if not stored.isdigit():
        return stored
    return (_EPOCH + int(stored) * _MICROSECOND).isoformat()


class Ledger(StoreBase):
    """Claims, outcomes and the due index of notifications."""

    # -- claims -------------------------------------------------------------------------
    async def claim(
        self,
        notification_ids: Sequence[str],
        now_ms: int,
        lease_ms: int,
        *,
        due: bool = False,
        owner: str = "",
        scope: Scope = None,
    ) -> list[Claim]:
        """Claim notifications for sending; return (result, payload, created_at) per id.

        A deferred notification is claimable only with ``due=True`` once its time has
        come; otherwise it comes back as DEFERRED with its due epoch ms as payload.
        ``scope``: the partition of every one of them, on a Redis Cluster (``scope_of``).
        """
        if not notification_ids:
            return []
        names = self._names(notification_ids, scope)
        args = [now_ms, lease_ms, "due" if due else "now", owner]
        if self.wait_replicas:
            # the claims, and everything written before them (the decisions), on enough
            # replicas before anything is sent
            try:
                rows, replicas = await self.call_and_wait(self.scripts.claim, names, args)
            except WaitRefused as exc:  # a set-up error: undo the claims, then say so
                await self._unclaim(names, exc.ran, owner)
                raise
        else:
            rows, replicas = await self.scripts.claim(keys=names, args=args), 0
        claims = [
            Claim(
                _CLAIMS.get(int(row[0]), ClaimResult.NONE),
                row[1] or None,
                created_iso(decode(row[2])) if len(row) > 2 and row[2] else None,
            )
            for row in rows
        ]
        if replicas < self.wait_replicas:
            # A message sent now could be decided and sent again by a replica that takes
            # over without its claim: undo the claims, send nothing, try again later.
            held = await self._unclaim(names, rows, owner)
            if held:
                log.warning(
                    "%d claims: %d of the %d Redis replicas required confirmed them within "
                    "%d ms; undone, nothing sent: their transitions wait for the next sweep, "
                    "due messages for the next release",
                    len(held),
                    replicas,
                    self.wait_replicas,
                    self.wait_timeout_ms,
                )
                again = str(now_ms + UNCONFIRMED_RETRY_MS).encode()
                for i in held:
                    claims[i] = Claim(ClaimResult.UNCONFIRMED, again, None)
        return claims

    async def _unclaim(self, names: list[str], rows: list[Any], owner: str) -> list[int]:
        """Undo the claims ``claim.lua`` answered ``rows`` for (``unclaim.lua``: each as it
        was before); the positions of those it had made."""
        made = (ClaimResult.FRESH, ClaimResult.RECLAIMED)
        held = [i for i, row in enumerate(rows) if _CLAIMS.get(int(row[0])) in made]
        if held:
            await self.scripts.unclaim(
                keys=[names[i] for i in held],
                args=[owner, *(decode(field) for i in held for field in rows[i][3])],
            )
        return held

    async def renew(
        self, notification_ids: Sequence[str], owner: str, now_ms: int, scope: Scope = None
    ) -> list[str]:
        """Restart the lease of the claims ``owner`` still holds; return their ids (the
        others were taken over, or settled, by another worker)."""
        if not notification_ids:
            return []
        fields = [{"claimed": str(now_ms)}] * len(notification_ids)
        return await self._settle(notification_ids, fields, owner, scope=scope)

    async def release(
        self, notification_ids: Sequence[str], owner: str, scope: Scope = None
    ) -> None:
        """Hand back the claims ``owner`` still holds (its round broke off): the next claim
        takes them over at once, as possibly sent."""
        if notification_ids:
            fields = [{"claimed": "0"}] * len(notification_ids)
            await self._settle(notification_ids, fields, owner, scope=scope)

    async def _settle(
        self,
        notification_ids: Sequence[str],
        fields: Sequence[dict[str, str]],
        owner: str = "",
        drop: Sequence[str] = (),
        scope: Scope = None,
    ) -> list[str]:
        """Apply ``fields`` to each notification the caller (``owner``) still holds, and
        remove the ``drop`` fields; return the ids settled."""
        width = len(fields[0])
        args: list[Any] = [owner, width, len(drop), *drop]
        for values in fields:
            assert len(values) == width
            for item in values.items():
                args += item
        settled = await self.scripts.settle(keys=self._names(notification_ids, scope), args=args)
        return [notification_ids[int(i) - 1] for i in settled]

    # -- outcomes -----------------------------------------------------------------------
    async def mark_sent(
        self,
        outcomes: Sequence[tuple[str, str, str]],
        owner: str = "",
        summaries: dict[str, str] | None = None,
        scope: Scope = None,
        *,
        where: Mapping[str, Shipment],
        counted: Mapping[str, str] | None = None,
        day: str = "",
        last_sms: Mapping[str, tuple[str, str]] | None = None,
    ) -> None:
        """Record (notification id, sent-at ISO, channel detail) as sent, with what was sent
        in a few words (``summaries``: the subject or the SMS' start, for the timeline);
        ``where``: each one's (merchant, shipment). A provider's message id (``twilio:SM…``,
        ``sendgrid:…``) is indexed so its status callbacks find us. ``counted``: the
        analytics field each one counts in on ``day`` (in its merchant's hash), for those
        recorded now. ``last_sms``: an SMS' (recipient digest, stats tag), kept
        ``LAST_SMS_S`` as the last message to that number (``last_sms``)."""
        if not outcomes:
            return
        said = summaries or {}
        settled = set(
            await self._fold(
                [
                    (
                        nid,
                        where[nid],
                        {"st": "sent", "sent": at, "detail": d, "summary": said.get(nid, "")},
                    )
                    for nid, at, d in outcomes
                ],
                owner,
                scope,
            )
        )
        tallies: dict[str, dict[str, int]] = {}
        async with self.redis.pipeline(transaction=False) as pipe:
            for nid, _, detail in outcomes:
                if nid not in settled:
                    continue
                provider, _, message_id = detail.partition(":")
                if provider in ("twilio", "sendgrid") and message_id:
                    # found again with its partition and shipment (its outcome list)
                    value = orjson.dumps([nid, scope, *where[nid]])
                    pipe.set(keys.provider_key(provider, message_id), value, ex=self.state_ttl_s)
                if last_sms and nid in last_sms:
                    recipient, tag = last_sms[nid]
                    value = orjson.dumps([nid, *where[nid], tag])
                    pipe.set(keys.last_sms_key(recipient), value, ex=LAST_SMS_S)
                if counted and nid in counted:
                    mine = tallies.setdefault(where[nid][0], {})
                    mine[counted[nid]] = mine.get(counted[nid], 0) + 1
            add_counts(pipe, self.tag(scope), day, tallies)
            await pipe.execute()

    async def mark_failed(
        self, notification_id: str, error: str, owner: str = "", scope: Scope = None
    ) -> bool:
        """Record a permanent failure and put the notification on the dead-letter list (its
        ledger hash stays, with its payload, for whoever looks into the dead letters); False
        when ``owner`` no longer held it (another worker took it over, and may have sent it)."""
        fields = [{"st": LedgerState.FAILED, "error": error}]
        if not await self._settle([notification_id], fields, owner, scope=scope):
            return False
        dead = keys.dead_letter_key(self.tag(scope))
        await awaited(self.redis.rpush(dead, notification_id))
        return True

    async def cancel(
        self, notification_id: str, why: str, where: Shipment, owner: str = "", scope: Scope = None
    ) -> None:
        """Record that a notification will never be sent, and why."""
        await self._fold(
            [(notification_id, where, {"st": "cancelled", "detail": why})], owner, scope
        )

    async def cancel_overtaken(
        self, overtaken: Sequence[tuple[str, Shipment, str]], now_ms: int, scope: Scope = None
    ) -> list[str]:
        """Cancel (notification id, shipment, why) that a newer decision overtook while they
        waited for their due time, each only while it still waits for a due time after
        ``now_ms``, claimed by no worker (one whose time came is the due sweep's, which
        checks again before it sends); the ids cancelled."""
        return await self._fold(
            [(nid, where, {"st": "cancelled", "detail": why}) for nid, where, why in overtaken],
            "",
            scope,
            waiting_after=now_ms,
        )

    async def _fold(
        self, settling: Settling, owner: str, scope: Scope, waiting_after: int | None = None
    ) -> list[str]:
        """Settle notifications for good: each one ``owner`` still holds (``waiting_after``:
        only one still deferred to a later time, which leaves the due index too) leaves the
        ledger for a record on its shipment's outcome list (``lua/fold.lua``); the ids
        settled."""
        if not settling:
            return []
        try:
            return await self._fold_call(settling, owner, scope, waiting_after)
        except ResponseError as exc:
            if not data_error(exc):
                raise
            return await self._fold_apart(settling, owner, scope, waiting_after)

    async def _fold_call(
        self, settling: Settling, owner: str, scope: Scope, waiting_after: int | None
    ) -> list[str]:
        """One call of ``lua/fold.lua``: the ids settled."""
        tag = self.tag(scope)
        names: list[str] = [keys.due_key(tag), keys.due_buckets_key(tag)]
        args: list[Any] = [owner, self.outcomes_cap, "" if waiting_after is None else waiting_after]
        for nid, (merchant_id, shipment_id), fields in settling:
            names += [
                keys.notification_key(nid, tag),
                keys.due_bucket_key(nid, tag),
                *keys.record_keys(merchant_id, shipment_id, tag),
            ]
            recorded = {k: v for k, v in fields.items() if v}
            args += [nid, pack(orjson.dumps(recorded), OUTCOME)]
        settled = await self.scripts.fold(keys=names, args=args)
        return [settling[int(i) - 1][0] for i in settled]

    async def _fold_apart(
        self, settling: Settling, owner: str, scope: Scope, waiting_after: int | None
    ) -> list[str]:
        """``_fold`` one notification at a time, after a shipment's record did not read. A
        notification whose own record does not read is settled in its ledger hash instead
        (``st`` sent or cancelled, kept there until it expires): what was sent must be
        recorded as sent, or its claim would run out and it would go out again, once a
        round, until its entry is set aside. (One that only waits is left waiting: the due
        sweep settles it when its time comes.)"""
        settled: list[str] = []
        for one in settling:
            try:
                settled += await self._fold_call([one], owner, scope, waiting_after)
            except ResponseError as exc:
                if not data_error(exc):
                    raise
                nid, (merchant_id, shipment_id), fields = one
                instead = (
                    f"settled as {fields.get('st')} in its ledger entry instead"
                    if waiting_after is None
                    else "left waiting for the due sweep"
                )
                log.error(
                    "notification %s: the record of shipment %s/%s does not read (%s); %s",
                    nid,
                    merchant_id,
                    shipment_id,
                    str(exc).split(" script: ", 1)[0],
                    instead,
                )
                if waiting_after is None:
                    kept = {k: v for k, v in fields.items() if v}
                    settled += await self._settle([nid], [kept], owner, scope=scope)
        return settled

    # -- provider ids -------------------------------------------------------------------
    async def by_provider_id(
        self, provider: str, message_id: str
    ) -> tuple[str, Scope, Shipment | None] | None:
        """Our notification id for a provider's message id, with its scope and its (merchant,
        shipment) (None for ids recorded before 0.6)."""
        value = await awaited(self.redis.get(keys.provider_key(provider, message_id)))
        if not value:
            return None
        text = decode(value)
        if not text.startswith("["):
            return text, None, None  # 0.5: the id alone
        nid, scope, merchant_id, shipment_id = orjson.loads(text)
        return nid, scope, (merchant_id, shipment_id)

    async def last_sms(self, recipient: str) -> LastSms | None:
        """The last SMS sent to a number (``recipient``: its digest) within ``LAST_SMS_S``."""
        value = await awaited(self.redis.get(keys.last_sms_key(recipient)))
        if not value:
            return None
        nid, merchant_id, shipment_id, tag = orjson.loads(value)
        return LastSms(nid, merchant_id, shipment_id, tag)

    async def provider_status(
        self,
        notification_id: str,
        status: str,
        rank: int,
        error: str | None = None,
        scope: Scope = None,
        where: Shipment | None = None,
    ) -> bool:
        """Record a provider's delivery status unless a later one is already known
        (a late "sent" never overwrites "delivered"). True when recorded."""
        tag = self.tag(scope)
        merchant_id, shipment_id = where or ("", "")  # unknown: its ledger hash only
        return bool(
            await self.scripts.provider_status(
                keys=[
                    keys.notification_key(notification_id, tag),
                    *keys.record_keys(merchant_id, shipment_id, tag),
                ],
                args=[status, rank, error or "", notification_id, self.outcomes_cap],
            )
        )

    # -- the due index ------------------------------------------------------------------
    async def reschedule(
        self, notification_id: str, due_ms: int, error: str, owner: str = "", scope: Scope = None
    ) -> None:
        """Give a claimed notification back after a temporary failure, due again at ``due_ms``.

        One script: the ledger and the due index change together or not at all.
        """
        tag = self.tag(scope)
        await self.scripts.reschedule(
            keys=[
                *self._names([notification_id], scope),
                keys.due_key(tag),
                keys.due_buckets_key(tag),
                keys.due_bucket_key(notification_id, tag),
            ],
            args=[notification_id, due_ms, error, owner],
        )

    async def due(self, now_ms: int, limit: int, scope: Scope = None) -> list[str]:
        """Up to ``limit`` notifications whose time has come (deferred ones and retries),
        oldest first: the scope's (on a cluster, each partition has its due index; see
        ``scopes``). From the buckets whose earliest is due, in that order, and from the
        index from before 0.6."""
        return [nid for nid, _ in await self.due_entries(now_ms, limit, scope)]

    async def due_entries(
        self, until_ms: float, limit: int | None = None, scope: Scope = None
    ) -> list[tuple[str, int]]:
        """(id, due epoch ms) of the notifications due by ``until_ms`` (``math.inf``: every
        one on the index), earliest first; the first ``limit`` of them (None: all). The
        buckets are read earliest bucket first, and only as long as one may still hold one
        of the first ``limit``; the index from before 0.6 is read alongside. An id on both
        (a crash between settling and unscheduling, then a replay) comes once, at its
        earlier time."""
        tag = self.tag(scope)
        until = "+inf" if until_ms == math.inf else int(until_ms)
        start = None if limit is None else 0
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zrangebyscore(keys.due_key(tag), "-inf", until, start, limit, withscores=True)
            pipe.zrangebyscore(
                keys.due_buckets_key(tag), "-inf", until, start, limit, withscores=True
            )
            legacy, buckets = await pipe.execute()
        found = {decode(member): int(ms) for member, ms in legacy}
        for at in range(0, len(buckets), _BUCKETS_READ):
            batch = buckets[at : at + _BUCKETS_READ]
            if limit is not None and len(found) >= limit:
                # a bucket whose earliest comes after the first ``limit`` found holds none
                # of them, nor does any after it
                last = sorted(found.values())[limit - 1]
                batch = [(bucket, ms) for bucket, ms in batch if ms < last]
                if not batch:
                    break
            async with self.redis.pipeline(transaction=False) as pipe:
                for bucket, _ in batch:
                    pipe.zrangebyscore(bucket, "-inf", until, start, limit, withscores=True)
                for rows in await pipe.execute():
                    for member, ms in rows:
                        nid = keys.due_id(member)
                        found[nid] = min(int(ms), found.get(nid, int(ms)))
        return sorted(found.items(), key=lambda row: row[1])[:limit]

    async def due_count(self, scope: Scope = None) -> int:
        """How many notifications the due index holds (the scope's)."""
        tag = self.tag(scope)
        buckets = await awaited(self.redis.zrange(keys.due_buckets_key(tag), 0, -1))
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in [keys.due_key(tag), *buckets]:
                pipe.zcard(name)
            return sum(await pipe.execute())

    async def unschedule(
        self, notification_ids: Sequence[str], now_ms: int, scope: Scope = None
    ) -> None:
        """Take settled notifications off the due index, unless rescheduled past ``now_ms``."""
        if notification_ids:
            tag = self.tag(scope)
            await self.scripts.unschedule(
                keys=[
                    keys.due_key(tag),
                    keys.due_buckets_key(tag),
                    *(keys.due_bucket_key(nid, tag) for nid in notification_ids),
                ],
                args=[now_ms, *notification_ids],
            )

    async def add_notification(
        self,
        merchant_id: str,
        shipment_id: str,
        notification_id: str,
        payload: bytes,
        due_ms: int,
        history: bytes,
    ) -> bool:
        """Create a notification outside a decision (a fallback), due at ``due_ms``, with a
        history entry saying why. False when it exists already (never twice)."""
        tag = self.shipment_tag(merchant_id, shipment_id)
        return bool(
            await self.scripts.add_notification(
                keys=[
                    keys.notification_key(notification_id, tag),
                    keys.due_buckets_key(tag),
                    keys.due_bucket_key(notification_id, tag),
                    *keys.record_keys(merchant_id, shipment_id, tag),
                ],
                args=[
                    notification_id,
                    payload,
                    due_ms,
                    pack(history, HISTORY),
                    self.state_ttl_s,
                    self.history_cap,
                ],
            )
        )

    # -- reading and retention ----------------------------------------------------------
    async def payload(self, notification_id: str, scope: Scope = None) -> bytes | None:
        """A notification's payload as its ledger hash holds it (packed or plain JSON; None:
        not in the ledger): in 64-byte pieces ``p``, ``p1``, ``p2``... (``lua/lib/payload.lua``),
        or in one ``p`` when written before."""
        fields = await awaited(
            self.redis.hgetall(keys.notification_key(notification_id, self.tag(scope)))
        )
        return payload_of(fields)

    async def ledger(
        self, notification_ids: Sequence[str], scope: Scope = None
    ) -> dict[str, dict[str, str | int]]:
        """Delivery status fields (without the payload) per notification id, of those still
        in the ledger (live, failed, or settled before 0.6): ``deliveries`` has them all."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in self._names(notification_ids, scope):
                pipe.hmget(name, list(_SHOWN))
            rows = await pipe.execute()
        return {
            nid: _shown({f: decode(v) for f, v in zip(_SHOWN, row, strict=True) if v})
            for nid, row in zip(notification_ids, rows, strict=True)
        }

    async def deliveries(
        self, merchant_id: str, shipment_id: str, notification_ids: Sequence[str]
    ) -> dict[str, dict[str, str | int]]:
        """Delivery status fields per notification id of a shipment: from the ledger while a
        notification is there, else from its record on the shipment's outcome list."""
        tag = self.shipment_tag(merchant_id, shipment_id)

        async def live() -> list[Any]:
            async with self.redis.pipeline(transaction=False) as pipe:
                for nid in notification_ids:
                    pipe.hmget(keys.notification_key(nid, tag), list(_SHOWN))
                return list(await pipe.execute())

        # a script is never in a pipeline: a cluster's pipelines refuse them
        rows, (found,) = await asyncio.gather(live(), self.records([(merchant_id, shipment_id)]))
        try:
            settled = outcomes_of(found.outcomes)
        except Exception as exc:  # damaged data: the decisions are still worth showing
            log.warning(
                "shipment %s/%s: its outcome list does not read (%s); delivery statuses "
                "shown from the ledger only",
                merchant_id,
                shipment_id,
                type(exc).__name__,
            )
            settled = {}
        out = {}
        for nid, row in zip(notification_ids, rows, strict=True):
            fields = {f: decode(v) for f, v in zip(_SHOWN, row, strict=True) if v}
            out[nid] = _shown(fields or settled.get(nid, {}))
        return out

    async def shorten(
        self,
        notification_ids: Sequence[str],
        ttl_s: int,
        scope: Scope = None,
        shipments: Sequence[Shipment] = (),
    ) -> None:
        """Let these ledger entries, and these shipments' records (their state, history and
        outcomes; ``record``), expire within ``ttl_s`` (never later than they would)."""
        tag = self.tag(scope)
        names = self._names(notification_ids, scope)
        names += [key for m, s in shipments for key in keys.record_keys(m, s, tag)]
        if names:
            await self.scripts.shorten(keys=names, args=[ttl_s])

    async def note_fallback(self, notification_id: str, email_id: str, scope: Scope) -> bool:
        """Note on a failed SMS's ledger entry that its update went out as the email
        ``email_id`` (the dead letters say so, and a replay asks for ``--force``); False
        when the entry is gone."""
        [name] = self._names([notification_id], scope)
        return bool(await self.scripts.note_fallback(keys=[name], args=[email_id]))

    async def fallback_of(self, notification_id: str, scope: Scope) -> str:
        """The email noted by ``note_fallback`` ("" for none)."""
        [name] = self._names([notification_id], scope)
        found = await awaited(self.redis.hget(name, "fallback"))
        return decode(found) if found else ""

    def _names(self, notification_ids: Sequence[str], scope: Scope) -> list[str]:
        """The ledger keys of notifications of one scope."""
        tag = self.tag(scope)
        return [keys.notification_key(n, tag) for n in notification_ids]


#: one record of an outcome list: (notification id, the ledger's fields, what was recorded)
Record = tuple[str, dict[str, str], dict[str, str]]

#: the byte after a chunk's count that says its ids are kept in 16 bytes each
PACKED_IDS = b"\x00"
#: in a chunk with packed ids, a delivery detail that names its notification id (the
#: outbox's file path) keeps what comes before and after the id under this key
_DETAIL_AROUND = "dx"


def payload_of(fields: Mapping[bytes, bytes]) -> bytes | None:
    """The payload of a ledger hash's fields (None: it has none), from its 64-byte pieces
    ``p``, ``p1``, ``p2``... (``lua/lib/payload.lua``) or its one ``p`` written before."""
    if b"p" not in fields:
        return None
    parts = [fields[b"p"]]
    while (part := fields.get(b"p%d" % len(parts))) is not None:
        parts.append(part)
    return b"".join(parts)


def packed_part(element: bytes) -> bytes:
    """The packed JSON of an outcome list's element: what one record recorded (empty:
    nothing), or a chunk's records, after its ids and ranks (``merge_outcomes``)."""
    if not chunks.is_chunk(element):
        return element.split(b"\t", 2)[2]
    body = chunks.body(element)
    if body[:1] == PACKED_IDS:
        colon = body.index(b":")
        return body[colon + 1 + 16 * int(body[1:colon]) :].split(b"\t", 1)[1]
    return body.split(b"\t", 2)[2]


def _records(elements: Sequence[bytes]) -> list[Record]:
    """The records an outcome list's elements hold, oldest first: each one
    ``<id>\t<JSON header>\t<packed JSON or nothing>`` (``lua/fold.lua``,
    ``lua/provider_status.lua``), or a chunk of them (``merge_outcomes``)."""
    out: list[Record] = []
    for element in elements:
        if not chunks.is_chunk(element):
            nid, known, recorded = element.split(b"\t", 2)
            out.append(
                (
                    nid.decode(),
                    orjson.loads(known),
                    orjson.loads(unpack(recorded)) if recorded else {},
                )
            )
        elif chunks.body(element)[:1] == PACKED_IDS:
            ids = _packed_ids(chunks.body(element))
            held = orjson.loads(unpack(packed_part(element)))
            out += [(ids[i], known, _detail_in(recorded, ids[i])) for i, known, recorded in held]
        else:
            held = orjson.loads(unpack(packed_part(element)))
            out += [(nid, known, recorded) for nid, known, recorded in held]
    return out


def _packed_ids(body: bytes) -> list[str]:
    """A chunk's ids, from its body with packed ids: ``\\x00<number of ids>:<16 bytes an
    id><JSON {position of an id, from 1 as the scripts count: its highest rank}>\\t<packed
    records, each [position of its id, from 0, header, recorded]>``. Ids are read by their
    place: their bytes may be any, a ``:`` or a tab too."""
    colon = body.index(b":")
    start = colon + 1
    held = int(body[1:colon])
    return [keys.made_id(body[at : at + 16]) for at in range(start, start + 16 * held, 16)]


def _detail_in(recorded: dict[str, Any], nid: str) -> dict[str, str]:
    """What was recorded, its delivery detail whole again."""
    around = recorded.pop(_DETAIL_AROUND, None)
    if around is not None:
        recorded["detail"] = nid.join(around)
    return recorded


def _detail_out(recorded: dict[str, str], nid: str) -> dict[str, Any]:
    """What a chunk with packed ids keeps of a record: a detail that names the id, without
    it (the outbox's path: its id deflates to about 17 bytes, a fifth of the record)."""
    detail = recorded.get("detail", "")
    if nid not in detail:
        return recorded
    kept: dict[str, Any] = {k: v for k, v in recorded.items() if k != "detail"}
    kept[_DETAIL_AROUND] = detail.split(nid, 1)
    return kept


def merge_outcomes(elements: Sequence[bytes], cap: int) -> bytes:
    """One chunk of the latest ``cap`` records these elements hold: the ids it holds and
    the highest provider status rank of each (what the scripts look for), then the records
    packed together.

    When every id is one ``notification_id_of`` makes, the chunk keeps each in 16 bytes
    (``PACKED_IDS``), its ranks by position and its records with the position of their id:
    about 40 % smaller than with ids in full (``lua/lib/outcomes.lua`` reads both)."""
    records = _records(elements)[-cap:]
    ranks: dict[str, int] = {}
    for nid, known, _ in records:
        ranks.setdefault(nid, -1)
        if "prank" in known:
            ranks[nid] = max(ranks[nid], int(known["prank"]))
    if all(keys.MADE_ID.fullmatch(nid) for nid in ranks):
        position = {nid: i for i, nid in enumerate(ranks)}
        ids = b"".join(keys.made_id_bytes(nid) for nid in ranks)
        ranked = orjson.dumps({str(i + 1): r for i, r in enumerate(ranks.values()) if r >= 0})
        kept = [
            [position[nid], known, _detail_out(recorded, nid)] for nid, known, recorded in records
        ]
        return (
            chunks.header(len(records))
            + PACKED_IDS
            + b"%d:" % len(ranks)
            + ids
            + ranked
            + b"\t"
            + pack(orjson.dumps(kept), OUTCOME)
        )
    ids = " ".join(ranks).encode()
    ranked = orjson.dumps({nid: rank for nid, rank in ranks.items() if rank >= 0})
    packed = pack(orjson.dumps(records), OUTCOME)
    return chunks.header(len(records)) + ids + b"\t" + ranked + b"\t" + packed


def outcomes_of(elements: Sequence[bytes]) -> dict[str, dict[str, str]]:
    """The ledger fields of each notification on an outcome list (``lua/fold.lua``): its
    settling record, and the provider statuses reported after (the highest rank wins)."""
    out: dict[str, dict[str, str]] = {}
    for nid, known, recorded in _records(elements):
        fields = out.setdefault(nid, {})
        if "prank" in known and int(known["prank"]) <= int(fields.get("prank", -1)):
            continue  # a late "sent" never overwrites "delivered"
        fields.update(known)
        fields.update(recorded)
    return out


def _shown(fields: Mapping[str, str]) -> dict[str, str | int]:
    """Ledger fields as the API names and types them."""
    shown: dict[str, str | int] = {_SHOWN[f]: v for f, v in fields.items() if f in _SHOWN and v}
    if "created_at" in shown:
        shown["created_at"] = created_iso(str(shown["created_at"]))
    if "due_at" in shown:
        shown["due_at"] = datetime.fromtimestamp(int(shown["due_at"]) / 1000, UTC).isoformat()
    if "attempts" in shown:
        shown["attempts"] = int(shown["attempts"])  # a number in the API
    elif "status" in shown:
        shown["attempts"] = 0  # an entry never claimed has no count (commit.lua)
    return shown
