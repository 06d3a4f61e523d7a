"""Cadence rules through the real pipeline and Redis: quiet hours and supersession, opt-outs,
stalled shipments, merchant policy overrides."""

from __future__ import annotations

import email
import email.policy
import json
import math
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient

from notifier.deadletters import DeadLetters
from notifier.models import ChannelKind, Transition, notification_of
from notifier.packing import NOTIFICATION, pack, unpack
from notifier.pipeline import Pipeline, notification_id
from notifier.resources import Resources, open_resources
from notifier.settings import Settings
from notifier.state import ShipmentState
from notifier.store import keys, record
from notifier.worker import find_stalled, release_due
from tests.conftest import (
    NOW,
    auth,
    fixed_clock,
    history,
    outbox_files,
    post,
    run_worker,
    transition,
)

Client = TestClient[Any, Any]
NIGHT = datetime(2026, 11, 21, 22, 0, tzinfo=UTC)  # 23:00 in Paris: SMS quiet hours
MORNING = datetime(2026, 11, 22, 7, 0, tzinfo=UTC)  # 08:00 in Paris: they end


@pytest.fixture
async def res_at(settings: Settings) -> AsyncIterator[Any]:
    """open_resources at a given instant: ``async with res_at(when) as res``."""

    def opener(when: datetime) -> Any:
        return open_resources(settings, clock=fixed_clock(when))

    yield opener


def nid(event_id: str, channel: ChannelKind, **kw: Any) -> str:
    return notification_id(Transition.model_validate(transition(event_id=event_id, **kw)), channel)


def plain_text(eml: Path) -> str:
    """An outbox email's plain-text part."""
    mail = email.message_from_bytes(eml.read_bytes(), policy=email.policy.default)
    assert isinstance(mail, EmailMessage)
    body = mail.get_body(("plain",))
    assert body is not None
    text: str = body.get_content()
    return text


async def sms_deliveries(client: Client) -> dict[str, dict[str, Any]]:
    """Event id -> the delivery of its SMS, from the shipment's history."""
    return {
        d["event_id"]: d["delivery"] for d in await history(client) if d.get("channel") == "sms"
    }


async def release(res: Resources) -> int:
    """The release_due cron at ``res.clock()``."""
    return await release_due({"res": res, "pipeline": Pipeline(res)})


async def ledger(res: Resources, *ids: str) -> list[str]:
    rows = await res.store.deliveries("acme", "shp_123", list(ids))
    return [rows[i].get("status", "") for i in ids]


async def test_quiet_hours_defer_and_only_the_latest_goes_out(
    client: Client, settings: Settings, res_at: Any
) -> None:
    ofd = transition(event_id="ofd", occurred_at="2026-11-21T22:40:00+01:00")
    delivered = transition(
        event_id="dlv", status="delivered", occurred_at="2026-11-21T22:55:00+01:00"
    )
    await post(client, ofd)
    await run_worker(settings, clock=fixed_clock(NIGHT))
    await post(client, delivered)
    await run_worker(settings, clock=fixed_clock(NIGHT + timedelta(minutes=5)))

    # email went at once (no quiet hours for email); both SMS were deferred to the morning,
    # and "out for delivery" was cancelled when "delivered" overtook it (rule 9): it never
    # waits on the due index, nor holds a ledger entry through the night
    assert len(outbox_files(settings, ".eml")) == 2
    assert outbox_files(settings, ".sms.json") == []
    sms = [d for d in await history(client) if d["channel"] == "sms"]
    assert [d["outcome"] for d in sms] == ["deferred", "deferred"]
    assert sms[0]["send_at"] == "2026-11-22T07:00:00Z"
    assert sms[0]["delivery"]["status"] == "cancelled"
    assert sms[0]["delivery"]["detail"].startswith("superseded by delivered")
    assert sms[1]["delivery"]["status"] == "deferred"

    ofd_sms, dlv_sms = nid("ofd", ChannelKind.SMS), nid("dlv", ChannelKind.SMS)
    async with res_at(MORNING - timedelta(seconds=1)) as res:
        assert dict(await res.store.due_entries(math.inf)) == {dlv_sms: MORNING.timestamp() * 1000}
        assert not await res.redis.exists(keys.notification_key(ofd_sms))
        assert await release(res) == 0  # not yet
    async with res_at(MORNING) as res:
        assert await release(res) == 1
        assert await ledger(res, ofd_sms, dlv_sms) == ["cancelled", "sent"]
        assert await res.store.due_count() == 0
    [sms_file] = outbox_files(settings, ".sms.json")
    assert sms_file.name.endswith(f"{dlv_sms}.sms.json")  # the delivered one
    sms = await sms_deliveries(client)
    assert sms["ofd"]["status"] == "cancelled"
    assert sms["ofd"]["detail"].startswith("superseded by delivered")
    assert sms["dlv"]["status"] == "sent"


async def test_a_failure_while_arrives_today_waits_cancels_it(
    client: Client, settings: Settings, res_at: Any
) -> None:
    """Out for delivery late in the evening, then the courier could not reach the recipient:
    the "arrives today" SMS waiting for the morning is cancelled, and only the failure goes
    out (both went out in the morning before: an exception ranked below "out for
    delivery")."""
    ofd = transition(event_id="ofd", occurred_at="2026-11-21T22:40:00+01:00")
    failed = transition(
        event_id="exc",
        status="exception",
        exception_code="recipient_unavailable",
        occurred_at="2026-11-21T22:55:00+01:00",
    )
    await post(client, ofd)
    await run_worker(settings, clock=fixed_clock(NIGHT))
    await post(client, failed)
    await run_worker(settings, clock=fixed_clock(NIGHT + timedelta(minutes=5)))
    async with res_at(MORNING) as res:
        assert await release(res) == 1
    [sms_file] = outbox_files(settings, ".sms.json")
    assert sms_file.name.endswith(f"{nid('exc', ChannelKind.SMS)}.sms.json")
    sms = await sms_deliveries(client)
    assert sms["ofd"]["status"] == "cancelled"
    assert sms["ofd"]["detail"].startswith("superseded by exception:recipient_unavailable")
    assert sms["exc"]["status"] == "sent"


