"""The merchant editor's server side, over HTTP: sessions and CSRF, scoping, the brand and
cadence forms (what they write), per-locale messages, the timeline search. The browser
flow and axe-core are in test_editor_browser.py."""

from __future__ import annotations

import html
import re
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from aiohttp.test_utils import TestClient, TestServer
from pydantic import BaseModel, ValidationError

from notifier.app import create_app
from notifier.resources import data_dir
from notifier.settings import Settings
from notifier.web.forms import field_errors
from tests.conftest import (
    ACME_KEY,
    ADMIN_KEY,
    auth,
    fixed_clock,
    make_settings,
    outbox_files,
    post,
    run_worker,
    transition,
    with_macro,
)

Client = TestClient[Any, Any]
ACME = "/merchant/acme"
DEFAULT_DELIVERED = (data_dir("templates", None) / "messages" / "delivered.jinja").read_text()


async def sign_in(client: Client, key: str = ACME_KEY, **headers: str) -> str:
    """Sign in through the form; the session's CSRF token."""
    resp = await client.get("/merchant/sign-in")
    token = re.search(r'name="csrf" value="([^"]+)"', await resp.text())
    assert token is not None
    resp = await client.post(
        "/merchant/sign-in",
        data={"csrf": token.group(1), "key": key, "next": ""},
        headers=headers,
        allow_redirects=False,
    )
    assert resp.status == 303, await resp.text()
    return await csrf_of(client, f"{ACME}/" if key == ACME_KEY else "/merchant")


async def csrf_of(client: Client, path: str) -> str:
    resp = await client.get(path)
    found = re.search(r'name="csrf" value="([^"]+)"', await resp.text())
    assert found is not None, await resp.text()
    return found.group(1)


def base_of(page: str) -> str:
    found = re.search(r'name="base" value="([0-9a-f]+)"', page)
    assert found is not None
    return found.group(1)


async def draft(client: Client) -> dict[str, Any]:
    resp = await client.get("/v1/merchants/acme/overrides", headers=auth(ACME_KEY))
    body: dict[str, Any] = (await resp.json())["draft"]["files"]
    return body


async def test_the_session_cookie_is_httponly_strict_and_the_key_is_never_stored(
    client: Client, settings: Settings
) -> None:
    resp = await client.get("/merchant/sign-in")
    token = re.search(r'name="csrf" value="([^"]+)"', await resp.text())
    assert token is not None
    resp = await client.post(
        "/merchant/sign-in",
        data={"csrf": token.group(1), "key": ACME_KEY},
        headers={"X-Forwarded-Proto": "https"},
        allow_redirects=False,
    )
    cookie = resp.headers.getall("Set-Cookie")
    [session] = [c for c in cookie if c.startswith("notifier_session=")]
    for flag in ("HttpOnly", "SameSite=Strict", "Path=/merchant", "Secure"):
        assert flag in session
    assert resp.headers["Location"] == "/merchant"
    r = redis.Redis.from_url(str(settings.redis_url))
    stored = b"".join(r.get(k) or b"" for k in r.scan_iter("ntf:web:session:*"))
    r.close()
    assert stored and ACME_KEY.encode() not in stored
    page = await client.get(f"{ACME}/")
    assert page.status == 200
    for header in ("Content-Security-Policy", "X-Frame-Options", "X-Content-Type-Options"):
        assert header in page.headers


async def test_signing_in_refuses_a_wrong_key_a_missing_token_and_another_site(
    client: Client,
) -> None:
    resp = await client.get("/merchant/sign-in")
    token = re.search(r'name="csrf" value="([^"]+)"', await resp.text())
    assert token is not None
    wrong = await client.post("/merchant/sign-in", data={"csrf": token.group(1), "key": "nope"})
    assert wrong.status == 401
    assert "not a merchant API key" in await wrong.text()
    no_token = await client.post("/merchant/sign-in", data={"key": ACME_KEY})
    assert no_token.status == 403
    elsewhere = await client.post(
        "/merchant/sign-in",
        data={"csrf": token.group(1), "key": ACME_KEY},
        headers={"Origin": "https://evil.example"},
    )
    assert elsewhere.status == 403
    # none of them opened a session
    page = await client.get(f"{ACME}/", allow_redirects=False)
    assert page.status == 303
    assert page.headers["Location"].startswith("/merchant/sign-in?next=")


POSTS = [
    ("/messages/delivered", {"text": "x", "action": "save"}),
    ("/brand", {"name": "Evil"}),
    ("/cadence", {"dedupe_window_hours": "1"}),
    ("/publish", {"revision": "1"}),
    ("/rollback", {"version": "0"}),
    ("/messages/delivered/test-send", {"channel": "email", "to": "ana@example.com", "text": "x"}),
]


@pytest.mark.parametrize(("path", "form"), POSTS)
async def test_every_form_needs_the_sessions_csrf_token(
    client: Client, path: str, form: dict[str, str]
) -> None:
    csrf = await sign_in(client)
    for data, headers in (
        (form, {}),
        ({**form, "csrf": "forged"}, {}),
        ({**form, "csrf": csrf}, {"Origin": "https://evil.example"}),
    ):
        resp = await client.post(f"{ACME}{path}", data=data, headers=headers)
        assert resp.status == 403, (path, data, headers)
    assert await draft(client) == {}
    versions = await client.get("/v1/merchants/acme/overrides/versions", headers=auth(ACME_KEY))
    assert (await versions.json())["versions"] == []
    preview = await client.post(
        f"{ACME}/preview", json={"milestone": "delivered", "path": "x", "text": "x"}
    )
    assert preview.status == 403


GETS = ["/", "/messages", "/messages/delivered", "/brand", "/cadence", "/publish", "/versions"]


async def test_head_on_a_page_answers_as_get_does(client: Client) -> None:
    """HEAD without a session said 401 "Signed out … save once more" where GET sends to
    the sign-in page."""
    for path in (f"{ACME}/", f"{ACME}/messages/delivered", f"{ACME}/cadence"):
        got = await client.get(path, allow_redirects=False)
        head = await client.head(path, allow_redirects=False)
        assert (head.status, head.headers.get("Location")) == (
            got.status,
            got.headers.get("Location"),
        ), path
        assert got.status == 303
    await sign_in(client)
    for path in (f"{ACME}/", f"{ACME}/messages/delivered"):
        assert (await client.head(path)).status == 200, path


async def test_a_session_sees_only_its_merchants_pages(client: Client) -> None:
    csrf = await sign_in(client)
    other = "/merchant/globex"
    for path in [*GETS, "/timeline?q=shp_123"]:
        resp = await client.get(f"{other}{path}")
        assert resp.status == 403, path
        assert "may not act for that merchant" in await resp.text()
    for path, form in POSTS:
        resp = await client.post(f"{other}{path}", data={**form, "csrf": csrf})
        assert resp.status == 403, path
    preview = await client.post(
        f"{other}/preview",
        json={"milestone": "delivered", "path": "messages/delivered.jinja", "text": "x"},
        headers={"X-CSRF-Token": csrf},
    )
    assert preview.status == 403


