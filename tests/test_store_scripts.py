"""The store's Lua scripts, one contract at a time, on the real redis-server: what each
writes, what it refuses and what it answers (the headers of notifier/store/lua/*.lua).

Every expectation reads Redis itself, not only what the store answers: a script that
wrote a field too many, overwrote another worker's claim or half-applied a refused commit
fails here."""

from __future__ import annotations

import base64
import hashlib
import math
import time
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from arq.connections import ArqRedis
from redis.exceptions import ResponseError

from bench.procs import free_port
from notifier.state import ShipmentState
from notifier.store import (
    Admission,
    Claim,
    ClaimResult,
    IngestItem,
    ShipmentCommit,
    Store,
    body_digest,
    keys,
    record,
    wake,
)
from notifier.store.base import decode
from notifier.store.ledger import created_iso, created_stamp
from tests.conftest import record_of, rewrite_record, start_redis

#: The tests' "now" in epoch ms (the scripts take it as an argument, never from a clock).
NOW_MS = 1_795_000_000_000
NOW_ISO = "2026-11-18T10:13:20+00:00"
LEASE_MS = 60_000
IDEMPOTENCY_TTL_S = 86_400
STATE_TTL_S = 7 * 86_400


#: the shipment the ledger entries of these tests belong to
SHIPMENT = ("acme", "s1")


def store_on(redis: ArqRedis, history_cap: int = 3) -> Store:
    """The store these tests use, over ``redis``."""
    return Store(
        redis,
        partitions=4,
        idempotency_ttl_s=IDEMPOTENCY_TTL_S,
        state_ttl_s=STATE_TTL_S,
        history_cap=history_cap,
    )


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[Store]:
    redis = ArqRedis.from_url(redis_url)
    yield store_on(redis)
    await redis.aclose()


async def snapshot(redis: ArqRedis) -> dict[bytes, bytes]:
    """Every key and its serialized value (DUMP): equal snapshots, equal data."""
    return {key: await redis.dump(key) for key in sorted(await redis.keys("*"))}


def shipment(
    shipment_id: str,
    version: int = 0,
    *,
    history: Sequence[dict[str, Any]] = (),
    notifications: Sequence[tuple[str, str, str, bytes]] = (),
    stall_at_ms: int | None = None,
    ttl_s: int | None = None,
    tracking_number: str | None = None,
) -> ShipmentCommit:
    """A commit of shipment ``acme/<shipment_id>`` read at ``version``; its state counts the
    commit (``events``), so two commits' states differ."""
    state = ShipmentState(
        merchant_id="acme",
        shipment_id=shipment_id,
        events=version + 1,
        tracking_number=tracking_number,
    )
    return ShipmentCommit(
        "acme",
        shipment_id,
        version,
        state,
        [orjson.dumps(h) for h in history],
        list(notifications),
        stall_at_ms=stall_at_ms,
        ttl_s=ttl_s,
    )


def pending(nid: str) -> tuple[str, str, str, bytes]:
    return (nid, "pending", "", f"payload-{nid}".encode())


def deferred(nid: str, due_ms: int) -> tuple[str, str, str, bytes]:
    return (nid, "deferred", str(due_ms), f"payload-{nid}".encode())


async def ledger_entries(store: Store, *notifications: tuple[str, str, str, bytes]) -> None:
    assert await store.commit([shipment("s-ledger", notifications=notifications)], NOW_ISO) == []


async def due_index(store: Store) -> dict[str, int]:
    """Every notification on the due index, and when it is due (epoch ms)."""
    return dict(await store.due_entries(math.inf))


async def entry(store: Store, nid: str) -> dict[str, str]:
    raw = await store.redis.hgetall(keys.notification_key(nid))
    return {k.decode(): v.decode() for k, v in raw.items()}


# -- ingest ------------------------------------------------------------------------------


def event(event_id: str, shipment_id: str = "s1", body: Any = None) -> IngestItem:
    body = {"event_id": event_id} if body is None else body
    return ("acme", shipment_id, event_id, orjson.dumps(body), body_digest(body), "req-1")


def shipment_in(store: Store, partition: int) -> str:
    """A shipment id whose events go to ``partition``."""
    return next(f"s{i}" for i in range(100) if store.partition_of("acme", f"s{i}") == partition)


async def test_ingest_accepts_a_new_event_once_and_refuses_another_body_under_its_id(
    store: Store,
) -> None:
    redis, inbox = store.redis, keys.inbox_key(store.partition_of("acme", "s1"))
    first = event("e1")
    assert (await store.ingest([first]))[0] == [Admission.ACCEPTED]
    [(_, fields)] = await redis.xrange(inbox)
    assert fields == {b"t": first[3], b"r": b"req-1"}
    # the id is recorded with the body's digest, in its generation's bucket: a field of 8
    # bytes (the first of the hash whose base64 the short field was), a digest of 4 (the
    # first 32 bits of the 6 characters of base64 passed)
    [bucket] = await redis.keys(f"{keys.EVENT_BUCKET_PREFIX}[0-9]*")
    generation = int(bucket.decode().split(":")[2])
    number, field = keys.event_binary_slot("acme", "e1")
    assert bucket.decode() == keys.event_bucket_key(generation, number)
    recorded = await redis.hgetall(bucket)
    assert recorded == {field: base64.b64decode(first[4] + "==")[:4]}
    assert (len(field), len(first[4])) == (8, 6)
    assert field == base64.b64decode(keys.event_slot("acme", "e1")[1])[:8]
    # short fields only from the next generation on (this one may hold long ones), binary
    # ones too
    assert await redis.get(keys.event_marker_key()) == str(generation + 1).encode()
    assert await redis.get(keys.event_binary_marker_key()) == str(generation + 1).encode()
    # it lives through its generation and the next
    assert await redis.expiretime(bucket) == (generation + 2) * IDEMPOTENCY_TTL_S

    assert (await store.ingest([event("e1")]))[0] == [Admission.DUPLICATE]
    other = event("e1", body={"event_id": "e1", "status": "delivered"})
    assert (await store.ingest([other]))[0] == [Admission.CONFLICT]
    assert await redis.xlen(inbox) == 1
    assert await redis.hgetall(bucket) == recorded
    # within one call too: the first of an id is accepted, what follows is judged against it
    again = event("e2", body={"event_id": "e2", "n": 2})
    assert (await store.ingest([event("e2"), event("e2"), again]))[0] == [
        Admission.ACCEPTED,
        Admission.DUPLICATE,
        Admission.CONFLICT,
    ]
    assert await redis.xlen(inbox) == 2


async def test_ingest_honours_ids_recorded_before(store: Store) -> None:
    redis = store.redis
    assert (await store.ingest([event("e1")]))[0] == [Admission.ACCEPTED]
    [bucket] = await redis.keys(f"{keys.EVENT_BUCKET_PREFIX}[0-9]*")
    generation = int(bucket.decode().split(":")[2])
    # an id of the previous generation is still known
    number, field = keys.event_slot("acme", "e2")
    await redis.hset(keys.event_bucket_key(generation - 1, number), field, event("e2")[4])
    # an id recorded before 0.6, without a digest, and a pre-0.5 key of its own
    number, field = keys.event_slot("acme", "e3")
    await redis.hset(keys.event_bucket_key(generation, number), field, "")
    await redis.set(keys.legacy_event_key("acme", "e4"), "1")
    before = await redis.xlen(keys.inbox_key(store.partition_of("acme", "s1")))
    admissions, _ = await store.ingest([event("e2"), event("e3"), event("e4")])
    assert admissions == [Admission.DUPLICATE] * 3
    assert await redis.xlen(keys.inbox_key(store.partition_of("acme", "s1"))) == before


