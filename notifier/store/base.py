"""What every part of the store shares: one Redis client, its scripts and the settings."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import TypeVar

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from notifier.store import keys, record
from notifier.store.scripts import Scripts

T = TypeVar("T")
#: Where the store keeps its data: one Redis (or the embedded one), or a Redis Cluster.
DataRedis = Redis | RedisCluster
#: What a key belongs to: a partition on a Redis Cluster (its hash tag), None on one Redis,
#: where the partitions share every index.
Scope = int | None


def raised_in_redis_connection(exc: BaseException) -> bool:
    """Whether ``exc`` was raised inside redis-py's connection module (a connection its
    cluster client closed under a running command, as it follows a failover)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_filename.endswith(_REDIS_CONNECTION)


_REDIS_CONNECTION = str(Path("redis", "asyncio", "connection.py"))


def data_error(exc: BaseException) -> bool:
    """Whether ``exc`` is one of the store's scripts failing on what it read (a record that
    does not read, a key of the wrong type), not Redis failing: the same data fails it
    again, so waiting for Redis would retry it forever. A Lua error (``user_script:…``,
    Redis 6: ``Error running script …``) or ``WRONGTYPE``; never one that passes with time
    (out of memory, read-only replica, busy, loading, a cluster that moves slots)."""
    if not isinstance(exc, ResponseError):
        return False
    message = str(exc)
    if message.startswith(("user_script:", "WRONGTYPE")):
        return True
    transient = ("OOM", "READONLY", "MISCONF", "NOREPLICAS", "BUSY", "LOADING", "CLUSTERDOWN")
    return message.startswith("Error running script") and not any(
        code in message for code in (*transient, "TRYAGAIN", "MOVED", "ASK ", "non local key")
    )


class StoreBase:
    """The client and settings the store's parts (``Inbox``, ``Shipments``, ``Ledger``,
    ``OptOuts``, ``Health``) work with; ``Store`` joins them over one of these."""

    #: How often a process measures again how far Redis's clock is from its own, seconds.
    CLOCK_CHECK_S = 60.0
    #: Redis's clock minus this process's (seconds), and when that was measured (monotonic)
    _redis_offset: tuple[float, float] | None = None

    def __init__(
        self,
        redis: DataRedis,
        *,
        partitions: int,
        idempotency_ttl_s: int,
        state_ttl_s: int,
        history_cap: int = 200,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 1000,
    ) -> None:
        self.redis = redis
        #: on a Redis Cluster, the keys of a partition share its hash tag (``keys.tag``)
        self.cluster = isinstance(redis, RedisCluster)
        self.wait_replicas, self.wait_timeout_ms = wait_replicas, wait_timeout_ms
        self.partitions = partitions
        self.idempotency_ttl_s = idempotency_ttl_s
        self.state_ttl_s = state_ttl_s
        self.history_cap = history_cap
        self.scripts = Scripts.register(redis)

    async def redis_seconds(self) -> float:
        """Redis's clock now, as this process reckons it: its own clock plus the offset to
        Redis's, measured once a minute (keys named by the time, event-id generations and
        tracking-number weeks, follow Redis's clock, which every process shares)."""
        now = time.monotonic()
        if self._redis_offset is None or now - self._redis_offset[1] > self.CLOCK_CHECK_S:
            seconds, micros = await self.redis.time()
            self._redis_offset = (seconds + micros / 1e6 - time.time(), now)
        return time.time() + self._redis_offset[0]

    @property
    def outcomes_cap(self) -> int:
        """The most records a shipment's outcome list keeps: its history keeps
        ``history_cap`` decisions, and a decision's notification may have a few provider
        status reports after its outcome."""
        return 4 * self.history_cap

    def partition_of(self, merchant_id: str, shipment_id: str) -> int:
        """The inbox partition of a shipment: stable, so its events stay in one stream."""
        return keys.partition_of(merchant_id, shipment_id, self.partitions)

    @property
    def scopes(self) -> list[Scope]:
        """Every scope: each partition on a cluster, else the one shared by all."""
        return list(range(self.partitions)) if self.cluster else [None]

    def scope_of(self, merchant_id: str, shipment_id: str) -> Scope:
        """The scope of a shipment's keys (its ledger entries' too)."""
        return self.partition_of(merchant_id, shipment_id) if self.cluster else None

    def tag(self, scope: Scope) -> str:
        """The hash tag of a scope's keys ("" on one Redis: the names of old)."""
        if scope is None:
            if self.cluster:
                raise ValueError("on a Redis Cluster, say which partition the keys belong to")
            return ""
        return keys.tag(scope, self.partitions) if self.cluster else ""

    def partition_tag(self, partition: int) -> str:
        """The tag of a partition's own keys (its inbox, lock, wake flag)."""
        return keys.tag(partition, self.partitions) if self.cluster else ""

    def shipment_tag(self, merchant_id: str, shipment_id: str) -> str:
        return self.tag(self.scope_of(merchant_id, shipment_id))

    def record_keys(self, merchant_id: str, shipment_id: str) -> list[str]:
        """The keys of a shipment's record (``keys.record_keys``)."""
        tag = self.shipment_tag(merchant_id, shipment_id)
        return keys.record_keys(merchant_id, shipment_id, tag)

    async def records(
        self, shipments: Sequence[tuple[str, str]], whole: bool = True
    ) -> list[record.Record]:
        """Each shipment's record (``record``; ``whole=False``: without its history and
        outcomes), also of shipments recorded before records (``lua/read_records.lua``). One
        script call per scope (a batch's shipments are mostly one partition's)."""
        by_scope: dict[Scope, list[int]] = {}
        for i, (merchant_id, shipment_id) in enumerate(shipments):
            by_scope.setdefault(self.scope_of(merchant_id, shipment_id), []).append(i)

        async def read(scope: Scope, at: list[int]) -> list[bytes]:
            tag = self.tag(scope)
            names = [name for i in at for name in keys.record_keys(*shipments[i], tag)]
            found: list[bytes] = await self.scripts.read_records(
                keys=names, args=["all" if whole else "state"]
            )
            return found

        answers = await asyncio.gather(*(read(scope, at) for scope, at in by_scope.items()))
        out: list[record.Record] = [record.Record()] * len(shipments)
        for at, found in zip(by_scope.values(), answers, strict=True):
            for i, raw in zip(at, found, strict=True):
                out[i] = record.parse(raw)
        return out


async def awaited(result: Awaitable[T] | T) -> T:
    """Await a redis-py command; its stubs type every command for the sync and async client."""
    if inspect.isawaitable(result):
        return await result
    return result


def decode(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
