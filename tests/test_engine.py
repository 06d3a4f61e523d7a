"""The pure policy engine: decide(), fold(), quiet_until() — values in, verdicts out."""

from __future__ import annotations

import itertools
import logging
import os
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from notifier.addresses import phone_zones
from notifier.errors import ConfigurationError
from notifier.models import (
    STATUS_RANK,
    ChannelKind,
    Outcome,
    Status,
    Transition,
    notification_id_of,
)
from notifier.policy import Policy, PolicyStore, decide, fold, opt_out_key, quiet_until
from notifier.policy.rules import QuietWindow
from notifier.resources import data_dir
from notifier.state import Fix, ShipmentState
from notifier.state_json import state_json
from notifier.store.shipments import settled_log

EMAIL, SMS = ChannelKind.EMAIL, ChannelKind.SMS
NOON = datetime(2026, 11, 21, 11, 0, tzinfo=UTC)  # 12:00 in Paris


def policy(**overrides: Any) -> Policy:
    """The shipped default policy with top-level keys replaced (validated like a file)."""
    base = PolicyStore(data_dir("policies", None)).for_merchant("")
    return Policy.model_validate({**base.model_dump(), **overrides})


def event(
    i: int = 1, status: str = "out_for_delivery", at: datetime = NOON, **kw: Any
) -> Transition:
    body: dict[str, Any] = {
        "event_id": f"e{i}",
        "merchant_id": "acme",
        "shipment_id": "s1",
        "tracking_number": "1Z",
        "carrier": "ups",
        "status": status,
        "occurred_at": at,
        "recipient": {
            "email": "ana@example.com",
            "phone": "+33612345678",
            "timezone": "Europe/Paris",
        },
    }
    body.update(kw)
    return Transition.model_validate(body)


def run(
    events: list[Transition],
    now: datetime = NOON,
    p: Policy | None = None,
    state: ShipmentState | None = None,
    opted: tuple[str, ...] = (),
) -> tuple[ShipmentState, list[Any]]:
    start = state or ShipmentState(merchant_id="acme", shipment_id="s1")
    return fold(p or policy(), start, events, now, opted)


def outcomes(steps: list[Any]) -> list[tuple[str, str | None, str]]:
    return [(s.transition.event_id, v.channel, v.outcome) for s in steps for v in s.verdicts]


# -- per-status rules ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "channels"),
    [
        ("info_received", []),
        ("picked_up", [EMAIL]),
        ("in_transit", [EMAIL]),
        ("arrived_at_facility", [EMAIL]),
        ("departed_facility", [EMAIL]),
        ("out_for_delivery", [EMAIL, SMS]),
        ("delivery_attempt_failed", [EMAIL, SMS]),
        ("available_for_pickup", [EMAIL, SMS]),
        ("delivered", [EMAIL, SMS]),
        ("returned_to_sender", [EMAIL, SMS]),
    ],
)
def test_default_channels_per_status(status: str, channels: list[ChannelKind]) -> None:
    _, steps = run([event(status=status)])
    sent = [v.channel for v in steps[0].verdicts if v.outcome is Outcome.SENT]
    assert sent == channels


@pytest.mark.parametrize("code", ["delayed", "customs_hold", "lost", "other"])
def test_every_exception_by_sms_and_email(code: str) -> None:
    _, steps = run([event(status="exception", exception_code=code)])
    assert [v.channel for v in steps[0].verdicts if v.outcome is Outcome.SENT] == [EMAIL, SMS]


def test_exception_code_rule_overrides_the_status_rule() -> None:
    p = policy(exceptions={"weather_delay": {"channels": ["email"]}})
    _, steps = run([event(status="exception", exception_code="weather_delay")], p=p)
    assert [v.channel for v in steps[0].verdicts if v.outcome is Outcome.SENT] == [EMAIL]


# -- dedupe -----------------------------------------------------------------------------------


def test_same_milestone_rescanned_is_not_renotified_within_the_window() -> None:
    state, _ = run([event(1)])
    later = NOON + timedelta(hours=3)
    _, steps = run([event(2, at=later)], now=later, state=state)
    assert {v.outcome for v in steps[0].verdicts} == {Outcome.SUPPRESSED}
    assert steps[0].verdicts[0].details == {"hours_ago": 3.0, "window_hours": 168}
    much_later = NOON + timedelta(days=8)
    _, steps = run([event(3, at=much_later)], now=much_later, state=state)
    assert {v.outcome for v in steps[0].verdicts} == {Outcome.SENT}


# -- throttle and caps ----------------------------------------------------------------------


def test_trivial_updates_at_most_one_email_per_interval() -> None:
    state, steps = run([event(1, "in_transit")])
    assert outcomes(steps) == [("e1", EMAIL, Outcome.SENT)]
    three_h = NOON + timedelta(hours=3)
    state, steps = run([event(2, "arrived_at_facility", three_h)], now=three_h, state=state)
    [v] = steps[0].verdicts
    assert v.outcome is Outcome.SUPPRESSED
    assert v.reason == "trivial update throttled: last email 3.0 h ago, interval 24 h"
    next_day = NOON + timedelta(hours=25)
    _, steps = run([event(3, "departed_facility", next_day)], now=next_day, state=state)
    assert outcomes(steps) == [("e3", EMAIL, Outcome.SENT)]


@pytest.mark.parametrize("code", ["customs_hold", "lost"])
def test_the_first_scan_after_an_exception_is_news(code: str) -> None:
    """Told the parcel is held at customs, or lost, the customer heard nothing of it moving
    again for up to 24 h (the scan was a throttled trivial update)."""
    state, steps = run([event(1, "in_transit", NOON - timedelta(hours=3))])
    assert steps[0].verdicts[0].outcome is Outcome.SENT
    stuck = event(2, "exception", NOON - timedelta(hours=2), exception_code=code)
    state, _ = run([stuck], now=NOON - timedelta(hours=2), state=state)
    state, steps = run([event(3, "arrived_at_facility", NOON - timedelta(hours=1))], state=state)
    assert steps[0].verdicts[0].outcome is Outcome.SENT
    # the one after it is a trivial update again
    _, steps = run([event(4, "departed_facility", NOON)], state=state)
    assert steps[0].verdicts[0].rule == "throttled"


@pytest.mark.parametrize("code", ["customs_hold", "lost"])
def test_a_re_scanned_exception_still_lets_the_scan_after_it_through(code: str) -> None:
    """Carriers re-scan a hold every day: the re-scan (a duplicate, never sent) became the
    current event, and the parcel moving again was throttled as a trivial update (found
    by a black-box run as the tracking backend)."""
    events = [
        event(1, "in_transit", NOON - timedelta(hours=4)),
        event(2, "exception", NOON - timedelta(hours=3), exception_code=code),
        event(3, "exception", NOON - timedelta(hours=2), exception_code=code),
        event(4, "departed_facility", NOON - timedelta(hours=1)),
        event(5, "arrived_at_facility", NOON),
    ]
    steps = singly(events)
    rules = {s.transition.event_id: [v.rule for v in s.verdicts] for s in steps}
    assert set(rules["e3"]) == {"duplicate"}, rules  # on both channels
    assert told(steps) == ["e1", "e2", "e4"], rules
    assert rules["e5"] == ["throttled"], rules  # moving again once, then trivial again


def test_only_an_exception_the_customer_was_told_of_lets_the_next_scan_through() -> None:
    """Not one the policy does not notify (a carrier alternating it with scans would get
    every scan through), nor a repeat of an exception itself."""
    quiet = policy(exceptions={"weather_delay": {"channels": []}})
    state, _ = run([event(1, "in_transit", NOON - timedelta(hours=3))], p=quiet)
    stuck = event(2, "exception", NOON - timedelta(hours=2), exception_code="weather_delay")
    state, steps = run([stuck], now=NOON - timedelta(hours=2), p=quiet, state=state)
    assert steps[0].verdicts[0].rule == "not_notified"
    _, steps = run([event(3, "in_transit", NOON - timedelta(hours=1))], p=quiet, state=state)
    assert steps[0].verdicts[0].rule == "throttled"
    trivial = policy(exceptions={"weather_delay": {"channels": ["email"], "trivial": True}})
    state, steps = run([event(1, "in_transit", NOON - timedelta(hours=4))], p=trivial)
    for n in range(2, 5):
        at = NOON - timedelta(hours=4 - n)
        again = event(n, "exception", at, exception_code="weather_delay")
        state, steps = run([again], now=at, p=trivial, state=state)
    outcomes = [v.rule for v in steps[0].verdicts]
    assert outcomes == ["throttled"], outcomes


def test_an_address_too_late_for_arrives_today_is_recorded() -> None:
    """A late event bringing the phone number after the out-for-delivery's day: the SMS it
    would catch up is recorded as stale, not left without a word."""
    morning = datetime(2026, 11, 21, 7, 0, tzinfo=UTC)
    ofd = event(1, "out_for_delivery", morning, recipient={"email": "ana@example.com"})
    state, _ = run([ofd], now=morning)
    late = event(2, "picked_up", morning - timedelta(hours=2))  # carries the phone
    night = datetime(2026, 11, 21, 22, 30, tzinfo=UTC)  # 23:30 in Paris: SMS quiet hours
    _, steps = run([late], now=night, state=state)
    caught = [s for s in steps if s.caught_up_by == "e2"]
    assert [(v.channel, v.rule) for s in caught for v in s.verdicts] == [(SMS, "stale")]
    assert "(the address arrived late, with e2)" in caught[0].verdicts[0].reason


def test_milestones_are_never_held_back_by_the_trivial_throttle() -> None:
    state, _ = run([event(1, "in_transit")])
    soon = NOON + timedelta(minutes=10)
    _, steps = run([event(2, "out_for_delivery", soon)], now=soon, state=state)
    assert {v.outcome for v in steps[0].verdicts} == {Outcome.SENT}


def test_daily_cap_stops_even_a_milestone_and_says_so() -> None:
    p = Policy.model_validate(
        {**policy().model_dump(), "throttle": {"max_per_shipment_per_day": 3}}
    )
    state, _ = run([event(1, "out_for_delivery")], p=p)  # 2 messages
    later = NOON + timedelta(hours=1)
    _, steps = run([event(2, "delivery_attempt_failed", later)], now=later, state=state, p=p)
    assert [v.outcome for v in steps[0].verdicts] == [Outcome.SENT, Outcome.SUPPRESSED]
    capped = steps[0].verdicts[1]
    assert capped.reason == "cap: 3 messages to this shipment in the last 24 h (max 3)"
    assert capped.details == {"count": 3, "max": 3}


