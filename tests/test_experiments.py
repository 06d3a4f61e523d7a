"""A/B variants of a message (issue 17): a policy's experiment sends a message's variant b
(``messages/<name>.b.jinja``) to a deterministic share of shipments, and the analytics
report each variant's outcomes (accepted, delivered, opened, clicked, SMS replies, STOPs)."""

from __future__ import annotations

import email
import email.policy
import shutil
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer
from pydantic import ValidationError

from notifier.app import create_app
from notifier.check import check_all
from notifier.insights.counts import recipient_digest
from notifier.insights.experiments import p_value
from notifier.policy.rules import Experiment, Policy
from notifier.resources import data_dir, open_resources
from notifier.webhooks import _email_event
from tests.conftest import (
    ACME_KEY,
    NOW,
    auth,
    fixed_clock,
    make_settings,
    outbox_files,
    post,
    run_worker,
    transition,
)
from tests.fakes import FakeSendGrid, FakeTwilio, serve_sendgrid, serve_twilio
from tests.test_merchant_hooks import Receiver, endpoint, send
from tests.test_merchant_hooks import receiver as receiver  # a fixture: the merchant's receiver
from tests.test_twilio import twilio_settings
from tests.test_webhooks import PUBLIC, signed

Client = TestClient[Any, Any]
DAY = "from=2026-11-21&to=2026-11-21"
TEST = "short-words"
SECRET = "a-signing-secret-for-the-tests"
SHIPMENTS = 40


def _variant_b(templates: Path, *, locale: str = "") -> None:
    """acme's variant b of out_for_delivery: its own subject and SMS, the rest as a."""
    words = (templates / "messages" / "out_for_delivery.jinja").read_text()
    lines = [
        "{%- macro subject() -%}VARIANT-B today{%- endmacro -%}"
        if line.startswith("{%- macro subject()")
        else "{%- macro sms() -%}VARIANT-B sms{%- endmacro -%}"
        if line.startswith("{%- macro sms()")
        else line
        for line in words.splitlines()
    ]
    folder = templates / "acme" / "messages"
    folder.mkdir(parents=True, exist_ok=True)
    name = f"out_for_delivery.b.{locale}.jinja" if locale else "out_for_delivery.b.jinja"
    (folder / name).write_text("\n".join(lines) + "\n")


def _files(tmp_path: Path, policy: str, *, b_locale: str | None = "") -> dict[str, Path]:
    templates = tmp_path / "templates"
    shutil.copytree(data_dir("templates", None), templates)
    if b_locale is not None:
        _variant_b(templates, locale=b_locale)
    policies = tmp_path / "policies"
    shutil.copytree(data_dir("policies", None), policies)
    (policies / "acme.yaml").write_text(policy)
    return {"templates_dir": templates, "policies_dir": policies}


POLICY = f"experiments: [{{name: {TEST}, message: out_for_delivery, b_percent: 50}}]\n"


def shipments(count: int = SHIPMENTS, locale: str = "fr_FR") -> list[dict[str, Any]]:
    return [
        transition(
            event_id=f"evt_{i}",
            shipment_id=f"shp_{i}",
            recipient={
                "name": "Ana",
                "email": f"ana{i}@example.com",
                "phone": f"+336123{i:05d}",
                "locale": locale,
                "timezone": "Europe/Paris",
            },
        )
        for i in range(count)
    ]


def drawn(shipment_id: str) -> str:
    test = Experiment(name=TEST, message="out_for_delivery", b_percent=50)
    return test.variant("acme", shipment_id)


async def experiments(client: Client) -> list[dict[str, Any]]:
    resp = await client.get(f"/v1/merchants/acme/experiments?{DAY}", headers=auth(ACME_KEY))
    assert resp.status == 200, await resp.text()
    found: list[dict[str, Any]] = (await resp.json())["experiments"]
    return found


