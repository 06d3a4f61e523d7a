"""One-click unsubscribe (RFC 8058): headers on the email, signed links, GET vs POST."""

from __future__ import annotations

import email
import email.policy
import json
import shutil
import signal
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import redis
from aiohttp.test_utils import TestClient, TestServer

from notifier.app import create_app
from notifier.resources import data_dir
from notifier.store.keys import optout_key
from notifier.unsubscribe import sign, verify
from tests.conftest import (
    API_KEYS,
    auth,
    free_port,
    healthy,
    history,
    make_settings,
    outbox_files,
    post,
    run_worker,
    spawn_notifier,
    start_redis,
    transition,
    wait_until,
)
from tests.test_messages_round2 import translated

SECRET = "s3cret-for-signing-links"


def one_click_templates(tmp_path: Path) -> Path:
    """The shipped templates, with a merchant acme whose emails carry one-click links."""
    templates = tmp_path / "templates"
    shutil.copytree(data_dir("templates", None), templates)
    (templates / "acme").mkdir()
    (templates / "acme" / "brand.yaml").write_text("name: Acme\none_click_unsubscribe: true\n")
    return templates


def test_tokens_are_signed() -> None:
    token = sign(SECRET, "acme", "ana@example.com")
    assert verify(SECRET, token) == ("acme", "ana@example.com")
    assert verify("another-secret-entirely", token) is None
    forged = sign(SECRET, "acme", "ana@example.com").split(".")[0] + "." + "A" * 43
    assert verify(SECRET, forged) is None
    assert verify(SECRET, "garbage") is None


async def test_one_click_unsubscribe_end_to_end(tmp_path: Path, redis_url: str) -> None:
    templates = one_click_templates(tmp_path)
    settings = make_settings(
        tmp_path,
        redis_url=redis_url,
        templates_dir=templates,
        signing_secret=SECRET,
        public_url="https://notify.example.com",
    )
    async with TestClient(TestServer(create_app(settings))) as client:
        await post(client, transition())
        await run_worker(settings)
        [eml] = outbox_files(settings, ".eml")
        msg = email.message_from_bytes(eml.read_bytes(), policy=email.policy.default)
        assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        url = msg["List-Unsubscribe"].strip("<>")
        assert url.startswith("https://notify.example.com/v1/unsubscribe/")
        # the email's language (the reader's is fr_FR), and where its unsubscribe counts
        assert url.endswith("?lang=fr&t=out_for_delivery~fr_FR")
        path = url.removeprefix("https://notify.example.com")

        page = await client.get(path)  # a link scanner: nothing happens
        html = await page.text()
        assert page.status == 200 and '<form method="post">' in html
        assert '<html lang="fr" dir="ltr">' in html
        button = translated("fr", "Unsubscribe")
        assert button and f'<button type="submit">{button}</button>' in html
        assert (await client.head(path)).status == 200  # nor with HEAD
        assert (await client.get(path)).status == 200
        opted = redis.Redis.from_url(redis_url)
        assert not opted.smembers(optout_key("acme"))  # (the set the opt-out goes to)
        done = await client.post(path, data={"List-Unsubscribe": "One-Click"})
        assert done.status == 200
        assert "ana@example.com" in await done.text()
        assert opted.smembers(optout_key("acme"))
        opted.close()
        token = path.removeprefix("/v1/unsubscribe/").split("?")[0]
        assert (await client.post(f"/v1/unsubscribe/{token[:-3]}abc")).status == 404

        await post(
            client,
            transition(event_id="b", status="delivered", occurred_at="2026-11-21T13:00:00+01:00"),
        )
        await run_worker(settings)
        latest = [d for d in await history(client) if d["channel"] == "email"][-1]
        assert latest["reason"] == "recipient opted out of email"


