"""The service benchmark: real redis-server, `notifier serve`, `notifier worker`, wrk.

Run: .venv/bin/python -m bench.service [--runs 3] [--seconds 5] [--json FILE] [--smoke]

Stages (each run starts from an empty Redis):
- ceilings: a bare aiohttp handler under the same wrk load, and arq's no-op job rate;
- ingest: single-transition requests at 32 connections (wrk, a separate process), and
  batches of 500 from 4 concurrent client connections;
- end to end: a backlog of realistic transitions (bench/workload.py) drained by one
  worker process: transitions decided per second and messages written to the outbox
  per second; then POST → outbox-file latency at a steady 500 transitions/s;
- memory: peak RSS of every process, and Redis memory per tracked shipment after
  100,000 shipments with full histories went through the pipeline.

Prints a table of medians and writes the per-run figures as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bench import workload
from bench.procs import API_KEY, Proc, Stack, alive, free_port, stack, wait_http, wait_until

HERE = Path(__file__).resolve().parent
PARTITIONS = 8
Result = dict[str, Any]


def _wrk(port: int, seconds: float, tag: str, connections: int = 32) -> Result:
    wrk = shutil.which("wrk")
    if wrk is None:
        raise RuntimeError("wrk is not installed: run scripts/test or `apt-get install wrk`")
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run(
            [
                wrk,
                "-t2",
                f"-c{connections}",
                f"-d{max(1, round(seconds))}s",
                "--timeout",
                "5s",
                "-s",
                str(HERE / "wrk" / "transition.lua"),
                f"http://127.0.0.1:{port}/v1/transitions",
                "--",
                API_KEY,
                tag,
            ],
            check=True,
            capture_output=True,
            env={**os.environ, "WRK_OUT": out.name},
        )
        result: Result = json.loads(Path(out.name).read_text())
    result["requests_per_s"] = result["requests"] / result["duration_s"]
    if result["errors"] or result["non2xx"]:
        raise RuntimeError(f"wrk saw failures: {result}")
    return result


def bare_ceiling(seconds: float) -> Result:
    """A bare aiohttp handler that parses the same JSON and answers 202."""
    port = free_port()
    with stack() as st:
        proc = st.start(
            "bare",
            [sys.executable, "-m", "bench.bare", "--port", str(port)],
            {**os.environ, "PYTHONPATH": str(HERE.parent)},
        )
        wait_http(proc, port)
        return _wrk(port, seconds, "bare")


def arq_ceiling(jobs: int) -> Result:
    with stack() as st:
        out = subprocess.run(
            [sys.executable, "-m", "bench.arq_noop", "--redis", st.redis_url, "--jobs", str(jobs)],
            check=True,
            capture_output=True,
            text=True,
            cwd=HERE.parent,
        ).stdout
        result: Result = json.loads(out.strip().splitlines()[-1])
        return result


def ingest_single(seconds: float, run: int) -> Result:
    with stack() as st:
        api, port = st.api()
        result = _wrk(port, seconds, f"r{run}")
        stored = _inbox_length(st)
        result["persisted"] = stored
        api.stop()
        result["api_peak_rss_mb"] = api.peak_mb
        return result


def _consumed(st: Stack) -> bool:
    """Whether a worker has read any inbox entry yet."""
    r = st.redis()
    return any(
        int(g.get("entries-read") or 0) > 0
        for p in range(PARTITIONS)
        for g in r.xinfo_groups(f"ntf:inbox:{p}")
    )


def _inbox_length(st: Stack) -> int:
    r = st.redis()
    return sum(int(r.xlen(f"ntf:inbox:{p}")) for p in range(PARTITIONS))


async def _post_batches(port: int, bodies: list[bytes], concurrency: int) -> float:
    """POST pre-encoded batch bodies over ``concurrency`` connections; seconds taken."""
    queue = list(reversed(bodies))
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    url = f"http://127.0.0.1:{port}/v1/transitions"
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def client() -> None:
            while queue:
                body = queue.pop()
                async with session.post(url, data=body, headers=headers) as resp:
                    if resp.status != 202:
                        raise RuntimeError(f"batch answered {resp.status}: {await resp.text()}")
                    await resp.read()

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return time.perf_counter() - started


def _bodies(events: list[dict[str, Any]], size: int = 500) -> list[bytes]:
    return [orjson.dumps({"transitions": b}) for b in workload.batches(events, size)]


def ingest_batch(shipments: int, run: int) -> Result:
    events = workload.stream(shipments, seed=run, run=f"b{run}")
    bodies = _bodies(events)
    with stack() as st:
        api, port = st.api()
        seconds = asyncio.run(_post_batches(port, bodies, 4))
        persisted = _inbox_length(st)
        api.stop()
    return {
        "transitions": len(events),
        "persisted": persisted,  # duplicates in the feed are not persisted twice
        "seconds": seconds,
        "transitions_per_s": len(events) / seconds,
        "api_peak_rss_mb": api.peak_mb,
    }


def _outbox_files(outbox: Path) -> list[Path]:
    return [p for p in outbox.rglob("*") if p.suffix in (".eml", ".json")]


def post_backlog(st: Stack, events: list[dict[str, Any]]) -> tuple[Proc, int]:
    """Start the API and post ``events`` as a backlog; the API and the inbox length."""
    api, port = st.api()
    # one connection: concurrent posts could reorder a shipment's events across batches
    asyncio.run(_post_batches(port, _bodies(events), 1))
    return api, _inbox_length(st)


def end_to_end(shipments: int, run: int) -> Result:
    """A backlog drained by one worker process: decided/s and outbox messages/s."""
    events = workload.stream(shipments, seed=100 + run, run=f"e{run}")
    with stack() as st:
        api, backlog = post_backlog(st, events)
        outbox = st.outbox
        worker = st.worker()
        # The clock starts when the worker takes its first entries, not at process start.
        wait_until(alive(worker, lambda: _consumed(st)), "the worker", 60)
        started = time.time()
        wait_until(alive(worker, lambda: _inbox_length(st) == 0), "the drain", 600)
        decided_s = time.time() - started
        count = _settled_count(st, outbox)
        files = _outbox_files(outbox)
        last = max(p.stat().st_mtime for p in files) if files else started
        ledger = _ledger_states(st)
        worker.stop()
        api.stop()
    messages_s = max(last, started + decided_s) - started
    return {
        "transitions": backlog,
        "decided_s": decided_s,
        "transitions_per_s": backlog / decided_s,
        "messages": count,
        "messages_s": messages_s,
        "messages_per_s": count / messages_s,
        "ledger": ledger,
        "worker_peak_rss_mb": worker.peak_mb,
    }


def _settled_count(st: Stack, outbox: Path) -> int:
    """Wait until the outbox stops growing: every message claimed was written."""
    last, stable_since = -1, time.time()
    while time.time() - stable_since < 1.0:
        n = len(_outbox_files(outbox)) if outbox.exists() else 0
        if n != last:
            last, stable_since = n, time.time()
        time.sleep(0.1)
    return last


def _ledger_states(st: Stack) -> dict[str, int]:
    r = st.redis()
    counts: dict[str, int] = {}
    for key in r.scan_iter("ntf:msg:*", count=1000):
        state = r.hget(key, "st")
        name = state.decode() if state else "?"
        counts[name] = counts.get(name, 0) + 1
    return counts


async def _steady(port: int, rate: int, seconds: float, run: int) -> dict[str, float]:
    """POST one new shipment's out-for-delivery at ``rate``/s; when each was sent."""
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    url = f"http://127.0.0.1:{port}/v1/transitions"
    sent: dict[str, float] = {}
    now = datetime.now(UTC)
    total = int(rate * seconds)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as session:

        async def one(i: int) -> None:
            shipment = f"lat_{run}_{i}"
            body = {
                "event_id": f"lat_{run}_{i}",
                "merchant_id": "acme",
                "shipment_id": shipment,
                "tracking_number": f"1Z{i:016d}",
                "carrier": "ups",
                "status": "out_for_delivery",
                "occurred_at": (now - timedelta(minutes=5)).isoformat(),
                "recipient": {
                    "name": "Ana",
                    "email": f"c{i}@example.com",
                    "locale": "en_US",
                    "timezone": "America/New_York",
                },
            }
            sent[shipment] = time.time()
            async with session.post(url, json=body, headers=headers) as resp:
                if resp.status != 202:
                    raise RuntimeError(f"answered {resp.status}")

        tasks = []
        started = time.perf_counter()
        for i in range(total):
            delay = started + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
    return sent


