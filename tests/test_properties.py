"""Order independence and never-twice, as properties (hypothesis) and under concurrent workers.

The property, stated exactly: for a shipment whose status never goes back over
time (re-scans, repeated event ids and exceptions along the way allowed), the
same set of events in any arrival order and any batching, decided within the
coalescing window, sends the same messages: one per channel for the latest
state, never a duplicate. (A carrier that reports a step back in time, such as
"out for delivery" then "in transit", can make arrival order matter; with
coalescing off, an update that arrives later is a new message by design.)
"""

from __future__ import annotations

import asyncio
import itertools
import random
import shutil
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from notifier.models import STATUS_RANK, ChannelKind, Outcome, Transition
from notifier.pipeline import Pipeline
from notifier.policy import Policy, PolicyStore, fold
from notifier.resources import data_dir, open_resources
from notifier.settings import Settings
from notifier.state import ShipmentState
from notifier.store import Admission, InboxEntry, body_digest
from notifier.worker import release_due
from tests.conftest import fixed_clock, make_settings

NOW = datetime(2026, 11, 21, 14, 0, tzinfo=UTC)
HOLD = 600
START = NOW - timedelta(hours=10)

#: A journey in order; any increasing subsequence of it never steps back.
JOURNEY: list[tuple[str, str | None]] = [
    ("info_received", None),
    ("picked_up", None),
    ("in_transit", None),
    ("arrived_at_facility", None),
    ("exception", "customs_hold"),
    ("departed_facility", None),
    ("in_transit", None),
    ("exception", "weather_delay"),
    ("out_for_delivery", None),
    ("delivery_attempt_failed", None),
    ("out_for_delivery", None),
    ("available_for_pickup", None),
    ("delivered", None),
]


def make_event(shipment: str, n: int, step: int, rescan: int = 0) -> dict[str, Any]:
    status, code = JOURNEY[step]
    body: dict[str, Any] = {
        "event_id": f"{shipment}-e{n}-r{rescan}",
        "merchant_id": "prop",
        "shipment_id": shipment,
        "tracking_number": "1Z",
        "carrier": "ups",
        "status": status,
        "occurred_at": (START + timedelta(minutes=30 * n + rescan)).isoformat(),
        "recipient": {
            "email": "ana@example.com",
            "phone": "+33612345678",
            "timezone": "Europe/Paris",
        },
    }
    if code:
        body["exception_code"] = code
    return body


@st.composite
def journeys(draw: st.DrawFn) -> list[dict[str, Any]]:
    """A monotone journey with re-scans (new ids) and repeated deliveries of one event id."""
    steps = sorted(draw(st.sets(st.integers(0, len(JOURNEY) - 1), min_size=1, max_size=7)))
    events = [make_event("S", n, step) for n, step in enumerate(steps)]
    for i in draw(st.lists(st.integers(0, len(steps) - 1), max_size=3)):
        events.append(make_event("S", i, steps[i], rescan=1))  # carrier re-scan, new id
    for i in draw(st.lists(st.integers(0, len(events) - 1), max_size=2)):
        events.append(dict(events[i]))  # the same event delivered twice
    return events


@st.composite
def arrivals(draw: st.DrawFn) -> tuple[list[dict[str, Any]], list[list[dict[str, Any]]]]:
    """A journey, and the same events shuffled and cut into batches."""
    events = draw(journeys())
    shuffled = draw(st.permutations(events))
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(shuffled) - 1)), max_size=4)))
    batches = [shuffled[a:b] for a, b in zip([0, *cuts], [*cuts, len(shuffled)], strict=True)]
    return events, [b for b in batches if b]


def prop_policy() -> Policy:
    base = PolicyStore(data_dir("policies", None)).for_merchant("")
    return Policy.model_validate({**base.model_dump(), "coalesce_seconds": HOLD})


def model(policy: Policy, batches: list[list[dict[str, Any]]]) -> list[tuple[str, str]]:
    """What goes out: fold every batch at NOW, then release at NOW + HOLD."""
    state = ShipmentState(merchant_id="prop", shipment_id="S")
    created: list[tuple[Transition, ChannelKind]] = []
    for batch in batches:
        state, steps = fold(policy, state, [Transition.model_validate(e) for e in batch], NOW)
        for step in steps:
            created += [
                (step.transition, v.channel)
                for v in step.verdicts
                if v.outcome in (Outcome.SENT, Outcome.DEFERRED) and v.channel
            ]
    ids = [(t.event_id, c) for t, c in created]
    assert len(ids) == len(set(ids)), "a notification was decided twice"
    sent = [
        (t.milestone, str(c))
        for t, c in created
        if state.superseded(c, t.event_id, t.milestone, STATUS_RANK[t.status]) is None
    ]
    return sorted(sent)


