"""Localization: gettext catalogs from locales/<lang>/LC_MESSAGES/messages.po, the locale
fallback chain, and dates, windows and places in the recipient's locale and time zone."""

from __future__ import annotations

import io
import threading
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from zoneinfo import ZoneInfo

from babel import Locale, UnknownLocaleError
from babel.dates import format_interval, format_skeleton, format_time
from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po
from babel.support import NullTranslations, Translations

from notifier.errors import ConfigurationError

DOMAIN = "messages"


@lru_cache(maxsize=256)
def parse_locale(tag: str) -> Locale | None:
    try:
        return Locale.parse(tag.replace("-", "_"))
    except (UnknownLocaleError, ValueError):
        return None


class Catalogs:
    """The .po catalogs of a locales directory, compiled in memory on first use."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._cache: dict[str, Translations | None] = {}
        self._lock = threading.Lock()

    def available(self) -> list[str]:
        """Locales that have a catalog, e.g. ``['ar', 'de', ..., 'zh_Hans']``."""
        if not self.directory.is_dir():
            return []
        return sorted(
            p.name
            for p in self.directory.iterdir()
            if (p / "LC_MESSAGES" / f"{DOMAIN}.po").is_file()
        )

    def _load(self, name: str) -> Translations | None:
        if name in self._cache:
            return self._cache[name]
        path = self.directory / name / "LC_MESSAGES" / f"{DOMAIN}.po"
        translations = None
        if path.is_file():
            try:
                with path.open("rb") as fh:
                    catalog = read_po(fh, locale=name)
            except Exception as exc:  # babel raises several types for a broken file
                raise ConfigurationError(f"{path}: cannot read: {exc}") from exc
            buffer = io.BytesIO()
            write_mo(buffer, catalog)
            buffer.seek(0)
            translations = Translations(buffer, domain=DOMAIN)
        with self._lock:
            self._cache[name] = translations
        return translations

    def resolve(self, wanted: str | None, fallback: str) -> str:
        """The catalog locale for ``wanted``: fr_CA -> fr -> (another fr_*) -> fallback -> en."""
        have = set(self.available()) | {"en"}
        for tag in (wanted, fallback):
            loc = parse_locale(tag) if tag else None
            if loc is None:
                continue
            candidates = [str(loc)]
            if loc.script:
                candidates.append(f"{loc.language}_{loc.script}")
            if loc.territory:
                candidates.append(f"{loc.language}_{loc.territory}")
            candidates.append(loc.language)
            candidates += sorted(h for h in have if h.startswith(f"{loc.language}_"))
            for candidate in candidates:
                if candidate in have:
                    return candidate
        return "en"

    def translations(self, chain: list[str]) -> NullTranslations:
        """Translations for the first locale of ``chain``, falling back along it to English."""
        result: NullTranslations | None = None
        for name in chain:
            t = self._load(name) if name != "en" else None
            if t is None:
                continue
            if result is None:
                result = t
            else:
                result.add_fallback(t)
        return result or NullTranslations()


def text_direction(locale: str) -> str:
    loc = parse_locale(locale)
    return "rtl" if loc is not None and loc.character_order == "right-to-left" else "ltr"


def html_lang(locale: str) -> str:
    """BCP 47 for ``<html lang>``: ``pt_BR`` -> ``pt-BR``, ``zh_Hans`` -> ``zh-Hans``."""
    return locale.replace("_", "-")


def when(moment: datetime, timezone: str | None, locale: str) -> str:
    """A moment in the recipient's zone and locale, e.g. ``Saturday 21 November, 09:30``."""
    tz = ZoneInfo(timezone) if timezone else ZoneInfo("UTC")
    loc = parse_locale(locale) or Locale("en")
    date = format_skeleton("MMMMEEEEd", moment, tzinfo=tz, locale=loc)
    time = format_time(moment, "short", tzinfo=tz, locale=loc)
    # The locale's own way to join them ("{1}, {0}", "{1} 'um' {0}", "{1} {0}"...).
    pattern = str(loc.datetime_formats["medium"]).replace("'", "")
    text = pattern.replace("{1}", date).replace("{0}", time)
    return text if timezone else f"{text} UTC"


def window(start: datetime, end: datetime, timezone: str | None, locale: str) -> str:
    """A delivery window, e.g. ``Tue, Nov 24, 10:00 – 14:00`` (both ends when days differ)."""
    tz = ZoneInfo(timezone) if timezone else ZoneInfo("UTC")
    loc = parse_locale(locale) or Locale("en")
    if start.astimezone(tz).date() != end.astimezone(tz).date():
        return f"{when(start, timezone, locale)} – {when(end, timezone, locale)}"
    date = format_skeleton("MMMMEEEEd", start, tzinfo=tz, locale=loc)
    times = format_interval(start, end, "Hm" if _24h(loc) else "hm", tzinfo=tz, locale=loc)
    pattern = str(loc.datetime_formats["medium"]).replace("'", "")
    text = pattern.replace("{1}", date).replace("{0}", times)
    return text if timezone else f"{text} UTC"


def _24h(loc: Locale) -> bool:
    return "H" in str(loc.time_formats["short"])


def country_name(code: str, locale: str) -> str:
    loc = parse_locale(locale)
    name = loc.territories.get(code) if loc is not None else None
    return str(name or code)
