"""Skeletons (notifier/render/skeleton.py): a message filled into its shape's skeleton is
byte for byte the message a full render makes, or the shape is rendered in full."""

from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path

import pytest

from notifier.check import samples
from notifier.errors import RenderError
from notifier.models import ChannelKind, Notification, Recipient, Transition
from notifier.render import EmailMessageOut, Renderer
from notifier.render.environment import TemplateStore
from notifier.render.i18n import Catalogs
from notifier.render.limits import Limits
from notifier.render.renderer import Message
from notifier.render.skeleton import UNCACHEABLE, Skeleton, Skeletons
from notifier.resources import data_dir

LOCALES = ["en", "en_GB", "fr", "de_DE", "ja", "ar", "he", "zh_Hans", "pt_BR"]
NAMES = ["Ana", "Zoë O'Brien & <Co>", "نور", "健太", 'Jean "JJ" Dupont']
SAMPLES = samples()


def tree(tmp_path: Path) -> Path:
    templates = tmp_path / "templates"
    shutil.copytree(data_dir("templates", None), templates)
    return templates


def renderer(
    templates: Path | None = None,
    *,
    cached: bool = True,
    published: dict[str, dict[str, str]] | None = None,
    limits: Limits | None = None,
) -> Renderer:
    catalogs = Catalogs(data_dir("locales", None))
    files = (lambda m: published.get(m, {})) if published is not None else None
    store = TemplateStore(templates or data_dir("templates", None), catalogs, files)
    if limits is not None:
        store.limits = limits
    return Renderer(
        store,
        catalogs,
        email_from="notifications@example.com",
        published=files,
        skeletons=1024 if cached else 0,
        unsubscribe=lambda merchant, to, locale, tag: {
            "List-Unsubscribe": f"<https://u.example/{merchant}?lang={locale}&t={tag}>"
        },
    )


def notification(
    t: Transition,
    channel: ChannelKind,
    *,
    locale: str = "en",
    name: str | None = "Ana",
    merchant: str = "acme",
    phone: str = "+33612345678",
    n: int = 0,
) -> Notification:
    return Notification(
        notification_id=f"n_{n}",
        merchant_id=merchant,
        shipment_id=f"s{n}",
        channel=channel,
        to=f"c{n}@example.com" if channel is ChannelKind.EMAIL else phone,
        transition=t.model_copy(
            update={
                "tracking_number": f"1Z{n:08d}",
                "occurred_at": t.occurred_at + timedelta(minutes=37 * n),
            }
        ),
        recipient=Recipient(
            name=name, email=f"c{n}@example.com", phone=phone, locale=locale, timezone="Asia/Tokyo"
        ),
        created_at=t.occurred_at + timedelta(hours=n),
    )


def outcome(r: Renderer, n: Notification) -> Message | str:
    try:
        return r.render(n)
    except RenderError as exc:
        return f"RenderError: {exc}"


def same(plain: Renderer, cached: Renderer, items: list[Notification]) -> None:
    for n in items:
        expected = outcome(plain, n)
        assert outcome(cached, n) == expected, (n.transition.milestone, n.recipient)


def test_every_message_is_the_full_render_across_locales_names_and_channels() -> None:
    plain, cached = renderer(cached=False), renderer()
    items = [
        notification(t, channel, locale=locale, name=name, n=i, phone=phone)
        for i, (t, locale, name) in enumerate(
            (t, locale, name) for t in SAMPLES for locale in LOCALES for name in NAMES[:2]
        )
        for channel, phone in (
            (ChannelKind.EMAIL, "+33612345678"),
            (ChannelKind.SMS, "+33612345678"),
            (ChannelKind.SMS, "+14155550123"),  # the US opt-out line
        )
    ]
    same(plain, cached, items)
    # and filled again, from the skeletons the first round built, with other values
    again = [
        notification(t, c, locale=locale, name=name, n=1000 + i)
        for i, (t, locale, name, c) in enumerate(
            (t, locale, name, c)
            for t in SAMPLES
            for locale in LOCALES[:5]
            for name in NAMES
            for c in ChannelKind
        )
    ]
    same(plain, cached, again)
    assert cached.skeletons is not None
    assert cached.skeletons.hits > len(again) // 2
    assert all(isinstance(s, Skeleton) for s in cached.skeletons._items.values())


def test_a_missing_name_is_another_shape() -> None:
    plain, cached = renderer(cached=False), renderer()
    t = next(t for t in SAMPLES if t.milestone == "delivered")
    items = [notification(t, ChannelKind.EMAIL, name=name, n=i) for i, name in enumerate(NAMES)]
    items.insert(2, notification(t, ChannelKind.EMAIL, name=None, n=99))
    same(plain, cached, items)
    message = cached.render(items[1])
    assert "Hello Zoë O'Brien &amp; &lt;Co&gt;," in message.html  # type: ignore[union-attr]


