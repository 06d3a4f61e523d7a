"""Every Redis key and prefix the store writes, in one place.

The names are part of the stored format: data written by an earlier version must still
be found, so a key here is never renamed, only added.

On a Redis Cluster every key a script touches must live in one hash slot. The keys of a
partition (its inbox stream, wake flag and lock, its event-id buckets, its shipments' state
and history, their ledger entries, its due, stall and dead-letter indexes) then carry the
partition's hash tag, ``tag(partition)``, placed before anything a merchant chose (an id
with braces of its own can never pick the slot). On a single Redis the tag is "" and every
name is what it always was; the functions below take it as ``tag``.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import itertools
import re
import zlib

from redis.crc import key_slot

PREFIX = "ntf"
#: The consumer group every worker reads the inbox streams with.
GROUP = "workers"


@functools.cache
def tag(partition: int, partitions: int) -> str:
    """The Redis Cluster hash tag of a partition's keys: ``{p<partition>.<k>}``, the first
    ``k`` whose slot falls in the partition's share of the 16,384 slots, so the partitions
    spread evenly over shards that hold equal ranges of slots (as ``redis-cli --cluster
    create`` makes them), not where their names happen to hash."""
    if not 0 <= partition < partitions:  # (its share of the slots would be past the last)
        raise ValueError(f"no partition {partition} of {partitions}")
    low, high = partition * SLOTS // partitions, (partition + 1) * SLOTS // partitions
    for k in itertools.count():
        name = f"p{partition}.{k}"
        if low <= key_slot(name.encode()) < high:
            return f"{{{name}}}"
    raise AssertionError("unreachable")  # pragma: no cover


#: Hash slots of a Redis Cluster.
SLOTS = 16384


def _scoped(key: str, tag: str) -> str:
    """A key that is one for all partitions on a single Redis, and one per partition
    (``<key>:<tag>``) on a cluster."""
    return f"{key}:{tag}" if tag else key


# -- inbox (inbox.py) ----------------------------------------------------------------------
def partition_of(merchant_id: str, shipment_id: str, partitions: int) -> int:
    """The inbox partition of a shipment: stable, so its events stay in one stream."""
    return zlib.crc32(f"{merchant_id}\x00{shipment_id}".encode()) % partitions


def inbox_key(partition: int, tag: str = "") -> str:
    """A partition's inbox stream (on a cluster its tag is in place of its number)."""
    return f"{PREFIX}:inbox:{tag or partition}"


def wake_key(partition: int, tag: str = "") -> str:
    """Set while a drain job for the partition is enqueued or running."""
    return f"{inbox_key(partition, tag)}:wake"


def lock_key(partition: int, tag: str = "") -> str:
    """The partition's drain lock."""
    return f"{inbox_key(partition, tag)}:lock"


#: Inbox entries that kept failing, moved aside (a stream; never dropped).
DEAD_INBOX_KEY = f"{PREFIX}:inbox:dead"


def dead_inbox_key(tag: str = "") -> str:
    return _scoped(DEAD_INBOX_KEY, tag)


#: Event ids seen lately live in hash buckets, not one key each: a key costs Redis
#: ~80 bytes of its own, a field and its value in a small (listpack) hash 16. A bucket belongs to a
#: generation of ``idempotency_ttl_s`` (by Redis's clock); ids are looked up in the
#: current and the previous generation and expire with their bucket, so an id is
#: remembered at least ``idempotency_ttl_s`` and at most twice that. 16,384 buckets
#: stay small hashes (Redis's default 128 fields) up to about two million events per
#: generation. (Their own prefix: a pre-0.5 key ``ntf:evt:<merchant>:<event id>`` can
#: never be mistaken for a bucket.)
EVENT_BUCKET_BITS = 14
EVENT_BUCKET_PREFIX = f"{PREFIX}:evb:"
#: The characters of an event id's field in base64, as it was recorded before binary fields
#: (``EVENT_FIELD_BYTES``): 72 bits of its hash. Fields were 96 bits (16 characters, whose
#: first 12 are the same) before that; ``event_marker_key`` says from which generation on
#: they are short.
EVENT_FIELD_CHARS = 12


