"""Localization: gettext catalogs from locales/<lang>/LC_MESSAGES/messages.po, the locale
fallback chain, and dates, windows and places in the recipient's locale and time zone."""

from __future__ import annotations

import copy
import io
import re
import threading
import unicodedata
from collections.abc import Sequence
from datetime import datetime, timedelta
from functools import lru_cache
from pathlib import Path
from zoneinfo import ZoneInfo

from babel import Locale, UnknownLocaleError
from babel.dates import (
    DateTimePattern,
    format_interval,
    format_timedelta,
    match_skeleton,
    parse_pattern,
)
from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po
from babel.support import NullTranslations, Translations

from notifier.errors import ConfigurationError
from notifier.render.sms import outside_gsm7

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
        self._available: list[str] | None = None
        self._resolved: dict[tuple[str | None, str], str] = {}
        self._lock = threading.Lock()

    def available(self) -> list[str]:
        """Locales that have a catalog, e.g. ``['ar', 'de', ..., 'zh_Hans']`` (cached)."""
        if self._available is None:
            found = []
            if self.directory.is_dir():
                found = sorted(
                    p.name
                    for p in self.directory.iterdir()
                    if (p / "LC_MESSAGES" / f"{DOMAIN}.po").is_file()
                )
            self._available = found
        return self._available

    def invalidate(self) -> None:
        """Forget loaded catalogs (after an edit of locales/)."""
        with self._lock:
            self._cache.clear()
            self._resolved.clear()
            self._available = None

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
        key = (wanted, fallback)
        found = self._resolved.get(key)
        if found is None:
            found = self._resolve(wanted, fallback)
            self._resolved[key] = found
        return found

    def resolve_asked(self, wanted: str) -> str:
        """``resolve`` for a tag a request names (a link's ``lang``, a browser's
        ``Accept-Language``), not remembered: anyone may send endless tags."""
        return self._resolve(wanted, "")

    def _resolve(self, wanted: str | None, fallback: str) -> str:
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
            # another region of the language (pt_PT -> pt_BR), never another script
            # (zh_Hant readers must not get zh_Hans)
            candidates += sorted(
                h
                for h in have
                if h.startswith(f"{loc.language}_")
                and (parsed := parse_locale(h)) is not None
                and (parsed.script or loc.script) == (loc.script or parsed.script)
            )
            for candidate in candidates:
                if candidate in have:
                    return candidate
        return "en"

    def translations(
        self, chain: Sequence[str], overlay: Catalogs | None = None
    ) -> NullTranslations:
        """Translations for the first locale of ``chain``, falling back along it to English;
        in each locale, ``overlay``'s catalog (a merchant's own) before this one.

        The chain is built on copies: the cached catalogs never collect a chain's fallbacks.
        """
        result: NullTranslations | None = None
        for name in dict.fromkeys(chain):
            layers = [overlay, self] if overlay is not None else [self]
            for catalogs in layers:
                loaded = catalogs._load(name) if name != "en" else None
                if loaded is None:
                    continue
                if result is None:
                    result = copy.copy(loaded)
                else:
                    result.add_fallback(copy.copy(loaded))
        return result or NullTranslations()


@lru_cache(maxsize=1024)
def formatting_locale(wanted: str | None, catalog: str) -> str:
    """The recipient's own locale for dates and names when it shares the catalog's
    language (en_GB, fr_CA), else the catalog's: an English text gets English dates."""
    loc = parse_locale(wanted) if wanted else None
    cat = parse_locale(catalog)
    same = loc is not None and cat is not None and loc.language == cat.language
    if same and loc is not None and cat is not None and loc.script in (None, cat.script):
        return str(loc)
    return catalog


def text_direction(locale: str) -> str:
    loc = parse_locale(locale)
    return "rtl" if loc is not None and loc.character_order == "right-to-left" else "ltr"


