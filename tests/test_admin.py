"""The merchant admin API over override files: scoped keys, drafts, checks, publish, rollback."""

from __future__ import annotations

import email
import email.policy
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from notifier.resources import data_dir
from notifier.settings import Settings
from tests.conftest import ACME_KEY, ADMIN_KEY, auth, outbox_files, post, run_worker, transition

Client = TestClient[Any, Any]
BASE = "/v1/merchants/{m}"
DEFAULT = (data_dir("templates", None) / "messages" / "delivered.jinja").read_text()


def subject(text: str) -> str:
    return DEFAULT.replace(
        "{%- macro subject() -%}{% trans %}Your parcel was delivered{% endtrans %}",
        "{%- macro subject() -%}" + text,
    )


ROUTES = [
    ("GET", "/overrides", None),
    ("PUT", "/overrides/draft/brand.yaml", {"text": "name: X\n"}),
    ("DELETE", "/overrides/draft/brand.yaml", None),
    ("POST", "/overrides/publish", {"revision": 0}),
    ("GET", "/overrides/versions", None),
    ("POST", "/overrides/rollback", {"version": 1}),
    ("GET", "/audit", None),
]


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
async def test_a_merchant_key_never_reaches_another_merchant(
    client: Client, method: str, path: str, body: Any
) -> None:
    url = BASE.format(m="globex") + path
    resp = await client.request(method, url, json=body, headers=auth(ACME_KEY))
    assert resp.status == 403, await resp.text()
    assert (await client.request(method, url, json=body)).status == 401
    # and nothing was written for globex
    overview = await client.get(BASE.format(m="globex") + "/overrides", headers=auth())
    assert (await overview.json())["draft"] == {"revision": 0, "files": {}}


async def test_draft_check_publish_and_roll_back(client: Client, settings: Settings) -> None:
    acme = BASE.format(m="acme")
    put = f"{acme}/overrides/draft/messages/delivered.jinja"
    resp = await client.put(
        put, json={"text": subject("Acme: it is there")}, headers=auth(ACME_KEY)
    )
    assert resp.status == 200
    assert (await resp.json())["problems"] == []

    # an invalid draft is saved, with its problems named, and never published
    resp = await client.put(
        f"{acme}/overrides/draft/brand.yaml",
        json={"text": "accent: '#787878'\n"},
        headers=auth(ACME_KEY),
    )
    saved = await resp.json()
    assert resp.status == 200 and any("accent" in p for p in saved["problems"])
    resp = await client.post(
        f"{acme}/overrides/publish", json={"revision": saved["revision"]}, headers=auth(ACME_KEY)
    )
    assert resp.status == 422
    error = (await resp.json())["error"]
    assert error["code"] == "invalid_override" and "accent" in error["details"][0]["message"]

    # fixed; a publish of a revision that is not the draft's is refused
    resp = await client.put(
        f"{acme}/overrides/draft/brand.yaml",
        json={"text": "name: Acme Outfitters\n"},
        headers=auth(ACME_KEY),
    )
    revision = (await resp.json())["revision"]
    resp = await client.post(
        f"{acme}/overrides/publish", json={"revision": revision - 1}, headers=auth(ACME_KEY)
    )
    assert resp.status == 409 and (await resp.json())["error"]["code"] == "draft_changed"
    resp = await client.post(
        f"{acme}/overrides/publish", json={"revision": revision}, headers=auth(ACME_KEY)
    )
    assert resp.status == 200 and (await resp.json()) == {"version": 1, "published": True}

    async def delivered(shipment: str) -> email.message.EmailMessage:
        await post(client, transition(event_id=shipment, shipment_id=shipment, status="delivered"))
        await run_worker(settings)
        [eml] = (settings.outbox_dir / "acme" / shipment).glob("*.eml")
        msg = email.message_from_bytes(eml.read_bytes(), policy=email.policy.default)
        assert isinstance(msg, email.message.EmailMessage)
        return msg

    first = await delivered("s1")
    assert first["Subject"] == "Acme: it is there" and first["From"].startswith("Acme Outfitters")

    # a second version, then a rollback to the first
    resp = await client.put(put, json={"text": subject("Acme: landed")}, headers=auth(ACME_KEY))
    revision = (await resp.json())["revision"]
    await client.post(
        f"{acme}/overrides/publish", json={"revision": revision}, headers=auth(ACME_KEY)
    )
    assert (await delivered("s2"))["Subject"] == "Acme: landed"
    resp = await client.post(f"{acme}/overrides/rollback", json={"version": 1}, headers=auth())
    assert (await resp.json()) == {"version": 3, "restored": 1}
    assert (await delivered("s3"))["Subject"] == "Acme: it is there"

    versions = (await (await client.get(f"{acme}/overrides/versions", headers=auth())).json())[
        "versions"
    ]
    assert [v["version"] for v in versions] == [1, 2, 3]
    assert "-{%- macro subject() -%}Acme: it is there" in versions[1]["diff"]
    assert "+{%- macro subject() -%}Acme: landed" in versions[1]["diff"]
    assert versions[2]["restored"] == 1

    # the audit log names keys by id, never the key itself
    entries = (await (await client.get(f"{acme}/audit", headers=auth(ACME_KEY))).json())["entries"]
    text = repr(entries)
    assert ACME_KEY not in text and ADMIN_KEY not in text
    assert entries[0]["action"] == "rollback" and entries[0]["key_id"].startswith("key_")
    assert {e["key_id"] for e in entries} == {entries[0]["key_id"], entries[1]["key_id"]}
    assert len(outbox_files(settings, ".eml")) == 3


async def test_only_override_files_and_well_formed_bodies(client: Client) -> None:
    acme = BASE.format(m="acme")
    resp = await client.put(
        f"{acme}/overrides/draft/notes.txt", json={"text": "x"}, headers=auth(ACME_KEY)
    )
    assert resp.status == 422
    assert "not a file a merchant can override" in (await resp.json())["error"]["message"]
    resp = await client.put(
        f"{acme}/overrides/draft/brand.yaml", json={"txt": "x"}, headers=auth(ACME_KEY)
    )
    assert resp.status == 422 and (await resp.json())["error"]["code"] == "invalid_override"
    resp = await client.post(
        f"{acme}/overrides/rollback", json={"version": 7}, headers=auth(ACME_KEY)
    )
    assert resp.status == 404