def test_the_daily_cap_never_swallows_how_the_journey_ended() -> None:
    """Delivered, returned and ready-to-collect pass the daily cap (the customer would
    otherwise hear of every failed attempt and not of the outcome: found by a black-box
    review); a merchant may cap them too."""
    p = Policy.model_validate(
        {**policy().model_dump(), "throttle": {"max_per_shipment_per_day": 2}}
    )
    at = [NOON + timedelta(hours=h) for h in range(4)]
    state, _ = run([event(1, "out_for_delivery", at[0])], p=p)  # 2 messages: the cap
    for i, status in ((1, "available_for_pickup"), (2, "delivered")):
        state, steps = run([event(1 + i, status, at[i])], now=at[i], p=p, state=state)
        assert {v.outcome for v in steps[0].verdicts} == {Outcome.SENT}, status
    strict = Policy.model_validate(
        {**p.model_dump(), "throttle": {"max_per_shipment_per_day": 2, "daily_cap_exempt": []}}
    )
    state, _ = run([event(1, "out_for_delivery", at[0])], p=strict)
    _, steps = run([event(2, "delivered", at[1])], now=at[1], p=strict, state=state)
    assert {v.rule for v in steps[0].verdicts} == {"daily_cap"}


def test_the_daily_cap_never_swallows_an_address_to_confirm() -> None:
    """An address issue needs the customer to act, or the parcel goes back: it passes the
    daily cap by default (found by a black-box run: it was dropped after a day of
    attempts). A merchant names exception codes alone or as exception:<code>, and
    `exception` for every code; a misspelt entry is refused, naming what is allowed."""
    capped = {"max_per_shipment_per_day": 2}
    at = [NOON + timedelta(hours=h) for h in range(3)]

    def after_cap(p: Policy, code: str) -> set[str | None]:
        state, _ = run([event(1, "out_for_delivery", at[0])], p=p)  # 2 messages: the cap
        late = event(2, "exception", at[1], exception_code=code)
        return {v.rule for v in run([late], now=at[1], p=p, state=state)[1][0].verdicts}

    p = policy(throttle=capped)
    assert after_cap(p, "address_issue") == {"notify"}
    assert after_cap(p, "weather_delay") == {"daily_cap"}
    for entries, code in (
        (["customs_hold"], "customs_hold"),
        (["exception:damaged"], "damaged"),
        (["exception"], "weather_delay"),
    ):
        mine = policy(throttle={**capped, "daily_cap_exempt": entries})
        assert after_cap(mine, code) == {"notify"}, entries
        assert after_cap(mine, "address_issue") == (
            {"notify"} if entries == ["exception"] else {"daily_cap"}
        )
    with pytest.raises(ValueError, match=r"'adress_issue' is neither a status \(") as err:
        policy(throttle={"daily_cap_exempt": ["delivered", "adress_issue"]})
    assert "address_issue" in str(err.value) and "exception:<code>" in str(err.value)
    # YAML reads "exception: damaged" (a space after the colon) as a mapping: taken as meant
    spaced = policy(throttle={"daily_cap_exempt": [{"exception": "damaged"}]})
    assert spaced.throttle.daily_cap_exempt == ["exception:damaged"]
    for wrong in (5, None, True, {"exception": None}):
        with pytest.raises(ValueError, match=r"is neither a status \("):
            policy(throttle={"daily_cap_exempt": [wrong]})


def test_sms_cap_over_the_shipment_life() -> None:
    p = policy(throttle={"max_sms_per_shipment": 1})
    state, _ = run([event(1, "out_for_delivery")], p=p)
    later = NOON + timedelta(hours=2)
    _, steps = run([event(2, "delivered", later)], now=later, state=state, p=p)
    sms = next(v for v in steps[0].verdicts if v.channel is SMS)
    assert sms.outcome is Outcome.SUPPRESSED
    assert sms.reason == "cap: 1 SMS already sent for this shipment (max 1)"


# -- quiet hours and time zones ---------------------------------------------------------------

SMS_NIGHT = QuietWindow.model_validate({"start": "21:00", "end": "08:00"})


@pytest.mark.parametrize(
    ("zone", "local", "expected_local_end"),
    [
        ("Europe/Paris", datetime(2026, 11, 21, 22, 30), datetime(2026, 11, 22, 8, 0)),
        ("Europe/Paris", datetime(2026, 11, 22, 3, 0), datetime(2026, 11, 22, 8, 0)),
        ("Europe/Paris", datetime(2026, 11, 22, 20, 59), None),
        ("Europe/Paris", datetime(2026, 11, 22, 8, 0), None),
        # UTC+14 and UTC-10: the same local rule, very different UTC instants
        ("Pacific/Kiritimati", datetime(2026, 11, 21, 23, 0), datetime(2026, 11, 22, 8, 0)),
        ("Pacific/Honolulu", datetime(2026, 11, 21, 6, 0), datetime(2026, 11, 21, 8, 0)),
        # spring forward (Paris, 29 March 2026 02:00 -> 03:00): the night is an hour shorter
        ("Europe/Paris", datetime(2026, 3, 28, 23, 0), datetime(2026, 3, 29, 8, 0)),
        # fall back (Paris, 25 October 2026 03:00 -> 02:00): the night is an hour longer
        ("Europe/Paris", datetime(2026, 10, 24, 23, 0), datetime(2026, 10, 25, 8, 0)),
        ("America/New_York", datetime(2026, 11, 1, 1, 30), datetime(2026, 11, 1, 8, 0)),
    ],
)
def test_quiet_until_in_local_time(
    zone: str, local: datetime, expected_local_end: datetime | None
) -> None:
    tz = ZoneInfo(zone)
    until = quiet_until(SMS_NIGHT, tz, local.replace(tzinfo=tz))
    if expected_local_end is None:
        assert until is None
    else:
        assert until is not None
        assert until.astimezone(tz).replace(tzinfo=None) == expected_local_end
        assert until.tzinfo is UTC


def test_dst_nights_really_differ_in_length() -> None:
    tz = ZoneInfo("Europe/Paris")
    spring = quiet_until(SMS_NIGHT, tz, datetime(2026, 3, 28, 21, 0, tzinfo=tz))
    autumn = quiet_until(SMS_NIGHT, tz, datetime(2026, 10, 24, 21, 0, tzinfo=tz))
    assert spring is not None and autumn is not None
    spring_start = datetime(2026, 3, 28, 21, 0, tzinfo=tz).astimezone(UTC)
    autumn_start = datetime(2026, 10, 24, 21, 0, tzinfo=tz).astimezone(UTC)
    assert spring - spring_start == timedelta(hours=10)
    assert autumn - autumn_start == timedelta(hours=12)


def test_end_inside_a_dst_gap_is_read_at_the_old_offset() -> None:
    tz = ZoneInfo("Europe/Paris")
    window = QuietWindow.model_validate({"start": "01:00", "end": "02:30"})  # 02:30 never happens
    until = quiet_until(window, tz, datetime(2026, 3, 29, 1, 30, tzinfo=tz))
    assert until == datetime(2026, 3, 29, 1, 30, tzinfo=UTC)  # 03:30 CEST: 02:30 at +01:00


@pytest.mark.parametrize(
    ("zone", "window", "now", "end"),
    [
        # New York falls back at 02:00 EDT to 01:00 EST on 1 November 2026; now is 01:10
        # EST, the second pass of the hour: the window ends at 01:30 EST, not 01:30 EDT
        # (an hour before now, so the SMS went out at once, inside quiet hours)
        ("America/New_York", ("22:00", "01:30"), "2026-11-01T06:10Z", "2026-11-01T06:30Z"),
        # and on the first pass (01:10 EDT) at the first 01:30
        ("America/New_York", ("22:00", "01:30"), "2026-11-01T05:10Z", "2026-11-01T05:30Z"),
        # Paris falls back at 03:00 CEST to 02:00 CET on 25 October 2026
        ("Europe/Paris", ("21:00", "02:30"), "2026-10-25T01:05Z", "2026-10-25T01:30Z"),
        ("Europe/Paris", ("21:00", "02:30"), "2026-10-25T00:05Z", "2026-10-25T00:30Z"),
    ],
)
def test_an_end_inside_a_repeated_hour_is_never_behind_now(
    zone: str, window: tuple[str, str], now: str, end: str
) -> None:
    quiet = QuietWindow.model_validate({"start": window[0], "end": window[1]})
    moment = datetime.fromisoformat(now)
    until = quiet_until(quiet, ZoneInfo(zone), moment)
    assert until == datetime.fromisoformat(end)
    assert until is not None and until > moment


def test_window_within_one_day() -> None:
    window = QuietWindow.model_validate({"start": "12:00", "end": "14:00"})
    tz = ZoneInfo("Asia/Tokyo")
    assert quiet_until(window, tz, datetime(2026, 11, 21, 13, 0, tzinfo=tz)) == datetime(
        2026, 11, 21, 5, 0, tzinfo=UTC
    )
    assert quiet_until(window, tz, datetime(2026, 11, 21, 14, 0, tzinfo=tz)) is None


def test_sms_in_quiet_hours_is_deferred_email_is_not() -> None:
    night = datetime(2026, 11, 21, 22, 0, tzinfo=UTC)  # 23:00 in Paris
    _, steps = run([event(at=night)], now=night)
    email, sms = steps[0].verdicts
    assert email.outcome is Outcome.SENT
    assert sms.outcome is Outcome.DEFERRED
    assert sms.send_at == datetime(2026, 11, 22, 7, 0, tzinfo=UTC)  # 08:00 Paris
    assert sms.reason.startswith("quiet hours 21:00-08:00 in Europe/Paris; deferred to 08:00")


