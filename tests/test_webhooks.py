"""Twilio webhooks: signatures (valid, tampered, missing), status order, STOP/START/HELP."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from twilio.request_validator import RequestValidator

from notifier.app import create_app
from notifier.models import ChannelKind
from notifier.policy import opt_out_key
from notifier.resources import data_dir, open_resources
from notifier.settings import Settings
from tests.conftest import (
    NOW,
    auth,
    fixed_clock,
    history,
    make_settings,
    post,
    run_worker,
    transition,
)
from tests.fakes import FakeTwilio, serve_twilio
from tests.test_twilio import TOKEN, twilio_settings

PUBLIC = "https://notify.example.com"

Client = TestClient[Any, Any]


@pytest.fixture
async def twilio() -> AsyncIterator[FakeTwilio]:
    async with serve_twilio() as fake:
        yield fake


@pytest.fixture
def hook_settings(tmp_path: Path, redis_url: str, twilio: FakeTwilio) -> Settings:
    return twilio_settings(tmp_path, redis_url, twilio).model_copy(update={"public_url": PUBLIC})


@pytest.fixture
async def client(hook_settings: Settings) -> AsyncIterator[Client]:
    async with TestClient(TestServer(create_app(hook_settings, clock=fixed_clock()))) as c:
        yield c


async def signed(
    client: Client, path: str, form: dict[str, str], signature: str | None = "valid"
) -> Any:
    if signature == "valid":
        signature = RequestValidator(TOKEN).compute_signature(PUBLIC + path, form)
    headers = {"X-Twilio-Signature": signature} if signature else {}
    return await client.post(path, data=form, headers=headers)


async def sent_sms(client: Client, settings: Settings, twilio: FakeTwilio) -> tuple[str, str]:
    await post(client, transition())
    await run_worker(settings)
    [decision] = [d for d in await history(client) if d["channel"] == "sms"]
    return decision["notification_id"], decision["delivery"]["detail"].removeprefix("twilio:")


async def test_status_callback_url_is_given_to_twilio(
    client: Client, hook_settings: Settings, twilio: FakeTwilio
) -> None:
    _, sid = await sent_sms(client, hook_settings, twilio)
    # with the message's milestone and locale, for the merchant's analytics
    callback = twilio.received[0]["StatusCallback"]
    assert callback == PUBLIC + "/v1/webhooks/twilio/status?stats=out_for_delivery~fr_FR"
    # Twilio posts to that URL, signed over it: the report counts under the message
    path = callback.removeprefix(PUBLIC)
    for _ in range(2):  # a status reported twice counts once
        resp = await signed(client, path, {"MessageSid": sid, "MessageStatus": "delivered"})
        assert resp.status == 204
    async with open_resources(hook_settings) as res:
        found = await res.store.stats("acme", NOW.date(), NOW.date())
    assert found[NOW.date().isoformat()]["out_for_delivery|sms|fr_FR|delivered"] == 1


async def test_status_updates_never_move_backwards(
    client: Client, hook_settings: Settings, twilio: FakeTwilio
) -> None:
    _, sid = await sent_sms(client, hook_settings, twilio)
    path = "/v1/webhooks/twilio/status"
    for status in ("sent", "delivered", "sent", "queued"):
        resp = await signed(client, path, {"MessageSid": sid, "MessageStatus": status})
        assert resp.status == 204
    [decision] = [d for d in await history(client) if d["channel"] == "sms"]
    assert decision["delivery"]["provider_status"] == "delivered"


@pytest.mark.parametrize("signature", [None, "tampered"])
async def test_bad_signatures_get_403_and_change_nothing(
    client: Client, hook_settings: Settings, twilio: FakeTwilio, signature: str | None
) -> None:
    _, sid = await sent_sms(client, hook_settings, twilio)
    form = {"MessageSid": sid, "MessageStatus": "failed"}
    if signature == "tampered":
        good = RequestValidator(TOKEN).compute_signature(
            PUBLIC + "/v1/webhooks/twilio/status", {**form, "MessageStatus": "delivered"}
        )
        signature = good
    resp = await signed(client, "/v1/webhooks/twilio/status", form, signature)
    assert resp.status == 403
    [decision] = [d for d in await history(client) if d["channel"] == "sms"]
    assert "provider_status" not in decision["delivery"]


async def test_stop_start_and_help(
    client: Client, hook_settings: Settings, twilio: FakeTwilio
) -> None:
    inbound = "/v1/webhooks/twilio/inbound"
    resp = await signed(client, inbound, {"From": "+33612345678", "Body": " stop "})
    assert resp.status == 200 and "<Response" in await resp.text()
    await post(client, transition(event_id="a"))
    await run_worker(hook_settings)
    [decision] = [d for d in await history(client) if d["channel"] == "sms"]
    assert decision["reason"] == "recipient opted out of sms"  # for every merchant
    # a merchant cannot opt the number back in: 409 saying why (it answered 200 "opted_out":
    # false while the SMS stayed suppressed)
    resp = await client.post(
        "/v1/merchants/acme/opt-outs",
        json={"channel": "sms", "address": "+33612345678", "opted_out": False},
        headers=auth(),
    )
    assert resp.status == 409
    error = (await resp.json())["error"]
    assert error["code"] == "opted_out_by_recipient" and "START" in error["message"]

    await signed(client, inbound, {"From": "+33612345678", "Body": "START"})
    await post(
        client,
        transition(event_id="b", status="delivered", occurred_at="2026-11-21T13:00:00+01:00"),
    )
    await run_worker(hook_settings)
    assert len(twilio.received) == 1

    # Twilio's newer opt-out words: Twilio stops sending on them, so they are opt-outs here
    for word in ("revoke", "OPTOUT"):
        await signed(client, inbound, {"From": "+33612345678", "Body": word})
        async with open_resources(hook_settings) as res:
            assert await res.store.opted_out("acme", ["sms:+33612345678"]), word
        await signed(client, inbound, {"From": "+33612345678", "Body": "START"})

    resp = await signed(client, inbound, {"From": "+33612345678", "Body": "help"})
    assert "Répondez STOP pour vous désinscrire" in await resp.text()  # (its last SMS's language)
    resp = await signed(client, inbound, {"From": "+33699999999", "Body": "help"})  # unknown
    assert ">Parcel updates by SMS. Reply STOP to opt out, START to opt back in.<" in (
        await resp.text()
    )
    resp = await signed(client, inbound, {"From": "+33612345678", "Body": "STOP"}, "bad")
    assert resp.status == 403


def _with_brand(tmp_path: Path, redis_url: str, twilio: FakeTwilio, brand: str) -> Settings:
    """Twilio settings over a copy of the shipped templates where acme has ``brand``."""
    templates = tmp_path / "templates"
    shutil.copytree(data_dir("templates", None), templates)
    (templates / "acme").mkdir()
    (templates / "acme" / "brand.yaml").write_text(brand)
    return twilio_settings(tmp_path, redis_url, twilio).model_copy(
        update={"public_url": PUBLIC, "templates_dir": templates}
    )


async def test_help_names_the_merchant_and_its_support(
    tmp_path: Path, redis_url: str, twilio: FakeTwilio
) -> None:
    """US carriers' rules ask a HELP answer to say who sends the messages and how to reach
    them: it said "Parcel updates by SMS" for every merchant."""
    settings = _with_brand(
        tmp_path,
        redis_url,
        twilio,
        "name: Acme Shop\nsupport:\n  phone: '+49 30 1234 5678'\n  email: help@acme.example\n",
    )
    async with TestClient(TestServer(create_app(settings, clock=fixed_clock()))) as client:
        await sent_sms(client, settings, twilio)  # (to a reader of fr_FR)
        inbound = "/v1/webhooks/twilio/inbound"
        resp = await signed(client, inbound, {"From": "+33612345678", "Body": "HELP"})
        # in the language of the last SMS to the number; STOP and START stay the keywords
        assert (
            "<Message>Acme Shop : suivi de colis par SMS. Aide : +49 30 1234 5678. Répondez "
            "STOP pour vous désinscrire, START pour vous réinscrire.</Message>"
        ) in await resp.text()
        english = transition(
            event_id="en1",
            shipment_id="s-en",
            recipient={"phone": "+12125550100", "locale": "en_US", "timezone": "America/New_York"},
        )
        await post(client, english)
        await run_worker(settings)
        resp = await signed(client, inbound, {"From": "+12125550100", "Body": "info"})
        assert (
            "<Message>Acme Shop: parcel updates by SMS. Help: +49 30 1234 5678. Reply STOP to "
            "opt out, START to opt back in.</Message>"
        ) in await resp.text()


async def test_help_is_answered_in_english_when_its_template_fails(
    tmp_path: Path, redis_url: str, twilio: FakeTwilio
) -> None:
    brand = "name: Acme Shop\nsupport:\n  url: https://acme.example/help\n"
    settings = _with_brand(tmp_path, redis_url, twilio, brand)
    (tmp_path / "templates" / "sms" / "help.txt").write_text("{{ no_such_value }}")
    async with TestClient(TestServer(create_app(settings, clock=fixed_clock()))) as client:
        await sent_sms(client, settings, twilio)
        resp = await signed(
            client, "/v1/webhooks/twilio/inbound", {"From": "+33612345678", "Body": "HELP"}
        )
        assert (
            "<Message>Acme Shop: parcel updates by SMS. Help: https://acme.example/help. Reply "
            "STOP to opt out, START to opt back in.</Message>"
        ) in await resp.text()


async def test_replies_are_counted_without_a_signing_secret(
    hook_settings: Settings, twilio: FakeTwilio, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker records the last SMS to a number under a digest of it; the API looks a reply
    up by the same digest. Without NOTIFIER_SIGNING_SECRET each process keyed it with a
    secret of its own, so no reply or STOP was ever counted (found by a black-box probe):
    they share a key kept in Redis now. (Here both run in one process: the API is given
    another process's secret before the reply comes.)"""
    import notifier.settings

    assert hook_settings.signing_secret is None
    async with TestClient(TestServer(create_app(hook_settings, clock=fixed_clock()))) as client:
        await sent_sms(client, hook_settings, twilio)
        monkeypatch.setattr(notifier.settings, "_PROCESS_SECRET", "another process's own")
        inbound = "/v1/webhooks/twilio/inbound"
        resp = await signed(client, inbound, {"From": "+33612345678", "Body": "When?"})
        assert resp.status == 200
    async with open_resources(hook_settings) as res:
        found = await res.store.stats("acme", NOW.date(), NOW.date())
    assert found[NOW.date().isoformat()]["out_for_delivery|sms|fr_FR|replies"] == 1


