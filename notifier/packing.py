"""Compact encoding of the JSON values kept in Redis: shipment states, history entries,
outcome records, and the payloads of notifications that wait (deferred to the end of quiet
hours).

Each value is compressed with a dictionary of the words these documents are made of (field
names, statuses, the policy's reasons, message summaries in every language, timestamp
shapes), so even a 200-byte history entry shrinks to a fraction. A packed value starts with
a tag byte naming its dictionary; a value starting with ``{`` is plain JSON, as written
before packing existed, and reads as it is.

Values are written with zstd (tags 9 to 12, ``dictionaries/<kind>-3.zstd``): dictionaries
trained by ``scripts/train_dictionaries.py`` on real carrier histories replayed through the
service, not on the bench's workload, with the entropy tables zstd's trainer makes and the
hand-written words at their end. A value takes as many bytes as with deflate and the
dictionaries before, and packing it costs a fifth (4 µs instead of 20 on the bench's values;
a worker packs five values a message). Values deflated before (tags 1, 2 and 4, written by
hand; 5 to 8, ``dictionaries/<kind>-2.zdict``, trained as the zstd ones) still read.

A dictionary can never change once values were written with it: a new one gets a new tag
and a new file, and the old tags stay readable (``tests/test_packing.py`` pins each file).
"""

from __future__ import annotations

import threading
import zlib
from pathlib import Path

import zstandard

_STATE_V1 = (
    b'"merchant_id":"","shipment_id":"shp_","tracking_number":"1Z","carrier":"ups","dhl",'
    b'"fedex","usps","tracking_url":"https://track.example.com/","exception_code":"delayed",'
    b'"customs_hold","address_issue","last_fix":{"lat":,"lon":,"at":"2026-11-'
    b'"location":{"city":"","region":"","country":"US","DE","FR","GB",'
    b'"estimated_delivery":{"start":"2026-11-","end":"2026-11-"},'
    b'"recipient":{"name":"","email":"@example.com","phone":"+1","+33","+44","+49",'
    b'"locale":"en_US","fr_FR","de_DE","timezone":"America/New_York","Europe/Paris",'
    b'"order":{"number":""},"sms_archived":,"current_event":"evt_","max_rank":,'
    b'"furthest":"","events":,"first_at":"2026-11-","last_scan_at":"2026-11-",'
    b'"notices":{"email":{"sms":{"event_id":"evt_","milestone":"","occurred_at":"2026-11-",'
    b'"rank":},"messages":[{"at":"2026-11-","channel":"email","sms","event_id":"evt_",'
    b'"milestone":"","rank":,"trivial":true,"due":"2026-11-"},'
    b'"status":"info_received","picked_up","in_transit","arrived_at_facility",'
    b'"departed_facility","out_for_delivery","delivery_attempt_failed",'
    b'"available_for_pickup","returned_to_sender","exception","delivered",'
    b'"occurred_at":"2026-11-T00:00:00.000000Z","seen":["evt_","evt_"]'
)

_HISTORY_V1 = (
    b'{"event_id":"evt_","status":"info_received","picked_up","in_transit",'
    b'"arrived_at_facility","departed_facility","available_for_pickup","returned_to_sender",'
    b'"exception","exception_code":"delayed","weather_delay","customs_hold","address_issue",'
    b'"recipient_unavailable","damaged","lost","refused","held_at_facility","other",'
    b'"outcome":"flagged","deferred","cap: SMS already sent for this shipment ","(max )",'
    b'"cap: messages to this shipment in the last 24 h ","quiet hours in ; deferred to local ('
    b' UTC)","held  s to send only the latest state","interval  h","trivial update throttled:'
    b' last email h ago, ","duplicate:  already sent by email  h ago (window  h)",'
    b'"behind:  after the shipment already reached ","out of order:  at  would step back; ",'
    b'"anomaly: ","no email address known for the recipient","recipient opted out of sms",'
    b'"policy:  is not notified","send_at":"2026-11-","details":{},'
    b'"superseded by out_for_delivery (2026-11-+00:00) in the same batch",'
    b'"suppressed","reason":"policy: delivered is notified by email","sms",'
    b'"notification_id":"n_","decided_at":"2026-11-","occurred_at":"2026-11-",'
    b'"channel":"email","status":"delivery_attempt_failed","outcome":"sent",'
    b'"reason":"policy: out_for_delivery is notified by sms","decided_at":"2026-11-'
    b'T00:00:00.000000Z","occurred_at":"2026-11-T00:00:00.000000Z","details":{}}'
)