def test_the_draw_is_fixed_per_shipment_spread_evenly_and_new_per_name() -> None:
    test = Experiment(name="x", message="delivered", b_percent=30)
    draws = [test.variant("acme", f"s{i}") for i in range(4000)]
    assert draws == [test.variant("acme", f"s{i}") for i in range(4000)]
    assert 0.27 < draws.count("b") / 4000 < 0.33
    renamed = Experiment(name="y", message="delivered", b_percent=30)
    moved = sum(a != renamed.variant("acme", f"s{i}") for i, a in enumerate(draws))
    assert moved > 1000  # a new name draws anew, not the same shipments again
    assert {Experiment(name="x", message="delivered", b_percent=0).variant("m", "s")} == {"a"}
    assert Experiment(name="x", message="delivered", b_percent=100).variant("m", "s") == "b"


@pytest.mark.parametrize(
    ("experiments", "problem"),
    [
        ([{"name": "x", "message": "nope", "b_percent": 5}], "no message 'nope'"),
        ([{"name": "Bad Name", "message": "delivered", "b_percent": 5}], "lowercase letters"),
        ([{"name": "x", "message": "delivered", "b_percent": 101}], "less than or equal"),
        (
            [
                {"name": "x", "message": "delivered", "b_percent": 5},
                {"name": "x", "message": "picked_up", "b_percent": 5},
            ],
            "two experiments with the name 'x'",
        ),
        (
            [
                {"name": "x", "message": "delivered", "b_percent": 5},
                {"name": "y", "message": "delivered", "b_percent": 5},
            ],
            "two experiments with the message 'delivered'",
        ),
    ],
)
def test_bad_experiments_are_refused_naming_the_problem(
    experiments: list[dict[str, Any]], problem: str
) -> None:
    with pytest.raises(ValidationError, match=problem):
        Policy.model_validate({"experiments": experiments})


def test_p_value_of_two_rates() -> None:
    # 50 of 100 against 70 of 100: z = 2.89, p = 0.0039 (two-sided, pooled)
    assert p_value(50, 100, 70, 100) == pytest.approx(0.0039, abs=0.0002)
    assert p_value(50, 100, 50, 100) == 1.0
    assert p_value(0, 100, 0, 100) is None  # no variance
    assert p_value(3, 0, 1, 10) is None


async def test_each_shipment_reads_its_variant_on_both_channels_and_is_counted_in_it(
    tmp_path: Path, redis_url: str
) -> None:
    settings = make_settings(tmp_path, redis_url=redis_url, **_files(tmp_path, POLICY))
    async with TestClient(TestServer(create_app(settings, clock=fixed_clock()))) as client:
        await post(client, *shipments())
        await run_worker(settings)
        read: dict[str, set[str]] = {}
        for path in outbox_files(settings):
            shipment = path.parent.name
            if path.name.endswith(".eml"):
                mail = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
                text = str(mail["Subject"])
            else:
                text = orjson.loads(path.read_bytes())["body"]
            read.setdefault(shipment, set()).add("b" if "VARIANT-B" in text else "a")
        assert len(read) == SHIPMENTS
        for shipment, variants in read.items():
            assert variants == {drawn(shipment)}, shipment  # email and SMS alike
        b = sum(v == {"b"} for v in read.values())
        assert 8 <= b <= SHIPMENTS - 8

        resp = await client.get(
            f"/v1/merchants/acme/analytics?{DAY}&group_by=variant,channel", headers=auth(ACME_KEY)
        )
        rows = {(r["variant"], r["channel"]): r for r in (await resp.json())["rows"]}
        for channel in ("email", "sms"):
            assert rows[(f"{TEST}:b", channel)]["accepted"] == b
            assert rows[(f"{TEST}:a", channel)]["accepted"] == SHIPMENTS - b
            # what is decided is counted before a variant is drawn: outside the test
            assert rows[("", channel)]["decided"] == SHIPMENTS
            assert rows[("", channel)]["accepted"] == 0
        [result] = await experiments(client)
        assert (result["name"], result["message"], result["b_percent"]) == (
            TEST,
            "out_for_delivery",
            50,
        )
        assert result["running"] is True
        assert result["variants"]["b"]["channels"]["sms"]["accepted"] == b
        assert result["variants"]["a"]["all"]["accepted"] == 2 * (SHIPMENTS - b)

        # the editor's analytics page compares them
        from tests.test_editor import sign_in

        await sign_in(client)
        page = await (await client.get(f"/merchant/acme/analytics?{DAY}")).text()
        assert f"{TEST}: Out for delivery, variant b for 50 % of shipments" in page
        assert (
            f"Messages accepted: {2 * (SHIPMENTS - b)} in variant a, {2 * b} in variant b" in page
        )
        # no SMS through the outbox can get a reply: no last-SMS key is kept for one
        async with open_resources(settings) as res:
            assert [k async for k in res.store.redis.scan_iter(match="ntf:lastsms:*")] == []
        # the default analytics rows are as before: the variants add up under the milestone
        resp = await client.get(f"/v1/merchants/acme/analytics?{DAY}", headers=auth(ACME_KEY))
        whole = await resp.json()
        assert whole["group_by"] == ["day", "milestone", "channel", "locale"]
        assert whole["totals"]["accepted"] == 2 * SHIPMENTS


