"""axe-core in a real headless Chromium over every email: each message in each locale.

Chromium is Debian's (/usr/bin/chromium), driven by Playwright; axe-core comes from npm
(tests/a11y, installed by scripts/test). Both missing is a failure, not a skip.

Rules turned off, because they judge web pages, not emails: ``region`` (content outside
landmarks) and ``landmark-one-main`` (a <main> landmark): mail clients wrap the message in
their own page and strip landmark roles. Everything else runs, contrast included.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from notifier.check import samples as _samples
from notifier.models import ChannelKind, Notification, Recipient, Transition
from notifier.render import EmailMessageOut, Renderer
from notifier.render.brand import contrast
from notifier.render.environment import TemplateStore
from notifier.render.i18n import Catalogs
from notifier.resources import data_dir

AXE = Path(__file__).parent / "a11y" / "node_modules" / "axe-core" / "axe.min.js"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DISABLED = ["region", "landmark-one-main"]
LOCALES = ["en", *Catalogs(data_dir("locales", None)).available()]


def launch_chromium(pw: Any) -> Any:
    """Debian's chromium driven by Playwright; it or axe-core missing is a failure."""
    if not AXE.is_file():
        pytest.fail(f"axe-core is not installed ({AXE}): run scripts/test", pytrace=False)
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed: run scripts/test", pytrace=False)
    return pw.chromium.launch(
        executable_path=CHROMIUM,
        args=[
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
        ],
    )


@pytest.fixture(scope="module")
def page() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = launch_chromium(pw)
        page = browser.new_page()
        # emails must not fetch anything: block every request the page makes
        page.route("**/*", lambda route: route.abort())
        yield page
        browser.close()


def acme_renderer(tmp_path: Path, brand_yaml: str) -> Renderer:
    """A strict renderer over the shipped templates, with merchant acme's ``brand_yaml``."""
    templates = tmp_path / "templates"
    shutil.copytree(data_dir("templates", None), templates)
    (templates / "acme").mkdir()
    (templates / "acme" / "brand.yaml").write_text(brand_yaml)
    catalogs = Catalogs(data_dir("locales", None))
    return Renderer(
        TemplateStore(templates, catalogs), catalogs, email_from="n@example.com", strict=True
    )


def shipped_renderer() -> Renderer:
    catalogs = Catalogs(data_dir("locales", None))
    return Renderer(
        TemplateStore(data_dir("templates", None), catalogs),
        catalogs,
        email_from="notifications@example.com",
    )


def email_for(t: Transition, locale: str, renderer: Renderer | None = None) -> EmailMessageOut:
    """``t``'s email for a reader of ``locale`` (the shipped templates unless ``renderer``)."""
    n = Notification(
        notification_id="n_a11y",
        merchant_id="acme",
        shipment_id="s",
        to="a@example.com",
        channel=ChannelKind.EMAIL,
        transition=t,
        created_at=t.occurred_at,
        recipient=Recipient(
            name="Ana", email="a@example.com", locale=locale, timezone="Europe/Paris"
        ),
    )
    message = (renderer or shipped_renderer()).render(n)
    assert isinstance(message, EmailMessageOut)
    return message


def emails(locale: str, renderer: Renderer | None = None) -> Iterator[tuple[str, EmailMessageOut]]:
    """Every milestone's email for ``locale`` (the shipped templates unless ``renderer``)."""
    renderer = renderer or shipped_renderer()
    for t in _samples():
        yield t.milestone, email_for(t, locale, renderer)


def axe_run(page: Any, html: str, disabled: list[str] = DISABLED) -> dict[str, Any]:
    """axe-core's result for ``html`` in the browser page (an email's rules unless
    ``disabled`` says otherwise)."""
    page.set_content(html, wait_until="domcontentloaded")
    page.add_script_tag(content=AXE.read_text(encoding="utf-8"))
    result: dict[str, Any] = page.evaluate(
        "async (disabled) => await axe.run(document, {rules: Object.fromEntries("
        "disabled.map((id) => [id, {enabled: false}]))})",
        disabled,
    )
    return result


