"""The editor's analytics page: how a merchant's messages did over a range of days (a chart
of messages per day, the funnel from decided to clicked, counts by milestone and channel,
the variants of its A/B tests), and the same counts as CSV. The chart is SVG drawn on the
server, with the table of its numbers beside it for those who do not see it."""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any

from aiohttp import web

from notifier.errors import ValidationFailed
from notifier.insights import api as analytics
from notifier.insights import experiments
from notifier.web.base import Web
from notifier.web.forms import milestone_label

#: the chart's drawing area (SVG user units; it scales to the page's width)
WIDTH, HEIGHT, LEFT, BOTTOM = 720, 220, 48, 28
#: the funnel's steps: (count, what it means)
FUNNEL = [
    ("decided", "Decided"),
    ("sent", "Decided to send"),
    ("accepted", "Accepted by the provider"),
    ("delivered", "Reported delivered"),
    ("bounced", "Bounced or undelivered"),
    ("opened", "Opened (email)"),
    ("clicked", "Clicked (email)"),
    ("unsubscribed", "Unsubscribed"),
]
#: the rates of an A/B test shown, with what they mean
COMPARED = [
    ("opened", "Opened (of delivered emails)"),
    ("clicked", "Clicked (of delivered emails)"),
    ("unsubscribed", "Unsubscribed (of delivered emails)"),
    ("replied", "Replied to (of SMS accepted)"),
    ("stopped", "STOP (of SMS accepted)"),
    ("bounced", "Bounced (of messages accepted)"),
]
#: the columns of the table by milestone and channel
COLUMNS = [
    "decided",
    "sent",
    "deferred",
    "suppressed",
    "accepted",
    "failed",
    "delivered",
    "bounced",
    "opened",
    "clicked",
    "unsubscribed",
]


def chart(first: date, last: date, per_day: dict[str, dict[str, int]]) -> dict[str, Any]:
    """Bars of messages accepted per day (email and SMS stacked) and the axis' ticks."""
    days = [(first + timedelta(days=i)).isoformat() for i in range((last - first).days + 1)]
    values = [
        (d, per_day.get(d, {}).get("email", 0), per_day.get(d, {}).get("sms", 0)) for d in days
    ]
    top = max([e + s for _, e, s in values] + [1])
    step = (WIDTH - LEFT) / len(days)
    scale = (HEIGHT - BOTTOM - 10) / top
    bars: list[dict[str, Any]] = []
    for i, (day, email, sms) in enumerate(values):
        x = LEFT + i * step + step * 0.15
        width = max(step * 0.7, 1)
        email_h, sms_h = email * scale, sms * scale
        bars.append(
            {
                "day": day,
                "x": round(x, 2),
                "width": round(width, 2),
                "email_y": round(HEIGHT - BOTTOM - email_h, 2),
                "email_h": round(email_h, 2),
                "sms_y": round(HEIGHT - BOTTOM - email_h - sms_h, 2),
                "sms_h": round(sms_h, 2),
                "email": email,
                "sms": sms,
            }
        )
    ticks = sorted({0, top // 2, top})
    every = max(1, len(days) // 6)
    labels = [(b["x"] + b["width"] / 2, b["day"][5:]) for b in bars[::every]]
    busiest = max(values, key=lambda v: v[1] + v[2])
    return {
        "bars": bars,
        "ticks": [(t, round(HEIGHT - BOTTOM - t * scale, 2)) for t in ticks],
        "labels": labels,
        "total": sum(e + s for _, e, s in values),
        "busiest": (busiest[0], busiest[1] + busiest[2]),
        "size": (WIDTH, HEIGHT, LEFT, BOTTOM),
    }


def _day_or(typed: str | None, instead: date) -> str:
    """``typed`` when it is a day a date field can show (YYYY-MM-DD), else ``instead``."""
    try:
        return date.fromisoformat(typed or "").isoformat()
    except ValueError:
        return instead.isoformat()


class AnalyticsPage:
    """Handlers of the analytics page and its CSV."""

    def __init__(self, web_: Web) -> None:
        self.web = web_

    async def _counts(
        self, request: web.Request, merchant_id: str, strict: bool = False
    ) -> tuple[date, date, dict[str, dict[str, int]], str | None]:
        """(first day, last day, day -> field -> n, the query's problem or None: the
        default days then; ``strict``: the problem raised, as a download of other days
        than asked would pass unseen)."""
        res = self.web.res
        today = res.clock().date()
        params = {k: v for k, v in request.query.items() if k in ("from", "to") and v}
        try:
            first, last, _, _ = analytics.query(params, today)
            problem = None
        except ValidationFailed as exc:
            details = exc.details or [{"message": str(exc)}]
            problem = "; ".join(f"{d.get('field', '')}: {d['message']}" for d in details)
            if strict:
                raise ValidationFailed(f"no CSV of those days ({problem})", details) from exc
            first, last, _, _ = analytics.query({}, today)
        return first, last, await res.store.stats(merchant_id, first, last), problem

    async def page(self, request: web.Request) -> web.Response:
        merchant_id, session = await self.web.signed_in(request)
        first, last, found, problem = await self._counts(request, merchant_id)
        _, rows, totals = analytics.table(found, ["milestone", "channel"])
        per_day: dict[str, dict[str, int]] = {}
        for row in analytics.table(found, ["day", "channel"])[1]:
            per_day.setdefault(row["day"], {})[row["channel"]] = row["accepted"]
        rates = analytics.rates(found)
        policy = await experiments.published_policy(self.web.res, merchant_id)
        return self.web.page(
            "analytics.html",
            request=request,
            title="Analytics",
            csrf=session.csrf,  # the sign-out button every signed-in page has
            first=first.isoformat(),
            last=last.isoformat(),
            # the days as typed, where the query could not be shown: to correct, not retype
            typed={k: _day_or(request.query.get(k), v) for k, v in (("from", first), ("to", last))}
            if problem
            else {"from": first.isoformat(), "to": last.isoformat()},
            problem=problem,
            chart=chart(first, last, per_day),
            funnel=[(label, totals.get(count, 0)) for count, label in FUNNEL],
            rates=rates,
            rows=[r for r in rows if any(r[c] for c in COLUMNS)],
            columns=COLUMNS,
            label=milestone_label,
            experiments=experiments.summary(found, policy),
            compared=COMPARED,
        )

    async def csv(self, request: web.Request) -> web.Response:
        merchant_id, _ = await self.web.signed_in(request)
        first, last, found, _ = await self._counts(request, merchant_id, strict=True)
        groups = list(analytics.DEFAULT_GROUPS)
        columns, rows, _ = analytics.table(found, groups)
        return analytics.csv_response(merchant_id, first, last, groups, columns, rows)
