"""Renderer: a notification (values) → a ready-to-send email or SMS (values)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from babel.dates import format_datetime
from jinja2 import Template, TemplateError

from notifier.errors import RenderError
from notifier.models import ChannelKind, Notification
from notifier.render.environment import TemplateStore
from notifier.render.sms import SmsEncoding, measure, smart_encode

_SPACES = re.compile(r"[ \t]+")
_BLANK_LINES = re.compile(r"\n{3,}")


@dataclass(frozen=True, slots=True)
class EmailMessageOut:
    """A rendered email."""

    notification_id: str
    merchant_id: str
    shipment_id: str
    to: str
    from_addr: str
    subject: str
    text: str
    html: str
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SmsMessageOut:
    """A rendered SMS with its encoding and segment count."""

    notification_id: str
    merchant_id: str
    shipment_id: str
    to: str
    body: str
    encoding: SmsEncoding
    segments: int


Message = EmailMessageOut | SmsMessageOut


def _when(moment: datetime, timezone: str | None, locale: str) -> str:
    tz = ZoneInfo(timezone) if timezone else ZoneInfo("UTC")
    text: str = format_datetime(moment, "EEEE d MMMM, HH:mm", tzinfo=tz, locale=locale)
    return text if timezone else f"{text} UTC"


class Renderer:
    """Renders notifications with the merchant's layered templates."""

    def __init__(self, templates: TemplateStore, *, email_from: str) -> None:
        self.templates = templates
        self.email_from = email_from

    def context(self, n: Notification) -> dict[str, Any]:
        """Everything a template may use; documented in the README for merchants."""
        t, r = n.transition, n.recipient
        # Messages are English until the localized set lands; dates follow suit.
        locale = "en"
        window = None
        if t.estimated_delivery is not None:
            window = {
                "start": _when(t.estimated_delivery.start, r.timezone, locale),
                "end": _when(t.estimated_delivery.end, r.timezone, locale),
            }
        place = None
        if t.location is not None:
            place = ", ".join(p for p in (t.location.city, t.location.country) if p) or None
        return {
            "merchant": {"id": n.merchant_id, "name": n.merchant_id},
            "recipient": {"name": r.name or ""},
            "status": t.status.value,
            "exception_code": t.exception_code.value if t.exception_code else "",
            "tracking_number": t.tracking_number,
            "carrier": t.carrier.upper() if len(t.carrier) <= 4 else t.carrier.title(),
            "tracking_url": t.tracking_url or "",
            "occurred": _when(t.occurred_at, r.timezone, locale),
            "location": place or "",
            "window": window,
            "order_number": t.order.number if t.order else "",
        }

    def render(self, n: Notification) -> Message:
        """Render ``n`` for its channel; a template problem raises RenderError."""
        ctx = self.context(n)
        status = n.transition.status.value
        m = n.merchant_id

        def pick(kind: str, suffix: str, fallback: str) -> Template:
            return self.templates.select(m, (f"{kind}/{status}{suffix}", f"{kind}/{fallback}"))

        try:
            if n.channel is ChannelKind.SMS:
                body = pick("sms", ".txt", "message.txt").render(ctx)
                body = smart_encode(_SPACES.sub(" ", " ".join(body.split("\n"))).strip())
                size = measure(body)
                return SmsMessageOut(
                    n.notification_id, m, n.shipment_id, n.to, body, size.encoding, size.segments
                )
            subject = pick("email", ".subject.txt", "subject.txt").render(ctx)
            text = pick("email", ".txt", "message.txt").render(ctx)
            html = pick("email", ".html", "message.html").render(ctx)
            return EmailMessageOut(
                n.notification_id,
                m,
                n.shipment_id,
                n.to,
                self.email_from,
                subject=" ".join(subject.split()),
                text=_BLANK_LINES.sub("\n\n", text).strip() + "\n",
                html=html,
            )
        except TemplateError as exc:
            name = getattr(exc, "name", None) or getattr(exc, "filename", None) or "template"
            raise RenderError(f"{name}: {exc}", n.notification_id) from exc
        except Exception as exc:
            # A merchant template can fail in ways Jinja does not wrap ({{ 1/0 }}), and
            # odd data can break a formatter: fail this message, never the whole batch.
            raise RenderError(
                f"{n.channel} template for {status} raised {type(exc).__name__}: {exc}",
                n.notification_id,
            ) from exc
