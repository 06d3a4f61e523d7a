"""Signed requests, both ways: what ``X-Notifier-Signature`` holds and how it is checked.

Like Stripe's: ``t=<unix time>,v1=<hex HMAC-SHA256 of "<t>.<body>">``, one ``v1`` per live
secret. The tracking backend may sign its ingest requests so
(``NOTIFIER_INGEST_SIGNING_SECRETS``), and the worker signs the webhook events it posts to
merchants. Kept apart from the API so that a worker, which only signs, does not import
aiohttp.
"""

from __future__ import annotations

import hashlib
import hmac
import re

from notifier.errors import Unauthorized

#: The header a signed request carries (ingest, and webhook events to merchants).
SIGNATURE_HEADER = "X-Notifier-Signature"
_SIGNATURE_PART = re.compile(r"\s*(t|v1)=([0-9a-fA-F]{1,128})\s*")


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The ``v1`` HMAC-SHA256 (hex) of ``"<timestamp>.<body>"``."""
    return hmac.new(secret.encode(), b"%d." % timestamp + body, hashlib.sha256).hexdigest()


def verify_signature(
    header: str | None, body: bytes, secrets: list[str], now: float, tolerance_s: int
) -> None:
    """401 naming the problem unless ``header`` (``t=<unix time>,v1=<hex>[,v1=…]``) signs
    ``body`` with one of ``secrets`` and its time is within ``tolerance_s`` of ``now``."""
    if not header:
        raise Unauthorized(f"missing {SIGNATURE_HEADER}: this service takes signed requests only")
    timestamp, signatures = None, []
    for part in header.split(","):
        match = _SIGNATURE_PART.fullmatch(part)
        if match is None:
            raise Unauthorized(f"{SIGNATURE_HEADER} must look like t=<unix time>,v1=<hex digest>")
        if match[1] == "t":
            timestamp = int(match[2]) if match[2].isdigit() and len(match[2]) <= 12 else -1
        else:
            signatures.append(match[2].lower())
    if timestamp is None or timestamp < 0 or not signatures:
        raise Unauthorized(f"{SIGNATURE_HEADER} needs one t=<unix time> and a v1=<hex digest>")
    if abs(now - timestamp) > tolerance_s:
        raise Unauthorized(
            f"{SIGNATURE_HEADER} timestamp is more than {tolerance_s} s from the server's "
            "clock (a replay, or a clock that is off)"
        )
    expected = [signature(secret, timestamp, body) for secret in secrets]
    # every pair compared in constant time, no early exit
    if not sum(hmac.compare_digest(e, s) for e in expected for s in signatures):
        raise Unauthorized(f"{SIGNATURE_HEADER} does not match the body with any signing secret")


def signature_header(secrets: list[str], timestamp: int, body: bytes) -> str:
    """``t=<timestamp>,v1=<hex>`` with one ``v1`` per secret."""
    return ",".join([f"t={timestamp}", *(f"v1={signature(s, timestamp, body)}" for s in secrets)])