def test_recipient_without_time_zone_uses_the_policy_default() -> None:
    """Without a zone of its own, a recipient's quiet hours go by its phone number's
    country or area where its zones lie within 3 h of each other (the window then holds
    in each); else by the policy's ``default_timezone``. (By the default alone, a +64
    number got its SMS at 04:49 local: a black-box run as the tracking backend.)"""
    night_utc = datetime(2026, 11, 21, 22, 0, tzinfo=UTC)
    paris = {"email": "ana@example.com", "phone": "+33612345678"}  # 23:00 in Paris
    _, steps = run([event(at=night_utc, recipient=paris)], now=night_utc)
    sms = steps[0].verdicts[1]
    assert sms.outcome is Outcome.DEFERRED and sms.details["timezone"] == "Europe/Paris"
    assert sms.send_at == datetime(2026, 11, 22, 7, 0, tzinfo=UTC)  # 08:00 in Paris
    assert "in Europe/Paris (the phone number's)" in sms.reason
    # New Zealand: Auckland (UTC+13 in November) and Chatham (+13:45): 04:00 and 04:45;
    # deferred until the window has ended in both, 08:00 in Auckland
    early = datetime(2026, 11, 21, 15, 0, tzinfo=UTC)
    kiwi = {"phone": "+64211234567"}
    _, steps = run([event(at=early, recipient=kiwi)], now=early)
    [sms] = [v for v in steps[0].verdicts if v.channel is ChannelKind.SMS]
    assert sms.outcome is Outcome.DEFERRED and sms.details["timezone"] == "Pacific/Auckland"
    assert sms.send_at == datetime(2026, 11, 21, 19, 0, tzinfo=UTC)
    # quiet in Chatham only (21:15; 20:30 in Auckland): not at Chatham's 08:00, which is
    # 07:15 in Auckland (a review), but when it is quiet in neither
    evening = datetime(2026, 11, 21, 7, 30, tzinfo=UTC)
    _, steps = run([event(at=evening, recipient=kiwi)], now=evening)
    [sms] = [v for v in steps[0].verdicts if v.channel is ChannelKind.SMS]
    assert sms.send_at == datetime(2026, 11, 21, 19, 0, tzinfo=UTC), sms
    assert sms.details["timezone"] == "Pacific/Auckland"
    # quiet in neither: sent at once
    day = datetime(2026, 11, 21, 22, 0, tzinfo=UTC)  # 11:00 in Auckland
    _, steps = run([event(at=day, recipient=kiwi)], now=day)
    [sms] = [v for v in steps[0].verdicts if v.channel is ChannelKind.SMS]
    assert sms.outcome is Outcome.SENT
    # the zones of the number's own country: +61 4… also lists Christmas Island and Cocos
    # (4.5 h apart from Sydney) and +7 70… (Kazakhstan) Russia's zones; both fell back to
    # UTC, and an SMS went at 03:43 in Sydney (a black-box run)
    for phone, zone, at, until in [
        ("+61412345678", "Australia/Sydney", datetime(2026, 12, 6, 16, 43, tzinfo=UTC), 22),
        ("+77012345678", "Asia/Almaty", datetime(2026, 12, 6, 16, 43, tzinfo=UTC), None),
    ]:
        _, steps = run([event(at=at, recipient={"phone": phone})], now=at)
        [sms] = [v for v in steps[0].verdicts if v.channel is ChannelKind.SMS]
        assert sms.outcome is Outcome.DEFERRED, (phone, sms)
        assert "(the phone number's)" in sms.reason, sms.reason
        if until is not None:  # 08:00 in Perth, the last of Australia's mornings
            assert sms.send_at == datetime(2026, 12, 7, 0, 0, tzinfo=UTC), sms
        assert zone in phone_zones(phone)
    # a number of zones far apart (a US toll-free one): the policy's default zone
    no_tz = {"email": "ana@example.com", "phone": "+18005550100"}
    _, steps = run([event(at=night_utc, recipient=no_tz)], now=night_utc)
    sms = steps[0].verdicts[1]
    assert sms.outcome is Outcome.DEFERRED and sms.details["timezone"] == "UTC"
    assert "phone number" not in sms.reason
    p = Policy.model_validate(
        {
            **policy().model_dump(),
            "quiet_hours": {
                "sms": {"start": "21:00", "end": "08:00"},
                "default_timezone": "America/Los_Angeles",
            },
        }
    )
    _, steps = run([event(at=night_utc, recipient=no_tz)], now=night_utc, p=p)
    assert steps[0].verdicts[1].outcome is Outcome.SENT  # 14:00 in Los Angeles


def test_statuses_may_break_quiet_hours_when_configured() -> None:
    night = datetime(2026, 11, 21, 22, 0, tzinfo=UTC)
    p = policy(exceptions={"lost": {"channels": ["email", "sms"], "break_quiet_hours": True}})
    _, steps = run([event(status="exception", exception_code="lost", at=night)], now=night, p=p)
    assert {v.outcome for v in steps[0].verdicts} == {Outcome.SENT}


# -- supersession ---------------------------------------------------------------------------------


def test_a_waiting_message_a_later_batch_overtakes_never_counts_against_a_cap() -> None:
    """An SMS deferred overnight and overtaken by a newer one before morning never goes out:
    it leaves the message log when overtaken, so after its due time it does not count as
    sent (it did, and a cap then refused a message the customer was owed)."""
    night = datetime(2026, 11, 21, 22, 0, tzinfo=UTC)  # 23:00 in Paris
    throttle = {**policy().throttle.model_dump(), "max_sms_per_shipment": 2}
    p = policy(throttle=throttle)
    state, steps = run([event(1, "out_for_delivery", night)], night, p)
    assert [v.outcome for v in steps[0].verdicts] == [Outcome.SENT, Outcome.DEFERRED]
    ofd_sms = next(m for m in state.messages if m.channel is SMS)
    later = night + timedelta(minutes=5)
    failed = event(2, "delivery_attempt_failed", later)
    state, steps = run([failed], later, p, state)
    assert [v.outcome for v in steps[0].verdicts] == [Outcome.SENT, Outcome.DEFERRED]
    [(gone, why)] = state.overtaken([ofd_sms], later)
    assert gone == ofd_sms and why.startswith("superseded by delivery_attempt_failed")
    assert [(m.event_id, m.channel) for m in state.messages] == [
        ("e1", EMAIL),
        ("e2", EMAIL),
        ("e2", SMS),
    ]
    next_day = night + timedelta(hours=14)  # the failed attempt's SMS went in the morning
    assert sum(m.channel is SMS for m in state.live_messages(next_day)) == 1
    state, steps = run([event(3, "out_for_delivery", next_day)], next_day, p, state)
    assert [v.outcome for v in steps[0].verdicts] == [Outcome.SENT, Outcome.SENT]
    # and the cap holds at two SMS that went out
    last = next_day + timedelta(hours=2)
    _, steps = run([event(4, "delivery_attempt_failed", last)], last, p, state)
    sms = next(v for v in steps[0].verdicts if v.channel is SMS)
    assert (sms.outcome, sms.rule) == (Outcome.SUPPRESSED, "sms_cap")
    assert sms.reason.startswith("cap: 2 SMS already sent")


@pytest.mark.parametrize("code", ["recipient_unavailable", "address_issue", "lost"])
def test_an_exception_overtakes_an_arrives_today_not_sent_yet(code: str) -> None:
    """An exception happens at the step the shipment had reached: while out for delivery,
    "the courier could not reach you" overtakes "your parcel arrives today" when both would
    go out together (one batch), and when "arrives today" still waits for the morning (a
    later batch). Before, an exception ranked as "in transit" and both went out."""
    morning = NOON - timedelta(hours=2)
    ofd, exc = (
        event(1, "out_for_delivery", morning),
        event(2, "exception", morning + timedelta(hours=1), exception_code=code),
    )
    _, steps = run([ofd, exc])
    assert [(v.channel, v.outcome, v.rule) for v in steps[0].verdicts] == [
        (EMAIL, Outcome.SUPPRESSED, "superseded"),
        (SMS, Outcome.SUPPRESSED, "superseded"),
    ]
    assert steps[0].verdicts[1].reason.startswith(f"superseded by exception:{code}")
    assert [v.outcome for v in steps[1].verdicts] == [Outcome.SENT, Outcome.SENT]
    # the SMS of "out for delivery" waits overnight, then the failure comes in
    night = datetime(2026, 11, 21, 22, 0, tzinfo=UTC)  # 23:00 in Paris
    state, steps = run([event(1, "out_for_delivery", night)], night)
    assert [v.outcome for v in steps[0].verdicts] == [Outcome.SENT, Outcome.DEFERRED]
    ofd_sms = next(m for m in state.messages if m.channel is SMS)
    later = night + timedelta(minutes=30)
    failure = event(2, "exception", later, exception_code=code)
    state, steps = run([failure], later, state=state)
    [(gone, why)] = state.overtaken([ofd_sms], later)
    assert gone == ofd_sms and why.startswith(f"superseded by exception:{code}")
    assert [(m.event_id, m.channel) for m in state.messages] == [
        ("e1", EMAIL),
        ("e2", EMAIL),
        ("e2", SMS),
    ]


def test_a_depot_scan_after_a_failure_does_not_overtake_its_message() -> None:
    """The courier could not reach the recipient at night; the parcel is scanned back at
    the depot before the SMS saying so could go out: the SMS still goes in the morning (a
    lesser scan never cancels a milestone). Before, both ranked as "in transit", and the
    depot scan cancelled it."""
    night = datetime(2026, 11, 21, 21, 0, tzinfo=UTC)  # 22:00 in Paris
    state, _ = run([event(1, "out_for_delivery", night - timedelta(hours=10))], night)
    failure = event(2, "exception", night, exception_code="recipient_unavailable")
    state, steps = run([failure], night, state=state)
    assert [v.outcome for v in steps[0].verdicts] == [Outcome.SENT, Outcome.DEFERRED]
    waiting = next(m for m in state.messages if m.event_id == "e2" and m.channel is SMS)
    later = night + timedelta(hours=1)
    state, _ = run([event(3, "departed_facility", later)], later, state=state)
    assert state.overtaken([waiting], later) == []
    assert waiting in state.live_messages(later)
    # a customs hold in transit is still overtaken by the parcel moving on (as before)
    held = event(4, "exception", night, exception_code="customs_hold", shipment_id="s2")
    state, _ = run([held], night, state=ShipmentState(merchant_id="acme", shipment_id="s2"))
    hold_sms = next(m for m in state.messages if m.channel is SMS)
    moved = event(5, "in_transit", later, shipment_id="s2")
    state, _ = run([moved], later, state=state)
    assert [m for m, _ in state.overtaken([hold_sms], later)] == [hold_sms]


def test_a_pickup_notice_past_its_deadline_is_not_sent() -> None:
    """ "Ready to collect by 11:30" at noon would send the customer to a counter that no
    longer holds the parcel: recorded as stale, not sent (it went out before); one whose
    deadline is still ahead goes."""
    point = {"name": "Tabac du Centre", "address": "1 rue de la Gare, Paris"}
    late = event(status="available_for_pickup", pickup_deadline=NOON - timedelta(minutes=30))
    late = late.model_copy(update={"pickup_point": None})
    state, steps = run([late])
    [verdict] = steps[0].verdicts
    assert (verdict.outcome, verdict.rule, verdict.channel) == (Outcome.SUPPRESSED, "stale", None)
    assert verdict.reason == "stale: its pickup deadline 2026-11-21T10:30:00+00:00 has passed"
    assert state.status is Status.AVAILABLE_FOR_PICKUP  # the shipment still moves on
    ahead = event(
        status="available_for_pickup",
        pickup_deadline=NOON + timedelta(days=5),
        pickup_point=point,
    )
    _, steps = run([ahead])
    assert [v.outcome for v in steps[0].verdicts] == [Outcome.SENT, Outcome.SENT]


def test_a_parcel_moved_to_another_pickup_point_or_due_sooner_is_news() -> None:
    """A pickup notice naming another point was a duplicate of the first: the customer was
    left with the wrong counter and deadline (found by a black-box run as the tracking
    backend). A re-scan, or a later deadline, is still a duplicate."""
    kiosk = {"name": "Kiosk am Markt", "address": "Markt 1, 04109 Leipzig"}
    station = {"name": "Packstation 142", "address": "Ring 5, 04109 Leipzig"}
    by = NOON + timedelta(days=5)

    def pickup(i: int, point: dict[str, str], deadline: datetime) -> Transition:
        at = NOON - timedelta(hours=8 - i)
        return event(i, "available_for_pickup", at, pickup_point=point, pickup_deadline=deadline)

    steps = singly(
        [
            pickup(1, kiosk, by),
            pickup(2, kiosk, by),  # a re-scan
            pickup(3, station, by + timedelta(days=4)),  # moved
            pickup(4, station, by + timedelta(days=4)),  # a re-scan
            pickup(5, station, by + timedelta(days=6)),  # later: the one told holds
            pickup(6, station, by + timedelta(days=6, minutes=-20)),  # minutes sooner
            pickup(7, station, by + timedelta(days=1)),  # sooner
        ]
    )
    rules = {s.transition.event_id: {v.rule for v in s.verdicts} for s in steps}
    assert told(steps) == ["e1", "e3", "e7"], rules
    assert rules["e2"] == rules["e4"] == rules["e5"] == rules["e6"] == {"duplicate"}, rules


