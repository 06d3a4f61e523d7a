"""The outbox channel: one file per message in outbox/<merchant_id>/<shipment_id>/ (DESIGN §4)."""

from __future__ import annotations

import asyncio
import os
import tempfile
from datetime import UTC, datetime
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime
from pathlib import Path

import orjson

from notifier.channels.base import Receipt
from notifier.errors import TemporaryDeliveryError
from notifier.render import EmailMessageOut, Message, SmsMessageOut


def build_eml(message: EmailMessageOut, sent_at: datetime) -> bytes:
    """A complete RFC 5322 message: multipart/alternative with text/plain and text/html."""
    msg = EmailMessage(policy=SMTP)
    msg["From"] = message.from_addr
    msg["To"] = message.to
    msg["Subject"] = message.subject
    msg["Date"] = format_datetime(sent_at.astimezone(UTC))
    # Deterministic, so a message re-sent after a crash is recognisably the same one.
    msg["Message-ID"] = f"<{message.notification_id}@notifier.local>"
    msg["X-Notification-ID"] = message.notification_id
    for name, value in message.headers.items():
        msg[name] = value
    msg.set_content(message.text)
    msg.add_alternative(message.html, subtype="html")
    return msg.as_bytes()


def _sms_json(message: SmsMessageOut) -> bytes:
    return orjson.dumps(
        {
            "to": message.to,
            "body": message.body,
            "encoding": message.encoding.value,
            "segments": message.segments,
            "notification_id": message.notification_id,
        },
        option=orjson.OPT_INDENT_2,
    )


class OutboxChannel:
    """Writes .eml and .sms.json files atomically (temp file, then rename)."""

    name = "outbox"

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    async def send(self, message: Message, sent_at: datetime, *, recovering: bool) -> Receipt:
        """Write ``message``; when recovering, an existing file for its id is the receipt."""
        try:
            path = await asyncio.to_thread(self._write, message, sent_at, recovering)
        except OSError as exc:
            raise TemporaryDeliveryError(
                f"outbox write failed: {exc.strerror}", message.notification_id, self.name
            ) from exc
        return Receipt(self.name, str(path))

    def _write(self, message: Message, sent_at: datetime, recovering: bool) -> Path:
        folder = self.directory / message.merchant_id / message.shipment_id
        if isinstance(message, EmailMessageOut):
            suffix, data = ".eml", build_eml(message, sent_at)
        else:
            suffix, data = ".sms.json", _sms_json(message)
        if recovering and folder.is_dir():
            existing = sorted(folder.glob(f"*-{message.notification_id}{suffix}"))
            if existing:
                return existing[0]
        folder.mkdir(parents=True, exist_ok=True)
        stamp = sent_at.astimezone(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        path = folder / f"{stamp}-{message.notification_id}{suffix}"
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path
