"""Twilio webhooks: signatures (valid, tampered, missing), status order, STOP/START/HELP."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from twilio.request_validator import RequestValidator

from notifier.app import create_app
from notifier.settings import Settings
from tests.conftest import history, make_settings, post, run_worker, transition
from tests.fakes import FakeTwilio, serve_twilio
from tests.test_twilio import SID, TOKEN

PUBLIC = "https://notify.example.com"

Client = TestClient[Any, Any]


@pytest.fixture
async def twilio() -> AsyncIterator[FakeTwilio]:
    async with serve_twilio() as fake:
        yield fake


@pytest.fixture
def hook_settings(tmp_path: Path, redis_url: str, twilio: FakeTwilio) -> Settings:
    return make_settings(
        tmp_path,
        redis_url=redis_url,
        sms_channel="twilio",
        twilio_account_sid=SID,
        twilio_auth_token=TOKEN,
        twilio_from="+15005550006",
        twilio_base_url=twilio.url,
        public_url=PUBLIC,
    )


@pytest.fixture
async def client(hook_settings: Settings) -> AsyncIterator[Client]:
    async with TestClient(TestServer(create_app(hook_settings))) as c:
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
    await sent_sms(client, hook_settings, twilio)
    assert twilio.received[0]["StatusCallback"] == PUBLIC + "/v1/webhooks/twilio/status"


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

    await signed(client, inbound, {"From": "+33612345678", "Body": "START"})
    await post(
        client,
        transition(event_id="b", status="delivered", occurred_at="2026-11-21T13:00:00+01:00"),
    )
    await run_worker(hook_settings)
    assert len(twilio.received) == 1

    resp = await signed(client, inbound, {"From": "+33612345678", "Body": "help"})
    assert "Reply STOP to opt out" in await resp.text()
    resp = await signed(client, inbound, {"From": "+33612345678", "Body": "STOP"}, "bad")
    assert resp.status == 403
