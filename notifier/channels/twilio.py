"""The Twilio SMS channel: the real SDK, asynchronous (AsyncTwilioHttpClient + create_async).

Every outcome is classified (see ``classify``): a 429 or 5xx, a timeout or a broken
connection is worth retrying; bad numbers, opted-out recipients and rejected
credentials are not. Twilio's Messages API has no idempotency key, so a message
whose acceptance we did not get to record may be sent again after a crash: the one
window where delivery is at-least-once (README).
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import logging
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import aiohttp
from twilio.base.exceptions import TwilioException, TwilioRestException
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.http.response import Response
from twilio.rest import Client

from notifier.channels.base import Outcome, Outgoing, Receipt, retry_after_s
from notifier.errors import PermanentDeliveryError, TemporaryDeliveryError
from notifier.logs import redact
from notifier.render import SmsMessageOut

log = logging.getLogger(__name__)

#: Twilio error codes (https://www.twilio.com/docs/api/errors) that say "never retry".
PERMANENT_CODES: dict[int, str] = {
    21211: "invalid 'To' phone number",
    21408: "no permission to send to this region",
    21610: "recipient replied STOP (opted out)",
    21612: "cannot route to this number",
    21614: "'To' number is not a mobile number",
    21606: "'From' number cannot send SMS",
    21608: "trial account cannot send to unverified numbers",
}
#: Of those, the ones that mean the recipient does not want our messages.
OPT_OUT_CODES = {21610}
#: Error codes of a status callback (``undelivered`` / ``failed``, after Twilio took the
#: message) that say this number will not take it: the update goes by email instead, as for
#: a refusal at sending. Not 30003 (a handset switched off or out of coverage comes back)
#: nor 30008 (unknown).
UNDELIVERABLE_CODES: dict[int, str] = {
    21610: "recipient replied STOP (opted out)",
    21211: "invalid 'To' phone number",
    21612: "cannot route to this number",
    21614: "'To' number is not a mobile number",
    30004: "message blocked by the recipient or the carrier",
    30005: "unknown destination handset",
    30006: "landline or unreachable carrier",
    30007: "filtered by the carrier",
}

_retry_after: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "twilio_retry_after", default=None
)
_last_status: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "twilio_last_status", default=None
)


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


class TwilioHttpClient(AsyncTwilioHttpClient):  # type: ignore[misc]
    """Twilio's async HTTP client, sent to ``base_url`` (tests: a local fake) and
    remembering a 429's Retry-After for the caller."""

    def __init__(self, base_url: str, timeout: float) -> None:
        super().__init__(timeout=timeout)
        self.base = urlsplit(base_url)
        self.timeout_s = timeout

    async def request(
        self,
        method: str,
        url: str,
        params: dict[str, object] | None = None,
        data: dict[str, object] | None = None,
        headers: dict[str, str] | None = None,
        auth: tuple[str, str] | None = None,
        **kwargs: Any,
    ) -> Response:
        parts = urlsplit(url)
        url = urlunsplit((self.base.scheme, self.base.netloc, parts.path, parts.query, ""))
        if auth is not None:
            # The same Basic credentials as a header: aiohttp deprecates its BasicAuth helper.
            headers = {**(headers or {}), "Authorization": _basic(*auth)}
        # The SDK hands its timeout to aiohttp as None: enforce it here, the hanging
        # provider then becomes a retryable timeout instead of a stuck worker.
        response: Response = await asyncio.wait_for(
            super().request(method, url, params, data, headers, None, **kwargs), self.timeout_s
        )
        _last_status.set(response.status_code)
        _retry_after.set(retry_after_s((response.headers or {}).get("Retry-After")))
        return response