def latency(rate: int, seconds: float, run: int, **worker_env: str) -> Result:
    """POST → outbox file, at a steady rate, with the API and one worker running."""
    with stack() as st:
        api, port = st.api()
        worker = st.worker(**worker_env)
        outbox = st.outbox
        time.sleep(2.0)  # the worker's start-up (imports, templates) is not latency
        worker.check()
        sent = asyncio.run(_steady(port, rate, seconds, run))
        wait_until(lambda: len(_outbox_files(outbox)) >= len(sent), "every email", 60)
        lat = []
        for path in _outbox_files(outbox):
            lat.append((path.stat().st_mtime - sent[path.parent.name]) * 1000)
        worker.stop()
        api.stop()
    lat.sort()
    return {
        "rate": rate,
        "messages": len(lat),
        "p50_ms": lat[len(lat) // 2],
        "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))],
        "max_ms": lat[-1],
        "api_peak_rss_mb": api.peak_mb,
        "worker_peak_rss_mb": worker.peak_mb,
    }


def clock_back_to(at: str) -> int:
    """How many seconds back (0 to a day) the clock must go for it to read ``at`` (HH:MM,
    UTC) now."""
    now = datetime.now(UTC)
    hour, minute = (int(part) for part in at.split(":"))
    then = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
    return int((now - then).total_seconds()) % 86_400


def faketime_env(back_s: int) -> dict[str, str]:
    """The environment that sets a process's clock ``back_s`` seconds back (libfaketime:
    Debian's ``faketime`` package). The clock keeps running from there."""
    found = sorted(Path("/usr/lib").glob("*/faketime/libfaketime.so.1"))
    if not found:
        raise RuntimeError("libfaketime is not installed: apt-get install faketime")
    return {"LD_PRELOAD": str(found[0]), "FAKETIME": f"-{back_s}"}


def redis_memory(shipments: int, at: str | None = None) -> Result:
    """Redis bytes per tracked shipment once ``shipments`` full journeys went through.

    How many of them hold a message waiting for quiet hours to end depends on the hour (the
    recipients are in 13 time zones): ``at`` (HH:MM UTC) runs the API and the worker with
    their clocks set back to that hour (libfaketime; redis-server keeps the real one) and
    the workload dated from it, to measure any hour at any time."""
    back_s = clock_back_to(at) if at else 0
    clock = faketime_env(back_s) if back_s else {}
    start = datetime.now(UTC) - timedelta(seconds=back_s, days=4)
    events = workload.stream(shipments, seed=7, run="m", start=start)
    with stack() as st:
        r = st.redis()
        api, port = st.api(**clock)
        worker = st.worker(**clock)
        time.sleep(1.0)
        base = int(r.info("memory")["used_memory"])
        bodies = _bodies(events)
        for i in range(0, len(bodies), 40):  # in slices, so the inbox never holds it all
            asyncio.run(_post_batches(port, bodies[i : i + 40], 4))
            wait_until(lambda: _inbox_length(st) == 0, "the drain", 600)
        _settled_count(st, st.outbox)
        used = int(r.info("memory")["used_memory"])
        keys = int(r.dbsize())
        by_kind: dict[str, int] = {}
        waiting = 0  # notifications deferred (quiet hours): their ledger hashes
        for key in r.scan_iter("ntf:*", count=2000):
            kind = key.decode().split(":")[1]
            size = int(r.memory_usage(key, samples=0) or 0)
            by_kind[kind] = by_kind.get(kind, 0) + size
            if kind == "msg" and r.hget(key, "st") == b"deferred":
                waiting += size
        worker.stop()
        api.stop()
    return {
        # the share of memory that waits for quiet hours to end depends on the hour the
        # run was made at (the workload's recipients are in 13 time zones)
        "at_utc": (datetime.now(UTC) - timedelta(seconds=back_s)).strftime("%H:%M"),
        "clock_set_back_s": back_s,
        "deferred_ledger_bytes_per_shipment": waiting / shipments,
        "shipments": shipments,
        "transitions": len(events),
        "used_memory_delta_bytes": used - base,
        "bytes_per_shipment": (used - base) / shipments,
        "keys": keys,
        "bytes_by_kind_per_shipment": {k: v / shipments for k, v in sorted(by_kind.items())},
        "api_peak_rss_mb": api.peak_mb,
        "worker_peak_rss_mb": worker.peak_mb,
    }


def _median(runs: list[Result], key: str) -> float:
    return float(statistics.median(r[key] for r in runs))


SIZES = {  # full run, smoke run
    "batch_shipments": (10_000, 200),
    "e2e_shipments": (4_000, 100),
    "memory_shipments": (100_000, 500),
    "arq_jobs": (20_000, 500),
}


def _hh_mm(text: str) -> str:
    """An hour of the day, HH:MM (argparse answers a usage error otherwise)."""
    try:
        datetime.strptime(text, "%H:%M")
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an hour HH:MM: {text!r}") from None
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each timed load")
    parser.add_argument("--json", help="write every run's figures here")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks it works")
    parser.add_argument("--only", help="comma-separated stages to run (default: all)")
    parser.add_argument(
        "--memory-at",
        metavar="HH:MM",
        type=_hh_mm,
        help="run the memory stage as at this hour (UTC), with the service's clock set back "
        "(libfaketime); the share of messages waiting for quiet hours depends on it",
    )
    args = parser.parse_args()
    smoke = args.smoke
    runs = 1 if smoke else args.runs
    seconds = 1.0 if smoke else args.seconds
    sizes = {name: small if smoke else full for name, (full, small) in SIZES.items()}
    stages: dict[str, Callable[[int], Result]] = {
        "bare_ceiling": lambda run: bare_ceiling(seconds),
        "arq_ceiling": lambda run: arq_ceiling(sizes["arq_jobs"]),
        "ingest_single": lambda run: ingest_single(seconds, run),
        "ingest_batch": lambda run: ingest_batch(sizes["batch_shipments"], run),
        "end_to_end": lambda run: end_to_end(sizes["e2e_shipments"], run),
        "latency": lambda run: latency(500, 2 * seconds, run),
        "redis_memory": lambda run: redis_memory(sizes["memory_shipments"], args.memory_at),
    }
    only = set(args.only.split(",")) if args.only else set(stages)
    unknown = only - set(stages)
    if unknown:
        parser.error(f"unknown stages {sorted(unknown)}; there are {sorted(stages)}")
    results: dict[str, list[Result]] = {}
    for name, stage in stages.items():
        if name not in only:
            continue
        results[name] = []
        for run in range(1 if name == "redis_memory" else runs):
            results[name].append(stage(run))
            print(f"{name} run {run + 1}: {json.dumps(results[name][-1])}", file=sys.stderr)
    rows = report(results)
    width = max(len(r[0]) for r in rows)
    vwidth = max(len(r[1]) for r in rows)
    for what, value, target, verdict in rows:
        print(f"{what:<{width}}  {value:>{vwidth}}  {target:<18} {verdict}")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"smoke": smoke, "sizes": sizes, "table": rows, "runs": results}, indent=2)
        )


