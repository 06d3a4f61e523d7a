"""Notification analytics in Redis: per merchant and UTC day, one hash of counts (on a Redis
Cluster one per partition, so the commit script counts a shipment's decisions in its own
slot), read back summed over the partitions. Each day's hash lives ``KEEP_DAYS``. And the
weekly digest's settings and send-markers (``insights.digest``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import date, timedelta
from typing import Any

import orjson

from notifier.insights.counts import KEEP_DAYS
from notifier.store import keys
from notifier.store.base import Scope, StoreBase, awaited, decode

#: seconds a day's counts are kept
KEEP_S = KEEP_DAYS * 86_400


def add_counts(pipe: Any, tag: str, day: str, counts: Mapping[str, Mapping[str, int]]) -> None:
    """Queue on ``pipe`` the counts of a day (merchant id -> field -> n) in the scope of
    ``tag``, each merchant's day kept ``KEEP_S`` from now."""
    for merchant_id, mine in counts.items():
        if not mine:
            continue
        key = keys.stats_key(merchant_id, day, tag)
        for name, n in mine.items():
            pipe.hincrby(key, name, n)
        pipe.expire(key, KEEP_S)


class Stats(StoreBase):
    """Counts of what happened to a merchant's notifications, by day."""

    async def count(
        self, merchant_id: str, scope: Scope, day: str, counts: Mapping[str, int]
    ) -> None:
        """Add ``counts`` (fields of ``insights.counts``) to a merchant's day, in ``scope``
        (that of a shipment they are about)."""
        if not counts:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            add_counts(pipe, self.tag(scope), day, {merchant_id: counts})
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

    # -- the weekly digest ------------------------------------------------------------------
    async def digest_settings(self) -> dict[str, dict[str, Any]]:
        """Every merchant's digest settings."""
        raw = await awaited(self.redis.hgetall(keys.DIGESTS_KEY))
        return {decode(k): orjson.loads(v) for k, v in raw.items()}

    async def digest_settings_of(self, merchant_id: str) -> dict[str, Any] | None:
        raw = await awaited(self.redis.hget(keys.DIGESTS_KEY, merchant_id))
        return None if raw is None else dict(orjson.loads(raw))

    async def put_digest_settings(self, merchant_id: str, value: Mapping[str, Any]) -> None:
        await awaited(self.redis.hset(keys.DIGESTS_KEY, merchant_id, orjson.dumps(value).decode()))

    async def drop_digest_settings(self, merchant_id: str) -> bool:
        return bool(await awaited(self.redis.hdel(keys.DIGESTS_KEY, merchant_id)))

    async def mark_digest(
        self, merchant_id: str, week: str, state: str, ttl_s: int, *, first: bool = False
    ) -> bool:
        """Mark a merchant's digest of a week ``state`` for ``ttl_s``; with ``first``, only
        if nothing marks it yet. Whether it was marked."""
        key = keys.digest_sent_key(merchant_id, week)
        return bool(await awaited(self.redis.set(key, state, nx=first, ex=ttl_s)))

    async def unmark_digest(self, merchant_id: str, week: str) -> None:
        await awaited(self.redis.delete(keys.digest_sent_key(merchant_id, week)))
