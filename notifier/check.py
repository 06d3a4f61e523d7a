"""What `notifier check` validates, and the smaller part that `serve` and `worker` run at start-up.

Start-up checks only what the whole service stands on (settings, the default policy, the
default brand and templates): its cost does not grow with merchants, and one merchant's
broken file cannot stop delivery for the others (the renderer and the policy store fall
back to the defaults for that merchant, and log it). `notifier check` validates every
merchant's files too, in every locale, and prints each problem once.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import os
import re
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import urlsplit

from redis.exceptions import RedisClusterException, RedisError

from notifier.errors import ConfigurationError, NotifierError
from notifier.models import (
    ChannelKind,
    ExceptionCode,
    Notification,
    Recipient,
    Status,
    Transition,
    message_name,
    message_paths,
)
from notifier.overrides import PREFIX, TEMPLATE, OverrideStore
from notifier.policy import Policy, PolicyStore
from notifier.policy.rules import override_label
from notifier.render import Renderer, SmsMessageOut
from notifier.render.audit import template_problems
from notifier.render.brand import Brand, load_brand
from notifier.render.environment import TEMPLATE_NAME, TemplateStore
from notifier.render.i18n import Catalogs, parse_locale
from notifier.render.limits import Limits
from notifier.render.renderer import EXHAUSTED, LINK_PLACEHOLDERS
from notifier.render.sandbox import where
from notifier.render.sms import SmsEncoding
from notifier.resources import (
    TREES,
    close_redis,
    connect,
    data_dir,
    queue_beside,
    refuse_a_mismatched_mode,
    refuse_a_refusing_redis,
    refuse_an_old_redis,
    refuse_another_partition_count,
    sender,
)
from notifier.settings import Settings, is_loopback

if TYPE_CHECKING:  # babel's catalog tools: `notifier check` only, imported there
    from babel.messages.catalog import Catalog

#: SMS budgets: one segment where the text fits GSM-7, two where it needs UCS-2.
SMS_BUDGET = {SmsEncoding.GSM7: 1, SmsEncoding.UCS2: 2}
#: Locales whose readers are likely to have US numbers, so their SMS carry "Reply STOP".
US_LOCALES = {"en", "es"}
#: A realistic shop name for the default brand's budget check ("Your shop" flatters it).
SAMPLE_SHOP = "Northwind Outfitters"
#: A support number as long as most (a French one, written with its spaces).
SAMPLE_PHONE = "+33 1 23 45 67 89"
#: An address for the unsubscribe page's check.
SAMPLE_EMAIL = "ana@example.com"
#: Folders of templates/ that are the defaults' own, not merchants.
DEFAULT_FOLDERS = {"email", "sms", "messages"}
#: The merchant id the defaults are rendered as (no folder of its own is looked at).
DEFAULTS = "check"


def sample_brand(default: Brand) -> Brand:
    """The default brand as the defaults are checked: a realistic shop name, and a support
    phone (the "contact us" SMS give it, within their budget)."""
    support = default.support.model_copy(update={"phone": SAMPLE_PHONE})
    return default.model_copy(update={"name": SAMPLE_SHOP, "support": support})


def samples(minimal: bool = False) -> list[Transition]:
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
        kept = ("event_id", "merchant_id", "shipment_id", "tracking_number", "carrier")
        base = {k: base[k] for k in (*kept, "occurred_at")}
    out = []
    for status in Status:
        if status is Status.EXCEPTION:
            out += [
                Transition.model_validate({**base, "status": status, "exception_code": c})
                for c in ExceptionCode
            ]
        elif status is Status.AVAILABLE_FOR_PICKUP and not minimal:
            pickup = {
                "pickup_deadline": at + timedelta(days=5),
                "pickup_point": {
                    "name": "Kiosk am Markt",
                    "address": "Marktplatz 3, 04109 Leipzig",
                    "hours": "Mon-Sat 8:00-20:00",
                },
            }
            out.append(Transition.model_validate({**base, **pickup, "status": status}))
        else:
            out.append(Transition.model_validate({**base, "status": status}))
    return out


def budget_samples() -> list[Transition]:
    """``samples()`` and the pickup sample again with a deadline in every month and on
    every weekday: its SMS carries the deadline's day, and a name GSM-7 lacks (sáb, août,
    março) would make it UCS-2; and the customs sample with a carrier code that names no
    carrier (its SMS then says "the carrier" and ends with the tracking number). For the
    SMS budget (`check`, `--sms-table`)."""
    out = samples()
    customs = next(t for t in out if t.exception_code is ExceptionCode.CUSTOMS_HOLD)
    out.append(customs.model_copy(update={"carrier": "other"}))
    pickup = next(t for t in out if t.pickup_deadline is not None)
    at = pickup.occurred_at
    for i in range(12):
        first = datetime(at.year + 1, i + 1, 1, 18, 0, tzinfo=at.tzinfo)
        day = first + timedelta(days=(i % 7 - first.weekday()) % 7)
        out.append(pickup.model_copy(update={"pickup_deadline": day}))
    return out


#: how long after its scan a sample notification is decided
SAMPLE_LAG = timedelta(minutes=20)


def collected_forms(t: Transition) -> tuple[bool | None, ...]:
    """The forms of a message about ``t`` (``Notification.collected``): a delivered one as a
    door delivery and as a parcel collected from a pickup point."""
    return (None, True) if t.status is Status.DELIVERED else (None,)


def sample_notification(
    t: Transition,
    channel: ChannelKind,
    *,
    merchant_id: str,
    shipment_id: str,
    notification_id: str,
    locale: str,
    timezone: str,
    phone: str,
    to: str | None = None,
) -> Notification:
    """A notification of ``t`` for the sample recipient Ana (previews, test sends)."""
    return Notification(
        notification_id=notification_id,
        merchant_id=merchant_id,
        shipment_id=shipment_id,
        channel=channel,
        to=to or ("ana@example.com" if channel is ChannelKind.EMAIL else phone),
        transition=t,
        recipient=Recipient(
            name="Ana", email="ana@example.com", phone=phone, locale=locale, timezone=timezone
        ),
        # decided a while after the scan, as real ones are: event.ago reads "20 minutes
        # ago" in a preview, not "in 0 seconds"
        created_at=t.occurred_at + SAMPLE_LAG,
    )


def merchants(settings: Settings) -> list[str]:
    """Merchants with files of their own: a template folder or a policy file."""
    templates_dir = data_dir("templates", settings.templates_dir)
    policies_dir = data_dir("policies", settings.policies_dir)
    found = set()
    if templates_dir.is_dir():
        found |= {p.name for p in templates_dir.iterdir() if p.is_dir()} - DEFAULT_FOLDERS
    if policies_dir.is_dir():
        found |= {p.stem for p in policies_dir.glob("*.yaml")} - {"default"}
    return sorted(found)


def render_limits(settings: Settings) -> Limits:
    """The limits every render of a message runs within (NOTIFIER_RENDER_*)."""
    return Limits(settings.render_time_limit_s, settings.render_max_bytes)


def _renderer(settings: Settings) -> tuple[Renderer, Catalogs]:
    catalogs = Catalogs(data_dir("locales", settings.locales_dir))
    templates = TemplateStore(
        data_dir("templates", settings.templates_dir), catalogs, limits=render_limits(settings)
    )
    return Renderer(templates, catalogs, email_from=sender(settings), strict=True), catalogs


OUTBOX = "outbox"


def unwritable(folder: Path) -> str | None:
    """Why the service could not make ``folder`` or write in it (None: it can), without
    making it: the nearest part of the path that exists must be a folder it may write in."""
    found = folder.absolute()
    while not found.exists():
        if found.parent == found:
            break
        found = found.parent
    if not found.is_dir():
        part = "" if found == folder.absolute() else f" ({found} is a file)"
        return f"{folder}: not a directory{part}"
    if not os.access(found, os.W_OK | os.X_OK):
        return f"{folder}: cannot write in {found} (permission denied)"
    return None


def startup_problems(settings: Settings) -> list[str]:
    """What must hold for the service to start, whatever the merchants' files say: the
    default policy, brand and templates (every milestone, both channels, in English)."""
    missing = [
        f"NOTIFIER_{name.upper()}_DIR: not a directory (or it does not exist)"
        for name in TREES
        if (configured := getattr(settings, f"{name}_dir")) is not None and not configured.is_dir()
    ]
    # folders the service writes, made when missing: one it cannot make or write in fails
    # every write later (the outbox's only when a default channel is the outbox)
    written = {"METRICS_DIR": settings.metrics_dir}
    if OUTBOX in (settings.email_channel.value, settings.sms_channel.value):
        written["OUTBOX_DIR"] = settings.outbox_dir
    for name, folder in written.items():
        why = None if folder is None else unwritable(folder)
        if why:
            missing.append(f"NOTIFIER_{name}: {why}")
    if missing:
        return missing
    policies = PolicyStore(data_dir("policies", settings.policies_dir))
    problems = []
    try:
        policies.for_merchant("")
    except ConfigurationError as exc:  # the templates are still worth checking
        problems.append(str(exc))
    templates_dir = data_dir("templates", settings.templates_dir)
    if not templates_dir.is_dir():
        return [*problems, f"{templates_dir}: templates directory missing"]
    renderer, _ = _renderer(settings)
    try:
        brand = renderer.brand("")
    except ConfigurationError as exc:
        return [*problems, str(exc)]
    problems += _channel_problems(settings, brand, "templates/brand.yaml")
    renderer.use_brand(DEFAULTS, sample_brand(brand))
    return problems + _render_problems(renderer, "", ["en"], full=False)


def check_all(settings: Settings) -> list[str]:
    """Every problem with settings, policies, brands and templates of every merchant, in
    every locale; each problem once."""
    refused = []
    if not settings.embedded and not settings.api_keys:  # what `serve` refuses
        refused.append("NOTIFIER_API_KEYS is required when NOTIFIER_REDIS_URL is set")
    return refused + _files_problems(settings)


def _files_problems(settings: Settings) -> list[str]:
    problems = startup_problems(settings)
    if problems:
        return problems
    policies_dir = data_dir("policies", settings.policies_dir)
    problems += [p for p in PolicyStore(policies_dir).check_all() if "default.yaml" not in p]
    renderer, catalogs = _renderer(settings)
    default = renderer.brand("")
    renderer.use_brand(DEFAULTS, sample_brand(default))
    locales = ["en", *catalogs.available()]
    templates_dir = data_dir("templates", settings.templates_dir)
    problems += _audit(renderer, "", templates_dir)
    problems += _render_problems(renderer, "", locales, full=True)
    problems += _help_problems(renderer, locales)
    policies = PolicyStore(policies_dir)
    default_policy = policies.strict("")
    problems += experiment_problems(
        renderer, DEFAULTS, default_policy, locales, "policies/default.yaml"
    )
    for merchant in merchants(settings):
        try:
            policy = policies.strict(merchant)
        except ConfigurationError:
            policy = None  # said above (check_all of the policies)
        if policy is not None:
            where = f"policies/{merchant}.yaml"
            problems += experiment_problems(renderer, merchant, policy, locales, where)
        if not (templates_dir / merchant).is_dir():
            continue
        problems += _audit(renderer, merchant, templates_dir / merchant)
        own = sorted(
            f"messages/{f.name}" for f in (templates_dir / merchant).glob("messages/*.jinja")
        )
        problems += message_file_problems(own, locales, f"templates/{merchant}/")
        where = f"templates/{merchant}/brand.yaml"
        loaded = True
        try:
            brand = load_brand(templates_dir, merchant)
        except ConfigurationError as exc:
            problems.append(str(exc))
            brand, loaded = default, False  # its templates are still worth checking
        problems += _channel_problems(settings, brand, where)
        if loaded and (templates_dir / merchant / "brand.yaml").is_file():
            problems += [p for p in [support_problem(brand, where)] if p]
            problems += link_problems(brand, where)
        renderer.use_brand(merchant, brand)
        problems += _render_problems(renderer, merchant, locales, full=True)
    return problems


def _help_problems(renderer: Renderer, locales: list[str]) -> list[str]:
    """``sms/help.txt`` (the answer to a texted HELP) rendered in every locale: one that
    fails is answered in English, with an error in the log; and the page of an email's
    unsubscribe link (``email/unsubscribe.html``), which would fail."""
    problems = []
    for locale in locales:
        try:
            renderer.help_reply(DEFAULTS, locale, SAMPLE_PHONE)
        except Exception as exc:
            problems.append(
                f"templates/{where(exc) or 'sms/help.txt'} ({locale}): {type(exc).__name__}: "
                f"{exc} (a HELP would be answered in English)"
            )
            break  # (the same in every locale, most likely)
    for locale in locales:
        try:
            for state in ("ask", "done", "invalid", "unavailable"):
                renderer.unsubscribe_page(DEFAULTS, [locale], state, SAMPLE_EMAIL)
        except Exception as exc:
            problems.append(
                f"templates/{where(exc) or 'email/unsubscribe.html'} ({locale}): "
                f"{type(exc).__name__}: {exc} (an unsubscribe link's page would fail)"
            )
            break
    return problems


def untranslated(settings: Settings) -> tuple[list[str], list[str]]:
    """(errors, warnings): a merchant's own strings with no translation in a language it
    serves, so its readers would get a mixed-language message (the string in the fallback
    language amid translated ones). Errors for the languages its brand lists in
    ``locales``, warnings for the other catalogs when it lists none."""
    templates_dir = data_dir("templates", settings.templates_dir)
    catalogs = Catalogs(data_dir("locales", settings.locales_dir))
    shared = {lang: _read_catalog(catalogs.directory, lang) for lang in catalogs.available()}
    errors: list[str] = []
    warnings: list[str] = []
    for merchant in merchants(settings):
        folder = templates_dir / merchant
        if not folder.is_dir():
            continue
        try:
            brand = load_brand(templates_dir, merchant)
        except ConfigurationError:
            continue  # reported as an error already
        where = f"templates/{merchant}"
        found = _untranslated(catalogs, shared, brand, folder, _msgids(folder), where, merchant)
        errors += found[0]
        (errors if brand.locales else warnings).extend(found[1])
    return errors, warnings


def _untranslated(
    catalogs: Catalogs,
    shared: dict[str, Catalog | None],
    brand: Brand,
    folder: Path,
    msgids: list[str],
    where: str,
    merchant: str,
) -> tuple[list[str], list[str]]:
    """(listed locales without a catalog, strings without a translation) of one merchant's
    ``msgids``: its own catalogs (``folder``/locales) or the shared ones translate them."""
    # a listed locale reads the catalog it resolves to (fr_FR -> fr, pt -> pt_BR)
    served: list[str] = []
    no_catalog = []
    for wanted in brand.locales or shared:
        lang = catalogs.resolve(wanted, "en")
        if lang == "en" and not wanted.lower().startswith("en"):
            no_catalog.append(
                f"templates/{merchant}/brand.yaml: locales: {wanted} has no catalog: "
                "its readers get every message in English"
            )
        if lang != "en" and lang not in served:
            served.append(lang)
    fallback = catalogs.resolve(brand.default_locale, "en")
    own = {lang: _read_catalog(folder / "locales", lang) for lang in served}
    lines = []
    for msgid in msgids:
        missing = [
            lang
            for lang in served
            if not any(_translated(c, msgid) for c in (own[lang], shared.get(lang)))
        ]
        if missing:
            lines.append(
                f"{where}: {msgid!r} has no translation in {', '.join(missing)}: "
                f"those readers get it in {fallback} amid their own language "
                f"(scripts/translations --merchant {merchant}, then translate)"
            )
    return no_catalog, lines


def draft_untranslated(
    settings: Settings, merchant: str, brand: Brand, files: dict[str, str]
) -> list[str]:
    """The strings of a merchant's override templates (``files``) with no translation in
    a language its brand lists in ``locales``, one line each (errors, as ``notifier check``
    calls them; none when it lists no locales). Only its folder's catalogs or the shared
    ones can translate them: an override holds no catalog."""
    if not brand.locales:
        return []
    from babel.messages.extract import extract

    catalogs = Catalogs(data_dir("locales", settings.locales_dir))
    shared = {lang: _read_catalog(catalogs.directory, lang) for lang in catalogs.available()}
    folder = data_dir("templates", settings.templates_dir) / merchant
    problems = []
    for path, text in sorted(files.items()):
        if not TEMPLATE.fullmatch(path):
            continue
        try:
            found = extract("jinja2", io.BytesIO(text.encode()), options=_EXTRACTING)
            msgids = _distinct(message for _, message, _, _ in found)
        except Exception:  # a template that does not parse: its own problem says why
            continue
        where = f"{path} of {merchant}'s draft"
        problems += _untranslated(catalogs, shared, brand, folder, msgids, where, merchant)[1]
    return problems


def _read_catalog(folder: Path, lang: str) -> Catalog | None:
    path = folder / lang / "LC_MESSAGES" / "messages.po"
    if not path.is_file():
        return None
    from babel.messages.pofile import read_po

    try:
        with path.open("rb") as f:
            return read_po(f, locale=lang)
    except Exception:  # babel raises several types; the render check names the file
        return None


def _translated(catalog: Catalog | None, msgid: str) -> bool:
    message = catalog.get(msgid) if catalog is not None else None
    if message is None or message.fuzzy:
        return False
    strings = message.string if isinstance(message.string, tuple) else (message.string,)
    return all(strings)


def _msgids(folder: Path) -> list[str]:
    """The translatable strings of a merchant's own templates (as pybabel extracts them)."""
    from babel.messages.extract import extract_from_dir

    method = f"{__name__}:{_extract_utf8.__name__}"  # (babel imports it by name)
    method_map = [(f"**.{ext}", method) for ext in ("jinja", "html", "txt")]
    options_map = {pattern: _EXTRACTING for pattern, _ in method_map}
    found = extract_from_dir(str(folder), method_map, options_map)
    return _distinct(message for _, _, message, _, _ in found)