# -- an SMS Twilio reports undeliverable after it took it: the email fallback ----------------


async def undeliverable_case(
    tmp_path: Path, redis_url: str, twilio: FakeTwilio, *, fallback: bool = True
) -> tuple[Settings, Client, str, str]:
    """A shipment whose "out for delivery" goes by SMS only (the policy), sent: the settings,
    a client, the SMS's id and Twilio's sid for it."""
    from tests.test_twilio import sms_only_policies

    settings = twilio_settings(tmp_path, redis_url, twilio).model_copy(
        update={"public_url": PUBLIC, "policies_dir": sms_only_policies(tmp_path, fallback)}
    )
    client = TestClient(TestServer(create_app(settings, clock=fixed_clock())))
    await client.start_server()
    nid, sid = await sent_sms(client, settings, twilio)
    return settings, client, nid, sid


async def report_and_sweep(
    client: Client, settings: Settings, form: dict[str, str], *, times: int = 1
) -> list[dict[str, Any]]:
    """Twilio's callback posted ``times``, then the due sweep: the shipment's decisions."""
    from notifier.pipeline import Pipeline
    from notifier.worker import release_due

    for _ in range(times):
        resp = await signed(client, "/v1/webhooks/twilio/status", form)
        assert resp.status == 204
    async with open_resources(settings, clock=fixed_clock()) as res:
        await release_due({"res": res, "pipeline": Pipeline(res)})
    decisions: list[dict[str, Any]] = await history(client)
    return decisions


