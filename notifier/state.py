"""Shipment state: what the worker knows about one shipment, folded from its transitions (pure)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from notifier.models import (
    STATUS_RANK,
    ChannelKind,
    DeliveryWindow,
    ExceptionCode,
    Location,
    Order,
    Recipient,
    Status,
    Transition,
)

#: How many recent event ids a shipment remembers, so a re-delivered inbox entry
#: is recognised as already processed.
SEEN_EVENTS = 64


class ShipmentState(BaseModel):
    """The latest known picture of a shipment plus what it has been told."""

    model_config = ConfigDict(extra="ignore")

    merchant_id: str
    shipment_id: str
    tracking_number: str | None = None
    carrier: str | None = None
    tracking_url: str | None = None
    status: Status | None = None
    exception_code: ExceptionCode | None = None
    occurred_at: datetime | None = None
    location: Location | None = None
    estimated_delivery: DeliveryWindow | None = None
    recipient: Recipient | None = None
    order: Order | None = None
    seen: list[str] = Field(default_factory=list)
    #: milestone (``delivered``, ``exception:customs_hold``) -> channel -> when it was notified
    notified: dict[str, dict[ChannelKind, datetime]] = Field(default_factory=dict)
    events: int = 0

    def has_seen(self, event_id: str) -> bool:
        """Whether this event was already folded into the state."""
        return event_id in self.seen

    def is_older_than_latest(self, t: Transition) -> bool:
        """True for a late event that would move the shipment backwards."""
        if self.status is None or self.occurred_at is None:
            return False
        return (
            t.occurred_at < self.occurred_at and STATUS_RANK[t.status] <= STATUS_RANK[self.status]
        )

    def apply(self, t: Transition) -> ShipmentState:
        """Return the state after ``t``; a late event only adds facts, never rewinds status."""
        late = self.is_older_than_latest(t)
        update: dict[str, object] = {
            "tracking_number": t.tracking_number,
            "carrier": t.carrier,
            "tracking_url": t.tracking_url or self.tracking_url,
            "recipient": _merge_recipient(self.recipient, t.recipient),
            "order": t.order or self.order,
            "seen": [*self.seen, t.event_id][-SEEN_EVENTS:],
            "events": self.events + 1,
        }
        if not late:
            update.update(
                status=t.status,
                exception_code=t.exception_code,
                occurred_at=t.occurred_at,
                location=t.location or self.location,
                estimated_delivery=t.estimated_delivery or self.estimated_delivery,
            )
        return self.model_copy(update=update)

    def mark_notified(self, milestone: str, channel: ChannelKind, at: datetime) -> ShipmentState:
        """Return the state remembering that ``milestone`` went out on ``channel`` at ``at``."""
        notified = {key: dict(value) for key, value in self.notified.items()}
        notified.setdefault(milestone, {})[channel] = at
        return self.model_copy(update={"notified": notified})


def _merge_recipient(old: Recipient | None, new: Recipient | None) -> Recipient | None:
    """Later transitions may send a partial recipient; keep what they leave out."""
    if new is None or old is None:
        return new or old
    merged = old.model_dump() | new.model_dump(exclude_none=True)
    return Recipient.model_validate(merged)