def _extract_utf8(
    fileobj: BinaryIO, keywords: Any, comment_tags: Any, options: dict[str, Any]
) -> Iterator[Any]:
    """pybabel's Jinja extraction, of a file that is UTF-8 text: one that is not has no
    strings to find (its render fails, naming it, which the check reports)."""
    from jinja2.ext import babel_extract

    data = fileobj.read()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return iter(())
    return iter(babel_extract(io.BytesIO(data), keywords, comment_tags, options))


#: How pybabel reads the templates' strings (babel.cfg says the same).
_EXTRACTING = {"extensions": "jinja2.ext.i18n", "trimmed": "true"}


def _distinct(messages: Iterable[str | tuple[str, ...]]) -> list[str]:
    """The msgids of extracted messages (a plural's singular), each once, in order."""
    found = (message[0] if isinstance(message, tuple) else message for message in messages)
    return list(dict.fromkeys(msgid for msgid in found if msgid))


def check_warnings(settings: Settings) -> list[str]:
    """What is valid but probably not meant: brands without a support contact."""
    templates_dir = data_dir("templates", settings.templates_dir)
    warnings = []
    loopback_public_url = is_loopback(urlsplit(settings.public_url).hostname or "")
    if loopback_public_url and not settings.embedded and settings.sms_channel.value == "twilio":
        warnings.append(
            f"NOTIFIER_PUBLIC_URL is {settings.public_url}: Twilio's status callbacks (which "
            "report undelivered SMS) go to this machine's loopback, where Twilio cannot reach"
        )
    for merchant in ["", *merchants(settings)]:
        try:
            brand = load_brand(templates_dir, merchant)
        except ConfigurationError:
            continue  # reported as an error already
        where = f"templates/{merchant}/brand.yaml" if merchant else "templates/brand.yaml"
        if brand.one_click_unsubscribe and not settings.signing_secret and settings.embedded:
            warnings.append(
                f"{where}: one_click_unsubscribe without NOTIFIER_SIGNING_SECRET: "
                "links are signed with a per-process secret and break on restart"
            )
        if not merchant and not brand.support.reachable():
            warnings.append(NO_SUPPORT_DEFAULT)
        if brand.one_click_unsubscribe and not settings.embedded and loopback_public_url:
            warnings.append(
                f"{where}: one_click_unsubscribe with NOTIFIER_PUBLIC_URL "
                f"{settings.public_url}: customers' unsubscribe links point at this machine"
            )
    return warnings


