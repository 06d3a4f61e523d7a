"""Redis keys and scripts: idempotency, inbox streams, shipment state, history, notification ledger.

Every write that must be atomic is one Lua script, so any number of API and
worker processes can share one Redis:

- ``ingest``: per event, look its event id up among the ids seen lately and, only
  if new, record it and ``XADD`` the event to its partition's inbox stream — an
  event is either persisted and acknowledged, or not acknowledged at all.
- ``commit``: per shipment, compare-and-set the state version, append the
  decisions to the history and create the ledger entries of new notifications.
  A shipment whose version moved (another worker got there first) is reported
  as a conflict and re-decided by the caller.
- ``claim``: move a notification from ``pending`` (or a ``sending`` whose lease
  expired) to ``sending``, so two workers never send the same notification.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import inspect
import zlib
from collections import deque
from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, TypeVar

import orjson
from arq.connections import ArqRedis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

from notifier.packing import HISTORY, STATE, pack, unpack
from notifier.state import ShipmentState

T = TypeVar("T")

PREFIX = "ntf"
GROUP = "workers"

# One JSON argument carries the whole group, [bucket, field, pre-0.5 key, inbox, payload,
# body digest] per
# event: redis-py packs every argument in Python, and six per event cost the API more than
# the script's run. The generation comes from Redis's clock, so API processes whose clocks
# disagree still agree on it. (The script names keys itself, so it needs a single Redis,
# not a Cluster, like every multi-shipment script here.)
_INGEST = """
local events = cjson.decode(ARGV[1])
local ttl = tonumber(ARGV[2])
local generation = math.floor(tonumber(redis.call('TIME')[1]) / ttl)
local current = ARGV[4] .. generation .. ':'
local previous = ARGV[4] .. (generation - 1) .. ':'
-- a bucket lives through its generation and the next, when it is still looked at
local expire_at = (generation + 2) * ttl
local accepted = {}
local touched = {}
for i, e in ipairs(events) do
  local cur, field, inbox, digest = current .. e[1], e[2], e[4], e[6]
  -- the body digest recorded with the id: '' for ids recorded before 0.6 (and 0.4's keys)
  local seen = redis.call('HGET', cur, field) or redis.call('HGET', previous .. e[1], field)
  if not seen and redis.call('EXISTS', e[3]) == 1 then seen = '' end
  if seen then
    -- 0: the same event again (a duplicate); 2: another body under a known id (a conflict)
    if seen == '' or seen == digest then accepted[i] = 0 else accepted[i] = 2 end
  else
    redis.call('HSET', cur, field, digest)
    redis.call('EXPIREAT', cur, expire_at)
    redis.call('XADD', inbox, '*', 't', e[5], 'r', e[7] or '')
    accepted[i] = 1
    touched[inbox] = true
  end
end
local woken = {}
for inbox, _ in pairs(touched) do
  if redis.call('SET', inbox .. ':wake', '1', 'NX', 'PX', ARGV[3]) then
    table.insert(woken, inbox)
  end
end
return {accepted, woken}
"""

_COMMIT = """
local ttl = tonumber(ARGV[1])
local cap = tonumber(ARGV[2])
local shipments = tonumber(ARGV[3])
local now = ARGV[4]
local stall, dueidx = KEYS[1], KEYS[2]
local a = 6
local k = 3
local conflicts = {}
for s = 1, shipments do
  local skey, hkey = KEYS[k], KEYS[k + 1]
  k = k + 2
  local expected, newstate, member, deadline, nh, sttl =
    ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], tonumber(ARGV[a + 4]), ARGV[a + 5]
  if sttl ~= '' then sttl = tonumber(sttl) else sttl = ttl end
  a = a + 6
  local current = redis.call('HGET', skey, 'v') or '0'
  local ok = (current == expected)
  if ok then
    redis.call('HSET', skey, 'v', tostring(tonumber(current) + 1), 's', newstate)
    redis.call('EXPIRE', skey, sttl)
    if deadline == '' then
      redis.call('ZREM', stall, member)
    else
      redis.call('ZADD', stall, deadline, member)
    end
    if nh > 0 and redis.call('HEXISTS', skey, 'hn') == 0 then
      -- every entry ever appended, for the history API's positions; a shipment from before
      -- the counter starts from what its history holds
      redis.call('HSET', skey, 'hn', redis.call('LLEN', hkey))
    end
    for i = 0, nh - 1 do
      redis.call('RPUSH', hkey, ARGV[a + i])
    end
    if nh > 0 then
      redis.call('LTRIM', hkey, -cap, -1)
      redis.call('EXPIRE', hkey, sttl)
      redis.call('HINCRBY', skey, 'hn', nh)
    end
  else
    table.insert(conflicts, s)
  end
  a = a + nh
  local nn = tonumber(ARGV[a])
  a = a + 1
  for i = 0, nn - 1 do
    local st, due, payload = ARGV[a + 3 * i], ARGV[a + 3 * i + 1], ARGV[a + 3 * i + 2]
    if ok and redis.call('HSETNX', KEYS[k + i], 'st', st) == 1 then
      redis.call('HSET', KEYS[k + i], 'p', payload, 'created', now, 'attempts', '0', 'due', due)
      redis.call('EXPIRE', KEYS[k + i], sttl)
      if due ~= '' then
        redis.call('ZADD', dueidx, due, string.sub(KEYS[k + i], string.len(ARGV[5]) + 1))
      end
    end
  end
  k = k + nn
  a = a + 3 * nn