@settings(max_examples=400, deadline=None)
@given(arrivals())
def test_any_order_and_batching_sends_the_same_messages(case: Any) -> None:
    events, batches = case
    policy = prop_policy()
    expected = model(policy, [sorted(set_of(events), key=lambda e: e["occurred_at"])])
    got = model(policy, batches)
    assert got == expected
    assert all(n == 1 for n in Counter(got).values()), "a message would go out twice"
    assert len({c for _, c in got}) == len(got), "more than one message on a channel"


@st.composite
def with_stale_scans(
    draw: st.DrawFn,
) -> tuple[list[dict[str, Any]], list[list[dict[str, Any]]]]:
    """A journey, plus scans of any step (a "delivered" too) dated too long ago to tell
    (a carrier's bogus date, a backlog replayed), all shuffled and cut into batches. (Not
    a return: a delivered after a return, however old, is the return reaching the sender,
    by design; ``test_engine.py`` holds what an old return may do.)"""
    events = draw(journeys())
    stale = []
    for k, (step, hours) in enumerate(
        draw(
            st.lists(
                st.tuples(st.integers(0, len(JOURNEY) - 1), st.integers(169, 5000)), max_size=3
            )
        )
    ):
        scan = make_event("S", 100 + k, step)
        scan["occurred_at"] = (NOW - timedelta(hours=hours)).isoformat()
        stale.append(scan)
    shuffled = draw(st.permutations(events + stale))
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(shuffled) - 1)), max_size=4)))
    batches = [shuffled[a:b] for a, b in zip([0, *cuts], [*cuts, len(shuffled)], strict=True)]
    return events, [b for b in batches if b]


@settings(max_examples=400, deadline=None)
@given(with_stale_scans())
def test_scans_too_old_to_tell_change_nothing_the_customer_is_told(case: Any) -> None:
    """A scan older than ``stale_after_hours`` is recorded, never told; arriving first, last
    or in between, in any batch, it must not hold back or stand in for the news (a stale
    "delivered" arriving first used to silence every newer scan as "out of order")."""
    events, batches = case
    policy = prop_policy()
    expected = model(policy, [sorted(set_of(events), key=lambda e: e["occurred_at"])])
    assert model(policy, batches) == expected


