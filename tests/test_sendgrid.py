"""The SendGrid channel: the SDK's Mail helper payload, posted with aiohttp to a fake SendGrid."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from notifier.app import create_app
from notifier.channels import Outgoing, Receipt
from notifier.channels.base import retry_after_s
from notifier.channels.sendgrid import SendGridChannel, build_sendgrid
from notifier.errors import PermanentDeliveryError, TemporaryDeliveryError
from notifier.render import EmailMessageOut
from tests.conftest import auth, history, make_settings, post, run_worker, transition
from tests.fakes import FakeSendGrid, Reply, serve_sendgrid

KEY = "SG.fake-key"


@pytest.fixture
async def sendgrid() -> AsyncIterator[FakeSendGrid]:
    async with serve_sendgrid() as fake:
        yield fake


def email_out(nid: str = "n_1", to: str = "ana@example.com") -> Outgoing:
    message = EmailMessageOut(
        nid,
        "acme",
        "s1",
        to,
        "Acme <orders@acme.example>",
        "Your parcel arrives today",
        "Hello Ana,\n",
        "<p>Hello Ana,</p>",
        headers={"List-Unsubscribe": "<https://acme.example/u/1>"},
    )
    return Outgoing(message, datetime(2026, 11, 21, 14, tzinfo=UTC))


async def send(fake: FakeSendGrid, *items: Outgoing, timeout_s: float = 5.0) -> list[Any]:
    ch: SendGridChannel = build_sendgrid(KEY, base_url=fake.url, timeout_s=timeout_s)
    try:
        return await ch.send_many(items or (email_out(),))
    finally:
        await ch.aclose()


async def test_payload_comes_from_the_mail_helper(sendgrid: FakeSendGrid) -> None:
    [receipt] = await send(sendgrid)
    assert isinstance(receipt, Receipt) and receipt.detail == "sg0"
    [body] = sendgrid.received
    assert body["from"] == {"email": "orders@acme.example", "name": "Acme"}
    assert body["personalizations"][0]["to"] == [{"email": "ana@example.com"}]
    assert body["subject"] == "Your parcel arrives today"
    assert [c["type"] for c in body["content"]] == ["text/plain", "text/html"]
    assert body["custom_args"] == {
        "notification_id": "n_1",
        "merchant_id": "acme",
        "shipment_id": "s1",
    }
    assert body["headers"] == {"List-Unsubscribe": "<https://acme.example/u/1>"}
    assert sendgrid.auth == [f"Bearer {KEY}"]


async def test_a_domain_that_is_not_ascii_goes_in_its_ascii_form(sendgrid: FakeSendGrid) -> None:
    """IDNA, as email-validator reads the address (a local part has no ASCII form)."""
    await send(sendgrid, email_out(to="anna@müller.de"), email_out("n_2", "anä@exämple.com"))
    sent = sorted(to["email"] for b in sendgrid.received for to in b["personalizations"][0]["to"])
    assert sent == ["anna@xn--mller-kva.de", "anä@xn--exmple-cua.com"]


@pytest.mark.parametrize("status", [429, 500, 503])
async def test_rate_limits_and_server_errors_are_retried(
    sendgrid: FakeSendGrid, status: int
) -> None:
    sendgrid.fail(status, headers={"Retry-After": "12"} if status == 429 else None)
    [outcome] = await send(sendgrid)
    assert isinstance(outcome, TemporaryDeliveryError)
    assert outcome.retry_after_s == (12 if status == 429 else None)


async def test_retry_after_as_an_http_date_is_honoured(sendgrid: FakeSendGrid) -> None:
    # RFC 9110 allows an HTTP-date instead of seconds; a minute from now is about 60 s
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=60), usegmt=True)
    sendgrid.fail(429, headers={"Retry-After": later})
    [outcome] = await send(sendgrid)
    assert isinstance(outcome, TemporaryDeliveryError)
    assert outcome.retry_after_s is not None and 55 <= outcome.retry_after_s <= 60


def test_retry_after_reads_both_forms() -> None:
    now = datetime(2026, 12, 3, 10, 0, tzinfo=UTC)
    assert retry_after_s("120", now) == 120
    assert retry_after_s("Thu, 03 Dec 2026 10:01:30 GMT", now) == 90
    assert retry_after_s("Thu, 03 Dec 2026 09:00:00 GMT", now) == 0  # in the past: at once
    assert retry_after_s("soon", now) is None and retry_after_s(None, now) is None


async def test_a_hanging_sendgrid_is_a_timeout_to_retry(sendgrid: FakeSendGrid) -> None:
    sendgrid.fail(202, delay_s=2.0)
    [outcome] = await send(sendgrid, timeout_s=0.3)
    assert isinstance(outcome, TemporaryDeliveryError) and "unreachable" in outcome.reason


@pytest.mark.parametrize(
    ("status", "text"), [(400, "refused"), (401, "API key"), (403, "API key"), (413, "refused")]
)
async def test_client_errors_are_permanent(sendgrid: FakeSendGrid, status: int, text: str) -> None:
    sendgrid.fail(status)
    [outcome] = await send(sendgrid)
    assert isinstance(outcome, PermanentDeliveryError) and text in outcome.reason


async def test_a_refusal_that_names_the_recipient_is_kept_without_the_address(
    sendgrid: FakeSendGrid,
) -> None:
    """SendGrid's words go to the ledger, `dead-letters` (which masks recipients unless
    --reveal) and the merchant's webhooks: the address they name is left out."""
    refusal = {"errors": [{"message": "The to email bad.one@example.com is not valid"}]}
    sendgrid.script.append(Reply(400, refusal))
    [outcome] = await send(sendgrid)
    assert isinstance(outcome, PermanentDeliveryError)
    assert "The to email [email] is not valid" in outcome.reason
    assert "bad.one" not in outcome.reason


