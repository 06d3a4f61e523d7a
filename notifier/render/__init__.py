"""Rendering: sandboxed, layered templates → email and SMS messages."""

from notifier.render.renderer import EmailMessageOut, Message, Renderer, SmsMessageOut

__all__ = ["EmailMessageOut", "Message", "Renderer", "SmsMessageOut"]
