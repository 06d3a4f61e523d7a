"""Merchant webhook events: what the service tells a merchant's own systems (pure).

An event names what happened to a shipment (an exception class), to a message (it failed for
good) or to a recipient (an opt-out), so a merchant's support tool can open a ticket before
the customer calls. Its id is fixed by what it is about, so the same fact is one event
however often a worker meets it, and a receiver deduplicates by it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from datetime import datetime
from enum import StrEnum
from typing import Any
from urllib.parse import quote

import orjson

from notifier.models import ExceptionCode, Status, Transition
from notifier.policy.engine import Step

#: The event id prefix (a webhook event, not a carrier event).
ID_PREFIX = "whe_"
#: The event id prefix of the stall check's transitions (``worker.find_stalled``).
STALLED_PREFIX = "stalled:"
#: ... and of a predicted delay's (``pipeline.Pipeline._predicted_late``)
PREDICTED_PREFIX = "predicted-late:"


class EventType(StrEnum):
    """What a merchant can subscribe an endpoint to."""

    DELAYED = "exception.delayed"  #: the carrier reports the parcel running late
    WEATHER_DELAY = "exception.weather_delay"  #: held up by weather
    CUSTOMS_HOLD = "exception.customs_hold"  #: held by customs
    ADDRESS_ISSUE = "exception.address_issue"  #: the address is incomplete or wrong
    RECIPIENT_UNAVAILABLE = "exception.recipient_unavailable"  #: nobody to receive it
    DAMAGED = "exception.damaged"  #: the parcel is damaged
    LOST = "exception.lost"  #: the parcel is lost
    REFUSED = "exception.refused"  #: delivery was refused
    HELD_AT_FACILITY = "exception.held_at_facility"  #: held at a carrier facility
    OTHER = "exception.other"  #: any other carrier exception
    #: no carrier scan or delivery in the expected time (the service's own stall check)
    STALLED = "exception.stalled"
    DELIVERY_ATTEMPT_FAILED = "exception.delivery_attempt_failed"  #: a courier could not deliver
    RETURNED_TO_SENDER = "exception.returned_to_sender"  #: on its way back to the merchant
    DELIVERY_FAILED = "delivery.failed"  #: an email or SMS failed for good
    OPTED_OUT = "recipient.opted_out"  #: a recipient opted out of a channel
    TEST = "test"  #: sent on request only (``POST …/webhook-endpoints/{id}/test``)


#: the decisions that mean an event is stale news (a late scan): no event for them
_STALE_RULES = frozenset({"out_of_order", "behind", "stale"})


class UnknownEventType(ValueError):
    """A subscription that names no event type."""


def check_patterns(patterns: Iterable[str]) -> list[str]:
    """The patterns of a subscription, deduplicated in order: event types, ``exception.*``
    (every exception class), ``delivery.*``, ``recipient.*``, or ``*`` (everything);
    UnknownEventType naming the first that is none of these."""
    known = {t.value for t in EventType if t is not EventType.TEST}
    families = {value.split(".", 1)[0] + ".*" for value in known}
    out: list[str] = []
    for pattern in patterns:
        if pattern not in known and pattern not in families and pattern != "*":
            raise UnknownEventType(
                f"{pattern!r} is no event type; use one of {sorted(known)}, "
                f"{sorted(families)} or '*'"
            )
        if pattern not in out:
            out.append(pattern)
    return out


def matches(patterns: Iterable[str], event_type: str) -> bool:
    """Whether a subscription takes ``event_type`` (``test`` events go to the endpoint
    they were asked for, whatever it subscribes to)."""
    if event_type == EventType.TEST:
        return True
    family = event_type.split(".", 1)[0] + ".*"
    return any(p in ("*", event_type, family) for p in patterns)


def type_of(t: Transition) -> EventType | None:
    """The event a transition is, if any: an exception class, a failed attempt, a return."""
    if t.status is Status.EXCEPTION:
        if t.event_id.startswith(STALLED_PREFIX):
            return EventType.STALLED
        return EventType(f"exception.{(t.exception_code or ExceptionCode.OTHER).value}")
    if t.status is Status.DELIVERY_ATTEMPT_FAILED:
        return EventType.DELIVERY_ATTEMPT_FAILED
    if t.status is Status.RETURNED_TO_SENDER:
        return EventType.RETURNED_TO_SENDER
    return None


def event_id(merchant_id: str, event_type: str, *about: str) -> str:
    """The id of the event of ``event_type`` about ``about`` (the same fact, the same id)."""
    text = "\x00".join((merchant_id, event_type, *about))
    return ID_PREFIX + hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def timeline_url(public_url: str, merchant_id: str, shipment_id: str) -> str:
    """Where a shipment's decisions and message statuses are read (the history API)."""
    return (
        f"{public_url.rstrip('/')}/v1/merchants/{quote(merchant_id, safe='')}"
        f"/shipments/{quote(shipment_id, safe='')}/notifications"
    )