Row = tuple[str, str, str, str]


def _row(what: str, value: str, target: str = "", ok: bool | None = None) -> Row:
    """One table row; ``ok`` None when there is no target (or no ceiling to compare to)."""
    return what, value, target, "" if ok is None else "met" if ok else "NOT MET"


def report(results: dict[str, list[Result]]) -> list[Row]:
    """The table: (what, median, target, met?) for every stage that ran."""
    rows: list[Row] = []
    med = {
        (stage, key): _median(runs, key)
        for stage, runs in results.items()
        for key, value in runs[0].items()
        if isinstance(value, int | float)
    }
    bare = med.get(("bare_ceiling", "requests_per_s"), 0.0)
    arq = med.get(("arq_ceiling", "jobs_per_s"), 0.0)
    if bare:
        rows.append(_row("ceiling: bare aiohttp handler, 32 conns", f"{bare:,.0f} req/s"))
    if arq:
        rows.append(_row("ceiling: arq no-op jobs, 1 worker", f"{arq:,.0f} jobs/s"))
    if "ingest_single" in results:
        rate = med["ingest_single", "requests_per_s"]
        ratio = f" ({rate / bare:.2f}x bare)" if bare else ""
        ok = rate >= 0.5 * bare if bare else None
        rows.append(
            _row(
                "ingest: single transitions, 32 conns",
                f"{rate:,.0f} req/s{ratio}",
                ">= 0.5x bare",
                ok,
            )
        )
        p50, p99 = med["ingest_single", "p50_ms"], med["ingest_single", "p99_ms"]
        rows.append(
            _row("  latency p50 / p99", f"{p50:.1f} / {p99:.1f} ms", "p99 < 10 ms", p99 < 10)
        )
    if "ingest_batch" in results:
        rate = med["ingest_batch", "transitions_per_s"]
        rows.append(
            _row(
                "ingest: batches of 500, 4 conns",
                f"{rate:,.0f} transitions/s",
                ">= 50,000/s",
                rate >= 50_000,
            )
        )
    if "end_to_end" in results:
        rate = med["end_to_end", "transitions_per_s"]
        ratio = f" ({rate / arq:.2f}x arq)" if arq else ""
        rows.append(
            _row(
                "end to end: decided, 1 worker",
                f"{rate:,.0f} transitions/s{ratio}",
                ">= 2.5x arq no-op",
                rate >= 2.5 * arq if arq else None,
            )
        )
        rate = med["end_to_end", "messages_per_s"]
        rows.append(
            _row(
                "end to end: written to the outbox",
                f"{rate:,.0f} messages/s",
                ">= 2,000/s",
                rate >= 2000,
            )
        )
    if "latency" in results:
        p50, p99 = med["latency", "p50_ms"], med["latency", "p99_ms"]
        rows.append(
            _row(
                "POST -> outbox file at 500/s, p50 / p99",
                f"{p50:.0f} / {p99:.0f} ms",
                "p99 < 100 ms",
                p99 < 100,
            )
        )
    return rows + _memory_rows(results)


def _memory_rows(results: dict[str, list[Result]]) -> list[Row]:
    rows: list[Row] = []
    peaks: dict[str, float] = {}
    for r in (r for runs in results.values() for r in runs):
        for k, v in r.items():
            if k.endswith("_peak_rss_mb"):
                peaks[k] = max(peaks.get(k, 0.0), v)
    for k, v in sorted(peaks.items()):
        name = k.removesuffix("_peak_rss_mb")
        rows.append(_row(f"peak RSS: {name} process", f"{v:.0f} MB", "< 200 MB", v < 200))
    if "redis_memory" in results:
        r = results["redis_memory"][0]
        per = r["bytes_per_shipment"]
        rows.append(
            _row(
                f"Redis memory per shipment ({r['shipments']:,})",
                f"{per:,.0f} B",
                "< 2 KB",
                per < 2048,
            )
        )
        waiting = r.get("deferred_ledger_bytes_per_shipment")
        if waiting is not None:
            rows.append(
                _row(
                    f"  of it, messages waiting for quiet hours (run at {r['at_utc']} UTC)",
                    f"{waiting:,.0f} B",
                )
            )
    return rows


if __name__ == "__main__":
    main()
