"""Merchant templates that try to escape the sandbox or exhaust the process (issue 15).

Escapes are refused by `notifier check` (and the editor's checks), naming the file and line,
and are harmless at send time: nothing from the settings, the environment or another
merchant's files reaches any message. Exhausting templates are reported by check with the
limit they crossed, and at send time the render ends with the limit's error: the merchant's
messages fall back to the default templates (or fail, when the defaults themselves are the
problem), the rest of the batch is delivered and the worker stays healthy.
"""

from __future__ import annotations

import email
import email.policy
import json
import logging
import shutil
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from notifier.app import create_app
from notifier.check import check_all, override_problems, samples, startup_problems
from notifier.cli import main
from notifier.errors import RenderError
from notifier.models import ChannelKind, Notification, Recipient
from notifier.render import EmailMessageOut, Renderer
from notifier.render.environment import TemplateStore
from notifier.render.i18n import Catalogs
from notifier.render.limits import Limits
from notifier.resources import data_dir
from notifier.settings import Settings
from tests.conftest import (
    auth,
    fixed_clock,
    make_settings,
    outbox_files,
    post,
    run_worker,
    transition,
)

Client = TestClient[Any, Any]
MESSAGE = "messages/out_for_delivery.jinja"
#: Secrets an escape would be after: none may appear in an escaping merchant's messages.
SIGNING_SECRET = "sig-SECRET-0123456789abcdef"
ENV_SECRET = "env-SECRET-0123456789abcdef"
OTHER_WORDS = "GLOBEX-PRIVATE-WORDING"
OTHER_NAME = "Globex PRIVATE shop"

#: Each escape attempt is line 2 of the merchant's out_for_delivery message file.
ESCAPES: dict[str, str] = {
    "mro": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "base_subclasses": "{{ brand.__class__.__base__.__subclasses__() }}",
    "cycler_globals": "{{ cycler.__init__.__globals__.os.environ }}",
    "lipsum_globals": "{{ lipsum.__globals__['os'].environ }}",
    "joiner_globals": "{{ joiner.__init__.__globals__ }}",
    "namespace_globals": "{{ namespace.__init__.__globals__ }}",
    "namespace_internals": "{{ namespace(a=1)._Namespace__attrs }}",
    "template_reference": "{{ self._TemplateReference__context }}",
    "config": "{{ config.items() }}",
    "request": "{{ request.environ }}",
    # beside a filter that does not exist (the audit compiles the template to find names)
    "config_unknown_filter": "{{ config.items()|no_such_filter }}",
    "attr_filter": "{{ ''|attr('__class__')|attr('__mro__') }}",
    "format_method": "{{ '{0.__class__.__init__.__globals__}'.format(brand) }}",
    "format_filter": "{{ '%s'|format(lipsum.__globals__) }}",
    "range_owner": "{{ range.__self__.globals }}",
    "gettext_owner": "{{ gettext.func.__self__._catalog }}",
    "class_methods": "{{ dict.update(brand, name='HACKED') }}{{ brand.name }}",
    "other_merchant": "{% include 'globex/" + MESSAGE + "' %}",
    "other_brand": "{% include '../globex/brand.yaml' %}",
    "import_brand": "{% import 'globex/brand.yaml' as b %}{{ b }}",
    "via_include": "{% include 'email/evil.html' %}",
    "via_import": "{% import 'email/evil_macros.html' as m %}{{ m.leak() }}",
}
#: Files the escapes load, and where each escape is reported (file, line).
ESCAPE_FILES = {
    "via_include": {"email/evil.html": "{{ cycler.__init__.__globals__ }}\n"},
    "via_import": {
        "email/evil_macros.html": (
            "{% macro leak() %}\n{{ self._TemplateReference__context }}\n{% endmacro %}\n"
        )
    },
}
ESCAPE_AT = {
    "via_include": "email/evil.html, line 1",
    "via_import": "email/evil_macros.html, line 2",
}