def envelope(
    event_id_: str, event_type: str, merchant_id: str, created_at: datetime, data: Mapping[str, Any]
) -> dict[str, Any]:
    """An event as receivers get it."""
    return {
        "id": event_id_,
        "type": event_type,
        "created_at": created_at.isoformat(),
        "merchant_id": merchant_id,
        "data": dict(data),
    }


def source_of(t: Transition) -> str:
    """Who reported a transition: the carrier, or the service itself (its stall check, its
    prediction that the shipment will miss its window)."""
    if t.event_id.startswith(STALLED_PREFIX):
        return "stall_check"
    if t.event_id.startswith(PREDICTED_PREFIX):
        return "prediction"
    return "carrier"


def is_news(step: Step) -> bool:
    """Whether a folded transition is news: not a redelivery, not a late scan the shipment
    has moved past, not a message caught up for an earlier event."""
    if step.replay or step.caught_up_by is not None:
        return False
    return not (step.verdicts and all(v.rule in _STALE_RULES for v in step.verdicts))


def from_step(
    step: Step, merchant_id: str, decided_at: datetime, public_url: str, order_number: str | None
) -> dict[str, Any] | None:
    """The event a folded transition makes, if it is one and news: not a redelivery, not a
    late scan the shipment has moved past, not a message caught up for an earlier event."""
    t = step.transition
    kind = type_of(t)
    if kind is None or not is_news(step):
        return None
    decision = {
        (v.channel.value if v.channel is not None else "all"): {
            "outcome": v.outcome.value,
            "reason": v.reason,
            **({"send_at": v.send_at.isoformat()} if v.send_at is not None else {}),
        }
        for v in step.verdicts
    }
    data: dict[str, Any] = {
        "shipment_id": t.shipment_id,
        "tracking_number": t.tracking_number,
        "carrier": t.carrier,
        "order_number": order_number,
        "event_id": t.event_id,
        "milestone": t.milestone,
        "status": t.status.value,
        "exception_code": t.exception_code.value if t.exception_code else None,
        "occurred_at": t.occurred_at.isoformat(),
        "carrier_description": t.carrier_description,
        "location": t.location.model_dump(exclude_none=True) if t.location else None,
        "decision": decision,
        "timeline_url": timeline_url(public_url, merchant_id, t.shipment_id),
        "source": source_of(t),
    }
    eid = event_id(merchant_id, kind, t.shipment_id, t.event_id)
    return envelope(eid, kind, merchant_id, decided_at, data)


def delivery_failed(
    merchant_id: str,
    shipment_id: str,
    notification_id: str,
    channel: str,
    reason: str,
    at: datetime,
    public_url: str,
    transition: Transition | None = None,
) -> dict[str, Any]:
    """An email or SMS that failed for good (the service gave up, or the provider says so)."""
    data = {
        "shipment_id": shipment_id,
        "notification_id": notification_id,
        "channel": channel,
        "milestone": transition.milestone if transition else None,
        "event_id": transition.event_id if transition else None,
        "reason": reason,
        "timeline_url": timeline_url(public_url, merchant_id, shipment_id),
    }
    eid = event_id(merchant_id, EventType.DELIVERY_FAILED, notification_id)
    return envelope(eid, EventType.DELIVERY_FAILED, merchant_id, at, data)


def opted_out(
    merchant_id: str,
    channel: str,
    address: str,
    source: str,
    at: datetime,
    shipment_id: str | None = None,
) -> dict[str, Any]:
    """A recipient opted out of a channel (``source``: how the service learnt it). The
    address is the merchant's customer's: the merchant needs it to update its own records."""
    data = {"channel": channel, "address": address, "source": source, "shipment_id": shipment_id}
    eid = event_id(merchant_id, EventType.OPTED_OUT, channel, address, at.isoformat())
    return envelope(eid, EventType.OPTED_OUT, merchant_id, at, data)


def stored(event: Mapping[str, Any], target: str | None = None) -> bytes:
    """An event as the queue keeps it: the event, and the one endpoint it is for (a test)."""
    return orjson.dumps({"event": event, "target": target})