def test_a_pickup_is_news_against_what_the_customer_was_told_not_the_last_scan() -> None:
    """A review found the comparison made with the last scan: deadlines flipping between
    two days later than the one told each made a notice, a point re-scanned in capitals
    made one, and a move after a scan without a point (or after a bookkeeping scan) was a
    duplicate."""
    kiosk = {"name": "Kiosk am Markt", "address": "Markt 1, 04109 Leipzig"}
    station = {"name": "Packstation 142", "address": "Ring 5, 04109 Leipzig"}
    shouted = {"name": "KIOSK AM  MARKT", "address": "markt 1, 04109 leipzig"}
    by = NOON + timedelta(days=5)

    def pickup(i: int, point: dict[str, str] | None, deadline: datetime | None) -> Transition:
        at = NOON - timedelta(hours=9 - i)
        kw: dict[str, Any] = {"pickup_deadline": deadline}
        if point is not None:
            kw["pickup_point"] = point
        return event(i, "available_for_pickup", at, **kw)

    steps = singly(
        [
            pickup(1, kiosk, by),  # told: the kiosk, by D
            pickup(2, kiosk, by + timedelta(days=2)),
            pickup(3, kiosk, by + timedelta(days=1)),  # sooner than the last scan, not D
            pickup(4, shouted, by + timedelta(days=2)),  # the same place in capitals
            pickup(5, None, None),  # a re-scan naming no point
            event(6, "in_transit", NOON - timedelta(hours=3)),  # bookkeeping: behind
            pickup(7, station, by),  # moved
        ]
    )
    rules = {s.transition.event_id: {v.rule for v in s.verdicts} for s in steps}
    assert told(steps) == ["e1", "e7"], rules
    assert rules["e2"] == rules["e3"] == rules["e4"] == rules["e5"] == {"duplicate"}, rules


def test_messages_are_remembered_to_the_second() -> None:
    """A message's time in the log is kept to the second (the caps and windows need no
    more; microseconds took a few bytes a message of every stored state)."""
    at = datetime(2026, 11, 21, 14, 0, 5, 987_654, tzinfo=UTC)
    state, steps = run([event(1, "out_for_delivery", at)], at)
    assert [v.outcome for v in steps[0].verdicts] == [Outcome.SENT, Outcome.SENT]
    assert {m.at for m in state.messages} == {at.replace(microsecond=0)}
    # and the duplicate rule still measures from it
    again = at + timedelta(minutes=30)
    _, steps = run([event(2, "out_for_delivery", again)], again, state=state)
    assert [(v.rule, v.details["hours_ago"]) for v in steps[0].verdicts] == [
        ("duplicate", 0.5),
        ("duplicate", 0.5),
    ]


def test_a_message_due_within_a_minute_is_left_to_the_due_sweep() -> None:
    """The sweep may be claiming it as the newer decision is made: cancelling it then
    could drop from the log a message that goes out."""
    before_morning = datetime(2026, 11, 22, 6, 59, 30, tzinfo=UTC)  # due at 07:00 UTC
    state, _ = run([event(1, "out_for_delivery", before_morning)], before_morning)
    [sms] = [m for m in state.messages if m.channel is SMS]
    assert sms.due == datetime(2026, 11, 22, 7, 0, tzinfo=UTC)
    later = before_morning + timedelta(seconds=5)
    state, _ = run([event(2, "delivered", later)], later, state=state)
    assert state.overtaken([sms], later) == []
    assert sms in state.messages
    earlier = sms.due - timedelta(minutes=1, seconds=1)
    assert state.overtaken([sms], earlier) != []


def test_a_message_no_longer_waiting_is_never_overtaken() -> None:
    """One whose due time came is the due sweep's (sent, or cancelled by it): a newer
    decision after that leaves it in the log."""
    night = datetime(2026, 11, 21, 22, 0, tzinfo=UTC)
    state, _ = run([event(1, "out_for_delivery", night)], night)
    morning = datetime(2026, 11, 22, 7, 30, tzinfo=UTC)
    state, _ = run([event(2, "delivered", morning)], morning, state=state)
    assert state.overtaken(state.messages, morning) == []
    assert [(m.event_id, m.channel) for m in state.messages] == [
        ("e1", EMAIL),
        ("e1", SMS),
        ("e2", EMAIL),
        ("e2", SMS),
    ]


def test_updates_in_one_batch_collapse_to_the_latest() -> None:
    ofd, delivered = event(1), event(2, "delivered", NOON + timedelta(minutes=20))
    state, steps = run([ofd, delivered], now=NOON + timedelta(minutes=30))
    assert [v.outcome for v in steps[0].verdicts] == [Outcome.SUPPRESSED] * 2
    reason = steps[0].verdicts[0].reason
    assert reason.startswith("superseded by delivered (") and reason.endswith(
        "which came in before it went out"
    )
    assert [v.outcome for v in steps[1].verdicts] == [Outcome.SENT] * 2
    assert state.messages_since(NOON, NOON) == 2  # the superseded ones are not counted
    assert state.notices[SMS].event_id == "e2"


def test_coalescing_defers_every_message() -> None:
    p = policy(coalesce_seconds=120)
    _, steps = run([event()], p=p)
    assert {v.outcome for v in steps[0].verdicts} == {Outcome.DEFERRED}
    assert {v.send_at for v in steps[0].verdicts} == {NOON + timedelta(seconds=120)}


# -- out of order ---------------------------------------------------------------------------------


def test_late_event_never_steps_backwards() -> None:
    state, _ = run([event(1, "delivered", NOON)])
    _, steps = run([event(2, "in_transit", NOON - timedelta(hours=5))], state=state)
    [v] = steps[0].verdicts
    assert v.outcome is Outcome.SUPPRESSED and v.reason.startswith("out of order")
    assert "would step back; the shipment is delivered since" in v.reason
    # a newer scan short of it is not "a step back" in time: the reason says what it is
    # (found by a black-box run: a damage reported after the delivery read as stepping back)
    after = event(3, "exception", NOON + timedelta(hours=1), exception_code="damaged")
    [v] = run([after], now=NOON + timedelta(hours=2), state=state)[1][0].verdicts
    assert v.reason == (
        "out of order: exception:damaged at 2026-11-21T12:00:00+00:00 comes after the "
        "shipment was delivered (2026-11-21T11:00:00+00:00), and nothing short of that is "
        "news after it"
    )
    # a re-scan of the delivery between two later scans is behind a later scan, not short
    # of delivered: it steps back in time
    state, _ = run([event(4, "in_transit", NOON + timedelta(minutes=30))], state=state)
    rescan = event(5, "delivered", NOON + timedelta(minutes=15))
    [v] = run([rescan], now=NOON + timedelta(hours=1), state=state)[1][0].verdicts
    assert "would step back; the shipment is delivered since" in v.reason, v.reason


def test_a_late_recipient_still_gets_the_current_milestone_once() -> None:
    """The only event carrying the recipient arrives after later ones: the current
    milestone goes out once the address is known, on the channels it now reaches."""
    state, first = run([event(1, "out_for_delivery", NOON, recipient=None)])
    assert {v.reason for v in first[0].verdicts} == {
        "no email address known for the recipient",
        "no sms address known for the recipient",
    }
    late = event(2, "picked_up", NOON - timedelta(hours=20))
    later = NOON + timedelta(minutes=5)
    state, steps = run([late], now=later, state=state)
    assert steps[0].verdicts[0].reason.startswith("out of order")
    caught = steps[1]
    assert caught.transition.event_id == "e1" and caught.caught_up_by == "e2"
    assert caught.transition.status is Status.OUT_FOR_DELIVERY
    assert {(v.channel, v.outcome) for v in caught.verdicts} == {
        (EMAIL, Outcome.SENT),
        (SMS, Outcome.SENT),
    }
    assert all("the address arrived late, with e2" in v.reason for v in caught.verdicts)
    # never twice: another late event with the same recipient catches nothing up
    again = event(3, "info_received", NOON - timedelta(hours=30))
    _, steps = run([again], now=later + timedelta(minutes=1), state=state)
    assert len(steps) == 1 and steps[0].verdicts[0].reason.startswith("out of order")


def test_a_late_address_for_one_channel_catches_up_only_that_channel() -> None:
    email_only = {"email": "ana@example.com", "timezone": "Europe/Paris"}
    state, first = run([event(1, "out_for_delivery", NOON, recipient=email_only)])
    assert [v.outcome for v in first[0].verdicts] == [Outcome.SENT, Outcome.SUPPRESSED]
    late = event(2, "picked_up", NOON - timedelta(hours=20))  # brings the phone
    state, steps = run([late], now=NOON + timedelta(minutes=5), state=state)
    [sms] = steps[1].verdicts
    assert sms.channel is SMS and sms.outcome is Outcome.SENT
    # and a delivered after it is news as usual, not blocked by the catch-up
    _, steps = run(
        [event(3, "delivered", NOON + timedelta(hours=2))],
        now=NOON + timedelta(hours=2),
        state=state,
    )
    assert {v.outcome for v in steps[0].verdicts} == {Outcome.SENT}


def test_nothing_before_delivered_is_news_after_it() -> None:
    state, _ = run([event(1, "delivered", NOON)])
    later = NOON + timedelta(hours=1)
    _, steps = run([event(2, "out_for_delivery", later)], now=later, state=state)
    assert steps[0].verdicts[0].reason.startswith("out of order")


def test_a_delivered_after_a_pickup_point_is_the_customer_collecting_it() -> None:
    at = [NOON + timedelta(hours=h) for h in range(4)]
    pickup = event(1, "available_for_pickup", at[0])
    _, steps = run([pickup, event(2, "delivered", at[1])], now=at[1])
    assert [s.collected for s in steps] == [False, True]
    # held at the pickup point (an exception there), then collected
    held = event(2, "exception", at[1], exception_code="held_at_facility")
    state, steps = run([pickup, held, event(3, "delivered", at[2])], now=at[2])
    assert [s.collected for s in steps] == [False, False, True]
    assert state.collected  # (what a message caught up later reads)
    # across batches: the pickup point is in the state the delivered meets
    state, _ = run([pickup], now=at[0])
    _, steps = run([event(2, "delivered", at[1])], now=at[1], state=state)
    assert steps[0].collected
    # a door delivery, and one sent on its way again after the pickup point, are not
    _, steps = run([event(1, "out_for_delivery", at[0]), event(2, "delivered", at[1])], now=at[1])
    assert [s.collected for s in steps] == [False, False]
    again = event(2, "out_for_delivery", at[1])
    _, steps = run([pickup, again, event(3, "delivered", at[2])], now=at[2])
    assert [s.collected for s in steps] == [False, False, False]
    # ... also when an exception on the way to the door comes between
    late = event(3, "exception", at[2], exception_code="delayed")
    state, steps = run([pickup, again, late, event(4, "delivered", at[3])], now=at[3])
    assert [s.collected for s in steps] == [False] * 4 and not state.collected


