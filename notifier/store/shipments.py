"""Shipments: their state, the commit that records decisions, their history, the stall
index and the tracking-number index.

A worker loads the states of a batch, decides, and commits every shipment in one script
call that compares and sets each state's version: a shipment another worker got to first
comes back as a conflict, to be decided again from what that worker wrote.

A shipment's state, history and outcome list are one record, one Redis string (``record``).
A history is a list of entries (one decision each, packed on its own) appended as they are
decided, and of chunks (``chunks``: runs of entries packed together, a JSON array).
``compact`` folds the latest entries, and the outcome records (``ledger``), into chunks once a
few follow the last chunk (``COMPACT_AFTER``), or once the shipment ended.

In a chunk, a decision's notification id that its event and channel make
(``models.notification_id_of``: 32 hex digits that deflate cannot shrink, about 17 bytes a
decision) is written as ``DERIVED_ID`` and made again on reading; any other id (a test send's)
is kept as it is, and chunks written before hold every id in full.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson
from redis.exceptions import ResponseError

from notifier.models import notification_id_of
from notifier.packing import HISTORY, STATE, pack, unpack
from notifier.state import ShipmentState
from notifier.state_json import state_json
from notifier.store import chunks, keys, record
from notifier.store.base import Scope, StoreBase, awaited, decode
from notifier.store.ledger import LedgerState, created_stamp, merge_outcomes, outcomes_of
from notifier.store.stats import KEEP_S

log = logging.getLogger(__name__)


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
    #: merchant webhook events about its decisions: (event id, stored JSON), queued with them
    events: tuple[tuple[str, bytes], ...] = ()
    #: analytics counts of its decisions (``insights.counts`` fields), its carrier counts
    #: (``insights.journeys`` fields), and their UTC day
    counts: tuple[tuple[str, int], ...] = ()
    carrier_counts: tuple[tuple[str, int], ...] = ()
    day: str = ""


#: a history with this many entries after its last chunk is compacted
COMPACT_AFTER = 8


@dataclass(frozen=True, slots=True)
class Committed:
    """What a commit did: positions (0-based) of the shipments that conflicted, and of those
    whose history is worth compacting."""

    conflicts: list[int]
    long: list[int]


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


def state_value(state: ShipmentState, merchant_id: str, shipment_id: str) -> bytes:
    """A shipment's state as its record keeps it: packed, without the merchant and the
    shipment its key names (14 bytes a shipment on the bench's workload, measured on 500
    states); whole when they are not the key's."""
    keyed = (state.merchant_id, state.shipment_id) == (merchant_id, shipment_id)
    return pack(state_json(state, with_ids=not keyed), STATE)


def state_of(value: bytes, merchant_id: str, shipment_id: str) -> ShipmentState:
    """The state a record keeps (``state_value``) for the shipment its key names; a state
    written whole (before 0.6, or not the key's) reads as it is."""
    raw = unpack(value)
    # a whole state starts with its ids (the model's first fields); put them back in front
    if not raw.startswith(b'{"merchant_id":'):
        ids = orjson.dumps({"merchant_id": merchant_id, "shipment_id": shipment_id})
        raw = ids[:-1] + (b"}" if raw[1:2] == b"}" else b"," + raw[1:])
    return ShipmentState.model_validate_json(raw)


