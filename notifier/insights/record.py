"""Counting what providers and recipients report about a message (the API's side of the
analytics): each report once per message and day, however often it arrives."""

from __future__ import annotations

import logging
from datetime import datetime

from redis.exceptions import RedisError

from notifier.insights.counts import Count, day_of, of_tag
from notifier.store import Store

log = logging.getLogger("notifier.insights")


async def report(
    store: Store,
    merchant_id: str,
    shipment_id: str | None,
    message: str,
    channel: str,
    stats_tag: object,
    count: Count,
    at: datetime,
) -> bool:
    """Count ``count`` for ``message`` (a notification id, or what names the report) in the
    merchant's day, under the milestone, locale and variant its provider echoed (``stats_tag``);
    whether it was new. A Redis failure loses the count, never the report's other effects."""
    scope = store.scope_of(merchant_id, shipment_id or "")
    try:
        name = of_tag(stats_tag, channel, count)
        return await store.count_once(merchant_id, scope, day_of(at), name, message)
    except (RedisError, OSError) as exc:
        log.warning("a %s count was lost: Redis failed (%s)", count, type(exc).__name__)
        return False