async def test_signing_out_or_removing_the_key_ends_the_session(
    client: Client, settings: Settings
) -> None:
    await sign_in(client)
    cookie = client.session.cookie_jar.filter_cookies(client.make_url("/merchant/acme/"))
    # the same Redis, but the key is no longer configured: its session is over
    without = settings.model_copy(update={"api_keys": {ADMIN_KEY: ["*"]}})
    async with TestClient(TestServer(create_app(without))) as other:
        other.session.cookie_jar.update_cookies(cookie, other.make_url("/merchant/"))
        resp = await other.get(f"{ACME}/", allow_redirects=False)
        assert resp.status == 303
    # a revoked key's session is deleted, so it is over on every server
    assert (await client.get(f"{ACME}/", allow_redirects=False)).status == 303
    csrf = await sign_in(client)
    assert (await client.get(f"{ACME}/", allow_redirects=False)).status == 200
    # a typed /merchant/sign-out is a button to sign out, not a merchant called "sign-out",
    # and the GET itself ends nothing
    typed = await client.get("/merchant/sign-out", allow_redirects=False)
    assert typed.status == 200
    html = await typed.text()
    assert '<form method="post" action="/merchant/sign-out"' in html and "<h1>Sign out" in html
    # typed with a slash too (it was the overview of a merchant "sign-out"), and so are the
    # sign-in page (its query kept) and the picker's form
    for typed_path, target in [
        ("/merchant/sign-out/", "/merchant/sign-out"),
        ("/merchant/sign-in/?next=/merchant/acme/", "/merchant/sign-in?next=/merchant/acme/"),
        ("/merchant/go/?merchant=acme", "/merchant/go?merchant=acme"),
    ]:
        slashed = await client.get(typed_path, allow_redirects=False)
        assert (slashed.status, slashed.headers["Location"]) == (308, target)
    followed = await client.get("/merchant/sign-out/")
    assert "<h1>Sign out" in await followed.text()
    assert (await client.get(f"{ACME}/", allow_redirects=False)).status == 200
    resp = await client.post("/merchant/sign-out", data={"csrf": csrf}, allow_redirects=False)
    assert resp.status == 303
    assert (await client.get(f"{ACME}/", allow_redirects=False)).status == 303
    typed = await client.get("/merchant/sign-out", allow_redirects=False)
    assert (typed.status, typed.headers["Location"]) == (303, "/merchant/sign-in")


async def test_the_brand_form_writes_only_what_differs_and_refuses_an_unreadable_colour(
    client: Client,
) -> None:
    csrf = await sign_in(client)
    page = await client.get(f"{ACME}/brand")
    html = await page.text()
    assert "White text on it: 6.70:1" in html  # the default accent #1d4ed8
    form = {"csrf": csrf, "name": "Your shop", "accent": "#1d4ed8", "default_locale": "en"}
    form["base"] = base_of(html)  # the draft's brand.yaml as this page showed it
    resp = await client.post(f"{ACME}/brand", data=form)
    assert resp.status == 200
    assert "brand.yaml" not in await draft(client)  # nothing differs: nothing saved
    form["base"] = base_of(await resp.text())  # the page it led to
    bad = await client.post(f"{ACME}/brand", data={**form, "accent": "#808080"})
    assert bad.status == 422
    text = await bad.text()
    assert "neither white (3.95:1) nor dark (4.49:1)" in text
    assert 'aria-invalid="true"' in text
    assert "brand.yaml" not in await draft(client)  # not saved
    http = await client.post(f"{ACME}/brand", data={**form, "support.url": "http://x.example"})
    assert http.status == 422
    assert "must be an https:// URL" in await http.text()
    # the name is the From header's display name: one line, as the email writes it (the
    # preview showed the line break the email and the SMS flattened)
    crlf = {**form, "name": "Evil\r\nBcc: x@evil.com", "base": base_of(await http.text())}
    resp = await client.post(f"{ACME}/brand", data=crlf)
    assert "Saved to your draft" in await resp.text()
    assert yaml.safe_load((await draft(client))["brand.yaml"])["name"] == "Evil Bcc: x@evil.com"
    form["base"] = base_of(await resp.text())
    blank = await client.post(f"{ACME}/brand", data={**form, "name": "\x00\r\n"})
    assert blank.status == 422
    assert "must not be empty" in await blank.text()
    good = {**form, "name": "Acme", "accent": "#fde68a", "support.email": "help@acme.example"}
    resp = await client.post(f"{ACME}/brand", data=good)
    assert "Saved to your draft" in await resp.text()
    assert yaml.safe_load((await draft(client))["brand.yaml"]) == {
        "name": "Acme",
        "accent": "#fde68a",
        "support": {"email": "help@acme.example"},
    }
    again = await client.get(f"{ACME}/brand")
    assert 'value="help@acme.example"' in await again.text()


async def test_the_brand_form_shows_and_keeps_every_field_of_the_brand(client: Client) -> None:
    """The dark-mode logo, the SMS short-link base and the commitments were in brand.yaml
    but not on the form: a merchant could not set them in the editor. The form now shows
    them (a value set through the API shows, and a save keeps it); a short-link base once
    dropped when the form saved another link of its group (a black-box review)."""
    put = await client.put(
        "/v1/merchants/acme/brand",
        json={
            "links": {"short_base": "https://acme.example/t/"},
            "logo_dark_url": "https://acme.example/logo-dark.png",
            "commitments": {"refunds": True},
        },
        headers=auth(ACME_KEY),
    )
    assert put.status == 200, await put.text()
    csrf = await sign_in(client)
    html = await (await client.get(f"{ACME}/brand")).text()
    assert 'name="links.short_base" value="https://acme.example/t/"' in html
    assert 'name="logo_dark_url" value="https://acme.example/logo-dark.png"' in html
    assert 'id="f-commitments-refunds" name="commitments.refunds" checked>' in html
    assert 'name="commitments.damage_claim">' in html  # not ticked
    form = {
        "csrf": csrf,
        "name": "Your shop",
        "accent": "#b91c1c",
        "default_locale": "en",
        "links.short_base": "https://acme.example/t/",
        "logo_dark_url": "https://acme.example/logo-dark.png",
        "commitments.refunds": "on",
    }  # as the page posts it, with one link more
    resp = await client.post(
        f"{ACME}/brand",
        data={
            **form,
            "links.pickup": "https://acme.example/pickup",
            # a text box's lines, as the browser sends them (CRLF): kept as plain lines
            "footer": "Acme SAS\r\n12 rue de la Paix\r\n",
            "base": base_of(html),
        },
    )
    assert "Saved to your draft" in await resp.text()
    saved = yaml.safe_load((await draft(client))["brand.yaml"])
    assert saved["footer"] == "Acme SAS\n12 rue de la Paix"
    assert saved["links"] == {
        "short_base": "https://acme.example/t/",
        "pickup": "https://acme.example/pickup",
    }
    assert saved["logo_dark_url"] == "https://acme.example/logo-dark.png"
    assert saved["accent"] == "#b91c1c"
    assert saved["commitments"] == {"refunds": True}
    # one ticked, the other unticked, a base cleared: as a browser posts the boxes
    changed = {**form, "commitments.damage_claim": "on", "links.short_base": ""}
    del changed["commitments.refunds"]
    resp = await client.post(f"{ACME}/brand", data={**changed, "base": base_of(await resp.text())})
    assert "Saved to your draft" in await resp.text()
    saved = yaml.safe_load((await draft(client))["brand.yaml"])
    assert saved["commitments"] == {"damage_claim": True}
    assert "links" not in saved
    bad = {**changed, "links.short_base": "https://acme.example/{tracking_number}"}
    resp = await client.post(f"{ACME}/brand", data={**bad, "base": base_of(await resp.text())})
    assert resp.status == 422
    assert "SMS short-link base" in await resp.text()  # the summary names it by its label


async def test_a_settings_form_opened_before_another_save_is_refused(client: Client) -> None:
    """Two people have the brand page open; one saves the accent, then the other saves the
    support hours. Each form holds every field: the second save undid the first, silently
    (found by a black-box probe in two browsers). It is refused with 409 now, and says why;
    the cadence form the same."""
    csrf = await sign_in(client)
    first, second = [await (await client.get(f"{ACME}/brand")).text() for _ in range(2)]
    form = {"csrf": csrf, "name": "Your shop", "accent": "#1d4ed8", "default_locale": "en"}
    resp = await client.post(
        f"{ACME}/brand", data={**form, "accent": "#b91c1c", "base": base_of(first)}
    )
    assert "Saved to your draft" in await resp.text()
    late = {**form, "support.hours": "Mon-Fri 9-17", "base": base_of(second)}
    resp = await client.post(f"{ACME}/brand", data=late)
    assert resp.status == 409
    text = await resp.text()
    assert "someone saved these settings since you opened this page" in text
    assert 'value="Mon-Fri 9-17"' in text  # what they typed is still on the page
    assert yaml.safe_load((await draft(client))["brand.yaml"]) == {"accent": "#b91c1c"}

    pages = [await (await client.get(f"{ACME}/cadence")).text() for _ in range(2)]
    one, two = cadence_form(pages[0]), cadence_form(pages[1])
    resp = await client.post(f"{ACME}/cadence", data={**one, "dedupe_window_hours": "48"})
    assert "Saved to your draft" in await resp.text()
    resp = await client.post(f"{ACME}/cadence", data={**two, "coalesce_seconds": "30"})
    assert resp.status == 409
    assert yaml.safe_load((await draft(client))["policy.yaml"]) == {"dedupe_window_hours": 48}