def event_hash(merchant_id: str, event_id: str) -> tuple[int, str]:
    """(bucket number, long field) of an event id: a 128-bit hash of it picks the bucket (14
    bits); 96 more bits of it, in base64, are its field in generations written before fields
    were short. The ingest script takes this (and looks the first ``EVENT_FIELD_CHARS`` up
    in generations before binary fields); it records ``event_binary``."""
    digest = hashlib.blake2b(f"{merchant_id}\x00{event_id}".encode(), digest_size=16).digest()
    bucket = int.from_bytes(digest[:2]) >> (16 - EVENT_BUCKET_BITS)
    return bucket, base64.b64encode(digest[2:14]).decode()


def event_slot(merchant_id: str, event_id: str) -> tuple[int, str]:
    """(bucket number, field) an event id was recorded under between long fields and binary
    ones (``event_binary_slot``), looked up in generations before binary fields."""
    bucket, long = event_hash(merchant_id, event_id)
    return bucket, long[:EVENT_FIELD_CHARS]


def event_bucket_key(generation: int, bucket: int, tag: str = "") -> str:
    """An event-id bucket of a generation (on a cluster, one set of buckets per partition)."""
    return f"{EVENT_BUCKET_PREFIX}{tag}{generation}:{bucket}"


#: An event id's field from the generation ``event_binary_marker_key`` holds on: the first
#: 64 bits of its hash (the long field's) as bytes, with the bucket's 14 bits 78 bits to tell
#: ids apart; its value the first 32 bits of the body digest, as bytes. In a bucket (a
#: listpack) a recorded event takes 16 bytes so, where the 12 and 6 characters of base64
#: before took 22: about 50 bytes a shipment at 8 to 9 events each.
EVENT_FIELD_BYTES = 8
#: the bytes of a body digest recorded beside a binary field
EVENT_DIGEST_BYTES = 4


def event_binary(long_field: str, digest: str) -> bytes:
    """The binary field and digest an event is recorded with (``EVENT_FIELD_BYTES`` then
    ``EVENT_DIGEST_BYTES``), from its long field (``event_hash``) and its body digest in
    base64 (``inbox.body_digest``: 6 characters, 36 bits; a longer one, 8 or 12, has the same
    first 32 bits)."""
    return _binary_field(long_field) + digest_bits(digest)


def digest_bits(digest: str) -> bytes:
    """The ``EVENT_DIGEST_BYTES`` a body digest in base64 is recorded as."""
    if len(digest) < 6:
        raise ValueError(f"a body digest of {len(digest)} characters: 6 or more expected")
    head = digest[:8]  # (6 characters of base64 are 36 bits, 8 are 48)
    return base64.b64decode(head + "=" * (-len(head) % 4))[:EVENT_DIGEST_BYTES]


def event_binary_slot(merchant_id: str, event_id: str) -> tuple[int, bytes]:
    """(bucket number, binary field) an event id is recorded under now."""
    bucket, long = event_hash(merchant_id, event_id)
    return bucket, _binary_field(long)


def _binary_field(long_field: str) -> bytes:
    """The binary field of an id whose long field (base64) is this: its first bits."""
    return base64.b64decode(long_field)[:EVENT_FIELD_BYTES]


def event_binary_marker_key(tag: str = "") -> str:
    """The first generation whose buckets hold binary fields (``EVENT_FIELD_BYTES``) only,
    set like ``event_marker_key``: in an older generation an id is looked up by its base64
    fields too."""
    return f"{EVENT_BUCKET_PREFIX}{tag}binary"


def event_marker_key(tag: str = "") -> str:
    """The first generation whose buckets hold short fields (``EVENT_FIELD_CHARS``) only,
    set by the first ingest that finds it unset to the generation after Redis's: in an
    older generation an id is looked up by its long field too. (No generation's key: a
    number never starts with ``s``.)"""
    return f"{EVENT_BUCKET_PREFIX}{tag}short"


def legacy_event_key(merchant_id: str, event_id: str) -> str:
    """Where notifier before 0.5 kept an event id, a key each (still honoured until
    those keys expire)."""
    return f"{PREFIX}:evt:{merchant_id}:{event_id}"


# -- shipments (shipments.py) --------------------------------------------------------------
def state_key(merchant_id: str, shipment_id: str, tag: str = "") -> str:
    """A shipment's record (a string, see ``record``: its state's version and the state, its
    history and its outcome list). Before records: its state hash, version ``v``, packed
    state ``s`` and history count ``hn``."""
    return f"{PREFIX}:shp:{tag}{merchant_id}:{shipment_id}"


