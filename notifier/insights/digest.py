"""The weekly digest: each Monday, an email to the addresses a merchant gave, with the week
before (Monday to Sunday, UTC): how its messages did, and how its carriers did.

A worker's hourly tick sends what is due: from Monday 06:00 UTC, each merchant with a
digest gets last week's once (a marker per merchant and week, set before sending and taken
back if the send fails, so two workers never both send it and a failed one is tried again
the next hour). It goes through the service's email channel (the outbox, or SendGrid),
under the shipment id ``weekly-digest``. Written in English.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import date, datetime, timedelta
from email.utils import formataddr
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape

from notifier.channels.base import Channel, Outgoing, Receipt
from notifier.insights import api as analytics
from notifier.insights.carriers import report
from notifier.insights.counts import DIGEST_PREFIX
from notifier.models import ChannelKind
from notifier.render import EmailMessageOut
from notifier.resources import Resources
from notifier.web.forms import milestone_label

log = logging.getLogger("notifier.insights")

#: the hour (UTC) of Monday from which last week's digest is due
SEND_HOUR = 6
#: how long a week's sent-marker is kept (longer than anyone catches up), and how long a
#: marker of a send under way holds (a worker that died mid-send: the next hour tries again)
MARK_S = 30 * 86_400
SENDING_S = 15 * 60
SHIPMENT = "weekly-digest"

_ENV = Environment(
    loader=PackageLoader("notifier.insights", "templates"),
    autoescape=select_autoescape(("html",)),
    trim_blocks=True,
    lstrip_blocks=True,
)


def last_week(now: datetime) -> tuple[date, date, str] | None:
    """(Monday, Sunday, ISO week name) of the week before ``now``, once its digest is due
    (from Monday ``SEND_HOUR``:00 UTC); None before that on a Monday."""
    today = now.date()
    monday = today - timedelta(days=today.weekday())
    if today == monday and now.hour < SEND_HOUR:
        return None
    first = monday - timedelta(days=7)
    year, week, _ = first.isocalendar()
    return first, first + timedelta(days=6), f"{year}-W{week:02d}"


def content(
    merchant_id: str,
    name: str,
    first: date,
    last: date,
    found: dict[str, dict[str, int]],
    carriers: Mapping[str, Mapping[str, int]],
) -> dict[str, Any]:
    """What the digest shows (the templates' context)."""
    _, rows, totals = analytics.table(found, ["milestone"])
    lanes, hubs = report(carriers)
    rules = sorted(
        (
            (k.removeprefix("suppressed:"), n)
            for k, n in totals.items()
            if k.startswith("suppressed:") and n
        ),
        key=lambda x: -x[1],
    )
    return {
        "merchant_id": merchant_id,
        "name": name,
        "first": first.isoformat(),
        "last": last.isoformat(),
        "totals": totals,
        "rates": analytics.rates(found),
        "milestones": [
            (milestone_label(r["milestone"]) if r["milestone"] != "-" else "Not known", r)
            for r in rows
            if r["decided"] or r["accepted"]
        ],
        "rules": rules[:5],
        "lanes": lanes[:10],
        "hubs": hubs[:5],
    }


def render(ctx: Mapping[str, Any]) -> tuple[str, str, str]:
    """(subject, text, HTML) of a digest."""
    subject = f"{ctx['name']}: your shipment messages, {ctx['first']} to {ctx['last']}"
    text = _ENV.get_template("digest.txt").render(**ctx)
    html = _ENV.get_template("digest.html").render(subject=subject, **ctx)
    return subject, text, html


async def send_week(
    res: Resources, merchant_id: str, to: list[str], first: date, last: date, week: str
) -> int:
    """Build and send one merchant's digest of a week; how many addresses took it."""
    found = await res.store.stats(merchant_id, first, last)
    carriers = await res.store.carrier_stats(merchant_id, first, last)
    name = res.renderer.brand(merchant_id).name
    subject, text, html = render(content(merchant_id, name, first, last, found, carriers))
    channel: Channel = res.channels[ChannelKind.EMAIL]
    now = res.clock()
    items = [
        Outgoing(
            EmailMessageOut(
                notification_id=f"{DIGEST_PREFIX}{week}_{i}",
                merchant_id=merchant_id,
                shipment_id=SHIPMENT,
                to=address,
                from_addr=formataddr(("notifier", res.renderer.email_from)),
                subject=subject,
                text=text,
                html=html,
                preheader=f"The week of {first.isoformat()}",
            ),
            now,
        )
        for i, address in enumerate(to)
    ]
    outcomes = await channel.send_many(items)
    return sum(1 for o in outcomes if isinstance(o, Receipt))


async def send_due(res: Resources) -> int:
    """Send last week's digest to every merchant that has one and has not had it; how many
    merchants were sent theirs."""
    due = last_week(res.clock())
    if due is None:
        return 0
    first, last, week = due
    sent = 0
    store = res.store
    for merchant_id, wanted in (await store.digest_settings()).items():
        if not wanted.get("enabled", True) or not wanted.get("to"):
            continue
        if not await store.mark_digest(merchant_id, week, "sending", SENDING_S, first=True):
            continue  # sent already, or being sent by another worker
        try:
            took = await send_week(res, merchant_id, list(wanted["to"]), first, last, week)
        except Exception as exc:  # this merchant's digest only: the others still go
            # the kind only: a channel's words may quote an address
            log.error(
                "weekly digest %s of merchant %s failed (%s); retrying",
                week,
                merchant_id,
                type(exc).__name__,
            )
            await store.unmark_digest(merchant_id, week)
            continue
        if not took:
            # the channel refused or failed every address: the week again in an hour
            await store.unmark_digest(merchant_id, week)
            log.warning("weekly digest %s of merchant %s not sent; retrying", week, merchant_id)
            continue
        if took < len(wanted["to"]):  # never twice to the addresses that took it
            log.warning(
                "weekly digest %s of merchant %s: %d of %d addresses refused it",
                week,
                merchant_id,
                len(wanted["to"]) - took,
                len(wanted["to"]),
            )
        await store.mark_digest(merchant_id, week, "sent", MARK_S)
        sent += 1
        log.info("weekly digest %s sent to merchant %s", week, merchant_id)
    return sent
