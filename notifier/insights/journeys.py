"""Carrier performance from the transitions (pure): per carrier and lane (origin country ->
destination country), the time from pickup to delivery, first-attempt deliveries and the
exceptions on the way; per carrier and hub, how long parcels stay there.

A shipment keeps a few facts of its journey in its state (``Journey``); when it is
delivered they are counted once, into the merchant's day of carrier counts
(``store/stats.py``), next to the notification counts. Times are counted in buckets of
hours (``BUCKETS_H``), from which the API reads p50 and p90.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from notifier.models import Status, Transition

#: upper edges (hours) of the time buckets; the last bucket is everything longer
BUCKETS_H = (
    1,
    2,
    4,
    6,
    8,
    12,
    18,
    24,
    30,
    36,
    48,
    60,
    72,
    96,
    120,
    144,
    168,
    216,
    264,
    336,
    504,
    720,
)
#: statuses that mean the carrier has the parcel (the journey starts at the first of them; a
#: delivery with nothing before it has no journey to time)
_MOVING = frozenset(
    {
        Status.PICKED_UP,
        Status.IN_TRANSIT,
        Status.ARRIVED_AT_FACILITY,
        Status.DEPARTED_FACILITY,
        Status.OUT_FOR_DELIVERY,
        Status.DELIVERY_ATTEMPT_FAILED,
        Status.AVAILABLE_FOR_PICKUP,
        Status.EXCEPTION,
    }
)
UNKNOWN = "-"


class Journey(BaseModel):
    """What a shipment's carrier performance is counted from, once it is delivered."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    picked_up_at: datetime | None = None
    #: the country of the first located scan once the carrier had the parcel
    origin: str | None = None
    attempts_failed: int = 0
    #: exception codes met on the way, in order, each once
    exceptions: list[str] = Field(default_factory=list)
    #: the hub ("<country>:<city>") the parcel last arrived at, and when
    hub: str | None = None
    hub_at: datetime | None = None
    #: delivered and counted
    counted: bool = False
    #: started on a shipment already under way (its state is older than journeys): its
    #: pickup, attempts and exceptions are not all known, so its delivery counts nothing
    partial: bool = False


#: event id prefixes of the transitions the service makes itself (the stall check, a
#: predicted delay): not the carrier's scans, so not its performance
OWN_EVENTS = ("stalled:", "predicted-late:")


def late(verdicts: Iterable[Any]) -> bool:
    """Whether a transition's decisions say it is a late scan the shipment had moved past
    (a scan back at a hub after a failed attempt is not: it counts), or a return reaching
    its sender (no delivery of the lane's)."""
    found = list(verdicts)
    return bool(found) and all(getattr(v, "rule", "") in _NOT_THE_JOURNEY for v in found)


_NOT_THE_JOURNEY = frozenset({"out_of_order", "returned"})


def bucket(hours: float) -> str:
    """The time bucket of a duration: its upper edge in hours, or ``more``."""
    for edge in BUCKETS_H:
        if hours <= edge:
            return str(edge)
    return "more"


def field(carrier: str, origin: str, destination: str, count: str) -> str:
    """A carrier count's name ("|" in a carrier's or a city's name becomes "/")."""
    parts = (carrier, origin, destination, count)
    return "|".join(p.replace("|", "/") for p in parts)


def _country(t: Transition) -> str | None:
    return t.location.country if t.location is not None and t.location.country else None


#: statuses that change a journey only until its pickup and origin are known
_QUIET = frozenset(
    {
        Status.INFO_RECEIVED,
        Status.PICKED_UP,
        Status.IN_TRANSIT,
        Status.OUT_FOR_DELIVERY,
        Status.AVAILABLE_FOR_PICKUP,
    }
)


def advance(journey: Journey, t: Transition) -> tuple[Journey, dict[str, int]]:
    """The journey after ``t`` (news, in order) and the carrier counts it makes."""
    if t.status in _QUIET and journey.origin is not None and journey.picked_up_at is not None:
        return journey, {}  # most scans: nothing to note (the worker's hot path)
    counts: dict[str, int] = {}
    update = _facts(journey, t)
    dwell = _dwell(journey, t)
    if dwell is not None:
        counts[dwell] = 1
        update.update(hub=None, hub_at=None)
    after = journey.model_copy(update=update) if update else journey
    if t.status is Status.DELIVERED and not journey.counted:
        counts.update(_delivered(after, t))
        after = after.model_copy(update={"counted": True})
    return after, counts


def _facts(journey: Journey, t: Transition) -> dict[str, object]:
    """What ``t`` changes of the journey's facts (pickup, origin, hub, attempts, exceptions)."""
    update: dict[str, object] = {}
    country = _country(t)
    if journey.picked_up_at is None and t.status in _MOVING:
        update["picked_up_at"] = t.occurred_at
    if journey.origin is None and country and (journey.picked_up_at or t.status in _MOVING):
        update["origin"] = country
    city = t.location.city if t.location is not None else None
    if t.status is Status.ARRIVED_AT_FACILITY and city and country:
        update.update(hub=f"{country}:{city}", hub_at=t.occurred_at)
    if t.status is Status.DELIVERY_ATTEMPT_FAILED:
        update["attempts_failed"] = journey.attempts_failed + 1
    code = t.exception_code.value if t.exception_code is not None else None
    if t.status is Status.EXCEPTION and code and code not in journey.exceptions:
        update["exceptions"] = [*journey.exceptions, code]
    return update


def _dwell(journey: Journey, t: Transition) -> str | None:
    """The dwell count a departure from the hub the parcel arrived at makes, if any."""
    if t.status is not Status.DEPARTED_FACILITY or not journey.hub or not journey.hub_at:
        return None
    city = t.location.city if t.location is not None else None
    if city is not None and journey.hub != f"{_country(t)}:{city}":
        return None
    hours = (t.occurred_at - journey.hub_at).total_seconds() / 3600
    if hours < 0:
        return None
    return field(t.carrier, f"hub:{journey.hub}", UNKNOWN, f"dwell_h:{bucket(hours)}")


def _delivered(journey: Journey, t: Transition) -> dict[str, int]:
    """The lane counts of a delivery: counted, first attempt, transit time, exceptions."""
    if journey.partial:
        return {}
    lane = (t.carrier, journey.origin or UNKNOWN, _country(t) or UNKNOWN)
    counts = {field(*lane, "delivered"): 1}
    if journey.attempts_failed == 0:
        counts[field(*lane, "first_attempt")] = 1
    start = journey.picked_up_at
    if start is not None and t.occurred_at >= start:
        hours = (t.occurred_at - start).total_seconds() / 3600
        counts[field(*lane, f"transit_h:{bucket(hours)}")] = 1
    for code in journey.exceptions:
        counts[field(*lane, f"exception:{code}")] = 1
    return counts


def percentile(histogram: Mapping[str, int], share: float) -> float | None:
    """The hours under which ``share`` of the counted durations fall, read from their
    buckets (linear within a bucket; the open last bucket gives its lower edge)."""
    total = sum(histogram.values())
    if not total:
        return None
    edges = [*BUCKETS_H, None]
    seen, low = 0, 0.0
    for edge in edges:
        n = histogram.get(str(edge) if edge is not None else "more", 0)
        if seen + n >= share * total and n:
            if edge is None:
                return float(low)
            return round(low + (edge - low) * (share * total - seen) / n, 1)
        seen += n
        low = float(edge) if edge is not None else low
    return float(low)


def fold_counts(items: Iterable[tuple[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, n in items:
        out[name] = out.get(name, 0) + n
    return out
