"""Worker path on a real Redis: inbox → state + decisions → outbox; burst workers, no sleeps."""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient

from notifier import worker as worker_module
from notifier.delivery import LEASE_MS, SUMMARY_BYTES, DeliveryReport, summary
from notifier.models import ChannelKind, Transition
from notifier.pipeline import BatchReport, Pipeline, _unsettled, notification_id
from notifier.render import SmsMessageOut
from notifier.resources import open_resources
from notifier.settings import Settings
from notifier.state import ShipmentState
from notifier.store import GROUP, InboxEntry, ShipmentCommit, Store, chunks, keys
from notifier.worker import BATCHES_AT_ONCE, Processed, build_worker
from tests.conftest import (
    NOW,
    fixed_clock,
    history,
    local_day_and_time,
    outbox_files,
    post,
    record_of,
    run_worker,
    stop_worker,
    transition,
)
from tests.fakes import Crash, CrashingChannel

Client = TestClient[Any, Any]


async def test_transition_becomes_eml_and_sms_json(client: Client, settings: Settings) -> None:
    await post(client, transition())
    await run_worker(settings)

    [eml] = outbox_files(settings, ".eml")
    [sms] = outbox_files(settings, ".sms.json")
    assert eml.parent == settings.outbox_dir / "acme" / "shp_123"
    nid_email = notification_id(Transition.model_validate(transition()), ChannelKind.EMAIL)
    assert eml.name.endswith(f"-{nid_email}.eml")

    msg = email.message_from_bytes(eml.read_bytes(), policy=email.policy.default)
    assert msg["To"] == "ana@example.com"
    assert msg["Subject"]
    assert msg.get_content_type() == "multipart/alternative"
    parts = {p.get_content_type(): p.get_content() for p in msg.iter_parts()}  # type: ignore[attr-defined]
    assert set(parts) == {"text/plain", "text/html"}
    assert "https://track.example.com/1Z999AA10123456784" in parts["text/plain"]
    # the recipient's locale (fr_FR) and time zone (Europe/Paris): "sam. 21 novembre, 09:30"
    occurred = Transition.model_validate(transition()).occurred_at
    day, time = local_day_and_time(occurred, "Europe/Paris", "fr_FR")
    assert f"{day}, {time}" in parts["text/plain"]
    assert time == "09:30"
    assert '<html lang="fr" dir="ltr"' in parts["text/html"]
    assert "1001" in parts["text/plain"]  # the order number

    body = json.loads(sms.read_text())
    assert set(body) == {"to", "body", "encoding", "segments", "notification_id"}
    assert body["to"] == "+33612345678"
    assert (body["encoding"], body["segments"]) == ("GSM-7", 1)
    assert body["notification_id"] in sms.name

    decisions = await history(client)
    assert [(d["channel"], d["outcome"], d["delivery"]["status"]) for d in decisions] == [
        ("email", "sent", "sent"),
        ("sms", "sent", "sent"),
    ]


async def test_posted_twice_produces_one_message(client: Client, settings: Settings) -> None:
    await post(client, transition())
    await post(client, transition())
    await run_worker(settings)
    await post(client, transition())
    await run_worker(settings)
    assert len(outbox_files(settings, ".eml")) == 1
    assert len(outbox_files(settings, ".sms.json")) == 1


async def test_rescan_with_new_event_id_is_not_renotified(
    client: Client, settings: Settings
) -> None:
    await post(client, transition(event_id="a"))
    await run_worker(settings)
    await post(client, transition(event_id="b", occurred_at="2026-11-21T09:45:00+01:00"))
    await run_worker(settings)
    assert len(outbox_files(settings)) == 2
    later = [d for d in await history(client) if d["event_id"] == "b"]
    assert [d["outcome"] for d in later] == ["suppressed", "suppressed"]
    assert later[0]["reason"].startswith("duplicate: out_for_delivery already sent by email")


async def test_quiet_statuses_are_recorded_not_sent(client: Client, settings: Settings) -> None:
    await post(client, transition(status="info_received"))
    await run_worker(settings)
    assert outbox_files(settings) == []
    [decision] = await history(client)
    assert decision["outcome"] == "suppressed"
    assert decision["reason"] == "policy: info_received is not notified"