async def put_draft(client: Client, path: str, text: str) -> None:
    resp = await client.put(
        f"/v1/merchants/acme/overrides/draft/{path}", json={"text": text}, headers=auth(ACME_KEY)
    )
    assert resp.status == 200, await resp.text()


async def test_a_draft_that_does_not_validate_is_shown_as_it_is_and_saving_keeps_it(
    client: Client,
) -> None:
    """A draft policy.yaml or brand.yaml with one bad value (saved through the admin API):
    the form used to show the values beneath it, the defaults, without a word, and saving
    it then dropped every other value of the draft (found by a black-box probe). It shows
    the draft's values now, says the draft does not validate and marks the bad field;
    saving with that field fixed keeps the rest."""
    await sign_in(client)
    policy = (
        "dedupe_window_hours: 48\n"
        "throttle: {max_sms_per_shipment: 3}\n"
        "quiet_hours: {sms: {start: 9pm, end: '08:00'}}\n"
    )
    await put_draft(client, "policy.yaml", policy)
    resp = await client.get(f"{ACME}/cadence")
    assert resp.status == 200
    page = await resp.text()
    assert "Your draft's policy.yaml does not validate" in page
    assert "quiet_hours.sms.start" in page
    form = cadence_form(page)
    assert (form["dedupe_window_hours"], form["throttle.max_sms_per_shipment"]) == ("48", "3")
    assert form["quiet_hours.sms.start"] == "9pm"
    start = re.search(r'<input [^>]*name="quiet_hours\.sms\.start"[^>]*>', page)
    assert start is not None and 'aria-invalid="true"' in start.group(0)
    resp = await client.post(f"{ACME}/cadence", data={**form, "quiet_hours.sms.start": "21:30"})
    assert "Saved to your draft" in await resp.text()
    assert yaml.safe_load((await draft(client))["policy.yaml"]) == {
        "dedupe_window_hours": 48,
        "throttle": {"max_sms_per_shipment": 3},
        "quiet_hours": {"sms": {"start": "21:30"}},
    }

    await put_draft(client, "brand.yaml", "name: Beta Store\naccent: '#777777'\n")
    resp = await client.get(f"{ACME}/brand")
    assert resp.status == 200
    page = await resp.text()
    assert "Your draft's brand.yaml does not validate" in page
    assert 'value="Beta Store"' in page and 'value="#777777"' in page
    form = {
        "csrf": await csrf_of(client, f"{ACME}/brand"),
        "base": base_of(page),
        "name": "Beta Store",
        "accent": "#1d4ed8",
        "default_locale": "en",
    }
    resp = await client.post(f"{ACME}/brand", data=form)
    assert "Saved to your draft" in await resp.text()
    assert yaml.safe_load((await draft(client))["brand.yaml"]) == {"name": "Beta Store"}

    # parts of another kind than the form's: the values beneath for them, and the page
    # says why (they were a 500: a list where the rules' table is, text for a group)
    for text in (
        "statuses: []\ndedupe_window_hours: 12\n",
        "exceptions: {lost: x}\n",
        "exceptions: {lost: {channels: 5}}\n",  # (past what ``shaped`` foresees)
    ):
        await put_draft(client, "policy.yaml", text)
        resp = await client.get(f"{ACME}/cadence")
        assert resp.status == 200, text
        assert "does not validate" in await resp.text()
    await put_draft(client, "brand.yaml", "name: Beta Store\nchannels: x\nsupport: []\n")
    resp = await client.get(f"{ACME}/brand")
    assert resp.status == 200
    page = await resp.text()
    assert "does not validate" in page and 'value="Beta Store"' in page

    # a value set where the default is unset (email quiet hours) is kept through a save
    # that fixes another field (``shaped`` dropped it: found by a review)
    await put_draft(
        client,
        "policy.yaml",
        "dedupe_window_hours: -1\nquiet_hours: {email: {start: '22:00', end: '07:00'}}\n",
    )
    page = await (await client.get(f"{ACME}/cadence")).text()
    form = cadence_form(page)
    assert form["quiet_hours.email.enabled"] == "on" and form["quiet_hours.email.start"] == "22:00"
    resp = await client.post(f"{ACME}/cadence", data={**form, "dedupe_window_hours": "48"})
    assert "Saved to your draft" in await resp.text()
    written = yaml.safe_load((await draft(client))["policy.yaml"])
    assert written["quiet_hours"]["email"] == {"start": "22:00", "end": "07:00"}, written

    # a draft that does not even read: the values in force (nothing published: those
    # beneath), and the page says so
    await put_draft(client, "policy.yaml", "dedupe_window_hours: [48\n")
    page = await (await client.get(f"{ACME}/cadence")).text()
    assert "It does not read: the form shows the values in force now" in page
    assert cadence_form(page)["dedupe_window_hours"] == "168"


async def test_a_draft_that_does_not_read_shows_the_published_values_not_the_defaults(
    client: Client,
) -> None:
    """With SMS quiet hours 09:00-14:00 published, a draft policy.yaml that is not YAML
    showed the defaults (21:00-08:00) in the form, and saving it as shown reverted the live
    quiet hours; the API named the draft's file "published" (found by a black-box review)."""
    await sign_in(client)
    live_policy = "dedupe_window_hours: 24\nquiet_hours: {sms: {start: '09:00', end: '14:00'}}\n"
    await put_draft(client, "policy.yaml", live_policy)
    await put_draft(client, "brand.yaml", "name: Live Store\nsupport: {email: h@acme.example}\n")
    overview = await client.get("/v1/merchants/acme/overrides", headers=auth(ACME_KEY))
    revision = (await overview.json())["draft"]["revision"]
    resp = await client.post(
        "/v1/merchants/acme/overrides/publish", json={"revision": revision}, headers=auth(ACME_KEY)
    )
    assert resp.status == 200, await resp.text()

    await put_draft(client, "policy.yaml", "statuses: [oops\n")
    resp = await client.get("/v1/merchants/acme/policy", headers=auth(ACME_KEY))
    problem = (await resp.json())["problem"]
    assert problem.startswith("policy.yaml of acme's draft: not valid YAML"), problem
    page = await (await client.get(f"{ACME}/cadence")).text()
    assert "It does not read: the form shows the values in force now" in page
    form = cadence_form(page)
    assert (form["quiet_hours.sms.start"], form["quiet_hours.sms.end"]) == ("09:00", "14:00")
    assert form["dedupe_window_hours"] == "24"
    resp = await client.post(f"{ACME}/cadence", data=form)  # saved as shown
    assert "Saved to your draft" in await resp.text()
    written = yaml.safe_load((await draft(client))["policy.yaml"])
    assert written["quiet_hours"]["sms"] == {"start": "09:00", "end": "14:00"}, written
    assert written["dedupe_window_hours"] == 24, written

    await put_draft(client, "brand.yaml", "name: [oops\n")
    resp = await client.get("/v1/merchants/acme/brand", headers=auth(ACME_KEY))
    problem = (await resp.json())["problem"]
    assert problem.startswith("brand.yaml of acme's draft"), problem
    page = await (await client.get(f"{ACME}/brand")).text()
    assert "It does not read: the form shows the values in force now" in page
    assert 'value="Live Store"' in page


def input_tag(page: str, name: str) -> str:
    found = re.search(rf'<input [^>]*name="{re.escape(name)}"[^>]*>', page)
    assert found is not None, name
    return found.group(0)


