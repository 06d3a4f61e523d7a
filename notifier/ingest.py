"""POST /v1/transitions: validate → authorize → idempotency + persist (one script) → wake → 202."""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import re
import time
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web
from pydantic import ValidationError
from redis.exceptions import RedisError

from notifier import metrics
from notifier.errors import (
    BadRequest,
    Forbidden,
    IdempotencyConflict,
    PayloadTooLarge,
    ServiceUnavailable,
    TooManyRequests,
    Unauthorized,
    UnsupportedMediaType,
    ValidationFailed,
    plain_words,
)
from notifier.insights.journeys import OWN_EVENTS
from notifier.logs import REQUEST_ID
from notifier.models import MERCHANT_ID_PATTERN, NOT_A_PLACE, Transition
from notifier.resources import Resources
from notifier.settings import HASHED_KEY, is_loopback
from notifier.signing import SIGNATURE_HEADER, verify_signature
from notifier.store import Admission, IngestItem, NotReplicated, PartlyStored, body_digest, wake

log = logging.getLogger(__name__)

RETRY_AFTER_S = "5"


class RateLimiter:
    """A token bucket per key digest, in this process: ``rate`` requests a second, bursts
    of ``burst``; 429 with Retry-After when a key is over. Idle keys cost nothing."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.rate, self.burst, self.clock = rate, burst, clock
        self._buckets: dict[bytes, tuple[float, float]] = {}

    def take(self, digest: bytes) -> None:
        if self.rate <= 0:
            return
        now = self.clock()
        tokens, then = self._buckets.get(digest, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - then) * self.rate)
        if tokens < 1:
            self._buckets[digest] = (tokens, now)
            wait = math.ceil((1 - tokens) / self.rate)
            raise TooManyRequests(
                f"this API key is over its limit of {self.rate:g} requests a second "
                f"(bursts of {self.burst}); retry in {wait} s",
                headers={"Retry-After": str(wait)},
            )
        self._buckets[digest] = (tokens - 1, now)
        if len(self._buckets) > 10_000:  # keys are few; this only bounds a flood of them
            self._buckets.clear()


class KeyRing:
    """API keys → merchants, compared in constant time (by SHA-256 digest, no early exit)."""

    def __init__(
        self,
        keys: dict[str, list[str]],
        limiter: RateLimiter | None = None,
        *,
        loopback_only: bool = False,
    ) -> None:
        self.limiter = limiter or RateLimiter(0, 1)
        #: the keys are embedded mode's public development key: taken only from requests
        #: addressed to this machine's loopback (``settings.DEV_API_KEY``)
        self.loopback_only = loopback_only
        # only digests are kept; a key configured as "sha256:<hex>" never existed here
        self._entries = [
            (
                bytes.fromhex(key.removeprefix(HASHED_KEY))
                if key.startswith(HASHED_KEY)
                else hashlib.sha256(key.encode()).digest(),
                frozenset(merchants),
            )
            for key, merchants in keys.items()
        ]

    def merchants_for(self, presented: str) -> frozenset[str] | None:
        """The merchants ``presented`` may act for, or None for an unknown key."""
        return self.merchants_for_digest(_sha256(presented))

    def merchants_for_digest(self, digest: bytes) -> frozenset[str] | None:
        """The merchants of the key with this SHA-256 digest, or None for none configured."""
        found: frozenset[str] | None = None
        for candidate, merchants in self._entries:
            if hmac.compare_digest(candidate, digest):
                found = merchants
        return found

    def key_id(self, request: web.Request) -> str:
        """A name for the caller's key that the audit log can show: a digest, never the key."""
        token = request.headers.get("Authorization", "").partition(" ")[2].strip()
        return "key_" + _sha256(token).hex()[:12]

    def check_host(self, request: web.Request) -> None:
        """403 for the development key on a request addressed to a name that is not this
        machine's loopback: a web page whose name was re-bound to 127.0.0.1, or a proxy or
        tunnel that publishes this service, must not act with a key the README prints."""
        proxied = any(name in request.headers for name in _PROXY_HEADERS)
        if self.loopback_only and (proxied or not is_loopback(request.host)):
            raise Forbidden(
                "the development API key is only taken from this machine (a request to "
                "127.0.0.1 or localhost, not through a proxy); set NOTIFIER_API_KEYS to "
                "reach the service by another name or through a proxy"
            )

    def authenticate(self, request: web.Request) -> frozenset[str]:
        """The caller's merchants; 401 without a valid bearer key."""
        self.check_host(request)
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized(
                "missing API key: send 'Authorization: Bearer <key>'",
                headers={"WWW-Authenticate": "Bearer"},
            )
        digest = _sha256(token.strip())
        merchants = self.merchants_for_digest(digest)
        if merchants is None:
            raise Unauthorized("unknown API key", headers={"WWW-Authenticate": "Bearer"})
        self.limiter.take(digest)
        return merchants


