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
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo

from notifier.models import STATUS_RANK, ChannelKind, Outcome, Status, Transition
from notifier.policy.rules import Policy, QuietWindow, Rule
from notifier.state import ShipmentState


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


@dataclass(frozen=True, slots=True)
class Step:
    """One transition of a fold and what was decided for it."""

    transition: Transition
    verdicts: list[Verdict]
    #: already folded in an earlier run (a re-delivered inbox entry): nothing decided again
    replay: bool = False


def opt_out_key(channel: ChannelKind, address: str) -> str:
    """How an opt-out is named in the opt-out store and in ``decide(opted_out=...)``."""
    return f"{channel}:{address.lower() if channel is ChannelKind.EMAIL else address}"


@lru_cache(maxsize=512)
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def quiet_until(window: QuietWindow, tz: ZoneInfo, now: datetime) -> datetime | None:
    """The UTC end of the quiet window ``now`` falls in, or None outside quiet hours.

    Compares local wall-clock times, so it holds across DST changes; an end time
    that falls in a spring-forward gap resolves to the instant after the gap.
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
    return datetime.combine(end_day, end, tzinfo=tz).astimezone(UTC)


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
        )
    if state.first_at is not None:
        early = (state.first_at - t.occurred_at).total_seconds() / 3600
        if early > rules.early_hours:
            return Verdict(
                Outcome.FLAGGED,
                f"anomaly: {early:.0f} h before the shipment's first known event "
                f"(limit {rules.early_hours:g} h)",
                details={"hours_early": round(early, 1), "limit_hours": rules.early_hours},
            )
    loc, fix = t.location, state.last_fix
    if fix is not None and loc is not None and loc.lat is not None and loc.lon is not None:
        km = _km(fix.lat, fix.lon, loc.lat, loc.lon)
        hours = abs((t.occurred_at - fix.at).total_seconds()) / 3600
        speed = km / hours if hours > 0 else math.inf
        if km >= rules.min_jump_km and speed > rules.max_speed_kmh:
            shown = "instantly" if math.isinf(speed) else f"at {speed:.0f} km/h"
            return Verdict(
                Outcome.FLAGGED,
                f"anomaly: {km:.0f} km from the previous scan {shown} "
                f"(limit {rules.max_speed_kmh:g} km/h)",
                details={
                    "km": round(km, 1),
                    "hours": round(hours, 3),
                    "limit_kmh": rules.max_speed_kmh,
                },
            )
    return None


def _hours(delta: timedelta) -> float:
    return delta.total_seconds() / 3600


def _channel_verdict(
    policy: Policy,
    rule: Rule,
    state: ShipmentState,
    t: Transition,
    channel: ChannelKind,
    now: datetime,
    opted_out: Collection[str],
    pending: frozenset[str],
) -> Verdict:
    recipient = state.recipient
    to = None
    if recipient is not None:
        to = recipient.email if channel is ChannelKind.EMAIL else recipient.phone
    if to is None:
        return Verdict(Outcome.SUPPRESSED, f"no {channel} address known for the recipient", channel)
    if opt_out_key(channel, to) in opted_out:
        return Verdict(Outcome.SUPPRESSED, f"recipient opted out of {channel}", channel)

    last = state.last_sent(channel, t.milestone, now, pending)
    window = timedelta(hours=policy.dedupe_window_hours)
    if last is not None and now - last < window:
        ago = _hours(now - last)
        return Verdict(
            Outcome.SUPPRESSED,
            f"duplicate: {t.milestone} already sent by {channel} {ago:.1f} h ago "
            f"(window {policy.dedupe_window_hours:g} h)",
            channel,
            details={"hours_ago": round(ago, 2), "window_hours": policy.dedupe_window_hours},
        )
    throttle = policy.throttle
    last_trivial = state.last_trivial(channel, now, pending)
    interval = timedelta(hours=throttle.trivial_interval_hours)
    if rule.trivial and last_trivial is not None and now - last_trivial < interval:
        ago = _hours(now - last_trivial)
        return Verdict(
            Outcome.SUPPRESSED,
            f"trivial update throttled: last {channel} {ago:.1f} h ago, "
            f"interval {throttle.trivial_interval_hours:g} h",
            channel,
            details={"hours_ago": round(ago, 2), "interval_hours": throttle.trivial_interval_hours},
        )
    today = state.messages_since(now - timedelta(hours=24), now, pending)
    if today >= throttle.max_per_shipment_per_day:
        return Verdict(
            Outcome.SUPPRESSED,
            f"cap: {today} messages to this shipment in the last 24 h "
            f"(max {throttle.max_per_shipment_per_day})",
            channel,
            details={"count": today, "max": throttle.max_per_shipment_per_day},
        )
    sms = state.sms_count(now, pending) if channel is ChannelKind.SMS else 0
    if channel is ChannelKind.SMS and sms >= throttle.max_sms_per_shipment:
        return Verdict(
            Outcome.SUPPRESSED,
            f"cap: {sms} SMS already sent for this shipment (max {throttle.max_sms_per_shipment})",
            channel,
            details={"count": sms, "max": throttle.max_sms_per_shipment},
        )
    return _timing(policy, rule, state, t, channel, to, now)


def _timing(
    policy: Policy,
    rule: Rule,
    state: ShipmentState,
    t: Transition,
    channel: ChannelKind,
    to: str,
    now: datetime,
) -> Verdict:
    """Send now, or defer for quiet hours and coalescing."""
    sent = Verdict(Outcome.SENT, f"policy: {t.milestone} is notified by {channel}", channel, to)
    due: datetime | None = None
    reasons: list[str] = []
    details: dict[str, Any] = {}
    quiet = policy.quiet_hours.window(channel)
    if quiet is not None and not rule.break_quiet_hours:
        recipient = state.recipient
        tz_name = (recipient.timezone if recipient else None) or policy.quiet_hours.default_timezone
        until = quiet_until(quiet, _zone(tz_name), now)
        if until is not None:
            due = until
            local_end = until.astimezone(_zone(tz_name)).strftime("%H:%M")
            reasons.append(
                f"quiet hours {quiet.start:%H:%M}-{quiet.end:%H:%M} in {tz_name}; "
                f"deferred to {local_end} local ({until:%Y-%m-%d %H:%M} UTC)"
            )
            details.update(timezone=tz_name, quiet_until=until.isoformat())
    if policy.coalesce_seconds:
        held = now + timedelta(seconds=policy.coalesce_seconds)
        if due is None or held > due:
            due = held
            reasons.append(f"held {policy.coalesce_seconds:g} s to send only the latest state")
    if due is None:
        return sent
    return Verdict(Outcome.DEFERRED, "; ".join(reasons), channel, to, due, details)


def _decide(
    policy: Policy,
    state: ShipmentState,
    t: Transition,
    now: datetime,
    opted_out: Collection[str],
    pending: frozenset[str],
) -> tuple[list[Verdict], ShipmentState]:
    """decide(), plus the state after ``t`` and its messages (for fold)."""
    flagged = anomaly(policy, state, t, now)
    if flagged is not None:
        return [flagged], state.remember(t)
    if state.is_step_back(t):
        since = state.occurred_at.isoformat() if state.occurred_at else "?"
        reason = (
            f"out of order: {t.milestone} at {t.occurred_at.isoformat()} would step back; "
            f"the shipment is {state.status} since {since}"
        )
        return [Verdict(Outcome.SUPPRESSED, reason)], state.apply(t)
    after = state.apply(t)  # counts below see earlier pending messages this one overtakes
    rule = policy.rule(t.status, t.exception_code)
    if not rule.channels:
        return [Verdict(Outcome.SUPPRESSED, f"policy: {t.milestone} is not notified")], after
    pending = pending | {t.event_id}
    verdicts: list[Verdict] = []
    for channel in rule.channels:
        verdict = _channel_verdict(policy, rule, after, t, channel, now, opted_out, pending)
        verdicts.append(verdict)
        if verdict.outcome in (Outcome.SENT, Outcome.DEFERRED):
            after = after.record_message(t, channel, rule.trivial, now, verdict.send_at)
    return verdicts, after


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
    return _decide(policy, state, t, now, opted_out, pending)[0]


_GOING = (Outcome.SENT, Outcome.DEFERRED)


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
        skip = {c for (e, c) in superseded if e == t.event_id}
        if not skip:
            verdicts, state = _decide(policy, state, t, now, opted_out, frozenset(pending))
        else:
            # Decide again without the messages a later one in this batch overtakes.
            verdicts, after = _decide(policy, state, t, now, opted_out, frozenset(pending))
            state = state.apply(t) if verdicts[0].outcome is not Outcome.FLAGGED else after
            rule = policy.rule(t.status, t.exception_code)
            kept: list[Verdict] = []
            for v in verdicts:
                if v.channel in skip and v.outcome in _GOING:
                    by = superseded[(t.event_id, v.channel)]
                    v = Verdict(Outcome.SUPPRESSED, f"{by} in the same batch", v.channel)
                elif v.outcome in _GOING and v.channel is not None:
                    state = state.record_message(t, v.channel, rule.trivial, now, v.send_at)
                kept.append(v)
            verdicts = kept
        if any(v.outcome in _GOING for v in verdicts):
            pending.add(t.event_id)
        steps.append(Step(t, verdicts))
    return state, steps


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
    superseded and not sent, and does not count against throttles or caps; the
    same rule cancels deferred messages when they come due. Dropping one can let
    a later message past a cap, so this runs to a fixpoint.
    """
    superseded: dict[tuple[str, ChannelKind], str] = {}
    for _ in range(len(transitions) + 1):
        final, steps = _fold_once(policy, state, transitions, now, opted_out, superseded)
        found = dict(superseded)
        for step in steps:
            t = step.transition
            for v in step.verdicts:
                if v.outcome not in _GOING or v.channel is None:
                    continue
                why = final.superseded(v.channel, t.event_id, t.milestone, STATUS_RANK[t.status])
                if why is not None:
                    found[(t.event_id, v.channel)] = why
        if found == superseded:
            break
        superseded = found
    return final, steps


__all__ = ["Status", "Step", "Verdict", "anomaly", "decide", "fold", "opt_out_key", "quiet_until"]
