"""Group commit: concurrent ingests share script calls, and each caller gets its own answers."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from fakeredis import FakeServer
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from notifier.models import Transition
from notifier.pipeline import inject
from notifier.resources import open_resources
from notifier.settings import Settings
from notifier.store import (
    Admission,
    IngestItem,
    NotReplicated,
    PartlyStored,
    Store,
    body_digest,
)
from notifier.store.inbox import _moment
from tests.conftest import make_settings, transition


def _item(event_id: str, shipment: str = "shp_1", merchant: str = "acme") -> IngestItem:
    body = {"event_id": event_id}
    return (merchant, shipment, event_id, orjson.dumps(body), body_digest(body), "req-1")


def _count_calls(store: Store, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the script calls ``store`` makes from now on."""
    calls: list[int] = []
    real = store._ingest_now

    async def counted(items: Any) -> tuple[list[bool], list[int]]:
        calls.append(len(items))
        return await real(items)

    monkeypatch.setattr(store, "_ingest_now", counted)
    return calls


A, D = Admission.ACCEPTED, Admission.DUPLICATE


async def test_concurrent_callers_each_get_their_own_answers(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_resources(settings) as res:
        store = res.store
        calls = _count_calls(store, monkeypatch)
        # 50 callers at once; caller i posts e{i} and e{i+1}, so neighbours collide
        answers = await asyncio.gather(
            *(
                store.ingest([_item(f"e{i}", f"s{i}"), _item(f"e{i + 1}", f"s{i}")])
                for i in range(50)
            )
        )
        # every event id accepted exactly once, in arrival order, and the others duplicates
        assert answers[0][0] == [A, A]
        assert all(accepted == [D, A] for accepted, _ in answers[1:])
        # they all queued before the first call went out: one script call for all of them
        assert calls == [100]
        # a caller arriving while a call is in flight waits for the next one
        calls.clear()
        first = asyncio.ensure_future(store.ingest([_item("x1")]))
        await asyncio.sleep(0)  # the group task has taken x1 and is awaiting Redis
        await asyncio.gather(first, store.ingest([_item("x2")]), store.ingest([_item("x3")]))
        assert calls == [1, 2]
        woken = [p for _, parts in answers for p in parts]
        assert len(woken) == len(set(woken)), "each partition is handed out once"
        assert set(woken) == {store.partition_of("acme", f"s{i}") for i in range(50)}
        assert (
            await store.redis.xlen(store.inbox_key(0))
            + sum([await store.redis.xlen(store.inbox_key(p)) for p in range(1, store.partitions)])
            == 54
        )


async def test_a_failed_group_fails_every_caller_in_it_and_the_next_group_runs(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_resources(settings) as res:
        store = res.store
        real = store._ingest_now
        failures = [RedisError("down")]

        async def flaky(items: Any) -> tuple[list[bool], list[int]]:
            if failures:
                await asyncio.sleep(0)
                raise failures.pop()
            return await real(items)

        monkeypatch.setattr(store, "_ingest_now", flaky)
        first = asyncio.ensure_future(store.ingest([_item("a")]))
        await asyncio.sleep(0)
        results = await asyncio.gather(first, store.ingest([_item("b")]), return_exceptions=True)
        assert isinstance(results[0], RedisError)
        assert results[1] == ([A], [store.partition_of("acme", "shp_1")])
        # nothing of the failed group was stored: posting it again is accepted, not a duplicate
        assert (await store.ingest([_item("a")]))[0] == [A]


async def test_a_group_stays_under_the_size_limit(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Store, "INGEST_GROUP_MAX", 10)
    async with open_resources(settings) as res:
        store = res.store
        calls = _count_calls(store, monkeypatch)
        answers = await asyncio.gather(
            *(store.ingest([_item(f"e{i}-{j}") for j in range(4)]) for i in range(6))
        )
        assert all(accepted == [A] * 4 for accepted, _ in answers)
        # whole callers only, as many as fit in 10 events
        assert calls == [8, 8, 8]


async def test_event_ids_are_remembered_in_buckets_for_at_least_the_ttl(
    settings: Settings,
) -> None:
    settings = settings.model_copy(update={"idempotency_ttl_s": 3600})
    async with open_resources(settings) as res:
        store, r = res.store, res.redis
        assert (await store.ingest([_item("e1")]))[0] == [A]
        assert (await store.ingest([_item("e1"), _item("e2")]))[0] == [D, A]
        # another merchant's e1 is another event
        assert (await store.ingest([_item("e1", merchant="globex")]))[0] == [A]

        # generations follow Redis's clock, whatever the API process's clock says
        generation = int((await r.time())[0]) // 3600
        bucket, field = store.event_binary_slot("acme", "e1")
        key = store.event_bucket_key(generation, bucket)
        assert await r.hexists(key, field) and len(field) == 8
        # the bucket lives through this generation and the next, then goes
        assert await r.expiretime(key) == (generation + 2) * 3600
        # a small hash: a field costs a few bytes, not a key
        assert await r.object("encoding", key) == b"listpack"

        # an id recorded in the previous generation is still known, two back it is not
        b_old, f_old = store.event_slot("acme", "old")
        await r.hset(store.event_bucket_key(generation - 1, b_old), f_old, "")
        b_older, f_older = store.event_slot("acme", "older")
        await r.hset(store.event_bucket_key(generation - 2, b_older), f_older, "")
        assert (await store.ingest([_item("old"), _item("older")]))[0] == [D, A]

        # a digest an earlier version recorded in base64, of a body as posted (with a Z,
        # not in the canonical form): that body again is a duplicate, another a conflict
        z = transition(event_id="b64", occurred_at="2026-11-21T08:30:00Z")
        _, earlier = body_digest(z).split()
        b_64, f_64 = store.event_slot("acme", "b64")
        await r.hset(store.event_bucket_key(generation - 1, b_64), f_64, earlier)
        again = ("acme", "shp_1", "b64", orjson.dumps(z), body_digest(z), "")
        other = {**z, "status": "delivered"}
        changed = ("acme", "shp_1", "b64", orjson.dumps(other), body_digest(other), "")
        assert (await store.ingest([again, changed]))[0] == [D, Admission.CONFLICT]

        # an event id notifier 0.4 recorded as a key of its own is still a duplicate ...
        await r.set(store.legacy_event_key("acme", "v04"), "1", ex=60)
        assert (await store.ingest([_item("v04"), _item("new")]))[0] == [D, A]
        # ... and such a key, whatever its merchant and event ids, is never taken for a
        # bucket (merchant "<generation>", event "<bucket>" once read as one)
        b_e3, _ = store.event_slot("acme", "e3")
        await r.set(store.legacy_event_key(str(generation), str(b_e3)), "1", ex=60)
        assert (await store.ingest([_item("e3")]))[0] == [A]
        assert (await store.ingest([_item(str(b_e3), "s", merchant=str(generation))]))[0] == [D]

        # only accepted events reached the inbox
        lengths = [await r.xlen(store.inbox_key(p)) for p in range(store.partitions)]
        assert sum(lengths) == 6  # e1, e2, globex e1, older, new, e3


@pytest.mark.parametrize("store_kind", ["redis", "embedded"])
async def test_payloads_reach_the_inbox_byte_for_byte(
    store_kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """The group travels to Redis as one JSON argument; what comes out is what went in,
    on redis-server and on the embedded store alike."""
    odd = [
        '{"name": "Zoë \\"Z\\" O\'Brien \\\\ \\u2028", "city": "Łódź"}',
        '{"city": "القاهرة", "note": "📦 tab\\there\\nnewline\\u0000nul"}',
        '{"empty": "", "slash": "a/b\\/c"}',
    ]
    if store_kind == "redis":
        settings, server = request.getfixturevalue("settings"), None
    else:
        settings, server = make_settings(tmp_path, redis_url=None), FakeServer()
    async with open_resources(settings, server=server) as res:
        store = res.store
        await res.redis.flushdb()  # (the autouse flush only sees fixtures named up front)
        await store.ensure_groups()
        items = [
            ("acme", "shp_1", f"u{i}", p.encode(), body_digest(orjson.loads(p)), f"req-{i}")
            for i, p in enumerate(odd)
        ]
        assert (await store.ingest(items))[0] == [A, A, A]
        assert (await store.ingest(items[:1]))[0] == [D]
        partition = store.partition_of("acme", "shp_1")
        entries = await store.read_inbox(partition, "c1", 10)
        assert [e.payload for e in entries] == [p.encode() for p in odd]
        assert [e.request_id for e in entries] == ["req-0", "req-1", "req-2"]


async def test_ingest_follows_redis_clock_when_the_api_clock_is_a_year_off(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The API names the event-id buckets a script call may touch (a cluster needs them in
    KEYS), from its own clock and the offset to Redis's, which it measures; the script
    writes the generation Redis's clock names. A clock far off, or one that jumps, still
    gets the right buckets: the offset is measured again when the script refuses."""
    import time as real

    from notifier.store import base

    skew = [365 * 86400.0]
    fake = SimpleNamespace(time=lambda: real.time() + skew[0], monotonic=real.monotonic)
    monkeypatch.setattr(base, "time", fake)
    settings = settings.model_copy(update={"idempotency_ttl_s": 3600})
    async with open_resources(settings) as res:
        store, r = res.store, res.redis
        assert (await store.ingest([_item("e1")]))[0] == [A]
        assert (await store.ingest([_item("e1")]))[0] == [D]
        generation = int((await r.time())[0]) // 3600  # Redis's, not the API's
        bucket, field = store.event_binary_slot("acme", "e1")
        assert await r.hexists(store.event_bucket_key(generation, bucket), field)
        # the API's clock jumps two days back after the offset was measured: the first
        # call is refused (nothing written), the offset measured again, the call repeated
        skew[0] -= 2 * 86400
        assert (await store.ingest([_item("e2"), _item("e1")]))[0] == [A, D]
        b2, f2 = store.event_binary_slot("acme", "e2")
        assert await r.hexists(store.event_bucket_key(generation, b2), f2)


@pytest.mark.parametrize("stored_in_part", [True, False])
async def test_what_the_worker_injects_wakes_the_partitions_stored_when_ingest_fails(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, stored_in_part: bool
) -> None:
    """A stall or a predicted delay goes through ingest as the backend's transitions do;
    when ingest fails after some of its calls stored their events (another partition's
    master went away, or too few replicas confirmed), those partitions' drains are
    enqueued all the same, and the failure goes on up (the sweep tries again)."""
    async with open_resources(settings) as res:
        failure = (
            PartlyStored(RedisConnectionError("gone"), [3, 5])
            if stored_in_part
            else NotReplicated(0, 1, 100, [3, 5])
        )

        async def fails(items: Any) -> Any:
            raise failure

        monkeypatch.setattr(res.store, "ingest", fails)
        stall = Transition.model_validate(transition(event_id="stall-1"))
        with pytest.raises(type(failure)):
            await inject(res, [stall], "stall-check")
        jobs = await res.queue.queued_jobs()
        assert sorted(j.args[0] for j in jobs if j.function == "drain") == [3, 5]
        assert failure.woken == []  # woken once


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    st.datetimes(
        min_value=datetime(1970, 1, 1),
        max_value=datetime(2100, 1, 1),
        timezones=st.builds(
            lambda minutes: timezone(timedelta(minutes=minutes)),
            st.integers(-14 * 60, 14 * 60),
        ),
    )
)
def test_a_moment_written_any_way_reads_as_isoformat_writes_it(moment: datetime) -> None:
    """``canonical_body``'s dates and times: the form isoformat writes is kept as it is
    (its quick path), and the other ways of writing the same moment at the same offset
    come back in that form; the instant at another offset does not."""
    canonical = moment.isoformat()
    assert _moment(canonical) == canonical
    offset = canonical[-6:]
    variants = [canonical.replace("T", " "), canonical[:-6] + offset.replace(":", "")]
    if offset == "+00:00":
        variants += [canonical[:-6] + "Z", canonical[:-6] + "-00:00", canonical[:-6] + "z"]
    if moment.microsecond == 0:
        variants.append(canonical[:-6] + ".000" + offset)
    else:
        variants.append(canonical[:-6].rstrip("0") + offset)  # fewer fraction digits
    for variant in variants:
        assert _moment(variant) == canonical, variant
    if moment.utcoffset() != timedelta(0):
        elsewhere = moment.astimezone(UTC).isoformat()
        assert _moment(elsewhere) == elsewhere != canonical