def history_key(merchant_id: str, shipment_id: str, tag: str = "") -> str:
    """Before records: a shipment's decisions, oldest first (a list; now in its record)."""
    return f"{PREFIX}:hist:{tag}{merchant_id}:{shipment_id}"


def record_keys(merchant_id: str, shipment_id: str, tag: str = "") -> list[str]:
    """The keys the scripts that read or write a shipment's record take: the record, then
    the history and outcome lists of the layout before records (read, and replaced by the
    record)."""
    return [
        state_key(merchant_id, shipment_id, tag),
        history_key(merchant_id, shipment_id, tag),
        outcome_key(merchant_id, shipment_id, tag),
    ]


#: Shipments by the epoch ms they count as stalled (a sorted set of ``stall_member``).
STALL_KEY = f"{PREFIX}:stall"


def stall_key(tag: str = "") -> str:
    return _scoped(STALL_KEY, tag)


def stall_member(merchant_id: str, shipment_id: str) -> str:
    # merchant ids have no ":", so the first one splits the two
    return f"{merchant_id}:{shipment_id}"


def tracking_key(merchant_id: str, tracking_number: str, tag: str = "") -> str:
    """Before tracking buckets (``tracking_bucket_key``): the shipments that carried a
    tracking number, a key each (the fields of a hash, values empty; a set before records;
    on a Redis Cluster one per partition). Still read until they expire, never written."""
    return f"{PREFIX}:trk:{tag}{merchant_id}:{tracking_number}"


#: Tracking numbers live in hash buckets, as event ids do, not a key each: a key with a
#: lifetime cost Redis about 180 bytes of memory, a field in a small (listpack) bucket about
#: 40 (a field longer than 64 bytes, a shipment id over 52 characters, makes its bucket a
#: big hash: about twice that a field). A bucket belongs to a week (a fixed span, so a
#: change of ``state_ttl_s`` renumbers nothing), by Redis's clock as the writer reckons it;
#: each commit of a shipment records its number in the current week's bucket and keeps the
#: bucket at least as long as the shipment's record. A lookup reads every week a record
#: written now could still live through (``state_ttl_s`` as it is set now: after lowering
#: it, a record written under the longer lifetime is found within the new one only). 8,192
#: buckets stay small hashes up to about a million shipments a week.
TRACKING_BUCKET_BITS = 13
TRACKING_BUCKET_PREFIX = f"{PREFIX}:tkb:"
TRACKING_SPAN_S = 7 * 24 * 3600
#: The characters of a tracking number's hash: 72 bits in base64.
TRACKING_FIELD_CHARS = 12
#: The most shipments a lookup of a tracking number shows.
TRACKING_SHIPMENTS = 50


def tracking_slot(
    merchant_id: str, tracking_number: str, as_written: bool = False
) -> tuple[int, str]:
    """(bucket number, hash) of a merchant's tracking number: each shipment that carried it
    is a field of the bucket, ``<hash><shipment id>``, with an empty value (one field a
    shipment, and every value short, keep the bucket a small hash). The number is hashed
    as ``tracking_search`` spells it, so that "1Z 999 aa1" finds "1Z999AA1"; with
    ``as_written``, as versions before 12-06 hashed it (their entries still read)."""
    number = tracking_number if as_written else tracking_search(tracking_number)
    digest = hashlib.blake2b(f"{merchant_id}\x00{number}".encode(), digest_size=12).digest()
    bucket = int.from_bytes(digest[:2]) >> (16 - TRACKING_BUCKET_BITS)
    return bucket, base64.b64encode(digest[2:11]).decode()


def tracking_search(tracking_number: str) -> str:
    """A tracking number as it is looked up: without spaces or dashes, in capitals (a
    label prints it in groups, people type it in lower case or grouped with dashes;
    carriers' numbers have no lower case)."""
    return "".join(tracking_number.split()).replace("-", "").upper()


def tracking_week(redis_seconds: float) -> int:
    """The week (``TRACKING_SPAN_S``) a moment by Redis's clock falls in."""
    return int(redis_seconds) // TRACKING_SPAN_S


def tracking_weeks(redis_seconds: float, lifetime_s: int) -> range:
    """The weeks a lookup at ``redis_seconds`` reads: every one written in during the last
    ``lifetime_s`` (the longest a record lives), and one more each side for clocks that
    disagree."""
    return range(tracking_week(redis_seconds - lifetime_s) - 1, tracking_week(redis_seconds) + 2)


