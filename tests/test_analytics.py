"""Notification analytics (issue 17): counts kept as things happen, per merchant, UTC day,
milestone, channel and locale, read through GET /v1/merchants/{m}/analytics as JSON or CSV."""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from notifier.app import create_app
from notifier.insights import counts
from notifier.resources import open_resources
from notifier.settings import Settings
from notifier.webhooks import _email_event
from tests.conftest import (
    ACME_KEY,
    NOW,
    auth,
    fixed_clock,
    history,
    post,
    run_worker,
    transition,
)

Client = TestClient[Any, Any]
URL = "/v1/merchants/acme/analytics"
DAY = "from=2026-11-21&to=2026-11-21"


@pytest.fixture
async def fixed(settings: Settings) -> AsyncIterator[Client]:
    async with TestClient(TestServer(create_app(settings, clock=fixed_clock()))) as c:
        yield c


async def analytics(client: Client, query: str = DAY) -> Any:
    resp = await client.get(f"{URL}?{query}", headers=auth(ACME_KEY))
    assert resp.status == 200, await resp.text()
    return await resp.json()


def row(found: Any, **where: str) -> dict[str, int]:
    [match] = [r for r in found["rows"] if all(r[k] == v for k, v in where.items())]
    return match


async def journeys(client: Client, settings: Settings) -> None:
    paris = transition()
    york = transition(
        event_id="evt_y",
        shipment_id="shp_y",
        recipient={
            "name": "Bo",
            "email": "bo@example.com",
            "locale": "en_US",
            "timezone": "America/New_York",
        },
    )
    scan = transition(
        event_id="evt_0", status="in_transit", occurred_at="2026-11-21T08:00:00+01:00"
    )
    await post(client, scan, paris, york)
    await run_worker(settings)


async def test_decisions_and_sends_are_counted_where_they_belong(
    fixed: Client, settings: Settings
) -> None:
    await journeys(fixed, settings)
    found = await analytics(fixed)
    assert found["from"] == found["to"] == "2026-11-21"
    assert found["group_by"] == ["day", "milestone", "channel", "locale"]
    email_fr = row(found, milestone="out_for_delivery", channel="email", locale="fr_FR")
    assert (email_fr["decided"], email_fr["sent"], email_fr["accepted"]) == (1, 1, 1)
    sms_fr = row(found, milestone="out_for_delivery", channel="sms", locale="fr_FR")
    assert (sms_fr["decided"], sms_fr["sent"], sms_fr["accepted"]) == (1, 1, 1)
    email_us = row(found, milestone="out_for_delivery", channel="email", locale="en_US")
    assert email_us["accepted"] == 1
    # no phone for Bo: the SMS was suppressed, and by which rule
    sms_us = row(found, milestone="out_for_delivery", channel="sms", locale="en_US")
    assert sms_us["suppressed"] == 1 and sms_us["suppressed:no_address"] == 1
    scan = row(found, milestone="in_transit")
    assert (
        scan["decided"]
        == scan["suppressed"]
        == sum(v for k, v in scan.items() if k.startswith("suppressed:"))
    )
    # every decision the histories hold is counted once
    decided = len(await history(fixed)) + len(await history(fixed, "shp_y"))
    assert found["totals"]["decided"] == decided
    assert found["rates"]["delivered"] == 0.0  # nothing reported delivered yet

    # posted again (duplicates) and a worker run again: nothing counted twice
    await post(fixed, transition())
    await run_worker(settings)
    assert (await analytics(fixed))["totals"] == found["totals"]


