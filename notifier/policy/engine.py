"""decide(): pure cadence decisions — values in, verdicts out; no Redis, clock or network."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from notifier.models import ChannelKind, Outcome, Transition
from notifier.policy.rules import Policy
from notifier.state import ShipmentState


@dataclass(frozen=True, slots=True)
class Verdict:
    """The decision for one transition on one channel (all channels when ``channel`` is None)."""

    outcome: Outcome
    reason: str
    channel: ChannelKind | None = None
    to: str | None = None


def _address(state: ShipmentState, channel: ChannelKind) -> str | None:
    recipient = state.recipient
    if recipient is None:
        return None
    return recipient.email if channel is ChannelKind.EMAIL else recipient.phone


def decide(policy: Policy, state: ShipmentState, t: Transition, now: datetime) -> list[Verdict]:
    """Decide what ``t`` triggers, given the state *after* folding ``t`` into it.

    ``state`` already carries ``t``'s recipient and facts; its ``notified`` map
    still describes what went out before ``t``.
    """
    if state.status != t.status or state.exception_code != t.exception_code:
        since = state.occurred_at.isoformat() if state.occurred_at else "?"
        # apply() refused to move the shipment: this event is older than what we know.
        return [
            Verdict(
                Outcome.SUPPRESSED,
                f"out of order: occurred {t.occurred_at.isoformat()}, the shipment is already "
                f"{state.status} since {since}",
            )
        ]
    channels = policy.channels_for(t.status, t.exception_code)
    if not channels:
        return [Verdict(Outcome.SUPPRESSED, f"policy: {t.milestone} is not notified")]
    window = timedelta(hours=policy.dedupe_window_hours)
    verdicts: list[Verdict] = []
    for channel in channels:
        to = _address(state, channel)
        if to is None:
            verdicts.append(
                Verdict(
                    Outcome.SUPPRESSED, f"no {channel} address known for the recipient", channel
                )
            )
            continue
        last = state.notified.get(t.milestone, {}).get(channel)
        if last is not None and now - last < window:
            ago = (now - last).total_seconds() / 3600
            verdicts.append(
                Verdict(
                    Outcome.SUPPRESSED,
                    f"duplicate: {t.milestone} already sent by {channel} {ago:.1f} h ago "
                    f"(window {policy.dedupe_window_hours:g} h)",
                    channel,
                )
            )
            continue
        verdicts.append(Verdict(Outcome.SENT, f"policy: {t.milestone} is notified", channel, to))
    return verdicts
