"""Horizontal scale: 2 `notifier serve` and 3 `notifier worker` processes on one Redis deliver
every expected message exactly once.

A seeded generator makes a few hundred shipment journeys (a few thousand transitions: transit
scans, re-scans, exceptions, failed attempts, pickups, returns, scans uploaded late). Several
client threads post them to both APIs in random order, as single transitions and as batches,
with about 5 % exact duplicate posts that must be answered as duplicates. Three worker
processes drain the inbox. The expected messages are computed by ``expected_messages`` below,
a few lines written from the README's cadence rules that import nothing of the policy engine
or the pipeline, and compared with the files in the outbox: the same multiset.

One constraint on the order: messages of one shipment decided in the same drain batch collapse
to the latest (README rule 9, "scans uploaded together"), so which messages go out would
depend on how the workers happened to batch the inbox. The transitions are therefore posted
in rounds: a round holds at most one transition per shipment (shuffled across shipments,
APIs, threads, singles and batches), and the next round starts once the workers drained the
inbox. Each shipment's transitions still arrive out of their occurrence order where the
generator swapped them (a scan the carrier uploaded late), which the oracle follows.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import threading
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis

from notifier.models import notification_id_of
from notifier.resources import data_dir
from notifier.store import keys, record
from tests.conftest import (
    API_KEYS,
    Cluster,
    auth,
    flush_cluster,
    free_port,
    healthy,
    outcome_records,
    spawn_notifier,
    wait_until,
)

SEED = 15
SHIPMENTS = 250
PARTITIONS = 8
DUPLICATE_SHARE = 0.05
CLIENT_THREADS = 4
MERCHANT = "acme"
CHANNELS = ("email", "sms")

# Every status and exception code by email and SMS, nothing trivial, no quiet hours, no
# caps that a journey can reach, no stalled-shipment notices: what is left of the cadence
# rules is out-of-order, behind, and the dedupe of a repeated milestone.
ALL_CHANNELS = "{channels: [email, sms], trivial: false}"
POLICY = (
    "statuses:\n"
    + "".join(
        f"  {status}: {ALL_CHANNELS}\n"
        for status in (
            "info_received",
            "picked_up",
            "in_transit",
            "arrived_at_facility",
            "departed_facility",
            "out_for_delivery",
            "delivery_attempt_failed",
            "available_for_pickup",
            "delivered",
            "returned_to_sender",
            "exception",
        )
    )
    + "quiet_hours: {sms: null, email: null}\n"
    "throttle: {trivial_interval_hours: 0, max_per_shipment_per_day: 1000,"
    " max_sms_per_shipment: 1000}\n"
    "coalesce_seconds: 0\n"
    "stalled: {enabled: false}\n"
)


# -- the oracle: the README's cadence rules for this policy, written down independently ------

#: How far along each status is (DESIGN §2 read as a journey; the README's "furthest step").
RANK = {
    "info_received": 0,
    "picked_up": 1,
    "in_transit": 2,
    "arrived_at_facility": 2,
    "departed_facility": 2,
    "exception": 2,
    "out_for_delivery": 3,
    "delivery_attempt_failed": 3,
    "available_for_pickup": 4,
    "delivered": 5,
    "returned_to_sender": 5,
}
FINAL = {"delivered", "returned_to_sender"}


@dataclass(frozen=True)
class Event:
    event_id: str
    shipment_id: str
    status: str
    code: str | None
    at: datetime

    @property
    def milestone(self) -> str:
        return f"exception:{self.code}" if self.code else self.status


def expected_messages(arrivals: list[Event]) -> list[tuple[Event, str]]:
    """(event, channel) of every message one shipment's events, in arrival order, send.

    Rule 2: a scan older than the latest one and not beyond the furthest step reached, or
    anything short of delivered/returned after it, is out of order: not sent, and it moves
    nothing (but it is the latest scan if it is). A newer status short of the furthest
    step moves the shipment but is not news, unless it is an exception. Rule 5: a milestone
    that repeats the one a channel last carried is not sent again.
    """
    status: str | None = None
    latest_scan: datetime | None = None
    furthest = -1
    last_sent: dict[str, str] = {}
    out: list[tuple[Event, str]] = []
    for e in arrivals:
        rank = RANK[e.status]
        late = status is not None and (
            (status in FINAL and rank < RANK[status])
            or (latest_scan is not None and e.at < latest_scan and rank <= furthest)
        )
        latest_scan = e.at if latest_scan is None else max(latest_scan, e.at)
        if late:
            continue
        behind = e.status != "exception" and rank < furthest
        status, furthest = e.status, max(furthest, rank)
        if behind:
            continue
        for channel in CHANNELS:
            if last_sent.get(channel) != e.milestone:
                out.append((e, channel))
                last_sent[channel] = e.milestone
    return out


# -- the journeys ---------------------------------------------------------------------------

TRANSIT_EXCEPTIONS = ["delayed", "weather_delay", "customs_hold", "held_at_facility", "damaged"]


def journey(rng: random.Random) -> list[tuple[str, str | None]]:
    """A realistic sequence of (status, exception code), in the order things happened."""
    steps: list[tuple[str, str | None]] = [("info_received", None), ("picked_up", None)]
    for _ in range(rng.randint(1, 3)):
        steps += [("in_transit", None), ("arrived_at_facility", None)]
        if rng.random() < 0.12:
            code = rng.choice(TRANSIT_EXCEPTIONS)
            steps += [("exception", code)] * rng.choice((1, 1, 2))  # 2: re-scanned
        steps.append(("departed_facility", None))
    ending = rng.choices(
        ["delivered", "failed", "pickup", "unavailable", "returned", "lost", "underway"],
        weights=[45, 14, 10, 5, 7, 3, 16],
    )[0]
    if ending == "underway":
        return steps[: rng.randint(1, len(steps))]
    if ending == "lost":
        return [*steps, ("exception", "lost")]
    steps.append(("out_for_delivery", None))
    if ending == "failed":  # back at the depot (behind), out again the next day
        steps += [("delivery_attempt_failed", None), ("in_transit", None)]
        steps += [("out_for_delivery", None), ("delivered", None)]
    elif ending == "pickup":
        steps += [("delivery_attempt_failed", None), ("available_for_pickup", None)]
        steps += [("delivered", None)] if rng.random() < 0.7 else []
    elif ending == "unavailable":  # an exception after the furthest step is still news
        steps += [("exception", "recipient_unavailable"), ("out_for_delivery", None)]
        steps.append(("delivered", None))
    elif ending == "returned":
        steps += [("exception", rng.choice(["address_issue", "refused"]))]
        steps.append(("returned_to_sender", None))
    else:
        steps += [("out_for_delivery", None)] * rng.choice((1, 1, 1, 2))  # re-scanned
        steps.append(("delivered", None))
    return steps


def shipment_events(rng: random.Random, n: int, now: datetime) -> list[Event]:
    """One shipment's events in arrival order: occurrence order with some neighbours
    swapped (the later one arrives first, the other is a scan uploaded late)."""
    shipment = f"shp_{n:04d}"
    steps = journey(rng)
    # within the last 17 h: an "out for delivery" more than 18 h old, on an earlier day in
    # the recipient's zone, is not sent ("arrives today" a day late: rule 8), which this
    # oracle leaves out (it depends on the hour the test runs at)
    start = now - timedelta(hours=rng.uniform(16.5, 17))
    times = sorted(start + timedelta(minutes=rng.uniform(0, 16 * 60)) for _ in steps)
    events = [
        Event(f"evt_{n:04d}_{i:02d}", shipment, status, code, at)
        for i, ((status, code), at) in enumerate(zip(steps, times, strict=True))
    ]
    i = 0
    while i < len(events) - 1:
        if rng.random() < 0.08:
            events[i], events[i + 1] = events[i + 1], events[i]
            i += 1
        i += 1
    return events


RECIPIENT_LOCALES = [
    ("en_US", "America/New_York"),
    ("fr_FR", "Europe/Paris"),
    ("de_DE", "Europe/Berlin"),
]


def body(e: Event, n: int, first: bool, rng: random.Random) -> dict[str, Any]:
    """The transition as the tracking backend posts it (the recipient on its first
    arrival, and on some later ones)."""
    item: dict[str, Any] = {
        "event_id": e.event_id,
        "merchant_id": MERCHANT,
        "shipment_id": e.shipment_id,
        "tracking_number": f"1Z999AA1{n:010d}",
        "carrier": "ups",
        "status": e.status,
        "occurred_at": e.at.isoformat(),
        "tracking_url": f"https://track.example.com/1Z999AA1{n:010d}",
        "order": {"number": str(10_000 + n)},
    }
    if e.code:
        item["exception_code"] = e.code
    if first or rng.random() < 0.3:
        locale, zone = RECIPIENT_LOCALES[n % len(RECIPIENT_LOCALES)]
        item["recipient"] = {
            "name": f"Customer {n}",
            "email": f"customer{n}@example.com",
            "phone": f"+3361{n:07d}",
            "locale": locale,
            "timezone": zone,
        }
    return item


# -- the deployment --------------------------------------------------------------------------


@dataclass
class Proc:
    popen: subprocess.Popen[str]
    output: list[str]
    reader: threading.Thread


def start(args: list[str], cwd: Path, env: dict[str, str]) -> Proc:
    """A notifier process whose output is read as it comes (a full pipe would stall it)."""
    popen = spawn_notifier(args, cwd, **env)
    output: list[str] = []
    assert popen.stdout is not None
    reader = threading.Thread(target=lambda: output.extend(popen.stdout or ()), daemon=True)
    reader.start()
    return Proc(popen, output, reader)


def stop(proc: Proc) -> str:
    if proc.popen.poll() is None:
        proc.popen.send_signal(signal.SIGTERM)
    try:
        proc.popen.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.popen.kill()
        proc.popen.wait(timeout=10)
    proc.reader.join(timeout=10)
    if proc.popen.stdout is not None:
        proc.popen.stdout.close()
    return "".join(proc.output)


@dataclass
class Data:
    """Where the deployment keeps its data: one Redis, or a Redis Cluster (whose keys carry
    their partition's tag)."""

    client: redis.Redis | redis.RedisCluster
    cluster: bool

    def tag(self, partition: int) -> str:
        return keys.tag(partition, PARTITIONS) if self.cluster else ""

    def tags(self) -> list[str]:
        return [self.tag(p) for p in range(PARTITIONS)] if self.cluster else [""]


@pytest.fixture(params=["one Redis", "Redis Cluster"])
def deployment(
    request: pytest.FixtureRequest, tmp_path: Path, redis_url: str
) -> Iterator[dict[str, Any]]:
    """2 `notifier serve` and 3 `notifier worker` processes on the test's Redis, or on a
    Redis Cluster of 3 masters with arq's queue on a Redis of its own."""
    on_cluster = request.param == "Redis Cluster"
    stores: dict[str, str] = {"NOTIFIER_REDIS_URL": redis_url}
    data = Data(redis.Redis.from_url(redis_url), False)
    if on_cluster:
        found: Cluster = request.getfixturevalue("cluster")
        flush_cluster(found)
        stores = {"NOTIFIER_REDIS_URL": found.url, "NOTIFIER_QUEUE_REDIS_URL": found.queue_url}
        data = Data(redis.RedisCluster(host="127.0.0.1", port=found.ports[0]), True)
    policies = tmp_path / "policies"
    shutil.copytree(data_dir("policies", None), policies)
    (policies / f"{MERCHANT}.yaml").write_text(POLICY)
    env = {
        **stores,
        "NOTIFIER_API_KEYS": json.dumps(API_KEYS),
        "NOTIFIER_OUTBOX_DIR": str(tmp_path / "outbox"),
        "NOTIFIER_POLICIES_DIR": str(policies),
        "NOTIFIER_PARTITIONS": str(PARTITIONS),
    }
    first = free_port()
    ports = [first, free_port([first])]  # both picked before either is bound
    apis = [start(["serve"], tmp_path, {**env, "NOTIFIER_PORT": str(p)}) for p in ports]
    workers = [start(["worker"], tmp_path, env) for _ in range(3)]
    try:
        for port, api in zip(ports, apis, strict=True):
            up = lambda port=port, api=api: healthy(port) or api.popen.poll() is not None  # noqa: E731
            wait_until(up, "notifier serve", 60)
            assert api.popen.poll() is None, "".join(api.output)
        yield {"ports": ports, "procs": apis + workers, "outbox": tmp_path / "outbox", "data": data}
    finally:
        for proc in apis + workers:
            stop(proc)
        data.client.close()


def post(port: int, items: list[dict[str, Any]], single: bool) -> tuple[int, dict[str, Any]]:
    payload = items[0] if single else {"transitions": items}
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/transitions",
        data=json.dumps(payload).encode(),
        headers={**auth(), "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        return resp.status, json.load(resp)


def drained(data: Data) -> bool:
    """Every inbox entry acknowledged (and so deleted): a worker acknowledges an entry only
    after the messages decided for it were delivered."""
    with data.client.pipeline(transaction=False) as pipe:
        for p in range(PARTITIONS):
            pipe.xlen(keys.inbox_key(p, data.tag(p)))
        return not any(pipe.execute())


#: A request: its (event id, is an exact duplicate) items, and whether it is posted as a
#: single transition instead of a batch.
Request = tuple[list[tuple[str, bool]], bool]


def requests_of_round(rng: random.Random, new: list[str], posted: list[str]) -> list[Request]:
    """The round's new events and ~5 % exact duplicates of events acknowledged in earlier
    rounds, shuffled, cut into singles and batches of 2-25."""
    dups = rng.sample(posted, min(len(posted), round(len(new) * DUPLICATE_SHARE)))
    items = [(i, False) for i in new] + [(i, True) for i in dups]
    rng.shuffle(items)
    out: list[Request] = []
    while items:
        single = rng.random() < 0.4
        size = 1 if single else rng.randint(2, 25)
        out.append((items[:size], single))
        items = items[size:]
    return out


def post_in_rounds(
    rng: random.Random,
    ports: list[int],
    bodies: dict[str, dict[str, Any]],
    rounds: list[list[str]],
    data: Data,
) -> Counter[tuple[str, str]]:
    """Post every round from several threads to both APIs; wait for the workers to drain
    each round. Returns how originals and duplicates were answered."""
    answers: Counter[tuple[str, str]] = Counter()
    lock = threading.Lock()

    def send(thread: int, work: list[Request]) -> None:
        pick = random.Random(SEED * 100 + thread)
        for chunk, single in work:
            status, reply = post(pick.choice(ports), [bodies[i] for i, _ in chunk], single)
            assert status == 202, reply
            with lock:
                for (event_id, duplicate), result in zip(chunk, reply["results"], strict=True):
                    assert result["event_id"] == event_id
                    answers[("duplicate" if duplicate else "original", result["status"])] += 1

    posted: list[str] = []
    with ThreadPoolExecutor(CLIENT_THREADS) as pool:
        for new in rounds:
            rng.shuffle(new)
            requests = requests_of_round(rng, new, posted)
            shares = [requests[t::CLIENT_THREADS] for t in range(CLIENT_THREADS)]
            list(pool.map(send, range(CLIENT_THREADS), shares))
            posted += new
            wait_until(lambda: drained(data), "the workers to drain the round", 90)
    return answers


def outbox_messages(outbox: Path) -> Counter[tuple[str, str, str]]:
    """(shipment, notification id, channel) of every file in the merchant's outbox."""
    found: Counter[tuple[str, str, str]] = Counter()
    for path in outbox.rglob("*"):
        if path.is_file():
            channel = "sms" if path.name.endswith(".sms.json") else "email"
            nid = path.name.split("-", 1)[1].removesuffix(".sms.json").removesuffix(".eml")
            found[(path.parent.name, nid, channel)] += 1
    return found


def ledger_states(data: Data) -> Counter[str]:
    """Notifications by state: those still in the ledger, and those settled for good (one
    record each on their shipment's outcome list, in its record; the record's packed part
    says how)."""
    r = data.client
    live = list(r.scan_iter("ntf:msg:*", count=1000))
    with r.pipeline(transaction=False) as pipe:
        for key in live:
            pipe.hget(key, "st")
        states = Counter(s.decode() for s in pipe.execute())
    for key in r.scan_iter("ntf:shp:*", count=1000):  # shipments' records
        for _, recorded in outcome_records(record.parse(r.get(key)).outcomes):
            if recorded:  # (a provider's status report has none)
                states[recorded["st"]] += 1
    return states


@pytest.mark.timeout(240)
def test_two_apis_and_three_workers_deliver_every_message_exactly_once(
    deployment: dict[str, Any],
) -> None:
    rng = random.Random(SEED)
    now = datetime.now(UTC)
    shipments = [shipment_events(rng, n, now) for n in range(SHIPMENTS)]
    bodies = {
        e.event_id: body(e, n, i == 0, rng)
        for n, events in enumerate(shipments)
        for i, e in enumerate(events)
    }
    # A shipment's k-th arrival goes into round start+k; shipments start in different rounds.
    rounds: list[list[str]] = [[] for _ in range(4 + max(len(s) for s in shipments))]
    for events in shipments:
        first = rng.randint(0, 4)
        for k, e in enumerate(events):
            rounds[first + k].append(e.event_id)
    rounds = [r for r in rounds if r]

    data: Data = deployment["data"]
    answers = post_in_rounds(rng, deployment["ports"], bodies, rounds, data)
    unique = sum(len(events) for events in shipments)
    duplicates = answers[("duplicate", "duplicate")]
    assert answers == {("original", "accepted"): unique, ("duplicate", "duplicate"): duplicates}
    assert duplicates >= 0.04 * unique

    # the oracle's messages, by notification id (deterministic: merchant, shipment, event,
    # channel; the README's "never sent twice")
    label = {
        notification_id_of(MERCHANT, e.shipment_id, e.event_id, c): (
            f"{e.shipment_id} {e.event_id} {e.milestone} by {c}"
        )
        for events in shipments
        for e in events
        for c in CHANNELS
    }
    expected: Counter[tuple[str, str, str]] = Counter()
    for events in shipments:
        for e, channel in expected_messages(events):
            nid = notification_id_of(MERCHANT, e.shipment_id, e.event_id, channel)
            expected[(e.shipment_id, nid, channel)] += 1
    delivered = outbox_messages(deployment["outbox"] / MERCHANT)
    missing = [label[k[1]] for k in expected - delivered]
    extra = [f"{label.get(k[1], k)} x{n}" for k, n in (delivered - expected).items()]
    assert not missing and not extra, f"missing: {missing[:20]}\nextra: {extra[:20]}"
    assert delivered == expected

    # and Redis agrees: nothing dead-lettered, deferred or left unsent
    for tag in data.tags():
        assert data.client.xlen(keys.dead_inbox_key(tag)) == 0
        assert data.client.zcard(keys.due_key(tag)) == 0
        assert data.client.zcard(keys.due_buckets_key(tag)) == 0
    assert ledger_states(data) == {"sent": len(expected)}

    # every process stops cleanly, and no address reached a log
    for proc in deployment["procs"]:
        output = stop(proc)
        assert proc.popen.returncode == 0, output[-4000:]
        assert "Traceback" not in output, output[-4000:]
        assert "@example.com" not in output and "+3361" not in output
    print(
        f"{SHIPMENTS} shipments, {unique} transitions in {len(rounds)} rounds, "
        f"{duplicates} duplicate posts, {len(expected)} messages"
    )
