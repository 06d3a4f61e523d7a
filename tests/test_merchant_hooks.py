"""Outbound merchant webhooks (issue 17): endpoints through the admin API, exception events
queued with the decisions they are about, posted signed to a fake merchant receiver on
loopback, retried with backoff, logged, given up on after about three days."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from notifier.app import create_app
from notifier.errors import PermanentDeliveryError, Unauthorized
from notifier.models import ChannelKind
from notifier.outbound import events as ev
from notifier.outbound.client import PublicOnlyResolver
from notifier.outbound.sender import RETRY_S, HookSender, PrivateAddress
from notifier.pipeline import Pipeline
from notifier.resources import open_resources
from notifier.settings import Settings
from notifier.signing import SIGNATURE_HEADER, verify_signature
from tests.conftest import (
    ACME_KEY,
    NOW,
    auth,
    fixed_clock,
    make_settings,
    post,
    read_whole_inbox,
    run_worker,
    transition,
)
from tests.fakes import FailingChannel

Client = TestClient[Any, Any]
BASE = "/v1/merchants/acme/webhook-endpoints"


@dataclass
class Receiver:
    """A merchant's webhook receiver on loopback: what it got, and what it answers."""

    url: str = ""
    got: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    answers: list[int] = field(default_factory=list)  # then 200

    def events(self) -> list[dict[str, Any]]:
        return [orjson.loads(body) for _, body in self.got]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    found = Receiver()

    async def hook(request: web.Request) -> web.Response:
        found.got.append((dict(request.headers), await request.read()))
        return web.Response(status=found.answers.pop(0) if found.answers else 200)

    app = web.Application()
    app.router.add_post("/hook", hook)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    found.url = str(server.make_url("/hook"))
    yield found
    await server.close()


@pytest.fixture
def hook_settings(tmp_path: Any, redis_url: str) -> Settings:
    return make_settings(tmp_path, redis_url=redis_url, merchant_hooks_allow_private=True)


@pytest.fixture
async def hook_client(hook_settings: Settings) -> AsyncIterator[Client]:
    async with TestClient(TestServer(create_app(hook_settings, clock=fixed_clock()))) as c:
        yield c


async def endpoint(client: Client, url: str, events: list[str], key: str = ACME_KEY) -> Any:
    resp = await client.post(BASE, json={"url": url, "events": events}, headers=auth(key))
    assert resp.status == 201, await resp.text()
    return await resp.json()


def exception(event_id: str, code: str, **more: Any) -> dict[str, Any]:
    fields = {"occurred_at": "2026-11-21T10:00:00+01:00", **more}
    return transition(event_id=event_id, status="exception", exception_code=code, **fields)


async def send(settings: Settings, at: datetime = NOW) -> int:
    """One sender tick at ``at``: the attempts it made."""
    async with open_resources(settings, clock=lambda: at) as res:
        sender = HookSender(res.store, res.clock, allow_private=True)
        try:
            return await sender.run()
        finally:
            await sender.close()


async def decide_and_send(settings: Settings, receiver: Receiver) -> None:
    """Run a burst worker (its tick may make the first attempts), then a tick at NOW."""
    await run_worker(settings)
    await send(settings)


async def queued(settings: Settings) -> int:
    async with open_resources(settings) as res:
        return sum([await res.store.hook_queue_length(s) for s in res.store.scopes])


def check_signed(headers: dict[str, str], body: bytes, secrets: list[str], at: datetime) -> None:
    verify_signature(headers[SIGNATURE_HEADER], body, secrets, at.timestamp(), 300)