def tracking_bucket_key(week: int, bucket: int, tag: str = "") -> str:
    """A tracking-number bucket of a week (on a cluster, one set of buckets per partition:
    a shipment's number is recorded with its partition's tag, by its commit)."""
    return f"{TRACKING_BUCKET_PREFIX}{tag}{week}:{bucket}"


# -- ledger (ledger.py) --------------------------------------------------------------------
def notification_key(notification_id: str, tag: str = "") -> str:
    """A notification's ledger entry (a hash)."""
    return f"{PREFIX}:msg:{tag}{notification_id}"


#: Before 0.6: notification ids by the epoch ms they are due (deferred ones and retries),
#: one sorted set. Still read and drained (``ledger.Ledger.due``), no longer written: the
#: due index is now in buckets (``due_bucket_key``).
DUE_KEY = f"{PREFIX}:due"
#: How many buckets a due index has (on a cluster, each partition's).
DUE_BUCKETS = 1024
#: Notifications that failed for good (a list of ids).
DEAD_LETTER_KEY = f"{PREFIX}:dead"


def due_key(tag: str = "") -> str:
    """The due index from before 0.6 (see ``DUE_KEY``)."""
    return _scoped(DUE_KEY, tag)


def due_bucket_key(notification_id: str, tag: str = "") -> str:
    """The due bucket of a notification: a sorted set of ids by the epoch ms they are due,
    one of ``DUE_BUCKETS``. One sorted set of them all cost about 140 bytes an id (Redis's
    skiplist encoding, over 128 members); a bucket of up to 128 stays a listpack, about 35
    bytes an id with ``due_member`` (measured: ``tests/test_due_index.py``). About 100,000
    waiting messages fit a due index so; past that, a bucket grows into the larger encoding,
    correct but bigger.
    """
    bucket = zlib.crc32(notification_id.encode()) % DUE_BUCKETS
    return f"{_scoped(DUE_KEY, tag)}:{bucket}"


#: an id as ``models.notification_id_of`` makes them: ``n_`` and 32 lowercase hex digits,
#: which a chunk of outcomes and a due bucket keep in the 16 bytes they spell
MADE_ID = re.compile(r"n_[0-9a-f]{32}")


def made_id_bytes(notification_id: str) -> bytes:
    """The 16 bytes of an id ``MADE_ID`` matches."""
    return bytes.fromhex(notification_id[2:])


def made_id(raw: bytes) -> str:
    """The id whose 16 bytes these are (``made_id_bytes`` undone)."""
    return "n_" + raw.hex()


def due_member(notification_id: str) -> bytes:
    """A notification id's member in its due bucket: byte 255 and its 16 bytes, for an id
    the service made (17 bytes instead of 34, a smaller listpack); any other id as it is
    (``lua/lib/due.lua`` writes them)."""
    if MADE_ID.fullmatch(notification_id):
        return b"\xff" + made_id_bytes(notification_id)
    return notification_id.encode()


def due_id(member: bytes) -> str:
    """The notification id of a due bucket's member (``due_member`` undone)."""
    if len(member) == 17 and member[0] == 0xFF:
        return made_id(member[1:])
    return member.decode()


def due_buckets_key(tag: str = "") -> str:
    """The buckets of a due index by the earliest due ms in each (a sorted set of their key
    names; a bucket leaves it with its last id): where the due sweep starts."""
    return f"{_scoped(DUE_KEY, tag)}:buckets"


def dead_letter_key(tag: str = "") -> str:
    return _scoped(DEAD_LETTER_KEY, tag)


def outcome_key(merchant_id: str, shipment_id: str, tag: str = "") -> str:
    """Before records: a shipment's notifications settled for good, one short record each
    (a list; see ``lua/fold.lua``; now in its record)."""
    return f"{PREFIX}:out:{tag}{merchant_id}:{shipment_id}"


def provider_key(provider: str, message_id: str) -> str:
    """Our notification id for a provider's message id."""
    return f"{PREFIX}:pid:{provider}:{message_id}"


def last_sms_key(recipient: str) -> str:
    """The last SMS sent to a number (``recipient``: its keyed digest, never the number), so
    a reply finds the message it answers."""
    return f"{PREFIX}:lastsms:{recipient}"


#: The deployment's key of recipients' digests when NOTIFIER_SIGNING_SECRET is unset (made
#: once by the first process that needs it; ``Resources.digest_secret``).
DIGEST_SECRET_KEY = f"{PREFIX}:digest-key"