async def test_late_event_never_steps_backwards(client: Client, settings: Settings) -> None:
    await post(
        client,
        transition(event_id="d", status="delivered", occurred_at="2026-11-21T15:00:00+01:00"),
    )
    await post(client, transition(event_id="o", occurred_at="2026-11-21T08:00:00+01:00"))
    await run_worker(settings)
    files = outbox_files(settings, ".eml")
    assert len(files) == 1
    delivered = Transition.model_validate(transition(event_id="d", status="delivered"))
    assert files[0].name.endswith(f"{notification_id(delivered, ChannelKind.EMAIL)}.eml")
    late = [d for d in await history(client) if d["event_id"] == "o"]
    assert late[0]["outcome"] == "suppressed"
    assert late[0]["reason"].startswith("out of order")


async def test_a_parcel_collected_from_a_pickup_point_is_told_so(
    client: Client, settings: Settings
) -> None:
    """Not "ask next door": the customer collected it. The pickup notice and
    the delivered come in separate batches, as they would."""
    en = {"name": "Ana", "email": "ana@example.com", "phone": "+33612345678", "locale": "en"}
    pickup = {"name": "Tabac du Centre", "address": "3 rue Nationale, Tours"}
    await post(
        client,
        transition(
            event_id="p",
            status="available_for_pickup",
            occurred_at="2026-11-21T10:00:00+01:00",
            pickup_point=pickup,
            recipient=en,
        ),
    )
    await run_worker(settings)
    await post(
        client,
        transition(
            event_id="d",
            status="delivered",
            occurred_at="2026-11-21T12:00:00+01:00",
            recipient=en,
        ),
    )
    await run_worker(settings)
    delivered = Transition.model_validate(transition(event_id="d", status="delivered"))
    [eml] = [
        f
        for f in outbox_files(settings, ".eml")
        if notification_id(delivered, ChannelKind.EMAIL) in f.name
    ]
    msg = email.message_from_bytes(eml.read_bytes(), policy=email.policy.default)
    assert msg["Subject"] == "Your parcel was collected"
    text = {p.get_content_type(): p.get_content() for p in msg.iter_parts()}["text/plain"]  # type: ignore[attr-defined]
    assert "If you did not collect it yourself, contact us." in text
    assert "ask next door" not in text
    [sms] = [
        f
        for f in outbox_files(settings, ".sms.json")
        if notification_id(delivered, ChannelKind.SMS) in f.name
    ]
    assert "your parcel was collected." in json.loads(sms.read_text())["body"]


async def _delivered_then(client: Client, settings: Settings, event_id: str, status: str) -> None:
    """One batch, drained: a delivered at 12:00 (event ``d``), then ``status`` of 10:00
    (arriving after it), for an English reader."""
    en = {"email": "ana@example.com", "phone": "+33612345678", "locale": "en"}
    delivered = transition(
        event_id="d", status="delivered", occurred_at="2026-11-21T12:00:00+01:00", recipient=en
    )
    earlier = {"occurred_at": "2026-11-21T10:00:00+01:00", "recipient": en}
    await post(client, delivered, transition(event_id=event_id, status=status, **earlier))
    await run_worker(settings)


async def test_a_pickup_notice_arriving_after_its_delivered_still_makes_it_collected(
    client: Client, settings: Settings
) -> None:
    """In one batch, the delivered first: the same message as in time order."""
    await _delivered_then(client, settings, "p", "available_for_pickup")
    [eml] = outbox_files(settings, ".eml")
    assert "Subject: Your parcel was collected" in eml.read_text()
    late = [d for d in await history(client) if d["event_id"] == "p"]
    assert {d["outcome"] for d in late} == {"suppressed"}  # (out of order: never sent)


