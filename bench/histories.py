"""The real carrier histories of ``tests/data/carrier_histories.json`` (public
carrier-integration fixtures; the file names each one's source) and how their
carrier-neutral ``mapped_status`` reads in notifier's status vocabulary: what
``tests/test_histories.py`` replays through the engine and
``scripts/train_dictionaries.py`` replays through the service."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PATH = Path(__file__).resolve().parents[1] / "tests" / "data" / "carrier_histories.json"

#: carrier-neutral mapped_status -> (status, exception_code)
MAPPING: dict[str, tuple[str, str | None]] = {
    "pending": ("info_received", None),
    "picked_up": ("picked_up", None),
    "in_transit": ("in_transit", None),
    "out_for_delivery": ("out_for_delivery", None),
    "ready_for_pickup": ("available_for_pickup", None),
    "delivered": ("delivered", None),
    "delivery_failed": ("delivery_attempt_failed", None),
    "delivery_delayed": ("exception", "delayed"),
    "on_hold": ("exception", "held_at_facility"),
}


def load() -> list[dict[str, Any]]:
    """Every history, as the file holds it."""
    histories: list[dict[str, Any]] = json.loads(PATH.read_text(encoding="utf-8"))
    return histories
