"""Opt-outs: one store for the policy engine and the delivery channels.

A set per merchant holds the channel addresses (``opt_out_key`` strings) that opted out of
its messages; the set of ``EVERY_MERCHANT`` holds those that opted out of all of them.
"""

from __future__ import annotations

from collections.abc import Sequence

from notifier.store.base import StoreBase, awaited
from notifier.store.keys import optout_key


class OptOuts(StoreBase):
    """Who opted out of which merchant's messages."""

    #: Opt-outs that hold for every merchant (a STOP sent to our shared Twilio sender).
    EVERY_MERCHANT = "*"

    async def opted_out(self, merchant_id: str, keys: Sequence[str]) -> set[str]:
        """Which of ``keys`` (``opt_out_key`` strings) opted out, for this merchant or all."""
        if not keys:
            return set()
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.smismember(optout_key(merchant_id), list(keys))
            pipe.smismember(optout_key(self.EVERY_MERCHANT), list(keys))
            mine, everyone = await pipe.execute()
        return {k for k, a, b in zip(keys, mine, everyone, strict=True) if a or b}

    async def set_opt_out(self, merchant_id: str, key: str, opted_out: bool) -> bool:
        """Record an opt-out (True) or an opt-in (False) for one channel address; whether
        that changed anything."""
        if opted_out:
            return bool(await awaited(self.redis.sadd(optout_key(merchant_id), key)))
        return bool(await awaited(self.redis.srem(optout_key(merchant_id), key)))