def html_lang(locale: str) -> str:
    """BCP 47 for ``<html lang>``: ``pt_BR`` -> ``pt-BR``, ``zh_Hans`` -> ``zh-Hans``."""
    return locale.replace("_", "-")


@lru_cache(maxsize=64)
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


#: Languages whose CLDR day or joiner reads wrong inside a sentence, where messages put a
#: moment ("delivered on %(when)s"): language -> (day skeleton or None for CLDR's, the
#: joiner of a moment, the joiner of a day and a time range). Polish would need the
#: weekday's accusative ("w sobotę"), which CLDR does not have: "doręczona sob., 21
#: listopada, 10:30" reads as a list, "doręczona 21 listopada o 10:30" as a sentence.
#: Portuguese joins a day and a time with no mark at all ("sáb., 21 de novembro 10:30"),
#: and no one preposition fits every weekday ("no sáb.", "na seg."): "entregue em 21 de
#: novembro, às 10:30".
_IN_SENTENCE: dict[str, tuple[str | None, str, str]] = {
    "pl": ("MMMMd", "{1} o {0}", "{1}, {0}"),
    "pt": ("MMMMd", "{1}, às {0}", "{1}, {0}"),
}

#: the moment joiner of ``_IN_SENTENCE`` before two o'clock, where it differs
_BEFORE_TWO = {"pt": "{1}, à {0}"}


@lru_cache(maxsize=512)
def _patterns(locale: str) -> tuple[DateTimePattern, DateTimePattern, str, str]:
    """The locale's (day, short time, moment joiner, window joiner), resolved once: babel's
    skeleton matching costs ~0.3 ms a call."""
    loc = parse_locale(locale) or Locale("en")
    skeleton, at, during = _IN_SENTENCE.get(loc.language, (None, "", ""))
    day = loc.datetime_skeletons[match_skeleton(skeleton or "MMMMEEEEd", loc.datetime_skeletons)]
    time = loc.time_formats["short"]
    # The locale's own way to join them ("{1}, {0}", "{1} 'um' {0}", "{1} {0}"...).
    joiner = str(loc.datetime_formats["medium"]).replace("'", "")
    return parse_pattern(str(day)), parse_pattern(str(time)), at or joiner, during or joiner


#: An event's moment is formatted for each of its messages (email and SMS), and a delivery
#: window for each event that repeats it: the last few thousand are kept.
def when(moment: datetime, timezone: str | None, locale: str) -> str:
    """``_when``, cached by the moment's offset too where it is shown in it (equal
    moments in two offsets are one key to a plain cache)."""
    return _when(moment, None if timezone else moment.utcoffset(), timezone, locale)


@lru_cache(maxsize=4096)
def _when(moment: datetime, _offset: timedelta | None, timezone: str | None, locale: str) -> str:
    """A moment in the recipient's zone and locale, e.g. ``Sat, Nov 21, 9:30 AM``; with no
    zone known, in the moment's own offset, which the text names (``… 11:00 PM UTC-05:00``):
    the local time where it happens, as ``day`` names its day (the SMS and the email of one
    message said different days when the email fell back to UTC)."""
    local = moment.astimezone(_zone(timezone)) if timezone else moment
    loc = parse_locale(locale) or Locale("en")
    day, time, joiner, _ = _patterns(locale)
    if local.hour < 2:  # "à 01:30", "à 00:15" (a uma, a zero hora)
        joiner = _BEFORE_TWO.get(loc.language, joiner)
    text = joiner.replace("{1}", day.apply(local, loc)).replace("{0}", time.apply(local, loc))
    return text if timezone else f"{text} {offset_name(local)}"


