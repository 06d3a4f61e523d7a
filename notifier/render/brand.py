"""Merchant branding: templates/brand.yaml, overridden by templates/<merchant>/brand.yaml."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from notifier.errors import ConfigurationError, plain_words
from notifier.models import LocaleTag, one_line

#: What an accent colour is written as (#rrggbb).
ACCENT = re.compile(r"^#[0-9a-fA-F]{6}$")
#: WCAG 2.x AA for normal text.
MIN_CONTRAST = 4.5
#: WCAG 2.x AA for a control's shape against what is around it (1.4.11, non-text contrast).
MIN_SHAPE_CONTRAST = 3.0
WHITE = "#ffffff"
#: Button text on a light accent (the body text colour of the email layout).
DARK_TEXT = "#111827"


def _luminance(hex_colour: str) -> float:
    """WCAG relative luminance of an sRGB colour like ``#1d4ed8``."""
    channels = [int(hex_colour[i : i + 2], 16) / 255 for i in (1, 3, 5)]
    linear = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def contrast(a: str, b: str) -> float:
    """WCAG contrast ratio between two colours (1 to 21)."""
    la, lb = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


def darken_until_readable(colour: str, background: str) -> str:
    """``colour``, or the same hue darkened just enough to reach MIN_CONTRAST on
    ``background``."""
    rgb = [int(colour[i : i + 2], 16) for i in (1, 3, 5)]
    for step in range(101):
        scale = 1 - step / 100
        candidate = "#" + "".join(f"{round(c * scale):02x}" for c in rgb)
        if contrast(candidate, background) >= MIN_CONTRAST:
            return candidate
    return "#000000"


def lighten_until_readable(colour: str, background: str) -> str:
    """``colour`` mixed with white just enough to reach MIN_CONTRAST on a dark
    ``background`` (links in dark mode)."""
    rgb = [int(colour[i : i + 2], 16) for i in (1, 3, 5)]
    for step in range(101):
        mix = step / 100
        candidate = "#" + "".join(f"{round(c + (255 - c) * mix):02x}" for c in rgb)
        if contrast(candidate, background) >= MIN_CONTRAST:
            return candidate
    return "#ffffff"


#: The email card's background in dark mode (templates/email/layout.html).
DARK_CARD = "#1f2937"


def _https(value: str | None, why: str = "") -> str | None:
    """An https:// URL with a host, as a mail client or a phone opens it (``https://`` alone,
    or a space in it, made a broken image or link in every message)."""
    if value is None:
        return None
    if value[:8].lower() == "https://":
        value = "https://" + value[8:]  # a scheme is case-insensitive (HTTPS://…)
    if not value.startswith("https://"):
        raise ValueError(f"must be an https:// URL{why}")
    if _NOT_IN_URL.search(value):
        raise ValueError("must not contain spaces or control characters (write a space as %20)")
    try:
        host = urlsplit(value).hostname
    except ValueError:
        host = None
    if not host:
        raise ValueError("must name a host after https://, like https://shop.example/logo.png")
    return value


_NOT_IN_URL = re.compile(r"[\s\x00-\x1f\x7f]")


def _visible(char: str) -> bool:
    """Whether a character shows: not a space, a control or format character (a zero-width
    space), nor a mark alone."""
    return unicodedata.category(char)[0] not in "ZCM"


