"""Compact encoding of the JSON values kept in Redis: shipment states, history entries,
outcome records, and the payloads of notifications that wait (deferred to the end of quiet
hours).

Each value is deflated with a preset dictionary of the words these documents are made of
(field names, statuses, the policy's reasons, message summaries in every language,
timestamp shapes), so even a 200-byte history entry shrinks to a fraction. A packed value
starts with a tag byte naming its dictionary; a value starting with ``{`` is plain JSON, as
written before packing existed, and reads as it is.

The first dictionaries (tags 1, 2 and 4) were written by hand. Those written now (tags 5 to
8, ``dictionaries/<kind>-2.zdict``) were trained by ``scripts/train_dictionaries.py`` on
real carrier histories replayed through the service, not on the bench's workload, and end
with the hand-written words: about 270 bytes less a shipment's record than the first ones.

A dictionary can never change once values were written with it: a new one gets a new tag
and a new file, and the old tags stay readable (``tests/test_packing.py`` pins each file).
"""

from __future__ import annotations

import zlib
from pathlib import Path

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


#: tag byte -> preset dictionary; tags are never reused, and 3 is not one: it starts a run of
#: values packed together (``notifier/store/chunks.py``).
_DICTIONARIES = {
    0x01: _STATE_V1,
    0x02: _HISTORY_V1,
    0x04: _NOTIFICATION_V1,
    0x05: _trained("state-2.zdict"),
    0x06: _trained("history-2.zdict"),
    0x07: _trained("notification-2.zdict"),
    0x08: _trained("outcome-2.zdict"),
}
#: a shipment's state (``ShipmentState``)
STATE = 0x05
#: a history entry (a decision), or a chunk of them
HISTORY = 0x06
#: a notification's payload in its ledger hash (``models.Notification``)
NOTIFICATION = 0x07
#: what a settled notification leaves on its shipment's outcome list, or a chunk of that
#: (``store/ledger.py``; packed as history before tag 8)
OUTCOME = 0x08


#: The compressor's window and memory: these values (a dictionary of about 9 KB and a few KB
#: of JSON) need no more than 16 KB of window. zlib's defaults (32 KB, memory level 9)
#: clear about 400 KB of tables for every value, ten times the cost of compressing it: a
#: tenth of a worker's time went there. Any window reads back with ``unpack``'s (the
#: largest), so values written with any setting read the same.
_WINDOW_BITS = 14
_MEM_LEVEL = 7


#: A compressor per dictionary, primed once and copied for each value: setting the
#: dictionary up again for every value was a quarter of ``pack``'s time. A copy of an
#: unused compressor writes the same bytes as a new one (tested).
_PRIMED = {
    tag: zlib.compressobj(
        9, zlib.DEFLATED, -_WINDOW_BITS, _MEM_LEVEL, zlib.Z_DEFAULT_STRATEGY, dictionary
    )
    for tag, dictionary in _DICTIONARIES.items()
}


def pack(data: bytes, tag: int) -> bytes:
    """``data`` deflated with the dictionary ``tag`` names, behind that tag byte."""
    deflate = _PRIMED[tag].copy()
    return bytes([tag]) + deflate.compress(data) + deflate.flush()


def unpack(value: bytes) -> bytes:
    """The JSON ``pack`` was given; plain JSON (from before packing) as it is."""
    if not value or value[0] in b"{[":
        return value
    dictionary = _DICTIONARIES.get(value[0])
    if dictionary is None:
        raise ValueError(f"unknown packing tag {value[0]:#04x}")
    inflate = zlib.decompressobj(-15, dictionary)
    return inflate.decompress(value[1:]) + inflate.flush()
