"""POST /v1/transitions and the history endpoint through aiohttp's test client, on a real Redis."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import backports.zstd
import brotli
import orjson
import pytest
import redis
from aiohttp.test_utils import TestClient, TestServer

from notifier.app import RESOURCES, create_app
from notifier.logs import OutageLog
from notifier.models import notification_id_of
from notifier.resources import open_resources
from notifier.settings import Settings
from notifier.store import Admission, body_digest, chunks
from notifier.store.base import redis_away
from notifier.store.chunks import CHUNK
from notifier.store.ledger import PACKED_IDS
from notifier.web.base import COOKIE
from tests.conftest import (
    ACME_KEY,
    API_KEYS,
    auth,
    fixed_clock,
    free_port,
    make_settings,
    record_of,
    rewrite_record,
    run_worker,
    spawn_notifier,
    start_redis,
    transition,
)

Client = TestClient[Any, Any]


async def post(client: Client, body: Any, key: str | None = None, **kw: Any) -> Any:
    headers = auth(key) if key else auth()
    return await client.post("/v1/transitions", json=body, headers=headers, **kw)


async def test_single_transition_is_accepted(client: Client) -> None:
    resp = await post(client, transition())
    assert resp.status == 202
    assert await resp.json() == {
        "accepted": 1,
        "duplicates": 0,
        "results": [{"index": 0, "event_id": "evt_1", "status": "accepted"}],
    }


async def test_same_event_id_twice_is_a_duplicate(client: Client) -> None:
    assert (await post(client, transition())).status == 202
    resp = await post(client, transition())
    assert resp.status == 202
    body = await resp.json()
    assert (body["accepted"], body["duplicates"]) == (0, 1)
    assert body["results"][0]["status"] == "duplicate"


async def test_same_event_id_with_another_body_is_a_409_conflict(
    client: Client, settings: Settings
) -> None:
    assert (await post(client, transition())).status == 202
    # the same body again, keys in another order and other spacing: a plain duplicate
    same = json.dumps(dict(reversed(list(transition().items()))), indent=2)
    resp = await client.post(
        "/v1/transitions", data=same, headers={**auth(), "Content-Type": "application/json"}
    )
    assert resp.status == 202 and (await resp.json())["duplicates"] == 1
    # another body under the same event id: refused, named, never processed
    resp = await post(client, transition(status="delivered"))
    assert resp.status == 409
    error = (await resp.json())["error"]
    assert error["code"] == "idempotency_conflict"
    assert error["details"] == [{"field": "event_id", "message": "already used with another body"}]
    # in a batch: the others are accepted, the conflict is listed
    resp = await client.post(
        "/v1/transitions",
        json={"transitions": [transition(event_id="evt_2"), transition(status="delivered")]},
        headers=auth(),
    )
    assert resp.status == 409
    body = await resp.json()
    assert (body["accepted"], body["duplicates"], body["conflicts"]) == (1, 0, 1)
    assert [r["status"] for r in body["results"]] == ["accepted", "conflict"]
    assert body["error"]["details"][0]["index"] == 1
    async with open_resources(settings) as res:
        lengths = [await res.redis.xlen(res.store.inbox_key(p)) for p in range(4)]
    assert sum(lengths) == 2  # evt_1 once and evt_2: nothing of the conflicting bodies


@pytest.mark.parametrize(
    ("first", "again"),
    [
        ({"occurred_at": "2026-11-21T08:30:00Z"}, {"occurred_at": "2026-11-21T08:30:00+00:00"}),
        ({"occurred_at": "2026-11-21T09:30:00+01:00"}, {"occurred_at": "2026-11-21T09:30+0100"}),
        ({}, {"occurred_at": "2026-11-21T09:30:00.000+01:00"}),
        ({"order": None, "location": None}, {}),
        ({}, {"carrier_status_code": None, "order": None}),
        ({"occurred_at": "2026-11-21T08:30:00Z"}, {"occurred_at": "2026-11-21t08:30:00z"}),
        ({"location": {"lat": 51.0, "lon": 12}}, {"location": {"lat": 51, "lon": 12.0}}),
        (
            {"estimated_delivery": {"start": "2026-11-22T08:00Z", "end": "2026-11-22T12:00Z"}},
            {
                "estimated_delivery": {
                    "start": "2026-11-22T08:00:00+00:00",
                    "end": "2026-11-22T12:00+00:00",
                }
            },
        ),
        # what validation itself trims or encodes (a black-box run as the tracking backend:
        # these were 409s, though both bodies store the same transition)
        (
            {"recipient": {"name": "Ana", "email": "ana@example.com", "phone": "+33612345678"}},
            {
                "recipient": {
                    "name": " Ana\t",
                    "email": " ana@example.com ",
                    "phone": "+33612345678 ",
                }
            },
        ),
        (
            {"tracking_url": "https://track.example.com/a%20b"},
            {"tracking_url": "https://track.example.com/a b "},
        ),
        (
            {"carrier": "ups", "tracking_number": "1Z9"},
            {"carrier": "ups ", "tracking_number": " 1Z9"},
        ),
    ],
    ids=[
        "Z",
        "offset-without-colon",
        "milliseconds",
        "nulls-first",
        "nulls-again",
        "lowercase",
        "whole-numbers",
        "delivery-window",
        "trimmed-recipient",
        "encoded-url",
        "trimmed-text",
    ],
)
async def test_a_repost_written_another_way_is_a_duplicate_not_a_conflict(
    client: Client, first: dict[str, Any], again: dict[str, Any]
) -> None:
    """A retry whose serializer writes the same values another way (found by a black-box
    review as the tracking backend: ``Z`` for ``+00:00``, ``null`` for a field left out) is
    the same event: a 202 duplicate, as DESIGN.md says. A body whose values differ is
    still a conflict, a moment at another offset too (it is another local time)."""
    base = {k: v for k, v in transition().items() if k not in ("order", "location")}
    assert base["occurred_at"] == "2026-11-21T09:30:00+01:00"
    assert (await post(client, {**base, **first})).status == 202
    resp = await post(client, {**base, **again})
    assert resp.status == 202, await resp.text()
    assert (await resp.json())["results"][0]["status"] == "duplicate"
    utc = first.get("occurred_at", "").endswith("Z")
    # the same instant at another offset
    other = {**base, "occurred_at": "2026-11-21T09:30:00+01:00" if utc else "2026-11-21T08:30Z"}
    resp = await post(client, other)
    assert resp.status == 409, await resp.text()


async def test_a_free_text_that_looks_like_a_moment_is_kept_as_written(client: Client) -> None:
    """Only the members that hold a date and time are read as one: a carrier's description
    written another way is another body (its text is what the customer may read)."""
    text = {"carrier_description": "2026-11-21T08:30Z"}
    assert (await post(client, transition(**text))).status == 202
    other = {"carrier_description": "2026-11-21T08:30:00+00:00"}
    assert (await post(client, transition(**other))).status == 409


async def test_a_repost_of_an_event_the_version_before_recorded_is_still_a_duplicate(
    client: Client, settings: Settings
) -> None:
    """Versions before 12-06 digested the body as posted: an event they recorded with a
    ``Z`` (its digest not that of the canonical form) reposted as it was after the upgrade
    is a duplicate, not a conflict; another body under its id is still a conflict. (One
    they recorded is compared as they did: written another way, it is a conflict.)"""
    from notifier.store.inbox import _digest

    body = transition(occurred_at="2026-11-21T08:30:00Z", order=None)
    old = _digest(body)  # what the version before recorded
    canonical = {**body, "occurred_at": "2026-11-21T08:30:00+00:00"}
    del canonical["order"]
    assert body_digest(body).split() == [body_digest(canonical), old]
    async with open_resources(settings) as res:
        item = ("acme", "shp_123", "evt_1", orjson.dumps(body), old, "")
        assert (await res.store.ingest([item]))[0] == [Admission.ACCEPTED]
    # the same body again (it was a conflict before this fix: the digests differ)
    resp = await post(client, dict(reversed(list(body.items()))))
    assert resp.status == 202 and (await resp.json())["duplicates"] == 1
    resp = await post(client, {**body, "status": "delivered"})
    assert resp.status == 409


async def test_ingest_names_each_problem_in_plain_words(client: Client) -> None:
    """The 422 details said pydantic's words ("Value error, …", "String should have at
    least 1 character", "Extra inputs are not permitted": a black-box run as the tracking
    backend); an order number sent as a JSON number was refused."""
    cases = [
        ({"carrier": ""}, "carrier", "must not be empty"),
        ({"extra": 1}, "extra", "is not a known field"),
        ({"occurred_at": "x"}, "occurred_at", "must be a valid date and time with its offset"),
        ({"occurred_at": "2026-02-30T10:00:00Z"}, "occurred_at", "must be a valid date and time"),
        ({"merchant_id": "../x"}, "merchant_id", "must be 1 to 64 letters, digits"),
        ({"shipment_id": ""}, "shipment_id", "must be 1 to 128 letters, digits"),
        ({"location": {"country": "Germany"}}, "location.country", "must be a two-letter"),
        ({"occurred_at": "2026-11-21T09:30:00"}, "occurred_at", "must have a UTC offset"),
        ({"location": []}, "location", "must be a JSON object"),
        ({"event_id": 5}, "event_id", "must be a string"),
        ({"order": {"number": True}}, "order.number", "must be a string"),
    ]
    for change, field, says in cases:
        resp = await client.post("/v1/transitions", json=transition(**change), headers=auth())
        [detail] = (await resp.json())["error"]["details"]
        assert resp.status == 422 and detail["field"] == field, change
        assert detail["message"].startswith(says), detail
        assert not any(
            words in detail["message"] for words in ("Value error", "Input should", "String should")
        ), detail
    batch = {"transitions": [transition()], "x": 1}
    resp = await client.post("/v1/transitions", json=batch, headers=auth())
    assert (await resp.json())["error"]["details"] == [
        {"field": "x", "message": "is not a known field"}
    ]
    resp = await post(client, transition(event_id="n", order={"number": 1001}))
    assert resp.status == 202
    # 1001.0 and "1001" are the same number (kept as one text): duplicates, not conflicts
    for same in (1001.0, "1001", " 1001 "):
        again = await post(client, transition(event_id="n", order={"number": same}))
        assert again.status == 202 and (await again.json())["duplicates"] == 1, same
    assert (await post(client, transition(event_id="n", order={"number": 1002}))).status == 409
    # a number JSON cannot carry exactly: refused, naming the field, never a 500 (it was,
    # for 2**64 and more, and it took the valid items of its batch down with it)
    for huge in (12345678901234567890123, 1e20, 1.5e300, 2**53):
        body = {
            "transitions": [
                transition(event_id=f"ok{huge}"),
                transition(event_id=f"h{huge}", order={"number": huge}),
            ]
        }
        resp = await client.post("/v1/transitions", json=body, headers=auth())
        reply = await resp.json()
        assert resp.status == 422 and reply["accepted"] == 1, (huge, reply)
        [detail] = reply["error"]["details"]
        assert (detail["index"], detail["field"]) == (1, "order.number")
        assert detail["message"] == "must be sent as text: a number this long loses digits in JSON"
    from notifier.models import Order

    assert Order.model_validate({"number": 1001.0}).number == "1001"


async def test_a_batch_of_invalid_items_only_answers_as_any_batch(client: Client) -> None:
    """A batch whose every item is invalid came back as a bare error, without the
    ``accepted``, ``rejected`` and ``results`` of every other batch with invalid items (a
    black-box run as the tracking backend: a client reading results by index failed on
    it alone); and a conflict beside an invalid item said "the others were taken"."""
    items = [transition(status="flying"), transition(event_id="e2", occurred_at="x")]
    resp = await client.post("/v1/transitions", json={"transitions": items}, headers=auth())
    body = await resp.json()
    assert resp.status == 422
    assert (body["accepted"], body["duplicates"], body["rejected"]) == (0, 0, 2)
    assert body["results"] == [
        {"index": 0, "event_id": "evt_1", "status": "rejected"},
        {"index": 1, "event_id": "e2", "status": "rejected"},
    ]
    assert (
        body["error"]["message"] == "2 of 2 transitions are invalid; none was taken (see results)"
    )
    assert {(d["index"], d["field"]) for d in body["error"]["details"]} == {
        (0, "status"),
        (1, "occurred_at"),
    }
    # a conflict and an invalid item: none taken either
    assert (await post(client, transition())).status == 202
    items = [transition(status="delivered"), transition(event_id="e3", status="flying")]
    resp = await client.post("/v1/transitions", json={"transitions": items}, headers=auth())
    body = await resp.json()
    assert resp.status == 422 and (body["accepted"], body["conflicts"]) == (0, 1)
    assert body["error"]["message"].endswith("; none was taken (see results)")
    # a single invalid transition stays a plain error
    single = await post(client, transition(status="flying"))
    assert single.status == 422 and set(await single.json()) == {"error"}


async def test_a_batch_with_a_conflict_and_an_invalid_item_names_both(client: Client) -> None:
    """The 422 of a batch with invalid items names a conflicting item too: it was not taken
    either (the message used to say every valid item was)."""
    assert (await post(client, transition())).status == 202
    items = [transition(status="delivered"), {"event_id": "evt_bad"}, transition(event_id="e3")]
    resp = await client.post("/v1/transitions", json={"transitions": items}, headers=auth())
    assert resp.status == 422
    body = await resp.json()
    assert [r["status"] for r in body["results"]] == ["conflict", "rejected", "accepted"]
    assert (body["accepted"], body["conflicts"], body["rejected"]) == (1, 1, 1)
    error = body["error"]
    assert error["message"].startswith(
        "1 of 3 transitions are invalid and 1 reuse an event_id with another body (refused)"
    ), error["message"]
    assert error["details"][0] == {
        "index": 0,
        "field": "event_id",
        "message": "already used with another body",
    }
    assert {d["index"] for d in error["details"][1:]} == {1}


async def test_history_is_paged_and_says_what_was_trimmed(
    client: Client, settings: Settings
) -> None:
    statuses = ["picked_up", "in_transit", "out_for_delivery", "delivered"]
    for i, status in enumerate(statuses):
        at = f"2026-11-21T0{6 + i}:00:00+01:00"
        await post(client, transition(event_id=f"h{i}", status=status, occurred_at=at))
        await run_worker(settings)
    url = "/v1/merchants/acme/shipments/shp_123/notifications"
    whole = await (await client.get(url, headers=auth())).json()
    total = whole["total"]
    assert total == len(whole["decisions"]) >= 6 and whole["trimmed"] == 0
    assert whole["next_cursor"] is None
    # read from a chunk (the shipment ended): each message's full id, and its delivery
    messages = [d for d in whole["decisions"] if "notification_id" in d]
    assert len(messages) >= 4
    for d in messages:
        made = notification_id_of("acme", "shp_123", d["event_id"], d["channel"])
        assert d["notification_id"] == made
        assert d["delivery"]["status"] == "sent", d
        # the outbox file, named in full from a chunk that keeps the id apart (below)
        detail = d["delivery"]["detail"]
        assert detail.startswith("outbox:") and made in detail, detail
        assert Path(detail.removeprefix("outbox:")).is_file()

    pages, cursor = [], None
    while True:
        query = "?limit=2" + (f"&cursor={cursor}" if cursor else "")
        page = await (await client.get(url + query, headers=auth())).json()
        pages.append(page["decisions"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert [d for p in pages for d in p] == whole["decisions"]
    assert all(len(p) == 2 for p in pages[:-1])

    # the store keeps the latest decisions only: what was trimmed is said, and a cursor
    # into the trimmed part starts at the oldest one kept
    async with open_resources(settings) as res:
        # delivered: the shipment ended, and its decisions were folded into one chunk
        held = await record_of(res.store, "acme", "shp_123")
        [chunk] = held.history
        assert chunk[0] == CHUNK
        # and its messages' outcomes into one, their ids in 16 bytes each
        [outcomes] = held.outcomes
        assert outcomes[0] == CHUNK and chunks.body(outcomes)[:1] == PACKED_IDS
        kept = (await res.store.history("acme", "shp_123"))[2:]
        # its two oldest decisions trimmed
        history = [orjson.dumps(d) for d in kept]
        await rewrite_record(res.store, "acme", "shp_123", history=history)
    page = await (await client.get(url + "?cursor=0&limit=200", headers=auth())).json()
    assert (page["total"], page["trimmed"]) == (total, 2)
    assert page["decisions"] == whole["decisions"][2:]

    for query, field in (
        ("?limit=0", "limit"),
        ("?limit=201", "limit"),
        ("?limit=\u00b9", "limit"),  # a digit to str.isdigit(), not to int()
        ("?cursor=x", "cursor"),
        ("?cursor=\u00b2", "cursor"),
        ("?cursor=" + "9" * 30, "cursor"),  # beyond Redis's integers
        ("?cursor=-1", "cursor"),
    ):
        resp = await client.get(url + query, headers=auth())
        assert resp.status == 422
        error = (await resp.json())["error"]
        assert error["code"] == "invalid_query" and error["details"][0]["field"] == field


async def test_history_positions_hold_while_the_store_trims_and_appends(
    client: Client, settings: Settings
) -> None:
    url = "/v1/merchants/acme/shipments/shp_123/notifications"
    async with open_resources(settings, clock=fixed_clock()) as res:
        res.store.history_cap = 3  # the store's real trimming, at a small cap
        # each of these is decided on both channels (NOW is 15:00 in Paris: no quiet hours)
        await post(client, transition(event_id="p0", occurred_at=T(9)))
        await run_worker(settings, resources=res)
        first = await (await client.get(url + "?limit=1", headers=auth())).json()
        assert (first["total"], first["trimmed"], first["next_cursor"]) == (2, 0, "1")
        for i, status in enumerate(["delivery_attempt_failed", "delivered"], start=1):
            await post(client, transition(event_id=f"p{i}", status=status, occurred_at=T(9 + i)))
            await run_worker(settings, resources=res)
        page = await (await client.get(url + "?cursor=1", headers=auth())).json()
        assert (page["total"], page["trimmed"]) == (6, 3)
        # the cursor pointed at a decision trimmed since: the page starts at the oldest kept
        assert len(page["decisions"]) == 3 and page["next_cursor"] is None
        # a history written before the counter existed starts counting from what it holds
        await rewrite_record(res.store, "acme", "shp_123", counted=None)
        await post(client, transition(event_id="p9", status="delivered", occurred_at=T(11)))
        await run_worker(settings, resources=res)
        after = await (await client.get(url, headers=auth())).json()
        assert after["total"] >= 3 and after["trimmed"] == after["total"] - len(after["decisions"])


def T(hour: int) -> str:
    return f"2026-11-21T{hour:02d}:00:00+01:00"


async def test_event_ids_are_scoped_per_merchant(client: Client) -> None:
    await post(client, transition())
    resp = await post(client, transition(merchant_id="globex"))
    assert (await resp.json())["accepted"] == 1


async def test_batch_accepts_valid_items_and_names_invalid_ones(client: Client) -> None:
    items = [
        transition(event_id="a"),
        transition(event_id="b", status="exception"),  # exception_code missing
        transition(event_id="c", recipient={"phone": "0612"}),
        transition(event_id="a"),  # duplicate inside the batch
    ]
    resp = await post(client, {"transitions": items})
    assert resp.status == 422  # naming the invalid ones; the valid one is accepted all the same
    body = await resp.json()
    assert (body["accepted"], body["duplicates"], body["rejected"]) == (1, 1, 2)
    assert body["error"]["code"] == "invalid_transition"
    assert [r["status"] for r in body["results"]] == [
        "accepted",
        "rejected",
        "rejected",
        "duplicate",
    ]
    fields = {(d["index"], d["field"]) for d in body["error"]["details"]}
    assert fields == {(1, "exception_code"), (2, "recipient.phone")}
    # the accepted item really was persisted: posting it again is a duplicate
    again = await (await post(client, transition(event_id="a"))).json()
    assert again["duplicates"] == 1


async def test_all_invalid_is_422_naming_every_field(client: Client) -> None:
    bad = transition(status="teleported", occurred_at="2026-11-21T09:30:00", surprise=1)
    del bad["carrier"]
    resp = await post(client, bad)
    assert resp.status == 422
    error = (await resp.json())["error"]
    assert error["code"] == "invalid_transition"
    assert {d["field"] for d in error["details"]} == {
        "status",
        "occurred_at",
        "surprise",
        "carrier",
    }
    assert all("index" not in d for d in error["details"])


async def test_identifiers_are_checked(client: Client) -> None:
    resp = await post(client, transition(merchant_id="ac:me", shipment_id="../etc"))
    assert resp.status == 422
    fields = {d["field"] for d in (await resp.json())["error"]["details"]}
    assert fields == {"merchant_id", "shipment_id"}


async def test_dates_out_of_range_are_refused(client: Client) -> None:
    for moment in ("0001-01-01T00:30:00+01:00", "9999-12-31T23:30:00-01:00"):
        resp = await post(client, transition(occurred_at=moment))
        assert resp.status == 422
        assert (await resp.json())["error"]["details"][0]["field"] == "occurred_at"


async def test_exception_code_only_with_exception(client: Client) -> None:
    resp = await post(client, transition(exception_code="lost"))
    assert resp.status == 422
    details = (await resp.json())["error"]["details"]
    assert details[0]["field"] == "exception_code"
    resp = await post(client, transition(status="exception", exception_code="customs_hold"))
    assert resp.status == 202


async def test_batch_shape_errors(client: Client) -> None:
    for body, field in [
        ({"transitions": []}, "transitions"),
        ({"transitions": [transition()], "extra": 1}, "extra"),
        ([transition()], "(body)"),
        ({"transitions": [transition(event_id=str(i)) for i in range(1001)]}, "transitions"),
    ]:
        resp = await post(client, body)
        assert resp.status == 422, body if not isinstance(body, dict) else field
        assert (await resp.json())["error"]["details"][0]["field"] == field


async def test_malformed_json_and_content_type(client: Client) -> None:
    resp = await client.post(
        "/v1/transitions", data=b"{not json", headers={**auth(), "Content-Type": "application/json"}
    )
    assert resp.status == 400
    assert (await resp.json())["error"]["code"] == "bad_request"
    resp = await client.post(
        "/v1/transitions",
        data=b"x=1",
        headers={**auth(), "Content-Type": "application/x-www-form-urlencoded"},
    )
    assert resp.status == 415


async def test_body_over_the_limit_is_413(tmp_path: Path, redis_url: str) -> None:
    settings = make_settings(tmp_path, redis_url=redis_url, max_body_bytes=4096)
    async with TestClient(TestServer(create_app(settings))) as c:
        big = {"transitions": [transition(event_id=str(i)) for i in range(20)]}
        resp = await post(c, big)
        assert resp.status == 413
        assert (await resp.json())["error"]["code"] == "payload_too_large"

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the read is capped
            yield b'{"transitions": ['
            for _ in range(100):
                yield orjson.dumps(transition()) + b","
            yield b"{}]}"

        headers = {**auth(), "Content-Type": "application/json"}
        resp = await c.post("/v1/transitions", data=chunks(), headers=headers)
        assert resp.status == 413
        assert (await resp.json())["error"]["code"] == "payload_too_large"


async def test_missing_and_unknown_keys_are_401(client: Client) -> None:
    resp = await client.post("/v1/transitions", json=transition())
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"] == "Bearer"
    resp = await post(client, transition(), key="k_wrong_0123456789")
    assert resp.status == 401
    assert (await resp.json())["error"]["code"] == "unauthorized"


async def test_key_scoped_to_one_merchant(client: Client) -> None:
    assert (await post(client, transition(), key=ACME_KEY)).status == 202
    resp = await post(client, transition(merchant_id="globex"), key=ACME_KEY)
    assert resp.status == 403
    resp = await post(
        client,
        {"transitions": [transition(event_id="x"), transition(event_id="y", merchant_id="globex")]},
        key=ACME_KEY,
    )
    assert resp.status == 403
    assert (await resp.json())["error"]["details"] == [
        {"index": 1, "field": "merchant_id", "message": "not allowed for this API key"}
    ]
    # nothing of the refused batch was persisted: posting "x" again is new
    resp = await post(client, transition(event_id="x"), key=ACME_KEY)
    assert (await resp.json())["accepted"] == 1
    # an item for another merchant refuses the batch whole even when it is invalid too
    # (it answered 422 and took the valid one)
    bad = transition(event_id="z", merchant_id="globex", occurred_at="2026-11-21T10:00:00")
    resp = await post(client, {"transitions": [transition(event_id="w"), bad]}, key=ACME_KEY)
    assert resp.status == 403
    assert (await resp.json())["error"]["details"] == [
        {"index": 1, "field": "merchant_id", "message": "not allowed for this API key"}
    ]
    resp = await post(client, transition(event_id="w"), key=ACME_KEY)
    assert (await resp.json())["accepted"] == 1
    # a merchant id that is malformed, not another merchant's, is a 422 naming it
    odd = transition(event_id="v", merchant_id="acme ")
    resp = await post(client, {"transitions": [transition(event_id="u"), odd]}, key=ACME_KEY)
    assert resp.status == 422
    details = (await resp.json())["error"]["details"]
    assert [(d["index"], d["field"]) for d in details] == [(1, "merchant_id")]


async def test_unreachable_redis_is_503_with_retry_after(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Every route that needs Redis answers 503 with Retry-After while it does not answer
    (reads were a 500 with a traceback), and the log says so once, not once a request: a
    backend retrying at once buried everything else in errors. When Redis is back, one
    line says so, with what was refused."""
    port = free_port()
    settings = make_settings(tmp_path, redis_url=f"redis://127.0.0.1:{port}/0", redis_timeout_s=0.5)
    async with TestClient(TestServer(create_app(settings))) as c:
        with caplog.at_level(logging.INFO, logger="notifier"):
            for i in range(20):
                resp = await post(c, transition(event_id=f"e{i}"))
                assert resp.status == 503
                assert resp.headers["Retry-After"] == "5"
                assert (await resp.json())["error"]["code"] == "unavailable"
            for path in (
                "/v1/merchants/acme/shipments/shp_1/notifications",
                "/v1/merchants/acme/overrides",
            ):
                read = await c.get(path, headers=auth())
                assert (read.status, read.headers.get("Retry-After")) == (503, "5"), path
                assert (await read.json())["error"]["code"] == "unavailable"
            # the editor says so as a page, and shows back the text a refused form carried
            cookies = {COOKIE: "a-session-id"}
            page = await c.get("/merchant/acme/messages/delivered", cookies=cookies)
            assert (page.status, page.headers.get("Retry-After")) == (503, "5")
            assert "cannot reach its data store (Redis)" in await page.text()
            form = {"csrf": "x", "text": "My own words"}
            saved = await c.post("/merchant/acme/messages/delivered", data=form, cookies=cookies)
            assert saved.status == 503 and "My own words</textarea>" in await saved.text()
            health = await c.get("/healthz")
            assert health.status == 503
            errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
            assert len(errors) == 1, [r.getMessage() for r in errors]
            first = "Redis does not answer: ingest could not persist 1 transitions"
            assert errors[0].getMessage().startswith(f"{first} (ConnectionError)")
            assert not any(r.exc_info for r in caplog.records)  # no traceback either
            server = start_redis(port, tmp_path)
            c.app[RESOURCES].outage.settle_s = 0  # (the last refusal was just now)
            try:
                assert (await post(c, transition(event_id="back"))).status == 202
                assert (await post(c, transition(event_id="again"))).status == 202
            finally:
                server.terminate()
                server.wait(timeout=10)
        back = [r.getMessage() for r in caplog.records if "answers again" in r.getMessage()]
        assert len(back) == 1 and back[0].endswith("24 requests were refused meanwhile"), back