def brand_yaml(name: str, **more: str) -> str:
    lines = [f"name: {name}", "logo_url: https://cdn.example.com/logo.png"]
    lines += ["support:", "  email: help@example.com", "  phone: +33 1 23 45 67 89"]
    lines += ["links:", "  reschedule: https://x.example/r/{tracking_number}"]
    return "\n".join(lines + [f"{k}: {v}" for k, v in more.items()]) + "\n"


def test_brands_own_templates_and_published_files_each_get_their_own_skeletons(
    tmp_path: Path,
) -> None:
    templates = tree(tmp_path)
    for merchant, name in (("acme", "Acme & Sons"), ("globex", "Globex")):
        (templates / merchant).mkdir()
        (templates / merchant / "brand.yaml").write_text(brand_yaml(name))
    (templates / "acme" / "messages").mkdir()
    (templates / "acme" / "messages" / "delivered.jinja").write_text(
        "{%- macro subject() -%}Delivered, {{ recipient.name }}!{%- endmacro -%}\n"
        "{%- macro sms() -%}Acme: {{ shipment.tracking_number }} is here{%- endmacro -%}\n"
    )
    own = "{%- macro subject() -%}Ini{{ shipment.tracking_number }}{%- endmacro -%}"
    own += "{%- macro sms() -%}Ini SMS{%- endmacro -%}"
    published = {"initech": {"messages/delivered.jinja": own}}
    plain = renderer(templates, cached=False, published=published)
    cached = renderer(templates, published=published)
    items = [
        notification(t, c, merchant=m, locale=locale, name=name, n=i)
        for i, (t, c, m, locale, name) in enumerate(
            (t, c, m, locale, name)
            for t in SAMPLES
            for c in ChannelKind
            for m in ("acme", "globex", "initech", "umbrella")
            for locale in ("en", "ar")
            for name in NAMES[:2]
        )
    ]
    same(plain, cached, items)
    delivered = [n for n in items if n.transition.milestone == "delivered"]
    subjects = {cached.render(n).subject for n in delivered if n.channel is ChannelKind.EMAIL}  # type: ignore[union-attr]
    assert "Delivered, Ana!" in subjects and any(s.startswith("Ini1Z") for s in subjects)


def test_a_new_publish_drops_the_merchants_skeletons() -> None:
    subject = "{%- macro subject() -%}{word} {{ recipient.name }}{%- endmacro -%}"
    published = {"acme": {"messages/delivered.jinja": subject.replace("{word}", "Old")}}
    cached = renderer(published=published)
    t = next(t for t in SAMPLES if t.milestone == "delivered")
    first = cached.render(notification(t, ChannelKind.EMAIL, n=1))
    assert first.subject == "Old Ana"  # type: ignore[union-attr]
    published["acme"] = {"messages/delivered.jinja": subject.replace("{word}", "New")}
    cached.forget("acme")  # what sync_published does when the published version moved
    assert cached.render(notification(t, ChannelKind.EMAIL, n=2)).subject == "New Ana"  # type: ignore[union-attr]
    # another merchant on the default templates is not affected
    assert cached.render(notification(t, ChannelKind.EMAIL, merchant="globex")).subject == (  # type: ignore[union-attr]
        "Your parcel was delivered"
    )


def test_an_edit_on_disk_drops_every_skeleton(tmp_path: Path) -> None:
    from notifier.render.watch import TreeWatch

    templates = tree(tmp_path)
    catalogs = Catalogs(data_dir("locales", None))
    cached = Renderer(
        TemplateStore(templates, catalogs),
        catalogs,
        email_from="n@example.com",
        watch=TreeWatch([templates], interval_s=0),
    )
    t = next(t for t in SAMPLES if t.milestone == "delivered")
    first = cached.render(notification(t, ChannelKind.SMS, n=1))
    assert first.body.startswith("Your shop: ")  # type: ignore[union-attr]
    layout = templates / "sms" / "layout.txt"
    layout.write_text("Edited {{ recipient.name }} " + layout.read_text())
    assert cached.render(notification(t, ChannelKind.SMS, n=2)).body.startswith("Edited Ana")  # type: ignore[union-attr]


