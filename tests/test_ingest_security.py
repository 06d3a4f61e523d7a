"""Signed ingest (HMAC over timestamp and body, a replay window, secret rotation) and ingest
that waits for Redis replicas (WAIT) before it answers 202."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from aiohttp.test_utils import TestClient, TestServer

from notifier.app import create_app
from notifier.settings import Settings
from notifier.signing import SIGNATURE_HEADER, signature
from tests.conftest import (
    NOW,
    auth,
    fixed_clock,
    make_settings,
    transition,
)

SECRET = "whsec_0123456789abcdef"
OLD_SECRET = "whsec_fedcba9876543210"
T = int(NOW.timestamp())


@pytest.fixture
async def signed(tmp_path: Path, redis_url: str) -> AsyncIterator[TestClient[Any, Any]]:
    settings = make_settings(
        tmp_path,
        redis_url=redis_url,
        ingest_signing_secrets=[SECRET, OLD_SECRET],
        ingest_signature_tolerance_s=300,
    )
    async with TestClient(TestServer(create_app(settings, clock=fixed_clock()))) as c:
        yield c


async def send(client: TestClient[Any, Any], body: bytes, header: str | None) -> Any:
    headers = {**auth(), "Content-Type": "application/json"}
    if header is not None:
        headers[SIGNATURE_HEADER] = header
    return await client.post("/v1/transitions", data=body, headers=headers)


async def test_a_signed_request_is_accepted_with_either_secret(
    signed: TestClient[Any, Any],
) -> None:
    for n, secret in enumerate((SECRET, OLD_SECRET)):
        body = orjson.dumps(transition(event_id=f"evt_signed_{n}"))
        resp = await send(signed, body, f"t={T},v1={signature(secret, T, body)}")
        assert resp.status == 202, await resp.text()
    # several v1 values (a sender mid-rotation signs with both): one matching is enough
    body = orjson.dumps(transition(event_id="evt_signed_both"))
    header = f"t={T},v1={'0' * 64},v1={signature(SECRET, T, body)}"
    assert (await send(signed, body, header)).status == 202


@pytest.mark.parametrize(
    ("header", "says"),
    [
        (None, "missing X-Notifier-Signature"),
        ("", "missing X-Notifier-Signature"),
        ("sha256=abc", "must look like t=<unix time>,v1=<hex digest>"),
        (f"t={T}", "needs one t=<unix time> and a v1=<hex digest>"),
        (f"v1={'a' * 64}", "needs one t=<unix time> and a v1=<hex digest>"),
        (f"t={T - 301},v1={{sig}}", "more than 300 s from the server's clock"),
        (f"t={T + 301},v1={{sig}}", "more than 300 s from the server's clock"),
        (f"t={T},v1={'0' * 64}", "does not match the body"),
        (f"t={T},v1={{other}}", "does not match the body"),
        (f"t={T},v1={{tampered}}", "does not match the body"),
    ],
)
async def test_an_unsigned_stale_or_forged_request_is_refused_and_nothing_is_stored(
    signed: TestClient[Any, Any], redis_url: str, header: str | None, says: str
) -> None:
    body = orjson.dumps(transition(event_id="evt_forged"))
    if header is not None:
        stamp = int(header.split(",")[0].removeprefix("t=")) if header.startswith("t=") else T
        header = header.format(
            sig=signature(SECRET, stamp, body),
            other=signature("whsec_not_the_secret_at_all", T, body),
            tampered=signature(SECRET, T, body.replace(b"acme", b"acmf")),
        )
    resp = await send(signed, body, header)
    assert resp.status == 401, await resp.text()
    error = (await resp.json())["error"]
    assert error["code"] == "unauthorized"
    assert says in error["message"]
    # refused before anything was persisted: the inbox streams are empty
    r = redis.Redis.from_url(redis_url)
    assert not [k for k in r.scan_iter("ntf:inbox:*", _type="stream") if r.xlen(k)]


async def test_the_signature_covers_the_exact_bytes(signed: TestClient[Any, Any]) -> None:
    """Re-serializing the same JSON (other spacing) breaks the signature: the sender signs
    what it sends, the service checks what it got."""
    item = transition(event_id="evt_bytes")
    compact = orjson.dumps(item)
    spaced = orjson.dumps(item, option=orjson.OPT_INDENT_2)
    resp = await send(signed, spaced, f"t={T},v1={signature(SECRET, T, compact)}")
    assert resp.status == 401
    resp = await send(signed, spaced, f"t={T},v1={signature(SECRET, T, spaced)}")
    assert resp.status == 202


async def test_without_secrets_no_signature_is_needed(client: TestClient[Any, Any]) -> None:
    resp = await client.post("/v1/transitions", json=transition(), headers=auth())
    assert resp.status == 202


def test_signing_secrets_must_be_long() -> None:
    with pytest.raises(ValueError, match="at least 16 characters"):
        Settings(ingest_signing_secrets=["short"])


# -- replicas --------------------------------------------------------------------------


async def test_ingest_waits_for_a_replica_and_answers_503_without_one(
    tmp_path: Path, primary_and_replica: tuple[str, subprocess.Popen[bytes]]
) -> None:
    url, replica = primary_and_replica
    settings = make_settings(
        tmp_path, redis_url=url, ingest_wait_replicas=1, ingest_wait_timeout_ms=1000
    )
    async with TestClient(TestServer(create_app(settings))) as c:
        first = transition(event_id="evt_replicated")
        resp = await c.post("/v1/transitions", json=first, headers=auth())
        assert resp.status == 202, await resp.text()
        assert (await (await c.get("/readyz")).json())["replicas"] == "ok"

        replica.kill()
        replica.wait()
        primary = redis.Redis.from_url(url)
        primary.delete(*primary.keys("ntf:inbox:*:wake"), *primary.keys("arq:*"))  # none queued
        second = transition(event_id="evt_unreplicated")
        resp = await c.post("/v1/transitions", json=second, headers=auth())
        assert resp.status == 503
        # stored on the primary all the same, and its partition's drain is enqueued at once
        assert primary.zcard("arq:queue") == 1
        # operators see it: not ready (no replica), and counted as stored but unconfirmed
        ready = await c.get("/readyz")
        assert ready.status == 503
        assert (await ready.json())["replicas"] == "0 of the 1 required connected"
        scraped = await (await c.get("/metrics")).text()
        assert 'notifier_transitions_total{result="unconfirmed"}' in scraped
        assert resp.headers["Retry-After"].isdigit()
        message = (await resp.json())["error"]["message"]
        assert "only 0 of the 1 Redis replicas" in message
        # it is on the primary all the same: a retry is a duplicate, never a second event
        resp = await c.post("/v1/transitions", json=second, headers=auth())
        assert resp.status == 503
        streams = primary.scan_iter("ntf:inbox:*", _type="stream")
        bodies = [f[b"t"] for k in streams for _, f in primary.xrange(k)]
        assert sum(b"evt_unreplicated" in b for b in bodies) == 1
        assert sum(b"evt_replicated" in b for b in bodies) == 1


def test_waiting_for_replicas_needs_redis() -> None:
    with pytest.raises(ValueError, match="NOTIFIER_INGEST_WAIT_REPLICAS needs"):
        Settings(ingest_wait_replicas=1)
    with pytest.raises(ValueError, match="at most half of NOTIFIER_REDIS_TIMEOUT_S"):
        Settings(
            redis_url="redis://127.0.0.1:1/0", ingest_wait_replicas=1, ingest_wait_timeout_ms=1500
        )