def default_brand_warning(settings: Settings) -> str | None:
    """``NO_SUPPORT_DEFAULT`` when the default brand gives customers no way to reach
    support (said by ``serve`` and ``worker`` at start-up too, not only by ``check``)."""
    try:
        brand = load_brand(data_dir("templates", settings.templates_dir), "")
    except ConfigurationError:
        return None  # (an error of its own: start-up refuses it)
    return None if brand.support.reachable() else NO_SUPPORT_DEFAULT


#: Loud on purpose: every merchant without a brand of its own sends these messages.
NO_SUPPORT_DEFAULT = (
    "templates/brand.yaml: NO SUPPORT CONTACT IN THE DEFAULT BRAND. Exception and return "
    "messages tell customers to contact you, and every merchant without a brand.yaml of its "
    "own sends them with no way to do it: set support.url, support.email or support.phone"
)


_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


def link_problems(brand: Brand, where: str) -> list[str]:
    """A merchant link naming a placeholder that is never filled in ({tracking_numbr}): it
    would reach every customer as it is, a dead link."""
    problems = []
    known = " and ".join(f"{{{n}}}" for n in LINK_PLACEHOLDERS)
    for name, url in brand.links.model_dump().items():
        if name == "short_base" or not url:
            continue
        named = _PLACEHOLDER.findall(url)
        for placeholder in named:
            if placeholder not in LINK_PLACEHOLDERS:
                problems.append(
                    f"{where}: links.{name}: {{{placeholder}}} is never filled in "
                    f"(only {known} are): customers would get the link as it is"
                )
        # what filling leaves of a brace: an unclosed {tracking_number, a {{doubled}} one,
        # a stray }, or one written %7B…%7D (found by a black-box run: each went out)
        left = _PLACEHOLDER.sub("", url)
        if not any(p not in LINK_PLACEHOLDERS for p in named) and (
            "{" in left or "}" in left or _ENCODED_BRACE.search(url)
        ):
            problems.append(
                f"{where}: links.{name}: a brace that is no placeholder: write "
                f"{known} exactly as that, one brace each side: customers would get the "
                "rest as it is"
            )
    base = brand.links.short_base
    if base and not base.endswith(("/", "=", "-", "_", ".")):
        problems.append(
            f"{where}: links.short_base: the tracking number is appended as it is "
            f"({base}1Z999AA10123456784): end it with / (or =, as in ?n=)"
        )
    if brand.logo_dark_url and not brand.logo_url:
        problems.append(
            f"{where}: logo_dark_url: shown only beside logo_url (mail apps in dark mode "
            "swap one for the other): set logo_url too, or the emails have no logo"
        )
    for name in ("logo_url", "logo_dark_url"):
        url = getattr(brand, name)
        if url and urlsplit(url).path.lower().endswith((".svg", ".svgz")):
            problems.append(
                f"{where}: {name}: an SVG image, which Gmail and Outlook do not show: use a "
                "PNG (or JPEG, GIF)"
            )
    return problems


