"""Realistic load: shipments with full carrier histories, as the tracking backend posts them.

Each shipment gets a journey (label → pickup → a few hub scans → out for delivery →
delivered), and some get exceptions (customs hold, weather, address issue), failed
attempts with a second delivery day, a pickup point, or a return. Recipients are spread
over a dozen locales and their time zones, most with email and phone, some email only.
The stream the service sees is then roughened the way real feeds are: a few events are
posted twice, and a few arrive out of order (a late hub scan after the next milestone).

Everything is seeded, so two runs with the same seed post the same events.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

#: (locale, time zone, country) of the recipients, a dozen markets
MARKETS = [
    ("en_US", "America/New_York", "US"),
    ("en_GB", "Europe/London", "GB"),
    ("es_ES", "Europe/Madrid", "ES"),
    ("fr_FR", "Europe/Paris", "FR"),
    ("de_DE", "Europe/Berlin", "DE"),
    ("it_IT", "Europe/Rome", "IT"),
    ("pt_BR", "America/Sao_Paulo", "BR"),
    ("nl_NL", "Europe/Amsterdam", "NL"),
    ("pl_PL", "Europe/Warsaw", "PL"),
    ("ja_JP", "Asia/Tokyo", "JP"),
    ("zh_Hans_CN", "Asia/Shanghai", "CN"),
    ("ar_EG", "Africa/Cairo", "EG"),
    ("he_IL", "Asia/Jerusalem", "IL"),
]
CITIES = ["Leipzig", "Memphis", "Louisville", "Köln", "Paris", "Madrid", "Warszawa", "Osaka"]
CARRIERS = ["ups", "fedex", "dhl", "dpd", "canada_post"]
MERCHANTS = ["acme", "globex", "initech", "umbrella"]
EXCEPTIONS = ["customs_hold", "weather_delay", "address_issue", "delayed", "held_at_facility"]
HUB_SCANS = ["arrived_at_facility", "departed_facility", "in_transit"]


def _journey(rng: random.Random) -> list[tuple[str, str | None]]:
    """The (status, exception code) sequence of one shipment."""
    steps: list[tuple[str, str | None]] = [("info_received", None), ("picked_up", None)]
    for _ in range(rng.randint(1, 3)):
        steps += [(s, None) for s in rng.sample(HUB_SCANS, 2)]
    roll = rng.random()
    if roll < 0.12:
        steps.append(("exception", rng.choice(EXCEPTIONS)))
        steps.append(("in_transit", None))
    steps.append(("out_for_delivery", None))
    if 0.12 <= roll < 0.22:
        steps += [("delivery_attempt_failed", None), ("out_for_delivery", None)]
    if 0.22 <= roll < 0.27:
        steps.append(("available_for_pickup", None))
    if 0.27 <= roll < 0.29:
        steps.append(("returned_to_sender", None))
    else:
        steps.append(("delivered", None))
    return steps


def shipment_events(
    index: int, rng: random.Random, run: str, start: datetime
) -> list[dict[str, Any]]:
    """One shipment's transitions in journey order (event ids unique per ``run``)."""
    locale, zone, country = MARKETS[index % len(MARKETS)]
    merchant = MERCHANTS[index % len(MERCHANTS)]
    shipment = f"shp_{run}_{index}"
    tracking = f"1Z{index:016d}"
    carrier = rng.choice(CARRIERS)
    recipient: dict[str, Any] = {
        "name": rng.choice(["Ana", "Jürgen", "Zoë", "Marie-Claire", "健太", "نور"]),
        "email": f"customer{index}@example.com",
        "locale": locale,
        "timezone": zone,
    }
    if rng.random() < 0.8:
        recipient["phone"] = f"+3361{index % 10_000_000:07d}"
    at = start + timedelta(minutes=rng.randint(0, 600))
    window_day = at + timedelta(days=3)
    events = []
    for step, (status, code) in enumerate(_journey(rng)):
        at += timedelta(minutes=rng.randint(20, 300))
        body: dict[str, Any] = {
            "event_id": f"evt_{run}_{index}_{step}",
            "merchant_id": merchant,
            "shipment_id": shipment,
            "tracking_number": tracking,
            "carrier": carrier,
            "status": status,
            "occurred_at": at.isoformat(),
            "tracking_url": f"https://track.example.com/{tracking}",
            "location": {"city": rng.choice(CITIES), "country": country},
            "carrier_status_code": f"S{step}",
            "carrier_description": status.replace("_", " ").capitalize(),
        }
        if code:
            body["exception_code"] = code
        if step == 0:
            body["recipient"] = recipient
            body["order"] = {"number": f"{1000 + index}"}
        if status in ("out_for_delivery", "in_transit"):
            body["estimated_delivery"] = {
                "start": window_day.replace(hour=9, minute=0).isoformat(),
                "end": window_day.replace(hour=13, minute=0).isoformat(),
            }
        events.append(body)
    return events


def stream(
    shipments: int, *, seed: int = 1, run: str = "r0", start: datetime | None = None
) -> list[dict[str, Any]]:
    """All events of ``shipments`` shipments, interleaved as a live feed would deliver them.

    About 3 % of events are posted twice, and about 3 % of hub scans are swapped with the
    event after them (they arrive late). Occurred-at times lie in the last few days.
    """
    rng = random.Random(seed)
    begin = start or datetime.now(UTC) - timedelta(days=4)
    journeys = [shipment_events(i, rng, run, begin) for i in range(shipments)]
    for events in journeys:
        for i in range(2, len(events) - 1):
            if events[i]["status"] in HUB_SCANS and rng.random() < 0.03:
                events[i], events[i + 1] = events[i + 1], events[i]
    # Interleave: each shipment advances one step per round, so a shipment's events are
    # spread over the feed the way they are in real time.
    out: list[dict[str, Any]] = []
    cursors = [0] * shipments
    live = list(range(shipments))
    while live:
        rng.shuffle(live)
        still = []
        for s in live:
            event = journeys[s][cursors[s]]
            out.append(event)
            if rng.random() < 0.03:
                out.append(event)
            cursors[s] += 1
            if cursors[s] < len(journeys[s]):
                still.append(s)
        live = still
    return out


def batches(events: list[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    for i in range(0, len(events), size):
        yield events[i : i + size]
