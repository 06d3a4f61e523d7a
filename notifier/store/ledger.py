"""The notification ledger: one hash per notification, from its decision to its outcome.

A notification is claimed before it is handed to a channel (``claim``: two workers never
send the same one), then settled by the worker that still holds the claim (sent, failed,
cancelled) or given back to wait (``reschedule``, the due index). Providers' message ids
lead their status callbacks back to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from notifier.packing import HISTORY, pack
from notifier.store import keys
from notifier.store.base import Scope, StoreBase, awaited, decode


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


class Ledger(StoreBase):
    """Claims, outcomes and the due index of notifications."""

    #: What a sent or cancelled notification no longer needs: the payload it was rendered
    #: from (the bulk of an entry) and its claim. A failed one keeps its payload, for
    #: whoever looks into the dead letters.
    DONE_WITH = ("p", "owner", "claimed")

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
    ) -> list[tuple[ClaimResult, bytes | None]]:
        """Claim notifications for sending; return (result, payload) per id.

        A deferred notification is claimable only with ``due=True`` once its time has
        come; otherwise it comes back as DEFERRED with its due epoch ms as payload.
        ``scope``: the partition of every one of them, on a Redis Cluster (``scope_of``).
        """
        if not notification_ids:
            return []
        names = self._names(notification_ids, scope)
        rows = await self.scripts.claim(
            keys=names, args=[now_ms, lease_ms, "due" if due else "now", owner]
        )
        return [(_CLAIMS.get(int(code), ClaimResult.NONE), p or None) for code, p in rows]

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
    ) -> None:
        """Record (notification id, sent-at ISO, channel detail) as sent, with what was sent
        in a few words (``summaries``: the subject or the SMS' start, for the timeline); a
        provider's message id (``twilio:SM…``, ``sendgrid:…``) is indexed so its status
        callbacks find us."""
        if not outcomes:
            return
        said = summaries or {}
        settled = set(
            await self._settle(
                [nid for nid, _, _ in outcomes],
                [
                    {"st": LedgerState.SENT, "sent": at, "detail": d, "summary": said.get(nid, "")}
                    for nid, at, d in outcomes
                ],
                owner,
                self.DONE_WITH,
                scope,
            )
        )
        async with self.redis.pipeline(transaction=False) as pipe:
            for nid, _, detail in outcomes:
                if nid not in settled:
                    continue
                provider, _, message_id = detail.partition(":")
                if provider in ("twilio", "sendgrid") and message_id:
                    value = nid if scope is None else f"{nid} {scope}"
                    pipe.set(keys.provider_key(provider, message_id), value, ex=self.state_ttl_s)
            await pipe.execute()

    async def mark_failed(
        self, notification_id: str, error: str, owner: str = "", scope: Scope = None
    ) -> None:
        """Record a permanent failure and put the notification on the dead-letter list."""
        fields = [{"st": LedgerState.FAILED, "error": error}]
        if await self._settle([notification_id], fields, owner, scope=scope):
            dead = keys.dead_letter_key(self.tag(scope))
            await awaited(self.redis.rpush(dead, notification_id))

    async def cancel(
        self, notification_id: str, why: str, owner: str = "", scope: Scope = None
    ) -> None:
        """Record that a notification will never be sent, and why."""
        await self._settle(
            [notification_id],
            [{"st": LedgerState.CANCELLED, "detail": why}],
            owner,
            self.DONE_WITH,
            scope,
        )

    # -- provider ids -------------------------------------------------------------------
    async def by_provider_id(self, provider: str, message_id: str) -> tuple[str, Scope] | None:
        """Our notification id (and its scope) for a provider's message id."""
        value = await awaited(self.redis.get(keys.provider_key(provider, message_id)))
        if not value:
            return None
        nid, _, scope = decode(value).partition(" ")
        return nid, int(scope) if scope else None

    async def provider_status(
        self,
        notification_id: str,
        status: str,
        rank: int,
        error: str | None = None,
        scope: Scope = None,
    ) -> bool:
        """Record a provider's delivery status unless a later one is already known
        (a late "sent" never overwrites "delivered"). True when recorded."""
        return bool(
            await self.scripts.provider_status(
                keys=self._names([notification_id], scope),
                args=[status, rank, error or ""],
            )
        )

    # -- the due index ------------------------------------------------------------------
    async def reschedule(
        self, notification_id: str, due_ms: int, error: str, owner: str = "", scope: Scope = None
    ) -> None:
        """Give a claimed notification back after a temporary failure, due again at ``due_ms``.

        One script: the ledger and the due index change together or not at all.
        """
        await self.scripts.reschedule(
            keys=[*self._names([notification_id], scope), keys.due_key(self.tag(scope))],
            args=[notification_id, due_ms, error, owner],
        )

    async def due(self, now_ms: int, limit: int, scope: Scope = None) -> list[str]:
        """Notifications whose time has come (deferred ones and retries), oldest first: the
        scope's (on a cluster, each partition has its due index; see ``scopes``)."""
        due = keys.due_key(self.tag(scope))
        rows = await awaited(self.redis.zrangebyscore(due, "-inf", now_ms, start=0, num=limit))
        return [decode(r) for r in rows]

    async def unschedule(
        self, notification_ids: Sequence[str], now_ms: int, scope: Scope = None
    ) -> None:
        """Take settled notifications off the due index, unless rescheduled past ``now_ms``."""
        if notification_ids:
            due = keys.due_key(self.tag(scope))
            await self.scripts.unschedule(keys=[due], args=[now_ms, *notification_ids])

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
                    keys.due_key(tag),
                    keys.history_key(merchant_id, shipment_id, tag),
                    keys.state_key(merchant_id, shipment_id, tag),
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
    async def ledger(
        self, notification_ids: Sequence[str], scope: Scope = None
    ) -> dict[str, dict[str, str | int]]:
        """Delivery status fields (without the payload) per notification id."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in self._names(notification_ids, scope):
                pipe.hmget(name, list(_SHOWN))
            rows = await pipe.execute()
        out: dict[str, dict[str, str | int]] = {}
        for nid, row in zip(notification_ids, rows, strict=True):
            fields: dict[str, str | int] = {
                k: decode(v) for k, v in zip(_SHOWN.values(), row, strict=True) if v
            }
            if "due_at" in fields:
                due = datetime.fromtimestamp(int(fields["due_at"]) / 1000, UTC)
                fields["due_at"] = due.isoformat()
            if "attempts" in fields:
                fields["attempts"] = int(fields["attempts"])  # a number in the API
            out[nid] = fields
        return out

    async def shorten(
        self, notification_ids: Sequence[str], ttl_s: int, scope: Scope = None
    ) -> None:
        """Let these ledger entries expire within ``ttl_s`` (never later than they would)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in self._names(notification_ids, scope):
                pipe.expire(name, ttl_s, lt=True)
            await pipe.execute()

    def _names(self, notification_ids: Sequence[str], scope: Scope) -> list[str]:
        """The ledger keys of notifications of one scope."""
        tag = self.tag(scope)
        return [keys.notification_key(n, tag) for n in notification_ids]