_NOTIFICATION_V1 = (
    b'"exception_code":"delayed","customs_hold","address_issue","recipient_unavailable",'
    b'"pickup_point":{"name":"","address":"","hours":""},"pickup_deadline":"2026-11-'
    b'"predicted":{"start":"2026-11-T00:00:00Z","end":"2026-11-T00:00:00Z"},'
    b'"experiment":"","variant":"b",'
    b'"status":"in_transit","picked_up","delivered","exception","available_for_pickup",'
    b'"delivery_attempt_failed","out_for_delivery","carrier":"dhl","fedex","usps","ups",'
    b'"location":{"city":"","region":"","country":"US","DE","FR","GB","lat":,"lon":},'
    b'"estimated_delivery":{"start":"2026-11-T00:00:00Z","end":"2026-11-T00:00:00Z"},'
    b'"tracking_url":"https://track.example.com/","order":{"number":""}},'
    b'"recipient":{"name":"","email":"@example.com","phone":"+1","+33","+44","+49",'
    b'"locale":"en_US","fr_FR","de_DE","timezone":"America/New_York","Europe/Paris"},'
    b'"created_at":"2026-11-T00:00:00Z"}'
    b'{"notification_id":"n_","merchant_id":"","shipment_id":"shp_","channel":"email","sms",'
    b'"to":"","transition":{"event_id":"evt_","merchant_id":"","shipment_id":"shp_",'
    b'"tracking_number":"1Z","occurred_at":"2026-11-T00:00:00+00:00",'
)


def _trained(name: str) -> bytes:
    return (Path(__file__).with_name("dictionaries") / name).read_bytes()


#: tag byte -> deflate's preset dictionary, values written before zstd; tags are never reused,
#: and 3 is not one: it starts a run of values packed together (``notifier/store/chunks.py``).
_DICTIONARIES = {
    0x01: _STATE_V1,
    0x02: _HISTORY_V1,
    0x04: _NOTIFICATION_V1,
    0x05: _trained("state-2.zdict"),
    0x06: _trained("history-2.zdict"),
    0x07: _trained("notification-2.zdict"),
    0x08: _trained("outcome-2.zdict"),
}
#: tag byte -> zstd dictionary, what values are written with
_ZSTD_DICTIONARIES = {
    0x09: _trained("state-3.zstd"),
    0x0A: _trained("history-3.zstd"),
    0x0B: _trained("notification-3.zstd"),
    0x0C: _trained("outcome-3.zstd"),
}
#: a shipment's state (``ShipmentState``)
STATE = 0x09
#: a history entry (a decision), or a chunk of them
HISTORY = 0x0A
#: a notification's payload in its ledger hash (``models.Notification``)
NOTIFICATION = 0x0B
#: what a settled notification leaves on its shipment's outcome list, or a chunk of that
#: (``store/ledger.py``)
OUTCOME = 0x0C

#: zstd's level 5 (its greedy matcher): values as small as deflate's level 9 with the
#: dictionaries before, measured on the bench's values (168 bytes on average, 1 byte more a
#: state, 1 less a decision), at 4 µs a value; level 4 is 7 % larger, level 6 twice as slow
#: for 3 % smaller. A frame carries no magic number, checksum or dictionary id (its tag says
#: which), and its size (a byte or two), so it reads back in one allocation.
ZSTD_LEVEL = 5
_ZSTD_PARAMS = zstandard.ZstdCompressionParameters.from_level(
    ZSTD_LEVEL,
    format=zstandard.FORMAT_ZSTD1_MAGICLESS,
    write_checksum=0,
    write_content_size=1,
    write_dict_id=0,
)