@pytest.mark.parametrize(
    ("error", "why"),
    [
        ("30006", "landline or unreachable carrier"),
        ("30005", "unknown destination handset"),
        ("21610", "recipient replied STOP (opted out)"),
    ],
)
async def test_an_sms_reported_undeliverable_later_goes_by_email(
    tmp_path: Path, redis_url: str, twilio: FakeTwilio, error: str, why: str
) -> None:
    """The README's fallback ("an invalid or landline number, a STOP reported by the
    carrier") for a failure Twilio reports in its status callback, after it took the SMS:
    a landline is found out only then. Posted twice, as Twilio may: one email."""
    from tests.conftest import outbox_files

    settings, client, nid, sid = await undeliverable_case(tmp_path, redis_url, twilio)
    async with client:
        form = {"MessageSid": sid, "MessageStatus": "undelivered", "ErrorCode": error}
        decisions = await report_and_sweep(client, settings, form, times=2)
    [email] = outbox_files(settings, ".eml")
    assert "To: ana@example.com" in email.read_text()
    [fell_back] = [d for d in decisions if d["channel"] == "email"]
    assert fell_back["reason"] == (
        f"fallback: the SMS failed for good (Twilio: undelivered, error {error}: {why}); "
        "sent by email"
    )
    assert fell_back["event_id"] == "evt_1" and fell_back["delivery"]["status"] == "sent"
    [sms] = [d for d in decisions if d["channel"] == "sms"]
    assert sms["notification_id"] == nid and sms["delivery"]["provider_status"] == "undelivered"