def last_day_of(deadline: datetime, timezone: str | None, day_only: bool = False) -> datetime:
    """A deadline as messages show it, where it is read (the recipient's zone, else its own
    offset): one in the first minute of a day is shown as 23:59 the day before, so the day
    named is the last day to act: "by Wed, Dec 9, 11:59 PM", not "by Thu, Dec 10, 00:00",
    read as "Thursday still will do" (the parcel was gone by then). ``day_only`` (an SMS
    names the day alone): one before 06:00 is the day before too ("by Thu" for Thursday
    02:00 is a night, not a day, to come)."""
    local = deadline.astimezone(_zone(timezone)) if timezone else deadline
    before = EARLY_HOURS if day_only else 0
    if local.hour < before or (local.hour, local.minute) == (0, 0):
        midnight = local.replace(hour=0, minute=0, second=0, microsecond=0)
        return midnight - timedelta(minutes=1)
    return deadline


#: A deadline before this hour names the day before, where the message names a day alone.
EARLY_HOURS = 6


def offset_name(moment: datetime) -> str:
    """``UTC``, or ``UTC+01:00``, ``UTC-05:00``, ``UTC+05:45``: a moment's offset as the
    text names it when the reader's zone is unknown (ASCII: it may end up in an SMS)."""
    offset = moment.utcoffset()
    if not offset:
        return "UTC"
    total = int(offset.total_seconds())
    hours, rest = divmod(abs(total), 3600)
    minutes, seconds = divmod(rest, 60)
    text = f"UTC{'+' if total > 0 else '-'}{hours:02d}:{minutes:02d}"
    return f"{text}:{seconds:02d}" if seconds else text  # (a local mean time's seconds)


#: Languages whose SMS name a day without its weekday: es "hasta el mar, 8 de diciembre"
#: reads "mar" as the sea before martes (and "sáb" is not GSM-7): "hasta el 8 de diciembre".
_WITHOUT_WEEKDAY = {"es"}


def day(moment: datetime, timezone: str | None, locale: str) -> str:
    """``_day``, cached by the moment's offset too where it is shown in it (equal
    moments in two offsets are one key to a plain cache)."""
    return _day(moment, None if timezone else moment.utcoffset(), timezone, locale)


@lru_cache(maxsize=1024)
def _day(moment: datetime, _offset: timedelta | None, timezone: str | None, locale: str) -> str:
    """The day of a moment, as ``when`` writes it (``Thu, November 26``), in the
    recipient's zone, else in the moment's own offset (a pickup deadline's is the pickup
    point's): an SMS's pickup deadline. A day named with a Latin letter GSM-7 lacks (fr
    ``août``, pt ``março``) is written in the locale's numbers (``02/08``, ``05/03``): it
    would make a GSM-7 SMS UCS-2, two or three times the cost.
    (Other scripts are UCS-2 anyway: their SMS keep the name.)"""
    local = moment.astimezone(_zone(timezone)) if timezone else moment
    loc = parse_locale(locale) or Locale("en")
    alone = loc.language in _WITHOUT_WEEKDAY
    named = (_skeleton(locale, "MMMMd") if alone else _patterns(locale)[0]).apply(local, loc)
    lacking = outside_gsm7(named)
    if not lacking or not all(unicodedata.name(c, "").startswith("LATIN") for c in lacking):
        return named
    numeric = _skeleton(locale, "Md").apply(local, loc)
    return named if outside_gsm7(numeric) else numeric


@lru_cache(maxsize=512)
def _skeleton(locale: str, skeleton: str) -> DateTimePattern:
    """The locale's pattern closest to a CLDR ``skeleton`` (``MMMMd``, ``Md``), parsed once."""
    loc = parse_locale(locale) or Locale("en")
    return parse_pattern(
        str(loc.datetime_skeletons[match_skeleton(skeleton, loc.datetime_skeletons)])
    )


def window(start: datetime, end: datetime, timezone: str | None, locale: str) -> str:
    """``_window``, cached by the ends' offsets too where it is shown in them."""
    offsets = None if timezone else (start.utcoffset(), end.utcoffset())
    return _window(start, end, offsets, timezone, locale)