#: Each exhausting template is line 2 of the merchant's out_for_delivery message file.
EXHAUSTING: dict[str, str] = {
    "huge_range": "{% for i in range(10**9) %}x{% endfor %}",
    "nested_loops": (
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    ),
    "repeat": "{{ 'x' * 10**9 }}",
    "power": "{{ 9**(9**9) }}",  # Jinja's ** is left-associative: 9**9**9 is (9**9)**9
    "center": "{{ 'a'|center(10**9) }}",
    "recursive_macro": "{% macro r(n) %}{{ r(n + 1) }}{% endmacro %}{{ r(0) }}",
    "doubling_macro": (
        "{% macro d(n) %}{% if n %}{{ d(n - 1) }}{{ d(n - 1) }}{% else %}x{% endif %}"
        "{% endmacro %}{{ d(60) }}"
    ),
    "lipsum": "{{ lipsum(10**6) }}",
    "loop_output": "{% for i in range(100000) %}{{ 'y' * 100000 }}{% endfor %}",
    "join": "{{ range(100000)|map('string')|join('y' * 20) }}",
    "wordwrap": "{{ ('word ' * 200000)|wordwrap(1) }}",
    "indent": "{{ ('line\\n' * 100000)|indent(10000) }}",
    # a gigabyte of indentation from a one-item dict: refused before it is built
    "tojson_indent": "{{ {'a': 1}|tojson(indent=10**9) }}",
    "tojson_nested": "{{ ([[[[[1, 2]]]]] * 1000)|tojson(indent=1000) }}",
    "doubling_text": (
        "{% set ns = namespace(s='xx') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
        "{% endfor %}{{ ns.s }}"
    ),
    "doubling_lists": (
        "{% set ns = namespace(l=[]) %}{% for i in range(64) %}{% set ns.l = [ns.l, ns.l] %}"
        "{% endfor %}{{ ns.l }}"
    ),
    "deep_nesting": (
        "{% set ns = namespace(t=()) %}{% for i in range(100000) %}{% set ns.t = (ns.t,) %}"
        "{% endfor %}{{ {ns.t: 1} }}"
    ),
    "format_width": "{{ '%*s' % (10**9, 'x') }}",
    "translate": "{{ ('a' * 1500).translate({97: 'b' * 1000000})|length }}",
    "to_bytes": "{{ (1).to_bytes(1500000000, 'big')|length }}",
    "chained_gettext": (
        "{% set a = 'x' * 100000 %}{% set f = '%(a)s' * 8 %}{% set b = gettext(f, a=a) %}"
        "{% set c = gettext(f, a=b) %}{% set d = gettext(f, a=c) %}{{ d|length }}"
    ),
    "busy": (
        "{% set big = 'word ' * 200000 %}{% for i in range(100000) %}"
        "{% set n = big|wordcount %}{% endfor %}"
    ),
}
#: A short time limit keeps the cases that run into it short.
TIME_LIMIT_S = 0.3


def message_file(line: str) -> str:
    """The default out_for_delivery words with ``line`` (line 2) as the subject."""
    default = (data_dir("templates", None) / MESSAGE).read_text()
    rest = default.split("\n", 1)[1]
    return "{%- macro subject() -%}\n" + line + "\n{%- endmacro -%}\n" + rest


def templates_with(tmp_path: Path, merchants: dict[str, dict[str, str]]) -> Path:
    """A copy of the shipped templates with these merchants' files, and globex's own."""
    templates = tmp_path / "templates"
    shutil.copytree(data_dir("templates", None), templates)
    globex = {
        "brand.yaml": f"name: {OTHER_NAME}\nsupport: {{email: help@globex.example}}\n",
        MESSAGE: message_file(OTHER_WORDS),
    }
    for merchant, files in {**merchants, "globex": globex}.items():
        for path, text in files.items():
            (templates / merchant / path).parent.mkdir(parents=True, exist_ok=True)
            (templates / merchant / path).write_text(text)
    return templates


def few_locales(tmp_path: Path) -> Path:
    """English and French only: check renders every milestone in every locale, and what
    these tests are about does not depend on the language."""
    locales = tmp_path / "locales"
    shutil.copytree(data_dir("locales", None) / "fr", locales / "fr")
    return locales


def escape_merchants() -> dict[str, dict[str, str]]:
    return {
        f"esc_{name}": {MESSAGE: message_file(line), **ESCAPE_FILES.get(name, {})}
        for name, line in ESCAPES.items()
    }


def exhausting_merchants() -> dict[str, dict[str, str]]:
    return {f"exh_{name}": {MESSAGE: message_file(line)} for name, line in EXHAUSTING.items()}


def of(problems: list[str], merchant: str) -> str:
    return "\n".join(p for p in problems if p.startswith(f"templates/{merchant}: "))