async def test_grouping_csv_and_refusals(fixed: Client, settings: Settings) -> None:
    await journeys(fixed, settings)
    by_channel = await analytics(fixed, DAY + "&group_by=channel")
    assert [r["channel"] for r in by_channel["rows"]] == ["email", "sms"]
    totals = await analytics(fixed, DAY + "&group_by=")
    assert [set(totals["rows"][0]) - set(totals["counts"])] == [set()]
    assert totals["rows"][0]["accepted"] == 3

    resp = await fixed.get(f"{URL}?{DAY}&group_by=channel&format=csv", headers=auth(ACME_KEY))
    assert resp.status == 200 and resp.content_type == "text/csv"
    assert "notifier-acme-2026-11-21-2026-11-21.csv" in resp.headers["Content-Disposition"]
    table = list(csv.DictReader(io.StringIO(await resp.text())))
    assert [(r["channel"], r["accepted"]) for r in table] == [("email", "2"), ("sms", "1")]

    for query, field in [
        ("from=2026-11-22&to=2026-11-21", "from"),
        ("from=21.11.2026", "from"),
        ("from=2025-01-01&to=2026-11-21", "from"),
        ("group_by=carrier", "group_by"),
        ("format=xml", "format"),
        ("colour=red", "colour"),
    ]:
        resp = await fixed.get(f"{URL}?{query}", headers=auth(ACME_KEY))
        assert resp.status == 422, query
        assert [d["field"] for d in (await resp.json())["error"]["details"]] == [field]
    other = await fixed.get("/v1/merchants/globex/analytics", headers=auth(ACME_KEY))
    assert other.status == 403
    # the default range: the 30 days up to today (the service's clock)
    default = await analytics(fixed, "")
    assert (default["from"], default["to"]) == ("2026-10-23", "2026-11-21")


async def test_provider_reports_are_counted_once_under_the_message(
    fixed: Client, settings: Settings
) -> None:
    await journeys(fixed, settings)
    [email] = [
        d
        for d in await history(fixed)
        if d["channel"] == "email" and d["status"] == "out_for_delivery"
    ]
    nid = email["notification_id"]
    tag = counts.tag("out_for_delivery", "fr_FR")
    base = {"notification_id": nid, "merchant_id": "acme", "shipment_id": "shp_123"}
    async with open_resources(settings, clock=fixed_clock()) as res:
        for kind in ("delivered", "open", "open", "click", "delivered"):
            await _email_event(res, {**base, "event": kind, "stats": tag})
        found = await analytics(fixed)
        assert found["rates"]["opened"] == found["rates"]["clicked"] == 1.0
        # a report of a message sent before messages carried their tag: counted, unnamed
        await _email_event(res, {**base, "notification_id": "n_old", "event": "open"})
        # the merchant's own weekly digest is no customer's message: counted nowhere, and
        # its bounce opts nobody out
        digest = {**base, "notification_id": "digest_2026-W47_0", "email": "ops@acme.example"}
        for kind in ("open", "bounce", "unsubscribe"):
            await _email_event(res, {**digest, "event": kind, "stats": tag})
        assert not await res.store.opted_out("acme", ["email:ops@acme.example"])
    found = await analytics(fixed)
    email_fr = row(found, milestone="out_for_delivery", channel="email", locale="fr_FR")
    assert (email_fr["delivered"], email_fr["opened"], email_fr["clicked"]) == (1, 1, 1)
    assert email_fr["bounced"] == email_fr["unsubscribed"] == 0
    assert row(found, milestone="-", channel="email", locale="-")["opened"] == 1