# -- the admin API --------------------------------------------------------------------------
async def test_endpoints_are_made_listed_changed_and_deleted(hook_client: Client) -> None:
    made = await endpoint(hook_client, "https://hooks.example.com/in", ["exception.*"])
    assert made["id"].startswith("we_") and made["secret"].startswith("whsec_")
    assert made["secret_hint"] == "…" + made["secret"][-4:] and made["enabled"] is True

    listed = await (await hook_client.get(BASE, headers=auth(ACME_KEY))).json()
    assert [e["id"] for e in listed["endpoints"]] == [made["id"]]
    assert "secret" not in listed["endpoints"][0]  # shown once, when made

    one = f"{BASE}/{made['id']}"
    resp = await hook_client.patch(
        one, json={"events": ["exception.lost", "delivery.failed"]}, headers=auth(ACME_KEY)
    )
    assert resp.status == 200
    assert (await resp.json())["events"] == ["exception.lost", "delivery.failed"]
    assert (await hook_client.delete(one, headers=auth(ACME_KEY))).status == 204
    assert (await hook_client.get(one, headers=auth(ACME_KEY))).status == 404
    assert (await hook_client.delete(one, headers=auth(ACME_KEY))).status == 404


async def test_the_endpoint_limit_holds_for_creates_at_once_and_a_change_never_revives(
    hook_client: Client, hook_settings: Settings
) -> None:
    body = {"url": "https://hooks.example.com/in", "events": ["*"]}
    answers = await asyncio.gather(
        *(hook_client.post(BASE, json=body, headers=auth(ACME_KEY)) for _ in range(20))
    )
    assert sorted(r.status for r in answers) == [201] * 16 + [409] * 4
    refused = await next(r for r in answers if r.status == 409).json()
    assert refused["error"]["code"] == "too_many_webhook_endpoints"
    listed = await (await hook_client.get(BASE, headers=auth(ACME_KEY))).json()
    assert len(listed["endpoints"]) == 16
    async with open_resources(hook_settings) as res:
        read = await res.store.hook_endpoints("acme")
        first, second = sorted(read)[:2]
        # a change that read the endpoint before a delete took it does not bring it back
        assert await res.store.delete_hook_endpoint("acme", first)
        gone = read[first]
        assert await res.store.change_hook_endpoint("acme", gone, {**gone, "enabled": 0}) == 0
        assert first not in await res.store.hook_endpoints("acme")
        # of two changes made from the same read (a patch, a rotation), the second is refused
        one = read[second]
        assert await res.store.change_hook_endpoint("acme", one, {**one, "secret": "new"}) == 1
        assert await res.store.change_hook_endpoint("acme", one, {**one, "enabled": 0}) == -1
        assert (await res.store.hook_endpoints("acme"))[second]["secret"] == "new"
    resp = await hook_client.patch(
        f"{BASE}/{first}", json={"enabled": False}, headers=auth(ACME_KEY)
    )
    assert resp.status == 404
    resp = await hook_client.patch(
        f"{BASE}/{second}", json={"enabled": False}, headers=auth(ACME_KEY)
    )
    assert resp.status == 200  # read again: the rotation's secret stays
    async with open_resources(hook_settings) as res:
        after = (await res.store.hook_endpoints("acme"))[second]
    assert (after["secret"], after["enabled"]) == ("new", False)


