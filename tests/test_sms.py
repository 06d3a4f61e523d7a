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
