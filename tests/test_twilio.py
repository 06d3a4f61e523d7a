"""The Twilio channel: the real twilio SDK against a fake Twilio on loopback."""

from __future__ import annotations

import base64
import math
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from notifier.app import create_app
from notifier.channels import Outgoing, Receipt
from notifier.channels.twilio import TwilioChannel, build_twilio
from notifier.errors import PermanentDeliveryError, TemporaryDeliveryError
from notifier.render import SmsMessageOut
from notifier.render.sms import SmsEncoding
from notifier.resources import open_resources
from notifier.settings import Settings
from tests.conftest import (
    fixed_clock,
    history,
    make_settings,
    post,
    read_whole_inbox,
    run_worker,
    transition,
)
from tests.fakes import FakeTwilio, Reply, serve_twilio

SID, TOKEN = "AC" + "0" * 32, "secret-token"


@pytest.fixture
async def twilio() -> AsyncIterator[FakeTwilio]:
    async with serve_twilio() as fake:
        yield fake


def channel(fake: FakeTwilio, **kw: Any) -> TwilioChannel:
    return build_twilio(
        SID,
        TOKEN,
        base_url=fake.url,
        from_number=kw.pop("from_", "+15005550006"),
        messaging_service_sid=kw.pop("service", None),
        timeout_s=kw.pop("timeout_s", 5.0),
    )


def sms(nid: str = "n_1", to: str = "+33612345678") -> Outgoing:
    message = SmsMessageOut(
        nid, "acme", "s1", to, "Your parcel arrives today.", SmsEncoding.GSM7, 1
    )
    return Outgoing(message, datetime(2026, 11, 21, 14, tzinfo=UTC))


async def send(ch: TwilioChannel, *items: Outgoing) -> list[Any]:
    try:
        return await ch.send_many(items or (sms(),))
    finally:
        await ch.aclose()


async def test_sends_through_the_real_sdk(twilio: FakeTwilio) -> None:
    [receipt] = await send(channel(twilio))
    assert isinstance(receipt, Receipt) and receipt.detail.startswith("SM")
    assert twilio.received == [
        {"To": "+33612345678", "Body": "Your parcel arrives today.", "From": "+15005550006"}
    ]
    user, _, password = base64.b64decode(twilio.auth[0].split()[1]).decode().partition(":")
    assert (user, password) == (SID, TOKEN)


async def test_messaging_service_instead_of_a_number(twilio: FakeTwilio) -> None:
    await send(channel(twilio, from_=None, service="MG" + "1" * 32))
    assert twilio.received[0]["MessagingServiceSid"] == "MG" + "1" * 32
    assert "From" not in twilio.received[0]


async def test_429_is_retried_after_what_twilio_asks(twilio: FakeTwilio) -> None:
    twilio.fail(429, 20429, retry_after="30")
    [outcome] = await send(channel(twilio))
    assert isinstance(outcome, TemporaryDeliveryError) and outcome.retry_after_s == 30


@pytest.mark.parametrize("status", [500, 502, 503])
async def test_server_errors_are_retried(twilio: FakeTwilio, status: int) -> None:
    twilio.fail(status)
    [outcome] = await send(channel(twilio))
    assert isinstance(outcome, TemporaryDeliveryError)


async def test_a_hanging_twilio_is_a_timeout_to_retry(twilio: FakeTwilio) -> None:
    twilio.fail(201, delay_s=2.0)
    [outcome] = await send(channel(twilio, timeout_s=0.3))
    assert isinstance(outcome, TemporaryDeliveryError)
    assert "unreachable" in outcome.reason


async def test_connection_refused_is_retried() -> None:
    async with serve_twilio() as fake:
        url = fake.url
    ch = build_twilio(
        SID, TOKEN, base_url=url, from_number="+15005550006", messaging_service_sid=None
    )
    [outcome] = await send(ch)
    assert isinstance(outcome, TemporaryDeliveryError)


@pytest.mark.parametrize(
    ("status", "code", "opted_out", "text"),
    [
        (400, 21211, False, "invalid 'To' phone number"),
        (400, 21610, True, "opted out"),
        (401, 20003, False, "credentials"),
        (400, 99999, False, "fake error 99999"),
    ],
)
async def test_permanent_failures_are_never_retried(
    twilio: FakeTwilio, status: int, code: int, opted_out: bool, text: str
) -> None:
    twilio.fail(status, code)
    [outcome] = await send(channel(twilio))
    assert isinstance(outcome, PermanentDeliveryError)
    assert outcome.opted_out is opted_out and text in outcome.reason