def test_collected_does_not_depend_on_the_order_scans_arrive_in() -> None:
    """A scan between the pickup notice and the delivered changes nothing; a pickup notice
    that arrives after its delivered still makes it collected (README: the same events in
    any arrival order send the same messages); a door scan after the pickup notice makes
    it a door delivery."""
    at = [NOON - timedelta(hours=h) for h in (6, 5, 4, 3)]
    pickup = event(1, "available_for_pickup", at[0])
    moved = event(2, "in_transit", at[1])
    door = event(3, "out_for_delivery", at[2])
    done = event(4, "delivered", at[3])
    state, steps = run([pickup, moved, done])
    assert state.collected and steps[-1].collected
    for order in ([done, pickup], [done, moved, pickup], [moved, done, pickup]):
        state, _ = run(order)
        assert state.collected, order
    # (a door scan is kept only once a pickup is known: one that arrived before a pickup
    # notice that happened earlier is not; the state stays small for every other parcel)
    for order in ([pickup, door, done], [pickup, done, door], [done, pickup, door]):
        state, _ = run(order)
        assert not state.collected, order


def test_a_delivered_after_returned_to_sender_is_not_told_to_the_customer() -> None:
    """The return reaching the sender, most likely: "your parcel was delivered" would send
    a customer told it is going back looking for it."""
    back = event(1, "returned_to_sender", NOON - timedelta(hours=5))
    home = event(2, "delivered", NOON - timedelta(hours=1))
    state, steps = run([back, home])
    [v] = steps[1].verdicts
    assert (v.outcome, v.rule) == (Outcome.SUPPRESSED, "returned")
    assert v.reason.startswith("returned: a delivered after returned_to_sender")
    # it moves nothing, so the return's own messages stand (in one batch, and waiting)
    assert state.status == "returned_to_sender"
    assert {(x.channel, x.outcome) for x in steps[0].verdicts} == {
        (EMAIL, Outcome.SENT),
        (SMS, Outcome.SENT),
    }
    night = datetime(2026, 11, 21, 22, 30, tzinfo=UTC)  # 23:30 in Paris: the SMS waits
    state, steps = run([event(1, "returned_to_sender", night)], now=night)
    assert {x.outcome for x in steps[0].verdicts} == {Outcome.SENT, Outcome.DEFERRED}
    later = night + timedelta(minutes=20)
    after, _ = run([event(2, "delivered", later)], now=later, state=state)
    assert list(after.overtaken(state.messages, later)) == []


def test_a_return_that_happened_before_a_delivered_of_its_batch_comes_first() -> None:
    """A batch [delivered, returned_to_sender] whose return happened first (a backend that
    posts a backlog out of order) is the return and then the parcel reaching the sender,
    as in two batches in the order they happened: the customer is told of the return,
    not "your parcel was delivered" (found by a black-box review). A return that
    happened after the delivered keeps its place, as before."""
    out = event(1, "out_for_delivery", NOON - timedelta(hours=8))
    back = event(2, "returned_to_sender", NOON - timedelta(hours=5))
    home = event(3, "delivered", NOON - timedelta(hours=1))
    for batch in ([out, home, back], [home, back, out], [home, out, back]):
        state, steps = run(batch)
        assert state.status == "returned_to_sender", batch
        said = {s.transition.event_id: s.verdicts for s in steps}
        assert {(v.channel, v.outcome) for v in said[back.event_id]} == {
            (EMAIL, Outcome.SENT),
            (SMS, Outcome.SENT),
        }, batch
        assert {v.rule for v in said[home.event_id]} == {"returned"}, batch
    late = event(2, "returned_to_sender", NOON - timedelta(minutes=30))
    _, steps = run([out, home, late])
    assert [s.transition.event_id for s in steps] == [out.event_id, home.event_id, late.event_id]


def test_an_event_from_long_ago_is_recorded_not_sent() -> None:
    """An import of old shipments, a backlog replayed years later: not news, and its date
    (no year) reads as upcoming. Within the limit it is sent; a stall notice of the
    service's own (dated from the last scan) is never stale for it."""
    old = event(1, "delivered", datetime(2024, 1, 1, 9, 0, tzinfo=UTC))
    _, steps = run([old])
    [v] = steps[0].verdicts
    assert (v.outcome, v.rule) == (Outcome.SUPPRESSED, "old")
    assert v.reason.startswith("old: delivered happened ") and "(limit 168 h)" in v.reason
    week = event(1, "delivered", NOON - timedelta(hours=167))
    assert {v.outcome for v in run([week])[1][0].verdicts} == {Outcome.SENT}
    p = policy(stale_after_hours=72)
    assert {v.rule for v in run([week], p=p)[1][0].verdicts} == {"old"}
    # just past the limit reads as past it, not as "168 h ago (limit 168 h)"
    [v] = run([event(1, "delivered", NOON - timedelta(hours=168.1))])[1][0].verdicts
    assert v.reason == "old: delivered happened 168.1 h ago (limit 168 h)"
    [v] = run([event(1, "delivered", NOON - timedelta(hours=168.04))])[1][0].verdicts
    assert v.reason == "old: delivered happened 168.1 h ago (limit 168 h)"  # (rounded up)
    # a stall notice must still be news when it comes
    with pytest.raises(ValueError, match=r"stalled\.no_scan_hours \(72\) must not pass"):
        policy(stale_after_hours=48)
    stalled = event(1, "exception", NOON - timedelta(hours=200), exception_code="delayed")
    stalled = stalled.model_copy(update={"event_id": "stalled:1:s1"})
    assert {v.outcome for v in run([stalled])[1][0].verdicts} == {Outcome.SENT}


def singly(events: list[Transition], p: Policy | None = None) -> list[Any]:
    """Each event folded in a batch of its own (posted one at a time), the state carried."""
    state, steps = None, []
    for e in events:
        state, more = run([e], p=p, state=state)
        steps += more
    return steps


def told(steps: list[Any]) -> list[str]:
    """The events that send something, in order."""
    return [
        s.transition.event_id
        for s in steps
        if any(v.outcome in (Outcome.SENT, Outcome.DEFERRED) for v in s.verdicts)
    ]


@pytest.mark.parametrize("posted", ["singly", "one batch"])
def test_a_stale_terminal_scan_arriving_first_silences_nothing(posted: str) -> None:
    """A "delivered" ten days old (a carrier's bogus scan, a backlog) arriving first is too
    old to tell; the customer never heard of it, so it must not hold back the newer news as
    "out of order": the outcome does not depend on the order the scans arrive in."""
    stale = event(1, "delivered", NOON - timedelta(hours=240))
    ofd = event(2, "out_for_delivery", NOON - timedelta(hours=3))
    damaged = event(3, "exception", NOON - timedelta(hours=1), exception_code="damaged")
    steps = singly([stale, ofd, damaged]) if posted == "singly" else run([stale, ofd, damaged])[1]
    assert {v.rule for v in steps[0].verdicts} == {"old"}
    assert "e3" in told(steps)
    assert not any(v.rule == "out_of_order" for s in steps for v in s.verdicts)
    # the same scans in the order they happened tell the customer the same
    assert told(singly([stale, ofd, damaged])) == told(singly([ofd, stale, damaged]))
    final, _ = run([damaged], state=run([stale, ofd])[0])
    assert (final.status, final.exception_code, final.current_old) == (
        "exception",
        "damaged",
        False,
    )


def test_a_stale_scan_after_the_news_outvotes_none_of_it() -> None:
    """A "delivered" of ten days ago arriving after today's "out for delivery" is recorded
    out of order and moves nothing: the delivery today is still told, and a failed attempt is
    not "behind" a delivery that the customer never heard of."""
    ofd = event(1, "out_for_delivery", NOON - timedelta(hours=3))
    stale = event(2, "delivered", NOON - timedelta(hours=240))
    failed = event(3, "delivery_attempt_failed", NOON - timedelta(hours=1))
    state, _ = run([ofd])
    state, more = run([stale], state=state)
    [v] = more[0].verdicts
    # out of order, as any late scan: it counts for no journey and fires no merchant webhook
    assert (v.outcome, v.rule) == (Outcome.SUPPRESSED, "out_of_order")
    assert "at 2026-11-11T11:00:00+00:00 is too old to tell, 240 h ago (limit 168 h)" in v.reason
    assert (state.status, state.current_event, state.max_rank) == ("out_for_delivery", "e1", 3)
    state, more = run([failed], state=state)
    assert told(more) == ["e3"]
    assert state.status == "delivery_attempt_failed"


def test_a_stale_scan_never_overwrites_a_status_the_customer_was_told() -> None:
    """An old scan newer than the last one the customer was told of moves nothing either
    (found by a review): it used to take the status, and the next news then outvoted it as
    if nothing came before: "in transit" sent to a customer told "delivered", a stall
    notice after it, or a failed attempt forgotten, depending on what came in when."""
    t0 = NOON - timedelta(hours=200)
    for told, stale, today, rule in (
        ("delivered", "delivered", "in_transit", "out_of_order"),
        ("out_for_delivery", "delivery_attempt_failed", "in_transit", "behind"),
    ):
        state, _ = run([event(1, told, t0)], now=t0 + timedelta(hours=1))
        late = event(2, stale, t0 + timedelta(minutes=10))
        fresh = event(3, today, NOON - timedelta(hours=1))
        for order in ([late, fresh], [fresh, late], [fresh]):
            after = state
            for e in order:
                after, steps = run([e], state=after)
                assert {v.rule for v in steps[0].verdicts} == (
                    {rule} if e is fresh else {"out_of_order"}
                ), (told, [x.event_id for x in order], e.event_id)
            assert not after.current_old and after.max_rank == STATUS_RANK[Status(told)]


@pytest.mark.parametrize("posted", ["singly", "one batch"])
def test_a_return_too_old_to_tell_never_makes_an_arrives_today_after_the_delivery(
    posted: str,
) -> None:
    """A "returned to sender" of 200 h ago, today's "delivered" an hour ago and today's
    "out for delivery" two hours ago (found by a black-box run): the delivered after the
    return is the return reaching the sender, as after any return; the out-for-delivery
    posted after it took the old return's place and told "arrives today" an hour after
    the delivery. News outvotes an old status only when it is newer than every scan
    known; in any order and batching, no "arrives today" follows a known delivery."""
    ret = event(1, "returned_to_sender", NOON - timedelta(hours=200))
    ofd = event(2, "out_for_delivery", NOON - timedelta(hours=2))
    delivered = event(3, "delivered", NOON - timedelta(hours=1))
    for order in itertools.permutations([ret, ofd, delivered]):
        if posted == "singly":
            steps = singly(list(order))
            if order.index(delivered) < order.index(ofd):
                assert "e2" not in told(steps), [e.event_id for e in order]
        else:
            steps = run(list(order))[1]
            assert "e2" not in told(steps), [e.event_id for e in order]
        if posted == "singly" and order.index(ret) == 2:
            # the old return last: what today's scans alone tell (in one batch the return
            # is folded before the delivered it happened before, as in time order)
            assert told(steps) == told(singly([e for e in order if e is not ret]))
    # the old return first and the scans in the order they happened: both told
    assert told(singly([ret, ofd, delivered])) == ["e2", "e3"]
    # a delivered straight after an old return is the return reaching the sender
    [v] = run([delivered], state=run([ret])[0])[1][0].verdicts
    assert v.rule == "returned"


