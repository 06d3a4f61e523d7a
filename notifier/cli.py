"""The ``notifier`` command: serve, worker, check."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from pydantic import ValidationError

from notifier.errors import ConfigurationError, NotifierError
from notifier.models import (
    ChannelKind,
    ExceptionCode,
    Notification,
    Recipient,
    Status,
    Transition,
)
from notifier.policy import PolicyStore
from notifier.render import Renderer, SmsMessageOut
from notifier.render.brand import load_brand
from notifier.render.environment import TemplateStore
from notifier.render.i18n import Catalogs
from notifier.render.sms import SmsEncoding
from notifier.resources import data_dir
from notifier.settings import DEV_API_KEY, Settings

log = logging.getLogger("notifier")


def _settings() -> Settings:
    try:
        settings = Settings()
    except ValidationError as exc:
        # Only the variable's name: deeper parts of a location can be secrets
        # (the keys of NOTIFIER_API_KEYS), and the input itself is never shown.
        problems = "; ".join(
            f"NOTIFIER_{str(e['loc'][0]).upper()}: {e['msg']}" if e["loc"] else e["msg"]
            for e in exc.errors(include_input=False)
        )
        raise ConfigurationError(f"invalid settings: {problems}") from exc
    logging.getLogger().setLevel(settings.log_level)
    return settings


def _banner(settings: Settings, host: str, port: int) -> None:
    if settings.embedded:
        bar = "!" * 72
        print(bar, file=sys.stderr)
        print(
            "! EMBEDDED MODE: in-memory store; NOTHING PERSISTS across restarts.", file=sys.stderr
        )
        print("! Set NOTIFIER_REDIS_URL to keep state in Redis.", file=sys.stderr)
        if not settings.api_keys:
            print(f"! Development API key: {DEV_API_KEY}", file=sys.stderr)
        print(f"! Messages are written to {settings.outbox_dir.resolve()}", file=sys.stderr)
        print(bar, file=sys.stderr)
    print(f"notifier listening on http://{host}:{port}", file=sys.stderr)


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the API (and, in embedded mode, the worker in the same process)."""
    from aiohttp import web

    from notifier.app import create_app

    settings = _settings()
    if not settings.embedded and not settings.api_keys:
        raise ConfigurationError("NOTIFIER_API_KEYS is required when NOTIFIER_REDIS_URL is set")
    problems = check_all(settings)
    if problems:
        raise ConfigurationError("\n".join(problems))
    host = args.host or settings.host
    port = settings.port if args.port is None else args.port
    _banner(settings, host, port)
    _settle_gc()
    web.run_app(create_app(settings), host=host, port=port, print=None, access_log=None)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """Run an arq worker against NOTIFIER_REDIS_URL."""
    from notifier.worker import build_worker

    settings = _settings()
    if settings.embedded:
        raise ConfigurationError(
            "NOTIFIER_REDIS_URL is not set: in embedded mode `notifier serve` runs the worker"
        )
    problems = check_all(settings)
    if problems:
        raise ConfigurationError("\n".join(problems))
    asyncio.set_event_loop(asyncio.new_event_loop())
    worker = build_worker(settings)
    _settle_gc()
    worker.run()
    return 0


