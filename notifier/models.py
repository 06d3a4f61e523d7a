"""The contract's data: status vocabulary, transitions, decisions (DESIGN.md §2-§3, §5)."""

from __future__ import annotations

import hashlib
import re
import zlib
import zoneinfo
from datetime import datetime
from enum import StrEnum
from functools import lru_cache
from typing import Annotated, Any, Literal, Self, TypeVar
from urllib.parse import quote

import orjson
from babel import Locale, UnknownLocaleError
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from notifier.packing import NOTIFICATION, Damaged, pack, unpack

_Model = TypeVar("_Model", bound=BaseModel)


def assembled(cls: type[_Model], values: dict[str, Any]) -> _Model:
    """A model of already validated values, every field given in its order: what
    ``model_construct`` makes, without its per-field alias and default look-ups (the
    worker's hot path builds tens of thousands a second)."""
    model = cls.__new__(cls)
    object.__setattr__(model, "__dict__", values)
    object.__setattr__(model, "__pydantic_fields_set__", set(values))
    object.__setattr__(model, "__pydantic_extra__", None)
    object.__setattr__(model, "__pydantic_private__", None)
    return model


def replaced(model: _Model, update: dict[str, Any]) -> _Model:
    """``model.model_copy(update=update)`` for already validated values (each a field's):
    a third cheaper, as ``assembled`` (the worker changes a shipment's state this way a few
    times a transition)."""
    values = model.__dict__.copy()
    values.update(update)
    return assembled(type(model), values)


class Status(StrEnum):
    """Normalized shipment status (DESIGN.md §2)."""

    INFO_RECEIVED = "info_received"  #: label created, no parcel yet
    PICKED_UP = "picked_up"  #: carrier has the parcel
    IN_TRANSIT = "in_transit"  #: a scan en route between facilities
    ARRIVED_AT_FACILITY = "arrived_at_facility"  #: scanned into a hub or depot
    DEPARTED_FACILITY = "departed_facility"  #: scanned out of a hub or depot
    OUT_FOR_DELIVERY = "out_for_delivery"  #: on the vehicle for delivery today
    DELIVERY_ATTEMPT_FAILED = "delivery_attempt_failed"  #: courier could not deliver
    AVAILABLE_FOR_PICKUP = "available_for_pickup"  #: waiting at a pickup point
    DELIVERED = "delivered"  #: delivered
    RETURNED_TO_SENDER = "returned_to_sender"  #: on its way back, or back, to the merchant
    EXCEPTION = "exception"  #: something went wrong; exception_code says what


class ExceptionCode(StrEnum):
    """What went wrong when ``status`` is ``exception``."""

    DELAYED = "delayed"  #: running late
    WEATHER_DELAY = "weather_delay"  #: held up by weather
    CUSTOMS_HOLD = "customs_hold"  #: held by customs
    ADDRESS_ISSUE = "address_issue"  #: address incomplete or wrong
    RECIPIENT_UNAVAILABLE = "recipient_unavailable"  #: nobody to receive it
    DAMAGED = "damaged"  #: parcel damaged
    LOST = "lost"  #: parcel lost
    REFUSED = "refused"  #: delivery refused
    HELD_AT_FACILITY = "held_at_facility"  #: held at a carrier facility
    OTHER = "other"  #: anything else


class ChannelKind(StrEnum):
    """How a message reaches the customer."""

    EMAIL = "email"
    SMS = "sms"


class Outcome(StrEnum):
    """What the pipeline decided for one transition on one channel (DESIGN.md §5)."""

    SENT = "sent"  #: a message was (or is being) delivered
    DEFERRED = "deferred"  #: held until a later time
    SUPPRESSED = "suppressed"  #: a rule said no; the reason names it
    FLAGGED = "flagged"  #: an anomaly; recorded, not notified