async def test_a_body_digest_of_8_characters_recorded_before_still_tells_a_repost(
    store: Store,
) -> None:
    """The version before recorded 8 characters of a body's digest; the 6 passed now are
    their first, so the same body is a duplicate and another one a conflict."""
    redis = store.redis
    generation = await store._generation()
    body = {"event_id": "e1", "status": "in_transit"}
    canonical = orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
    recorded = base64.b64encode(hashlib.blake2b(canonical, digest_size=9).digest()[:6]).decode()
    assert len(recorded) == 8 and recorded.startswith(body_digest(body))
    number, field = keys.event_slot("acme", "e1")
    await redis.hset(keys.event_bucket_key(generation, number), field, recorded)
    other = {"event_id": "e1", "status": "delivered"}
    admissions, _ = await store.ingest([event("e1", body=body), event("e1", body=other)])
    assert admissions == [Admission.DUPLICATE, Admission.CONFLICT]
    assert await redis.hget(keys.event_bucket_key(generation, number), field) == recorded.encode()
    # and the other way round: an API process of the version before passes 8 characters
    # beside one that recorded 6
    plain = orjson.dumps(body)
    new, old = body_digest(body), recorded
    item = ("acme", "s1", "e2", plain, new, "req-1")
    assert (await store.ingest([item]))[0] == [Admission.ACCEPTED]
    assert (await store.ingest([(*item[:4], old, "req-2")]))[0] == [Admission.DUPLICATE]
    conflicting = base64.b64encode(
        hashlib.blake2b(orjson.dumps(other, option=orjson.OPT_SORT_KEYS), digest_size=9).digest()[
            :6
        ]
    ).decode()
    admissions, _ = await store.ingest([("acme", "s1", "e2", orjson.dumps(other), conflicting, "")])
    assert admissions == [Admission.CONFLICT]


def _recorded_before(
    generation: int,
) -> tuple[dict[str, dict[str, str]], tuple[tuple[str, int], ...]]:
    """Four event ids' bodies, and the generation a version before recorded each in: e1 and
    e2 the previous one, e3 and e4 ``generation``."""
    bodies = {e: {"event_id": e, "status": "in_transit"} for e in ("e1", "e2", "e3", "e4")}
    return bodies, (
        ("e1", generation - 1),
        ("e2", generation - 1),
        ("e3", generation),
        ("e4", generation),
    )


async def _repost(store: Store, bodies: dict[str, dict[str, str]]) -> list[Admission]:
    """e1 and e3 again with their bodies, e2 with another."""
    other = {"event_id": "e2", "status": "delivered"}
    again = [
        event("e1", body=bodies["e1"]),
        event("e2", body=other),
        event("e3", body=bodies["e3"]),
    ]
    return (await store.ingest(again))[0]


async def test_ingest_finds_ids_recorded_with_long_fields_in_generations_before_short_ones(
    store: Store,
) -> None:
    """Before, an id's field was 16 characters and its body digest 12; now 12 and 8, their
    first ones. In a generation older than the first written with short fields, an id is
    found by its long field too, and a digest recorded then still tells a duplicate from a
    conflict. From that generation on only short fields are written, and looked up."""
    redis = store.redis
    generation = await store._generation()
    # the version before wrote the previous generation; short fields only from this one on
    await redis.set(keys.event_marker_key(), generation)
    bodies, written = _recorded_before(generation)
    for event_id, at in written:
        number, long = keys.event_hash("acme", event_id)
        digest = body_digest(bodies[event_id])
        recorded = base64.b64encode(
            hashlib.blake2b(
                orjson.dumps(bodies[event_id], option=orjson.OPT_SORT_KEYS), digest_size=9
            ).digest()
        ).decode()
        assert len(long) == 16 and len(recorded) == 12 and recorded.startswith(digest)
        await redis.hset(keys.event_bucket_key(at, number), long, recorded)
    # e1 the same body: a duplicate; e2 another body: a conflict; e3, recorded in the
    # generation where fields are of the new kind only: new
    assert await _repost(store, bodies) == [
        Admission.DUPLICATE,
        Admission.CONFLICT,
        Admission.ACCEPTED,
    ]
    # the first call of this version: ids of the current generation are looked up by their
    # long field too (the version before may have written them until just now)
    await redis.delete(keys.event_marker_key())
    assert (await store.ingest([event("e4", body=bodies["e4"])]))[0] == [Admission.DUPLICATE]
    assert await redis.get(keys.event_marker_key()) == str(generation + 1).encode()


async def test_ingest_finds_ids_recorded_with_base64_fields_in_generations_before_binary_ones(
    store: Store,
) -> None:
    """Before, an id's field was 12 characters of base64 and its body digest 6; now 8 bytes
    and 4, the same bits. In a generation older than the first written with binary fields,
    an id is found by its base64 field too and its digest compared as before; from that
    generation on only binary fields are written, and looked up."""
    redis = store.redis
    generation = await store._generation()
    await redis.set(keys.event_marker_key(), generation - 5)  # short fields long since
    await redis.set(keys.event_binary_marker_key(), generation)
    bodies, written = _recorded_before(generation)
    for event_id, at in written:
        number, field = keys.event_slot("acme", event_id)
        await redis.hset(keys.event_bucket_key(at, number), field, body_digest(bodies[event_id]))
    # e1 the same body: a duplicate; e2 another body: a conflict; e3, recorded in the
    # generation where fields are of the new kind only: new
    assert await _repost(store, bodies) == [
        Admission.DUPLICATE,
        Admission.CONFLICT,
        Admission.ACCEPTED,
    ]
    # e3 is recorded again, binary: the same body is a duplicate, another a conflict
    number, binary = keys.event_binary_slot("acme", "e3")
    bucket = keys.event_bucket_key(generation, number)
    digest = body_digest(bodies["e3"])
    assert await redis.hget(bucket, binary) == base64.b64decode(digest + "==")[:4]
    changed = {"event_id": "e3", "status": "delivered"}
    admissions, _ = await store.ingest([event("e3", body=bodies["e3"]), event("e3", body=changed)])
    assert admissions == [Admission.DUPLICATE, Admission.CONFLICT]
    # a digest of 8 characters (as a version before passed) is the same 32 bits
    eight = base64.b64encode(
        hashlib.blake2b(
            orjson.dumps(bodies["e3"], option=orjson.OPT_SORT_KEYS), digest_size=9
        ).digest()[:6]
    ).decode()
    assert eight.startswith(digest) and len(eight) == 8
    again = ("acme", "s1", "e3", orjson.dumps(bodies["e3"]), eight, "req-2")
    assert (await store.ingest([again]))[0] == [Admission.DUPLICATE]
    # the first call of this version: ids of the current generation are looked up by their
    # base64 field too (the version before may have written them until just now)
    await redis.delete(keys.event_binary_marker_key())
    assert (await store.ingest([event("e4", body=bodies["e4"])]))[0] == [Admission.DUPLICATE]
    assert await redis.get(keys.event_binary_marker_key()) == str(generation + 1).encode()