def test_news_older_than_a_stale_status_does_not_outvote_it() -> None:
    """With the limit raised between two decisions (168 h, then 720 h), an "in transit" of
    300 h ago is news under the new limit but older than the "delivered" recorded as old
    under the first: it is out of order, as it always was, not a step back to tell."""
    state, _ = run([event(1, "delivered", NOON - timedelta(hours=200))])
    state, steps = run(
        [event(2, "in_transit", NOON - timedelta(hours=300))],
        p=policy(stale_after_hours=720),
        state=state,
    )
    assert {v.rule for v in steps[0].verdicts} == {"out_of_order"}
    assert state.status == "delivered"


def test_a_history_too_old_to_tell_keeps_its_own_order() -> None:
    """Among scans all too old to tell (an import), the never-step-back rules hold as
    ever: the state is the history's latest word, and one fresh event after it is news."""
    at = NOON - timedelta(hours=300)
    history = [
        event(1, "picked_up", at),
        event(2, "delivered", at + timedelta(hours=40)),
        event(3, "in_transit", at + timedelta(hours=41)),  # bookkeeping after delivered
        event(4, "out_for_delivery", at + timedelta(hours=30)),  # uploaded late
    ]
    state, steps = run(history)
    assert told(steps) == []
    assert (state.status, state.current_event, state.current_old) == ("delivered", "e2", True)
    # a stale scan outvotes no stale terminal status either: only news does
    state, steps = run([event(5, "in_transit", NOON - timedelta(hours=2))], state=state)
    assert told(steps) == ["e5"] and state.status == "in_transit" and state.max_rank == 2
    assert not state.current_old


def test_a_stale_first_scan_read_back_from_the_store_still_yields() -> None:
    """The flag lives in the stored state: a worker reading it back decides the same."""
    state, _ = run([event(1, "delivered", NOON - timedelta(hours=240))])
    back = ShipmentState.model_validate_json(state_json(state))
    assert back.current_old
    _, steps = run([event(2, "out_for_delivery", NOON - timedelta(hours=2))], state=back)
    assert told(steps) == ["e2"]


def test_a_window_over_before_the_last_scan_does_not_stall_it() -> None:
    """ "Out for delivery" after its carrier window ended is news, not a delay to announce a
    minute later (found by a black-box review); a window still ahead at the last scan
    counts, as before."""
    statuses = frozenset({Status.OUT_FOR_DELIVERY})
    window = {"start": NOON - timedelta(hours=9), "end": NOON - timedelta(hours=5)}
    state, _ = run(
        [event(1, "out_for_delivery", NOON - timedelta(minutes=3), estimated_delivery=window)]
    )
    deadline = state.stall_deadline(statuses, timedelta(hours=72), timedelta(hours=2))
    assert deadline == NOON - timedelta(minutes=3) + timedelta(hours=72)
    # another scan after the window (a late parcel still moving): the window still counts
    state, _ = run([event(1, "in_transit", NOON - timedelta(minutes=3), estimated_delivery=window)])
    deadline = state.stall_deadline(
        frozenset({Status.IN_TRANSIT}), timedelta(hours=72), timedelta(hours=2)
    )
    assert deadline == NOON - timedelta(hours=3)
    ahead = {"start": NOON, "end": NOON + timedelta(hours=4)}
    state, _ = run(
        [event(1, "out_for_delivery", NOON - timedelta(minutes=3), estimated_delivery=ahead)]
    )
    deadline = state.stall_deadline(statuses, timedelta(hours=72), timedelta(hours=2))
    assert deadline == NOON + timedelta(hours=6)


def test_a_collected_parcel_caught_up_by_a_late_address_still_reads_as_collected() -> None:
    """The delivered email decided later, when a late scan brings the email address, is
    the collected one too."""
    at = [NOON + timedelta(hours=h) for h in range(3)]
    phone_only = {"phone": "+33612345678", "timezone": "Europe/Paris"}
    pickup = event(1, "available_for_pickup", at[0], recipient=phone_only)
    state, _ = run([pickup, event(2, "delivered", at[1], recipient=phone_only)], now=at[1])
    scan = event(3, "in_transit", at[0] - timedelta(hours=5))
    _, steps = run([scan], now=at[2], state=state)
    [caught] = [s for s in steps if s.caught_up_by == "e3"]
    assert caught.transition.status == "delivered" and caught.collected
    assert [(v.channel, v.outcome) for v in caught.verdicts] == [(EMAIL, Outcome.SENT)]


def test_late_event_still_teaches_facts() -> None:
    state, _ = run([event(1, "delivered", NOON, tracking_url="https://t.example/1")])
    state, _ = run(
        [event(2, "in_transit", NOON - timedelta(hours=5), order={"number": "42"})], state=state
    )
    assert state.status == "delivered" and state.order is not None and state.order.number == "42"


# -- anomalies ----------------------------------------------------------------------------------


def test_event_from_the_future_is_flagged_and_changes_nothing() -> None:
    state, steps = run([event(1, "delivered", NOON + timedelta(hours=2))])
    [v] = steps[0].verdicts
    assert v.outcome is Outcome.FLAGGED
    assert v.reason == "anomaly: occurred_at is 120 min in the future (limit 30 min)"
    assert state.status is None and state.has_seen("e1")


def test_event_far_before_the_known_timeline_is_flagged() -> None:
    state, _ = run([event(1, "picked_up", NOON)])
    _, steps = run([event(2, "in_transit", NOON - timedelta(days=40))], state=state)
    assert steps[0].verdicts[0].outcome is Outcome.FLAGGED
    assert steps[0].verdicts[0].details["hours_early"] == 960.0


def test_impossible_jump_between_located_scans_is_flagged() -> None:
    leipzig = {"city": "Leipzig", "country": "DE", "lat": 51.34, "lon": 12.37}
    sydney = {"city": "Sydney", "country": "AU", "lat": -33.87, "lon": 151.21}
    berlin = {"city": "Berlin", "country": "DE", "lat": 52.52, "lon": 13.40}
    state, _ = run([event(1, "in_transit", NOON - timedelta(hours=3), location=leipzig)])
    _, steps = run(
        [event(2, "in_transit", NOON - timedelta(hours=2), location=sydney)], state=state
    )
    assert steps[0].verdicts[0].outcome is Outcome.FLAGGED
    assert "km/h" in steps[0].verdicts[0].reason
    # Leipzig -> Berlin (150 km) in an hour is a plausible truck
    _, steps = run(
        [event(3, "in_transit", NOON - timedelta(hours=2), location=berlin)], state=state
    )
    assert steps[0].verdicts[0].outcome is not Outcome.FLAGGED


def test_arrives_today_never_goes_out_a_day_late() -> None:
    """An "out for delivery" says the parcel arrives today: not on a later day in the
    recipient's zone more than 18 h after the scan (it went out deferred to the next
    morning, or at once for a scan a day old)."""
    night = datetime(2026, 11, 21, 22, 0, tzinfo=UTC)  # 23:00 in Paris: SMS quiet hours
    early = event(1, "out_for_delivery", datetime(2026, 11, 21, 0, 0, tzinfo=UTC))
    _, steps = run([early], now=night)
    email, sms = steps[0].verdicts
    assert email.outcome is Outcome.SENT  # 23:00, the same day
    assert sms.outcome is Outcome.SUPPRESSED and sms.rule == "stale"
    assert sms.reason == (
        'stale: out for delivery on 2026-11-21 ("arrives today"), and it would go out on '
        "2026-11-22 in Europe/Paris, 31 h later"
    )
    # a scan of the afternoon or evening (the parcel loaded for the morning round) still
    # waits for 08:00: 15:00 in Paris is 17 h before
    for hours in (0.3, 8):
        evening = event(2, "out_for_delivery", night - timedelta(hours=hours))
        _, steps = run([evening], now=night)
        assert [v.outcome for v in steps[0].verdicts] == [Outcome.SENT, Outcome.DEFERRED]
    # a scan of yesterday morning, come in late: neither
    _, steps = run([early], now=night + timedelta(hours=12))
    assert [v.rule for v in steps[0].verdicts] == ["stale", "stale"]
    # other milestones are not bound to a day
    _, steps = run([event(3, "delivered", early.occurred_at)], now=night + timedelta(hours=12))
    assert Outcome.SENT in [v.outcome for v in steps[0].verdicts]


PARIS = {"city": "Paris", "country": "FR", "lat": 48.85, "lon": 2.35}
SYDNEY = {"city": "Sydney", "country": "AU", "lat": -33.87, "lon": 151.21}


def test_a_wrong_first_location_is_outvoted_by_the_scans_after_it() -> None:
    """A first scan placed at the other end of the world (a mis-geocoded label scan) was
    the point every later scan was measured from: each was flagged, and "delivered" never
    went out. The second scan is flagged; a third close to it shows the first was wrong."""
    state, steps = run([event(1, "picked_up", NOON - timedelta(hours=4), location=SYDNEY)])
    assert state.last_fix is not None and state.last_fix.lon == 151.21
    state, steps = run(
        [event(2, "out_for_delivery", NOON - timedelta(hours=2), location=PARIS)], state=state
    )
    assert steps[0].verdicts[0].outcome is Outcome.FLAGGED
    assert state.suspect_fix is not None and state.suspect_fix.lat == 48.85
    near = {**PARIS, "lat": 48.86}
    state, steps = run([event(3, "delivered", NOON, location=near)], state=state)
    assert [v.outcome for v in steps[0].verdicts] == [Outcome.SENT, Outcome.SENT]
    assert state.last_fix is not None and state.last_fix.lat == 48.86
    # the displaced first fix is the suspect now; a next scan close to the new one clears it
    assert state.suspect_fix is not None and state.suspect_fix.lon == 151.21
    assert ShipmentState.model_validate_json(state_json(state)) == state  # (kept in Redis)
    state, steps = run([event(4, "delivered", NOON, location=PARIS)], state=state)
    assert state.suspect_fix is None


def test_two_scans_at_one_wrong_place_do_not_win_for_good() -> None:
    """A facility geocoded to the other end of the world scans twice (arrival, departure):
    the second vouches for the first and moves the last fix there, but the real scans
    after it are not flagged (the displaced fix is the suspect then)."""
    leipzig = {"city": "Leipzig", "country": "DE", "lat": 51.34, "lon": 12.37}
    berlin = {"city": "Berlin", "country": "DE", "lat": 52.52, "lon": 13.40}
    state = ShipmentState(merchant_id="acme", shipment_id="s1")
    steps = []
    for e in (  # one batch each, as they come in
        event(1, "picked_up", NOON - timedelta(hours=8), location=leipzig),
        event(2, "arrived_at_facility", NOON - timedelta(hours=6), location=SYDNEY),
        event(3, "departed_facility", NOON - timedelta(hours=5), location=SYDNEY),
        event(4, "out_for_delivery", NOON - timedelta(hours=2), location=berlin),
        event(5, "delivered", NOON - timedelta(hours=1), location=berlin),
    ):
        state, more = run([e], state=state)
        steps += more
    flagged = [s.transition.event_id for s in steps if s.verdicts[0].outcome is Outcome.FLAGGED]
    assert flagged == ["e2"]
    sent = {s.transition.event_id for s in steps for v in s.verdicts if v.outcome is Outcome.SENT}
    assert {"e4", "e5"} <= sent
    assert state.last_fix is not None and state.last_fix.lat == 52.52