def test_an_outage_is_summed_up_while_it_lasts() -> None:
    """One error as it begins, one every ``every_s`` with what was refused since, one
    warning when it ends; a later outage starts over."""
    now = [100.0]
    records: list[tuple[int, str]] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append((record.levelno, record.getMessage()))

    logger = logging.getLogger("tests.outage")
    logger.addHandler(Capture())
    logger.propagate = False
    outage = OutageLog("Redis", logger, every_s=10, clock=lambda: now[0])
    outage.answered()  # nothing to end
    for step in range(25):  # a refusal a second
        now[0] = 100.0 + step
        outage.failed(f"POST /x {step}", ConnectionError())
    now[0] = 130.0
    outage.answered()
    outage.answered()
    now[0] = 200.0
    outage.failed("GET /y", TimeoutError())
    now[0] = 203.0
    outage.answered()  # 3 s after a refusal: a shard still away, say: the same outage
    outage.failed("GET /y", TimeoutError())
    now[0] = 4000.0  # nothing said it answered since: the next refusal is a new outage
    outage.failed("GET /z", TimeoutError())
    assert records == [
        (
            logging.ERROR,
            "Redis does not answer: POST /x 0 (ConnectionError); later refusals "
            "are summed up every 10 s until it answers",
        ),
        (
            logging.ERROR,
            "Redis still does not answer (10 s now): 10 more requests refused, "
            "the last while POST /x 10 (ConnectionError)",
        ),
        (
            logging.ERROR,
            "Redis still does not answer (20 s now): 10 more requests refused, "
            "the last while POST /x 20 (ConnectionError)",
        ),
        (logging.WARNING, "Redis answers again after 30.0 s; 25 requests were refused meanwhile"),
        (
            logging.ERROR,
            "Redis does not answer: GET /y (TimeoutError); later refusals are "
            "summed up every 10 s until it answers",
        ),
        (logging.WARNING, "Redis answers again after 3.0 s; 2 requests were refused meanwhile"),
        (
            logging.ERROR,
            "Redis does not answer: GET /z (TimeoutError); later refusals are "
            "summed up every 10 s until it answers",
        ),
    ]