async def test_every_cadence_error_marks_its_field(client: Client) -> None:
    """Errors of the quiet hours and of the default time zone are tied to their inputs
    (aria-invalid, described by the error), as the other fields' are; an experiment's bad
    name says what a name may hold, not a regular expression."""
    await sign_in(client)
    form = cadence_form(await (await client.get(f"{ACME}/cadence")).text())
    for changed, marked, says in (
        ({"quiet_hours.sms.start": "9pm"}, ["quiet_hours.sms.start"], "must be HH:MM"),
        (
            {"quiet_hours.sms.start": "08:00", "quiet_hours.sms.end": "08:00"},
            ["quiet_hours.sms.start", "quiet_hours.sms.end"],
            "start and end are equal",
        ),
        (
            {"quiet_hours.default_timezone": "Mars/Base"},
            ["quiet_hours.default_timezone"],
            "&#39;Mars/Base&#39; is not an IANA zone",
        ),
    ):
        resp = await client.post(f"{ACME}/cadence", data={**form, **changed})
        assert resp.status == 422, changed
        page = await resp.text()
        assert says in page, changed
        for name in marked:
            tag = input_tag(page, name)
            assert 'aria-invalid="true"' in tag, tag
            described = re.search(r'aria-describedby="([^"]+)"', tag)
            assert described is not None
            error_ids = [i for i in described.group(1).split() if i.endswith("-error")]
            assert error_ids and f'id="{error_ids[0]}"' in page, tag
    bad_name = {**form, "experiments.0.name": "Bad Name!", "experiments.0.message": "delivered"}
    bad_name["experiments.0.b_percent"] = "50"
    page = await (await client.post(f"{ACME}/cadence", data=bad_name)).text()
    assert "must be 1 to 40 lowercase letters, digits and hyphens" in page
    assert "should match pattern" not in page


def cadence_form(html: str) -> dict[str, str]:
    """The cadence form's fields as the page shows them (what a browser would submit)."""
    form: dict[str, str] = {}
    for tag in re.findall(r"<input [^>]+>", html):
        name = re.search(r'name="([^"]+)"', tag)
        if name is None:
            continue
        if 'type="checkbox"' in tag:
            if " checked" in tag:
                form[name.group(1)] = "on"
        else:
            value = re.search(r'value="([^"]*)"', tag)
            form[name.group(1)] = value.group(1) if value else ""
    return form


async def test_the_cadence_form_round_trips_and_writes_only_changes(client: Client) -> None:
    await sign_in(client)
    html = await (await client.get(f"{ACME}/cadence")).text()
    for words in ("Repeat window", "Quiet hours", "Daily cap per shipment", "Minor-update"):
        assert words in html
    form = cadence_form(html)
    assert form["quiet_hours.sms.start"] == "21:00"
    resp = await client.post(f"{ACME}/cadence", data=form)
    assert resp.status == 200
    # unchanged: no revision, no policy.yaml that only says nothing differs (found by a
    # black-box probe: the draft then listed it as a change to review)
    assert "Nothing to save" in await resp.text()
    assert "policy.yaml" not in await draft(client)
    brand = cadence_form(await (await client.get(f"{ACME}/brand")).text())
    brand["default_locale"] = "en"  # (a select: what the browser submits)
    resp = await client.post(f"{ACME}/brand", data=brand)
    assert "Nothing to save" in await resp.text(), await resp.text()
    assert await draft(client) == {}
    # a draft file written through the files API, with its comments and its own key order,
    # that says what the untouched form says: nothing to save either
    await put_draft(
        client, "policy.yaml", "# mine\ncoalesce_seconds: 30\ndedupe_window_hours: 48\n"
    )
    form = cadence_form(await (await client.get(f"{ACME}/cadence")).text())
    resp = await client.post(f"{ACME}/cadence", data=form)
    assert "Nothing to save" in await resp.text()
    assert (await draft(client))["policy.yaml"].startswith("# mine")
    gone = await client.delete(
        "/v1/merchants/acme/overrides/draft/policy.yaml", headers=auth(ACME_KEY)
    )
    assert gone.status == 200 and "policy.yaml" not in await draft(client)
    form = cadence_form(await (await client.get(f"{ACME}/cadence")).text())
    changed = {
        **form,
        "quiet_hours.email.enabled": "on",
        "quiet_hours.email.start": "22:00",
        "quiet_hours.email.end": "07:00",
        "exceptions.lost.break_quiet_hours": "on",
        "throttle.max_sms_per_shipment": "3",
    }
    del changed["statuses.in_transit.email"]
    del changed["exceptions.lost.inherit"]  # lost gets a rule of its own
    del changed["statuses.exception.sms"]  # every other problem: email only
    resp = await client.post(f"{ACME}/cadence", data=changed)
    assert "Saved to your draft" in await resp.text()
    written = yaml.safe_load((await draft(client))["policy.yaml"])
    assert written == {
        "statuses": {"in_transit": {"channels": []}, "exception": {"channels": ["email"]}},
        "exceptions": {
            "lost": {"channels": ["email", "sms"], "trivial": False, "break_quiet_hours": True}
        },
        "throttle": {"max_sms_per_shipment": 3},
        "quiet_hours": {"email": {"start": "22:00", "end": "07:00"}},
    }
    changed["base"] = base_of(await resp.text())
    # the page shows the draft's values back
    shown = cadence_form(await (await client.get(f"{ACME}/cadence")).text())
    assert shown["quiet_hours.email.start"] == "22:00"
    assert "statuses.in_transit.email" not in shown
    assert "exceptions.customs_hold.inherit" in shown and "exceptions.lost.inherit" not in shown
    bad = await client.post(f"{ACME}/cadence", data={**changed, "quiet_hours.sms.end": "25:00"})
    assert bad.status == 422
    assert "must be HH:MM" in await bad.text()
    nan = await client.post(f"{ACME}/cadence", data={**changed, "dedupe_window_hours": "a week"})
    assert nan.status == 422
    assert "dedupe_window_hours" in await nan.text()
    for huge in ("inf", "1e12"):
        resp = await client.post(f"{ACME}/cadence", data={**changed, "stalled.no_scan_hours": huge})
        assert resp.status == 422, huge  # an hour count the stall clock could not hold


async def test_a_message_written_for_one_locale_is_used_for_that_locale_only(
    client: Client,
) -> None:
    csrf = await sign_in(client)
    page = await client.get(f"{ACME}/messages/delivered?locale=de")
    text = await page.text()
    assert "messages/delivered.de.jinja" in text
    assert "default, all languages" in text
    template = (
        "{%- macro subject() -%}Ihr Paket ist da{%- endmacro -%}"
        "{%- macro sms() -%}{{ brand.name }}: Paket ist da.{%- endmacro -%}"
    )
    base = base_of(text)
    form = {"csrf": csrf, "locale": "de", "text": template, "action": "save", "base": base}
    resp = await client.post(f"{ACME}/messages/delivered", data=form)
    assert resp.status == 200
    assert "the draft has no problems" in (await resp.text()).lower()
    # a second tab still showing the text from before cannot overwrite it unseen
    stale = await client.post(f"{ACME}/messages/delivered", data={**form, "text": "{#- mine -#}"})
    assert stale.status == 409
    stale_page = await stale.text()
    assert "Someone saved this message since you opened it" in stale_page
    assert "{#- mine -#}" in stale_page  # the text typed is shown back, not lost
    # nor can it throw away the other's save ("Discard draft change" did, unasked)
    discard = await client.post(
        f"{ACME}/messages/delivered", data={**form, "action": "discard", "base": base}
    )
    assert discard.status == 409
    assert "Not discarded: someone saved this message since you opened it" in (await discard.text())
    assert (await draft(client)).keys() == {"messages/delivered.de.jinja"}
    overview = await (await client.get(f"{ACME}/messages/delivered")).text()
    assert 'href="?locale=de">de</a>' in overview  # the all-languages page says de has its own
    assert (await draft(client)).keys() == {"messages/delivered.de.jinja"}

    async def subject(locale: str) -> str:
        resp = await client.post(
            "/v1/merchants/acme/preview",
            json={"milestone": "delivered", "locale": locale},
            headers=auth(ACME_KEY),
        )
        body: dict[str, Any] = await resp.json()
        return str(body["subject"])

    assert await subject("de") == "Ihr Paket ist da"
    assert await subject("fr") == "Votre colis a été livré"
    assert await subject("en") == "Your parcel was delivered"