@lru_cache(maxsize=4096)
def _window(
    start: datetime,
    end: datetime,
    _offsets: tuple[timedelta | None, timedelta | None] | None,
    timezone: str | None,
    locale: str,
) -> str:
    """A delivery window, e.g. ``Tue, Nov 24, 10:00 – 14:00`` (both ends when days differ);
    with no zone known, in its start's own offset, named as ``when`` names it."""
    if timezone:
        start, end = start.astimezone(_zone(timezone)), end.astimezone(_zone(timezone))
    elif end.utcoffset() != start.utcoffset():
        end = end.astimezone(start.tzinfo)
    loc = parse_locale(locale) or Locale("en")
    if start.date() != end.date():
        return f"{when(start, timezone, locale)} – {when(end, timezone, locale)}"
    day, _, _, joiner = _patterns(locale)
    if start == end:  # a zero-length window is a time, not "10:30 – 10:30"
        return when(start, timezone, locale)
    times = _time_interval(start, end, locale)
    text = joiner.replace("{1}", day.apply(start, loc)).replace("{0}", times)
    return text if timezone else f"{text} {offset_name(start)}"


@lru_cache(maxsize=512)
def _interval_patterns(locale: str) -> dict[str, tuple[DateTimePattern, DateTimePattern]]:
    """The locale's same-day time-interval patterns by greatest differing field, parsed
    once (babel's format_interval resolves them on every call)."""
    loc = parse_locale(locale) or Locale("en")
    skeleton = match_skeleton("Hm" if _24h(loc) else "hm", loc.interval_formats)
    formats = loc.interval_formats.get(skeleton) or {}
    return {
        field: (parse_pattern(str(first)), parse_pattern(str(second)))
        for field, (first, second) in formats.items()
    }


def _time_interval(start: datetime, end: datetime, locale: str) -> str:
    """``09:30 – 13:00`` in the locale's own interval format (both already local); in the
    locale's short time joined by its interval fallback when the interval writes times
    another way than every other time in the message (ja "15時33分" next to "15:33"
    elsewhere: the window then reads "15:33" to "17:33" joined by its wave dash)."""
    loc = parse_locale(locale) or Locale("en")
    other = _other_time_style(locale)
    if other is not None:
        time = _patterns(locale)[1]
        return other.replace("{0}", time.apply(start, loc)).replace("{1}", time.apply(end, loc))
    patterns = _interval_patterns(locale)
    if start.hour // 12 != end.hour // 12 and "a" in patterns:
        field = "a"
    elif start.hour != end.hour:
        field = "H" if "H" in patterns else "h"
    else:
        field = "m"
    pair = patterns.get(field)
    if pair is None:  # a locale without interval data: babel's general formatter
        text: str = format_interval(start, end, "Hm" if _24h(loc) else "hm", locale=loc)
        return text
    return pair[0].apply(start, loc) + pair[1].apply(end, loc)


@lru_cache(maxsize=512)
def _other_time_style(locale: str) -> str | None:
    """The locale's interval fallback (``{0} – {1}``) when its time-interval pattern does not
    write a time as its short time format does (spacing and quoted words aside), else None."""
    loc = parse_locale(locale) or Locale("en")
    patterns = _interval_patterns(locale)
    if not patterns:
        return None
    plain = re.compile(r"'[^']*'|[\s\u202f\u2009\u00a0]")
    short = plain.sub("", str(loc.time_formats["short"]))
    end = plain.sub("", str(next(iter(patterns.values()))[1].pattern))
    fallback = loc.interval_formats.get(None)
    if short in end or not isinstance(fallback, str):
        return None
    return fallback


def _24h(loc: Locale) -> bool:
    return "H" in str(loc.time_formats["short"])


def ago(moment: datetime, now: datetime, locale: str) -> str:
    """How long ago, in words: ``3 hours ago``, ``il y a 3 heures``."""
    loc = parse_locale(locale) or Locale("en")
    text: str = format_timedelta(moment - now, add_direction=True, locale=loc)
    return text


def country_name(code: str, locale: str) -> str:
    loc = parse_locale(locale)
    name = loc.territories.get(code) if loc is not None else None
    return str(name or code)
