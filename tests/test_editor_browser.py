"""The merchant editor in a real headless Chromium (Debian's, driven by Playwright) against a
real `notifier serve` and `notifier worker` on a real redis-server: a merchant signs in,
edits the delivered email with the preview following, publishes, sees the edited message
in the outbox and on the shipment timeline, rolls back; another merchant's key gets 403;
every page passes axe-core with zero violations.
"""

from __future__ import annotations

import email
import email.policy
import json
import shutil
import signal
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis

from notifier.resources import data_dir
from notifier.store.keys import optout_key
from notifier.unsubscribe import PATH as UNSUBSCRIBE
from notifier.unsubscribe import sign
from tests.conftest import (
    ACME_KEY,
    ADMIN_KEY,
    API_KEYS,
    free_port,
    healthy,
    spawn_notifier,
    start_redis,
    transition,
    wait_until,
)
from tests.test_accessibility import AXE, launch_chromium
from tests.test_messages_round2 import translated

GLOBEX_KEY = "k_globex_0123456789"
#: the service's NOTIFIER_SIGNING_SECRET: the unsubscribe test signs a link with it
LINK_SECRET = "browser-test-link-secret-0123"
KEYS = {**API_KEYS, GLOBEX_KEY: ["globex"]}
EDITED = "Acme: your order has arrived"


@dataclass
class Service:
    base: str
    outbox: Path
    redis_url: str


@pytest.fixture(scope="module")
def service() -> Iterator[Service]:
    """`notifier serve` and `notifier worker` on their own redis-server (the editor's
    sessions and overrides live there too)."""
    work = Path(tempfile.mkdtemp(prefix="notifier-editor-"))
    redis_port, port = free_port(), free_port()
    redis = start_redis(redis_port, work)
    # an A/B test (paused at 0 %: it needs no variant b) for the analytics page to show
    policies = work / "policies"
    shutil.copytree(data_dir("policies", None), policies)
    (policies / "acme.yaml").write_text(
        "experiments: [{name: shorter-words, message: picked_up, b_percent: 0}]\n"
    )
    env = {
        "NOTIFIER_POLICIES_DIR": str(policies),
        "NOTIFIER_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "NOTIFIER_API_KEYS": json.dumps(KEYS),
        "NOTIFIER_OUTBOX_DIR": str(work / "outbox"),
        "NOTIFIER_PORT": str(port),
        "NOTIFIER_HOST": "127.0.0.1",
        "NOTIFIER_SIGNING_SECRET": LINK_SECRET,
    }
    procs = [spawn_notifier(["serve"], work, **env), spawn_notifier(["worker"], work, **env)]
    try:
        wait_until(lambda: healthy(port) or procs[0].poll() is not None, "notifier serve")
        assert procs[0].poll() is None, procs[0].communicate()[0]
        yield Service(
            f"http://127.0.0.1:{port}", work / "outbox", f"redis://127.0.0.1:{redis_port}/0"
        )
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.communicate(timeout=20)
        redis.terminate()
        redis.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = launch_chromium(pw)
        yield browser
        browser.close()


