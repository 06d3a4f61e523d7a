"""The message set: brands, locales, right-to-left, SMS rules, preview — rendered for real."""

from __future__ import annotations

import email
import email.policy
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from babel import Locale
from babel.dates import format_timedelta

from notifier.channels.outbox import build_eml
from notifier.check import SMS_BUDGET
from notifier.check import samples as _samples
from notifier.cli import main
from notifier.errors import ConfigurationError, RenderError
from notifier.models import ChannelKind, Location, Notification, Recipient, Transition
from notifier.render import EmailMessageOut, Renderer, SmsMessageOut
from notifier.render.brand import contrast, load_brand
from notifier.render.environment import TemplateStore
from notifier.render.i18n import Catalogs
from notifier.render.renderer import carrier_name
from notifier.resources import data_dir
from tests.conftest import local_day_and_time


def renderer(templates: Path | None = None, *, strict: bool = True) -> Renderer:
    catalogs = Catalogs(data_dir("locales", None))
    return Renderer(
        TemplateStore(templates or data_dir("templates", None), catalogs),
        catalogs,
        email_from="notifications@example.com",
        strict=strict,
    )


def sample(milestone: str) -> Transition:
    return next(t for t in _samples() if t.milestone == milestone)


def notification(
    t: Transition,
    channel: ChannelKind = ChannelKind.EMAIL,
    locale: str = "en",
    phone: str = "+33612345678",
    merchant: str = "acme",
    **kw: Any,
) -> Notification:
    return Notification(
        notification_id="n_test",
        merchant_id=merchant,
        shipment_id="s1",
        channel=channel,
        to="ana@example.com" if channel is ChannelKind.EMAIL else phone,
        transition=t,
        recipient=Recipient(
            name="Ana",
            email="ana@example.com",
            phone=phone,
            locale=locale,
            timezone="Europe/Paris",
            **kw,
        ),
        created_at=datetime(2026, 11, 21, 12, 30, tzinfo=UTC),
    )


def render_email(n: Notification, r: Renderer | None = None) -> EmailMessageOut:
    message = (r or renderer()).render(n)
    assert isinstance(message, EmailMessageOut)
    return message


def test_every_milestone_has_its_own_words() -> None:
    subjects = {t.milestone: render_email(notification(t)).subject for t in _samples()}
    assert len(subjects) == 20
    # each exception explains itself; only the three trivial scans share their words
    shared = [m for m in subjects if list(subjects.values()).count(subjects[m]) > 1]
    assert sorted(shared) == ["arrived_at_facility", "departed_facility", "in_transit"]


def test_exception_carries_escalation_guidance() -> None:
    m = render_email(notification(sample("exception:customs_hold")))
    assert "What you can do" in m.text and "<h2" in m.html
    assert "What we are doing" not in m.text  # only what a merchant says it does
    assert "import duties" in m.text
    assert "Track your parcel\nhttps://www.ups.com/track" in m.text


def test_html_is_inlined_accessible_and_matches_the_text() -> None:
    m = render_email(notification(sample("out_for_delivery")))
    # css-inline moved the styles onto the elements; only the dark-mode query stays
    assert m.html.count("<style") == 1 and '<style data-css-inline="keep">' in m.html
    assert 'role="presentation"' in m.html and "<h1" in m.html
    assert '<html lang="en" dir="ltr">' in m.html
    assert "font-size: 16px" in m.html
    for phrase in ("Your parcel arrives today", "Out for delivery", "current step"):
        assert phrase in m.text and phrase in m.html


