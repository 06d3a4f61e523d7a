"""decide(): pure cadence decisions — values in, verdicts out; no Redis, clock or network.

``decide(policy, state, transition, now, opted_out)`` answers, per channel:
send now, defer until T (quiet hours, coalescing), suppress (which rule, with
its numbers) or flag (an anomaly). ``fold`` runs a shipment's batch of
transitions through it and through the state, and lets a later message in the
same batch supersede an earlier one on the same channel.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo

from notifier.addresses import ascii_domain, phone_zones
from notifier.insights.journeys import OWN_EVENTS
from notifier.models import (
    STATUS_RANK,
    ChannelKind,
    Outcome,
    Recipient,
    Status,
    Transition,
    known_timezone,
    news_rank,
    replaced,
)
from notifier.policy.rules import Anomalies, Policy, QuietWindow, Rule
from notifier.state import TERMINAL, Fix, Notice, Sent, ShipmentState, fix_of, pickup_key


@dataclass(frozen=True, slots=True)
class Verdict:
    """The decision for one transition on one channel (all channels when ``channel`` is None)."""

    outcome: Outcome
    reason: str
    channel: ChannelKind | None = None
    to: str | None = None
    #: when a deferred message is due (UTC); None for the other outcomes
    send_at: datetime | None = None
    details: Mapping[str, Any] = field(default_factory=dict)
    #: which rule decided, from a fixed vocabulary (a metrics label; ``reason`` is the prose)
    rule: str = "policy"


@dataclass(frozen=True, slots=True)
class Step:
    """One transition of a fold and what was decided for it."""

    transition: Transition
    verdicts: list[Verdict]
    #: already folded in an earlier run (a re-delivered inbox entry): nothing decided again
    replay: bool = False
    #: a message of the current milestone, caught up because this late event brought the
    #: recipient's address (the event id that brought it)
    caught_up_by: str | None = None
    #: how far along its messages are (``news_rank``); -1 when nothing was decided
    rank: int = -1
    #: a "delivered" after the parcel had waited at a pickup point (it was collected)
    collected: bool = False


def opt_out_key(channel: ChannelKind, address: str) -> str:
    """How an opt-out is named in the opt-out store and in ``decide(opted_out=...)``: an
    email address in lower case with its domain in ASCII (IDNA), as SendGrid reports it
    (``anna@münchen.de`` and ``anna@xn--mnchen-3ya.de`` are one address; keys written
    before kept the domain as given: ``store.optouts.spellings`` reads those too)."""
    if channel is ChannelKind.EMAIL:
        return f"{channel}:{ascii_domain(address.lower())}"
    return f"{channel}:{address}"


@lru_cache(maxsize=512)
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def quiet_until(window: QuietWindow, tz: ZoneInfo, now: datetime) -> datetime | None:
    """The UTC end of the quiet window ``now`` falls in, or None outside quiet hours.

    Compares local wall-clock times, so it holds across DST changes. An end time
    that does not exist (inside a spring-forward gap) is read at the offset before
    the change: 02:30 on a night that jumps from 02:00 to 03:00 ends at 03:30. One that
    happens twice (inside a fall-back hour) is its first pass still ahead: 01:30 on a
    night that goes 02:00 -> 01:00 ends at the second 01:30 when ``now`` is in the
    second 01:00-02:00 (read at the first pass, it had ended already).
    """
    local = now.astimezone(tz)
    clock = local.time().replace(tzinfo=None)
    start, end = window.start, window.end
    if start < end:
        inside, end_day = start <= clock < end, local.date()
    else:  # spans midnight
        inside = clock >= start or clock < end
        end_day = local.date() + timedelta(days=1) if clock >= start else local.date()
    if not inside:
        return None
    first = datetime.combine(end_day, end, tzinfo=tz).astimezone(UTC)
    if first > now:
        return first
    return datetime.combine(end_day, end, tzinfo=tz).replace(fold=1).astimezone(UTC)


_HALF_EARTH_KM = 20_038.0


def _km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance (haversine)."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 6371.0 * 2 * math.asin(min(1.0, math.sqrt(a)))


def anomaly(policy: Policy, state: ShipmentState, t: Transition, now: datetime) -> Verdict | None:
    """A FLAGGED verdict when ``t`` looks wrong, else None."""
    rules = policy.anomalies
    ahead = (t.occurred_at - now).total_seconds() / 60
    if ahead > rules.future_minutes:
        return Verdict(
            Outcome.FLAGGED,
            f"anomaly: occurred_at is {ahead:.0f} min in the future "
            f"(limit {rules.future_minutes:g} min)",
            details={"minutes_ahead": round(ahead, 1), "limit_minutes": rules.future_minutes},
            rule="anomaly",
        )
    if state.first_at is not None:
        early = (state.first_at - t.occurred_at).total_seconds() / 3600
        if early > rules.early_hours:
            return Verdict(
                Outcome.FLAGGED,
                f"anomaly: {early:.0f} h before the shipment's first known event "
                f"(limit {rules.early_hours:g} h)",
                details={"hours_early": round(early, 1), "limit_hours": rules.early_hours},
                rule="anomaly",
            )
    here, anchor, suspect = fix_of(t), state.last_fix, state.suspect_fix
    if here is None or anchor is None or (anchor.lat == 0 and anchor.lon == 0):
        return None  # (0, 0): a "nowhere" kept before it was read as none
    jump = _too_fast(rules, anchor, here)
    if jump is None:
        return None
    if suspect is not None and here.at >= suspect.at and not _too_fast(rules, suspect, here):
        # after the scan flagged before, close to it, and as far from the last one: that
        # last one was the wrong one (a mis-geocoded first scan), not this
        return None
    km, hours, speed = jump
    shown = "instantly" if math.isinf(speed) else f"at {speed:.0f} km/h"
    return Verdict(
        Outcome.FLAGGED,
        f"anomaly: {km:.0f} km from the previous scan {shown} (limit {rules.max_speed_kmh:g} km/h)",
        details={"km": round(km, 1), "hours": round(hours, 3), "limit_kmh": rules.max_speed_kmh},
        rule="anomaly",
    )


def _flagged(state: ShipmentState, t: Transition, verdict: Verdict) -> ShipmentState:
    """The state after ``t``, flagged: seen, what it brings kept (``remember``), and its
    location, when flagged as too far from the last one, the suspect (not a late scan's:
    it cannot outvote the last one)."""
    suspect = fix_of(t) if "limit_kmh" in verdict.details else None
    if suspect is not None and state.last_fix and suspect.at < state.last_fix.at:
        suspect = None
    return state.remember(t, suspect)


def _reanchored(policy: Policy, before: ShipmentState, after: ShipmentState) -> ShipmentState:
    """``after``, whose last fix moved to a scan that the one flagged before vouched for,
    far from the last fix ``before``: that displaced fix is the suspect now, so that two
    scans at one wrong place (an arrival and a departure) do not win for good, and a next
    scan close to the displaced one is not flagged either."""
    moved, displaced = after.last_fix, before.last_fix
    if before.suspect_fix is None or moved is displaced or moved is None or displaced is None:
        return after
    if _too_fast(policy.anomalies, displaced, moved) is None:
        return after
    return replaced(after, {"suspect_fix": displaced})


def _too_fast(rules: Anomalies, before: Fix, here: Fix) -> tuple[float, float, float] | None:
    """(km, hours, km/h) from ``before`` to ``here`` when that is faster than a parcel
    travels, else None."""
    hours = abs((here.at - before.at).total_seconds()) / 3600
    if hours * rules.max_speed_kmh >= _HALF_EARTH_KM:
        return None  # no two points on Earth are that far apart
    km = _km(before.lat, before.lon, here.lat, here.lon)
    speed = km / hours if hours > 0 else math.inf
    if km >= rules.min_jump_km and speed > rules.max_speed_kmh:
        return km, hours, speed
    return None


#: the milestones of exceptions begin so (``exception:customs_hold``)
_EXCEPTION = f"{Status.EXCEPTION.value}:"
_DAY = timedelta(hours=24)


def _hours(delta: timedelta) -> float:
    return delta.total_seconds() / 3600


@dataclass(frozen=True, slots=True)
class _Contact:
    """The recipient as ``t`` leaves it (``t.recipient`` over what was known), cheaply."""

    email: str | None
    phone: str | None
    timezone: str | None

    @classmethod
    def of(cls, known: Recipient | None, new: Recipient | None) -> _Contact:
        if new is None or known is None:
            r = new or known
            return cls(r.email, r.phone, r.timezone) if r else cls(None, None, None)
        return cls(
            new.email or known.email,
            new.phone or known.phone,
            new.timezone or known.timezone,
        )


@dataclass(frozen=True, slots=True)
class _Counted:
    """A message decided moments ago in this decide() call (counts for the next channel)."""

    at: datetime
    channel: ChannelKind
    milestone: str
    trivial: bool


def _scan(
    live: list[Sent | _Counted], channel: ChannelKind, since: datetime
) -> tuple[datetime | None, int, int]:
    """One pass over the live messages: the last trivial update on ``channel``, how many
    ``channel`` carried, and how many messages went (or go) out since ``since``."""
    last_trivial: datetime | None = None
    mine = today = 0
    for m in live:
        if m.at >= since:
            today += 1
        if m.channel is not channel:
            continue
        mine += 1
        if m.trivial and (last_trivial is None or m.at > last_trivial):
            last_trivial = m.at
    return last_trivial, mine, today


def _channel_verdict(
    policy: Policy,
    rule: Rule,
    contact: _Contact,
    sms_archived: int,
    t: Transition,
    milestone: str,
    channel: ChannelKind,
    now: datetime,
    opted_out: Collection[str],
    live: list[Sent | _Counted],
    decided: Mapping[ChannelKind, Sent | _Counted],
    moving_again: bool = False,
    moved: bool = False,
) -> Verdict:
    """One channel's verdict. ``moving_again``: the first scan after an exception the
    customer was told of on this channel, which the trivial-update throttle lets through.
    ``moved``: a pickup notice for another point or an earlier deadline (``pickup_moved``),
    news however recent the last one."""
    to = contact.email if channel is ChannelKind.EMAIL else contact.phone
    if to is None:
        return Verdict(
            Outcome.SUPPRESSED,
            f"no {channel} address known for the recipient",
            channel,
            rule="no_address",
        )
    if opted_out and (key := opt_out_key(channel, to)) in opted_out:
        # a mapping gives the reason (opted out, or an unusable address); a set: opted out
        why = opted_out.get(key) if isinstance(opted_out, Mapping) else None
        unusable = why is not None and why.startswith("unusable")
        return Verdict(
            Outcome.SUPPRESSED,
            why or f"recipient opted out of {channel}",
            channel,
            rule="unusable_address" if unusable else "opted_out",
        )

    last_trivial, mine, today = _scan(live, channel, now - _DAY)
    # A repeat of the milestone last decided on this channel (sent, or pending even if it
    # will be superseded) is a duplicate: a re-scan. The same milestone after another one
    # is news ("out for delivery" again on day 2). Trivial updates have their throttle.
    last = decided.get(channel)
    repeat = (
        last is not None
        and _news_of(last.milestone) == _news_of(milestone)
        and not rule.trivial
        and not moved
    )
    if repeat and last is not None and now - last.at < policy.dedupe_window:
        ago = _hours(now - last.at)
        same = "" if last.milestone == milestone else f", the same news as {last.milestone},"
        # what became of it, in words that are true: one that waited and was cancelled, or
        # still waits, was decided, never sent
        done = "sent"
        if isinstance(last, Sent) and last.cancelled:
            done = "decided (and cancelled while it waited)"
        elif isinstance(last, Sent) and last.due is not None and last.due > now:
            done = f"decided (waiting until {last.due.astimezone(UTC):%Y-%m-%d %H:%M} UTC)"
        return Verdict(
            Outcome.SUPPRESSED,
            f"duplicate: {milestone}{same} already {done} by {channel} {ago:.1f} h ago "
            f"(window {policy.dedupe_window_hours:g} h)",
            channel,
            details={"hours_ago": round(ago, 2), "window_hours": policy.dedupe_window_hours},
            rule="duplicate",
        )
    throttle = policy.throttle
    if (
        rule.trivial
        and not moving_again
        and last_trivial is not None
        and (now - last_trivial < policy.trivial_interval)
    ):
        ago = _hours(now - last_trivial)
        return Verdict(
            Outcome.SUPPRESSED,
            f"trivial update throttled: last {channel} {ago:.1f} h ago, "
            f"interval {throttle.trivial_interval_hours:g} h",
            channel,
            details={"hours_ago": round(ago, 2), "interval_hours": throttle.trivial_interval_hours},
            rule="throttled",
        )
    if today >= throttle.max_per_shipment_per_day and not throttle.exempt(t.status, milestone):
        return Verdict(
            Outcome.SUPPRESSED,
            f"cap: {today} messages to this shipment in the last 24 h "
            f"(max {throttle.max_per_shipment_per_day})",
            channel,
            details={"count": today, "max": throttle.max_per_shipment_per_day},
            rule="daily_cap",
        )
    if channel is ChannelKind.SMS:
        sms = sms_archived + mine
        if sms >= throttle.max_sms_per_shipment:
            return Verdict(
                Outcome.SUPPRESSED,
                f"cap: {sms} SMS already sent for this shipment "
                f"(max {throttle.max_sms_per_shipment})",
                channel,
                details={"count": sms, "max": throttle.max_sms_per_shipment},
                rule="sms_cap",
            )
    return _timing(policy, rule, contact, t, channel, to, now)


#: Milestones that tell one piece of news: a carrier reports a failed attempt as the
#: status and as its exception "recipient unavailable" (often a minute apart; both were
#: told, by email and SMS each: a black-box run as the tracking backend).
_SAME_NEWS = {"exception:recipient_unavailable": "delivery_attempt_failed"}


def _news_of(milestone: str) -> str:
    """The news ``milestone`` tells, for the duplicate rule (``_SAME_NEWS``)."""
    return _SAME_NEWS.get(milestone, milestone)


@lru_cache(maxsize=256)
def _sent_reason(milestone: str, channel: ChannelKind) -> str:
    return f"policy: {milestone} is notified by {channel}"


#: The widest spread of UTC offsets among a phone number's zones for quiet hours to go by
#: them (Australia's mainland: 3 h; Russia's or the US toll-free numbers': far more)
PHONE_ZONES_SPREAD = timedelta(hours=3)


def _local_zones(contact: _Contact, channel: ChannelKind, to: str, now: datetime) -> list[str]:
    """The zones a recipient may be in, for its quiet hours: its own; else those of its
    phone number's country or area (``addresses.phone_zones``) when they lie within
    ``PHONE_ZONES_SPREAD`` of each other (the window then holds in each of them: never
    a text at 4 a.m. for a +64 number because the merchant's default zone is UTC); else
    none (the policy's ``default_timezone``)."""
    if contact.timezone:
        return [contact.timezone]
    phone = to if channel is ChannelKind.SMS else contact.phone
    zones = [z for z in phone_zones(phone) if known_timezone(z)] if phone else []
    offsets = [now.astimezone(_zone(z)).utcoffset() or timedelta(0) for z in zones]
    if not zones or max(offsets) - min(offsets) > PHONE_ZONES_SPREAD:
        return []
    return zones


def _quiet_end(
    quiet: QuietWindow, zones: Sequence[str], now: datetime
) -> tuple[datetime, str] | None:
    """When the quiet window has ended in every zone of ``zones`` (the first moment quiet
    in none: a number's zones lie within hours of each other, so the end of one zone's
    window may fall in another's), and the zone whose window ends last; None when it is
    quiet in none of them now."""
    at, last = now, None
    for _ in range(2 * len(zones) + 1):  # each turn moves past one zone's window
        ends = [(u, z) for z in zones if (u := quiet_until(quiet, _zone(z), at)) is not None]
        if not ends:
            break
        at, last = max(ends)
    return (at, last) if last is not None else None


def _furthest_ahead(zones: Sequence[str], now: datetime) -> str:
    """The zone of ``zones`` whose clock is furthest ahead now (Madrid of Madrid and the
    Canaries, Lisbon of Lisbon and the Azores)."""
    return max(zones, key=lambda z: now.astimezone(_zone(z)).utcoffset() or timedelta(0))


def _timing(
    policy: Policy,
    rule: Rule,
    contact: _Contact,
    t: Transition,
    channel: ChannelKind,
    to: str,
    now: datetime,
) -> Verdict:
    """Send now, or defer for quiet hours and coalescing; not an "arrives today" that would
    go out on a later day."""
    milestone = t.milestone
    sent = Verdict(Outcome.SENT, _sent_reason(milestone, channel), channel, to, rule="notify")
    due: datetime | None = None
    reasons: list[str] = []
    details: dict[str, Any] = {}
    quiet = policy.quiet_hours.window(channel)
    timezone = contact.timezone
    if quiet is not None and not rule.break_quiet_hours:
        zones = _local_zones(contact, channel, to, now)
        by_number = bool(zones) and not contact.timezone
        if by_number:  # for the "arrives today" check: the policy's zone if the number's
            default = policy.quiet_hours.default_timezone
            timezone = default if default in zones else _furthest_ahead(zones, now)
        found = _quiet_end(quiet, zones or [policy.quiet_hours.default_timezone], now)
        if found is not None:
            until, tz_name = found
            due = until
            local_end = until.astimezone(_zone(tz_name)).strftime("%H:%M")
            whose = " (the phone number's)" if by_number else ""
            reasons.append(
                f"quiet hours {quiet.start:%H:%M}-{quiet.end:%H:%M} in {tz_name}{whose}; "
                f"deferred to {local_end} local ({until:%Y-%m-%d %H:%M} UTC)"
            )
            details.update(timezone=tz_name, quiet_until=until.isoformat())
    if policy.coalesce_seconds:
        held = now + timedelta(seconds=policy.coalesce_seconds)
        if due is None or held > due:
            due = held
            reasons.append(f"held {policy.coalesce_seconds:g} s to send only the latest state")
    stale = not_today(t, due or now, timezone or policy.quiet_hours.default_timezone)
    if stale is not None:
        return Verdict(Outcome.SUPPRESSED, stale, channel, rule="stale")
    if due is None:
        return sent
    rule_name = "quiet_hours" if "timezone" in details else "hold"
    return Verdict(Outcome.DEFERRED, "; ".join(reasons), channel, to, due, details, rule_name)


def decide(
    policy: Policy,
    state: ShipmentState,
    t: Transition,
    now: datetime,
    opted_out: Collection[str] = (),
    pending: frozenset[str] = frozenset(),
) -> list[Verdict]:
    """Decide what ``t`` triggers, given the shipment's state *before* ``t``.

    ``opted_out`` holds ``opt_out_key`` strings of the recipient's opted-out
    addresses; ``pending`` names events decided earlier in the same batch (their
    messages are not out yet, so a newer state can still supersede them).
    """
    flagged = anomaly(policy, state, t, now)
    if flagged is not None:
        return [flagged]
    milestone = t.milestone
    old = is_old(policy, t, now)
    if state.returns_home(t):
        # "your parcel was delivered" would send a customer told it is going back looking
        # for it (a step back: it cancels none of the return's messages)
        return [
            Verdict(
                Outcome.SUPPRESSED,
                "returned: a delivered after returned_to_sender is the parcel reaching the "
                "sender, not the customer",
                rule="returned",
            )
        ]
    if state.is_step_back(t, old):
        since = state.occurred_at.isoformat() if state.occurred_at else "?"
        happened = f"out of order: {milestone} at {t.occurred_at.isoformat()}"
        if old and not state.current_old:
            reason = (
                f"{happened} is too old to tell, {_ago(policy, t, now)}; the shipment is "
                f"{state.status} since {since}"
            )
        elif (
            state.status in TERMINAL
            and STATUS_RANK[t.status] < STATUS_RANK[state.status]
            and state.occurred_at
            and t.occurred_at >= state.occurred_at
        ):
            reason = (
                f"{happened} comes after the shipment was {state.status} ({since}), and "
                "nothing short of that is news after it"
            )
        else:
            reason = f"{happened} would step back; the shipment is {state.status} since {since}"
        return [Verdict(Outcome.SUPPRESSED, reason, rule="out_of_order")]
    rule = policy.rule(t.status, t.exception_code)
    if not rule.channels:
        return [
            Verdict(Outcome.SUPPRESSED, f"policy: {milestone} is not notified", rule="not_notified")
        ]
    if t.status is not Status.EXCEPTION and state.is_behind(t, old):
        # "picked up" or "in transit" after a failed attempt is the carrier's bookkeeping,
        # not news; an exception always is.
        return [
            Verdict(
                Outcome.SUPPRESSED,
                f"behind: {milestone} after the shipment already reached {state.furthest}",
                rule="behind",
            )
        ]
    if old:
        return [
            Verdict(
                Outcome.SUPPRESSED, f"old: {milestone} happened {_ago(policy, t, now)}", rule="old"
            )
        ]
    if t.pickup_deadline is not None and t.pickup_deadline <= now:
        # "ready to collect by <a time that has passed>" would send the customer to a
        # counter that no longer holds the parcel (a late address is not caught up either)
        return [
            Verdict(
                Outcome.SUPPRESSED,
                f"stale: its pickup deadline {t.pickup_deadline.isoformat()} has passed",
                rule="stale",
            )
        ]
    contact = _Contact.of(state.recipient, t.recipient)
    # Count as if t were applied: earlier pending messages it overtakes no longer count.
    reached = -1 if state.outvoted(t, old) else state.max_rank
    live: list[Sent | _Counted] = list(
        state.live_messages(now, pending, (t.event_id, milestone, news_rank(t, reached)))
    )
    decided: dict[ChannelKind, Sent | _Counted] = {m.channel: m for m in state.messages}
    # a scan after an exception the customer was told of, on each channel (the last word
    # there is the problem, however often the carrier re-scanned it since): it moves again
    told = (
        {
            c
            for c, m in decided.items()
            if m.milestone.startswith(_EXCEPTION) and not (isinstance(m, Sent) and m.cancelled)
        }
        if t.status is not Status.EXCEPTION
        else set()
    )
    verdicts: list[Verdict] = []
    for channel in rule.channels:
        verdict = _channel_verdict(
            policy,
            rule,
            contact,
            state.sms_archived,
            t,
            milestone,
            channel,
            now,
            opted_out,
            live,
            decided,
            channel in told,
            pickup_moved(state.notices.get(channel), t),
        )
        verdicts.append(verdict)
        if verdict.outcome in _GOING:
            live.append(_Counted(now, channel, milestone, rule.trivial))
    return verdicts


_GOING = (Outcome.SENT, Outcome.DEFERRED)


def pickup_moved(told: Notice | None, t: Transition) -> bool:
    """Whether pickup notice ``t`` says the parcel waits at another pickup point than the
    notice the customer was last told on a channel (``told``), or must be collected
    sooner than it said: news, not a re-scan (the customer would go to the wrong counter,
    or too late). A later deadline is not: the day told still holds. Told of no point or
    deadline, there is nothing to differ from."""
    if t.status is not Status.AVAILABLE_FOR_PICKUP or told is None:
        return False
    if told.milestone != t.milestone:
        return False  # (another milestone since: the duplicate rule does not apply anyway)
    point = pickup_key(t)
    if point is not None and told.pickup is not None and point != told.pickup:
        return True
    return bool(
        t.pickup_deadline and told.deadline and t.pickup_deadline <= told.deadline - _SOONER
    )


#: how much sooner a pickup deadline must be to be news (carriers that compute it afresh
#: with each scan move it by minutes)
_SOONER = timedelta(hours=1)


def _ago(policy: Policy, t: Transition, now: datetime) -> str:
    """How long ago ``t`` happened, against the limit: "240 h ago (limit 168 h)"; to the
    hour, unless that would read as the limit itself (then a tenth more: "168.1 h")."""
    ago = _hours(now - t.occurred_at)
    limit = policy.stale_after_hours
    shown = f"{ago:.0f}" if round(ago) > limit else f"{math.ceil(ago * 10) / 10:.1f}"
    return f"{shown} h ago (limit {limit:g} h)"


def is_old(policy: Policy, t: Transition, now: datetime) -> bool:
    """Whether ``t`` is too old to tell when decided (an import of old shipments, a
    backlog replayed years later, a carrier's scan dated years back). A stall's own notice
    dates from the last scan: the stall check says when it is news."""
    return now - t.occurred_at > policy.stale_after and not t.event_id.startswith(OWN_EVENTS)


def _overtaken(by: str, channel: ChannelKind | None) -> Verdict:
    """A message overtaken by a newer state that came in before it went out (posted with
    it, or singly and drained with it: the merchant may never have sent them together)."""
    return Verdict(
        Outcome.SUPPRESSED, f"{by}, which came in before it went out", channel, rule="superseded"
    )


def _fold_once(
    policy: Policy,
    state: ShipmentState,
    transitions: Sequence[Transition],
    now: datetime,
    opted_out: Collection[str],
    superseded: Mapping[tuple[str, ChannelKind], str],
) -> tuple[ShipmentState, list[Step]]:
    steps: list[Step] = []
    pending: set[str] = set()
    for t in transitions:
        if state.has_seen(t.event_id):
            steps.append(Step(t, [], replay=True))
            continue
        verdicts = decide(policy, state, t, now, opted_out, frozenset(pending))
        if verdicts[0].outcome is Outcome.FLAGGED:
            state = _flagged(state, t, verdicts[0])
            steps.append(Step(t, verdicts))
            continue
        old = is_old(policy, t, now)
        late = state.is_step_back(t, old)
        before = state
        state = _reanchored(policy, before, state.apply(t, old))
        rule = policy.rule(t.status, t.exception_code)
        kept: list[Verdict] = []
        for v in verdicts:
            channel = v.channel
            if v.outcome in _GOING and channel is not None:
                by = superseded.get((t.event_id, channel))
                if by is not None:
                    # a later message of this batch overtakes it: it never goes out
                    v = _overtaken(by, channel)
                else:
                    state = state.record_message(t, channel, rule.trivial, now, v.send_at)
                    pending.add(t.event_id)
            kept.append(v)
        collected = t.status is Status.DELIVERED and state.collected
        steps.append(Step(t, kept, rank=news_rank(t, state.max_rank), collected=collected))
        if late:
            caught = _catch_up(policy, before, state, t, now, opted_out, frozenset(pending))
            if caught is not None:
                current = caught.transition
                trivial = policy.rule(current.status, current.exception_code).trivial
                decided: list[Verdict] = []
                for v in caught.verdicts:
                    by = superseded.get((current.event_id, v.channel)) if v.channel else None
                    if by is not None:
                        v = _overtaken(by, v.channel)
                    elif v.outcome in _GOING and v.channel is not None:
                        state = state.record_message(current, v.channel, trivial, now, v.send_at)
                        pending.add(current.event_id)
                    decided.append(v)
                rank = news_rank(current, state.max_rank)
                steps.append(replace(caught, verdicts=decided, rank=rank))
    return state, steps


#: How old the current milestone may be for a late address to still send it.
CATCH_UP_WINDOW = timedelta(hours=24)


def _address(r: Recipient | None, channel: ChannelKind) -> str | None:
    if r is None:
        return None
    return r.email if channel is ChannelKind.EMAIL else r.phone


#: How long after an "out for delivery" its message may still go out on the next day in
#: the recipient's zone: a scan of the afternoon or evening before (the parcel loaded for
#: the morning round), told at the end of quiet hours, may still be true; one of the
#: morning before, come in late, is not.
NEXT_DAY_WINDOW = timedelta(hours=18)


def not_today(t: Transition, at: datetime, timezone: str) -> str | None:
    """Why ``t``'s message would mislead if it went out at ``at``, or None: an "out for
    delivery" says the parcel arrives today, no longer true on a later day in the
    recipient's zone more than ``NEXT_DAY_WINDOW`` after the scan (an event that came in
    late, or a message that waited for the end of quiet hours)."""
    if t.status is not Status.OUT_FOR_DELIVERY or at - t.occurred_at <= NEXT_DAY_WINDOW:
        return None
    tz = _zone(timezone)
    day, then = t.occurred_at.astimezone(tz).date(), at.astimezone(tz).date()
    if then <= day:
        return None
    return (
        f'stale: out for delivery on {day.isoformat()} ("arrives today"), and it would go '
        f"out on {then.isoformat()} in {tz.key}, {_hours(at - t.occurred_at):.0f} h later"
    )


def no_longer_news(current: Transition, now: datetime) -> str | None:
    """Why the shipment's current step is too old to tell now, or None: more than
    ``CATCH_UP_WINDOW`` old, or a pickup whose deadline has passed (what a late address
    catches up, or an SMS reported undeliverable later falls back to email, only while it
    is news)."""
    age = now - current.occurred_at
    if age > CATCH_UP_WINDOW:
        return (
            f"{current.milestone} is {_hours(age):.0f} h old (limit {_hours(CATCH_UP_WINDOW):g} h)"
        )
    if current.pickup_deadline is not None and current.pickup_deadline <= now:
        return f"its pickup deadline {current.pickup_deadline.isoformat()} has passed"
    return None


def _catch_up(
    policy: Policy,
    before: ShipmentState,
    after: ShipmentState,
    late: Transition,
    now: datetime,
    opted_out: Collection[str],
    pending: frozenset[str],
) -> Step | None:
    """A late event that brings the recipient's address for a channel the shipment could not
    use: the current milestone, never sent on that channel, is decided again for it (once:
    the late event is then seen, and a message decided for a milestone is never repeated)."""
    gained = {
        c for c in ChannelKind if _address(after.recipient, c) and not _address(before.recipient, c)
    }
    current = after.current_transition() if gained else None
    if current is None:
        return None
    stale = no_longer_news(current, now)
    if stale is not None:
        # news that old would mislead ("arrives today" a day late): recorded, not sent
        reason = f"not caught up: the address arrived late, with {late.event_id}, and {stale}"
        return Step(
            current,
            [Verdict(Outcome.SUPPRESSED, reason, c, rule="stale") for c in sorted(gained)],
            caught_up_by=late.event_id,
        )
    told = {m.channel for m in after.messages if m.event_id == current.event_id}
    verdicts = [
        replace(v, reason=f"{v.reason} (the address arrived late, with {late.event_id})")
        for v in decide(policy, after, current, now, opted_out, pending)
        if v.channel in gained
        and v.channel not in told
        and (v.outcome in _GOING or v.rule == "stale")  # (recorded: why it is not sent)
    ]
    if not verdicts:
        return None
    collected = current.status is Status.DELIVERED and after.collected
    return Step(current, verdicts, caught_up_by=late.event_id, collected=collected)


def _returns_first(transitions: Sequence[Transition]) -> Sequence[Transition]:
    """The batch with each "returned to sender" that happened before a "delivered" that
    arrived ahead of it in the same batch folded before that delivered: the delivered is
    then the return reaching the sender (``ShipmentState.returns_home``), as when the two
    come in separate batches in the order they happened. In arrival order the delivered
    was told to the customer and the return, a step back after it, was not."""
    if not any(t.status is Status.RETURNED_TO_SENDER for t in transitions):
        return transitions
    ordered = list(transitions)
    for r in transitions:
        if r.status is not Status.RETURNED_TO_SENDER:
            continue
        at = next(i for i, x in enumerate(ordered) if x is r)
        ahead = (
            i
            for i, t in enumerate(ordered[:at])
            if t.status is Status.DELIVERED and r.occurred_at < t.occurred_at
        )
        if (first := next(ahead, None)) is not None:
            ordered.insert(first, ordered.pop(at))
    return ordered


def fold(
    policy: Policy,
    state: ShipmentState,
    transitions: Sequence[Transition],
    now: datetime,
    opted_out: Collection[str] = (),
) -> tuple[ShipmentState, list[Step]]:
    """Fold a shipment's transitions (in arrival order) through ``decide``. Pure.

    When the batch itself moves the shipment past a message decided earlier in it
    (a carrier uploading a backlog of scans at once), that message is recorded as
    superseded and not sent, and does not count against throttles or caps. Dropping
    one can let a later message past a cap, so this runs to a fixpoint. A message of
    an earlier batch still waiting for its due time that the batch supersedes leaves
    the message log (``ShipmentState.overtaken``): it never goes out (the pipeline
    cancels it), so it never counts once its due time has passed either.
    """
    transitions = _returns_first(transitions)
    superseded: dict[tuple[str, ChannelKind], str] = {}
    tried: list[dict[tuple[str, ChannelKind], str]] = [superseded]
    for _ in range(len(transitions) + 2):
        final, steps = _fold_once(policy, state, transitions, now, opted_out, superseded)
        # Rebuilt from scratch each pass: every message the batch wants to send (or
        # dropped last pass) is checked against where this pass left the shipment.
        found: dict[tuple[str, ChannelKind], str] = {}
        for step in steps:
            t = step.transition
            for v in step.verdicts:
                key = (t.event_id, v.channel)
                if v.channel is None or (v.outcome not in _GOING and key not in superseded):
                    continue
                why = final.superseded(v.channel, t.event_id, t.milestone, step.rank)
                if why is not None:
                    found[(t.event_id, v.channel)] = why
        if found == superseded:
            break
        if found in tried:
            break  # a cycle: keep this pass, which is consistent with its own inputs
        tried.append(found)
        superseded = found
    if gone := {(m.event_id, m.channel) for m, _ in final.overtaken(state.messages, now)}:
        kept = [m for m in final.messages if (m.event_id, m.channel) not in gone]
        final = replaced(final, {"messages": kept})
    return final, steps


__all__ = [
    "Status",
    "Step",
    "Verdict",
    "anomaly",
    "decide",
    "fold",
    "is_old",
    "opt_out_key",
    "quiet_until",
]
