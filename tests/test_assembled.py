"""Models built on the worker's hot path without validation (``assembled``, ``replaced``) are
the models validation builds: equal, and stored as the same JSON (``state_json``)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any, get_args
from zoneinfo import ZoneInfo

from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from notifier.check import samples
from notifier.insights.journeys import Journey
from notifier.models import (
    ChannelKind,
    Decision,
    DeliveryWindow,
    ExceptionCode,
    Location,
    Notification,
    Order,
    Outcome,
    PickupPoint,
    Recipient,
    Status,
    assembled,
    replaced,
)
from notifier.state import Fix, Notice, Sent, ShipmentState, pickup_key
from notifier.state_json import WRITTEN, state_json
from notifier.store.shipments import state_of, state_value

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
            "alone": None,
            "collected": None,
            "reached": None,
        }
        window = DeliveryWindow(start=NOW, end=NOW)
        for predicted, test in ((None, None), (window, "short-subject")):
            n["predicted"] = predicted
            n["experiment"], n["variant"] = test, "b" if test else None
            n["alone"] = True if test else None
            n["collected"] = True if test else None
            n["reached"] = 3 if test else None
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
        event_id=t.event_id,
        milestone=t.milestone,
        occurred_at=t.occurred_at,
        rank=rank,
        pickup=pickup_key(t),
        deadline=t.pickup_deadline,
    )
    dumped = after.model_dump_json(exclude_defaults=True)
    assert (
        ShipmentState.model_validate_json(dumped).model_dump_json(exclude_defaults=True) == dumped
    )
    assert all(
        m.__pydantic_post_init__ is None for m in (Decision, Notification, Sent, Notice)
    )  # assembled() does not run one


# -- a state's JSON, written by hand (``state_json``) ------------------------------------------

_ZONES = st.sampled_from(
    [
        UTC,
        timezone(timedelta(hours=2)),
        timezone(timedelta(hours=-5, minutes=-30)),
        ZoneInfo("Asia/Tokyo"),
        ZoneInfo("Europe/London"),
    ]
)
_MOMENTS = st.builds(
    lambda day, seconds, micro, tz: (
        datetime(2026, 1, 1, tzinfo=tz) + timedelta(days=day, seconds=seconds, microseconds=micro)
    ),
    st.integers(0, 700),
    st.integers(0, 86_399),
    st.sampled_from([0, 1, 100, 450_000, 450_071, 999_999]),
    _ZONES,
).filter(
    # not a wall time a zone skips or repeats (a change of clocks): PEP 495 makes such a
    # time unequal to every instant of another zone, its own reading included (found by the
    # database: 2027-03-28 01:00 in London); no state holds one (they come from offsets
    # in JSON, or from a clock in UTC)
    lambda moment: moment.replace(fold=1 - moment.fold).utcoffset() == moment.utcoffset()
)
#: any text (a carrier's, a merchant's): quotes, escapes, control characters, any script
_TEXT = st.text(min_size=1, max_size=12)
_NAMES = st.sampled_from(["Köln", 'a "quoted" \\ name', "نور", "東京 📦", "x"])
_MAYBE = st.none


@st.composite
def _locations(draw: st.DrawFn) -> Location:
    located = draw(st.booleans())
    return Location(
        city=draw(_MAYBE() | _NAMES),
        region=draw(_MAYBE() | _NAMES),
        country=draw(_MAYBE() | st.sampled_from(["DE", "US"])),
        lat=draw(st.floats(-90, 90)) if located else None,
        lon=draw(st.floats(-180, 180)) if located else None,
    )


_RECIPIENTS = st.builds(
    Recipient,
    name=_MAYBE() | _NAMES,
    email=_MAYBE() | st.just("ana@example.com"),
    phone=_MAYBE() | st.just("+33612345678"),
    locale=_MAYBE() | st.just("fr_FR"),
    timezone=_MAYBE() | st.just("Europe/Paris"),
)
_SENT = st.builds(
    Sent,
    at=_MOMENTS,
    channel=st.sampled_from(list(ChannelKind)),
    event_id=_TEXT,
    milestone=_TEXT,
    rank=st.integers(-1, 12),
    trivial=st.booleans(),
    due=_MAYBE() | _MOMENTS,
    cancelled=st.booleans(),
)
_NOTICES = st.dictionaries(
    st.sampled_from(list(ChannelKind)),
    st.builds(
        Notice,
        event_id=_TEXT,
        milestone=_TEXT,
        occurred_at=_MOMENTS,
        rank=st.integers(0, 12),
        pickup=_MAYBE() | _NAMES,
        deadline=_MAYBE() | _MOMENTS,
    ),
)
_JOURNEYS = st.builds(
    Journey,
    picked_up_at=_MAYBE() | _MOMENTS,
    origin=_MAYBE() | st.just("DE"),
    attempts_failed=st.integers(0, 3),
    exceptions=st.lists(_TEXT, max_size=3),
    hub=_MAYBE() | _TEXT,
    hub_at=_MAYBE() | _MOMENTS,
    counted=st.booleans(),
    partial=st.booleans(),
)


@st.composite
def _states(draw: st.DrawFn) -> ShipmentState:
    status = draw(_MAYBE() | st.sampled_from(list(Status)))
    start = draw(_MOMENTS)
    return ShipmentState(
        merchant_id=draw(st.sampled_from(["acme", "m.1"])),
        shipment_id=draw(_TEXT),
        tracking_number=draw(_MAYBE() | _TEXT),
        carrier=draw(_MAYBE() | _TEXT),
        tracking_url=draw(_MAYBE() | st.just('https://track.example.com/1Z?a=1&b="2"')),
        status=status,
        exception_code=(
            draw(st.sampled_from(list(ExceptionCode))) if status is Status.EXCEPTION else None
        ),
        occurred_at=draw(_MAYBE() | _MOMENTS),
        first_at=draw(_MAYBE() | _MOMENTS),
        last_scan_at=draw(_MAYBE() | _MOMENTS),
        last_fix=draw(
            _MAYBE() | st.builds(Fix, lat=st.floats(-90, 90), lon=st.floats(-180, 180), at=_MOMENTS)
        ),
        location=draw(_MAYBE() | _locations()),
        estimated_delivery=draw(_MAYBE() | st.just(DeliveryWindow(start=start, end=start))),
        pickup_deadline=draw(_MAYBE() | _MOMENTS),
        pickup_point=draw(
            _MAYBE() | st.builds(PickupPoint, name=_NAMES, address=_NAMES, hours=_MAYBE() | _NAMES)
        ),
        recipient=draw(_MAYBE() | _RECIPIENTS),
        order=draw(_MAYBE() | st.builds(Order, number=_NAMES)),
        seen=draw(st.lists(_TEXT, max_size=4)),
        messages=draw(st.lists(_SENT, max_size=4)),
        sms_archived=draw(st.integers(0, 3)),
        notices=draw(_NOTICES),
        current_event=draw(_MAYBE() | _TEXT),
        max_rank=draw(st.integers(-1, 12)),
        furthest=draw(_MAYBE() | _TEXT),
        events=draw(st.integers(0, 40)),
        journey=draw(_MAYBE() | _JOURNEYS),
        pickup_at=draw(_MAYBE() | _MOMENTS),
        pickup_left_at=draw(_MAYBE() | _MOMENTS),
    )


@settings(max_examples=600, deadline=None)
@given(_states())
def test_a_state_is_written_as_pydantic_writes_it(state: ShipmentState) -> None:
    """Byte for byte, with and without its ids: what the store packs is what
    ``model_dump_json(exclude_defaults=True)`` made, and reads back as the same state
    (also once read, when its datetimes carry pydantic's own time zone objects)."""
    whole = state.model_dump_json(exclude_defaults=True).encode()
    assert state_json(state) == whole
    keyed = state.model_dump_json(exclude_defaults=True, exclude={"merchant_id", "shipment_id"})
    assert state_json(state, with_ids=False) == keyed.encode()
    read = ShipmentState.model_validate_json(whole)
    assert read == state
    assert state_json(read) == whole
    value = state_value(read, state.merchant_id, state.shipment_id)
    assert state_of(value, state.merchant_id, state.shipment_id) == state


def test_state_json_knows_every_field_of_every_model_it_writes() -> None:
    """A field added to a model and not to ``state_json`` would never be stored."""
    for model, fields in WRITTEN.items():
        assert tuple(model.model_fields) == fields, model.__name__
    nested = {
        t
        for model in WRITTEN
        for field in model.model_fields.values()
        for t in _model_types(field.annotation)
    }
    assert nested <= set(WRITTEN)


def _model_types(annotation: Any) -> set[type[BaseModel]]:
    """The models an annotation names, through unions, lists and dicts."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return {annotation}
    return {t for arg in get_args(annotation) for t in _model_types(arg)}


@settings(max_examples=200, deadline=None)
@given(_states(), _states())
def test_replaced_is_model_copy(state: ShipmentState, other: ShipmentState) -> None:
    update = {"messages": other.messages, "events": other.events, "journey": other.journey}
    fast = replaced(state, update)
    assert fast == state.model_copy(update=update)
    assert (
        state_json(fast)
        == state.model_copy(update=update).model_dump_json(exclude_defaults=True).encode()
    )
    assert fast.messages is other.messages and fast.events == other.events
    assert fast.seen is state.seen  # what is not updated is shared, as model_copy shares it
