"""Delivery channels: one protocol, one implementation per provider."""

from notifier.channels.base import Channel, Outcome, Outgoing, Receipt
from notifier.channels.outbox import OutboxChannel

__all__ = ["Channel", "OutboxChannel", "Outcome", "Outgoing", "Receipt"]
