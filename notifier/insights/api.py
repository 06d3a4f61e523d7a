"""GET /v1/merchants/{merchant_id}/analytics: a merchant's notification counts, JSON or CSV.

Query: ``from`` and ``to`` (UTC days, ``YYYY-MM-DD``; the last 30 days up to today by
default, at most ``KEEP_DAYS``), ``group_by`` (any of ``day``, ``milestone``, ``channel``,
``locale``, ``variant``, comma-separated; the first four by default; empty: one row of
totals; ``variant`` is ``<experiment>:<a|b>`` for the messages of an A/B test, from their
acceptance on, and empty for the rest) and
``format`` (``json`` or ``csv``).
"""

from __future__ import annotations

import csv
import io
from datetime import date, timedelta
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from notifier.admin import Admin, json_reply
from notifier.errors import ValidationFailed
from notifier.insights.counts import KEEP_DAYS, SUPPRESSED_BY, Count, split, variant_of

DIMENSIONS = ("day", "milestone", "channel", "locale", "variant")
#: what rows are grouped by unless the query says
DEFAULT_GROUPS = DIMENSIONS[:4]
#: the counts every row has, in this order (then ``suppressed:<rule>`` ones, as found)
COUNTS = tuple(c.value for c in Count)
DEFAULT_DAYS = 30


class InvalidAnalyticsQuery(ValidationFailed):
    code = "invalid_query"


class AnalyticsRow(BaseModel):
    """The counts of one group (its dimensions, then every count)."""

    model_config = ConfigDict(extra="allow")