def classify(
    exc: BaseException, notification_id: str
) -> TemporaryDeliveryError | PermanentDeliveryError:
    """A Twilio failure as a typed outcome: retry (429, 5xx, network) or never (the rest)."""
    name = "twilio"
    if isinstance(exc, TwilioRestException):
        code = exc.code or 0
        if exc.status == 429 or exc.status >= 500:
            return TemporaryDeliveryError(
                f"Twilio answered {exc.status}" + (f" (error {code})" if code else ""),
                notification_id,
                name,
                retry_after_s=_retry_after.get(),
            )
        if exc.status in (401, 403):
            return PermanentDeliveryError(
                f"Twilio rejected the credentials ({exc.status})", notification_id, name
            )
        # (Twilio's own words can name the number: kept in the ledger, without it)
        reason = PERMANENT_CODES.get(code) or redact(exc.msg or "request refused")
        error = PermanentDeliveryError(
            f"Twilio error {code or exc.status}: {reason}", notification_id, name
        )
        error.opted_out = code in OPT_OUT_CODES
        return error
    kind = type(exc).__name__
    return TemporaryDeliveryError(f"Twilio unreachable ({kind})", notification_id, name)


class TwilioChannel:
    """Sends SMS through Twilio's Messages API, several at a time."""

    name = "twilio"

    def __init__(
        self,
        client: Client,
        *,
        from_number: str | None = None,
        messaging_service_sid: str | None = None,
        status_callback: str | None = None,
        concurrency: int = 16,
    ) -> None:
        if not (from_number or messaging_service_sid):
            raise ValueError("a Twilio sender needs a from number or a messaging service SID")
        self.client = client
        self.from_number = from_number
        self.messaging_service_sid = messaging_service_sid
        self.status_callback = status_callback
        self._limit = asyncio.Semaphore(concurrency)

    async def send_many(self, items: Sequence[Outgoing]) -> list[Outcome]:
        return list(await asyncio.gather(*(self._send(item) for item in items)))

    async def _send(self, item: Outgoing) -> Outcome:
        message = item.message
        assert isinstance(message, SmsMessageOut), "the Twilio channel carries SMS only"
        params: dict[str, Any] = {"to": message.to, "body": message.body}
        if self.messaging_service_sid:
            params["messaging_service_sid"] = self.messaging_service_sid
        else:
            params["from_"] = self.from_number
        if self.status_callback:
            # its milestone and locale come back with its statuses (the merchant's analytics)
            tag = f"?stats={quote(message.stats_tag, safe=':~')}" if message.stats_tag else ""
            params["status_callback"] = self.status_callback + tag
        async with self._limit:
            if (lapsed := item.lapsed(self.name)) is not None:
                return lapsed
            _last_status.set(None)
            try:
                created = await self.client.messages.create_async(**params)
            except (TimeoutError, TwilioException, aiohttp.ClientError, OSError) as exc:
                return classify(exc, message.notification_id)
            except Exception as exc:  # anything else must not sink the other messages
                status = _last_status.get()
                if status is not None and 200 <= status < 300:
                    # Twilio accepted it; we just could not read the answer: never resend.
                    return Receipt(self.name, f"accepted-unreadable-{message.notification_id}")
                return TemporaryDeliveryError(
                    f"Twilio call failed ({type(exc).__name__})",
                    message.notification_id,
                    self.name,
                )
        if not created.sid:
            # Twilio took it (a 2xx) and said nothing we can track it by: a resend would be
            # a second SMS to the customer, as for an answer that does not read
            log.warning(
                "notification %s: Twilio accepted it without a message sid; not resent "
                "(its status callbacks cannot be matched)",
                message.notification_id,
            )
            return Receipt(self.name, f"accepted-unreadable-{message.notification_id}")
        return Receipt(self.name, str(created.sid))

    async def aclose(self) -> None:
        """Close the HTTP session."""
        http = self.client.http_client
        if isinstance(http, AsyncTwilioHttpClient):
            await http.close()


def build_twilio(
    account_sid: str,
    auth_token: str,
    *,
    base_url: str,
    from_number: str | None,
    messaging_service_sid: str | None,
    timeout_s: float = 10.0,
    status_callback: str | None = None,
) -> TwilioChannel:
    """A Twilio channel from settings values (the SDK client with our HTTP seam)."""
    client = Client(
        account_sid, auth_token, http_client=TwilioHttpClient(base_url, timeout=timeout_s)
    )
    return TwilioChannel(
        client,
        from_number=from_number,
        messaging_service_sid=messaging_service_sid,
        status_callback=status_callback,
    )