#: Progress order of statuses; a later status never gives way to an earlier one.
STATUS_RANK: dict[Status, int] = {
    Status.INFO_RECEIVED: 0,
    Status.PICKED_UP: 1,
    Status.IN_TRANSIT: 2,
    Status.ARRIVED_AT_FACILITY: 2,
    Status.DEPARTED_FACILITY: 2,
    Status.EXCEPTION: 2,
    Status.OUT_FOR_DELIVERY: 3,
    Status.DELIVERY_ATTEMPT_FAILED: 3,
    Status.AVAILABLE_FOR_PICKUP: 4,
    Status.DELIVERED: 5,
    Status.RETURNED_TO_SENDER: 5,
}


def news_rank(t: Transition, reached: int) -> int:
    """How far along a message about ``t`` is, for which message overtakes which: its
    status's step; an exception happens at the step the shipment had reached (``reached``,
    its furthest), so "the courier could not reach you" while out for delivery overtakes an
    "arrives today" not sent yet, and a depot scan after it does not overtake it."""
    rank = STATUS_RANK[t.status]
    return max(rank, reached) if t.status is Status.EXCEPTION else rank


# Identifiers end up in Redis keys, file names and outbox paths: keep them to a safe
# alphabet. A merchant id has no ":" so "ntf:<kind>:<merchant_id>:<rest>" keys are unambiguous.
MERCHANT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
MerchantId = Annotated[str, StringConstraints(pattern=MERCHANT_ID_PATTERN)]
IDENTIFIER_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$"
Identifier = Annotated[str, StringConstraints(pattern=IDENTIFIER_PATTERN)]
#: ISO 3166 alpha-2, as a location's ``country`` is written.
COUNTRY_PATTERN = r"^[A-Z]{2}$"
#: The longest an identifier (an event id, a shipment id) may be.
EVENT_ID_MAX = 128
#: Line breaks and tabs, with the spaces around them: one space in customers' text.
_BREAKS = re.compile(r"\s*[\t\n\v\f\r\x1c-\x1f\x85\u2028\u2029]\s*")
#: The other control characters (C0, DEL, C1): never part of a name, an address or a code.
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_ODD = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def one_line(value: str) -> str:
    """Free text as one line: line breaks and tabs become a space, other control characters
    go. Text that carriers and shops send is shown to customers (email bodies, SMS, subjects)
    and kept; a stray CR/LF or NUL must reach neither a header nor a message, and must not
    cost the customer the notification (nor, when read back, an event stored before)."""
    if _ODD.search(value) is None:
        return value
    return _CONTROLS.sub("", _BREAKS.sub(" ", value)).strip()


def _some_text(value: str) -> str:
    value = one_line(value)
    if not value:
        raise ValueError("must hold some text, not only control characters")
    return value


ShortText = Annotated[
    str,
    StringConstraints(min_length=1, max_length=200, strip_whitespace=True),
    AfterValidator(_some_text),
]
# Pragmatic, not RFC 5321 in full: one @, no spaces, specials or control characters, a
# dotted domain whose labels may be internationalized (anä@exämple.com is a real address).
# fullmatch, not match: "$" would let a trailing newline through, and "ana@example.com\n"
# would then escape an opt-out recorded for ana@example.com.
_EMAIL = re.compile(r"[^@\s<>()\[\],;:\"\x00-\x1f\x7f-\x9f]+@(?:[\w-]+\.)+[\w-]{2,}")
#: E.164, as transitions carry numbers and providers take them (no spaces, no "tel:").
E164 = re.compile(r"\+[1-9][0-9]{6,14}")


def _check_email(value: str) -> str:
    if len(value) > 254 or not _EMAIL.fullmatch(value):
        raise ValueError("must be an email address like ana@example.com")
    return value


def _check_phone(value: str) -> str:
    if not E164.fullmatch(value):
        raise ValueError("must be an E.164 phone number like +33612345678")
    return value


#: Files of the zone database that are no place's time: the server's own zone (another
#: server, another time), "Factory" ("-00"), and the copies under posix/ and right/ (the
#: latter counting leap seconds, which no clock here does). The API refuses them; what was
#: stored with one before still reads (``known_timezone`` takes them).
NOT_A_PLACE = re.compile(r"localtime|Factory|posixrules|(posix|right)/.*")


