"""Delivery: claim notifications in the ledger, render them, hand them to their channel, record."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from notifier.channels import Outcome, Outgoing, Receipt
from notifier.errors import RenderError, TemporaryDeliveryError
from notifier.models import ChannelKind, Notification
from notifier.resources import Resources
from notifier.store import ClaimResult

log = logging.getLogger(__name__)

#: How long a claim protects a notification being sent; after it, another worker may retry.
LEASE_MS = 60_000
MAX_ATTEMPTS = 8


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
    #: claimed by another worker whose lease is still running: not settled yet
    busy: list[str] = field(default_factory=list)
    skipped: int = 0


class Deliverer:
    """Sends notifications at most once each: the ledger claim is the gate."""

    def __init__(self, res: Resources) -> None:
        self.res = res

    async def deliver(self, notification_ids: Sequence[str]) -> DeliveryReport:
        """Claim, render and send; failures are recorded, retries scheduled."""
        report = DeliveryReport()
        now = self.res.clock()
        claims = await self.res.store.claim(notification_ids, int(now.timestamp() * 1000), LEASE_MS)
        batches: dict[ChannelKind, list[Outgoing]] = {}
        for nid, (result, payload) in zip(notification_ids, claims, strict=True):
            if result is ClaimResult.BUSY:
                report.busy.append(nid)
                continue
            if result is ClaimResult.NONE or payload is None:
                report.skipped += 1
                continue
            n = Notification.model_validate_json(payload)
            try:
                message = self.res.renderer.render(n)
            except RenderError as exc:
                await self._fail(n.notification_id, exc, report)
                continue
            outgoing = Outgoing(message, now, recovering=result is ClaimResult.RECLAIMED)
            batches.setdefault(n.channel, []).append(outgoing)

        sent: list[tuple[str, str, str]] = []
        for kind, items in batches.items():
            outcomes = await self._send(kind, items)
            for item, outcome in zip(items, outcomes, strict=True):
                nid = item.message.notification_id
                if isinstance(outcome, Receipt):
                    sent.append((nid, now.isoformat(), f"{outcome.channel}:{outcome.detail}"))
                elif isinstance(outcome, TemporaryDeliveryError):
                    await self._retry_later(nid, outcome)
                    report.retrying.append(nid)
                else:
                    await self._fail(nid, outcome, report)
        if sent:
            await self.res.store.mark_sent(sent)
        report.sent = [nid for nid, _, _ in sent]
        return report

    async def _send(self, kind: ChannelKind, items: list[Outgoing]) -> list[Outcome]:
        """The channel's outcomes; a channel that breaks its no-raise contract costs a retry."""
        channel = self.res.channels[kind]
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

    async def _fail(self, nid: str, exc: Exception, report: DeliveryReport) -> None:
        log.error("notification %s failed permanently: %s", nid, exc)
        await self.res.store.mark_failed(nid, str(exc))
        report.failed.append(nid)

    async def _retry_later(self, nid: str, exc: TemporaryDeliveryError) -> None:
        attempts = int((await self.res.store.ledger([nid]))[nid].get("attempts", "1"))
        if attempts >= MAX_ATTEMPTS:
            log.error("notification %s out of attempts: %s", nid, exc.reason)
            await self.res.store.mark_failed(
                nid, f"gave up after {attempts} attempts: {exc.reason}"
            )
            return
        delay = backoff_s(attempts, exc.retry_after_s)
        log.warning("notification %s: %s; retry %d in %.0f s", nid, exc.reason, attempts, delay)
        await self.res.store.release(nid, exc.reason)
        await self.res.redis.enqueue_job(
            "deliver", nid, _job_id=f"deliver:{nid}:{attempts}", _defer_by=delay
        )
