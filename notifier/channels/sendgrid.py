"""The SendGrid email channel: the SDK's Mail helper builds the payload, aiohttp posts it.

The SendGrid SDK's own HTTP client is synchronous, so it would block the event loop;
its payload builder is what we keep. ``custom_args.notification_id`` lets the event
webhook tie SendGrid's events back to our notification.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from email.utils import formataddr, parseaddr

import aiohttp
from sendgrid.helpers.mail import CustomArg, Header, Mail, ReplyTo

from notifier.addresses import ascii_domain
from notifier.channels.base import Outcome, Outgoing, Receipt, retry_after_s
from notifier.errors import PermanentDeliveryError, TemporaryDeliveryError
from notifier.logs import redact
from notifier.render import EmailMessageOut

#: Client errors worth retrying; every 5xx is retried too, any other 4xx is permanent.
RETRYABLE = {408, 429}


def payload(message: EmailMessageOut, sender: str | None = None) -> dict[str, object]:
    """The v3 mail/send JSON for a rendered email (via the SDK's Mail helper).

    ``sender`` replaces the address (not the display name): SendGrid only sends from
    verified senders.
    """
    from_addr = message.from_addr
    if sender:
        display, _ = parseaddr(message.from_addr)
        from_addr = formataddr((display, sender))
    mail = Mail(
        from_email=from_addr,
        to_emails=ascii_domain(message.to),
        subject=message.subject,
        plain_text_content=message.text,
        html_content=message.html,
    )
    mail.custom_arg = CustomArg("notification_id", message.notification_id)
    mail.custom_arg = CustomArg("merchant_id", message.merchant_id)
    # with the merchant, where its ledger entry lives (its partition, on a Redis Cluster)
    mail.custom_arg = CustomArg("shipment_id", message.shipment_id)
    if message.stats_tag:  # its milestone and locale, for the merchant's analytics
        mail.custom_arg = CustomArg("stats", message.stats_tag)
    for name, value in message.headers.items():
        if name.lower() == "reply-to":  # SendGrid refuses it as a header: its own field
            mail.reply_to = ReplyTo(value)
        else:
            mail.header = Header(name, value)
    body: dict[str, object] = mail.get()
    return body


def _retry_after(headers: aiohttp.typedefs.LooseHeaders) -> float | None:
    """Seconds to wait: Retry-After, or SendGrid's X-RateLimit-Reset (epoch seconds)."""
    get = getattr(headers, "get", None)
    if get is None:
        return None
    wait = retry_after_s(get("Retry-After"))
    if wait is not None:
        return wait
    reset = get("X-RateLimit-Reset")
    if reset and str(reset).isdigit():
        return max(0.0, float(reset) - time.time())
    return None


class SendGridChannel:
    """Posts emails to SendGrid's v3 API, several at a time."""

    name = "sendgrid"

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        api_key: str,
        base_url: str,
        sender: str | None = None,
        timeout_s: float = 10.0,
        concurrency: int = 16,
    ) -> None:
        self.session = session
        self.sender = sender
        self.url = base_url.rstrip("/") + "/v3/mail/send"
        self.headers = {"Authorization": f"Bearer {api_key}"}
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._limit = asyncio.Semaphore(concurrency)

    async def send_many(self, items: Sequence[Outgoing]) -> list[Outcome]:
        return list(await asyncio.gather(*(self._send(item) for item in items)))

    async def _send(self, item: Outgoing) -> Outcome:
        message = item.message
        assert isinstance(message, EmailMessageOut), "the SendGrid channel carries email only"
        nid = message.notification_id
        async with self._limit:
            if (lapsed := item.lapsed(self.name)) is not None:
                return lapsed
            try:
                async with self.session.post(
                    self.url,
                    json=payload(message, self.sender),
                    headers=self.headers,
                    timeout=self.timeout,
                ) as response:
                    text = (await response.text())[:300]
                    status, headers = response.status, response.headers
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                return TemporaryDeliveryError(
                    f"SendGrid unreachable ({type(exc).__name__})", nid, self.name
                )
            except Exception as exc:  # anything else must not sink the other messages
                return TemporaryDeliveryError(
                    f"SendGrid call failed ({type(exc).__name__})", nid, self.name
                )
        if 200 <= status < 300:
            return Receipt(self.name, headers.get("X-Message-Id") or nid)
        if status in RETRYABLE or status >= 500:
            return TemporaryDeliveryError(
                f"SendGrid answered {status}", nid, self.name, retry_after_s=_retry_after(headers)
            )
        # SendGrid's text can name the recipient ("The to email … is not valid"): the reason
        # is kept in the ledger, shown by `dead-letters` and sent to the merchant's webhooks
        refused = f"refused the message: {redact(text)}"
        what = "rejected the API key" if status in (401, 403) else refused
        return PermanentDeliveryError(f"SendGrid {what} ({status})", nid, self.name)

    async def aclose(self) -> None:
        await self.session.close()


def build_sendgrid(
    api_key: str, *, base_url: str, timeout_s: float, sender: str | None = None
) -> SendGridChannel:
    return SendGridChannel(
        aiohttp.ClientSession(),
        api_key=api_key,
        base_url=base_url,
        sender=sender,
        timeout_s=timeout_s,
    )
