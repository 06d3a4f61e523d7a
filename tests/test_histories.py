"""Real carrier histories (tests/data/carrier_histories.json) replayed through the engine as they
would arrive live, checked against an oracle written from what a customer should receive —
not against the engine's own rules."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from bench import histories
from bench.histories import MAPPING
from notifier.models import STATUS_RANK, ChannelKind, Outcome, Status, Transition
from notifier.policy import PolicyStore, fold
from notifier.resources import data_dir
from notifier.state import ShipmentState

HISTORIES = histories.load()
ARRIVAL_DELAY = timedelta(minutes=10)


def transitions(history: dict[str, Any]) -> list[Transition]:
    """The history's mapped events in time order, as the tracking backend would post them."""
    out = []
    for n, e in enumerate(history["events"]):
        mapped = MAPPING.get(e.get("mapped_status") or "")
        if mapped is None:
            continue
        at = datetime.fromisoformat(e["occurred_at"])
        if at.tzinfo is None:
            at = at.replace(tzinfo=UTC)  # the backend attaches a zone; the fixture lacks one
        body: dict[str, Any] = {
            "event_id": f"{history['id']}-{n}",
            "merchant_id": "acme",
            "shipment_id": "s",
            "tracking_number": history["tracking_number"],
            "carrier": history["carrier"],
            "status": mapped[0],
            "occurred_at": at,
            "recipient": {
                "email": "ana@example.com",
                "phone": "+12125550100",
                "timezone": "America/New_York",
            },
        }
        if mapped[1]:
            body["exception_code"] = mapped[1]
        try:
            out.append(Transition.model_validate(body))
        except ValidationError:
            continue  # the API would have refused it (a 1998 fixture date, say)
    return sorted(out, key=lambda t: t.occurred_at)


@dataclass
class Message:
    milestone: str
    channel: ChannelKind
    event: Transition
    sent_at: datetime


def replay(events: list[Transition]) -> list[Message]:
    """Each event arrives 10 min after it happened; deferred messages go when due."""
    policy = PolicyStore(data_dir("policies", None)).for_merchant("")
    state = ShipmentState(merchant_id="acme", shipment_id="s")
    sent: list[Message] = []
    deferred: list[tuple[datetime, Transition, ChannelKind]] = []

    def release(until: datetime) -> None:
        for due, t, c in sorted(deferred, key=lambda d: d[0]):
            if due <= until:
                deferred.remove((due, t, c))
                if state.superseded(c, t.event_id, t.milestone, STATUS_RANK[t.status]) is None:
                    sent.append(Message(t.milestone, c, t, due))

    for t in events:
        now = t.occurred_at.astimezone(UTC) + ARRIVAL_DELAY
        release(now)
        state, steps = fold(policy, state, [t], now)
        for v in steps[0].verdicts:
            if v.outcome is Outcome.SENT and v.channel:
                sent.append(Message(t.milestone, v.channel, t, now))
            elif v.outcome is Outcome.DEFERRED and v.channel and v.send_at:
                deferred.append((v.send_at, t, v.channel))
    release(datetime.max.replace(tzinfo=UTC))
    return sorted(sent, key=lambda m: m.sent_at)


CASES = [h for h in HISTORIES if len(transitions(h)) >= 2]


@pytest.mark.parametrize("history", CASES, ids=[h["id"] for h in CASES])
def test_history_gives_the_customer_what_matters(history: dict[str, Any]) -> None:
    events = transitions(history)
    messages = replay(events)
    by_channel = {c: [m for m in messages if m.channel is c] for c in ChannelKind}

    final = events[-1]
    if final.status in (Status.DELIVERED, Status.AVAILABLE_FOR_PICKUP):
        # the journey's outcome is always announced, on both channels
        for c in ChannelKind:
            assert any(m.milestone == final.milestone for m in by_channel[c]), (c, messages)

    # every failed attempt is emailed (unless it merely repeats the one just before it)
    previous = None
    emailed = {m.event.event_id for m in by_channel[ChannelKind.EMAIL]}
    for t in events:
        if t.status is Status.DELIVERY_ATTEMPT_FAILED and previous != t.milestone:
            assert t.event_id in emailed, f"failed attempt at {t.occurred_at} not emailed"
        previous = t.milestone

    for c, sent in by_channel.items():
        for a, b in itertools.pairwise(sent):
            # no back-to-back repeat of a milestone (re-scans), except trivial updates a day on
            if a.milestone == b.milestone and a.milestone not in ("in_transit",):
                assert b.sent_at - a.sent_at >= timedelta(days=7), (c, a.milestone)
            # never a step back: nothing short of a terminal status after it
            if a.event.status in (Status.DELIVERED, Status.RETURNED_TO_SENDER):
                assert STATUS_RANK[b.event.status] >= STATUS_RANK[a.event.status], (c, b)
        assert len(sent) <= len(events)


def test_the_replay_sees_the_real_journeys() -> None:
    """Guard against a mapping change that silently empties the cases above."""
    assert len(CASES) >= 8
    statuses = {t.status for h in CASES for t in transitions(h)}
    assert {
        Status.DELIVERED,
        Status.DELIVERY_ATTEMPT_FAILED,
        Status.AVAILABLE_FOR_PICKUP,
        Status.EXCEPTION,
    } <= statuses


def told_at(policy_now: datetime, events: list[Transition]) -> list[tuple[str, str]]:
    """What a backlog posted one event at a time, all decided at ``policy_now``, tells the
    customer: (event id, channel) of every message sent or deferred."""
    policy = PolicyStore(data_dir("policies", None)).for_merchant("")
    state = ShipmentState(merchant_id="acme", shipment_id="s")
    out = []
    for t in events:
        state, steps = fold(policy, state, [t], policy_now)
        going = (Outcome.SENT, Outcome.DEFERRED)
        out += [(t.event_id, str(v.channel)) for v in steps[0].verdicts if v.outcome in going]
    return sorted(out)


@pytest.mark.parametrize("history", CASES, ids=[h["id"] for h in CASES])
@pytest.mark.parametrize("order", ["in time", "as the carrier returned them", "reversed"])
def test_a_scan_too_old_to_tell_changes_nothing_told(history: dict[str, Any], order: str) -> None:
    """A history moved to end an hour ago and posted at once, one event at a time: its
    scans older than the policy's limit (168 h) are recorded, not told, and must not
    change what the newer ones tell, in any arrival order. (The UPS sample's "delivered"
    dated 13 days before the rest used to silence the notice after it that the receiver's
    place was closed at the second attempt.)"""
    now = datetime(2026, 11, 21, 14, 0, tzinfo=UTC)
    events = transitions(history)
    shift = now - timedelta(hours=1) - events[-1].occurred_at
    moved = {
        t.event_id: t.model_copy(update={"occurred_at": t.occurred_at + shift}) for t in events
    }
    returned = [
        moved[i] for n in range(len(history["events"])) if (i := f"{history['id']}-{n}") in moved
    ]
    posted = {
        "in time": list(moved.values()),
        "as the carrier returned them": returned,
        "reversed": returned[::-1],
    }[order]
    fresh = [t for t in posted if now - t.occurred_at <= timedelta(hours=168)]
    assert told_at(now, posted) == told_at(now, fresh)


def test_the_stale_scan_case_is_in_the_data() -> None:
    """Guard: the case above has a history with scans on both sides of the limit."""
    ups = next(h for h in CASES if h["id"] == "ups-1Z12345E6892410845")
    at = [t.occurred_at for t in transitions(ups)]
    assert max(at) - min(at) > timedelta(hours=168 + 1) > max(at) - sorted(at)[2]
