"""Failure paths: crashed workers, poison entries, broken templates, odd addresses — nothing lost,
nothing sent twice, one bad item never sinks the rest."""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import math
import re
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from redis.exceptions import ConnectionError, ResponseError

from notifier import delivery
from notifier.app import create_app
from notifier.channels import Receipt
from notifier.channels.base import lease_clock
from notifier.delivery import LEASE_MS, Deliverer
from notifier.errors import TemporaryDeliveryError
from notifier.models import ChannelKind, notification_id_of
from notifier.pipeline import Pipeline
from notifier.resources import Resources, data_dir, open_resources
from notifier.settings import Settings
from notifier.store import GROUP, Claim, ClaimResult, InboxEntry, keys, record
from notifier.store.base import data_error
from notifier.worker import MAX_DELIVERIES, _process, release_due
from tests.conftest import (
    NOW,
    auth,
    fixed_clock,
    history,
    make_settings,
    outbox_files,
    post,
    read_whole_inbox,
    run_worker,
    transition,
)
from tests.fakes import Crash, CrashingChannel, FailingChannel

Client = TestClient[Any, Any]


async def age_inbox(res: Resources, idle_ms: int) -> None:
    """Pretend every pending inbox entry has been idle for ``idle_ms`` (as time would)."""
    for p in range(res.settings.partitions):
        key = res.store.inbox_key(p)
        for row in await res.redis.xpending_range(key, GROUP, min="-", max="+", count=100):
            await res.redis.xclaim(
                key, GROUP, row["consumer"], 0, [row["message_id"]], idle=idle_ms
            )


async def expire_leases(res: Resources) -> None:
    # on the workers' (fixed) clock, past any lease a delivery round takes
    past = int(NOW.timestamp() * 1000) - LEASE_MS - 3_600_000
    for key in await res.redis.keys("ntf:msg:*"):
        await res.redis.hset(key, "claimed", str(past))


async def pending_entries(res: Resources) -> int:
    total = 0
    for p in range(res.settings.partitions):
        total += int((await res.redis.xpending(res.store.inbox_key(p), GROUP))["pending"])
    return total


async def die_mid_send(res: Resources, channels: Any = None) -> None:
    """A worker reads every inbox entry, commits, claims its messages, and dies sending
    (or, with ``channels``, sends through those and lives)."""
    entries = await read_whole_inbox(res, "dead-worker")
    crashing = CrashingChannel()
    before = res.channels
    res.channels = channels or {ChannelKind.EMAIL: crashing, ChannelKind.SMS: crashing}
    with contextlib.suppress(Crash):
        await Pipeline(res).process(entries)
    res.channels = before


async def test_entry_with_a_live_claim_elsewhere_is_not_acknowledged(
    client: Client, settings: Settings
) -> None:
    await post(client, transition())
    async with open_resources(settings, clock=fixed_clock()) as res:
        await die_mid_send(res)

        # the entry is re-claimed (idle past claim_idle_s) while the dead claim's lease runs
        await age_inbox(res, int(settings.claim_idle_s * 1000) + 1000)
        await run_worker(settings)
        assert outbox_files(settings) == []
        assert await pending_entries(res) == 1, "acknowledged with its messages unsent"

        # later: the lease has run out and the entry is due again
        await expire_leases(res)
        await age_inbox(res, int(settings.claim_idle_s * 1000) + 1000)
        await run_worker(settings)
        assert len(outbox_files(settings)) == 2
        assert await pending_entries(res) == 0
        assert [d["delivery"]["status"] for d in await history(client)] == ["sent"] * 2


async def test_a_writer_that_died_mid_file_leaves_no_temporary_file(
    client: Client, settings: Settings
) -> None:
    """A worker killed while writing an outbox file leaves its temporary file (``.tmp-<id>-
    <pid>-<thread>``, empty or whole): the worker that takes the message over removes it
    and writes the message once. Before, such files stayed in the shipment's folder for
    good."""
    await post(client, transition())
    async with open_resources(settings, clock=fixed_clock()) as res:
        await die_mid_send(res)
        folder = settings.outbox_dir / "acme" / "shp_123"
        folder.mkdir(parents=True)
        for channel, size in (("email", 0), ("sms", 244)):
            nid = notification_id_of("acme", "shp_123", "evt_1", channel)
            (folder / f".tmp-{nid}-4242-139890557703872").write_bytes(b"x" * size)
        (folder / ".tmp-n_someone_else-1-1").write_bytes(b"")  # not theirs: left alone
        await expire_leases(res)
        await age_inbox(res, int(settings.claim_idle_s * 1000) + 1000)
        await run_worker(settings)
    assert sorted(p.name.split("-", 1)[1] for p in folder.iterdir()) == sorted(
        [
            f"{notification_id_of('acme', 'shp_123', 'evt_1', 'email')}.eml",
            f"{notification_id_of('acme', 'shp_123', 'evt_1', 'sms')}.sms.json",
            "n_someone_else-1-1",
        ]
    )