async def test_a_collected_parcels_sms_reported_undeliverable_later_says_collected_by_email(
    tmp_path: Path, redis_url: str, twilio: FakeTwilio
) -> None:
    """The email rebuilt from the shipment's state for an SMS that failed later is the
    message the SMS was: a parcel collected from a pickup point, not a door delivery."""
    import email
    import email.policy

    from tests.conftest import outbox_files
    from tests.test_twilio import sms_only_policies

    policies = sms_only_policies(tmp_path)
    (policies / "acme.yaml").write_text(
        "statuses: {available_for_pickup: {channels: [sms]}, delivered: {channels: [sms]}}\n"
        "sms_fallback_to_email: true\n"
    )
    settings = twilio_settings(tmp_path, redis_url, twilio).model_copy(
        update={"public_url": PUBLIC, "policies_dir": policies}
    )
    en = {"email": "ana@example.com", "phone": "+33612345678", "locale": "en"}
    async with TestClient(TestServer(create_app(settings, clock=fixed_clock()))) as client:
        for event_id, status, at in (
            ("p", "available_for_pickup", "2026-11-21T10:00:00+01:00"),
            ("d", "delivered", "2026-11-21T12:00:00+01:00"),
        ):
            await post(
                client,
                transition(event_id=event_id, status=status, occurred_at=at, recipient=en),
            )
            await run_worker(settings)
        [decision] = [d for d in await history(client) if d["event_id"] == "d"]
        sid = decision["delivery"]["detail"].removeprefix("twilio:")
        assert "your parcel was collected." in twilio.received[-1]["Body"]
        form = {"MessageSid": sid, "MessageStatus": "undelivered", "ErrorCode": "30006"}
        decisions = await report_and_sweep(client, settings, form)
    assert [d["event_id"] for d in decisions if d["channel"] == "email"] == ["d"]
    [eml] = outbox_files(settings, ".eml")
    msg = email.message_from_bytes(eml.read_bytes(), policy=email.policy.default)
    assert msg["Subject"] == "Your parcel was collected"