#: Templates that look at a value: each shape must be rendered in full (and so stay right).
LOOKING = [
    "{{ recipient.name|upper }}",
    "{{ recipient.name|length }}",
    "{% if recipient.name == 'Ana' %}hi Ana{% endif %}",
    "{% if recipient.name in 'Ana Bob' %}one of ours{% endif %}",
    "{% if 'Ana' in recipient.name %}ours{% endif %}",
    "{% if (recipient.name ~ '') == 'Ana' %}joined Ana{% endif %}",
    "{% for c in recipient.name %}[{{ c }}]{% endfor %}",
    "{% for c in recipient.name %}{% if loop.length > 3 %}x{% endif %}{% endfor %}",
    "{{ [recipient.name] }}",
    "{{ recipient.name[:2] }}",
    "{{ recipient.name.lower() }}",
    "{% if recipient.name is lower %}low{% endif %}",
    "{{ recipient.name|forceescape|forceescape }}",
    "{{ {'Ana': 'dict hit'}[recipient.name]|default('none') }}",
    "{{ '%-12s|' % recipient.name }}",
    "{{ '{:>10}'.format(recipient.name) }}",
    "{{ recipient.name|replace('a', 'A') }}",
    "{{ _(recipient.name) }}",
    "{{ [recipient.name] ~ '' }}",
    "{% set x %}{{ recipient.name }}{% endset %}{{ x|trim|center(20) }}",
]


@pytest.mark.parametrize("subject", LOOKING)
def test_a_template_that_looks_at_a_value_is_rendered_in_full(tmp_path: Path, subject: str) -> None:
    templates = tree(tmp_path)
    (templates / "acme" / "messages").mkdir(parents=True)
    (templates / "acme" / "messages" / "delivered.jinja").write_text(
        "{%- macro subject() -%}S " + subject + "{%- endmacro -%}\n"
        "{%- macro sms() -%}T " + subject + "{%- endmacro -%}\n"
    )
    plain, cached = renderer(templates, cached=False), renderer(templates)
    t = next(t for t in SAMPLES if t.milestone == "delivered")
    items = [
        notification(t, c, name=name, n=i)
        for i, name in enumerate(["Ana", "bob", "Zoë", "Ana", "ana"])
        for c in ChannelKind
    ]
    same(plain, cached, items)
    assert cached.skeletons is not None
    kept = [v for k, v in cached.skeletons._items.items() if "acme" in k[0][0]]
    assert kept and all(v is UNCACHEABLE for v in kept)


def test_a_loop_over_values_that_only_prints_them_is_cached(tmp_path: Path) -> None:
    templates = tree(tmp_path)
    (templates / "acme").mkdir()
    (templates / "acme" / "brand.yaml").write_text(brand_yaml("Acme"))
    (templates / "acme" / "messages").mkdir()
    loop = "{% for a in actions %}<{{ a.key }}: {{ a.url }}>{% endfor %}"
    (templates / "acme" / "messages" / "delivery_attempt_failed.jinja").write_text(
        "{%- macro subject() -%}S " + loop + "{%- endmacro -%}"
        "{%- macro sms() -%}T " + loop + "{%- endmacro -%}"
    )
    plain, cached = renderer(templates, cached=False), renderer(templates)
    t = next(t for t in SAMPLES if t.milestone == "delivery_attempt_failed")
    items = [notification(t, c, n=i) for i in range(3) for c in ChannelKind]
    same(plain, cached, items)
    assert "<reschedule: https://x.example/r/1Z00000002>" in cached.render(items[4]).subject  # type: ignore[union-attr]
    assert cached.skeletons is not None
    kept = [v for k, v in cached.skeletons._items.items() if "acme" in k[0][0]]
    assert len(kept) == 2 and all(isinstance(v, Skeleton) for v in kept)


def test_the_limits_hold_for_long_values(tmp_path: Path) -> None:
    """A value printed many times: a skeleton is never built on short values and then
    filled with long ones past the output limit."""
    templates = tree(tmp_path)
    (templates / "acme" / "messages").mkdir(parents=True)
    (templates / "acme" / "messages" / "delivered.jinja").write_text(
        "{%- macro subject() -%}{% for i in range(150) %}{{ recipient.name }}{% endfor %}"
        "{%- endmacro -%}{%- macro sms() -%}x{%- endmacro -%}"
    )
    limits = Limits(max_bytes=20_000)
    plain = renderer(templates, cached=False, limits=limits)
    cached = renderer(templates, limits=limits)
    t = next(t for t in SAMPLES if t.milestone == "delivered")
    items = [
        notification(t, ChannelKind.EMAIL, name=name, n=i)
        for i, name in enumerate(["Ana", "A" * 190, "Ana", "B" * 150])
    ]
    same(plain, cached, items)
    # over the limit: the default templates' subject
    assert outcome(cached, items[1]).subject == "Your parcel was delivered"  # type: ignore[union-attr]


