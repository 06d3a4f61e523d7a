"""The two dead-letter lists, for operators: read them, replay them, purge them.

- **inbox** (``ntf:inbox:dead``, a stream): accepted transitions a drain failed on five
  times. Replaying one puts it back into its partition's inbox (one script: it is taken off
  the dead stream in the same step, so it is replayed once) and wakes that partition. The
  pipeline then folds it like any entry: an event already folded is a replay that sends
  nothing new, notification ids are deterministic, so nothing is sent twice.
- **messages** (``ntf:dead``, a list of notification ids): notifications that failed for
  good (a permanent provider error, or out of attempts). Replaying one makes its ledger
  entry due now, only while it is still ``failed`` (one script: a second replay finds it
  ``deferred`` or ``sent`` and does nothing); the worker's due sweep claims and sends it,
  after checking it is still wanted (a message a newer state superseded is cancelled).

Entries are shown without personal data (recipient names, emails and phone numbers are
masked) unless asked for.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from arq.connections import ArqRedis

from notifier.logs import redact
from notifier.models import UNREADABLE, notification_json, unreadable
from notifier.store import Store, awaited, keys, wake
from notifier.store.base import DataRedis, Scope
from notifier.store.scripts import library, script

Kind = Literal["inbox", "messages"]
STREAM_ID = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")
MASK = "***"

# KEYS: ledger entry, dead list, the due index's buckets, the entry's due bucket, the due index
# from before 0.6 (see store/lua/lib/due.lua, in front). ARGV: notification id, now (epoch ms).
_REPLAY_MESSAGE = """
local st = redis.call('HGET', KEYS[1], 'st')
if st ~= 'failed' then
  redis.call('LREM', KEYS[2], 0, ARGV[1])
  if not st then return -1 end
  return 0
