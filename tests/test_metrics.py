"""GET /metrics: counters and histograms from the processes, gauges from Redis; with
NOTIFIER_METRICS_DIR one scrape of the API adds up the worker processes too."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from notifier.app import create_app
from notifier.resources import data_dir
from notifier.settings import Settings
from tests.conftest import (
    API_KEYS,
    auth,
    free_port,
    healthy,
    make_settings,
    run_worker,
    spawn_notifier,
    transition,
    wait_until,
)

Client = TestClient[Any, Any]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

#: Personal data and merchant text the transitions carry: none may reach a label.
PRIVATE = ("ana@example.com", "+33612345678", "Ana", "shp_m", "1Z999AA10123456784", "Leipzig")


def samples(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(found: Samples, name: str, **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


def total(found: Samples, name: str, **labels: str) -> float:
    """The sum over every sample of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in found.items() if n == name and want <= ls)


async def scrape(client: Client) -> tuple[str, Samples]:
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain; version=")
    text = await resp.text()
    return text, samples(text)


async def test_metrics_count_ingest_decisions_and_read_redis(
    client: Client, settings: Settings
) -> None:
    _, before = await scrape(client)
    items = [transition(event_id=f"evt_m{i}", shipment_id=f"shp_m{i}") for i in range(3)]
    resp = await client.post("/v1/transitions", json={"transitions": items}, headers=auth())
    assert resp.status == 202
    resp = await client.post("/v1/transitions", json=items[0], headers=auth())  # a duplicate
    assert (await resp.json())["duplicates"] == 1
    bad = [transition(event_id="evt_bad", status="teleported"), transition(event_id="evt_m9")]
    resp = await client.post("/v1/transitions", json={"transitions": bad}, headers=auth())
    assert resp.status == 422
    assert (await client.post("/v1/transitions", json=items[0])).status == 401

    text, queued = await scrape(client)
    delta = {
        r: value(queued, "notifier_transitions_total", result=r)
        - value(before, "notifier_transitions_total", result=r)
        for r in ("accepted", "duplicate", "conflict", "rejected")
    }
    assert delta == {"accepted": 4, "duplicate": 1, "conflict": 0, "rejected": 1}
    route = {"route": "/v1/transitions", "method": "POST"}
    for status, n in (("202", 2), ("422", 1), ("401", 1)):
        counted = value(queued, "notifier_http_requests_total", **route, status=status)
        assert counted - value(before, "notifier_http_requests_total", **route, status=status) == n
    assert value(queued, "notifier_redis_up") == 1
    # the four accepted transitions wait in the inbox, the oldest for some (non-negative) time
    assert total(queued, "notifier_inbox_depth") == 4
    assert len({ls for n, ls in queued if n == "notifier_inbox_depth"}) == settings.partitions
    assert total(queued, "notifier_inbox_oldest_age_seconds") >= 0
    assert value(queued, "notifier_dead_letters", kind="notifications") == 0
    assert value(queued, "notifier_dead_letters", kind="inbox") == 0
    assert value(queued, "notifier_workers_alive") == 0

    await run_worker(settings)
    text, done = await scrape(client)
    assert total(done, "notifier_inbox_depth") == 0
    assert total(done, "notifier_inbox_oldest_age_seconds") == 0

    def decided(**labels: str) -> float:
        return total(done, "notifier_decisions_total", **labels) - total(
            before, "notifier_decisions_total", **labels
        )

    # out for delivery with an email and a phone: sent on both channels, four shipments;
    # the fixed clock (14:00 UTC, 15:00 in Paris) is outside quiet hours
    assert decided(outcome="sent", rule="notify", channel="email") == 4
    assert decided(outcome="sent", rule="notify", channel="sms") == 4
    assert decided() == 8
    latency = "notifier_ingest_to_decision_seconds_count"
    assert value(done, latency) - value(before, latency) == 4
    assert value(done, "notifier_due_messages") == 0
    for private in PRIVATE:
        assert private not in text


async def test_metrics_say_when_redis_is_down(tmp_path: Path) -> None:
    down = make_settings(
        tmp_path, redis_url=f"redis://127.0.0.1:{free_port()}/0", redis_timeout_s=0.5
    )
    async with TestClient(TestServer(create_app(down))) as c:
        text, found = await scrape(c)
    assert value(found, "notifier_redis_up") == 0
    assert "notifier_inbox_depth" not in text


@pytest.fixture
def deployment(tmp_path: Path, redis_url: str) -> Iterator[dict[str, Any]]:
    """`notifier serve` and two `notifier worker` processes sharing one metrics folder."""
    policies = tmp_path / "policies"
    shutil.copytree(data_dir("policies", None), policies)
    (policies / "acme.yaml").write_text("quiet_hours: {sms: null, email: null}\n")
    port = free_port()
    env = {
        "NOTIFIER_REDIS_URL": redis_url,
        "NOTIFIER_API_KEYS": json.dumps(API_KEYS),
        "NOTIFIER_OUTBOX_DIR": str(tmp_path / "outbox"),
        "NOTIFIER_POLICIES_DIR": str(policies),
        "NOTIFIER_METRICS_DIR": str(tmp_path / "metrics"),
        "NOTIFIER_LOG_FORMAT": "json",
    }
    procs = [spawn_notifier(["serve", "--port", str(port)], tmp_path, **env)]
    procs += [spawn_notifier(["worker"], tmp_path, **env) for _ in range(2)]
    try:
        wait_until(lambda: healthy(port), "the API to answer")
        yield {"port": port, "outbox": tmp_path / "outbox", "procs": procs}
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()


