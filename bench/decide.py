"""Micro-benchmark: decide() decisions per second on one core (pure, no I/O).

Run: .venv/bin/python -m bench.decide [--seconds 2] [--runs 5]
Prints the median of several runs over a realistic mix of shipment states and
transitions (fresh shipments, throttled trivial updates, deduped re-scans,
quiet hours, exceptions, a message log of a dozen entries).
"""

from __future__ import annotations

import statistics
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from bench._cli import arguments, save
from notifier.models import Transition
from notifier.policy import PolicyStore, decide, fold
from notifier.resources import data_dir
from notifier.state import ShipmentState

NOW = datetime(2026, 11, 21, 22, 30, tzinfo=UTC)  # SMS quiet hours in Europe, daytime elsewhere
ZONES = ["Europe/Paris", "America/New_York", "Asia/Tokyo", "Pacific/Kiritimati", None]
JOURNEY = [
    "picked_up",
    "in_transit",
    "arrived_at_facility",
    "departed_facility",
    "out_for_delivery",
    "delivery_attempt_failed",
    "out_for_delivery",
    "delivered",
]


def transition(i: int, status: str, at: datetime, zone: str | None) -> Transition:
    body: dict[str, Any] = {
        "event_id": f"e{i}",
        "merchant_id": "acme",
        "shipment_id": f"s{i % 97}",
        "tracking_number": "1Z999AA10123456784",
        "carrier": "ups",
        "status": status,
        "occurred_at": at,
        "location": {"city": "Leipzig", "country": "DE", "lat": 51.34, "lon": 12.37},
        "recipient": {
            "email": "ana@example.com",
            "phone": "+33612345678",
            **({"timezone": zone} if zone else {}),
        },
    }
    if status == "exception":
        body["exception_code"] = "customs_hold"
    return Transition.model_validate(body)


def cases() -> list[tuple[ShipmentState, Transition]]:
    """(state before, transition) pairs: states built by folding part of a journey."""
    policy = PolicyStore(data_dir("policies", None)).for_merchant("")
    out = []
    for k in range(200):
        zone = ZONES[k % len(ZONES)]
        n = k % len(JOURNEY)
        start = NOW - timedelta(hours=30)
        history = [
            transition(k * 100 + j, JOURNEY[j], start + timedelta(hours=3 * j), zone)
            for j in range(n)
        ]
        state = ShipmentState(merchant_id="acme", shipment_id=f"s{k}")
        for j, t in enumerate(history):
            state, _ = fold(policy, state, [t], start + timedelta(hours=3 * j, minutes=5))
        status = "exception" if k % 11 == 0 else JOURNEY[min(n, len(JOURNEY) - 1)]
        out.append((state, transition(k * 100 + 99, status, NOW - timedelta(minutes=5), zone)))
    return out


def run(seconds: float) -> float:
    policy = PolicyStore(data_dir("policies", None)).for_merchant("")
    pairs = cases()
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for state, t in pairs:
            decide(policy, state, t, NOW)
        done += len(pairs)
    return done / (time.perf_counter() - started)


def main() -> None:
    args = arguments(__doc__)
    rates = [run(args.seconds) for _ in range(args.runs)]
    result = {
        "benchmark": "decide",
        "unit": "decisions/s",
        "median": statistics.median(rates),
        "runs": [round(r) for r in rates],
        "target": 50_000,
    }
    print(
        f"decide(): median {result['median']:,.0f} decisions/s over {args.runs} runs "
        f"(runs: {', '.join(f'{r:,.0f}' for r in rates)}; target 50,000)"
    )
    save(result, args.json)


if __name__ == "__main__":
    main()
