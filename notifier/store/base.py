"""What every part of the store shares: one Redis client, its scripts and the settings."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable
from typing import TypeVar

from arq.connections import ArqRedis

from notifier.store.scripts import Scripts

T = TypeVar("T")


class StoreBase:
    """The client and settings the store's parts (``Inbox``, ``Shipments``, ``Ledger``,
    ``OptOuts``, ``Health``) work with; ``Store`` joins them over one of these."""

    def __init__(
        self,
        redis: ArqRedis,
        *,
        partitions: int,
        idempotency_ttl_s: int,
        state_ttl_s: int,
        history_cap: int = 200,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 1000,
    ) -> None:
        self.redis = redis
        self.wait_replicas, self.wait_timeout_ms = wait_replicas, wait_timeout_ms
        self.partitions = partitions
        self.idempotency_ttl_s = idempotency_ttl_s
        self.state_ttl_s = state_ttl_s
        self.history_cap = history_cap
        self.scripts = Scripts.register(redis)


async def awaited(result: Awaitable[T] | T) -> T:
    """Await a redis-py command; its stubs type every command for the sync and async client."""
    if inspect.isawaitable(result):
        return await result
    return result


def decode(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