async def test_a_reader_without_a_variant_b_in_their_language_reads_a_and_counts_as_a(
    tmp_path: Path, redis_url: str
) -> None:
    # variant b written for German readers only; these read French
    files = _files(tmp_path, POLICY, b_locale="de")
    settings = make_settings(tmp_path, redis_url=redis_url, **files)
    async with TestClient(TestServer(create_app(settings, clock=fixed_clock()))) as client:
        await post(client, *shipments(10))
        await run_worker(settings)
        bodies = [p.read_text() for p in outbox_files(settings, ".sms.json")]
        assert len(bodies) == 10 and not any("VARIANT-B" in b for b in bodies)
        [result] = await experiments(client)
        assert result["variants"]["b"]["all"]["accepted"] == 0
        assert result["variants"]["a"]["all"]["accepted"] == 20


@pytest.fixture
async def providers() -> AsyncIterator[tuple[FakeSendGrid, FakeTwilio]]:
    async with serve_sendgrid() as sendgrid, serve_twilio() as twilio:
        yield sendgrid, twilio


async def test_provider_reports_replies_and_stops_count_under_the_variant(
    tmp_path: Path,
    redis_url: str,
    providers: tuple[FakeSendGrid, FakeTwilio],
    receiver: Receiver,
) -> None:
    sendgrid, twilio = providers
    settings = twilio_settings(tmp_path, redis_url, twilio).model_copy(
        update={
            "public_url": PUBLIC,
            "email_channel": "sendgrid",
            "sendgrid_api_key": "SG.test-key-for-the-fake",
            "sendgrid_from": "orders@acme.example",
            "sendgrid_base_url": sendgrid.url,
            "signing_secret": SECRET,
            "merchant_hooks_allow_private": True,
            **_files(tmp_path, POLICY),
        }
    )
    async with TestClient(TestServer(create_app(settings, clock=fixed_clock()))) as client:
        await endpoint(client, receiver.url, ["recipient.opted_out"])
        await post(client, *shipments(12))
        await run_worker(settings)
        # each email tells SendGrid its variant; each SMS tells Twilio in its callback URL
        tags = {
            m["custom_args"]["shipment_id"]: m["custom_args"]["stats"] for m in sendgrid.accepted
        }
        for shipment, tag in tags.items():
            assert tag == f"out_for_delivery~fr_FR~{TEST}~{drawn(shipment)}"
        callbacks = {m["To"]: m["StatusCallback"] for m in twilio.received}
        assert all(f"~{TEST}~" in url for url in callbacks.values())
        variant = {f"+336123{i:05d}": drawn(f"shp_{i}") for i in range(12)}
        b_phone = next(p for p, v in variant.items() if v == "b")
        a_phone = next(p for p, v in variant.items() if v == "a")

        # SendGrid reports: opened once per message however often, under its variant
        async with open_resources(settings, clock=fixed_clock()) as res:
            for m in sendgrid.accepted:
                args = m["custom_args"]
                for kind in ("delivered", "open", "open"):
                    await _email_event(res, {**args, "event": kind})
        # the recipients text back: a question to variant b, a STOP to variant a
        inbound = "/v1/webhooks/twilio/inbound"
        for sender, body in ((b_phone, "Can you leave it next door?"), (a_phone, "STOP")):
            for _ in range(2):  # counted once a message and day, a STOP once
                resp = await signed(client, inbound, {"From": sender, "Body": body})
                assert resp.status == 200
        # the STOP's merchant is told, once, with the shipment its last SMS was about
        await send(settings)
        [told] = receiver.events()
        a_shipment = f"shp_{int(a_phone[-5:])}"
        assert told["type"] == "recipient.opted_out"
        assert told["data"] == {
            "channel": "sms",
            "address": a_phone,
            "source": "sms_stop",
            "shipment_id": a_shipment,
        }
        # a number we never texted counts nowhere (and its STOP still holds)
        resp = await signed(client, inbound, {"From": "+4915100000000", "Body": "STOP"})
        assert resp.status == 200

        [result] = await experiments(client)
        b = sum(v == "b" for v in variant.values())
        emails = {arm: result["variants"][arm]["channels"]["email"] for arm in ("a", "b")}
        assert (emails["b"]["delivered"], emails["b"]["opened"]) == (b, b)
        assert (emails["a"]["delivered"], emails["a"]["opened"]) == (12 - b, 12 - b)
        sms = {arm: result["variants"][arm]["channels"]["sms"] for arm in ("a", "b")}
        assert (sms["b"]["replies"], sms["b"]["stops"]) == (1, 0)
        assert (sms["a"]["replies"], sms["a"]["stops"]) == (0, 1)
        assert result["comparison"]["opened"]["a"] == result["comparison"]["opened"]["b"] == 1.0
        assert result["comparison"]["replied"]["b"] == round(1 / b, 4)
        resp = await client.get(f"/v1/merchants/acme/analytics?{DAY}", headers=auth(ACME_KEY))
        assert (await resp.json())["totals"]["stops"] == 1
        async with open_resources(settings) as res:
            assert await res.store.opted_out("acme", [f"sms:{a_phone}"])
            assert await res.store.opted_out("acme", ["sms:+4915100000000"])
            # the key that remembers the last SMS to a number names it by its keyed digest
            keys = {k.decode() async for k in res.store.redis.scan_iter(match="*lastsms*")}
            assert keys == {f"ntf:lastsms:{recipient_digest(SECRET, phone)}" for phone in variant}
            assert not any(phone[1:] in str(keys) for phone in variant)
    # the same STOP again the next day is no new opt-out: counted nowhere
    tomorrow = NOW + timedelta(days=1)
    async with TestClient(TestServer(create_app(settings, clock=fixed_clock(tomorrow)))) as c:
        resp = await signed(c, inbound, {"From": a_phone, "Body": "STOP"})
        assert resp.status == 200
        async with open_resources(settings) as res:
            assert await res.store.stats("acme", tomorrow.date(), tomorrow.date()) == {}


