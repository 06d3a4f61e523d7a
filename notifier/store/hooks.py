"""Merchant webhooks in Redis: each merchant's endpoints and delivery logs, and the events
waiting to go out.

Events about decisions are queued by the commit that records them (``lua/commit.lua``), so
none is lost between deciding and queueing; others (a test) through ``lua/hook_event.lua``.
An event waits in its scope's due index until a worker takes it for a lease
(``hook_claim.lua``), sends it to every endpoint subscribed, and settles it
(``hook_settle.lua``): forgotten once every endpoint took it or was given up on, otherwise
kept with its attempts per endpoint and due again later.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from notifier.store import keys
from notifier.store.base import Scope, StoreBase, awaited, decode


@dataclass(frozen=True, slots=True)
class ClaimedEvent:
    """A webhook event taken for a lease."""

    event_id: str
    #: what ``outbound.events.stored`` made: the event, and the endpoint a test is for
    stored: bytes
    #: endpoint id -> its attempts so far and whether it is done ({} before the first send)
    progress: dict[str, Any]
    #: the lease's end it was taken with (epoch ms): settling needs it
    lease_ms: int


class Hooks(StoreBase):
    """Merchant webhook endpoints, their delivery logs, and the events waiting to go out."""

    # -- endpoints (one hash per merchant) -------------------------------------------------
    async def hook_endpoints(self, merchant_id: str) -> dict[str, dict[str, Any]]:
        """A merchant's endpoints by id (secrets included)."""
        raw = await awaited(self.redis.hgetall(keys.hook_endpoints_key(merchant_id)))
        return {decode(k): orjson.loads(v) for k, v in raw.items()}

    async def hook_endpoints_of(
        self, merchant_ids: Sequence[str]
    ) -> list[dict[str, dict[str, Any]]]:
        """The endpoints of each merchant (one round trip; per node on a cluster)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for merchant_id in merchant_ids:
                pipe.hgetall(keys.hook_endpoints_key(merchant_id))
            found = await pipe.execute()
        return [{decode(k): orjson.loads(v) for k, v in raw.items()} for raw in found]

    async def add_hook_endpoint(
        self, merchant_id: str, endpoint: dict[str, Any], most: int
    ) -> bool:
        """Add an endpoint unless the merchant has ``most`` already (checked and written at
        once); whether it was added."""
        return await self._write_endpoint(merchant_id, endpoint, "new", most) == 1

    async def change_hook_endpoint(
        self, merchant_id: str, before: dict[str, Any], endpoint: dict[str, Any]
    ) -> int:
        """Replace an endpoint as it was read (``before``, from ``hook_endpoints``): 1 when
        written, 0 when it was deleted meanwhile, -1 when it changed meanwhile."""
        return await self._write_endpoint(
            merchant_id, endpoint, "change", orjson.dumps(before).decode()
        )

    async def _write_endpoint(
        self, merchant_id: str, endpoint: dict[str, Any], how: str, check: int | str
    ) -> int:
        args = [endpoint["id"], orjson.dumps(endpoint).decode(), how, check]
        written = await self.scripts.hook_endpoint(
            keys=[keys.hook_endpoints_key(merchant_id)], args=args
        )
        return int(written)

    async def delete_hook_endpoint(self, merchant_id: str, endpoint_id: str) -> bool:
        """Drop an endpoint and its log; False when there was none."""
        gone = await awaited(self.redis.hdel(keys.hook_endpoints_key(merchant_id), endpoint_id))
        await awaited(self.redis.delete(keys.hook_log_key(merchant_id, endpoint_id)))
        return bool(gone)

    # -- delivery logs ----------------------------------------------------------------------
    async def log_hook_attempts(
        self, merchant_id: str, attempts: Sequence[tuple[str, dict[str, Any]]], cap: int, ttl_s: int
    ) -> None:
        """Record (endpoint id, attempt) pairs, newest first, keeping each endpoint's
        latest ``cap`` for ``ttl_s`` after its last one."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for endpoint_id, attempt in attempts:
                key = keys.hook_log_key(merchant_id, endpoint_id)
                pipe.lpush(key, orjson.dumps(attempt))
                pipe.ltrim(key, 0, cap - 1)
                pipe.expire(key, ttl_s)
            await pipe.execute()

    async def hook_attempts(
        self, merchant_id: str, endpoint_id: str, limit: int
    ) -> list[dict[str, Any]]:
        """An endpoint's latest delivery attempts, newest first."""
        key = keys.hook_log_key(merchant_id, endpoint_id)
        return [orjson.loads(v) for v in await awaited(self.redis.lrange(key, 0, limit - 1))]

    # -- the queue ----------------------------------------------------------------------------
    def _queue_keys(self, scope: Scope) -> list[str]:
        tag = self.tag(scope)
        return [keys.hook_due_key(tag), keys.hook_events_key(tag), keys.hook_progress_key(tag)]

    async def queue_hook_events(
        self, scope: Scope, events: Sequence[tuple[str, bytes]], due_ms: int
    ) -> int:
        """Queue events (id, stored JSON) due at ``due_ms``, each once; how many were new."""
        if not events:
            return 0
        args: list[Any] = [due_ms]
        for eid, stored in events:
            args += [eid, stored]
        added = await self.scripts.hook_event(keys=self._queue_keys(scope)[:2], args=args)
        return int(added)

    async def claim_hook_events(
        self, scope: Scope, now_ms: int, lease_ms: int, limit: int
    ) -> list[ClaimedEvent]:
        """Take up to ``limit`` due events until ``now_ms + lease_ms``."""
        until = now_ms + lease_ms
        flat = await self.scripts.hook_claim(
            keys=self._queue_keys(scope), args=[now_ms, until, limit]
        )
        out = []
        for i in range(0, len(flat), 3):
            progress = orjson.loads(flat[i + 2]) if flat[i + 2] else {}
            out.append(ClaimedEvent(decode(flat[i]), bytes(flat[i + 1]), progress, until))
        return out

    async def settle_hook_event(
        self,
        scope: Scope,
        event: ClaimedEvent,
        progress: dict[str, Any] | None,
        retry_at_ms: int = 0,
    ) -> bool:
        """Forget ``event`` (``progress`` None) or keep its progress until ``retry_at_ms``;
        False when its lease had ended and another worker holds it."""
        done = await self.scripts.hook_settle(
            keys=self._queue_keys(scope),
            args=[
                event.event_id,
                event.lease_ms,
                "" if progress is None else orjson.dumps(progress),
                retry_at_ms,
            ],
        )
        return bool(done)

    async def hook_queue_length(self, scope: Scope) -> int:
        """Events waiting to go out (or being sent) in a scope."""
        return int(await awaited(self.redis.zcard(keys.hook_due_key(self.tag(scope)))))
