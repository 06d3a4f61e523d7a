"""The merchant admin API over override files: scoped keys, drafts, checks, publish, rollback."""

from __future__ import annotations

import email
import email.policy
import json
import shutil
import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from aiohttp.test_utils import TestClient, TestServer

from notifier.app import create_app
from notifier.resources import data_dir
from notifier.settings import Settings
from tests.conftest import (
    ACME_KEY,
    ADMIN_KEY,
    API_KEYS,
    auth,
    outbox_files,
    post,
    run_worker,
    spawn_notifier,
    transition,
    wait_until,
    with_macro,
)

Client = TestClient[Any, Any]
BASE = "/v1/merchants/{m}"
DEFAULT = (data_dir("templates", None) / "messages" / "delivered.jinja").read_text()


def subject(text: str) -> str:
    return with_macro(DEFAULT, "subject", text)


ROUTES = [
    ("GET", "/overrides", None),
    ("PUT", "/overrides/draft/brand.yaml", {"text": "name: X\n"}),
    ("DELETE", "/overrides/draft/brand.yaml", None),
    ("POST", "/overrides/publish", {"revision": 0}),
    ("GET", "/overrides/versions", None),
    ("POST", "/overrides/rollback", {"version": 1}),
    ("GET", "/audit", None),
    ("POST", "/preview", {"milestone": "delivered"}),
    ("POST", "/test-send", {"milestone": "delivered", "to": "ana@example.com"}),
    ("GET", "/templates", None),
    ("GET", "/templates/delivered", None),
    ("PUT", "/templates/delivered?locale=de", {"text": "x"}),
    ("DELETE", "/templates/delivered", None),
    ("GET", "/brand", None),
    ("PUT", "/brand", {"name": "X"}),
    ("GET", "/policy", None),
    ("PUT", "/policy", {"coalesce_seconds": 1}),
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


async def test_a_draft_string_without_a_translation_its_brand_needs_is_a_problem(
    client: Client,
) -> None:
    """`notifier check` calls a merchant string untranslated in a language its brand lists
    an error; the draft check said "no problems" and the draft was published, the English
    sentence in its French messages (found by a black-box probe)."""
    acme = BASE.format(m="acme")
    from notifier.resources import data_dir

    words = (data_dir("templates", None) / "messages" / "delivered.jinja").read_text()
    mine = words.replace(
        "{%- macro preheader() -%}",
        "{%- macro preheader() -%}{% trans %}Enjoy your shiny purchase!{% endtrans %} ",
    )
    assert mine != words
    for path, text in (("brand.yaml", "locales: [fr, de]\n"), ("messages/delivered.jinja", mine)):
        resp = await client.put(
            f"{acme}/overrides/draft/{path}", json={"text": text}, headers=auth(ACME_KEY)
        )
        assert resp.status == 200
    problems = (await resp.json())["problems"]
    assert (
        "messages/delivered.jinja of acme's draft: 'Enjoy your shiny purchase!' has no "
        "translation in fr, de"
    ) in "\n".join(problems), problems
    resp = await client.post(
        f"{acme}/overrides/publish",
        json={"revision": (await resp.json())["revision"]},
        headers=auth(ACME_KEY),
    )
    assert resp.status == 422
    # a string the shared catalogs translate is no problem
    fine = words.replace(
        "{%- macro preheader() -%}",
        "{%- macro preheader() -%}{% trans %}Track your parcel{% endtrans %} ",
    )
    resp = await client.put(
        f"{acme}/overrides/draft/messages/delivered.jinja",
        json={"text": fine},
        headers=auth(ACME_KEY),
    )
    assert not any("no translation" in p for p in (await resp.json())["problems"])


async def test_a_link_naming_a_placeholder_never_filled_in_is_a_problem(client: Client) -> None:
    """`{tracking_numbr}` went to every customer as it was, a dead link, with "no problems"
    (found by a black-box probe); `notifier check` says the same of a brand in a folder."""
    acme = BASE.format(m="acme")
    brand = (
        "support: {email: help@acme.example}\n"
        "links: {reschedule: 'https://acme.example/r/{tracking_numbr}?o={order_number}'}\n"
    )
    resp = await client.put(
        f"{acme}/overrides/draft/brand.yaml", json={"text": brand}, headers=auth(ACME_KEY)
    )
    assert resp.status == 200
    problems = (await resp.json())["problems"]
    assert problems == [
        "brand.yaml of acme's draft: links.reschedule: {tracking_numbr} is never filled in "
        "(only {tracking_number} and {order_number} are): customers would get the link as it is"
    ]


@pytest.mark.parametrize(
    "link",
    [
        "https://acme.example/r/{tracking_number",  # unclosed
        "https://acme.example/r/{{tracking_number}}",  # doubled
        "https://acme.example/r/{tracking_number}}",  # a stray brace
        "https://acme.example/r/%7Btracking_number%7D",  # encoded
    ],
)
async def test_a_link_with_a_brace_that_is_no_placeholder_is_a_problem(
    client: Client, link: str
) -> None:
    """Each of these passed every check and went out to customers as written (found by a
    second black-box run as a merchant)."""
    [problem] = await draft_brand_problems(client, f"links: {{reschedule: '{link}'}}\n")
    assert problem.startswith(
        "brand.yaml of acme's draft: links.reschedule: a brace that is no placeholder"
    ), problem


async def test_a_short_link_base_the_number_would_run_into_is_a_problem(client: Client) -> None:
    """`https://acme.link/t` sent `https://acme.link/t1Z999…` with no problem."""
    brand = "links: {short_base: 'https://acme.link/t'}\n"
    [problem] = await draft_brand_problems(client, brand)
    assert "links.short_base: the tracking number is appended as it is" in problem
    assert await draft_brand_problems(client, brand.replace("/t'", "/t/'")) == []


async def test_an_svg_logo_is_a_problem_and_an_upper_case_scheme_is_taken(
    client: Client,
) -> None:
    """An SVG logo passed every check, though Gmail and Outlook show none; `HTTPS://…` was
    refused as not https (a black-box run as a merchant)."""
    brand = "logo_url: https://acme.example/logo.SVG?v=2\nlogo_dark_url: https://a.example/d.svg\n"
    problems = await draft_brand_problems(client, brand)
    assert [p.split(": ")[1] for p in problems] == ["logo_url", "logo_dark_url"], problems
    assert all("Gmail and Outlook do not show" in p for p in problems)
    assert await draft_brand_problems(client, "logo_url: HTTPS://acme.example/logo.png\n") == []
    from notifier.render.brand import Brand

    taken = Brand.model_validate({"name": "Acme", "logo_url": "HTTPS://acme.example/l.png"})
    assert taken.logo_url == "https://acme.example/l.png"  # as emails then write it


async def test_a_dark_mode_logo_alone_is_a_problem(client: Client) -> None:
    """A dark-mode logo without a logo was dropped from every email, with no problem."""
    brand = "logo_dark_url: https://acme.example/d.png\n"
    [problem] = await draft_brand_problems(client, brand)
    assert "logo_dark_url: shown only beside logo_url" in problem


async def draft_brand_problems(client: Client, brand: str) -> list[str]:
    """The problems of acme's draft once its brand.yaml is ``brand`` (with a support
    address, which every brand needs)."""
    resp = await client.put(
        f"{BASE.format(m='acme')}/overrides/draft/brand.yaml",
        json={"text": "support: {email: help@acme.example}\n" + brand},
        headers=auth(ACME_KEY),
    )
    assert resp.status == 200, await resp.text()
    problems: list[str] = (await resp.json())["problems"]
    return problems


async def test_a_broken_brand_hides_no_other_problem_of_the_draft(client: Client) -> None:
    """Before, the draft check stopped at a brand that did not load: the policy and the
    template problems showed only once the brand was fixed."""
    acme = BASE.format(m="acme")
    for path, text in (
        ("brand.yaml", "logo_url: 'http://x'\n"),
        ("policy.yaml", "bogus: 1\n"),
        ("messages/delivered.jinja", "{% if %}"),
    ):
        resp = await client.put(
            f"{acme}/overrides/draft/{path}", json={"text": text}, headers=auth(ACME_KEY)
        )
        assert resp.status == 200
    problems = (await resp.json())["problems"]
    # named as the draft it is, not as a published file (it said "published brand.yaml")
    assert any(p.startswith("brand.yaml of acme's draft: logo_url") for p in problems), problems
    assert not any("published" in p for p in problems), problems
    assert any("bogus" in p for p in problems), problems
    assert any("messages/delivered.jinja" in p for p in problems), problems
    resp = await client.post(
        f"{acme}/overrides/publish",
        json={"revision": (await resp.json())["revision"]},
        headers=auth(ACME_KEY),
    )
    assert resp.status == 422
    details = [d["message"] for d in (await resp.json())["error"]["details"]]
    assert len(details) >= 3 and any("bogus" in d for d in details), details


async def test_a_problem_names_the_locale_file_that_has_it(client: Client) -> None:
    """A broken messages/picked_up.de.jinja was reported as messages/picked_up.jinja (the
    file every other locale reads), which acme does not even have."""
    resp = await client.put(
        f"{BASE.format(m='acme')}/overrides/draft/messages/picked_up.de.jinja",
        json={"text": "x"},
        headers=auth(ACME_KEY),
    )
    problems = (await resp.json())["problems"]
    assert any("messages/picked_up.de.jinja gives no subject" in p for p in problems), problems
    assert not any("messages/picked_up.jinja gives" in p for p in problems), problems


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
        json={"text": "name: Acme Outfitters\nsupport: {email: help@acme.example}\n"},
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
    # a rollback asked by someone who last saw version 1 live is refused: 2 is live now
    stale = {"version": 1, "live": 1}
    resp = await client.post(f"{acme}/overrides/rollback", json=stale, headers=auth())
    assert resp.status == 409
    error = (await resp.json())["error"]
    assert error["code"] == "live_changed"
    assert error["message"].startswith("version 2 is live now, not version 1")
    seen = {"version": 1, "live": 2}
    resp = await client.post(f"{acme}/overrides/rollback", json=seen, headers=auth())
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
    # a text over the size limit is the text's problem, not the path's, and says its size
    big = "{# " + "x" * 70_000 + " #}"
    resp = await client.put(
        f"{acme}/templates/delivered", json={"text": big}, headers=auth(ACME_KEY)
    )
    assert resp.status == 422
    [detail] = (await resp.json())["error"]["details"]
    assert detail == {
        "field": "text",
        "message": "messages/delivered.jinja: 70,006 bytes, larger than 64 KB (65,536 bytes), "
        "the most a file may hold",
    }


async def test_preview_renders_published_draft_or_posted_files_in_any_locale(
    client: Client,
) -> None:
    acme = BASE.format(m="acme")
    url = f"{acme}/preview"
    resp = await client.post(url, json={"milestone": "delivered"}, headers=auth(ACME_KEY))
    body = await resp.json()
    assert resp.status == 200 and body["subject"] == "Your parcel was delivered"
    assert body["preheader"] == "Enjoy your order." and "<html" in body["html"]
    # the draft, by default; the published files on request
    await client.put(
        f"{acme}/overrides/draft/messages/delivered.jinja",
        json={"text": subject("Acme: it is there")},
        headers=auth(ACME_KEY),
    )
    draft = await (await client.post(url, json={"milestone": "delivered"}, headers=auth())).json()
    assert draft["subject"] == "Acme: it is there"
    published = await client.post(
        url, json={"milestone": "delivered", "source": "published"}, headers=auth()
    )
    assert (await published.json())["subject"] == "Your parcel was delivered"
    # files posted in the body (what the editor has on screen), an SMS, another locale
    sms = await client.post(
        url,
        json={
            "milestone": "exception:customs_hold",
            "channel": "sms",
            "locale": "ja",
            "files": {"brand.yaml": "name: Acme\n"},
        },
        headers=auth(),
    )
    out = await sms.json()
    assert sms.status == 200 and out["body"].startswith("Acme")
    assert (out["encoding"], out["segments"]) == ("UCS-2", out["segments"]) and out["segments"] >= 1
    # a template that fails names the problem; an unknown milestone is refused
    bad = await client.post(
        url,
        json={"milestone": "delivered", "files": {"messages/delivered.jinja": "{{ nope }}"}},
        headers=auth(),
    )
    assert bad.status == 422 and "nope" in (await bad.json())["error"]["message"]
    unknown = await client.post(url, json={"milestone": "teleported"}, headers=auth())
    assert unknown.status == 422


async def test_preview_shows_a_delivered_as_collected_from_a_pickup_point(client: Client) -> None:
    url = f"{BASE.format(m='acme')}/preview"
    collected = {"milestone": "delivered", "collected": True, "source": "published"}
    email = await (await client.post(url, json=collected, headers=auth())).json()
    assert email["subject"] == "Your parcel was collected"
    assert "If you did not collect it yourself, contact us." in email["text"]
    sms = await client.post(url, json={**collected, "channel": "sms"}, headers=auth())
    assert "your parcel was collected." in (await sms.json())["body"]
    # only a delivered can be collected: named, not ignored
    resp = await client.post(
        url, json={"milestone": "in_transit", "collected": True}, headers=auth()
    )
    error = (await resp.json())["error"]
    assert resp.status == 422 and error["details"][0]["field"] == "collected"
    assert "delivered" in error["details"][0]["message"]


async def test_a_broken_policy_in_the_draft_is_named_and_not_published(client: Client) -> None:
    acme = BASE.format(m="acme")
    resp = await client.put(
        f"{acme}/overrides/draft/policy.yaml",
        json={"text": "statuses: {delivered: {channels: [pigeon]}}\n"},
        headers=auth(ACME_KEY),
    )
    saved = await resp.json()
    assert any("statuses.delivered.channels.0" in p for p in saved["problems"])
    resp = await client.post(
        f"{acme}/overrides/publish", json={"revision": saved["revision"]}, headers=auth(ACME_KEY)
    )
    assert resp.status == 422


async def test_a_publish_reaches_every_running_worker_process(
    client: Client, settings: Settings, tmp_path: Path
) -> None:
    env = {
        "NOTIFIER_REDIS_URL": str(settings.redis_url),
        "NOTIFIER_API_KEYS": json.dumps(API_KEYS),
        "NOTIFIER_OUTBOX_DIR": str(settings.outbox_dir),
        "NOTIFIER_PARTITIONS": str(settings.partitions),
    }
    workers = [spawn_notifier(["worker"], tmp_path, **env) for _ in range(2)]
    at = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    acme = BASE.format(m="acme")

    async def deliver(prefix: str) -> set[str]:
        """Delivered events for 24 shipments (spread over the partitions, so over both
        workers); the subjects of their emails."""
        items = [
            transition(
                event_id=f"{prefix}{i}",
                shipment_id=f"{prefix}{i}",
                occurred_at=at,
                status="delivered",
            )
            for i in range(24)
        ]
        await post(client, *items)
        folders = [settings.outbox_dir / "acme" / f"{prefix}{i}" for i in range(24)]
        wait_until(
            lambda: (
                all(any(f.glob("*.eml")) for f in folders)
                or any(w.poll() is not None for w in workers)
            ),
            f"the emails of {prefix}",
        )
        subjects = set()
        for folder in folders:
            [eml] = folder.glob("*.eml")
            subjects.add(
                email.message_from_bytes(eml.read_bytes(), policy=email.policy.default)["Subject"]
            )
        return subjects

    async def publish(text: str) -> None:
        resp = await client.put(
            f"{acme}/overrides/draft/messages/delivered.jinja",
            json={"text": subject(text)},
            headers=auth(ACME_KEY),
        )
        revision = (await resp.json())["revision"]
        resp = await client.post(
            f"{acme}/overrides/publish", json={"revision": revision}, headers=auth(ACME_KEY)
        )
        assert resp.status == 200

    try:
        assert await deliver("a") == {"Votre colis a été livré"}  # both workers cached it
        await publish("Acme: version one")
        assert await deliver("b") == {"Acme: version one"}
        await publish("Acme: version two")
        assert await deliver("c") == {"Acme: version two"}
    finally:
        for w in workers:
            w.send_signal(signal.SIGTERM)
        outputs = [w.communicate(timeout=20)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), outputs


async def test_a_test_send_goes_through_the_merchants_channel_and_is_marked_as_a_test(
    client: Client, settings: Settings
) -> None:
    acme = BASE.format(m="acme")
    await client.put(
        f"{acme}/overrides/draft/messages/delivered.jinja",
        json={"text": subject("Acme: a test")},
        headers=auth(ACME_KEY),
    )
    resp = await client.post(
        f"{acme}/test-send",
        json={"milestone": "delivered", "to": "merchant@acme.example", "locale": "de"},
        headers=auth(ACME_KEY),
    )
    body = await resp.json()
    assert resp.status == 200 and body["test"] is True and body["outcome"] == "sent"
    [eml] = (settings.outbox_dir / "acme" / "test-sends").glob("*.eml")  # the outbox channel
    msg = email.message_from_bytes(eml.read_bytes(), policy=email.policy.default)
    assert msg["To"] == "merchant@acme.example" and msg["Subject"] == "Acme: a test"
    history = await client.get(f"{acme}/shipments/test-sends/notifications", headers=auth(ACME_KEY))
    [entry] = (await history.json())["decisions"]
    assert entry["test"] is True and entry["reason"].startswith("test send by key_")
    assert ACME_KEY not in entry["reason"]
    # an address that cannot receive, or that opted out, is refused by name
    for to, why in (("ana..x@example.com", "not a valid email address"),):
        resp = await client.post(
            f"{acme}/test-send", json={"milestone": "delivered", "to": to}, headers=auth()
        )
        assert resp.status == 422 and why in (await resp.json())["error"]["message"]
    await client.post(
        f"{acme}/opt-outs", json={"channel": "sms", "address": "+33612345678"}, headers=auth()
    )
    resp = await client.post(
        f"{acme}/test-send",
        json={"milestone": "delivered", "channel": "sms", "to": "+33612345678"},
        headers=auth(),
    )
    assert resp.status == 422 and "opted out" in (await resp.json())["error"]["message"]


async def test_templates_by_milestone_and_locale(client: Client) -> None:
    acme = BASE.format(m="acme")
    url = f"{acme}/templates/exception:customs_hold"
    default = await (await client.get(url, headers=auth(ACME_KEY))).json()
    assert default["path"] == "messages/exception_customs_hold.jinja"
    assert default["source"] == "default" and "customs" in default["text"]
    de = await (await client.get(f"{url}?locale=de", headers=auth(ACME_KEY))).json()
    assert (de["path"], de["source"]) == (
        "messages/exception_customs_hold.de.jinja",
        "default, all languages",
    )
    text = "{%- macro subject() -%}Ihr Paket ist beim Zoll{%- endmacro -%}"
    saved = await client.put(f"{url}?locale=de", json={"text": text}, headers=auth(ACME_KEY))
    assert saved.status == 200
    de = await (await client.get(f"{url}?locale=de", headers=auth(ACME_KEY))).json()
    assert (de["text"], de["source"]) == (text, "draft")
    listed = await (await client.get(f"{acme}/templates", headers=auth(ACME_KEY))).json()
    entries = {(t["milestone"], t["locale"]): t["source"] for t in listed["templates"]}
    assert entries[("exception:customs_hold", "de")] == "draft"
    assert entries[("delivered", None)] == "default"
    assert ("delivered", "de") not in entries
    deleted = await client.delete(f"{url}?locale=de", headers=auth(ACME_KEY))
    assert deleted.status == 200
    de = await (await client.get(f"{url}?locale=de", headers=auth(ACME_KEY))).json()
    assert de["source"] == "default, all languages"
    # nothing published held it: deleting dropped the draft's change, not recorded a
    # removal (the review showed the whole default as removed, and publishing listed it)
    overview = await (await client.get(f"{acme}/overrides", headers=auth(ACME_KEY))).json()
    assert overview["draft"]["files"] == {}
    # published, then deleted: that is a removal to publish
    path = "messages/exception_customs_hold.de.jinja"
    own = de["text"] + "{# acme's own copy #}"  # (whole: a draft must pass to publish)
    saved = await client.put(f"{url}?locale=de", json={"text": own}, headers=auth(ACME_KEY))
    revision = (await saved.json())["revision"]
    published = await client.post(
        f"{acme}/overrides/publish", json={"revision": revision}, headers=auth(ACME_KEY)
    )
    assert published.status == 200, await published.text()
    await client.delete(f"{url}?locale=de", headers=auth(ACME_KEY))
    overview = await (await client.get(f"{acme}/overrides", headers=auth(ACME_KEY))).json()
    assert overview["draft"]["files"] == {path: None}
    for bad in (f"{acme}/templates/teleported", f"{url}?locale=xx"):
        resp = await client.get(bad, headers=auth(ACME_KEY))
        assert resp.status == 404, bad
    wrong = await client.put(url, json={"txt": "x"}, headers=auth(ACME_KEY))
    assert wrong.status == 422


async def test_brand_and_policy_as_fields_merged_over_the_files_beneath(client: Client) -> None:
    acme = BASE.format(m="acme")
    resp = await client.put(f"{acme}/brand", json={"accent": "#808080"}, headers=auth(ACME_KEY))
    assert resp.status == 200
    assert any("accent" in p and "4.5:1" in p for p in (await resp.json())["problems"])
    brand = await (await client.get(f"{acme}/brand", headers=auth(ACME_KEY))).json()
    assert brand["override"] == {"accent": "#808080"}
    assert brand["brand"] is None and "accent" in brand["problem"]
    resp = await client.put(f"{acme}/brand", json={"name": "Acme"}, headers=auth(ACME_KEY))
    assert [p.split(":")[1].strip() for p in (await resp.json())["problems"]] == ["support"]
    support = {"name": "Acme", "support": {"url": "https://help.acme.example"}}
    resp = await client.put(f"{acme}/brand", json=support, headers=auth(ACME_KEY))
    assert (await resp.json())["problems"] == []
    brand = await (await client.get(f"{acme}/brand", headers=auth(ACME_KEY))).json()
    assert brand["brand"]["name"] == "Acme" and brand["brand"]["accent"] == "#1d4ed8"

    late = {"quiet_hours": {"sms": {"start": "25:00", "end": "08:00"}}}
    resp = await client.put(f"{acme}/policy", json=late, headers=auth(ACME_KEY))
    assert any("quiet_hours.sms.start" in p for p in (await resp.json())["problems"])
    calm = {"quiet_hours": {"email": {"start": "22:00", "end": "07:00"}}}
    resp = await client.put(f"{acme}/policy", json=calm, headers=auth(ACME_KEY))
    assert (await resp.json())["problems"] == []
    policy = await (await client.get(f"{acme}/policy", headers=auth(ACME_KEY))).json()
    assert policy["override"] == calm
    assert policy["policy"]["quiet_hours"]["email"] == {"start": "22:00:00", "end": "07:00:00"}
    assert policy["policy"]["quiet_hours"]["sms"] == {"start": "21:00:00", "end": "08:00:00"}
    assert policy["policy"]["dedupe_window_hours"] == 168
    not_a_mapping = await client.put(f"{acme}/policy", json=[1], headers=auth(ACME_KEY))
    assert not_a_mapping.status == 422
    revision = (await resp.json())["revision"]
    published = await client.post(
        f"{acme}/overrides/publish", json={"revision": revision}, headers=auth(ACME_KEY)
    )
    assert (await published.json())["version"] == 1


async def test_a_template_cannot_read_another_merchants_files(
    client: Client, settings: Settings, tmp_path: Path
) -> None:
    """The default templates' folder holds every merchant's folder: a template may load
    templates only, never another merchant's brand, templates or catalogs."""
    templates = tmp_path / "templates"
    shutil.copytree(data_dir("templates", None), templates)
    (templates / "globex").mkdir()
    (templates / "globex" / "brand.yaml").write_text("name: Globex\nfooter: SECRET-GLOBEX\n")
    (templates / "globex" / "messages").mkdir()
    (templates / "globex" / "messages" / "delivered.jinja").write_text("SECRET-TEMPLATE")
    own = settings.model_copy(update={"templates_dir": templates})
    async with TestClient(TestServer(create_app(own))) as c:
        for name in ("globex/brand.yaml", "globex/messages/delivered.jinja", "brand.yaml"):
            text = "{%- macro subject() -%}{% include '" + name + "' %}{%- endmacro -%}"
            resp = await c.post(
                f"{BASE.format(m='acme')}/preview",
                json={"milestone": "delivered", "files": {"messages/delivered.jinja": text}},
                headers=auth(ACME_KEY),
            )
            body = await resp.text()
            assert resp.status == 422, name
            assert "SECRET" not in body and "not a template a message may load" in body


async def test_a_rollback_is_checked_and_moves_the_drafts_revision(
    client: Client, settings: Settings
) -> None:
    acme = BASE.format(m="acme")
    nothing = await client.post(
        f"{acme}/overrides/rollback", json={"version": 0}, headers=auth(ACME_KEY)
    )
    assert nothing.status == 422 and "nothing is published" in await nothing.text()
    # version 1 uses a variable; version 2 does not
    uses = DEFAULT.replace("{%- macro subject() -%}", "{%- macro subject() -%}{{ brand.slogan }}")
    for text in (subject("v1"), subject("v2")):
        saved = await client.put(
            f"{acme}/overrides/draft/messages/delivered.jinja",
            json={"text": text},
            headers=auth(ACME_KEY),
        )
        revision = (await saved.json())["revision"]
        await client.post(
            f"{acme}/overrides/publish", json={"revision": revision}, headers=auth(ACME_KEY)
        )
    # a draft reviewed at some revision, then a rollback: that review no longer holds
    saved = await client.put(
        f"{acme}/overrides/draft/messages/delivered.jinja",
        json={"text": subject("v3")},
        headers=auth(ACME_KEY),
    )
    reviewed = (await saved.json())["revision"]
    back = await client.post(
        f"{acme}/overrides/rollback", json={"version": 1}, headers=auth(ACME_KEY)
    )
    assert back.status == 200
    stale = await client.post(
        f"{acme}/overrides/publish", json={"revision": reviewed}, headers=auth(ACME_KEY)
    )
    assert stale.status == 409
    # a version that fails today's checks is not restored
    r = redis.Redis.from_url(str(settings.redis_url))
    record = json.loads(r.hget("ntf:ovr:{acme}:versions", "1") or b"{}")
    record["files"]["messages/delivered.jinja"] = uses
    r.hset("ntf:ovr:{acme}:versions", "1", json.dumps(record))
    r.close()
    broken = await client.post(
        f"{acme}/overrides/rollback", json={"version": 1}, headers=auth(ACME_KEY)
    )
    assert broken.status == 422
    assert "slogan" in await broken.text()
    missing = await client.post(
        f"{acme}/overrides/rollback", json={"version": 99}, headers=auth(ACME_KEY)
    )
    assert missing.status == 404


async def test_an_unknown_filter_is_a_problem_named_not_a_server_error(client: Client) -> None:
    """A typo in a filter's name answered 500 to the save (the draft saved anyway), then to
    every later save and to publish, until the file was discarded."""
    acme = BASE.format(m="acme")
    resp = await client.put(
        f"{acme}/templates/delivered",
        json={"text": subject("{{ event.when|datetimeformat }}")},
        headers=auth(ACME_KEY),
    )
    assert resp.status == 200, await resp.text()
    saved = await resp.json()
    assert any("No filter named 'datetimeformat'" in p for p in saved["problems"]), saved
    resp = await client.put(f"{acme}/brand", json={"name": "Acme"}, headers=auth(ACME_KEY))
    assert resp.status == 200, await resp.text()
    assert any("datetimeformat" in p for p in (await resp.json())["problems"])
    resp = await client.post(
        f"{acme}/overrides/publish",
        json={"revision": (await resp.json())["revision"]},
        headers=auth(ACME_KEY),
    )
    assert resp.status == 422, await resp.text()
    assert "datetimeformat" in json.dumps(await resp.json())


@pytest.mark.parametrize(
    ("path", "text", "named"),
    [
        ("email/layout.html", "", "email/layout.html leaves out the message ({{ m.headline }})"),
        ("email/layout.txt", "x", "email/layout.txt leaves out the message ({{ m.headline }})"),
        ("sms/layout.txt", "x", "sms/layout.txt leaves out the message ({{ m.sms }})"),
        # the message, but no opt-out line for a US or Canadian number
        ("sms/layout.txt", "{{ m.sms }} {{ sms_url }}", "sms/layout.txt gives a US or Canadian"),
    ],
)
async def test_a_layout_that_drops_the_message_or_the_stop_line_is_a_problem(
    client: Client, settings: Settings, path: str, text: str, named: str
) -> None:
    """Such layouts passed every check and were published: emails with an empty body, SMS
    reading "x", with no STOP line for a +1 number."""
    acme = BASE.format(m="acme")
    resp = await client.put(
        f"{acme}/overrides/draft/{path}", json={"text": text}, headers=auth(ACME_KEY)
    )
    saved = await resp.json()
    assert resp.status == 200 and any(named in p for p in saved["problems"]), saved
    resp = await client.post(
        f"{acme}/overrides/publish", json={"revision": saved["revision"]}, headers=auth(ACME_KEY)
    )
    assert resp.status == 422, await resp.text()
    # the shipped layouts keep both: a +1 number's SMS says how to stop them
    # (daytime there: quiet hours go by a zoneless number's own zones, 06:00 in +1 415)
    recipient = {
        "email": "ana@example.com",
        "phone": "+14155550100",
        "locale": "en_US",
        "timezone": "America/New_York",
    }
    await post(client, transition(status="delivered", recipient=recipient))
    await run_worker(settings)
    [sms] = outbox_files(settings, ".sms.json")
    body = json.loads(sms.read_text())["body"]
    assert "your parcel was delivered" in body and body.endswith("Reply STOP to opt out."), body


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"name": "   "}, "name: must hold some text, not only spaces or invisible"),
        ({"name": "\u200b"}, "name: must hold some text, not only spaces or invisible"),
        ({"logo_url": "https://"}, "logo_url: must name a host after https://"),
        ({"logo_url": "https://a b.example/x.png"}, "logo_url: must not contain spaces"),
        ({"support": {"url": "https://"}}, "support.url: must name a host"),
    ],
)
async def test_a_blank_shop_name_or_a_broken_logo_url_is_a_problem(
    client: Client, fields: dict[str, Any], named: str
) -> None:
    """Accepted by the API with no problem: every SMS then began ": your parcel…" with a
    blank From name, or every email showed a broken image."""
    body = {"name": "Acme", "support": {"email": "help@acme.example"}, **fields}
    resp = await client.put(f"{BASE.format(m='acme')}/brand", json=body, headers=auth(ACME_KEY))
    problems = (await resp.json())["problems"]
    assert any(named in p for p in problems), problems


