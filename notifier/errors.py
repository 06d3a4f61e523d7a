"""The exception tree. One middleware (app.py) turns these into HTTP responses.

NotifierError
├── ConfigurationError          settings, templates or policies are unusable
├── ApiError                    a request the API refuses (carries status + code)
│   ├── BadRequest              400: malformed body
│   ├── ValidationFailed        422: fields that break the contract
│   │   ├── InvalidOptOut       422: an opt-out body that breaks it
│   │   └── InvalidQuery        422: query parameters (limit, cursor)
│   ├── IdempotencyConflict     409: an event id posted again with another body
│   ├── Unauthorized            401: no or unknown API key
│   ├── Forbidden               403: key not allowed for that merchant
│   ├── PayloadTooLarge         413
│   ├── UnsupportedMediaType    415
│   ├── TooManyRequests         429: the key's request rate is over its limit
│   └── ServiceUnavailable      503: the queue cannot take the event now
├── RenderError                 a template failed for a notification
└── DeliveryError               a channel could not deliver
    ├── TemporaryDeliveryError  retry later (timeouts, 429, 5xx)
    └── PermanentDeliveryError  never retry (invalid address, 4xx)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from notifier.models import COUNTRY_PATTERN, IDENTIFIER_PATTERN, MERCHANT_ID_PATTERN


class NotifierError(Exception):
    """Root of everything notifier raises on purpose."""


class ConfigurationError(NotifierError):
    """Settings, templates or policies that cannot be used; the message names file and problem."""


class ApiError(NotifierError):
    """A request refused with an HTTP status, a stable code and per-field details."""

    status = 400
    code = "bad_request"

    def __init__(
        self,
        message: str,
        details: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or []
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON error body of DESIGN.md §3."""
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            error["details"] = self.details
        return {"error": error}


class BadRequest(ApiError):
    status, code = 400, "bad_request"


class ValidationFailed(ApiError):
    status, code = 422, "invalid_transition"

    @classmethod
    def of(cls, message: str, exc: Any) -> ValidationFailed:
        """The refusal of a body pydantic refused (``exc``: its ValidationError), naming
        every field and what is wrong with it."""
        details = [
            {
                "field": ".".join(str(p) for p in e["loc"]) or "(body)",
                "message": plain_words(e, api=True),
            }
            for e in exc.errors(include_input=False, include_url=False)
        ]
        return cls(message, details)


class InvalidOptOut(ValidationFailed):
    code = "invalid_opt_out"


class InvalidQuery(ValidationFailed):
    code = "invalid_query"


class IdempotencyConflict(ApiError):
    """An event id posted again with another body (Stripe's idempotency rule)."""

    status, code = 409, "idempotency_conflict"


class OptedOutByRecipient(ApiError):
    """An opt-in a merchant cannot make: the recipient opted out of every merchant (STOP)."""

    status, code = 409, "opted_out_by_recipient"


class Unauthorized(ApiError):
    status, code = 401, "unauthorized"


class Forbidden(ApiError):
    status, code = 403, "forbidden"


class NotFound(ApiError):
    status, code = 404, "not_found"


class PayloadTooLarge(ApiError):
    status, code = 413, "payload_too_large"


class UnsupportedMediaType(ApiError):
    status, code = 415, "unsupported_media_type"


class ServiceUnavailable(ApiError):
    status, code = 503, "unavailable"


class TooManyRequests(ApiError):
    status, code = 429, "rate_limited"


class RenderError(NotifierError):
    """A template could not be rendered for a notification."""

    def __init__(self, message: str, notification_id: str | None = None) -> None:
        super().__init__(message)
        self.notification_id = notification_id


class DeliveryError(NotifierError):
    """A channel could not deliver a notification."""

    def __init__(self, message: str, notification_id: str, channel: str) -> None:
        super().__init__(f"{channel} {notification_id}: {message}")
        self.reason = message
        self.notification_id = notification_id
        self.channel = channel