async def test_ingest_finds_binary_ids_of_the_previous_generation(store: Store) -> None:
    """An id is remembered at least a generation: one recorded in binary in the previous
    generation is found (there only binary fields are looked up, once it is the first of
    them), and its digest tells a repost from another body."""
    redis = store.redis
    generation = await store._generation()
    await redis.set(keys.event_marker_key(), generation - 5)
    await redis.set(keys.event_binary_marker_key(), generation - 1)
    body = {"event_id": "e1", "status": "in_transit"}
    number, binary = keys.event_binary_slot("acme", "e1")
    _, long = keys.event_hash("acme", "e1")
    recorded = keys.event_binary(long, body_digest(body))
    assert recorded[:8] == binary and len(recorded) == 12
    await redis.hset(keys.event_bucket_key(generation - 1, number), binary, recorded[8:])
    # a base64 field there is not looked up any more: the generation is binary only
    number2, short = keys.event_slot("acme", "e2")
    await redis.hset(keys.event_bucket_key(generation - 1, number2), short, body_digest(body))
    other = {"event_id": "e1", "status": "delivered"}
    admissions, _ = await store.ingest(
        [event("e1", body=body), event("e1", body=other), event("e2", body=body)]
    )
    assert admissions == [Admission.DUPLICATE, Admission.CONFLICT, Admission.ACCEPTED]
    # a digest too short to give 32 bits is refused before anything is written
    with pytest.raises(ValueError, match="6 or more"):
        keys.event_binary(long, "abcd")