_ENCODED_BRACE = re.compile(r"%7[bd]", re.IGNORECASE)


def support_problem(brand: Brand, where: str) -> str | None:
    """An error for a merchant brand whose customers cannot reach support: its exception
    and return messages say "contact us"."""
    if brand.support.reachable():
        return None
    return (
        f"{where}: support: exception and return messages tell customers to contact you: "
        "give support.url, support.email or support.phone"
    )


def _audit(renderer: Renderer, merchant: str, folder: Path) -> list[str]:
    """What the templates in ``folder`` (the defaults', or a merchant's) reach for that no
    template may, found in their source: a branch no sample reaches included."""
    where = f"templates/{merchant}" if merchant else "templates"
    env = renderer.templates.environment(merchant or DEFAULTS)
    problems = []
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if not (path.is_file() and TEMPLATE_NAME.fullmatch(name)):
            continue
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue  # rendering names the file it cannot read
        problems += [f"{where}: {p}" for p in template_problems(env, name, source)]
    return problems


def _channel_problems(settings: Settings, brand: Brand, where: str) -> list[str]:
    """A merchant's chosen channel must be one the service has credentials for. (Signed
    unsubscribe links need no setting: without NOTIFIER_SIGNING_SECRET every process of a
    Redis deployment signs with a key derived from the one kept in Redis.)"""
    problems: list[str] = []
    available = {"outbox"}
    if settings.sendgrid_api_key:
        available.add("sendgrid")
    if settings.twilio_account_sid and settings.twilio_auth_token:
        available.add("twilio")
    chosen = brand.channels
    return problems + [
        f"{where}: channels.{kind}: {name} is not configured (set its NOTIFIER_{name.upper()}_* "
        "credentials)"
        for kind, name in (("email", chosen.email), ("sms", chosen.sms))
        if name and name not in available
    ]


