"""Predicted delivery from the service's own history (pure, and a per-process cache).

The model is the merchant's transit times per carrier and origin country over the last
``WINDOW_DAYS`` (the carrier counts of ``journeys``: buckets of hours from pickup to
delivery, summed over destinations). For a shipment on its way it takes the deliveries of
its carrier and origin that took longer than the time it has already been under way, and
reads their median and 90th percentile from the buckets: "parcels like this one, still
moving after this long, arrived by then". With fewer than ``MIN_DELIVERIES`` such
deliveries it falls back to the carrier over every origin, then gives no prediction. A
shipment with a promised window is ``likely_late`` when the median falls after its end.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

from notifier.insights.journeys import BUCKETS_H
from notifier.state import TERMINAL, ShipmentState

#: how far back the model looks, days
WINDOW_DAYS = 90
#: deliveries a prediction needs (of the carrier and origin, else of the carrier)
MIN_DELIVERIES = 20
#: how long a process keeps a merchant's model, seconds, and for how many merchants
REFRESH_S = 600.0
KEEP_MODELS = 10_000

#: (low, high) hours of each bucket, by its name; the last is open
_EDGES: dict[str, tuple[float, float | None]] = {}
_low = 0.0
for _edge in BUCKETS_H:
    _EDGES[str(_edge)] = (_low, float(_edge))
    _low = float(_edge)
_EDGES["more"] = (_low, None)

Histogram = dict[str, int]


@dataclass(frozen=True, slots=True)
class Model:
    """Transit-time histograms by (carrier, origin) and by carrier."""

    lanes: Mapping[tuple[str, str], Histogram]
    carriers: Mapping[str, Histogram]

    @classmethod
    def of(cls, found: Mapping[str, Mapping[str, int]]) -> Model:
        """From day -> carrier count field -> n (``Store.carrier_stats``)."""
        lanes: dict[tuple[str, str], Histogram] = {}
        carriers: dict[str, Histogram] = {}
        for fields in found.values():
            for name, n in fields.items():
                parts = name.split("|")
                if len(parts) != 4 or not parts[3].startswith("transit_h:"):
                    continue
                carrier, origin, _, count = parts
                key = count.removeprefix("transit_h:")
                lane = lanes.setdefault((carrier, origin), {})
                lane[key] = lane.get(key, 0) + n
                mine = carriers.setdefault(carrier, {})
                mine[key] = mine.get(key, 0) + n
        return cls(lanes, carriers)


def remaining(histogram: Mapping[str, int], elapsed_h: float) -> list[tuple[float, float, float]]:
    """The part of ``histogram`` longer than ``elapsed_h``: (low, high, weight) pieces, a
    bucket cut where ``elapsed_h`` falls in it (the open last bucket: as one at its edge)."""
    out = []
    for name, n in histogram.items():
        edges = _EDGES.get(name)
        if edges is None or n <= 0:
            continue
        low, high = edges
        if high is None:
            if elapsed_h <= low:
                out.append((low, low, float(n)))
            continue
        if high <= elapsed_h:
            continue
        if low < elapsed_h:
            out.append((elapsed_h, high, n * (high - elapsed_h) / (high - low)))
        else:
            out.append((low, high, float(n)))
    return sorted(out)


def quantile(pieces: list[tuple[float, float, float]], share: float) -> float | None:
    """The hours under which ``share`` of the pieces' weight falls (linear in a piece)."""
    total = sum(w for _, _, w in pieces)
    if total <= 0:
        return None
    seen = 0.0
    for low, high, w in pieces:
        if seen + w >= share * total:
            return low + (high - low) * (share * total - seen) / w
        seen += w
    return pieces[-1][1]


@dataclass(frozen=True, slots=True)
class Prediction:
    delivery_by: datetime  #: the median of parcels like this one
    latest: datetime  #: their 90th percentile
    carrier: str
    origin: str  #: "*": every origin of the carrier
    deliveries: int  #: how many deliveries it is read from
    likely_late: bool | None  #: after the promised window's end; None without a window

    def as_json(self) -> dict[str, Any]:
        return {
            "delivery_by": self.delivery_by.isoformat(),
            "latest": self.latest.isoformat(),
            "basis": {
                "carrier": self.carrier,
                "origin": self.origin,
                "deliveries": self.deliveries,
                "window_days": WINDOW_DAYS,
            },
            "likely_late": self.likely_late,
        }


def predict(model: Model, state: ShipmentState, now: datetime) -> Prediction | None:
    """When ``state``'s shipment is likely delivered, from ``model``; None when it is
    delivered or back, not yet picked up, or too little is known of its carrier."""
    journey = state.journey
    if state.status in TERMINAL or journey is None or journey.picked_up_at is None:
        return None
    carrier = state.carrier or ""
    elapsed = max(0.0, (now - journey.picked_up_at).total_seconds() / 3600)
    candidates = [
        (journey.origin or "-", model.lanes.get((carrier, journey.origin or "-"), {})),
        ("*", model.carriers.get(carrier, {})),
    ]
    for origin, histogram in candidates:
        pieces = remaining(histogram, elapsed)
        count = round(sum(w for _, _, w in pieces))
        if count < MIN_DELIVERIES:
            continue
        p50, p90 = quantile(pieces, 0.5), quantile(pieces, 0.9)
        if p50 is None or p90 is None:
            continue
        start = journey.picked_up_at
        by, latest = start + timedelta(hours=p50), start + timedelta(hours=p90)
        window = state.estimated_delivery
        late = None if window is None else by > window.end
        return Prediction(by, latest, carrier, origin, count, late)
    return None


class Predictions:
    """Each merchant's model, as this process last read it (every ``REFRESH_S`` at most)."""

    def __init__(
        self,
        read: Callable[[str, date, date], Any],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.read, self.clock = read, clock
        self._models: dict[str, tuple[float, Model]] = {}

    async def model(self, merchant_id: str, today: date) -> Model:
        return (await self.models([merchant_id], today))[merchant_id]

    async def models(self, merchant_ids: list[str], today: date) -> dict[str, Model]:
        """The models of several merchants; those not read lately are read side by side."""
        now = self.clock()
        stale = [
            m
            for m in merchant_ids
            if m not in self._models or now - self._models[m][0] >= REFRESH_S
        ]
        if stale:
            first = today - timedelta(days=WINDOW_DAYS - 1)
            found = await asyncio.gather(*(self.read(m, first, today) for m in stale))
            for merchant_id, counts in zip(stale, found, strict=True):
                self._models.pop(merchant_id, None)  # (re)inserted last: the newest
                self._models[merchant_id] = (now, Model.of(counts))
            while len(self._models) > KEEP_MODELS:  # the least recently read go first
                del self._models[next(iter(self._models))]
        return {m: self._models[m][1] for m in merchant_ids}