@pytest.mark.parametrize(
    "case", ["temporary", "no error code", "policy off", "moved on", "a day old", "delivered"]
)
async def test_no_email_for_an_sms_that_may_still_arrive_or_is_no_longer_news(
    tmp_path: Path, redis_url: str, twilio: FakeTwilio, case: str
) -> None:
    """30003 (a handset switched off comes back), a failure without a code, a merchant
    that turned the fallback off, a shipment that moved on since (its newer update went out
    as decided), a callback more than a day after the update (as a late address does not
    catch up on stale news), and an SMS that was delivered: no email."""
    from datetime import timedelta

    from notifier.pipeline import Pipeline
    from notifier.worker import release_due
    from tests.conftest import outbox_files

    settings, client, _, sid = await undeliverable_case(
        tmp_path, redis_url, twilio, fallback=case != "policy off"
    )
    form = {"MessageSid": sid, "MessageStatus": "undelivered", "ErrorCode": "30006"}
    if case == "temporary":
        form["ErrorCode"] = "30003"
    elif case == "no error code":
        form = {"MessageSid": sid, "MessageStatus": "failed"}
    elif case == "delivered":
        form = {"MessageSid": sid, "MessageStatus": "delivered"}
    async with client:
        if case == "moved on":  # delivered since, and told so by SMS only
            (settings.policies_dir / "acme.yaml").write_text(
                "statuses: {out_for_delivery: {channels: [sms]}, delivered: {channels: [sms]}}\n"
            )
            later = transition(
                event_id="evt_2", status="delivered", occurred_at="2026-11-21T12:30:00+01:00"
            )
            await post(client, later)
            await run_worker(settings)
        if case == "a day old":
            later = create_app(settings, clock=fixed_clock(NOW + timedelta(hours=25)))
            async with TestClient(TestServer(later)) as late:
                resp = await signed(late, "/v1/webhooks/twilio/status", form)
                assert resp.status == 204
            async with open_resources(settings, clock=fixed_clock()) as res:
                await release_due({"res": res, "pipeline": Pipeline(res)})
            decisions: list[dict[str, Any]] = await history(client)
        else:
            decisions = await report_and_sweep(client, settings, form)
    assert [d for d in decisions if d["reason"].startswith("fallback")] == []
    assert outbox_files(settings, ".eml") == []
    if case == "moved on":
        assert len(twilio.received) == 2  # "delivered" went out by SMS


# -- SendGrid's signed event webhook --------------------------------------------------------------


def ec_keys() -> tuple[Any, str]:
    """A P-256 key pair as SendGrid uses: the public half base64 DER, as its settings show it."""
    import base64

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private = ec.generate_private_key(ec.SECP256R1())
    der = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, base64.b64encode(der).decode()


def sg_sign(private: Any, body: str, stamp: str) -> str:
    import base64

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    signature = private.sign((stamp + body).encode(), ec.ECDSA(hashes.SHA256()))
    return base64.b64encode(signature).decode()


@asynccontextmanager
async def sendgrid_app(
    tmp_path: Path, redis_url: str
) -> AsyncIterator[tuple[Client, Settings, Any, Any]]:
    """The API with SendGrid as the email channel (a fake on loopback) and its event
    webhook's public key: (client, settings, the fake, the private key that signs events)."""
    from tests.fakes import serve_sendgrid

    private, public = ec_keys()
    async with serve_sendgrid() as sendgrid:
        settings = make_settings(
            tmp_path,
            redis_url=redis_url,
            email_channel="sendgrid",
            sendgrid_api_key="SG.k",
            sendgrid_from="o@acme.example",
            sendgrid_base_url=sendgrid.url,
            sendgrid_webhook_public_key=public,
        )
        async with TestClient(TestServer(create_app(settings))) as c:
            yield c, settings, sendgrid, private