def new_page(browser: Any, service: Service) -> Any:
    """A fresh browser context (no cookies) that may reach only the service. CSP is bypassed
    only so that axe-core can be injected; the pages themselves never need it."""
    context = browser.new_context(bypass_csp=True, viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.route(
        "**/*",
        lambda route: (
            route.continue_()
            if route.request.url.startswith(service.base) or route.request.url.startswith("about:")
            else route.abort()
        ),
    )
    return page


def sign_in(page: Any, service: Service, key: str) -> None:
    page.goto(f"{service.base}/merchant")
    assert page.url.endswith("/merchant/sign-in")
    # keyboard only: the key field is reachable by Tab and Enter submits
    page.keyboard.press("Tab")  # the skip link comes first
    assert page.evaluate("document.activeElement.className") == "skip"
    page.locator("#key").focus()
    page.keyboard.type(key)
    with page.expect_navigation():
        page.keyboard.press("Enter")


def axe(page: Any) -> list[str]:
    """axe-core's violations on the page as it is now (every rule enabled)."""
    page.add_script_tag(content=AXE.read_text(encoding="utf-8"))
    result: dict[str, Any] = page.evaluate("async () => await axe.run(document)")
    assert result["passes"], "axe ran no checks"
    out = []
    for v in result["violations"]:
        nodes = "; ".join(n["target"][0] for n in v["nodes"][:3])
        out.append(f"{v['id']} ({v['impact']}): {v['help']} [{nodes}]")
    return out


def post_transition(service: Service, **fields: Any) -> None:
    body = json.dumps({"transitions": [transition(**fields)]}).encode()
    request = urllib.request.Request(
        f"{service.base}/v1/transitions",
        data=body,
        headers={"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        assert resp.status == 202


def delivered_subject(service: Service, shipment: str) -> str:
    """The subject of the delivered email the worker wrote for ``shipment``."""
    folder = service.outbox / "acme" / shipment
    wait_until(lambda: any(folder.glob("*.eml")), f"the email of {shipment}")
    [eml] = folder.glob("*.eml")
    return str(email.message_from_bytes(eml.read_bytes(), policy=email.policy.default)["Subject"])


def deliver(service: Service, shipment: str) -> str:
    """Post a delivered event (email only, English) and return its email's subject."""
    post_transition(
        service,
        event_id=f"evt_{shipment}",
        shipment_id=shipment,
        tracking_number=f"TRK{shipment.upper()}",
        status="delivered",
        occurred_at=(datetime.now(UTC) - timedelta(minutes=1)).isoformat(),
        recipient={"name": "Ana", "email": "ana@example.com", "locale": "en"},
    )
    return delivered_subject(service, shipment)


def edited(text: str) -> str:
    """The delivered template with its subject replaced."""
    start = text.index("{%- macro subject() -%}") + len("{%- macro subject() -%}")
    end = text.index("{%- endmacro -%}", start)
    return text[:start] + EDITED + text[end:]


def test_a_merchant_edits_publishes_sees_the_message_sent_and_rolls_back(
    browser: Any, service: Service
) -> None:
    page = new_page(browser, service)
    sign_in(page, service, ACME_KEY)
    assert page.url.endswith("/merchant/acme/")
    assert deliver(service, "before") == "Your parcel was delivered"

    page.get_by_role("link", name="Messages", exact=True).click()
    page.get_by_role("link", name="Delivered", exact=True).click()
    subject = page.locator("#p-subject")
    subject.filter(has_text="Your parcel was delivered").wait_for()
    assert page.locator("#p-sms-segments").inner_text() in {"1", "2"}
    assert "GSM-7" in page.locator("#p-sms-encoding").inner_text().upper().replace("GSM7", "GSM-7")

    # type the new subject: the preview follows, on both widths and in the SMS' language
    page.locator("#text").fill(edited(page.locator("#text").input_value()))
    subject.filter(has_text=EDITED).wait_for()
    for frame in ("#p-desktop", "#p-mobile"):
        assert EDITED in page.locator(frame).get_attribute("srcdoc")
    assert page.locator("#p-mobile").evaluate("f => f.getBoundingClientRect().width") == 375
    page.select_option("#preview-locale", "de")
    page.locator("#preview-status").filter(has_text="(de)").wait_for()
    assert "zugestellt" in page.locator("#p-sms").inner_text()
    # the form for a parcel collected from a pickup point, and back
    page.get_by_label("collected from a pickup point").check()
    page.locator("#p-sms").filter(has_text="abgeholt").wait_for()
    assert axe(page) == []
    page.get_by_label("collected from a pickup point").uncheck()
    page.locator("#p-sms").filter(has_text="zugestellt").wait_for()

    page.get_by_role("button", name="Save draft").click()
    assert "Saved to your draft" in page.locator("#saved").inner_text()
    assert not page.locator("ul.problems").count()

    page.get_by_role("link", name="Review & publish").click()
    assert EDITED in page.locator("pre.diff").inner_text()
    assert axe(page) == []
    page.get_by_role("button", name="Publish revision").click()
    assert page.url.endswith("/merchant/acme/versions")
    assert "Version 1 is live" in page.get_by_role("status").inner_text()

    # the next delivered email carries the edit (the worker picks the publish up)
    assert deliver(service, "after") == EDITED

    page.get_by_role("link", name="Shipment timeline").click()
    page.locator("#q").fill("TRKAFTER")
    with page.expect_navigation():
        page.keyboard.press("Enter")
    assert "Shipment after" in page.locator("h2").inner_text()
    row = page.locator("table.timeline tbody tr").filter(has_text="email")
    wait_until(lambda: "sent" in _reload_row(page), "the delivery status on the timeline")
    assert "Delivered" in row.inner_text()
    assert EDITED in row.inner_text()  # what the customer got, on the timeline
    assert axe(page) == []

    page.get_by_role("link", name="Versions").click()
    page.get_by_role("button", name="Roll back to version 0").click()
    assert "Version 2 is live" in page.get_by_role("status").inner_text()
    assert deliver(service, "rolled") == "Your parcel was delivered"
    page.goto(f"{service.base}/merchant/acme/messages/delivered")
    assert EDITED not in page.locator("#text").input_value()
    subject.filter(has_text="Your parcel was delivered").wait_for()


def test_a_merchant_sends_a_test_of_the_text_as_typed(browser: Any, service: Service) -> None:
    """ "Send a test" on a message page: the template as typed (not saved), in the language
    the preview shows, through the merchant's channel; the page says it went out, and
    passes axe-core with the test form and its status on it."""
    page = new_page(browser, service)
    sign_in(page, service, ACME_KEY)
    page.goto(f"{service.base}/merchant/acme/messages/delivered")
    page.locator("#p-subject").filter(has_text="Your parcel was delivered").wait_for()
    page.locator("#text").fill(edited(page.locator("#text").input_value()))
    page.select_option("#preview-locale", "de")
    page.locator("#preview-status").filter(has_text="(de)").wait_for()
    page.get_by_label("By").select_option("email")
    page.get_by_label("to", exact=True).fill("tester@example.com")
    with page.expect_navigation():
        page.get_by_role("button", name="Send a test").click()
    assert "A test email in de went out" in page.locator("#tested").inner_text()
    assert page.evaluate("document.activeElement.id") == "tested"  # read out, in view
    folder = service.outbox / "acme" / "test-sends"
    wait_until(lambda: any(folder.glob("*.eml")), "the test email")
    [eml] = folder.glob("*.eml")
    sent = email.message_from_bytes(eml.read_bytes(), policy=email.policy.default)
    assert sent["Subject"] == EDITED and sent["To"] == "tester@example.com"
    # back as typed, in the language it was sent in, and still not saved
    assert EDITED in page.locator("#text").input_value()
    assert page.locator("#preview-locale").input_value() == "de"
    assert "not saved yet" in page.locator("#tested").inner_text()
    assert axe(page) == []
    page.reload()
    assert EDITED not in page.locator("#text").input_value()


def _reload_row(page: Any) -> str:
    page.reload()
    return str(page.locator("table.timeline tbody").inner_text())


def test_another_merchants_key_gets_403_on_pages_and_api(browser: Any, service: Service) -> None:
    page = new_page(browser, service)
    sign_in(page, service, GLOBEX_KEY)
    assert page.url.endswith("/merchant/globex/")
    for path in ("/", "/messages/delivered", "/brand", "/cadence", "/versions", "/timeline"):
        response = page.goto(f"{service.base}/merchant/acme{path}")
        assert response.status == 403, path
        assert "may not act for that merchant" in page.locator("main").inner_text()
    assert axe(page) == []
    # the editor's own script endpoint and a form post, with this session's token
    status = page.evaluate(
        """async () => (await fetch('/merchant/acme/preview', {method: 'POST',
             headers: {'Content-Type': 'application/json'}, body: '{}'})).status"""
    )
    assert status == 403
    request = urllib.request.Request(
        f"{service.base}/v1/merchants/acme/overrides",
        headers={"Authorization": f"Bearer {GLOBEX_KEY}"},
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 403
    refused.value.close()


def test_every_editor_page_passes_axe(browser: Any, service: Service) -> None:
    page = new_page(browser, service)
    page.goto(f"{service.base}/merchant/sign-in")
    failures = {"sign-in": axe(page)}
    page.locator("#key").fill("not a key")
    with page.expect_navigation():
        page.locator("#key").press("Enter")
    failures["sign-in refused"] = axe(page)
    admin = new_page(browser, service)
    sign_in(admin, service, ADMIN_KEY)  # a key for every merchant: which one?
    failures["merchant picker"] = axe(admin)
    admin.goto(f"{service.base}/merchant/sign-out")  # typed: a button, not a merchant
    failures["sign-out"] = axe(admin)
    admin.goto(f"{service.base}/merchant")
    admin.locator("#merchant").fill("acme")
    with admin.expect_navigation():
        admin.locator("#merchant").press("Enter")
    assert admin.url.endswith("/merchant/acme/")
    sign_in(page, service, ACME_KEY)
    deliver(service, "for-analytics")  # the analytics page then has bars and rows to check
    for path in (
        "/",
        "/messages",
        "/brand",
        "/cadence",
        "/publish",
        "/versions",
        "/timeline",
        "/analytics",
    ):
        page.goto(f"{service.base}/merchant/acme{path}")
        failures[path] = axe(page)
    page.goto(f"{service.base}/merchant/acme/analytics")
    assert "shorter-words" in page.get_by_role("heading", level=3).first.inner_text()
    page.goto(f"{service.base}/merchant/acme/messages/picked_up?variant=b")
    page.locator("#preview-status").filter(has_text="up to date").wait_for()
    failures["variant b of a message"] = axe(page)
    page.goto(f"{service.base}/merchant/acme/messages/exception:customs_hold?locale=ar")
    page.locator("#preview-status").filter(has_text="(ar)").wait_for()
    failures["editor, ar"] = axe(page)
    # the preview's words in the reader's language and direction, as a phone shows an SMS
    # (they were left to right under an English page: "…:Your shop." for "Your shop: …")
    for part in ("#p-subject", "#p-text", "#p-sms"):
        assert page.locator(part).evaluate("e => [e.lang, e.dir]") == ["ar", "rtl"], part
    # a draft that does not render: the preview stays empty, and the page accessible
    page.goto(f"{service.base}/merchant/acme/messages/returned_to_sender")
    page.locator("#text").fill("{% endtrans")
    with page.expect_navigation():
        page.get_by_role("button", name="Save draft").click()
    page.locator("#preview-error").filter(has_text="").wait_for()
    failures["a message whose draft does not render"] = axe(page)
    # a brand form with an error shows it next to the field, still accessible
    page.goto(f"{service.base}/merchant/acme/brand")
    page.locator("#f-accent").fill("#fde047")
    page.locator("#contrast-report").filter(has_text="dark text").wait_for()
    page.locator("#f-accent").fill("#808080")
    page.get_by_role("button", name="Save draft").click()
    assert "Not saved" in page.get_by_role("alert").inner_text()
    # the summary is focused (read out first), and names the field by its label
    page.wait_for_function("document.activeElement.id === 'errors'")
    assert "Accent colour" in page.locator("#errors").inner_text()
    failures["brand with an error"] = axe(page)
    # the cadence form the same: quiet hours that start when they end
    page.goto(f"{service.base}/merchant/acme/cadence")
    page.locator("#q-sms-start").fill("08:00")
    page.locator("#q-sms-end").fill("08:00")
    page.get_by_role("button", name="Save draft").click()
    page.wait_for_function("document.activeElement.id === 'errors'")
    assert "Quiet hours for SMS: start and end are equal" in page.locator("#errors").inner_text()
    for part in ("#q-sms-start", "#q-sms-end"):
        assert page.locator(part).get_attribute("aria-invalid") == "true"
    failures["cadence with an error"] = axe(page)
    assert {k: v for k, v in failures.items() if v} == {}


def test_a_customer_unsubscribes_in_the_emails_language_by_keyboard(
    browser: Any, service: Service
) -> None:
    """The page of an email's unsubscribe link, in a real browser: in the email's language
    (the link's ``lang``) though the browser asks for another, right to left in Arabic, a
    button reached and pressed by keyboard, the opt-out recorded, every state passing axe
    (every rule, landmarks included: it is a web page, not an email)."""
    failures = {}
    store = redis.Redis.from_url(service.redis_url)
    opted = len(store.smembers(optout_key("acme")))
    for lang, address, words in [
        ("fr", "lea@example.com", translated("fr", "Unsubscribe")),
        ("ar", "omar@example.com", translated("ar", "Unsubscribe")),
    ]:
        page = new_page(browser, service)
        page.set_extra_http_headers({"Accept-Language": "de-DE,de;q=0.9"})
        path = UNSUBSCRIBE.format(token=sign(LINK_SECRET, "acme", address))
        page.goto(f"{service.base}{path}?lang={lang}")
        assert page.locator("html").get_attribute("lang") == lang
        assert page.locator("html").get_attribute("dir") == ("rtl" if lang == "ar" else "ltr")
        assert address in page.locator("h1").inner_text()
        assert words and page.locator("button").inner_text() == words
        failures[f"{lang} ask"] = axe(page)
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.tagName") == "BUTTON"
        with page.expect_navigation():
            page.keyboard.press("Enter")
        assert address in page.locator("h1").inner_text()
        assert page.locator("button").count() == 0
        failures[f"{lang} done"] = axe(page)
        page.context.close()
        opted += 1
        assert len(store.smembers(optout_key("acme"))) == opted  # recorded, once
    page = new_page(browser, service)
    page.set_extra_http_headers({"Accept-Language": "ja,en;q=0.5"})
    response = page.goto(f"{service.base}{UNSUBSCRIBE.format(token='cut.short')}")
    assert response.status == 404
    assert page.locator("html").get_attribute("lang") == "ja"
    failures["invalid"] = axe(page)
    page.context.close()
    assert len(store.smembers(optout_key("acme"))) == opted
    store.close()
    assert not any(failures.values()), failures
