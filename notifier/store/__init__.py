"""Everything notifier keeps in Redis, one concern per module:

- ``keys``: every key and prefix;
- ``inbox``: idempotent ingest (group-committed), the partitions' streams, drain locks and
  wake flags, and ``wake`` (enqueue a partition's drain job);
- ``shipments``: shipment state, the commit that records decisions, history, stalls;
- ``ledger``: claim, settle, reschedule, the due index, providers' message ids;
- ``optouts``, and ``health`` (dead letters, merchants' broken files);
- ``hooks``: merchant webhook endpoints, their delivery logs, the events waiting to go out;
- ``stats``: notification analytics, counts per merchant and day;
- ``scripts``: the Lua scripts (``lua/*.lua``) every atomic write goes through.

``Store`` joins the parts over one Redis client; callers hold one ``Store``.
"""

from __future__ import annotations

from notifier.store import keys
from notifier.store.base import DataRedis, Scope, awaited
from notifier.store.health import Health
from notifier.store.hooks import ClaimedEvent, Hooks
from notifier.store.inbox import (
    Admission,
    Inbox,
    InboxEntry,
    IngestItem,
    NotReplicated,
    PartlyStored,
    StoredInPart,
    body_digest,
    wake,
)
from notifier.store.keys import GROUP, PREFIX
from notifier.store.ledger import Claim, ClaimResult, Ledger, LedgerState
from notifier.store.optouts import OptOuts
from notifier.store.shipments import Committed, HistoryPage, ShipmentCommit, Shipments
from notifier.store.stats import Stats

__all__ = [
    "GROUP",
    "PREFIX",
    "Admission",
    "Claim",
    "ClaimResult",
    "ClaimedEvent",
    "Committed",
    "DataRedis",
    "HistoryPage",
    "InboxEntry",
    "IngestItem",
    "LedgerState",
    "NotReplicated",
    "PartlyStored",
    "Scope",
    "ShipmentCommit",
    "Store",
    "StoredInPart",
    "awaited",
    "body_digest",
    "wake",
]


class Store(Inbox, Shipments, Ledger, OptOuts, Health, Hooks, Stats):
    """Typed access to everything notifier keeps in Redis."""

    # The key names on one Redis, where callers from before the split look for them (``keys``
    # has them, with the tags a Redis Cluster adds).
    DEAD_INBOX_KEY = keys.DEAD_INBOX_KEY
    EVENT_BUCKET_BITS = keys.EVENT_BUCKET_BITS
    EVENT_BUCKET_PREFIX = keys.EVENT_BUCKET_PREFIX
    event_slot = staticmethod(keys.event_slot)
    event_binary_slot = staticmethod(keys.event_binary_slot)
    event_bucket_key = staticmethod(keys.event_bucket_key)
    legacy_event_key = staticmethod(keys.legacy_event_key)
    STALL_KEY = keys.STALL_KEY
    stall_member = staticmethod(keys.stall_member)
    tracking_key = staticmethod(keys.tracking_key)
    notification_key = staticmethod(keys.notification_key)
    DUE_KEY = keys.DUE_KEY  # the due index from before 0.6, still drained; now in buckets
    DEAD_LETTER_KEY = keys.DEAD_LETTER_KEY
    provider_key = staticmethod(keys.provider_key)
    optout_key = staticmethod(keys.optout_key)
    OVERRIDES_KEY = keys.OVERRIDES_KEY