async def test_sendgrid_events_are_verified_and_recorded(tmp_path: Path, redis_url: str) -> None:
    import json
    import time

    async with sendgrid_app(tmp_path, redis_url) as (c, settings, _, private):
        await post(c, transition())
        await run_worker(settings)
        [decision] = [d for d in await history(c) if d["channel"] == "email"]
        nid = decision["notification_id"]

        def events(*kinds: str) -> str:
            return json.dumps(
                [
                    {
                        "event": k,
                        "notification_id": nid,
                        "merchant_id": "acme",
                        "shipment_id": "shp_123",  # our custom args, echoed
                        "email": "ana@example.com",
                        "sg_message_id": "x",
                    }
                    for k in kinds
                ]
            )

        async def deliver(body: str, signature: str | None, stamp: str) -> int:
            headers = {"X-Twilio-Email-Event-Webhook-Timestamp": stamp}
            if signature:
                headers["X-Twilio-Email-Event-Webhook-Signature"] = signature
            resp = await c.post("/v1/webhooks/sendgrid/events", data=body, headers=headers)
            return resp.status

        now = str(int(time.time()))
        body = events("processed", "delivered", "processed")
        assert await deliver(body, sg_sign(private, body, now), now) == 204
        [decision] = [d for d in await history(c) if d["channel"] == "email"]
        assert decision["delivery"]["provider_status"] == "delivered"  # no step back

        # signed, but not a list of events: 400 naming what it is (it was a silent 204)
        for wrong, kind in (('{"event": "bounce"}', "an object"), ('"hi"', "a string")):
            headers = {
                "X-Twilio-Email-Event-Webhook-Timestamp": now,
                "X-Twilio-Email-Event-Webhook-Signature": sg_sign(private, wrong, now),
            }
            resp = await c.post("/v1/webhooks/sendgrid/events", data=wrong, headers=headers)
            assert resp.status == 400
            message = (await resp.json())["error"]["message"]
            assert message == f"SendGrid events must be a JSON list, not {kind}"

        # tampered, missing, stale: 403, nothing changes
        bounce = events("bounce")
        assert await deliver(bounce, sg_sign(private, body, now), now) == 403
        assert await deliver(bounce, None, now) == 403
        old = str(int(time.time()) - 3600)
        assert await deliver(bounce, sg_sign(private, bounce, old), old) == 403
        [decision] = [d for d in await history(c) if d["channel"] == "email"]
        assert decision["delivery"]["provider_status"] == "delivered"

        # a "blocked" bounce is temporary: status only, the address stays usable
        blocked = json.dumps(
            [
                {
                    "event": "bounce",
                    "type": "blocked",
                    "notification_id": nid,
                    "merchant_id": "acme",
                    "shipment_id": "shp_123",
                    "email": "ana@example.com",
                }
            ]
        )
        assert await deliver(blocked, sg_sign(private, blocked, now), now) == 204
        async with open_resources(settings) as res:
            assert not await res.store.opted_out("acme", ["email:ana@example.com"])
        # an unsubscribe is an opt-out for that merchant
        unsub = events("unsubscribe")
        assert await deliver(unsub, sg_sign(private, unsub, now), now) == 204
        await post(
            c,
            transition(event_id="b", status="delivered", occurred_at="2026-11-21T13:00:00+01:00"),
        )
        await run_worker(settings)
        latest = [d for d in await history(c) if d["channel"] == "email"][-1]
        assert latest["reason"] == "recipient opted out of email"


async def test_sendgrid_events_are_refused_without_a_key(client: Client) -> None:
    resp = await client.post("/v1/webhooks/sendgrid/events", data="[]")
    assert resp.status == 403


