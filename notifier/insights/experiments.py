"""A/B tests of messages: how each variant did (``GET /v1/merchants/{m}/experiments``).

A policy's ``experiments`` give a share of shipments variant b of a message (its
``.b.jinja`` file); each message of a test carries ``<experiment>:<a|b>`` in its counts from
the moment it is accepted (``insights.counts``): the providers' reports (delivered, opened,
clicked, unsubscribed, bounced) and the recipients' SMS replies and STOPs. The outcomes per
variant come from those counts (never a scan of Redis), with a two-sided two-proportion
z-test of each rate: a p-value below 0.05 says a difference that large would rarely come
from the draw alone.
"""

from __future__ import annotations

import math
from datetime import date
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from notifier.admin import Admin, json_reply
from notifier.insights import api as analytics
from notifier.insights.counts import Count, split, variant_of
from notifier.models import message_name_of
from notifier.policy import Policy
from notifier.resources import Resources, sync_published

#: the counts shown per variant and channel
COUNTS = (
    Count.ACCEPTED,
    Count.FAILED,
    Count.DELIVERED,
    Count.BOUNCED,
    Count.OPENED,
    Count.CLICKED,
    Count.UNSUBSCRIBED,
    Count.SPAM_REPORTS,
    Count.REPLIES,
    Count.STOPS,
)
#: the rates compared: (name, count, its channel, what it is divided by)
RATES = (
    ("opened", Count.OPENED, "email", Count.DELIVERED),
    ("clicked", Count.CLICKED, "email", Count.DELIVERED),
    ("unsubscribed", Count.UNSUBSCRIBED, "email", Count.DELIVERED),
    ("replied", Count.REPLIES, "sms", Count.ACCEPTED),
    ("stopped", Count.STOPS, "sms", Count.ACCEPTED),
    ("bounced", Count.BOUNCED, "all", Count.ACCEPTED),
)


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class VariantCounts(_Closed):
    """A variant's messages: each count per channel, and over both."""

    channels: dict[str, dict[str, int]] = Field(description="email and sms: count -> n")
    all: dict[str, int]


class Comparison(_Closed):
    """One rate in each variant, and whether they differ by more than the draw explains."""

    a: float | None
    b: float | None
    of: str = Field(description="what the rate is divided by")
    p_value: float | None = Field(
        description="two-sided two-proportion z-test; null when a side has nothing to divide by"
    )


class ExperimentResult(_Closed):
    name: str
    message: str | None
    b_percent: int | None = Field(description="null for an experiment no longer in the policy")
    running: bool
    variants: dict[str, VariantCounts]
    comparison: dict[str, Comparison]


class ExperimentsReport(_Closed):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    merchant_id: str
    from_: str = Field(alias="from")
    to: str
    experiments: list[ExperimentResult]


def p_value(hits_a: int, n_a: int, hits_b: int, n_b: int) -> float | None:
    """The two-sided p-value of a two-proportion z-test (pooled); None when either side
    has nothing to divide by, or both rates are 0 or 1 alike (no variance)."""
    if n_a <= 0 or n_b <= 0:
        return None
    pooled = (hits_a + hits_b) / (n_a + n_b)
    spread = pooled * (1 - pooled) * (1 / n_a + 1 / n_b)
    if spread <= 0:
        return None
    z = (hits_a / n_a - hits_b / n_b) / math.sqrt(spread)
    return round(math.erfc(abs(z) / math.sqrt(2)), 4)


def _tally(found: dict[str, dict[str, int]]) -> dict[str, dict[str, Any]]:
    """experiment -> {"message": milestone, "variants": arm -> channel -> count -> n}."""
    out: dict[str, dict[str, Any]] = {}
    for fields in found.values():
        for name, n in fields.items():
            test = variant_of(name)
            parts = split(name)
            if not test or parts is None:
                continue
            experiment, _, arm = test.rpartition(":")
            milestone, channel, _, count = parts
            mine = out.setdefault(experiment, {"message": milestone, "variants": {}})
            counts = mine["variants"].setdefault(arm, {}).setdefault(channel, {})
            counts[count] = counts.get(count, 0) + n
    return out


def summary(found: dict[str, dict[str, int]], policy: Policy) -> list[dict[str, Any]]:
    """Every experiment of the policy, and every other one counted in ``found`` (day ->
    field -> n): its counts per variant and channel, its rates and their comparison."""
    tallied = _tally(found)
    running = {e.name: e for e in policy.experiments}
    out = []
    for name in [*running, *sorted(set(tallied) - set(running))]:
        test = running.get(name)
        seen = tallied.get(name, {"message": None, "variants": {}})
        variants: dict[str, Any] = {}
        for arm in ("a", "b"):
            by_channel = seen["variants"].get(arm, {})
            channels = {
                channel: {c.value: by_channel.get(channel, {}).get(c.value, 0) for c in COUNTS}
                for channel in ("email", "sms")
            }
            every = {c.value: channels["email"][c.value] + channels["sms"][c.value] for c in COUNTS}
            variants[arm] = {"channels": channels, "all": every}
        comparison = {}
        for rate, count, channel, base in RATES:
            sides = [
                variants[arm]["all"] if channel == "all" else variants[arm]["channels"][channel]
                for arm in ("a", "b")
            ]
            hits = [side[count.value] for side in sides]
            bases = [side[base.value] for side in sides]
            comparison[rate] = {
                "a": round(hits[0] / bases[0], 4) if bases[0] else None,
                "b": round(hits[1] / bases[1], 4) if bases[1] else None,
                "of": f"{channel} {base.value}" if channel != "all" else base.value,
                "p_value": p_value(hits[0], bases[0], hits[1], bases[1]),
            }
        out.append(
            {
                "name": name,
                "message": test.message if test else message_name_of(seen["message"] or "") or None,
                "b_percent": test.b_percent if test else None,
                "running": test is not None,
                "variants": variants,
                "comparison": comparison,
            }
        )
    return out


async def published_policy(res: Resources, merchant_id: str) -> Policy:
    """The merchant's policy as its messages are decided now: with its published override as
    it is in Redis (a publish in any process), not as this process last loaded it."""
    await sync_published(res, [merchant_id])
    return res.policies.for_merchant(merchant_id)


class ExperimentsApi:
    """The experiments route (over the editor's ``Admin`` for keys and resources)."""

    def __init__(self, admin: Admin) -> None:
        self.admin = admin

    async def results(self, merchant_id: str, first: date, last: date) -> list[dict[str, Any]]:
        res = self.admin.res
        found = await res.store.stats(merchant_id, first, last)
        return summary(found, await published_policy(res, merchant_id))

    async def get(self, request: web.Request) -> web.Response:
        merchant_id, _ = self.admin.merchant(request)
        first, last = analytics.days(request.query, self.admin.res.clock().date())
        found = await self.results(merchant_id, first, last)
        return json_reply(200, analytics.over_days(merchant_id, first, last, experiments=found))


def add_routes(app: web.Application, admin: Admin) -> ExperimentsApi:
    api = ExperimentsApi(admin)
    app.router.add_get("/v1/merchants/{merchant_id}/experiments", api.get)
    return api