@pytest.mark.parametrize("locale", LOCALES)
def test_every_email_has_no_axe_violations(page: Any, locale: str) -> None:
    failures = []
    for milestone, message in emails(locale):
        result = axe_run(page, message.html)
        for v in result["violations"]:
            nodes = "; ".join(n["target"][0] for n in v["nodes"][:3])
            failures.append(f"{milestone}: {v['id']} ({v['impact']}): {v['help']} [{nodes}]")
        assert result["passes"], "axe ran no checks"
    assert not failures, "\n".join(failures)


def test_rtl_emails_lay_out_right_to_left(page: Any) -> None:
    for locale in ("ar", "he"):
        if locale not in LOCALES:
            pytest.fail(f"no {locale} catalog")
        _, message = next(emails(locale))
        page.set_content(message.html)
        assert page.evaluate("getComputedStyle(document.querySelector('h1')).direction") == "rtl"


@pytest.mark.parametrize("locale", ["ar", "he"])
def test_a_latin_city_comes_first_in_a_right_to_left_place(page: Any, locale: str) -> None:
    """ "Last update: …, Louisville, <the United States in the reader's script>": read right
    to left, the city comes first, at the right. The place's isolate took the direction of
    its first letter, the city's, and showed the country first to the reader."""
    from notifier.models import Location

    t = next(t for t in _samples() if t.status == "in_transit")
    t = t.model_copy(update={"location": Location(city="Louisville", country="US")})
    message = email_for(t, locale)
    page.set_content(message.html)
    # the x of the city's text and of the country's, wherever the place is named (the
    # sentence of what happened, and "Last update")
    found = page.evaluate(
        """() => {
          const out = [];
          const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
          for (let node = walker.nextNode(); node; node = walker.nextNode()) {
            const at = node.data.indexOf("Louisville");
            if (at < 0) continue;
            const rect = (from, to) => {
              const range = document.createRange();
              range.setStart(node, from);
              range.setEnd(node, to);
              return range.getBoundingClientRect();
            };
            let close = node.data.indexOf("\u2069", at);  // where the place's isolate ends
            if (close < 0) close = node.data.length;
            // the city's left edge, the country's right edge ("Louisville, " is 12 long)
            out.push({
              city: rect(at, at + 10).left, country: rect(at + 12, close).right, text: node.data
            });
          }
          return out;
        }"""
    )
    assert len(found) == 2, found
    for one in found:  # the city wholly right of the country: read first
        assert one["city"] >= one["country"], one
    assert "Louisville" in message.text


def test_a_light_brand_colour_passes_axe_with_dark_button_text(page: Any, tmp_path: Path) -> None:
    """A light accent is allowed because its button text turns dark: axe checks the contrast
    of the real page (links on white use the accent darkened)."""
    renderer = acme_renderer(tmp_path, "name: Acme\naccent: '#fde68a'\n")
    for milestone, message in emails("en", renderer):
        result = axe_run(page, message.html)
        assert [v["id"] for v in result["violations"]] == [], milestone
        assert result["passes"]


@pytest.mark.parametrize("accent", ["#ffffff", "#ffff00", "#fde68a"])
def test_a_button_on_a_pale_accent_shows_its_shape(page: Any, tmp_path: Path, accent: str) -> None:
    """A white or pale accent (under 3:1 against the white card, WCAG 1.4.11) gets a border
    in the accent darkened until it reads, measured in the page; a dark accent none."""
    renderer = acme_renderer(tmp_path, f"name: Acme\naccent: '{accent}'\n")
    _, message = next(emails("en", renderer))
    result = axe_run(page, message.html)
    assert [v["id"] for v in result["violations"]] == []
    style = page.evaluate(
        "(() => { const s = getComputedStyle(document.querySelector('.button'));"
        " return [s.borderTopWidth, s.borderTopStyle, s.borderTopColor]; })()"
    )
    width, line, colour = style
    assert (width, line) == ("2px", "solid"), style
    r, g, b = (int(x) for x in colour.removeprefix("rgb(").removesuffix(")").split(","))
    assert contrast(f"#{r:02x}{g:02x}{b:02x}", "#ffffff") >= 3.0, colour
    dark = acme_renderer(tmp_path / "dark", "name: Acme\naccent: '#1d4ed8'\n")
    _, message = next(emails("en", dark))
    page.set_content(message.html)
    assert (
        page.evaluate("getComputedStyle(document.querySelector('.button')).borderTopStyle")
        == "none"
    )


