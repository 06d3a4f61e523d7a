"""What every part of the store shares: one Redis client, its scripts and the settings."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, PipelineCommand, RedisCluster
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from notifier.store import keys, record
from notifier.store.scripts import Script, Scripts

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


def redis_away(exc: BaseException) -> bool:
    """Whether ``exc`` is Redis not answering, or not taking commands for now (down,
    restarting, loading, failing over, out of memory, a connection closed under a
    command): what passes with time. Not a bug or a misconfiguration (a command Redis
    refuses, a value redis-py cannot send, a script failing on what it read), which stays
    a 500 with its traceback."""
    if isinstance(exc, _AWAY):
        return True
    if isinstance(exc, ResponseError):
        return str(exc).startswith(_PASSING)
    return isinstance(exc, OSError) and raised_in_redis_connection(exc)


#: redis-py's errors of a Redis away (AuthenticationError, a ConnectionError, is a refused
#: password: it says its name in the log's first line)
_AWAY = (
    RedisConnectionError,
    RedisTimeoutError,
    ClusterDownError,
    TryAgainError,
    ReadOnlyError,
    OutOfMemoryError,
)
#: Redis's replies that pass with time (``redis_away``; in a script's error, ``data_error``)
_PASSING = (
    "OOM",
    "READONLY",
    "MISCONF",
    "NOREPLICAS",
    "BUSY",
    "LOADING",
    "CLUSTERDOWN",
    "TRYAGAIN",
    "MASTERDOWN",
)


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
    return message.startswith("Error running script") and not any(
        code in message for code in (*_PASSING, "MOVED", "ASK ", "non local key")
    )


def _unreachable(result: Any) -> bool:
    """Whether a pipelined command's result says its node could not be reached (an
    AttributeError from redis-py's connection module: a connection its client closed
    under it, as happens while it follows a failover)."""
    if isinstance(result, AttributeError):
        return raised_in_redis_connection(result)
    return isinstance(result, (RedisConnectionError, RedisTimeoutError, OSError))


class WaitRefused(RedisError):
    """The server refused a WAIT (an ACL without it, a proxy that does not pass it) after
    the script before it ran: ``ran`` is what the script answered (what it wrote is on the
    primary)."""

    def __init__(self, refused: BaseException, ran: Any) -> None:
        super().__init__(f"WAIT refused: {type(refused).__name__}: {refused}")
        self.ran = ran


def _confirmed(waited: Any, ran: Any) -> int:
    """How many replicas a WAIT's answer says confirmed: none when its node could not be
    reached; an error of another kind is raised (``WaitRefused``), not read as replicas
    missing for ever."""
    if _unreachable(waited):
        return 0
    if isinstance(waited, BaseException):
        raise WaitRefused(waited, ran) from waited
    return int(waited)


async def _relearn(cluster: RedisCluster) -> None:
    """Have the cluster client learn the layout again at its next call. (Unlike redis-py
    after a connection error, the node that did not answer is left among the nodes it
    starts from: other calls may be reading that list, and a node that was down is often
    back by the next call.)"""
    with contextlib.suppress(RedisError, OSError):  # (closing a connection that hangs)
        await cluster.aclose()


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

    async def call_and_wait(
        self, script: Script, names: list[str], args: list[Any]
    ) -> tuple[Any, int]:
        """``script``'s answer, and how many replicas confirmed its writes (Redis WAIT for
        ``wait_replicas``, up to ``wait_timeout_ms``): the two on one connection, as one
        pipeline (WAIT counts only its own connection's writes)."""
        if not self.cluster:
            async with self.redis.pipeline(transaction=False) as pipe:
                await script(keys=names, args=args, client=cast(Any, pipe))
                pipe.wait(self.wait_replicas, self.wait_timeout_ms)
                # the script's own error, as a call outside a pipeline raises it (redis-py
                # rewrites the message of one it raises from a pipeline); a WAIT that
                # fails confirms nothing
                ran, replicas = await pipe.execute(raise_on_error=False)
            if isinstance(ran, BaseException):
                raise ran
            return ran, _confirmed(replicas, ran)
        return await self._call_and_wait_on_cluster(script, names, args)

    async def _call_and_wait_on_cluster(
        self, script: Script, names: list[str], args: list[Any]
    ) -> tuple[Any, int]:
        """``call_and_wait`` on a cluster: to the primary of the call's slot, on one of its
        connections (redis-py's cluster pipeline would send a redirected script again on
        another).

        A primary that does not know the script yet gets its text (EVAL). One that no
        longer holds the slot runs nothing and answers MOVED (the client patches its slot
        map, as redis-py does); a slot being migrated, ASK or TRYAGAIN. The call is tried
        again, a few times, then answered as an outage (a 503; nothing was written). After
        a node that cannot be reached, the client learns the layout again."""
        cluster = cast(RedisCluster, self.redis)
        command: tuple[Any, ...] = ("EVALSHA", script.sha)
        for _ in range(4):
            await cluster.initialize()  # after ``_relearn``, learns the layout again
            node = self._primary_of(cluster, names[0])
            calls = [
                PipelineCommand(0, *command, len(names), *names, *args),
                PipelineCommand(1, "WAIT", self.wait_replicas, self.wait_timeout_ms),
            ]
            try:
                await node.execute_pipeline(calls)
            except Exception as exc:  # nothing read: the send failed
                calls[0].result = exc
            ran, waited = calls[0].result, calls[1].result
            if _unreachable(ran):
                # whether the script ran is not known: a retry is a duplicate if it did
                await _relearn(cluster)
                raise RedisConnectionError(f"Redis Cluster node {node.name}: {ran}") from ran
            if isinstance(ran, NoScriptError):
                command = ("EVAL", script.script)
            elif isinstance(ran, MovedError) and ran.host:
                cluster.nodes_manager._moved_exception = ran  # redis-py's own slot-map patch
            elif isinstance(ran, MovedError):  # no endpoint named: learn the layout again
                await _relearn(cluster)
            elif isinstance(ran, (AskError, TryAgainError, ClusterDownError)):
                # the slot is being migrated (a script over several keys runs on neither
                # node until it is done: ASK here, TRYAGAIN there), or the cluster fails over
                await asyncio.sleep(0.05)
            elif isinstance(ran, BaseException):
                raise ran
            else:  # the script ran: its writes are on the primary whatever WAIT says
                if _unreachable(waited):
                    await _relearn(cluster)
                return ran, _confirmed(waited, ran)
        raise RedisConnectionError("Redis Cluster: the call kept being redirected")

    @staticmethod
    def _primary_of(cluster: RedisCluster, key: str) -> ClusterNode:
        """The primary of ``key``'s slot, as the client knows it: through its nodes
        manager, which first applies a MOVED it was given (``get_node_from_key`` reads the
        slot map as it is, and would send the call to the old primary again)."""
        try:
            return cluster.nodes_manager.get_node_from_slot(cluster.keyslot(key))
        except SlotNotCoveredError as exc:  # a failover under way
            raise RedisConnectionError(f"Redis Cluster: {exc}") from exc

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
