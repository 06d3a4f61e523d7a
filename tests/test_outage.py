"""Redis stalls and restarts under real processes: the worker rides them out, nothing is lost.

`notifier serve` (the API) and `notifier worker` run as processes against a redis-server of
this test's own (AOF on, as deployed), which is paused with ``CLIENT PAUSE`` and restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import signal
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from arq import worker as arq_worker
from redis.exceptions import ConnectionError as RedisConnectionError

from notifier.channels.base import Lease, lease_clock
from notifier.delivery import Deliverer, _Unrecorded
from notifier.models import ChannelKind
from notifier.pipeline import Pipeline
from notifier.resources import data_dir, open_resources
from notifier.settings import Settings
from notifier.worker import build_worker
from tests.conftest import (
    API_KEYS,
    fixed_clock,
    free_port,
    healthy,
    history,
    make_settings,
    outbox_files,
    post_over_http,
    read_whole_inbox,
    spawn_notifier,
    start_redis,
    stop_worker,
    transition,
    wait_until,
)
from tests.conftest import post as post_in_process
from tests.fakes import CountingChannel

AOF = ("--save", "", "--appendonly", "yes", "--appendfsync", "always")


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """redis-server (AOF), `notifier serve` and `notifier worker`, sharing it."""
    redis_port, api_port = free_port(), free_port()
    data = tmp_path / "redis"
    data.mkdir()
    server = start_redis(redis_port, data, *AOF)
    policies = tmp_path / "policies"
    shutil.copytree(data_dir("policies", None), policies)
    (policies / "acme.yaml").write_text("quiet_hours: {sms: null}\n")  # the real clock's hour
    env = {
        "NOTIFIER_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "NOTIFIER_API_KEYS": json.dumps(API_KEYS),
        "NOTIFIER_OUTBOX_DIR": str(tmp_path / "outbox"),
        "NOTIFIER_POLICIES_DIR": str(policies),
        "NOTIFIER_REDIS_TIMEOUT_S": "1",
        "NOTIFIER_PORT": str(api_port),
    }
    api = spawn_notifier(["serve"], tmp_path, **env)
    worker = spawn_notifier(["worker", "--heartbeat", str(tmp_path / "alive")], tmp_path, **env)
    wait_until(lambda: healthy(api_port) or api.poll() is not None, "notifier serve")
    state: dict[str, Any] = {
        "api_port": api_port,
        "redis_port": redis_port,
        "data": data,
        "server": server,
        "api": api,
        "worker": worker,
        "outbox": tmp_path / "outbox",
        "heartbeat": tmp_path / "alive",
    }
    try:
        yield state
    finally:
        for proc in (worker, api):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        state["worker_output"] = worker.communicate(timeout=30)[0]
        api.communicate(timeout=30)
        state["server"].terminate()
        state["server"].wait(timeout=10)


def batch(prefix: str, n: int) -> list[dict[str, Any]]:
    at = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    return [
        transition(event_id=f"{prefix}{i}", shipment_id=f"{prefix}{i}", occurred_at=at)
        for i in range(n)
    ]


def emails(outbox: Path) -> list[Path]:
    return sorted(outbox.rglob("*.eml")) if outbox.is_dir() else []


def until_accepted(port: int, items: list[dict[str, Any]]) -> None:
    """Post as the tracking backend does: again after a 503, until Redis took every event."""
    outcome: list[Any] = []

    def taken() -> bool:
        status, headers, body = post_over_http(port, items)
        outcome[:] = [status, headers, body]
        return status == 202

    wait_until(taken, "the API to take the batch", seconds=30)
    body = outcome[2]
    assert body["accepted"] + body["duplicates"] == len(items)


@pytest.mark.timeout(150)
def test_the_worker_rides_out_a_redis_pause_and_a_restart(deployment: dict[str, Any]) -> None:
    port, outbox, worker = deployment["api_port"], deployment["outbox"], deployment["worker"]

    until_accepted(port, batch("a", 10))
    wait_until(lambda: len(emails(outbox)) == 10, "the first ten emails", seconds=30)
    assert deployment["heartbeat"].is_file()  # what compose.yaml's health check looks at

    # A stall while the worker is busy with a backlog: every client blocks for 3 s (longer
    # than the 1 s Redis timeout), drains in the middle of a batch included
    until_accepted(port, batch("m", 300))
    control = redis.Redis(host="127.0.0.1", port=deployment["redis_port"])
    control.execute_command("CLIENT", "PAUSE", "3000", "ALL")
    status, headers, body = post_over_http(port, batch("b", 10))
    assert status == 503 and headers["Retry-After"], body
    assert body["error"]["code"] == "unavailable"
    until_accepted(port, batch("b", 10))  # the backend retries; some may be duplicates now
    wait_until(
        lambda: len(emails(outbox)) == 320 or worker.poll() is not None,
        "emails after the stall",
        seconds=60,
    )
    assert worker.poll() is None, "the worker exited on a Redis stall"

    # A restart: Redis goes away (AOF keeps what it had), the API answers 503, then recovers
    deployment["server"].terminate()
    deployment["server"].wait(timeout=10)
    status, headers, _ = post_over_http(port, batch("c", 10))
    assert status == 503 and headers["Retry-After"]
    deployment["server"] = start_redis(deployment["redis_port"], deployment["data"], *AOF)
    control.close()
    until_accepted(port, batch("c", 10))
    wait_until(
        lambda: len(emails(outbox)) == 330 or worker.poll() is not None,
        "emails after the restart",
        seconds=40,
    )
    assert worker.poll() is None, "the worker exited on a Redis restart"

    # nothing lost, nothing twice: one email and one SMS per shipment
    per_shipment = sorted(p.parent.name for p in emails(outbox))
    expected = [f"{x}{i}" for x in "abc" for i in range(10)] + [f"m{i}" for i in range(300)]
    assert per_shipment == sorted(expected)
    assert len(list(outbox.rglob("*.sms.json"))) == 330

    worker.send_signal(signal.SIGTERM)
    output = worker.communicate(timeout=30)[0]
    assert worker.returncode == 0, output
    assert "the worker waits for it" in output and "Redis answers again" in output
    assert "Traceback" not in output
    assert "ana@example.com" not in output and "+33612345678" not in output


async def test_a_redis_error_while_starting_a_job_gives_its_slot_back(tmp_path: Path) -> None:
    """arq takes a job slot before asking Redis about the job and gives it back only on a
    WATCH conflict: every other Redis error used to keep it, until the worker could start
    no job at all."""
    settings = make_settings(tmp_path, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    worker = build_worker(settings, handle_signals=False)
    try:
        for _ in range(settings.worker_max_jobs + 1):
            with pytest.raises((redis.RedisError, OSError)):
                await worker.start_jobs([b"job-1"])
        assert worker.job_counter == 0
        assert not worker.sem.locked()
    finally:
        await worker.pool.aclose()


async def test_an_error_after_the_slot_was_given_back_does_not_give_it_back_twice(
    settings: Settings,
) -> None:
    """The release must happen once: an UNWATCH that fails on the way out of a job that was
    not started (already gone from the queue) used to release its slot a second time, and
    asyncio's BoundedSemaphore raised in a done callback."""
    worker = build_worker(settings, handle_signals=False)
    real = worker.pool

    class FailingReset(type(real.pipeline())):  # type: ignore[misc]
        async def reset(self) -> None:
            await super().reset()
            raise redis.ConnectionError("connection lost during UNWATCH")

    class Pool:
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def pipeline(self, transaction: bool = True) -> Any:
            return FailingReset(real.connection_pool, real.response_callbacks, transaction, None)

    worker._pool = Pool()
    slots = worker.sem._value  # type: ignore[attr-defined]
    try:
        for _ in range(3):
            with pytest.raises(redis.ConnectionError):
                await worker.start_jobs([b"job-not-queued"])
        assert worker.job_counter == 0
        assert worker.sem._value == slots  # type: ignore[attr-defined]
    finally:
        await real.aclose()