def _settle_gc() -> None:
    """Keep the cyclic GC off what start-up loaded, and let it run less often.

    Modules, compiled templates and catalogs live as long as the process, yet every
    full collection walked them all again: a fifth of a worker's time under load
    (`bench/`). They go to the permanent generation; the young generation is
    collected every 20,000 net allocations instead of 700.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)


def _samples(minimal: bool = False) -> list[Transition]:
    """One transition per milestone, with every optional field (or, minimal, with none)."""
    at = datetime(2026, 11, 21, 9, 30, tzinfo=UTC)
    base: dict[str, object] = {
        "event_id": "check",
        "merchant_id": "check",
        "shipment_id": "check",
        "tracking_number": "1Z999AA10123456784",
        "carrier": "ups",
        "occurred_at": at,
        # a realistic carrier tracking link, for the SMS budget
        "tracking_url": "https://www.ups.com/track?tracknum=1Z999AA10123456784",
        "estimated_delivery": {"start": at, "end": at},
        "order": {"number": "1001"},
        "location": {"city": "Leipzig", "country": "DE"},
    }
    if minimal:
        base = {
            k: base[k]
            for k in (
                "event_id",
                "merchant_id",
                "shipment_id",
                "tracking_number",
                "carrier",
                "occurred_at",
            )
        }
    out = []
    for status in Status:
        if status is Status.EXCEPTION:
            out += [
                Transition.model_validate({**base, "status": status, "exception_code": c})
                for c in ExceptionCode
            ]
        else:
            out.append(Transition.model_validate({**base, "status": status}))
    return out


def check_all(settings: Settings) -> list[str]:
    """Every problem with settings, policies, brands and templates (in every locale)."""
    # Channel credentials were checked by Settings when it was built.
    problems: list[str] = []
    policies_dir = data_dir("policies", settings.policies_dir)
    problems += PolicyStore(policies_dir).check_all()
    templates_dir = data_dir("templates", settings.templates_dir)
    if not templates_dir.is_dir():
        return [*problems, f"{templates_dir}: templates directory missing"]
    catalogs = Catalogs(data_dir("locales", settings.locales_dir))
    renderer = Renderer(
        TemplateStore(templates_dir, catalogs), catalogs, email_from=settings.email_from
    )
    try:
        default_brand = renderer.brand("check")
    except ConfigurationError as exc:
        return [*problems, str(exc)]
    renderer.use_brand("check", default_brand.model_copy(update={"name": SAMPLE_SHOP}))
    overrides = [p.name for p in templates_dir.iterdir() if p.is_dir()]
    merchants = ["", *sorted(set(overrides) - {"email", "sms", "messages"})]
    for merchant in merchants:
        problems += _check_channels(settings, templates_dir, merchant)
        for locale in ["en", *catalogs.available()]:
            problems += _check_renders(renderer, merchant, locale)
    return problems


def _check_channels(settings: Settings, templates_dir: Path, merchant: str) -> list[str]:
    """A merchant's chosen channel must be one the service has credentials for; signed
    unsubscribe links need a secret every process shares."""
    try:
        brand = load_brand(templates_dir, merchant)
    except ConfigurationError as exc:
        return [str(exc)]
    chosen = brand.channels
    problems = []
    if brand.one_click_unsubscribe and not settings.embedded and not settings.signing_secret:
        where = f"templates/{merchant}/brand.yaml" if merchant else "templates/brand.yaml"
        problems.append(
            f"{where}: one_click_unsubscribe needs NOTIFIER_SIGNING_SECRET when "
            "NOTIFIER_REDIS_URL is set (API and workers must sign alike)"
        )
    available = {"outbox"}
    if settings.sendgrid_api_key:
        available.add("sendgrid")
    if settings.twilio_account_sid and settings.twilio_auth_token:
        available.add("twilio")
    where = f"templates/{merchant}/brand.yaml" if merchant else "templates/brand.yaml"
    return problems + [
        f"{where}: channels.{kind}: {name} is not configured (set its NOTIFIER_{name.upper()}_* "
        "credentials)"
        for kind, name in (("email", chosen.email), ("sms", chosen.sms))
        if name and name not in available
    ]


#: SMS budgets: one segment where the text fits GSM-7, two where it needs UCS-2.
SMS_BUDGET = {SmsEncoding.GSM7: 1, SmsEncoding.UCS2: 2}


#: Locales whose readers are likely to have US numbers, so their SMS carry "Reply STOP".
US_LOCALES = {"en", "es"}
#: A realistic shop name for the default brand's budget check ("Your shop" flatters it).
SAMPLE_SHOP = "Northwind Outfitters"


def _check_renders(renderer: Renderer, merchant: str, locale: str) -> list[str]:
    problems: list[str] = []
    where = f"templates/{merchant}" if merchant else "templates"
    full = Recipient(
        name="Ana",
        email="ana@example.com",
        phone="+33612345678",
        timezone="Europe/Paris",
        locale=locale,
    )
    bare = Recipient(email="ana@example.com", phone="+33612345678", locale=locale)
    cases = [(t, full, "+33612345678") for t in _samples()]
    cases += [(t, bare, "+33612345678") for t in _samples(minimal=True)]
    if locale in US_LOCALES:
        cases += [(t, full, "+12125550100") for t in _samples()]
    for t, recipient, phone in cases:
        for channel in ChannelKind:
            n = Notification(
                notification_id="n_check",
                merchant_id=merchant or "check",
                shipment_id="check",
                channel=channel,
                to="ana@example.com" if channel is ChannelKind.EMAIL else phone,
                transition=t,
                recipient=recipient,
                created_at=t.occurred_at,
            )
            try:
                message = renderer.render(n)
            except NotifierError as exc:
                problems.append(f"{where} ({t.milestone}, {channel}, {locale}): {exc}")
                if len(problems) > 20:
                    return problems
                continue
            if not isinstance(message, SmsMessageOut):
                continue
            # US numbers carry the legally required opt-out line: one more segment for it
            us = phone.startswith("+1")
            budget = SMS_BUDGET[message.encoding] + us
            if message.segments > budget:
                extra = " incl. 1 for the US opt-out line" if us else ""
                problems.append(
                    f"{where}/sms ({t.milestone}, {locale}{', +1' if us else ''}): "
                    f"{message.segments} segments in {message.encoding} "
                    f"(budget {budget}{extra}): {message.body!r}"
                )
    return problems


def cmd_preview(args: argparse.Namespace) -> int:
    """Render one message with sample data and write it to a file (.html/.txt/.eml or .sms.txt)."""
    settings = _settings()
    templates_dir = data_dir("templates", settings.templates_dir)
    catalogs = Catalogs(data_dir("locales", settings.locales_dir))
    renderer = Renderer(
        TemplateStore(templates_dir, catalogs), catalogs, email_from=settings.email_from
    )
    sample = next(
        (
            t
            for t in _samples()
            if t.status == args.status
            and (t.exception_code or None) == (args.exception_code or None)
        ),
        None,
    )
    if sample is None:
        raise ConfigurationError(
            f"no such message: --status {args.status}"
            + (f" --exception-code {args.exception_code}" if args.exception_code else "")
            + " (exception needs --exception-code, other statuses none)"
        )
    channel = ChannelKind(args.channel)
    n = Notification(
        notification_id="n_preview",
        merchant_id=args.merchant or "preview",
        shipment_id="preview",
        channel=channel,
        to="ana@example.com" if channel is ChannelKind.EMAIL else args.phone,
        transition=sample,
        recipient=Recipient(
            name="Ana",
            email="ana@example.com",
            phone=args.phone,
            locale=args.locale,
            timezone=args.timezone,
        ),
        created_at=sample.occurred_at,
    )
    message = renderer.render(n)
    out = Path(args.output) if args.output else None
    if isinstance(message, SmsMessageOut):
        text = f"{message.body}\n\n[{message.encoding}, {message.segments} segment(s)]\n"
        path = out or Path(f"preview-{sample.milestone.replace(':', '-')}-{args.locale}.sms.txt")
        path.write_text(text, encoding="utf-8")
    else:
        path = out or Path(f"preview-{sample.milestone.replace(':', '-')}-{args.locale}.html")
        if path.suffix == ".eml":
            from notifier.channels.outbox import build_eml

            path.write_bytes(build_eml(message, sample.occurred_at))
        elif path.suffix == ".txt":
            path.write_text(f"Subject: {message.subject}\n\n{message.text}", encoding="utf-8")
        else:
            path.write_text(message.html, encoding="utf-8")
    print(f"wrote {path}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Validate settings, policies and templates; exit 1 listing each problem."""
    settings = _settings()
    problems = check_all(settings)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    for warning in check_warnings(settings):
        print(f"warning: {warning}", file=sys.stderr)
    if problems:
        return 1
    print("ok: settings, policies and templates are valid")
    return 0