async def test_healthz(client: Client, settings: Settings) -> None:
    resp = await client.get("/healthz")
    assert resp.status == 200
    assert await resp.json() == {
        "status": "ok",
        "redis": "ok",
        "mode": "redis",
        "dead_letters": {"notifications": 0, "inbox": 0},
        "merchant_overrides_disabled": 0,
    }


async def test_unknown_route_is_json_404(client: Client) -> None:
    resp = await client.get("/v1/nope")
    assert resp.status == 404
    assert "error" in orjson.loads(await resp.read())


async def test_history_needs_a_key_for_that_merchant(client: Client) -> None:
    url = "/v1/merchants/globex/shipments/shp_1/notifications"
    assert (await client.get(url)).status == 401
    assert (await client.get(url, headers=auth(ACME_KEY))).status == 403
    assert (await client.get(url, headers=auth())).status == 404


async def test_readyz_needs_a_live_worker_and_says_what_is_missing(
    client: Any, settings: Settings, tmp_path: Path
) -> None:
    """Ready means Redis answers, the defaults loaded, and a worker beat in the last 15 s:
    a real `notifier worker` process makes it ready, and its stop makes it not ready."""
    resp = await client.get("/readyz")
    body = await resp.json()
    assert resp.status == 503 and body["status"] == "not_ready"
    assert body["redis"] == "ok" and body["templates"] == "ok" and body["catalogs"] == "ok"
    assert body["workers"].startswith("none alive")
    env = {
        "NOTIFIER_REDIS_URL": str(settings.redis_url),
        "NOTIFIER_API_KEYS": json.dumps(API_KEYS),
        "NOTIFIER_OUTBOX_DIR": str(settings.outbox_dir),
        "NOTIFIER_PARTITIONS": str(settings.partitions),
    }
    worker = spawn_notifier(["worker"], tmp_path, **env)
    try:
        for _ in range(400):  # readiness wait for a real process (bounded)
            resp = await client.get("/readyz")
            if resp.status == 200 or worker.poll() is not None:
                break
            await asyncio.sleep(0.05)
        body = await resp.json()
        assert resp.status == 200, body
        assert body == {
            "status": "ready",
            "redis": "ok",
            "workers": 1,
            "policies": "ok",
            "templates": "ok",
            "brand": "ok",
            "catalogs": "ok",
        }
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.communicate(timeout=20)
    resp = await client.get("/readyz")
    assert resp.status == 503  # a worker that stopped says so on its way out