async def test_bad_endpoints_get_a_422_naming_the_problem(client: Client) -> None:
    """(``client`` runs with the default: private addresses and http refused.)"""
    cases = [
        ({"url": "https://h.example.com/", "events": ["exception.customs"]}, "events"),
        ({"url": "https://h.example.com/", "events": []}, "events"),
        ({"url": "http://h.example.com/", "events": ["*"]}, "url"),
        ({"url": "https://127.0.0.1:9/", "events": ["*"]}, "url"),
        ({"url": "https://10.1.2.3/", "events": ["*"]}, "url"),
        ({"url": "https://localhost/", "events": ["*"]}, "url"),
        # the shorthands a resolver reads as 127.0.0.1 (accepted, then refused at send)
        ({"url": "https://0x7f000001/", "events": ["*"]}, "url"),
        ({"url": "https://127.1/", "events": ["*"]}, "url"),
        ({"url": "https://2130706433/", "events": ["*"]}, "url"),
        ({"url": "https://0177.0.0.1/", "events": ["*"]}, "url"),
        # and with a trailing dot (the root), which a resolver ignores
        ({"url": "https://10.0.0.1./h", "events": ["*"]}, "url"),
        ({"url": "https://169.254.169.254./latest", "events": ["*"]}, "url"),
        ({"url": "https://127.1./", "events": ["*"]}, "url"),
        ({"url": "https://localhost./", "events": ["*"]}, "url"),
        ({"url": "ftp://h.example.com/", "events": ["*"]}, "url"),
        ({"url": "https://h.example.com/", "events": ["*"], "colour": "red"}, "colour"),
    ]
    for body, where in cases:
        resp = await client.post(BASE, json=body, headers=auth(ACME_KEY))
        assert resp.status == 422, (body, await resp.text())
        error = (await resp.json())["error"]
        assert error["code"] == "invalid_webhook_endpoint"
        assert [d["field"] for d in error["details"]] == [where], (body, error)
    unknown = await client.post(
        BASE,
        json={"url": "https://h.example.com/", "events": ["exception.customs"]},
        headers=auth(ACME_KEY),
    )
    assert "exception.customs_hold" in (await unknown.json())["error"]["details"][0]["message"]
    # a merchant's key may not touch another merchant's endpoints
    other = await client.get("/v1/merchants/globex/webhook-endpoints", headers=auth(ACME_KEY))
    assert other.status == 403


# -- events ------------------------------------------------------------------------------------
async def test_an_exception_reaches_the_endpoint_signed_with_its_decision(
    hook_client: Client, hook_settings: Settings, receiver: Receiver
) -> None:
    made = await endpoint(hook_client, receiver.url, ["exception.customs_hold"])
    other = await endpoint(hook_client, receiver.url + "?lost", ["exception.lost"])
    await post(
        hook_client,
        transition(event_id="evt_0", status="in_transit", occurred_at="2026-11-21T08:00:00+01:00"),
        exception("evt_1", "customs_hold", carrier_description="Held by customs"),
    )
    await decide_and_send(hook_settings, receiver)

    [(headers, body)] = receiver.got
    event = orjson.loads(body)
    assert event["type"] == "exception.customs_hold" and event["merchant_id"] == "acme"
    assert headers["X-Notifier-Event-Id"] == event["id"] and event["id"].startswith("whe_")
    assert headers["X-Notifier-Event-Type"] == "exception.customs_hold"
    check_signed(headers, body, [made["secret"]], NOW)
    with pytest.raises(Unauthorized):
        check_signed(headers, body, [other["secret"]], NOW)
    data = event["data"]
    assert data["shipment_id"] == "shp_123" and data["event_id"] == "evt_1"
    assert data["milestone"] == "exception:customs_hold" and data["order_number"] == "1001"
    assert data["carrier_description"] == "Held by customs"
    assert set(data["decision"]) == {"email", "sms"}
    assert data["decision"]["email"]["outcome"] == "sent"
    assert data["timeline_url"].endswith("/v1/merchants/acme/shipments/shp_123/notifications")
    assert data["source"] == "carrier"
    assert "ana@example.com" not in body.decode() and "+33612345678" not in body.decode()

    log = await (
        await hook_client.get(f"{BASE}/{made['id']}/deliveries", headers=auth(ACME_KEY))
    ).json()
    [attempt] = log["attempts"]
    assert attempt["outcome"] == "delivered" and attempt["status_code"] == 200
    assert attempt["event_id"] == event["id"] and attempt["attempt"] == 1
    assert await queued(hook_settings) == 0
    assert await send(hook_settings) == 0  # sent once


async def test_no_endpoint_no_event_and_stale_news_is_no_event(
    hook_client: Client, hook_settings: Settings, receiver: Receiver
) -> None:
    await post(hook_client, exception("evt_1", "lost"))
    await run_worker(hook_settings)
    assert await queued(hook_settings) == 0  # nobody subscribed: nothing kept

    await endpoint(hook_client, receiver.url, ["exception.*"])
    await post(
        hook_client,
        transition(event_id="evt_2", status="delivered", occurred_at="2026-11-21T12:00:00+01:00"),
    )
    await run_worker(hook_settings)
    # a customs hold scanned before the delivery, uploaded after it: stale, no event
    await post(hook_client, exception("evt_3", "customs_hold"))
    await decide_and_send(hook_settings, receiver)
    assert receiver.got == []