async def test_a_version_or_revision_sent_as_true_is_refused_not_read_as_1(client: Client) -> None:
    acme = BASE.format(m="acme")
    for path, body in (("rollback", {"version": True}), ("publish", {"revision": True})):
        resp = await client.post(f"{acme}/overrides/{path}", json=body, headers=auth(ACME_KEY))
        assert resp.status == 422, (path, await resp.text())
        assert next(iter(body)) in await resp.text()
    # in plain words, not pydantic's ("Input should be a valid integer", "Field required":
    # a second black-box run as a merchant)
    for body, said in (
        ({"version": 1, "live": "abc"}, {"field": "live", "message": "must be a whole number"}),
        ({"version": 1, "live": -1}, {"field": "live", "message": "must be 0 or more"}),
        ({}, {"field": "version", "message": "is required"}),
    ):
        resp = await client.post(f"{acme}/overrides/rollback", json=body, headers=auth(ACME_KEY))
        assert (await resp.json())["error"]["details"] == [said], body


async def test_a_long_shop_name_is_named_and_only_the_merchants_languages_are_budgeted(
    client: Client,
) -> None:
    """A 26-character name gave 20 SMS-budget problems, all in Arabic, with nothing naming
    the name, and blocked every publish even with `locales: [en]`."""
    acme = BASE.format(m="acme")
    brand = {"name": "Acme Outdoor Equipment Co.", "support": {"email": "help@acme.example"}}
    resp = await client.put(f"{acme}/brand", json=brand, headers=auth(ACME_KEY))
    problems = (await resp.json())["problems"]
    over = [p for p in problems if "segments in" in p]
    assert over and all("the shop name takes 26 characters of it" in p for p in over), problems
    # the SMS quoted as read: no escaped direction marks ('\u200f\u2068Acme…' read as part
    # of the words: a black-box run as a merchant)
    assert all("\\u" not in p and "\u200f" not in p and "\u2068" not in p for p in over)
    assert all("“" in p and "”" in p for p in over), over
    resp = await client.put(
        f"{acme}/brand", json={**brand, "locales": ["en"]}, headers=auth(ACME_KEY)
    )
    assert (await resp.json())["problems"] == []