def test_check_names_an_experiment_of_the_default_policy_without_its_variant_b(
    tmp_path: Path,
) -> None:
    files = _files(tmp_path, "", b_locale=None)
    default = files["policies_dir"] / "default.yaml"
    default.write_text(default.read_text().replace("experiments: []", POLICY.strip()))
    problems = check_all(make_settings(tmp_path, **files))
    assert any(
        p.startswith("policies/default.yaml: experiments: short-words: no messages/")
        for p in problems
    ), problems


def test_check_names_an_experiment_without_its_variant_b(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, **_files(tmp_path, POLICY, b_locale=None))
    problems = check_all(settings)
    assert any(
        "policies/acme.yaml: experiments: short-words: no messages/out_for_delivery.b.jinja" in p
        for p in problems
    ), problems
    # with its variant b, whose every render is checked like variant a's
    _variant_b(settings.templates_dir)  # type: ignore[arg-type]
    broken = settings.templates_dir / "acme" / "messages" / "out_for_delivery.b.jinja"  # type: ignore[operator]
    assert not [p for p in check_all(settings) if "experiments" in p]
    broken.write_text(broken.read_text().replace("VARIANT-B sms", "{{ nope.nothing }}"))
    problems = check_all(settings)
    assert any(
        "messages/out_for_delivery.b.jinja, line 6: 'nope' is undefined: no such variable "
        "(the message editor's variables list the ones there are) (in out_for_delivery "
        "variant b, email" in p
        for p in problems
    ), problems