async def test_readyz_names_templates_that_did_not_load(settings: Settings, tmp_path: Path) -> None:
    empty = tmp_path / "no-templates"
    empty.mkdir()
    broken = settings.model_copy(update={"templates_dir": empty})
    async with TestClient(TestServer(create_app(broken))) as c:
        body = await (await c.get("/readyz")).json()
    assert body["status"] == "not_ready" and body["templates"].startswith("failed:")
    assert "email/layout.html" in body["templates"]


async def test_keys_can_be_configured_by_their_hash_only(
    settings: Settings, capsys: Any, monkeypatch: Any
) -> None:
    """NOTIFIER_API_KEYS may hold "sha256:<hex>" instead of a key: the service never has
    the key, and callers use it as before (`notifier hash-key` makes the form)."""
    import hashlib
    import io

    from notifier.cli import main

    secret = "k_hashed_0123456789"
    monkeypatch.setattr("sys.stdin", io.StringIO(secret + "\n"))
    assert main(["hash-key"]) == 0
    hashed = capsys.readouterr().out.strip()
    assert hashed == "sha256:" + hashlib.sha256(secret.encode()).hexdigest()
    only_hash = settings.model_copy(update={"api_keys": {hashed: ["acme"]}})
    async with TestClient(TestServer(create_app(only_hash))) as c:
        ok = await c.post("/v1/transitions", json=transition(), headers=auth(secret))
        assert ok.status == 202
        wrong = await c.post("/v1/transitions", json=transition(), headers=auth(hashed))
        assert wrong.status == 401  # the hash itself is not a key
    with pytest.raises(ValueError, match="64 lowercase hex digits"):
        Settings(api_keys={"sha256:abc": ["acme"]})