def _zstd_dictionary(data: bytes) -> zstandard.ZstdCompressionDict:
    dictionary = zstandard.ZstdCompressionDict(data, dict_type=zstandard.DICT_TYPE_FULLDICT)
    dictionary.precompute_compress(compression_params=_ZSTD_PARAMS)  # once, not per value
    return dictionary


_ZSTD = {tag: _zstd_dictionary(data) for tag, data in _ZSTD_DICTIONARIES.items()}


class _Codecs(threading.local):
    """A compressor and a decompressor per dictionary, for each thread that packs or reads
    (zstandard's are not thread-safe; they take their memory on first use)."""

    def __init__(self) -> None:
        self.compressors = {
            tag: zstandard.ZstdCompressor(compression_params=_ZSTD_PARAMS, dict_data=d)
            for tag, d in _ZSTD.items()
        }
        self.decompressors = {
            tag: zstandard.ZstdDecompressor(dict_data=d, format=zstandard.FORMAT_ZSTD1_MAGICLESS)
            for tag, d in _ZSTD.items()
        }


_CODECS = _Codecs()

#: deflate's window and memory, as values were written with it: these values (a dictionary
#: of about 9 KB and a few KB of JSON) need no more than 16 KB of window. Any window reads
#: back with ``unpack``'s (the largest).
_WINDOW_BITS = 14
_MEM_LEVEL = 7


def pack(data: bytes, tag: int) -> bytes:
    """``data`` compressed with the dictionary ``tag`` names, behind that tag byte. The
    service packs with the zstd tags only (``STATE`` …); a deflate tag writes a value as
    versions before this one did."""
    compressor = _CODECS.compressors.get(tag)
    if compressor is not None:
        return bytes([tag]) + compressor.compress(data)
    deflate = zlib.compressobj(
        9, zlib.DEFLATED, -_WINDOW_BITS, _MEM_LEVEL, zlib.Z_DEFAULT_STRATEGY, _DICTIONARIES[tag]
    )
    return bytes([tag]) + deflate.compress(data) + deflate.flush()


#: The most a packed value may say it holds. The largest the service writes are a history
#: chunk and a long state, tens of KB; a damaged frame could declare any size, and zstd
#: allocates what it declares before reading on.
MAX_UNPACKED = 16 * 2**20


class Damaged(ValueError):
    """A packed value that does not read: cut short, altered, or not what its tag says."""


def unpack(value: bytes) -> bytes:
    """The JSON ``pack`` was given; plain JSON (from before packing) as it is. A value that
    does not read raises ValueError whatever the codec says: ``Damaged``, or an unknown
    tag's."""
    if not value or value[0] in b"{[":
        return value
    tag = value[0]
    dictionary = _DICTIONARIES.get(tag)
    if dictionary is None and tag not in _ZSTD:
        raise ValueError(f"unknown packing tag {tag:#04x}")
    try:
        if dictionary is None:
            return _unzstd(tag, value[1:])
        inflate = zlib.decompressobj(-15, dictionary)
        return inflate.decompress(value[1:]) + inflate.flush()
    except (zstandard.ZstdError, zlib.error, ValueError, MemoryError) as exc:
        raise Damaged(f"a value packed with tag {tag:#04x} does not read: {exc}") from None


def _unzstd(tag: int, frame: bytes) -> bytes:
    declared = zstandard.get_frame_parameters(
        frame, format=zstandard.FORMAT_ZSTD1_MAGICLESS
    ).content_size
    if declared > MAX_UNPACKED:  # also zstd's "unknown" (2^64 - 1): pack writes the size
        raise ValueError(f"it says it holds {declared} bytes")
    # no bytes after the frame either: a value is one frame, nothing else
    return _CODECS.decompressors[tag].decompress(frame, allow_extra_data=False)