# -- opt-outs (optouts.py) -----------------------------------------------------------------
def optout_key(merchant_id: str) -> str:
    """The channel addresses that opted out of a merchant's messages (a set)."""
    return f"{PREFIX}:optout:{merchant_id}"


# -- merchant webhooks (hooks.py) ----------------------------------------------------------
#: A merchant's webhook endpoints and their delivery logs: ``<prefix>:{<merchant>}:…``, one
#: hash tag per merchant (as the overrides).
HOOKS_PREFIX = f"{PREFIX}:mwh"


def hook_endpoints_key(merchant_id: str) -> str:
    """A merchant's webhook endpoints (a hash: endpoint id -> its JSON, secrets included)."""
    return f"{HOOKS_PREFIX}:{{{merchant_id}}}:endpoints"


def hook_log_key(merchant_id: str, endpoint_id: str) -> str:
    """An endpoint's latest delivery attempts, newest first (a capped list)."""
    return f"{HOOKS_PREFIX}:{{{merchant_id}}}:log:{endpoint_id}"


#: Webhook events waiting to go out, by the epoch ms they are due (a sorted set of ids), and
#: the events themselves (a hash: id -> JSON) with each one's progress per endpoint (a hash).
HOOK_DUE_KEY = f"{HOOKS_PREFIX}:due"
HOOK_EVENTS_KEY = f"{HOOKS_PREFIX}:events"
HOOK_PROGRESS_KEY = f"{HOOKS_PREFIX}:progress"


def hook_due_key(tag: str = "") -> str:
    return _scoped(HOOK_DUE_KEY, tag)


def hook_events_key(tag: str = "") -> str:
    return _scoped(HOOK_EVENTS_KEY, tag)


def hook_progress_key(tag: str = "") -> str:
    return _scoped(HOOK_PROGRESS_KEY, tag)


# -- notification analytics (stats.py) ------------------------------------------------------
def stats_key(merchant_id: str, day: str, tag: str = "") -> str:
    """A merchant's notification counts of one UTC day (``YYYY-MM-DD``): a hash of
    ``<milestone>|<channel>|<locale>|<count>`` -> n (on a Redis Cluster, one per partition)."""
    return f"{PREFIX}:stats:{tag}{merchant_id}:{day}"


def carrier_key(merchant_id: str, day: str, tag: str = "") -> str:
    """A merchant's carrier counts of one UTC day: a hash of
    ``<carrier>|<origin>|<destination>|<count>`` -> n (``insights.journeys``)."""
    return f"{PREFIX}:carriers:{tag}{merchant_id}:{day}"


#: Merchant -> its weekly digest's settings (a hash of JSON: {"to": [...], "enabled": bool}).
DIGESTS_KEY = f"{PREFIX}:digests"


def digest_sent_key(merchant_id: str, week: str) -> str:
    """Set while a merchant's digest of a week is being sent, then once it was."""
    return f"{PREFIX}:digest:sent:{{{merchant_id}}}:{week}"


def stats_seen_key(merchant_id: str, day: str, tag: str = "") -> str:
    """The messages an open or a click was counted for that day (a set), so each counts once."""
    return f"{stats_key(merchant_id, day, tag)}:seen"


# -- outside the store: workers, the editor's overrides and sessions ------------------------
#: Live workers by the epoch ms of their last heartbeat (a sorted set; worker.py, /readyz).
WORKERS_KEY = f"{PREFIX}:workers"
#: The NOTIFIER_PARTITIONS the data was written with (``resources``: a process with another
#: count is refused at start-up; on a cluster every key's slot depends on it).
PARTITIONS_KEY = f"{PREFIX}:partitions"
#: A merchant's overrides (overrides.py): ``<prefix>:{<merchant>}:<kind>``, one hash tag per
#: merchant, so its publish and rollback scripts stay in one slot on a Redis Cluster.
OVERRIDES_PREFIX = f"{PREFIX}:ovr"


def override_key(merchant_id: str, kind: str) -> str:
    return f"{OVERRIDES_PREFIX}:{{{merchant_id}}}:{kind}"


def session_key(digest: str) -> str:
    """An editor session, by the SHA-256 of its cookie's token (web/session.py)."""
    return f"{PREFIX}:web:session:{digest}"


# -- health (health.py) --------------------------------------------------------------------
#: merchant -> when a worker last met its broken own files (ms); workers write it
OVERRIDES_KEY = f"{PREFIX}:overrides:hits"
