"""Shipment state: what the worker knows about one shipment, folded from its transitions (pure)."""

from __future__ import annotations

from datetime import datetime, timedelta

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
#: Statuses after which nothing earlier in the journey is news.
TERMINAL = frozenset({Status.DELIVERED, Status.RETURNED_TO_SENDER})
_DAY = timedelta(hours=24)


class Fix(BaseModel):
    """A located scan: where and when."""

    model_config = ConfigDict(frozen=True)

    lat: float
    lon: float
    at: datetime


class Notice(BaseModel):
    """The latest message decided (sent or deferred) on a channel; newer ones supersede it."""

    model_config = ConfigDict(frozen=True)

    event_id: str
    milestone: str
    occurred_at: datetime


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
    occurred_at: datetime | None = None  #: of the current status
    first_at: datetime | None = None  #: earliest accepted event
    last_scan_at: datetime | None = None  #: latest accepted event
    last_fix: Fix | None = None  #: latest located scan
    location: Location | None = None
    estimated_delivery: DeliveryWindow | None = None
    recipient: Recipient | None = None
    order: Order | None = None
    seen: list[str] = Field(default_factory=list)
    #: milestone (``delivered``, ``exception:customs_hold``) -> channel -> when it was decided
    notified: dict[str, dict[ChannelKind, datetime]] = Field(default_factory=dict)
    #: channel -> when its last trivial update was decided
    last_trivial: dict[ChannelKind, datetime] = Field(default_factory=dict)
    #: messages decided in the last 24 hours (for the daily cap), oldest first
    recent: list[datetime] = Field(default_factory=list)
    sms_total: int = 0
    notices: dict[ChannelKind, Notice] = Field(default_factory=dict)
    events: int = 0

    def has_seen(self, event_id: str) -> bool:
        """Whether this event was already folded into the state."""
        return event_id in self.seen

    def is_step_back(self, t: Transition) -> bool:
        """True for an event that would move the shipment backwards.

        Older than the current status and no further along; or anything less than
        a terminal status (nothing before "delivered" is news after it).
        """
        if self.status is None or self.occurred_at is None:
            return False
        rank, current = STATUS_RANK[t.status], STATUS_RANK[self.status]
        if self.status in TERMINAL and rank < current:
            return True
        return t.occurred_at < self.occurred_at and rank <= current

    def messages_since(self, since: datetime) -> int:
        """Messages decided at or after ``since``."""
        return sum(1 for at in self.recent if at >= since)

    def apply(self, t: Transition) -> ShipmentState:
        """Return the state after ``t``; a step back only adds facts, never rewinds status."""
        update: dict[str, object] = {
            "tracking_number": t.tracking_number,
            "carrier": t.carrier,
            "tracking_url": t.tracking_url or self.tracking_url,
            "recipient": merge_recipient(self.recipient, t.recipient),
            "order": t.order or self.order,
            "seen": [*self.seen, t.event_id][-SEEN_EVENTS:],
            "events": self.events + 1,
            "first_at": min(self.first_at, t.occurred_at) if self.first_at else t.occurred_at,
            "last_scan_at": max(self.last_scan_at, t.occurred_at)
            if self.last_scan_at
            else t.occurred_at,
        }
        loc = t.location
        located = loc is not None and loc.lat is not None and loc.lon is not None
        if located and (self.last_fix is None or t.occurred_at >= self.last_fix.at):
            assert loc is not None and loc.lat is not None and loc.lon is not None
            update["last_fix"] = Fix(lat=loc.lat, lon=loc.lon, at=t.occurred_at)
        if not self.is_step_back(t):
            update.update(
                status=t.status,
                exception_code=t.exception_code,
                occurred_at=t.occurred_at,
                location=t.location or self.location,
                estimated_delivery=t.estimated_delivery or self.estimated_delivery,
            )
        return self.model_copy(update=update)

    def remember(self, t: Transition) -> ShipmentState:
        """Only note that ``t`` was seen (a flagged anomaly changes nothing else)."""
        return self.model_copy(
            update={"seen": [*self.seen, t.event_id][-SEEN_EVENTS:], "events": self.events + 1}
        )

    def record_message(
        self, t: Transition, channel: ChannelKind, trivial: bool, at: datetime
    ) -> ShipmentState:
        """Return the state remembering a message decided for ``t`` on ``channel`` at ``at``."""
        notified = {key: dict(value) for key, value in self.notified.items()}
        notified.setdefault(t.milestone, {})[channel] = at
        update: dict[str, object] = {
            "notified": notified,
            "recent": [*(r for r in self.recent if r > at - _DAY), at],
            "sms_total": self.sms_total + (channel is ChannelKind.SMS),
            "notices": {
                **self.notices,
                channel: Notice(
                    event_id=t.event_id, milestone=t.milestone, occurred_at=t.occurred_at
                ),
            },
        }
        if trivial:
            update["last_trivial"] = {**self.last_trivial, channel: at}
        return self.model_copy(update=update)

    def stall_deadline(
        self, statuses: frozenset[Status], no_scan: timedelta, after_window: timedelta
    ) -> datetime | None:
        """When this shipment counts as stalled, or None when it cannot stall."""
        if self.status not in statuses or self.last_scan_at is None:
            return None
        deadline = self.last_scan_at + no_scan
        if self.estimated_delivery is not None:
            deadline = min(deadline, self.estimated_delivery.end + after_window)
        return deadline


def merge_recipient(old: Recipient | None, new: Recipient | None) -> Recipient | None:
    """Later transitions may send a partial recipient; keep what they leave out."""
    if new is None or old is None:
        return new or old
    merged = old.model_dump() | new.model_dump(exclude_none=True)
    return Recipient.model_validate(merged)
