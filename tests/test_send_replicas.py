"""``NOTIFIER_INGEST_WAIT_REPLICAS`` on the worker's side: a message is sent only once enough
replicas hold its claim (and the decision before it). Without them its claim is handed back
unsent and tried again; once they answer, it is sent once. A failover can then not lose
the claim of a message that went out (a new primary without it would have the event
decided and sent again)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from aiohttp.test_utils import TestClient, TestServer
from redis.exceptions import NoPermissionError, ResponseError

from notifier.app import create_app
from notifier.models import notification_id_of
from notifier.pipeline import Pipeline
from notifier.resources import open_resources
from notifier.store import keys
from notifier.store.base import WaitRefused, data_error
from notifier.store.keys import partition_of
from notifier.worker import release_due
from tests.conftest import (
    NOW,
    Reader,
    auth,
    fixed_clock,
    free_port,
    healthy,
    just_now,
    make_settings,
    outbox_files,
    post,
    post_over_http,
    process_env,
    run_worker,
    spawn_notifier,
    transition,
    wait_until,
    wake_every_partition,
)
from tests.test_store_scripts import NOW_MS, entry, ledger_entries, pending


async def test_a_message_goes_out_only_once_a_replica_holds_its_claim(
    tmp_path: Path,
    primary_and_replica: tuple[str, subprocess.Popen[bytes]],
) -> None:
    url, replica = primary_and_replica
    primary = redis.Redis.from_url(url)
    settings = make_settings(
        tmp_path,
        redis_url=url,
        ingest_wait_replicas=1,
        ingest_wait_timeout_ms=300,
        claim_idle_s=0.2,
    )
    delivered = transition(event_id="evt_delivered", status="delivered")
    email = notification_id_of("acme", "shp_123", "evt_delivered", "email")
    async with TestClient(TestServer(create_app(settings, clock=fixed_clock()))) as client:
        await post(client, transition())  # out for delivery: sent, the replica up
        await run_worker(settings)
        assert len(outbox_files(settings, ".eml")) == 1

        os.kill(replica.pid, signal.SIGSTOP)  # connected, but confirms nothing
        try:
            resp = await client.post("/v1/transitions", json=delivered, headers=auth())
            assert resp.status == 503  # stored on the primary, unconfirmed: its drain is woken
            # The worker decides it and claims its email; no replica confirms the claim in
            # time: the claim is undone and nothing sent, and the entry waits for a later
            # round (its delivery count starting again: never a dead letter for this). Round
            # after round, while the replica stays away.
            for _ in range(6):
                await wake_every_partition(settings)
                await asyncio.sleep(0.25)  # the entry turns stale: the next drain takes it
                await run_worker(settings)
                assert len(outbox_files(settings, ".eml")) == 1
                entry = primary.hgetall(keys.notification_key(email))
                assert entry[b"st"] == b"pending", entry  # as before the claim
                assert b"attempts" not in entry and b"owner" not in entry, entry
            stream = keys.inbox_key(partition_of("acme", "shp_123", settings.partitions))
            pending = primary.xpending_range(stream, keys.GROUP, "-", "+", 10)
            assert [p["times_delivered"] for p in pending] == [0]
            assert not primary.exists(keys.DEAD_INBOX_KEY)
        finally:
            os.kill(replica.pid, signal.SIGCONT)
    wait_until(
        lambda: primary.info("replication")["connected_slaves"] == 1 and primary.wait(1, 100) == 1,
        "the replica to confirm again",
    )
    # the waiting entry is taken over by the next drain (stale after claim_idle_s), and its
    # email sent once
    await asyncio.sleep(0.25)
    await wake_every_partition(settings)
    await run_worker(settings)
    emails = outbox_files(settings, ".eml")
    assert len(emails) == 2 and sum(email in p.name for p in emails) == 1


async def test_a_claim_that_waits_fails_on_damaged_data_as_one_that_does_not(
    tmp_path: Path, primary_and_replica: tuple[str, subprocess.Popen[bytes]]
) -> None:
    """The claim script and WAIT go as one pipeline: a script failing on what it read (a
    ledger key of the wrong type) raises its own error, which the worker tells from an
    outage (``data_error``: the entry is set aside, not retried for ever), as without
    waiting; redis-py would otherwise rewrite its message as the pipeline's."""
    url, _ = primary_and_replica
    nid = notification_id_of("acme", "shp_123", "evt_1", "email")
    raised = []
    for wait in (0, 1):
        settings = make_settings(tmp_path / str(wait), redis_url=url, ingest_wait_replicas=wait)
        async with open_resources(settings, clock=fixed_clock()) as res:
            await res.redis.set(keys.notification_key(nid), "not a ledger hash")
            with pytest.raises(ResponseError) as caught:
                await res.store.claim([nid], 0, 60_000, owner="o")
            raised.append(str(caught.value))
            assert data_error(caught.value), caught.value
    assert raised[0] == raised[1]