def test_brand_overrides_and_merchant_links(tmp_path: Path) -> None:
    templates = tmp_path / "templates"
    shutil.copytree(data_dir("templates", None), templates)
    (templates / "acme").mkdir()
    (templates / "acme" / "brand.yaml").write_text(
        "name: Acme Outdoor\nlogo_url: https://cdn.acme.example/logo.png\nlogo_alt: Acme logo\n"
        "accent: '#14532d'\nsupport: {email: help@acme.example, phone: '+33 1 23 45 67 89', "
        "hours: 'Mon-Fri 9:00-18:00'}\n"
        "links: {change_address: 'https://acme.example/address?t={tracking_number}'}\n"
    )
    m = render_email(notification(sample("exception:address_issue")), renderer(templates))
    assert 'alt="Acme logo"' in m.html and "#14532d" in m.html
    assert "help@acme.example" in m.text and "Mon-Fri 9:00-18:00" in m.text
    assert "https://acme.example/address?t=1Z999AA10123456784" in m.text
    assert m.from_addr == "Acme Outdoor <notifications@example.com>"


def test_a_light_accent_gets_dark_button_text_and_an_unreadable_one_is_refused(
    tmp_path: Path,
) -> None:
    templates = tmp_path / "templates"
    shutil.copytree(data_dir("templates", None), templates)
    (templates / "acme").mkdir()
    (templates / "acme" / "brand.yaml").write_text("accent: '#facc15'\n")  # yellow
    brand = load_brand(templates, "acme")
    assert brand.button_text == "#111827" and contrast("#facc15", "#111827") >= 4.5
    # links on white keep the hue, darkened just enough to read
    assert brand.link_colour != "#facc15" and contrast(brand.link_colour, "#ffffff") >= 4.5
    html = render_email(notification(sample("delivered")), renderer(templates)).html
    assert "background:#facc15;color:#111827" in html.replace(" ", "")
    assert load_brand(templates, "").button_text == "#ffffff"  # the default blue: white

    (templates / "acme" / "brand.yaml").write_text("accent: '#787878'\n")  # mid grey
    with pytest.raises(
        ConfigurationError,
        match=r"accent: #787878: neither white \(4\.\d+:1\) nor dark \(4\.\d+:1\) button text",
    ):
        load_brand(templates, "acme")
    assert round(contrast("#1d4ed8", "#ffffff"), 1) >= 4.5


@pytest.mark.parametrize(
    ("wanted", "resolved"),
    [
        ("fr_CA", "fr"),
        ("fr", "fr"),
        ("pt_PT", "pt_BR"),
        ("zh_CN", "zh_Hans"),
        ("de_AT", "de"),
        ("sw", "en"),
        (None, "en"),
    ],
)
def test_locale_fallback_chain(wanted: str | None, resolved: str) -> None:
    assert Catalogs(data_dir("locales", None)).resolve(wanted, "en") == resolved


def test_merchant_default_locale_comes_before_english() -> None:
    assert Catalogs(data_dir("locales", None)).resolve("sw", "de") == "de"


@pytest.mark.parametrize("locale", ["ar", "he"])
def test_arabic_and_hebrew_emails_are_right_to_left(locale: str) -> None:
    m = render_email(notification(sample("delivered"), locale=locale))
    assert f'<html lang="{locale}" dir="rtl">' in m.html


def test_sms_is_short_and_us_numbers_get_the_opt_out_line() -> None:
    r = renderer()
    fr = r.render(notification(sample("out_for_delivery"), ChannelKind.SMS))
    us = r.render(notification(sample("out_for_delivery"), ChannelKind.SMS, phone="+15551234567"))
    assert isinstance(fr, SmsMessageOut) and isinstance(us, SmsMessageOut)
    assert "STOP" not in fr.body and us.body.endswith("Reply STOP to opt out.")
    assert (fr.encoding.value, fr.segments, us.segments) == ("GSM-7", 1, 1)


