"""The inbox: idempotent ingest (group-committed), the partitions' streams, their drain
locks and wake flags.

The API ingests events: one script call per group records each new event id and appends
the event to its partition's stream, or answers a duplicate or a conflict. A worker drains
a partition under its lock, reading through the consumer group and acknowledging what it
settled; the wake flag keeps a partition to one enqueued drain job at a time.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from functools import cached_property
from typing import Any

import orjson
from arq.connections import ArqRedis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

from notifier.models import one_line, url_spelled
from notifier.store import keys
from notifier.store.base import Scope, StoreBase, decode
from notifier.store.keys import GROUP


class Admission(StrEnum):
    """What ingest made of an event."""

    ACCEPTED = "accepted"  #: new: persisted to its inbox
    DUPLICATE = "duplicate"  #: its event id was seen before, with the same body
    CONFLICT = "conflict"  #: its event id was seen before, with another body (not persisted)


_ADMISSIONS = {1: Admission.ACCEPTED, 0: Admission.DUPLICATE, 2: Admission.CONFLICT}
#: (merchant, shipment, event id, payload, body digest, request id) of an event to ingest
#: (the digest as ``body_digest`` gives it: with the earlier versions' one after a space)
IngestItem = tuple[str, str, str, bytes, str, str]
_Waiting = tuple[Sequence[IngestItem], asyncio.Future[tuple[list[Admission], list[int]]]]


#: The characters of a body digest passed to the ingest script, which records its first 32
#: bits as 4 bytes (``keys.event_binary``); recorded in base64 before, 6 characters (earlier
#: versions 8, and before them 12: the same digest, longer)
DIGEST_CHARS = 6


def body_digest(body: Any) -> str:
    """A short digest of a transition's JSON body in its canonical form (``canonical_body``):
    a repost that differs only in how it is written (key order, spacing, ``Z`` or
    ``+00:00``, a field sent as ``null`` or left out) is the same body. 36 bits in base64:
    the first 6 characters of the 8 (and before them 12) recorded by earlier versions
    (``lua/ingest.lua`` compares two digests on the shorter one's length); recorded now as
    its first 32 bits. Another body under a known id is told apart from a repost unless the
    two digests agree, one chance in 2**32 (in 2**31 where two are compared, below).

    Versions before 12-06 digested the body as posted (keys sorted): where that differs,
    its digest follows, after a space, and a repost of an event they recorded is compared
    with it too (``Store.ingest`` passes both)."""
    canonical = canonical_body(body)
    digest = _digest(canonical)
    if canonical is not body:
        earlier = _digest(body)
        if earlier != digest:
            return f"{digest} {earlier}"
    return digest


def _digest(body: Any) -> str:
    raw = hashlib.blake2b(orjson.dumps(body, option=orjson.OPT_SORT_KEYS), digest_size=9)
    return base64.b64encode(raw.digest()[:6]).decode()[:DIGEST_CHARS]


#: A date and time with its UTC offset, as the API takes them (ISO 8601): written another
#: way, the same moment at the same offset is the same value
_MOMENT = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?(?:[Zz]|[+-]\d{2}(?::?\d{2})?)"
)
#: The members that hold one (``occurred_at``, ``pickup_deadline``, ``estimated_delivery``'s
#: ``start`` and ``end``): a free text that looks like one is text, kept as written
_MOMENT_KEYS = frozenset({"occurred_at", "pickup_deadline", "start", "end"})


#: Members whose text is a URL (kept percent-encoded: ``models.url_spelled``).
_URL_KEYS = frozenset({"tracking_url"})
#: Members whose text is kept exactly as sent: the event id is the idempotency key itself.
_EXACT_KEYS = frozenset({"event_id"})


#: A whole float is digested as an int only where JSON can write one (orjson: 64 bits).
_INT64 = 2**63

#: Members kept as text that may come as a JSON number (an order's ``number``): ``1001``,
#: ``1001.0`` and ``"1001"`` are one value (``models.Order``).
_TEXT_NUMBER_KEYS = frozenset({"number"})


def _number_text(value: float) -> str:
    """A JSON number as the text it is kept as (``1001.0`` is "1001")."""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _text(key: str, value: str) -> str:
    """A member's text as validation keeps it: a URL percent-encoded, other text on one
    line and trimmed (an email address, a phone number, a name: ``models.one_line``);
    ``value`` itself when it is so already."""
    if key in _MOMENT_KEYS:
        return _moment(value)
    if key in _EXACT_KEYS:
        return value
    if key in _URL_KEYS:
        return url_spelled(value)
    kept = one_line(value).strip()
    return value if kept == value else kept


def canonical_body(body: Any) -> Any:
    """``body`` with what does not change its meaning written one way: no member whose value
    is ``null`` (an optional field left out), a number without a fraction as an integer
    (``51`` for ``51.0``), each date and time with an offset (the members that hold one)
    as ``datetime.isoformat`` writes it (``2026-11-21T08:30:00+00:00`` for ``…08:30Z``;
    the offset itself is kept: it is the local time the customer reads), and text as
    validation keeps it (``_text``: `` ana@example.com `` is ``ana@example.com``).
    ``body`` itself when it is written so already (the usual case: nothing is copied)."""
    kind = type(body)
    if kind is dict:
        out: dict[str, Any] | None = None
        for i, (key, value) in enumerate(body.items()):
            of = type(value)
            new: Any
            if of is str:
                new = _text(key, value)
            elif of is dict or of is list:
                new = canonical_body(value)
            elif key in _TEXT_NUMBER_KEYS and (of is int or of is float):
                new = _number_text(value)
            elif of is float and value.is_integer() and abs(value) < _INT64:
                new = int(value)
            else:
                new = value
            if out is None:
                if new is value and value is not None:
                    continue
                out = dict(itertools.islice(body.items(), i))
            if new is not None:
                out[key] = new
        return body if out is None else out
    if kind is list:
        items = [canonical_body(v) for v in body]  # (a null in a list stays)
        return body if all(a is b for a, b in zip(items, body, strict=True)) else items
    if kind is float and body.is_integer() and abs(body) < _INT64:
        return int(body)
    return body


def _as_isoformat_writes(text: str) -> bool:
    """Whether ``text`` has the shape ``datetime.isoformat`` gives a moment with an offset:
    ``YYYY-MM-DDTHH:MM:SS+HH:MM`` (25 characters), or with ``.ffffff`` (32), never
    ``-00:00`` nor a fraction of zeros (which it leaves out)."""
    n = len(text)
    return (
        (n == 25 or (n == 32 and text[19] == "." and text[20:26] != "000000"))
        and text[10] == "T"
        and text[13] == text[16] == text[n - 3] == ":"
        and text[n - 6] in "+-"
        and text[n - 6 :] != "-00:00"
    )


def _moment(text: str) -> str:
    """``text`` as ``datetime.isoformat`` writes it, if it is a date and time with an offset
    written another way; else ``text`` itself."""
    if _as_isoformat_writes(text):  # (the usual case: no parsing)
        return text
    if not _MOMENT.fullmatch(text):
        return text
    try:
        moment = datetime.fromisoformat(text.replace(",", ".").upper()).isoformat()
    except ValueError:
        return text
    return text if moment == text else moment


class StoredInPart(RedisError):
    """An ingest that failed after some of its events were stored: ``woken`` names the
    partitions whose wake flags it won, to wake all the same (or nothing would before the
    worker's sweep)."""

    def __init__(self, message: str, woken: list[int]) -> None:
        super().__init__(message)
        self.woken = woken

    def take_woken(self) -> list[int]:
        """The partitions to wake, once: every caller of a group commit sees this one
        exception."""
        woken, self.woken = self.woken, []
        return woken


class NotReplicated(StoredInPart):
    """Ingested on the primary, but fewer replicas than required confirmed it in time."""

    def __init__(self, acked: int, required: int, timeout_ms: int, woken: list[int]) -> None:
        super().__init__(f"{acked} of {required} replicas confirmed within {timeout_ms} ms", woken)
        self.acked, self.required = acked, required
        #: what became of each event of the call
        self.admissions: list[Admission] = []


class PartlyStored(StoredInPart):
    """A call of a batch that spans partitions failed; the others stored their events (a
    cluster makes one ingest call per partition). Answered like the failure itself (503:
    a retry is a duplicate for what went in), their partitions woken all the same."""

    def __init__(self, failure: BaseException, woken: list[int]) -> None:
        super().__init__(f"{type(failure).__name__}: {failure}", woken)
        self.failure = failure


@dataclass(frozen=True, slots=True)
class InboxEntry:
    """One accepted transition waiting in a partition's inbox stream."""

    entry_id: str
    payload: bytes
    #: the API request that accepted it (its X-Request-ID), "" for entries from before
    request_id: str = ""


async def wake(redis: ArqRedis, partitions: Sequence[int]) -> None:
    """Enqueue a drain job for each partition (the caller already won its wake flag)."""
    for partition in partitions:
        await redis.enqueue_job("drain", partition)


#: How long after a claim runs out the entries waiting for it turn stale (``keep_waiting``).
READY_MARGIN_MS = 1000


class Inbox(StoreBase):
    """Ingest and the inbox streams."""

    #: A wake flag lasts this long: a partition gets at most one drain job enqueued by
    #: ingest per period while its drain is busy (the drain re-checks before it stops).
    WAKE_MS = 5000
    #: Most events one group-committed ingest script call takes (it runs atomically in
    #: Redis, so it must stay short).
    INGEST_GROUP_MAX = 2000

    _ingest_task: asyncio.Task[None] | None = None

    @cached_property
    def _ingest_queue(self) -> deque[_Waiting]:
        """Ingest calls waiting for the next group (``_ingest_task`` takes them in turn)."""
        return deque()

    # -- keys -------------------------------------------------------------------------
    def inbox_key(self, partition: int) -> str:
        """A partition's inbox stream."""
        return keys.inbox_key(partition, self.partition_tag(partition))

    def wake_key(self, partition: int) -> str:
        return keys.wake_key(partition, self.partition_tag(partition))

    def lock_key(self, partition: int) -> str:
        return keys.lock_key(partition, self.partition_tag(partition))

    # -- ingest -------------------------------------------------------------------------
    async def ingest(self, items: Sequence[IngestItem]) -> tuple[list[Admission], list[int]]:
        """Persist new events atomically; return (admission per item, partitions to wake).

        ``items`` are (merchant_id, shipment_id, event_id, payload, body digest, request
        id): an event id seen before is a duplicate with the same digest, a conflict with
        another. A partition is returned at most once per ``WAKE_MS``; its caller enqueues
        a drain job.

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
        group: list[_Waiting] = []
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
        # one script call on one Redis; one per partition on a cluster (a call's keys must
        # share a slot), side by side
        scopes: dict[Scope, list[int]] = {}
        for i, (merchant_id, shipment_id, *_) in enumerate(items):
            scopes.setdefault(self.scope_of(merchant_id, shipment_id), []).append(i)
        groups = list(scopes.values())
        answers = await self._ingest_calls(items, groups)
        if again := [n for n, a in enumerate(answers) if _clock_away(a)]:
            # Redis's clock jumped (or a failover brought another server's): measure it
            # again, and repeat the calls it refused (they wrote nothing)
            self._redis_offset = None
            repeated = await self._ingest_calls(items, [groups[n] for n in again])
            for n, answer in zip(again, repeated, strict=True):
                answers[n] = answer
        admissions: list[Admission] = [Admission.DUPLICATE] * len(items)
        woken: list[int] = []
        unconfirmed: NotReplicated | None = None
        failed: BaseException | None = None
        for at, answer in zip(groups, answers, strict=True):
            # (a NotReplicated is an error too: its events are stored, and its partitions
            # are woken with every other group's)
            if isinstance(answer, NotReplicated):
                unconfirmed, answer = answer, (answer.admissions, answer.woken)
            elif isinstance(answer, BaseException):
                if failed is None or not isinstance(answer, (RedisError, OSError)):
                    failed = answer  # a bug's error before an outage's: it stays a 500
                continue
            for i, admission in zip(at, answer[0], strict=True):
                admissions[i] = admission
            woken += answer[1]
        if failed is not None:
            # every caller of the group gets a 503; what went in, went in
            if not woken or not isinstance(failed, (RedisError, OSError)):
                raise failed  # (a bug's error stays itself, with its traceback: a 500)
            raise PartlyStored(failed, woken) from failed
        if unconfirmed is not None:
            raise NotReplicated(
                unconfirmed.acked, unconfirmed.required, self.wait_timeout_ms, woken
            )
        return admissions, woken

    async def _generation(self) -> int:
        """The event-id generation Redis's clock names now, as this process reckons it
        (``redis_seconds``): ingest passes the buckets of the generations around it, and
        the script writes the one Redis's own clock names."""
        return int(await self.redis_seconds()) // self.idempotency_ttl_s

    async def _ingest_calls(
        self, items: Sequence[IngestItem], groups: list[list[int]]
    ) -> list[tuple[list[Admission], list[int]] | NotReplicated | BaseException]:
        generation = await self._generation()
        if len(groups) == 1 and len(groups[0]) == len(items):
            calls = [self._ingest_call(items, generation)]
        else:
            calls = [self._ingest_call([items[i] for i in at], generation) for at in groups]
        return list(await asyncio.gather(*calls, return_exceptions=True))

    async def _ingest_call(
        self, items: Sequence[IngestItem], generation: int
    ) -> tuple[list[Admission], list[int]] | NotReplicated:
        """One ingest script call: its keys, in KEYS (see ``lua/ingest.lua``)."""
        # one call, one scope: on a cluster its items share a partition's tag
        scope = self.partition_tag(self.partition_of(*items[0][:2]))
        names = [keys.event_marker_key(scope), keys.event_binary_marker_key(scope)]
        inboxes: dict[int, int] = {}  # partition -> position of its stream in KEYS
        buckets: dict[tuple[int, str], int] = {}  # (bucket, tag) -> its first key's position
        legacy: list[str] = []
        events: list[list[Any]] = []
        binaries: list[bytes] = []
        earliers: list[bytes] = []
        for merchant_id, shipment_id, event_id, payload, digest, rid in items:
            partition = self.partition_of(merchant_id, shipment_id)
            tag = self.partition_tag(partition)
            if (inbox := inboxes.get(partition)) is None:
                inbox = inboxes[partition] = len(names) + 1
                names += [keys.inbox_key(partition, tag), keys.wake_key(partition, tag)]
            bucket, field = keys.event_hash(merchant_id, event_id)
            if (at := buckets.get((bucket, tag))) is None:
                at = buckets[bucket, tag] = len(names) + 1
                names += [keys.event_bucket_key(g, bucket, tag) for g in _around(generation)]
            old = 0  # its pre-0.5 key's place among ``legacy`` (1-based), 0: none
            if not self.cluster:  # a cluster never held pre-0.5 keys
                legacy.append(keys.legacy_event_key(merchant_id, event_id))
                old = len(legacy)
            digest, _, earlier = digest.partition(" ")
            events.append([at, field, old, inbox, payload.decode(), digest, rid])
            binaries.append(keys.event_binary(field, digest))
            if earlier:  # the digest the versions before recorded for this body
                earliers.append(keys.digest_bits(earlier))
                events[-1] += [len(earliers), earlier]
        for e in events:
            if e[2]:
                e[2] += len(names)
        names += legacy
        args: list[Any] = [
            orjson.dumps(events),
            self.idempotency_ttl_s,
            generation,
            self.WAKE_MS,
            keys.EVENT_FIELD_CHARS,
            b"".join(binaries),
            keys.EVENT_FIELD_BYTES,
            keys.EVENT_DIGEST_BYTES,
            b"".join(earliers),
        ]
        if self.wait_replicas:
            (accepted, woken), replicas = await self.call_and_wait(self.scripts.ingest, names, args)
        else:
            accepted, woken = await self.scripts.ingest(keys=names, args=args)
            replicas = self.wait_replicas
        by_position = {at: p for p, at in inboxes.items()}
        admissions = [_ADMISSIONS[int(a)] for a in accepted]
        parts = [by_position[int(at)] for at in woken]
        if replicas < self.wait_replicas:
            unconfirmed = NotReplicated(replicas, self.wait_replicas, self.wait_timeout_ms, parts)
            unconfirmed.admissions = admissions
            return unconfirmed
        return admissions, parts

    # -- the streams --------------------------------------------------------------------
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

    async def forget_consumers(self, partition: int, idle_ms: int, own: str) -> int:
        """Remove the partition group's consumers that hold no entry and have been idle for
        ``idle_ms`` (stopped or dead workers), but ``own``; how many."""
        args = [GROUP, idle_ms, own]
        return int(await self.scripts.forget_consumers(keys=[self.inbox_key(partition)], args=args))

    async def ack(self, partition: int, entry_ids: Sequence[str]) -> None:
        """Acknowledge and delete processed entries."""
        if not entry_ids:
            return
        await self.scripts.ack(keys=[self.inbox_key(partition)], args=[GROUP, *entry_ids])

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

    async def delivery_counts(self, partition: int, entry_ids: Sequence[str]) -> dict[str, int]:
        """How often each pending entry has been handed to a consumer."""
        key = self.inbox_key(partition)
        async with self.redis.pipeline(transaction=False) as pipe:
            for entry_id in entry_ids:
                pipe.xpending_range(key, GROUP, min=entry_id, max=entry_id, count=1)
            rows = await pipe.execute()
        return {decode(row[0]["message_id"]): int(row[0]["times_delivered"]) for row in rows if row}

    async def keep_waiting(
        self,
        partition: int,
        consumer: str,
        entry_ids: Sequence[str],
        stale_ms: int = 0,
        ready_in_ms: int = 0,
    ) -> None:
        """Entries held back only by a live claim on one of their messages (another worker's,
        or a dead one's until its lease ends) are no failures: their delivery count starts
        again, so a long lease never sends them to the dead letters. They count as idle for
        so long that they turn stale (``stale_ms``, what ``claim_stale`` takes over) just
        after that claim runs out, ``ready_in_ms`` from now: taken over by the next sweep
        then, not a whole ``stale_ms`` later (a dead worker's messages waited two of them)."""
        if entry_ids:
            wait = max(0, ready_in_ms) + READY_MARGIN_MS
            idle = max(0, stale_ms - wait) if stale_ms else 0
            await self.redis.xclaim(
                self.inbox_key(partition),
                GROUP,
                consumer,
                0,
                list(entry_ids),
                idle=idle,
                retrycount=0,
                justid=True,
            )

    async def bury(self, partition: int, entries: Sequence[InboxEntry], reason: str) -> None:
        """Move entries that keep failing to the dead-letter stream (kept, never dropped)."""
        if not entries:
            return
        args: list[Any] = [GROUP, reason]
        for e in entries:
            args += [e.entry_id, e.payload, e.request_id]
        tag = self.partition_tag(partition)
        await self.scripts.bury(
            keys=[self.inbox_key(partition), keys.dead_inbox_key(tag)], args=args
        )

    # -- drain lock and wake flags ------------------------------------------------------
    async def lock(self, partition: int, token: str, lease_ms: int) -> bool:
        """Take or renew the partition's drain lock; False while another drain holds it."""
        return bool(
            await self.scripts.lock(keys=[self.lock_key(partition)], args=[token, lease_ms])
        )

    async def unlock(self, partition: int, token: str) -> None:
        await self.scripts.unlock(keys=[self.lock_key(partition)], args=[token])

    async def clear_wake(self, partition: int) -> None:
        await self.redis.delete(self.wake_key(partition))

    async def set_wake(self, partition: int) -> bool:
        return bool(await self.redis.set(self.wake_key(partition), "1", nx=True, px=self.WAKE_MS))


#: The ingest script's answer when the caller's generation is not Redis's, nor next to it.
CLOCK_AWAY = "clock is a generation or more away"


def _clock_away(answer: object) -> bool:
    return isinstance(answer, ResponseError) and CLOCK_AWAY in str(answer)


def _around(generation: int) -> range:
    """The generations whose buckets an ingest call looks in (see ``lua/ingest.lua``)."""
    return range(generation - 1, generation + 2)


def _entry(entry_id: bytes | str, fields: dict[bytes, bytes]) -> InboxEntry:
    return InboxEntry(decode(entry_id), fields[b"t"], decode(fields.get(b"r", b"")))
