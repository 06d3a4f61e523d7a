"""Notification analytics in Redis: per merchant and UTC day, one hash of counts (on a Redis
Cluster one per partition, so the commit script counts a shipment's decisions in its own
slot), read back summed over the partitions. Each day's hash lives ``KEEP_DAYS``."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import date, timedelta

from notifier.insights.counts import KEEP_DAYS
from notifier.store import keys
from notifier.store.base import Scope, StoreBase, awaited, decode

#: seconds a day's counts are kept
KEEP_S = KEEP_DAYS * 86_400


class Stats(StoreBase):
    """Counts of what happened to a merchant's notifications, by day."""

    async def count(
        self, merchant_id: str, scope: Scope, day: str, counts: Mapping[str, int]
    ) -> None:
        """Add ``counts`` (fields of ``insights.counts``) to a merchant's day, in ``scope``
        (that of a shipment they are about)."""
        await self.count_many(scope, day, {merchant_id: counts})

    async def count_many(
        self, scope: Scope, day: str, counts: Mapping[str, Mapping[str, int]]
    ) -> None:
        """``count`` for several merchants (merchant id -> counts), in one round trip."""
        if not any(counts.values()):
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for merchant_id, mine in counts.items():
                key = keys.stats_key(merchant_id, day, self.tag(scope))
                for name, n in mine.items():
                    pipe.hincrby(key, name, n)
                pipe.expire(key, KEEP_S)
            await pipe.execute()

    async def count_once(
        self, merchant_id: str, scope: Scope, day: str, name: str, message: str
    ) -> bool:
        """Count the field ``name`` for ``message`` once a day (an email's opens, its
        clicks); whether it was counted now."""
        seen = keys.stats_seen_key(merchant_id, day, self.tag(scope))
        if not await awaited(self.redis.sadd(seen, f"{name}:{message}")):
            return False
        await awaited(self.redis.expire(seen, 2 * 86_400))
        await self.count(merchant_id, scope, day, {name: 1})
        return True

    async def stats(self, merchant_id: str, first: date, last: date) -> dict[str, dict[str, int]]:
        """Day -> field -> count, for the days from ``first`` to ``last`` that have any."""
        return await self._days(keys.stats_key, merchant_id, first, last)

    async def carrier_stats(
        self, merchant_id: str, first: date, last: date
    ) -> dict[str, dict[str, int]]:
        """The carrier counts (``insights.journeys``) like ``stats``."""
        return await self._days(keys.carrier_key, merchant_id, first, last)

    async def _days(
        self, key_of: Callable[[str, str, str], str], merchant_id: str, first: date, last: date
    ) -> dict[str, dict[str, int]]:
        days = [(first + timedelta(days=i)).isoformat() for i in range((last - first).days + 1)]
        names = [
            (day, key_of(merchant_id, day, self.tag(scope)))
            for day in days
            for scope in self.scopes
        ]
        async with self.redis.pipeline(transaction=False) as pipe:
            for _, name in names:
                pipe.hgetall(name)
            found: Sequence[dict[bytes, bytes]] = await pipe.execute()
        out: dict[str, dict[str, int]] = {}
        for (day, _), counts in zip(names, found, strict=True):
            for k, v in counts.items():
                mine = out.setdefault(day, {})
                mine[decode(k)] = mine.get(decode(k), 0) + int(v)
        return out