async def test_an_entry_waiting_for_a_dead_workers_claim_is_taken_over_when_it_ends(
    client: Client, settings: Settings
) -> None:
    """A worker dies holding a message's claim and its inbox entry. The entry is taken
    over once idle for ``claim_idle_s``, finds the claim live still, and waits: it turns
    stale again just after the claim runs out (plus a second), not a whole ``claim_idle_s``
    later (a black-box drill saw a dead worker's messages wait 137 s, two such periods)."""
    await post(client, transition())
    async with open_resources(settings, clock=fixed_clock()) as res:
        await die_mid_send(res)
        await age_inbox(res, int(settings.claim_idle_s * 1000) + 1000)
    lease_ms = LEASE_MS + int(settings.provider_timeout_s * 1000)
    # taken over 2 s before the dead worker's claim runs out: it is live, so it waits
    await run_worker(settings, clock=fixed_clock(NOW + timedelta(milliseconds=lease_ms - 2000)))
    assert outbox_files(settings) == []
    stale_ms = int(settings.claim_idle_s * 1000)
    async with open_resources(settings, clock=fixed_clock()) as res:

        async def stale(after_ms: int) -> bool:
            parts = range(settings.partitions)
            return any([await res.store.needs_drain(p, after_ms) for p in parts])

        assert await pending_entries(res) == 1
        assert not await stale(stale_ms)  # not yet: its idle time was set to 57 s, not 0
        assert await stale(stale_ms - 3500)
        for _ in range(100):  # Redis's own clock: stale about 3 s from now
            if await stale(stale_ms):
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the entry never turned stale")
    await run_worker(settings, clock=fixed_clock(NOW + timedelta(milliseconds=lease_ms + 1500)))
    assert len(outbox_files(settings)) == 2


async def test_an_entry_waiting_for_a_long_lease_is_never_buried(
    client: Client, settings: Settings
) -> None:
    """A claim can outlast MAX_DELIVERIES re-claims of its entry (a slow round renews its
    claims; a worker before 0.7 leased a big round for minutes): waiting for it is no
    failure, so the entry never reaches the dead letters."""
    await post(client, transition())
    async with open_resources(settings, clock=fixed_clock()) as res:
        await die_mid_send(res)
        for _ in range(MAX_DELIVERIES + 2):
            await age_inbox(res, int(settings.claim_idle_s * 1000) + 1000)
            await run_worker(settings)
            assert await pending_entries(res) == 1
        assert (await res.store.dead_letters())["inbox"] == 0
        assert outbox_files(settings) == []

        await expire_leases(res)
        await age_inbox(res, int(settings.claim_idle_s * 1000) + 1000)
        await run_worker(settings)
        assert len(outbox_files(settings)) == 2
        assert await pending_entries(res) == 0


async def test_a_dead_workers_big_round_is_taken_over_once_its_lease_ran_out(
    client: Client, settings: Settings
) -> None:
    """A worker dies sending a round of 80 messages; the next takes them over a lease (60 s
    and one provider timeout) after the claim, whatever the size of either round. Before,
    a claimer waited for a lease that grew with its own round (10 s more per 16 messages):
    here 110 s, and about 9 minutes for a round of 750 (a black-box drill)."""
    await post(client, *(transition(event_id=f"e{i}", shipment_id=f"shp_{i}") for i in range(40)))
    async with open_resources(settings, clock=fixed_clock()) as res:
        await die_mid_send(res)
        assert len(await res.redis.keys("ntf:msg:*")) == 80  # claimed, unsent
        await age_inbox(res, int(settings.claim_idle_s * 1000) + 1000)
    lease_ms = LEASE_MS + int(settings.provider_timeout_s * 1000)
    await run_worker(settings, clock=fixed_clock(NOW + timedelta(milliseconds=lease_ms - 1000)))
    assert outbox_files(settings) == []  # the claims are live
    async with open_resources(settings, clock=fixed_clock()) as res:
        await age_inbox(res, int(settings.claim_idle_s * 1000) + 1000)
    await run_worker(settings, clock=fixed_clock(NOW + timedelta(milliseconds=lease_ms + 1000)))
    assert len(outbox_files(settings)) == 80