async def test_saving_a_message_unchanged_pins_no_copy_and_the_list_names_its_files(
    redis_url: str, tmp_path: Path
) -> None:
    """ "Save draft" on a message shown as it comes (the default, or the merchant's own
    files) writes nothing: a copy in the draft would pin that text, and later changes to it
    would no longer reach the merchant. The messages list says which messages come from the
    merchant's files instead of calling them the default (found by a black-box probe)."""
    templates = tmp_path / "templates"
    shutil.copytree(data_dir("templates", None), templates)
    (templates / "acme" / "messages").mkdir(parents=True)
    own = "{%- macro subject() -%}Acme: delivered{%- endmacro -%}"
    (templates / "acme" / "messages" / "delivered.jinja").write_text(own)
    settings = make_settings(tmp_path, redis_url=redis_url, templates_dir=templates)
    async with TestClient(TestServer(create_app(settings))) as client:
        csrf = await sign_in(client)
        listing = await (await client.get(f"{ACME}/messages")).text()
        row = re.search(r"<tr>\s*<th[^>]*><a [^>]*messages/delivered\".*?</tr>", listing, re.S)
        assert row is not None and "your files" in row.group(0), listing
        assert "messages/delivered.jinja" in row.group(0)
        for milestone, text in (("delivered", own), ("picked_up", None)):
            page = await (await client.get(f"{ACME}/messages/{milestone}")).text()
            shown = text if text is not None else textarea(page)
            form = {"csrf": csrf, "text": shown, "action": "save", "base": base_of(page)}
            resp = await client.post(f"{ACME}/messages/{milestone}", data=form)
            assert resp.status == 200
            assert "Nothing to save" in await resp.text(), milestone
        assert await draft(client) == {}
        # an edit is saved as always
        page = await (await client.get(f"{ACME}/messages/picked_up")).text()
        form = {"csrf": csrf, "text": textarea(page) + "{# ours #}", "action": "save"}
        resp = await client.post(f"{ACME}/messages/picked_up", data={**form, "base": base_of(page)})
        assert "Saved to your draft" in await resp.text()
        assert (await draft(client)).keys() == {"messages/picked_up.jinja"}


def textarea(page: str) -> str:
    found = re.search(r'<textarea [^>]*name="text"[^>]*>(.*?)</textarea>', page, re.S)
    assert found is not None
    return html.unescape(found.group(1))


async def test_the_check_names_a_message_file_no_one_would_read(client: Client) -> None:
    for path, words in (
        ("messages/delivered.xx.jinja", "no catalog for locale xx"),
        ("messages/deliverd.jinja", "no milestone uses messages/deliverd.jinja"),
    ):
        resp = await client.put(
            f"/v1/merchants/acme/overrides/draft/{path}",
            json={"text": "{%- macro subject() -%}x{%- endmacro -%}"},
            headers=auth(ACME_KEY),
        )
        assert resp.status == 200
        assert any(words in p for p in (await resp.json())["problems"]), path
        await client.delete(f"/v1/merchants/acme/overrides/draft/{path}", headers=auth(ACME_KEY))


async def test_the_timeline_finds_a_shipment_by_tracking_number(
    client: Client, settings: Settings
) -> None:
    await sign_in(client)
    await post(
        client,
        transition(event_id="a", shipment_id="shp_a", tracking_number="TRK1", status="delivered"),
        transition(event_id="b", shipment_id="shp_b", tracking_number="TRK2"),
        transition(event_id="c", shipment_id="shp_c", tracking_number="TRK2"),
    )
    await run_worker(settings)
    one = await (await client.get(f"{ACME}/timeline?q=TRK1")).text()
    assert "Shipment shp_a" in one
    assert "Delivered" in one and "sent" in one
    # what was sent, in a few words, marked as the recipient's language (fr_FR: the fr
    # catalog), which a screen reader then reads as French (it read it as English)
    assert '<q dir="auto" lang="fr">Votre colis a été livré</q>' in one
    both = await (await client.get(f"{ACME}/timeline?q=TRK2")).text()
    assert "2 shipments carried that tracking number" in both
    assert "shipment=shp_b" in both and "shipment=shp_c" in both
    by_id = await (await client.get(f"{ACME}/timeline?q=shp_c")).text()
    assert "Shipment shp_c" in by_id
    chosen = await (await client.get(f"{ACME}/timeline?q=TRK2&shipment=shp_b")).text()
    assert "Shipment shp_b" in chosen
    none = await (await client.get(f"{ACME}/timeline?q=TRK9")).text()
    assert "No shipment with the id or tracking number" in none
    # typed in lower case, or grouped with spaces as on a label: found all the same
    assert "Shipment shp_a" in await (await client.get(f"{ACME}/timeline?q=trk1")).text()
    typed = await (await client.get(f"{ACME}/timeline?q=tr%20k2")).text()
    assert "2 shipments carried that tracking number" in typed
    chosen = await (await client.get(f"{ACME}/timeline?q=tr%20k2&shipment=shp_c")).text()
    assert "Shipment shp_c" in chosen


async def test_the_timeline_says_why_a_message_was_cancelled(
    client: Client, settings: Settings
) -> None:
    """It said "cancelled" alone; the API says why (its delivery's detail)."""
    await sign_in(client)
    night = datetime(2026, 11, 21, 22, 0, tzinfo=UTC)  # 23:00 in Paris: SMS quiet hours
    await post(client, transition(event_id="a", occurred_at="2026-11-21T22:40:00+01:00"))
    await run_worker(settings, clock=fixed_clock(night))
    delivered = transition(
        event_id="b", status="delivered", occurred_at="2026-11-21T22:50:00+01:00"
    )
    await post(client, delivered)
    await run_worker(settings, clock=fixed_clock(night + timedelta(minutes=15)))
    page = await (await client.get(f"{ACME}/timeline?q=shp_123")).text()
    assert "cancelled<br>superseded by delivered" in page, page


async def test_a_key_for_every_merchant_picks_one(client: Client) -> None:
    await sign_in(client, ADMIN_KEY)
    picker = await client.get("/merchant")
    assert "Choose a merchant" in await picker.text()
    resp = await client.get("/merchant/go?merchant=acme", allow_redirects=False)
    assert resp.headers["Location"] == "/merchant/acme/"
    assert (await client.get("/merchant/globex/messages")).status == 200
    bad = await client.get("/merchant/go?merchant=../etc", allow_redirects=False)
    assert bad.status == 404
    # typed without a merchant (/merchant/go/ as well): the picker, not "no merchant"
    for typed in ("/merchant/go", "/merchant/go?merchant=%20"):
        resp = await client.get(typed, allow_redirects=False)
        assert (resp.status, resp.headers["Location"]) == (303, "/merchant"), typed