end
return conflicts
"""

_CLAIM = """
local now = tonumber(ARGV[1])
local lease = tonumber(ARGV[2])
local due_ok = ARGV[3] == 'due'
local out = {}
for i = 1, #KEYS do
  local st = redis.call('HGET', KEYS[i], 'st')
  local code = 0
  if st == 'pending' then
    code = 1
  elseif st == 'deferred' then
    local due = redis.call('HGET', KEYS[i], 'due') or ''
    if due_ok and tonumber(due) <= now then code = 1 end
  elseif st == 'sending' then
    local claimed = tonumber(redis.call('HGET', KEYS[i], 'claimed') or '0')
    if claimed + lease < now then code = 2 end
  end
  if code > 0 then
    local payload = redis.call('HGET', KEYS[i], 'p')
    if payload then
      redis.call('HSET', KEYS[i], 'st', 'sending', 'claimed', tostring(now), 'owner', ARGV[4])
      redis.call('HINCRBY', KEYS[i], 'attempts', 1)
      out[i] = {code, payload}
    else
      out[i] = {0, ''}
    end
  elseif st == 'sending' then
    out[i] = {3, ''}
  elseif st == 'deferred' then
    out[i] = {4, redis.call('HGET', KEYS[i], 'due') or '0'}
  else
    out[i] = {0, ''}
  end
end
return out
"""


# Settle ledger entries that still exist (an expired one is never re-created without
# its payload and TTL) and that the caller still holds: a worker whose claim ran out and
# was taken over must not overwrite what the new holder recorded.
# ARGV: owner token ('' = no check), the number of fields n, the number of fields to drop d,
# those d field names (what a settled entry no longer needs: its payload, its claim), then
# n field/value pairs per key.
_SETTLE = """
local owner = ARGV[1]
local n = tonumber(ARGV[2])
local d = tonumber(ARGV[3])
local a = 4 + d
local drop = {}
for f = 4, 3 + d do drop[ARGV[f]] = true end
local settled = {}
for i = 1, #KEYS do
  local mine = owner == '' or redis.call('HGET', KEYS[i], 'owner') == owner
  if redis.call('EXISTS', KEYS[i]) == 1 and mine then
    for f = 0, n - 1 do
      redis.call('HSET', KEYS[i], ARGV[a + 2 * f], ARGV[a + 2 * f + 1])
    end
    if d > 0 then
      -- Written anew without what it drops (and without empty fields), a settled entry
      -- is a compact listpack again when its values are short; Redis never converts a
      -- hash back by itself once the payload made it a hashtable (~2.5x the memory).
      local ttl = redis.call('PTTL', KEYS[i])
      local all = redis.call('HGETALL', KEYS[i])
      local kept = {}
      for f = 1, #all, 2 do
        if all[f + 1] ~= '' and not drop[all[f]] then
          table.insert(kept, all[f])
          table.insert(kept, all[f + 1])
        end
      end
      redis.call('DEL', KEYS[i])
      redis.call('HSET', KEYS[i], unpack(kept))
      if ttl > 0 then redis.call('PEXPIRE', KEYS[i], ttl) end
    end
    table.insert(settled, i)
  end
  a = a + 2 * n
end
return settled
"""

# Per-partition drain lock: take (or renew) it only if free or already ours.
_LOCK = """
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

_DROP_STALL = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) == tonumber(ARGV[2]) then
  return redis.call('ZREM', KEYS[1], ARGV[1])
end
return 0
"""

_RESCHEDULE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if ARGV[4] ~= '' and redis.call('HGET', KEYS[1], 'owner') ~= ARGV[4] then return 0 end
redis.call('HSET', KEYS[1], 'st', 'deferred', 'due', ARGV[2], 'error', ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
return 1
"""

_ADD_NOTIFICATION = """
if redis.call('HSETNX', KEYS[1], 'st', 'deferred') == 0 then return 0 end
redis.call('HSET', KEYS[1], 'p', ARGV[2], 'due', ARGV[3], 'attempts', '0')
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
if redis.call('EXISTS', KEYS[4]) == 1 then
  if redis.call('HEXISTS', KEYS[4], 'hn') == 0 then
    redis.call('HSET', KEYS[4], 'hn', redis.call('LLEN', KEYS[3]))
  end
  redis.call('HINCRBY', KEYS[4], 'hn', 1)
end
redis.call('RPUSH', KEYS[3], ARGV[4])
redis.call('LTRIM', KEYS[3], -tonumber(ARGV[6]), -1)
redis.call('EXPIRE', KEYS[3], ARGV[5])
return 1
"""

# One snapshot: positions count every decision ever appended ('hn'), so a cursor stays valid
# while new decisions arrive and old ones are trimmed. (Shipments recorded before 'hn'
# existed count from what is kept.)
_HISTORY_PAGE = """
local total = tonumber(redis.call('HGET', KEYS[1], 'hn') or '0')
local kept = redis.call('LLEN', KEYS[2])
if total < kept then total = kept end
local first = total - kept
local start = tonumber(ARGV[1])
if start < first then start = first end
local rows = redis.call('LRANGE', KEYS[2], start - first, start - first + tonumber(ARGV[2]) - 1)
return {total, first, start, rows}
"""