end
if not redis.call('HGET', KEYS[1], 'p') then return -2 end
redis.call('HDEL', KEYS[1], 'error', 'owner', 'claimed')
redis.call('HSET', KEYS[1], 'st', 'deferred', 'due', ARGV[2], 'attempts', '0')
redis.call('ZREM', KEYS[5], ARGV[1])
due_add(KEYS[3], KEYS[4], ARGV[1], ARGV[2])
redis.call('LREM', KEYS[2], 0, ARGV[1])
return 1
"""

# KEYS: dead stream, the partition's inbox stream. ARGV: dead entry id, its payload, the
# request id it was accepted with.
_REPLAY_INBOX = """
if redis.call('XDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('XADD', KEYS[2], '*', 't', ARGV[2], 'r', ARGV[3])
return 1
"""

REPLAYED = {
    1: "replayed",
    0: "not failed any more (replayed already)",
    # a notification settled for good leaves the ledger (for its shipment's outcome list)
    -1: "not in the ledger any more (sent since, or expired)",
}


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One entry of a dead-letter list, as an operator sees it."""

    kind: Kind
    id: str
    merchant_id: str
    shipment_id: str
    detail: str  #: why it is here
    body: dict[str, Any]
    #: the API request that accepted it (inbox entries)
    request_id: str = ""
    #: the partition whose dead-letter list holds it, on a Redis Cluster
    scope: Scope = None
    #: an SMS whose update went out by email instead: that email's id and status
    fallback: str = ""

    def summary(self) -> str:
        return f"{self.kind}\t{self.id}\t{self.merchant_id}\t{self.shipment_id}\t{self.detail}"


def masked(value: Any) -> Any:
    """``value`` with recipients' personal data replaced by ***."""
    if isinstance(value, dict):
        out = {}
        for key, inner in value.items():
            if key in ("name", "email", "phone", "to") and isinstance(inner, str):
                out[key] = MASK
            elif key == "unreadable" and isinstance(inner, str):
                out[key] = redact(inner)  # not parsed: no fields to mask, only patterns
            else:
                out[key] = masked(inner)
        return out
    if isinstance(value, list):
        return [masked(v) for v in value]
    return value


class DeadLetters:
    """Reads and repairs the dead-letter lists of one Redis (or of each partition on a
    Redis Cluster); ``queue`` is where drain jobs are enqueued."""

    def __init__(self, redis: DataRedis, store: Store, queue: ArqRedis) -> None:
        self.redis = redis
        self.store = store
        self.queue = queue
        self._replay_message = script(redis, library("due") + _REPLAY_MESSAGE)
        self._replay_inbox = script(redis, _REPLAY_INBOX)

    async def list(self, kind: Kind | None = None, limit: int = 100) -> list[DeadLetter]:
        out: list[DeadLetter] = []
        for scope in self.store.scopes:
            if kind in (None, "inbox") and len(out) < limit:
                dead = keys.dead_inbox_key(self.store.tag(scope))
                rows = await self.redis.xrange(dead, count=limit - len(out))
                out += [self._inbox(i, f, scope) for i, f in rows]
        for scope in self.store.scopes:
            if kind in (None, "messages") and len(out) < limit:
                dead = keys.dead_letter_key(self.store.tag(scope))
                ids = await awaited(self.redis.lrange(dead, 0, limit - len(out) - 1))
                out += [await self._message(_text(i), scope) for i in ids]
        return out

    async def show(self, entry_id: str) -> DeadLetter | None:
        """The dead letter with this id (a stream entry id, or a notification id)."""
        for scope in self.store.scopes:
            tag = self.store.tag(scope)
            if STREAM_ID.fullmatch(entry_id):
                dead = keys.dead_inbox_key(tag)
                rows = await self.redis.xrange(dead, entry_id, entry_id)
                if rows:
                    return self._inbox(rows[0][0], rows[0][1], scope)
                # the id it had in the inbox (which the list shows as "inbox entry …")
                for row_id, fields in await self.redis.xrange(dead):
                    if fields.get(b"from") == entry_id.encode():
                        return self._inbox(row_id, fields, scope)
            elif await awaited(self.redis.lpos(keys.dead_letter_key(tag), entry_id)) is not None:
                return await self._message(entry_id, scope)
        return None

    async def replay(self, letter: DeadLetter, now_ms: int, force: bool = False) -> str:
        """Put one dead letter back to work; what happened, in words. An SMS whose update
        went out by email instead is replayed only with ``force`` (the customer would get
        the same update twice)."""
        tag = self.store.tag(letter.scope)
        if letter.fallback and not force:
            return (
                f"not replayed: its update went out by email instead ({letter.fallback}); "
                "--force sends the SMS as well"
            )
        if letter.kind == "messages":
            code = await self._replay_message(
                keys=[
                    keys.notification_key(letter.id, tag),
                    keys.dead_letter_key(tag),
                    keys.due_buckets_key(tag),
                    keys.due_bucket_key(letter.id, tag),
                    keys.due_key(tag),
                ],
                args=[letter.id, now_ms],
            )
            return REPLAYED.get(int(code), "its payload is gone: cannot be sent again")
        # back to the partition it was buried from (a cluster keeps it there; on one Redis
        # its shipment's partition, in case NOTIFIER_PARTITIONS changed meanwhile)
        partition = (
            self.store.partition_of(letter.merchant_id, letter.shipment_id)
            if letter.scope is None
            else letter.scope
        )
        payload = orjson.dumps(letter.body)
        done = await self._replay_inbox(
            keys=[keys.dead_inbox_key(tag), self.store.inbox_key(partition)],
            args=[letter.id, payload, letter.request_id],
        )
        if not int(done):
            return "replayed already"
        if await self.store.set_wake(partition):
            await wake(self.queue, [partition])
        return f"replayed into partition {partition}"

    async def purge(self, letter: DeadLetter) -> None:
        """Drop one dead letter for good (the ledger entry of a message stays, failed)."""
        tag = self.store.tag(letter.scope)
        if letter.kind == "messages":
            await awaited(self.redis.lrem(keys.dead_letter_key(tag), 0, letter.id))
        else:
            await self.redis.xdel(keys.dead_inbox_key(tag), letter.id)

    def _inbox(self, entry_id: bytes | str, fields: dict[bytes, bytes], scope: Scope) -> DeadLetter:
        raw = fields.get(b"t", b"{}")
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = {"unreadable": raw.decode(errors="replace")[:200]}
        if not isinstance(body, dict):
            body = {"unreadable": str(body)[:200]}
        why = _text(fields.get(b"why", b""))
        origin = _text(fields.get(b"from", b""))
        return DeadLetter(
            "inbox",
            _text(entry_id),
            str(body.get("merchant_id", "")),
            str(body.get("shipment_id", "")),
            f"{why} (event {body.get('event_id', '?')}, inbox entry {origin})",
            body,
            _text(fields.get(b"r", b"")),
            scope,
        )

    async def _message(self, notification_id: str, scope: Scope) -> DeadLetter:
        ledger = (await self.store.ledger([notification_id], scope)).get(notification_id, {})
        raw = await self.store.payload(notification_id, scope)  # it may be packed
        shown: dict[str, Any] = {"ledger": ledger}
        try:
            created = ledger.get("created_at")
            created_at = created if isinstance(created, str) else None
            body = notification_json(notification_id, raw, created_at) if raw else {}
        except UNREADABLE as exc:  # listed all the same, with what is wrong (never its values)
            body, shown["payload"] = {}, f"unreadable: {unreadable(exc)}"
        state = ledger.get("status", "expired")
        detail = f"{state}: {ledger.get('error', '')}".rstrip(": ")
        fallback = await self._fallback(notification_id, body, scope)
        if fallback:
            detail += f"; its update went out by email instead ({fallback})"
        return DeadLetter(
            "messages",
            notification_id,
            str(body.get("merchant_id", "")),
            str(body.get("shipment_id", "")),
            detail,
            {**shown, "notification": body},
            scope=scope,
            fallback=fallback,
        )

    async def _fallback(self, notification_id: str, body: dict[str, Any], scope: Scope) -> str:
        """For an SMS whose update went out by email instead (``note_fallback``), that
        email's id and status ("<id>, <status>"); "" for none, or when the email failed or
        was cancelled too."""
        if body.get("channel") != "sms":
            return ""
        email = await self.store.fallback_of(notification_id, scope)
        merchant, shipment = body.get("merchant_id"), body.get("shipment_id")
        if not (email and isinstance(merchant, str) and isinstance(shipment, str)):
            return ""
        found = (await self.store.deliveries(merchant, shipment, [email])).get(email)
        status = str(found.get("status", "")) if found else "expired"
        if status in ("failed", "cancelled"):
            return ""
        return f"{email}, {status}"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


__all__ = ["DeadLetter", "DeadLetters", "masked"]