def http(port: int, path: str, body: dict[str, Any] | None = None) -> tuple[int, str]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=None if body is None else json.dumps(body).encode(),
        headers={**auth(), "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        return resp.status, resp.read().decode()


@pytest.mark.timeout(120)
def test_one_scrape_adds_up_the_api_and_every_worker(deployment: dict[str, Any]) -> None:
    port, outbox = deployment["port"], deployment["outbox"]
    # real processes run on the real clock: events from a minute ago
    occurred_at = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    items = [
        transition(event_id=f"evt_p{i}", shipment_id=f"shp_p{i}", occurred_at=occurred_at)
        for i in range(40)
    ]
    for start in range(0, 40, 10):
        status, _ = http(port, "/v1/transitions", {"transitions": items[start : start + 10]})
        assert status == 202
    wait_until(
        lambda: len([p for p in outbox.rglob("*") if p.is_file()]) >= 80,
        "the workers to deliver",
        seconds=60,
    )

    def scraped() -> Samples:
        return samples(http(port, "/metrics")[1])

    wait_until(
        lambda: total(scraped(), "notifier_deliveries_total", result="sent") >= 80,
        "the deliveries to be counted",
    )
    found = scraped()
    text = http(port, "/metrics")[1]
    # the API counted what it took, the workers (other processes) what they decided and sent
    assert value(found, "notifier_transitions_total", result="accepted") == 40
    assert total(found, "notifier_decisions_total", outcome="sent") == 80
    assert value(found, "notifier_deliveries_total", channel="email", result="sent") == 40
    assert value(found, "notifier_deliveries_total", channel="sms", result="sent") == 40
    assert value(found, "notifier_ingest_to_decision_seconds_count") == 40
    assert total(found, "notifier_end_to_end_seconds_count") == 80
    assert total(found, "notifier_decision_to_provider_seconds_count") == 80
    assert value(found, "notifier_workers_alive") == 2
    assert total(found, "notifier_inbox_depth") == 0
    for private in PRIVATE:
        assert private not in text
    assert len(list(outbox.rglob("*.eml"))) == 40
    assert len(list(outbox.rglob("*.sms.json"))) == 40


def test_labelled_values_found_once_count_as_before(tmp_path: Path) -> None:
    """The labelled children a process finds once keep counting into the exposition (a
    batch's decisions by label added up in one step); another registry (the multiprocess
    files) gets children of its own, and what was counted before stays where it was."""
    from notifier import metrics

    metrics.configure(None)
    try:
        before = samples(metrics.exposition([]).decode())
        key = {"outcome": "sent", "rule": "milestone", "channel": "email"}
        metrics.decisions([("sent", "milestone", "email")] * 3 + [("suppressed", "quiet", "sms")])
        metrics.decisions([("sent", "milestone", "email")])
        metrics.deliveries("email", "sent", 2)
        metrics.provider_accepted("email", 0.0, 0.0)
        metrics.provider_accepted("email", 0.0, 0.0)
        found = samples(metrics.exposition([]).decode())

        def grew(name: str, **labels: str) -> float:
            return value(found, name, **labels) - value(before, name, **labels)

        assert grew("notifier_decisions_total", **key) == 4
        assert (
            grew("notifier_decisions_total", outcome="suppressed", rule="quiet", channel="sms") == 1
        )
        assert grew("notifier_deliveries_total", channel="email", result="sent") == 2
        assert grew("notifier_end_to_end_seconds_count", channel="email") == 2
        assert grew("notifier_decision_to_provider_seconds_bucket", channel="email", le="+Inf") == 2

        metrics.configure(tmp_path / "mp")
        metrics.decisions([("sent", "milestone", "email")])
        shared = samples(metrics.exposition([]).decode())
        assert value(shared, "notifier_decisions_total", **key) == 1  # only the files' count
    finally:
        metrics.configure(None)


async def test_a_client_that_leaves_mid_upload_is_no_server_error(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    """An upload the client broke off was logged as an unhandled error with a traceback and
    counted status 500: the "API errors" alert paged for a routine client abort (found by
    an operator's drill)."""
    import asyncio

    _, before = await scrape(client)
    route = {"route": "/v1/transitions", "method": "POST"}
    _, writer = await asyncio.open_connection(client.server.host, client.server.port)
    head = (
        b"POST /v1/transitions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + auth()["Authorization"].split()[1].encode() + b"\r\n"
        b"Content-Length: 500\r\n\r\n" + b'{"event_id": "evt_cut", "merc'
    )
    writer.write(head)
    await writer.drain()
    writer.close()
    await writer.wait_closed()
    for _ in range(100):  # until the server has seen it
        _, after = await scrape(client)
        if sum(
            value(after, "notifier_http_requests_total", **route, status=str(s))
            - value(before, "notifier_http_requests_total", **route, status=str(s))
            for s in (400, 499, 500)
        ):
            break
        await asyncio.sleep(0.02)
    assert value(after, "notifier_http_requests_total", **route, status="500") == value(
        before, "notifier_http_requests_total", **route, status="500"
    )
    closed = value(after, "notifier_http_requests_total", **route, status="499")
    assert closed - value(before, "notifier_http_requests_total", **route, status="499") == 1
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text