#: what a proxy or tunnel adds, which may also have rewritten Host to 127.0.0.1
_PROXY_HEADERS = ("Forwarded", "X-Forwarded-For", "X-Forwarded-Host", "X-Real-IP", "Via")


def _sha256(text: str) -> bytes:
    """The SHA-256 of a header's text; bytes that were no UTF-8 (they arrive as surrogate
    escapes) are hashed as they came: an unknown key, not an error."""
    return hashlib.sha256(text.encode(errors="surrogateescape")).digest()


def may_act_for(merchants: frozenset[str], merchant_id: str) -> bool:
    """Whether a key scoped to ``merchants`` may act for ``merchant_id``."""
    return "*" in merchants or merchant_id in merchants


def _field(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(body)"


def _a_number(text: str) -> bool:
    """Whether ``text`` is a number (``1795000000``, ``1.8e9``), which pydantic reads as
    seconds (or milliseconds) since 1970."""
    try:
        float(text)
    except ValueError:
        return False
    return True


_MOMENT = "must be an ISO 8601 date and time with its offset, like 2026-11-21T09:30:00+01:00"
_NO_PLACE = (
    "must be the time zone of a place, like Europe/Paris: not the server's own (localtime), "
    "Factory, or a posix/ or right/ copy"
)
_RESERVED = (
    "must not start with "
    + " or ".join(repr(p) for p in OWN_EVENTS)
    + ": notifier gives those ids to the events it makes itself (stall and delay notices)"
)


def _as_sent(item: Any) -> list[tuple[str, str]]:
    """What pydantic would take but the contract does not (DESIGN §3): a date as a number,
    or a number as text (read as seconds since 1970), a coordinate as text or ``true``
    (read as 1.0), an event id notifier keeps for its own events, and a time zone of no
    place (``models.NOT_A_PLACE``). Checked on what the API takes only: the worker reads
    what the inbox holds as it always did (an entry taken before still reads, and
    notifier's own events go through it), at no cost a transition."""
    if not isinstance(item, dict):
        return []
    out = []
    event_id = item.get("event_id")
    if isinstance(event_id, str) and event_id.startswith(OWN_EVENTS):
        # the ids of the events notifier makes itself (a stall, a predicted delay): one
        # posted could take a real notice's id, and would be read as notifier's own
        out.append(("event_id", _RESERVED))
    recipient = item.get("recipient")
    zone = recipient.get("timezone") if isinstance(recipient, dict) else None
    if isinstance(zone, str) and NOT_A_PLACE.fullmatch(zone):
        out.append(("recipient.timezone", _NO_PLACE))
    window = item.get("estimated_delivery")
    window = window if isinstance(window, dict) else {}
    for name, value in (
        ("occurred_at", item.get("occurred_at")),
        ("pickup_deadline", item.get("pickup_deadline")),
        ("estimated_delivery.start", window.get("start")),
        ("estimated_delivery.end", window.get("end")),
    ):
        if value is not None and (not isinstance(value, str) or _a_number(value)):
            out.append((name, _MOMENT))
    where = item.get("location")
    for axis in ("lat", "lon"):
        value = where.get(axis) if isinstance(where, dict) else None
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            out.append((f"location.{axis}", "must be a number"))
    return out


def _detail(index: int | None, field: str, message: str) -> dict[str, Any]:
    """An error detail: the item's index (in a batch), the field, what is wrong."""
    at: dict[str, Any] = {} if index is None else {"index": index}
    return {**at, "field": field, "message": message}


def _sent_wrong(item: Any, index: int | None) -> list[dict[str, Any]]:
    """``_as_sent``'s problems as error details."""
    return [_detail(index, field, why) for field, why in _as_sent(item)]


def _errors(exc: ValidationError, index: int | None) -> list[dict[str, Any]]:
    """Each field pydantic refused, in plain words ("must not be empty", "is not a known
    field"), not its own ("String should have at least 1 character", "Value error, …")."""
    return [
        _detail(index, _field(err["loc"]), plain_words(err, api=True))
        for err in exc.errors(include_url=False, include_input=False)
    ]


async def read_json(request: web.Request, limit: int) -> Any:
    """The request body as JSON; 413/415/400 naming the problem."""
    return _parse(await _read_body(request, limit))


def _parse(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        try:
            raw.decode()
        except UnicodeDecodeError as bad:
            raise BadRequest(
                f"body is not valid UTF-8: byte 0x{raw[bad.start]:02x} at position {bad.start}"
            ) from exc
        raise BadRequest(f"body is not valid JSON: {exc}") from exc


#: the request bodies' Content-Encodings read (aiohttp decodes them as the body is read; the
#: body size limit counts what they decode to)
ENCODINGS = ("identity", "gzip", "deflate", "br", "zstd")


async def _read_body(request: web.Request, limit: int) -> bytes:
    """The JSON request body as it came; 413/415 naming the problem."""
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"body is {request.content_length} bytes; the limit is {limit}")
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ENCODINGS:
        raise UnsupportedMediaType(
            f"Content-Encoding {encoding[:40]!r} is not supported: send gzip, deflate, br, "
            "zstd or none"
        )
    if request.content_type != "application/json":
        raise UnsupportedMediaType(
            f"Content-Type must be application/json, not {request.content_type or 'missing'}"
        )
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise PayloadTooLarge(f"body is over the limit of {limit} bytes") from exc
    except web.RequestPayloadError as exc:
        # a body that does not inflate as its Content-Encoding says, or a broken transfer
        why = getattr(exc.__cause__, "message", None) or "broken transfer"
        raise BadRequest(f"the body could not be read: {why}") from exc


async def _persist(res: Resources, payloads: list[IngestItem]) -> tuple[list[Admission], list[int]]:
    """``Store.ingest``, its failures answered 503 with Retry-After (the caller retries; what
    was stored already is then a duplicate)."""
    try:
        return await res.store.ingest(payloads)  # (a success ends an outage: error_middleware)
    except NotReplicated as exc:
        log.error("ingest: %s", exc)
        metrics.transitions({"unconfirmed": len(payloads)})
        await _wake(res, exc.take_woken())  # stored on the primary: its drain need not wait
        raise ServiceUnavailable(
            f"stored, but only {exc.acked} of the {exc.required} Redis replicas required "
            "confirmed it in time; retry later (the same events are then answered as "
            "duplicates, never processed twice)",
            headers={"Retry-After": RETRY_AFTER_S},
        ) from exc
    except (RedisError, OSError) as exc:
        cause = exc.failure if isinstance(exc, PartlyStored) else exc
        res.outage.failed(f"ingest could not persist {len(payloads)} transitions", cause)
        if isinstance(exc, PartlyStored):  # the other partitions' calls stored theirs
            await _wake(res, exc.take_woken())
        raise ServiceUnavailable(
            "the queue cannot take transitions right now; retry later",
            headers={"Retry-After": RETRY_AFTER_S},
        ) from exc


async def _wake(res: Resources, partitions: list[int]) -> None:
    try:
        await wake(res.queue, partitions)
    except (RedisError, OSError) as exc:
        # Persisted already: the worker's sweep finds the backlog even without this job.
        log.warning("could not enqueue a drain job (%s); the sweep will pick it up", exc)


def _items(body: Any, max_batch: int) -> tuple[list[Any], bool]:
    """The transitions in ``body`` and whether it was a batch."""
    if not isinstance(body, dict):
        raise ValidationFailed(
            'body must be a transition object or {"transitions": [...]}',
            [{"field": "(body)", "message": "expected a JSON object"}],
        )
    if "transitions" not in body:
        return [body], False
    items = body["transitions"]
    extra = sorted(set(body) - {"transitions"})
    if extra:
        raise ValidationFailed(
            "a batch body has only the 'transitions' field",
            [{"field": name, "message": "is not a known field"} for name in extra],
        )
    if not isinstance(items, list) or not items:
        raise ValidationFailed(
            "'transitions' must be a non-empty list",
            [{"field": "transitions", "message": "expected a non-empty list"}],
        )
    if len(items) > max_batch:
        raise ValidationFailed(
            f"a batch holds at most {max_batch} transitions, this one has {len(items)}",
            [{"field": "transitions", "message": f"at most {max_batch} items"}],
        )
    return items, True


#: a well-formed merchant id (``models.MerchantId``)
_MERCHANT_ID = re.compile(MERCHANT_ID_PATTERN)


def _denied(
    items: list[Any], valid: list[tuple[int, Transition]], merchants: frozenset[str]
) -> list[int]:
    """The items the key may not post for, valid or not (an invalid one's merchant as it was
    sent, when it is a merchant id): any refuses the batch whole."""
    of = {i: t.merchant_id for i, t in valid}
    for index, item in enumerate(items):
        sent = item.get("merchant_id") if isinstance(item, dict) else None
        if index not in of and isinstance(sent, str) and _MERCHANT_ID.fullmatch(sent):
            of[index] = sent  # (a malformed one is a 422 naming it, as before)
    return sorted(i for i, m in of.items() if not may_act_for(merchants, m))


def _validate(
    items: list[Any], batch: bool
) -> tuple[list[tuple[int, Transition]], list[dict[str, Any]]]:
    """(the valid items with their index, the problems of the others: each field named)."""
    valid: list[tuple[int, Transition]] = []
    details: list[dict[str, Any]] = []
    for index, item in enumerate(items):
        try:
            t = Transition.model_validate(item)
        except ValidationError as exc:
            found = _errors(exc, index if batch else None)
            named = {d["field"] for d in found}
            details += found
            details += [
                d for d in _sent_wrong(item, index if batch else None) if d["field"] not in named
            ]
            continue
        if wrong := _sent_wrong(item, index if batch else None):
            details += wrong
            continue
        valid.append((index, t))
    return valid, details


def _partly_invalid(reply: dict[str, Any], items: int, conflicts: int) -> str:
    """The message of a batch's 422: how many items are invalid (and conflicts), and what
    became of the others."""
    also = f" and {conflicts} reuse an event_id with another body (refused)" if conflicts else ""
    taken = reply["accepted"] + reply["duplicates"]
    return f"{reply['rejected']} of {items} transitions are invalid{also}; " + (
        "the others were taken (accepted, or duplicates of ones already taken: see results)"
        if taken
        else "none was taken (see results)"
    )


async def post_transitions(request: web.Request, res: Resources, keys: KeyRing) -> web.Response:
    """Accept one transition or a batch (DESIGN.md §3)."""
    merchants = keys.authenticate(request)
    raw = await _read_body(request, res.settings.max_body_bytes)
    if res.settings.ingest_signing_secrets:
        verify_signature(
            request.headers.get(SIGNATURE_HEADER),
            raw,
            res.settings.ingest_signing_secrets,
            res.clock().timestamp(),
            res.settings.ingest_signature_tolerance_s,
        )
    body = _parse(raw)
    items, batch = _items(body, res.settings.max_batch)

    valid, details = _validate(items, batch)
    denied = _denied(items, valid, merchants)
    if denied:
        raise Forbidden(
            "this API key may not post for that merchant",
            [
                {"index": i, "field": "merchant_id", "message": "not allowed for this API key"}
                for i in denied
            ]
            if batch
            else [{"field": "merchant_id", "message": "not allowed for this API key"}],
        )
    if not valid and not batch:
        metrics.transitions({"rejected": len(items)})
        raise ValidationFailed("the transition is invalid", details)

    # The inbox keeps each item as it came (it passed validation; the worker validates it
    # again into the same Transition): a single transition is the body itself.
    payloads = [
        (
            t.merchant_id,
            t.shipment_id,
            t.event_id,
            orjson.dumps(items[i]) if batch else raw,
            body_digest(items[i]),
            REQUEST_ID.get(),
        )
        for i, t in valid
    ]
    admissions: list[Admission] = []
    if payloads:  # (a batch of invalid items only answers as any other with some: below)
        admissions, woken = await _persist(res, payloads)
        await _wake(res, woken)

    metrics.transitions(
        {
            **{a.value: admissions.count(a) for a in Admission},
            "rejected": len(items) - len(valid),
        }
    )
    by_index = {i: a for (i, _), a in zip(valid, admissions, strict=True)}
    results: list[dict[str, Any]] = []
    for index, item in enumerate(items):
        event_id = item.get("event_id") if isinstance(item, dict) else None
        if not isinstance(event_id, str):
            event_id = None  # an invalid item's event_id may be anything; results carry text
        status = by_index[index].value if index in by_index else "rejected"
        results.append({"index": index, "event_id": event_id, "status": status})
    reply: dict[str, Any] = {
        "accepted": admissions.count(Admission.ACCEPTED),
        "duplicates": admissions.count(Admission.DUPLICATE),
        "results": results,
    }
    conflicts = [i for i, a in by_index.items() if a is Admission.CONFLICT]
    if conflicts:
        reply["conflicts"] = len(conflicts)
    if not details and not conflicts:
        return web.Response(status=202, body=orjson.dumps(reply), content_type="application/json")
    refused = [
        _detail(i if batch else None, "event_id", "already used with another body")
        for i in conflicts
    ]
    error: ValidationFailed | IdempotencyConflict
    if details:
        # Some items are invalid: 422 naming them, while the valid ones are accepted and
        # listed. A caller that resends the whole batch only gets duplicates for those. An
        # item refused as a conflict is named too: it was not taken either.
        reply["rejected"] = len(items) - len(valid)
        error = ValidationFailed(
            _partly_invalid(reply, len(items), len(conflicts)),
            sorted(details + refused, key=lambda d: int(d.get("index", 0))),
        )
    else:
        # An event id seen before with another body: refused, never processed (Stripe's rule
        # for idempotency keys); the same body again stays a plain duplicate.
        error = IdempotencyConflict(
            "event_id was already used for a transition with another body; a new event needs "
            "a new event_id" + (" (the other items are listed in results)" if batch else ""),
            refused,
        )
    body = {**error.body(), **reply} if batch or details else error.body()
    return web.Response(
        status=error.status, body=orjson.dumps(body), content_type="application/json"
    )
