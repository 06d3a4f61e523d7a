"""Train the dictionaries ``notifier/packing.py`` packs stored values with.

Run: .venv/bin/python scripts/train_dictionaries.py [--codec zstd] [--shipments 1500] [--out DIR]

What Redis keeps of a shipment (its state, its decisions, its settled messages' outcomes,
a waiting message's payload) is JSON made of the same words over and over: field names,
statuses, the policy's reasons, message summaries in 13 languages, timestamp shapes. A
dictionary of those words lets deflate shrink even a 200-byte value to a fraction.

The corpus is not the bench's workload (``bench/workload.py``), so that the bench measures
what production would get: 13 real carrier histories (``tests/data/carrier_histories.json``,
their own places, codes and descriptions) replayed as shipments of made-up merchants, with
recipients of other names, domains, numbers, languages and zones, through a real
``notifier serve`` and ``notifier worker`` on a fresh redis-server (``bench/procs.py``).
Every date and hour in the corpus is then replaced by a random one, so no dictionary holds
the day it was trained on; each message's receipt (the run writes to an outbox in the
bench's folder) is replaced by one as SendGrid or Twilio would give it, where a deployment's
messages go; a value that still names this run's folders stops the script. The hand-written
words kept at each dictionary's end still hold common real values the bench's workload uses
too (UPS's ``1Z``, ``+33``, ``fr_FR``, ``Europe/Paris``).

Runs differ (the clock, the ports, the worker's timing), ``--seed`` or not: a dictionary is
made once and kept.

The dictionaries are written once and committed: values packed with one must read forever,
so a file is never replaced. A retrained dictionary is a new file with a new tag
(``packing._DICTIONARIES``); ``tests/test_packing.py`` pins each file's digest.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import zstandard

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import histories as carrier_histories  # noqa: E402
from bench.histories import MAPPING  # noqa: E402
from bench.procs import TMPFS, stack, wait_until  # noqa: E402
from bench.service import _inbox_length, _post_batches, _settled_count  # noqa: E402
from notifier import packing  # noqa: E402
from notifier.store import chunks, ledger, record  # noqa: E402
from notifier.store.shipments import _decisions  # noqa: E402

#: (locale, zone, calling code) of recipients
READERS = [
    ("en_US", "America/Chicago", "+1312"),
    ("en_GB", "Europe/London", "+4420"),
    ("en_AU", "Australia/Sydney", "+612"),
    ("de_AT", "Europe/Vienna", "+431"),
    ("fr_CA", "America/Toronto", "+1416"),
    ("es_MX", "America/Mexico_City", "+5255"),
    ("it_IT", "Europe/Rome", "+3906"),
    ("nl_BE", "Europe/Brussels", "+322"),
    ("pl_PL", "Europe/Warsaw", "+4822"),
    ("pt_BR", "America/Sao_Paulo", "+5511"),
    ("ja_JP", "Asia/Tokyo", "+813"),
    ("zh_Hans_CN", "Asia/Shanghai", "+8621"),
    ("ar_SA", "Asia/Riyadh", "+9661"),
    ("he_IL", "Asia/Jerusalem", "+9723"),
]
GIVEN = ["Olu", "Priya", "Sven", "Lucía", "Mateus", "Aiko", "Wei", "Fatima", "Noa", "Tomasz"]
FAMILY = ["Okafor", "Raman", "Lindqvist", "García", "Souza", "Sato", "Chen", "Haddad", "Levi"]
DOMAINS = ["gmail.com", "outlook.com", "yahoo.co.jp", "web.de", "orange.fr", "qq.com", "libero.it"]
SHOPS = ["northwind", "tailspin", "fabrikam", "contoso", "wingtip", "adventure-works"]


def histories() -> list[list[dict[str, Any]]]:
    """The real histories' mappable events, oldest first."""
    out = []
    for h in carrier_histories.load():
        events = [e for e in h["events"] if e.get("mapped_status") in MAPPING]
        events.sort(key=lambda e: _when(e["occurred_at"]))
        if events:
            out.append(
                [{**e, "carrier": h["carrier"], "tracking": h["tracking_number"]} for e in events]
            )
    return out