async def test_a_failing_endpoint_is_retried_with_backoff_then_given_up(
    hook_client: Client, hook_settings: Settings, receiver: Receiver
) -> None:
    made = await endpoint(hook_client, receiver.url, ["*"])
    receiver.answers = [500, 503]
    await post(hook_client, exception("evt_1", "address_issue"))
    await decide_and_send(hook_settings, receiver)
    assert len(receiver.got) == 1
    assert await send(hook_settings, NOW + timedelta(seconds=RETRY_S[0] - 1)) == 0  # not yet
    assert await send(hook_settings, NOW + timedelta(seconds=RETRY_S[0] + 1)) == 1
    later = NOW + timedelta(seconds=RETRY_S[0] + RETRY_S[1] + 2)
    assert await send(hook_settings, later) == 1
    assert len({orjson.loads(b)["id"] for _, b in receiver.got}) == 1  # one event, 3 tries
    log = await (
        await hook_client.get(f"{BASE}/{made['id']}/deliveries", headers=auth(ACME_KEY))
    ).json()
    assert [(a["attempt"], a["outcome"], a["status_code"]) for a in log["attempts"]] == [
        (3, "delivered", 200),
        (2, "failed", 503),
        (1, "failed", 500),
    ]
    assert await queued(hook_settings) == 0

    # an endpoint that never answers 2xx is given up on after the last wait
    receiver.answers = [500] * (len(RETRY_S) + 1)
    await post(hook_client, exception("evt_2", "damaged", occurred_at="2026-11-21T11:00:00+01:00"))
    await decide_and_send(hook_settings, receiver)
    assert len(receiver.got) == 4
    at = NOW
    for wait in RETRY_S:
        at += timedelta(seconds=wait + 1)
        assert await send(hook_settings, at) == 1
    assert await queued(hook_settings) == 0
    log = await (
        await hook_client.get(f"{BASE}/{made['id']}/deliveries", headers=auth(ACME_KEY))
    ).json()
    assert log["attempts"][0]["outcome"] == "gave_up"
    assert log["attempts"][0]["attempt"] == len(RETRY_S) + 1
    page = (await (await hook_client.get("/metrics")).read()).decode()
    assert 'notifier_merchant_hook_attempts_total{outcome="gave_up"}' in page
    assert "notifier_merchant_hook_queue 0.0" in page


async def test_rotation_signs_with_both_secrets_while_they_overlap(
    hook_client: Client, hook_settings: Settings, receiver: Receiver
) -> None:
    made = await endpoint(hook_client, receiver.url, ["exception.lost"])
    resp = await hook_client.post(
        f"{BASE}/{made['id']}/rotate-secret", json={"overlap_s": 3600}, headers=auth(ACME_KEY)
    )
    rotated = await resp.json()
    assert resp.status == 200 and rotated["secret"] != made["secret"]
    await post(hook_client, exception("evt_1", "lost"))
    await decide_and_send(hook_settings, receiver)
    [(headers, body)] = receiver.got
    assert headers[SIGNATURE_HEADER].count("v1=") == 2
    check_signed(headers, body, [made["secret"]], NOW)
    check_signed(headers, body, [rotated["secret"]], NOW)


async def test_a_test_event_goes_to_its_endpoint_only(
    hook_client: Client, hook_settings: Settings, receiver: Receiver
) -> None:
    first = await endpoint(hook_client, receiver.url + "?a", ["*"])
    await endpoint(hook_client, receiver.url + "?b", ["*"])
    resp = await hook_client.post(f"{BASE}/{first['id']}/test", headers=auth(ACME_KEY))
    assert resp.status == 202
    assert await send(hook_settings) == 1
    [(_, body)] = receiver.got
    assert orjson.loads(body)["type"] == "test"
    assert orjson.loads(body)["data"] == {"endpoint_id": first["id"]}


