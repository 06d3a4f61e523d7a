"""The channel protocol and its typed outcome."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from notifier.render import Message


@dataclass(frozen=True, slots=True)
class Receipt:
    """What a channel reports for an accepted message (file path or provider message id)."""

    channel: str
    detail: str


class Channel(Protocol):
    """Delivers rendered messages.

    Raises ``TemporaryDeliveryError`` for failures worth retrying and
    ``PermanentDeliveryError`` for the rest. ``recovering`` is true when an
    earlier attempt may already have delivered this notification; a channel
    that can find out (the outbox can) must not deliver it twice.
    """

    name: str

    async def send(self, message: Message, sent_at: datetime, *, recovering: bool) -> Receipt:
        """Deliver one message."""
        ...