_PROVIDER_STATUS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local current = tonumber(redis.call('HGET', KEYS[1], 'prank') or '-1')
if tonumber(ARGV[2]) <= current then return 0 end
redis.call('HSET', KEYS[1], 'provider_status', ARGV[1], 'prank', ARGV[2])
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'provider_error', ARGV[3]) end
return 1
"""

_UNSCHEDULE = """
local now = tonumber(ARGV[1])
for i = 2, #ARGV do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score and tonumber(score) <= now then redis.call('ZREM', KEYS[1], ARGV[i]) end
end
return 1
"""

_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class LedgerState(StrEnum):
    """Where a notification is in its life (ledger ``st`` field)."""

    PENDING = "pending"  #: decided, not yet handed to a channel
    SENDING = "sending"  #: claimed by a worker, being handed to a channel
    DEFERRED = "deferred"  #: held until ``due`` (quiet hours, coalescing); not yet claimable
    SENT = "sent"  #: the channel accepted it
    CANCELLED = "cancelled"  #: never sent: superseded by a newer state, or the recipient opted out
    FAILED = "failed"  #: permanently failed or out of attempts; in the dead-letter list


class ClaimResult(StrEnum):
    """What ``claim`` found for one notification."""

    NONE = "none"  #: settled (sent or failed) or unknown: nothing left to do
    FRESH = "fresh"  #: was pending
    RECLAIMED = "reclaimed"  #: a previous claim's lease expired; it may have been sent already
    BUSY = "busy"  #: another worker holds a live claim; not settled yet
    DEFERRED = "deferred"  #: waiting for its due time (payload holds the due epoch ms)


@dataclass(frozen=True, slots=True)
class InboxEntry:
    """One accepted transition waiting in a partition's inbox stream."""

    entry_id: str
    payload: bytes
    #: the API request that accepted it (its X-Request-ID), "" for entries from before
    request_id: str = ""


@dataclass(frozen=True, slots=True)
class ShipmentCommit:
    """What one shipment's processing wants to write, guarded by the version it read."""

    merchant_id: str
    shipment_id: str
    expected_version: int
    state: ShipmentState
    history: list[bytes]
    #: (notification id, initial ledger state, due epoch ms or "", payload)
    notifications: list[tuple[str, str, str, bytes]]
    #: epoch ms when the shipment counts as stalled; None takes it off the stall index
    stall_at_ms: int | None = None
    #: how long its state, history and new ledger entries live (None: the store's default)
    ttl_s: int | None = None


async def awaited(result: Awaitable[T] | T) -> T:
    """Await a redis-py command; its stubs type every command for the sync and async client."""
    if inspect.isawaitable(result):
        return await result
    return result


def _entry(entry_id: bytes | str, fields: dict[bytes, bytes]) -> InboxEntry:
    return InboxEntry(_decode(entry_id), fields[b"t"], _decode(fields.get(b"r", b"")))