def test_preview_writes_email_and_sms(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    html, eml, sms = tmp_path / "m.html", tmp_path / "m.eml", tmp_path / "m.sms.txt"
    assert (
        main(
            [
                "preview",
                "--status",
                "exception",
                "--exception-code",
                "lost",
                "--locale",
                "fr_CA",
                "-o",
                str(html),
            ]
        )
        == 0
    )
    assert 'lang="fr"' in html.read_text()
    assert main(["preview", "--status", "delivered", "-o", str(eml)]) == 0
    parsed = email.message_from_bytes(eml.read_bytes(), policy=email.policy.default)
    assert parsed["Subject"] == "Your parcel was delivered"
    assert main(["preview", "--status", "delivered", "--channel", "sms", "-o", str(sms)]) == 0
    assert "[GSM-7, 1 segment(s)]" in sms.read_text()
    assert main(["preview", "--status", "exception"]) == 2
    assert "needs --exception-code" in capsys.readouterr().err
    # a delivered as collected from a pickup point; only a delivered can be
    assert main(["preview", "--status", "delivered", "--collected", "-o", str(eml)]) == 0
    parsed = email.message_from_bytes(eml.read_bytes(), policy=email.policy.default)
    assert parsed["Subject"] == "Your parcel was collected"
    assert main(["preview", "--status", "in_transit", "--collected"]) == 2
    assert "--collected is for --status delivered only" in capsys.readouterr().err


def test_every_email_says_when_and_where_in_the_recipients_locale() -> None:
    # "Sa., 21. November, 10:30, Leipzig, Deutschland" with the locked Babel's CLDR
    day, time = local_day_and_time(_samples()[0].occurred_at, "Europe/Paris", "de")
    country = Locale.parse("de").territories["DE"]
    for t in _samples():
        m = render_email(notification(t, locale="de"))
        assert f"Letzte Aktualisierung: {day}, {time}, Leipzig, {country}" in m.text


def test_relative_time_is_in_the_context() -> None:
    r = renderer()
    n = notification(sample("delivered"), locale="fr")
    three_hours_ago = format_timedelta(timedelta(hours=-3), add_direction=True, locale="fr")
    assert three_hours_ago == "il y a 3 heures"  # (as the locked Babel writes it)
    assert str(r.context(n, "fr")["event"]["ago"]) == three_hours_ago  # 09:30 -> 12:30 UTC


def test_check_lists_an_sms_over_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    templates = tmp_path / "templates"
    shutil.copytree(data_dir("templates", None), templates)
    (templates / "acme" / "messages").mkdir(parents=True)
    (templates / "acme" / "messages" / "delivered.jinja").write_text(
        (templates / "messages" / "delivered.jinja")
        .read_text()
        .replace("your parcel was delivered.", "your parcel was delivered. " + "Thank you! " * 20)
    )
    monkeypatch.setenv("NOTIFIER_TEMPLATES_DIR", str(templates))
    assert main(["check"]) == 1
    err = capsys.readouterr().err
    assert "templates/acme/sms (delivered, en): 3 segments in GSM-7 (budget 1)" in err


# -- review findings ------------------------------------------------------------------------------


def brand_dir(tmp_path: Path, yaml_text: str) -> Path:
    templates = tmp_path / f"templates{len(list(tmp_path.iterdir()))}"
    shutil.copytree(data_dir("templates", None), templates)
    (templates / "acme").mkdir(exist_ok=True)
    (templates / "acme" / "brand.yaml").write_text(yaml_text)
    return templates


def test_a_brand_name_with_a_comma_keeps_the_from_address(tmp_path: Path) -> None:
    r = renderer(brand_dir(tmp_path, 'name: "Smith, Jones & Co"\n'))
    raw = build_eml(render_email(notification(sample("delivered")), r), datetime.now(UTC))
    sender = email.message_from_bytes(raw, policy=email.policy.default)["From"].addresses[0]
    assert (sender.display_name, sender.addr_spec) == (
        "Smith, Jones & Co",
        "notifications@example.com",
    )


@pytest.mark.parametrize(
    ("given", "shown"),
    [
        ("fedex", "FedEx"),
        ("ups", "UPS"),
        ("DHL Express", "DHL Express"),
        ("DPD (BE)", "DPD (BE)"),
        # codes a backend sends: the customs warning names the carrier customers know
        ("dhl_express", "DHL Express"),
        ("la_poste", "La Poste"),
    ],
)
def test_carrier_names_are_shown_as_customers_know_them(given: str, shown: str) -> None:
    assert carrier_name(given) == shown


@pytest.mark.parametrize(
    ("milestone", "current", "state", "keys"),
    [
        ("available_for_pickup", "collect", "current", ["ordered", "shipped", "moving", "collect"]),
        (
            # going back to the sender: no "Delivered (not yet)" after it
            "exception:refused",
            "out",
            "problem",
            ["ordered", "shipped", "moving", "out"],
        ),
        (
            "exception:customs_hold",
            "moving",
            "problem",
            ["ordered", "shipped", "moving", "out", "delivered"],
        ),
    ],
)
def test_step_indicator_stands_on_the_right_step(
    milestone: str, current: str, state: str, keys: list[str]
) -> None:
    steps = renderer().context(notification(sample(milestone)), "en")["progress"]
    assert [s["key"] for s in steps] == keys
    assert [s["key"] for s in steps if s["state"] == state] == [current]


def test_merchant_links_are_https_and_filled_safely(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"support\.url: must be an https:// URL"):
        load_brand(brand_dir(tmp_path, "support: {url: 'javascript:alert(1)'}\n"), "acme")
    r = renderer(
        brand_dir(
            tmp_path,
            "links: {change_address: "
            "'https://x.example/{tracking_number}/{tracking_number.__class__}'}\n",
        )
    )
    ctx = r.context(notification(sample("exception:address_issue")), "en")
    assert ctx["links"]["change_address"] == (
        "https://x.example/1Z999AA10123456784/{tracking_number.__class__}"
    )


def test_traditional_chinese_readers_never_get_simplified_chinese() -> None:
    catalogs = Catalogs(data_dir("locales", None))
    assert [catalogs.resolve(t, "en") for t in ("zh_TW", "zh_Hant_HK", "zh_CN")] == [
        "en",
        "en",
        "zh_Hans",
    ]


def test_dates_follow_the_readers_own_variant_of_the_language() -> None:
    gb = render_email(notification(sample("delivered"), locale="en_GB")).text
    us = render_email(notification(sample("delivered"), locale="en_US")).text
    at = sample("delivered").occurred_at
    gb_day, gb_time = local_day_and_time(at, "Europe/Paris", "en_GB")
    us_day, us_time = local_day_and_time(at, "Europe/Paris", "en_US")
    # "Saturday 21 November, 10:30" and "Sat, November 21, 10:30 AM" (Babel 2.19)
    assert f"{gb_day}, {gb_time}" in gb and f"{us_day}, {us_time}" in us
    # what tells the variants apart, whatever the CLDR release: day before month and a
    # 24-hour clock in Britain, month before day and AM/PM in the US
    assert gb_day.index("21") < gb_day.index("Nov") and gb_time == "10:30"
    assert us_day.index("Nov") < us_day.index("21") and us_time.endswith("AM")


def test_pickup_deadline_becomes_a_date_to_collect_by() -> None:
    t = sample("available_for_pickup").model_copy(
        update={"pickup_deadline": datetime(2026, 11, 26, 18, 0, tzinfo=UTC)}
    )
    m = render_email(notification(t))
    day, time = local_day_and_time(datetime(2026, 11, 26, 18, 0, tzinfo=UTC), "Europe/Paris", "en")
    assert f"Please collect it by {day}, {time}, or it goes back to the sender." in m.text
    fr = render_email(notification(t, locale="fr")).text
    assert (
        local_day_and_time(datetime(2026, 11, 26, 18, 0, tzinfo=UTC), "Europe/Paris", "fr")[0] in fr
    )


def test_the_sandbox_fast_paths_keep_jinja_semantics(tmp_path: Path) -> None:
    """Trans variables are escaped in HTML only; dict attributes stay attributes; the
    sandbox still refuses internals; ngettext/pgettext format like Jinja's own."""
    (tmp_path / "email").mkdir()
    (tmp_path / "email" / "t.html").write_text(
        "{% trans name=who %}Hello {{ name }},{% endtrans %}|{{ d.items is callable }}|"
        "{{ d.colour }}|{% trans count=n %}{{ count }} day{% pluralize %}{{ count }} days"
        "{% endtrans %}|{{ pgettext('ctx', 'Word %(context)s') }}"
    )
    (tmp_path / "email" / "t.txt").write_text("{% trans name=who %}Hello {{ name }},{% endtrans %}")
    (tmp_path / "email" / "bad.txt").write_text("{{ d.__class__.__mro__ }}")
    store = TemplateStore(tmp_path, Catalogs(data_dir("locales", None)))
    words = store.gettext_for(("fr", "en"))
    ctx = {"who": "<b>Ana</b>", "d": {"items": "key", "colour": "red"}, "n": 3, **words}
    html = store.select("", ("email/t.html",)).render(ctx)
    assert html == "Bonjour &lt;b&gt;Ana&lt;/b&gt;,|True|red|3 days|Word ctx"
    assert store.select("", ("email/t.txt",)).render(ctx) == "Bonjour <b>Ana</b>,"
    from jinja2.exceptions import SecurityError, UndefinedError

    with pytest.raises((SecurityError, UndefinedError)):
        store.select("", ("email/bad.txt",)).render(ctx)
    # Without a locale's functions in the context, the source (English) words.
    plain = {k: v for k, v in ctx.items() if k not in words}
    assert store.select("", ("email/t.txt",)).render(plain) == "Hello <b>Ana</b>,"


async def test_a_batch_renders_as_one_by_one_with_failures_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """render_many inlines the batch's CSS together; the messages are render()'s, and a
    failing one is a RenderError in its place, not the end of the batch."""
    templates = tmp_path / "templates"
    shutil.copytree(data_dir("templates", None), templates)
    (templates / "broken" / "email").mkdir(parents=True)
    (templates / "broken" / "email" / "layout.html").write_text("{{ 1 / 0 }}")
    r = renderer(templates)
    batch = [
        notification(t, channel, locale)
        for t in _samples()[:6]
        for channel in ChannelKind
        for locale in ("en", "ar")
    ]
    batch.insert(3, notification(sample("delivered"), merchant="broken"))
    out = await r.render_many(batch)
    assert len(out) == len(batch)
    assert isinstance(out[3], RenderError) and "ZeroDivisionError" in str(out[3])
    for n, got in zip(batch, out, strict=True):
        if n.merchant_id != "broken":
            assert got == r.render(n)
    assert any(isinstance(m, EmailMessageOut) and 'style="' in m.html for m in out)

    # should the batch inliner fail, each email is inlined alone and only the bad one fails
    class Picky:
        def inline_many(self, docs: list[str]) -> list[str]:
            raise ValueError("one of them is bad")

        def inline(self, doc: str) -> str:
            if 'lang="ar"' in doc:
                raise ValueError("this one")
            return doc

    monkeypatch.setattr("notifier.render.renderer._INLINER", Picky())
    out = await r.render_many(batch)
    failed = {i for i, m in enumerate(out) if isinstance(m, RenderError)}
    assert failed == {
        i
        for i, n in enumerate(batch)
        if n.merchant_id == "broken"
        or (n.channel is ChannelKind.EMAIL and n.recipient.locale == "ar")
    }
    assert "email CSS inlining raised ValueError: this one" in str(
        out[failed.difference({3}).pop()]
    )


def test_a_brand_name_is_one_line_and_an_empty_logo_text_still_loads(tmp_path: Path) -> None:
    """A brand's name is kept on one line, as emails write it; an empty text alternative is
    a choice (the logo says nothing), and a brand with one must keep loading (a first
    version of the one-line rule refused it, and the merchant's messages would have gone
    out under the default brand)."""
    brand = load_brand(brand_dir(tmp_path, "name: \"Acme\\r\\nShop\"\nlogo_alt: ''\n"), "acme")
    assert (brand.name, brand.logo_alt) == ("Acme Shop", "")
    with pytest.raises(ConfigurationError, match="name: must hold some text"):
        load_brand(brand_dir(tmp_path, 'name: "\\r\\n"\n'), "acme")


@pytest.mark.parametrize(
    ("location", "locale", "place"),
    [
        ({"country": "US", "region": "CA"}, "en", "the United States"),
        ({"country": "NL"}, "en", "the Netherlands"),
        ({"country": "DE"}, "en", "Germany"),
        ({"city": "Austin", "country": "US"}, "en", "Austin, United States"),  # an address
        ({"country": "US"}, "fr", "États-Unis"),
    ],
)
def test_a_country_alone_reads_as_a_place(
    location: dict[str, str], locale: str, place: str
) -> None:
    """ "Your parcel was delivered … in United States" (found by a black-box probe): in
    English a country named alone takes "the" where its name needs one."""
    t = sample("delivered").model_copy(update={"location": Location(**location)})  # type: ignore[arg-type]
    ctx = renderer().context(notification(t, locale=locale), locale)
    assert str(ctx["event"]["place"]) == place


@pytest.mark.parametrize(
    "locale", ["en", "ar", "de", "es", "fr", "he", "it", "ja", "nl", "pl", "pt_BR", "zh_Hans"]
)
def test_a_parcel_collected_from_a_pickup_point_reads_as_collected_in_every_language(
    locale: str,
) -> None:
    """Its own words in each language (not the door delivery's "ask next door or at
    your building's reception"), on both channels; the door delivery keeps its own."""
    r = renderer()
    t = sample("delivered")
    door = notification(t, locale=locale)
    collected = door.model_copy(update={"collected": True})
    door_email, collected_email = render_email(door, r), render_email(collected, r)
    assert collected_email.subject != door_email.subject
    door_next = door_email.text.split("\n\n")
    collected_next = collected_email.text.split("\n\n")
    # the guidance paragraph differs, and nothing of the door delivery's is left in it
    assert set(door_next) != set(collected_next)
    assert not set(collected_next) >= set(door_next)
    sms = {}
    for n in (door, collected):
        message = r.render(n.model_copy(update={"channel": ChannelKind.SMS, "to": "+33612345678"}))
        assert isinstance(message, SmsMessageOut)
        assert message.segments <= SMS_BUDGET[message.encoding]
        sms[n.collected] = message.body
    assert sms[None] != sms[True]
    if locale == "en":
        # its progress goes through the pickup point, not out for delivery
        assert "[✓] Ready to collect" in collected_email.text
        assert "Out for delivery" not in collected_email.text
        assert "[✓] Out for delivery" in door_email.text
        assert collected_email.subject == "Your parcel was collected"
        assert "If you did not collect it yourself, contact us." in collected_email.text
        assert "next door" not in collected_email.text and "next door" in door_email.text
        assert sms[True].startswith("Your shop: your parcel was collected. https://")


@pytest.mark.parametrize("locale", ["ja", "zh_Hans"])
def test_chinese_and_japanese_sentences_follow_each_other_without_a_space(locale: str) -> None:
    """A template joins two sentences with a space: none after "。" (it reads as a gap, and
    costs an SMS a character), but a link keeps its own."""
    r = renderer()
    for t in _samples():
        n = notification(t, locale=locale)
        texts = [render_email(n, r).text, render_email(n, r).subject]
        sms = r.render(n.model_copy(update={"channel": ChannelKind.SMS, "to": "+33612345678"}))
        texts.append(sms.body)
        for text in texts:
            assert "。 " not in text.replace("。 http", ""), (t.milestone, text)
    lost = r.render(
        notification(sample("exception:lost"), locale=locale).model_copy(
            update={"channel": ChannelKind.SMS, "to": "+33612345678"}
        )
    )
    assert "。 https://" in lost.body
