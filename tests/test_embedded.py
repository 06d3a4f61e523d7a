"""The embedded default: in-memory store (fakeredis), worker in the API process, outbox files."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient, TestServer
from fakeredis import FakeServer

from notifier.app import create_app
from notifier.models import notification_id_of
from notifier.resources import open_resources
from notifier.settings import DEV_API_KEY, Settings
from notifier.store import chunks
from notifier.store.ledger import PACKED_IDS
from notifier.worker import build_worker
from tests.conftest import fixed_clock, record_of, transition
from tests.test_store_scripts import forget_consumers_case


def embedded_settings(tmp_path: Path, **kw: Any) -> Settings:
    return Settings(_env_file=None, outbox_dir=tmp_path / "outbox", worker_poll_delay_s=0, **kw)  # type: ignore[call-arg]


async def drain(settings: Settings, server: FakeServer) -> None:
    """The in-process worker of `notifier serve`, run in burst mode on the same store."""
    async with open_resources(settings, server=server, clock=fixed_clock()) as res:
        worker = build_worker(
            settings, resources=res, burst=True, handle_signals=False, poll_delay_s=0
        )
        try:
            await worker.main()
        finally:
            await worker.close()
        assert worker.jobs_failed == 0


async def test_embedded_mode_runs_without_redis(tmp_path: Path) -> None:
    settings = embedded_settings(tmp_path)
    assert settings.embedded
    assert settings.effective_api_keys() == {DEV_API_KEY: ["*"]}
    server = FakeServer()
    app = create_app(settings, server=server, run_worker=False)
    async with TestClient(TestServer(app)) as client:
        headers = {"Authorization": f"Bearer {DEV_API_KEY}"}
        resp = await client.post("/v1/transitions", json=transition(), headers=headers)
        assert resp.status == 202
        health = await (await client.get("/healthz")).json()
        assert health["status"] == "ok" and health["mode"] == "embedded"

        await drain(settings, server)
        files = sorted(p.name.split(".", 2)[-1] for p in (tmp_path / "outbox").rglob("*.*"))
        assert files == ["eml", "sms.json"]

        resp = await client.post("/v1/transitions", json=transition(), headers=headers)
        assert (await resp.json())["duplicates"] == 1


async def test_configured_keys_replace_the_development_key(tmp_path: Path) -> None:
    settings = embedded_settings(tmp_path, api_keys={"k_mine_0123456789": ["*"]})
    assert settings.effective_api_keys() == {"k_mine_0123456789": ["*"]}
    async with TestClient(TestServer(create_app(settings, run_worker=False))) as client:
        headers = {"Authorization": f"Bearer {DEV_API_KEY}"}
        resp = await client.post("/v1/transitions", json=transition(), headers=headers)
        assert resp.status == 401


async def test_the_development_key_is_taken_only_from_requests_to_loopback(
    tmp_path: Path,
) -> None:
    """A web page whose name was re-bound to 127.0.0.1 (DNS rebinding), or a tunnel that
    publishes a developer's service, must not act with the key the README prints."""
    settings = embedded_settings(tmp_path)
    async with TestClient(TestServer(create_app(settings, run_worker=False))) as client:
        key = {"Authorization": f"Bearer {DEV_API_KEY}"}
        for host in ("evil.example", "evil.example:8080", "10.0.0.7:8080"):
            resp = await client.post(
                "/v1/transitions", json=transition(), headers={**key, "Host": host}
            )
            assert resp.status == 403, host
            assert "only taken from this machine" in (await resp.json())["error"]["message"]
            resp = await client.get("/v1/merchants/acme/policy", headers={**key, "Host": host})
            assert resp.status == 403, host
            # nor can such a page sign in to the editor with it
            page = await (await client.get("/merchant/sign-in", headers={"Host": host})).text()
            csrf = re.search(r'name="csrf" value="([^"]+)"', page)
            assert csrf is not None
            resp = await client.post(
                "/merchant/sign-in",
                data={"csrf": csrf.group(1), "key": DEV_API_KEY, "next": ""},
                headers={"Host": host, "Origin": f"http://{host}"},
                allow_redirects=False,
            )
            assert resp.status == 403, host
        for host in ("127.0.0.1:8080", "localhost:8080", "[::1]:8080", "localhost"):
            resp = await client.post(
                "/v1/transitions", json=transition(), headers={**key, "Host": host}
            )
            assert resp.status == 202, host
        # nor through a proxy or a tunnel that rewrote Host to 127.0.0.1
        for header in ("X-Forwarded-For", "Forwarded", "X-Forwarded-Host", "Via"):
            resp = await client.get(
                "/v1/merchants/acme/policy",
                headers={**key, "Host": "127.0.0.1:8080", header: "203.0.113.9"},
            )
            assert resp.status == 403, header
    # keys of the operator's own are taken whatever name the service is reached by
    settings = embedded_settings(tmp_path, api_keys={"k_mine_0123456789": ["*"]})
    async with TestClient(TestServer(create_app(settings, run_worker=False))) as client:
        resp = await client.post(
            "/v1/transitions",
            json=transition(),
            headers={"Authorization": "Bearer k_mine_0123456789", "Host": "notifier.example"},
        )
        assert resp.status == 202