def out_for_delivery(merchant: str, channel: ChannelKind = ChannelKind.EMAIL) -> Notification:
    t = next(t for t in samples() if t.milestone == "out_for_delivery")
    return Notification(
        notification_id=f"n_{merchant}",
        merchant_id=merchant,
        shipment_id="s1",
        channel=channel,
        to="ana@example.com" if channel is ChannelKind.EMAIL else "+33612345678",
        transition=t.model_copy(update={"merchant_id": merchant}),
        recipient=Recipient(
            email="ana@example.com", phone="+33612345678", locale="en", timezone="Europe/Paris"
        ),
        created_at=t.occurred_at,
    )


def renderer(templates: Path, limits: Limits, *, strict: bool) -> Renderer:
    catalogs = Catalogs(data_dir("locales", None))
    store = TemplateStore(templates, catalogs, limits=limits)
    return Renderer(store, catalogs, email_from="n@example.com", strict=strict)


# --- check -------------------------------------------------------------------------------


def test_the_shipped_templates_pass_check_well_within_the_limits(tmp_path: Path) -> None:
    """No false positives: every default template, every milestone, locale and channel,
    renders within the smallest output limit the settings allow (16 KiB)."""
    settings = make_settings(tmp_path, render_max_bytes=16 * 1024)
    assert startup_problems(settings) == []
    assert check_all(settings) == []


def test_check_refuses_every_escape_naming_file_and_line(tmp_path: Path) -> None:
    templates = templates_with(tmp_path, escape_merchants())
    settings = make_settings(tmp_path, templates_dir=templates, locales_dir=few_locales(tmp_path))
    problems = check_all(settings)
    for name in ESCAPES:
        found = of(problems, f"esc_{name}")
        at = ESCAPE_AT.get(name, f"{MESSAGE}, line 2")
        assert at in found, f"{name}: {found or problems}"
    assert of(problems, "globex") == ""  # its own files are fine
    internals = of(problems, "esc_mro")
    assert "reaches for Python internals (.__class__, .__mro__, .__subclasses__)" in internals
    assert "access to attribute '__class__' of 'str' object is unsafe" in internals
    assert "'config', a global of other template systems" in of(problems, "esc_config")
    unknown = of(problems, "esc_config_unknown_filter")
    assert "'config', a global of other template systems" in unknown
    assert "No filter named 'no_such_filter'" in unknown
    assert "a template may load only message files" in of(problems, "esc_other_brand")
    assert "'update' of 'type' object is unsafe" in of(problems, "esc_class_methods")


def test_the_check_command_refuses_an_escape_in_a_branch_no_sample_reaches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    hidden = "{% if recipient.name == 'never' %}{{ lipsum.__globals__['os'] }}{% endif %}"
    templates = templates_with(tmp_path, {"acme": {MESSAGE: message_file(hidden)}})
    monkeypatch.setenv("NOTIFIER_TEMPLATES_DIR", str(templates))
    monkeypatch.setenv("NOTIFIER_LOCALES_DIR", str(few_locales(tmp_path)))
    monkeypatch.chdir(tmp_path)
    assert main(["check"]) == 1
    assert (
        f"templates/acme: {MESSAGE}, line 2: reaches for Python internals (.__globals__)"
        in capsys.readouterr().err
    )


def test_check_reports_every_exhausting_template_with_the_limit_it_crossed(
    tmp_path: Path,
) -> None:
    templates = templates_with(tmp_path, exhausting_merchants())
    settings = make_settings(
        tmp_path,
        templates_dir=templates,
        locales_dir=few_locales(tmp_path),
        render_time_limit_s=TIME_LIMIT_S,
    )
    problems = check_all(settings)
    for name in EXHAUSTING:
        found = of(problems, f"exh_{name}")
        assert f"{MESSAGE}, line 2: " in found, f"{name}: {found or problems}"
        assert "limit" in found, found
        # the first render past a limit ends the merchant's: one line, not one per message
        assert len(found.splitlines()) == 1, found
    assert "render time limit of 0.3 s" in of(problems, "exh_busy")
    assert "render output limit of 1,048,576 (NOTIFIER_RENDER_MAX_BYTES)" in of(
        problems, "exh_repeat"
    )
    assert "recursion limit" in of(problems, "exh_recursive_macro")
    assert "nested more than 100 deep" in of(problems, "exh_deep_nesting")


