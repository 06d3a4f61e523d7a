"""``NOTIFIER_INGEST_WAIT_REPLICAS`` on the worker's side: a message is sent only once enough
replicas hold its claim (and the decision before it). Without them its claim is handed back
unsent and tried again; once they answer, it is sent once. A failover can then not lose
the claim of a message that went out (a new primary without it would have the event
decided and sent again)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
import redis
from aiohttp.test_utils import TestClient, TestServer

from notifier import worker
from notifier.app import create_app
from notifier.models import notification_id_of
from notifier.resources import open_resources
from notifier.store import keys, wake
from notifier.worker import build_worker
from tests.conftest import (
    auth,
    fixed_clock,
    make_settings,
    outbox_files,
    post,
    run_worker,
    transition,
    wait_until,
)


async def test_a_message_goes_out_only_once_a_replica_holds_its_claim(
    tmp_path: Path,
    primary_and_replica: tuple[str, subprocess.Popen[bytes]],
    monkeypatch: pytest.MonkeyPatch,
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
            # The worker decides it, claims its email, finds no replica holding the claim:
            # it hands the claim back and sends nothing, trying again more slowly each time,
            # for as long as it waits out an outage (here a second), then the job fails.
            monkeypatch.setattr(worker, "OUTAGE_WAIT_S", 1.0)
            monkeypatch.setattr(worker, "UNCONFIRMED_PAUSE_S", 0.05)
            attempt = build_worker(
                settings, burst=True, handle_signals=False, poll_delay_s=0, clock=fixed_clock()
            )
            try:
                await attempt.main()
            finally:
                await attempt.close()
            assert attempt.jobs_failed == 1
            assert len(outbox_files(settings, ".eml")) == 1
            entry = primary.hgetall(keys.notification_key(email))
            assert entry[b"st"] == b"sending" and b"sent" not in entry, entry
            assert entry[b"claimed"] == b"0", entry  # its claim handed back: free to take
        finally:
            os.kill(replica.pid, signal.SIGCONT)
    wait_until(
        lambda: primary.info("replication")["connected_slaves"] == 1 and primary.wait(1, 100) == 1,
        "the replica to confirm again",
    )
    # the entry is taken over from the drain that failed (claim_idle_s), and sent once
    async with open_resources(settings, clock=fixed_clock()) as res:
        await wake(res.queue, range(settings.partitions))
    await run_worker(settings)
    emails = outbox_files(settings, ".eml")
    assert len(emails) == 2 and sum(email in p.name for p in emails) == 1
