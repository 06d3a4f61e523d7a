"""The channel protocol and its typed outcome."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Protocol

from notifier.errors import DeliveryError, TemporaryDeliveryError
from notifier.render import Message


@dataclass(frozen=True, slots=True)
class Receipt:
    """What a channel reports for an accepted message (file path or provider message id)."""

    channel: str
    detail: str


@dataclass(slots=True)
class Lease:
    """Until when a round may still hand its messages to a channel (``lease_clock``):
    its claims' lease from their last renewal, less a margin for the clocks of other
    workers. A process paused past it (a stop signal, a VM frozen, swap) may find its
    claims taken over, and their messages sent, by another worker: it must not send them
    again. ``lost``: claims a renewal found another worker's."""

    until: float
    lost: set[str] = field(default_factory=set)

    def allows(self, notification_id: str) -> bool:
        return self.open() and notification_id not in self.lost

    def open(self) -> bool:
        """Whether the lease still holds (for the claims not ``lost``)."""
        return lease_clock() < self.until


def lease_clock() -> float:
    """Seconds on a clock that keeps counting while the machine sleeps (a suspended VM, a
    laptop's lid): Linux's boot time; elsewhere, the monotonic clock."""
    return time.clock_gettime(_BOOTTIME) if _BOOTTIME is not None else time.monotonic()


_BOOTTIME: int | None = getattr(time, "CLOCK_BOOTTIME", None)


class ClaimLapsed(TemporaryDeliveryError):
    """Not handed to the channel: its claim may be another worker's now (``Lease``)."""


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One message to deliver.

    ``recovering`` is true when an earlier attempt may already have delivered
    this notification; a channel that can find out (the outbox can) must not
    deliver it twice. ``lease``: its round's; a channel checks it right before it
    delivers each message (``lapsed``).
    """

    message: Message
    sent_at: datetime
    recovering: bool = False
    lease: Lease | None = None

    def lapsed(self, channel: str) -> ClaimLapsed | None:
        """The outcome of a message whose claim lapsed before it was delivered, or None."""
        nid = self.message.notification_id
        if self.lease is None or self.lease.allows(nid):
            return None
        return ClaimLapsed(
            "its claim lapsed before it was sent; left to its new holder", nid, channel
        )


#: Per message: a receipt, or the ``TemporaryDeliveryError`` / ``PermanentDeliveryError``
#: that says whether it is worth retrying.
Outcome = Receipt | DeliveryError


class Channel(Protocol):
    """Delivers rendered messages, a batch at a time, with one typed outcome per message."""

    name: str

    async def send_many(self, items: Sequence[Outgoing]) -> list[Outcome]:
        """Deliver ``items``; never raises for a single message's failure."""
        ...


def retry_after_s(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds a ``Retry-After`` header asks for, in either of its forms (RFC 9110):
    delay-seconds (``120``) or an HTTP-date (``Wed, 03 Dec 2026 10:00:00 GMT``)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # an HTTP-date is GMT
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())