async def test_a_round_that_redis_broke_off_is_taken_back_at_once(
    client: Any, settings: Settings
) -> None:
    """Redis went away in the middle of a delivery round (its first send recorded, the
    answer lost): the same worker takes back the claims of that round at its next one,
    instead of leaving them to their lease, which held the inbox entry back until it was
    buried as failing and the rest of the round never sent."""
    await post_in_process(client, transition())
    async with open_resources(settings, clock=fixed_clock()) as res:
        entries = await read_whole_inbox(res, "worker-1")
        pipeline = Pipeline(res)
        record = res.store.mark_sent

        async def answer_lost(*args: Any, **kwargs: Any) -> None:
            await record(*args, **kwargs)
            raise redis.ConnectionError("Connection closed by server.")

        res.store.mark_sent = answer_lost  # type: ignore[method-assign]
        with pytest.raises(redis.ConnectionError):
            await pipeline.process(entries)
        assert len(outbox_files(settings)) == 1, "the round went on after Redis failed"
        del res.store.mark_sent  # Redis is back: the drain goes on with the same entries

        report = await pipeline.process(entries)
        assert report.unsettled == set() and report.delivery.busy == []
        assert len(outbox_files(settings)) == 2  # the rest of the round, nothing twice
        statuses = [d["delivery"]["status"] for d in await history(client)]
        assert statuses == ["sent"] * 2