async def test_end_to_end_email_through_sendgrid(
    tmp_path: Path, redis_url: str, sendgrid: FakeSendGrid
) -> None:
    settings = make_settings(
        tmp_path,
        redis_url=redis_url,
        email_channel="sendgrid",
        sendgrid_api_key=KEY,
        sendgrid_from="orders@acme.example",
        sendgrid_base_url=sendgrid.url,
    )
    async with TestClient(TestServer(create_app(settings))) as client:
        await post(client, transition())
        await run_worker(settings)
        [body] = sendgrid.received
        assert body["from"]["email"] == "orders@acme.example"
        [decision] = [d for d in await history(client) if d["channel"] == "email"]
        assert body["custom_args"]["notification_id"] == decision["notification_id"]
        assert decision["delivery"]["status"] == "sent"
        assert decision["delivery"]["detail"] == "sendgrid:sg0"
        # the editor's preview shows the sender real sends use (it showed the outbox's
        # NOTIFIER_EMAIL_FROM: found by an operator's drill)
        preview = await client.post(
            "/v1/merchants/acme/preview", json={"milestone": "delivered"}, headers=auth()
        )
        assert preview.status == 200, await preview.text()
        assert "<orders@acme.example>" in (await preview.json())["from"]


async def test_sendgrid_sends_from_its_verified_sender(sendgrid: FakeSendGrid) -> None:
    ch = build_sendgrid(KEY, base_url=sendgrid.url, timeout_s=5, sender="verified@shop.example")
    try:
        await ch.send_many([email_out()])
    finally:
        await ch.aclose()
    assert sendgrid.received[0]["from"] == {"email": "verified@shop.example", "name": "Acme"}


@pytest.mark.parametrize("status", [501, 507, 520, 524])
async def test_every_server_error_is_retried(sendgrid: FakeSendGrid, status: int) -> None:
    sendgrid.fail(status)
    [outcome] = await send(sendgrid)
    assert isinstance(outcome, TemporaryDeliveryError)


def test_a_sendgrid_key_needs_a_verified_sender(tmp_path: Path) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="NOTIFIER_SENDGRID_FROM"):
        make_settings(tmp_path, sendgrid_api_key=KEY)