def _when(text: str) -> datetime:
    at = datetime.fromisoformat(text)
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def corpus(shipments: int, rng: random.Random) -> list[dict[str, Any]]:
    """Transitions of ``shipments`` shipments, each a real history moved to end in the last
    four days, interleaved as a feed."""
    journeys = []
    source = histories()
    now = datetime.now(UTC)
    for _ in range(shipments):
        events = rng.choice(source)
        shift = (
            now - timedelta(minutes=rng.randint(30, 4 * 24 * 60)) - _when(events[-1]["occurred_at"])
        )
        locale, zone, calling = rng.choice(READERS)
        shop = f"{rng.choice(SHOPS)}-{rng.randint(1, 99)}"
        shipment = f"{rng.choice(['ord', 'S', 'pkg-'])}{rng.randint(10**5, 10**9)}"
        given, family = rng.choice(GIVEN), rng.choice(FAMILY)
        recipient: dict[str, Any] = {
            "name": f"{given} {family}" if rng.random() < 0.6 else given,
            "email": f"{given.lower()}.{rng.randint(1, 9999)}@{rng.choice(DOMAINS)}",
            "locale": locale,
            "timezone": zone,
        }
        if rng.random() < 0.7:
            recipient["phone"] = f"{calling}{rng.randint(10**6, 10**7 - 1)}"
        bodies = []
        for step, e in enumerate(events):
            status, code = MAPPING[e["mapped_status"]]
            body: dict[str, Any] = {
                "event_id": f"{e['carrier'][:3].lower()}-{rng.getrandbits(48):x}",
                "merchant_id": shop,
                "shipment_id": shipment,
                "tracking_number": e["tracking"],
                "carrier": e["carrier"].lower().replace(" ", "_"),
                "status": status,
                "occurred_at": (_when(e["occurred_at"]) + shift).isoformat(),
                "carrier_status_code": e.get("carrier_code") or "",
                "carrier_description": e.get("description") or "",
            }
            if code:
                body["exception_code"] = code
            place = {k: e[k] for k in ("city", "region", "country") if e.get(k)}
            if place.get("country") and len(place["country"]) == 2:
                body["location"] = place
            if step == 0:
                body["recipient"] = recipient
                body["order"] = {"number": f"#{rng.randint(1000, 99999)}"}
            bodies.append(body)
        journeys.append(bodies)
    feed: list[dict[str, Any]] = []
    while journeys:
        rng.shuffle(journeys)
        feed += [j.pop(0) for j in journeys]
        journeys = [j for j in journeys if j]
    return feed


_STAMP = re.compile(rb"\d{4}-\d\d-\d\dT\d\d|\d{8}T\d\d")


def undated(value: bytes, rng: random.Random) -> bytes:
    """``value`` with every date and hour replaced by a random one (2026 to 2030)."""

    def one(m: re.Match[bytes]) -> bytes:
        at = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(hours=rng.randrange(5 * 365 * 24))
        return at.strftime("%Y%m%dT%H" if b"-" not in m[0] else "%Y-%m-%dT%H").encode()

    return _STAMP.sub(one, value)


def collect(st: Any, rng: random.Random) -> dict[str, list[bytes]]:
    """Every shipment's values, unpacked, by the dictionary they are packed with."""
    r = st.redis()
    out: dict[str, list[bytes]] = {"state": [], "history": [], "outcome": []}
    for key in r.scan_iter("ntf:*", count=2000):
        name = key.decode()
        kind = name.split(":")[1]
        if kind == "shp":
            rec = record.parse(r.get(key))
            merchant, shipment = name.split(":")[2:4]
            out["state"].append(packing.unpack(rec.state))
            decisions = _decisions(rec.history, merchant, shipment)
            out["history"].append(ledger_chunk(decisions, merchant, shipment))
            out["outcome"] += outcome_values(rec.outcomes, rng)
    return out


def ledger_chunk(decisions: list[dict[str, Any]], merchant: str, shipment: str) -> bytes:
    """The JSON a history chunk packs (``shipments.history_merge``)."""
    from notifier.store.shipments import history_merge

    merged = history_merge(merchant, shipment)([orjson.dumps(d) for d in decisions], 10**6)
    return packing.unpack(chunks.body(merged))


def outcome_values(elements: list[bytes], rng: random.Random) -> list[bytes]:
    """The JSON an outcome chunk packs (``ledger.merge_outcomes``), each message's receipt as
    a provider's (``provider_receipt``)."""
    if not elements:
        return []
    packed = ledger.packed_part(ledger.merge_outcomes(elements, 10**6))
    records = orjson.loads(packing.unpack(packed))
    for _, _, recorded in records:
        provider_receipt(recorded, rng)
    return [orjson.dumps(records)]