def test_links_work_across_processes_and_restarts_without_a_signing_secret(
    tmp_path: Path, redis_url: str
) -> None:
    """With Redis and no NOTIFIER_SIGNING_SECRET, the worker signed links with a secret of
    its own process, so the API refused every one (404) and a restart changed it again
    (found by a black-box probe). Every process now signs with a key derived from the
    deployment's key kept in Redis: a link from one worker works in the API, and so does a
    link from the next worker after a restart, and after the setting is set."""
    templates = one_click_templates(tmp_path)
    port = free_port()
    env = {
        "NOTIFIER_REDIS_URL": redis_url,
        "NOTIFIER_API_KEYS": json.dumps(API_KEYS),
        "NOTIFIER_TEMPLATES_DIR": str(templates),
        "NOTIFIER_OUTBOX_DIR": str(tmp_path / "outbox"),
        "NOTIFIER_PORT": str(port),
        "NOTIFIER_PUBLIC_URL": f"http://127.0.0.1:{port}",
    }
    serve = spawn_notifier(["serve"], tmp_path, **env)
    try:
        wait_until(lambda: healthy(port) or serve.poll() is not None, "notifier serve")
        for n, address in enumerate(["ana@example.com", "bo@example.com"]):
            worker = spawn_notifier(["worker"], tmp_path, **env)  # a new one each time
            try:
                now = datetime.now(UTC).isoformat()  # (the real clock: an email that goes)
                body = transition(event_id=f"e{n}", shipment_id=f"s{n}", occurred_at=now)
                body["recipient"] = {**body["recipient"], "email": address}
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/v1/transitions",
                    data=json.dumps(body).encode(),
                    headers={**auth(), "Content-Type": "application/json"},
                )
                with urllib.request.urlopen(request, timeout=10) as resp:
                    assert resp.status == 202
                folder = tmp_path / "outbox" / "acme" / f"s{n}"
                wait_until(lambda folder=folder: any(folder.glob("*.eml")), "the email")
            finally:
                worker.send_signal(signal.SIGTERM)
                worker.communicate(timeout=20)
            # (a stalled-shipment email may come too: the event is days old by the clock)
            for eml in sorted(folder.glob("*.eml")):
                msg = email.message_from_bytes(eml.read_bytes(), policy=email.policy.default)
                url = msg["List-Unsubscribe"].strip("<>")
                one_click = b"List-Unsubscribe=One-Click"
                done = urllib.request.Request(url, data=one_click, method="POST")
                with urllib.request.urlopen(done, timeout=10) as resp:
                    assert resp.status == 200
                    done_page = resp.read().decode()
                    assert address in done_page and "<button" not in done_page  # done
    finally:
        serve.send_signal(signal.SIGTERM)
        out, _ = serve.communicate(timeout=20)
    assert "left out" not in out
    # NOTIFIER_SIGNING_SECRET set later: the links sent before it still work
    serve = spawn_notifier(
        ["serve"], tmp_path, **env, NOTIFIER_SIGNING_SECRET="0123456789abcdef0123"
    )
    try:
        wait_until(lambda: healthy(port) or serve.poll() is not None, "notifier serve")
        done = urllib.request.Request(url, data=b"List-Unsubscribe=One-Click", method="POST")
        with urllib.request.urlopen(done, timeout=10) as resp:
            assert resp.status == 200
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.communicate(timeout=20)


def test_embedded_serve_on_another_port_signs_links_to_that_port(tmp_path: Path) -> None:
    """`serve --port 8096` without NOTIFIER_PUBLIC_URL signed its unsubscribe links to the
    default port, 8080: another server, or none."""
    templates = one_click_templates(tmp_path)
    port = free_port()
    env = {
        "NOTIFIER_TEMPLATES_DIR": str(templates),
        "NOTIFIER_OUTBOX_DIR": str(tmp_path / "outbox"),
    }
    serve = spawn_notifier(["serve", "--port", str(port)], tmp_path, **env)
    try:
        wait_until(lambda: healthy(port) or serve.poll() is not None, "notifier serve")
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/transitions",
            # (this process runs on the real clock: an event of now)
            data=json.dumps(transition(occurred_at=datetime.now(UTC).isoformat())).encode(),
            headers={"Authorization": "Bearer dev-key-not-for-production"},
        )
        request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=10) as resp:
            assert resp.status == 202
        folder = tmp_path / "outbox" / "acme" / "shp_123"
        wait_until(lambda: any(folder.glob("*.eml")), "the email")
        [eml] = sorted(folder.glob("*.eml"))[:1]
        msg = email.message_from_bytes(eml.read_bytes(), policy=email.policy.default)
        url = msg["List-Unsubscribe"].strip("<>")
        assert url.startswith(f"http://127.0.0.1:{port}/v1/unsubscribe/"), url
        with urllib.request.urlopen(url, timeout=10) as resp:  # the page, on this server
            assert resp.status == 200
    finally:
        serve.terminate()
        serve.communicate(timeout=20)