def _cases(locale: str, full: bool) -> Iterable[tuple[Transition, Recipient, str]]:
    """Sample transitions, recipients and phone numbers to render in ``locale``."""
    rich = Recipient(
        name="Ana",
        email="ana@example.com",
        phone="+33612345678",
        timezone="Europe/Paris",
        locale=locale,
    )
    if not full:
        yield from ((t, rich, "+33612345678") for t in samples())
        return
    yield from ((t, rich, "+33612345678") for t in budget_samples())
    bare = Recipient(email="ana@example.com", phone="+33612345678", locale=locale)
    yield from ((t, bare, "+33612345678") for t in samples(minimal=True))
    if locale in US_LOCALES:
        yield from ((t, rich, "+12125550100") for t in budget_samples())


class _LimitCrossed(Exception):
    """A sample render crossed a render limit: the merchant's other samples are not
    rendered (each could cost the whole time limit)."""


def experiment_problems(
    renderer: Renderer, merchant: str, policy: Policy, locales: list[str], where: str
) -> list[str]:
    """An A/B test of the policy whose message has no variant b for any reader: its
    shipments drawn for b would all read a."""
    out = []
    for test in policy.experiments:
        paths = [message_paths(test.message, locale, "b") for locale in locales]
        names = (*(one for one, _ in paths), paths[0][1])
        if test.b_percent and not renderer.templates.exists(merchant, names):
            out.append(
                f"{where}: experiments: {test.name}: no {paths[0][1]} (nor one for a "
                "locale), so every shipment would read variant a"
            )
    return out


