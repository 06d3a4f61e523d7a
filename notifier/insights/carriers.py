"""GET /v1/merchants/{merchant_id}/carriers: carrier performance over a range of UTC days
(``from``, ``to``: the last 30 days by default), per carrier and lane and per carrier and
hub, from the carrier counts (``journeys``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from notifier.admin import Admin, json_reply
from notifier.insights import api as analytics
from notifier.insights.journeys import percentile


class Lane(BaseModel):
    model_config = ConfigDict(extra="forbid")

    carrier: str
    origin: str
    destination: str
    delivered: int
    first_attempt_rate: float | None
    transit_p50_h: float | None
    transit_p90_h: float | None
    #: exception code -> the share of delivered shipments that met it
    exception_rates: dict[str, float]


class Hub(BaseModel):
    model_config = ConfigDict(extra="forbid")

    carrier: str
    hub: str
    visits: int
    dwell_p50_h: float | None
    dwell_p90_h: float | None


class CarrierReport(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    merchant_id: str
    from_: str = Field(alias="from")
    to: str
    lanes: list[Lane]
    hubs: list[Hub]


def report(
    found: Mapping[str, Mapping[str, int]],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(lanes, hubs) from day -> field -> n, busiest first."""
    lanes: dict[tuple[str, str, str], dict[str, int]] = {}
    for fields in found.values():
        for name, n in fields.items():
            parts = name.split("|")
            if len(parts) != 4:
                continue
            mine = lanes.setdefault((parts[0], parts[1], parts[2]), {})
            mine[parts[3]] = mine.get(parts[3], 0) + n
    out_lanes: list[dict[str, Any]] = []
    out_hubs: list[dict[str, Any]] = []
    for (carrier, origin, destination), counts in lanes.items():
        if origin.startswith("hub:"):
            dwell = _histogram(counts, "dwell_h:")
            out_hubs.append(
                {
                    "carrier": carrier,
                    "hub": origin.removeprefix("hub:"),
                    "visits": sum(dwell.values()),
                    "dwell_p50_h": percentile(dwell, 0.5),
                    "dwell_p90_h": percentile(dwell, 0.9),
                }
            )
            continue
        delivered = counts.get("delivered", 0)
        transit = _histogram(counts, "transit_h:")
        out_lanes.append(
            {
                "carrier": carrier,
                "origin": origin,
                "destination": destination,
                "delivered": delivered,
                "first_attempt_rate": round(counts.get("first_attempt", 0) / delivered, 4)
                if delivered
                else None,
                "transit_p50_h": percentile(transit, 0.5),
                "transit_p90_h": percentile(transit, 0.9),
                "exception_rates": {
                    k.removeprefix("exception:"): round(n / delivered, 4)
                    for k, n in sorted(counts.items())
                    if k.startswith("exception:") and delivered
                },
            }
        )
    out_lanes.sort(key=lambda x: (-x["delivered"], x["carrier"], x["origin"], x["destination"]))
    out_hubs.sort(key=lambda x: (-x["visits"], x["carrier"], x["hub"]))
    return out_lanes, out_hubs


def _histogram(counts: Mapping[str, int], prefix: str) -> dict[str, int]:
    return {k.removeprefix(prefix): n for k, n in counts.items() if k.startswith(prefix)}


class CarriersApi:
    def __init__(self, admin: Admin) -> None:
        self.admin = admin

    async def get(self, request: web.Request) -> web.Response:
        merchant_id, _ = self.admin.merchant(request)
        res = self.admin.res
        first, last = analytics.days(request.query, res.clock().date())
        lanes, hubs = report(await res.store.carrier_stats(merchant_id, first, last))
        return json_reply(
            200, analytics.over_days(merchant_id, first, last, lanes=lanes, hubs=hubs)
        )


def add_routes(app: web.Application, admin: Admin) -> CarriersApi:
    api = CarriersApi(admin)
    app.router.add_get("/v1/merchants/{merchant_id}/carriers", api.get)
    return api