async def test_review_findings_hold(client: Client, settings: Settings) -> None:
    """What a review of the editor found broken, each checked through the pages."""
    csrf = await sign_in(client)
    # the draft's revision field is not a file anyone may discard
    resp = await client.post(f"{ACME}/publish", data={"csrf": csrf, "discard": "#rev"})
    assert resp.status == 422
    # signing in again (another tab) keeps the CSRF token of the forms already open
    assert await sign_in(client) == csrf
    # a rollback with no version number is refused, not read as version 0
    resp = await client.post(f"{ACME}/rollback", data={"csrf": csrf, "version": ""})
    assert resp.status == 422
    resp = await client.post(f"{ACME}/rollback", data={"csrf": csrf, "version": "0"})
    assert "nothing is published" in await resp.text()
    # the versions page rolls back only what it showed: a colleague's publish since is not
    # undone unseen
    for n in (1, 2):
        put = await client.put(
            "/v1/merchants/acme/brand",
            json={"name": f"Acme {n}", "support": {"url": "https://acme.example/help"}},
            headers=auth(ACME_KEY),
        )
        revision = (await put.json())["revision"]
        published = await client.post(
            "/v1/merchants/acme/overrides/publish",
            json={"revision": revision},
            headers=auth(ACME_KEY),
        )
        assert published.status == 200, await published.text()
        if n == 1:
            page = await (await client.get(f"{ACME}/versions")).text()
            assert '<input type="hidden" name="live" value="1">' in page
    stale = {"csrf": csrf, "version": "0", "live": "1"}  # as that page's form posts it
    resp = await client.post(f"{ACME}/rollback", data=stale)
    assert "version 2 is live now, not version 1 as when you looked" in await resp.text()
    live = await client.get("/v1/merchants/acme/overrides", headers=auth(ACME_KEY))
    assert (await live.json())["version"] == 2
    resp = await client.post(f"{ACME}/rollback", data={**stale, "live": "2"})
    assert "Version 3 is live" in await resp.text()
    # a default language without a catalog of its own stays what it was
    await client.put(
        "/v1/merchants/acme/brand", json={"default_locale": "de_AT"}, headers=auth(ACME_KEY)
    )
    page = await (await client.get(f"{ACME}/brand")).text()
    assert '<option value="de_AT" selected>' in page
    # the review shows a brand override as itself, not as the default file deleted
    review = await (await client.get(f"{ACME}/publish")).text()
    assert "+default_locale: de_AT" in review and "-name: Your shop" not in review
    # a draft whose brand does not validate still opens its messages, saying why
    await client.put("/v1/merchants/acme/brand", json={"accent": "#808080"}, headers=auth(ACME_KEY))
    resp = await client.get(f"{ACME}/messages/delivered")
    assert resp.status == 200
    assert "brand.yaml does not validate" in await resp.text()
    bad_json = await client.post(
        f"{ACME}/preview",
        data=b"{not json",
        headers={"X-CSRF-Token": csrf, "Content-Type": "application/json"},
    )
    assert bad_json.status == 400
    # sign-out without a session touches no cookie
    async with TestClient(TestServer(create_app(settings))) as other:
        resp = await other.post("/merchant/sign-out", allow_redirects=False)
        assert resp.status == 303 and "Set-Cookie" not in resp.headers


async def test_the_public_url_is_a_same_origin(settings: Settings) -> None:
    """Behind a proxy that rewrites Host, the browser's Origin is the public URL."""
    public = settings.model_copy(update={"public_url": "https://notify.example.com/"})
    async with TestClient(TestServer(create_app(public))) as client:
        csrf = await sign_in(client)
        base = base_of(await (await client.get(f"{ACME}/brand")).text())
        ok = await client.post(
            f"{ACME}/brand",
            data={"csrf": csrf, "name": "Acme", "accent": "#1d4ed8", "default_locale": "en"}
            | {"base": base},
            headers={"Origin": "https://notify.example.com"},
        )
        assert ok.status == 200
        refused = await client.post(
            f"{ACME}/brand", data={"csrf": csrf}, headers={"Origin": "https://other.example.com"}
        )
        assert refused.status == 403


async def test_a_merchant_id_with_a_dot_has_its_pages(client: Client) -> None:
    await sign_in(client, ADMIN_KEY)
    resp = await client.get("/merchant/go?merchant=acme.de", allow_redirects=False)
    assert resp.headers["Location"] == "/merchant/acme.de/"
    assert (await client.get("/merchant/acme.de/messages")).status == 200


def hidden(page: str, name: str) -> str:
    found = re.search(rf'name="{name}" value="([^"]*)"', page)
    assert found is not None, name
    return html.unescape(found.group(1))


async def test_a_test_send_sends_the_text_as_typed_without_saving_it(
    client: Client, settings: Settings
) -> None:
    """The message page's "Send a test": the template as typed (not saved), rendered in the
    preview's language, through the merchant's channel (the outbox here), marked as a test
    on the timeline; the page says what became of it, without the address in its URL."""
    csrf = await sign_in(client)
    page = await (await client.get(f"{ACME}/messages/delivered")).text()
    typed = with_macro(hidden(page, "text"), "subject", "Typed, not saved")
    assert "Typed, not saved" in typed
    form = {"csrf": csrf, "locale": "", "variant": "a", "preview_locale": "en", "text": typed}
    resp = await client.post(
        f"{ACME}/messages/delivered/test-send",
        data={**form, "channel": "email", "to": "ana.tester@example.com"},
        allow_redirects=False,
    )
    assert resp.status == 303, await resp.text()
    assert resp.headers["Location"] == f"{ACME}/messages/delivered"
    [eml] = outbox_files(settings, ".eml")
    assert eml.parent.name == "test-sends"
    sent = eml.read_text()
    assert "Subject: Typed, not saved" in sent and "To: ana.tester@example.com" in sent
    assert await draft(client) == {}  # nothing saved
    shown = await (await client.get(resp.headers["Location"])).text()
    assert "A test email in en went out" in shown
    # the address stays in its box for the next test (it was to be typed again each time;
    # a black-box run as a merchant), the channel too: never in the URL
    assert 'name="to" type="text"' in shown and 'value="ana.tester@example.com"' in shown
    assert "ana.tester" not in resp.headers["Location"]
    # the page comes back with the text as typed (unsaved), based on the saved text
    assert hidden(shown, "base") == hidden(page, "base")
    assert "Typed, not saved" in html.unescape(shown.split('id="text"')[1].split("</textarea>")[0])
    assert "not saved yet" in shown
    shown = await (await client.get(resp.headers["Location"])).text()
    assert "went out" not in shown and "Typed, not saved" not in shown  # said once
    # an SMS, in the language the preview was switched to
    # (written as people write a number: with spaces, as the brand form takes it too)
    resp = await client.post(
        f"{ACME}/messages/delivered/test-send",
        data={**form, "preview_locale": "fr", "channel": "sms", "to": "+33 (0)6 12-34.56 78"},
    )
    shown = await resp.text()
    assert resp.status == 200 and "A test SMS in fr went out" in shown
    assert '<option value="sms" selected>' in shown and 'value="+33612345678"' in shown
    [sms] = outbox_files(settings, ".sms.json")
    assert '"to": "+33612345678"' in sms.read_text() and "livré" in sms.read_text()
    timeline = await (await client.get(f"{ACME}/timeline?q=test-sends")).text()
    assert timeline.count("test send by") == 2


async def test_the_delivered_page_previews_and_tests_the_collected_form(
    client: Client, settings: Settings
) -> None:
    """A delivered message has two forms (door, collected from a pickup point): the page's
    preview and its test send show either, and its variables say which."""
    csrf = await sign_in(client)
    page = await (await client.get(f"{ACME}/messages/delivered")).text()
    assert 'id="preview-collected"' in page and 'name="collected"' in page
    other = await (await client.get(f"{ACME}/messages/in_transit")).text()
    assert 'id="preview-collected"' not in other  # only a delivered can be collected
    text = hidden(page, "text")
    ask = {"milestone": "delivered", "path": "messages/delivered.jinja", "text": text}
    headers = {"X-CSRF-Token": csrf}
    door = await (await client.post(f"{ACME}/preview", json=ask, headers=headers)).json()
    collected = await (
        await client.post(f"{ACME}/preview", json={**ask, "collected": True}, headers=headers)
    ).json()
    assert door["email"]["subject"] == "Your parcel was delivered"
    assert collected["email"]["subject"] == "Your parcel was collected"
    assert "your parcel was collected." in collected["sms"]["body"]
    assert (door["variables"]["event.collected"], collected["variables"]["event.collected"]) == (
        "False",
        "True",
    )
    form = {"csrf": csrf, "locale": "", "variant": "a", "preview_locale": "en", "text": text}
    resp = await client.post(
        f"{ACME}/messages/delivered/test-send",
        data={**form, "collected": "1", "channel": "email", "to": "ana.tester@example.com"},
        allow_redirects=False,
    )
    assert resp.status == 303
    [eml] = outbox_files(settings, ".eml")
    assert "Subject: Your parcel was collected" in eml.read_text()


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"channel": "email", "to": ""}, "give an email address or a phone number"),
        ({"channel": "fax", "to": "ana@example.com"}, "give an email address or a phone number"),
        ({"channel": "email", "to": "not an address"}, "cannot send a test to that address"),
        ({"channel": "sms", "to": "ana@example.com"}, "cannot send a test to that address"),
        ({"channel": "email", "to": "a@" + "b" * 300 + ".com"}, "cannot send a test"),
    ],
)
async def test_a_test_send_to_a_bad_address_says_so_and_sends_nothing(
    client: Client, settings: Settings, fields: dict[str, str], problem: str
) -> None:
    """The editor comes back with the text as typed and why no test went out (it was an
    error page, the text only in a box to copy: a black-box run as a merchant)."""
    csrf = await sign_in(client)
    page = await (await client.get(f"{ACME}/messages/delivered")).text()
    typed = hidden(page, "text") + "{# typed, not saved #}"
    resp = await client.post(
        f"{ACME}/messages/delivered/test-send",
        data={"csrf": csrf, "preview_locale": "en", "text": typed, **fields},
    )
    assert resp.status == 200 and resp.url.path == "/merchant/acme/messages/delivered"
    text = html.unescape(await resp.text())
    assert "could not be sent: " in text and problem in text, text
    assert "{# typed, not saved #}" in text and "as you typed it, not saved yet" in text
    assert f'value="{fields["to"]}"' in text or not fields["to"]  # kept to correct
    said = text.split("could not be sent: ")[1].split("</p>")[0]
    assert not re.search(r"(.{12,})\W+\(?\1", said), said  # said once, not twice
    assert not outbox_files(settings)


