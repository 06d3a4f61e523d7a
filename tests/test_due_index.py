"""The due index in buckets (``lua/lib/due.lua``, ``keys.due_bucket_key``), on the real
redis-server: every waiting message is found when its time comes, its bucket's place in the
buckets' index follows the bucket's earliest, nothing is left behind once they are settled,
the index from before 0.6 is still drained, and a waiting message costs a compact entry, not
one of Redis's larger sorted-set entries."""

from __future__ import annotations

import math
import zlib
from collections.abc import AsyncIterator
from itertools import count

import pytest
from arq.connections import ArqRedis
from redis.crc import key_slot

from notifier.store import Store, keys
from tests.test_store_scripts import (
    NOW_ISO,
    NOW_MS,
    deferred,
    due_index,
    ledger_entries,
    shipment,
    store_on,
)


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[Store]:
    redis = ArqRedis.from_url(redis_url)
    yield store_on(redis)
    await redis.aclose()


def same_bucket(n: int) -> list[str]:
    """``n`` notification ids that share one due bucket."""
    first = zlib.crc32(b"n0") % keys.DUE_BUCKETS
    found = (f"n{i}" for i in count() if zlib.crc32(f"n{i}".encode()) % keys.DUE_BUCKETS == first)
    return [next(found) for _ in range(n)]


async def buckets_index(store: Store) -> dict[str, int]:
    rows = await store.redis.zrange(keys.due_buckets_key(), 0, -1, withscores=True)
    return {name.decode(): int(score) for name, score in rows}


async def test_a_bucket_is_indexed_by_its_earliest_and_leaves_with_its_last(store: Store) -> None:
    a, b, c = same_bucket(3)
    bucket = keys.due_bucket_key(a)
    await ledger_entries(
        store, deferred(b, NOW_MS + 20), deferred(a, NOW_MS + 10), deferred(c, NOW_MS + 30)
    )
    assert await buckets_index(store) == {bucket: NOW_MS + 10}
    assert await store.redis.zrange(bucket, 0, -1) == [a.encode(), b.encode(), c.encode()]

    # the earliest settled: the bucket is indexed by the next
    await store.unschedule([a], NOW_MS + 10)
    assert await buckets_index(store) == {bucket: NOW_MS + 20}
    # one not due yet stays where it is (rescheduled past now meanwhile)
    await store.unschedule([c], NOW_MS + 20)
    assert await due_index(store) == {b: NOW_MS + 20, c: NOW_MS + 30}
    # a retry later than the rest moves the bucket's place to what is now its earliest
    await store.claim([b], NOW_MS + 20, 60_000, due=True, owner="w")
    await store.reschedule(b, NOW_MS + 99, "provider hiccup", owner="w")
    assert await buckets_index(store) == {bucket: NOW_MS + 30}
    await store.unschedule([b, c], NOW_MS + 99)
    assert await store.redis.keys("ntf:due*") == []  # neither bucket nor index left


async def test_every_waiting_message_is_found_in_batches_earliest_first(store: Store) -> None:
    waiting = {f"n_{i:04d}": NOW_MS + (i * 7919) % 1000 for i in range(1500)}
    for at in range(0, 1500, 300):
        batch = list(waiting.items())[at : at + 300]
        commit = shipment(f"s{at}", notifications=[deferred(nid, ms) for nid, ms in batch])
        assert await store.commit([commit], NOW_ISO) == []
    assert len(await buckets_index(store)) > 500  # spread over the buckets
    assert await store.due_count() == 1500

    # nothing before its time; then, the way the due sweep reads, every one exactly once
    assert await store.due(NOW_MS - 1, 500) == []
    seen: list[str] = []
    while ids := await store.due(NOW_MS + 499, 200):
        assert len(ids) <= 200
        order = [waiting[i] for i in ids]
        assert order == sorted(order)  # a batch is earliest first
        seen += ids
        await store.unschedule(ids, NOW_MS + 499)
    assert sorted(seen) == sorted(nid for nid, ms in waiting.items() if ms <= NOW_MS + 499)
    # what is left is what is not due yet
    assert all(ms >= NOW_MS + 500 for ms in dict(await store.due_entries(math.inf)).values())
    assert await store.due_count() == 1500 - len(seen)


async def test_the_index_from_before_buckets_is_still_read_and_drained(store: Store) -> None:
    await ledger_entries(store, deferred("new", NOW_MS + 5))
    # written by 0.5: the id and its due ms on one sorted set, its ledger hash as ever
    await store.redis.hset(
        keys.notification_key("old"), mapping={"st": "deferred", "due": NOW_MS + 1, "p": b"x"}
    )
    await store.redis.zadd(keys.DUE_KEY, {"old": NOW_MS + 1, "older": NOW_MS})
    assert await store.due_count() == 3
    assert await store.due(NOW_MS + 5, 10) == ["older", "old", "new"]
    assert await store.due(NOW_MS + 5, 2) == ["older", "old"]

    # a retry of an old one moves it to its bucket
    await store.claim(["old"], NOW_MS + 1, 60_000, due=True, owner="w")
    await store.reschedule("old", NOW_MS + 50, "timeout", owner="w")
    assert await due_index(store) == {"older": NOW_MS, "new": NOW_MS + 5, "old": NOW_MS + 50}
    assert await store.redis.zrange(keys.DUE_KEY, 0, -1) == [b"older"]
    await store.unschedule(["older", "new", "old"], NOW_MS + 50)
    assert await store.redis.keys("ntf:due*") == []