class HeldChannel:
    """A slow provider: sends through ``inner`` once ``go`` is set."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.name = inner, inner.name
        self.waiting, self.go = asyncio.Event(), asyncio.Event()

    async def send_many(self, items: Sequence[Any]) -> list[Any]:
        self.waiting.set()
        await self.go.wait()
        return list(await self.inner.send_many(items))


async def test_a_round_slower_than_its_lease_keeps_its_claims(
    client: Client, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The provider takes ten minutes; the round renews its claims meanwhile (every
    ``RENEW_EVERY_S``, shortened here), so another worker's round finds them live and sends
    nothing. The message goes out once, when the provider answers."""
    monkeypatch.setattr(delivery, "RENEW_EVERY_S", 0.02)
    await post(client, transition())
    now = [NOW]
    async with open_resources(settings, clock=lambda: now[0]) as res:
        entries = await read_whole_inbox(res, "slow-worker")
        real = dict(res.channels)
        held = HeldChannel(real[ChannelKind.EMAIL])
        res.channels = {ChannelKind.EMAIL: held, ChannelKind.SMS: held}
        slow = asyncio.create_task(Pipeline(res).process(entries))
        await asyncio.wait_for(held.waiting.wait(), 10)
        res.channels = real  # the other worker's round sends at once
        ids = [notification_id_of("acme", "shp_123", "evt_1", c) for c in ("email", "sms")]
        for _ in range(10):
            now[0] += timedelta(minutes=1)
            renewed = str(int(now[0].timestamp() * 1000)).encode()
            key = keys.notification_key(ids[0])
            await wait_for_value(res, key, "claimed", renewed)
            report = await Deliverer(res).deliver(ids)
            assert sorted(report.busy) == sorted(ids), report
        assert outbox_files(settings) == []
        held.go.set()
        await asyncio.wait_for(slow, 10)
    assert len(outbox_files(settings)) == 2
    assert [d["delivery"]["status"] for d in await history(client)] == ["sent"] * 2


async def wait_for_value(res: Resources, key: str, field: str, value: bytes) -> None:
    """Until a hash field holds ``value`` (a renewal, made by a task of the same loop)."""
    for _ in range(500):
        if await res.redis.hget(key, field) == value:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{key} {field} never became {value!r}")


class CountingProvider:
    """A provider that accepts everything and counts what it was given (unlike the outbox,
    it cannot tell a message it already has)."""

    name = "counting"

    def __init__(self) -> None:
        self.given: Counter[str] = Counter()

    async def send_many(self, items: Sequence[Any]) -> list[Any]:
        for item in items:
            self.given[item.message.notification_id] += 1
        return [Receipt(self.name, f"p-{item.message.notification_id}") for item in items]