def _variants(renderer: Renderer, merchant: str, t: Transition, locale: str) -> tuple[str, ...]:
    """The variants of a message to render: b too when the merchant (or the defaults) has
    one."""
    names = message_paths(message_name(t), locale, "b")
    return ("", "b") if renderer.templates.exists(merchant or DEFAULTS, names) else ("",)


def _render_problems(
    renderer: Renderer, merchant: str, locales: list[str], *, full: bool
) -> list[str]:
    """Render every milestone on both channels in ``locales`` (and its variant b, when the
    merchant wrote one); one line per distinct problem, naming where else it happened (a
    broken shared file fails every render). The first render past a limit ends the
    merchant's renders."""
    where = f"templates/{merchant}" if merchant else "templates"
    seen: dict[str, list[str]] = {}
    every = (
        (locale, t, recipient, phone, channel, variant)
        for locale in locales
        for t, recipient, phone in _cases(locale, full)
        for channel in ChannelKind
        for variant in _variants(renderer, merchant, t, recipient.locale or locale)
    )
    for locale, t, recipient, phone, channel, variant in every:
        case = f"{t.milestone}{' variant b' if variant else ''}, {channel}, {locale}"
        try:
            found = _render_one(renderer, merchant, t, recipient, phone, channel, variant)
        except _LimitCrossed as crossed:
            seen.setdefault(f"{where}: {crossed}", []).append(case)
            break
        for problem in found:
            joined = f"{where}/{problem}" if problem.startswith("sms (") else f"{where}: {problem}"
            seen.setdefault(joined, []).append(case)
    out = []
    for problem, cases in seen.items():
        cases = list(dict.fromkeys(cases))
        more = f" and {len(cases) - 1} more" if len(cases) > 1 else ""
        out.append(f"{problem} (in {cases[0]}{more})")
    return out


def _render_one(
    renderer: Renderer,
    merchant: str,
    t: Transition,
    recipient: Recipient,
    phone: str,
    channel: ChannelKind,
    variant: str = "",
) -> list[str]:
    problems: list[str] = []
    # an SMS as it goes with an email about its event, and alone (``email_too`` false); a
    # delivered one as a door delivery and as a parcel collected from a pickup point
    cases = itertools.product(
        (None, True) if channel is ChannelKind.SMS else (None,), collected_forms(t)
    )
    for alone, collected in cases:
        n = Notification(
            notification_id="n_check",
            merchant_id=merchant or DEFAULTS,
            shipment_id="check",
            channel=channel,
            to="ana@example.com" if channel is ChannelKind.EMAIL else phone,
            transition=t,
            recipient=recipient,
            created_at=t.occurred_at,
            experiment="check" if variant else None,
            variant="b" if variant else None,
            alone=alone,
            collected=collected,
        )
        try:
            message = renderer.render(n)
        except NotifierError as exc:
            if isinstance(exc.__cause__, EXHAUSTED):
                raise _LimitCrossed(f"{exc} (its other messages were not rendered)") from exc
            how = (" (an SMS without an email)" if alone else "") + (
                " (collected from a pickup point)" if collected else ""
            )
            return [*problems, f"{exc}{how}"]
        if not isinstance(message, SmsMessageOut):
            continue  # (an email has no budget: it rendered)
        # US numbers carry the legally required opt-out line: one more segment for it; and
        # one for the support phone a "contact us" SMS gives (a number to call is worth it)
        us = phone.startswith("+1")
        brand = renderer.brand(n.merchant_id)
        support = brand.support.phone
        call = bool(support) and str(support) in message.body
        budget = SMS_BUDGET[message.encoding] + us + call
        if message.segments <= budget or not _reads(brand.locales, recipient.locale):
            continue
        lines = [*(["the US opt-out line"] if us else []), *(["the support phone"] if call else [])]
        extra = f" incl. 1 for {' and 1 for '.join(lines)}" if lines else ""
        # the shop's name is in every SMS: a long one is what a merchant can change
        named = len(brand.name) >= _LONG_NAME and brand.name in message.body
        hint = f"; the shop name takes {len(brand.name)} characters of it" if named else ""
        problems.append(
            f"sms ({t.milestone}, {recipient.locale}{', +1' if us else ''}"
            f"{', without an email' if alone else ''}{', collected' if collected else ''}): "
            f"{message.segments} segments in "
            f"{message.encoding} (budget {budget}{extra}{hint}): {_quoted(message.body)}"
        )
    return problems