def set_of(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The distinct events (a repeated event id is one event)."""
    return list({e["event_id"]: e for e in events}.values())


# -- the same through the real pipeline, Redis and the release cron ----------------------------


@pytest.fixture
def prop_settings(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Settings:
    root = tmp_path_factory.mktemp("prop")
    policies = root / "policies"
    shutil.copytree(data_dir("policies", None), policies)
    (policies / "prop.yaml").write_text(f"coalesce_seconds: {HOLD}\n")
    return make_settings(root, redis_url=redis_url, policies_dir=policies, partitions=1)


async def push(
    settings: Settings, shipment: str, batches: list[list[dict[str, Any]]], concurrent: bool = False
) -> None:
    """Ingest every event, then process the batches (in order, or all at once)."""
    async with open_resources(settings, clock=fixed_clock(NOW)) as res:
        await res.store.ensure_groups()
        renamed = [
            [
                {**e, "shipment_id": shipment, "event_id": f"{shipment}/{e['event_id']}"}
                for e in batch
            ]
            for batch in batches
        ]
        items = [
            (
                e["merchant_id"],
                e["shipment_id"],
                e["event_id"],
                Transition.model_validate(e).model_dump_json(exclude_none=True).encode(),
                body_digest(e),
                "",
            )
            for batch in renamed
            for e in batch
        ]
        accepted, _ = await res.store.ingest(items)
        entries = await res.store.read_inbox(0, "prop", 10_000)
        assert len(entries) == accepted.count(Admission.ACCEPTED)
        by_event = {Transition.model_validate_json(e.payload).event_id: e for e in entries}
        groups: list[list[InboxEntry]] = []
        for batch in renamed:
            group = [by_event.pop(e["event_id"]) for e in batch if e["event_id"] in by_event]
            if group:
                groups.append(group)
        if concurrent:
            await asyncio.gather(*(Pipeline(res).process(g) for g in groups))
        else:
            for g in groups:
                await Pipeline(res).process(g)
        await res.store.ack(0, [e.entry_id for g in groups for e in g])
    async with open_resources(settings, clock=fixed_clock(NOW + timedelta(seconds=HOLD))) as res:
        await release_due({"res": res, "pipeline": Pipeline(res)})


async def sent_messages(settings: Settings, shipment: str) -> list[tuple[str, str]]:
    async with open_resources(settings) as res:
        decisions = await res.store.history("prop", shipment)
        ids = [d["notification_id"] for d in decisions if d.get("notification_id")]
        ledger = await res.store.deliveries("prop", shipment, ids)
    out = []
    for d in decisions:
        nid = d.get("notification_id")
        if nid and ledger[nid].get("status") == "sent":
            code = d.get("exception_code")
            out.append((f"{d['status']}:{code}" if code else d["status"], d["channel"]))
    return sorted(out)


_SHIPMENTS = itertools.count()


def files_for(settings: Settings, shipment: str) -> list[Path]:
    folder = settings.outbox_dir / "prop" / shipment
    return sorted(folder.glob("*")) if folder.is_dir() else []


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(case=arrivals())
async def test_pipeline_agrees_with_the_model(prop_settings: Settings, case: Any) -> None:
    events, batches = case
    shipment = f"p{next(_SHIPMENTS)}"  # hypothesis reseeds random: a counter never repeats
    await push(prop_settings, shipment, batches)
    expected = model(prop_policy(), [sorted(set_of(events), key=lambda e: e["occurred_at"])])
    assert await sent_messages(prop_settings, shipment) == expected
    assert len(files_for(prop_settings, shipment)) == len(expected)


async def test_concurrent_workers_on_one_shipment_many_times(prop_settings: Settings) -> None:
    rng = random.Random(20261121)
    policy = prop_policy()
    for round_no in range(40):
        steps = sorted(rng.sample(range(len(JOURNEY)), rng.randint(2, 8)))
        events = [make_event("S", n, s) for n, s in enumerate(steps)]
        events += [make_event("S", n, steps[n], rescan=1) for n in range(0, len(steps), 3)]
        rng.shuffle(events)
        cuts = sorted(rng.sample(range(1, len(events)), min(3, len(events) - 1)))
        batches = [events[a:b] for a, b in zip([0, *cuts], [*cuts, len(events)], strict=True)]
        shipment = f"race{round_no}"
        await push(prop_settings, shipment, batches, concurrent=True)  # 4 pipelines at once
        expected = model(policy, [sorted(events, key=lambda e: e["occurred_at"])])
        assert await sent_messages(prop_settings, shipment) == expected, f"round {round_no}"
        assert len(files_for(prop_settings, shipment)) == len(expected)


async def test_concurrent_burst_workers_over_many_shipments(tmp_path: Path, redis_url: str) -> None:
    from aiohttp.test_utils import TestClient, TestServer

    from notifier.app import create_app
    from tests.conftest import auth, outbox_files, run_worker, transition

    settings = make_settings(tmp_path, redis_url=redis_url, partitions=8)
    items = []
    for s in range(60):
        for i, status in enumerate(("picked_up", "out_for_delivery", "delivered")):
            items.append(
                transition(
                    event_id=f"{s}-{i}",
                    shipment_id=f"m{s}",
                    status=status,
                    occurred_at=f"2026-11-21T{8 + i:02d}:00:00+01:00",
                )
            )
    random.Random(7).shuffle(items)
    async with TestClient(TestServer(create_app(settings))) as client:
        for k in range(0, len(items), 45):
            resp = await client.post(
                "/v1/transitions", json={"transitions": items[k : k + 45]}, headers=auth()
            )
            assert resp.status == 202
    await asyncio.gather(*(run_worker(settings) for _ in range(4)))
    files = outbox_files(settings)
    names = [f.name.split("-", 1)[1] for f in files]
    assert len(names) == len(set(names)), "a notification was written twice"
    per_shipment = Counter(f.parent.name for f in files)
    assert set(per_shipment) == {f"m{s}" for s in range(60)}