async def test_in_process_worker_starts_and_stops_with_the_app(tmp_path: Path) -> None:
    settings = embedded_settings(tmp_path)
    async with TestClient(TestServer(create_app(settings))) as client:
        resp = await client.get("/healthz")
        assert resp.status == 200
    # leaving the block ran the cleanup: worker closed, connections released (no warnings)


async def test_the_in_process_worker_makes_embedded_mode_ready(tmp_path: Path) -> None:
    settings = embedded_settings(tmp_path)
    async with TestClient(TestServer(create_app(settings))) as client:
        for _ in range(200):  # the worker's first poll (bounded)
            resp = await client.get("/readyz")
            if resp.status == 200:
                break
            await asyncio.sleep(0.02)
        body = await resp.json()
        assert resp.status == 200 and body["workers"] == 1, body
    async with TestClient(TestServer(create_app(settings, run_worker=False))) as client:
        resp = await client.get("/readyz")
        assert resp.status == 503 and (await resp.json())["workers"].startswith("none alive")


async def test_embedded_mode_folds_an_ended_shipments_lists_into_chunks(tmp_path: Path) -> None:
    """The in-memory Redis runs the same scripts: compaction (redis.sha1hex, unpack) too."""
    settings = embedded_settings(tmp_path)
    server = FakeServer()
    app = create_app(settings, server=server, run_worker=False)
    headers = {"Authorization": f"Bearer {DEV_API_KEY}"}
    async with TestClient(TestServer(app)) as client:
        for i, status in enumerate(["out_for_delivery", "delivered"]):
            at = f"2026-11-21T1{i}:00:00+01:00"
            body = transition(event_id=f"c{i}", status=status, occurred_at=at)
            assert (await client.post("/v1/transitions", json=body, headers=headers)).status == 202
            await drain(settings, server)
        async with open_resources(settings, server=server, clock=fixed_clock()) as res:
            held = await record_of(res.store, "acme", "shp_123")
            for part in (held.history, held.outcomes):
                [chunk] = part
                assert chunks.is_chunk(chunk) and chunks.count(chunk) == 4
            # the outcomes' chunk packs its ids, and the scripts read it in Lua as fakeredis
            # runs it: a provider's statuses only go up, a settled message is never made again
            [packed] = held.outcomes
            assert chunks.body(packed)[:1] == PACKED_IDS
            where = ("acme", "shp_123")
            nid = notification_id_of("acme", "shp_123", "c1", "sms")
            assert await res.store.provider_status(nid, "delivered", 3, where=where)
            assert not await res.store.provider_status(nid, "sent", 1, where=where)
            assert await res.store.compact([where]) == 1
            assert not await res.store.provider_status(nid, "sent", 1, where=where)
            assert not await res.store.add_notification(*where, nid, b"p", 1, b'{"why": "x"}')
        url = "/v1/merchants/acme/shipments/shp_123/notifications"
        decisions = (await (await client.get(url, headers=headers)).json())["decisions"]
        assert [(d["event_id"], d["delivery"]["status"]) for d in decisions] == [
            ("c0", "sent"),
            ("c0", "sent"),
            ("c1", "sent"),
            ("c1", "sent"),
        ]
        delivered = [d for d in decisions if d["notification_id"] == nid]
        assert [d["delivery"]["provider_status"] for d in delivered] == ["delivered"]
        assert all(
            Path(d["delivery"]["detail"].removeprefix("outbox:")).is_file() for d in decisions
        )


async def test_the_embedded_store_finds_shipments_by_tracking_number(tmp_path: Path) -> None:
    """The commit script's tracking buckets and the lookup's HSCAN MATCH in fakeredis."""
    settings = embedded_settings(tmp_path)
    server = FakeServer()
    app = create_app(settings, server=server, run_worker=False)
    async with TestClient(TestServer(app)) as client:
        headers = {"Authorization": f"Bearer {DEV_API_KEY}"}
        for i, shipment_id in enumerate(["shp_a", "shp:b@c"]):
            body = transition(event_id=f"t{i}", shipment_id=shipment_id, tracking_number="1ZE")
            assert (await client.post("/v1/transitions", json=body, headers=headers)).status == 202
        await drain(settings, server)
    async with open_resources(settings, server=server, clock=fixed_clock()) as res:
        assert await res.store.shipments_tracked_as("acme", "1ZE") == ["shp:b@c", "shp_a"]
        assert await res.store.shipments_tracked_as("acme", "1Z999AA10123456784") == []


async def test_the_embedded_store_forgets_idle_consumers(tmp_path: Path) -> None:
    """The consumers' clean-up script (XINFO CONSUMERS, XGROUP DELCONSUMER) in fakeredis."""
    async with open_resources(
        embedded_settings(tmp_path), server=FakeServer(), clock=fixed_clock()
    ) as res:
        await forget_consumers_case(res.store)