async def test_concurrent_rounds_hand_back_an_interrupted_rounds_claims_once(
    settings: Settings,
) -> None:
    """Two drains and release_due share one Deliverer: after Redis comes back they all start
    a round at once, and the interrupted round's claims are handed back by one of them."""
    async with open_resources(settings, clock=fixed_clock()) as res:
        deliverer = Deliverer(res)
        deliverer._abandoned["round-1"] = (None, ["n_a", "n_b"])
        released: list[tuple[tuple[str, ...], str]] = []

        async def slow_release(ids: list[str], owner: str, scope: int | None = None) -> None:
            await asyncio.sleep(0.01)  # a round trip: the other rounds run meanwhile
            released.append((tuple(ids), owner))

        res.store.release = slow_release  # type: ignore[method-assign]
        reports = await asyncio.gather(*(deliverer.deliver([]) for _ in range(3)))
        assert released == [(("n_a", "n_b"), "round-1")]
        assert all(r.sent == [] for r in reports)
        assert deliverer._abandoned == {}


async def test_a_partition_whose_master_is_away_holds_up_no_round_of_another(
    settings: Settings,
) -> None:
    """What a round left when Redis failed (sends a provider accepted, to record; claims to
    hand back): a round of its own partition takes it up first, and fails while that
    partition's master is away; a round of another partition takes it up on the side, and
    goes on without waiting for it. Before, every round of every partition tried the dead
    master first, and failed (found by a review); recording only in the partition's own
    rounds would let the claims lapse and the messages go out again (a second review)."""
    async with open_resources(settings, clock=fixed_clock()) as res:
        deliverer = Deliverer(res)
        deliverer._abandoned["round-3"] = (3, ["n_a"])
        deliverer._unrecorded.append(
            _Unrecorded("round-3", 3, [("n_b", "outbox", "x")], {}, {}, {}, "", {}, {})
        )
        away, answers = {3}, asyncio.Event()
        calls: list[tuple[str, int | None]] = []

        async def partition(call: str, scope: int | None) -> None:
            calls.append((call, scope))
            if scope == 3:
                await answers.wait()  # partition 3's master: no answer yet
                if 3 in away:
                    raise RedisConnectionError("partition 3's master is away")

        async def release(ids: list[str], owner: str, scope: int | None = None) -> None:
            await partition("release", scope)

        async def mark_sent(*args: Any, **kwargs: Any) -> None:
            await partition("mark_sent", args[3])

        res.store.release = release  # type: ignore[method-assign]
        res.store.mark_sent = mark_sent  # type: ignore[method-assign]
        report = await deliverer.deliver([], scope=5)  # done while partition 3 hangs
        assert report.sent == []
        await asyncio.sleep(0)
        assert calls == [("mark_sent", 3)]
        taking_up = deliverer._others
        assert taking_up is not None and not taking_up.done()
        await deliverer.deliver([], scope=6)
        assert deliverer._others is taking_up  # one at a time
        answers.set()
        await deliverer.settle()
        assert deliverer._unrecorded and deliverer._abandoned  # kept: still away
        with pytest.raises(RedisConnectionError):
            await deliverer.deliver([], scope=3)  # its own round needs it: fails
        away.clear()
        calls.clear()
        await deliverer.deliver([], scope=5)  # back: another partition's round records it
        await deliverer.settle()
        assert calls == [("mark_sent", 3), ("release", 3)]
        assert not deliverer._unrecorded and not deliverer._abandoned


async def test_a_stopped_worker_stops_polling_even_if_its_cancellation_was_lost(
    settings: Settings,
) -> None:
    """Once told to stop, a worker's next poll ends its loop. A cancellation can be lost
    inside redis-py (its timeouts may turn one into a TimeoutError, which the worker reads
    as a Redis outage and rides out): in CI a worker was still polling 20 minutes after its
    SIGTERM, taking no job."""
    worker = build_worker(settings, handle_signals=False, poll_delay_s=0.01, clock=fixed_clock())
    worker.main_task = asyncio.create_task(worker.main())
    try:
        await asyncio.sleep(0.3)  # started, polling
        worker.handle_sig_wait_for_completion(signal.SIGTERM)
        for _ in range(300):
            if worker.main_task.done():
                break
            await asyncio.sleep(0.05)
        assert worker.main_task.done(), "the worker did not stop after SIGTERM"
        # as if the cancellation had been swallowed: the loop polls again, and stops there
        with pytest.raises(asyncio.CancelledError):
            await asyncio.create_task(worker._poll_iteration())
    finally:
        worker.main_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await worker.main_task
        await worker.close()