class TemporaryDeliveryError(DeliveryError):
    """Worth retrying later (timeouts, connection errors, 429, 5xx)."""

    def __init__(
        self, message: str, notification_id: str, channel: str, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message, notification_id, channel)
        self.retry_after_s = retry_after_s


class PermanentDeliveryError(DeliveryError):
    """Never worth retrying (invalid number, rejected credentials, other 4xx)."""

    #: the provider says the recipient opted out (Twilio 21610): record it
    opted_out: bool = False


def plain_words(error: Mapping[str, Any], api: bool = False) -> str:
    """What one of pydantic's errors says, in the words a merchant's form or file problem
    uses ("must not be empty", "must be 1 or more"), not pydantic's own ("String should
    have at least 1 character", "Input should be greater than or equal to 1"); with
    ``api``, as a JSON body's field ("is not a known field", "must be a JSON object")."""
    kind, ctx = str(error.get("type", "")), error.get("ctx") or {}
    message = str(error.get("msg", "")).removeprefix("Value error, ")
    if api and kind in _API:
        return _API[kind]
    if kind == "string_pattern_mismatch":
        return _PATTERNS.get(str(ctx.get("pattern", "")), "is not in the form this field takes")
    if kind == "string_too_short":
        n = ctx.get("min_length", 1)
        return "must not be empty" if n == 1 else f"must be at least {n} characters long"
    if kind in _PLAIN:
        # a bound of 3600.0 reads as 3600
        whole = {
            k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in ctx.items()
        }
        try:
            return _PLAIN[kind].format(**whole)
        except (KeyError, IndexError):
            return message
    if kind in ("literal_error", "enum"):
        return f"must be {ctx.get('expected', 'one of the listed values')}"
    return message.replace("Input should be", "must be", 1)


_PLAIN = {
    "string_too_long": "must be at most {max_length} characters long",
    "too_short": "must have at least {min_length} items",
    "too_long": "must have at most {max_length} items",
    "greater_than_equal": "must be {ge} or more",
    "greater_than": "must be more than {gt}",
    "less_than_equal": "must be {le} or less",
    "less_than": "must be less than {lt}",
    "int_parsing": "must be a whole number",
    "int_type": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_parsing": "must be a number",
    "float_type": "must be a number",
    "bool_parsing": "must be true or false",
    "bool_type": "must be true or false",
    "string_type": "must be text",
    "missing": "is required",
    "extra_forbidden": "is not a setting here (a typo?)",
    "dict_type": "must be a group of settings",
    "model_type": "must be a group of settings",
    "model_attributes_type": "must be a group of settings",
    "list_type": "must be a list",
}

#: What the patterns of the contract's fields ask for, in words (``models``).
_PATTERNS = {
    MERCHANT_ID_PATTERN: (
        "must be 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"
    ),
    IDENTIFIER_PATTERN: (
        "must be 1 to 128 letters, digits, '.', '_', ':', '@' or '-', starting with a letter "
        "or digit"
    ),
    COUNTRY_PATTERN: "must be a two-letter country code in capitals (ISO 3166), like DE",
}

#: A JSON body's words where a form's would read oddly ("is not a setting here").
_API = {
    "extra_forbidden": "is not a known field",
    "dict_type": "must be a JSON object",
    "model_type": "must be a JSON object",
    "model_attributes_type": "must be a JSON object",
    "string_type": "must be a string",
    "datetime_parsing": (
        "must be a valid date and time with its offset, like 2026-11-21T09:30:00+01:00"
    ),
    "datetime_from_date_parsing": (
        "must be a valid date and time with its offset, like 2026-11-21T09:30:00+01:00"
    ),
    "datetime_type": (
        "must be a valid date and time with its offset, like 2026-11-21T09:30:00+01:00"
    ),
    "timezone_aware": "must have a UTC offset, like 2026-11-21T09:30:00+01:00",
}