def test_a_late_scan_far_away_vouches_for_nothing() -> None:
    """A scan older than the last fix, flagged, is no suspect: a later jump is still one
    (more than 20 h apart, any two points are "reachable")."""
    new_york = {"city": "New York", "country": "US", "lat": 40.71, "lon": -74.01}
    state, _ = run([event(1, "in_transit", NOON - timedelta(hours=4), location=PARIS)])
    state, steps = run(
        [event(2, "in_transit", NOON - timedelta(hours=19), location=SYDNEY)], state=state
    )
    assert state.suspect_fix is None
    _, steps = run(
        [event(3, "out_for_delivery", NOON - timedelta(hours=1), location=new_york)], state=state
    )
    assert steps[0].verdicts[0].outcome is Outcome.FLAGGED


def test_a_nowhere_fix_kept_before_is_no_anchor() -> None:
    """States kept before (0, 0) was read as no location may hold it as their last fix."""
    state = run([event(1, "picked_up", NOON - timedelta(hours=2), location=PARIS)])[0]
    state = state.model_copy(
        update={"last_fix": Fix(lat=0.0, lon=0.0, at=NOON - timedelta(hours=2))}
    )
    _, steps = run([event(2, "out_for_delivery", NOON, location=PARIS)], state=state)
    assert steps[0].verdicts[0].outcome is Outcome.SENT


def test_a_wrong_scan_between_right_ones_flags_itself_only() -> None:
    leipzig = {"city": "Leipzig", "country": "DE", "lat": 51.34, "lon": 12.37}
    berlin = {"city": "Berlin", "country": "DE", "lat": 52.52, "lon": 13.40}
    state, _ = run([event(1, "in_transit", NOON - timedelta(hours=3), location=leipzig)])
    state, steps = run(
        [event(2, "in_transit", NOON - timedelta(hours=2), location=SYDNEY)], state=state
    )
    assert steps[0].verdicts[0].outcome is Outcome.FLAGGED
    state, steps = run(
        [event(3, "out_for_delivery", NOON - timedelta(hours=1), location=berlin)], state=state
    )
    assert steps[0].verdicts[0].outcome is Outcome.SENT
    assert state.last_fix is not None and state.last_fix.lat == 52.52


def test_zero_zero_is_no_location() -> None:
    """(0, 0) is a geocoder's "unknown", not a scan in the Gulf of Guinea."""
    nowhere = {"city": "Paris", "country": "FR", "lat": 0.0, "lon": 0.0}
    state, _ = run([event(1, "picked_up", NOON - timedelta(hours=2), location=nowhere)])
    assert state.last_fix is None
    _, steps = run([event(2, "out_for_delivery", NOON, location=PARIS)], state=state)
    assert steps[0].verdicts[0].outcome is Outcome.SENT


def test_a_flagged_event_keeps_the_recipient_it_brings() -> None:
    """A first event flagged (a carrier clock ahead) was the only one carrying the
    recipient, which DESIGN §3 lets later events leave out: every message after it was
    suppressed for want of an address."""
    ahead = event(1, "picked_up", NOON + timedelta(hours=2), order={"number": "42"})
    state, steps = run([ahead])
    assert steps[0].verdicts[0].outcome is Outcome.FLAGGED
    assert state.status is None  # it moves nothing
    assert state.recipient is not None and state.order is not None
    later = event(2, "out_for_delivery", NOON + timedelta(minutes=5), recipient=None)
    _, steps = run([later], now=NOON + timedelta(minutes=5), state=state)
    assert [v.outcome for v in steps[0].verdicts] == [Outcome.SENT, Outcome.SENT]
    # what is known already wins over a flagged event's
    known = run([event(3, "picked_up", NOON - timedelta(hours=1))])[0]
    other = event(4, "picked_up", NOON + timedelta(hours=2), recipient={"email": "x@example.com"})
    state, _ = run([other], state=known)
    assert state.recipient is not None and state.recipient.email == "ana@example.com"


# -- opt-outs and addresses ---------------------------------------------------------------------


def test_opted_out_channel_is_never_used() -> None:
    _, steps = run([event()], opted=(opt_out_key(SMS, "+33612345678"),))
    assert [(v.channel, v.outcome) for v in steps[0].verdicts] == [
        (EMAIL, Outcome.SENT),
        (SMS, Outcome.SUPPRESSED),
    ]
    assert steps[0].verdicts[1].reason == "recipient opted out of sms"


def test_email_opt_out_ignores_case() -> None:
    _, steps = run(
        [event(recipient={"email": "Ana@Example.com"})],
        opted=(opt_out_key(EMAIL, "ana@example.COM"),),
    )
    assert steps[0].verdicts[0].outcome is Outcome.SUPPRESSED


def test_decide_is_pure() -> None:
    state = ShipmentState(merchant_id="acme", shipment_id="s1")
    t = event()
    first = decide(policy(), state, t, NOON)
    assert decide(policy(), state, t, NOON) == first
    assert state == ShipmentState(merchant_id="acme", shipment_id="s1")


# -- realistic sequences (each expectation written by hand) --------------------------------------

H = timedelta(hours=1)


def sent(steps: list[Any]) -> list[tuple[str, str]]:
    return [
        (s.transition.milestone, str(v.channel))
        for s in steps
        for v in s.verdicts
        if v.outcome in (Outcome.SENT, Outcome.DEFERRED)
    ]


def test_a_lesser_scan_never_cancels_a_milestone_in_the_same_batch() -> None:
    batch = [
        event(1, "in_transit", NOON - 20 * H),
        event(2, "in_transit", NOON - 16 * H),
        event(3, "available_for_pickup", NOON - 10 * H),
        event(4, "in_transit", NOON),
    ]
    _, steps = run(batch, now=NOON + H)
    assert sent(steps) == [("available_for_pickup", "email"), ("available_for_pickup", "sms")]
    assert steps[3].verdicts[0].reason.startswith("behind: in_transit after the shipment")


def test_out_for_delivery_again_on_day_two_is_news() -> None:
    state = None
    got = []
    for i, (status, at) in enumerate(
        [
            ("out_for_delivery", NOON),
            ("delivery_attempt_failed", NOON + 3 * H),
            ("out_for_delivery", NOON + 24 * H),
            ("delivery_attempt_failed", NOON + 27 * H),
        ]
    ):
        state, steps = run([event(i, status, at)], now=at + H / 60, state=state)
        got += sent(steps)
    assert got == [
        (s, c)
        for s in ("out_for_delivery", "delivery_attempt_failed") * 2
        for c in ("email", "sms")
    ]


def test_failed_attempt_at_night_then_out_again_at_dawn() -> None:
    """The night's failed-attempt SMS waits; by 08:00 the parcel is out again: only that goes."""
    evening = datetime(2026, 3, 10, 20, 30, tzinfo=UTC)  # 21:30 in Paris
    dawn = datetime(2026, 3, 11, 6, 30, tzinfo=UTC)  # 07:30 in Paris
    state, steps = run([event(1, "delivery_attempt_failed", evening)], now=evening)
    assert [v.outcome for v in steps[0].verdicts] == [Outcome.SENT, Outcome.DEFERRED]
    state, steps = run([event(2, "out_for_delivery", dawn)], now=dawn, state=state)
    assert [v.outcome for v in steps[0].verdicts] == [Outcome.SENT, Outcome.DEFERRED]
    rank = STATUS_RANK
    failed_sms = state.superseded(
        SMS, "e1", "delivery_attempt_failed", rank[Status.DELIVERY_ATTEMPT_FAILED]
    )
    assert failed_sms is not None and failed_sms.startswith("superseded by out_for_delivery")
    assert state.superseded(SMS, "e2", "out_for_delivery", rank[Status.OUT_FOR_DELIVERY]) is None


def test_a_scan_uploaded_late_is_stale_even_if_further_than_the_current_status() -> None:
    t0 = NOON - 6 * H
    state, _ = run([event(1, "delivery_attempt_failed", t0 + 2 * H)], now=t0 + 2 * H)
    state, _ = run([event(2, "in_transit", t0 + 4 * H)], now=t0 + 4 * H, state=state)
    state, steps = run([event(3, "out_for_delivery", t0)], now=NOON, state=state)  # from 08:55
    assert steps[0].verdicts[0].reason.startswith("out of order")
    assert state.status == "in_transit"  # not rewound to the morning


def test_trivial_updates_are_throttled_not_deduplicated() -> None:
    state, steps = run([event(1, "in_transit")])
    day2 = NOON + 25 * H
    _, steps = run([event(2, "in_transit", day2)], now=day2, state=state)
    assert sent(steps) == [("in_transit", "email")]


def test_an_exception_is_news_even_after_further_steps() -> None:
    state, _ = run([event(1, "out_for_delivery")])
    later = NOON + H
    _, steps = run(
        [event(2, "exception", later, exception_code="address_issue")], now=later, state=state
    )
    assert sent(steps) == [("exception:address_issue", "email"), ("exception:address_issue", "sms")]


# -- the policy schema ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("yaml_text", "problem"),
    [
        ("statuses: {delivered: {channels: [sms, sms]}}", "statuses.delivered.channels"),
        ("stalled: {statuses: [in_transit, delivered]}", "cannot stall"),
        ("quiet_hours: {sms: {start: 300, end: 0}}", "must be HH:MM"),
        ("quiet_hours: {sms: {start: '25:00', end: '08:00'}}", "must be HH:MM"),
        ("quiet_hours: {sms: {start: '21:00', end: '21:00'}}", "start and end are equal"),
        ("quiet_hours: {default_timezone: Mars/Olympus}", "not an IANA zone"),
        ("dedupe_window_hours: 9000", "dedupe_window_hours"),
        ("surprise: 1", "surprise"),
    ],
)
def test_policy_files_are_refused_with_file_path_and_problem(
    tmp_path: Path, yaml_text: str, problem: str
) -> None:
    shutil.copytree(data_dir("policies", None), tmp_path / "p")
    (tmp_path / "p" / "acme.yaml").write_text(yaml_text + "\n")
    [message] = PolicyStore(tmp_path / "p").check_all()
    assert "acme.yaml" in message and problem in message


def test_unquoted_clock_times_read_as_times(tmp_path: Path) -> None:
    shutil.copytree(data_dir("policies", None), tmp_path / "p")
    (tmp_path / "p" / "acme.yaml").write_text("quiet_hours: {sms: {start: 21:30, end: 7:00}}\n")
    window = PolicyStore(tmp_path / "p").for_merchant("acme").quiet_hours.sms
    assert window is not None
    assert (window.start.hour, window.start.minute, window.end.hour) == (21, 30, 7)


