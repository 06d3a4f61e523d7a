"""Renderer: a notification (values) → a ready-to-send email or SMS (values).

Templates (templates/, merchant files first): ``messages/<milestone>.jinja`` holds the
words of one status or exception (subject, preheader, headline, what happened, what
comes next, what the customer can do, what we are doing, the SMS); the channel
layouts ``email/layout.html``, ``email/layout.txt`` and ``sms/layout.txt`` arrange them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from email.utils import formataddr
from typing import Any
from urllib.parse import quote

import css_inline
from jinja2 import TemplateError, TemplateRuntimeError, TemplateSyntaxError
from markupsafe import Markup

from notifier.errors import ConfigurationError, RenderError
from notifier.insights import counts
from notifier.models import (
    STATUS_RANK,
    ChannelKind,
    Notification,
    Status,
    Transition,
    message_name,
    message_paths,
    one_line,
)
from notifier.render import i18n, skeleton
from notifier.render.brand import Brand, load_brand
from notifier.render.environment import TemplateStore
from notifier.render.limits import LimitExceeded, budget
from notifier.render.sandbox import render_text, where
from notifier.render.skeleton import Skeleton, Skeletons
from notifier.render.sms import SmsEncoding, measure, smart_encode
from notifier.render.watch import TreeWatch

log = logging.getLogger(__name__)

_SPACES = re.compile(r"[ \t]+")
_BLANK_LINES = re.compile(r"\n{3,}")
_INLINER = css_inline.CSSInliner(keep_style_tags=False, load_remote_stylesheets=False)

#: The step indicator: which of its five steps a status stands on (delivered is the last).
_STEP_OF: dict[Status, int] = {s: min(rank, 4) for s, rank in STATUS_RANK.items()}
#: How far along "out for delivery" is (``news_rank``).
_OUT_RANK = STATUS_RANK[Status.OUT_FOR_DELIVERY]
#: Exceptions that happen at the door stand on the delivery step, the others on the way.
_AT_THE_DOOR = {"address_issue", "recipient_unavailable", "refused"}
#: Problems after which the parcel goes back to the sender: its journey ends there.
_GOING_BACK = {"refused"}
#: Well-known carrier codes as customers know them; anything else is shown as received.
CARRIER_NAMES = {
    "ups": "UPS",
    "usps": "USPS",
    "fedex": "FedEx",
    "dhl": "DHL",
    "dpd": "DPD",
    "gls": "GLS",
    "tnt": "TNT",
    "hermes": "Hermes",
    "evri": "Evri",
    "postnl": "PostNL",
    "bpost": "bpost",
    "colissimo": "Colissimo",
    "chronopost": "Chronopost",
    "royalmail": "Royal Mail",
    "royal_mail": "Royal Mail",
    "canadapost": "Canada Post",
    "canada_post": "Canada Post",
    "auspost": "Australia Post",
    "amazon": "Amazon",
    "ontrac": "OnTrac",
    "yamato": "Yamato",
    "sf": "SF Express",
    "inpost": "InPost",
    "correos": "Correos",
    "poste": "Poste Italiane",
    "poste_italiane": "Poste Italiane",
    "dhl_express": "DHL Express",
    "dhl_ecommerce": "DHL eCommerce",
    "deutsche_post": "Deutsche Post",
    "la_poste": "La Poste",
    "laposte": "La Poste",
    "mondial_relay": "Mondial Relay",
    "colis_prive": "Colis Privé",
    "parcelforce": "Parcelforce",
    "yodel": "Yodel",
    "postnord": "PostNord",
    "bring": "Bring",
    "posti": "Posti",
    "seur": "SEUR",
    "brt": "BRT",
    "purolator": "Purolator",
    "australia_post": "Australia Post",
    "nz_post": "NZ Post",
    "japan_post": "Japan Post",
    "sagawa": "Sagawa",
    "china_post": "China Post",
    "sf_express": "SF Express",
    "israel_post": "Israel Post",
    "aramex": "Aramex",
    "emirates_post": "Emirates Post",
    "smsa": "SMSA Express",
    "saudi_post": "Saudi Post",
}
#: Countries whose English names take "the" ("scanned in the Netherlands"): plural names,
#: and those of a union, a kingdom or a republic (CLDR's names leave the article out).
_WITH_THE = frozenset(
    {"US", "GB", "NL", "AE", "PH", "DO", "CF", "BS", "GM", "KM", "MV", "SC", "KY", "MH"}
    | {"SB", "FK", "FO", "VG", "VI", "TC", "CK", "MP"}
)


#: Words of a place name written in lower case after its first word ("Frankfurt am Main",
#: "Aix-en-Provence", "Coeur d'Alene"), and abbreviations written as words ("St. Louis").
_PARTICLES = frozenset(
    {
        *("am", "an", "and", "au", "aux", "d", "da", "das", "de", "del", "della", "der"),
        *("des", "di", "do", "dos", "du", "el", "en", "et", "im", "la", "le", "les", "of"),
        *("on", "sous", "sur", "upon", "y"),
    }
)
_ABBREVIATIONS = {"ST": "St", "STE": "Ste", "FT": "Ft", "MT": "Mt"}


@functools.lru_cache(maxsize=1024)
def _city(name: str | None) -> str | None:
    """A city as people write it: carriers send many in capitals ("WEST CHESTER-MALVERN"),
    which reads as shouting and which screen readers may spell out letter by letter. A name
    in capitals alone with a word of four letters or more is written word by word in title
    case: particles after the first word in lower case, "Mc" and Dutch "IJ" kept, a
    Turkish "İ" as "i", short words without a vowel ("NYC") and words with digits as
    sent. One with any lowercase letter ("McAllen", "Köln"), or in Greek (whose lower
    case would need its accents back), stays as sent. (Cached: a carrier's cities repeat,
    and every message names one.)"""
    if not name or any(c.islower() for c in name) or re.search("[\u0370-\u03ff]", name):
        return name
    parts = re.split(r"([\s\-'.\u2019]+)", name)
    if not any(len(w) >= 4 and w.isalpha() for w in parts):
        return name
    out: list[str] = []
    for i, word in enumerate(parts):
        if i % 2 or not word.isalpha():  # a separator, or a word with digits ("3RD")
            out.append(word)
            continue
        low = word.replace("İ", "i").lower()  # (str.lower would add a combining dot)
        if word in _ABBREVIATIONS:
            out.append(_ABBREVIATIONS[word])
        elif i and (low in _PARTICLES or (low == "s" and parts[i - 1].endswith("'"))):
            out.append(low)  # "am", "d'", Dutch "'s-Hertogenbosch"
        elif len(word) <= 3 and not re.search("[aeiouyàâäéèêëïîôöùûüåæøœ]", low):
            out.append(word)  # an abbreviation ("NYC", "CDG"): "New", "San", "Bad" are words
        elif low.startswith("mc") and len(low) > 3:
            out.append("Mc" + low[2].upper() + low[3:])
        elif low.startswith("ij"):
            out.append("IJ" + low[2:])
        else:
            out.append(low[0].upper() + low[1:])
    return "".join(out)


#: How a city and a country are joined where ", " is wrong.
_PLACE_JOIN = {"ar": "\u060c ", "ja": "\u3001", "zh": "\uff0c"}
#: A sentence's period right after a time whose day period ends in one (es_MX and es_US
#: write "1:00 p.m."): one period ends both, as in print (it read "1:00 p.m..").
_DOUBLED_PERIOD = re.compile("([ap]\\.[ \u00a0\u202f]?m\\.)\\.(?!\\.)")


@functools.lru_cache(maxsize=256)
def _sender(name: str, address: str) -> str:
    """The From of a brand's emails (the stdlib's formataddr is pure Python, per message)."""
    return formataddr((name, address))


def _one_period(text: str) -> str:
    """One period where a sentence ends in an abbreviation ("9 a.m.."), and no space after a
    Chinese or Japanese sentence (a template joins sentences with one: "。 " reads as a gap
    there, and costs an SMS a character)."""
    if "m.." in text:
        text = _DOUBLED_PERIOD.sub(r"\1", text)
    if "\u3002 " in text or "\uff01 " in text or "\uff1f " in text:  # (a substring: fast)
        return _CJK_GAP.sub("", text)
    return text


#: A space after a Chinese or Japanese full stop, exclamation or question mark; not before a
#: link (a phone's link detection wants it apart).
_CJK_GAP = re.compile("(?<=[\u3002\uff01\uff1f]) (?!https?://)")


#: A letter of a right-to-left script (Hebrew, Arabic and their presentation forms).
_RTL_LETTER = re.compile("[\u0590-\u08ff\ufb1d-\ufdff\ufe70-\ufefc]")
#: Which merchant links (brand.links) a milestone offers as buttons.
#: Unicode's right-to-left mark: starts an RTL SMS (counted in its segments).
RLM = "\u200f"
_PROBLEMS = frozenset({Status.EXCEPTION, Status.DELIVERY_ATTEMPT_FAILED})
#: Font stacks by language: the scripts' own system fonts first (Arial has no CJK glyphs,
#: and its Arabic and Hebrew are the fallback of last resort on many systems).
_FONTS: dict[str, Markup] = {
    "": Markup("Arial, Helvetica, sans-serif"),
    "ja": Markup(
        "'Hiragino Sans', 'Hiragino Kaku Gothic ProN', 'Yu Gothic', Meiryo, "
        "'Noto Sans CJK JP', 'Noto Sans JP', sans-serif"
    ),
    "zh": Markup(
        "'PingFang SC', 'Microsoft YaHei', 'Hiragino Sans GB', 'Noto Sans CJK SC', "
        "'Noto Sans SC', sans-serif"
    ),
    "ar": Markup(
        "Tahoma, 'Geeza Pro', 'Noto Naskh Arabic', 'Noto Sans Arabic', 'Segoe UI', "
        "Arial, sans-serif"
    ),
    "he": Markup("Arial, 'Arial Hebrew', 'Noto Sans Hebrew', 'Segoe UI', sans-serif"),
}
_ACTIONS: dict[str, tuple[str, ...]] = {
    "delivery_attempt_failed": ("reschedule",),
    "exception:recipient_unavailable": ("reschedule",),
    "exception:address_issue": ("change_address",),
    "available_for_pickup": ("pickup",),
    "exception:held_at_facility": ("pickup",),
}


@dataclass(frozen=True, slots=True)
class EmailMessageOut:
    """A rendered email."""

    notification_id: str
    merchant_id: str
    shipment_id: str
    to: str
    from_addr: str
    subject: str
    text: str
    html: str
    headers: dict[str, str] = field(default_factory=dict)
    #: the inbox preview line (also hidden at the top of the HTML)
    preheader: str = ""
    #: its milestone and locale, which the provider echoes in its reports (analytics)
    stats_tag: str = ""


@dataclass(frozen=True, slots=True)
class SmsMessageOut:
    """A rendered SMS with its encoding and segment count."""

    notification_id: str
    merchant_id: str
    shipment_id: str
    to: str
    body: str
    encoding: SmsEncoding
    segments: int
    #: its milestone and locale, which the provider echoes in its reports (analytics)
    stats_tag: str = ""


Message = EmailMessageOut | SmsMessageOut

#: What a message file (messages/<milestone>.jinja) may define; layouts see them as ``m.*``.
WORDS = ("subject", "preheader", "headline", "happened", "next", "help", "we_do", "sms")


class Lazy:
    """Text computed when a template prints it (a rarely used, costly value)."""

    __slots__ = ("_make",)

    def __init__(self, make: Callable[[], str]) -> None:
        self._make = make

    def __str__(self) -> str:
        return self._make()


def sms_text(rendered: str, rtl: bool) -> str:
    """An SMS body from what a template rendered: one line, single spaces, GSM-7 stand-ins
    for typographic marks (``smart_encode``); a right-to-left one starts with a mark."""
    text = smart_encode(_SPACES.sub(" ", " ".join(rendered.split("\n"))).strip())
    # phones lay a message out by its first strong letter: a shop name in Latin letters
    # first would make an Arabic SMS read left to right
    return RLM + text if rtl else text


#: Jinja's words for a value a template names that is not there.
_NO_ATTRIBUTE = re.compile(r"^'[\w ]+ object' has no attribute '([^']*)'$")
_UNDEFINED = re.compile(r"^'([^']*)' is undefined$")


def template_words(exc: Exception) -> str:
    """A template's error as a merchant reads it: Jinja's ``'dict object' has no
    attribute 'nosuch'`` says which value is missing, and where the names are listed."""
    text = str(exc)
    if found := _NO_ATTRIBUTE.match(text):
        return (
            f"no value '{found[1]}' there: the message editor's variables list what each "
            f"value holds ({text})"
        )
    if _UNDEFINED.match(text):
        return f"{text}: no such variable (the message editor's variables list the ones there are)"
    return text


def stats_tag(n: Notification, variant: str = "") -> str:
    """What a message carries to its provider to be counted where it belongs: its
    milestone, locale, and the variant it was rendered in (``variant``) of its experiment."""
    return counts.tag(
        n.transition.milestone, n.recipient.locale, n.experiment if variant else None, variant
    )


def _progress(
    t: Transition, collected: bool = False, reached: int | None = None
) -> list[dict[str, str]]:
    """The journey's steps with their state; a pickup journey ends at the pickup point (a
    parcel collected there: through it, never "out for delivery"). An exception is at the
    step the shipment had reached (``reached``, ``Notification.reached``), never before."""
    if t.status is Status.RETURNED_TO_SENDER:
        return []
    current = _STEP_OF[t.status]
    if t.exception_code is not None and t.exception_code.value in _AT_THE_DOOR:
        current = 3
    at_pickup = t.status is Status.AVAILABLE_FOR_PICKUP
    if t.status is Status.EXCEPTION and reached is not None and reached >= _OUT_RANK:
        current = 3  # out for delivery, or waiting at the pickup point
        at_pickup = reached > _OUT_RANK
    if at_pickup:
        keys, current = ["ordered", "shipped", "moving", "collect"], 3
    elif collected:
        keys = ["ordered", "shipped", "moving", "collect", "delivered"]
    else:
        keys = ["ordered", "shipped", "moving", "out", "delivered"]
    done_all = t.status is Status.DELIVERED
    # a problem or a failed attempt is not an on-time step: it says so (icon and words)
    here = "problem" if t.status in _PROBLEMS else "current"
    if t.exception_code is not None and t.exception_code.value in _GOING_BACK:
        keys = keys[: current + 1]  # no "Delivered (not yet)" under "going back to the sender"
    states = []
    for i, key in enumerate(keys):
        state = "done" if i < current or done_all else here if i == current else "upcoming"
        states.append({"key": key, "state": state})
    return states


def _keeps(out: str, words: str, layout: str, name: str) -> None:
    """Refuse a layout that leaves out the message's own words (printed as they are, or
    escaped): every message through it would go out without them."""
    if words not in out and str(Markup.escape(words)) not in out:
        raise TemplateRuntimeError(
            f"{layout} leaves out the message ({{{{ {name} }}}}): every message through it "
            "would go out without what it is about"
        )


def _us_opt_out(n: Notification) -> bool:
    """CTIA/TCPA practice: US and Canadian numbers get the opt-out line."""
    return n.channel is ChannelKind.SMS and n.to.startswith("+1")


def carrier_name(carrier: str) -> str:
    """``fedex`` -> ``FedEx``; a code of no carrier (``other``, ``unknown_carrier``, ``n/a``,
    ``Not Available``) -> "" (the messages then say "the carrier": "Pay any fees only on
    the other website" told a customer nothing, where the carrier's name is the one lead
    against a customs-fee scam); a code of words joined by ``_`` or ``-`` -> its words,
    a known carrier's by its name and a country's code in capitals (``acme_express`` ->
    ``Acme Express``, ``fedex_ground`` -> ``FedEx Ground``, ``dpd_be`` -> ``DPD BE``); a
    name the backend already formats is shown as received."""
    shown = carrier.strip()
    code = shown.lower()
    known = CARRIER_NAMES.get(code.replace(" ", ""))
    if known is not None:
        return known
    words = [w for w in re.split(r"[^0-9a-z/]+", code) if w]
    if not words or set(words) <= NO_CARRIER:
        return ""
    if "_" not in shown and "-" not in shown:
        return shown
    parts = [w for w in re.split(r"[\s_-]+", shown) if w]
    first, *rest = parts
    words = [CARRIER_NAMES.get(first.lower(), first.capitalize())]  # fedex_ground
    words += [w.capitalize() for w in rest[:-1]]
    if rest:  # a country's code ends many (dpd_be, gls_de)
        last = rest[-1]
        words.append(last.upper() if len(last) == 2 and last.isalpha() else last.capitalize())
    return " ".join(words)


#: Words of carrier codes that name no carrier: a code of them alone is not shown, and the
#: messages say "the carrier" ("unknown_carrier", "other", "Not Available", "n.a.", "tbd").
NO_CARRIER = frozenset(
    {
        "other",
        "others",
        "unknown",
        "generic",
        "none",
        "n/a",
        "na",
        "n",
        "a",
        "carrier",
        "carriers",
        "courier",
        "shipper",
        "misc",
        "custom",
        "no",
        "not",
        "available",
        "tbd",
        "tba",
        "any",
        "default",
        "null",
        "undefined",
        "unspecified",
        "unassigned",
    }
)


#: What a merchant's link may name: the values ``fill_link`` is given (``context``).
LINK_PLACEHOLDERS = ("tracking_number", "order_number")


def fill_link(template: str, values: dict[str, str]) -> str | None:
    """A merchant link with {tracking_number}/{order_number} filled in, URL-quoted; None
    when it names one this shipment has no value for (an order number the backend never
    sent): ``…/address/`` is a dead link, and the message offers the others instead.

    Plain replacement, not str.format: a merchant's template must not reach attributes.
    """
    for key, value in values.items():
        placeholder = "{" + key + "}"
        if placeholder in template:
            if not value:
                return None
            template = template.replace(placeholder, quote(value, safe=""))
    return template


#: Whose templates a render uses when a merchant's own fail: the defaults (no folder).
DEFAULT_TEMPLATES = ""
#: What templates/ holds besides merchants' folders.
DEFAULT_ENTRIES = frozenset({"email", "sms", "messages", "_labels.jinja", "brand.yaml"})


#: A batch of renders lets the event loop run (heartbeats, leases, requests) this often.
YIELD_S = 0.05

#: What a render that ran out of a resource raises: a merchant's templates that did are set
#: aside (rendering them again would cost as much every time).
EXHAUSTED = (LimitExceeded, MemoryError, RecursionError)


def _data_free(exc: RenderError) -> str:
    """What a render failure is, for the log: a template's own mistakes (its syntax, a
    limit) in full; otherwise where it happened and the kind of error, never its message,
    which can quote the data (``'dict object' has no attribute 'Ana Lima'``)."""
    cause = exc.__cause__
    if cause is None or isinstance(cause, (TemplateSyntaxError, *EXHAUSTED)):
        return str(exc)
    if _A_NAME_UNDEFINED.fullmatch(str(cause)):  # a name the template wrote, not data
        return str(exc)
    return f"{where(cause) or 'a template'}: {type(cause).__name__} (details not logged)"


_A_NAME_UNDEFINED = re.compile(r"'[A-Za-z_][A-Za-z0-9_]{0,80}' is undefined")


class Renderer:
    """Renders notifications with the merchant's layered templates in the recipient's locale.

    A merchant's own files (its brand.yaml, its templates) never stop its messages: when
    they fail to load or to render, the message is rendered with the last good brand (or
    the default one) and the default templates, and the problem is logged once and listed
    in ``disabled`` until the files change. ``strict`` (checks, previews) raises instead.
    With a ``watch``, edits of the template and locale trees are picked up (``refresh``).
    """

    def __init__(
        self,
        templates: TemplateStore,
        catalogs: i18n.Catalogs,
        *,
        email_from: str,
        unsubscribe: Callable[[str, str, str, str], dict[str, str]] | None = None,
        strict: bool = False,
        watch: TreeWatch | None = None,
        published: Callable[[str], dict[str, str]] | None = None,
        skeletons: int = skeleton.MAX_SKELETONS,
    ) -> None:
        self.templates = templates
        self.catalogs = catalogs
        self.email_from = email_from
        #: (merchant_id, address) -> the RFC 8058 headers, for brands that want them
        self.unsubscribe = unsubscribe
        self.strict = strict
        self.watch = watch
        #: a merchant's published override files (the editor's): its brand.yaml over its file
        self.published = published
        #: merchant -> why (parts of) its own files are not in use, until they change
        self.disabled: dict[str, set[str]] = {}
        #: merchant -> why: own templates that crossed a render limit, not tried again (each
        #: try could cost the whole time limit) until the files change
        self.over_limit: dict[str, str] = {}
        self._hits: set[str] = set()  # merchants whose broken files were hit lately
        self._cleared: set[str] = set()  # merchants whose files are to be judged again
        self._brands: dict[str, Brand] = {}
        self._last_good: dict[str, Brand] = {}
        self._labels: dict[tuple[str, ...], dict[str, str]] = {}
        self._brand_ctx: dict[str, dict[str, Any]] = {}
        #: messages rendered once per shape and filled in (none for checks and previews,
        #: which show a merchant's problem as it happens)
        self.skeletons = Skeletons(skeletons) if skeletons and not strict else None
        #: the last message filled from a skeleton: (notification, locale, context, shape)
        self._last: tuple[Notification, str, dict[str, Any], skeleton.Split] | None = None
        self._lock = threading.Lock()

    def refresh(self) -> bool:
        """Pick up edits of the template and locale trees (looked for at most every
        watch interval); True when something changed and the caches were dropped. A
        merchant's files that were not in use are judged again when they (or the
        defaults) changed."""
        changes = self.watch.changed() if self.watch is not None else set()
        if not changes:
            return False
        self.templates.invalidate()
        self.catalogs.invalidate()
        own = {
            name
            for root, name in changes
            if root == self.templates.directory and name not in DEFAULT_ENTRIES
        }
        everyone = len(own) < len(changes)  # the defaults or the catalogs changed
        if self.skeletons is not None:
            self.skeletons.clear()
        self._last = None
        with self._lock:
            self._brands.clear()
            self._labels.clear()
            self._brand_ctx.clear()
            again = set(self.disabled) if everyone else own & set(self.disabled)
            for merchant_id in again:
                del self.disabled[merchant_id]
            for merchant_id in again & set(self.over_limit):
                del self.over_limit[merchant_id]
            self._cleared |= again
        log.info("templates or catalogs changed on disk: reloaded")
        return True

    def forget(self, merchant_id: str) -> None:
        """Drop what is cached for one merchant, whose published files changed; files
        that were not in use are judged again."""
        if self.skeletons is not None:
            self.skeletons.forget(self.templates.search_path(merchant_id))
        self._last = None
        self.templates.forget(merchant_id)
        with self._lock:
            self._brands.pop(merchant_id, None)
            self._brand_ctx.pop(merchant_id, None)
            for key in [k for k in self._labels if k[0] == merchant_id]:
                del self._labels[key]
            if self.disabled.pop(merchant_id, None) is not None:
                self._cleared.add(merchant_id)
            self.over_limit.pop(merchant_id, None)

    def _disable(self, merchant_id: str, why: str) -> None:
        """Record (and log, once) that a merchant's file is not in use."""
        with self._lock:
            self._hits.add(merchant_id)
            self._cleared.discard(merchant_id)
        if why not in self.disabled.get(merchant_id, ()):
            log.error("merchant %s: %s", merchant_id, why)
            with self._lock:
                self.disabled.setdefault(merchant_id, set()).add(why)

    def take_changes(self) -> tuple[set[str], set[str]]:
        """(merchants whose broken files were hit, merchants judged again since) since the
        last call: the worker publishes them for ``/healthz``."""
        with self._lock:
            hits, cleared = self._hits, self._cleared
            self._hits, self._cleared = set(), set()
        return hits, cleared

    def put_back(self, hits: set[str], cleared: set[str]) -> None:
        """What ``take_changes`` gave and could not be published: given again next time
        (a merchant hit since is a hit, whatever it was before)."""
        with self._lock:
            self._cleared |= cleared - self._hits
            self._hits |= hits - self._cleared

    def brand(self, merchant_id: str) -> Brand:
        """The merchant's brand; a broken brand.yaml gives its last good brand (or the
        default one) unless ``strict``."""
        brand = self._brands.get(merchant_id)
        if brand is None:
            own = self.published(merchant_id) if self.published and merchant_id else {}
            try:
                brand = load_brand(self.templates.directory, merchant_id, own.get("brand.yaml"))
            except ConfigurationError as exc:
                if self.strict or not merchant_id:
                    raise
                last = self._last_good.get(merchant_id)
                brand = last or load_brand(self.templates.directory, "")
                used = "its last good brand" if last else "the default brand"
                self._disable(merchant_id, f"{exc} ({used} is used until the file is fixed)")
            else:
                self._last_good[merchant_id] = brand
            with self._lock:
                self._brands[merchant_id] = brand
        return brand

    def use_brand(self, merchant_id: str, brand: Brand) -> None:
        """Use ``brand`` for a merchant instead of its files (checks and previews)."""
        self._last = None
        with self._lock:
            self._brands[merchant_id] = brand
            self._brand_ctx.pop(merchant_id, None)

    def _brand_context(self, merchant_id: str) -> dict[str, Any]:
        """The brand as templates see it (the same for every message of a merchant)."""
        ctx = self._brand_ctx.get(merchant_id)
        if ctx is None:
            brand = self.brand(merchant_id)
            ctx = {
                "brand": {
                    **brand.model_dump(),
                    "logo_alt": brand.logo_alt or brand.name,
                    "link_colour": brand.link_colour,
                    "link_colour_dark": brand.link_colour_dark,
                    "button_text": brand.button_text,
                    "button_border": brand.button_border,
                },
                "support": brand.support.model_dump() if brand.support.any() else None,
                "link_templates": brand.links.model_dump(),
            }
            # what templates see of the brand: merchants with the same one (and the same
            # templates) share their skeletons
            ctx["fingerprint"] = repr((ctx["brand"], ctx["support"]))
            with self._lock:
                self._brand_ctx[merchant_id] = ctx
        return ctx

    def locale_for(self, n: Notification) -> str:
        """The catalog locale: the recipient's, along the fallback chain."""
        return self.reader_locale(n.merchant_id, n.recipient.locale)

    def reader_locale(self, merchant_id: str, locale: str | None) -> str:
        """The catalog a merchant's reader of ``locale`` gets its messages from."""
        return self.catalogs.resolve(locale, self.brand(merchant_id).default_locale)

    def variant(self, n: Notification, templates_of: str, locale: str) -> str:
        """The variant ``n`` is rendered in: the shipment's (``n.variant``) when the merchant
        wrote that message's b file for its reader (``messages/<name>.b.jinja``, or
        ``.b.<locale>.jinja``), else ``a``; empty outside an experiment, and for a message
        rendered with the default templates because the merchant's failed (it reads neither
        of the merchant's variants)."""
        if templates_of == DEFAULT_TEMPLATES and n.merchant_id != DEFAULT_TEMPLATES:
            return ""
        if n.variant != "b":
            return n.variant or ""
        names = message_paths(message_name(n.transition), locale, "b")
        return "b" if self.templates.exists(templates_of, names) else "a"

    def context(self, n: Notification, locale: str, variant: str = "") -> dict[str, Any]:
        """Everything a template may use (the README lists it for merchants); ``variant``:
        the message's variant (``variant()``)."""
        t, r = n.transition, n.recipient
        branding = self._brand_context(n.merchant_id)
        link_templates: dict[str, str | None] = branding["link_templates"]
        tz = r.timezone
        # Words come from the catalog; dates and names follow the recipient's own locale when
        # it is the catalog's language (en_GB dates for an en_GB reader of the en catalog).
        fmt = i18n.formatting_locale(r.locale, locale)
        place = None
        if t.location is not None and (t.location.city or t.location.country):
            country = i18n.country_name(t.location.country, fmt) if t.location.country else None
            english = locale.startswith("en") and t.location.country in _WITH_THE
            if country and english and not t.location.city:
                country = "the " + country  # "delivered in the United States"
            parts = [_city(t.location.city), country]
            place = _PLACE_JOIN.get(locale.split("_")[0], ", ").join(p for p in parts if p)
            if i18n.text_direction(locale) == "rtl" and _RTL_LETTER.search(place):
                # a Latin city before a country named in the reader's script: the place is
                # read right to left as a whole (its isolate would take the city's direction
                # and show "country, city"); the city stays one left-to-right run within it
                place = RLM + place
        fill = {
            "tracking_number": t.tracking_number,
            "order_number": t.order.number if t.order else "",
        }
        links = {k: fill_link(v, fill) if v else None for k, v in link_templates.items()}
        # what the milestone asks of the customer comes first, the tracking page second
        primary = next(
            (
                {"key": key, "url": links[key]}
                for key in _ACTIONS.get(t.milestone, ())
                if links[key]
            ),
            None,
        )
        track = {"key": "track", "url": t.tracking_url} if t.tracking_url else None
        actions = [a for a in (track, primary) if a]
        short_base = link_templates.get("short_base")
        sms_url = (
            f"{short_base}{quote(t.tracking_number, safe='')}" if short_base else t.tracking_url
        )
        point = t.pickup_point
        message_for_locale, message = message_paths(message_name(t), locale, variant)
        # a window that ended before the message was decided is no expected delivery (a
        # stalled shipment's "delayed" is made because it ended): the message says none
        window = t.estimated_delivery
        if window is not None and window.end <= n.created_at:
            window = None
        deadline_days, deadline = None, None
        if t.pickup_deadline is not None:
            deadline = i18n.last_day_of(t.pickup_deadline, tz)
            days = (t.pickup_deadline - n.created_at).total_seconds() / 86400
            deadline_days = max(1, math.ceil(days))
        return {
            "lang": i18n.html_lang(locale),
            "dir": i18n.text_direction(locale),
            "fonts": _FONTS.get(locale.split("_")[0], _FONTS[""]),
            "brand": branding["brand"],
            "support": branding["support"],
            "links": links,
            "recipient": {"name": r.name or ""},
            "shipment": {
                "tracking_number": t.tracking_number,
                "carrier": carrier_name(t.carrier),
                "tracking_url": t.tracking_url or "",
                "order_number": t.order.number if t.order else "",
            },
            "event": {
                "status": t.status.value,
                "exception_code": t.exception_code.value if t.exception_code else "",
                "when": i18n.when(t.occurred_at, tz, fmt),
                "place": place or "",
                "window": i18n.window(window.start, window.end, tz, fmt) if window else "",
                "predicted": i18n.window(n.predicted.start, n.predicted.end, tz, fmt)
                if n.predicted
                else "",
                "deadline_days": deadline_days,
                "deadline": i18n.when(deadline, tz, fmt) if deadline else "",
                #: its day alone (an SMS's), in the pickup point's offset without a zone
                "deadline_day": i18n.day(i18n.last_day_of(t.pickup_deadline, tz, True), tz, fmt)
                if t.pickup_deadline
                else "",
                # computed only if a template prints it
                "ago": Lazy(lambda: i18n.ago(t.occurred_at, n.created_at, fmt)),
                #: a "delivered" of a parcel the customer collected from a pickup point
                "collected": bool(n.collected),
            },
            "progress": _progress(t, bool(n.collected), n.reached),
            "actions": actions,
            #: the milestone's own action (confirm address, rebook, collect), when configured
            "primary_action": primary,
            "track_action": track,
            #: the link an SMS carries: the milestone's action, else the (short) tracking link
            "sms_url": primary["url"] if primary else (sms_url or ""),
            "pickup_point": point.model_dump() if point else None,
            "us_opt_out": _us_opt_out(n),
            #: whether an email about this event goes out too (an SMS without one must not
            #: send its reader to one: "Details by email")
            "email_too": not n.alone,
            "message": message,
            # a message's wording for one locale only, when the merchant wrote one
            "message_for_locale": message_for_locale,
            #: the variant of an A/B test of this message (a or b), empty outside one
            "variant": variant,
        }

    def _headers(self, n: Notification, brand: Brand, tag: str) -> dict[str, str]:
        """Reply-To the merchant's support address (a customer's reply reaches a person,
        not the no-reply sender); List-Unsubscribe when the brand asks for it (its page in
        the email's language, its count under the email's milestone and locale: ``tag``)."""
        headers = (
            self.unsubscribe(n.merchant_id, n.to, self.locale_for(n), tag)
            if brand.one_click_unsubscribe and self.unsubscribe
            else {}
        )
        if brand.support.email:
            headers = {**headers, "Reply-To": brand.support.email}
        return headers

    def _words(
        self, merchant_id: str, ctx: dict[str, Any], tracing: bool = False
    ) -> dict[str, str]:
        """The message file's macros, evaluated once per message into plain strings."""
        names = (ctx["message_for_locale"], ctx["message"])
        template = self.templates.select(merchant_id, names, tracing)
        ctx["message_file"] = template.name  # the one found, for a problem to name
        module = template.make_module(ctx)
        return {
            name: str(macro()).strip() if (macro := getattr(module, name, None)) else ""
            for name in WORDS
        }

    def _step_labels(
        self, merchant_id: str, chain: tuple[str, ...], words: dict[str, Any]
    ) -> dict[str, str]:
        """Step, state and button labels of _labels.jinja (the same for every message)."""
        key = (merchant_id, *chain)
        labels = self._labels.get(key)
        if labels is None:
            module = self.templates.select(merchant_id, ("_labels.jinja",)).make_module(words)
            groups = {
                "label": ("ordered", "shipped", "moving", "out", "collect", "delivered"),
                "state_text": ("done", "current", "problem", "upcoming"),
                "action_label": ("track", "reschedule", "change_address", "pickup"),
            }
            labels = {
                key: str(getattr(module, macro)(key))
                for macro, keys in groups.items()
                for key in keys
            }
            with self._lock:
                self._labels[key] = labels
        return labels

    async def render_many(
        self, notifications: Sequence[Notification]
    ) -> list[Message | RenderError]:
        """Render a batch: a message, or the RenderError that stopped it, per notification.

        The same messages as ``render``, but the emails' CSS is inlined all at once by
        ``inline_many`` in a thread: it runs in parallel and without the GIL, so the
        event loop goes on (with the next batch) while it works.
        """
        self.refresh()
        out: list[Message | RenderError] = []
        done: set[int] = set()  # emails inlined already (from their skeletons)
        breath = time.monotonic()
        for n in notifications:
            try:
                message, ready = self._render_one(n, inline=False)
            except RenderError as exc:
                out.append(exc)
            else:
                if ready:
                    done.add(len(out))
                out.append(message)
            if time.monotonic() - breath > YIELD_S:  # slow templates: let the loop run
                await asyncio.sleep(0)
                breath = time.monotonic()
        emails = [
            (i, m) for i, m in enumerate(out) if isinstance(m, EmailMessageOut) and i not in done
        ]
        if not emails:
            return out
        loop = asyncio.get_running_loop()
        try:
            inlined = await loop.run_in_executor(
                None, _INLINER.inline_many, [m.html for _, m in emails]
            )
        except Exception:  # find which one: inline them one by one
            for i, m in emails:
                try:
                    out[i] = dataclasses.replace(m, html=_INLINER.inline(m.html))
                except Exception as exc:
                    out[i] = RenderError(
                        f"email CSS inlining raised {type(exc).__name__}: {exc}",
                        m.notification_id,
                    )
            return out
        for (i, m), html in zip(emails, inlined, strict=True):
            out[i] = dataclasses.replace(m, html=html)
        return out

    def render(self, n: Notification, *, inline: bool = True) -> Message:
        """Render ``n`` for its channel; a template problem raises RenderError.

        A merchant's own template that fails is skipped for this message: it is rendered
        with the default templates (unless ``strict``, or the defaults fail too). One that
        crossed a render limit is skipped for every message until the files change.
        ``inline=False`` may leave an email's CSS in its style element (``render_many``
        inlines a batch at once)."""
        return self._render_one(n, inline)[0]

    def _render_one(self, n: Notification, inline: bool) -> tuple[Message, bool]:
        """``render``, and whether an email's CSS is inlined already (from its skeleton)."""
        self.refresh()
        over = self.over_limit.get(n.merchant_id)
        if over is not None and not self.strict:
            self._disable(n.merchant_id, over)  # still in force: /healthz keeps counting it
            return self._render(n, DEFAULT_TEMPLATES, inline)
        try:
            return self._render(n, n.merchant_id, inline)
        except RenderError as exc:
            if self.strict or not self.templates.has_own(n.merchant_id):
                raise
            try:
                message = self._render(n, DEFAULT_TEMPLATES, inline)
            except RenderError:
                raise exc from None  # not the merchant's files: the message itself fails
            if isinstance(exc.__cause__, EXHAUSTED):
                why = f"{exc}: its messages use the default templates until it is fixed"
                with self._lock:
                    self.over_limit[n.merchant_id] = why
            else:
                why = f"{_data_free(exc)}: messages this breaks use the default templates until "
                why += "it is fixed"
            self._disable(n.merchant_id, why)
            return message

    def _render(self, n: Notification, templates_of: str, inline: bool) -> tuple[Message, bool]:
        """Render ``n`` with the templates of ``templates_of`` (the merchant, or the
        defaults) and the merchant's brand, within the render limits; and whether an
        email's CSS is inlined."""
        try:
            return self._render_within(n, templates_of, inline)
        except TemplateSyntaxError as exc:
            raise RenderError(f"{where(exc)}: {exc.message}", n.notification_id) from exc
        except TemplateError as exc:
            name = where(exc) or getattr(exc, "name", None) or "template"
            raise RenderError(f"{name}: {template_words(exc)}", n.notification_id) from exc
        except ConfigurationError as exc:
            raise RenderError(str(exc), n.notification_id) from exc
        except RecursionError as exc:  # a macro or an include that calls itself
            raise RenderError(
                f"{where(exc) or 'template'}: macros or includes nested deeper than Python's "
                "recursion limit (RecursionError)",
                n.notification_id,
            ) from exc
        except Exception as exc:
            # A merchant template can fail in ways Jinja does not wrap ({{ 1/0 }}), and
            # odd data can break a formatter: fail this message, never the whole batch.
            line = where(exc)
            raise RenderError(
                f"{line + ': ' if line else ''}{n.channel} template for "
                f"{message_name(n.transition)} raised {type(exc).__name__}: {exc}",
                n.notification_id,
            ) from exc

    def _render_within(
        self, n: Notification, templates_of: str, inline: bool
    ) -> tuple[Message, bool]:
        """The body of ``_render``: the context, the words, then the channel's layout; from
        the shape's skeleton when there is one (``skeleton``)."""
        locale = self.locale_for(n)
        chain = (locale, self.catalogs.resolve(self.brand(n.merchant_id).default_locale, "en"))
        words = self.templates.gettext_for(chain, templates_of)
        arm = self.variant(n, templates_of, locale)
        if self.skeletons is None:
            ctx = self.context(n, locale, arm)
        else:
            ctx, parts = self._split(n, locale, arm)
            self._last = None
            if parts is not None:
                key = (
                    self.templates.search_path(templates_of),
                    templates_of if self.templates.merchant_catalogs(templates_of) else "",
                    self._brand_context(n.merchant_id)["fingerprint"],
                    n.channel,
                    chain,
                    parts.shape,
                    ctx["us_opt_out"],
                )
                found = self.skeletons.get(key)
                if found is None:
                    found = self._trace(n, templates_of, chain, words, ctx, parts)
                    self.skeletons.put(key, found)
                if isinstance(found, Skeleton):
                    filled = self._fill(n, found, parts, inline, arm)
                    if filled is not None:
                        self._last = (n, locale, ctx, parts)
                        return filled
        with budget(self.templates.limits):  # filling a skeleton runs no template: none
            out = self._compose(n, templates_of, chain, words, ctx)
        return self._message(n, out, ctx["dir"] == "rtl", inline, arm), inline

    def help_reply(self, merchant_id: str, locale: str | None, contact: str) -> str:
        """The answer to a HELP texted to our number (``sms/help.txt`` of the default
        templates), in ``locale`` (the last SMS's reader's) along the merchant's fallback
        chain: who sends these messages (the merchant's brand name; none for an empty
        ``merchant_id``) and how to reach them (``contact``). Raises what rendering raised."""
        self.refresh()
        brand = self.brand(merchant_id)
        catalog = self.catalogs.resolve(locale, brand.default_locale)
        chain = (catalog, self.catalogs.resolve(brand.default_locale, "en"))
        direction = i18n.text_direction(catalog)
        ctx: dict[str, Any] = {
            **self.templates.gettext_for(chain),
            "dir": direction,
            "merchant": one_line(brand.name) if merchant_id else "",
            "contact": contact,
        }
        with budget(self.templates.limits):
            template = self.templates.select(DEFAULT_TEMPLATES, ("sms/help.txt",))
            return sms_text(render_text(template, ctx), direction == "rtl")

    def unsubscribe_page(
        self, merchant_id: str | None, wanted: Sequence[str], state: str, address: str = ""
    ) -> str:
        """The page of a one-click unsubscribe link (``email/unsubscribe.html`` of the
        default templates) in the first of ``wanted`` (the email's language, then the
        browser's) that has a catalog, else the merchant's default language; ``state`` is
        ``ask``, ``done`` or ``invalid`` (``merchant_id`` None: no merchant is known)."""
        self.refresh()
        brand = self.brand(merchant_id or DEFAULT_TEMPLATES)
        default = brand.default_locale if merchant_id else "en"
        catalog = self.catalogs.resolve(default, "en")  # when none of them is ours
        passed: dict[str, str | None] = {}  # languages asked for in a script we have not
        for tag in wanted:
            loc = i18n.parse_locale(tag)
            if loc is None:
                continue
            if loc.language in passed and (
                loc.script is None or loc.script == passed[loc.language]
            ):
                # "zh-TW, zh": the plain "zh" a browser adds after a Traditional Chinese
                # tag is not a wish for Simplified Chinese
                continue
            found = self.catalogs.resolve_asked(tag)
            if found != "en" or loc.language == "en":
                catalog = found
                break
            passed[loc.language] = loc.script
        chain = (catalog, self.catalogs.resolve(default, "en"))
        ctx: dict[str, Any] = {
            **self.templates.gettext_for(chain),
            "lang": i18n.html_lang(catalog),
            "dir": i18n.text_direction(catalog),
            "state": state,
            "address": address,
            "merchant": one_line(brand.name) if merchant_id else "",
        }
        with budget(self.templates.limits):
            template = self.templates.select(DEFAULT_TEMPLATES, ("email/unsubscribe.html",))
            return render_text(template, ctx)

    def _split(
        self, n: Notification, locale: str, variant: str
    ) -> tuple[dict[str, Any], skeleton.Split | None]:
        """The context and its shape; the previous message's when ``n`` is the same event's
        other channel (a batch renders an event's email and SMS one after the other), which
        differs only in the US opt-out line."""
        last = self._last
        if last is not None:
            before, before_locale, ctx, parts = last
            if (
                before.transition is n.transition
                and before.recipient is n.recipient
                and before.created_at == n.created_at
                and before.merchant_id == n.merchant_id
                and before_locale == locale
                and ctx["variant"] == variant
                and before.alone == n.alone
                and before.collected == n.collected
                and before.reached == n.reached
            ):
                return {**ctx, "us_opt_out": _us_opt_out(n)}, parts
        ctx = self.context(n, locale, variant)
        return ctx, skeleton.split(ctx, Lazy)

    def _compose(
        self,
        n: Notification,
        templates_of: str,
        chain: tuple[str, ...],
        words: dict[str, Any],
        ctx: dict[str, Any],
        tracing: bool = False,
    ) -> dict[str, str]:
        """What the templates make of ``ctx``: an SMS's layout text; an email's subject and
        preheader words, HTML and text (before they are tidied)."""
        ctx.update(words)
        ctx["m"] = self._words(templates_of, ctx, tracing)
        needed = "sms" if n.channel is ChannelKind.SMS else "subject"
        if not ctx["m"][needed]:
            # an empty file, or a macro that renders nothing: never a blank message
            raise TemplateRuntimeError(
                f"{ctx.get('message_file') or ctx['message']} gives no {needed} for "
                f"{n.channel} (the message would go out blank)"
            )
        ctx["labels"] = self._step_labels(templates_of, chain, words)
        select = self.templates.select
        m = ctx["m"]
        if n.channel is ChannelKind.SMS:
            sms = render_text(select(templates_of, ("sms/layout.txt",), tracing), ctx)
            _keeps(sms, m["sms"], "sms/layout.txt", "m.sms")
            if ctx["us_opt_out"] and "STOP" not in sms:
                raise TemplateRuntimeError(
                    "sms/layout.txt gives a US or Canadian number no opt-out line: an SMS "
                    "there must say how to stop them, with the word STOP (print the "
                    "default's line when us_opt_out is true)"
                )
            return {"sms": sms}
        html = render_text(select(templates_of, ("email/layout.html",), tracing), ctx)
        text = render_text(select(templates_of, ("email/layout.txt",), tracing), ctx)
        if m["headline"]:
            _keeps(html, m["headline"], "email/layout.html", "m.headline")
            _keeps(text, m["headline"], "email/layout.txt", "m.headline")
        return {"subject": m["subject"], "preheader": m["preheader"], "html": html, "text": text}

    def _message(
        self, n: Notification, out: dict[str, str], rtl: bool, inline: bool, variant: str
    ) -> Message:
        """The message from what the templates made (``_compose``, or a filled skeleton)."""
        out = {name: _one_period(text) for name, text in out.items()}
        if n.channel is ChannelKind.SMS:
            text = sms_text(out["sms"], rtl)
            size = measure(text)
            return SmsMessageOut(
                n.notification_id,
                n.merchant_id,
                n.shipment_id,
                n.to,
                text,
                size.encoding,
                size.segments,
                stats_tag(n, variant),
            )
        html = out["html"]
        brand = self.brand(n.merchant_id)
        return EmailMessageOut(
            n.notification_id,
            n.merchant_id,
            n.shipment_id,
            n.to,
            _sender(brand.name, self.email_from),
            subject=" ".join(out["subject"].split()),
            text=_BLANK_LINES.sub("\n\n", out["text"]).strip() + "\n",
            html=_INLINER.inline(html) if inline else html,
            headers=self._headers(n, brand, stats_tag(n, variant)),
            preheader=" ".join(out["preheader"].split()),
            stats_tag=stats_tag(n, variant),
        )

    def _trace(
        self,
        n: Notification,
        templates_of: str,
        chain: tuple[str, ...],
        words: dict[str, Any],
        ctx: dict[str, Any],
        parts: skeleton.Split,
    ) -> object:
        """The skeleton of ``n``'s shape: its templates rendered with sentinels in the
        tracing sandbox, within a budget of its own; UNCACHEABLE when they look at a value,
        fail, or cross a limit (its messages are then rendered in full)."""
        try:
            with budget(self.templates.limits):
                traced = skeleton.tracing_context(ctx, parts, Lazy)
                out = self._compose(n, templates_of, chain, words, traced, tracing=True)
                widths = parts.widths()
                cut = {name: skeleton.cut(text, widths) for name, text in out.items()}
        except Exception:  # the full render says what is wrong, if anything
            return skeleton.UNCACHEABLE
        used = frozenset(i for pieces in cut.values() for _, i, _ in pieces if i >= 0)
        html = cut.get("html")
        if html is not None and skeleton.inlinable(html):
            probes = [skeleton.probe_value(i) for i in range(len(widths))]
            try:
                probed = _INLINER.inline(skeleton.fill(html, probes, {}))
                cut["inlined"] = skeleton.cut_inlined(probed, len(widths))
            except Exception:  # each message is inlined, as without skeletons
                pass
        return Skeleton(cut, used, ctx["dir"] == "rtl")

    def _fill(
        self, n: Notification, found: Skeleton, parts: skeleton.Split, inline: bool, variant: str
    ) -> tuple[Message, bool] | None:
        """``n`` from its shape's skeleton (and whether its CSS is inlined); None when a
        value computed only now (``ago``) cannot go in a slot."""
        values = parts.values
        for i, make in parts.lazy.items():
            if i in found.used:
                try:
                    value = make()
                except Exception:
                    return None
                if not skeleton.fits(value, skeleton.WIDTH):
                    return None
                values[i] = value
        cache: dict[tuple[int, int], str] = {}
        inlined = found.parts.get("inlined")
        if inlined is not None and not skeleton.html_safe(values, found.used):
            inlined = None
        out = {
            name: skeleton.fill(pieces, values, cache)
            for name, pieces in found.parts.items()
            if name != "inlined" and not (name == "html" and inlined is not None)
        }
        if inlined is None:
            return self._message(n, out, found.rtl, inline, variant), inline
        out["html"] = skeleton.fill(inlined, values, cache)
        return self._message(n, out, found.rtl, False, variant), True
