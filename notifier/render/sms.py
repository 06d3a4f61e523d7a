"""SMS encoding and segment counting (GSM 03.38 septets vs UCS-2 code units)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

# GSM 03.38 default alphabet (without the escape character itself) and its extension table.
_BASIC = set(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
_EXTENDED = set("^{}\\[~]|€\f")


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


def _gsm_units(ch: str) -> int | None:
    if ch in _BASIC:
        return 1
    if ch in _EXTENDED:
        return 2
    return None


def _segments(units: list[int], single: int, part: int) -> int:
    """Greedy split where a multi-unit character (escape pair, surrogate pair) never straddles."""
    total = sum(units)
    if total <= single:
        return 1 if total else 0
    count, used = 1, 0
    for size in units:
        if used + size > part:
            count, used = count + 1, 0
        used += size
    return count


def measure(text: str) -> SmsSize:
    """Encoding and segment count of ``text`` as a carrier would send it."""
    gsm = [_gsm_units(ch) for ch in text]
    if all(u is not None for u in gsm):
        septets = [u for u in gsm if u is not None]
        return SmsSize(SmsEncoding.GSM7, _segments(septets, 160, 153), sum(septets))
    utf16 = [2 if ord(ch) > 0xFFFF else 1 for ch in text]
    return SmsSize(SmsEncoding.UCS2, _segments(utf16, 70, 67), sum(utf16))