async def test_a_waiting_message_costs_a_compact_entry(store: Store) -> None:
    """20,000 messages waiting: the buckets and their index against one sorted set of the
    same ids (what the due index was before 0.6), by Redis's own MEMORY USAGE."""
    n = 20_000
    waiting = [(f"n_{i:032x}", NOW_MS + 3_600_000 + i % 97) for i in range(n)]
    for at in range(0, n, 500):
        commits = [
            shipment(f"s{at + j}", notifications=[deferred(nid, ms)])
            for j, (nid, ms) in enumerate(waiting[at : at + 500])
        ]
        assert await store.commit(commits, NOW_ISO) == []
    redis = store.redis
    bucketed = 0
    for name in await redis.keys("ntf:due*"):
        bucketed += await redis.memory_usage(name, samples=0)
        if name != keys.due_buckets_key().encode():
            assert await redis.object("encoding", name) == b"listpack"
    await redis.zadd("one-set", dict(waiting))
    assert await redis.object("encoding", "one-set") == b"skiplist"
    one_set = await redis.memory_usage("one-set", samples=0)
    assert one_set / n > 130, one_set / n
    # about 35 B an id in its bucket (17 B of it the id) and 12 B for the buckets' own
    # keys and index
    assert bucketed / n < 55, bucketed / n
    assert bucketed < one_set / 2


def test_a_bucket_lives_in_its_partitions_slot() -> None:
    tag = keys.tag(3, 8)
    slot = key_slot(keys.notification_key("n_x", tag).encode())
    for nid in ("n_x", "n_y", "n_" + "f" * 32):
        assert key_slot(keys.due_bucket_key(nid, tag).encode()) == slot
    assert key_slot(keys.due_buckets_key(tag).encode()) == slot
    assert key_slot(keys.due_key(tag).encode()) == slot
    # on one Redis, the names carry no tag
    assert keys.due_bucket_key("n_x") == f"ntf:due:{zlib.crc32(b'n_x') % 1024}"
    assert keys.due_buckets_key() == "ntf:due:buckets"


async def test_an_id_the_service_made_is_kept_in_17_bytes_and_read_back(store: Store) -> None:
    made = "n_" + "0123456789abcdef" * 2
    other = ["n_" + "0123456789ABCDEF" * 2, "n_" + "0" * 31, "fallback-1", "n_" + "g" * 32]
    await ledger_entries(store, deferred(made, NOW_MS), *(deferred(o, NOW_MS) for o in other))
    [member] = await store.redis.zrange(keys.due_bucket_key(made), 0, -1)
    assert member == b"\xff" + bytes.fromhex(made[2:]) == keys.due_member(made)
    for nid in other:  # as it is: not what the service makes
        assert await store.redis.zscore(keys.due_bucket_key(nid), nid) == NOW_MS
        assert keys.due_id(keys.due_member(nid)) == nid
    assert sorted(await store.due(NOW_MS, 10)) == sorted([made, *other])
    await store.unschedule([made, *other], NOW_MS)
    assert await store.redis.keys("ntf:due*") == []


async def test_the_index_from_before_never_hides_an_earlier_bucket_nor_gives_an_id_twice(
    store: Store,
) -> None:
    await ledger_entries(store, deferred("z", NOW_MS + 5), deferred("d", NOW_MS + 7))
    # left by 0.5: more than a batch due, later than one in a bucket; and "d" on both (a
    # crash between settling and unscheduling it, then a replay into its bucket)
    await store.redis.zadd(keys.DUE_KEY, {"x": NOW_MS + 10, "y": NOW_MS + 30, "d": NOW_MS + 6})
    assert await store.due(NOW_MS + 30, 2) == ["z", "d"]
    assert await store.due(NOW_MS + 30, 3) == ["z", "d", "x"]
    assert await store.due_entries(math.inf) == [
        ("z", NOW_MS + 5),
        ("d", NOW_MS + 6),
        ("x", NOW_MS + 10),
        ("y", NOW_MS + 30),
    ]
    await store.unschedule(["z", "d", "x", "y"], NOW_MS + 30)
    assert await store.redis.keys("ntf:due*") == []


async def test_a_waiting_message_overtaken_leaves_its_bucket_and_the_index(store: Store) -> None:
    a, b = same_bucket(2)
    await ledger_entries(store, deferred(a, NOW_MS + 10), deferred(b, NOW_MS + 20))
    overtaken = [(a, ("acme", "s-ledger"), "superseded by delivered")]
    assert await store.cancel_overtaken(overtaken, NOW_MS) == [a]
    assert await buckets_index(store) == {keys.due_bucket_key(a): NOW_MS + 20}
    overtaken = [(b, ("acme", "s-ledger"), "superseded by delivered")]
    assert await store.cancel_overtaken(overtaken, NOW_MS) == [b]
    assert await store.redis.keys("ntf:due*") == []
