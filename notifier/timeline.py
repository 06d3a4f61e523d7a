"""A shipment's timeline: its decisions with their delivery status (the history API and the
editor's timeline page), and finding a shipment by its tracking number."""

from __future__ import annotations

from typing import Any

from notifier.insights.predict import predict
from notifier.resources import Resources


async def shipment_history(
    res: Resources, merchant_id: str, shipment_id: str, cursor: int | None, limit: int
) -> dict[str, Any] | None:
    """A page of the shipment's decisions, each with its notification's delivery status
    (DESIGN.md §5); None when nothing was ever recorded for it."""
    page = await res.store.history_page(merchant_id, shipment_id, cursor, limit)
    if not page.total:
        return None
    decisions = page.decisions
    ids = [d["notification_id"] for d in decisions if d.get("notification_id")]
    ledger = await res.store.deliveries(merchant_id, shipment_id, ids)
    for d in decisions:
        if d.get("notification_id"):
            d["delivery"] = ledger.get(d["notification_id"], {})
    return {
        "merchant_id": merchant_id,
        "shipment_id": shipment_id,
        "decisions": decisions,
        # positions count every decision ever recorded; the oldest beyond the history's
        # cap are no longer kept, and ``trimmed`` says how many
        "total": page.total,
        "trimmed": page.trimmed,
        "next_cursor": None if page.next_cursor is None else str(page.next_cursor),
        "prediction": await _prediction(res, merchant_id, shipment_id),
    }


async def _prediction(res: Resources, merchant_id: str, shipment_id: str) -> dict[str, Any] | None:
    """When the shipment is likely delivered, from the merchant's own history (``predict``)."""
    [(_, state)] = await res.store.load_states([(merchant_id, shipment_id)])
    if state is None:
        return None
    now = res.clock()
    found = predict(await res.predictions.model(merchant_id, now.date()), state, now)
    return None if found is None else found.as_json()


async def find_shipments(res: Resources, merchant_id: str, query: str) -> list[str]:
    """The merchant's shipments that ``query`` names: a shipment id with a history, or a
    tracking number (several shipments can share one: a carrier may reuse numbers), typed
    in any case and with any spaces (``keys.tracking_search``)."""
    query = query.strip()
    if not query:
        return []
    found = await res.store.shipments_tracked_as(merchant_id, query)
    if query not in found and (await res.store.history_page(merchant_id, query, None, 1)).total:
        found.insert(0, query)
    return found