async def test_an_unsubscribe_counts_once_an_address(fixed: Client, settings: Settings) -> None:
    """Through our own link, then SendGrid's report of it, then the report again, and one
    for an address already opted out: one unsubscribe (it read 2, a rate of 200 % of
    the delivered emails, before)."""
    from notifier.unsubscribe import PATH, sign

    await journeys(fixed, settings)
    [email] = [
        d
        for d in await history(fixed)
        if d["channel"] == "email" and d["status"] == "out_for_delivery"
    ]
    tag = counts.tag("out_for_delivery", "fr_FR")
    event = {
        "notification_id": email["notification_id"],
        "merchant_id": "acme",
        "shipment_id": "shp_123",
        "email": "ana@example.com",
        "stats": tag,
    }
    async with open_resources(settings, clock=fixed_clock()) as res:
        token = sign(await res.link_secret(), "acme", "ana@example.com")  # as a worker signs
        # the link names the email's milestone and locale, as the worker writes it: the
        # unsubscribe counts there (it was "not known" whatever the email)
        link = PATH.format(token=token) + f"?lang=fr&t={tag}"
        assert (await fixed.post(link)).status == 200
        await _email_event(res, {**event, "event": "delivered"})
        for kind in ("unsubscribe", "unsubscribe", "group_unsubscribe"):
            await _email_event(res, {**event, "event": kind})
        assert await res.store.opted_out("acme", ["email:ana@example.com"])
    found = await analytics(fixed, DAY + "&group_by=channel")
    [by_email] = [r for r in found["rows"] if r["channel"] == "email"]
    assert (by_email["delivered"], by_email["unsubscribed"]) == (1, 1)
    by_milestone = await analytics(fixed, DAY + "&group_by=milestone,locale")
    unsubscribed = {
        (r["milestone"], r["locale"]): r["unsubscribed"]
        for r in by_milestone["rows"]
        if r["unsubscribed"]
    }
    assert unsubscribed == {("out_for_delivery", "fr_FR"): 1}
    # SendGrid's own unsubscribe of an address that was not opted out counts, once
    other = {**event, "email": "zoe@example.com", "notification_id": "n_other"}
    async with open_resources(settings, clock=fixed_clock()) as res:
        for _ in range(2):
            await _email_event(res, {**other, "event": "unsubscribe"})
    found = await analytics(fixed, DAY + "&group_by=channel")
    [by_email] = [r for r in found["rows"] if r["channel"] == "email"]
    assert by_email["unsubscribed"] == 2


def test_tags_round_trip_and_refuse_anything_else() -> None:
    assert counts.untag(counts.tag("exception:customs_hold", "zh_Hans_CN")) == (
        "exception:customs_hold",
        "zh_Hans_CN",
        "",
    )
    assert counts.untag(counts.tag("delivered", None)) == ("delivered", "-", "")
    # a message of an A/B test carries its experiment and variant
    tagged = counts.tag("delivered", "de", "short-subject", "b")
    assert tagged == "delivered~de~short-subject~b"
    assert counts.untag(tagged) == ("delivered", "de", "short-subject:b")
    assert counts.of_tag(tagged, "sms", counts.Count.REPLIES) == (
        "delivered|sms|de|replies|short-subject:b"
    )
    assert counts.split("delivered|sms|de|replies|short-subject:b") == (
        "delivered",
        "sms",
        "de",
        "replies",
    )
    assert counts.variant_of("delivered|sms|de|replies|short-subject:b") == "short-subject:b"
    assert counts.variant_of("delivered|sms|de|replies") == ""
    bad_tags = ("a~b~c", "delivered~de~x~c", "delivered~de~Bad~a", "delivered~de~x~a~b")
    for bad in (None, 3, "delivered", "x" * 200 + "~fr", "<script>~fr", *bad_tags):
        assert counts.untag(bad) == ("-", "-", "")