async def test_twilio_words_that_name_the_number_are_kept_without_it(twilio: FakeTwilio) -> None:
    """An error code we have no words for keeps Twilio's, without the number they name."""
    words = "The 'To' number +15005550001 is not reachable"
    twilio.script.append(Reply(400, {"code": 21999, "message": words, "status": 400}))
    [outcome] = await send(channel(twilio))
    assert isinstance(outcome, PermanentDeliveryError)
    assert outcome.reason.endswith(": The 'To' number [phone] is not reachable")
    assert outcome.reason.startswith("Twilio error 21999: ")


async def test_one_failure_does_not_sink_the_batch(twilio: FakeTwilio) -> None:
    twilio.fail(400, 21211)
    outcomes = await send(channel(twilio), sms("n_1"), sms("n_2"), sms("n_3"))
    assert sum(isinstance(o, Receipt) for o in outcomes) == 2
    assert sum(isinstance(o, PermanentDeliveryError) for o in outcomes) == 1


def twilio_settings(tmp_path: Path, redis_url: str, fake: FakeTwilio) -> Settings:
    return make_settings(
        tmp_path,
        redis_url=redis_url,
        sms_channel="twilio",
        twilio_account_sid=SID,
        twilio_auth_token=TOKEN,
        twilio_from="+15005550006",
        twilio_base_url=fake.url,
    )


async def test_end_to_end_sms_through_twilio(
    tmp_path: Path, redis_url: str, twilio: FakeTwilio
) -> None:
    settings = twilio_settings(tmp_path, redis_url, twilio)
    async with TestClient(TestServer(create_app(settings))) as client:
        await post(client, transition())
        await run_worker(settings)
        assert [r["To"] for r in twilio.received] == ["+33612345678"]
        [sms_decision] = [d for d in await history(client) if d["channel"] == "sms"]
        assert sms_decision["delivery"]["status"] == "sent"
        assert sms_decision["delivery"]["detail"].startswith("twilio:SM")


async def test_stop_reported_by_twilio_is_recorded_as_an_opt_out(
    tmp_path: Path, redis_url: str, twilio: FakeTwilio
) -> None:
    settings = twilio_settings(tmp_path, redis_url, twilio)
    twilio.fail(400, 21610)
    async with TestClient(TestServer(create_app(settings))) as client:
        await post(client, transition(event_id="a"))
        await run_worker(settings)
        [first] = [d for d in await history(client) if d["channel"] == "sms"]
        assert first["delivery"]["status"] == "failed"
        await post(
            client,
            transition(event_id="b", status="delivered", occurred_at="2026-11-21T13:00:00+01:00"),
        )
        await run_worker(settings)
        [_, second] = [d for d in await history(client) if d["channel"] == "sms"]
        assert second["reason"] == "recipient opted out of sms"
    assert len(twilio.received) == 1  # Twilio was never asked again
    async with open_resources(settings) as res:
        from notifier.models import ChannelKind
        from notifier.policy import opt_out_key

        key = opt_out_key(ChannelKind.SMS, "+33612345678")
        assert await res.store.opted_out("globex", [key]) == {key}  # the number blocked us
        await res.store.set_opt_out(res.store.EVERY_MERCHANT, key, False)  # what START does
        assert await res.store.opted_out("acme", [key]) == set()


async def test_twilio_429_puts_the_message_back_on_the_due_index(
    tmp_path: Path, redis_url: str, twilio: FakeTwilio
) -> None:
    settings = twilio_settings(tmp_path, redis_url, twilio)
    twilio.fail(429, 20429, retry_after="120")
    async with TestClient(TestServer(create_app(settings))) as client:
        await post(client, transition())
        await run_worker(settings)
        [sms_decision] = [d for d in await history(client) if d["channel"] == "sms"]
        assert sms_decision["delivery"]["status"] == "deferred"
    async with open_resources(settings, clock=fixed_clock()) as res:
        [(_, due)] = await res.store.due_entries(math.inf)
        assert due >= fixed_clock()().timestamp() * 1000 + 120_000


def sms_only_policies(tmp_path: Path, fallback: bool = True) -> Path:
    import shutil

    from notifier.resources import data_dir

    policies = tmp_path / "policies"
    shutil.copytree(data_dir("policies", None), policies)
    (policies / "acme.yaml").write_text(
        "statuses: {out_for_delivery: {channels: [sms]}}\n"
        f"sms_fallback_to_email: {'true' if fallback else 'false'}\n"
    )
    return policies


