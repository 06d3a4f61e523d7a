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

from notifier.models import ChannelKind, Outcome, Status, Transition
from notifier.policy.rules import Policy, QuietWindow, Rule
from notifier.state import ShipmentState, merge_recipient


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
) -> Verdict:
    recipient = state.recipient
    to = None
    if recipient is not None:
        to = recipient.email if channel is ChannelKind.EMAIL else recipient.phone
    if to is None:
        return Verdict(Outcome.SUPPRESSED, f"no {channel} address known for the recipient", channel)
    if opt_out_key(channel, to) in opted_out:
        return Verdict(Outcome.SUPPRESSED, f"recipient opted out of {channel}", channel)

    last = state.notified.get(t.milestone, {}).get(channel)
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
    last_trivial = state.last_trivial.get(channel)
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
    today = state.messages_since(now - timedelta(hours=24))
    if today >= throttle.max_per_shipment_per_day:
        return Verdict(
            Outcome.SUPPRESSED,
            f"cap: {today} messages to this shipment in the last 24 h "
            f"(max {throttle.max_per_shipment_per_day})",
            channel,
            details={"count": today, "max": throttle.max_per_shipment_per_day},
        )
    if channel is ChannelKind.SMS and state.sms_total >= throttle.max_sms_per_shipment:
        return Verdict(
            Outcome.SUPPRESSED,
            f"cap: {state.sms_total} SMS already sent for this shipment "
            f"(max {throttle.max_sms_per_shipment})",
            channel,
            details={"count": state.sms_total, "max": throttle.max_sms_per_shipment},
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


def decide(
    policy: Policy,
    state: ShipmentState,
    t: Transition,
    now: datetime,
    opted_out: Collection[str] = (),
) -> list[Verdict]:
    """Decide what ``t`` triggers, given the shipment's state *before* ``t``.

    ``state.recipient`` should already include ``t.recipient`` (``fold`` does that);
    ``opted_out`` holds ``opt_out_key`` strings of the recipient's opted-out addresses.
    """
    flagged = anomaly(policy, state, t, now)
    if flagged is not None:
        return [flagged]
    if state.is_step_back(t):
        since = state.occurred_at.isoformat() if state.occurred_at else "?"
        return [
            Verdict(
                Outcome.SUPPRESSED,
                f"out of order: {t.milestone} at {t.occurred_at.isoformat()} would step back; "
                f"the shipment is {state.status} since {since}",
            )
        ]
    rule = policy.rule(t.status, t.exception_code)
    if not rule.channels:
        return [Verdict(Outcome.SUPPRESSED, f"policy: {t.milestone} is not notified")]
    verdicts: list[Verdict] = []
    for channel in rule.channels:
        verdict = _channel_verdict(policy, rule, state, t, channel, now, opted_out)
        verdicts.append(verdict)
        if verdict.outcome in (Outcome.SENT, Outcome.DEFERRED):
            # the next channel's caps count this message too
            state = state.record_message(t, channel, rule.trivial, now)
    return verdicts


def _fold_once(
    policy: Policy,
    state: ShipmentState,
    transitions: Sequence[Transition],
    now: datetime,
    opted_out: Collection[str],
    superseded: Mapping[tuple[str, ChannelKind], str],
) -> tuple[ShipmentState, list[Step]]:
    steps: list[Step] = []
    for t in transitions:
        if state.has_seen(t.event_id):
            steps.append(Step(t, [], replay=True))
            continue
        informed = state
        if t.recipient is not None:
            informed = state.model_copy(
                update={"recipient": merge_recipient(state.recipient, t.recipient)}
            )
        verdicts = decide(policy, informed, t, now, opted_out)
        if verdicts and verdicts[0].outcome is Outcome.FLAGGED:
            state = state.remember(t)
            steps.append(Step(t, verdicts))
            continue
        rule = policy.rule(t.status, t.exception_code)
        final: list[Verdict] = []
        state = state.apply(t)
        for v in verdicts:
            by = superseded.get((t.event_id, v.channel)) if v.channel else None
            if by is not None and v.outcome in (Outcome.SENT, Outcome.DEFERRED):
                v = Verdict(Outcome.SUPPRESSED, f"superseded by {by} in the same batch", v.channel)
            elif v.outcome in (Outcome.SENT, Outcome.DEFERRED) and v.channel is not None:
                state = state.record_message(t, v.channel, rule.trivial, now)
            final.append(v)
        steps.append(Step(t, final))
    return state, steps


def fold(
    policy: Policy,
    state: ShipmentState,
    transitions: Sequence[Transition],
    now: datetime,
    opted_out: Collection[str] = (),
) -> tuple[ShipmentState, list[Step]]:
    """Fold a shipment's transitions (in arrival order) through ``decide``. Pure.

    When several messages for one channel come out of the same batch (a carrier
    uploading a backlog of scans at once), only the last goes out; the earlier
    ones are recorded as superseded and do not count against throttles or caps.
    Dropping one can let a later message past a cap, so this runs to a fixpoint.
    """
    superseded: dict[tuple[str, ChannelKind], str] = {}
    for _ in range(len(transitions) + 1):
        final_state, steps = _fold_once(policy, state, transitions, now, opted_out, superseded)
        latest: dict[ChannelKind, tuple[str, str]] = {}
        keys = set(superseded)
        for step in steps:
            for v in step.verdicts:
                if v.channel is None or v.outcome not in (Outcome.SENT, Outcome.DEFERRED):
                    continue
                if v.channel in latest:
                    keys.add((latest[v.channel][0], v.channel))
                latest[v.channel] = (step.transition.event_id, step.transition.milestone)
        update = {key: latest[key[1]][1] if key[1] in latest else superseded[key] for key in keys}
        if update == superseded:
            break
        superseded = update
    return final_state, steps


__all__ = ["Status", "Step", "Verdict", "anomaly", "decide", "fold", "opt_out_key", "quiet_until"]
