"""Shipment state: what the worker knows about one shipment, folded from its transitions (pure)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

from pydantic import BaseModel, ConfigDict, Field

from notifier.insights.journeys import Journey
from notifier.models import (
    STATUS_RANK,
    ChannelKind,
    DeliveryWindow,
    ExceptionCode,
    Location,
    Order,
    PickupPoint,
    Recipient,
    Status,
    Transition,
    assembled,
    news_rank,
    replaced,
)

#: How many recent event ids a shipment remembers, so a re-delivered inbox entry
#: is recognised as already processed.
SEEN_EVENTS = 64
#: Statuses after which nothing earlier in the journey is news.
TERMINAL = frozenset({Status.DELIVERED, Status.RETURNED_TO_SENDER})
#: Scans after which a parcel that waited at a pickup point is on its way elsewhere.
_LEAVES_PICKUP = frozenset(
    {Status.OUT_FOR_DELIVERY, Status.DELIVERY_ATTEMPT_FAILED, Status.RETURNED_TO_SENDER}
)
_DAY = timedelta(hours=24)
#: How long the message log is kept: longer than any dedupe window or throttle interval
#: the policy schema allows.
MESSAGE_LOG = timedelta(days=31)
#: A waiting message due sooner than this after a newer decision that overtakes it is not
#: cancelled then (``ShipmentState.overtaken``): the due sweep may be about to claim it, on
#: a clock a little ahead, before the decision is committed. Far longer than a batch takes.
OVERTAKE_MARGIN = timedelta(minutes=1)


class Fix(BaseModel):
    """A located scan: where and when."""

    model_config = ConfigDict(frozen=True)

    lat: float
    lon: float
    at: datetime


def pickup_key(t: Transition) -> str | None:
    """The pickup point ``t`` names, as one text that differs only when the place does
    (case and spacing aside): None without one."""
    point = t.pickup_point
    if point is None:
        return None
    return " | ".join(" ".join(part.casefold().split()) for part in (point.name, point.address))


def fix_of(t: Transition) -> Fix | None:
    """Where and when ``t`` was scanned, when its location has coordinates: not (0, 0), a
    geocoder's answer for "unknown" (no parcel is scanned in the Gulf of Guinea)."""
    loc = t.location
    if loc is None or loc.lat is None or loc.lon is None or (loc.lat == 0 and loc.lon == 0):
        return None
    return Fix(lat=loc.lat, lon=loc.lon, at=t.occurred_at)


class Notice(BaseModel):
    """The latest message decided (sent or deferred) on a channel; newer ones supersede it."""

    model_config = ConfigDict(frozen=True)

    event_id: str
    milestone: str
    occurred_at: datetime
    rank: int = 0
    #: a pickup notice's: the pickup point and the deadline it told (``pickup_key``), which
    #: a later notice is news against (``policy.engine.pickup_moved``)
    pickup: str | None = None
    deadline: datetime | None = None


class Sent(BaseModel):
    """A message decided for this shipment (sent at once, or pending until ``due``)."""

    model_config = ConfigDict(frozen=True)

    at: datetime
    channel: ChannelKind
    event_id: str
    milestone: str
    rank: int
    trivial: bool = False
    due: datetime | None = None
    #: it waited for ``due`` and was cancelled then, never handed to a channel (its
    #: recipient opted out meanwhile, or a newer decision overtook it within
    #: ``OVERTAKE_MARGIN``): no cap or throttle counts it; the duplicate rule still sees it
    #: as the last message decided on its channel (``store.shipments.settled_log``)
    cancelled: bool = False