def test_the_cache_is_bounded() -> None:
    cache = Skeletons(size=3)
    for i in range(10):
        cache.put((("path",), i), UNCACHEABLE)
    assert len(cache) == 3
    cache.forget(("path",))
    assert len(cache) == 0


def test_checks_and_previews_never_use_skeletons() -> None:
    catalogs = Catalogs(data_dir("locales", None))
    strict = Renderer(
        TemplateStore(data_dir("templates", None), catalogs),
        catalogs,
        email_from="n@example.com",
        strict=True,
    )
    assert strict.skeletons is None


def test_an_events_email_and_sms_share_a_context_and_a_new_brand_is_seen() -> None:
    """A batch renders an event's channels one after the other: the second reuses the first's
    context (all but the US opt-out line), until the merchant's files change."""
    published: dict[str, dict[str, str]] = {"acme": {"brand.yaml": "name: First\n"}}
    plain, cached = renderer(cached=False, published=published), renderer(published=published)
    for t in SAMPLES:
        r = Recipient(name="Ana", email="a@example.com", locale="fr", timezone="Europe/Paris")
        items = [
            Notification(
                notification_id=f"n_{i}",
                merchant_id="acme",
                shipment_id="s1",
                channel=channel,
                to=to,
                transition=t,
                recipient=r,
                created_at=t.occurred_at,
            )
            for i, (channel, to) in enumerate(
                [
                    (ChannelKind.EMAIL, "a@example.com"),
                    (ChannelKind.SMS, "+14155550123"),
                    (ChannelKind.SMS, "+33612345678"),
                    (ChannelKind.SMS, "+14155550123"),
                ]
            )
        ]
        same(plain, cached, items)
    sms = items[2]
    assert cached.render(sms).body.startswith("First")  # type: ignore[union-attr]
    published["acme"] = {"brand.yaml": "name: Second\n"}
    plain.forget("acme")
    cached.forget("acme")
    assert cached.render(sms).body.startswith("Second")  # type: ignore[union-attr]
    same(plain, cached, items)


def _odd(t: Transition, channel: ChannelKind, n: int) -> Notification:
    """Values the CSS inliner writes back its own way: &, <, >, quotes, no-break spaces."""
    base = notification(
        t, channel, name=["Zoë\u00a0O'Brien & <Co>", 'Jean "JJ"', "Ana"][n % 3], n=n
    )
    url = "https://track.example.com/?n=1Z&amp=\"x\"&c='y'<>\u00a0z"
    return base.model_copy(
        update={"transition": base.transition.model_copy(update={"tracking_url": url})}
    )


async def test_the_css_is_inlined_once_per_shape_and_batches_are_the_full_render() -> None:
    plain, cached = renderer(cached=False), renderer()
    items = [
        _odd(t, c, i)
        for i, (t, c) in enumerate((t, c) for t in SAMPLES for c in ChannelKind for _ in range(3))
    ]
    expected = await plain.render_many(items)
    assert await cached.render_many(items) == expected
    assert await cached.render_many(items) == expected  # all from skeletons now
    same(plain, cached, items)
    assert cached.skeletons is not None
    emails = [s for s in cached.skeletons._items.values() if "html" in s.parts]  # type: ignore[attr-defined]
    assert emails and all("inlined" in s.parts for s in emails)
    html = next(m.html for m in expected if isinstance(m, EmailMessageOut) and "JJ" in m.text)
    assert 'Hello Jean "JJ",' in html and "&amp;amp=&quot;x&quot;" in html


@pytest.mark.parametrize(
    ("css", "name"),
    [
        ("p[title] { color: red; }", "an attribute selector"),
        ("p { color: red; }", "a value printed raw"),
    ],
)
async def test_html_the_inliner_could_write_differently_is_inlined_per_message(
    tmp_path: Path, css: str, name: str
) -> None:
    templates = tree(tmp_path)
    (templates / "acme" / "email").mkdir(parents=True)
    raw = "|safe" if "raw" in name else ""
    (templates / "acme" / "email" / "layout.html").write_text(
        f"<html><head><style>{css}</style></head><body>"
        f'<p title="{{{{ recipient.name }}}}">{{{{ m.subject }}}} {{{{ recipient.name{raw} }}}}</p>'
        "</body></html>"
    )
    plain, cached = renderer(templates, cached=False), renderer(templates)
    t = next(t for t in SAMPLES if t.milestone == "delivered")
    items = [_odd(t, ChannelKind.EMAIL, i) for i in range(3)]
    assert await cached.render_many(items) == await plain.render_many(items)
    same(plain, cached, items)
    assert cached.skeletons is not None
    kept = [s for k, s in cached.skeletons._items.items() if "acme" in k[0][0]]
    assert kept and all("inlined" not in s.parts for s in kept)  # type: ignore[attr-defined]