class Analytics(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    merchant_id: str
    from_: str = Field(alias="from")
    to: str
    group_by: list[str]
    counts: list[str] = Field(description="the count columns of every row, in order")
    rows: list[AnalyticsRow]
    totals: dict[str, int]
    rates: dict[str, float | None] = Field(
        description="delivered / accepted, bounced / accepted, opened and clicked / delivered "
        "emails, unsubscribed / delivered emails (null when nothing to divide by)"
    )


def _refuse(field: str, message: str) -> InvalidAnalyticsQuery:
    return InvalidAnalyticsQuery("invalid query", [{"field": field, "message": message}])


def _day(text: str, name: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError as exc:
        raise _refuse(name, "a UTC day, YYYY-MM-DD") from exc


def query(
    params: Any, today: date, allowed: tuple[str, ...] = ("from", "to", "group_by", "format")
) -> tuple[date, date, list[str], str]:
    """(first day, last day, dimensions, format) of a request's query, which may hold the
    ``allowed`` parameters; 422 naming what is wrong."""
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise _refuse(unknown[0], f"not a parameter: use {', '.join(allowed)}")
    last = _day(params["to"], "to") if "to" in params else today
    first = _day(params["from"], "from") if "from" in params else last - timedelta(DEFAULT_DAYS - 1)
    if first > last:
        raise _refuse("from", "must not be after to")
    if (last - first).days >= KEEP_DAYS:
        raise _refuse("from", f"at most {KEEP_DAYS} days at once (counts are kept that long)")
    groups = [g for g in params.get("group_by", ",".join(DEFAULT_GROUPS)).split(",") if g]
    for g in groups:
        if g not in DIMENSIONS:
            raise _refuse("group_by", f"{g!r} is none of {', '.join(DIMENSIONS)}")
    shape = params.get("format", "json")
    if shape not in ("json", "csv"):
        raise _refuse("format", "json or csv")
    return first, last, list(dict.fromkeys(groups)), shape


def days(params: Any, today: date) -> tuple[date, date]:
    """The first and last day a request's ``from`` and ``to`` name (the routes that take
    nothing else); 422 naming what is wrong."""
    first, last, _, _ = query(params, today, ("from", "to"))
    return first, last


def over_days(merchant_id: str, first: date, last: date, **more: Any) -> dict[str, Any]:
    """An answer about a merchant's days: its id, the days, then ``more``."""
    return {"merchant_id": merchant_id, "from": first.isoformat(), "to": last.isoformat(), **more}


def table(
    found: dict[str, dict[str, int]], groups: list[str]
) -> tuple[list[str], list[dict[str, Any]], dict[str, int]]:
    """(count columns, rows sorted by their dimensions, totals) of day -> field -> n."""
    rows: dict[tuple[str, ...], dict[str, int]] = {}
    rules: set[str] = set()
    for day, fields in found.items():
        for name, n in fields.items():
            parts = split(name)
            if parts is None:
                continue
            milestone, channel, locale, count = parts
            where = {
                "day": day,
                "milestone": milestone,
                "channel": channel,
                "locale": locale,
                "variant": variant_of(name) if "variant" in groups else "",
            }
            key = tuple(where[g] for g in groups)
            row = rows.setdefault(key, {})
            row[count] = row.get(count, 0) + n
            if count.startswith(SUPPRESSED_BY):
                rules.add(count)
    columns = [*COUNTS, *sorted(rules)]
    totals = dict.fromkeys(columns, 0)
    out = []
    for key in sorted(rows):
        counts = {c: rows[key].get(c, 0) for c in columns}
        for c, n in counts.items():
            totals[c] += n
        out.append({**dict(zip(groups, key, strict=True)), **counts})
    return columns, out, totals


def rates(found: dict[str, dict[str, int]]) -> dict[str, float | None]:
    """Rates over the whole range (emails only where only emails can say)."""
    all_channels: dict[str, int] = {}
    email: dict[str, int] = {}
    for fields in found.values():
        for name, n in fields.items():
            parts = split(name)
            if parts is None:
                continue
            all_channels[parts[3]] = all_channels.get(parts[3], 0) + n
            if parts[1] == "email":
                email[parts[3]] = email.get(parts[3], 0) + n

    def ratio(top: int, bottom: int) -> float | None:
        return round(top / bottom, 4) if bottom else None

    accepted = all_channels.get(Count.ACCEPTED, 0)
    delivered_email = email.get(Count.DELIVERED, 0)
    return {
        "delivered": ratio(all_channels.get(Count.DELIVERED, 0), accepted),
        "bounced": ratio(all_channels.get(Count.BOUNCED, 0), accepted),
        "opened": ratio(email.get(Count.OPENED, 0), delivered_email),
        "clicked": ratio(email.get(Count.CLICKED, 0), delivered_email),
        "unsubscribed": ratio(email.get(Count.UNSUBSCRIBED, 0), delivered_email),
    }


class AnalyticsApi:
    """The analytics route (over the editor's ``Admin`` for keys and resources)."""

    def __init__(self, admin: Admin) -> None:
        self.admin = admin

    async def get(self, request: web.Request) -> web.Response:
        merchant_id, _ = self.admin.merchant(request)
        res = self.admin.res
        first, last, groups, shape = query(request.query, res.clock().date())
        found = await res.store.stats(merchant_id, first, last)
        columns, rows, totals = table(found, groups)
        if shape == "csv":
            return csv_response(merchant_id, first, last, groups, columns, rows)
        body = over_days(
            merchant_id,
            first,
            last,
            group_by=groups,
            counts=columns,
            rows=rows,
            totals=totals,
            rates=rates(found),
        )
        return json_reply(200, body)


def csv_response(
    merchant_id: str,
    first: date,
    last: date,
    groups: list[str],
    columns: list[str],
    rows: list[dict[str, Any]],
) -> web.Response:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow([*groups, *columns])
    for row in rows:
        writer.writerow([row[c] for c in (*groups, *columns)])
    name = f"notifier-{merchant_id}-{first.isoformat()}-{last.isoformat()}.csv"
    return web.Response(
        text=out.getvalue(),
        content_type="text/csv",
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )


def add_routes(app: web.Application, admin: Admin) -> AnalyticsApi:
    api = AnalyticsApi(admin)
    app.router.add_get("/v1/merchants/{merchant_id}/analytics", api.get)
    return api
