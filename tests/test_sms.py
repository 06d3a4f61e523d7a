"""SMS encoding and segment counting against public test vectors (tests/data/sms_segments.json).

The vectors come from the MIT-licensed suites of TwilioDevEd/message-segment-calculator,
trt2/gsm-charset-utils and Codesleuth/split-sms, plus cases computed with Twilio's
calculator; each case names its source. See tests/data/README.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from notifier.render import sms
from notifier.render.sms import SmsEncoding, measure, smart_encode

CASES: list[dict[str, Any]] = json.loads(
    (Path(__file__).parent / "data" / "sms_segments.json").read_text(encoding="utf-8")
)


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_segment_vectors(case: dict[str, Any]) -> None:
    text = case["text"]
    if "Smart Encoding on" in case["name"]:
        text = smart_encode(text)
    size = measure(text)
    assert size.encoding.value == case["expected_encoding"]
    assert size.segments == case["expected_segments"]
    assert size.units == case["expected_chars_or_units"]


def test_extension_character_is_never_split() -> None:
    text = "a" * 152 + "€" + "b" * 10  # the € would straddle the 153-septet boundary
    size = measure(text)
    assert (size.encoding, size.segments, size.units) == (SmsEncoding.GSM7, 2, 164)


def test_smart_encoding_keeps_typographic_text_in_gsm7() -> None:
    text = smart_encode("Your parcel\u2019s \u201cout for delivery\u201d \u2013 today\u2026")
    assert text == 'Your parcel\'s "out for delivery" - today...'
    assert measure(text).encoding is SmsEncoding.GSM7


def test_empty_text_is_one_segment() -> None:
    assert measure("").segments == 1


def _measured_char_by_char(text: str) -> tuple[SmsEncoding, int, int]:
    """The count ``measure`` made before its shortcuts: every character looked at."""
    gsm = [1 if ch in sms._BASIC else 2 if ch in sms._EXTENDED else None for ch in text]
    if all(u is not None for u in gsm):
        septets = [u for u in gsm if u is not None]
        return SmsEncoding.GSM7, sms._segments(septets, 160, 153), sum(septets)
    utf16 = sms._clusters(text)
    return SmsEncoding.UCS2, sms._segments(utf16, 70, 67), sum(utf16)


_LETTERS = st.sampled_from(
    sorted(sms._BASIC)
    + sorted(sms._EXTENDED)
    + ["é", "ş", "中", "\u0301", "\u200d", "\ufe0f", "\U0001f600", "\U0001f3fd", "\ud800"]
)


@settings(max_examples=400)
@given(st.text(_LETTERS, max_size=400) | st.text(max_size=200))
def test_shortcuts_count_as_every_character_looked_at(text: str) -> None:
    size = measure(text)
    assert (size.encoding, size.segments, size.units) == _measured_char_by_char(text)


def test_lengths_at_the_segment_edges() -> None:
    for n, segments in ((160, 1), (161, 2), (306, 2), (307, 3)):
        assert measure("a" * n).segments == segments
    for n, segments in ((70, 1), (71, 2), (134, 2), (135, 3)):
        assert measure("中" * n).segments == segments
    # an escape pair never straddles: 152 letters then "€" goes whole to the second part
    assert measure("a" * 152 + "€" + "a" * 10).segments == 2