class Support(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str | None = None
    email: str | None = None
    phone: str | None = None
    hours: str | None = None

    def any(self) -> bool:
        return any((self.url, self.email, self.phone, self.hours))

    def reachable(self) -> bool:
        """Whether a customer can reach support: a page, an address or a number."""
        return any((self.url, self.email, self.phone))

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        return _https(value)

    @field_validator("email")
    @classmethod
    def _email(cls, value: str | None) -> str | None:
        # one plain address: it becomes the Reply-To header of every email
        plain = r"[^@\s<>\",;()]+"
        if value is not None and not re.fullmatch(rf"{plain}@{plain}\.{plain}", value):
            raise ValueError("must be an email address")
        return value

    @field_validator("phone")
    @classmethod
    def _phone(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"\+?[0-9 ().-]{6,25}", value):
            raise ValueError("must be a phone number like +33 1 23 45 67 89")
        return value


class Links(BaseModel):
    """URL templates; ``{tracking_number}`` and ``{order_number}`` are filled in."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    reschedule: str | None = None
    change_address: str | None = None
    pickup: str | None = None
    #: a short-link base for SMS: the tracking number is appended (``https://acme.link/t/``);
    #: used instead of the carrier's long tracking URL, so more SMS fit one segment
    short_base: str | None = None

    @field_validator("reschedule", "change_address", "pickup", "short_base")
    @classmethod
    def _links(cls, value: str | None) -> str | None:
        return _https(value)

    @field_validator("short_base")
    @classmethod
    def _base(cls, value: str | None) -> str | None:
        if value is not None and "{" in value:
            raise ValueError("is a base the tracking number is appended to: no {placeholders}")
        return value


class Commitments(BaseModel):
    """What the merchant really does when something goes wrong: each true one is a "What we
    are doing" line in the matching messages. None is promised unless set."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: customs hold: we sent customs the shipping documents
    customs_documents: bool = False
    #: delays, customs, lost: we follow up with the carrier
    carrier_follow_up: bool = False
    #: damaged: we open a claim with the carrier
    damage_claim: bool = False
    #: address issue: we ask the carrier to hold the parcel until the address is confirmed
    hold_for_address: bool = False
    #: lost: we ask the carrier to search for the parcel
    search_request: bool = False
    #: returned to sender: we track the return and act as soon as it arrives
    track_returns: bool = False
    #: lost, damaged, refused, returned: we replace or refund the order and contact the
    #: customer about it (without it, those messages ask the customer to contact us)
    refunds: bool = False


class Channels(BaseModel):
    """This merchant's choice of channel implementation (unset: the service's default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    email: Literal["outbox", "sendgrid"] | None = None
    sms: Literal["outbox", "twilio"] | None = None


class Brand(BaseModel):
    """How a merchant's messages look and whom customers can ask for help."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=80)
    logo_url: str | None = None
    #: a logo for dark backgrounds, shown by mail clients in dark mode (optional)
    logo_dark_url: str | None = None
    logo_alt: str | None = None
    accent: str = "#1d4ed8"
    default_locale: LocaleTag = "en"
    #: the languages this merchant's customers read: `notifier check` fails when one of the
    #: merchant's own strings has no translation in them (unset: every catalog, as warnings)
    locales: list[LocaleTag] | None = None
    support: Support = Field(default_factory=Support)
    footer: str | None = None
    links: Links = Field(default_factory=Links)
    #: List-Unsubscribe / List-Unsubscribe-Post headers (RFC 8058) on every email
    one_click_unsubscribe: bool = False
    channels: Channels = Field(default_factory=Channels)
    commitments: Commitments = Field(default_factory=Commitments)

    @field_validator("accent")
    @classmethod
    def _readable(cls, value: str) -> str:
        if not ACCENT.match(value):
            raise ValueError("must be a colour like #1d4ed8")
        on_white, on_dark = contrast(value, WHITE), contrast(value, DARK_TEXT)
        if max(on_white, on_dark) < MIN_CONTRAST:
            raise ValueError(
                f"{value}: neither white ({on_white:.2f}:1) nor dark ({on_dark:.2f}:1) button "
                f"text on it reaches WCAG AA's {MIN_CONTRAST}:1 (pick a darker or a lighter "
                "colour)"
            )
        return value

    @field_validator("name", "logo_alt")
    @classmethod
    def _one_line(cls, value: str | None, info: ValidationInfo) -> str | None:
        # the name is the From header's display name and every message's sender: one line,
        # as free text from the backend is (the preview showed a line break the email and
        # the SMS flattened)
        if value is None:
            return None
        flat = one_line(value).strip()
        if info.field_name != "name" or any(map(_visible, flat)):
            return flat  # (an empty text alternative is one: the logo says nothing)
        # every message starts with it ("Acme: your parcel…"), and the From header shows it
        raise ValueError("must hold some text, not only spaces or invisible characters")

    @field_validator("logo_url", "logo_dark_url")
    @classmethod
    def _https(cls, value: str | None) -> str | None:
        return _https(value, " (mail clients block other images)")

    @property
    def button_text(self) -> str:
        """White on a dark accent, dark on a light one: whichever contrast allows."""
        return WHITE if contrast(self.accent, WHITE) >= MIN_CONTRAST else DARK_TEXT

    @property
    def button_border(self) -> str | None:
        """A border for a button whose accent is too close to the white card to show its
        shape (under 3:1, WCAG 1.4.11: a white or pale yellow accent): the accent darkened
        until it reads; None for an accent that stands out by itself."""
        if contrast(self.accent, WHITE) >= MIN_SHAPE_CONTRAST:
            return None
        return self.link_colour

    @property
    def link_colour_dark(self) -> str:
        """The accent for links on the dark-mode card, lightened until it reads as text."""
        return lighten_until_readable(self.accent, DARK_CARD)

    @property
    def link_colour(self) -> str:
        """The accent for links on white, darkened (same hue) until it reads as text."""
        return darken_until_readable(self.accent, WHITE)


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigurationError(f"{path}: not UTF-8 text (save it as UTF-8)") from exc
    except OSError as exc:
        raise ConfigurationError(f"{path}: cannot read: {exc.strerror}") from exc
    return _parse(text, str(path))


def _parse(text: str, where: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigurationError(f"{where}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigurationError(f"{where}: the top level must be a mapping")
    return data


def load_brand(
    templates_dir: Path,
    merchant_id: str,
    published: str | None = None,
    label: str | None = None,
) -> Brand:
    """The merchant's brand: its published brand.yaml (the editor's) over its file over the
    default one, validated. ``label`` names ``published`` in a problem (default: "published
    brand.yaml of <merchant>"; a draft checked before it is published says so)."""
    where, merged = brand_data(templates_dir, merchant_id, published, label)
    try:
        return Brand.model_validate(merged)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {plain_words(e)}"
            for e in exc.errors(include_input=False, include_url=False)
        )
        raise ConfigurationError(f"{where}: {problems}") from exc


def brand_data(
    templates_dir: Path,
    merchant_id: str,
    published: str | None = None,
    label: str | None = None,
) -> tuple[Path, dict[str, Any]]:
    """What ``load_brand`` validates, and where it comes from (the file a problem names): the
    layers merged, not validated (the editor's form shows a draft that does not validate
    as it is). ConfigurationError when a file does not read."""
    base = _read(templates_dir / "brand.yaml")
    path = templates_dir / merchant_id / "brand.yaml" if merchant_id else None
    merged = dict(base)
    layers = [_read(path) if path else {}]
    where = path if path and path.is_file() else templates_dir / "brand.yaml"
    if published is not None:
        label = label or f"published brand.yaml of {merchant_id}"
        layers.append(_parse(published, label))
        where = Path(label)
    for override in layers:
        for key, value in override.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
    return where, merged