class Shipments(StoreBase):
    """Shipment state, decisions and history."""

    async def load_states(
        self, shipments: Sequence[tuple[str, str]], settled_by: datetime | None = None
    ) -> list[tuple[int, ShipmentState | None]]:
        """(version, state) per (merchant_id, shipment_id); version 0 and None when unknown.

        ``settled_by``: the message log of each state also says what became of its waiting
        messages due by then, from the shipment's outcome list (``settled_log``)."""
        # one GET a shipment: a pipeline of plain reads costs Redis a fifth of what a script
        # reading the same records does; a shipment still in the keys from before records (a
        # hash there) is read by the script
        names = [self.state_key(m, s) for m, s in shipments]
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.get(name)
            found: list[Any] = await pipe.execute(raise_on_error=False)
        older = [i for i, raw in enumerate(found) if isinstance(raw, ResponseError)]
        if older:
            held = await self.records([shipments[i] for i in older], whole=False)
            for i, one in zip(older, held, strict=True):
                found[i] = one
        out: list[tuple[int, ShipmentState | None]] = []
        for (merchant_id, shipment_id), raw in zip(shipments, found, strict=True):
            one = raw if isinstance(raw, record.Record) else record.head(raw or b"")
            state = state_of(one.state, merchant_id, shipment_id) if one.state else None
            if state is not None and settled_by is not None and state.waited(settled_by):
                state = settled_log(state, _outcomes_of(state, raw), settled_by)
            out.append((one.version, state))
        return out

    # -- keys -------------------------------------------------------------------------
    def state_key(self, merchant_id: str, shipment_id: str) -> str:
        return keys.state_key(merchant_id, shipment_id, self.shipment_tag(merchant_id, shipment_id))

    # -- commit -------------------------------------------------------------------------
    async def commit(self, commits: Sequence[ShipmentCommit], now_iso: str) -> list[int]:
        """Write all commits whose version still matches; return indexes that conflicted."""
        return (await self.commit_batch(commits, now_iso)).conflicts

    async def commit_batch(self, commits: Sequence[ShipmentCommit], now_iso: str) -> Committed:
        """Write all commits whose version still matches: which conflicted, and which
        shipments' histories are worth compacting (``compact``).

        On a cluster, one script call per partition (side by side): a call's keys share
        its partition's slot. A drain's batch is one partition's, so one call."""
        if not commits:
            return Committed([], [])
        scopes: dict[Scope, list[int]] = {}
        for i, c in enumerate(commits):
            scopes.setdefault(self.scope_of(c.merchant_id, c.shipment_id), []).append(i)
        answers = await asyncio.gather(
            *(
                self._commit(scope, [commits[i] for i in at], now_iso)
                for scope, at in scopes.items()
            )
        )
        conflicts, long = [], []
        for at, (conflicted, worth) in zip(scopes.values(), answers, strict=True):
            conflicts += [at[int(i) - 1] for i in conflicted]
            long += [at[int(i) - 1] for i in worth]
        return Committed(sorted(conflicts), sorted(long))

    async def _commit(
        self, scope: Scope, commits: Sequence[ShipmentCommit], now_iso: str
    ) -> tuple[list[Any], list[Any]]:
        tag = self.tag(scope)
        names: list[str] = [
            keys.stall_key(tag),
            keys.due_buckets_key(tag),
            keys.hook_due_key(tag),
            keys.hook_events_key(tag),
        ]
        # the batch's analytics counts: a slot per (day, field), numbered from 1
        days: dict[str, int] = {}
        slots: dict[tuple[int, str], int] = {}
        for c in commits:
            for counts, key in _count_keys(c, tag):
                day = days.setdefault(key, len(days) + 1)
                for name, _ in counts:
                    slots.setdefault((day, name), len(slots) + 1)
        names += list(days)
        args: list[Any] = [
            self.state_ttl_s,
            self.history_cap,
            len(commits),
            created_stamp(now_iso),
            keys.notification_key("", tag),
            COMPACT_AFTER,
            int(datetime.fromisoformat(now_iso).timestamp() * 1000),
            KEEP_S,
            len(days),
            len(slots),
        ]
        for day, name in slots:
            args += [day, name]
        week = None
        for c in commits:
            names += keys.record_keys(c.merchant_id, c.shipment_id, tag)
            field = ""
            if number := c.state.tracking_number:
                if week is None:
                    week = keys.tracking_week(await self.redis_seconds())
                bucket, field = keys.tracking_slot(c.merchant_id, number)
                names.append(keys.tracking_bucket_key(week, bucket, tag))
            for nid, *_ in c.notifications:
                names += [keys.notification_key(nid, tag), keys.due_bucket_key(nid, tag)]
            args += [
                str(c.expected_version),
                state_value(c.state, c.merchant_id, c.shipment_id),
                keys.stall_member(c.merchant_id, c.shipment_id),
                "" if c.stall_at_ms is None else c.stall_at_ms,
                len(c.history),
                "" if c.ttl_s is None else c.ttl_s,
                field,
                *(pack(entry, HISTORY) for entry in c.history),
                len(c.notifications),
            ]
            for _, st, due, payload in c.notifications:
                args += [st, due, payload]
            args.append(len(c.events))
            for eid, stored in c.events:
                args += [eid, stored]
            mine = [
                (slots[(days[key], name)], n)
                for counts, key in _count_keys(c, tag)
                for name, n in counts
            ]
            args.append(len(mine))
            for slot, n in mine:
                args += [slot, n]
        conflicts, long = await self.scripts.commit(keys=names, args=args)
        return conflicts, long

    # -- history ------------------------------------------------------------------------
    async def history(self, merchant_id: str, shipment_id: str) -> list[dict[str, Any]]:
        """The recorded decisions of a shipment, oldest first."""
        [found] = await self.records([(merchant_id, shipment_id)])
        return self._kept(found.history, merchant_id, shipment_id)

    async def history_page(
        self, merchant_id: str, shipment_id: str, cursor: int | None, limit: int
    ) -> HistoryPage:
        """Up to ``limit`` decisions from position ``cursor`` (counted over every decision
        ever recorded for the shipment, oldest first; None: the oldest one still kept)."""
        # one snapshot: the count and the elements from one read of the record
        [found] = await self.records([(merchant_id, shipment_id)])
        kept = self._kept(found.history, merchant_id, shipment_id)
        total = max(found.counted or 0, len(kept))  # no counter before 0.4: what is kept
        first = total - len(kept)
        start = first if cursor is None else max(cursor, first)
        decisions = kept[start - first : start - first + limit]
        end = start + len(decisions)
        return HistoryPage(decisions, total, first, end if end < total else None)

    def _kept(
        self, elements: Iterable[bytes], merchant_id: str, shipment_id: str
    ) -> list[dict[str, Any]]:
        """The decisions a shipment's history elements hold, oldest first: the latest
        ``history_cap`` (between compactions a list may hold a few more)."""
        return _decisions(elements, merchant_id, shipment_id)[-self.history_cap :]

    # -- compaction ---------------------------------------------------------------------
    async def compact(self, shipments: Sequence[tuple[str, str]]) -> int:
        """Fold each shipment's latest history entries, and its latest outcome records, into
        chunks (``chunks``, ``lua/compact.lua``), dropping the elements past the caps; how
        many lists were rewritten. One that changed meanwhile (another worker's commit
        trimmed it) is left for another time."""
        by_scope: dict[Scope, list[tuple[str, str]]] = {}
        for merchant_id, shipment_id in dict.fromkeys(shipments):
            by_scope.setdefault(self.scope_of(merchant_id, shipment_id), []).append(
                (merchant_id, shipment_id)
            )
        done = await asyncio.gather(*(self._compact(s, found) for s, found in by_scope.items()))
        return sum(done)

    async def _compact(self, scope: Scope, shipments: Sequence[tuple[str, str]]) -> int:
        tag = self.tag(scope)
        found = await self.records(shipments)
        names: list[str] = []
        args: list[Any] = []
        for (merchant_id, shipment_id), held in zip(shipments, found, strict=True):
            parts: list[tuple[str, list[bytes], int, chunks.Merge]] = [
                ("h", held.history, self.history_cap, history_merge(merchant_id, shipment_id)),
                ("o", held.outcomes, self.outcomes_cap, merge_outcomes),
            ]
            for part, elements, cap, merge in parts:
                plan = chunks.plan(elements, cap, merge)
                if plan is not None:
                    names += keys.record_keys(merchant_id, shipment_id, tag)
                    args += [part, len(elements), *plan, *elements]
        if not names:
            return 0
        return len(await self.scripts.compact(keys=names, args=args))

    async def record_test(self, merchant_id: str, shipment_id: str, entry: dict[str, Any]) -> None:
        """Append a test send to a shipment's history (kept like any history)."""
        await self.scripts.record_test(
            keys=self.record_keys(merchant_id, shipment_id),
            args=[pack(orjson.dumps(entry), HISTORY), self.history_cap, self.state_ttl_s],
        )

    # -- stalled shipments --------------------------------------------------------------
    async def due_stalls(self, now_ms: int, limit: int) -> list[tuple[str, str, int]]:
        """(merchant_id, shipment_id, deadline ms) of shipments stalled by ``now_ms``: up to
        ``limit`` from each stall index (one, or one per partition on a cluster)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for scope in self.scopes:
                pipe.zrangebyscore(
                    keys.stall_key(self.tag(scope)), "-inf", now_ms, 0, limit, withscores=True
                )
            found = await pipe.execute()
        out = []
        for member, score in (row for rows in found for row in rows):
            merchant_id, _, shipment_id = decode(member).partition(":")
            out.append((merchant_id, shipment_id, int(score)))
        return out

    async def drop_stall(self, merchant_id: str, shipment_id: str, deadline_ms: int) -> None:
        """Take a shipment off the stall index unless its deadline moved meanwhile."""
        tag = self.shipment_tag(merchant_id, shipment_id)
        await self.scripts.drop_stall(
            keys=[keys.stall_key(tag)],
            args=[keys.stall_member(merchant_id, shipment_id), deadline_ms],
        )

    # -- tracking numbers ---------------------------------------------------------------
    async def shipments_tracked_as(self, merchant_id: str, tracking_number: str) -> list[str]:
        """The merchant's shipments that carried ``tracking_number`` (the first
        ``keys.TRACKING_SHIPMENTS`` by id). The commit that records a shipment's state adds
        it to the week's bucket of its number (on a Redis Cluster, a bucket of its
        partition: a lookup asks each); a lookup reads every week a record could still live
        through, and the key a number had before buckets."""
        # as the number is indexed now (spaces out, capitals), and as written (an entry of
        # a version before 12-06, where the two differ)
        slots = dict.fromkeys(
            keys.tracking_slot(merchant_id, tracking_number, as_written)
            for as_written in (False, True)
        )
        weeks = keys.tracking_weeks(await self.redis_seconds(), self.state_ttl_s)
        names = [
            (keys.tracking_bucket_key(week, bucket, self.tag(scope)), field)
            for bucket, field in slots
            for week in weeks
            for scope in self.scopes
        ]
        older = [keys.tracking_key(merchant_id, tracking_number, self.tag(s)) for s in self.scopes]
        async with self.redis.pipeline(transaction=False) as pipe:
            for name, field in names:
                # base64: no character a pattern treats specially
                pipe.hscan(name, 0, match=f"{field}*", count=1000)
            for name in older:
                pipe.hrandfield(name, keys.TRACKING_SHIPMENTS)
            found = await pipe.execute(raise_on_error=False)
        shipments: set[str] = set()
        for (name, field), answer in zip(names, found, strict=False):
            if isinstance(answer, ResponseError):
                raise answer
            cursor, fields = answer
            while True:  # one round for a small bucket; more for a big one
                shipments.update(decode(f)[len(field) :] for f in fields)
                if not int(cursor):
                    break
                cursor, fields = await awaited(
                    self.redis.hscan(name, cursor, match=f"{field}*", count=1000)
                )
        for name, members in zip(older, found[len(names) :], strict=True):
            if isinstance(members, ResponseError):  # a set, written before records
                members = await awaited(self.redis.srandmember(name, keys.TRACKING_SHIPMENTS))
            shipments.update(decode(m) for m in members or [])
        return sorted(shipments)[: keys.TRACKING_SHIPMENTS]


#: a waiting message past its due time this long and still not on its shipment's outcome
#: list (failed for good, trimmed from a long list, or a record from before 0.4 read
#: without its list) counts as sent, as it always did, and is no longer looked up
UNSETTLED_AFTER = timedelta(days=1)


def settled_log(
    state: ShipmentState, outcomes: Mapping[str, Mapping[str, str]], by: datetime
) -> ShipmentState:
    """``state`` with its message log up to date with what became of its messages that
    waited for a due time come by ``by`` (``outcomes``: the ledger fields each settled
    notification was recorded with, by id, from the shipment's outcome list).

    One cancelled when its time came, never handed to a channel (its recipient opted out
    meanwhile, or a newer decision overtook it within ``OVERTAKE_MARGIN`` of its due time),
    is marked ``cancelled``: no cap or throttle counts it. One cancelled after more than one
    claim may have gone out with a claim that was lost, and one sent is a message sent: they
    count, as every message in the log does, and no longer wait. One not settled yet
    (claimed, retrying) waits still, for ``UNSETTLED_AFTER`` at most."""
    changed = []
    for m in state.messages:
        due = m.due
        if due is not None and due <= by:
            nid = notification_id_of(state.merchant_id, state.shipment_id, m.event_id, m.channel)
            fields = outcomes.get(nid, {})
            status = fields.get("st")
            if status == LedgerState.CANCELLED and fields.get("attempts", "0") in ("0", "1"):
                m = m.model_copy(update={"due": None, "cancelled": True})
            elif status in (LedgerState.SENT, LedgerState.CANCELLED) or (
                due <= by - UNSETTLED_AFTER
            ):
                m = m.model_copy(update={"due": None})
        changed.append(m)
    if changed == state.messages:
        return state
    return state.model_copy(update={"messages": changed})


def _outcomes_of(state: ShipmentState, raw: Any) -> dict[str, dict[str, str]]:
    """The ledger fields of each notification on a shipment's outcome list (``raw``: its
    record's bytes, or a record read from the keys before records, without its list); none
    when the list does not read (it is left for ``compact`` to report), so a damaged list
    never holds up the batch."""
    try:
        whole = raw if isinstance(raw, record.Record) else record.parse(raw)
        return outcomes_of(whole.outcomes)
    except Exception as exc:  # damaged data of any kind: the state is decided as it is
        log.warning(
            "shipment %s/%s: its outcome list does not read (%s); its waiting messages count "
            "as sent",
            state.merchant_id,
            state.shipment_id,
            type(exc).__name__,
        )
        return {}


#: a chunk's notification id that its decision's event and channel make (see the top)
DERIVED_ID = "n_"


def _decisions(
    elements: Iterable[bytes], merchant_id: str, shipment_id: str
) -> list[dict[str, Any]]:
    """Every decision a shipment's history elements hold, oldest first."""
    out: list[dict[str, Any]] = []
    for element in elements:
        if not chunks.is_chunk(element):
            out.append(orjson.loads(unpack(element)))
            continue
        decisions = orjson.loads(unpack(chunks.body(element)))
        for d in decisions:
            if d.get("notification_id") == DERIVED_ID:
                d["notification_id"] = notification_id_of(
                    merchant_id, shipment_id, d["event_id"], d["channel"]
                )
        out += decisions
    return out


def history_merge(merchant_id: str, shipment_id: str) -> chunks.Merge:
    """How a shipment's history elements become one chunk: the latest ``cap`` decisions
    they hold, each notification id its event and channel make as ``DERIVED_ID``."""

    def merge(elements: Sequence[bytes], cap: int) -> bytes:
        decisions = _decisions(elements, merchant_id, shipment_id)[-cap:]
        for d in decisions:
            nid, event_id, channel = d.get("notification_id"), d.get("event_id"), d.get("channel")
            if not (nid and isinstance(event_id, str) and isinstance(channel, str)):
                continue
            if nid == notification_id_of(merchant_id, shipment_id, event_id, channel):
                d["notification_id"] = DERIVED_ID
        return chunks.header(len(decisions)) + pack(orjson.dumps(decisions), HISTORY)

    return merge


def _count_keys(c: ShipmentCommit, tag: str) -> list[tuple[tuple[tuple[str, int], ...], str]]:
    """A commit's analytics and carrier counts, each with the key of its day."""
    out = []
    if c.counts:
        out.append((c.counts, keys.stats_key(c.merchant_id, c.day, tag)))
    if c.carrier_counts:
        out.append((c.carrier_counts, keys.carrier_key(c.merchant_id, c.day, tag)))
    return out