async def test_sendgrid_events_about_an_idn_address_a_drop_reason_and_a_bad_body(
    tmp_path: Path, redis_url: str
) -> None:
    """Found by a black-box probe:
    - an unsubscribe SendGrid reports for ``idn@xn--mnchen-3ya.de`` (the ASCII form we send
      it) did not stop emails to ``idn@münchen.de``, the address the backend posts;
    - a drop for the message ("Invalid SMTPAPI header") opted the address out for good;
    - a body that is not UTF-8 was a 500 with a traceback, before any signature check."""
    import json
    import time

    async with sendgrid_app(tmp_path, redis_url) as (c, settings, sendgrid, private):
        now = str(int(time.time()))

        async def deliver(events: list[dict[str, Any]]) -> int:
            body = json.dumps(events)
            headers = {
                "X-Twilio-Email-Event-Webhook-Timestamp": now,
                "X-Twilio-Email-Event-Webhook-Signature": sg_sign(private, body, now),
            }
            resp = await c.post("/v1/webhooks/sendgrid/events", data=body, headers=headers)
            return resp.status

        def event(kind: str, email: str, **more: str) -> dict[str, Any]:
            return {
                "event": kind,
                "notification_id": "n_0",
                "merchant_id": "acme",
                "shipment_id": "shp_1",
                "email": email,
                **more,
            }

        assert await deliver([event("unsubscribe", "idn@xn--mnchen-3ya.de")]) == 204
        drop = event("dropped", "ana@example.com", reason="Invalid SMTPAPI header")
        assert await deliver([drop]) == 204
        for n, (shipment, email) in enumerate(
            [("shp_idn", "idn@münchen.de"), ("shp_ana", "ana@example.com")]
        ):
            body = transition(event_id=f"e{n}", shipment_id=shipment)
            body["recipient"] = {**body["recipient"], "email": email}
            await post(c, body)
        await run_worker(settings)
        [idn] = [d for d in await history(c, "shp_idn") if d["channel"] == "email"]
        assert idn["reason"] == "recipient opted out of email", idn
        [ana] = [d for d in await history(c, "shp_ana") if d["channel"] == "email"]
        assert ana["outcome"] == "sent", ana
        assert [m["personalizations"][0]["to"][0]["email"] for m in sendgrid.accepted] == [
            "ana@example.com"
        ]
        # an address drop still opts out
        bounced = event("dropped", "ana@example.com", reason="Bounced Address")
        assert await deliver([bounced]) == 204
        async with open_resources(settings) as res:
            assert await res.store.opted_out("acme", ["email:ana@example.com"])

        resp = await c.post("/v1/webhooks/sendgrid/events", data=b"\xff\xfe[]")
        assert resp.status == 400
        assert "must be UTF-8 JSON" in (await resp.json())["error"]["message"]
        bogus = {"Content-Type": "application/json; charset=bogus"}
        resp = await c.post("/v1/webhooks/sendgrid/events", data=b"[]", headers=bogus)
        assert resp.status == 403  # read as UTF-8 whatever it claims; then unsigned


async def test_an_opt_out_kept_under_an_idn_domain_as_given_still_holds(
    tmp_path: Path, redis_url: str
) -> None:
    """Opt-outs written before keys held the domain in ASCII keep working, and an opt-in
    removes them."""
    settings = make_settings(tmp_path, redis_url=redis_url)
    async with open_resources(settings) as res:
        assert opt_out_key(ChannelKind.EMAIL, "Idn@München.de") == "email:idn@xn--mnchen-3ya.de"
        await res.store.set_opt_out("acme", "email:idn@münchen.de", True)  # as written before
        key = opt_out_key(ChannelKind.EMAIL, "idn@münchen.de")
        assert await res.store.opted_out("acme", [key]) == {key}
        assert await res.store.set_opt_out("acme", key, False)
        assert await res.store.opted_out("acme", [key]) == set()
