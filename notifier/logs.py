"""Logging: one line per event, as text or JSON (``NOTIFIER_LOG_FORMAT``), with the request
id of the API call it belongs to, and never an email address, a phone number or a key.

The request id comes from the caller's ``X-Request-ID`` (when it is a sane token) or is made
up; the API answers with it, stores it with each accepted transition, and the worker records
it in the decisions of the shipment's history, so one id follows an event from the
tracking backend's call to the message it caused.
"""

from __future__ import annotations

import logging
import random
import re
import sys
import time
from collections.abc import Callable
from contextvars import ContextVar
from datetime import UTC, datetime

import orjson

#: The request id of the API call being handled ("" outside of one).
REQUEST_ID: ContextVar[str] = ContextVar("request_id", default="")
_SANE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

#: an address, internationalised ones too (the API takes them)
_EMAIL = re.compile(r"[\w.%+-]+@[\w-]+(?:\.[\w-]+)+")
#: a number in international form; not one inside a word, a path or an id (``evt_+1…``,
#: ``/+1…``), but one in a query (``?phone=+33…``) is a phone number like any other
_PHONE = re.compile(r"(?<![\w/.-])\+[0-9][0-9 ().-]{6,20}[0-9]")
_BEARER = re.compile(r"(?i)(bearer\s+)[^\s,;)]+")
_SECRET = re.compile(r"(?i)((?:api[_-]?key|token|secret|password)\s*[=:]\s*)[^\s,;)]+")


def request_id(presented: str | None) -> str:
    """The caller's id when it is a sane token, else a new one: 16 hex digits, 64 random
    bits (a W3C trace context's span id has as many). Every decision of the shipments a
    request touched keeps its id, so the id's length is paid in each shipment's Redis
    record (32 digits took about 80 bytes more a shipment at 100,000 shipments); two of ten
    million requests share one with a chance of about 3 in a million.

    An id is not a secret (it is in every response and log line), so the bits come from
    ``random``'s generator, seeded from the OS and again in a forked child, not from the OS
    each time: ``secrets`` was 3 % of the API's CPU on single transitions (``bench/``)."""
    if presented and _SANE_ID.fullmatch(presented):
        return presented
    return f"{random.getrandbits(64):016x}"


def redact(text: str) -> str:
    """``text`` without email addresses, phone numbers, bearer tokens or key=value secrets."""
    text = _EMAIL.sub("[email]", text)
    text = _PHONE.sub("[phone]", text)
    text = _BEARER.sub(r"\1[key]", text)
    return _SECRET.sub(r"\1[secret]", text)


class _Context(logging.Filter):
    """Adds the request id and redacts the message (arguments included) in place."""

    def filter(self, record: logging.LogRecord) -> bool:
        if (
            record.exc_info
            and record.name == "aiohttp.server"
            and _refused_by_the_parser(record.exc_info[1])
        ):
            _malformed(record)
            if not logging.getLogger(record.name).isEnabledFor(logging.WARNING):
                return False
        record.request_id = REQUEST_ID.get()
        message = redact(record.getMessage())
        record.msg, record.args = message, ()
        if record.exc_info:  # (another handler may have cached it unredacted)
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return True


def _refused_by_the_parser(exc: BaseException | None) -> bool:
    """Whether ``exc`` is aiohttp's HTTP parser refusing a request (looked up among the
    loaded modules: a worker does not load aiohttp's server)."""
    parser = sys.modules.get("aiohttp.http_exceptions")
    return parser is not None and isinstance(exc, parser.HttpProcessingError)


def _malformed(record: logging.LogRecord) -> None:
    """aiohttp's line for a request its parser refused (answered 400 before any handler ran:
    a broken request line, header or body encoding): one warning naming the error, not an
    ERROR with a traceback per request, which anyone could flood the log with. The
    parser's message is left out: it quotes the raw request, personal data and all."""
    exc = record.exc_info[1] if record.exc_info else None
    code = getattr(exc, "code", 400)
    record.levelno, record.levelname = logging.WARNING, "WARNING"
    record.msg = f"refused a malformed HTTP request with {code} ({type(exc).__name__})"
    record.args, record.exc_info, record.exc_text = (), None, None


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request id, exception."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = getattr(record, "request_id", "")
        if rid:
            line["request_id"] = rid
        if record.exc_text:
            line["exc"] = record.exc_text
        return orjson.dumps(line).decode()


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        rid = getattr(record, "request_id", "")
        return f"{text} [request {rid}]" if rid else text


def configure(log_format: str = "text", level: str = "INFO") -> None:
    """Send every log line through the request-id and redaction filter, in ``log_format``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_Context())
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.set_name("notifier")
    root = logging.getLogger()
    for old in list(root.handlers):
        # ours from an earlier call, and the stderr handler a library may have set up;
        # other handlers (a test's capture, say) stay
        if old.get_name() == "notifier" or type(old) is logging.StreamHandler:
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


class OutageLog:
    """How requests refused while a dependency (the data Redis) does not answer are logged:
    one ERROR when the failures begin, one ERROR summing them up every ``every_s`` while
    they go on, and one WARNING when it answers again. A backend that retries at once
    would otherwise fill the log with an error per request, hiding everything else.

    An outage ends with a request served once ``settle_s`` passed without a refusal (a
    Redis Cluster with one shard away serves some requests and refuses others: that is
    one outage, not a begin and an end every few seconds), or, when no request says so
    (an API serving nothing that needs Redis), with the next refusal after ``quiet_s``:
    that one begins a new outage."""

    def __init__(
        self,
        what: str,
        logger: logging.Logger,
        every_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        settle_s: float = 5.0,
        quiet_s: float = 60.0,
    ) -> None:
        self.what = what
        self.log = logger
        self.every_s, self.settle_s, self.quiet_s = every_s, settle_s, quiet_s
        self._clock = clock
        self._since: float | None = None  # when the first failure of this outage happened
        self._last = 0.0  # when the last one did
        self._next = 0.0  # when the next summary is due
        self._refused = self._refused_since_summary = 0

    def failed(self, doing: str, cause: BaseException) -> None:
        """A request refused for ``cause`` while ``doing`` (no personal data in it)."""
        now = self._clock()
        if self._since is not None and now - self._last >= self.quiet_s:
            self._end(self._last)  # nothing said it answered since: it did, at some point
        self._refused += 1
        self._last = now
        if self._since is None:
            self._since, self._next = now, now + self.every_s
            self._refused, self._refused_since_summary = 1, 0
            self.log.error(
                "%s does not answer: %s (%s); later refusals are summed up every %g s until "
                "it answers",
                self.what,
                doing,
                type(cause).__name__,
                self.every_s,
            )
            return
        self._refused_since_summary += 1
        if now >= self._next:
            self.log.error(
                "%s still does not answer (%.0f s now): %d more requests refused, the last "
                "while %s (%s)",
                self.what,
                now - self._since,
                self._refused_since_summary,
                doing,
                type(cause).__name__,
            )
            self._next, self._refused_since_summary = now + self.every_s, 0

    def answered(self) -> None:
        """A request the dependency served: ends the outage, if there was one and no
        request was refused for ``settle_s`` (cheap)."""
        if self._since is None:
            return
        now = self._clock()
        if now - self._last >= self.settle_s:
            self._end(now)

    def _end(self, at: float) -> None:
        if self._since is None:
            return
        self.log.warning(
            "%s answers again after %.1f s; %d requests were refused meanwhile",
            self.what,
            at - self._since,
            self._refused,
        )
        self._since = None
