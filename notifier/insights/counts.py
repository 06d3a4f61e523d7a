"""Notification analytics: what is counted, per merchant, UTC day, milestone, channel and
recipient locale (pure).

Counts are kept incrementally as things happen (``store/stats.py``), never computed by
scanning Redis: the commit that records decisions counts them with them, a worker counts
what providers accepted and what failed, and the provider webhooks count what they report
(delivered, bounced, opened, clicked, unsubscribed). A message carries its milestone and
locale to the providers (``tag``), so their reports are counted where the message was.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from enum import StrEnum
from functools import lru_cache

from notifier.policy.engine import Step


class Count(StrEnum):
    """What is counted (the last part of a field)."""

    DECIDED = "decided"  #: a decision on a channel, whatever it was
    SENT = "sent"  #: decided to send now
    DEFERRED = "deferred"  #: decided to send later (quiet hours, holding)
    SUPPRESSED = "suppressed"  #: decided not to send (also counted by rule: suppressed:<rule>)
    FLAGGED = "flagged"  #: an anomaly, not sent
    ACCEPTED = "accepted"  #: the provider (or the outbox) took the message
    FAILED = "failed"  #: failed for good on our side (refused, out of attempts)
    DELIVERED = "delivered"  #: the provider reports it delivered
    BOUNCED = "bounced"  #: the provider reports it bounced, dropped or undelivered
    OPENED = "opened"  #: an email opened (once per message and day)
    CLICKED = "clicked"  #: a link in an email clicked (once per message and day)
    UNSUBSCRIBED = "unsubscribed"  #: an unsubscribe (link, or the provider's)
    SPAM_REPORTS = "spam_reports"  #: an email reported as spam
    STOPS = "stops"  #: an SMS recipient who opted out (STOP texted back, or the carrier's)
    REPLIES = "replies"  #: an SMS recipient who texted back anything but STOP, START, HELP


#: the dimensions of a count nobody can name (a provider report of a message sent before
#: messages carried their tag)
UNKNOWN = "-"
#: how long a day's counts are kept
KEEP_DAYS = 120
#: the counts of suppressions by rule
SUPPRESSED_BY = "suppressed:"
#: the message id prefix of the weekly digest (``digest``): mail to the merchant, not a
#: customer's message, so its provider reports count nowhere
DIGEST_PREFIX = "digest_"


def day_of(at: datetime) -> str:
    """The UTC day of a moment (aware, or naive in UTC), as counts are keyed."""
    return (at.astimezone(UTC) if at.tzinfo is not None else at).date().isoformat()


@lru_cache(maxsize=4096)
def field(milestone: str, channel: str, locale: str, count: str, variant: str = "") -> str:
    """The name of a count (a handful of milestones, channels, locales and counts: cached);
    a message of an A/B test also names its ``variant`` (``<experiment>:<a|b>``)."""
    name = f"{milestone}|{channel}|{locale}|{count}"
    return f"{name}|{variant}" if variant else name


def split(name: str) -> tuple[str, str, str, str] | None:
    """(milestone, channel, locale, count) of a count's name (whatever its variant)."""
    parts = name.split("|")
    return (parts[0], parts[1], parts[2], parts[3]) if 4 <= len(parts) <= 5 else None


def variant_of(name: str) -> str:
    """The ``<experiment>:<a|b>`` a count's name is of; empty outside an experiment."""
    parts = name.split("|")
    return parts[4] if len(parts) == 5 else ""


def tag(
    milestone: str, locale: str | None, experiment: str | None = None, variant: str = ""
) -> str:
    """What a message carries to its provider, to find its counts again:
    ``<milestone>~<locale>``, and ``~<experiment>~<a|b>`` for a message of an A/B test
    (characters a URL's query takes as they are)."""
    base = f"{milestone}~{locale or UNKNOWN}"
    return f"{base}~{experiment}~{variant}" if experiment and variant else base


_TAG = re.compile(
    r"[a-z_]{1,30}(?::[a-z_]{1,30})?~(?:[A-Za-z_]{2,20}|-)(?:~[a-z0-9][a-z0-9-]{0,39}~[ab])?"
)


def untag(value: object) -> tuple[str, str, str]:
    """(milestone, locale, variant) of a provider's echo of ``tag`` (the variant as count
    names hold it, ``<experiment>:<a|b>``, or empty); unknown ones for anything else."""
    if isinstance(value, str) and _TAG.fullmatch(value):
        milestone, locale, *test = value.split("~")
        return milestone, locale, ":".join(test)
    return UNKNOWN, UNKNOWN, ""


def of_tag(stats_tag: object, channel: str, count: Count) -> str:
    """The field a message's count goes in, from the tag it carries (``tag``)."""
    milestone, locale, variant = untag(stats_tag)
    return field(milestone, channel, locale, count.value, variant)


def of_steps(steps: Iterable[Step], locale: str | None) -> dict[str, int]:
    """The decision counts of a fold: per verdict on a channel (or on all of them), decided
    and its outcome, and a suppression's rule. Redeliveries count nothing again."""
    out: dict[str, int] = {}
    where = locale or UNKNOWN
    for step in steps:
        if step.replay:
            continue
        milestone = step.transition.milestone
        for v in step.verdicts:
            channel = v.channel.value if v.channel is not None else "all"
            for key in _decision_fields(milestone, channel, where, v.outcome.value, v.rule):
                out[key] = out.get(key, 0) + 1
    return out


@lru_cache(maxsize=4096)
def _decision_fields(
    milestone: str, channel: str, locale: str, outcome: str, rule: str
) -> tuple[str, ...]:
    """The fields one decision counts in: decided, its outcome, a suppression's rule."""
    names = [Count.DECIDED.value, outcome]
    if outcome == Count.SUPPRESSED:
        names.append(SUPPRESSED_BY + rule)
    return tuple(field(milestone, channel, locale, name) for name in names)


def of_message(
    milestone: str, channel: str, locale: str | None, count: Count, variant: str = ""
) -> str:
    """The field of one message's count."""
    return field(milestone, channel, locale or UNKNOWN, count.value, variant)


def add(total: dict[str, int], more: Mapping[str, int]) -> None:
    for k, n in more.items():
        total[k] = total.get(k, 0) + n


def recipient_digest(secret: str, number: str) -> str:
    """A phone number as a key names it (keyed: the number cannot be read back from it)."""
    return hmac.new(secret.encode(), f"sms:{number}".encode(), hashlib.sha256).hexdigest()[:32]