async def test_a_return_posted_after_its_later_delivered_is_what_the_customer_hears(
    client: Client, settings: Settings
) -> None:
    """In one batch, a delivered first and the return that happened before it: the
    customer hears of the return, as in time order; the delivered (the parcel reaching
    the sender) is recorded, not sent."""
    await _delivered_then(client, settings, "r", "returned_to_sender")
    [eml] = outbox_files(settings, ".eml")
    assert "Subject: Your parcel was delivered" not in eml.read_text()
    said = {(d["event_id"], d.get("channel")): d for d in await history(client)}
    assert said["r", "email"]["outcome"] == said["r", "sms"]["outcome"] == "sent"
    assert [(k, d["outcome"]) for k, d in said.items() if k[0] == "d"] == [
        (("d", None), "suppressed")
    ]
    assert said["d", None]["reason"].startswith("returned: ")


async def test_an_old_shipment_imported_sends_nothing_and_never_stalls(
    client: Client, settings: Settings
) -> None:
    """Events years old (an import, a backlog replayed): recorded as stale, no message, and
    no "delayed" notice from the stall check for a shipment that was never live here."""
    await post(
        client,
        transition(event_id="a", status="in_transit", occurred_at="2024-01-01T10:00:00+01:00"),
        transition(event_id="b", status="delivered", occurred_at="2024-01-02T10:00:00+01:00"),
        transition(event_id="c", shipment_id="shp_2", occurred_at="2024-01-01T10:00:00+01:00"),
    )
    await run_worker(settings)
    assert outbox_files(settings) == []
    decisions = await history(client) + await history(client, "shp_2")
    assert {d["reason"].split(":")[0] for d in decisions} == {"old"}
    async with open_resources(settings, clock=fixed_clock()) as res:
        assert await res.store.due_stalls(2**50, limit=10) == []


async def test_later_transitions_use_the_known_recipient(
    client: Client, settings: Settings
) -> None:
    await post(client, transition(event_id="p", status="picked_up"))
    no_recipient = transition(event_id="x", status="exception", exception_code="customs_hold")
    del no_recipient["recipient"]
    await post(client, no_recipient)
    await run_worker(settings)
    [sms] = outbox_files(settings, ".sms.json")
    assert json.loads(sms.read_text())["to"] == "+33612345678"


async def test_shipment_without_any_recipient_is_explained(
    client: Client, settings: Settings
) -> None:
    body = transition()
    del body["recipient"]
    await post(client, body)
    await run_worker(settings)
    assert outbox_files(settings) == []
    reasons = {d["reason"] for d in await history(client)}
    assert reasons == {
        "no email address known for the recipient",
        "no sms address known for the recipient",
    }


async def test_many_shipments_in_one_batch(client: Client, settings: Settings) -> None:
    items = [
        transition(event_id=f"e{i}", shipment_id=f"s{i}", status="delivered") for i in range(300)
    ]
    assert (await post(client, *items))["accepted"] == 300
    await run_worker(settings)
    assert len(outbox_files(settings, ".eml")) == 300
    async with open_resources(settings) as res:
        drains = [r for r in await res.redis.all_job_results() if r.function == "drain"]
    assert len(drains) <= settings.partitions  # a drain per partition, not a job per event