async def test_the_page_is_in_the_emails_language_else_the_browsers(
    tmp_path: Path, redis_url: str
) -> None:
    """The page was English whatever the email's language. It is now in the language the
    link names (the email's), else the first the browser accepts that has a catalog (a
    link sent before this version names none), else the merchant's default; escaped, and
    a link that is not valid is a 404 page in the browser's language, not JSON."""
    templates = one_click_templates(tmp_path)
    settings = make_settings(
        tmp_path, redis_url=redis_url, templates_dir=templates, signing_secret=SECRET
    )
    path = f"/v1/unsubscribe/{sign(SECRET, 'acme', 'ana@example.com')}"
    async with TestClient(TestServer(create_app(settings))) as client:

        async def page(
            query: str = "", accept: str | None = None, target: str = path
        ) -> tuple[int, str]:
            headers = {"Accept-Language": accept} if accept is not None else {}
            resp = await client.get(target + query, headers=headers)
            return resp.status, await resp.text()

        # the link's language first, though the browser asks for another
        status, html = await page("?lang=de", "fr-FR,fr;q=0.9")
        assert status == 200 and '<html lang="de" dir="ltr">' in html
        assert "ana@example.com" in html and "<title>Unsubscribe</title>" not in html
        status, html = await page("?lang=en", "fr")  # an English email: an English page
        assert "Stop shipping updates by email to ana@example.com?" in html
        assert '<html lang="en"' in html
        # a region or a script the catalogs name otherwise
        assert '<html lang="pt-BR"' in (await page("?lang=pt-PT"))[1]
        assert '<html lang="zh-Hans"' in (await page("?lang=zh_CN"))[1]
        # right to left, the address kept left to right
        html = (await page("?lang=ar"))[1]
        assert '<html lang="ar" dir="rtl">' in html
        assert '<bdi dir="ltr">ana@example.com</bdi>' in html
        # no lang (a link from before): the browser's, by its preference (q), skipping
        # languages with no catalog and what does not parse
        assert '<html lang="it"' in (await page("", "sv;q=1, fr;q=0.5, it;q=0.8, x;q=q"))[1]
        assert '<html lang="nl"' in (await page("?lang=xx", "nl-BE, en;q=0.1"))[1]
        assert '<html lang="en"' in (await page("?lang=<script>", "*"))[1]
        assert '<html lang="en"' in (await page(""))[1]  # acme's default language
        # Traditional Chinese readers: the plain "zh" a browser adds is no wish for
        # Simplified Chinese (a black-box run found zh-Hans for "zh-TW,zh;q=0.9")
        for accept in ("zh-TW,zh;q=0.9", "zh-HK, zh, en;q=0.5", "zh-Hant, zh-TW, zh"):
            assert '<html lang="en"' in (await page("", accept))[1], accept
        assert '<html lang="zh-Hans"' in (await page("", "zh-TW, zh-Hans;q=0.5"))[1]
        assert '<html lang="zh-Hans"' in (await page("", "zh-CN,zh;q=0.9"))[1]
        assert '<html lang="zh-Hans"' in (await page("", "zh"))[1]
        # a link that is not valid: a page in the browser's language, nothing recorded
        status, html = await page("", "es", target=path[:-4] + "abcd")
        assert status == 404 and '<html lang="es"' in html and "ana@" not in html
        resp = await client.post(path[:-4] + "abcd", headers={"Accept-Language": "pl"})
        assert resp.status == 404 and '<html lang="pl"' in await resp.text()
        # a program that asks for JSON gets the API's error, as before
        resp = await client.get(path[:-4] + "abcd", headers={"Accept": "application/json"})
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "not_found"
        opted = redis.Redis.from_url(redis_url)
        assert not opted.smembers(optout_key("acme"))
        # an address that HTML would read is shown as text
        odd = f"/v1/unsubscribe/{sign(SECRET, 'acme', 'a<b>&@example.com')}"
        html = (await page("?lang=fr", target=odd))[1]
        assert "a&lt;b&gt;&amp;@example.com" in html and "a<b>" not in html
        resp = await client.post(path + "?lang=ja", data={"List-Unsubscribe": "One-Click"})
        html = await resp.text()
        assert resp.status == 200 and '<html lang="ja"' in html and "ana@example.com" in html
        assert resp.headers["Cache-Control"] == "no-store"
        assert len(opted.smembers(optout_key("acme"))) == 1
        opted.close()


