"""SMS encoding and segment counting (GSM 03.38 septets vs UCS-2 code units)."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from enum import StrEnum

# GSM 03.38 default alphabet (without the escape character itself) and its extension table.
_BASIC = set(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
_EXTENDED = set("^{}\\[~]|€\f")

# Typographic characters with a plain GSM-7 equivalent, replaced before sending the way
# Twilio's "Smart Encoding" does: one curly quote must not turn a message into UCS-2
# (70 instead of 160 characters per segment).
_SMART = str.maketrans(
    {
        **dict.fromkeys("\u201c\u201d\u201e\u201f\u2033\u00ab\u00bb", '"'),
        **dict.fromkeys("\u2018\u2019\u201a\u201b\u2032\u2035", "'"),
        **dict.fromkeys("\u2010\u2011\u2012\u2013\u2014\u2015\u2212", "-"),
        **dict.fromkeys(
            "\u00a0\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u202f\u205f",
            " ",
        ),
        "\u2026": "...",
        "\u2022": "-",
        "\u200b": "",
        "\ufeff": "",
    }
)
_ZWJ = "\u200d"


class SmsEncoding(StrEnum):
    """How an SMS body travels."""

    GSM7 = "GSM-7"  #: 7-bit default alphabet: 160 septets, 153 per part when split
    UCS2 = "UCS-2"  #: UTF-16: 70 code units, 67 per part when split


@dataclass(frozen=True, slots=True)
class SmsSize:
    """Encoding, segment count and length in the encoding's units."""

    encoding: SmsEncoding
    segments: int
    units: int


def smart_encode(text: str) -> str:
    """Replace typographic punctuation and odd spaces with their GSM-7 equivalents."""
    return text.translate(_SMART)


def _attaches(ch: str, previous: str) -> bool:
    """Whether ``ch`` belongs to the grapheme cluster before it (emoji sequences, marks)."""
    code = ord(ch)
    return (
        previous == _ZWJ
        or ch == _ZWJ
        or 0xFE00 <= code <= 0xFE0F  # variation selectors
        or 0x1F3FB <= code <= 0x1F3FF  # skin-tone modifiers
        or 0xE0020 <= code <= 0xE007F  # tag sequences (subdivision flags)
        or unicodedata.combining(ch) != 0
    )


def _clusters(text: str) -> list[int]:
    """UTF-16 length of each grapheme cluster; a cluster never straddles two segments."""
    sizes: list[int] = []
    previous = ""
    for ch in text:
        units = 2 if ord(ch) > 0xFFFF else 1
        if sizes and _attaches(ch, previous):
            sizes[-1] += units
        else:
            sizes.append(units)
        previous = ch
    return sizes


def _segments(units: list[int], single: int, part: int) -> int:
    """Greedy split where a multi-unit character (escape pair, emoji cluster) never straddles."""
    total = sum(units)
    if total <= single:
        return 1
    count, used = 1, 0
    for size in units:
        if used + size > part:
            count, used = count + 1, 0
        used += size
    return count


_GSM = _BASIC | _EXTENDED


def outside_gsm7(text: str) -> set[str]:
    """The characters of ``text`` that GSM-7 lacks (after ``smart_encode``): any makes the
    SMS UCS-2."""
    return set(smart_encode(text)) - _GSM


def measure(text: str) -> SmsSize:
    """Encoding and segment count of ``text`` as sent (apply ``smart_encode`` first).

    The character-by-character split is needed only where a character of two units
    could straddle two segments: the common texts (the basic alphabet alone, or anything
    that fits one segment) are counted from their length (every message is measured)."""
    letters = set(text)
    if letters <= _BASIC:
        n = len(text)
        return SmsSize(SmsEncoding.GSM7, 1 if n <= 160 else -(-n // 153), n)
    if letters <= _GSM:
        septets = [2 if ch in _EXTENDED else 1 for ch in text]
        return SmsSize(SmsEncoding.GSM7, _segments(septets, 160, 153), sum(septets))
    units = len(text.encode("utf-16-le", "surrogatepass")) // 2
    if units <= 70:
        return SmsSize(SmsEncoding.UCS2, 1, units)
    utf16 = _clusters(text)
    return SmsSize(SmsEncoding.UCS2, _segments(utf16, 70, 67), sum(utf16))