async def test_one_process_works_on_at_most_two_batches_at_once(
    client: Client, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Drains of every partition run as jobs side by side, but their batches take turns."""
    items = [transition(event_id=f"e{i}", shipment_id=f"s{i}") for i in range(200)]
    assert (await post(client, *items))["accepted"] == 200
    running, most = 0, 0
    real = Pipeline.process

    async def watched(self: Pipeline, entries: Sequence[InboxEntry]) -> Any:
        nonlocal running, most
        running += 1
        most = max(most, running)
        try:
            await asyncio.sleep(0.02)  # a batch that waits on Redis a while
            return await real(self, entries)
        finally:
            running -= 1

    monkeypatch.setattr(Pipeline, "process", watched)
    await run_worker(settings)
    assert most == BATCHES_AT_ONCE  # several partitions were ready, two went at once
    assert len(outbox_files(settings, ".eml")) == 200


async def test_a_drain_lingers_for_the_next_event_instead_of_ending(
    client: Client, settings: Settings
) -> None:
    """Under a trickle the drain that ran dry picks up the next event itself: no second
    job, no wait for the job queue's next poll."""
    settings = settings.model_copy(update={"worker_linger_s": 1.0})
    worker = build_worker(settings, handle_signals=False, poll_delay_s=0.05, clock=fixed_clock())
    task = asyncio.ensure_future(worker.main())
    try:
        await post(client, transition(event_id="e1", status="in_transit"))
        await _wait_for(lambda: len(outbox_files(settings, ".eml")) == 1)
        await asyncio.sleep(0.1)  # well inside the linger
        await post(client, transition(event_id="e2", status="out_for_delivery"))
        await _wait_for(lambda: len(outbox_files(settings, ".eml")) == 2)
        async with open_resources(settings) as res:
            await _wait_for_async(lambda: _drain_results(res), 1)
            await asyncio.sleep(1.5)  # a second drain, had there been one, would be done
            assert await _drain_results(res) == 1
    finally:
        await stop_worker(worker, task)


async def test_a_busy_drain_reads_its_batches_in_turn_and_lingers_only_when_dry(
    client: Client, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Full batches are read inside the two-batch semaphore (what a process holds stays
    bounded); only a partition that ran dry waits, for one entry, outside it."""
    settings = settings.model_copy(update={"worker_batch": 10, "worker_linger_s": 0.2})
    items = [transition(event_id=f"e{i}", shipment_id=f"s{i}") for i in range(200)]
    assert (await post(client, *items))["accepted"] == 200
    outstanding, most, blocking = 0, 0, []
    real_read, real_ack = Store.read_inbox, Store.ack

    async def read(
        self: Store, partition: int, consumer: str, count: int, block_ms: Any = None
    ) -> Any:
        nonlocal outstanding, most
        got = await real_read(self, partition, consumer, count, block_ms)
        if block_ms is not None:
            blocking.append(count)
        outstanding += len(got)
        most = max(most, outstanding)
        return got

    async def ack(self: Store, partition: int, entry_ids: Sequence[str]) -> None:
        nonlocal outstanding
        outstanding -= len(entry_ids)
        await real_ack(self, partition, entry_ids)

    monkeypatch.setattr(Store, "read_inbox", read)
    monkeypatch.setattr(Store, "ack", ack)
    await run_worker(settings)
    assert len(outbox_files(settings, ".eml")) == 200
    assert blocking and set(blocking) == {1}
    # about one linger per partition as it runs dry, not one after each of 20+ batches
    assert len(blocking) <= 2 * settings.partitions
    # two batches in work, plus at most one lingered entry per partition
    assert most <= BATCHES_AT_ONCE * 10 + settings.partitions


async def test_a_linger_never_outlasts_the_redis_timeout(
    client: Client, settings: Settings
) -> None:
    # a blocking read longer than the socket timeout would fail the drain job
    settings = settings.model_copy(update={"worker_linger_s": 3.0, "redis_timeout_s": 0.4})
    await post(client, transition())
    await run_worker(settings)  # asserts that no job failed
    assert len(outbox_files(settings)) == 2


async def _drain_results(res: Any) -> int:
    return len([r for r in await res.redis.all_job_results() if r.function == "drain"])


async def _wait_for(predicate: Any, seconds: float = 10.0) -> None:
    for _ in range(int(seconds / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("timed out")


async def _wait_for_async(count: Any, want: int, seconds: float = 10.0) -> None:
    for _ in range(int(seconds / 0.05)):
        if await count() >= want:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("timed out")


async def _inbox_entries(settings: Settings, res_store: Any, count: int) -> list[InboxEntry]:
    entries: list[InboxEntry] = []
    for p in range(settings.partitions):
        entries += await res_store.read_inbox(p, "dead-worker", count)
    return entries


async def test_crash_after_commit_is_finished_by_the_next_worker(
    client: Client, settings: Settings
) -> None:
    await post(client, transition())
    fast = settings.model_copy(update={"claim_idle_s": 0.001})
    async with open_resources(fast, clock=fixed_clock()) as res:
        await res.store.ensure_groups()
        entries = await _inbox_entries(settings, res.store, 10)
        assert len(entries) == 1
        res.channels = {ChannelKind.EMAIL: CrashingChannel(), ChannelKind.SMS: CrashingChannel()}
        with contextlib.suppress(Crash):
            await Pipeline(res).process(entries)
        # decisions are committed, nothing was sent, the entry is still unacknowledged
        assert len(await history(client)) == 2
        assert outbox_files(settings) == []
        pending = await res.redis.xpending(
            res.store.inbox_key(res.store.partition_of("acme", "shp_123")), GROUP
        )
        assert pending["pending"] == 1
    # claims were taken by the crashed worker; let its lease run out, as time would
    async with open_resources(fast, clock=fixed_clock()) as res:
        for key in await res.redis.keys("ntf:msg:*"):
            await res.redis.hset(
                key, "claimed", str(int(1000 * NOW.timestamp()) - LEASE_MS - 3_600_000)
            )
    await run_worker(fast)
    assert len(outbox_files(settings, ".eml")) == 1
    assert len(outbox_files(settings, ".sms.json")) == 1
    assert [d["delivery"]["status"] for d in await history(client)] == ["sent", "sent"]


async def test_crash_between_write_and_record_does_not_write_twice(
    client: Client, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    await post(client, transition())

    async def dies_before_recording(*args: Any, **kwargs: Any) -> None:
        return None

    # the worker writes the files and dies before recording them: its claims stay
    with monkeypatch.context() as m:
        m.setattr(Store, "mark_sent", dies_before_recording)
        await run_worker(settings)
    assert len(outbox_files(settings)) == 2
    async with open_resources(settings, clock=fixed_clock()) as res:
        ids = [k.decode().split(":")[-1] for k in await res.redis.keys("ntf:msg:*")]
        assert len(ids) == 2
        for key in await res.redis.keys("ntf:msg:*"):
            assert await res.redis.hget(key, "st") == b"sending"
            await res.redis.hset(key, "claimed", "0")  # its lease ran out
        report = await Pipeline(res).deliverer.deliver(ids)
        assert await res.redis.keys("ntf:msg:*") == []  # settled: on the outcome list
    assert sorted(report.sent) == sorted(ids)
    assert len(outbox_files(settings)) == 2
    assert [d["delivery"]["status"] for d in await history(client)] == ["sent", "sent"]


async def test_concurrent_workers_never_send_twice(client: Client, settings: Settings) -> None:
    # the same milestone re-scanned under many event ids, processed by competing pipelines
    items = [
        transition(event_id=f"r{i}", occurred_at=f"2026-11-21T09:{i:02d}:00+01:00")
        for i in range(40)
    ]
    await post(client, *items)
    async with open_resources(settings, clock=fixed_clock()) as res:
        await res.store.ensure_groups()
        entries = await _inbox_entries(settings, res.store, 100)
        assert len(entries) == 40
        pipelines = [Pipeline(res) for _ in range(8)]
        await asyncio.gather(*(p.process([e]) for p, e in zip(pipelines * 5, entries, strict=True)))
    assert len(outbox_files(settings, ".eml")) == 1
    assert len(outbox_files(settings, ".sms.json")) == 1
    sent = [d for d in await history(client) if d["outcome"] == "sent"]
    assert len(sent) == 2


async def test_history_lists_delivery_details(client: Client, settings: Settings) -> None:
    await post(client, transition())
    await run_worker(settings)
    for d in await history(client):
        assert d["delivery"]["attempts"] == 1  # a number, not "1"
        assert d["delivery"]["detail"].startswith("outbox:")
        assert Path(d["delivery"]["detail"].removeprefix("outbox:")).exists()
        assert orjson.loads(orjson.dumps(d))["decided_at"]


async def test_one_drain_per_partition_at_a_time(client: Client, settings: Settings) -> None:
    await post(client, transition())
    async with open_resources(settings, clock=fixed_clock()) as res:
        partition = res.store.partition_of("acme", "shp_123")
        assert await res.store.lock(partition, "another-drain", 60_000)
        await run_worker(settings)
        assert outbox_files(settings) == []  # the holder has it; nobody runs beside it
        # the holder lets go and, as drain() does, forgets the wake-up and looks again
        await res.store.unlock(partition, "another-drain")
        await res.store.clear_wake(partition)
    await run_worker(settings)
    assert len(outbox_files(settings)) == 2


async def test_a_sent_notification_leaves_the_ledger_for_its_shipments_outcome_list(
    client: Client, settings: Settings
) -> None:
    await post(client, transition())
    await run_worker(settings)
    async with open_resources(settings, clock=fixed_clock()) as res:
        # no hash per message once settled: one short record each, in the shipment's record
        assert await res.redis.keys("ntf:msg:*") == []
        records = (await record_of(res.store, "acme", "shp_123")).outcomes
        ids = {d["notification_id"] for d in await history(client)}
        assert {r.split(b"\t", 1)[0].decode() for r in records} == ids
        # one key for the shipment: its record (a string), no lists
        assert await res.redis.keys("ntf:*shp_123*") == [keys.state_key("acme", "shp_123").encode()]
        assert await res.redis.type(keys.state_key("acme", "shp_123")) == b"string"
    for d in await history(client):
        delivery = d["delivery"]
        assert delivery["status"] == "sent" and delivery["sent_at"] and delivery["attempts"] == 1
        assert Path(delivery["detail"].removeprefix("outbox:")).exists()


async def test_settling_folds_the_entry_and_provider_statuses_follow_it(
    settings: Settings,
) -> None:
    where = {"n_1": ("acme", "s1")}
    async with open_resources(settings, clock=fixed_clock()) as res:
        key = res.store.notification_key("n_1")
        await res.redis.hset(
            key,
            mapping={"st": "sending", "p": "x" * 700, "owner": "o1", "due": "", "attempts": "1"},
        )
        await res.redis.expire(key, 3600)
        # a provider's first status can come before the send is recorded
        assert await res.store.provider_status("n_1", "queued", 1, None, None, where["n_1"])
        at = "2026-11-21T12:00:00+00:00"
        await res.store.mark_sent([("n_1", at, "twilio:SM1")], "o1", {"n_1": "Hi"}, where=where)
        out = keys.state_key("acme", "s1")  # the shipment's record
        assert not await res.redis.exists(key)
        assert len((await record_of(res.store, "acme", "s1")).outcomes) == 1
        assert 3500 < await res.redis.ttl(out) <= 3600  # the entry's lifetime goes with it
        expected = {
            "status": "sent",
            "attempts": 1,
            "sent_at": at,
            "detail": "twilio:SM1",
            "summary": "Hi",
            "provider_status": "queued",
        }
        assert await res.store.deliveries("acme", "s1", ["n_1"]) == {"n_1": expected}
        assert await res.store.by_provider_id("twilio", "SM1") == ("n_1", None, ("acme", "s1"))
        # another holder's settle changes nothing, nor does a second one of the same holder
        await res.store.cancel("n_1", "superseded", ("acme", "s1"), owner="o2")
        await res.store.mark_sent([("n_1", at, "twilio:SM9")], "o1", where=where)
        assert len((await record_of(res.store, "acme", "s1")).outcomes) == 1
        # later statuses are recorded; a late lower one never overwrites a higher one
        assert await res.store.provider_status("n_1", "delivered", 5, None, None, where["n_1"])
        assert not await res.store.provider_status("n_1", "sent", 3, None, None, where["n_1"])
        assert not await res.store.provider_status("n_2", "sent", 3, None, None, where["n_1"])
        delivered = await res.store.deliveries("acme", "s1", ["n_1"])
        assert delivered["n_1"]["provider_status"] == "delivered"
        # settled for good: a decision that names it again never makes it anew
        commit = ShipmentCommit(
            "acme",
            "s1",
            0,
            ShipmentState(merchant_id="acme", shipment_id="s1"),
            [],
            [("n_1", "pending", "", b"{}")],
        )
        assert await res.store.commit([commit], at) == []
        assert not await res.redis.exists(key)
        assert not await res.store.add_notification("acme", "s1", "n_1", b"{}", 0, b"{}")
        assert not await res.redis.exists(key)


async def test_what_was_sent_is_kept_in_a_few_words(client: Client, settings: Settings) -> None:
    sms = SmsMessageOut(
        "n", "acme", "s", "+33612345678", "お荷物は本日配達予定です。" * 5, "UCS-2", 2
    )
    said = summary(sms)
    assert said.endswith("…") and len(said.encode()) <= SUMMARY_BYTES
    assert sms.body.startswith(said.removesuffix("…"))
    await post(client, transition())
    await run_worker(settings)
    entries = {d["channel"]: d["delivery"] for d in await history(client)}
    assert entries["email"]["summary"] == "Votre colis arrive aujourd'hui"
    assert entries["sms"]["summary"].startswith("Your shop : votre colis arrive")


async def test_unusable_addresses_skip_their_channel_with_the_reason(
    client: Client, settings: Settings
) -> None:
    # the API checks the shape only; the worker knows these cannot be reached
    recipient = {"email": "ana..x@example.com", "phone": "+10000000000", "locale": "en"}
    await post(client, transition(recipient=recipient))
    await post(
        client,
        transition(
            event_id="evt_2",
            shipment_id="shp_2",
            recipient={"email": "ana@example.com", "phone": "+4930123456", "locale": "de"},
        ),
    )
    await run_worker(settings)
    reasons = {d["channel"]: d["reason"] for d in await history(client)}
    assert reasons == {
        "email": "unusable email address: not a valid email address: "
        "An email address cannot have two periods in a row.",
        "sms": "unusable sms address: no such phone number in US (wrong length or prefix)",
    }
    landline = {d["channel"]: d for d in await history(client, "shp_2")}
    assert landline["sms"]["outcome"] == "suppressed"
    assert landline["sms"]["reason"] == "unusable sms address: a landline, which cannot receive SMS"
    assert landline["email"]["outcome"] == "sent"
    assert [p.suffix for p in outbox_files(settings)] == [".eml"]  # shp_2's email only


async def test_a_late_recipient_gets_the_current_milestone_through_the_pipeline(
    client: Client, settings: Settings
) -> None:
    """README "Never a step backwards": the recipient arrives only with a late event; the
    current milestone (out for delivery) is then sent once, rendered as that milestone."""
    await post(client, transition(event_id="ofd", recipient=None))
    await run_worker(settings)
    assert outbox_files(settings) == []
    late = transition(event_id="pick", status="picked_up", occurred_at="2026-11-20T09:30:00+01:00")
    await post(client, late)
    await run_worker(settings)
    emails = outbox_files(settings, ".eml")
    [eml] = emails
    message = email.message_from_bytes(eml.read_bytes(), policy=email.policy.default)
    assert message["Subject"] == "Votre colis arrive aujourd'hui"
    assert len(outbox_files(settings, ".sms.json")) == 1
    caught = [d for d in await history(client) if "arrived late" in d["reason"]]
    assert {(d["event_id"], d["channel"], d["outcome"]) for d in caught} == {
        ("ofd", "email", "sent"),
        ("ofd", "sms", "sent"),
    }
    # the same late event again (a redelivery or a repost) sends nothing more
    await post(client, {**late, "event_id": "pick2", "occurred_at": "2026-11-20T08:30:00+01:00"})
    await run_worker(settings)
    assert len(outbox_files(settings)) == 2


async def test_an_ended_shipment_is_kept_for_its_retention_and_opt_outs_forever(
    client: Client, tmp_path: Path, redis_url: str
) -> None:
    """NOTIFIER_RETENTION_AFTER_FINAL_S: once delivered, a shipment's state, history and
    messages (those from before the end too) expire after it; opt-outs never do."""
    from tests.conftest import make_settings

    settings = make_settings(tmp_path, redis_url=redis_url, retention_after_final_s=3600)
    await post(client, transition(event_id="ofd"))
    await run_worker(settings)
    shipment = keys.state_key("acme", "shp_123")  # its record: state, history, outcomes
    async with open_resources(settings, clock=fixed_clock()) as res:
        await res.store.set_opt_out("acme", "email:x@example.com", True)
        # the two messages, settled
        assert len((await record_of(res.store, "acme", "shp_123")).outcomes) == 2
        assert await res.redis.ttl(shipment) > 3600
    await post(
        client,
        transition(event_id="done", status="delivered", occurred_at="2026-11-21T13:00:00+01:00"),
    )
    await run_worker(settings)
    async with open_resources(settings, clock=fixed_clock()) as res:
        # ended: its four records were folded into one chunk (notifier/store/chunks.py)
        [chunk] = (await record_of(res.store, "acme", "shp_123")).outcomes
        assert chunks.is_chunk(chunk) and chunks.count(chunk) == 4
        assert 0 < await res.redis.ttl(shipment) <= 3600
        assert await res.redis.ttl(res.store.optout_key("acme")) == -1  # never expires


async def test_a_compaction_that_fails_leaves_the_batch_delivered(
    client: Client, settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    """Compaction only saves memory: whatever it raises, the batch (decided, sent, its entries
    acknowledged) stands, and the lists stay as they were."""

    async def broken(self: Store, shipments: Any) -> int:
        raise ValueError("a list that does not read")

    monkeypatch.setattr(Store, "compact", broken)
    await post(client, transition(event_id="ofd"))
    await run_worker(settings)
    at = "2026-11-21T13:00:00+01:00"
    await post(client, transition(event_id="done", status="delivered", occurred_at=at))
    await run_worker(settings)  # ended: its lists would be compacted now
    assert "compacting 1 histories failed (ValueError" in caplog.text
    assert len(outbox_files(settings)) == 4  # each event by email and by SMS
    async with open_resources(settings, clock=fixed_clock()) as res:
        entries = (await record_of(res.store, "acme", "shp_123")).history
        assert len(entries) == 4 and not any(chunks.is_chunk(e) for e in entries)
        inbox = keys.inbox_key(res.store.partition_of("acme", "shp_123"))
        assert (await res.redis.xpending(inbox, GROUP))["pending"] == 0
    assert [d["delivery"]["status"] for d in await history(client)] == ["sent"] * 4


def test_each_waiting_entry_waits_for_its_own_messages_only() -> None:
    """A batch's entries held back wait each for its own messages: one behind another
    worker's live claim until that lease runs out, one whose claim the replicas did not
    confirm only until it is worth trying again (they all waited for the latest)."""
    at = 1_800_000_000_000
    delivery = DeliveryReport(
        busy=["n_busy", "n_unconfirmed", "n_also"],
        busy_until={"n_busy": at + 70_000, "n_unconfirmed": at + 1_000, "n_also": at + 500},
    )
    owner = {"n_busy": "e1", "n_unconfirmed": "e2", "n_also": "e1"}
    report = BatchReport(delivery=delivery)
    report.unsettled_until = _unsettled(delivery, owner)
    report.unsettled = set(report.unsettled_until)
    assert report.unsettled_until == {"e1": at + 70_000, "e2": at + 1_000}
    entries = [InboxEntry(e, b"{}") for e in ("e1", "e2", "e3")]
    outcome = Processed()
    outcome.add(entries, report)
    assert [e.entry_id for e in outcome.settled] == ["e3"]
    assert outcome.waiting_by_second() == {at + 70_000: ["e1"], at + 1_000: ["e2"]}


async def test_the_hourly_job_removes_stopped_workers_consumers(
    client: Client, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each worker start reads under a new consumer name: stopped ones no longer pile up in
    the inbox groups (the job's own name stays)."""
    await post(client, *[transition(event_id=f"e{i}", shipment_id=f"s{i}") for i in range(8)])
    for _ in range(2):  # two workers, one after the other
        await run_worker(settings)
    async with open_resources(settings, clock=fixed_clock()) as res:

        async def consumers() -> int:
            found = 0
            for p in range(settings.partitions):
                found += len(await res.redis.xinfo_consumers(res.store.inbox_key(p), GROUP))
            return found

        before = await consumers()
        assert before >= 2
        ctx = {"res": res, "consumer": "the-job's-own"}
        assert await worker_module.forget_consumers(ctx) == 0  # none idle for an hour yet
        monkeypatch.setattr(worker_module, "CONSUMER_IDLE_MS", 0)
        assert await worker_module.forget_consumers(ctx) == before
        assert await consumers() == 0