def test_a_key_over_its_rate_waits_as_long_as_retry_after_says() -> None:
    from notifier.errors import TooManyRequests
    from notifier.ingest import RateLimiter

    now = [100.0]
    limiter = RateLimiter(2.0, 3, clock=lambda: now[0])
    for _ in range(3):
        limiter.take(b"a")  # a burst of 3
    with pytest.raises(TooManyRequests) as over:
        limiter.take(b"a")
    assert over.value.headers == {"Retry-After": "1"} and over.value.status == 429
    limiter.take(b"b")  # another key has its own bucket
    now[0] += 0.5  # one token back at 2/s
    limiter.take(b"a")
    with pytest.raises(TooManyRequests):
        limiter.take(b"a")
    RateLimiter(0, 1).take(b"a")  # 0: no limit


async def test_the_api_answers_429_with_retry_after_per_key(settings: Settings) -> None:
    limited = settings.model_copy(update={"rate_limit_per_s": 0.1, "rate_limit_burst": 2})
    async with TestClient(TestServer(create_app(limited))) as c:
        for i in range(2):
            ok = await c.post("/v1/transitions", json=transition(event_id=f"e{i}"), headers=auth())
            assert ok.status == 202
        over = await c.post("/v1/transitions", json=transition(event_id="e9"), headers=auth())
        assert over.status == 429 and int(over.headers["Retry-After"]) >= 1
        assert (await over.json())["error"]["code"] == "rate_limited"
        other = await c.post(
            "/v1/transitions", json=transition(event_id="e9"), headers=auth(ACME_KEY)
        )
        assert other.status == 202  # the limit is per key