async def test_an_experiment_is_published_only_with_its_variant_b(
    tmp_path: Path, redis_url: str
) -> None:
    settings = make_settings(tmp_path, redis_url=redis_url)
    async with TestClient(TestServer(create_app(settings, clock=fixed_clock()))) as client:
        policy = {"experiments": [{"name": TEST, "message": "delivered", "b_percent": 20}]}
        resp = await client.put("/v1/merchants/acme/policy", json=policy, headers=auth(ACME_KEY))
        assert resp.status == 200, await resp.text()
        saved = await resp.json()
        assert any("no messages/delivered.b.jinja" in p for p in saved["problems"]), saved
        # variant b through the templates API: it starts as a copy of variant a
        url = "/v1/merchants/acme/templates/delivered?variant=b"
        resp = await client.get(url, headers=auth(ACME_KEY))
        found = await resp.json()
        assert (found["path"], found["variant"]) == ("messages/delivered.b.jinja", "b")
        assert found["source"] == "default, variant a"
        text = found["text"].replace("{%- macro subject() -%}", "{%- macro subject() -%}B: ")
        resp = await client.put(url, json={"text": text}, headers=auth(ACME_KEY))
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["problems"] == []
        listed = await client.get("/v1/merchants/acme/templates", headers=auth(ACME_KEY))
        entries = (await listed.json())["templates"]
        assert {"milestone": "delivered", "locale": None, "variant": "b"} in [
            {k: e[k] for k in ("milestone", "locale", "variant")} for e in entries
        ]
        bad = await client.get(
            "/v1/merchants/acme/templates/delivered?variant=c", headers=auth(ACME_KEY)
        )
        assert bad.status == 404
        # a variant b for one language starts from the variant b for every language, as its
        # readers read it; without one, from that language's variant a
        resp = await client.get(f"{url}&locale=fr", headers=auth(ACME_KEY))
        assert (await resp.json())["source"] == "draft, all languages"
        german = "{%- macro subject() -%}Da!{%- endmacro -%}{%- macro sms() -%}Da.{%- endmacro -%}"
        picked_up = "/v1/merchants/acme/templates/picked_up"
        resp = await client.put(
            f"{picked_up}?locale=de", json={"text": german}, headers=auth(ACME_KEY)
        )
        assert resp.status == 200
        resp = await client.get(f"{picked_up}?locale=de&variant=b", headers=auth(ACME_KEY))
        found = await resp.json()
        assert (found["text"], found["source"]) == (german, "draft, variant a")
        resp = await client.get(f"{picked_up}?locale=fr&variant=b", headers=auth(ACME_KEY))
        assert (await resp.json())["source"] == "default, variant a, all languages"
        await client.delete(f"{picked_up}?locale=de", headers=auth(ACME_KEY))
        # published: the experiments' answer knows it at once (no batch ran since)
        assert await experiments(client) == []
        overview = await client.get("/v1/merchants/acme/overrides", headers=auth(ACME_KEY))
        revision = (await overview.json())["draft"]["revision"]
        resp = await client.post(
            "/v1/merchants/acme/overrides/publish",
            json={"revision": revision},
            headers=auth(ACME_KEY),
        )
        assert resp.status == 200, await resp.text()
        [running] = await experiments(client)
        assert (running["name"], running["running"], running["b_percent"]) == (TEST, True, 20)