@lru_cache(maxsize=1024)
def known_timezone(name: str) -> bool:
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return False
    return True


def _check_timezone(value: str) -> str:
    if not known_timezone(value):
        raise ValueError("must be an IANA time zone like Europe/Paris")
    return value


@lru_cache(maxsize=1024)
def _known_locale(tag: str) -> bool:
    try:
        Locale.parse(tag.replace("-", "_"))
    except (UnknownLocaleError, ValueError):
        return False
    return True


def _check_locale(value: str) -> str:
    if not _known_locale(value):
        raise ValueError("must be a locale like fr_FR, pt-BR or en")
    return value.replace("-", "_")


def _check_moment(value: datetime) -> datetime:
    # Far-away years break date formatting and say nothing true about a parcel.
    if not 2000 <= value.year <= 2100:
        raise ValueError("must be between the years 2000 and 2100")
    return value


_URL = re.compile(r"https?://[^\s/]+")
#: The longest URL taken (a tracking link, a brand's links).
URL_MAX = 2000
#: What a URL cannot hold as it is (RFC 3986): whitespace and control characters.
_NOT_IN_URL = re.compile(r"[\s\x00-\x1f\x7f-\x9f]")


def url_spelled(value: str) -> str:
    """A URL as it is kept: trimmed, its whitespace and control characters
    percent-encoded (``value`` itself when it is so already)."""
    stripped = value.strip()
    if _NOT_IN_URL.search(stripped) is None:
        return value if stripped == value else stripped
    return _NOT_IN_URL.sub(lambda m: quote(m[0], safe=""), stripped)


def _check_url(value: str) -> str:
    # percent-encoded, not refused: a carrier's link with a raw space still works, and a
    # CR/LF or NUL in it can break no SMS or header (an encoded URL is left as it is)
    value = url_spelled(value)
    if len(value) > URL_MAX:
        raise ValueError(f"must be at most {URL_MAX} characters long, not {len(value)}")
    if _URL.match(value):
        return value
    scheme, colon, rest = value.partition(":")
    if colon and scheme.lower() in ("http", "https"):
        value = scheme.lower() + colon + rest  # a scheme is case-insensitive (RFC 3986)
        if _URL.match(value):
            return value
    raise ValueError("must be an http(s) URL")