async def test_a_test_send_of_a_template_that_does_not_render_says_why(
    client: Client, settings: Settings
) -> None:
    csrf = await sign_in(client)
    resp = await client.post(
        f"{ACME}/messages/delivered/test-send",
        data={
            "csrf": csrf,
            "preview_locale": "en",
            "channel": "email",
            "to": "ana@example.com",
            "text": "{% endtrans",
        },
    )
    assert resp.status == 200 and resp.url.path == "/merchant/acme/messages/delivered"
    body = html.unescape(await resp.text())
    assert "could not be sent" in body and "{% endtrans" in body  # the text shown back
    assert not outbox_files(settings)


async def test_a_test_send_from_the_editor_counts_against_the_keys_rate_limit(
    settings: Settings,
) -> None:
    """Each test send is a real message, to any address: the editor's go through the key's
    rate limit (NOTIFIER_RATE_LIMIT_PER_S), as the API's do (a review found them unlimited)."""
    limited = settings.model_copy(update={"rate_limit_per_s": 0.001, "rate_limit_burst": 2})
    async with TestClient(TestServer(create_app(limited))) as client:
        csrf = await sign_in(client)
        page = await (await client.get(f"{ACME}/messages/delivered")).text()
        form = {
            "csrf": csrf,
            "preview_locale": "en",
            "channel": "email",
            "to": "a@example.com",
            "text": hidden(page, "text"),
        }
        statuses = [
            (await client.post(f"{ACME}/messages/delivered/test-send", data=form)).status
            for _ in range(3)
        ]
        refused = await client.post(f"{ACME}/messages/delivered/test-send", data=form)
        assert "over its limit" in await refused.text()
    assert statuses[:1] == [200] and 429 in statuses
    assert len(outbox_files(limited, ".eml")) == statuses.count(200)


async def test_the_variables_panel_shows_a_sample_decided_after_its_scan(client: Client) -> None:
    """The sample notification was decided at the instant of its scan, so the panel and the
    preview read "in 0 seconds" for event.ago (found by a black-box probe)."""
    await sign_in(client)
    page = await (await client.get(f"{ACME}/messages/delivered?locale=fr")).text()
    assert "event.ago" in page
    assert "il y a 20 minutes" in page and "dans 0 seconde" not in page


async def test_discard_on_the_review_page_never_throws_away_a_newer_save(client: Client) -> None:
    """Tab A shows the review page; tab B saves a newer text of the same message; tab A's
    "Discard this change" deleted B's text unseen (its form said nothing of what it saw)."""
    csrf = await sign_in(client)
    path = "messages/delivered.jinja"
    url = "/v1/merchants/acme/overrides/draft/" + path
    first = with_macro(DEFAULT_DELIVERED, "subject", "First words")
    await client.put(url, json={"text": first}, headers=auth(ACME_KEY))
    shown = await (await client.get(f"{ACME}/publish")).text()  # tab A
    base = base_of(shown)
    newer = with_macro(DEFAULT_DELIVERED, "subject", "Newer words")
    await client.put(url, json={"text": newer}, headers=auth(ACME_KEY))  # tab B
    resp = await client.post(f"{ACME}/publish", data={"csrf": csrf, "discard": path, "base": base})
    page = await resp.text()
    assert f"Not discarded: someone changed {path} since you opened this page" in page
    assert "Newer words" in page  # the change as it is now, to look at
    assert (await draft(client))[path] == newer
    # nor without saying what it saw (a form from before this version)
    await client.post(f"{ACME}/publish", data={"csrf": csrf, "discard": path})
    assert (await draft(client))[path] == newer
    # seen, it goes
    resp = await client.post(
        f"{ACME}/publish", data={"csrf": csrf, "discard": path, "base": base_of(page)}
    )
    assert resp.status == 200 and path not in await draft(client)


async def test_a_merchant_called_static_has_its_editor_pages(client: Client) -> None:
    """The editor's CSS and script were served under /merchant/static/, so a merchant with
    the id "static" (a valid one) got JSON 404s for its pages."""
    await sign_in(client, ADMIN_KEY)
    for page in ("brand", "messages", "cadence", "publish"):
        resp = await client.get(f"/merchant/static/{page}")
        assert resp.status == 200 and resp.content_type == "text/html", page
    css = await client.get("/merchant/-/static/editor.css")
    assert css.status == 200 and css.content_type == "text/css"


def test_merchants_read_form_and_file_problems_in_plain_words() -> None:
    """pydantic's own wording ("String should have at least 1 character", "Input should be
    greater than or equal to 1") no longer reaches a merchant's form or file problem."""
    from notifier.policy.rules import Policy
    from notifier.render.brand import Brand

    def problems(model: type[BaseModel], data: dict[str, Any]) -> dict[str, str]:
        with pytest.raises(ValidationError) as refused:
            model.model_validate(data)
        return field_errors(refused.value)

    assert problems(Brand, {"name": "", "accent": "#1d4ed8", "footer": "x" * 3}) == {
        "name": "must not be empty"
    }
    assert problems(
        Brand, {"name": "x" * 81, "colour": "red", "one_click_unsubscribe": "maybe"}
    ) == {
        "name": "must be at most 80 characters long",
        "one_click_unsubscribe": "must be true or false",
        "colour": "is not a setting here (a typo?)",
    }
    found = problems(
        Policy,
        {
            "dedupe_window_hours": "soon",
            "throttle": {"max_per_shipment_per_day": 0},
            "channels": "email",
        },
    )
    assert found["dedupe_window_hours"] == "must be a number"
    assert found["throttle.max_per_shipment_per_day"] == "must be 1 or more"
    assert not any("should" in message or "Input" in message for message in found.values())
    # a bound written as a whole number (it read "must be 3600.0 or less"), and a number
    # too big for a float (the cadence form's 1e400 came back as "inf"): not a number
    from notifier.web.forms import _number

    assert problems(Policy, {"coalesce_seconds": 5000}) == {
        "coalesce_seconds": "must be 3600 or less"
    }
    assert [_number(t) for t in ("1e400", "-inf", "nan", "2.5", " 7 ")] == [
        "1e400",
        "-inf",
        "nan",
        2.5,
        7,
    ]
    assert problems(Policy, {"coalesce_seconds": _number("1e400")}) == {
        "coalesce_seconds": "must be a finite number"
    }


async def test_a_brand_over_the_size_limit_comes_back_as_typed(client: Client) -> None:
    """A footer of 70 KB: the save was an error page naming a field `text` the form has
    not, and everything typed was gone (a black-box run as a merchant)."""
    csrf = await sign_in(client)
    html_page = await (await client.get(f"{ACME}/brand")).text()
    form = {
        "csrf": csrf,
        "base": base_of(html_page),
        "name": "Acme typed",
        "accent": "#1d4ed8",
        "default_locale": "en",
        "footer": "Acme " * 14_000,
    }
    resp = await client.post(f"{ACME}/brand", data=form)
    assert resp.status == 422
    text = await resp.text()
    assert "Not saved: brand.yaml: " in text and "larger than 64 KB" in text
    assert 'value="Acme typed"' in text and "Acme Acme Acme" in text
    assert "brand.yaml" not in await draft(client)