def test_edits_reach_a_running_store_and_a_broken_edit_keeps_the_last_good(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    shutil.copytree(data_dir("policies", None), tmp_path / "p")
    path = tmp_path / "p" / "acme.yaml"
    store = PolicyStore(tmp_path / "p")
    assert store.for_merchant("acme").coalesce_seconds == 0
    path.write_text("coalesce_seconds: 60\n")
    os.utime(path, (1, 1))
    assert store.for_merchant("acme").coalesce_seconds == 60
    path.write_text("coalesce_seconds: -5\n")
    os.utime(path, (2, 2))
    assert store.for_merchant("acme").coalesce_seconds == 60  # last good, error logged
    (tmp_path / "p" / "globex.yaml").write_text("coalesce_seconds: 30\nquiet_hours: nope\n")
    # never valid: the defaults, not a refusal (its messages go on), and the error logged
    with caplog.at_level(logging.ERROR, logger="notifier.policy.rules"):
        assert store.for_merchant("globex") == store.for_merchant("")
    assert "globex.yaml: quiet_hours" in caplog.text
    assert "the default policy is used for merchant globex" in caplog.text
    # broken defaults are the one thing that still refuses
    store.default_path().write_text("coalesce_seconds: -1\n")
    with pytest.raises(ConfigurationError, match=r"default\.yaml"):
        store.for_merchant("")


def test_a_late_address_does_not_send_old_news() -> None:
    """A day-old "out for delivery" caught up would say "arrives today" a day late: it is
    recorded as not caught up, and nothing goes out."""
    state, _ = run([event(1, "out_for_delivery", NOON, recipient=None)])
    later = NOON + timedelta(hours=30)
    state, steps = run([event(2, "picked_up", NOON - timedelta(hours=20))], now=later, state=state)
    caught = steps[1]
    assert {v.outcome for v in caught.verdicts} == {Outcome.SUPPRESSED}
    assert all("not caught up" in v.reason and "30 h old" in v.reason for v in caught.verdicts)
    assert not [m for m in state.messages if m.event_id == "e1"]


def test_a_caught_up_pickup_keeps_its_deadline_and_point_until_the_deadline() -> None:
    point = {"name": "Kiosk am Markt", "address": "Marktplatz 3, Leipzig"}
    ready = event(
        1,
        "available_for_pickup",
        NOON,
        recipient=None,
        pickup_deadline=NOON + timedelta(hours=10),
        pickup_point=point,
    )
    state, _ = run([ready])
    late = event(2, "picked_up", NOON - timedelta(hours=20))
    _, steps = run([late], now=NOON + timedelta(hours=2), state=state)
    current = steps[1].transition
    assert current.pickup_deadline == NOON + timedelta(hours=10)
    assert current.pickup_point is not None and current.pickup_point.name == "Kiosk am Markt"
    assert {v.outcome for v in steps[1].verdicts} == {Outcome.SENT}
    _, steps = run([late], now=NOON + timedelta(hours=11), state=state)
    assert all("pickup deadline" in v.reason for v in steps[1].verdicts)
    assert {v.outcome for v in steps[1].verdicts} == {Outcome.SUPPRESSED}


def test_a_caught_up_milestone_overtaken_in_the_same_batch_is_superseded() -> None:
    state, _ = run([event(1, "out_for_delivery", NOON, recipient=None)])
    later = NOON + timedelta(minutes=30)
    batch = [event(2, "picked_up", NOON - timedelta(hours=20)), event(3, "delivered", later)]
    _, steps = run(batch, now=later, state=state)
    caught = next(s for s in steps if s.caught_up_by == "e2")
    assert {v.outcome for v in caught.verdicts} == {Outcome.SUPPRESSED}
    assert all("came in before it went out" in v.reason for v in caught.verdicts)
    assert {v.outcome for v in steps[-1].verdicts} == {Outcome.SENT}


def test_replayed_late_events_recover_each_message_once() -> None:
    """Two redelivered entries of one shipment (a worker died after committing) name the
    caught-up messages once: twice, the second claim came back busy and its entry stayed
    unacknowledged."""
    from notifier.pipeline import Pipeline

    state, _ = run([event(1, "out_for_delivery", NOON, recipient=None)])
    lates = [event(i, "picked_up", NOON - timedelta(hours=20 + i)) for i in (2, 3)]
    state, _ = run(lates, now=NOON + timedelta(minutes=5), state=state)
    from notifier.outbound.directory import Subscriptions

    pipeline = Pipeline.__new__(Pipeline)  # _fold is pure: no resources
    pipeline._models = {}
    pipeline.hooks = Subscriptions(None)  # type: ignore[arg-type] # no endpoints: no events
    folded = pipeline._fold(
        ("acme", "s1"),
        3,
        state,
        [("1-0", lates[0]), ("2-0", lates[1])],
        NOON + timedelta(minutes=6),
        {},
        {"acme": policy()},
    )
    assert len(folded.recover) == len(set(folded.recover)) == 6  # e2, e3 and e1, each channel


# -- what became of a waiting message (store.shipments.settled_log) --------------------------


def waited_overnight(p: Policy | None = None) -> tuple[ShipmentState, datetime]:
    """An out-for-delivery email sent at night, its SMS waiting for the morning; and when."""
    night = datetime(2026, 11, 21, 22, 0, tzinfo=UTC)  # 23:00 in Paris
    state, steps = run([event(1, "out_for_delivery", night)], night, p)
    assert [v.outcome for v in steps[0].verdicts] == [Outcome.SENT, Outcome.DEFERRED]
    return state, datetime(2026, 11, 22, 7, 30, tzinfo=UTC)


def sms_fields(state: ShipmentState, **fields: str) -> dict[str, dict[str, str]]:
    """An outcome list's fields of the shipment's SMS of e1."""
    return {notification_id_of("acme", "s1", "e1", "sms"): fields}


def test_a_waiting_message_cancelled_once_claimed_counts_no_more_but_is_still_decided() -> None:
    """Cancelled by the due sweep (the recipient opted out meanwhile): no cap counts it; the
    duplicate rule still sees it as the last message decided on its channel, as before."""
    state, morning = waited_overnight()
    settled = settled_log(state, sms_fields(state, st="cancelled", attempts="1"), morning)
    [sms] = [m for m in settled.messages if m.channel is SMS]
    assert (sms.cancelled, sms.due) == (True, None)
    assert [m.channel for m in settled.live_messages(morning)] == [EMAIL]
    assert not settled.waited(morning)
    # a repeat of the milestone on day two is a duplicate of the cancelled one, as it was
    again = morning + timedelta(hours=2)
    _, steps = run([event(2, "out_for_delivery", again)], again, state=settled)
    assert [(v.channel, v.rule) for v in steps[0].verdicts] == [
        (EMAIL, "duplicate"),
        (SMS, "duplicate"),
    ]
    # and says what became of each: the email went, the SMS never did
    email, sms_reason = (v.reason for v in steps[0].verdicts)
    assert email.startswith("duplicate: out_for_delivery already sent by email 11.5 h ago")
    assert sms_reason.startswith(
        "duplicate: out_for_delivery already decided (and cancelled while it waited) by sms "
    )


def test_a_repeat_of_a_message_that_still_waits_says_so() -> None:
    """A re-scan while the SMS waits for the morning: a duplicate of a message decided, not
    one "already sent"."""
    state, _ = waited_overnight()
    again = datetime(2026, 11, 21, 23, 0, tzinfo=UTC)
    _, steps = run([event(2, "out_for_delivery", again)], again, state=state)
    [email, sms] = steps[0].verdicts
    assert (email.rule, sms.rule) == ("duplicate", "duplicate")
    assert email.reason.startswith("duplicate: out_for_delivery already sent by email 1.0 h ago")
    assert sms.reason == (
        "duplicate: out_for_delivery already decided (waiting until 2026-11-22 07:00 UTC)"
        " by sms 1.0 h ago (window 168 h)"
    )


def test_a_waiting_message_sent_or_perhaps_sent_counts_as_sent() -> None:
    """Sent; or cancelled after a second claim, which a worker that lost its claim may have
    sent first; or still not on the list a day after its time (failed for good, or trimmed):
    each counts, as it always did, and is no longer looked up."""
    state, morning = waited_overnight()
    for fields, by in (
        ({"st": "sent", "attempts": "1"}, morning),
        ({"st": "cancelled", "attempts": "2"}, morning),
        ({}, morning + timedelta(days=1, minutes=1)),
    ):
        settled = settled_log(state, sms_fields(state, **fields), by)
        [sms] = [m for m in settled.messages if m.channel is SMS]
        assert (sms.cancelled, sms.due) == (False, None), fields
        assert [m.channel for m in settled.live_messages(by)] == [EMAIL, SMS]
    # not settled yet, within the day: it waits still, and counts
    assert settled_log(state, {}, morning) is state
    # before its time nothing is looked up
    assert settled_log(state, sms_fields(state, st="cancelled"), morning.replace(hour=6)) is state


def test_a_cancelled_message_ages_out_without_counting_as_an_sms_sent() -> None:
    """The lifetime SMS cap counts the SMS that age out of the log: never a cancelled one."""
    state, morning = waited_overnight()
    settled = settled_log(state, sms_fields(state, st="cancelled", attempts="1"), morning)
    month = morning + timedelta(days=32)
    later, _ = run([event(2, "delivered", month)], month, state=settled)
    assert later.sms_archived == 0
    kept, _ = run([event(2, "delivered", month)], month, state=state)  # had it gone out
    assert kept.sms_archived == 1


@pytest.mark.parametrize(
    ("first", "then"),
    [
        (("exception", "recipient_unavailable"), ("delivery_attempt_failed", None)),
        (("delivery_attempt_failed", None), ("exception", "recipient_unavailable")),
    ],
    ids=["exception-first", "status-first"],
)
def test_a_failed_attempt_told_as_a_status_and_an_exception_is_one_piece_of_news(
    first: tuple[str, str | None], then: tuple[str, str | None]
) -> None:
    """A carrier that reports a failed attempt both as the status and as its exception
    "recipient unavailable", a minute apart, got both told, by email and SMS each (a
    black-box run as the tracking backend). The second is a duplicate of the first."""
    at = NOON - timedelta(hours=1)

    def attempt(i: int, kind: tuple[str, str | None], when: datetime) -> Transition:
        status, code = kind
        return event(i, status, when, **({"exception_code": code} if code else {}))

    state, steps = run([attempt(1, first, at)], now=at)
    assert {v.outcome for v in steps[0].verdicts} == {Outcome.SENT}
    later = at + timedelta(minutes=1)
    state, steps = run([attempt(2, then, later)], now=later, state=state)
    assert [v.rule for v in steps[0].verdicts] == ["duplicate", "duplicate"]
    told = steps[0].verdicts[0].reason
    assert ", the same news as " in told and "already sent by email" in told, told
    # a second attempt on another day, after the parcel went out again, is news again
    out = later + timedelta(hours=20)
    state, _ = run([event(3, "out_for_delivery", out)], now=out, state=state)
    again = out + timedelta(hours=3)
    _, steps = run([attempt(4, then, again)], now=again, state=state)
    assert {v.outcome for v in steps[0].verdicts} == {Outcome.SENT}, steps[0].verdicts
