"""A shipment's state as the store writes it: the JSON pydantic's
``model_dump_json(exclude_defaults=True)`` makes, built by hand.

The worker writes one state a shipment a batch. pydantic took 16 to 23 µs for a state of
the bench's workload (1.7 KB, half a microsecond for each of its dozen datetimes); this
takes a third of that: orjson writes the values, and each model leaves out what equals its
default as pydantic does (a nested model too). ``tests/test_assembled.py`` holds it to
pydantic's bytes on generated states, and to the fields each model has: a field added to a
model and not here fails it. States are read back with pydantic (``store.shipments``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from notifier.insights.journeys import Journey
from notifier.models import (
    ChannelKind,
    DeliveryWindow,
    Location,
    Order,
    PickupPoint,
    Recipient,
)
from notifier.state import Fix, Notice, Sent, ShipmentState

#: what pydantic writes: a datetime in UTC ends in "Z", and no key is ever sorted
_OPTIONS = orjson.OPT_UTC_Z


def state_json(state: ShipmentState, *, with_ids: bool = True) -> bytes:
    """``state.model_dump_json(exclude_defaults=True)``, without its merchant and shipment
    ids unless ``with_ids`` (the store's key names them)."""
    return orjson.dumps(state_dict(state, with_ids=with_ids), option=_OPTIONS)


def state_dict(state: ShipmentState, *, with_ids: bool = True) -> dict[str, Any]:
    """The JSON object of ``state_json``, in the model's field order."""
    out: dict[str, Any] = {}
    for name, value in state.__dict__.items():  # its fields, in order
        default, write = _STATE_FIELDS[name]
        if value is default or (default is not None and value == default):
            continue  # (only None equals None: no model's __eq__ asked)
        out[name] = value if write is None else write(value)
    if not with_ids:
        del out["merchant_id"], out["shipment_id"]
    return out


def _fix(f: Fix) -> dict[str, Any]:
    return {"lat": f.lat, "lon": f.lon, "at": f.at}


def _window(w: DeliveryWindow) -> dict[str, Any]:
    return {"start": w.start, "end": w.end}


def _set(model: Location | PickupPoint | Recipient) -> dict[str, Any]:
    """A model whose every optional field defaults to None: the fields that are not."""
    return {k: v for k, v in model.__dict__.items() if v is not None}


def _order(o: Order) -> dict[str, Any]:
    return {"number": o.number}


def _messages(messages: list[Sent]) -> list[dict[str, Any]]:
    return [_sent(m) for m in messages]


def _notices(notices: dict[ChannelKind, Notice]) -> dict[str, Any]:
    return {channel.value: _notice(n) for channel, n in notices.items()}


def _sent(m: Sent) -> dict[str, Any]:
    out = m.__dict__.copy()  # its fields, in order
    if not out.get("trivial"):
        out.pop("trivial", None)
    if out.get("due") is None:
        out.pop("due", None)
    if not out.get("cancelled"):
        out.pop("cancelled", None)
    return out


def _notice(n: Notice) -> dict[str, Any]:
    out = n.__dict__.copy()
    for name in ("rank", "pickup", "deadline"):  # (their defaults: 0, None)
        if not out.get(name):
            out.pop(name, None)
    return out


def _journey(j: Journey) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if j.picked_up_at is not None:
        out["picked_up_at"] = j.picked_up_at
    if j.origin is not None:
        out["origin"] = j.origin
    if j.attempts_failed != 0:
        out["attempts_failed"] = j.attempts_failed
    if j.exceptions:
        out["exceptions"] = j.exceptions
    if j.hub is not None:
        out["hub"] = j.hub
    if j.hub_at is not None:
        out["hub_at"] = j.hub_at
    if j.counted:
        out["counted"] = True
    if j.partial:
        out["partial"] = True
    return out


#: a required field's "default": never equal to a value
_REQUIRED = object()

#: each field of the state -> (its default, what writes a value that is not it; None: the
#: value as it is, text, a number, an enum's value, a datetime)
_STATE_FIELDS: dict[str, tuple[Any, Callable[[Any], Any] | None]] = {
    "merchant_id": (_REQUIRED, None),
    "shipment_id": (_REQUIRED, None),
    "tracking_number": (None, None),
    "carrier": (None, None),
    "tracking_url": (None, None),
    "status": (None, None),
    "exception_code": (None, None),
    "occurred_at": (None, None),
    "first_at": (None, None),
    "last_scan_at": (None, None),
    "last_fix": (None, _fix),
    "suspect_fix": (None, _fix),
    "location": (None, _set),
    "estimated_delivery": (None, _window),
    "pickup_deadline": (None, None),
    "pickup_point": (None, _set),
    "recipient": (None, _set),
    "order": (None, _order),
    "seen": ([], None),
    "messages": ([], _messages),
    "sms_archived": (0, None),
    "notices": ({}, _notices),
    "current_event": (None, None),
    "max_rank": (-1, None),
    "furthest": (None, None),
    "current_old": (False, None),
    "events": (0, None),
    "journey": (None, _journey),
    "pickup_at": (None, None),
    "pickup_left_at": (None, None),
}

#: every model this module writes, with the fields it knows of each (in order): the test
#: holds them to the models' own
WRITTEN: dict[type[Any], tuple[str, ...]] = {
    ShipmentState: tuple(_STATE_FIELDS),
    Fix: ("lat", "lon", "at"),
    Location: ("city", "region", "country", "lat", "lon"),
    DeliveryWindow: ("start", "end"),
    PickupPoint: ("name", "address", "hours"),
    Recipient: ("name", "email", "phone", "locale", "timezone"),
    Order: ("number",),
    Sent: ("at", "channel", "event_id", "milestone", "rank", "trivial", "due", "cancelled"),
    Notice: ("event_id", "milestone", "occurred_at", "rank", "pickup", "deadline"),
    Journey: (
        "picked_up_at",
        "origin",
        "attempts_failed",
        "exceptions",
        "hub",
        "hub_at",
        "counted",
        "partial",
    ),
}