async def test_a_wait_refused_is_an_error_not_replicas_missing(
    tmp_path: Path, primary_and_replica: tuple[str, subprocess.Popen[bytes]]
) -> None:
    """A WAIT the server refuses (an ACL without it, a proxy that does not pass it) is an
    error: read as no replica confirming, nothing would ever be sent again while every log
    line blamed the replicas."""
    url, _ = primary_and_replica
    primary = redis.Redis.from_url(url)
    primary.acl_setuser(
        "nowait",
        enabled=True,
        passwords=["+secret-secret"],
        keys=["~*"],
        channels=["&*"],
        commands=["+@all", "-wait"],
    )
    settings = make_settings(
        tmp_path,
        redis_url=url.replace("redis://", "redis://nowait:secret-secret@"),
        ingest_wait_replicas=1,
    )
    async with open_resources(settings, clock=fixed_clock()) as res:
        await ledger_entries(res.store, pending("n1"))
        before = await entry(res.store, "n1")
        with pytest.raises(WaitRefused) as refused:
            await res.store.claim(["n1"], NOW_MS, 60_000, owner="o")
        assert isinstance(refused.value.__cause__, NoPermissionError)
        assert await entry(res.store, "n1") == before  # its claim undone: nothing sent
    async with TestClient(TestServer(create_app(settings, clock=fixed_clock()))) as client:
        resp = await client.post("/v1/transitions", json=transition(), headers=auth())
        assert resp.status == 503  # stored, but not known to be replicated: a retry is a duplicate


async def test_a_due_message_whose_claim_is_unconfirmed_waits_on_the_due_index(
    tmp_path: Path, primary_and_replica: tuple[str, subprocess.Popen[bytes]]
) -> None:
    """An SMS held for the recipient's quiet hours, due while the replica is away: each
    release claims it, finds the claim unconfirmed, undoes it (deferred again, still on
    the due index, no attempt counted) and sends nothing; once the replica is back, the
    next release sends it once."""
    url, replica = primary_and_replica
    primary = redis.Redis.from_url(url)
    settings = make_settings(
        tmp_path, redis_url=url, ingest_wait_replicas=1, ingest_wait_timeout_ms=300
    )
    tokyo = transition(
        recipient={
            "name": "Ana",
            "phone": "+33612345678",
            "locale": "ja_JP",
            "timezone": "Asia/Tokyo",
        }
    )
    sms = notification_id_of("acme", "shp_123", "evt_1", "sms")
    async with TestClient(TestServer(create_app(settings, clock=fixed_clock()))) as client:
        await post(client, tokyo)  # 23:00 in Tokyo: the SMS waits for the morning
    await run_worker(settings)
    before = primary.hgetall(keys.notification_key(sms))
    assert before[b"st"] == b"deferred"
    morning = NOW + timedelta(hours=10)
    os.kill(replica.pid, signal.SIGSTOP)
    try:
        async with open_resources(settings, clock=fixed_clock(morning)) as res:
            for _ in range(3):
                assert await release_due({"res": res, "pipeline": Pipeline(res)}) == 0
                assert primary.hgetall(keys.notification_key(sms)) == before
                assert await res.store.due(int(morning.timestamp() * 1000), 10) == [sms]
        assert not outbox_files(settings, ".sms.json")
    finally:
        os.kill(replica.pid, signal.SIGCONT)
    wait_until(lambda: primary.wait(1, 100) == 1, "the replica to confirm again")
    async with open_resources(settings, clock=fixed_clock(morning)) as res:
        assert await release_due({"res": res, "pipeline": Pipeline(res)}) == 1
        assert await release_due({"res": res, "pipeline": Pipeline(res)}) == 0
    assert len(outbox_files(settings, ".sms.json")) == 1


@pytest.mark.timeout(120)
def test_a_worker_sends_what_waited_for_the_replica_by_itself_once_it_is_back(
    tmp_path: Path, primary_and_replica: tuple[str, subprocess.Popen[bytes]]
) -> None:
    """`notifier serve` and `notifier worker` as processes, waiting for the replica: a
    transition posted while the replica is frozen (503, stored) has its messages held
    back, and sent once, with nobody waking anything, once the replica is back (the
    worker's sweep finds the transition that waited)."""
    url, replica = primary_and_replica
    port = free_port()
    outbox = tmp_path / "outbox"
    env = process_env(
        tmp_path,
        port,
        NOTIFIER_REDIS_URL=url,
        NOTIFIER_INGEST_WAIT_REPLICAS="1",
        NOTIFIER_INGEST_WAIT_TIMEOUT_MS="300",
    )
    procs = [
        spawn_notifier(["serve"], tmp_path, **env),
        spawn_notifier(["worker"], tmp_path, **env),
    ]
    readers = [Reader(proc) for proc in procs]

    def sent(shipment: str) -> int:
        return len([p for p in (outbox / "acme" / shipment).glob("*") if p.is_file()])

    def delivered(shipment: str) -> dict[str, Any]:
        # final: no stall check on the real clock adds news
        return transition(
            event_id=f"e-{shipment}",
            shipment_id=shipment,
            status="delivered",
            occurred_at=just_now(),
        )

    try:
        wait_until(lambda: healthy(port), "notifier serve", seconds=60)
        assert post_over_http(port, [delivered("shp_a")])[0] == 202
        wait_until(lambda: sent("shp_a") == 2, "the email and SMS of the first")
        os.kill(replica.pid, signal.SIGSTOP)
        try:
            status, _, body = post_over_http(port, [delivered("shp_b")])
            assert status == 503, body  # stored, unconfirmed: its drain runs at once
            time.sleep(3)
            assert sent("shp_b") == 0
        finally:
            os.kill(replica.pid, signal.SIGCONT)
        wait_until(lambda: sent("shp_b") == 2, "the held messages, once the replica is back", 45)
        time.sleep(1)  # anything sent twice would show up now
        assert (sent("shp_a"), sent("shp_b")) == (2, 2)
    finally:
        for proc in procs:
            proc.terminate()
        outputs = []
        for proc, reader in zip(procs, readers, strict=True):
            proc.wait(timeout=30)
            outputs.append(reader.text())
    assert "undone, nothing sent" in outputs[1]
    assert "Traceback" not in outputs[1], outputs[1][-3000:]
