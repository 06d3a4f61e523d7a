"""The weekly digest (issue 17): settings through the admin API, sent once a week per
merchant from Monday 06:00 UTC through the email channel (its axe-core check is in
test_accessibility.py)."""

from __future__ import annotations

import email
import email.policy
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from notifier.app import create_app
from notifier.insights import digest
from notifier.resources import open_resources
from notifier.settings import Settings
from tests.conftest import ACME_KEY, auth, fixed_clock, outbox_files, post, run_worker, transition

Client = TestClient[Any, Any]
URL = "/v1/merchants/acme/digest"
#: Monday 2026-11-23, 07:00 UTC: the week of 2026-11-16 (NOW's, the 21st) is due
MONDAY = datetime(2026, 11, 23, 7, 0, tzinfo=UTC)


@pytest.fixture
async def fixed(settings: Settings) -> AsyncIterator[Client]:
    async with TestClient(TestServer(create_app(settings, clock=fixed_clock()))) as c:
        yield c


async def tick(settings: Settings, at: datetime) -> int:
    async with open_resources(settings, clock=lambda: at) as res:
        return await digest.send_due(res)


def test_the_week_is_due_from_monday_morning() -> None:
    assert digest.last_week(datetime(2026, 11, 23, 5, 59, tzinfo=UTC)) is None
    assert digest.last_week(datetime(2026, 11, 23, 6, 0, tzinfo=UTC)) == (
        date(2026, 11, 16),
        date(2026, 11, 22),
        "2026-W47",
    )
    # later in the week (a worker that was down on Monday): still last week's
    assert digest.last_week(datetime(2026, 11, 26, 1, 0, tzinfo=UTC))[2] == "2026-W47"  # type: ignore[index]


async def test_settings_are_checked_and_scoped(fixed: Client) -> None:
    assert (await fixed.get(URL, headers=auth(ACME_KEY))).status == 404
    bad = await fixed.put(URL, json={"to": ["not an address"]}, headers=auth(ACME_KEY))
    assert bad.status == 422 and (await bad.json())["error"]["details"][0]["field"] == "to"
    assert (await fixed.put(URL, json={"to": []}, headers=auth(ACME_KEY))).status == 422
    # one mailbox once, however it is written (it got two copies: found by a probe)
    twice = ["ops@acme.example", "OPS@acme.example"]
    ok = await fixed.put(URL, json={"to": twice}, headers=auth(ACME_KEY))
    assert ok.status == 200 and (await ok.json()) == {"to": ["ops@acme.example"], "enabled": True}
    assert (await (await fixed.get(URL, headers=auth(ACME_KEY))).json())["to"] == [
        "ops@acme.example"
    ]
    other = await fixed.put(
        "/v1/merchants/globex/digest", json={"to": ["a@b.example"]}, headers=auth(ACME_KEY)
    )
    assert other.status == 403
    assert (await fixed.delete(URL, headers=auth(ACME_KEY))).status == 204
    assert (await fixed.delete(URL, headers=auth(ACME_KEY))).status == 404


async def test_last_weeks_digest_goes_out_once(fixed: Client, settings: Settings) -> None:
    await post(
        fixed,
        transition(
            event_id="p",
            status="picked_up",
            occurred_at="2026-11-20T08:00:00+00:00",
            location={"city": "Leipzig", "country": "DE"},
        ),
        transition(
            event_id="d",
            status="delivered",
            occurred_at="2026-11-21T10:00:00+00:00",
            location={"city": "Paris", "country": "FR"},
        ),
    )
    await run_worker(settings)
    to = ["ops@acme.example", "lead@acme.example"]
    await fixed.put(URL, json={"to": to}, headers=auth(ACME_KEY))
    assert await tick(settings, datetime(2026, 11, 23, 5, 0, tzinfo=UTC)) == 0  # not yet
    assert await tick(settings, MONDAY) == 1
    assert await tick(settings, MONDAY) == 0  # once a week
    files = outbox_files(settings, "digest_2026-W47_0.eml") + outbox_files(
        settings, "digest_2026-W47_1.eml"
    )
    assert len(files) == 2 and all(f.parent.name == "weekly-digest" for f in files)
    message = email.message_from_bytes(files[0].read_bytes(), policy=email.policy.default)
    assert message["To"] in to
    assert message["Subject"] == "Your shop: your shipment messages, 2026-11-16 to 2026-11-22"
    text = message.get_body(preferencelist=("plain",)).get_content()  # type: ignore[union-attr]
    assert "Sent to the provider: 2" in text  # the delivered email and SMS (pickup superseded)
    assert "ups, DE -> FR: 1 delivered" in text
    # a merchant who turned it off gets none
    await fixed.put(URL, json={"to": to, "enabled": False}, headers=auth(ACME_KEY))
    assert await tick(settings, datetime(2026, 11, 30, 7, 0, tzinfo=UTC)) == 0