Email = Annotated[str, StringConstraints(strip_whitespace=True), AfterValidator(_check_email)]
Phone = Annotated[str, StringConstraints(strip_whitespace=True), AfterValidator(_check_phone)]
TimeZone = Annotated[str, AfterValidator(_check_timezone)]
LocaleTag = Annotated[str, AfterValidator(_check_locale)]
Url = Annotated[str, AfterValidator(_check_url)]
Moment = Annotated[AwareDatetime, AfterValidator(_check_moment)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Location(_Strict):
    """Where a scan happened."""

    city: ShortText | None = None
    region: ShortText | None = None
    country: Annotated[str, StringConstraints(pattern=COUNTRY_PATTERN)] | None = None
    lat: float | None = Field(default=None, ge=-90, le=90)
    lon: float | None = Field(default=None, ge=-180, le=180)

    @model_validator(mode="after")
    def _both_coordinates(self) -> Self:
        if (self.lat is None) != (self.lon is None):
            raise ValueError("lat and lon go together: give both or neither")
        return self


class DeliveryWindow(_Strict):
    """The carrier's estimated delivery window."""

    start: Moment
    end: Moment

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.end < self.start:
            raise ValueError("end must not be before start")
        return self


class Recipient(_Strict):
    """Who receives the messages; at least one way to reach them."""

    name: ShortText | None = None
    email: Email | None = None
    phone: Phone | None = None
    locale: LocaleTag | None = None
    timezone: TimeZone | None = None


#: The largest whole number JSON carries exactly (2**53): a longer order number sent as a
#: JSON number has lost digits on its way (or cannot be stored at all past 2**64).
EXACT_JSON_INT = 2**53


def _whole_as_int(value: object) -> object:
    """``1001.0`` as ``1001``: the body's digest reads the two as one number (a repost of
    either is a duplicate), so they must be kept as one order number too. A number too
    long for JSON to carry exactly is refused: it must come as text."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if abs(value) >= EXACT_JSON_INT:
            raise ValueError("must be sent as text: a number this long loses digits in JSON")
        if isinstance(value, float) and value.is_integer():
            return int(value)
    return value


class Order(_Strict):
    """The merchant's order the shipment belongs to. Its number may come as a JSON number
    (shops' systems often keep it as one): it is kept as text, ``1001`` as ``"1001"``."""

    model_config = ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True)

    number: Annotated[ShortText, BeforeValidator(_whole_as_int)]


class PickupPoint(_Strict):
    """Where an ``available_for_pickup`` parcel waits (an addition to DESIGN.md §3)."""

    name: ShortText
    address: Annotated[
        str,
        StringConstraints(min_length=1, max_length=300, strip_whitespace=True),
        AfterValidator(_some_text),
    ]
    #: opening hours as the carrier gives them, e.g. "Mon-Sat 8:00-20:00"
    hours: ShortText | None = None


class Transition(_Strict):
    """One normalized status transition posted by the tracking backend (DESIGN.md §3)."""

    event_id: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    merchant_id: MerchantId
    shipment_id: Identifier
    tracking_number: ShortText
    carrier: ShortText
    status: Status
    exception_code: ExceptionCode | None = Field(default=None, validate_default=True)
    occurred_at: Moment
    location: Location | None = None
    estimated_delivery: DeliveryWindow | None = None
    #: for available_for_pickup: when the pickup point sends the parcel back
    pickup_deadline: Moment | None = None
    #: for available_for_pickup: the pickup point (optional; an addition to the contract)
    pickup_point: PickupPoint | None = None
    carrier_status_code: ShortText | None = None
    carrier_description: (
        Annotated[str, StringConstraints(max_length=1000), AfterValidator(one_line)] | None
    ) = None
    tracking_url: Url | None = None
    recipient: Recipient | None = None
    order: Order | None = None

    @field_validator("exception_code")
    @classmethod
    def _exception_code_iff_exception(
        cls, value: ExceptionCode | None, info: ValidationInfo
    ) -> ExceptionCode | None:
        status = info.data.get("status")
        if status is Status.EXCEPTION and value is None:
            raise ValueError("exception_code is required when status is exception")
        if status is not None and status is not Status.EXCEPTION and value is not None:
            raise ValueError("exception_code is only allowed when status is exception")
        return value

    @property
    def milestone(self) -> str:
        """The (status, exception_code) pair as one key, e.g. ``exception:customs_hold``."""
        if self.exception_code is None:
            return self.status.value
        return f"{self.status.value}:{self.exception_code.value}"


class Decision(_Strict):
    """What happened to one transition on one channel, with the reason behind it."""

    event_id: str
    status: Status
    exception_code: ExceptionCode | None = None
    channel: ChannelKind | None = None
    outcome: Outcome
    reason: str
    notification_id: str | None = None
    decided_at: datetime
    occurred_at: datetime
    #: when a deferred message is due
    send_at: datetime | None = None
    details: dict[str, Any] = Field(default_factory=dict)
    #: the API request (X-Request-ID) that brought the transition
    request_id: str | None = None

    @classmethod
    def about(
        cls,
        t: Transition,
        *,
        channel: ChannelKind | None,
        outcome: Outcome,
        reason: str,
        decided_at: datetime,
        notification_id: str | None = None,
        send_at: datetime | None = None,
        details: dict[str, Any] | None = None,
        request_id: str | None = None,
    ) -> Decision:
        """The decision recorded for transition ``t`` (from typed, validated values: not
        validated again, on the worker's hot path)."""
        return assembled(
            cls,
            {
                "event_id": t.event_id,
                "status": t.status,
                "exception_code": t.exception_code,
                "channel": channel,
                "outcome": outcome,
                "reason": reason,
                "notification_id": notification_id,
                "decided_at": decided_at,
                "occurred_at": t.occurred_at,
                "send_at": send_at,
                "details": details or {},
                "request_id": request_id or None,
            },
        )

    def history_entry(self) -> bytes:
        """As stored in a shipment's history list."""
        return orjson.dumps(self.model_dump(mode="json", exclude_none=True))


class Notification(_Strict):
    """A message to deliver: everything needed to render and send it, stored in the ledger."""

    notification_id: str
    merchant_id: str
    shipment_id: str
    channel: ChannelKind
    to: str
    transition: Transition
    recipient: Recipient
    created_at: datetime
    #: when the shipment is likely delivered (median, 90th percentile) as decided, from the
    #: merchant's own history (``insights.predict``); templates see it as ``event.predicted``
    predicted: DeliveryWindow | None = None
    #: the A/B test of its message (a policy's ``experiments``) and the variant the
    #: shipment reads, ``a`` or ``b``
    experiment: str | None = None
    variant: Literal["a", "b"] | None = None
    #: an SMS that goes without an email about its event (none known, opted out, or the
    #: policy's choice): templates see ``email_too`` false, and point nowhere else
    alone: bool | None = None
    #: a "delivered" after the parcel had waited at a pickup point: the customer collected it
    #: (templates see ``event.collected``: "collected", never "ask next door")
    collected: bool | None = None
    #: an exception's: how far along the shipment was (``news_rank``: 3 out for delivery, 4
    #: at a pickup point), when further than the exception's own step; the progress steps
    #: show it there, not back "on the way"
    reached: int | None = None


#: what a waiting message's payload leaves out: its ledger key names the id, its transition
#: the merchant and the shipment
_IMPLIED = {"notification_id", "merchant_id", "shipment_id"}


#: the recipient's field a channel's ``to`` is, when a waiting payload leaves ``to`` out
_ADDRESS = {ChannelKind.EMAIL: "email", ChannelKind.SMS: "phone"}
_CHANNELS = {str(c) for c in ChannelKind}


def waiting_payload(n: Notification, *, created_in_ledger: bool = False) -> bytes:
    """The payload of a message that waits in the ledger (quiet hours, coalescing, a
    fallback): packed, without what its key and its transition already say (about 28
    bytes of some 200), without ``to`` when it is the recipient's address for the channel,
    and without ``created_at`` when its ledger entry keeps it (``created_in_ledger``: the
    decision's commit writes it; the claim gives it back). ``notification_of`` reads it
    back, and whole payloads written before. (``to`` and ``created_at`` were 26 bytes of
    a waiting message's 356 in Redis, measured on the bench's workload.)"""
    if n.merchant_id != n.transition.merchant_id or n.shipment_id != n.transition.shipment_id:
        return pack(n.model_dump_json(exclude_none=True).encode(), NOTIFICATION)
    left_out = set(_IMPLIED)
    if created_in_ledger:
        left_out.add("created_at")
    field = _ADDRESS.get(n.channel)
    if field is not None and n.to == getattr(n.recipient, field):
        left_out.add("to")
    return pack(n.model_dump_json(exclude_none=True, exclude=left_out).encode(), NOTIFICATION)


def notification_json(
    notification_id: str, payload: bytes, created_at: str | None = None
) -> dict[str, Any]:
    """The JSON object of the notification a ledger payload holds: whole (one sent at once,
    or written before ``waiting_payload``), or without its id, merchant and shipment, which
    come back from its key and its transition, and maybe without its ``to`` (the
    recipient's address for its channel) and its ``created_at`` (its ledger entry's, given
    as ``created_at``)."""
    data: dict[str, Any] = orjson.loads(unpack(payload))
    if "notification_id" in data:
        return data
    transition = data.get("transition")
    implied = transition if isinstance(transition, dict) else {}
    known = {k: implied[k] for k in ("merchant_id", "shipment_id") if k in implied}
    out = {"notification_id": notification_id, **known, **data}
    recipient, channel = out.get("recipient"), out.get("channel")
    field = _ADDRESS.get(ChannelKind(channel)) if channel in _CHANNELS else None
    if "to" not in out and isinstance(recipient, dict) and field in recipient:
        out["to"] = recipient[field]
    if "created_at" not in out and created_at is not None:
        out["created_at"] = created_at
    return out


#: what reading a stored payload raises when it does not hold a notification (``unreadable``)
UNREADABLE = (ValueError, zlib.error)


def unreadable(exc: Exception) -> str:
    """What is wrong with a payload that did not read (one of ``UNREADABLE``), without any
    of its values (a recipient's details): the fields a check refused, or what it is not."""
    if isinstance(exc, ValidationError):
        fields = sorted({".".join(map(str, e["loc"])) or "(root)" for e in exc.errors()})
        return f"invalid {', '.join(fields[:5])}" + (" …" if len(fields) > 5 else "")
    if isinstance(exc, (zlib.error, Damaged)):
        return "damaged packed data"
    if isinstance(exc, orjson.JSONDecodeError):
        return "not JSON"
    return str(exc)  # an unknown packing tag (packing.unpack)


def notification_of(
    notification_id: str, payload: bytes, created_at: str | None = None
) -> Notification:
    """The notification a ledger payload holds (``notification_json``; ``created_at``: its
    ledger entry's, for a payload that leaves it out); a whole one is read as it is, not
    parsed and written again."""
    raw = unpack(payload)
    if raw.startswith(b'{"notification_id":'):  # whole: the model writes the id first
        return Notification.model_validate_json(raw)
    data = notification_json(notification_id, raw, created_at)
    return Notification.model_validate_json(orjson.dumps(data))


def message_name(t: Transition) -> str:
    """The message file of a transition: ``delivered``, ``exception_customs_hold``..."""
    if t.exception_code is not None:
        return f"exception_{t.exception_code.value}"
    return t.status.value


def message_name_of(milestone: str) -> str:
    """The message file of a milestone: ``exception:lost`` → ``exception_lost``."""
    return milestone.replace(":", "_")


def message_paths(name: str, locale: str, variant: str = "") -> tuple[str, str]:
    """(the file for one locale, the file for every locale) of message ``name`` in
    ``variant`` (``b``: the variant b of an A/B test, ``messages/<name>.b[.<locale>].jinja``)."""
    base = f"messages/{name}.b" if variant == "b" else f"messages/{name}"
    return f"{base}.{locale}.jinja", f"{base}.jinja"


def own_event_id(prefix: str, at_ms: int, shipment_id: str) -> str:
    """The event id of a transition notifier makes itself (``stalled:``, ``predicted-late:``):
    the same each time it is made for a shipment and moment (the shipment is told once),
    and one per shipment: event ids are unique per merchant, and two shipments last scanned
    in the same minute shared one (the second's notice was taken for a duplicate and
    dropped). ``<prefix><ms>:<shipment id>``, or its digest when the id would be too long."""
    base = f"{prefix}{at_ms}:"
    if len(base) + len(shipment_id) <= EVENT_ID_MAX:
        return base + shipment_id
    return base + hashlib.sha256(shipment_id.encode()).hexdigest()[:32]


def notification_id(t: Transition, channel: ChannelKind) -> str:
    """Deterministic: the same event on the same channel always has the same id."""
    return notification_id_of(t.merchant_id, t.shipment_id, t.event_id, channel)


#: a notification's id is asked for about four times on its way (decided, committed, claimed,
#: recorded) within one batch: the SHA-256 was 1 % of a worker's time
@lru_cache(maxsize=4096)
def notification_id_of(merchant_id: str, shipment_id: str, event_id: str, channel: str) -> str:
    raw = f"{merchant_id}\x00{shipment_id}\x00{event_id}\x00{channel}".encode()
    return "n_" + hashlib.sha256(raw).hexdigest()[:32]