# -- the queue ---------------------------------------------------------------------------------
async def test_an_event_is_queued_once_and_a_lease_keeps_it_from_other_workers(
    hook_settings: Settings,
) -> None:
    async with open_resources(hook_settings) as res:
        store, scope = res.store, res.store.scopes[0]
        event = ev.envelope("whe_1", "exception.lost", "acme", NOW, {})
        stored = ev.stored(event)
        assert await store.queue_hook_events(scope, [("whe_1", stored)], 1000) == 1
        assert await store.queue_hook_events(scope, [("whe_1", stored)], 1000) == 0
        [mine] = await store.claim_hook_events(scope, 2000, 60_000, 10)
        assert await store.claim_hook_events(scope, 3000, 60_000, 10) == []  # leased
        # the lease ran out: another worker takes it, and the first one's settle is refused
        [theirs] = await store.claim_hook_events(scope, 70_000, 60_000, 10)
        assert not await store.settle_hook_event(scope, mine, None)
        assert await store.settle_hook_event(scope, theirs, None)
        assert await store.hook_queue_length(scope) == 0


async def test_names_that_resolve_to_private_addresses_are_refused() -> None:
    with pytest.raises(PrivateAddress):
        await PublicOnlyResolver().resolve("localhost", 443)


def test_event_types_of_transitions() -> None:
    from notifier.models import Transition

    def of(**more: Any) -> str | None:
        return ev.type_of(Transition.model_validate(transition(**more)))

    assert of(status="exception", exception_code="refused") == "exception.refused"
    assert of(status="exception", exception_code="delayed", event_id="stalled:1") == (
        "exception.stalled"
    )
    assert of(status="delivery_attempt_failed") == "exception.delivery_attempt_failed"
    assert of(status="returned_to_sender") == "exception.returned_to_sender"
    assert of(status="delivered") is None
    assert ev.matches(["exception.*"], "exception.lost")
    assert not ev.matches(["exception.lost"], "exception.damaged")
    assert ev.matches(["*"], "delivery.failed")
    assert ev.check_patterns(["*", "*", "exception.lost"]) == ["*", "exception.lost"]


async def process_through(settings: Settings, channel: FailingChannel) -> None:
    """Decide what the inbox holds and deliver it through ``channel`` (both kinds)."""
    async with open_resources(settings, clock=fixed_clock()) as res:
        res.channels = {ChannelKind.EMAIL: channel, ChannelKind.SMS: channel}
        res.providers = {}
        await Pipeline(res).process(await read_whole_inbox(res, "w"))


# -- failures and opt-outs -----------------------------------------------------------------------
async def test_a_message_that_fails_for_good_is_a_delivery_failed_event(
    hook_client: Client, hook_settings: Settings, receiver: Receiver
) -> None:
    await endpoint(hook_client, receiver.url, ["delivery.failed"])
    await post(hook_client, transition())
    await process_through(
        hook_settings, FailingChannel(PermanentDeliveryError, "550 no such mailbox", "refusing")
    )
    await send(hook_settings)
    got = sorted(receiver.events(), key=lambda e: e["data"]["channel"])
    assert [e["type"] for e in got] == ["delivery.failed", "delivery.failed"]
    assert [e["data"]["channel"] for e in got] == ["email", "sms"]
    email = got[0]["data"]
    assert email["shipment_id"] == "shp_123" and email["event_id"] == "evt_1"
    assert email["milestone"] == "out_for_delivery" and "550 no such mailbox" in email["reason"]
    assert email["notification_id"].startswith("n_")


