"""The store on a real Redis Cluster: 3 masters and 3 replicas started by the tests on
loopback (``redis-server --cluster-enabled yes`` + ``redis-cli --cluster create``), arq's
queue on a Redis of its own. The same journeys decide and send the same on the cluster as on
one Redis; competing workers never send twice; every script's keys share one slot and the
partitions spread over every shard; dead letters, retries, provider ids and stalls work per
partition; a master failover in the middle of a stream loses nothing accepted.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from pydantic import ValidationError
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError

from notifier.app import RESOURCES, create_app
from notifier.check import published_problems
from notifier.deadletters import DeadLetters
from notifier.errors import ConfigurationError, TemporaryDeliveryError
from notifier.models import ChannelKind
from notifier.pipeline import Pipeline
from notifier.resources import Resources, open_resources
from notifier.settings import Settings
from notifier.store import ShipmentCommit, Store, keys, record
from notifier.store.inbox import Inbox
from notifier.worker import build_worker, drain, find_stalled, release_due
from tests.conftest import (
    API_KEYS,
    NOW,
    Cluster,
    Reader,
    auth,
    emails_per_shipment,
    fixed_clock,
    flush_cluster,
    free_port,
    healthy,
    just_now,
    make_settings,
    outbox_files,
    outcome_records,
    post,
    post_over_http,
    process_env,
    run_worker,
    spawn_notifier,
    transition,
    wait_until,
    wake_every_partition,
)
from tests.fakes import FailingChannel

Client = TestClient[Any, Any]
PARTITIONS = 8
#: keys a Redis Cluster may hold without a partition's tag (no script touches them)
UNTAGGED = (
    "ntf:pid:",
    "ntf:optout:",
    "ntf:workers",
    "ntf:overrides:hits",
    "ntf:lastsms:",
    "ntf:digest-key",  # the deployment key (unsubscribe links, reply digests): a plain SET
    "ntf:partitions",  # the NOTIFIER_PARTITIONS the data was written with: a plain SET
)


@pytest.fixture
def on_cluster(tmp_path: Path, cluster: Cluster) -> Settings:
    flush_cluster(cluster)
    return make_settings(
        tmp_path / "cluster",
        redis_url=cluster.url,
        queue_redis_url=cluster.queue_url,
        partitions=PARTITIONS,
    )


@pytest.fixture
def on_one_redis(tmp_path: Path, redis_url: str) -> Settings:
    return make_settings(tmp_path / "single", redis_url=redis_url, partitions=PARTITIONS)


ZONES = [
    ("fr_FR", "Europe/Paris"),
    ("ja_JP", "Asia/Tokyo"),  # 23:00 there at NOW: the SMS waits for the end of quiet hours
    ("en_US", "America/New_York"),
    ("de_DE", "Europe/Berlin"),
]
JOURNEY = ["picked_up", "in_transit", "out_for_delivery", "delivered"]


def journeys(shipments: int) -> list[dict[str, Any]]:
    """Each shipment's carrier journey (a few steps of it), recipients around the world."""
    items = []
    for s in range(shipments):
        locale, zone = ZONES[s // len(JOURNEY) % len(ZONES)]
        for step, status in enumerate(JOURNEY[: 1 + s % len(JOURNEY)]):
            items.append(
                transition(
                    event_id=f"e{s}-{step}",
                    merchant_id="acme" if s % 3 else "globex",
                    shipment_id=f"shp_{s}",
                    status=status,
                    occurred_at=f"2026-11-21T0{step + 5}:30:00+00:00",
                    recipient={
                        "name": "Ana",
                        "email": f"r{s}@example.com",
                        "phone": f"+336123456{s:02d}",
                        "locale": locale,
                        "timezone": zone,
                    },
                )
            )
    return items


async def run_day(settings: Settings, items: list[dict[str, Any]]) -> dict[str, Any]:
    """Post ``items`` (with every tenth one again), drain, then let the deferred ones go
    half a day later: what each shipment's history says, and the outbox."""
    async with TestClient(TestServer(create_app(settings))) as client:
        for start in range(0, len(items), 25):
            await post(client, *items[start : start + 25])
        again = await post(client, *items[::10])
        assert again["duplicates"] == len(items[::10])
        await run_worker(settings)
        await run_worker(settings, clock=fixed_clock(NOW + timedelta(hours=12)))
        decisions = {}
        for s in sorted({(i["merchant_id"], i["shipment_id"]) for i in items}):
            url = f"/v1/merchants/{s[0]}/shipments/{s[1]}/notifications"
            resp = await client.get(url, headers=auth())
            assert resp.status == 200
            decisions[s] = [
                (d["event_id"], d["channel"], d["outcome"], d.get("delivery", {}).get("status"))
                for d in (await resp.json())["decisions"]
            ]
    files = outbox_files(settings)
    return {
        "decisions": decisions,
        "outbox": sorted(str(p.relative_to(settings.outbox_dir)) for p in files),
        "sms": sorted(p.read_text() for p in files if p.name.endswith(".sms.json")),
    }


@pytest.mark.timeout(150)
async def test_journeys_decide_and_send_the_same_on_a_cluster_as_on_one_redis(
    on_cluster: Settings, on_one_redis: Settings, cluster: Cluster
) -> None:
    items = journeys(48)
    single = await run_day(on_one_redis, items)
    spread = await run_day(on_cluster, items)
    assert spread == single
    outcomes = Counter(o for rows in spread["decisions"].values() for _, _, o, _ in rows)
    assert outcomes["sent"] > 48 and outcomes["deferred"] and outcomes["suppressed"]
    # every notification went out once, the deferred ones too (half a day later)
    names = [Path(p).name.split("-", 1)[1] for p in spread["outbox"]]
    assert len(names) == len(set(names)) == outcomes["sent"] + outcomes["deferred"]
    later = [d for rows in spread["decisions"].values() for d in rows if d[2] == "deferred"]
    assert {status for *_, status in later} == {"sent"}

    # every key a partition's scripts touch carries its tag, so a script never spans slots;
    # the partitions' keys are on every shard
    tags = {keys.tag(p, PARTITIONS) for p in range(PARTITIONS)}
    shards = set()
    for port in cluster.masters():
        with cluster.node(port) as r:
            for key in r.scan_iter("ntf:*"):
                name = key.decode()
                if name.startswith("ntf:ovr:{"):
                    continue  # a merchant's own tag (the editor's overrides)
                if "{" not in name:  # keys no script touches: one command each
                    assert name.startswith(UNTAGGED), name
                    continue
                tag = "{" + name.split("{", 1)[1].split("}", 1)[0] + "}"
                assert tag in tags, name
                assert key_slot(key) == key_slot(tag.encode())
                shards.add(port)
    assert len(shards) == 3


async def test_competing_workers_on_a_cluster_never_send_twice(on_cluster: Settings) -> None:
    items = journeys(40)
    async with TestClient(TestServer(create_app(on_cluster))) as client:
        for start in range(0, len(items), 20):
            await post(client, *items[start : start + 20])
    workers = [
        build_worker(
            on_cluster, burst=True, handle_signals=False, poll_delay_s=0, clock=fixed_clock()
        )
        for _ in range(3)
    ]
    try:
        await asyncio.gather(*(w.main() for w in workers))
    finally:
        for w in workers:
            await w.close()
    assert sum(w.jobs_failed for w in workers) == 0
    async with open_resources(on_cluster, clock=fixed_clock()) as res:
        sent, due = [], 0
        for p in range(PARTITIONS):
            tag = res.store.tag(p)
            due += await res.store.due_count(p)
            assert await res.redis.xlen(keys.inbox_key(p, tag)) == 0  # all settled
            # settled for good: each on its shipment's outcome list (in its record), on its
            # partition
            async for key in res.redis.scan_iter(match=f"ntf:shp:{tag}*"):
                records = outcome_records(record.parse(await res.redis.get(key)).outcomes)
                sent += [nid for nid, recorded in records if recorded]
    names = [p.name.split("-", 1)[1].split(".", 1)[0] for p in outbox_files(on_cluster)]
    assert len(names) == len(set(names))  # never twice
    assert sorted(names) == sorted(sent)  # and every one recorded as sent
    # the gauges read every partition's inbox and indexes, wherever they live
    async with TestClient(TestServer(create_app(on_cluster))) as client:
        resp = await client.get("/metrics")
        text = await resp.text()
        assert resp.status == 200 and "notifier_redis_up 1.0" in text
        for p in range(PARTITIONS):
            assert f'notifier_inbox_depth{{partition="{p}"}} 0.0' in text
        assert due and f"notifier_due_messages {float(due)}" in text  # quiet hours in Tokyo
        assert (await client.get("/healthz")).status == 200


async def test_retries_dead_letters_and_replays_on_a_cluster(on_cluster: Settings) -> None:
    items = journeys(12)
    async with TestClient(TestServer(create_app(on_cluster))) as client:
        await post(client, *items)
    async with open_resources(on_cluster, clock=fixed_clock()) as res:
        busy = FailingChannel(TemporaryDeliveryError, "provider busy", "busy")
        res.channels = {ChannelKind.EMAIL: busy, ChannelKind.SMS: busy}
        res.providers = {}
        await drain_all(res)
        due = {p: await res.store.due(10**15, 1000, p) for p in range(PARTITIONS)}
        assert sum(len(ids) for ids in due.values()) > 12
        # retried for good later: out of attempts, on each partition's dead-letter list
        for hours in range(1, 30):  # backoff doubles; 8 attempts; quiet hours end first
            res.clock = fixed_clock(NOW + timedelta(hours=hours))
            await release_due({"res": res, "pipeline": Pipeline(res)})
        assert [await res.store.due(10**15, 1000, p) for p in range(PARTITIONS)] == [[]] * 8
        dead = DeadLetters(res.redis, res.store, res.queue)
        letters = await dead.list("messages", 1000)
        assert {letter.scope for letter in letters} == {
            res.store.scope_of(letter.merchant_id, letter.shipment_id) for letter in letters
        }
        assert len(letters) == sum(len(ids) for ids in due.values())
        assert (await res.store.dead_letters())["notifications"] == len(letters)
        # one inbox entry buried, then listed, shown and replayed into its partition
    async with TestClient(TestServer(create_app(on_cluster))) as client:
        await post(client, transition(event_id="late", shipment_id="shp_late"))
    async with open_resources(on_cluster, clock=fixed_clock()) as res:
        partition = res.store.partition_of("acme", "shp_late")
        await res.store.ensure_groups()
        [entry] = await res.store.read_inbox(partition, "w", 10)
        await res.store.bury(partition, [entry], "failed 10 times")
        dead = DeadLetters(res.redis, res.store, res.queue)
        [letter] = await dead.list("inbox")
        assert letter.scope == partition and letter.shipment_id == "shp_late"
        assert await dead.show(letter.id) == letter
        assert await dead.replay(letter, 0) == f"replayed into partition {partition}"
        assert await dead.list("inbox") == []
        # the worker the replay woke sends it, like any entry (the channels work again)
        for letter in await dead.list("messages", 1000):
            await dead.purge(letter)
        assert await res.store.dead_letters() == {"notifications": 0, "inbox": 0}
    await run_worker(on_cluster)
    late = [p for p in outbox_files(on_cluster) if p.parent.name == "shp_late"]
    assert len(late) == 2


async def drain_all(res: Resources) -> None:
    """Every partition's inbox through a pipeline, one partition's batch at a time."""
    await res.store.ensure_groups()
    for p in range(PARTITIONS):
        if entries := await res.store.read_inbox(p, "w", 1000):
            await Pipeline(res).process(entries)
            await res.store.ack(p, [e.entry_id for e in entries])


async def test_provider_ids_and_stalls_are_found_per_partition(on_cluster: Settings) -> None:
    async with open_resources(on_cluster, clock=fixed_clock()) as res:
        store = res.store
        scope = store.scope_of("acme", "shp_9")
        state = (await store.load_states([("acme", "shp_9")]))[0]
        assert state == (0, None)
        # a shipment without news by its deadline is found on its partition's stall index
        async with TestClient(TestServer(create_app(on_cluster))) as client:
            await post(client, transition(shipment_id="shp_9", status="in_transit"))
        await drain_all(res)
        version, known = (await store.load_states([("acme", "shp_9")]))[0]
        assert known is not None
        deadline = int(NOW.timestamp() * 1000)
        commit = ShipmentCommit("acme", "shp_9", version, known, [], [], deadline)
        assert await store.commit([commit], NOW.isoformat()) == []
        assert await store.due_stalls(deadline + 1, 10) == [("acme", "shp_9", deadline)]
        res.clock = fixed_clock(NOW + timedelta(minutes=1))
        assert await find_stalled({"res": res}) == 1
        assert await store.due_stalls(10**15, 10) == []
        # a provider's message id leads back to the notification on the right partition
        where = ("acme", "shp_9")
        key = keys.notification_key("n_p", store.tag(scope))
        await res.redis.hset(key, mapping={"st": "sending", "owner": "o", "attempts": "1"})
        await res.redis.expire(key, 3600)
        sent = [("n_p", NOW.isoformat(), "twilio:SM9")]
        await store.mark_sent(sent, "o", scope=scope, where={"n_p": where})
        assert await store.by_provider_id("twilio", "SM9") == ("n_p", scope, where)
        assert await store.provider_status("n_p", "delivered", 5, None, scope, where)
        delivery = (await store.deliveries(*where, ["n_p"]))["n_p"]
        assert (delivery["status"], delivery["provider_status"]) == ("sent", "delivered")


async def test_a_tracking_number_is_found_on_every_partition(on_cluster: Settings) -> None:
    """Shipments that share a carrier's number live on different partitions; a lookup
    asks each partition's bucket."""
    shipments = [f"shp_t{i}" for i in range(6)]
    async with open_resources(on_cluster, clock=fixed_clock()) as res:
        scopes = {res.store.scope_of("acme", s) for s in shipments}
        assert len(scopes) > 1
        async with TestClient(TestServer(create_app(on_cluster))) as client:
            for i, s in enumerate(shipments):
                await post(
                    client, transition(event_id=f"t{i}", shipment_id=s, tracking_number="1ZREUSED")
                )
        await drain_all(res)
        assert await res.store.shipments_tracked_as("acme", "1ZREUSED") == shipments
        assert await res.store.shipments_tracked_as("globex", "1ZREUSED") == []
        found = [k async for k in res.redis.scan_iter(match="ntf:tkb:*")]
        # one bucket a partition (a week's; two if the week ended meanwhile), with its tag
        assert {k.decode().split("}")[0] + "}" for k in found} == {
            "ntf:tkb:" + res.store.tag(s) for s in scopes
        }


def test_a_cluster_needs_its_own_queue_redis(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="NOTIFIER_QUEUE_REDIS_URL"):
        make_settings(tmp_path, redis_url="redis+cluster://127.0.0.1:7000")
    with pytest.raises(ValidationError, match="redis\\+cluster://"):
        make_settings(tmp_path, redis_url="cluster://127.0.0.1:7000")


@pytest.mark.timeout(120)
async def test_ingest_waits_for_each_partitions_replica_on_a_cluster(
    on_cluster: Settings, cluster: Cluster
) -> None:
    """NOTIFIER_INGEST_WAIT_REPLICAS on a cluster: each ingest call waits (WAIT, on its own
    connection) for a replica of the primary that holds its partition. With that replica
    frozen, its events are answered 503 (stored on the primary: a retry is a duplicate),
    while the other primaries' events are accepted; once it is back, the retry is a
    duplicate and every event is delivered once. A primary that does not know the script
    yet (flushed here) is sent its text."""
    settings = waiting_for_replicas(on_cluster)
    for port in cluster.masters():
        with cluster.node(port) as r:
            r.script_flush()
    shipments = [f"shp_w{i}" for i in range(12)]
    primary_of = await primaries(settings, shipments)
    frozen_primary = primary_of[shipments[0]]
    frozen = [s for s in shipments if primary_of[s] == frozen_primary]
    others = [s for s in shipments if primary_of[s] != frozen_primary]
    assert frozen and others
    replica = cluster.replica_of(frozen_primary)
    async with TestClient(TestServer(create_app(settings, clock=fixed_clock()))) as client:
        body = await post(
            client, *(transition(event_id=f"w-{s}", shipment_id=s) for s in shipments)
        )
        assert body["accepted"] == len(shipments)
        ready = await (await client.get("/readyz")).json()
        assert ready["replicas"] == "ok"
        await run_worker(settings)  # out for delivery: an email each

        again = [
            transition(
                event_id=f"w2-{s}",
                shipment_id=s,
                status="delivered",
                occurred_at="2026-11-21T12:30:00+01:00",
            )
            for s in shipments
        ]
        held = [t for t in again if t["shipment_id"] in frozen]
        os.kill(cluster.procs[replica].pid, signal.SIGSTOP)  # connected, but acks nothing
        try:
            resp = await client.post("/v1/transitions", json={"transitions": held}, headers=auth())
            assert resp.status == 503, await resp.text()
            assert resp.headers["Retry-After"].isdigit()
            assert "only 0 of the 1 Redis replicas" in (await resp.json())["error"]["message"]
            elsewhere = [t for t in again if t["shipment_id"] in others]
            body = await post(client, *elsewhere)
            assert body["accepted"] == len(elsewhere)
        finally:
            os.kill(cluster.procs[replica].pid, signal.SIGCONT)
        wait_until(cluster.ready, "the replica to catch up", seconds=30)
        body = await post(client, *held)  # the backend's retry
        assert body["duplicates"] == len(held) and body["accepted"] == 0
    await run_worker(settings)
    delivered = emails_per_shipment(settings)
    assert delivered == {s: 2 for s in shipments}


@pytest.mark.timeout(120)
async def test_a_worker_sends_only_what_its_partitions_replica_holds_the_claim_of(
    on_cluster: Settings, cluster: Cluster
) -> None:
    """With NOTIFIER_INGEST_WAIT_REPLICAS the worker waits too: each claim call and WAIT go
    down one connection to its partition's master. With one master's replica frozen, the
    messages of that master's partitions are not sent (their claims are undone, their
    entries wait), the others' are; once the replica is back, each goes out once."""
    settings = waiting_for_replicas(on_cluster).model_copy(update={"claim_idle_s": 0.2})
    shipments = [f"shp_c{i}" for i in range(12)]
    primary_of = await primaries(settings, shipments)
    frozen_primary = primary_of[shipments[0]]
    frozen = {s for s in shipments if primary_of[s] == frozen_primary}
    others = set(shipments) - frozen
    assert frozen and others
    async with TestClient(TestServer(create_app(settings, clock=fixed_clock()))) as client:
        await post(client, *(transition(event_id=f"c-{s}", shipment_id=s) for s in shipments))
    replica = cluster.replica_of(frozen_primary)
    os.kill(cluster.procs[replica].pid, signal.SIGSTOP)  # connected, but confirms nothing
    try:
        await run_worker(settings)
        sent = {p.parent.name for p in outbox_files(settings, ".eml")}
        assert sent == others
    finally:
        os.kill(cluster.procs[replica].pid, signal.SIGCONT)
    wait_until(cluster.ready, "the replica to catch up", seconds=30)
    await asyncio.sleep(0.25)  # the waiting entries turn stale: the next drains take them
    await wake_every_partition(settings)
    await run_worker(settings)
    delivered = emails_per_shipment(settings)
    assert delivered == {s: 1 for s in shipments}


async def test_a_batch_that_failed_on_one_partition_still_wakes_the_others(
    on_cluster: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cluster makes one ingest call per partition. When one of a batch's calls fails,
    the batch is answered 503, and the partitions whose calls stored their events have
    their drains enqueued all the same (before, they waited for the worker's 15 s sweep);
    the backend's retry then stores the rest, and every event is delivered once."""
    shipments = [f"shp_p{i}" for i in range(16)]
    async with TestClient(TestServer(create_app(on_cluster, clock=fixed_clock()))) as client:
        res: Resources = client.app[RESOURCES]
        partition_of = {s: res.store.partition_of("acme", s) for s in shipments}
        failing = partition_of[shipments[0]]
        stored = {p for p in partition_of.values() if p != failing}
        assert len(stored) >= 2
        call = Inbox._ingest_call

        async def fails_on_one_partition(
            inbox: Inbox, items: Sequence[Any], generation: int
        ) -> Any:
            if inbox.partition_of(items[0][0], items[0][1]) == failing:
                raise RedisConnectionError("the partition's master went away")
            return await call(inbox, items, generation)

        monkeypatch.setattr(Inbox, "_ingest_call", fails_on_one_partition)
        batch = [transition(event_id=f"p-{s}", shipment_id=s) for s in shipments]
        resp = await client.post("/v1/transitions", json={"transitions": batch}, headers=auth())
        assert resp.status == 503, await resp.text()
        assert resp.headers["Retry-After"].isdigit()
        jobs = await res.queue.queued_jobs()
        assert sorted(j.args[0] for j in jobs if j.function == "drain") == sorted(stored)

        monkeypatch.setattr(Inbox, "_ingest_call", call)
        body = await post(client, *batch)  # the backend's retry
        held = [s for s in shipments if partition_of[s] == failing]
        assert body["accepted"] == len(held)
        assert body["duplicates"] == len(shipments) - len(held)
    await run_worker(on_cluster)
    delivered = emails_per_shipment(on_cluster)
    assert delivered == {s: 1 for s in shipments}


async def test_a_due_sweep_releases_every_partition_even_when_one_fails(
    on_cluster: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """release_due goes through the partitions' due indexes side by side: one whose Redis
    fails (its master away) holds up none of the others, released in the same tick (before,
    the partitions after it waited for the tick after the outage); the tick then reports
    the failure, and the next one releases the rest. Each SMS goes out once."""
    shipments = [f"shp_d{i}" for i in range(16)]
    tokyo = {"name": "Ana", "phone": "+33612345678", "locale": "ja_JP", "timezone": "Asia/Tokyo"}
    async with TestClient(TestServer(create_app(on_cluster, clock=fixed_clock()))) as client:
        # 23:00 in Tokyo: every SMS waits for the morning
        await post(
            client,
            *(transition(event_id=f"d-{s}", shipment_id=s, recipient=tokyo) for s in shipments),
        )
    await run_worker(on_cluster)
    assert not outbox_files(on_cluster, ".sms.json")
    async with open_resources(on_cluster, clock=fixed_clock(NOW + timedelta(hours=10))) as res:
        partition_of = {s: res.store.partition_of("acme", s) for s in shipments}
        failing = min(partition_of.values())
        held = [s for s in shipments if partition_of[s] == failing]
        assert held and max(partition_of.values()) > failing
        due = Store.due

        async def fails_on_one_partition(
            store: Store, now_ms: int, limit: int, scope: int | None = None
        ) -> list[str]:
            if scope == failing:
                raise RedisConnectionError("the partition's master went away")
            return await due(store, now_ms, limit, scope)

        monkeypatch.setattr(Store, "due", fails_on_one_partition)
        assert await release_due({"res": res, "pipeline": Pipeline(res)}) == 0  # an outage
        sent = {p.parent.name for p in outbox_files(on_cluster, ".sms.json")}
        assert sent == set(shipments) - set(held)
        monkeypatch.setattr(Store, "due", due)
        assert await release_due({"res": res, "pipeline": Pipeline(res)}) == len(held)
        assert await release_due({"res": res, "pipeline": Pipeline(res)}) == 0
    sms = Counter(p.parent.name for p in outbox_files(on_cluster, ".sms.json"))
    assert sms == {s: 1 for s in shipments}


@pytest.mark.timeout(180)
async def test_what_ingest_answered_503_for_is_what_a_crash_loses(
    on_cluster: Settings, cluster: Cluster
) -> None:
    """Why ingest waits for a replica: with it frozen and its link cut, a master's events
    are answered 503; the master is then SIGKILLed and the replica takes over without them
    (they are not in its streams). Everything answered 202 before is there; the backend's
    retry, once the new master has a replica again, is accepted; each event is delivered
    once."""
    settings = waiting_for_replicas(on_cluster)
    shipments = [f"shp_k{i}" for i in range(12)]
    primary_of = await primaries(settings, shipments)
    master = primary_of[shipments[0]]
    mine = [s for s in shipments if primary_of[s] == master]
    replica = cluster.replica_of(master)
    later = "2026-11-21T12:30:00+01:00"
    async with TestClient(TestServer(create_app(settings, clock=fixed_clock()))) as client:
        body = await post(
            client, *(transition(event_id=f"k-{s}", shipment_id=s) for s in shipments)
        )
        assert body["accepted"] == len(shipments)
        await run_worker(settings)  # out for delivery: an email each
        with cluster.node(master) as r:  # the worker's writes are on the replica too
            r.ping()
            assert r.execute_command("WAIT", 1, 5000) == 1

        delivered = [
            transition(event_id=f"k2-{s}", shipment_id=s, status="delivered", occurred_at=later)
            for s in mine
        ]
        # the replica frozen and its link cut (what the master sends now never reaches it;
        # frozen alone, it would still read what its socket had received)
        os.kill(cluster.procs[replica].pid, signal.SIGSTOP)
        try:
            with cluster.node(master) as r:
                r.execute_command("CLIENT", "KILL", "TYPE", "replica")
            resp = await client.post(
                "/v1/transitions", json={"transitions": delivered}, headers=auth()
            )
            assert resp.status == 503, await resp.text()
            cluster.procs[master].kill()  # stored on the master alone: lost with it
            cluster.procs[master].wait()
        finally:
            os.kill(cluster.procs[replica].pid, signal.SIGCONT)

        wait_until(lambda: cluster.is_master(replica), "the replica to take over", seconds=60)
        with cluster.node(replica) as r:  # what was answered 503 is not there
            streams = list(r.scan_iter("ntf:inbox:*", _type="stream"))
            bodies = [f[b"t"] for k in streams for _, f in r.xrange(k)]
        assert streams and not [b for b in bodies if b"k2-" in b]
        assert sum(b"k-" in b for b in bodies) == 0  # (drained and acknowledged before)
        # the promoted replica has no replica of its own until the crashed master is back:
        # until then ingest answers 503 for its partitions, as it should
        cluster.restart(master)
        wait_until(cluster.ready, "the crashed master to rejoin as a replica", seconds=60)
        deadline = time.monotonic() + 60
        while True:  # the backend posts again until it gets an answer
            resp = await client.post(
                "/v1/transitions", json={"transitions": delivered}, headers=auth()
            )
            if resp.status == 202 or time.monotonic() > deadline:
                break
            assert resp.status == 503, await resp.text()
            await asyncio.sleep(0.2)
        assert resp.status == 202, await resp.text()
        body = await resp.json()
        assert body["accepted"] + body["duplicates"] == len(mine)
    await run_worker(settings)
    emails = emails_per_shipment(settings)
    assert emails == {s: 2 if s in mine else 1 for s in shipments}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("wait", [False, True])
async def test_what_the_worker_sent_before_a_crash_is_not_sent_again(
    on_cluster: Settings, cluster: Cluster, wait: bool
) -> None:
    """Why the worker waits for a replica too: events on the master and its replica, the
    replica then frozen and its link cut, a worker drains, the master is SIGKILLed and the
    replica takes over. Without waiting, the worker sent that master's messages, and the
    new master knows nothing of it (decisions, claims, acknowledgements were on the old
    one alone): the events are decided and sent again. With it, nothing of that master's
    was sent (the claims were not confirmed); sent once the new master has a replica."""
    settings = on_cluster.model_copy(update={"claim_idle_s": 0.2})
    if wait:
        settings = waiting_for_replicas(settings)
    shipments = [f"shp_x{i}" for i in range(12)]
    primary_of = await primaries(settings, shipments)
    master = primary_of[shipments[0]]
    mine = {s for s in shipments if primary_of[s] == master}
    replica = cluster.replica_of(master)
    async with TestClient(TestServer(create_app(settings, clock=fixed_clock()))) as client:
        await post(client, *(transition(event_id=f"x-{s}", shipment_id=s) for s in shipments))
    with cluster.node(master) as r:  # the events are on the replica too
        assert r.execute_command("WAIT", 1, 5000) == 1
    os.kill(cluster.procs[replica].pid, signal.SIGSTOP)
    try:
        with cluster.node(master) as r:
            r.execute_command("CLIENT", "KILL", "TYPE", "replica")
        await run_worker(settings)
        sent = {p.parent.name for p in outbox_files(settings, ".eml")}
        assert sent == (set(shipments) - mine if wait else set(shipments))
        cluster.procs[master].kill()
        cluster.procs[master].wait()
    finally:
        os.kill(cluster.procs[replica].pid, signal.SIGCONT)
    wait_until(lambda: cluster.is_master(replica), "the replica to take over", seconds=60)
    cluster.restart(master)
    wait_until(cluster.ready, "the crashed master to rejoin as a replica", seconds=60)
    await wake_every_partition(settings)
    # a minute later, so that a message sent again is a file of its own
    await run_worker(settings, clock=fixed_clock(NOW + timedelta(minutes=1)))
    emails = emails_per_shipment(settings)
    assert emails == {s: 1 if wait or s not in mine else 2 for s in shipments}


async def test_ingest_waiting_for_replicas_through_a_slot_migration(
    on_cluster: Settings, cluster: Cluster
) -> None:
    """While a partition's slot moves to another master (resharding), ingest's script over
    several keys can run on neither (the old master answers ASK, the new one TRYAGAIN):
    503, nothing stored. Once the slot has moved, the old master answers MOVED and the
    call goes to the new one, and waits for that one's replica: accepted."""
    settings = waiting_for_replicas(on_cluster)
    async with open_resources(settings, clock=fixed_clock()) as res:
        store = res.store
        key = store.inbox_key(store.partition_of("acme", "shp_ask"))
        source = store_primary(res, key)
    slot = key_slot(key.encode())
    target = next(p for p in cluster.masters() if p != source)
    move_slot(cluster, slot, source, target, finish=False)
    try:
        async with TestClient(TestServer(create_app(settings, clock=fixed_clock()))) as client:
            event = transition(event_id="e-ask", shipment_id="shp_ask")
            resp = await client.post("/v1/transitions", json=event, headers=auth())
            assert resp.status == 503, await resp.text()
            assert resp.headers["Retry-After"].isdigit()
            move_slot(cluster, slot, source, target, keys=False)  # done: the slot is there
            body = await post(client, event)  # the backend's retry
            assert body["accepted"] == 1
        with cluster.node(target) as r:
            assert r.xlen(key) == 1
    finally:
        move_slot(cluster, slot, target, source)  # as it was, keys and all
    wait_until(cluster.ready, "the cluster to agree on the slot", seconds=30)


def move_slot(
    cluster: Cluster, slot: int, source: int, target: int, keys: bool = True, finish: bool = True
) -> None:
    """Reshard ``slot`` from the master on ``source`` to the one on ``target``, as
    `redis-cli --cluster reshard` does: mark it importing and migrating, MIGRATE its keys,
    then give it to the target on every master (``finish=False`` stops before that,
    ``keys=False`` only gives it)."""
    ids = {}
    for port in (source, target):
        with cluster.node(port) as r:
            ids[port] = r.execute_command("CLUSTER MYID").decode()
    if keys:
        with cluster.node(target) as r:
            r.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[source])
        with cluster.node(source) as r:
            r.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[target])
            while names := r.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
                r.execute_command("MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *names)
    if finish:
        for port in cluster.masters():
            with cluster.node(port) as r:
                r.execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[target])


async def test_readyz_counts_the_replicas_of_the_masters_there_are_now(
    on_cluster: Settings, cluster: Cluster
) -> None:
    """/readyz with NOTIFIER_INGEST_WAIT_REPLICAS on a cluster asks every node it knows
    its role: after a manual failover, which nothing in this process has noticed (its
    client still lists the old master as one), it counts the new master's replica; a
    replica whose link is down counts for none."""
    settings = waiting_for_replicas(on_cluster)
    async with TestClient(TestServer(create_app(settings, clock=fixed_clock()))) as client:

        async def replicas() -> str:
            return str((await (await client.get("/readyz")).json())["replicas"])

        assert await replicas() == "ok"
        fail_over(cluster)
        wait_until(cluster.ready, "the old master to follow the new one", seconds=30)
        assert await replicas() == "ok"
        master = cluster.masters()[0]
        replica = cluster.replica_of(master)
        with cluster.node(replica) as r:
            r.execute_command("CONFIG", "SET", "masterauth", "wrong")  # cannot sync again
        with cluster.node(master) as r:
            r.execute_command("CLIENT", "KILL", "TYPE", "replica")
        try:
            assert await replicas() == "0 of the 1 required connected"
        finally:
            with cluster.node(replica) as r:
                r.execute_command("CONFIG", "SET", "masterauth", "")
        wait_until(cluster.ready, "the replica to sync again", seconds=30)


def waiting_for_replicas(settings: Settings) -> Settings:
    """``settings`` with ingest waiting for one replica (half a second at most)."""
    return settings.model_copy(update={"ingest_wait_replicas": 1, "ingest_wait_timeout_ms": 500})


async def primaries(settings: Settings, shipments: list[str]) -> dict[str, int]:
    """The port of the primary that holds each of merchant acme's ``shipments``' inbox."""
    async with open_resources(settings, clock=fixed_clock()) as res:
        store = res.store
        return {
            s: store_primary(res, store.inbox_key(store.partition_of("acme", s))) for s in shipments
        }


def store_primary(res: Resources, key: str) -> int:
    """The port of the primary that holds ``key``'s slot, as the client knows it."""
    node = res.redis.get_node_from_key(key)  # type: ignore[union-attr]
    assert node is not None
    return int(node.port)


@pytest.mark.timeout(240)
@pytest.mark.parametrize(("how", "wait"), [("manual", False), ("manual", True), ("crash", True)])
def test_a_master_failover_mid_stream_loses_nothing_accepted(
    cluster: Cluster, tmp_path: Path, how: str, wait: bool
) -> None:
    """`notifier serve` and two `notifier worker` processes on the cluster; while batches
    stream in, a replica takes over from its master: a manual failover (CLUSTER FAILOVER),
    or its master SIGKILLed; with or without the API waiting for a replica before it
    answers (NOTIFIER_INGEST_WAIT_REPLICAS=1). Every transition the API accepted (202) is
    delivered exactly once; those it refused meanwhile (503) are posted again, as the
    tracking backend does, and delivered once too."""
    flush_cluster(cluster)
    port = free_port()
    env = process_env(
        tmp_path,
        port,
        NOTIFIER_REDIS_URL=cluster.url,
        NOTIFIER_QUEUE_REDIS_URL=cluster.queue_url,
        NOTIFIER_PARTITIONS=str(PARTITIONS),
        NOTIFIER_SIGNING_SECRET="0123456789abcdef0123",
    )
    if wait:
        env["NOTIFIER_INGEST_WAIT_REPLICAS"] = "1"
    procs = [spawn_notifier(["serve"], tmp_path, **env)]
    procs += [spawn_notifier(["worker"], tmp_path, **env) for _ in range(2)]
    # read as it comes: a pipe left unread fills up (64 KB of log lines, one a refused
    # post) and blocks the process at its next line
    readers = [Reader(proc) for proc in procs]
    try:
        wait_until(lambda: healthy(port), "notifier serve on the cluster", seconds=60)
        accepted: set[str] = set()
        refused, posted, after = 0, 0, 0
        failover = threading.Thread(
            target=fail_over if how == "manual" else crash_a_master, args=(cluster,)
        )
        pending: list[dict[str, Any]] = []
        # batches of new shipments before, during and for 10 batches after the failover
        while posted < 50 or failover.is_alive() or after < 10 or pending:
            if not pending and (posted < 50 or failover.is_alive() or after < 10):
                pending = [
                    transition(
                        event_id=f"f{s}",
                        shipment_id=f"shp_f{s}",
                        status="delivered",  # final: no stall check on the real clock adds news
                        occurred_at=just_now(),
                    )
                    for s in range(posted, posted + 10)
                ]
                posted += 10
                if posted == 50:
                    failover.start()
                elif posted > 50 and not failover.is_alive():
                    after += 1
            status, _, body = post_over_http(port, pending)
            if status == 202:
                accepted |= {r["event_id"] for r in body["results"]}
                pending = []
            else:
                assert status == 503, (status, body)
                refused += 1  # the tracking backend posts it again
                time.sleep(0.05)
        failover.join(timeout=60)
        shipments = posted
        assert len(accepted) == shipments
        outbox = tmp_path / "outbox"

        def delivered() -> bool:
            return len([p for p in outbox.rglob("*") if p.is_file()]) >= 2 * shipments

        wait_until(delivered, "every accepted transition's messages", seconds=120)
        time.sleep(1)  # anything sent twice would show up now
        files = [p for p in outbox.rglob("*") if p.is_file()]
        per_shipment = Counter(p.parent.name for p in files)
        odd = {s: n for s, n in per_shipment.items() if n != 2}
        assert not odd and len(per_shipment) == shipments, (odd, len(per_shipment))
    finally:
        for proc in procs:
            proc.terminate()
        for proc, reader in zip(procs, readers, strict=True):
            proc.wait(timeout=30)
            out = reader.text()
            assert "Traceback" not in out or proc.returncode == 0, out[-3000:]


async def test_any_named_node_will_do_and_none_answering_is_an_outage(
    on_cluster: Settings, cluster: Cluster, tmp_path: Path
) -> None:
    """NOTIFIER_REDIS_URL may name several nodes: the first one down, the next one is
    used. With none answering, ingest answers 503 with Retry-After (it answered 500: redis-py
    raises an error of its own there) and a `notifier worker` waits instead of exiting."""
    down = free_port()  # nothing listens there
    several = f"redis+cluster://127.0.0.1:{down},127.0.0.1:{cluster.ports[1]}"
    settings = on_cluster.model_copy(update={"redis_url": several})
    async with TestClient(TestServer(create_app(settings, clock=fixed_clock()))) as client:
        await post(client, transition())
        await run_worker(settings)
    assert len(outbox_files(settings, ".eml")) == 1

    nowhere = on_cluster.model_copy(update={"redis_url": f"redis+cluster://127.0.0.1:{down}"})
    async with TestClient(TestServer(create_app(nowhere, clock=fixed_clock()))) as client:
        resp = await client.post(
            "/v1/transitions", json={"transitions": [transition()]}, headers=auth()
        )
        assert resp.status == 503, await resp.text()
        assert resp.headers["Retry-After"]
        health = await client.get("/healthz")
        assert health.status == 503 and (await health.json())["redis"] == "unreachable"
    env = {
        "NOTIFIER_REDIS_URL": nowhere.redis_url or "",
        "NOTIFIER_QUEUE_REDIS_URL": cluster.queue_url,
        "NOTIFIER_API_KEYS": json.dumps(API_KEYS),
        "NOTIFIER_SIGNING_SECRET": "0123456789abcdef0123",
        "NOTIFIER_OUTBOX_DIR": str(tmp_path / "outbox"),
    }
    worker = spawn_notifier(["worker"], tmp_path, **env)
    try:
        time.sleep(3)
        assert worker.poll() is None, worker.communicate()[0][-3000:]
    finally:
        worker.terminate()
        out, _ = worker.communicate(timeout=30)
    assert "Traceback" not in out, out[-3000:]


def test_a_cluster_failover_reads_as_an_outage_not_a_crash(
    monkeypatch: pytest.MonkeyPatch, on_cluster: Settings
) -> None:
    """What redis-py raises while it follows a failover (a slot without a master; a
    connection closed under a running command, an AttributeError from its connection
    module) is a Redis connection error, which ingest answers with 503; any other
    AttributeError stays a bug."""
    from redis.asyncio.cluster import ClusterPipeline, RedisCluster
    from redis.exceptions import SlotNotCoveredError

    from notifier.resources import connect

    # a function "of redis-py's connection module", as its frames name it
    where = str(Path(redis_module_dir(), "asyncio", "connection.py"))
    scope: dict[str, Any] = {}
    exec(compile("def closed(*a, **k):\n    None.writelines([])\n", where, "exec"), scope)

    async def broken(*args: Any, **kwargs: Any) -> Any:
        scope["closed"]()

    async def uncovered(*args: Any, **kwargs: Any) -> Any:
        raise SlotNotCoveredError('Slot "7" not covered by the cluster')

    async def ours(*args: Any, **kwargs: Any) -> Any:
        return None.upper()  # type: ignore[attr-defined]

    client = connect(on_cluster)
    assert isinstance(client, RedisCluster)

    def run(owner: type) -> None:
        if owner is RedisCluster:
            asyncio.run(client.execute_command("GET", "k"))
        else:
            asyncio.run(client.pipeline().get("k").execute())

    for owner, name in ((RedisCluster, "execute_command"), (ClusterPipeline, "execute")):
        for fake in (broken, uncovered):
            monkeypatch.setattr(owner, name, fake)
            with pytest.raises(RedisConnectionError):
                run(owner)
        monkeypatch.setattr(owner, name, ours)
        with pytest.raises(AttributeError):
            run(owner)
        monkeypatch.undo()


def test_ingest_waiting_for_replicas_reads_a_failover_as_an_outage(
    monkeypatch: pytest.MonkeyPatch, on_cluster: Settings
) -> None:
    """The same in ingest's own pipeline to a primary (NOTIFIER_INGEST_WAIT_REPLICAS): a
    connection closed under it, raised or as a command's result, is a 503, never a 500."""
    from redis.asyncio.cluster import ClusterNode

    where = str(Path(redis_module_dir(), "asyncio", "connection.py"))
    scope: dict[str, Any] = {}
    exec(compile("def closed(*a, **k):\n    None.writelines([])\n", where, "exec"), scope)

    async def raised(node: Any, commands: list[Any]) -> bool:
        scope["closed"]()
        return True

    async def as_result(node: Any, commands: list[Any]) -> bool:
        for command in commands:
            try:
                scope["closed"]()
            except AttributeError as exc:
                command.result = exc
        return True

    waiting = on_cluster.model_copy(update={"ingest_wait_replicas": 1})

    async def post_one() -> int:
        async with TestClient(TestServer(create_app(waiting, clock=fixed_clock()))) as client:
            resp = await client.post(
                "/v1/transitions", json={"transitions": [transition()]}, headers=auth()
            )
            return resp.status

    assert asyncio.run(post_one()) == 202
    for fake in (raised, as_result):
        monkeypatch.setattr(ClusterNode, "execute_pipeline", fake)
        assert asyncio.run(post_one()) == 503
        monkeypatch.undo()


def test_cluster_mode_not_enabled_is_the_set_ups_error_only_at_start_up(
    monkeypatch: pytest.MonkeyPatch, on_cluster: Settings
) -> None:
    """redis-py says "Cluster mode is not enabled" when the last node it tried answered
    CLUSTER SLOTS with any error. Before the client ever met the cluster that is the
    set-up's error (a plain Redis named as a cluster); after, an outage (503)."""
    from redis.asyncio.cluster import RedisCluster
    from redis.exceptions import RedisClusterException

    from notifier.resources import connect

    client = connect(on_cluster)
    assert isinstance(client, RedisCluster)

    async def refused(self: Any) -> Any:
        raise RedisClusterException(
            "Redis Cluster cannot be connected: Cluster mode is not enabled"
        )

    async def start_then_lose() -> None:
        await client.initialize()  # meets the cluster
        monkeypatch.setattr(RedisCluster, "initialize", refused)
        with pytest.raises(RedisConnectionError):
            await client.initialize()
        await client.aclose()

    asyncio.run(start_then_lose())
    fresh = connect(on_cluster)
    with pytest.raises(RedisClusterException, match="not enabled"):
        asyncio.run(fresh.initialize())


def redis_module_dir() -> str:
    import redis

    return str(Path(redis.__file__).parent)


def fail_over(cluster: Cluster) -> None:
    """A replica takes over from its master (a manual failover: it first catches up)."""
    master = cluster.masters()[0]
    with cluster.node(cluster.replica_of(master)) as r:
        r.execute_command("CLUSTER FAILOVER")
    wait_until(lambda: not cluster.is_master(master), "the replica to take over", seconds=30)


def crash_a_master(cluster: Cluster) -> None:
    """SIGKILL a master; once its replica has taken over (after cluster-node-timeout),
    start it again: it comes back as the new master's replica."""
    master = cluster.masters()[0]
    replica = cluster.replica_of(master)
    cluster.procs[master].kill()
    cluster.procs[master].wait()
    wait_until(lambda: cluster.is_master(replica), "the replica to take over", seconds=60)
    cluster.restart(master)
    wait_until(cluster.ready, "the crashed master to rejoin as a replica", seconds=60)


async def test_a_cluster_named_as_one_redis_or_the_reverse_is_refused_at_start_up(
    cluster: Cluster, tmp_path: Path, redis_url: str
) -> None:
    node = f"redis://127.0.0.1:{cluster.ports[0]}/0"
    wrong = [
        # a cluster's node as one Redis: the first command hashing elsewhere would fail
        (dict(redis_url=node), "NOTIFIER_REDIS_URL names a node of a Redis Cluster"),
        # arq's queue on a cluster
        (
            dict(redis_url=cluster.url, queue_redis_url=node),
            "NOTIFIER_QUEUE_REDIS_URL names a node of a Redis Cluster",
        ),
        # one Redis named as a cluster
        (
            dict(
                redis_url=redis_url.replace("redis://", "redis+cluster://").removesuffix("/0"),
                queue_redis_url=redis_url,
            ),
            "names a Redis without cluster mode",
        ),
    ]
    for overrides, message in wrong:
        settings = make_settings(tmp_path, partitions=PARTITIONS, **overrides)
        with pytest.raises(ConfigurationError, match=message):
            async with open_resources(settings):
                pass
        # and `notifier check` says what serve would refuse (it said "ok", or a traceback)
        [problem] = await published_problems(settings)
        assert message in problem, problem
    # and `notifier serve` says so in one line, and exits
    env = {
        "NOTIFIER_REDIS_URL": node,
        "NOTIFIER_API_KEYS": json.dumps(API_KEYS),
        "NOTIFIER_SIGNING_SECRET": "0123456789abcdef0123",
        "NOTIFIER_PORT": str(free_port()),
    }
    proc = spawn_notifier(["serve"], tmp_path, **env)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "NOTIFIER_REDIS_URL names a node of a Redis Cluster" in out
    assert "Traceback" not in out


def test_a_partition_past_the_count_has_no_tag() -> None:
    """``tag(6, 6)`` looked for a slot past the last one for ever: a drain job enqueued by a
    process with more partitions wedged every worker that took it (SIGTERM too)."""
    assert keys.tag(5, 6).startswith("{p5.")
    for partition in (6, 7, -1):
        with pytest.raises(ValueError, match=f"no partition {partition} of 6"):
            keys.tag(partition, 6)


async def test_a_process_with_another_partition_count_is_refused_on_a_cluster(
    on_cluster: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """Every key's slot depends on NOTIFIER_PARTITIONS: a process with another count found
    no event ids (a repost was taken again, its message sent twice) and no histories."""
    async with open_resources(on_cluster) as res:
        assert int(await res.redis.get(keys.PARTITIONS_KEY)) == PARTITIONS
        # a drain job for a partition this process does not have ends at once, and says so
        assert await drain({"res": res}, PARTITIONS + 1) == 0
    assert f"a drain job for partition {PARTITIONS + 1}, but NOTIFIER_PARTITIONS is 8" in (
        caplog.text
    )
    other = on_cluster.model_copy(update={"partitions": 6})
    with pytest.raises(ConfigurationError) as refused:
        async with open_resources(other):
            pass
    message = str(refused.value)
    assert message.startswith(
        "NOTIFIER_PARTITIONS is 6, but the data in this Redis Cluster was written with 8 "
        "partitions: every key's slot depends on it"
    )
    assert message.endswith("Set NOTIFIER_PARTITIONS=8")
    async with open_resources(on_cluster):  # the same count still starts
        pass
    # `notifier check` says so too, and writes nothing
    assert [p for p in await published_problems(other) if "NOTIFIER_PARTITIONS is 6" in p]
    async with open_resources(on_cluster) as res:
        await res.redis.delete(keys.PARTITIONS_KEY)
    assert await published_problems(other) == []
    async with open_resources(on_cluster) as res:
        assert await res.redis.get(keys.PARTITIONS_KEY) == b"8"  # (this one wrote it)


async def test_one_redis_keeps_no_partition_count_and_loses_nothing_in_a_change_of_it(
    on_one_redis: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """On one Redis the count only spreads the inbox over streams: a process with another
    count starts (a rolling change of the count, APIs first: README, "Scaling out"). A
    worker still at the old count leaves the new partitions' jobs alone, in one line each,
    and a worker with the new count drains them."""
    more = on_one_redis.model_copy(update={"partitions": PARTITIONS * 2})
    async with TestClient(TestServer(create_app(more, run_worker=False))) as client:
        for n in range(40):
            await post(client, transition(event_id=f"e{n}", shipment_id=f"s{n}"))
    async with open_resources(on_one_redis) as res:
        assert await res.redis.get(keys.PARTITIONS_KEY) is None
        beyond = [
            p for p in range(PARTITIONS, PARTITIONS * 2) if await res.redis.xlen(keys.inbox_key(p))
        ]
        assert beyond  # some of the 40 went past the old count
        assert await drain({"res": res}, beyond[0]) == 0
    assert f"a drain job for partition {beyond[0]}, but NOTIFIER_PARTITIONS is 8" in caplog.text
    await run_worker(more)
    assert len(outbox_files(more, ".eml")) == 40


def test_uvloops_closed_transport_under_a_failover_reads_as_an_outage() -> None:
    """A killed master: on uvloop a drain's command failed with a RuntimeError, read as a
    bug (a traceback, its entries stalled until reclaimed), not as the outage it is."""
    from notifier.resources import _as_outage

    closed = RuntimeError(
        "unable to perform operation on <TCPTransport closed=True reading=False "
        "0x7f0e4c0b5a40>; the handler is closed"
    )
    assert isinstance(_as_outage(closed), RedisConnectionError)
    other = RuntimeError("Event loop is closed")
    assert _as_outage(other) is other


async def test_a_cluster_url_with_a_refused_password_a_database_or_an_odd_option_is_one_line(
    on_cluster: Settings,
) -> None:
    """Each was a traceback, or (the password) an outage waited for for ever."""
    url = on_cluster.redis_url
    assert url is not None
    wrong = url.replace("redis+cluster://", "redis+cluster://:hunter2pw@", 1)
    with pytest.raises(ConfigurationError, match="NOTIFIER_REDIS_URL: Redis refused the cred"):
        async with open_resources(on_cluster.model_copy(update={"redis_url": wrong})):
            pass
    with pytest.raises(ConfigurationError, match=r"an option after \? .* \('foo'\)"):
        async with open_resources(on_cluster.model_copy(update={"redis_url": url + "?foo=bar"})):
            pass
    for database in ("/3", "?db=3", "/0?db=1"):
        with pytest.raises(ValidationError, match="a Redis Cluster has database 0 only"):
            make_settings(
                Path("."), redis_url=url + database, queue_redis_url=on_cluster.queue_redis_url
            )
    make_settings(Path("."), redis_url=url + "/0?db=0", queue_redis_url=on_cluster.queue_redis_url)