class ShipmentState(BaseModel):
    """The latest known picture of a shipment plus what it has been told."""

    model_config = ConfigDict(extra="ignore", frozen=True)

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
    #: a located scan flagged as too far from ``last_fix``: a next scan close to it and
    #: not to ``last_fix`` shows that ``last_fix`` was the wrong one (``policy.anomaly``)
    suspect_fix: Fix | None = None
    location: Location | None = None
    estimated_delivery: DeliveryWindow | None = None
    #: of the current status, when it is available_for_pickup
    pickup_deadline: datetime | None = None
    pickup_point: PickupPoint | None = None
    recipient: Recipient | None = None
    order: Order | None = None
    seen: list[str] = Field(default_factory=list)
    #: messages decided in the last 31 days, oldest first; dedupe, caps and throttles count
    #: only the live ones (sent, or still going to be)
    messages: list[Sent] = Field(default_factory=list)
    #: SMS that aged out of ``messages`` (for the lifetime SMS cap)
    sms_archived: int = 0
    notices: dict[ChannelKind, Notice] = Field(default_factory=dict)
    #: the event that set the current status
    current_event: str | None = None
    #: the furthest step reached (highest rank) and its milestone
    max_rank: int = -1
    furthest: str | None = None
    #: the current status came from an event already too old to tell when it arrived
    #: (``policy.stale_after``): it holds no newer news back (``outvoted``)
    current_old: bool = False
    events: int = 0
    #: what its carrier performance is counted from (``insights.journeys``)
    journey: Journey | None = None
    #: the latest "ready to collect" at a pickup point, and the latest scan after which the
    #: parcel was on its way elsewhere (out for delivery, a delivery attempt, a return; kept
    #: only once a pickup is known): in any arrival order, a "delivered" after the first and
    #: not the second is the customer collecting it (``collected``)
    pickup_at: datetime | None = None
    pickup_left_at: datetime | None = None

    def has_seen(self, event_id: str) -> bool:
        """Whether this event was already folded into the state."""
        return event_id in self.seen

    def is_step_back(self, t: Transition, old: bool = False) -> bool:
        """True for a late event: stale news that must not move the shipment backwards.

        Older than the latest scan and not beyond the furthest step reached (a scan
        uploaded late); or anything short of a terminal status after it (nothing
        before "delivered" is news after it). A "delivered" after "returned to sender" is
        the return reaching the sender: it moves nothing either, so it cancels none of the
        return's messages (``returns_home``).

        ``old``: ``t`` is too old to tell (``policy.is_old``). It never moves a status that
        came from news, however far it reached (a "delivered" of ten days ago after today's
        "out for delivery"): it is recorded out of order. News that happened after a status
        set by an event too old to tell is never held back by it (``outvoted``).
        """
        if self.status is None or self.last_scan_at is None:
            return False
        if self.returns_home(t):
            return True
        if self.outvoted(t, old):
            return False
        if old and not self.current_old:
            return True
        rank = STATUS_RANK[t.status]
        if self.status in TERMINAL and rank < STATUS_RANK[self.status]:
            return True
        return t.occurred_at < self.last_scan_at and rank <= self.max_rank

    def outvoted(self, t: Transition, old: bool) -> bool:
        """Whether ``t``, news (not ``old``) newer than every scan known, outvotes the
        current status: it came from an event too old to tell when it arrived (a carrier's
        bogus "delivered" dated days back arriving first, the first scans of an import),
        which nothing told the customer of (no event too old to tell moves a status that
        came from news). ``t`` is taken as it comes, neither a step back nor behind what
        that event reached: otherwise one stale scan arriving first would silence the
        shipment. (A "delivered" after a return, however old, is still the return reaching
        the sender: ``returns_home``.)"""
        return (
            self.current_old
            and not old
            and self.last_scan_at is not None
            and t.occurred_at >= self.last_scan_at
        )

    def returns_home(self, t: Transition) -> bool:
        """A "delivered" after "returned to sender": the return reaching the sender, most
        likely, not the customer."""
        return t.status is Status.DELIVERED and self.status is Status.RETURNED_TO_SENDER

    def is_behind(self, t: Transition, old: bool = False) -> bool:
        """A newer event that is not as far along as the furthest step reached
        (back at the depot after a failed attempt, say; ``old`` as for ``is_step_back``)."""
        return STATUS_RANK[t.status] < self.max_rank and not self.outvoted(t, old)

    def current_rank(self) -> int:
        """How far along the current status is as news (``news_rank``: an exception is at
        the furthest step reached); -1 before any."""
        if self.status is None:
            return -1
        rank = STATUS_RANK[self.status]
        return max(rank, self.max_rank) if self.status is Status.EXCEPTION else rank

    @property
    def milestone(self) -> str | None:
        """The current (status, exception code) as one key, like ``Transition.milestone``."""
        if self.status is None:
            return None
        return f"{self.status}:{self.exception_code}" if self.exception_code else str(self.status)

    def superseded(
        self, channel: ChannelKind, event_id: str, milestone: str, rank: int
    ) -> str | None:
        """Why a not-yet-sent message for this event is no longer worth sending, or None.

        A newer message at least as far along was decided on its channel; or the
        shipment has moved on to another step at least as far along (its status now
        comes from another event). A scan of a lesser step never cancels a milestone.
        """
        notice = self.notices.get(channel)
        if notice is not None and notice.event_id != event_id and notice.rank >= rank:
            return f"superseded by {notice.milestone} ({notice.occurred_at.isoformat()})"
        if (
            self.current_event not in (None, event_id)
            and self.milestone != milestone
            and self.status is not None
            and self.current_rank() >= rank
        ):
            since = self.occurred_at.isoformat() if self.occurred_at else "?"
            return f"superseded by {self.milestone} ({since})"
        return None

    def overtaken(self, earlier: Iterable[Sent], now: datetime) -> list[tuple[Sent, str]]:
        """Of the messages decided before (``earlier``), each one still waiting for its due
        time (quiet hours, coalescing) that this state supersedes, with why: it will never
        go out (cancelled when the newer decision is made, README rule 9). One due within
        ``OVERTAKE_MARGIN`` is left to the due sweep, which may claim it before the newer
        decision is committed (it checks again before it sends)."""
        out = []
        for m in earlier:
            if m.due is not None and m.due > now + OVERTAKE_MARGIN:
                why = self.superseded(m.channel, m.event_id, m.milestone, m.rank)
                if why is not None:
                    out.append((m, why))
        return out

    def waited(self, by: datetime) -> bool:
        """Whether a message of the log waits for a due time that has come by ``by``: what
        became of it is on the shipment's outcome list (``store.shipments.settled_log``)."""
        return any(m.due is not None and m.due <= by for m in self.messages)

    def live(self, m: Sent, now: datetime, pending: frozenset[str] = frozenset()) -> bool:
        """Whether ``m`` went out, or is still going to (not superseded while pending).

        ``pending`` names events decided in the batch under way: not sent yet either.
        """
        if m.cancelled:
            return False
        waiting = (m.due is not None and m.due > now) or m.event_id in pending
        return not waiting or self.superseded(m.channel, m.event_id, m.milestone, m.rank) is None

    def live_messages(
        self,
        now: datetime,
        pending: frozenset[str] = frozenset(),
        current: tuple[str, str, int] | None = None,
    ) -> list[Sent]:
        """The messages that went out or still will (one pass; what caps and dedupe count).

        ``current`` is (event id, milestone, rank) of the shipment's current state when
        it is about to change (decide() asks as if its transition were applied).
        """
        if current is None:
            current_event = self.current_event
            milestone = self.milestone
            rank = self.current_rank()
        else:
            current_event, milestone, rank = current
        out = []
        for m in self.messages:
            if m.cancelled:
                continue
            if (m.due is None or m.due <= now) and m.event_id not in pending:
                out.append(m)
                continue
            notice = self.notices.get(m.channel)
            if notice is not None and notice.event_id != m.event_id and notice.rank >= m.rank:
                continue
            moved_on = (
                current_event not in (None, m.event_id)
                and milestone != m.milestone
                and rank >= m.rank
            )
            if not moved_on:
                out.append(m)
        return out

    def messages_since(
        self, since: datetime, now: datetime, pending: frozenset[str] = frozenset()
    ) -> int:
        """Live messages decided at or after ``since``."""
        return sum(1 for m in self.live_messages(now, pending) if m.at >= since)

    def apply(self, t: Transition, old: bool = False) -> ShipmentState:
        """Return the state after ``t``; a step back only adds facts, never rewinds status.
        ``old``: ``t`` is too old to tell (``is_step_back``)."""
        step_back = self.is_step_back(t, old)
        if step_back:
            # a late scan (out of order, or too old to tell): it fills in what is not known,
            # and newer facts win (it carried the address and phone the customer replaced
            # since, and the messages after it went there, in its language, with its link
            # and order number); an event that moves the shipment on brings its own
            number = self.tracking_number or t.tracking_number
            facts: dict[str, object] = {
                "tracking_number": number,
                "carrier": self.carrier or t.carrier,
                "tracking_url": self.tracking_url or _link_of(t, number),
                "recipient": merge_recipient(t.recipient, self.recipient),
                "order": self.order or t.order,
            }
        else:
            facts = {
                "tracking_number": t.tracking_number,
                "carrier": t.carrier,
                # a link tracks one label: a new tracking number (another carrier took the
                # parcel over) does not keep the old label's
                "tracking_url": t.tracking_url or self.link_for(t.tracking_number),
                "recipient": merge_recipient(self.recipient, t.recipient),
                "order": t.order or self.order,
            }
        update: dict[str, object] = {
            **facts,
            "seen": [*self.seen, t.event_id][-SEEN_EVENTS:],
            "events": self.events + 1,
            "first_at": min(self.first_at, t.occurred_at) if self.first_at else t.occurred_at,
            "last_scan_at": max(self.last_scan_at, t.occurred_at)
            if self.last_scan_at
            else t.occurred_at,
        }
        fix = fix_of(t)
        if fix is not None and (self.last_fix is None or fix.at >= self.last_fix.at):
            update["last_fix"] = fix
            if self.suspect_fix is not None:
                update["suspect_fix"] = None
        rank = STATUS_RANK[t.status]
        if not step_back and (rank > self.max_rank or self.outvoted(t, old)):
            update.update(max_rank=rank, furthest=t.milestone)
        if not step_back:
            update.update(
                current_old=old,
                current_event=t.event_id,
                status=t.status,
                exception_code=t.exception_code,
                occurred_at=t.occurred_at,
                location=t.location or self.location,
                estimated_delivery=t.estimated_delivery or self.estimated_delivery,
                pickup_deadline=t.pickup_deadline,
                pickup_point=t.pickup_point,
            )
        # facts, from late scans too: the order they arrive in changes nothing
        if t.status is Status.AVAILABLE_FOR_PICKUP:
            update["pickup_at"] = _latest(self.pickup_at, t.occurred_at)
        elif t.status in _LEAVES_PICKUP and self.pickup_at is not None:
            update["pickup_left_at"] = _latest(self.pickup_left_at, t.occurred_at)
        return replaced(self, update)

    def link_for(self, tracking_number: str) -> str | None:
        """The shipment's tracking link, if it is the link of ``tracking_number``'s label
        (the one the state's tracking number names)."""
        return self.tracking_url if tracking_number == self.tracking_number else None

    @property
    def collected(self) -> bool:
        """Delivered after waiting at a pickup point, and not sent elsewhere since: the
        customer collected it. (Scans in between, an exception there, change nothing.)"""
        if self.status is not Status.DELIVERED or self.pickup_at is None:
            return False
        return self.pickup_left_at is None or self.pickup_left_at < self.pickup_at

    def current_transition(self) -> Transition | None:
        """The transition that set the current status, as far as the state keeps it (not its
        carrier description): what a message caught up later is rendered from."""
        if self.current_event is None or self.status is None or self.occurred_at is None:
            return None
        if self.tracking_number is None or self.carrier is None:
            return None
        return Transition(
            event_id=self.current_event,
            merchant_id=self.merchant_id,
            shipment_id=self.shipment_id,
            tracking_number=self.tracking_number,
            carrier=self.carrier,
            status=self.status,
            exception_code=self.exception_code,
            occurred_at=self.occurred_at,
            location=self.location,
            estimated_delivery=self.estimated_delivery,
            pickup_deadline=self.pickup_deadline,
            pickup_point=self.pickup_point,
            tracking_url=self.tracking_url,
            recipient=self.recipient,
            order=self.order,
        )

    def remember(self, t: Transition, suspect: Fix | None = None) -> ShipmentState:
        """Note that ``t`` (a flagged anomaly) was seen, and keep what it brings that is not
        known yet (the recipient's details, an order number, a tracking link: the one event
        that carries the recipient may be the flagged one); nothing else. ``suspect``: its
        location, flagged as too far from the last one."""
        update: dict[str, object] = {
            "seen": [*self.seen, t.event_id][-SEEN_EVENTS:],
            "events": self.events + 1,
        }
        if t.recipient is not None:
            update["recipient"] = merge_recipient(t.recipient, self.recipient)  # known first
        if self.order is None and t.order is not None:
            update["order"] = t.order
        if self.tracking_url is None and (link := _link_of(t, self.tracking_number)):
            update["tracking_url"] = link
        if suspect is not None:
            update["suspect_fix"] = suspect
        return replaced(self, update)

    def record_message(
        self,
        t: Transition,
        channel: ChannelKind,
        trivial: bool,
        at: datetime,
        due: datetime | None = None,
    ) -> ShipmentState:
        """Return the state remembering a message decided for ``t`` on ``channel`` at ``at``
        (to the second: what the caps and windows need, and its microseconds would take a
        few bytes a message of every stored state)."""
        at = at.replace(microsecond=0)
        keep = [m for m in self.messages if m.at > at - MESSAGE_LOG]
        aged_sms = sum(
            1
            for m in self.messages
            if m.at <= at - MESSAGE_LOG and m.channel is ChannelKind.SMS and not m.cancelled
        )
        milestone, rank = t.milestone, news_rank(t, self.max_rank)
        sent = assembled(  # typed inputs: skip validation on this hot path
            Sent,
            {
                "at": at,
                "channel": channel,
                "event_id": t.event_id,
                "milestone": milestone,
                "rank": rank,
                "trivial": trivial,
                "due": due,
                "cancelled": False,
            },
        )
        notice = assembled(
            Notice,
            {
                "event_id": t.event_id,
                "milestone": milestone,
                "occurred_at": t.occurred_at,
                "rank": rank,
                "pickup": pickup_key(t),
                "deadline": t.pickup_deadline,
            },
        )
        return replaced(
            self,
            {
                "messages": [*keep, sent],
                "sms_archived": self.sms_archived + aged_sms,
                "notices": {**self.notices, channel: notice},
            },
        )

    def stall_deadline(
        self, statuses: frozenset[Status], no_scan: timedelta, after_window: timedelta
    ) -> datetime | None:
        """When this shipment counts as stalled, or None when it cannot stall."""
        if self.status not in statuses or self.last_scan_at is None:
            return None
        deadline = self.last_scan_at + no_scan
        window = self.estimated_delivery
        if window is not None and (
            self.status is not Status.OUT_FOR_DELIVERY or window.end > self._promised_at()
        ):
            # (an "out for delivery" scanned, or told, after its window ended is the
            # carrier's new promise, news: not a delay to announce a minute later)
            deadline = min(deadline, window.end + after_window)
        return deadline

    def _promised_at(self) -> datetime:
        """When the current status was last promised: its scan, or the message that told
        it, if later (a scan the backend posted hours late is told when it arrives)."""
        assert self.last_scan_at is not None
        told = [m.at for m in self.messages if m.event_id == self.current_event]
        return max([self.last_scan_at, *told])

    def stall_reason(self, deadline_ms: int, no_scan_hours: float) -> str:
        """What the stall check saw at ``deadline_ms`` (``stall_deadline``), with its numbers,
        for the merchant's history. Which of the two rules set the deadline is read from the
        deadline itself: the policy may have changed since (``no_scan_hours`` is today's)."""
        scanned, window = self.last_scan_at, self.estimated_delivery
        deadline = deadline_ms / 1000
        since = f" since {scanned.astimezone(UTC):%Y-%m-%d %H:%M} UTC" if scanned else ""
        no_scan = scanned.timestamp() + no_scan_hours * 3600 if scanned else None
        if window is not None and (no_scan is None or abs(deadline - no_scan) >= 1):
            after = (deadline - window.end.timestamp()) / 3600
            if after >= 0:
                ended = window.end.astimezone(UTC)
                return (
                    f"stall check: no delivery {round(after, 2):g} h after the estimated "
                    f"delivery window ended ({ended:%Y-%m-%d %H:%M} UTC; "
                    "stalled.after_window_hours)"
                )
        hours = (deadline - scanned.timestamp()) / 3600 if scanned else no_scan_hours
        return (
            f"stall check: no carrier scan for {round(hours, 2):g} h{since} (stalled.no_scan_hours)"
        )


def _link_of(t: Transition, tracking_number: str | None) -> str | None:
    """``t``'s tracking link, if it tracks ``tracking_number`` (or nothing is known yet)."""
    return t.tracking_url if tracking_number in (None, t.tracking_number) else None


def _latest(known: datetime | None, at: datetime) -> datetime:
    return at if known is None or at > known else known


def merge_recipient(old: Recipient | None, new: Recipient | None) -> Recipient | None:
    """Later transitions may send a partial recipient; keep what they leave out."""
    if new is None or old is None:
        return new or old
    return old.model_copy(update={k: v for k, v in new.__dict__.items() if v is not None})