@pytest.mark.parametrize("fallback", [True, False])
async def test_a_failed_sms_falls_back_to_email(
    tmp_path: Path, redis_url: str, twilio: FakeTwilio, fallback: bool
) -> None:
    from notifier.pipeline import Pipeline
    from notifier.worker import release_due
    from tests.conftest import outbox_files

    settings = twilio_settings(tmp_path, redis_url, twilio).model_copy(
        update={"policies_dir": sms_only_policies(tmp_path, fallback)}
    )
    twilio.fail(400, 21211)  # not a valid mobile number
    async with TestClient(TestServer(create_app(settings))) as client:
        await post(client, transition())
        await run_worker(settings)
        async with open_resources(settings, clock=fixed_clock()) as res:
            await release_due({"res": res, "pipeline": Pipeline(res)})
            await release_due({"res": res, "pipeline": Pipeline(res)})  # never twice
        decisions = await history(client)
    emails = outbox_files(settings, ".eml")
    if not fallback:
        assert emails == [] and [d["channel"] for d in decisions] == ["sms"]
        return
    assert len(emails) == 1
    [fell_back] = [d for d in decisions if d["channel"] == "email"]
    assert fell_back["reason"].startswith("fallback: the SMS failed for good")
    assert "invalid 'To' phone number" in fell_back["reason"]
    assert fell_back["delivery"]["status"] == "sent"


async def test_no_fallback_when_the_email_went_out_already(
    tmp_path: Path, redis_url: str, twilio: FakeTwilio
) -> None:
    from notifier.pipeline import Pipeline
    from notifier.worker import release_due
    from tests.conftest import outbox_files

    settings = twilio_settings(tmp_path, redis_url, twilio)
    twilio.fail(400, 21211)
    async with TestClient(TestServer(create_app(settings))) as client:
        await post(client, transition())  # default policy: email and SMS
        await run_worker(settings)
        async with open_resources(settings, clock=fixed_clock()) as res:
            await release_due({"res": res, "pipeline": Pipeline(res)})
    assert len(outbox_files(settings, ".eml")) == 1


async def test_retries_are_bounded_and_end_in_the_dead_letter_list(
    tmp_path: Path, redis_url: str, twilio: FakeTwilio
) -> None:
    from datetime import timedelta

    from notifier.delivery import MAX_ATTEMPTS
    from notifier.pipeline import Pipeline
    from notifier.worker import release_due
    from tests.conftest import NOW

    settings = twilio_settings(tmp_path, redis_url, twilio)
    for _ in range(MAX_ATTEMPTS + 2):
        twilio.fail(503)
    async with TestClient(TestServer(create_app(settings))) as client:
        await post(client, transition())
        await run_worker(settings)
        for hour in range(1, 30):  # time passes; each retry is due within the backoff cap
            async with open_resources(
                settings, clock=fixed_clock(NOW + timedelta(hours=hour))
            ) as res:
                await release_due({"res": res, "pipeline": Pipeline(res)})
        [sms_decision] = [d for d in await history(client) if d["channel"] == "sms"]
        assert sms_decision["delivery"]["status"] == "failed"
        assert sms_decision["delivery"]["error"].startswith(f"gave up after {MAX_ATTEMPTS}")
        health = await (await client.get("/healthz")).json()
        assert health["dead_letters"]["notifications"] == 1
    assert len(twilio.received) == MAX_ATTEMPTS


class _Died(BaseException):
    """The worker process dying."""


async def test_crash_after_twilio_accepted_is_the_only_at_least_once_window(
    tmp_path: Path, redis_url: str, twilio: FakeTwilio
) -> None:
    import contextlib
    from datetime import timedelta

    from notifier.delivery import LEASE_MS
    from notifier.models import ChannelKind
    from notifier.pipeline import Pipeline
    from tests.conftest import NOW

    settings = twilio_settings(tmp_path, redis_url, twilio)
    async with TestClient(TestServer(create_app(settings))) as client:
        await post(client, transition())
        async with open_resources(settings, clock=fixed_clock()) as res:
            entries = await read_whole_inbox(res, "w1")
            real = res.channels[ChannelKind.SMS]

            class DiesAfterSending:
                name = "twilio"

                async def send_many(self, items: Any) -> Any:
                    await real.send_many(items)  # Twilio accepts the SMS...
                    raise _Died  # ...and the worker dies before recording it

            res.channels = {**res.channels, ChannelKind.SMS: DiesAfterSending()}
            with contextlib.suppress(_Died):
                await Pipeline(res).process(entries)
        assert len(twilio.received) == 1

        # another worker while the dead one's claim is live: nothing is sent again
        async with open_resources(settings, clock=fixed_clock()) as res:
            report = await Pipeline(res).deliverer.deliver(
                [d["notification_id"] for d in await history(client) if d["channel"] == "sms"]
            )
            assert report.busy and len(twilio.received) == 1

        # after the lease: Twilio has no idempotency key, so the SMS goes once more
        later = NOW + timedelta(milliseconds=LEASE_MS + 11_000)  # lease: 60 s + one timeout
        async with open_resources(settings, clock=fixed_clock(later)) as res:
            report = await Pipeline(res).deliverer.deliver(
                [d["notification_id"] for d in await history(client) if d["channel"] == "sms"]
            )
            assert len(report.sent) == 1
        assert len(twilio.received) == 2  # the documented at-least-once window, exactly once


