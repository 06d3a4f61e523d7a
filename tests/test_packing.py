"""Packed Redis values: states and history entries deflate with a preset dictionary and read
back exactly; plain JSON written before packing still reads."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient
from hypothesis import given
from hypothesis import strategies as st

from notifier.models import (
    ChannelKind,
    Notification,
    Transition,
    notification_id,
    notification_json,
    notification_of,
    waiting_payload,
)
from notifier.packing import HISTORY, NOTIFICATION, STATE, pack, unpack
from notifier.resources import open_resources
from notifier.settings import Settings
from tests.conftest import (
    NOW,
    fixed_clock,
    history,
    post,
    record_of,
    rewrite_record,
    run_worker,
    transition,
)

Client = TestClient[Any, Any]


@given(st.binary(max_size=2000), st.sampled_from([STATE, HISTORY, NOTIFICATION]))
def test_pack_round_trips_anything(data: bytes, tag: int) -> None:
    packed = pack(data, tag)
    assert packed[0] == tag and unpack(packed) == data


def test_plain_json_reads_as_it_is_and_an_unknown_tag_is_an_error() -> None:
    assert unpack(b'{"status":"delivered"}') == b'{"status":"delivered"}'
    assert unpack(b"[]") == b"[]"
    with pytest.raises(ValueError, match="unknown packing tag 0x7f"):
        unpack(b"\x7f\x00")


def _waiting(**changes: Any) -> Notification:
    t = Transition.model_validate(transition())
    return Notification(
        notification_id=notification_id(t, ChannelKind.SMS),
        merchant_id=t.merchant_id,
        shipment_id=t.shipment_id,
        channel=ChannelKind.SMS,
        to="+33612345678",
        transition=t,
        recipient=t.recipient,
        created_at=NOW,
        **changes,
    )


def test_a_waiting_payload_leaves_out_what_its_key_and_transition_say() -> None:
    n = _waiting(variant="b", experiment="tone")
    packed = waiting_payload(n)
    assert packed[0] == NOTIFICATION
    stored = orjson.loads(unpack(packed))
    assert not {"notification_id", "merchant_id", "shipment_id"} & set(stored)
    whole = pack(n.model_dump_json(exclude_none=True).encode(), NOTIFICATION)
    assert len(packed) <= len(whole) - 20  # about 28 bytes: the id is 32 hex digits
    assert notification_of(n.notification_id, packed) == n
    # shown (dead letters) with the fields it left out, first
    shown = notification_json(n.notification_id, packed)
    assert list(shown)[:3] == ["notification_id", "merchant_id", "shipment_id"]
    assert shown == orjson.loads(n.model_dump_json(exclude_none=True))


def test_whole_payloads_written_before_still_read() -> None:
    n = _waiting()
    plain = n.model_dump_json(exclude_none=True).encode()
    for payload in (plain, pack(plain, NOTIFICATION)):
        assert notification_of("ignored: the payload names its id", payload) == n


def test_a_payload_whose_ids_differ_from_its_transition_is_kept_whole() -> None:
    n = _waiting().model_copy(update={"shipment_id": "shp_other"})
    packed = waiting_payload(n)
    assert orjson.loads(unpack(packed))["shipment_id"] == "shp_other"
    assert notification_of(n.notification_id, packed) == n


async def test_states_and_history_are_packed_small_and_read_back(
    client: Client, settings: Settings
) -> None:
    await post(client, transition())
    await run_worker(settings)
    async with open_resources(settings, clock=fixed_clock()) as res:
        held = await record_of(res.store, "acme", "shp_123")
        raw_state, entries = held.state, held.history
        assert raw_state[0] == STATE and all(e[0] == HISTORY for e in entries)
        plain_state, plain_entries = unpack(raw_state), [unpack(e) for e in entries]
        assert len(raw_state) < len(plain_state) / 2
        assert sum(map(len, entries)) < sum(map(len, plain_entries)) / 2
        [(version, state)] = await res.store.load_states([("acme", "shp_123")])
        assert version == 1 and state is not None and state.status == "out_for_delivery"
        # A history entry written as plain JSON (before packing) reads beside packed ones.
        await rewrite_record(res.store, "acme", "shp_123", history=[*entries, plain_entries[0]])
    decisions = await history(client)
    assert len(decisions) == len(entries) + 1 and decisions[-1] == decisions[0]
    assert decisions[0] == orjson.loads(plain_entries[0]) | {"delivery": decisions[0]["delivery"]}