async def test_opt_outs_are_told_once_to_the_merchant(
    hook_client: Client, hook_settings: Settings, receiver: Receiver
) -> None:
    await endpoint(hook_client, receiver.url, ["recipient.*"])
    body = {"channel": "email", "address": "Ana@Example.com", "opted_out": True}
    for _ in range(2):  # the second one changes nothing: no second event
        resp = await hook_client.post("/v1/merchants/acme/opt-outs", json=body, headers=auth())
        assert resp.status == 200
    await send(hook_settings)
    [event] = receiver.events()
    assert event["type"] == "recipient.opted_out"
    assert event["data"] == {
        "channel": "email",
        "address": "ana@example.com",
        "source": "api",
        "shipment_id": None,
    }
    # a provider refusing a number its owner blocked us on (Twilio 21610): the merchant
    # whose message found it out is told (no email is sent: that address opted out above)
    await post(hook_client, transition(event_id="evt_9", shipment_id="shp_9"))
    await process_through(hook_settings, FailingChannel(OptedOutError, "21610", "refusing"))
    await send(hook_settings)
    told = [e["data"] for e in receiver.events()[1:]]
    assert [(d["channel"], d["source"], d["shipment_id"]) for d in told] == [
        ("sms", "provider", "shp_9")
    ]


class OptedOutError(PermanentDeliveryError):
    opted_out = True


async def test_twilio_reports_of_a_failed_sms_become_events(
    tmp_path: Any, redis_url: str, receiver: Receiver
) -> None:
    from tests.fakes import serve_twilio
    from tests.test_twilio import twilio_settings
    from tests.test_webhooks import PUBLIC, sent_sms, signed

    async with serve_twilio() as twilio:
        settings = twilio_settings(tmp_path, redis_url, twilio).model_copy(
            update={"public_url": PUBLIC, "merchant_hooks_allow_private": True}
        )
        async with TestClient(TestServer(create_app(settings, clock=fixed_clock()))) as c:
            await endpoint(c, receiver.url, ["delivery.failed", "recipient.opted_out"])
            nid, sid = await sent_sms(c, settings, twilio)
            form = {
                "MessageSid": sid,
                "MessageStatus": "undelivered",
                "ErrorCode": "21610",
                "To": "+33612345678",
            }
            for _ in range(2):  # Twilio may call twice: one event each all the same
                assert (await signed(c, "/v1/webhooks/twilio/status", form)).status == 204
            await send(settings)
    got = {e["type"]: e["data"] for e in receiver.events()}
    assert len(receiver.got) == 2
    assert got["delivery.failed"]["notification_id"] == nid
    assert got["delivery.failed"]["channel"] == "sms"
    assert got["delivery.failed"]["reason"] == "Twilio: undelivered (error 21610)"
    assert got["recipient.opted_out"] == {
        "channel": "sms",
        "address": "+33612345678",
        "source": "twilio_blocked",
        "shipment_id": "shp_123",
    }


async def test_events_go_out_from_a_redis_cluster(
    tmp_path: Any, cluster: Any, receiver: Receiver
) -> None:
    """Queued by the commit of each partition, in that partition's slot, on a 3-master
    cluster; endpoints under the merchant's own tag."""
    from redis.crc import key_slot

    from tests.conftest import flush_cluster

    flush_cluster(cluster)
    settings = make_settings(
        tmp_path,
        redis_url=cluster.url,
        queue_redis_url=cluster.queue_url,
        partitions=6,
        merchant_hooks_allow_private=True,
    )
    async with TestClient(TestServer(create_app(settings, clock=fixed_clock()))) as c:
        await endpoint(c, receiver.url, ["exception.*"])
        shipments = [f"shp_{i}" for i in range(12)]
        await post(c, *(exception(f"evt_{s}", "lost", shipment_id=s) for s in shipments))
        await run_worker(settings)
        async with open_resources(settings) as res:
            queued_keys = [
                k.decode()
                for node in cluster.masters()
                for k in cluster.node(node).keys("ntf:mwh:*")
            ]
        await send(settings)
    assert sorted(e["data"]["shipment_id"] for e in receiver.events()) == sorted(shipments)
    for name in queued_keys:  # each under one tag: a partition's, or the merchant's
        tag = "{" + name.split("{", 1)[1].split("}", 1)[0] + "}"
        assert key_slot(name.encode()) == key_slot(tag.encode()), name
    assert any(k.startswith("ntf:mwh:{acme}:endpoints") for k in queued_keys)
    assert res.store.cluster