async def test_while_redis_does_not_answer_the_page_says_so_in_the_emails_language(
    tmp_path: Path,
) -> None:
    """A customer pressing the button while Redis did not answer got the API's English
    JSON (a black-box run as a customer). It is now a 503 page in the email's language with
    the button again; a second visit to a link already used says it is done, not asks."""
    port = free_port()
    settings = make_settings(
        tmp_path,
        redis_url=f"redis://127.0.0.1:{port}/0",
        redis_timeout_s=0.5,
        templates_dir=one_click_templates(tmp_path),
        signing_secret=SECRET,
    )
    path = f"/v1/unsubscribe/{sign(SECRET, 'acme', 'ana@example.com')}?lang=fr"
    one_click = {"List-Unsubscribe": "One-Click"}
    async with TestClient(TestServer(create_app(settings))) as client:
        refused = await client.post(path, data=one_click)
        html = await refused.text()
        assert (refused.status, refused.headers["Retry-After"]) == (503, "5")
        assert '<html lang="fr" dir="ltr">' in html and '<form method="post">' in html
        words = translated("fr", "Your unsubscribe request could not be recorded just now.")
        assert words and words in html and "ana@" not in html
        # the question still shows (nothing to tell yet), and a program gets JSON
        assert (await client.get(path)).status == 200
        program = await client.post(path, data=one_click, headers={"Accept": "application/json"})
        assert program.status == 503
        assert (await program.json())["error"]["code"] == "unavailable"
        server = start_redis(port, tmp_path)
        try:
            done = await client.post(path, data=one_click)
            assert done.status == 200 and "<button" not in await done.text()
            again = await (await client.get(path)).text()  # the link opened again
            assert "ana@example.com" in again and "<button" not in again
            other = f"/v1/unsubscribe/{sign(SECRET, 'acme', 'bo@example.com')}"
            assert "<button" in await (await client.get(other)).text()
        finally:
            server.terminate()
            server.wait(timeout=10)


async def test_the_page_shows_the_brand_the_merchant_published(
    tmp_path: Path, redis_url: str
) -> None:
    """The API process never loaded the brand published in the editor: the page showed
    the files' name (or the default brand's "Your shop") in their default language (a
    review). It now loads what is published, as a worker does before a batch."""
    settings = make_settings(
        tmp_path,
        redis_url=redis_url,
        templates_dir=one_click_templates(tmp_path),
        signing_secret=SECRET,
    )
    path = f"/v1/unsubscribe/{sign(SECRET, 'acme', 'ana@example.com')}"
    base = "/v1/merchants/acme/overrides"
    async with TestClient(TestServer(create_app(settings))) as client:
        before = await (await client.get(path)).text()
        assert "<p>Acme</p>" in before and '<html lang="en"' in before
        brand = "name: Published Shop\ndefault_locale: de\nsupport: {email: h@acme.example}\n"
        put = await client.put(f"{base}/draft/brand.yaml", json={"text": brand}, headers=auth())
        assert put.status == 200, await put.text()
        revision = (await put.json())["revision"]
        published = await client.post(
            f"{base}/publish", json={"revision": revision}, headers=auth()
        )
        assert published.status == 200, await published.text()
        after = await (await client.get(path)).text()
        assert "<p>Published Shop</p>" in after and '<html lang="de"' in after


def test_the_languages_a_request_names_are_not_remembered() -> None:
    """Each tag a request named became a key of a cache that never shrank: 200 requests of
    8 made-up tags each left 1,601 (a review)."""
    from tests.test_accessibility import shipped_renderer

    renderer = shipped_renderer()
    before = len(renderer.catalogs._resolved)
    for n in range(50):
        tags = [f"sv-SE-v{n:05d}x", f"de-AT-x{n:04d}y", "zh-TW", "fr"]
        assert 'lang="de"' in renderer.unsubscribe_page(None, tags, "invalid")
    assert len(renderer.catalogs._resolved) - before <= 2  # the page's own default chain


def test_a_links_count_row_must_name_a_milestone() -> None:
    """``t=`` is outside the signature: an invented milestone would add a row to the
    merchant's counts (a review); it counts as unknown instead."""
    from notifier.admin_views import milestones
    from notifier.unsubscribe import _MILESTONES, _known_tag

    assert set(milestones()) == _MILESTONES
    assert (
        _known_tag("exception:customs_hold~de~shorter~b") == "exception:customs_hold~de~shorter~b"
    )
    for bad in ("invented~fr", "exception:nope~fr", "delivered", "", None):
        assert _known_tag(bad) is None, bad