async def test_a_depot_scan_does_not_cancel_a_failure_that_waits(
    client: Client, settings: Settings, res_at: Any
) -> None:
    """The failure's SMS waits for the morning; the parcel is scanned back at the depot in
    the night: the SMS still goes out (the due sweep checks again before it sends, and
    measures the failure at the step it happened at, as the decision did)."""
    await post(client, transition(event_id="ofd", occurred_at="2026-11-21T12:40:00+01:00"))
    await run_worker(settings)
    failed = transition(
        event_id="exc",
        status="exception",
        exception_code="recipient_unavailable",
        occurred_at="2026-11-21T22:55:00+01:00",
    )
    depot = transition(
        event_id="dep", status="arrived_at_facility", occurred_at="2026-11-21T23:30:00+01:00"
    )
    await post(client, failed)
    await run_worker(settings, clock=fixed_clock(NIGHT))
    await post(client, depot)
    await run_worker(settings, clock=fixed_clock(NIGHT + timedelta(minutes=50)))
    async with res_at(MORNING) as res:
        assert await release(res) == 1
    sms = await sms_deliveries(client)
    assert sms["exc"]["status"] == "sent", sms
    assert any(
        f.name.endswith(f"{nid('exc', ChannelKind.SMS)}.sms.json")
        for f in outbox_files(settings, ".sms.json")
    )


async def test_a_pickup_notice_that_waits_past_its_deadline_is_cancelled(
    client: Client, settings: Settings, res_at: Any
) -> None:
    """Ready for pickup at night, to collect by 07:30 Paris time: the email goes at once,
    the SMS waits for quiet hours to end at 08:00, after the deadline, and is cancelled
    then (it went out, "ready to collect", after the deadline before)."""
    pickup = transition(
        event_id="pup",
        status="available_for_pickup",
        occurred_at="2026-11-21T22:40:00+01:00",
        pickup_deadline="2026-11-22T07:30:00+01:00",
        pickup_point={"name": "Tabac du Centre", "address": "1 rue de la Gare, Paris"},
    )
    await post(client, pickup)
    await run_worker(settings, clock=fixed_clock(NIGHT))
    assert len(outbox_files(settings, ".eml")) == 1
    async with res_at(MORNING) as res:
        await release(res)
        assert await ledger(res, nid("pup", ChannelKind.SMS)) == ["cancelled"]
    assert outbox_files(settings, ".sms.json") == []
    [sms] = [d for d in await history(client) if d.get("channel") == "sms"]
    assert sms["delivery"]["detail"] == (
        "stale: its pickup deadline 2026-11-22T07:30:00+01:00 passed while it waited"
    )


async def test_deferred_message_is_kept_until_due_and_sent_once(
    client: Client, settings: Settings, res_at: Any
) -> None:
    await post(client, transition(occurred_at="2026-11-21T22:40:00+01:00"))
    await run_worker(settings, clock=fixed_clock(NIGHT))
    async with res_at(NIGHT + timedelta(hours=1)) as res:
        assert await release(res) == 0
        # it waits for hours: its payload is packed (a notification's JSON, a fifth the size)
        t = Transition.model_validate(transition(occurred_at="2026-11-21T22:40:00+01:00"))
        nid = notification_id(t, ChannelKind.SMS)
        scope = res.store.scope_of("acme", "shp_123")
        packed = await res.store.payload(nid, scope)
        assert packed is not None
        assert packed[0] == NOTIFICATION and len(packed) < len(unpack(packed)) / 3
        # in 64-byte pieces, so its ledger hash stays a compact one
        name = keys.notification_key(nid, res.store.tag(scope))
        assert len(await res.redis.hkeys(name)) > 5
        assert await res.redis.object("encoding", name) == b"listpack"
        # without what its key, its transition, its recipient and its ledger entry say
        # (``models.waiting_payload``): the claim gives the entry's ``created`` back
        left_out = {"notification_id", "merchant_id", "shipment_id", "to", "created_at"}
        assert not left_out & set(orjson.loads(unpack(packed)))
        created_at = (await res.store.ledger([nid], scope))[nid]["created_at"]
        assert created_at == NIGHT.isoformat()  # when the worker decided
        waiting = notification_of(nid, packed, created_at)
        assert (waiting.notification_id, waiting.channel) == (nid, ChannelKind.SMS)
        assert (waiting.merchant_id, waiting.shipment_id) == ("acme", "shp_123")
        assert waiting.to == waiting.recipient.phone == "+33612345678"
        assert waiting.created_at == NIGHT
    async with res_at(MORNING + timedelta(minutes=1)) as res:
        assert await release(res) == 1
        assert await release(res) == 0
    await run_worker(settings, clock=fixed_clock(MORNING + timedelta(minutes=2)))
    [sent] = outbox_files(settings, ".sms.json")
    assert orjson.loads(sent.read_bytes())["to"] == "+33612345678"
    [sms] = [d for d in await history(client) if d["channel"] == "sms"]
    assert sms["delivery"]["status"] == "sent"
    assert sms["delivery"]["due_at"] == "2026-11-22T07:00:00+00:00"