@pytest.mark.parametrize("locale", ["en", "ar", "ja"])
def test_every_email_passes_axe_in_dark_mode(page: Any, locale: str, tmp_path: Path) -> None:
    """Mail clients that darken: the dark-mode styles keep AA contrast (links included)."""
    renderer = acme_renderer(
        tmp_path,
        "name: Acme\nsupport: {url: 'https://help.acme.example', email: help@acme.example}\n"
        "links: {change_address: 'https://acme.example/a'}\n",
    )
    page.emulate_media(color_scheme="dark")
    try:
        failures = []
        for milestone, message in emails(locale, renderer):
            assert "prefers-color-scheme: dark" in message.html
            result = axe_run(page, message.html)
            failures += [f"{milestone}: {v['id']}: {v['help']}" for v in result["violations"]]
            background = page.evaluate("getComputedStyle(document.body).backgroundColor")
            assert background == "rgb(17, 24, 39)", milestone  # the dark styles applied
        assert not failures, "\n".join(failures)
    finally:
        page.emulate_media(color_scheme="light")


def test_the_action_is_above_the_progress_on_a_phone(page: Any, tmp_path: Path) -> None:
    """At 375 px the primary action is reached before the progress list."""
    renderer = acme_renderer(
        tmp_path,
        "name: Acme\nsupport: {email: help@acme.example}\n"
        "links: {change_address: 'https://acme.example/a'}\n",
    )
    page.set_viewport_size({"width": 375, "height": 667})
    try:
        [message] = [m for k, m in emails("de", renderer) if k == "exception:address_issue"]
        page.set_content(message.html)
        button = page.locator('a[href="https://acme.example/a"]').bounding_box()
        steps = page.locator("ol").bounding_box()
        assert button is not None and steps is not None
        assert button["y"] + button["height"] <= steps["y"]
        assert button["y"] + button["height"] <= 667 * 1.5  # within a thumb's scroll
    finally:
        page.set_viewport_size({"width": 1280, "height": 720})


def test_scripts_get_their_own_fonts() -> None:
    for locale, font in (("ja", "Hiragino Sans"), ("zh_Hans", "PingFang SC"), ("ar", "Tahoma")):
        _, message = next(emails(locale))
        assert font in message.html, locale
    _, message = next(emails("de"))
    assert "font-family: Arial, Helvetica, sans-serif" in message.html


def test_the_weekly_digest_passes_axe(page: Any) -> None:
    from datetime import date

    from notifier.insights import digest

    found = {
        "2026-11-20": {
            "delivered|email|fr_FR|accepted": 3,
            "delivered|email|fr_FR|decided": 3,
            "in_transit|email|fr_FR|suppressed:throttled": 2,
        }
    }
    carriers = {
        "2026-11-20": {
            "ups|DE|FR|delivered": 4,
            "ups|DE|FR|first_attempt": 3,
            "ups|DE|FR|transit_h:30": 4,
            "ups|hub:DE:Köln|-|dwell_h:6": 2,
        }
    }
    ctx = digest.content(
        "acme", "Acme & Co", date(2026, 11, 16), date(2026, 11, 22), found, carriers
    )
    _, text, html = digest.render(ctx)
    assert "Acme &amp; Co" in html and "throttled 2" in html and "DE:Köln" in html
    assert "ups, DE -> FR: 4 delivered" in text
    result = axe_run(page, html)
    assert result["passes"] and result["violations"] == [], result["violations"]


@pytest.mark.parametrize("locale", LOCALES)
def test_the_unsubscribe_page_passes_axe_in_every_language(page: Any, locale: str) -> None:
    """The page of an email's unsubscribe link, each of its states, with every rule on
    (landmarks too: a web page, not an email)."""
    renderer = shipped_renderer()
    for state in ("ask", "done", "invalid", "unavailable"):
        html = renderer.unsubscribe_page("acme", [locale], state, "a@example.com")
        assert f'lang="{locale.replace("_", "-")}"' in html
        result = axe_run(page, html, disabled=[])
        assert result["passes"], "axe ran no checks"
        assert result["violations"] == [], (state, result["violations"])