def check_warnings(settings: Settings) -> list[str]:
    """What is valid but probably not meant: brands without a support contact."""
    templates_dir = data_dir("templates", settings.templates_dir)
    overrides = [p.name for p in templates_dir.iterdir() if (p / "brand.yaml").is_file()]
    merchants = ["", *sorted(overrides)]
    warnings = []
    for merchant in merchants:
        try:
            brand = load_brand(templates_dir, merchant)
        except ConfigurationError:
            continue  # reported as an error already
        if brand.one_click_unsubscribe and not settings.signing_secret and settings.embedded:
            where = f"templates/{merchant}/brand.yaml" if merchant else "templates/brand.yaml"
            warnings.append(
                f"{where}: one_click_unsubscribe without NOTIFIER_SIGNING_SECRET: "
                "links are signed with a per-process secret and break on restart"
            )
        if not brand.support.any():
            where = f"templates/{merchant}/brand.yaml" if merchant else "templates/brand.yaml"
            warnings.append(
                f"{where}: no support contact: exception emails cannot say how "
                "to reach support (set support.url, email, phone or hours)"
            )
    return warnings


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="notifier", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the API (embedded mode: and the worker)")
    serve.add_argument("--host", help="listen address (default NOTIFIER_HOST)")
    serve.add_argument("--port", type=int, help="listen port (default NOTIFIER_PORT)")
    serve.set_defaults(func=cmd_serve)
    sub.add_parser("worker", help="run an arq worker against NOTIFIER_REDIS_URL").set_defaults(
        func=cmd_worker
    )
    sub.add_parser("check", help="validate settings, policies and templates").set_defaults(
        func=cmd_check
    )
    preview = sub.add_parser("preview", help="render one message with sample data to a file")
    preview.add_argument("--status", required=True, choices=[s.value for s in Status])
    preview.add_argument("--exception-code", choices=[c.value for c in ExceptionCode])
    preview.add_argument("--locale", default="en", help="e.g. fr_CA, pt_BR, ar (default en)")
    preview.add_argument("--channel", choices=["email", "sms"], default="email")
    preview.add_argument("--merchant", help="use templates/<merchant>/ and its brand.yaml")
    preview.add_argument("--timezone", default="Europe/Paris")
    preview.add_argument("--phone", default="+33612345678", help="SMS recipient (+1... adds STOP)")
    preview.add_argument("-o", "--output", help="file to write (.html, .txt or .eml for email)")
    preview.set_defaults(func=cmd_preview)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args))
    except ConfigurationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