async def test_a_closed_worker_stops_polling_even_if_its_cancellation_was_lost(
    settings: Settings,
) -> None:
    """The app closes its in-process worker, then cancels its task (tests stop theirs with
    ``stop_worker``): once told to stop, the worker's next poll ends its loop, so a
    cancellation lost inside redis-py cannot leave it polling. In CI a test that only
    cancelled its worker's task hung, and the worker went on into the next tests."""
    worker = build_worker(settings, handle_signals=False, poll_delay_s=0.01, clock=fixed_clock())
    task = asyncio.ensure_future(worker.main())
    try:
        await asyncio.sleep(0.3)  # started, polling
        worker.handle_sig(signal.SIGUSR1)  # what close() does first
        # as if that cancellation had been swallowed: the loop polls again, and stops there
        with pytest.raises(asyncio.CancelledError):
            await asyncio.create_task(worker._poll_iteration())
    finally:
        await stop_worker(worker, task)


async def test_a_worker_stopped_while_redis_hangs_records_what_was_accepted(
    client: Any, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGTERM while Redis hung (a CLIENT PAUSE, a restart): the drain was cancelled after
    the provider accepted its messages, in the middle of recording them, and the process
    exited with them unrecorded; once their claims lapsed another worker sent them all
    again (998 emails in an operator's drill). The record is kept through the
    cancellation, and the stopping worker records it once Redis answers, while the claims
    are still its own; nothing is handed to a provider twice afterwards."""
    await post_in_process(client, transition())
    async with open_resources(settings, clock=fixed_clock()) as res:
        email, sms = CountingChannel("email-provider"), CountingChannel("sms-provider")
        res.channels, res.providers = {ChannelKind.EMAIL: email, ChannelKind.SMS: sms}, {}
        entries = await read_whole_inbox(res, "worker-1")
        pipeline = Pipeline(res)
        record = res.store.mark_sent
        hung = asyncio.Event()

        async def redis_hangs(*args: Any, **kwargs: Any) -> None:
            hung.set()
            await asyncio.Event().wait()  # until the stop cancels the drain

        res.store.mark_sent = redis_hangs  # type: ignore[method-assign]
        drain = asyncio.create_task(pipeline.process(entries))
        await hung.wait()
        first = email if email.sent else sms  # the batch sent first, now being recorded
        second = sms if first is email else email
        assert sum(first.sent.values()) == 1 and second.sent == {}
        drain.cancel()  # the stop's 10 s are up
        with pytest.raises(asyncio.CancelledError):
            await drain
        assert [len(r.sent) for r in pipeline.deliverer._unrecorded] == [1]

        answers = iter([False, False, True])  # Redis answers again on the third try

        async def back_later(*args: Any, **kwargs: Any) -> None:
            if not next(answers):
                raise RedisConnectionError("Connection refused")
            await record(*args, **kwargs)

        res.store.mark_sent = back_later  # type: ignore[method-assign]
        with caplog.at_level(logging.WARNING, logger="notifier"):
            await pipeline.deliverer.stop()  # as the worker's on_shutdown does
        assert pipeline.deliverer._unrecorded == []
        assert pipeline.deliverer._abandoned == {}  # the unsent one's claim handed back
        assert "stopping: 1 messages a provider accepted wait for Redis" in caplog.text
        del res.store.mark_sent
        # another worker takes the entries over: nothing goes out twice, the rest goes out
        report = await Pipeline(res).process(entries)
        assert report.delivery.busy == []
        assert list(first.sent.values()) == [1] and list(second.sent.values()) == [1]
    sent = [d for d in await history(client) if d["delivery"]["status"] == "sent"]
    assert len(sent) == 2


async def test_a_send_under_way_when_the_stop_cancels_ends_and_is_recorded(
    client: Any, settings: Settings
) -> None:
    """The stop's cancellation came while the provider worked through a batch: its answers
    were dropped, the claims handed straight back, and the next worker sent the messages
    again (a review). The send under way now ends, what it accepted is recorded, and its
    claims are not handed back."""
    await post_in_process(client, transition())
    async with open_resources(settings, clock=fixed_clock()) as res:
        email, sms = CountingChannel("email-provider"), CountingChannel("sms-provider")
        email.hold, sms.hold = asyncio.Event(), asyncio.Event()
        res.channels, res.providers = {ChannelKind.EMAIL: email, ChannelKind.SMS: sms}, {}
        entries = await read_whole_inbox(res, "worker-1")
        pipeline = Pipeline(res)
        drain = asyncio.create_task(pipeline.process(entries))
        entered = asyncio.ensure_future(
            asyncio.wait(
                [asyncio.ensure_future(c.entered.wait()) for c in (email, sms)],
                return_when=asyncio.FIRST_COMPLETED,
            )
        )
        await entered
        first = email if email.entered.is_set() else sms
        drain.cancel()  # while the provider still works on the batch
        await asyncio.sleep(0)
        assert not drain.done()  # the send under way is not cut
        email.hold.set()
        sms.hold.set()
        with pytest.raises(asyncio.CancelledError):
            await drain
        assert sum(first.sent.values()) == 1
        await pipeline.deliverer.stop()
        held = {nid for token in pipeline.deliverer._abandoned.values() for nid in token[1]}
        assert not held & set(first.sent)
        await Pipeline(res).process(entries)
        assert all(n == 1 for c in (email, sms) for n in c.sent.values())
        assert sum(email.sent.values()) == sum(sms.sent.values()) == 1
    sent = [d for d in await history(client) if d["delivery"]["status"] == "sent"]
    assert len(sent) == 2


async def test_a_stopping_worker_gives_up_a_record_once_its_claims_lapsed(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """It waits for Redis only while the claims are its own: after that another worker may
    send them, and the log says so as an error (it does not wait for ever)."""
    async with open_resources(settings, clock=fixed_clock()) as res:
        deliverer = Deliverer(res)

        async def refused(*args: Any, **kwargs: Any) -> None:
            raise RedisConnectionError("Connection refused")

        res.store.mark_sent = refused  # type: ignore[method-assign]
        lapsed = Lease(lease_clock() - 1)
        sent = [("n_a", "2026-11-21T14:00:00+00:00", "outbox:x")]
        deliverer._unrecorded.append(
            _Unrecorded("round-1", None, sent, {}, {}, {}, "2026-11-21", {}, {}, lapsed)
        )
        with caplog.at_level(logging.ERROR, logger="notifier"):
            await deliverer.stop()
        assert deliverer._unrecorded == []
        assert "another worker may send them again" in caplog.text


async def test_a_record_being_taken_up_when_the_stop_cancels_is_kept(settings: Settings) -> None:
    """A round starts by recording what an earlier round left (``_take_up``): it took the
    record off its list, then the stop cancelled it while Redis hung, and the record was
    gone: the stopping worker never recorded it, and its messages went out again (a
    review). It goes back on the list."""
    async with open_resources(settings, clock=fixed_clock()) as res:
        deliverer = Deliverer(res)
        sent = [("n_b", "2026-11-21T14:00:00+00:00", "outbox:x")]
        left = _Unrecorded("round-1", None, sent, {}, {}, {}, "2026-11-21", {}, {})
        deliverer._unrecorded.append(left)
        hung = asyncio.Event()

        async def redis_hangs(*args: Any, **kwargs: Any) -> None:
            hung.set()
            await asyncio.Event().wait()

        res.store.mark_sent = redis_hangs  # type: ignore[method-assign]
        round_ = asyncio.create_task(deliverer.deliver(["n_c"]))
        await hung.wait()
        round_.cancel()
        with pytest.raises(asyncio.CancelledError):
            await round_
        assert deliverer._unrecorded == [left]


async def test_a_poll_that_asked_redis_nothing_ends_no_outage(
    settings: Settings, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With Redis dead and every job slot's drain waiting for it, a poll asks Redis nothing
    (nor after a stop signal), yet it logged "Redis answers again after 0.1 s" (an
    operator's drill). Only a poll that asked Redis ends the outage."""

    async def polled(self: Any) -> None:  # arq's poll, here as one that Redis answered
        return None

    monkeypatch.setattr(arq_worker.Worker, "_poll_iteration", polled)
    worker = build_worker(settings, handle_signals=False, clock=fixed_clock())
    try:
        worker._outage_since = time.monotonic() - 3
        with caplog.at_level(logging.WARNING, logger="notifier"):
            worker.job_counter = worker.max_jobs  # every slot taken: no job is asked for
            await worker._poll_iteration()
            worker.job_counter, worker.allow_pick_jobs = 0, False  # told to stop
            await worker._poll_iteration()
            assert "answers again" not in caplog.text and worker._outage_since is not None
            worker.allow_pick_jobs = True
            await worker._poll_iteration()
        assert "Redis answers again after 3." in caplog.text
        assert worker._outage_since is None
    finally:
        await worker.pool.aclose()