def test_the_editors_checks_refuse_escapes_and_exhaustion_in_a_draft(tmp_path: Path) -> None:
    """What a draft save and a publish run (admin's problems): the same refusals."""
    settings = make_settings(
        tmp_path, locales_dir=few_locales(tmp_path), render_time_limit_s=TIME_LIMIT_S
    )
    for line, expected in (
        (ESCAPES["format_method"], "reaches for Python internals"),
        (EXHAUSTING["nested_loops"], "limit"),
        (EXHAUSTING["repeat"], "render output limit"),
    ):
        problems = override_problems(settings, "acme", {MESSAGE: message_file(line)})
        found = "\n".join(p for p in problems if f"{MESSAGE}, line 2: " in p)
        assert expected in found, problems


# --- the renderer ------------------------------------------------------------------------


@pytest.mark.parametrize("name", EXHAUSTING)
def test_an_exhausting_template_ends_with_a_limit_error_in_bounded_memory(
    tmp_path: Path, name: str
) -> None:
    templates = templates_with(tmp_path, {"acme": {MESSAGE: message_file(EXHAUSTING[name])}})
    strict = renderer(templates, Limits(time_s=TIME_LIMIT_S), strict=True)
    tracemalloc.start()
    try:
        with pytest.raises(RenderError) as failed:
            strict.render(out_for_delivery("acme"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert f"{MESSAGE}, line 2: " in str(failed.value)
    assert "limit" in str(failed.value)
    # a few output limits at most (1 MiB each), never the gigabytes the template asks for
    assert peak < 48 * 1024 * 1024, f"{name}: {peak:,} bytes"


def test_a_merchant_over_a_limit_is_not_tried_again_until_its_files_change(
    tmp_path: Path,
) -> None:
    templates = templates_with(tmp_path, {"acme": {MESSAGE: message_file(EXHAUSTING["busy"])}})
    lenient = renderer(templates, Limits(time_s=TIME_LIMIT_S), strict=False)
    default_subject = lenient.render(out_for_delivery("other"))
    assert isinstance(default_subject, EmailMessageOut)
    for channel in ChannelKind:
        message = lenient.render(out_for_delivery("acme", channel))
        if isinstance(message, EmailMessageOut):
            assert message.subject == default_subject.subject
    assert list(lenient.over_limit) == ["acme"]
    [why] = lenient.disabled["acme"]
    assert why.startswith(f"{MESSAGE}, line 2: took longer than the render time limit")
    assert why.endswith("its messages use the default templates until it is fixed")
    hits, _ = lenient.take_changes()
    assert hits == {"acme"}
    lenient.render(out_for_delivery("acme"))  # still set aside, and still counted
    assert lenient.take_changes() == ({"acme"}, set())
    lenient.forget("acme")  # what a publish or an edit does
    assert lenient.over_limit == {}


# --- send time, through the worker -------------------------------------------------------


async def deliver_all(
    tmp_path: Path, redis_url: str, templates: Path, merchants: list[str], **settings: Any
) -> tuple[Settings, dict[str, Any]]:
    """Post an out_for_delivery transition for each merchant in one batch, run the worker;
    the settings and /healthz."""
    config = make_settings(
        tmp_path,
        redis_url=redis_url,
        templates_dir=templates,
        signing_secret=SIGNING_SECRET,
        **settings,
    )
    # the API reads /healthz's counts at the worker's (fixed) time
    async with TestClient(TestServer(create_app(config, clock=fixed_clock()))) as client:
        await post(
            client,
            *(
                transition(event_id=f"e_{m}", merchant_id=m, shipment_id=f"s_{m}")
                for m in merchants
            ),
        )
        await run_worker(config)
        resp = await client.get("/healthz")
        assert resp.status == 200
        health: dict[str, Any] = await resp.json()
        for m in merchants:  # both messages of every merchant went out
            resp = await client.get(
                f"/v1/merchants/{m}/shipments/s_{m}/notifications", headers=auth()
            )
            decisions = (await resp.json())["decisions"]
            assert {d["channel"]: d["delivery"]["status"] for d in decisions} == {
                "email": "sent",
                "sms": "sent",
            }, (m, decisions)
    return config, health


def subject_of(settings: Settings, merchant: str) -> str:
    [eml] = (settings.outbox_dir / merchant).rglob("*.eml")
    return str(email.message_from_bytes(eml.read_bytes(), policy=email.policy.default)["Subject"])


async def test_escapes_are_harmless_at_send_time(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEMPLATE_LIMITS_TEST_SECRET", ENV_SECRET)
    escaping = escape_merchants()
    templates = templates_with(tmp_path, escaping)
    merchants = [*escaping, "globex", "acme"]
    settings, health = await deliver_all(tmp_path, redis_url, templates, merchants)
    plain = subject_of(settings, "acme")  # no folder of its own: the default words
    assert subject_of(settings, "globex") == OTHER_WORDS  # its own, and only its own
    for merchant in escaping:
        assert subject_of(settings, merchant) == plain, merchant  # the defaults stood in
        for path in (settings.outbox_dir / merchant).rglob("*"):
            if path.is_file():
                text = path.read_bytes().decode("utf-8", "replace")
                for secret in (SIGNING_SECRET, ENV_SECRET, OTHER_WORDS, OTHER_NAME, "HACKED"):
                    assert secret not in text, (merchant, path.name, secret)
    assert health["merchant_overrides_disabled"] == len(escaping)


async def test_exhausting_templates_are_contained_at_send_time(
    tmp_path: Path, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Each exhausting merchant's messages go out with the default templates (its own are
    set aside, logged with the limit crossed); globex and acme in the same batch are
    untouched; the worker finishes the batch and the service stays healthy."""
    caplog.set_level(logging.ERROR, logger="notifier.render.renderer")
    exhausting = exhausting_merchants()
    templates = templates_with(tmp_path, exhausting)
    merchants = [*exhausting, "globex", "acme"]
    settings, health = await deliver_all(
        tmp_path, redis_url, templates, merchants, render_time_limit_s=TIME_LIMIT_S
    )
    assert health["status"] == "ok"
    assert health["merchant_overrides_disabled"] == len(exhausting)
    assert subject_of(settings, "globex") == OTHER_WORDS
    plain = subject_of(settings, "acme")
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for merchant in exhausting:
        assert subject_of(settings, merchant) == plain, merchant
        [line] = [x for x in logged.splitlines() if x.startswith(f"merchant {merchant}: ")]
        assert f"{MESSAGE}, line 2: " in line and "limit" in line, line


async def test_an_exhausting_default_template_fails_only_its_message(
    tmp_path: Path, redis_url: str
) -> None:
    """When the defaults themselves cross a limit there is nothing to fall back to: the
    email fails with the limit's error, the SMS of the same event is delivered."""
    templates = tmp_path / "templates"
    shutil.copytree(data_dir("templates", None), templates)
    (templates / "email" / "layout.html").write_text(
        "<p>{{ m.subject }}</p>\n" + EXHAUSTING["loop_output"] + "\n"
    )
    settings = make_settings(tmp_path, redis_url=redis_url, templates_dir=templates)
    async with TestClient(TestServer(create_app(settings))) as client:
        await post(client, transition())
        await run_worker(settings)
        resp = await client.get(
            "/v1/merchants/acme/shipments/shp_123/notifications", headers=auth()
        )
        by_channel = {d["channel"]: d["delivery"] for d in (await resp.json())["decisions"]}
        assert by_channel["sms"]["status"] == "sent"
        assert by_channel["email"]["status"] == "failed"
        assert "email/layout.html, line 2: " in by_channel["email"]["error"]
        assert "render output limit" in by_channel["email"]["error"]
        health = await (await client.get("/healthz")).json()
        assert health["dead_letters"]["notifications"] == 1
    [sms] = outbox_files(settings, ".json")
    assert json.loads(sms.read_text())["to"] == "+33612345678"


def test_a_message_file_that_says_nothing_is_refused_and_never_sent_blank(
    tmp_path: Path,
) -> None:
    """An empty message file (or macros that render nothing) would send a blank subject
    and an SMS of just the tracking link: check refuses it, sends use the defaults."""
    templates = templates_with(
        tmp_path, {"blank": {MESSAGE: ""}, "hollow": {MESSAGE: message_file("")}}
    )
    settings = make_settings(tmp_path, templates_dir=templates, locales_dir=few_locales(tmp_path))
    problems = check_all(settings)
    assert "out_for_delivery.jinja gives no subject for email" in of(problems, "blank")
    assert "gives no sms for sms" in of(problems, "blank")
    assert "gives no subject for email" in of(problems, "hollow")
    lenient = renderer(templates, Limits(), strict=False)
    for merchant in ("blank", "hollow"):
        email_out = lenient.render(out_for_delivery(merchant))
        assert isinstance(email_out, EmailMessageOut) and email_out.subject.strip()
        sms = lenient.render(out_for_delivery(merchant, ChannelKind.SMS))
        assert "arrives today" in sms.body  # type: ignore[union-attr]
