"""Chunks (notifier/store/chunks.py, lua/compact.lua), on the real redis-server: a compacted
history reads exactly as before, positions and cursors included; a compaction never loses an
entry another worker appended meanwhile, and never rewrites a list trimmed meanwhile; the
caps hold; histories from before chunks existed read and compact too. Compacted outcome
records read the same, provider statuses still only go up, and a notification in a chunk is
never made again."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest
from arq.connections import ArqRedis

from notifier.models import notification_id_of
from notifier.packing import HISTORY, pack, unpack
from notifier.store import Store, chunks, keys
from notifier.store.chunks import CHUNK, plan
from notifier.store.ledger import PACKED_IDS, _records, merge_outcomes
from notifier.store.record import Record
from notifier.store.shipments import COMPACT_AFTER, DERIVED_ID, _decisions, history_merge
from tests.conftest import outcome_records, record_of, rewrite_record
from tests.test_store_scripts import NOW_ISO, STATE_TTL_S, pending, shipment, store_on

CAP = 50
#: the shipment's record (notifier/store/record.py): its history and outcomes are parts of it
KEY = keys.state_key("acme", "s1")
RECORD_KEYS = keys.record_keys("acme", "s1")


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[Store]:
    redis = ArqRedis.from_url(redis_url)
    yield store_on(redis, CAP)
    await redis.aclose()


def decisions(first: int, count: int) -> list[dict[str, Any]]:
    return [{"d": i, "reason": f"decision {i}"} for i in range(first, first + count)]


async def record(store: Store, count: int, *, ttl_s: int | None = None) -> list[int]:
    """Commit ``count`` more decisions to acme/s1; the positions worth compacting."""
    held = await record_of(store, "acme", "s1")
    version, done = held.version, held.counted or 0
    commit = shipment("s1", version, history=decisions(done, count), ttl_s=ttl_s)
    result = await store.commit_batch([commit], NOW_ISO)
    assert result.conflicts == []
    return result.long


async def sizes(store: Store) -> list[int]:
    """Per element of the history: how many decisions (0 for a plain entry)."""
    out = []
    for element in (await record_of(store, "acme", "s1")).history:
        out.append(int(element[1 : element.index(b":")]) if element[0] == CHUNK else 0)
    return out


async def pages(store: Store, limit: int) -> list[tuple[list[dict[str, Any]], int, int]]:
    """Every page from the oldest kept: (decisions, total, trimmed)."""
    out, cursor = [], None
    while True:
        page = await store.history_page("acme", "s1", cursor, limit)
        out.append((page.decisions, page.total, page.trimmed))
        if page.next_cursor is None:
            return out
        cursor = page.next_cursor


async def test_a_compacted_history_reads_exactly_as_before(store: Store) -> None:
    assert await record(store, COMPACT_AFTER - 1) == []  # not worth it yet
    assert await record(store, 1) == [0]
    await record(store, 3)
    before = (await store.history("acme", "s1"), await pages(store, 4))
    ttl = await store.redis.pttl(KEY)
    assert await store.compact([("acme", "s1")]) == 1
    assert await sizes(store) == [11]
    assert (await store.history("acme", "s1"), await pages(store, 4)) == before
    assert 0 < await store.redis.pttl(KEY) <= ttl
    # a cursor in the middle of the chunk
    page = await store.history_page("acme", "s1", 5, 2)
    assert [d["d"] for d in page.decisions] == [5, 6] and page.next_cursor == 7
    # one element already: nothing to gain
    assert await store.compact([("acme", "s1")]) == 0


async def test_a_chunk_takes_the_next_entries_in_until_it_is_full(store: Store) -> None:
    await record(store, 40)
    await store.compact([("acme", "s1")])
    assert await sizes(store) == [40]
    # a full chunk stays as it is: the next entries make a chunk of their own...
    assert await record(store, COMPACT_AFTER) == [0]
    await store.compact([("acme", "s1")])
    assert await sizes(store) == [40, 8]
    # ...which takes the next ones in
    await record(store, COMPACT_AFTER)
    await store.compact([("acme", "s1")])
    assert await sizes(store) == [40, 16]
    history = await store.history("acme", "s1")
    # 56 recorded, the latest 50 kept: read as the cap says, though the list holds more
    assert [d["d"] for d in history] == list(range(6, 56))
    page = await store.history_page("acme", "s1", None, 100)
    assert (page.total, page.trimmed, len(page.decisions)) == (56, 6, 50)


async def test_compaction_drops_whole_elements_past_the_cap_only(store: Store) -> None:
    await record(store, 40)
    await store.compact([("acme", "s1")])
    await record(store, 20)
    await store.compact([("acme", "s1")])
    # 60 decisions: the chunk of 40 cannot go without leaving fewer than 50
    assert await sizes(store) == [40, 20]
    await record(store, 31)
    await store.compact([("acme", "s1")])
    # 91: the chunk of 40 goes (51 left); the chunk of 20 took the 31 in, and never holds
    # more than the cap
    assert await sizes(store) == [50]
    assert [d["d"] for d in await store.history("acme", "s1")] == list(range(41, 91))


async def test_an_ended_shipment_is_worth_compacting_at_two_entries(store: Store) -> None:
    assert await record(store, 1, ttl_s=60) == []
    assert await record(store, 1, ttl_s=60) == [0]


async def test_entries_appended_meanwhile_stay_after_the_chunk(store: Store) -> None:
    await record(store, 9)
    read = (await record_of(store, "acme", "s1")).history
    dropped, start, chunk = plan(read, CAP, history_merge(*WHERE)) or (0, 0, b"")
    await record(store, 2)  # another worker's commit, between the read and the rewrite
    args = ["h", len(read), dropped, start, chunk, *read]
    assert await store.scripts.compact(keys=RECORD_KEYS, args=args) == [1]
    assert await sizes(store) == [9, 0, 0]
    assert [d["d"] for d in await store.history("acme", "s1")] == list(range(11))


async def test_a_history_changed_otherwise_meanwhile_is_left_as_it_is(store: Store) -> None:
    await record(store, 9)
    read = (await record_of(store, "acme", "s1")).history
    dropped, start, chunk = plan(read, CAP, history_merge(*WHERE)) or (0, 0, b"")
    # trimmed by someone else's cap meanwhile...
    await rewrite_record(store, "acme", "s1", history=read[1:])
    await record(store, 2)  # ...and appended to: as long as what was read, not the same
    trimmed = await store.redis.get(KEY)
    args = ["h", len(read), dropped, start, chunk, *read]
    assert await store.scripts.compact(keys=RECORD_KEYS, args=args) == []
    assert await store.redis.get(KEY) == trimmed


async def test_histories_from_before_chunks_read_and_compact(store: Store) -> None:
    await record(store, 1)
    old = decisions(1, 9)
    # 0.3 wrote plain JSON, 0.4 packed entries: both may be in one list
    held = (await record_of(store, "acme", "s1")).history
    plain = [orjson.dumps(d) for d in old[:4]]
    packed = [pack(orjson.dumps(d), HISTORY) for d in old[4:]]
    await rewrite_record(store, "acme", "s1", history=held + plain + packed)
    whole = await store.history("acme", "s1")
    assert [d["d"] for d in whole] == list(range(10))
    assert await store.compact([("acme", "s1")]) == 1
    assert await store.history("acme", "s1") == whole


async def test_a_chunk_is_smaller_than_its_entries_apart(store: Store) -> None:
    await record(store, 30)
    apart = await store.redis.memory_usage(KEY, samples=0)
    await store.compact([("acme", "s1")])
    together = await store.redis.memory_usage(KEY, samples=0)
    assert together < apart / 2, (together, apart)


async def test_a_chunk_makes_its_notification_ids_again_and_keeps_any_other(
    store: Store,
) -> None:
    """A decision's notification id that its event and channel make is not written in a
    chunk (``DERIVED_ID``) and reads back in full; an id made otherwise is kept; a chunk
    that takes more decisions in keeps them right; a chunk written with every id in full
    (before) reads the same."""
    made = [
        {
            "event_id": f"evt_{i}",
            "channel": channel,
            "outcome": "sent",
            "notification_id": notification_id_of("acme", "s1", f"evt_{i}", channel),
        }
        for i in range(6)
        for channel in ("email", "sms")
    ]
    other = [
        {"event_id": "evt_0", "channel": "email", "notification_id": "test_0123456789abcdef"},
        # an id its event and channel would not make (another shipment's): kept as it is
        {**made[0], "notification_id": notification_id_of("acme", "s2", "evt_0", "email")},
        {"event_id": "evt_9", "outcome": "suppressed"},  # none at all
        # no event or channel to make it from
        {"notification_id": notification_id_of("acme", "s1", "evt_x", "email")},
    ]
    version = (await record_of(store, "acme", "s1")).version
    commit = shipment("s1", version, history=made + other)
    assert (await store.commit_batch([commit], NOW_ISO)).long == [0]
    whole = await store.history("acme", "s1")
    assert whole == made + other
    assert await store.compact([("acme", "s1")]) == 1
    [chunk] = (await record_of(store, "acme", "s1")).history
    body = unpack(chunks.body(chunk))
    assert not any(d["notification_id"].encode() in body for d in made)
    assert body.count(b'"notification_id":"%s"' % DERIVED_ID.encode()) == len(made)
    for kept in ("test_0123456789abcdef", other[1]["notification_id"], other[3]["notification_id"]):
        assert kept.encode() in body
    assert await store.history("acme", "s1") == whole
    assert [d for d, _, _ in await pages(store, 5)] == [whole[i : i + 5] for i in range(0, 16, 5)]
    # what a chunk saves: its ids, about 17 bytes a decision after deflate
    full = chunks.header(len(whole)) + pack(orjson.dumps(whole), HISTORY)
    assert len(chunk) < len(full) - 12 * len(made), (len(chunk), len(full))
    # the chunk (16 values, room for more) takes the next decisions in
    more = [
        {**d, "event_id": f"evt_{7 + i}", "notification_id": ""} for i, d in enumerate(made[:9:2])
    ]
    for d in more:
        d["notification_id"] = notification_id_of("acme", "s1", d["event_id"], d["channel"])
    version = (await record_of(store, "acme", "s1")).version
    assert (
        await store.commit_batch([shipment("s1", version, history=more)], NOW_ISO)
    ).conflicts == []
    assert await store.compact([("acme", "s1")]) == 1
    assert await sizes(store) == [len(whole) + len(more)]
    assert await store.history("acme", "s1") == whole + more
    # a chunk from before, every id in full, reads the same
    await rewrite_record(store, "acme", "s1", history=[full])
    assert await store.history("acme", "s1") == whole


# -- outcome records ---------------------------------------------------------------------

WHERE = ("acme", "s1")


async def settled(store: Store, *ids: str) -> None:
    """New notifications of acme/s1, sent at once (their records go to its outcome list)."""
    version = (await record_of(store, "acme", "s1")).version
    made = [pending(nid) for nid in ids]
    assert await store.commit([shipment("s1", version, notifications=made)], NOW_ISO) == []
    sent = [(nid, "2026-11-18T10:14:00+00:00", f"twilio:SM{nid}") for nid in ids]
    await store.mark_sent(
        sent, summaries={n: f"about {n}" for n in ids}, where=dict.fromkeys(ids, WHERE)
    )


def made(name: str) -> str:
    """The id notifier makes for a notification ``name`` of acme/s1: ``n_`` and 32 hex
    digits, which a chunk keeps in 16 bytes (``PACKED_IDS``)."""
    return notification_id_of("acme", "s1", f"evt_{name}", "sms")


#: how a test names its notifications: as notifier does, or otherwise (ids from a test, or
#: given by hand); a chunk packs the first kind only
ID_FORMS: dict[str, Callable[[str], str]] = {"made": made, "other": str}


@pytest.fixture(params=sorted(ID_FORMS))
def as_id(request: pytest.FixtureRequest) -> Callable[[str], str]:
    return ID_FORMS[request.param]


def packs_ids(element: bytes) -> bool:
    return chunks.is_chunk(element) and chunks.body(element)[:1] == PACKED_IDS


def in_full(records: list[tuple[str, dict[str, str], dict[str, str]]]) -> bytes:
    """A chunk of these records as the version before wrote it: ids in full, and the highest
    provider status rank of each that has one."""
    ranks: dict[str, int] = {}
    for nid, known, _ in records:
        ranks.setdefault(nid, -1)
        ranks[nid] = max(ranks[nid], int(known.get("prank", -1)))
    ids = " ".join(ranks).encode()
    ranked = orjson.dumps({nid: rank for nid, rank in ranks.items() if rank >= 0})
    packed = pack(orjson.dumps(records), HISTORY)
    return chunks.header(len(records)) + ids + b"\t" + ranked + b"\t" + packed


def packed_records(chunk: bytes) -> bytes:
    """The JSON of a packed chunk's records, read as the format says (after the ids, 16
    bytes each, and the JSON of ranks)."""
    body = chunks.body(chunk)
    colon = body.index(b":")
    ranks_at = colon + 1 + 16 * int(body[1:colon])
    return unpack(body[ranks_at:].split(b"\t", 1)[1])


async def test_compacted_outcomes_read_the_same_and_statuses_still_only_go_up(
    store: Store, as_id: Callable[[str], str]
) -> None:
    n1, n2, n3 = ids = [as_id(n) for n in ("n1", "n2", "n3")]
    await settled(store, *ids)
    assert await store.provider_status(n1, "delivered", 3, where=WHERE)
    assert await store.provider_status(n2, "sent", 1, where=WHERE)
    before = await store.deliveries("acme", "s1", ids)
    assert before[n1]["provider_status"] == "delivered"
    assert before[n3]["detail"] == f"twilio:SM{n3}"
    assert await store.compact([WHERE]) == 1
    [chunk] = (await record_of(store, *WHERE)).outcomes
    assert chunks.is_chunk(chunk) and chunks.count(chunk) == 5
    assert packs_ids(chunk) == (as_id is made)
    assert await store.deliveries("acme", "s1", ids) == before
    # the ranks inside the chunk still rule: a late "sent" never overwrites "delivered"
    assert not await store.provider_status(n1, "sent", 1, where=WHERE)
    assert not await store.provider_status(n2, "sent", 1, where=WHERE)
    assert await store.provider_status(n2, "delivered", 3, where=WHERE)
    assert await store.provider_status(n3, "failed", 4, "30003", where=WHERE)
    assert not await store.provider_status(as_id("unknown"), "delivered", 3, where=WHERE)
    after = await store.deliveries("acme", "s1", ids)
    assert after[n1] == before[n1]
    assert after[n2]["provider_status"] == "delivered"
    assert (after[n3]["provider_status"], after[n3]["provider_error"]) == ("failed", "30003")
    # compacted again, the statuses reported since join the chunk: its ranks by position
    assert await store.compact([WHERE]) == 1
    [chunk] = (await record_of(store, *WHERE)).outcomes
    assert chunks.count(chunk) == 7 and packs_ids(chunk) == (as_id is made)
    assert await store.deliveries("acme", "s1", ids) == after
    assert not await store.provider_status(n2, "sent", 1, where=WHERE)
    assert not await store.provider_status(n3, "delivered", 3, where=WHERE)
    assert await store.provider_status(n1, "failed", 4, "30008", where=WHERE)


async def test_a_notification_in_a_chunk_is_never_made_again(
    store: Store, as_id: Callable[[str], str]
) -> None:
    n1, n2, n3 = (as_id(n) for n in ("n1", "n2", "n3"))
    await settled(store, n1, n2)
    await store.compact([WHERE])
    [chunk] = (await record_of(store, *WHERE)).outcomes
    assert chunks.is_chunk(chunk) and packs_ids(chunk) == (as_id is made)
    # a worker re-deciding from an old state, and a fallback, both meet the chunk
    version = (await record_of(store, *WHERE)).version
    again = shipment("s1", version, notifications=[pending(n2), pending(n3)])
    assert await store.commit([again], NOW_ISO) == []
    assert not await store.redis.exists(keys.notification_key(n2))
    assert await store.redis.hget(keys.notification_key(n3), "st") == b"pending"
    assert not await store.add_notification("acme", "s1", n1, b"p", 1, b'{"why": "x"}')
    assert not await store.redis.exists(keys.notification_key(n1))


async def test_outcome_records_keep_their_cap_in_chunks(
    store: Store, as_id: Callable[[str], str]
) -> None:
    cap = store.outcomes_cap
    ids = [as_id(f"n{i}") for i in range(cap + 10)]
    for at in range(0, len(ids), 40):
        await settled(store, *ids[at : at + 40])
        await store.compact([WHERE])
    records = (await record_of(store, *WHERE)).outcomes
    assert cap <= sum(chunks.count(e) for e in records) < cap + chunks.CHUNK_VALUES + 40
    assert all(packs_ids(e) == (as_id is made) for e in records if chunks.is_chunk(e))
    kept = await store.deliveries("acme", "s1", ids[-cap:])
    assert all(d["status"] == "sent" for d in kept.values())


async def test_a_chunk_packs_made_ids_only_when_all_are_and_reads_chunks_from_before(
    store: Store,
) -> None:
    """A chunk keeps its ids in 16 bytes each when every one is an id notifier makes; one
    other id, and the chunk is written with ids in full, as before. A chunk written with
    ids in full before, made ids included, reads the same and folds into a packed one."""
    ids = [made(f"n{i}") for i in range(6)]
    await settled(store, *ids[:3])
    delivered = await store.deliveries(*WHERE, ids[:3])
    # the chunk the version before wrote of the same records
    records = _records((await record_of(store, *WHERE)).outcomes)
    before = in_full(records)
    await rewrite_record(store, *WHERE, outcomes=[before])
    assert await store.deliveries(*WHERE, ids[:3]) == delivered
    assert not await store.add_notification("acme", "s1", ids[0], b"p", 1, b'{"why": "x"}')
    # its ranks still rule, in that chunk and once folded into a packed one
    assert await store.provider_status(ids[1], "delivered", 3, where=WHERE)
    assert await store.compact([WHERE]) == 1
    assert not await store.provider_status(ids[1], "sent", 1, where=WHERE)
    delivered = await store.deliveries(*WHERE, ids[:3])
    assert delivered[ids[1]]["provider_status"] == "delivered"
    before = in_full(_records((await record_of(store, *WHERE)).outcomes))
    await rewrite_record(store, *WHERE, outcomes=[before])
    assert not await store.provider_status(ids[1], "sent", 1, where=WHERE)
    assert await store.provider_status(ids[2], "sent", 1, where=WHERE)
    delivered = await store.deliveries(*WHERE, ids[:3])
    assert [delivered[n].get("provider_status") for n in ids[:3]] == [None, "delivered", "sent"]
    await settled(store, *ids[3:])
    assert await store.compact([WHERE]) == 1
    [chunk] = (await record_of(store, *WHERE)).outcomes
    assert packs_ids(chunk) and chunks.count(chunk) == 8
    # a quarter smaller than the same chunk with ids in full (here each summary names its id
    # too, which no real one does)
    assert len(chunk) < 0.75 * len(in_full(_records([chunk]))), len(chunk)
    assert (await store.deliveries(*WHERE, ids[:3])) == delivered
    # one id of another kind: ids in full
    await settled(store, "n-other")
    assert await store.compact([WHERE]) == 1
    [chunk] = (await record_of(store, *WHERE)).outcomes
    assert chunks.is_chunk(chunk) and not packs_ids(chunk) and chunks.count(chunk) == 9
    assert not await store.add_notification("acme", "s1", "n-other", b"p", 1, b'{"w": "x"}')
    assert not await store.add_notification("acme", "s1", ids[5], b"p", 1, b'{"why": "x"}')


async def test_a_packed_chunk_reads_ids_whose_bytes_are_separators(store: Store) -> None:
    """A packed chunk's ids are 16 bytes each, read by their place: an id whose bytes hold a
    colon, a tab, a zero byte, a space or byte 3 reads as any other, in Python and in the
    scripts (a status for it, a fallback that meets it), and no id is found that is not."""
    odd = ["n_" + bytes([b] * 16).hex() for b in (0x3A, 0x09, 0x00, 0x20, 0x03)]
    odd.append("n_3a09002003" + "3a" * 11)
    await settled(store, *odd)
    assert await store.provider_status(odd[0], "delivered", 3, where=WHERE)
    assert await store.compact([WHERE]) == 1
    [chunk] = (await record_of(store, *WHERE)).outcomes
    assert packs_ids(chunk) and chunks.count(chunk) == len(odd) + 1
    assert [nid for nid, _ in outcome_records([chunk])] == [*odd, odd[0]]
    shown = await store.deliveries(*WHERE, odd)
    assert all(shown[n]["detail"] == f"twilio:SM{n}" for n in odd)
    assert not await store.provider_status(odd[0], "sent", 1, where=WHERE)
    for nid in odd[1:]:
        assert await store.provider_status(nid, "delivered", 3, where=WHERE)
        assert not await store.add_notification("acme", "s1", nid, b"p", 1, b'{"why": "x"}')
    # an id not in the chunk, though its bytes are as odd
    stranger = "n_" + bytes([0x3A] * 15 + [0x09]).hex()
    assert not await store.provider_status(stranger, "delivered", 3, where=WHERE)
    assert await store.add_notification("acme", "s1", stranger, b"p", 1, b'{"why": "x"}')


async def test_a_packed_chunk_keeps_a_detail_that_names_its_id_whole() -> None:
    """The outbox's detail is a path that ends in the notification's id: a packed chunk
    keeps what comes before and after the id, and gives the detail back whole; any other
    detail (or one that names another id) stays as it was."""
    nid, other = made("n1"), made("n2")
    path = f"outbox:/srv/outbox/acme/s1/20261118T101400.000000Z-{nid}.eml"
    details = [path, f"twilio:SM{other}", f"twilio:SM{nid}", "sendgrid:abc", ""]
    elements = [
        f"{nid}\t{{}}\t".encode() + pack(orjson.dumps({"st": "sent", "detail": d}), HISTORY)
        for d in details
    ]
    chunk = merge_outcomes(elements, 50)
    assert packs_ids(chunk)
    assert [r[2]["detail"] for r in _records([chunk])] == details
    assert nid.encode() not in packed_records(chunk)
    assert nid[2:].encode() not in packed_records(chunk)
    assert _records([chunk]) == _records(elements)


async def test_a_counter_started_again_counts_every_decision_in_a_chunk(store: Store) -> None:
    """A history without the counter (a state hash that expired before its history list,
    before records; or a shipment from before the counter) starts counting from what the
    history holds: a chunk counts as the decisions in it."""
    await record(store, 40)
    await store.compact([WHERE])
    assert await sizes(store) == [40]
    # the layout before records, its state hash gone first: the history list alone
    [chunk] = (await record_of(store, *WHERE)).history
    await store.redis.delete(KEY)
    await store.redis.rpush(keys.history_key(*WHERE), chunk)
    totals = []
    for _ in range(15):  # past the cap (50), where only the counter knows the total
        await record(store, 1)
        totals.append((await store.history_page("acme", "s1", None, 100)).total)
    assert totals == list(range(41, 56))
    assert not await store.redis.exists(keys.history_key(*WHERE))  # in the record now
    # the fallback path counts the same way
    await store.compact([WHERE])
    await rewrite_record(store, *WHERE, counted=None)
    assert await store.add_notification("acme", "s1", "n-late", b"p", 1, b'{"d": 55}')
    held = await record_of(store, *WHERE)
    assert held.counted == sum(chunks.count(e) for e in held.history) > CAP


async def as_three_keys(store: Store, held: Record) -> None:
    """Rewrite acme/s1 as the version before records kept it: a state hash (100 s to live),
    a history list (300 s) and an outcome list (200 s)."""
    state_key, history_key, outcome_key = RECORD_KEYS
    await store.redis.delete(state_key)
    assert held.counted is not None
    await store.redis.hset(
        state_key, mapping={"v": held.version, "s": held.state, "hn": held.counted}
    )
    await store.redis.rpush(history_key, *held.history)
    await store.redis.rpush(outcome_key, *held.outcomes)
    for key, ttl in ((state_key, 100), (history_key, 300), (outcome_key, 200)):
        await store.redis.expire(key, ttl)


async def test_a_shipment_kept_in_three_keys_reads_and_its_next_write_makes_one_record(
    store: Store,
) -> None:
    """Before records a shipment had a state hash, a history list and an outcome list.
    Every reader reads them as they are, and the first script that writes the shipment puts
    one record in their place, living as long as the longest lived of the three."""
    await record(store, 3)
    await settled(store, "n1", "n2")
    assert await store.provider_status("n1", "delivered", 3, where=WHERE)
    held = await record_of(store, *WHERE)
    history, states = await store.history(*WHERE), await store.load_states([WHERE])
    delivered = await store.deliveries(*WHERE, ["n1", "n2"])
    page = await store.history_page(*WHERE, 1, 10)
    # the same shipment, as the version before records kept it
    state_key, history_key, outcome_key = RECORD_KEYS
    await as_three_keys(store, held)
    assert await store.history(*WHERE) == history
    assert await store.load_states([WHERE]) == states
    assert await store.deliveries(*WHERE, ["n1", "n2"]) == delivered
    assert await store.history_page(*WHERE, 1, 10) == page
    # a status for a settled notification checks its rank in the old outcome list
    assert not await store.provider_status("n1", "sent", 1, where=WHERE)
    assert await store.redis.type(state_key) == b"hash"  # reading wrote nothing
    # the next commit writes a record with what the three held, and drops the three
    assert await record(store, 1, ttl_s=None) == []
    assert await store.redis.type(state_key) == b"string"
    assert not await store.redis.exists(history_key, outcome_key)
    assert STATE_TTL_S - 60 < await store.redis.ttl(state_key) <= STATE_TTL_S
    now = await record_of(store, *WHERE)
    assert (now.version, now.counted) == (held.version + 1, held.counted + 1)
    assert now.history[:-1] == held.history and now.outcomes == held.outcomes
    assert await store.deliveries(*WHERE, ["n1", "n2"]) == delivered
    assert not await store.add_notification("acme", "s1", "n2", b"p", 1, b'{"why": "x"}')


@pytest.mark.parametrize("write", ["fold", "status", "fallback", "test", "compact"])
async def test_every_script_that_writes_a_shipment_makes_one_record_of_three_keys(
    store: Store, write: str
) -> None:
    await record(store, 9)
    await settled(store, "n1")
    version = (await record_of(store, *WHERE)).version
    made = shipment("s1", version, notifications=[pending("n2")])
    assert await store.commit([made], NOW_ISO) == []  # n2 waits in the ledger
    held = await record_of(store, *WHERE)
    state_key, history_key, outcome_key = RECORD_KEYS
    await as_three_keys(store, held)
    if write == "fold":
        await store.mark_sent([("n2", NOW_ISO, "twilio:SMn2")], where={"n2": WHERE})
    elif write == "status":
        assert await store.provider_status("n1", "delivered", 3, where=WHERE)
    elif write == "fallback":
        assert await store.add_notification("acme", "s1", "n9", b"p", 1, b'{"why": "x"}')
    elif write == "test":
        await store.record_test("acme", "s1", {"test": True})
    else:
        assert await store.compact([WHERE]) == 1
    assert await store.redis.type(state_key) == b"string"
    assert not await store.redis.exists(history_key, outcome_key)
    # as long as the longest lived of the three (300 s): a shipment with a state lives as
    # its commits say; a test send sets the test shipment's lifetime
    expected = STATE_TTL_S if write == "test" else 300
    assert expected - 60 < await store.redis.ttl(state_key) <= expected
    now = await record_of(store, *WHERE)
    assert (now.version, now.state) == (held.version, held.state)
    # nothing the three keys held is lost, whatever wrote first
    appended = {"fallback": 1, "test": 1}.get(write, 0)
    assert now.counted == held.counted + (write == "fallback")
    if write != "compact":
        assert now.history[: len(now.history) - appended] == held.history
        settled_now = 1 if write in ("fold", "status") else 0
        assert now.outcomes[: len(now.outcomes) - settled_now] == held.outcomes
    else:
        assert await store.history(*WHERE) == _decisions(held.history, *WHERE)
    assert (await store.deliveries(*WHERE, ["n1"]))["n1"]["status"] == "sent"


async def test_a_write_never_keeps_an_ended_shipments_record_past_its_retention(
    store: Store,
) -> None:
    """An ended shipment's record (its state, the recipient's details in it) lives for its
    retention; a fallback or a notification settled later does not stretch it to theirs."""
    await record(store, 2)
    version = (await record_of(store, *WHERE)).version
    ended = shipment("s1", version, notifications=[pending("n1")], ttl_s=600)
    assert await store.commit([ended], NOW_ISO) == []
    await store.redis.expire(keys.notification_key("n1"), STATE_TTL_S)  # a longer entry
    assert await store.add_notification("acme", "s1", "n9", b"p" * 300, 1, b'{"why": "x"}')
    await store.mark_sent([("n1", NOW_ISO, "twilio:SMn1")], where={"n1": WHERE})
    assert 500 < await store.redis.ttl(KEY) <= 600
    assert await store.payload("n9") == b"p" * 300  # in pieces, read whole


async def test_records_appended_to_an_outcome_list_meanwhile_stay_after_its_chunk(
    store: Store,
) -> None:
    await settled(store, "n1", "n2")
    read = (await record_of(store, *WHERE)).outcomes
    dropped, start, chunk = plan(read, store.outcomes_cap, merge_outcomes) or (0, 0, b"")
    # a provider's status arrives between the read and the rewrite
    assert await store.provider_status("n2", "delivered", 3, where=WHERE)
    args = ["o", len(read), dropped, start, chunk, *read]
    assert await store.scripts.compact(keys=RECORD_KEYS, args=args) == [1]
    elements = (await record_of(store, *WHERE)).outcomes
    assert [chunks.count(e) for e in elements] == [2, 1] and chunks.is_chunk(elements[0])
    delivered = await store.deliveries("acme", "s1", ["n1", "n2"])
    assert delivered["n2"]["provider_status"] == "delivered"
    assert not await store.provider_status("n2", "sent", 1, where=WHERE)
