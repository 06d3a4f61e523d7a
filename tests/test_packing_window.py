"""Values deflated as the release before wrote them (tags 5 to 8: a 16 KB window, memory level
7) read back, also by a reader that inflates with zlib's full window; values written with the
full window (before that) still read. Values written now are zstd's, and no larger."""

from __future__ import annotations

import zlib

from hypothesis import given
from hypothesis import strategies as st

from notifier.packing import _DICTIONARIES, STATE, pack, unpack

STATE_JSON = (
    b'{"merchant_id":"acme","shipment_id":"shp_1","tracking_number":"1Z0000000000000017",'
    b'"carrier":"dhl","status":"out_for_delivery","seen":['
    + b",".join(b'"evt_p_17_%d"' % i for i in range(64))
    + b'],"messages":['
    + b",".join(
        b'{"at":"2026-11-21T10:30:00.123456Z","channel":"email","event_id":"evt_p_17_%d",'
        b'"milestone":"in_transit","rank":2}' % i
        for i in range(40)
    )
    + b"]}"
)

#: the deflate tags of the release before: a state, a history entry
DEFLATED = [0x05, 0x06]


def _full_window(data: bytes, tag: int) -> bytes:
    """How pack wrote values before that (zlib's full window and memory level)."""
    deflate = zlib.compressobj(
        9, zlib.DEFLATED, -15, 9, zlib.Z_DEFAULT_STRATEGY, _DICTIONARIES[tag]
    )
    return bytes([tag]) + deflate.compress(data) + deflate.flush()


def _full_window_reader(packed: bytes) -> bytes:
    inflate = zlib.decompressobj(-15, _DICTIONARIES[packed[0]])
    return inflate.decompress(packed[1:]) + inflate.flush()


@given(st.binary(max_size=12_000), st.sampled_from(DEFLATED))
def test_deflated_values_read_back_by_any_reader(data: bytes, tag: int) -> None:
    packed = pack(data, tag)
    assert unpack(packed) == data and _full_window_reader(packed) == data


@given(st.binary(max_size=4000), st.sampled_from(DEFLATED))
def test_values_written_before_still_read(data: bytes, tag: int) -> None:
    assert unpack(_full_window(data, tag)) == data


def test_a_large_state_packs_as_small_as_before() -> None:
    assert unpack(pack(STATE_JSON, STATE)) == STATE_JSON
    assert len(pack(STATE_JSON, STATE)) <= len(_full_window(STATE_JSON, 0x05)) * 1.05