async def test_an_accent_that_is_no_colour_reports_no_contrast(client: Client) -> None:
    """ "1d4ed8" (no #) was refused as no colour, and the report under it said it passes
    WCAG AA (a black-box run as a merchant)."""
    csrf = await sign_in(client)
    html_page = await (await client.get(f"{ACME}/brand")).text()
    form = {"csrf": csrf, "base": base_of(html_page), "name": "Acme", "accent": "1d4ed8"}
    resp = await client.post(f"{ACME}/brand", data={**form, "default_locale": "en"})
    text = await resp.text()
    assert resp.status == 422 and "must be a colour like #1d4ed8" in text
    assert "Passes WCAG" not in text and "Enter a colour like #1d4ed8." in text


async def test_the_messages_list_says_a_draft_removes_a_file(client: Client) -> None:
    """A published message deleted in the draft was listed as if the draft edited it."""
    await sign_in(client)
    shipped = data_dir("templates", None) / "messages"
    for milestone in ("picked_up", "delivered"):
        text = (shipped / f"{milestone}.jinja").read_text() + "{# ours #}"
        await put_draft(client, f"messages/{milestone}.jinja", text)
    overview = await client.get("/v1/merchants/acme/overrides", headers=auth(ACME_KEY))
    revision = (await overview.json())["draft"]["revision"]
    resp = await client.post(
        "/v1/merchants/acme/overrides/publish", json={"revision": revision}, headers=auth(ACME_KEY)
    )
    assert resp.status == 200, await resp.text()
    gone = await client.put(
        "/v1/merchants/acme/overrides/draft/messages/picked_up.jinja",
        json={"text": None},
        headers=auth(ACME_KEY),
    )
    assert gone.status == 200
    assert (await draft(client))["messages/picked_up.jinja"] is None
    text = (shipped / "delivered.jinja").read_text() + "{# ours, again #}"
    await put_draft(client, "messages/delivered.jinja", text)
    listing = await (await client.get(f"{ACME}/messages")).text()
    rows = {
        m.group(1): m.group(0)
        for m in re.finditer(r"<tr>\s*<th[^>]*><a [^>]*messages/(\w+)\".*?</tr>", listing, re.S)
    }
    assert "<code>messages/picked_up.jinja</code> (removed)" in rows["picked_up"]
    assert "<code>messages/delivered.jinja</code> <" in rows["delivered"]  # an edit
    assert "(removed)" not in rows["delivered"]


async def test_a_settings_form_refused_for_its_session_shows_back_what_was_typed(
    client: Client,
) -> None:
    """A brand or cadence form sent after the session ended (or with a token out of date,
    or while Redis did not answer) came back as a page with none of what was typed (a
    black-box run as a merchant); only the message editor's text was shown back. Every
    form's typed fields now are, as ``name: value`` lines to copy."""
    csrf = await sign_in(client)
    typed = {
        "csrf": csrf,
        "base": "abc",
        "support.hours": "Mon–Fri 9–17 <CET>",
        "footer": "Acme SAS\r\n12 rue de la Paix",
        "accent_color": "#0055aa",
        "quiet_hours.email.enabled": "on",
    }
    for form, status, says in [
        ({**typed, "csrf": "stale"}, 403, "out of date"),
        (typed, 401, "Your session ended, so nothing was saved"),
    ]:
        if status == 401:
            assert (await client.post("/merchant/sign-out", data={"csrf": csrf})).status == 200
        for page in ("brand", "cadence"):
            resp = await client.post(f"{ACME}/{page}", data=form, allow_redirects=False)
            text = await resp.text()
            assert resp.status == status and says in text, (page, text)
            shown = re.search(r'<textarea id="unsaved"[^>]*>(.*?)</textarea>', text, re.S)
            assert shown is not None, text
            lines = html.unescape(shown.group(1)).splitlines()
            assert "support.hours: Mon–Fri 9–17 <CET>" in lines
            assert "accent_color: #0055aa" in lines and "quiet_hours.email.enabled: on" in lines
            assert "12 rue de la Paix" in lines
            assert not any(line.startswith(("csrf", "base")) for line in lines)
    # never a key: a refused sign-in (no sign-in cookie here) showed it back in clear (a
    # review), though its field hides what is typed
    refused = await client.post("/merchant/sign-in", data={"key": ACME_KEY, "csrf": "x"})
    text = await refused.text()
    assert refused.status >= 400 and ACME_KEY not in text and 'id="unsaved"' not in text


async def test_a_page_typed_with_a_slash_too_many_opens_and_an_unknown_one_is_a_page(
    client: Client,
) -> None:
    """``/merchant/acme/brand/`` (the overview has its slash, so people type one) and any
    path no page has answered the API's JSON in the browser (a black-box run as a
    merchant): the first goes to the page, the other is a 404 page for a browser."""
    await sign_in(client)
    browser = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
    for typed, target in [
        (f"{ACME}/brand/", f"{ACME}/brand"),
        (f"{ACME}/timeline/?q=shp_1", f"{ACME}/timeline?q=shp_1"),
        (f"{ACME}/messages/delivered//", f"{ACME}/messages/delivered"),
    ]:
        resp = await client.get(typed, headers=browser, allow_redirects=False)
        assert (resp.status, resp.headers["Location"]) == (308, target), typed
    for unknown in (f"{ACME}/nothing", f"{ACME}/nothing/", f"{ACME}/messages/Not-One"):
        page = await client.get(unknown, headers=browser, allow_redirects=False)
        assert page.status == 404 and page.content_type == "text/html", unknown
        assert "<h1>Not found</h1>" in await page.text()
        program = await client.get(unknown, allow_redirects=False)  # no Accept: JSON
        assert program.status == 404 and (await program.json())["error"]["code"] == "not_found"
    gone = await client.post(f"{ACME}/nothing", data={"csrf": "x"})
    assert gone.status == 404 and gone.content_type == "application/json"
    # a form posted to a page that has none is a 405, as before the catch-all (a review)
    for page in (f"{ACME}/analytics", f"{ACME}/", "/merchant/acme"):
        wrong = await client.post(page, data={"csrf": "x"}, allow_redirects=False)
        assert wrong.status == 405 and "GET" in wrong.headers["Allow"], page
    # HEAD as GET: a slash too many goes to the page, an unknown one is a page for a browser
    head = await client.head(f"{ACME}/brand/", allow_redirects=False)
    assert (head.status, head.headers["Location"]) == (308, f"{ACME}/brand")
    head = await client.head(f"{ACME}/nothing", headers=browser, allow_redirects=False)
    assert head.status == 404 and head.content_type == "text/html"


def test_the_timeline_shows_reasons_in_words() -> None:
    """Reasons read "superseded by out_for_delivery (2026-12-06T15:20:51.405091+00:00)" on
    the timeline (a black-box run as a merchant): its times and codes are now words; a
    setting's name stays as the cadence rules write it."""
    from notifier.web.base import readable

    assert readable(
        "superseded by out_for_delivery (2026-12-06T15:20:51.405091+00:00) in the same batch"
    ) == ("superseded by out for delivery (2026-12-06 15:20:51 UTC) in the same batch")
    assert readable("policy: exception:customs_hold is notified by sms") == (
        "policy: exception:customs hold is notified by sms"
    )
    kept = "stall check: no carrier scan for 72 h (stalled.no_scan_hours) in America/Los_Angeles"
    assert readable(kept) == kept
    assert readable("2026-11-22T16:00:00+01:00") == "2026-11-22 15:00:00 UTC"


async def test_the_cadence_form_shows_whole_numbers_whole(client: Client) -> None:
    """The cadence form's fields read "168.0", "0.0", "24.0" (a black-box run)."""
    await sign_in(client)
    page = await (await client.get(f"{ACME}/cadence")).text()
    assert 'name="dedupe_window_hours" value="168"' in page, page
    assert not re.search(r'name="[a-z_.]+" value="-?\d+\.0"', page)
