"""What the health check and the metrics count: dead letters, and merchants whose own
template files a worker found broken."""

from __future__ import annotations

from collections.abc import Iterable

from notifier.store import keys
from notifier.store.base import StoreBase, awaited


class Health(StoreBase):
    """Counts of what went wrong."""

    #: a merchant not met with broken files for this long no longer counts
    OVERRIDES_WINDOW_MS = 24 * 3600 * 1000

    async def publish_overrides(
        self, hits: Iterable[str], cleared: Iterable[str], now_ms: int
    ) -> None:
        """Record merchants whose own files a worker found broken (``hits``) and those
        whose edited files are to be judged again (``cleared``); forget old hits."""
        async with self.redis.pipeline(transaction=False) as pipe:
            if mapping := dict.fromkeys(hits, now_ms):
                pipe.zadd(keys.OVERRIDES_KEY, mapping)
            if gone := list(cleared):
                pipe.zrem(keys.OVERRIDES_KEY, *gone)
            pipe.zremrangebyscore(keys.OVERRIDES_KEY, "-inf", now_ms - self.OVERRIDES_WINDOW_MS)
            await pipe.execute()

    async def overrides_listed(self, now_ms: int) -> list[str]:
        """The merchants ``overrides_disabled`` counts."""
        since = now_ms - self.OVERRIDES_WINDOW_MS
        found = await awaited(self.redis.zrangebyscore(keys.OVERRIDES_KEY, since, "+inf"))
        return [m.decode() if isinstance(m, bytes) else str(m) for m in found]

    async def overrides_disabled(self, now_ms: int) -> int:
        """How many merchants had own files found broken within the last day."""
        since = now_ms - self.OVERRIDES_WINDOW_MS
        return int(await awaited(self.redis.zcount(keys.OVERRIDES_KEY, since, "+inf")))

    async def dead_letters(self) -> dict[str, int]:
        """How many notifications failed for good, and inbox entries that kept failing."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for scope in self.scopes:
                pipe.llen(keys.dead_letter_key(self.tag(scope)))
                pipe.xlen(keys.dead_inbox_key(self.tag(scope)))
            counts = [int(n) for n in await pipe.execute()]
        return {"notifications": sum(counts[0::2]), "inbox": sum(counts[1::2])}
