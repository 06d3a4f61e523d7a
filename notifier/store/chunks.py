"""Chunks: a run of a list's elements (a shipment's history entries, its outcome records)
packed together as one element, which deflate shrinks to less than half of what the same
values take apart.

Values are appended to the list one at a time, as they happen; ``plan`` folds the latest
ones into a chunk (``lua/compact.lua`` rewrites the list). A chunk starts with byte 3 and
its count, ``b"\\x03<count>:"``, then what its kind packs; packed values start with their
dictionary's tag and plain JSON with ``{``, so neither is ever taken for a chunk. Chunks
always come before the values appended after them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

#: the first byte of a chunk
CHUNK = 3
#: a chunk holding fewer values than this takes the next ones in; a fuller one is left as it
#: is, so a compaction never repacks more than about this many
CHUNK_VALUES = 32

#: (the elements to fold, the most values kept) -> the chunk that holds them
Merge = Callable[[Sequence[bytes], int], bytes]


def is_chunk(element: bytes) -> bool:
    return element[0] == CHUNK


def count(element: bytes) -> int:
    """How many values an element holds."""
    return int(element[1 : element.index(b":")]) if element[0] == CHUNK else 1


def body(element: bytes) -> bytes:
    """What a chunk holds after its count."""
    return element[element.index(b":") + 1 :]


def header(values: int) -> bytes:
    """The start of a chunk of ``values``."""
    return b"%c%d:" % (CHUNK, values)


def plan(elements: Sequence[bytes], cap: int, merge: Merge) -> tuple[int, int, bytes] | None:
    """How to compact a list: (elements dropped from the head, the position from which the
    rest becomes one chunk, the chunk), or None when there is nothing to gain.

    The run folded is every value after the last chunk, with that chunk too while it holds
    fewer than ``CHUNK_VALUES``; the head loses whole elements for as long as ``cap``
    values are left, and ``merge`` keeps no more than ``cap`` in the chunk."""
    start = len(elements)
    while start and not is_chunk(elements[start - 1]):
        start -= 1
    if start and count(elements[start - 1]) < CHUNK_VALUES:
        start -= 1  # the last chunk still has room
    if len(elements) - start < 2:
        return None  # one element already
    sizes = [count(e) for e in elements]
    total, dropped = sum(sizes), 0
    while dropped < start and total - sizes[dropped] >= cap:
        total -= sizes[dropped]
        dropped += 1
    return dropped, start, merge(elements[start:], cap)