#: Direction marks and isolates: they shape right-to-left text and show as nothing.
_BIDI = re.compile("[\u200e\u200f\u061c\u202a-\u202e\u2066-\u2069]")


def _quoted(text: str) -> str:
    """An SMS as a problem quotes it for a person: in quotes, its lines joined with " / ",
    without the invisible direction marks (shown as escapes like ``\u200f``, they read as
    part of the words)."""
    return "“" + " / ".join(_BIDI.sub("", text).splitlines()) + "”"


#: A shop name this long is worth naming when an SMS is over its budget.
_LONG_NAME = 16


def _reads(locales: list[str] | None, locale: str | None) -> bool:
    """Whether a merchant's customers read ``locale``: any, unless its brand lists its
    languages (``locales``); a regional form reads as its language (``fr_CA`` as ``fr``)."""
    if locales is None or locale is None:
        return True
    return _language(locale) in {_language(x) for x in locales}


def _language(locale: str) -> str:
    """A locale's language as Babel reads it (``pt-BR``, ``iw``: ``pt``, ``he``)."""
    parsed = parse_locale(locale)
    return parsed.language if parsed is not None else locale


def candidate_renderer(
    settings: Settings, merchant: str, files: dict[str, str], draft: bool = True
) -> tuple[Renderer, Catalogs]:
    """A strict renderer that sees ``files`` as the merchant's published override (over its
    folder, over the defaults): what a publish would make real sends look like. Raises
    ConfigurationError for a broken brand, naming it as the merchant's draft (``draft``) or
    its published file."""
    templates_dir = data_dir("templates", settings.templates_dir)
    label = override_label("brand.yaml", merchant, draft)
    brand = load_brand(templates_dir, merchant, files.get("brand.yaml"), label)
    catalogs = Catalogs(data_dir("locales", settings.locales_dir))
    templates = {p: t for p, t in files.items() if TEMPLATE.fullmatch(p)}
    store = TemplateStore(
        templates_dir, catalogs, lambda _: templates, limits=render_limits(settings)
    )
    renderer = Renderer(store, catalogs, email_from=sender(settings), strict=True)
    renderer.use_brand(merchant, brand)
    return renderer, catalogs


def override_problems(
    settings: Settings, merchant: str, files: dict[str, str], draft: bool = True
) -> list[str]:
    """Every problem with a merchant's override files as they would be published (a draft),
    or as they are (``draft=False``): its brand, its policy, and every template rendered
    for every milestone, channel and locale, with the files beneath (its folder, the
    defaults). Slow (about a second): run in a thread."""
    problems: list[str] = []
    try:
        renderer, catalogs = candidate_renderer(settings, merchant, files, draft)
    except ConfigurationError as exc:
        # a broken brand must not hide the other files' problems: they are checked over
        # the brand without the broken file
        problems.append(str(exc))
        files = {path: text for path, text in files.items() if path != "brand.yaml"}
        try:
            renderer, catalogs = candidate_renderer(settings, merchant, files, draft)
        except ConfigurationError as beneath:  # the merchant's own brand.yaml, in its folder
            return [*problems, str(beneath)]
    brand = renderer.brand(merchant)
    problems += _channel_problems(settings, brand, override_label("brand.yaml", merchant, draft))
    problems += draft_untranslated(settings, merchant, brand, files)
    own = data_dir("templates", settings.templates_dir) / merchant / "brand.yaml"
    if "brand.yaml" in files or own.is_file():
        problems += [p for p in [support_problem(brand, "brand.yaml")] if p]
        problems += link_problems(brand, override_label("brand.yaml", merchant, draft))
    policies = PolicyStore(data_dir("policies", settings.policies_dir), lambda _: files, draft)
    locales = ["en", *catalogs.available()]
    try:
        policy = policies.strict(merchant)
        problems += experiment_problems(renderer, merchant, policy, locales, "policy.yaml")
    except ConfigurationError as exc:
        problems.append(str(exc))
    env = renderer.templates.environment(merchant)
    for path, text in files.items():
        if TEMPLATE.fullmatch(path):
            problems += template_problems(env, path, text)
    problems += message_file_problems(files, locales)
    return problems + _render_problems(renderer, merchant, locales, full=True)