async def test_an_unread_body_that_does_not_decode_logs_no_error(
    client: TestClient[Any, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """A gzip body that is not gzip, on a request answered without reading it (a 401, a
    405): the answer is the usual one, and nothing reaches the error log (aiohttp used to
    log a traceback per request while reading the rest of it for keep-alive)."""
    body = b"not gzip at all, " * 4
    for path, status in (("/healthz", 405), ("/v1/transitions", 401)):
        reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Encoding: gzip\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        answer = await reader.read()  # the server closes the connection after answering
        writer.close()
        assert answer.startswith(f"HTTP/1.1 {status} ".encode()), answer[:80]
    await asyncio.sleep(0.05)  # what the server does after answering
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


async def test_an_unknown_content_encoding_is_refused_by_name(
    client: TestClient[Any, Any],
) -> None:
    body = orjson.dumps(transition())
    headers = {**auth(), "Content-Type": "application/json", "Content-Encoding": "foo"}
    resp = await client.post("/v1/transitions", data=body, headers=headers)
    assert resp.status == 415
    assert "Content-Encoding 'foo' is not supported" in (await resp.json())["error"]["message"]


@pytest.mark.parametrize("encoding", ["br", "zstd"])
async def test_brotli_and_zstd_bodies_are_read(
    client: TestClient[Any, Any], encoding: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Bodies compressed with br or zstd are taken like gzip ones; one that does not decode
    is a JSON 400 naming the problem, and what counts against the body limit is what it
    decodes to. (Without the libraries aiohttp's parser answered a plain-text 400, with an
    ERROR and a traceback in the log, before any handler ran.)"""
    compress = brotli.compress if encoding == "br" else backports.zstd.compress
    headers = {**auth(), "Content-Type": "application/json", "Content-Encoding": encoding}
    body = compress(orjson.dumps({"transitions": [transition(event_id=f"e-{encoding}")]}))
    resp = await client.post("/v1/transitions", data=body, headers=headers)
    assert resp.status == 202, await resp.text()
    assert (await resp.json())["accepted"] == 1
    resp = await client.post("/v1/transitions", data=b"not compressed", headers=headers)
    assert resp.status == 400
    assert "could not be read" in (await resp.json())["error"]["message"]
    bomb = compress(b" " * (16 * 1024 * 1024))
    resp = await client.post("/v1/transitions", data=bomb, headers=headers)
    assert resp.status == 413
    assert (await resp.json())["error"]["code"] == "payload_too_large"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize(
    ("error", "away"),
    [
        (redis.exceptions.ConnectionError("Connection refused"), True),
        (redis.exceptions.TimeoutError("Timeout reading from socket"), True),
        (redis.exceptions.BusyLoadingError("Redis is loading the dataset in memory"), True),
        (redis.exceptions.ReadOnlyError("You can't write against a read only replica."), True),
        (redis.exceptions.ResponseError("MISCONF Redis is configured to save RDB…"), True),
        (redis.exceptions.ClusterDownError("The cluster is down"), True),
        # bugs and misconfiguration stay a 500 with their traceback
        (redis.exceptions.ResponseError("ERR syntax error"), False),
        (redis.exceptions.DataError("Invalid input of type: 'NoneType'"), False),
        (redis.exceptions.NoPermissionError("this user has no permissions"), False),
        (redis.exceptions.ResponseError("user_script:12: attempt to index a nil value"), False),
    ],
)
def test_only_a_redis_away_is_a_503(error: Exception, away: bool) -> None:
    """Every RedisError but a script's was read as an outage: a bug (a None sent, a command
    Redis refuses) became a 503 "retry later" with no traceback (a review)."""
    assert redis_away(error) is away
