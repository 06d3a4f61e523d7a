"""Carrier performance (issue 17): per carrier and lane, the time from pickup to delivery,
first-attempt deliveries and exceptions; per hub, dwell times; counted once per shipment
as it is delivered, read through GET /v1/merchants/{m}/carriers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from notifier.app import create_app
from notifier.insights import journeys
from notifier.insights.journeys import Journey, advance, bucket, percentile
from notifier.models import Transition
from notifier.settings import Settings
from tests.conftest import ACME_KEY, auth, fixed_clock, post, run_worker, transition

Client = TestClient[Any, Any]
START = datetime(2026, 11, 18, 8, 0, tzinfo=UTC)


def scan(
    n: int, status: str, hours: float, city: str | None, country: str | None, **more: Any
) -> dict[str, Any]:
    location = {"city": city, "country": country} if city else None
    return transition(
        event_id=f"evt_{more.pop('shipment', 'shp_123')}_{n}",
        status=status,
        occurred_at=(START + timedelta(hours=hours)).isoformat(),
        location=location,
        **more,
    )


def journey_of(
    shipment: str, *, failed: bool, hold: bool, transit_h: float
) -> list[dict[str, Any]]:
    steps = [
        ("info_received", -24, None, None),
        ("picked_up", 0, "Leipzig", "DE"),
        ("arrived_at_facility", 2, "Köln", "DE"),
        ("departed_facility", 7, "Köln", "DE"),
    ]
    if hold:
        steps.append(("exception", 20, "Paris", "FR"))
    if failed:
        steps.append(("delivery_attempt_failed", transit_h - 24, "Paris", "FR"))
    steps.append(("delivered", transit_h, "Paris", "FR"))
    out = []
    for i, (status, hours, city, country) in enumerate(steps):
        more: dict[str, Any] = {"shipment": shipment, "shipment_id": shipment}
        if status == "exception":
            more["exception_code"] = "customs_hold"
        out.append(scan(i, status, hours, city, country, **more))
    return out


@pytest.fixture
async def fixed(settings: Settings) -> AsyncIterator[Client]:
    async with TestClient(TestServer(create_app(settings, clock=fixed_clock()))) as c:
        yield c


async def test_lanes_and_hubs_from_delivered_journeys(fixed: Client, settings: Settings) -> None:
    await post(fixed, *journey_of("shp_1", failed=False, hold=False, transit_h=30))
    await post(fixed, *journey_of("shp_2", failed=True, hold=True, transit_h=54))
    await post(fixed, *journey_of("shp_3", failed=False, hold=False, transit_h=28))
    await run_worker(settings)
    # delivered again (a duplicate scan under a new id): counted once
    await post(
        fixed, scan(9, "delivered", 60, "Paris", "FR", shipment="shp_1", shipment_id="shp_1")
    )
    await run_worker(settings)
    resp = await fixed.get(
        "/v1/merchants/acme/carriers?from=2026-11-21&to=2026-11-21", headers=auth(ACME_KEY)
    )
    assert resp.status == 200, await resp.text()
    found = await resp.json()
    [lane] = found["lanes"]
    assert (lane["carrier"], lane["origin"], lane["destination"]) == ("ups", "DE", "FR")
    assert lane["delivered"] == 3
    assert lane["first_attempt_rate"] == round(2 / 3, 4)
    assert lane["exception_rates"] == {"customs_hold": round(1 / 3, 4)}
    assert 24 < lane["transit_p50_h"] <= 30 and 48 < lane["transit_p90_h"] <= 60
    [hub] = found["hubs"]
    assert (hub["carrier"], hub["hub"], hub["visits"]) == ("ups", "DE:Köln", 3)
    assert 4 < hub["dwell_p50_h"] <= 6

    refused = await fixed.get("/v1/merchants/acme/carriers?lane=x", headers=auth(ACME_KEY))
    assert refused.status == 422
    other = await fixed.get("/v1/merchants/globex/carriers", headers=auth(ACME_KEY))
    assert other.status == 403


def test_a_journey_is_counted_once_and_only_news_moves_it() -> None:
    def t(status: str, hours: float, city: str | None = "Köln", **more: Any) -> Transition:
        return Transition.model_validate(scan(int(hours * 10), status, hours, city, "DE", **more))

    j, counts = advance(Journey(), t("info_received", -5, None))
    assert j.picked_up_at is None and counts == {}  # a label: the carrier has nothing yet
    j, _ = advance(j, t("picked_up", 0, "Leipzig"))
    assert j.picked_up_at == START and j.origin == "DE"
    j, _ = advance(j, t("arrived_at_facility", 1))
    j, counts = advance(j, t("departed_facility", 4))
    assert counts == {"ups|hub:DE:Köln|-|dwell_h:4": 1} and j.hub is None
    j, counts = advance(j, t("departed_facility", 5))  # no arrival before it: nothing
    assert counts == {}
    j, counts = advance(j, t("delivered", 100, "Paris"))
    assert counts == {
        "ups|DE|DE|delivered": 1,
        "ups|DE|DE|first_attempt": 1,
        "ups|DE|DE|transit_h:120": 1,
    }
    assert advance(j, t("delivered", 101, "Paris"))[1] == {}
    # a delivery with no scan before it has no transit time
    assert "transit" not in str(advance(Journey(), t("delivered", 3))[1])


def test_buckets_and_percentiles() -> None:
    assert [bucket(h) for h in (0.5, 1, 1.01, 700, 721)] == ["1", "1", "2", "720", "more"]
    assert percentile({}, 0.5) is None
    assert percentile({"24": 10}, 0.5) == 21.0  # linear within (18, 24]
    assert percentile({"1": 9, "more": 1}, 0.95) == float(journeys.BUCKETS_H[-1])
    assert percentile({"2": 1, "4": 1}, 0.5) == 2.0


def test_a_partial_journey_counts_no_delivery_and_names_stay_fields() -> None:
    """A shipment already under way when journeys began counts nothing at its delivery (its
    pickup and attempts are not known); a "|" in a carrier's or city's name cannot split a
    count's name."""
    t = Transition.model_validate(scan(1, "delivered", 30, "Paris", "FR"))
    assert advance(Journey(partial=True), t)[1] == {}
    assert journeys.field("a|b", "DE", "FR", "delivered") == "a/b|DE|FR|delivered"
    j, _ = advance(
        Journey(picked_up_at=START, origin="DE"),
        Transition.model_validate(scan(2, "arrived_at_facility", 1, "Köln|Nord", "DE")),
    )
    _, counts = advance(
        j, Transition.model_validate(scan(3, "departed_facility", 3, "Köln|Nord", "DE"))
    )
    assert counts == {"ups|hub:DE:Köln/Nord|-|dwell_h:2": 1}