async def test_ingest_refuses_binary_fields_that_do_not_match_its_events(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The events' binary fields travel apart from them, in one argument: a caller that
    passed one too short would record events under each other's fields. The script refuses
    the call whole, before it writes anything (not even the markers)."""
    whole = keys.event_binary
    monkeypatch.setattr(keys, "event_binary", lambda long, digest: whole(long, digest)[:-1])
    with pytest.raises(ResponseError, match="ARGV\\[6\\] holds 22 bytes for 2 events of 12"):
        await store.ingest([event("e1"), event("e2")])
    assert await store.redis.keys("*") == []


async def test_ingest_wakes_a_partition_once_per_window(store: Store) -> None:
    redis = store.redis
    one, two = shipment_in(store, 1), shipment_in(store, 2)
    assert await store.ingest([event("a", one), event("b", one)]) == (
        [Admission.ACCEPTED] * 2,
        [1],
    )
    assert 0 < await redis.pttl(keys.wake_key(1)) <= store.WAKE_MS
    # the flag is up: more events for it wake nobody; another partition wakes
    assert (await store.ingest([event("c", one), event("d", two)]))[1] == [2]
    # a drain that let go clears it; a call that stores nothing sets none
    await store.clear_wake(1)
    assert (await store.ingest([event("a", one)]))[1] == []
    assert await redis.exists(keys.wake_key(1)) == 0
    assert (await store.ingest([event("e", one)]))[1] == [1]


async def test_wake_enqueues_a_drain_job_per_partition(store: Store) -> None:
    await wake(store.redis, [1, 3])
    jobs = await store.redis.queued_jobs()
    assert sorted((j.function, tuple(j.args)) for j in jobs) == [("drain", (1,)), ("drain", (3,))]


# -- commit ------------------------------------------------------------------------------


async def test_a_fresh_commit_writes_state_history_ledger_and_indexes(store: Store) -> None:
    redis = store.redis
    commit = shipment(
        "s1",
        history=[{"d": 1}, {"d": 2}],
        notifications=[pending("n1"), deferred("n2", NOW_MS + 5000)],
        stall_at_ms=NOW_MS + 86_400_000,
    )
    short = shipment("s2", history=[{"d": 3}], notifications=[pending("n3")], ttl_s=100)
    assert await store.commit([commit, short], NOW_ISO) == []

    assert await store.load_states([("acme", "s1"), ("acme", "s2"), ("acme", "s9")]) == [
        (1, commit.state),
        (1, short.state),
        (0, None),
    ]
    assert await store.history("acme", "s1") == [{"d": 1}, {"d": 2}]
    assert (await record_of(store, "acme", "s1")).counted == 2
    assert await entry(store, "n1") == {
        "st": "pending",
        "p": "payload-n1",
        "created": created_stamp(NOW_ISO),
        "due": "",
    }
    # no count until a claim makes one (a byte-size class less a waiting message): shown as 0
    assert (await store.ledger(["n1"]))["n1"]["attempts"] == 0
    assert (await entry(store, "n2"))["due"] == str(NOW_MS + 5000)
    assert await store.due_entries(math.inf) == [("n2", NOW_MS + 5000)]
    assert await redis.zrange(keys.STALL_KEY, 0, -1, withscores=True) == [
        (b"acme:s1", NOW_MS + 86_400_000)
    ]
    # one key a shipment: its record holds its state, its history and its outcomes
    assert STATE_TTL_S - 60 < await redis.ttl(keys.state_key("acme", "s1")) <= STATE_TTL_S
    for key in (keys.state_key("acme", "s2"), keys.notification_key("n3")):
        assert 0 < await redis.ttl(key) <= 100
    assert not await redis.exists(keys.history_key("acme", "s1"), keys.outcome_key("acme", "s1"))


async def test_a_commit_whose_version_moved_is_refused_and_changes_nothing(store: Store) -> None:
    redis = store.redis
    first = shipment("s1", history=[{"d": 1}], notifications=[pending("n1")], stall_at_ms=NOW_MS)
    assert await store.commit([first], NOW_ISO) == []
    before = await snapshot(redis)
    # a worker that read version 0 too, committing beside another shipment
    stale = shipment(
        "s1",
        0,
        history=[{"d": "stale"}],
        notifications=[pending("n2"), deferred("n3", NOW_MS)],
        stall_at_ms=None,
    )
    other = shipment("s2")
    assert await store.commit([other, stale], NOW_ISO) == [1]
    after = await snapshot(redis)
    assert after.pop(keys.state_key("acme", "s2").encode())
    assert after == before  # s1, its history, the ledger and both indexes as they were

    # the version it moved to commits, and a stall of None takes it off the stall index
    assert await store.commit([shipment("s1", 1, notifications=[pending("n2")])], NOW_ISO) == []
    assert (await store.load_states([("acme", "s1")]))[0][0] == 2
    assert await redis.zscore(keys.STALL_KEY, "acme:s1") is None
    assert (await entry(store, "n2"))["st"] == "pending"


async def test_a_commit_never_creates_a_notification_twice(store: Store) -> None:
    await ledger_entries(store, pending("n1"))
    await store.claim(["n1"], NOW_MS, LEASE_MS, owner="A")
    claimed = await entry(store, "n1")
    again = shipment("s-ledger", 1, notifications=[("n1", "pending", "", b"other")])
    assert await store.commit([again], NOW_ISO) == []
    assert await entry(store, "n1") == claimed


# -- claim -------------------------------------------------------------------------------


async def test_claim_takes_a_pending_notification(store: Store) -> None:
    await ledger_entries(store, pending("n1"))
    assert await store.claim(["n1"], NOW_MS, LEASE_MS, owner="A") == [
        Claim(ClaimResult.FRESH, b"payload-n1", NOW_ISO)
    ]
    assert await entry(store, "n1") == {
        "st": "sending",
        "p": "payload-n1",
        "created": created_stamp(NOW_ISO),
        "attempts": "1",
        "due": "",
        "claimed": str(NOW_MS),
        "owner": "A",
    }


async def test_a_live_claim_is_busy_and_an_expired_one_is_reclaimed(store: Store) -> None:
    await ledger_entries(store, pending("n1"))
    await store.claim(["n1"], NOW_MS, LEASE_MS, owner="A")
    held = await entry(store, "n1")
    # to the last millisecond of its lease, the claim is A's
    assert await store.claim(["n1"], NOW_MS + LEASE_MS, LEASE_MS, owner="B") == [
        Claim(ClaimResult.BUSY, str(NOW_MS).encode())  # when it was claimed (or renewed)
    ]
    assert await entry(store, "n1") == held
    later = NOW_MS + LEASE_MS + 1
    assert await store.claim(["n1"], later, LEASE_MS, owner="B") == [
        Claim(ClaimResult.RECLAIMED, b"payload-n1", NOW_ISO)
    ]
    assert await entry(store, "n1") == held | {
        "claimed": str(later),
        "owner": "B",
        "attempts": "2",
    }


async def test_a_deferred_notification_is_claimed_only_when_due_and_asked_for(
    store: Store,
) -> None:
    due = NOW_MS + 1000
    await ledger_entries(store, deferred("n1", due))
    waiting = Claim(ClaimResult.DEFERRED, str(due).encode())
    assert await store.claim(["n1"], due + 5000, LEASE_MS, owner="A") == [waiting]
    assert await store.claim(["n1"], due - 1, LEASE_MS, due=True, owner="A") == [waiting]
    assert (await entry(store, "n1"))["st"] == "deferred"
    assert await store.claim(["n1"], due, LEASE_MS, due=True, owner="A") == [
        Claim(ClaimResult.FRESH, b"payload-n1", NOW_ISO)
    ]
    assert (await entry(store, "n1"))["st"] == "sending"


async def test_unclaim_puts_each_claim_back_as_it_was_and_only_its_owners(store: Store) -> None:
    """``unclaim.lua`` (claims the replicas did not confirm) puts back what ``claim.lua``
    answered was there before: a pending or a due deferred notification as before its
    claim, attempts and all; one taken over after a lease with its earlier holder and
    claim time again (that holder can still record what it sent). Another owner's claim,
    or a settled entry, is left alone."""
    due = NOW_MS - 1
    await ledger_entries(store, pending("p"), deferred("d", due), pending("r"), pending("x"))
    await store.claim(["r", "x"], NOW_MS, LEASE_MS, owner="old")
    before = {nid: await entry(store, nid) for nid in ("p", "d", "r")}
    later = NOW_MS + LEASE_MS + 1
    names = [keys.notification_key(nid) for nid in ("p", "d", "r", "x")]
    rows = await store.scripts.claim(keys=names[:3], args=[later, LEASE_MS, "due", "A"])
    assert [int(row[0]) for row in rows] == [1, 1, 2]  # fresh, fresh, reclaimed
    said = [[decode(v) for v in row[3]] for row in rows]
    assert said == [
        ["pending", "", ""],
        ["deferred", "", ""],
        ["sending", "old", str(NOW_MS)],
    ]
    held_by_other = ["pending", "", ""]
    args = ["A", *(v for fields in [*said, held_by_other] for v in fields)]
    assert await store.scripts.unclaim(keys=names, args=args) == 3
    assert {nid: await entry(store, nid) for nid in ("p", "d", "r")} == before
    assert (await entry(store, "x"))["owner"] == "old"  # not A's: left as it is
    # undone, they are claimed again as before: fresh, and the lapsed one as reclaimed
    again = await store.claim(["p", "r"], later, LEASE_MS, owner="B")
    assert [c.result for c in again] == [ClaimResult.FRESH, ClaimResult.RECLAIMED]


async def test_claim_finds_nothing_to_do_in_settled_unknown_or_emptied_entries(
    store: Store,
) -> None:
    await ledger_entries(store, pending("sent"), pending("failed"), pending("n1"))
    await store.mark_sent([("sent", NOW_ISO, "outbox:x")], where={"sent": SHIPMENT})
    await store.mark_failed("failed", "bounced")
    await store.redis.hdel(keys.notification_key("n1"), "p")  # pending without its payload
    before = await snapshot(store.redis)
    ids = ["sent", "gone", "failed", "n1"]
    assert (
        await store.claim(ids, NOW_MS, LEASE_MS, due=True, owner="A")
        == [Claim(ClaimResult.NONE, None)] * 4
    )
    assert await snapshot(store.redis) == before


async def test_claim_answers_each_notification_in_order(store: Store) -> None:
    await ledger_entries(store, pending("a"), deferred("b", NOW_MS + 1), pending("c"))
    await store.claim(["c"], NOW_MS, LEASE_MS, owner="other")
    assert await store.claim(["c", "x", "b", "a"], NOW_MS, LEASE_MS, owner="A") == [
        Claim(ClaimResult.BUSY, str(NOW_MS).encode()),
        Claim(ClaimResult.NONE, None),
        Claim(ClaimResult.DEFERRED, str(NOW_MS + 1).encode()),
        Claim(ClaimResult.FRESH, b"payload-a", NOW_ISO),
    ]


async def test_a_payload_is_kept_in_64_byte_pieces_and_claimed_whole(store: Store) -> None:
    """Pieces keep the ledger hash a compact (listpack) one: a value over 64 bytes makes it a
    hashtable, 40 % larger. A payload in one field (written before) is claimed the same."""
    long = bytes(range(256)) * 2 + b"end"  # any bytes: a packed payload is binary
    await ledger_entries(store, ("n1", "pending", "", long), ("n2", "pending", "", b"short"))
    name = keys.notification_key("n1")
    fields = await store.redis.hgetall(name)
    assert [fields[b"p" + (b"%d" % i if i else b"")] for i in range(9)] == [
        long[at : at + 64] for at in range(0, len(long), 64)
    ]
    assert await store.redis.object("encoding", name) == b"listpack"
    assert await store.payload("n1") == long
    await store.redis.hset(keys.notification_key("old"), mapping={"st": "pending", "p": long})
    assert await store.claim(["n1", "n2", "old"], NOW_MS, LEASE_MS, owner="A") == [
        Claim(ClaimResult.FRESH, long, NOW_ISO),
        Claim(ClaimResult.FRESH, b"short", NOW_ISO),
        Claim(ClaimResult.FRESH, long),  # no created: written by hand here, as by 0.3
    ]
    assert await store.payload("old") == long
    assert await store.payload("unknown") is None


# -- settle (renew, release, sent, failed, cancelled) -------------------------------------


async def test_settling_is_refused_to_a_worker_whose_claim_was_taken_over(store: Store) -> None:
    redis = store.redis
    await ledger_entries(store, pending("n1"), pending("n2"))
    await store.claim(["n1", "n2"], NOW_MS, LEASE_MS, owner="A")
    await store.claim(["n1"], NOW_MS + LEASE_MS + 1, LEASE_MS, owner="B")
    taken = await entry(store, "n1")
    # A's round ends late: whatever it records, n1 stays B's
    assert await store.renew(["n1", "n2"], "A", NOW_MS + LEASE_MS + 2) == ["n2"]
    await store.release(["n1"], "A")
    await store.mark_sent([("n1", NOW_ISO, "twilio:SM1")], owner="A", where={"n1": SHIPMENT})
    await store.mark_failed("n1", "bounced", owner="A")
    await store.cancel("n1", "superseded", SHIPMENT, owner="A")
    await store.reschedule("n1", NOW_MS + 9000, "timeout", owner="A")
    assert await entry(store, "n1") == taken
    assert await store.by_provider_id("twilio", "SM1") is None
    assert await redis.llen(keys.DEAD_LETTER_KEY) == 0
    assert "n1" not in await due_index(store)
    assert (await entry(store, "n2"))["claimed"] == str(NOW_MS + LEASE_MS + 2)

    # B's outcome lands: the entry leaves the ledger for one record on the shipment's
    # outcome list (without its payload and claim), which lives as long as the entry would
    await store.mark_sent(
        [("n1", NOW_ISO, "twilio:SM2")], owner="B", summaries={"n1": "Hi"}, where={"n1": SHIPMENT}
    )
    assert not await redis.exists(keys.notification_key("n1"))
    assert await store.deliveries(*SHIPMENT, ["n1"]) == {
        "n1": {
            "status": "sent",
            "created_at": NOW_ISO,
            "attempts": 2,
            "sent_at": NOW_ISO,
            "detail": "twilio:SM2",
            "summary": "Hi",
        }
    }
    [record] = (await record_of(store, *SHIPMENT)).outcomes
    assert b"payload-n1" not in record and b"owner" not in record
    assert STATE_TTL_S - 60 < await redis.ttl(keys.state_key(*SHIPMENT)) <= STATE_TTL_S
    assert await store.by_provider_id("twilio", "SM2") == ("n1", None, SHIPMENT)


async def test_created_is_kept_in_microseconds_and_shown_as_before(store: Store) -> None:
    """``created`` is stored as 16 digits (a waiting entry's hash then takes 344 bytes of
    Redis, not 408); an entry written with the ISO text, as before, shows the same."""
    later = NOW_MS + 3_600_000
    await ledger_entries(store, deferred("new", later), deferred("old", later))
    stored = await entry(store, "new")
    assert stored["created"].isdigit() and len(stored["created"]) == 16
    await store.redis.hset(keys.notification_key("old"), "created", NOW_ISO)
    shown = await store.ledger(["new", "old"])
    assert shown["new"]["created_at"] == shown["old"]["created_at"] == NOW_ISO
    assert await store.redis.memory_usage(
        keys.notification_key("new")
    ) < await store.redis.memory_usage(keys.notification_key("old"))
    for moment in (NOW_ISO, "2026-11-21T14:00:00.000001+00:00", "1970-01-01T00:00:00+00:00"):
        assert created_stamp(moment).isdigit() and created_iso(created_stamp(moment)) == moment
    # what would not read back as it was given is kept as text
    for moment in ("2026-11-21T16:00:00+02:00", "2026-11-21T14:00:00", "1969-12-31T23:59:59+00:00"):
        assert created_stamp(moment) == moment and created_iso(moment) == moment


async def test_a_released_claim_is_taken_over_at_once(store: Store) -> None:
    await ledger_entries(store, pending("n1"))
    await store.claim(["n1"], NOW_MS, LEASE_MS, owner="A")
    await store.release(["n1"], "A")
    assert (await entry(store, "n1"))["claimed"] == "0"
    assert await store.claim(["n1"], NOW_MS + 1, LEASE_MS, owner="B") == [
        Claim(ClaimResult.RECLAIMED, b"payload-n1", NOW_ISO)
    ]


async def test_failed_and_cancelled_entries_keep_what_they_need(store: Store) -> None:
    await ledger_entries(store, pending("n1"), pending("n2"))
    await store.claim(["n1", "n2"], NOW_MS, LEASE_MS, owner="A")
    # without an owner (the dead-letter tools), no owner check
    await store.mark_failed("n1", "bounced")
    failed = await entry(store, "n1")
    assert failed["st"] == "failed" and failed["error"] == "bounced"
    assert failed["p"] == "payload-n1"  # kept for whoever looks into the dead letters
    assert await store.redis.lrange(keys.DEAD_LETTER_KEY, 0, -1) == [b"n1"]
    await store.cancel("n2", "opted out", SHIPMENT, owner="A")
    assert not await store.redis.exists(keys.notification_key("n2"))
    assert await store.deliveries(*SHIPMENT, ["n2"]) == {
        "n2": {"status": "cancelled", "detail": "opted out", "created_at": NOW_ISO, "attempts": 1}
    }


async def test_a_message_overtaken_while_it_waits_is_cancelled_only_while_it_waits(
    store: Store,
) -> None:
    later, due_now = NOW_MS + 60_000, NOW_MS
    await ledger_entries(
        store,
        deferred("waiting", later),
        deferred("due", due_now),
        deferred("claimed", due_now),
        pending("pending"),
    )
    await store.claim(["claimed"], due_now, LEASE_MS, due=True, owner="sweep")
    overtaken = [
        (nid, SHIPMENT, "superseded by delivered")
        for nid in ("waiting", "due", "claimed", "pending", "gone")
    ]
    assert await store.cancel_overtaken(overtaken, NOW_MS) == ["waiting"]
    # the one still waiting leaves the ledger and the due index, recorded as cancelled
    assert not await store.redis.exists(keys.notification_key("waiting"))
    assert "waiting" not in await due_index(store)
    assert (await store.deliveries(*SHIPMENT, ["waiting"]))["waiting"] == {
        "status": "cancelled",
        "detail": "superseded by delivered",
        "created_at": NOW_ISO,
        "attempts": 0,
        "due_at": datetime.fromtimestamp(later / 1000, UTC).isoformat(),
    }
    # one whose time came is the due sweep's, one a worker holds is that worker's, one
    # not deferred is not waiting, and one unknown is never made
    assert (await entry(store, "due"))["st"] == "deferred"
    assert (await due_index(store))["due"] == due_now
    assert (await entry(store, "claimed"))["st"] == "sending"
    assert (await entry(store, "pending"))["st"] == "pending"
    assert not await store.redis.exists(keys.notification_key("gone"))


async def test_settling_never_creates_an_entry(store: Store) -> None:
    await store.mark_sent([("gone", NOW_ISO, "sendgrid:abc")], where={"gone": SHIPMENT})
    await store.mark_failed("gone", "bounced")
    await store.cancel("gone", "superseded", SHIPMENT)
    await store.reschedule("gone", NOW_MS, "timeout")
    assert await store.renew(["gone"], "", NOW_MS) == []
    assert not await store.provider_status("gone", "delivered", 3)
    assert not await store.provider_status("gone", "delivered", 3, None, None, SHIPMENT)
    assert await store.redis.keys("*") == []


# -- reschedule, the due index, fallbacks, provider statuses --------------------------------


async def test_reschedule_defers_the_entry_and_indexes_it_together(store: Store) -> None:
    await ledger_entries(store, pending("n1"))
    await store.claim(["n1"], NOW_MS, LEASE_MS, owner="A")
    due = NOW_MS + 7000
    await store.reschedule("n1", due, "provider hiccup", owner="A")
    got = await entry(store, "n1")
    assert (got["st"], got["due"], got["error"]) == ("deferred", str(due), "provider hiccup")
    assert await due_index(store) == {"n1": due}
    assert await store.due(due - 1, 10) == []
    assert await store.due(due, 10) == ["n1"]
    assert await store.claim(["n1"], due, LEASE_MS, due=True, owner="B") == [
        Claim(ClaimResult.FRESH, b"payload-n1", NOW_ISO)
    ]


async def test_the_due_index_is_read_oldest_first_and_unscheduled_only_when_due(
    store: Store,
) -> None:
    await ledger_entries(
        store, deferred("c", NOW_MS + 3), deferred("a", NOW_MS + 1), deferred("b", NOW_MS + 2)
    )
    assert await store.due(NOW_MS + 3, 10) == ["a", "b", "c"]
    assert await store.due(NOW_MS + 3, 2) == ["a", "b"]
    assert await store.due(NOW_MS + 2, 10) == ["a", "b"]
    # "c" was rescheduled past now meanwhile: it stays
    await store.unschedule(["a", "c", "unknown"], NOW_MS + 2)
    assert await due_index(store) == {"b": NOW_MS + 2, "c": NOW_MS + 3}


async def test_a_fallback_notification_is_added_once_with_its_history_entry(
    store: Store,
) -> None:
    redis = store.redis
    assert await store.commit([shipment("s1", history=[{"d": 1}])], NOW_ISO) == []
    why = orjson.dumps({"why": "fallback"})
    assert await store.add_notification("acme", "s1", "n9", b"p9", NOW_MS + 10, why)
    assert await entry(store, "n9") == {
        "st": "deferred",
        "p": "p9",
        "due": str(NOW_MS + 10),
    }
    assert 0 < await redis.ttl(keys.notification_key("n9")) <= STATE_TTL_S
    assert await due_index(store) == {"n9": NOW_MS + 10}
    assert await store.history("acme", "s1") == [{"d": 1}, {"why": "fallback"}]
    assert (await record_of(store, "acme", "s1")).counted == 2

    before = await snapshot(redis)
    assert not await store.add_notification("acme", "s1", "n9", b"other", NOW_MS, why)
    assert await snapshot(redis) == before
    # a shipment without state gets no state from it, nor a count
    assert await store.add_notification("acme", "s-new", "n10", b"p10", NOW_MS, why)
    assert await store.load_states([("acme", "s-new")]) == [(0, None)]
    assert (await record_of(store, "acme", "s-new")).counted is None
    assert await store.history("acme", "s-new") == [{"why": "fallback"}]
    assert 0 < await redis.ttl(keys.state_key("acme", "s-new")) <= STATE_TTL_S


async def test_a_provider_status_never_goes_back(store: Store) -> None:
    await ledger_entries(store, pending("n1"))
    assert await store.provider_status("n1", "delivered", 3)
    assert not await store.provider_status("n1", "sent", 1)
    assert not await store.provider_status("n1", "delivered", 3, "late copy")
    got = await entry(store, "n1")
    assert (got["provider_status"], got["prank"], "provider_error" in got) == (
        "delivered",
        "3",
        False,
    )
    assert await store.provider_status("n1", "undelivered", 4, "30003")
    got = await entry(store, "n1")
    assert (got["provider_status"], got["prank"], got["provider_error"]) == (
        "undelivered",
        "4",
        "30003",
    )


# -- history pages and stalls ------------------------------------------------------------


async def test_history_positions_count_every_decision_ever_recorded(store: Store) -> None:
    # the store keeps 3 decisions
    assert await store.commit([shipment("s1", history=[{"d": 0}, {"d": 1}])], NOW_ISO) == []
    later = shipment("s1", 1, history=[{"d": 2}, {"d": 3}, {"d": 4}])
    assert await store.commit([later], NOW_ISO) == []
    assert await store.history("acme", "s1") == [{"d": 2}, {"d": 3}, {"d": 4}]
    page = await store.history_page("acme", "s1", None, 2)
    assert (page.decisions, page.total, page.trimmed, page.next_cursor) == (
        [{"d": 2}, {"d": 3}],
        5,
        2,
        4,
    )
    page = await store.history_page("acme", "s1", 4, 2)
    assert (page.decisions, page.next_cursor) == ([{"d": 4}], None)
    assert (await store.history_page("acme", "s1", 0, 1)).decisions == [{"d": 2}]
    # a shipment recorded before the counter counts what is kept
    await rewrite_record(store, "acme", "s1", counted=None)
    page = await store.history_page("acme", "s1", None, 10)
    assert (page.total, page.trimmed, len(page.decisions)) == (3, 0, 3)


async def test_a_stall_is_dropped_only_at_the_deadline_it_was_found_with(store: Store) -> None:
    assert await store.commit([shipment("s1", stall_at_ms=NOW_MS)], NOW_ISO) == []
    assert await store.due_stalls(NOW_MS - 1, 10) == []
    assert await store.due_stalls(NOW_MS, 10) == [("acme", "s1", NOW_MS)]
    # the shipment moved on meanwhile: a later deadline stays
    assert await store.commit([shipment("s1", 1, stall_at_ms=NOW_MS + 50)], NOW_ISO) == []
    await store.drop_stall("acme", "s1", NOW_MS)
    assert await store.redis.zscore(keys.STALL_KEY, "acme:s1") == NOW_MS + 50
    await store.drop_stall("acme", "s1", NOW_MS + 50)
    assert await store.redis.zscore(keys.STALL_KEY, "acme:s1") is None


# -- the drain lock ----------------------------------------------------------------------


async def test_the_drain_lock_is_held_by_one_token_at_a_time(store: Store) -> None:
    redis, key = store.redis, keys.lock_key(2)
    assert await store.lock(2, "A", 1000)
    assert 0 < await redis.pttl(key) <= 1000
    assert not await store.lock(2, "B", 60_000)
    assert await store.lock(2, "A", 60_000)  # renewed
    assert 1000 < await redis.pttl(key) <= 60_000
    assert await store.lock(3, "B", 1000)  # one lock per partition
    await store.unlock(2, "B")
    assert await redis.get(key) == b"A"
    await store.unlock(2, "A")
    assert await redis.exists(key) == 0
    assert await store.lock(2, "B", 1000)


async def test_entries_settled_before_the_outcome_lists_still_read(store: Store) -> None:
    # 0.5 settled an entry in place and indexed a provider's id by the bare notification id
    await store.redis.hset(
        keys.notification_key("old"),
        mapping={"st": "sent", "sent": NOW_ISO, "detail": "twilio:SMold", "attempts": "1"},
    )
    await store.redis.set(keys.provider_key("twilio", "SMold"), "old")
    shown = {"status": "sent", "sent_at": NOW_ISO, "detail": "twilio:SMold", "attempts": 1}
    assert await store.deliveries(*SHIPMENT, ["old"]) == {"old": shown}
    assert await store.by_provider_id("twilio", "SMold") == ("old", None, None)
    assert await store.provider_status("old", "delivered", 5)
    assert await store.deliveries(*SHIPMENT, ["old"]) == {
        "old": {**shown, "provider_status": "delivered"}
    }
    assert await store.claim(["old"], NOW_MS, LEASE_MS) == [Claim(ClaimResult.NONE, None)]


async def test_an_outcome_list_keeps_as_many_records_as_the_history_would(store: Store) -> None:
    # a shipment with more settled notifications than its history keeps decisions
    cap = store.outcomes_cap
    ids = [f"n{i}" for i in range(cap + 5)]
    await ledger_entries(store, *(pending(n) for n in ids))
    await store.mark_sent(
        [(n, NOW_ISO, "outbox:x") for n in ids], where=dict.fromkeys(ids, SHIPMENT)
    )
    records = (await record_of(store, *SHIPMENT)).outcomes
    assert [r.split(b"\t", 1)[0].decode() for r in records] == ids[-cap:]


async def test_shorten_only_ever_shortens(store: Store) -> None:
    await ledger_entries(store, pending("live"), pending("soon"))
    await store.redis.expire(keys.notification_key("soon"), 60)
    await store.commit([shipment(SHIPMENT[1])], NOW_ISO)
    out = keys.state_key(*SHIPMENT)  # the shipment's record, with its outcomes
    await store.shorten(["live", "soon", "gone"], 3600, None, [SHIPMENT])
    assert 3500 < await store.redis.ttl(keys.notification_key("live")) <= 3600
    assert await store.redis.ttl(keys.notification_key("soon")) <= 60  # never lengthened
    assert 3500 < await store.redis.ttl(out) <= 3600
    assert not await store.redis.exists(keys.notification_key("gone"))  # never created


@pytest.fixture
def mid_week(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """The store reckons Redis's clock as the middle of this week (by the real one): no
    test of the tracking buckets straddles a week's end."""
    week = keys.tracking_week(time.time())

    async def redis_seconds() -> float:
        return (week + 0.5) * keys.TRACKING_SPAN_S

    monkeypatch.setattr(store, "redis_seconds", redis_seconds)


def _tracking_bucket(number: str, week_back: int = 0) -> tuple[str, str]:
    """(bucket key, number hash) of acme's ``number`` in the week ``week_back`` weeks before
    the one ``mid_week`` pins."""
    bucket, field = keys.tracking_slot("acme", number)
    week = keys.tracking_week(time.time()) - week_back
    return keys.tracking_bucket_key(week, bucket), field


@pytest.mark.usefixtures("mid_week")
async def test_the_commit_indexes_tracking_numbers_in_the_weeks_bucket(store: Store) -> None:
    redis = store.redis
    key, field = _tracking_bucket("1Z9")
    assert await store.commit([shipment("s1", tracking_number="1Z9")], NOW_ISO) == []
    assert await redis.hgetall(key) == {f"{field}s1".encode(): b""}
    assert await redis.object("encoding", key) == b"listpack"  # a small hash: ~40 B a number
    assert STATE_TTL_S - 60 < await redis.ttl(key) <= STATE_TTL_S
    # a carrier reusing the number: another shipment joins (an id may hold ":", "@", ".");
    # one that ended (a short lifetime) never shortens the bucket the other still needs
    assert await store.commit([shipment("s:2@x.y", tracking_number="1Z9", ttl_s=60)], NOW_ISO) == []
    assert sorted(await redis.hkeys(key)) == [f"{field}s1".encode(), f"{field}s:2@x.y".encode()]
    assert STATE_TTL_S - 60 < await redis.ttl(key) <= STATE_TTL_S
    assert await store.shipments_tracked_as("acme", "1Z9") == ["s1", "s:2@x.y"]
    # a shipment committed again is listed once; a conflicting commit writes nothing, its
    # index entry neither; no number, no bucket; another merchant's number is its own
    assert await store.commit([shipment("s1", 1, tracking_number="1Z9")], NOW_ISO) == []
    assert await store.commit([shipment("s3", 5, tracking_number="1Z9")], NOW_ISO) == [0]
    assert await store.commit([shipment("s4")], NOW_ISO) == []
    assert await redis.hlen(key) == 2
    assert await store.shipments_tracked_as("acme", "1Z9") == ["s1", "s:2@x.y"]
    assert await store.shipments_tracked_as("globex", "1Z9") == []
    assert await store.shipments_tracked_as("acme", "1Z99") == []
    assert await redis.keys("ntf:tkb:*") == [key.encode()]
    assert await redis.keys("ntf:trk:*") == []


@pytest.mark.usefixtures("mid_week")
async def test_a_tracking_number_is_found_in_any_case_and_spacing(store: Store) -> None:
    """The backend may post a number as a label prints it ("1z 999 aa1"); the editor's
    search found it only as posted (a black-box run as a merchant). It is indexed with
    its spaces out and in capitals, and an entry of a version before, indexed as written,
    is still found by the number as written."""
    assert await store.commit([shipment("s1", tracking_number="1z 999 aa1")], NOW_ISO) == []
    for typed in ("1Z999AA1", "1z999aa1", "1Z 999 AA1", " 1z999 AA1 ", "1Z-999-AA1"):
        assert await store.shipments_tracked_as("acme", typed) == ["s1"], typed
    assert await store.shipments_tracked_as("acme", "1Z999AA") == []
    # an entry written before (the number hashed as written)
    bucket, field = keys.tracking_slot("acme", "1z 888", as_written=True)
    key = keys.tracking_bucket_key(keys.tracking_week(time.time()), bucket)
    await store.redis.hset(key, f"{field}old", "")
    assert await store.shipments_tracked_as("acme", "1z 888") == ["old"]


@pytest.mark.usefixtures("mid_week")
async def test_shipments_with_long_ids_keep_a_tracking_bucket_small(store: Store) -> None:
    """One field a shipment, its value empty: ids as long as UUIDs, many to one number,
    keep the bucket a small hash (a value over 64 bytes would make it a big one)."""
    ids = [f"{i:08x}-6c1e-4b7a-9f0e-1c2d3e4f5a6b" for i in range(6)]
    for shipment_id in ids:
        assert await store.commit([shipment(shipment_id, tracking_number="1Z2")], NOW_ISO) == []
    key, _ = _tracking_bucket("1Z2")
    assert await store.redis.object("encoding", key) == b"listpack"
    assert await store.shipments_tracked_as("acme", "1Z2") == ids
    # an id longer than a small hash's field: the bucket grows big, and still answers
    longest = "x" * 128
    assert await store.commit([shipment(longest, tracking_number="1Z2")], NOW_ISO) == []
    assert await store.shipments_tracked_as("acme", "1Z2") == [*ids, longest]


async def test_a_tracking_number_goes_to_the_week_of_redis_clock_not_the_workers(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    from types import SimpleNamespace

    from notifier.store import base

    fake = SimpleNamespace(time=lambda: time.time() - 30 * 86400, monotonic=time.monotonic)
    monkeypatch.setattr(base, "time", fake)  # a worker whose clock is a month behind
    before = keys.tracking_week(int((await store.redis.time())[0]))
    assert await store.commit([shipment("s1", tracking_number="1Z3")], NOW_ISO) == []
    after = keys.tracking_week(int((await store.redis.time())[0]))
    bucket, field = keys.tracking_slot("acme", "1Z3")
    found = [
        week
        for week in {before, after}
        if await store.redis.hexists(keys.tracking_bucket_key(week, bucket), f"{field}s1")
    ]
    assert len(found) == 1  # the week Redis's clock named (this one, or the next if it just began)
    assert await store.shipments_tracked_as("acme", "1Z3") == ["s1"]


@pytest.mark.usefixtures("mid_week")
async def test_a_tracking_bucket_lives_as_long_as_its_longest_lived_record(store: Store) -> None:
    assert await store.commit([shipment("s1", tracking_number="1Z7", ttl_s=60)], NOW_ISO) == []
    [key] = await store.redis.keys("ntf:tkb:*")
    assert 0 < await store.redis.ttl(key) <= 60
    assert await store.commit([shipment("s2", tracking_number="1Z7")], NOW_ISO) == []
    assert STATE_TTL_S - 60 < await store.redis.ttl(key) <= STATE_TTL_S


@pytest.mark.usefixtures("mid_week")
async def test_a_lookup_shows_at_most_fifty_shipments_of_a_number(store: Store) -> None:
    most = keys.TRACKING_SHIPMENTS
    for i in range(most + 2):
        commit = shipment(f"s{i:02d}", tracking_number="1Z6")
        assert await store.commit([commit], NOW_ISO) == []
    key, _ = _tracking_bucket("1Z6")
    assert await store.redis.hlen(key) == most + 2  # every one recorded
    assert await store.shipments_tracked_as("acme", "1Z6") == [f"s{i:02d}" for i in range(most)]


@pytest.mark.usefixtures("mid_week")
async def test_a_lookup_reads_every_week_a_record_could_still_live_through(store: Store) -> None:
    redis = store.redis
    for back, shipment_id in [(1, "last-week"), (2, "lifetime-ago"), (4, "long-gone")]:
        key, field = _tracking_bucket("1Z5", back)
        await redis.hset(key, f"{field}{shipment_id}", "")
    # a record lives a week at most here (STATE_TTL_S): last week's and the one before
    # (clocks that disagree) are read, not older ones
    assert await store.shipments_tracked_as("acme", "1Z5") == ["last-week", "lifetime-ago"]
    assert await store.commit([shipment("now", tracking_number="1Z5")], NOW_ISO) == []
    assert await store.shipments_tracked_as("acme", "1Z5") == ["last-week", "lifetime-ago", "now"]
    # the same shipment in two weeks is listed once; another number's fields in the same
    # bucket are not its
    key, field = _tracking_bucket("1Z5", 1)
    await redis.hset(key, mapping={f"{field}now": "", f"X{field[1:]}other": ""})
    assert await store.shipments_tracked_as("acme", "1Z5") == ["last-week", "lifetime-ago", "now"]


async def test_a_tracking_number_indexed_in_a_key_of_its_own_before_buckets_still_finds(
    store: Store,
) -> None:
    redis = store.redis
    old_hash, old_set = keys.tracking_key("acme", "1Z8"), keys.tracking_key("acme", "1Z4")
    await redis.hset(old_hash, mapping={"old": "", "both": ""})  # from records to buckets
    await redis.sadd(old_set, "older")  # before records
    assert await store.shipments_tracked_as("acme", "1Z8") == ["both", "old"]
    assert await store.shipments_tracked_as("acme", "1Z4") == ["older"]
    for shipment_id, number in [("s1", "1Z8"), ("both", "1Z8"), ("s2", "1Z4")]:
        assert await store.commit([shipment(shipment_id, tracking_number=number)], NOW_ISO) == []
    assert await store.shipments_tracked_as("acme", "1Z8") == ["both", "old", "s1"]
    assert await store.shipments_tracked_as("acme", "1Z4") == ["older", "s2"]
    # the old keys are read until they expire, never written again
    assert await redis.hgetall(old_hash) == {b"old": b"", b"both": b""}
    assert await redis.smembers(old_set) == {b"older"}


# -- the client ----------------------------------------------------------------------------


async def test_commands_are_packed_in_c_byte_for_byte_as_redis_py_would(redis_url: str) -> None:
    from redis.asyncio.connection import Connection, UnixDomainSocketConnection
    from redis.exceptions import DataError

    from notifier.resources import connect_queue, packed_in_c
    from notifier.settings import Settings

    commands: list[tuple[Any, ...]] = [
        ("EVALSHA", "ab", 2, "k1", "k2", b"\x00\xff\t", 1.5, -3, 10**30, "é✓ 日本"),
        ("SET", "k", memoryview(b"view"), "EX", 60),
        ("SET", b"big", b"x" * 10_000, "y" * 7_000),
        ("CONFIG GET", "maxmemory"),
        (b"CLIENT SETNAME", "n"),
        ("ZADD", "z", 0.1, "m", 1e20, "n"),
    ]
    for kind in (Connection, UnixDomainSocketConnection):
        plain, packed = kind(), packed_in_c(kind)()
        for args in commands:
            want = b"".join(bytes(part) for part in plain.pack_command(*args))
            assert b"".join(packed.pack_command(*args)) == want, args
    # what cannot be sent is refused as redis-py refuses it (a RedisError)
    for bad in (None, True, ["a"], {"a": 1}, bytearray(b"a")):
        with pytest.raises(DataError):
            plain.pack_command("SET", "k", bad)
        with pytest.raises(DataError):
            packed.pack_command("SET", "k", bad)
    # the clients notifier makes use it, and it talks to the real server
    client = connect_queue(Settings(redis_url=redis_url))
    assert client.connection_pool.connection_class.__name__ == "PackedConnection"
    assert await client.echo("é✓") == "é✓".encode()
    assert await client.config_get("maxmemory")
    await client.aclose()


@pytest.mark.parametrize(
    "blob",
    [
        b"1:1-3:abc",  # a negative length: the frame loop went back and forth forever
        b"1:1" + b"99:short",  # a frame longer than what is left
        b"1:1x:abc",  # a length that is no number
    ],
)
def test_a_frame_that_does_not_read_is_refused_in_python(blob: bytes) -> None:
    with pytest.raises(ValueError):
        record.frames(blob)


async def test_a_frame_that_does_not_read_fails_the_script_before_it_writes(
    tmp_path: Path,
) -> None:
    """On a redis-server of its own: a script that looped on a negative frame length could
    not even be killed (it had written), and held the whole server."""
    port = free_port()
    server = start_redis(port, tmp_path)
    redis = ArqRedis(port=port, socket_timeout=5)
    try:
        store = store_on(redis)
        key = store.state_key(*SHIPMENT)
        for damaged in (b"1:10:0:-3:abc", b"1:10:0:5:abc"):  # negative; past the end
            await redis.set(key, damaged)
            with pytest.raises(ResponseError, match="damaged record"):
                await store.record_test(*SHIPMENT, {"test": True})
            assert await redis.get(key) == damaged  # nothing written
        assert await redis.ping()
    finally:
        await redis.aclose()
        server.kill()  # a script that loops holds it: no shutdown would answer
        server.wait(10)


async def forget_consumers_case(store: Store) -> None:
    """Stopped workers' consumers that hold nothing are removed; one holding an entry, the
    caller's own, and any not idle long enough stay; a missing stream is no error."""
    redis, p = store.redis, 1
    await store.ensure_groups()
    stream = store.inbox_key(p)
    for i in range(2):
        await redis.xadd(stream, {"t": f"p{i}"})
    [held] = await store.read_inbox(p, "holder", 1)  # read, never acknowledged: it died
    [done] = await store.read_inbox(p, "stopped", 1)
    await store.ack(p, [done.entry_id])
    await redis.xgroup_createconsumer(stream, keys.GROUP, "me")

    async def names() -> set[str]:
        consumers = await redis.xinfo_consumers(stream, keys.GROUP)
        return {
            c["name"].decode() if isinstance(c["name"], bytes) else c["name"] for c in consumers
        }

    assert await names() == {"holder", "stopped", "me"}
    assert await store.forget_consumers(p, 3_600_000, "me") == 0  # none idle for an hour
    assert await store.forget_consumers(p, 0, "me") == 1
    assert await names() == {"holder", "me"}
    # the entry "holder" holds is still pending, so another worker can take it over
    [taken] = await store.claim_stale(p, "me", 0, 10)
    assert taken.entry_id == held.entry_id
    assert await store.forget_consumers(p, 0, "other") == 1  # "holder": it holds nothing now
    assert await names() == {"me"}  # holding the entry taken over
    await redis.delete(stream)
    assert await store.forget_consumers(p, 0, "me") == 0


async def test_forget_consumers_removes_only_idle_ones_that_hold_nothing(store: Store) -> None:
    await forget_consumers_case(store)


async def test_a_fallback_is_noted_only_on_a_ledger_entry_that_exists(store: Store) -> None:
    """``note_fallback.lua``: never creates an entry (it would have no expiry)."""
    name = keys.notification_key("n_sms", "")
    assert not await store.note_fallback("n_sms", "n_email", None)
    assert await store.redis.exists(name) == 0 and await store.fallback_of("n_sms", None) == ""
    await store.redis.hset(name, mapping={"st": "failed"})
    await store.redis.pexpire(name, 60_000)
    assert await store.note_fallback("n_sms", "n_email", None)
    assert await store.fallback_of("n_sms", None) == "n_email"
    assert 0 < await store.redis.pttl(name) <= 60_000