_ID_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def provider_receipt(recorded: dict[str, Any], rng: random.Random) -> None:
    """A message's receipt in the outbox (its file's path, ``dx`` around its id in a chunk)
    as SendGrid's or Twilio's would read (``sendgrid:<X-Message-Id>``, ``twilio:SM<32 hex>``):
    where a deployment's messages go, and not this run's outbox folder, which is the
    bench's (``bench/procs.py``)."""
    around = recorded.pop("dx", None)
    path = "".join(around) if around else str(recorded.get("detail", ""))
    if not path.startswith("outbox:"):
        return
    if path.endswith(".sms.json"):
        recorded["detail"] = f"twilio:SM{rng.getrandbits(128):032x}"
    else:
        recorded["detail"] = "sendgrid:" + "".join(rng.choices(_ID_LETTERS, k=22))


#: the dictionary before, by the kind of value (outcome records were packed as history)
WORDS = {
    "state": packing._DICTIONARIES[0x01],
    "history": packing._DICTIONARIES[0x02],
    "outcome": packing._DICTIONARIES[0x02],
    "notification": packing._DICTIONARIES[0x04],
}
#: what the first dictionaries held of the bench's own data (its tracking page, its
#: recipients' domain, its id prefixes) and of the month they were written in
_BENCH_WORDS = re.compile(rb"https://track\.example\.com/|@example\.com|evt_|shp_|2026-11-")


def structural(words: bytes) -> bytes:
    """A dictionary before, without what it held of the bench's data."""
    return _BENCH_WORDS.sub(lambda m: b"https://" if m[0].startswith(b"https") else b"", words)


def waiting_payloads(st: Any) -> dict[bytes, bytes]:
    """The payloads of the notifications in the ledger now, unpacked, by key."""
    r = st.redis()
    out = {}
    for key in r.scan_iter("ntf:msg:*", count=2000):
        payload = ledger.payload_of(r.hgetall(key))
        if payload:
            out[key] = packing.unpack(payload)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shipments", type=int, default=1500)
    parser.add_argument("--size", type=int, default=8192, help="bytes a dictionary holds")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--out", type=Path, default=ROOT / "notifier" / "dictionaries")
    parser.add_argument("--codec", choices=["zstd", "deflate"], default="zstd")
    parser.add_argument("--version", type=int, help="the files' version suffix (zstd 3, deflate 2)")
    args = parser.parse_args()
    version = args.version or (3 if args.codec == "zstd" else 2)
    rng = random.Random(args.seed)
    feed = corpus(args.shipments, rng)
    bodies = [orjson.dumps({"transitions": feed[i : i + 500]}) for i in range(0, len(feed), 500)]
    with stack() as st:
        _, port = st.api()
        st.worker()
        time.sleep(1.0)
        payloads: dict[bytes, bytes] = {}
        for body in bodies:  # a slice at a time, drained before the next, as a live feed
            asyncio.run(_post_batches(port, [body], 1))
            wait_until(lambda: _inbox_length(st) == 0, "the drain", 600)
            payloads.update(waiting_payloads(st))  # most settle and leave within seconds
        _settled_count(st, st.outbox)
        values = collect(st, rng)
        places = [str(p).encode() for p in (st.outbox, st.workdir, TMPFS)]
    values["notification"] = list(payloads.values())
    args.out.mkdir(parents=True, exist_ok=True)
    for kind, raw in values.items():
        # nothing of this run's set-up (the bench's) may be learnt
        stray = [v for v in raw if any(place in v for place in places)]
        if stray:
            sys.exit(f"error: {kind}: {len(stray)} values name this run's folders: {stray[0]!r}")
        samples: list[bytes | bytearray | memoryview[int]] = [undated(s, rng) for s in raw if s]
        try:
            trained = zstandard.train_dictionary(args.size, samples, threads=1).as_bytes()
        except zstandard.ZstdError as exc:
            sys.exit(f"error: {kind}: {len(samples)} values do not train ({exc}): more --shipments")
        # what was trained, then the words of the dictionary before: both codecs reach the
        # end of a dictionary at the shortest distance, so it holds what every value has (a
        # zstd dictionary's tables come first; the rest of it is content, these words too)
        whole = trained + structural(WORDS[kind])
        suffix = "zstd" if args.codec == "zstd" else "zdict"
        path = args.out / f"{kind}-{version}.{suffix}"
        if path.exists() and path.read_bytes() != whole:
            sys.exit(f"error: {path} exists; a dictionary is never replaced (--version)")
        path.write_bytes(whole)
        print(f"{path}: {len(whole)} bytes from {len(samples)} values")


if __name__ == "__main__":
    main()
