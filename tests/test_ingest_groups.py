"""Group commit: concurrent ingests share script calls, and each caller gets its own answers."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.exceptions import RedisError

from notifier.resources import open_resources
from notifier.settings import Settings
from notifier.store import Store


def _item(event_id: str, shipment: str = "shp_1") -> tuple[str, str, str, bytes]:
    return ("acme", shipment, event_id, f'{{"event_id": "{event_id}"}}'.encode())


def _count_calls(store: Store, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the script calls ``store`` makes from now on."""
    calls: list[int] = []
    real = store._ingest_now

    async def counted(items: Any) -> tuple[list[bool], list[int]]:
        calls.append(len(items))
        return await real(items)

    monkeypatch.setattr(store, "_ingest_now", counted)
    return calls


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
        assert answers[0][0] == [True, True]
        assert all(accepted == [False, True] for accepted, _ in answers[1:])
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
        assert results[1] == ([True], [store.partition_of("acme", "shp_1")])
        # nothing of the failed group was stored: posting it again is accepted, not a duplicate
        assert (await store.ingest([_item("a")]))[0] == [True]


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
        assert all(accepted == [True] * 4 for accepted, _ in answers)
        # whole callers only, as many as fit in 10 events
        assert calls == [8, 8, 8]