async def test_a_waiting_message_that_cannot_be_read_never_holds_the_others_up(
    client: Client, settings: Settings, res_at: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A stored payload that no longer reads as a notification (damaged, or refused by a
    newer version's checks) fails alone, onto the dead-letter list: the due sweep takes the
    oldest first, so raising would have blocked every message due after it, round after
    round."""
    await post(client, transition(occurred_at="2026-11-21T22:40:00+01:00"))
    await run_worker(settings, clock=fixed_clock(NIGHT))
    good = nid("evt_1", ChannelKind.SMS, occurred_at="2026-11-21T22:40:00+01:00")
    due_ms = int(MORNING.timestamp() * 1000)
    broken = {
        "n_" + "a" * 32: pack(b'{"channel":"sms","to":"+33612345678"}', NOTIFICATION),
        "n_" + "b" * 32: b"\x04not deflate at all",
        "n_" + "c" * 32: b"{not json",
        "n_" + "d" * 32: b"\x7fan unknown packing tag",
    }
    async with res_at(NIGHT) as res:
        for i, (bad, payload) in enumerate(broken.items()):
            key = keys.notification_key(bad)
            await res.redis.hset(
                key, mapping={"st": "deferred", "due": due_ms - 60_000, "p": payload}
            )
            if i % 2:  # in its due bucket, as this version schedules
                await res.store.reschedule(bad, due_ms - 60_000 + i, "a timeout")
            else:  # on the due index from before 0.6
                await res.redis.zadd(keys.DUE_KEY, {bad: due_ms - 60_000 + i})
    async with res_at(MORNING + timedelta(minutes=1)) as res:
        assert await release(res) == 5
        rows = await res.store.ledger([*broken, good])
        assert [rows[b]["status"] for b in broken] == ["failed"] * 4
        assert rows["n_" + "a" * 32]["error"].startswith(
            "stored payload unreadable: invalid created_at, merchant_id, recipient"
        )
        assert rows["n_" + "b" * 32]["error"] == "stored payload unreadable: damaged packed data"
        assert rows["n_" + "c" * 32]["error"] == "stored payload unreadable: not JSON"
        assert rows["n_" + "d" * 32]["error"] == (
            "stored payload unreadable: unknown packing tag 0x7f"
        )
        dead = await res.redis.lrange(keys.dead_letter_key(""), 0, -1)
        assert {d.decode() for d in dead} == set(broken)
        # and the dead-letter commands list and show them, with what is wrong
        letters = DeadLetters(res.redis, res.store, res.queue)
        listed = {d.id: d for d in await letters.list(kind="messages")}
        assert set(listed) == set(broken)
        assert listed["n_" + "c" * 32].body["payload"] == "unreadable: not JSON"
        shown = await letters.show("n_" + "a" * 32)
        assert shown is not None and shown.body["notification"]["to"] == "+33612345678"
        assert (shown.merchant_id, shown.shipment_id) == ("", "")  # it names neither
    await run_worker(settings, clock=fixed_clock(MORNING + timedelta(minutes=2)))
    assert len(outbox_files(settings, ".sms.json")) == 1  # the good one went
    [sms] = [d for d in await history(client) if d["channel"] == "sms"]
    assert sms["notification_id"] == good and sms["delivery"]["status"] == "sent"
    # the log names the fields, never the values (a recipient's details)
    assert "+33612345678" not in caplog.text


async def test_opt_out_through_the_api(client: Client, settings: Settings) -> None:
    url = "/v1/merchants/acme/opt-outs"
    resp = await client.post(
        url, json={"channel": "sms", "address": "+33612345678"}, headers=auth()
    )
    assert resp.status == 200
    assert await resp.json() == {"channel": "sms", "address": "+33612345678", "opted_out": True}
    await post(client, transition(event_id="a"))
    await run_worker(settings)
    assert [p.suffix for p in outbox_files(settings)] == [".eml"]
    [sms] = [d for d in await history(client) if d["channel"] == "sms"]
    assert sms["reason"] == "recipient opted out of sms"

    await client.post(
        url, json={"channel": "sms", "address": "+33612345678", "opted_out": False}, headers=auth()
    )
    await post(
        client,
        transition(event_id="b", status="delivered", occurred_at="2026-11-21T13:00:00+01:00"),
    )
    await run_worker(settings)
    assert len(outbox_files(settings, ".sms.json")) == 1


async def test_a_number_written_with_a_national_prefix_never_slips_past_an_opt_out(
    client: Client, settings: Settings
) -> None:
    """libphonenumber reads +330612345678 as +33612345678: an opt-out kept under one
    spelling was passed by the other, and the SMS went. Numbers are read into their one
    E.164 spelling: by the worker (what is sent to and checked), the opt-out API and test
    sends."""
    url = "/v1/merchants/acme/opt-outs"
    resp = await client.post(
        url, json={"channel": "sms", "address": "+330612345678"}, headers=auth()
    )
    assert resp.status == 200
    assert (await resp.json())["address"] == "+33612345678"  # as it is kept
    await post(client, transition(event_id="a"))  # to +33612345678
    await run_worker(settings)
    [sms] = [d for d in await history(client) if d["channel"] == "sms"]
    assert sms["reason"] == "recipient opted out of sms"
    other = transition(event_id="b", status="delivered", occurred_at="2026-11-21T13:00:00+01:00")
    other["recipient"]["phone"] = "+330612345678"
    await post(client, other)
    await run_worker(settings)
    assert outbox_files(settings, ".sms.json") == []
    sms = [d for d in await history(client) if d["channel"] == "sms"][-1]
    assert sms["reason"] == "recipient opted out of sms", sms
    resp = await client.post(
        "/v1/merchants/acme/test-send",
        json={"milestone": "delivered", "channel": "sms", "to": "+330612345678"},
        headers=auth(),
    )
    assert resp.status == 422 and "opted out" in await resp.text()
    # opted in again: such a number is sent to, in its E.164 spelling
    await client.post(
        url, json={"channel": "sms", "address": "+33612345678", "opted_out": False}, headers=auth()
    )
    other = transition(
        event_id="c", shipment_id="shp_9", status="delivered", occurred_at="2026-11-21T13:00:00Z"
    )
    other["recipient"]["phone"] = "+330612345678"
    await post(client, other)
    await run_worker(settings)
    [sent] = outbox_files(settings, ".sms.json")
    assert json.loads(sent.read_text())["to"] == "+33612345678"


async def test_an_sms_opt_out_kept_before_with_a_national_prefix_still_holds(
    client: Client, settings: Settings, res_at: Any
) -> None:
    """Before numbers were read into E.164, the opt-out API kept a number as sent
    (``sms:+330612345678``): it still stops an SMS to +33612345678, and an opt-in of
    either spelling removes it."""
    async with res_at(MORNING) as res:
        await res.store.set_opt_out("acme", "sms:+330612345678", True)
    await post(client, transition(event_id="a"))
    await run_worker(settings)
    [sms] = [d for d in await history(client) if d["channel"] == "sms"]
    assert sms["reason"] == "recipient opted out of sms"
    resp = await client.post(
        "/v1/merchants/acme/opt-outs",
        json={"channel": "sms", "address": "+33612345678", "opted_out": False},
        headers=auth(),
    )
    assert resp.status == 200
    later = transition(event_id="b", status="delivered", occurred_at="2026-11-21T13:00:00+01:00")
    await post(client, later)
    await run_worker(settings)
    assert len(outbox_files(settings, ".sms.json")) == 1


async def test_opt_out_api_refuses_bad_input(client: Client) -> None:
    url = "/v1/merchants/acme/opt-outs"
    resp = await client.post(url, json={"channel": "pigeon", "address": "x"}, headers=auth())
    assert resp.status == 422
    error = (await resp.json())["error"]
    assert error["code"] == "invalid_opt_out"  # its own code, not a transition's
    assert {d["field"] for d in error["details"]} == {"channel", "address"}
    assert (await client.post("/v1/merchants/globex/opt-outs", json={})).status == 401


async def defer_then_opt_out(client: Client, settings: Settings) -> None:
    """An out-for-delivery at night: its email goes, its SMS waits for the morning; then the
    recipient opts out of SMS."""
    await post(client, transition(occurred_at="2026-11-21T22:40:00+01:00"))
    await run_worker(settings, clock=fixed_clock(NIGHT))
    resp = await client.post(
        "/v1/merchants/acme/opt-outs",
        json={"channel": "sms", "address": "+33612345678"},
        headers=auth(),
    )
    assert resp.status == 200, await resp.text()


async def test_opt_out_after_deferral_cancels_the_deferred_message(
    client: Client, settings: Settings, res_at: Any
) -> None:
    await defer_then_opt_out(client, settings)
    async with res_at(MORNING) as res:
        await release(res)
        assert await ledger(res, nid("evt_1", ChannelKind.SMS)) == ["cancelled"]
    assert outbox_files(settings, ".sms.json") == []


async def test_stalled_shipment_gets_one_delay_message(
    client: Client, settings: Settings, res_at: Any
) -> None:
    scanned = datetime(2026, 11, 18, 10, 0, tzinfo=UTC)
    await post(client, transition(status="in_transit", occurred_at=scanned.isoformat()))
    await run_worker(settings, clock=fixed_clock(scanned + timedelta(minutes=5)))
    assert len(outbox_files(settings, ".eml")) == 1  # the in_transit email

    async with res_at(scanned + timedelta(hours=71)) as res:
        assert await find_stalled({"res": res}) == 0  # not yet
    stalled_at = scanned + timedelta(hours=73)
    async with res_at(stalled_at) as res:
        assert await find_stalled({"res": res}) == 1
        assert await find_stalled({"res": res}) == 0  # found once
    await run_worker(settings, clock=fixed_clock(stalled_at))
    delay = [d for d in await history(client) if d.get("exception_code") == "delayed"]
    assert [(d["channel"], d["outcome"]) for d in delay] == [("email", "sent"), ("sms", "sent")]
    assert delay[0]["event_id"].startswith("stalled:")
    # the merchant's history says why (no carrier said it), with the numbers (DESIGN §5)
    assert {d["reason"] for d in delay} == {
        "stall check: no carrier scan for 72 h since 2026-11-18 10:00 UTC "
        f"(stalled.no_scan_hours); policy: exception:delayed is notified by {c}"
        for c in ("email", "sms")
    }
    async with res_at(stalled_at + timedelta(days=1)) as res:
        assert await find_stalled({"res": res}) == 0  # the delay notice left the index


async def test_shipments_last_scanned_the_same_minute_are_each_told_they_stalled(
    client: Client, settings: Settings, res_at: Any
) -> None:
    """Their notices' event ids were the stall's deadline alone, and event ids are one per
    merchant: the second shipment's notice was taken for a duplicate and dropped (found by
    a black-box probe). A shipment id too long to fit goes in as its digest."""
    from notifier.models import EVENT_ID_MAX, own_event_id

    scanned = datetime(2026, 11, 18, 10, 0, tzinfo=UTC)
    long_id = "s" * 120
    for sid in ("twin_a", "twin_b", long_id):
        await post(
            client,
            transition(
                event_id=f"{sid[:20]}_t",
                shipment_id=sid,
                status="in_transit",
                occurred_at=scanned.isoformat(),
            ),
        )
    await run_worker(settings, clock=fixed_clock(scanned + timedelta(minutes=5)))
    stalled_at = scanned + timedelta(hours=73)
    async with res_at(stalled_at) as res:
        assert await find_stalled({"res": res}) == 3
    await run_worker(settings, clock=fixed_clock(stalled_at))
    ids = set()
    for sid in ("twin_a", "twin_b", long_id):
        delay = [d for d in await history(client, sid) if d.get("exception_code") == "delayed"]
        assert [(d["channel"], d["outcome"]) for d in delay] == [("email", "sent"), ("sms", "sent")]
        ids.add(delay[0]["event_id"])
    deadline = int((scanned + timedelta(hours=72)).timestamp() * 1000)
    assert ids == {
        f"stalled:{deadline}:twin_a",
        f"stalled:{deadline}:twin_b",
        own_event_id("stalled:", deadline, long_id),
    }
    assert len(own_event_id("stalled:", deadline, long_id)) <= EVENT_ID_MAX


async def test_arrives_today_told_after_its_window_is_not_a_delay_a_minute_later(
    client: Client, settings: Settings, res_at: Any
) -> None:
    """An "out for delivery" the backend posted hours late, after its window had ended: it
    is told ("arrives today"), and the stall check sent "your parcel is delayed" a minute
    later (found by a black-box run as the tracking backend). Told after the window, it is
    the carrier's new promise: only the no-scan rule can call it stalled."""
    scanned = datetime(2026, 11, 20, 8, 0, tzinfo=UTC)
    window = {"start": "2026-11-20T09:00:00+00:00", "end": "2026-11-20T11:00:00+00:00"}
    ofd = transition(
        status="out_for_delivery", occurred_at=scanned.isoformat(), estimated_delivery=window
    )
    await post(client, ofd)
    told_at = datetime(2026, 11, 20, 13, 0, tzinfo=UTC)
    await run_worker(settings, clock=fixed_clock(told_at))
    assert [d["outcome"] for d in await history(client)] == ["sent", "sent"]
    async with res_at(told_at + timedelta(minutes=2)) as res:
        assert await find_stalled({"res": res}) == 0
    async with res_at(scanned + timedelta(hours=72, minutes=1)) as res:
        assert await find_stalled({"res": res}) == 1


async def test_missed_delivery_window_counts_as_stalled(
    client: Client, settings: Settings, res_at: Any
) -> None:
    scanned = datetime(2026, 11, 20, 8, 0, tzinfo=UTC)
    window = {"start": "2026-11-20T10:00:00+00:00", "end": "2026-11-20T12:00:00+00:00"}
    await post(
        client,
        transition(
            status="out_for_delivery", occurred_at=scanned.isoformat(), estimated_delivery=window
        ),
    )
    await run_worker(settings, clock=fixed_clock(scanned))
    async with res_at(datetime(2026, 11, 20, 13, 59, tzinfo=UTC)) as res:
        assert await find_stalled({"res": res}) == 0
    stalled_at = datetime(2026, 11, 20, 14, 1, tzinfo=UTC)
    async with res_at(stalled_at) as res:
        assert await find_stalled({"res": res}) == 1
    # the delay notice does not give the window that ended as the new expected delivery
    # (it said "Nouvelle livraison prévue : ven. 20 nov., 11:00 – 13:00", hours before)
    await run_worker(settings, clock=fixed_clock(stalled_at))
    delay = [d for d in await history(client) if d.get("exception_code") == "delayed"]
    assert [d["outcome"] for d in delay] == ["sent", "sent"]
    assert all(
        d["reason"].startswith(
            "stall check: no delivery 2 h after the estimated delivery window ended "
            "(2026-11-20 12:00 UTC; stalled.after_window_hours); policy: "
        )
        for d in delay
    ), delay
    for d in delay:
        suffix = ".eml" if d["channel"] == "email" else ".sms.json"
        [notice] = [f for f in outbox_files(settings, suffix) if d["notification_id"] in f.name]
        if suffix == ".sms.json":
            assert "Nouvelle livraison" not in notice.read_text()
            continue
        mail = email.message_from_bytes(notice.read_bytes(), policy=email.policy.default)
        assert isinstance(mail, EmailMessage)
        body = mail.get_body(("plain",))
        assert body is not None
        text = body.get_content()
        assert "Nouvelle livraison" not in text
        assert "Nous vous préviendrons dès qu'il repartira." in text, text


async def test_delivered_shipment_leaves_the_stall_index(
    client: Client, settings: Settings
) -> None:
    await post(client, transition(status="in_transit", occurred_at="2026-11-21T08:00:00+01:00"))
    await run_worker(settings)
    async with open_resources(settings) as res:
        assert await res.redis.zcard(res.store.STALL_KEY) == 1
    await post(client, transition(event_id="d", status="delivered"))
    await run_worker(settings)
    async with open_resources(settings) as res:
        assert await res.redis.zcard(res.store.STALL_KEY) == 0


async def test_merchant_policy_overrides_merge_key_by_key(tmp_path: Path, redis_url: str) -> None:
    import shutil

    from notifier.resources import data_dir
    from tests.conftest import make_settings

    policies = tmp_path / "policies"
    shutil.copytree(data_dir("policies", None), policies)
    (policies / "acme.yaml").write_text(
        "statuses:\n  out_for_delivery: {channels: [sms]}\nquiet_hours: {sms: null}\n"
    )
    from notifier.policy import PolicyStore

    store = PolicyStore(policies)
    acme, other = store.for_merchant("acme"), store.for_merchant("globex")
    assert [c.value for c in acme.rule("out_for_delivery", None).channels] == ["sms"]  # type: ignore[arg-type]
    assert [c.value for c in acme.rule("delivered", None).channels] == ["email", "sms"]  # type: ignore[arg-type]
    assert acme.quiet_hours.sms is None and other.quiet_hours.sms is not None
    assert acme.throttle == other.throttle
    settings = make_settings(tmp_path, redis_url=redis_url, policies_dir=policies)
    assert settings.policies_dir == policies
    assert json.loads(json.dumps(acme.model_dump(mode="json")))["dedupe_window_hours"] == 168


async def test_a_late_scan_after_a_stall_notice_still_moves_the_shipment(
    client: Client, settings: Settings, res_at: Any
) -> None:
    scanned = datetime(2026, 11, 17, 10, 0, tzinfo=UTC)
    await post(client, transition(status="in_transit", occurred_at=scanned.isoformat()))
    await run_worker(settings, clock=fixed_clock(scanned + timedelta(minutes=5)))
    stalled_at = scanned + timedelta(hours=73)
    async with res_at(stalled_at) as res:
        assert await find_stalled({"res": res}) == 1
    await run_worker(settings, clock=fixed_clock(stalled_at))
    # the carrier uploads a scan it made before the stall was noticed
    late = transition(
        event_id="late",
        status="departed_facility",
        occurred_at=(scanned + timedelta(hours=70)).isoformat(),
    )
    await post(client, late)
    await run_worker(settings, clock=fixed_clock(stalled_at + timedelta(hours=1)))
    [decision] = [d for d in await history(client) if d["event_id"] == "late"]
    assert not decision["reason"].startswith("out of order")
    async with res_at(stalled_at + timedelta(hours=1)) as res:
        [(_, state)] = await res.store.load_states([("acme", "shp_123")])
        assert state is not None and state.status == "departed_facility"
        assert await res.redis.zscore(res.store.STALL_KEY, "acme:shp_123") is not None


async def test_opt_out_addresses_must_fit_their_channel(client: Client) -> None:
    url = "/v1/merchants/acme/opt-outs"
    for body, field in [
        ({"channel": "sms", "address": "+33 6 12 34 56 78"}, "address"),
        ({"channel": "email", "address": "not an email"}, "address"),
    ]:
        resp = await client.post(url, json=body, headers=auth())
        assert resp.status == 422, body
        detail = (await resp.json())["error"]["details"][0]
        assert detail["field"] == field and "must be" in detail["message"]


@pytest.fixture
async def capped(tmp_path: Path, redis_url: str) -> AsyncIterator[tuple[Settings, Client]]:
    """acme at two messages a shipment a day, and an API client for it."""
    import shutil

    from aiohttp.test_utils import TestServer

    from notifier.app import create_app
    from notifier.resources import data_dir
    from tests.conftest import make_settings

    policies = tmp_path / "policies"
    shutil.copytree(data_dir("policies", None), policies)
    (policies / "acme.yaml").write_text("throttle: {max_per_shipment_per_day: 2}\n")
    settings = make_settings(tmp_path, redis_url=redis_url, policies_dir=policies)
    async with TestClient(TestServer(create_app(settings))) as c:
        yield settings, c


async def logged(res: Resources) -> list[tuple[str, str, datetime | None, bool]]:
    """The shipment's message log: (event, channel, due, cancelled) of each message."""
    [(_, state)] = await res.store.load_states([("acme", "shp_123")])
    assert state is not None
    return [(m.event_id, m.channel.value, m.due, m.cancelled) for m in state.messages]


async def test_a_waiting_message_cancelled_when_its_time_came_counts_against_no_cap(
    capped: tuple[Settings, Client], res_at: Any
) -> None:
    """The recipient opts out while the SMS waits for the end of quiet hours: the due sweep
    cancels it. It never went out, so the next decision's cap does not count it (the
    shipment's message log marks it cancelled)."""
    settings, client = capped
    await defer_then_opt_out(client, settings)
    async with res_at(MORNING) as res:
        await release(res)
        assert await ledger(res, nid("evt_1", ChannelKind.SMS)) == ["cancelled"]
        assert [(e, c, x) for e, c, _, x in await logged(res)] == [
            ("evt_1", "email", False),
            ("evt_1", "sms", False),  # what became of it is read at the next decision
        ]

    attempt = transition(
        event_id="dlv", status="delivery_attempt_failed", occurred_at="2026-11-21T22:50:00+01:00"
    )
    await post(client, attempt)  # (a failed attempt: how the journey ended is never capped)
    later = MORNING + timedelta(hours=1)
    await run_worker(settings, clock=fixed_clock(later))
    dlv = {d["channel"]: d for d in await history(client) if d["event_id"] == "dlv"}
    assert dlv["email"]["outcome"] == "sent"  # the second today, not the third
    assert dlv["sms"]["outcome"] == "suppressed" and "opted out" in dlv["sms"]["reason"]
    async with res_at(later) as res:
        assert await logged(res) == [
            ("evt_1", "email", None, False),
            ("evt_1", "sms", None, True),
            ("dlv", "email", None, False),
        ]
    assert len(outbox_files(settings, ".eml")) == 2 and outbox_files(settings, ".sms.json") == []


async def test_a_waiting_message_sent_when_its_time_came_still_counts(
    capped: tuple[Settings, Client], res_at: Any
) -> None:
    """The same SMS sent at the end of quiet hours is an ordinary message sent: it counts
    (the next email is the third today: over the cap of two), and no longer waits."""
    settings, client = capped
    await post(client, transition(occurred_at="2026-11-21T22:40:00+01:00"))
    await run_worker(settings, clock=fixed_clock(NIGHT))
    async with res_at(MORNING) as res:
        await release(res)
        assert await ledger(res, nid("evt_1", ChannelKind.SMS)) == ["sent"]

    attempt = transition(
        event_id="dlv", status="delivery_attempt_failed", occurred_at="2026-11-21T22:50:00+01:00"
    )
    await post(client, attempt)  # (a failed attempt: how the journey ended is never capped)
    later = MORNING + timedelta(hours=1)
    await run_worker(settings, clock=fixed_clock(later))
    dlv = {d["channel"]: d for d in await history(client) if d["event_id"] == "dlv"}
    assert dlv["email"]["outcome"] == "suppressed"
    assert dlv["email"]["reason"] == "cap: 2 messages to this shipment in the last 24 h (max 2)"
    async with res_at(later) as res:
        assert await logged(res) == [
            ("evt_1", "email", None, False),
            ("evt_1", "sms", None, False),  # sent: no longer waiting
        ]
    assert len(outbox_files(settings, ".sms.json")) == 1


async def test_an_outcome_list_that_does_not_read_holds_up_no_decision(
    client: Client, settings: Settings, res_at: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The message log is brought up to date from the outcome list; a damaged list leaves
    the waiting message counted as it was, with a warning, and the batch is decided."""
    await post(client, transition(occurred_at="2026-11-21T22:40:00+01:00"))
    await run_worker(settings, clock=fixed_clock(NIGHT))
    async with res_at(MORNING) as res:
        await release(res)
        found = await res.store.records([("acme", "shp_123")])
        damaged = record.blob(
            record.Record(
                found[0].version,
                found[0].counted,
                found[0].state,
                found[0].history,
                [b"n_x\t{not json\t", *found[0].outcomes],
            )
        )
        await res.redis.set(keys.state_key("acme", "shp_123"), damaged, keepttl=True)
    await post(client, transition(event_id="dlv", status="delivered"))
    with caplog.at_level("WARNING", "notifier.store.shipments"):
        await run_worker(settings, clock=fixed_clock(MORNING + timedelta(hours=1)))
    assert [r.getMessage() for r in caplog.records if "outcome list" in r.getMessage()] == [
        "shipment acme/shp_123: its outcome list does not read (JSONDecodeError); its waiting "
        "messages count as sent"
    ]
    # the delivered email and SMS went out
    assert len(outbox_files(settings, ".eml")) == 2
    assert len(outbox_files(settings, ".sms.json")) == 2
    # and the history still answers, without the statuses the damaged list held
    with caplog.at_level("WARNING", "notifier.store.ledger"):
        decisions = await history(client)
    assert {(d["event_id"], d["channel"], d["outcome"]) for d in decisions} >= {
        ("evt_1", "email", "sent"),
        ("dlv", "email", "sent"),
        ("dlv", "sms", "sent"),
    }
    assert [r.getMessage() for r in caplog.records if r.name == "notifier.store.ledger"] == [
        "shipment acme/shp_123: its outcome list does not read (JSONDecodeError); delivery "
        "statuses shown from the ledger only"
    ]


async def test_an_sms_without_an_email_never_points_to_one(
    client: Client, settings: Settings
) -> None:
    """An SMS about a lost parcel said "Details by email" to a recipient with no email
    address, or one who opted out of emails (found by a black-box probe): it says what to
    do instead. Sent with an email, it still points there. One batch renders all three (the
    renderer reuses an event's context for its other channel: not across that line)."""
    resp = await client.post(
        "/v1/merchants/acme/opt-outs",
        json={"channel": "email", "address": "gone@example.com"},
        headers=auth(),
    )
    assert resp.status == 200
    lost: dict[str, Any] = {"status": "exception", "exception_code": "lost"}
    base = transition(**lost)
    no_email = {**base["recipient"], "locale": "en_US"}
    del no_email["email"]
    await post(
        client,
        transition(**lost, event_id="a", shipment_id="with", recipient=base["recipient"]),
        transition(**lost, event_id="b", shipment_id="none", recipient=no_email),
        transition(
            **lost,
            event_id="c",
            shipment_id="gone",
            recipient={**no_email, "email": "gone@example.com"},
        ),
    )
    await run_worker(settings)
    bodies = {
        p.parent.name: json.loads(p.read_text())["body"]
        for p in outbox_files(settings, ".sms.json")
    }
    assert "Détails par e-mail" in bodies["with"], bodies
    for shipment in ("none", "gone"):
        assert "Questions? Contact us." in bodies[shipment], bodies
        assert "email" not in bodies[shipment].lower(), bodies
    assert {p.parent.name for p in outbox_files(settings, ".eml")} == {"with"}


def test_a_stall_reason_reads_its_rule_from_the_deadline_not_the_policy_of_today() -> None:
    """A stall indexed under one policy and found after the merchant changed it was told
    as the other rule, with a made-up number (found by a review): which rule set the
    deadline, and its hours, are read from the deadline itself."""
    from notifier.models import DeliveryWindow
    from notifier.policy.rules import Stalled
    from notifier.state import ShipmentState

    def _why_stalled(state: ShipmentState, deadline_ms: int, stalled: Stalled) -> str:
        return state.stall_reason(deadline_ms, stalled.no_scan_hours)

    scan = datetime(2026, 11, 18, 10, 0, tzinfo=UTC)
    state = ShipmentState(merchant_id="a", shipment_id="s", status="in_transit", last_scan_at=scan)

    def ms(at: datetime) -> int:
        return int(at.timestamp() * 1000)

    no_scan = "stall check: no carrier scan for 72 h since 2026-11-18 10:00 UTC"
    for policy in (Stalled(), Stalled(no_scan_hours=48)):
        assert _why_stalled(state, ms(scan + timedelta(hours=72)), policy).startswith(no_scan)
    window = DeliveryWindow(start=scan + timedelta(hours=20), end=scan + timedelta(hours=24))
    waited = state.model_copy(update={"estimated_delivery": window})
    for policy in (Stalled(), Stalled(after_window_hours=4)):
        assert _why_stalled(waited, ms(window.end + timedelta(hours=2)), policy) == (
            "stall check: no delivery 2 h after the estimated delivery window ended "
            "(2026-11-19 10:00 UTC; stalled.after_window_hours)"
        )


@pytest.mark.parametrize("batched", [False, True])
async def test_a_tracking_link_and_order_sent_once_reach_the_later_messages(
    client: Client, settings: Settings, batched: bool
) -> None:
    """The backend sent the tracking link and the order number with the first scan only:
    "arrives today" then had no "Track your parcel" link, no order line, and the SMS fell
    back to "Track it with UPS: 1Z…" (found by a black-box run as the tracking backend)."""
    first = transition(event_id="e1", status="picked_up", occurred_at="2026-11-21T08:00:00+01:00")
    later = transition(event_id="e2", occurred_at="2026-11-21T10:00:00+01:00")
    del later["tracking_url"], later["order"]
    if batched:
        await post(client, first, later)
    else:
        await post(client, first)
        await run_worker(settings)
        await post(client, later)
    await run_worker(settings)
    [eml] = [f for f in outbox_files(settings) if nid("e2", ChannelKind.EMAIL) in f.name]
    [sms] = [f for f in outbox_files(settings) if nid("e2", ChannelKind.SMS) in f.name]
    text = plain_text(eml)
    assert "https://track.example.com/1Z999AA10123456784" in text, text
    assert "1001" in text, text
    assert "https://track.example.com/1Z999AA10123456784" in json.loads(sms.read_text())["body"]


@pytest.mark.parametrize("code", ["delayed", "weather_delay"])
async def test_a_delay_while_out_for_delivery_stays_on_that_step(
    client: Client, settings: Settings, code: str
) -> None:
    """ "Arrives today", then a delay: the email's progress went back to "On the way
    (problem)" with "Out for delivery (not yet)" (found by a black-box run as the tracking
    backend). An exception is as far along as the shipment had reached (rule 9)."""
    en = {"email": "ana@example.com", "locale": "en", "timezone": "Europe/Paris"}
    await post(client, transition(event_id="ofd", recipient=en))
    await run_worker(settings)
    late = transition(
        event_id="late",
        status="exception",
        exception_code=code,
        occurred_at="2026-11-21T11:30:00+01:00",
        recipient=en,
    )
    await post(client, late)
    await run_worker(settings)
    [eml] = [f for f in outbox_files(settings, ".eml") if nid("late", ChannelKind.EMAIL) in f.name]
    text = plain_text(eml)
    assert "Out for delivery (problem)" in text, text
    assert "(not yet)" in text and "Delivered (not yet)" in text, text
    assert "Out for delivery (not yet)" not in text, text


@pytest.mark.parametrize("age_h", [4, 192])
async def test_a_late_scan_does_not_bring_back_the_old_recipient_link_or_order(
    client: Client, settings: Settings, age_h: int
) -> None:
    """ "Arrives today" went to the customer's new address and phone, in French; then a
    late in-transit scan came in (out of order, or too old to tell) carrying the old ones:
    the "delivered" messages after it went to the old address and phone, in English, with
    the old link and order number (found by a black-box run as the tracking backend).
    Newer facts win; a late scan fills in only what is not known."""
    new = {
        "email": "new@example.com",
        "phone": "+33622222222",
        "locale": "fr_FR",
        "timezone": "Europe/Paris",
    }
    old = {**new, "email": "old@example.com", "phone": "+33611111111", "locale": "en"}
    ofd = transition(
        event_id="ofd",
        occurred_at="2026-11-21T12:00:00+01:00",
        tracking_url="https://track.example.com/NEW",
        order={"number": "NEW-2"},
        recipient=new,
    )
    late = transition(
        event_id="late",
        status="in_transit",
        occurred_at=(NOW - timedelta(hours=age_h)).isoformat(),
        tracking_url="https://track.example.com/OLD",
        order={"number": "OLD-1"},
        recipient=old,
    )
    done = transition(event_id="done", status="delivered", occurred_at="2026-11-21T14:55:00+01:00")
    del done["recipient"], done["tracking_url"], done["order"]
    await post(client, ofd)
    await run_worker(settings)
    await post(client, late)
    await run_worker(settings)
    await post(client, done)
    await run_worker(settings)
    [eml] = [f for f in outbox_files(settings, ".eml") if nid("done", ChannelKind.EMAIL) in f.name]
    [sms] = [f for f in outbox_files(settings) if nid("done", ChannelKind.SMS) in f.name]
    mail = email.message_from_bytes(eml.read_bytes(), policy=email.policy.default)
    assert mail["To"] == "new@example.com"
    text = plain_text(eml)
    assert "https://track.example.com/NEW" in text and "NEW-2" in text, text
    assert "OLD" not in text, text
    body = json.loads(sms.read_text())
    assert body["to"] == "+33622222222"
    assert "colis" in body["body"] and "NEW" in body["body"], body  # French, the new link


async def test_a_scan_that_moves_the_shipment_on_brings_its_own_facts(
    client: Client, settings: Settings
) -> None:
    """A last-mile carrier's "delivered" stamped a minute before the first carrier's "out
    for delivery" (two carriers' clocks) moves the shipment on: its carrier and link are
    the ones its message shows, not a mix of the two (a review). Only a scan that is a
    step back fills in what is not known."""
    ofd = transition(
        event_id="ofd",
        occurred_at="2026-11-21T12:00:00+01:00",
        tracking_url="https://track.example.com/UPS1",
    )
    done = transition(
        event_id="done",
        status="delivered",
        carrier="dpd",
        tracking_number="LP1",
        occurred_at="2026-11-21T11:59:00+01:00",
        tracking_url="https://track.example.com/LP1",
    )
    await post(client, ofd)
    await run_worker(settings)
    await post(client, done)
    await run_worker(settings)
    [eml] = [f for f in outbox_files(settings, ".eml") if nid("done", ChannelKind.EMAIL) in f.name]
    text = plain_text(eml)
    assert "https://track.example.com/LP1" in text and "LP1 (DPD)" in text, text
    assert "UPS1" not in text, text
    # and the shipment's facts, which later messages and catch-ups are rendered from
    state = ShipmentState(merchant_id="acme", shipment_id="shp_123")
    for t in (ofd, done):
        state = state.apply(Transition.model_validate(t))
    assert (state.carrier, state.tracking_number) == ("dpd", "LP1")
    assert state.tracking_url == "https://track.example.com/LP1"


async def test_a_new_tracking_number_keeps_no_link_of_the_old_label(
    client: Client, settings: Settings
) -> None:
    """Another carrier took the parcel over with a number of its own and no link: the
    email read "Tracking number: JJD000NEW (DHL)" with the old UPS label's page on its
    button and in the SMS (found by a second black-box run). A link tracks one label;
    a late scan of the old label fills in no link for the new one either."""
    first = transition(
        event_id="t1",
        status="in_transit",
        tracking_number="1ZOLD0001",
        occurred_at="2026-11-21T10:00:00+01:00",
        tracking_url="https://www.ups.com/track?tracknum=1ZOLD0001",
    )
    handed = transition(
        event_id="t2",
        carrier="dhl",
        tracking_number="JJD000NEW",
        occurred_at="2026-11-21T12:00:00+01:00",
    )
    late = {**first, "event_id": "t0", "occurred_at": "2026-11-21T09:00:00+01:00"}
    done = {**handed, "event_id": "t3", "status": "delivered"}
    done["occurred_at"] = "2026-11-21T14:30:00+01:00"
    for t in (handed, done):
        del t["tracking_url"]
    for t in (first, handed, late, done):
        await post(client, t)
        await run_worker(settings)
    for event in ("t2", "t3"):
        [eml] = [
            f for f in outbox_files(settings, ".eml") if nid(event, ChannelKind.EMAIL) in f.name
        ]
        [sms] = [f for f in outbox_files(settings) if nid(event, ChannelKind.SMS) in f.name]
        text = plain_text(eml)
        assert "JJD000NEW (DHL)" in text and "1ZOLD0001" not in text, text
        body = json.loads(sms.read_text())["body"]
        assert "1ZOLD0001" not in body and "JJD000NEW" in body, body