async def test_each_merchant_may_choose_its_channel(
    tmp_path: Path, redis_url: str, twilio: FakeTwilio
) -> None:
    import shutil

    from notifier.resources import data_dir
    from tests.conftest import outbox_files

    templates = tmp_path / "templates"
    shutil.copytree(data_dir("templates", None), templates)
    (templates / "acme").mkdir()
    (templates / "acme" / "brand.yaml").write_text("name: Acme\nchannels: {sms: outbox}\n")
    settings = twilio_settings(tmp_path, redis_url, twilio).model_copy(
        update={"templates_dir": templates}
    )
    async with TestClient(TestServer(create_app(settings))) as client:
        await post(client, transition(), transition(event_id="g", merchant_id="globex"))
        await run_worker(settings)
    assert [p.parent.parent.name for p in outbox_files(settings, ".sms.json")] == ["acme"]
    assert len(twilio.received) == 1  # globex uses the service default, Twilio


def test_check_refuses_a_channel_that_is_not_configured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    from notifier.cli import main
    from notifier.resources import data_dir

    templates = tmp_path / "templates"
    shutil.copytree(data_dir("templates", None), templates)
    (templates / "acme").mkdir()
    (templates / "acme" / "brand.yaml").write_text("channels: {email: sendgrid}\n")
    monkeypatch.setenv("NOTIFIER_TEMPLATES_DIR", str(templates))
    monkeypatch.chdir(tmp_path)
    assert main(["check"]) == 1
    assert "templates/acme/brand.yaml: channels.email: sendgrid is not configured" in (
        capsys.readouterr().err
    )


# -- review findings ------------------------------------------------------------------------------


async def test_a_worker_whose_claim_was_taken_over_cannot_overwrite(
    tmp_path: Path, redis_url: str
) -> None:
    from notifier.delivery import LEASE_MS

    settings = make_settings(tmp_path, redis_url=redis_url)
    async with open_resources(settings) as res:
        key = res.store.notification_key("n_x")
        await res.redis.hset(key, mapping={"st": "pending", "p": "{}", "attempts": "0"})
        [(first, *_)] = await res.store.claim(["n_x"], 0, LEASE_MS, owner="A")
        [(second, *_)] = await res.store.claim(["n_x"], LEASE_MS + 1, LEASE_MS, owner="B")
        assert (first.value, second.value) == ("fresh", "reclaimed")
        at, where = "2026-11-21T14:00:00+00:00", {"n_x": ("acme", "s1")}
        await res.store.mark_sent([("n_x", at, "twilio:SMb")], "B", where=where)
        await res.store.reschedule("n_x", 10**13, "late timeout", "A")  # A wakes up late
        await res.store.mark_failed("n_x", "late failure", "A")
        ledger = (await res.store.deliveries("acme", "s1", ["n_x"]))["n_x"]
        assert (ledger["status"], ledger["detail"]) == ("sent", "twilio:SMb")
        assert await res.store.due_count() == 0
        assert await res.store.dead_letters() == {"notifications": 0, "inbox": 0}


async def test_an_unreadable_answer_does_not_sink_the_batch(twilio: FakeTwilio) -> None:
    from tests.fakes import Reply

    twilio.script += [Reply(201), Reply(201, text="<html>proxy</html>"), Reply(201)]
    outcomes = await send(channel(twilio), sms("n_1"), sms("n_2"), sms("n_3"))
    assert all(isinstance(o, Receipt) for o in outcomes)  # accepted: never resent
    assert len(twilio.received) == 3


async def test_an_acceptance_without_a_sid_is_not_resent(twilio: FakeTwilio) -> None:
    """Twilio took the SMS (201) but its answer named no sid: that was a temporary error,
    retried, and the customer got the SMS twice (found by a black-box probe)."""
    from tests.fakes import Reply

    twilio.script.append(Reply(201, {"status": "queued", "to": "+33612345678"}))
    [outcome] = await send(channel(twilio), sms("n_1"))
    assert isinstance(outcome, Receipt), outcome
    assert outcome.detail == "accepted-unreadable-n_1"
    assert len(twilio.received) == 1