async def test_the_editor_page_and_its_csv(fixed: Client, settings: Settings) -> None:
    from tests.test_editor import sign_in

    await journeys(fixed, settings)
    await sign_in(fixed)
    resp = await fixed.get("/merchant/acme/analytics?from=2026-11-20&to=2026-11-21")
    assert resp.status == 200
    page = await resp.text()
    assert '<svg viewBox="0 0 720 220" role="img"' in page
    assert "3 messages from 2026-11-20 to 2026-11-21; the most on 2026-11-21 (3)" in page
    assert '<tr><th scope="row">2026-11-21</th><td>2</td><td>1</td></tr>' in page
    assert '<tr><th scope="row">Accepted by the provider</th><td>3</td></tr>' in page
    assert 'aria-current="page">Analytics' in page
    assert 'action="/merchant/sign-out"' in page  # as on every signed-in page
    # days that cannot be shown: said, and the last 30 days instead
    bad = await (await fixed.get("/merchant/acme/analytics?from=2026-11-22&to=2026-11-21")).text()
    assert 'role="alert"' in bad and "from: must not be after to" in bad
    assert "Days in UTC, 2026-10-23 to 2026-11-21" in bad
    # the fields keep the days as typed, to correct them (they were reset: a black-box run
    # as a merchant); what a date field cannot show is the default again
    assert 'name="from" type="date" value="2026-11-22"' in bad
    assert 'name="to" type="date" value="2026-11-21"' in bad
    bad = await (await fixed.get("/merchant/acme/analytics?from=x&to=2026-11-01")).text()
    assert 'name="from" type="date" value="2026-10-23"' in bad
    assert 'name="to" type="date" value="2026-11-01"' in bad

    resp = await fixed.get("/merchant/acme/analytics.csv?from=2026-11-21&to=2026-11-21")
    assert resp.status == 200 and resp.content_type == "text/csv"
    table = list(csv.DictReader(io.StringIO(await resp.text())))
    assert {(r["milestone"], r["channel"], r["locale"], r["accepted"]) for r in table} >= {
        ("out_for_delivery", "email", "fr_FR", "1"),
        ("out_for_delivery", "email", "en_US", "1"),
        ("out_for_delivery", "sms", "fr_FR", "1"),
    }
    # a CSV of days that cannot be given is refused, saying why: it was the last 30 days,
    # a file whose days nobody reads
    for query, says in [("from=x", "YYYY-MM-DD"), ("from=2026-11-22&to=2026-11-21", "after")]:
        resp = await fixed.get(f"/merchant/acme/analytics.csv?{query}")
        assert resp.status == 422 and resp.content_type == "text/html"
        alert = (await resp.text()).split('role="alert">')[1].split("</p>")[0]
        assert alert.startswith("no CSV of those days (from: ") and says in alert, alert
    # another merchant's page: refused
    assert (await fixed.get("/merchant/globex/analytics")).status == 403


async def test_a_conflicting_commit_counts_nothing_and_counts_are_summed_per_field(
    settings: Settings,
) -> None:
    """The commit script adds a shipment's counts only when its state commits, and adds
    each field once per batch, summed."""
    from dataclasses import replace

    from notifier.state import ShipmentState
    from notifier.store import ShipmentCommit

    def commit(shipment: str, version: int, n: int) -> ShipmentCommit:
        state = ShipmentState(merchant_id="acme", shipment_id=shipment, events=version + 1)
        fields = (("out_for_delivery|email|fr_FR|sent", n), ("delivered|sms|-|decided", 1))
        return ShipmentCommit(
            "acme", shipment, version, state, [], [], counts=fields, day="2026-11-21"
        )

    async with open_resources(settings) as res:
        store = res.store
        assert (
            await store.commit_batch([commit("a", 0, 2), commit("b", 0, 3)], NOW.isoformat())
        ).conflicts == []
        # "a" is at version 1 now: a commit expecting 0 conflicts and counts nothing
        done = await store.commit_batch([commit("a", 0, 100), commit("c", 0, 1)], NOW.isoformat())
        assert done.conflicts == [0]
        other_day = replace(commit("d", 0, 7), day="2026-11-20")
        await store.commit_batch([other_day], NOW.isoformat())
        found = await store.stats("acme", NOW.date() - timedelta(days=1), NOW.date())
    assert found["2026-11-21"] == {
        "out_for_delivery|email|fr_FR|sent": 6,
        "delivered|sms|-|decided": 3,
    }
    assert found["2026-11-20"]["out_for_delivery|email|fr_FR|sent"] == 7