def _decode(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class Admission(StrEnum):
    """What ingest made of an event."""

    ACCEPTED = "accepted"  #: new: persisted to its inbox
    DUPLICATE = "duplicate"  #: its event id was seen before, with the same body
    CONFLICT = "conflict"  #: its event id was seen before, with another body (not persisted)


_ADMISSIONS = {1: Admission.ACCEPTED, 0: Admission.DUPLICATE, 2: Admission.CONFLICT}
#: (merchant_id, shipment_id, event_id, payload, body digest) of an event to ingest
#: (merchant, shipment, event id, payload, body digest, request id)
IngestItem = tuple[str, str, str, bytes, str, str]


def body_digest(body: Any) -> str:
    """A short digest of a transition's JSON body, keys sorted: a repost that differs only
    in key order or spacing is the same body."""
    canonical = orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
    return base64.b64encode(hashlib.blake2b(canonical, digest_size=9).digest()).decode()


@dataclass(frozen=True, slots=True)
class HistoryPage:
    """A page of a shipment's decisions."""

    decisions: list[dict[str, Any]]
    #: decisions ever recorded for the shipment
    total: int
    #: the oldest ones no longer kept (the history keeps the latest ``history_cap``)
    trimmed: int
    #: where the next page starts, None at the end
    next_cursor: int | None


class NotReplicated(RedisError):
    """Ingested on the primary, but fewer replicas than required confirmed it in time."""

    def __init__(self, acked: int, required: int, timeout_ms: int, woken: list[int]) -> None:
        super().__init__(f"{acked} of {required} replicas confirmed within {timeout_ms} ms")
        self.acked, self.required = acked, required
        #: the partitions to wake all the same: the events are stored on the primary
        self.woken = woken


class Store:
    """Typed access to everything notifier keeps in Redis."""

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
        self._ingest = redis.register_script(_INGEST)
        self._commit = redis.register_script(_COMMIT)
        self._claim = redis.register_script(_CLAIM)
        self._settle_script = redis.register_script(_SETTLE)
        self._lock = redis.register_script(_LOCK)
        self._drop_stall = redis.register_script(_DROP_STALL)
        self._unschedule = redis.register_script(_UNSCHEDULE)
        self._reschedule = redis.register_script(_RESCHEDULE)
        self._provider_status = redis.register_script(_PROVIDER_STATUS)
        self._add_notification = redis.register_script(_ADD_NOTIFICATION)
        self._unlock = redis.register_script(_UNLOCK)
        self._history_page = redis.register_script(_HISTORY_PAGE)
        self._ingest_queue: deque[
            tuple[Sequence[IngestItem], asyncio.Future[tuple[list[Admission], list[int]]]]
        ] = deque()
        self._ingest_task: asyncio.Task[None] | None = None

    # -- keys ---------------------------------------------------------------
    def partition_of(self, merchant_id: str, shipment_id: str) -> int:
        """The inbox partition of a shipment: stable, so its events stay in one stream."""
        return zlib.crc32(f"{merchant_id}\x00{shipment_id}".encode()) % self.partitions

    def inbox_key(self, partition: int) -> str:
        return f"{PREFIX}:inbox:{partition}"

    def wake_key(self, partition: int) -> str:
        return f"{self.inbox_key(partition)}:wake"

    #: Event ids seen lately live in hash buckets, not one key each: a key costs Redis
    #: ~80 bytes of its own, a field in a small (listpack) hash ~20. A bucket belongs to a
    #: generation of ``idempotency_ttl_s`` (by Redis's clock); ids are looked up in the
    #: current and the previous generation and expire with their bucket, so an id is
    #: remembered at least ``idempotency_ttl_s`` and at most twice that. 16,384 buckets
    #: stay small hashes (Redis's default 128 fields) up to about two million events per
    #: generation. (Their own prefix: a pre-0.5 key ``ntf:evt:<merchant>:<event id>`` can
    #: never be mistaken for a bucket.)
    EVENT_BUCKET_BITS = 14
    EVENT_BUCKET_PREFIX = f"{PREFIX}:evb:"

    def event_slot(self, merchant_id: str, event_id: str) -> tuple[int, str]:
        """(bucket number, field) of an event id: a 128-bit hash of it picks the bucket
        (14 bits) and 96 more bits of it, in base64, are the field."""
        digest = hashlib.blake2b(f"{merchant_id}\x00{event_id}".encode(), digest_size=16).digest()
        bucket = int.from_bytes(digest[:2]) >> (16 - self.EVENT_BUCKET_BITS)
        return bucket, base64.b64encode(digest[2:14]).decode()

    def event_bucket_key(self, generation: int, bucket: int) -> str:
        return f"{self.EVENT_BUCKET_PREFIX}{generation}:{bucket}"

    @staticmethod
    def legacy_event_key(merchant_id: str, event_id: str) -> str:
        """Where notifier before 0.5 kept an event id, a key each (still honoured until
        those keys expire)."""
        return f"{PREFIX}:evt:{merchant_id}:{event_id}"

    @staticmethod
    def state_key(merchant_id: str, shipment_id: str) -> str:
        return f"{PREFIX}:shp:{merchant_id}:{shipment_id}"

    @staticmethod
    def history_key(merchant_id: str, shipment_id: str) -> str:
        return f"{PREFIX}:hist:{merchant_id}:{shipment_id}"

    @staticmethod
    def notification_key(notification_id: str) -> str:
        return f"{PREFIX}:msg:{notification_id}"

    DEAD_LETTER_KEY = f"{PREFIX}:dead"
    STALL_KEY = f"{PREFIX}:stall"
    DUE_KEY = f"{PREFIX}:due"

    @staticmethod
    def stall_member(merchant_id: str, shipment_id: str) -> str:
        # merchant ids have no ":", so the first one splits the two
        return f"{merchant_id}:{shipment_id}"

    @staticmethod
    def optout_key(merchant_id: str) -> str:
        return f"{PREFIX}:optout:{merchant_id}"

    # -- ingest -------------------------------------------------------------
    #: A wake flag lasts this long: a partition gets at most one drain job enqueued by
    #: ingest per period while its drain is busy (the drain re-checks before it stops).
    WAKE_MS = 5000
    #: Most events one group-committed ingest script call takes (it runs atomically in
    #: Redis, so it must stay short).
    INGEST_GROUP_MAX = 2000

    async def ingest(self, items: Sequence[IngestItem]) -> tuple[list[Admission], list[int]]:
        """Persist new events atomically; return (admission per item, partitions to wake).

        ``items`` are (merchant_id, shipment_id, event_id, payload, body digest): an event
        id seen before is a duplicate with the same digest, a conflict with another. A
        partition is returned at most once per ``WAKE_MS``; its caller enqueues a drain job.

        Concurrent calls are group-committed: while one script call is in flight, the
        calls that arrive wait and then go together in the next one. A lone call goes at
        once, so this adds no latency, and under load one round trip (and one script
        run) carries many requests' events. Each caller gets its own items' answers;
        the partitions to wake go to one caller of each group.
        """
        future: asyncio.Future[tuple[list[Admission], list[int]]] = (
            asyncio.get_running_loop().create_future()
        )
        self._ingest_queue.append((items, future))
        if self._ingest_task is None or self._ingest_task.done():
            self._ingest_task = asyncio.create_task(self._ingest_groups())
        return await future

    async def _ingest_groups(self) -> None:
        group: list[tuple[Sequence[IngestItem], asyncio.Future[Any]]] = []
        try:
            while self._ingest_queue:
                group, size = [], 0
                while self._ingest_queue and (
                    not group or size + len(self._ingest_queue[0][0]) <= self.INGEST_GROUP_MAX
                ):
                    group.append(self._ingest_queue.popleft())
                    size += len(group[-1][0])
                try:
                    accepted, woken = await self._ingest_now([i for it, _ in group for i in it])
                except Exception as exc:  # every caller of the group sees the failure (503)
                    for _, future in group:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                start = 0
                for items, future in group:
                    if not future.done():  # a caller that went away still had its events stored
                        future.set_result((accepted[start : start + len(items)], woken))
                        woken = []
                    start += len(items)
            group = []
        finally:  # cancelled (shutdown): nobody may wait forever for an answer
            for _, future in [*group, *self._ingest_queue]:
                if not future.done():
                    future.set_exception(RedisConnectionError("ingest stopped"))
            self._ingest_queue.clear()

    async def _ingest_now(self, items: Sequence[IngestItem]) -> tuple[list[Admission], list[int]]:
        events = []
        for merchant_id, shipment_id, event_id, payload, digest, rid in items:
            bucket, field = self.event_slot(merchant_id, event_id)
            inbox = self.inbox_key(self.partition_of(merchant_id, shipment_id))
            legacy = self.legacy_event_key(merchant_id, event_id)
            events.append((bucket, field, legacy, inbox, payload.decode(), digest, rid))
        args: list[Any] = [
            orjson.dumps(events),
            self.idempotency_ttl_s,
            self.WAKE_MS,
            self.EVENT_BUCKET_PREFIX,
        ]
        if self.wait_replicas:
            # WAIT counts the writes of its own connection: one pipeline, one connection
            async with self.redis.pipeline(transaction=False) as pipe:
                await self._ingest(keys=[], args=args, client=pipe)
                pipe.wait(self.wait_replicas, self.wait_timeout_ms)
                (accepted, woken), replicas = await pipe.execute()
        else:
            accepted, woken = await self._ingest(keys=[], args=args)
            replicas = self.wait_replicas
        parts = [int(_decode(k).split(":")[2]) for k in woken]
        if replicas < self.wait_replicas:
            raise NotReplicated(replicas, self.wait_replicas, self.wait_timeout_ms, parts)
        return [_ADMISSIONS[int(a)] for a in accepted], parts

    # -- inbox --------------------------------------------------------------
    async def ensure_groups(self) -> None:
        """Create every partition's consumer group (idempotent)."""
        for partition in range(self.partitions):
            try:
                await self.redis.xgroup_create(
                    self.inbox_key(partition), GROUP, id="0", mkstream=True
                )
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def read_inbox(
        self, partition: int, consumer: str, count: int, block_ms: int | None = None
    ) -> list[InboxEntry]:
        """New entries of a partition for this consumer (they stay pending until acked);
        with ``block_ms``, wait up to that long for one when there are none."""
        reply = await self.redis.xreadgroup(
            GROUP, consumer, {self.inbox_key(partition): ">"}, count=count, block=block_ms
        )
        if not reply:
            return []
        return [_entry(i, f) for i, f in reply[0][1]]

    async def read_own_pending(self, partition: int, consumer: str, count: int) -> list[InboxEntry]:
        """Entries this consumer read and has not acknowledged (after a Redis outage)."""
        reply = await self.redis.xreadgroup(
            GROUP, consumer, {self.inbox_key(partition): "0"}, count=count
        )
        return [
            _entry(entry_id, fields)
            for _, entries in reply or []
            for entry_id, fields in entries
            if fields  # an entry trimmed away since shows up without its fields
        ]

    async def claim_stale(
        self, partition: int, consumer: str, min_idle_ms: int, count: int
    ) -> list[InboxEntry]:
        """Take over entries another consumer read but never acknowledged (it crashed)."""
        reply = await self.redis.xautoclaim(
            self.inbox_key(partition), GROUP, consumer, min_idle_ms, "0-0", count=count
        )
        return [_entry(i, f) for i, f in reply[1] if f]

    async def ack(self, partition: int, entry_ids: Sequence[str]) -> None:
        """Acknowledge and delete processed entries."""
        if not entry_ids:
            return
        key = self.inbox_key(partition)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(key, GROUP, *entry_ids)
            pipe.xdel(key, *entry_ids)
            await pipe.execute()

    async def needs_drain(self, partition: int, stale_ms: int) -> bool:
        """Whether a partition has unread entries, or read ones unacknowledged past ``stale_ms``."""
        key = self.inbox_key(partition)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xlen(key)
            pipe.xpending(key, GROUP)
            pipe.xpending_range(key, GROUP, min="-", max="+", count=1, idle=stale_ms)
            try:
                length, summary, stale = await pipe.execute()
            except ResponseError as exc:
                if "NOGROUP" in str(exc):
                    return bool(await self.redis.xlen(key))
                raise
        return int(length) > int(summary["pending"]) or bool(stale)

    def lock_key(self, partition: int) -> str:
        return f"{self.inbox_key(partition)}:lock"

    async def lock(self, partition: int, token: str, lease_ms: int) -> bool:
        """Take or renew the partition's drain lock; False while another drain holds it."""
        return bool(await self._lock(keys=[self.lock_key(partition)], args=[token, lease_ms]))

    async def unlock(self, partition: int, token: str) -> None:
        await self._unlock(keys=[self.lock_key(partition)], args=[token])

    DEAD_INBOX_KEY = f"{PREFIX}:inbox:dead"

    async def delivery_counts(self, partition: int, entry_ids: Sequence[str]) -> dict[str, int]:
        """How often each pending entry has been handed to a consumer."""
        key = self.inbox_key(partition)
        async with self.redis.pipeline(transaction=False) as pipe:
            for entry_id in entry_ids:
                pipe.xpending_range(key, GROUP, min=entry_id, max=entry_id, count=1)
            rows = await pipe.execute()
        return {
            _decode(row[0]["message_id"]): int(row[0]["times_delivered"]) for row in rows if row
        }

    async def keep_waiting(self, partition: int, consumer: str, entry_ids: Sequence[str]) -> None:
        """Entries held back only by a live claim on one of their messages (another worker's,
        or a dead one's until its lease ends) are no failures: their delivery count starts
        again, so a long lease never sends them to the dead letters."""
        if entry_ids:
            await self.redis.xclaim(
                self.inbox_key(partition),
                GROUP,
                consumer,
                0,
                list(entry_ids),
                retrycount=0,
                justid=True,
            )

    async def bury(self, partition: int, entries: Sequence[InboxEntry], reason: str) -> None:
        """Move entries that keep failing to the dead-letter stream (kept, never dropped)."""
        key = self.inbox_key(partition)
        async with self.redis.pipeline(transaction=True) as pipe:
            for e in entries:
                pipe.xadd(
                    self.DEAD_INBOX_KEY,
                    {"t": e.payload, "from": e.entry_id, "why": reason, "r": e.request_id},
                )
            pipe.xack(key, GROUP, *[e.entry_id for e in entries])
            pipe.xdel(key, *[e.entry_id for e in entries])
            await pipe.execute()

    async def clear_wake(self, partition: int) -> None:
        await self.redis.delete(self.wake_key(partition))

    async def set_wake(self, partition: int) -> bool:
        return bool(await self.redis.set(self.wake_key(partition), "1", nx=True, px=self.WAKE_MS))

    # -- shipment state -----------------------------------------------------
    async def load_states(
        self, shipments: Sequence[tuple[str, str]]
    ) -> list[tuple[int, ShipmentState | None]]:
        """(version, state) per (merchant_id, shipment_id); version 0 and None when unknown."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for merchant_id, shipment_id in shipments:
                pipe.hmget(self.state_key(merchant_id, shipment_id), ["v", "s"])
            rows = await pipe.execute()
        out: list[tuple[int, ShipmentState | None]] = []
        for version, raw in rows:
            state = ShipmentState.model_validate_json(unpack(raw)) if raw else None
            out.append((int(version or 0), state))
        return out

    async def commit(self, commits: Sequence[ShipmentCommit], now_iso: str) -> list[int]:
        """Write all commits whose version still matches; return indexes that conflicted."""
        if not commits:
            return []
        keys: list[str] = [self.STALL_KEY, self.DUE_KEY]
        args: list[Any] = [
            self.state_ttl_s,
            self.history_cap,
            len(commits),
            now_iso,
            self.notification_key(""),
        ]
        for c in commits:
            keys += [
                self.state_key(c.merchant_id, c.shipment_id),
                self.history_key(c.merchant_id, c.shipment_id),
            ]
            keys += [self.notification_key(nid) for nid, *_ in c.notifications]
            args += [
                str(c.expected_version),
                pack(c.state.model_dump_json(exclude_defaults=True).encode(), STATE),
                self.stall_member(c.merchant_id, c.shipment_id),
                "" if c.stall_at_ms is None else c.stall_at_ms,
                len(c.history),
                "" if c.ttl_s is None else c.ttl_s,
                *(pack(entry, HISTORY) for entry in c.history),
                len(c.notifications),
            ]
            for _, st, due, payload in c.notifications:
                args += [st, due, payload]
        conflicts = await self._commit(keys=keys, args=args)
        return [int(i) - 1 for i in conflicts]

    # -- notification ledger ------------------------------------------------
    async def claim(
        self,
        notification_ids: Sequence[str],
        now_ms: int,
        lease_ms: int,
        *,
        due: bool = False,
        owner: str = "",
    ) -> list[tuple[ClaimResult, bytes | None]]:
        """Claim notifications for sending; return (result, payload) per id.

        A deferred notification is claimable only with ``due=True`` once its time has
        come; otherwise it comes back as DEFERRED with its due epoch ms as payload.
        """
        if not notification_ids:
            return []
        keys = [self.notification_key(n) for n in notification_ids]
        rows = await self._claim(keys=keys, args=[now_ms, lease_ms, "due" if due else "now", owner])
        results = {
            1: ClaimResult.FRESH,
            2: ClaimResult.RECLAIMED,
            3: ClaimResult.BUSY,
            4: ClaimResult.DEFERRED,
        }
        return [(results.get(int(code), ClaimResult.NONE), p or None) for code, p in rows]

    #: What a sent or cancelled notification no longer needs: the payload it was rendered
    #: from (the bulk of an entry) and its claim. A failed one keeps its payload, for
    #: whoever looks into the dead letters.
    DONE_WITH = ("p", "owner", "claimed")

    async def renew(self, notification_ids: Sequence[str], owner: str, now_ms: int) -> list[str]:
        """Restart the lease of the claims ``owner`` still holds; return their ids (the
        others were taken over, or settled, by another worker)."""
        if not notification_ids:
            return []
        return await self._settle(
            notification_ids, [{"claimed": str(now_ms)}] * len(notification_ids), owner
        )

    async def release(self, notification_ids: Sequence[str], owner: str) -> None:
        """Hand back the claims ``owner`` still holds (its round broke off): the next claim
        takes them over at once, as possibly sent."""
        if notification_ids:
            await self._settle(notification_ids, [{"claimed": "0"}] * len(notification_ids), owner)

    async def _settle(
        self,
        notification_ids: Sequence[str],
        fields: Sequence[dict[str, str]],
        owner: str = "",
        drop: Sequence[str] = (),
    ) -> list[str]:
        """Apply ``fields`` to each notification the caller (``owner``) still holds, and
        remove the ``drop`` fields; return the ids settled."""
        width = len(fields[0])
        args: list[Any] = [owner, width, len(drop), *drop]
        for values in fields:
            assert len(values) == width
            for item in values.items():
                args += item
        keys = [self.notification_key(n) for n in notification_ids]
        settled = await self._settle_script(keys=keys, args=args)
        return [notification_ids[int(i) - 1] for i in settled]

    async def mark_sent(
        self,
        outcomes: Sequence[tuple[str, str, str]],
        owner: str = "",
        summaries: dict[str, str] | None = None,
    ) -> None:
        """Record (notification id, sent-at ISO, channel detail) as sent, with what was sent
        in a few words (``summaries``: the subject or the SMS' start, for the timeline); a
        provider's message id (``twilio:SM…``, ``sendgrid:…``) is indexed so its status
        callbacks find us."""
        if not outcomes:
            return
        said = summaries or {}
        settled = set(
            await self._settle(
                [nid for nid, _, _ in outcomes],
                [
                    {"st": LedgerState.SENT, "sent": at, "detail": d, "summary": said.get(nid, "")}
                    for nid, at, d in outcomes
                ],
                owner,
                self.DONE_WITH,
            )
        )
        async with self.redis.pipeline(transaction=False) as pipe:
            for nid, _, detail in outcomes:
                if nid not in settled:
                    continue
                provider, _, message_id = detail.partition(":")
                if provider in ("twilio", "sendgrid") and message_id:
                    pipe.set(self.provider_key(provider, message_id), nid, ex=self.state_ttl_s)
            await pipe.execute()

    @staticmethod
    def provider_key(provider: str, message_id: str) -> str:
        return f"{PREFIX}:pid:{provider}:{message_id}"

    async def by_provider_id(self, provider: str, message_id: str) -> str | None:
        """Our notification id for a provider's message id."""
        value = await awaited(self.redis.get(self.provider_key(provider, message_id)))
        return _decode(value) if value else None

    async def provider_status(
        self, notification_id: str, status: str, rank: int, error: str | None = None
    ) -> bool:
        """Record a provider's delivery status unless a later one is already known
        (a late "sent" never overwrites "delivered"). True when recorded."""
        return bool(
            await self._provider_status(
                keys=[self.notification_key(notification_id)],
                args=[status, rank, error or ""],
            )
        )

    async def reschedule(
        self, notification_id: str, due_ms: int, error: str, owner: str = ""
    ) -> None:
        """Give a claimed notification back after a temporary failure, due again at ``due_ms``.

        One script: the ledger and the due index change together or not at all.
        """
        await self._reschedule(
            keys=[self.notification_key(notification_id), self.DUE_KEY],
            args=[notification_id, due_ms, error, owner],
        )

    async def due(self, now_ms: int, limit: int) -> list[str]:
        """Notifications whose time has come (deferred ones and retries), oldest first."""
        rows = await awaited(
            self.redis.zrangebyscore(self.DUE_KEY, "-inf", now_ms, start=0, num=limit)
        )
        return [_decode(r) for r in rows]

    async def unschedule(self, notification_ids: Sequence[str], now_ms: int) -> None:
        """Take settled notifications off the due index, unless rescheduled past ``now_ms``."""
        if notification_ids:
            await self._unschedule(keys=[self.DUE_KEY], args=[now_ms, *notification_ids])

    async def mark_failed(self, notification_id: str, error: str, owner: str = "") -> None:
        """Record a permanent failure and put the notification on the dead-letter list."""
        fields = [{"st": LedgerState.FAILED, "error": error}]
        if await self._settle([notification_id], fields, owner):
            await awaited(self.redis.rpush(self.DEAD_LETTER_KEY, notification_id))

    async def add_notification(
        self,
        merchant_id: str,
        shipment_id: str,
        notification_id: str,
        payload: bytes,
        due_ms: int,
        history: bytes,
    ) -> bool:
        """Create a notification outside a decision (a fallback), due at ``due_ms``, with a
        history entry saying why. False when it exists already (never twice)."""
        return bool(
            await self._add_notification(
                keys=[
                    self.notification_key(notification_id),
                    self.DUE_KEY,
                    self.history_key(merchant_id, shipment_id),
                    self.state_key(merchant_id, shipment_id),
                ],
                args=[
                    notification_id,
                    payload,
                    due_ms,
                    pack(history, HISTORY),
                    self.state_ttl_s,
                    self.history_cap,
                ],
            )
        )

    async def cancel(self, notification_id: str, why: str, owner: str = "") -> None:
        """Record that a notification will never be sent, and why."""
        await self._settle(
            [notification_id],
            [{"st": LedgerState.CANCELLED, "detail": why}],
            owner,
            self.DONE_WITH,
        )

    # -- opt-outs (one store for the policy engine and the delivery channels) -----------
    #: Opt-outs that hold for every merchant (a STOP sent to our shared Twilio sender).
    EVERY_MERCHANT = "*"

    async def opted_out(self, merchant_id: str, keys: Sequence[str]) -> set[str]:
        """Which of ``keys`` (``opt_out_key`` strings) opted out, for this merchant or all."""
        if not keys:
            return set()
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.smismember(self.optout_key(merchant_id), list(keys))
            pipe.smismember(self.optout_key(self.EVERY_MERCHANT), list(keys))
            mine, everyone = await pipe.execute()
        return {k for k, a, b in zip(keys, mine, everyone, strict=True) if a or b}

    async def set_opt_out(self, merchant_id: str, key: str, opted_out: bool) -> None:
        """Record an opt-out (True) or an opt-in (False) for one channel address."""
        if opted_out:
            await awaited(self.redis.sadd(self.optout_key(merchant_id), key))
        else:
            await awaited(self.redis.srem(self.optout_key(merchant_id), key))

    # -- stalled shipments ----------------------------------------------------------
    async def due_stalls(self, now_ms: int, limit: int) -> list[tuple[str, str, int]]:
        """(merchant_id, shipment_id, deadline ms) of shipments stalled by ``now_ms``."""
        rows = await awaited(
            self.redis.zrangebyscore(
                self.STALL_KEY, "-inf", now_ms, start=0, num=limit, withscores=True
            )
        )
        out = []
        for member, score in rows:
            merchant_id, _, shipment_id = _decode(member).partition(":")
            out.append((merchant_id, shipment_id, int(score)))
        return out

    async def drop_stall(self, merchant_id: str, shipment_id: str, deadline_ms: int) -> None:
        """Take a shipment off the stall index unless its deadline moved meanwhile."""
        await self._drop_stall(
            keys=[self.STALL_KEY], args=[self.stall_member(merchant_id, shipment_id), deadline_ms]
        )

    async def ledger(self, notification_ids: Sequence[str]) -> dict[str, dict[str, str | int]]:
        """Delivery status fields (without the payload) per notification id."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for nid in notification_ids:
                pipe.hmget(
                    self.notification_key(nid),
                    [
                        "st",
                        "created",
                        "sent",
                        "detail",
                        "error",
                        "attempts",
                        "due",
                        "provider_status",
                        "provider_error",
                        "summary",
                    ],
                )
            rows = await pipe.execute()
        names = (
            "status",
            "created_at",
            "sent_at",
            "detail",
            "error",
            "attempts",
            "due_at",
            "provider_status",
            "provider_error",
            "summary",
        )
        out: dict[str, dict[str, str | int]] = {}
        for nid, row in zip(notification_ids, rows, strict=True):
            fields: dict[str, str | int] = {
                k: _decode(v) for k, v in zip(names, row, strict=True) if v
            }
            if "due_at" in fields:
                due = datetime.fromtimestamp(int(fields["due_at"]) / 1000, UTC)
                fields["due_at"] = due.isoformat()
            if "attempts" in fields:
                fields["attempts"] = int(fields["attempts"])  # a number in the API
            out[nid] = fields
        return out

    async def history(self, merchant_id: str, shipment_id: str) -> list[dict[str, Any]]:
        """The recorded decisions of a shipment, oldest first."""
        key = self.history_key(merchant_id, shipment_id)
        rows = await awaited(self.redis.lrange(key, 0, -1))
        return [orjson.loads(unpack(r)) for r in rows]

    async def history_page(
        self, merchant_id: str, shipment_id: str, cursor: int | None, limit: int
    ) -> HistoryPage:
        """Up to ``limit`` decisions from position ``cursor`` (counted over every decision
        ever recorded for the shipment, oldest first; None: the oldest one still kept)."""
        total, first, start, rows = await self._history_page(
            keys=[
                self.state_key(merchant_id, shipment_id),
                self.history_key(merchant_id, shipment_id),
            ],
            args=[-1 if cursor is None else cursor, limit],
        )
        decisions = [orjson.loads(unpack(r)) for r in rows]
        end = int(start) + len(decisions)
        total, first = int(total), int(first)
        return HistoryPage(decisions, total, first, end if end < total else None)

    async def shorten(self, notification_ids: Sequence[str], ttl_s: int) -> None:
        """Let these ledger entries expire within ``ttl_s`` (never later than they would)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for nid in notification_ids:
                pipe.expire(self.notification_key(nid), ttl_s, lt=True)
            await pipe.execute()

    @staticmethod
    def tracking_key(merchant_id: str, tracking_number: str) -> str:
        return f"{PREFIX}:trk:{merchant_id}:{tracking_number}"

    async def index_tracking(self, entries: Sequence[tuple[str, str, str]]) -> None:
        """Remember which shipments carry a tracking number ((merchant, tracking number,
        shipment) each), for the editor's timeline search; kept as long as shipment state."""
        if not entries:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for merchant_id, tracking_number, shipment_id in entries:
                key = self.tracking_key(merchant_id, tracking_number)
                pipe.sadd(key, shipment_id)
                pipe.expire(key, self.state_ttl_s)
            await pipe.execute()

    async def shipments_tracked_as(self, merchant_id: str, tracking_number: str) -> list[str]:
        """The merchant's shipments that carried ``tracking_number`` (at most 50)."""
        key = self.tracking_key(merchant_id, tracking_number)
        members = await awaited(self.redis.srandmember(key, 50))
        return sorted(_decode(m) for m in members or [])

    async def record_test(self, merchant_id: str, shipment_id: str, entry: dict[str, Any]) -> None:
        """Append a test send to a shipment's history (kept like any history)."""
        key = self.history_key(merchant_id, shipment_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.rpush(key, pack(orjson.dumps(entry), HISTORY))
            pipe.ltrim(key, -self.history_cap, -1)
            pipe.expire(key, self.state_ttl_s)
            await pipe.execute()

    #: merchant -> when a worker last met its broken own files (ms); workers write it
    OVERRIDES_KEY = f"{PREFIX}:overrides:hits"
    #: a merchant not met with broken files for this long no longer counts
    OVERRIDES_WINDOW_MS = 24 * 3600 * 1000

    async def publish_overrides(
        self, hits: Iterable[str], cleared: Iterable[str], now_ms: int
    ) -> None:
        """Record merchants whose own files a worker found broken (``hits``) and those
        whose edited files are to be judged again (``cleared``); forget old hits."""
        async with self.redis.pipeline(transaction=False) as pipe:
            if mapping := dict.fromkeys(hits, now_ms):
                pipe.zadd(self.OVERRIDES_KEY, mapping)
            if gone := list(cleared):
                pipe.zrem(self.OVERRIDES_KEY, *gone)
            pipe.zremrangebyscore(self.OVERRIDES_KEY, "-inf", now_ms - self.OVERRIDES_WINDOW_MS)
            await pipe.execute()

    async def overrides_disabled(self, now_ms: int) -> int:
        """How many merchants had own files found broken within the last day."""
        since = now_ms - self.OVERRIDES_WINDOW_MS
        return int(await awaited(self.redis.zcount(self.OVERRIDES_KEY, since, "+inf")))

    async def dead_letters(self) -> dict[str, int]:
        """How many notifications failed for good, and inbox entries that kept failing."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.llen(self.DEAD_LETTER_KEY)
            pipe.xlen(self.DEAD_INBOX_KEY)
            notifications, inbox = await pipe.execute()
        return {"notifications": int(notifications), "inbox": int(inbox)}