def unusable_files(settings: Settings, merchant: str, files: dict[str, str]) -> list[str]:
    """What would keep a worker from using a merchant's own files as they are (its brand,
    then every message rendered in every locale): none when they are fixed, or gone.
    Narrower than ``override_problems`` (no translation or link advice). About a second."""
    try:
        renderer, catalogs = candidate_renderer(settings, merchant, files, draft=False)
    except ConfigurationError as exc:
        return [str(exc)]
    return _render_problems(renderer, merchant, ["en", *catalogs.available()], full=True)


def message_file_problems(paths: Iterable[str], locales: list[str], where: str = "") -> list[str]:
    """Message files no reader would ever get: named for no milestone (a typo:
    ``messages/delivred.jinja``), or for a locale without a catalog (``.fr_CA.``);
    ``where``: what the paths are in (``templates/acme/``)."""
    names = {message_name(t) for t in samples()}
    problems = []
    for path in paths:
        if not path.startswith("messages/"):
            continue
        name, *middle, _ = path.removeprefix("messages/").split(".")
        if name not in names:
            problems.append(f"{where}{path}: no milestone uses messages/{name}.jinja")
        locale = next((part for part in middle if part != "b"), None)
        if locale is not None and locale not in locales:
            problems.append(
                f"{where}{path}: no catalog for locale {locale}, so no reader would get it "
                f"(one of: {', '.join(locales)})"
            )
    return problems


async def published_problems(settings: Settings) -> list[str]:
    """Problems of every merchant's published override in Redis (a publish was checked, but
    the files beneath or the defaults may have changed since). Nothing in embedded mode:
    a fresh process has no published override."""
    if settings.embedded:
        return []
    redis = connect(settings)
    queue = queue_beside(settings, redis)
    try:
        try:  # what `serve` and `worker` refuse at start-up (a cluster named as one Redis...)
            await refuse_a_mismatched_mode(settings, redis, queue)
            await refuse_a_refusing_redis(settings, redis, queue)
            await refuse_an_old_redis(settings, redis)
            await refuse_another_partition_count(settings, redis, record=False)
        except ConfigurationError as exc:
            return [str(exc)]
        store = OverrideStore(redis)
        problems = []
        async for key in redis.scan_iter(match=f"{PREFIX}:{{*}}:live", count=1000):
            merchant = key.decode().split("{", 1)[1].rsplit("}", 1)[0]
            live = await store.live(merchant)
            if live is None:
                continue
            where = f"published override of {merchant} (version {live.number})"
            found = await asyncio.to_thread(
                override_problems, settings, merchant, live.files, False
            )
            problems += [f"{where}: {p}" for p in found]
        return problems
    except (RedisError, RedisClusterException, OSError) as exc:
        return [f"cannot read the published overrides from Redis: {type(exc).__name__}: {exc}"]
    finally:
        if queue is not redis:
            await queue.aclose(close_connection_pool=True)
        await close_redis(redis)


def sms_table(settings: Settings, merchant: str = "") -> list[tuple[str, str, int, int, int]]:
    """Per locale: (locale, encodings seen, most segments to a +33 number, to a +1 number,
    to a +1 number with a short-link base): the worst SMS over every milestone, with the
    sample's carrier tracking URL (55 characters) or ``links.short_base``; each as it goes
    with an email (an SMS alone may give the support phone: ``_render_one``)."""
    renderer, catalogs = _renderer(settings)
    brand = renderer.brand(merchant)
    if not merchant:  # the check's sample shop, not the default brand's short name
        brand = sample_brand(brand)
    short = brand.model_copy(
        update={"links": brand.links.model_copy(update={"short_base": "https://sho.rt/"})}
    )
    rows = []
    for locale in ["en", *catalogs.available()]:
        worst = {"fr": 0, "us": 0, "short": 0}
        encodings = set()
        for label, phone, use in (
            ("fr", "+33612345678", brand),
            ("us", "+12125550100", brand),
            ("short", "+12125550100", short),
        ):
            renderer.use_brand(merchant or DEFAULTS, use)
            for t in budget_samples():
                n = sample_notification(
                    t,
                    ChannelKind.SMS,
                    merchant_id=merchant or DEFAULTS,
                    shipment_id="check",
                    notification_id="n_check",
                    locale=locale,
                    timezone="Europe/Paris",
                    phone=phone,
                )
                for collected in collected_forms(t):
                    message = renderer.render(n.model_copy(update={"collected": collected}))
                    assert isinstance(message, SmsMessageOut)
                    encodings.add(str(message.encoding))
                    worst[label] = max(worst[label], message.segments)
        rows.append((locale, "/".join(sorted(encodings)), worst["fr"], worst["us"], worst["short"]))
    renderer.use_brand(merchant or DEFAULTS, brand)
    return rows
