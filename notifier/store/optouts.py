"""Opt-outs: one store for the policy engine and the delivery channels.

A set per merchant holds the channel addresses (``opt_out_key`` strings) that opted out of
its messages; the set of ``EVERY_MERCHANT`` holds those that opted out of all of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import idna

from notifier.addresses import older_phone_spellings
from notifier.store.base import StoreBase, awaited
from notifier.store.keys import optout_key


def spellings(key: str) -> list[str]:
    """``key`` and, for an email address with an internationalised domain, the spelling
    its opt-out had before keys held the domain in ASCII (``opt_out_key``): its Unicode
    form, as a backend or the API gave it; for a phone number, the spelling with its
    national prefix after the country code, which the opt-out API kept as given before
    numbers were read into E.164 (``addresses.older_phone_spellings``)."""
    channel, _, address = key.partition(":")
    if channel == "sms":
        return [key, *(f"sms:{older}" for older in older_phone_spellings(address))]
    local, at, domain = address.rpartition("@")
    if channel != "email" or not at or "xn--" not in domain:
        return [key]
    try:
        unicode = idna.decode(domain)
    except idna.IDNAError:
        return [key]
    return [key, f"email:{local}@{unicode}"] if unicode != domain else [key]


class OptOuts(StoreBase):
    """Who opted out of which merchant's messages."""

    #: Opt-outs that hold for every merchant (a STOP sent to our shared Twilio sender).
    EVERY_MERCHANT = "*"

    async def opted_out(self, merchant_id: str, keys: Sequence[str]) -> set[str]:
        """Which of ``keys`` (``opt_out_key`` strings) opted out, for this merchant or all."""
        if not keys:
            return set()
        asked = [(key, other) for key in keys for other in spellings(key)]
        names = [other for _, other in asked]
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.smismember(optout_key(merchant_id), names)
            pipe.smismember(optout_key(self.EVERY_MERCHANT), names)
            mine, everyone = await pipe.execute()
        return {k for (k, _), a, b in zip(asked, mine, everyone, strict=True) if a or b}

    async def set_opt_out(self, merchant_id: str, key: str, opted_out: bool) -> bool:
        """Record an opt-out (True) or an opt-in (False) for one channel address; whether
        that changed anything."""
        if opted_out:
            return bool(await awaited(self.redis.sadd(optout_key(merchant_id), key)))
        return bool(await awaited(self.redis.srem(optout_key(merchant_id), *spellings(key))))