async def test_the_editor_writes_variant_b_and_the_cadence_form_starts_a_test(
    tmp_path: Path, redis_url: str
) -> None:
    from tests.test_editor import base_of, cadence_form, draft, sign_in

    settings = make_settings(tmp_path, redis_url=redis_url)
    async with TestClient(TestServer(create_app(settings, clock=fixed_clock()))) as client:
        csrf = await sign_in(client)
        page = await (await client.get("/merchant/acme/messages/out_for_delivery?variant=b")).text()
        assert "messages/out_for_delivery.b.jinja" in page and "default, variant a" in page
        assert 'data-variant="b"' in page
        text = "{%- macro subject() -%}B: today{%- endmacro -%}"
        text += "{%- macro sms() -%}B sms{%- endmacro -%}"
        # the live preview renders variant b from the text on screen
        preview = await client.post(
            "/merchant/acme/preview",
            json={
                "milestone": "out_for_delivery",
                "path": "messages/out_for_delivery.b.jinja",
                "locale": "en",
                "text": text,
                "variant": "b",
            },
            headers={"X-CSRF-Token": csrf},
        )
        assert preview.status == 200, await preview.text()
        shown = await preview.json()
        assert shown["email"]["subject"] == "B: today"
        assert shown["sms"]["body"].startswith("B sms ")
        form = {"csrf": csrf, "locale": "", "variant": "b", "text": text, "action": "save"}
        resp = await client.post(
            "/merchant/acme/messages/out_for_delivery", data={**form, "base": base_of(page)}
        )
        assert resp.status == 200 and "variant b" in await resp.text()
        assert (await draft(client)).keys() == {"messages/out_for_delivery.b.jinja"}
        # variant a's page is untouched and says nothing of a locale "b"
        plain = await (await client.get("/merchant/acme/messages/out_for_delivery")).text()
        assert "messages/out_for_delivery.jinja" in plain and "?locale=b" not in plain

        cadence = cadence_form(await (await client.get("/merchant/acme/cadence")).text())
        start = {
            **cadence,
            "experiments.0.name": TEST,
            "experiments.0.message": "out_for_delivery",
            "experiments.0.b_percent": "30",
        }
        resp = await client.post("/merchant/acme/cadence", data=start)
        assert "Saved to your draft" in await resp.text()
        written = yaml.safe_load((await draft(client))["policy.yaml"])
        assert written == {
            "experiments": [{"name": TEST, "message": "out_for_delivery", "b_percent": 30}]
        }
        again = cadence_form(await (await client.get("/merchant/acme/cadence")).text())
        assert again["experiments.0.name"] == TEST and again["experiments.1.name"] == ""
        bad = await client.post(  # (from the page as it is now: `start` is out of date)
            "/merchant/acme/cadence", data={**again, "experiments.0.b_percent": "150"}
        )
        assert bad.status == 422
        assert "must be 100 or less" in await bad.text()
        # ending it: an empty name
        resp = await client.post("/merchant/acme/cadence", data={**again, "experiments.0.name": ""})
        assert "Saved to your draft" in await resp.text()
        assert not yaml.safe_load((await draft(client))["policy.yaml"])


async def test_a_broken_variant_b_is_a_problem_and_its_readers_fall_outside_the_test(
    tmp_path: Path, redis_url: str
) -> None:
    # a syntax error in a variant b is named by a save's problems (not a crash)
    settings = make_settings(tmp_path, redis_url=redis_url)
    async with TestClient(TestServer(create_app(settings, clock=fixed_clock()))) as client:
        resp = await client.put(
            "/v1/merchants/acme/templates/delivered?variant=b",
            json={"text": "{% if %}"},
            headers=auth(ACME_KEY),
        )
        assert resp.status == 200, await resp.text()
        problems = (await resp.json())["problems"]
        assert any("messages/delivered.b.jinja" in p for p in problems), problems

    # one that fails as it renders: its readers get the default templates, counted outside
    # the test (neither of the merchant's variants is what they read)
    every_b = f"experiments: [{{name: {TEST}, message: out_for_delivery, b_percent: 100}}]\n"
    files = _files(tmp_path / "broken", every_b)
    broken = files["templates_dir"] / "acme" / "messages" / "out_for_delivery.b.jinja"
    broken.write_text(broken.read_text().replace("VARIANT-B sms", "{{ 1 / 0 }}"))
    settings = make_settings(tmp_path / "broken", redis_url=redis_url, **files)
    async with TestClient(TestServer(create_app(settings, clock=fixed_clock()))) as client:
        await post(client, *shipments(4))
        await run_worker(settings)
        bodies = [p.read_text() for p in outbox_files(settings, ".sms.json")]
        assert len(bodies) == 4 and not any("VARIANT-B" in b for b in bodies)
        [result] = await experiments(client)
        assert result["variants"]["a"]["all"]["accepted"] == 0
        assert result["variants"]["b"]["all"]["accepted"] == 0
        resp = await client.get(
            f"/v1/merchants/acme/analytics?{DAY}&group_by=variant", headers=auth(ACME_KEY)
        )
        [row] = (await resp.json())["rows"]
        assert (row["variant"], row["accepted"]) == ("", 8)