async def test_a_post_that_cannot_start_in_the_claims_budget_is_no_attempt(
    hook_settings: Settings,
) -> None:
    """All slots busy past the budget: nothing is posted, nothing counted, the event is due
    again in a few seconds (within its lease no other worker could post it meanwhile)."""
    import time

    from notifier.outbound.sender import IN_FLIGHT, SOON_S

    async with open_resources(hook_settings, clock=fixed_clock()) as res:
        sender = HookSender(res.store, res.clock, allow_private=True)
        endpoint = {"id": "we_1", "url": "https://h.example.com/", "secret": "s", "events": ["*"]}
        event = ev.envelope("whe_1", "exception.lost", "acme", NOW, {})
        for _ in range(IN_FLIGHT):
            await sender._slots.acquire()
        attempt = await sender._post(endpoint, event, b"{}", time.monotonic() + 0.05)
        assert attempt.skipped and attempt.status is None
        # through a claim: the event stays, due again soon, with no attempt recorded
        await res.store.add_hook_endpoint(
            "acme", {**endpoint, "enabled": True, "created_at": ""}, 16
        )
        scope = res.store.scopes[0]
        await res.store.queue_hook_events(scope, [("whe_1", ev.stored(event))], 0)
        [claimed] = await res.store.claim_hook_events(scope, 1000, 60_000, 10)
        doc = orjson.loads(claimed.stored)
        endpoints = {"acme": await res.store.hook_endpoints("acme")}
        made = await sender._event(scope, claimed, doc, endpoints, time.monotonic())
        assert made == 0
        assert await res.store.hook_attempts("acme", "we_1", 10) == []
        due = await res.redis.zscore("ntf:mwh:due", "whe_1")
        assert due == NOW.timestamp() * 1000 + SOON_S * 1000


async def test_private_addresses_are_refused_when_sending(hook_settings: Settings) -> None:
    """Without NOTIFIER_MERCHANT_HOOKS_ALLOW_PRIVATE a literal private address, in any of
    its IPv6 disguises, is refused before any connection."""
    import ipaddress
    import time

    from notifier.outbound.sender import is_public

    async with open_resources(hook_settings, clock=fixed_clock()) as res:
        sender = HookSender(res.store, res.clock, allow_private=False)
        event = ev.envelope("whe_1", "exception.lost", "acme", NOW, {})
        for url in ("https://127.0.0.1:9/", "https://[::ffff:10.0.0.1]/", "http://h.example.com/"):
            endpoint = {"id": "we_1", "url": url, "secret": "s", "events": ["*"]}
            attempt = await sender._post(endpoint, event, b"{}", time.monotonic() + 5)
            assert not attempt.ok and (attempt.error or "").startswith("refused:"), url
        await sender.close()
    for private in ("2002:0a00:0001::1", "64:ff9b::10.0.0.1", "::ffff:192.168.1.1"):
        assert not is_public(ipaddress.ip_address(private)), private
    assert is_public(ipaddress.ip_address("2002:0808:0808::1"))  # 6to4 of 8.8.8.8


async def test_a_conflicting_commit_queues_no_webhook_event(hook_settings: Settings) -> None:
    from notifier.state import ShipmentState
    from notifier.store import ShipmentCommit

    def commit(version: int, event_id: str) -> ShipmentCommit:
        state = ShipmentState(merchant_id="acme", shipment_id="s", events=version + 1)
        stored = ev.stored(ev.envelope(event_id, "exception.lost", "acme", NOW, {}))
        return ShipmentCommit("acme", "s", version, state, [], [], events=((event_id, stored),))

    async with open_resources(hook_settings) as res:
        assert (await res.store.commit_batch([commit(0, "whe_a")], NOW.isoformat())).conflicts == []
        done = await res.store.commit_batch([commit(0, "whe_b")], NOW.isoformat())
        assert done.conflicts == [0]
        queued_ids = await res.redis.zrange("ntf:mwh:due", 0, -1)
    assert queued_ids == [b"whe_a"]
