"""Models built on the worker's hot path without validation (``assembled``) are the models
validation builds: equal, and stored as the same JSON."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from notifier.check import samples
from notifier.models import (
    ChannelKind,
    Decision,
    DeliveryWindow,
    Notification,
    Outcome,
    Recipient,
    assembled,
)
from notifier.state import Notice, Sent, ShipmentState

NOW = datetime(2026, 11, 21, 10, 30, 0, 123456, tzinfo=UTC)


def test_decisions_and_notifications_equal_validated_ones() -> None:
    r = Recipient(name="Ana", email="a@example.com", locale="fr", timezone="Europe/Paris")
    for t in samples():
        for channel in (None, ChannelKind.EMAIL, ChannelKind.SMS):
            for send_at in (None, NOW + timedelta(hours=3)):
                fields = {
                    "event_id": t.event_id,
                    "status": t.status,
                    "exception_code": t.exception_code,
                    "channel": channel,
                    "outcome": Outcome.DEFERRED,
                    "reason": "quiet hours é",
                    "notification_id": "n_1" if channel else None,
                    "decided_at": NOW,
                    "occurred_at": t.occurred_at,
                    "send_at": send_at,
                    "details": {"hours": 1.5, "quiet_until": NOW.isoformat()},
                    "request_id": "req_1",
                }
                built = Decision.about(
                    t,
                    channel=channel,
                    outcome=Outcome.DEFERRED,
                    reason="quiet hours é",
                    notification_id="n_1" if channel else None,
                    decided_at=NOW,
                    send_at=send_at,
                    details=fields["details"],  # type: ignore[arg-type]
                    request_id="req_1",
                )
                validated = Decision(**fields)  # type: ignore[arg-type]
                assert built == validated
                assert built.history_entry() == validated.history_entry()
        n = {
            "notification_id": "n_1",
            "merchant_id": "acme",
            "shipment_id": "s1",
            "channel": ChannelKind.EMAIL,
            "to": "a@example.com",
            "transition": t,
            "recipient": r,
            "created_at": NOW,
            "predicted": None,
            "experiment": None,
            "variant": None,
        }
        window = DeliveryWindow(start=NOW, end=NOW)
        for predicted, test in ((None, None), (window, "short-subject")):
            n["predicted"] = predicted
            n["experiment"], n["variant"] = test, "b" if test else None
            fast = assembled(Notification, dict(n))
            slow = Notification(**n)  # type: ignore[arg-type]
            assert fast == slow and fast.model_dump_json() == slow.model_dump_json()


def test_a_recorded_message_is_stored_as_before() -> None:
    t = samples()[0]
    state = ShipmentState(merchant_id="acme", shipment_id="s1").apply(t)
    after = state.record_message(t, ChannelKind.SMS, True, NOW, NOW + timedelta(hours=1))
    rank = after.messages[-1].rank
    assert after.messages[-1] == Sent(
        at=NOW.replace(microsecond=0),  # to the second
        channel=ChannelKind.SMS,
        event_id=t.event_id,
        milestone=t.milestone,
        rank=rank,
        trivial=True,
        due=NOW + timedelta(hours=1),
    )
    assert after.notices[ChannelKind.SMS] == Notice(
        event_id=t.event_id, milestone=t.milestone, occurred_at=t.occurred_at, rank=rank
    )
    dumped = after.model_dump_json(exclude_defaults=True)
    assert (
        ShipmentState.model_validate_json(dumped).model_dump_json(exclude_defaults=True) == dumped
    )
    assert all(
        m.__pydantic_post_init__ is None for m in (Decision, Notification, Sent, Notice)
    )  # assembled() does not run one
