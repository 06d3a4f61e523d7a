"""Which webhook event types each merchant's endpoints take, as a worker knows it: read from
Redis at most every few seconds per merchant, so deciding a batch costs no extra round trip
most of the time, and a new subscription applies within ``REFRESH_S``."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

from redis.exceptions import RedisError

from notifier.outbound import events
from notifier.outbound.events import matches, stored
from notifier.store import Store

log = logging.getLogger("notifier.hooks")

#: how old a merchant's subscriptions may be when a batch is decided
REFRESH_S = 5.0


class Subscriptions:
    """Per merchant, the patterns its enabled endpoints subscribe to."""

    def __init__(self, store: Store, clock: Callable[[], float] = time.monotonic) -> None:
        self.store, self.clock = store, clock
        self._known: dict[str, tuple[float, list[list[str]]]] = {}

    async def refresh(self, merchant_ids: Iterable[str]) -> None:
        """Read the subscriptions of the merchants not read in the last ``REFRESH_S``."""
        now = self.clock()
        stale = [
            m
            for m in set(merchant_ids)
            if m not in self._known or now - self._known[m][0] >= REFRESH_S
        ]
        if not stale:
            return
        for merchant_id, endpoints in zip(
            stale, await self.store.hook_endpoints_of(stale), strict=True
        ):
            patterns = [e["events"] for e in endpoints.values() if e.get("enabled", True)]
            self._known[merchant_id] = (now, patterns)

    def wanted(self, merchant_id: str, event_type: str) -> bool:
        """Whether any endpoint of the merchant takes ``event_type`` (as last read)."""
        seen = self._known.get(merchant_id)
        return seen is not None and any(matches(p, event_type) for p in seen[1])

    async def emit(
        self,
        merchant_id: str,
        shipment_id: str,
        event: dict[str, Any],
        at: datetime,
    ) -> bool:
        """Queue ``event`` (about a shipment's message or recipient, outside a commit) when
        an endpoint of the merchant takes it; whether it was queued. Never raises: a Redis
        failure is logged, and what the caller recorded stands."""
        try:
            await self.refresh([merchant_id])
            if not self.wanted(merchant_id, event["type"]):
                return False
            scope = self.store.scope_of(merchant_id, shipment_id)
            stamp = int(at.timestamp() * 1000)
            await self.store.queue_hook_events(scope, [(event["id"], stored(event))], stamp)
            return True
        except (RedisError, OSError) as exc:
            log.warning(
                "merchant webhook event %s (%s) not queued: Redis failed (%s)",
                event["id"],
                event["type"],
                type(exc).__name__,
            )
            return False

    async def opted_out(
        self,
        merchant_id: str,
        key: str,
        source: str,
        at: datetime,
        shipment_id: str | None = None,
    ) -> bool:
        """Queue a ``recipient.opted_out`` event for an opt-out that was new (``key``, an
        ``opt_out_key``: "<channel>:<address>")."""
        channel, _, address = key.partition(":")
        event = events.opted_out(merchant_id, channel, address, source, at, shipment_id)
        return await self.emit(merchant_id, shipment_id or "", event, at)
