"""Shipment records: a shipment's version, its count of decisions ever recorded, its packed
state, its history and its outcome list in one Redis string (``lua/lib/record.lua`` writes
them; this module reads them).

Each part is a frame, ``<length>:<bytes>``; the history and the outcome list are runs of
frames, one per element (a decision or an outcome record, or a chunk of them, ``chunks``).
One key a shipment, not three: before records a shipment had a state hash, a history list
and an outcome list, which cost Redis about 750 bytes a shipment more than the same bytes
in one string. Shipments recorded that way still read (``lua/read_records.lua``), and the
next script that writes one puts a record in place of its three keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Record:
    """A shipment's record; an empty one when nothing is recorded."""

    #: the state's version (0: no state)
    version: int = 0
    #: decisions ever recorded (None: not counted, a shipment from before 0.4)
    counted: int | None = None
    #: the packed state (empty: none)
    state: bytes = b""
    history: list[bytes] = field(default_factory=list)
    outcomes: list[bytes] = field(default_factory=list)


def frames(blob: bytes, limit: int = -1) -> list[bytes]:
    """The frames of a blob, in order (the first ``limit`` only, when given); ValueError
    for a frame that does not read (damaged data: a negative length looped forever)."""
    out: list[bytes] = []
    at, end = 0, len(blob)
    while at < end and len(out) != limit:
        colon = blob.index(b":", at)
        start = colon + 1
        length = int(blob[at:colon])
        if length < 0 or start + length > end:
            raise ValueError(f"damaged record: a frame at byte {at} does not read")
        stop = start + length
        out.append(blob[start:stop])
        at = stop
    return out


def framed(parts: Sequence[bytes]) -> bytes:
    """Parts as one blob of frames."""
    return b"".join(b"%d:%s" % (len(p), p) for p in parts)


def parse(raw: bytes) -> Record:
    """A record from its bytes (``b""``: nothing recorded)."""
    if not raw:
        return Record()
    version, counted, state, history, outcomes = frames(raw)
    return Record(
        int(version or 0),
        int(counted) if counted else None,
        state,
        frames(history),
        frames(outcomes),
    )


def head(raw: bytes) -> Record:
    """A record's version, count and state, its history and outcomes left unread."""
    if not raw:
        return Record()
    version, counted, state = frames(raw, 3)
    return Record(int(version or 0), int(counted) if counted else None, state)


def blob(record: Record) -> bytes:
    """A record's bytes, as the scripts store it."""
    return framed(
        [
            str(record.version).encode() if record.version else b"",
            b"" if record.counted is None else str(record.counted).encode(),
            record.state,
            framed(record.history),
            framed(record.outcomes),
        ]
    )