async def test_what_a_provider_accepted_before_redis_failed_is_recorded_not_sent_again(
    client: Client, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The provider accepts the first channel's message; Redis fails as the worker records
    it, before the other channel's is sent. The next round records the first as sent, under
    the claim the first round made, and sends only the other. Before, the failed round
    handed every claim back, and the next round sent the first again (a black-box drill:
    SIGKILL of redis-server with AOF, 46 emails and SMS sent twice)."""
    await post(client, transition())
    ids = [notification_id_of("acme", "shp_123", "evt_1", c) for c in ("email", "sms")]
    async with open_resources(settings, clock=fixed_clock()) as res:
        provider = CountingProvider()
        res.channels = {ChannelKind.EMAIL: provider, ChannelKind.SMS: provider}
        pipeline = Pipeline(res)
        mark_sent = res.store.mark_sent
        calls: list[int] = []

        async def failing_once(*args: Any, **kwargs: Any) -> None:
            calls.append(1)
            if len(calls) == 1:
                raise ConnectionError("Redis went away")
            await mark_sent(*args, **kwargs)

        monkeypatch.setattr(res.store, "mark_sent", failing_once)
        with pytest.raises(ConnectionError):
            await pipeline.process(await read_whole_inbox(res, "w1"))
        [first] = provider.given
        report = await pipeline.deliverer.deliver(ids)  # Redis answers again
        assert report.sent == [n for n in ids if n != first] and report.skipped == 1
        assert provider.given == Counter(ids)  # once each
        found = await res.store.deliveries("acme", "shp_123", ids)
        assert [found[n]["status"] for n in ids] == ["sent", "sent"]


async def test_temporary_failure_is_retried_from_the_due_index(
    client: Client, settings: Settings
) -> None:
    await post(client, transition())
    async with open_resources(settings, clock=fixed_clock()) as res:
        flaky = FailingChannel(TemporaryDeliveryError, "provider hiccup", "flaky")
        res.channels = {ChannelKind.EMAIL: flaky, ChannelKind.SMS: flaky}
        await die_mid_send(res, channels=res.channels)
        due = await res.store.due_entries(math.inf)
        assert len(due) == 2 and all(score > NOW.timestamp() * 1000 for _, score in due)
        ledger = await res.store.ledger([d for d, _ in due])
        assert {v["status"] for v in ledger.values()} == {"deferred"}
        assert {v["error"] for v in ledger.values()} == {"provider hiccup"}
    later = NOW + timedelta(hours=1)  # past any first backoff
    async with open_resources(settings, clock=fixed_clock(later)) as res:
        assert await release_due({"res": res, "pipeline": Pipeline(res)}) == 2
    assert len(outbox_files(settings)) == 2


async def test_poison_entry_is_isolated_then_buried(tmp_path: Path, redis_url: str) -> None:
    settings = make_settings(tmp_path, redis_url=redis_url, partitions=1)
    # a corrupted shipment record: every batch that holds one of its events fails
    async with open_resources(settings, clock=fixed_clock()) as res:
        await res.redis.hset(res.store.state_key("broken", "b"), mapping={"v": "1", "s": "\x7f?"})
    async with TestClient(TestServer(create_app(settings))) as client:
        await post(
            client,
            transition(event_id="good1", shipment_id="a"),
            transition(event_id="bad", merchant_id="broken", shipment_id="b"),
            transition(event_id="good2", shipment_id="c"),
        )
        await run_worker(settings)
        # the batch failed on the broken merchant; the others went out regardless
        assert len(outbox_files(settings, ".eml")) == 2
        async with open_resources(settings, clock=fixed_clock()) as res:
            assert await pending_entries(res) == 1
            for _ in range(MAX_DELIVERIES + 1):
                await age_inbox(res, int(settings.claim_idle_s * 1000) + 1000)
                await run_worker(settings)
            assert await pending_entries(res) == 0
            assert await res.redis.xlen(res.store.inbox_key(0)) == 0
            [(_, fields)] = await res.redis.xrange(res.store.DEAD_INBOX_KEY)
            assert b'"event_id":"bad"' in fields[b"t"]  # kept whole, not dropped
        health = await (await client.get("/healthz")).json()
        assert health["dead_letters"] == {"notifications": 0, "inbox": 1}


async def test_a_record_a_script_cannot_read_holds_up_only_its_own_events(
    tmp_path: Path, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A shipment record whose outcome list the commit script cannot read fails the batch
    in Redis (a Lua error), not in Python. It is not a Redis outage: the batch is run one
    entry at a time, the others go out, and its event waits, then is set aside whole. And
    the script stops before it writes anything of the batch: a state saved without the new
    messages' ledger entries would have lost them, and the shipments written before it in
    the batch their analytics counts."""
    settings = make_settings(tmp_path, redis_url=redis_url, partitions=1)
    async with TestClient(TestServer(create_app(settings))) as client:
        await post(client, transition(event_id="first", status="in_transit"))
        await run_worker(settings)
        async with open_resources(settings, clock=fixed_clock()) as res:
            key = res.store.state_key("acme", "shp_123")
            [held] = await res.store.records([("acme", "shp_123")])
            damaged = record.blob(replace(held, outcomes=[b"\x03no chunk", *held.outcomes]))
            await res.redis.set(key, damaged, keepttl=True)
        await post(
            client,
            transition(event_id="good1", shipment_id="a"),
            transition(event_id="bad"),  # shp_123, out for delivery: an email and an SMS
            transition(event_id="good2", shipment_id="c"),
        )
        with caplog.at_level("WARNING", "notifier"):
            await run_worker(settings)
        assert not [r for r in caplog.records if "waiting for it" in r.getMessage()]
        failures = [r for r in caplog.records if r.name == "notifier.worker"]
        assert [r.levelname for r in failures] == ["ERROR", "ERROR"]  # the batch, the entry
        assert {p.parent.name for p in outbox_files(settings)} == {"a", "c", "shp_123"}
        assert len(outbox_files(settings)) == 5  # 2 + 2, and shp_123's first email only
        async with open_resources(settings, clock=fixed_clock()) as res:
            assert await res.redis.get(key) == damaged  # nothing of "bad" was written
            # the batch that failed wrote nothing of the others either: counted once each
            today = fixed_clock()().date()
            [counts] = (await res.store.stats("acme", today, today)).values()
            assert {k: v for k, v in counts.items() if k.endswith("decided")} == {
                "in_transit|email|fr_FR|decided": 1,
                "out_for_delivery|email|fr_FR|decided": 2,
                "out_for_delivery|sms|fr_FR|decided": 2,
            }
            assert await pending_entries(res) == 1
            for _ in range(MAX_DELIVERIES + 1):
                await age_inbox(res, int(settings.claim_idle_s * 1000) + 1000)
                await run_worker(settings)
            assert await pending_entries(res) == 0
            [(_, fields)] = await res.redis.xrange(res.store.DEAD_INBOX_KEY)
            assert b'"event_id":"bad"' in fields[b"t"]  # kept whole, not dropped


async def test_a_message_sent_whose_record_does_not_read_is_recorded_sent_once(
    tmp_path: Path, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The SMS waits for the morning; meanwhile its shipment's record is damaged. At its
    time it goes out, and settling it on the record fails: it is recorded as sent in its
    ledger entry instead. Before, its claim was handed back and every due sweep sent it
    again."""
    settings = make_settings(tmp_path, redis_url=redis_url)
    night = datetime(2026, 11, 21, 22, 0, tzinfo=UTC)  # 23:00 in Paris
    morning = datetime(2026, 11, 22, 7, 0, tzinfo=UTC)
    async with TestClient(TestServer(create_app(settings))) as client:
        await post(client, transition(occurred_at="2026-11-21T22:40:00+01:00"))
    await run_worker(settings, clock=fixed_clock(night))
    assert len(outbox_files(settings, ".sms.json")) == 0
    async with open_resources(settings, clock=fixed_clock(morning)) as res:
        key = res.store.state_key("acme", "shp_123")
        parts = record.frames(await res.redis.get(key))  # its outcome list, cut short
        damaged = record.framed(parts[:4]) + b"%d:" % (len(parts[4]) + 9) + parts[4]
        await res.redis.set(key, damaged, keepttl=True)
        sms = notification_id_of("acme", "shp_123", "evt_1", "sms")
        with caplog.at_level("ERROR", "notifier.store.ledger"):
            for _ in range(3):  # three ticks of the due sweep
                await release_due({"res": res, "pipeline": Pipeline(res)})
        assert len(outbox_files(settings, ".sms.json")) == 1  # once, not once a tick
        assert (await res.store.ledger([sms]))[sms]["status"] == "sent"
    # once: the next ticks had nothing to settle
    [logged] = [r.getMessage() for r in caplog.records if r.name == "notifier.store.ledger"]
    assert re.fullmatch(
        f"notification {sms}: the record of shipment acme/shp_123 does not read "
        r"\(user_script:\d+: damaged record: a frame at byte \d+ does not read\); settled "
        "as sent in its ledger entry instead",
        logged,
    ), logged


async def test_messages_settled_with_one_whose_record_does_not_read_keep_their_counts(
    tmp_path: Path, redis_url: str
) -> None:
    """Two SMS wait for the morning; one shipment's record is damaged meanwhile. Both go out
    and are settled in one call of the fold script: it reads every record before it writes,
    so the failing one stops it before the other is settled, and the one-at-a-time retry
    settles that other with its counts. Before, the script settled
    the first, then failed on the second, and the retry no longer found the first: it went
    out uncounted (and, through Twilio, without its provider id or last-SMS entry)."""
    settings = make_settings(tmp_path, redis_url=redis_url, partitions=1)
    night = datetime(2026, 11, 21, 22, 0, tzinfo=UTC)  # 23:00 in Paris
    morning = datetime(2026, 11, 22, 7, 0, tzinfo=UTC)
    async with TestClient(TestServer(create_app(settings))) as client:
        for shipment, phone in (("shp_a", "+33612345601"), ("shp_b", "+33612345602")):
            recipient = {**transition()["recipient"], "phone": phone}
            await post(
                client,
                transition(
                    event_id=f"evt_{shipment}",
                    shipment_id=shipment,
                    occurred_at="2026-11-21T22:40:00+01:00",
                    recipient=recipient,
                ),
            )
    await run_worker(settings, clock=fixed_clock(night))
    async with open_resources(settings, clock=fixed_clock(morning)) as res:
        day = keys.stats_key("acme", morning.date().isoformat())
        # shp_a's: its SMS comes after shp_b's in the call (the due index orders by id)
        key = res.store.state_key("acme", "shp_a")
        parts = record.frames(await res.redis.get(key))
        damaged = record.framed(parts[:4]) + b"%d:" % (len(parts[4]) + 9) + parts[4]
        await res.redis.set(key, damaged, keepttl=True)
        assert await res.redis.hgetall(day) == {}
        await release_due({"res": res, "pipeline": Pipeline(res)})
        assert len(outbox_files(settings, ".sms.json")) == 2
        a, b = (notification_id_of("acme", s, f"evt_{s}", "sms") for s in ("shp_a", "shp_b"))
        assert b < a
        # shp_b's SMS on its outcome list; shp_a's in its ledger entry, its record unread
        assert (await res.store.deliveries("acme", "shp_b", [b]))[b]["status"] == "sent"
        assert (await res.store.ledger([a]))[a]["status"] == "sent"
        counted = {k.decode(): int(v) for k, v in (await res.redis.hgetall(day)).items()}
        assert sum(n for k, n in counted.items() if "|sms|" in k) == 2, counted


async def test_scripts_failing_on_every_shipment_hold_the_batch() -> None:
    """A script failing on the records of one shipment: that shipment's entries wait, alone.
    Failing on every entry of more than one shipment, it is the scripts that fail (a
    release's bug), not the data: the batch is held as in an outage, not set aside entry by
    entry."""

    class Failing:
        async def process(self, entries: Sequence[InboxEntry]) -> Any:
            raise ResponseError("user_script:1: damaged record: a frame at byte 1 does not read")

    def entry(i: int, shipment: str) -> InboxEntry:
        body = transition(event_id=f"e{i}", shipment_id=shipment)
        return InboxEntry(f"{i}-0", orjson.dumps(body))

    one = [entry(1, "a"), entry(2, "a")]
    outcome = await _process(cast(Pipeline, Failing()), one)
    assert (outcome.settled, outcome.invalid, outcome.waiting) == ([], [], [])
    with pytest.raises(ResponseError):
        await _process(cast(Pipeline, Failing()), [entry(1, "a"), entry(2, "b")])


def test_only_a_script_failing_on_its_data_is_taken_for_bad_data() -> None:
    """A Lua error or a key of the wrong type fails again on the same data; out of memory,
    a read-only replica, a busy or loading server, or a cluster moving slots pass."""
    bad = [
        "user_script:31: attempt to perform arithmetic on a nil value script: 1f, on "
        "@user_script:31.",
        "WRONGTYPE Operation against a key holding the wrong kind of value script: 1f",
        "Error running script (call to f_1f): @user_script:3: user_script:3: bad argument",
    ]
    passing = [
        "OOM command not allowed when used memory > 'maxmemory'. script: 1f",
        "Error running script (call to f_1f): @user_script:9: @user_script:9: -OOM command "
        "not allowed",
        "READONLY You can't write against a read only replica. script: 1f",
        "BUSY Redis is busy running a script.",
        "Error running script (call to f_1f): @user_script:2: Script attempted to access a "
        "non local key in a cluster node",
    ]
    assert [data_error(ResponseError(m)) for m in bad] == [True] * 3
    assert [data_error(ResponseError(m)) for m in passing] == [False] * 5
    assert not data_error(ConnectionError("gone")) and not data_error(OSError())


async def test_template_that_raises_fails_only_its_message(tmp_path: Path, redis_url: str) -> None:
    templates = tmp_path / "templates"
    shutil.copytree(data_dir("templates", None), templates)
    # (a merchant's own template that raises would be skipped for the defaults: these fail)
    (templates / "email" / "layout.html").write_text("{{ 1 / 0 }}")
    settings = make_settings(tmp_path, redis_url=redis_url, templates_dir=templates)
    async with TestClient(TestServer(create_app(settings))) as client:
        await post(client, transition())
        await run_worker(settings)
        assert [p.suffixes[-1] for p in outbox_files(settings)] == [".json"]  # the SMS went
        resp = await client.get(
            "/v1/merchants/acme/shipments/shp_123/notifications", headers=auth()
        )
        by_channel = {d["channel"]: d["delivery"] for d in (await resp.json())["decisions"]}
        assert by_channel["sms"]["status"] == "sent"
        assert by_channel["email"]["status"] == "failed"
        assert "ZeroDivisionError" in by_channel["email"]["error"]
        health = await (await client.get("/healthz")).json()
        assert health["dead_letters"]["notifications"] == 1


async def test_internationalized_email_address_is_delivered(
    client: Client, settings: Settings
) -> None:
    """A domain that is not ASCII is written in its ASCII form (IDNA, as email-validator
    reads it), so an address with an ASCII local part makes a plain RFC 5322 header; a local
    part that is not ASCII has no ASCII form and travels as UTF-8 (RFC 6532)."""
    for shipment, address in (("shp_1", "anna@müller.de"), ("shp_2", "anä@exämple.com")):
        recipient = {"email": address, "name": "Anä"}
        await post(client, transition(event_id=shipment, shipment_id=shipment, recipient=recipient))
    await run_worker(settings)
    to = {}
    for eml in outbox_files(settings, ".eml"):
        raw = eml.read_bytes()
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        to[eml.parent.name] = (msg["To"], raw.split(b"\r\n\r\n", 1)[0].isascii())
    assert to == {
        "shp_1": ("anna@xn--mller-kva.de", True),
        "shp_2": ("anä@xn--exmple-cua.com", False),
    }


async def test_settling_never_recreates_an_expired_ledger_entry(settings: Settings) -> None:
    async with open_resources(settings, clock=fixed_clock()) as res:
        where = ("acme", "s1")
        at = "2026-11-21T00:00:00+00:00"
        await res.store.mark_sent([("n_gone", at, "outbox:x")], where={"n_gone": where})
        await res.store.cancel("n_gone", "superseded", where)
        assert await res.redis.keys("*") == []
        assert await res.store.claim(["n_gone"], 0, LEASE_MS) == [Claim(ClaimResult.NONE, None)]


async def test_claims_that_lapse_while_rendering_are_left_to_their_new_holder(
    client: Client, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rendering a big round with slow templates can outlast its lease: another worker then
    takes the claims over (and sends). The first round renews before sending, and sends
    only what is still its own."""
    monkeypatch.setattr(delivery, "RENEW_AFTER_S", -1.0)  # every round counts as slow
    await post(client, transition())
    async with open_resources(settings, clock=fixed_clock()) as res:
        entries = await read_whole_inbox(res, "slow-worker")
        render_many = res.renderer.render_many

        async def taken_over_meanwhile(notifications: Sequence[Any]) -> Any:
            for n in notifications:  # as if their lease ran out and another worker claimed
                await res.redis.hset(res.store.notification_key(n.notification_id), "owner", "w2")
            return await render_many(notifications)

        monkeypatch.setattr(res.renderer, "render_many", taken_over_meanwhile)
        report = await Pipeline(res).process(entries)
        assert report.delivery.sent == []
        assert len(report.delivery.busy) == 2
        assert report.unsettled  # the entry waits for the new holder
        assert outbox_files(settings) == []


async def test_a_worker_paused_past_its_lease_while_sending_sends_nothing_more(
    client: Client, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker stopped (SIGSTOP) mid-send, its claims taken over and sent by another, went
    on writing when it resumed: 52 of 300 notifications twice in the outbox (found by an
    operator's drill). A round now hands a message to its channel only while its claims'
    lease, from their last renewal, still holds (``channels.Lease``)."""
    await post(client, transition())
    async with open_resources(settings, clock=fixed_clock()) as res:
        entries = await read_whole_inbox(res, "paused-worker")
        outbox = res.channels[ChannelKind.EMAIL]
        send_many = outbox.send_many

        async def paused_then_resumed(items: Sequence[Any]) -> Any:
            for item in items:  # stopped past the lease; another worker took the claims
                await res.redis.hset(
                    res.store.notification_key(item.message.notification_id), "owner", "w2"
                )
                item.lease.until = lease_clock() - 1
            return await send_many(items)

        monkeypatch.setattr(outbox, "send_many", paused_then_resumed)
        report = await Pipeline(res).process(entries)
        assert report.delivery.sent == []
        assert len(report.delivery.busy) == 2
        assert report.unsettled  # the entry waits for the new holder
        assert outbox_files(settings) == []


@pytest.mark.parametrize("provider", ["sendgrid", "twilio"])
def test_a_provider_channel_never_calls_out_for_a_lapsed_claim(provider: str) -> None:
    """SendGrid and Twilio check the lease right before each call, as the outbox writer
    does before each file (a channel may wait on its concurrency limit)."""
    from notifier.channels import Outgoing
    from notifier.channels.base import ClaimLapsed, Lease
    from notifier.channels.sendgrid import build_sendgrid
    from notifier.channels.twilio import build_twilio
    from notifier.render import EmailMessageOut, SmsMessageOut
    from notifier.render.sms import SmsEncoding

    # nothing listens there: a call would be an "unreachable" retry, not a lapsed claim
    nowhere = "http://127.0.0.1:9"
    message: Any
    if provider == "sendgrid":
        message = EmailMessageOut(
            "n_1", "acme", "s1", "ana@example.com", "Acme <n@example.com>", "Hi", "Hi", "<p>Hi</p>"
        )
    else:
        message = SmsMessageOut("n_1", "acme", "s1", "+33612345678", "Hi", SmsEncoding.GSM7, 1)

    async def send(lease: Lease) -> list[Any]:
        channel: Any
        if provider == "sendgrid":
            channel = build_sendgrid("SG.x", base_url=nowhere, timeout_s=1)
        else:
            channel = build_twilio(
                "AC" + "0" * 32,
                "token",
                base_url=nowhere,
                from_number="+15005550006",
                messaging_service_sid=None,
                timeout_s=1,
            )
        try:
            return await channel.send_many([Outgoing(message, datetime.now(UTC), lease=lease)])
        finally:
            await channel.aclose()

    [outcome] = asyncio.run(send(Lease(lease_clock() - 1)))
    assert isinstance(outcome, ClaimLapsed), outcome
    # (with a lease that holds, the call is made: the provider is unreachable here)
    [outcome] = asyncio.run(send(Lease(lease_clock() + 60)))
    assert isinstance(outcome, TemporaryDeliveryError) and not isinstance(outcome, ClaimLapsed)


async def test_renewals_move_a_slow_rounds_fence(
    client: Client, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A round whose provider is slower than the fence of its claims (0.3 s here) still
    sends: each renewal moves the fence on. Only a renewal that finds a claim another
    worker's drops it."""
    monkeypatch.setattr(delivery, "RENEW_EVERY_S", 0.05)
    monkeypatch.setattr(delivery, "LEASE_MARGIN_S", LEASE_MS / 1000 - 0.3)
    await post(client, transition())
    async with open_resources(settings, clock=fixed_clock()) as res:
        entries = await read_whole_inbox(res, "slow-worker")
        held = HeldChannel(res.channels[ChannelKind.EMAIL])
        res.channels = {ChannelKind.EMAIL: held, ChannelKind.SMS: held}
        slow = asyncio.create_task(Pipeline(res).process(entries))
        await asyncio.wait_for(held.waiting.wait(), 10)
        await asyncio.sleep(1.0)  # past the first fence, renewed meanwhile
        held.go.set()
        report = await asyncio.wait_for(slow, 10)
        assert len(report.delivery.sent) == 2, report
        # a renewal that finds a claim taken over: lost to this round at once
        deliverer = Deliverer(res)
        fence = delivery._fence(lease_clock())
        ids = ["n_gone"]
        await res.redis.hset(res.store.notification_key("n_gone"), "owner", "w2")
        assert await deliverer._renew(ids, "w1", res.store.scopes[0], fence) == []
        assert not fence.allows("n_gone") and fence.allows("n_other")
    assert len(outbox_files(settings)) == 2


async def test_a_merchant_template_error_quoting_data_does_not_log_it(
    tmp_path: Path, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A template error's message can quote the data it failed on (a recipient's name as a
    missing key): the log says where and what kind, the message goes out with the defaults."""
    templates = tmp_path / "templates"
    shutil.copytree(data_dir("templates", None), templates)
    own = templates / "acme" / "messages"
    own.mkdir(parents=True)
    default = (templates / "messages" / "out_for_delivery.jinja").read_text()
    (own / "out_for_delivery.jinja").write_text(
        default + "{%- macro sms() -%}{{ {}[recipient.name] }}{%- endmacro -%}\n"
    )
    settings = make_settings(tmp_path, redis_url=redis_url, templates_dir=templates)
    name = "Zebulon Quaxworth"
    recipient = {**transition()["recipient"], "name": name}
    async with TestClient(TestServer(create_app(settings))) as client:
        await post(client, transition(recipient=recipient))
        with caplog.at_level("DEBUG"):
            await run_worker(settings)
    assert len(outbox_files(settings)) == 2  # sent with the default wording
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "merchant acme: messages/out_for_delivery.jinja, line 7: UndefinedError" in logged
    assert "Zebulon" not in logged and "Quaxworth" not in logged
