"""Which webhook event types each merchant's endpoints take, as a worker knows it: read from
Redis at most every few seconds per merchant, so deciding a batch costs no extra round trip
most of the time, and a new subscription applies within ``REFRESH_S``."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from notifier.outbound.events import matches
from notifier.store import Store

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
        for merchant_id in set(merchant_ids):
            seen = self._known.get(merchant_id)
            if seen is not None and now - seen[0] < REFRESH_S:
                continue
            endpoints = await self.store.hook_endpoints(merchant_id)
            patterns = [e["events"] for e in endpoints.values() if e.get("enabled", True)]
            self._known[merchant_id] = (now, patterns)

    def wanted(self, merchant_id: str, event_type: str) -> bool:
        """Whether any endpoint of the merchant takes ``event_type`` (as last read)."""
        seen = self._known.get(merchant_id)
        return seen is not None and any(matches(p, event_type) for p in seen[1])
