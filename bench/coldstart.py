"""Cold start: one `notifier worker` started on a backlog, outbox on the ordinary disk.

Run: .venv/bin/python -m bench.coldstart [--runs 3] [--shipments 2000] [--json FILE] [--smoke]

The set-up of an operator trying the service for the first time, not the suite's own: a
fresh redis-server and `notifier serve`; a backlog of 3 transitions per shipment (label,
out for delivery, delivered: 6,000 for 2,000 shipments) posted in batches of 500 by a
simple client (the standard library's http.client and json, one connection); the API
stops, then one `notifier worker` starts cold with the outbox on the ordinary disk (a
directory under /var/tmp, not /dev/shm). Measured, per outbox place (disk, then tmpfs):

- ready: from starting the worker process until it has read its first inbox entries (the
  first drain is under way), polled every 20 ms; with the templates the API compiled on
  disk (notifier/render/compiled.py: any start after a machine's first), and once more
  (tmpfs) with a worker that compiles them itself;
- first message: from starting the worker until the first outbox file (its mtime);
- messages/s and transitions/s end to end, start-up included: from starting the worker
  until the last outbox file, and until the inbox is empty;
- warm messages/s: from "ready" to the last file (what bench.service reports);
- the worker's CPU seconds, and its imports alone (`python -c "import ..."`, same venv);
- the CPU one file create costs in the outbox's place just before the run: every message
  is a new file and every shipment a new folder (on this VM's ext4, which has no journal,
  20-1,500 µs depending on how many files were deleted lately; on tmpfs about 5 µs);
- ingest: the simple client's transitions/s and its own CPU share, next to the suite's
  client (orjson, aiohttp, 4 connections) posting the same batches to a fresh stack.

Prints medians of --runs and writes every run's figures as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench import workload
from bench.procs import API_KEY, Stack, alive, stack, wait_until
from bench.service import (
    _bodies,
    _consumed,
    _inbox_length,
    _outbox_files,
    _post_batches,
    _settled_count,
)

Result = dict[str, Any]
#: the ordinary disk: /var/tmp is on the root file system here (/tmp may be tmpfs elsewhere)
DISK = Path("/var/tmp")
BATCH = 500


def backlog(shipments: int, seed: int, run: str) -> list[dict[str, Any]]:
    """Three transitions per shipment: its first event (which names the recipient), its
    last out for delivery, and its last event (delivered, or returned to sender); posted
    in rounds, every shipment's first, then every shipment's second, then the third."""
    rng = random.Random(seed)
    start = datetime.now(UTC) - timedelta(days=4)
    rounds: list[list[dict[str, Any]]] = [[], [], []]
    for i in range(shipments):
        events = workload.shipment_events(i, rng, run, start)
        out = next(e for e in reversed(events) if e["status"] == "out_for_delivery")
        for r, event in enumerate([events[0], out, events[-1]]):
            rounds[r].append(event)
    return [e for r in rounds for e in r]


def post_simple(port: int, events: list[dict[str, Any]], size: int = BATCH) -> Result:
    """POST ``events`` in batches with http.client and json (one connection, in order);
    a 503 (Redis busy on this shared machine) is retried after a moment, and counted."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    retries = 0
    cpu, started = time.process_time(), time.perf_counter()
    for batch in workload.batches(events, size):
        body = json.dumps({"transitions": batch})
        while True:
            conn.request("POST", "/v1/transitions", body, headers)
            reply = conn.getresponse()
            answer = reply.read()
            if reply.status != 503 or retries >= 10:
                break
            retries += 1
            time.sleep(0.2)
        if reply.status != 202:
            raise RuntimeError(f"batch answered {reply.status}: {answer[:300]!r}")
        json.loads(answer)
    seconds = time.perf_counter() - started
    conn.close()
    client_cpu = time.process_time() - cpu
    return {
        "transitions": len(events),
        "seconds": seconds,
        "transitions_per_s": len(events) / seconds,
        "client_cpu_share": client_cpu / seconds,
        "retried_503": retries,
    }


def post_suite_client(events: list[dict[str, Any]]) -> Result:
    """The same events as bench.service posts them: orjson, aiohttp, 4 connections."""
    with stack() as st:
        _, port = st.api()
        seconds = asyncio.run(_post_batches(port, _bodies(events, BATCH), 4))
    return {"seconds": seconds, "transitions_per_s": len(events) / seconds}


def import_seconds() -> float:
    """Wall seconds for a fresh interpreter to import what `notifier worker` imports."""
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", "import notifier.cli, notifier.worker"],
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    return time.perf_counter() - started


def create_us(place: Path, files: int = 300) -> float:
    """CPU µs to create one empty file under ``place`` now: what a new outbox file or
    folder costs in the kernel (on an ext4 without a journal it varies with how many
    inodes were freed lately; perf shows the time in ext4's recently_deleted())."""
    folder = Path(tempfile.mkdtemp(prefix="notifier-probe-", dir=place))
    try:
        started = time.process_time()
        for i in range(files):
            os.close(os.open(folder / str(i), os.O_WRONLY | os.O_CREAT, 0o600))
        return (time.process_time() - started) / files * 1e6
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def fs_type(path: Path) -> str:
    """The file system ``path`` is on (the longest mount point above it)."""
    best, kind = "", "?"
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, point, fstype, *_ = line.split()
        if str(path.resolve()).startswith(point.rstrip("/") + "/") and len(point) > len(best):
            best, kind = point, fstype
    return kind


def cold_drain(events: list[dict[str, Any]], on_disk: bool, compiled: bool = True) -> Result:
    """Post ``events``, stop the API, start one worker cold; time it until the last file.
    ``compiled``: the worker finds the templates the API compiled on disk (any start after
    the first one on a machine); else it compiles them itself (the very first start, or
    NOTIFIER_TEMPLATE_CACHE=false)."""
    with stack() as st:
        disk_outbox = Path(tempfile.mkdtemp(prefix="notifier-outbox-", dir=DISK))
        if on_disk:
            shutil.rmtree(st.outbox, ignore_errors=True)
            st.outbox = disk_outbox
        try:
            return _cold_drain(st, events, compiled)
        finally:
            shutil.rmtree(disk_outbox, ignore_errors=True)


def _cold_drain(st: Stack, events: list[dict[str, Any]], compiled: bool) -> Result:
    probe = create_us(st.outbox)
    api, port = st.api()
    ingest = post_simple(port, events)
    transitions = _inbox_length(st)
    api.stop()
    started = time.time()
    worker = st.worker(**({} if compiled else {"NOTIFIER_TEMPLATE_CACHE": "false"}))
    wait_until(alive(worker, lambda: _consumed(st)), "the worker", 120)
    ready = time.time()
    wait_until(alive(worker, lambda: _inbox_length(st) == 0), "the drain", 900)
    drained = time.time()
    messages = _settled_count(st, st.outbox)
    stamps = [p.stat().st_mtime for p in _outbox_files(st.outbox)] or [drained]
    worker.stop()
    last = max(max(stamps), drained)
    return {
        "outbox_fs": fs_type(st.outbox),
        "file_create_us": probe,
        "transitions": transitions,
        "messages": messages,
        "ingest": ingest,
        "ready_s": ready - started,
        "first_message_s": min(stamps) - started,
        "seconds": last - started,
        "messages_per_s": messages / (last - started),
        "transitions_per_s": transitions / (drained - started),
        "messages_per_s_warm": messages / max(last - ready, 1e-9),
        "worker_cpu_s": worker.cpu_s,
        "worker_peak_rss_mb": worker.peak_mb,
    }


def report(runs: list[Result]) -> list[str]:
    def med(*path: str) -> float:
        values = []
        for run in runs:
            value: Any = run
            for key in path:
                value = value[key]
            values.append(float(value))
        return float(statistics.median(values))

    first = runs[0]
    lines = [
        f"backlog: {first['disk']['transitions']:,} transitions, "
        f"{first['disk']['messages']:,} messages; medians of {len(runs)} run(s)",
        f"worker imports alone: {med('imports_s'):.2f} s",
    ]
    for place in ("disk", "tmpfs"):
        fs = first[place]["outbox_fs"]

        def m(key: str, place: str = place) -> float:
            return med(place, key)

        lines.append(
            f"outbox on {place} ({fs}): ready {m('ready_s'):.2f} s, first message "
            f"{m('first_message_s'):.2f} s, end to end {m('messages_per_s'):,.0f} messages/s "
            f"and {m('transitions_per_s'):,.0f} transitions/s (warm "
            f"{m('messages_per_s_warm'):,.0f} messages/s), worker CPU {m('worker_cpu_s'):.1f} s; "
            f"one file create there {m('file_create_us'):,.0f} µs of CPU"
        )
    lines.append(
        f"outbox on tmpfs, no compiled templates on disk (a first start, or "
        f"NOTIFIER_TEMPLATE_CACHE=false): ready {med('uncompiled', 'ready_s'):.2f} s, first "
        f"message {med('uncompiled', 'first_message_s'):.2f} s"
    )
    lines.append(
        f"ingest, batches of {BATCH}: simple client (json, http.client, 1 connection) "
        f"{med('disk', 'ingest', 'transitions_per_s'):,.0f} transitions/s "
        f"(client CPU {med('disk', 'ingest', 'client_cpu_share'):.0%} of its time); "
        f"suite client (orjson, aiohttp, 4 connections) "
        f"{med('suite_client', 'transitions_per_s'):,.0f} transitions/s"
    )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3, help="runs to take the median of")
    parser.add_argument("--shipments", type=int, default=2000, help="shipments in the backlog")
    parser.add_argument("--json", help="write every run's figures here")
    parser.add_argument("--smoke", action="store_true", help="30 shipments, one run")
    args = parser.parse_args()
    shipments = 30 if args.smoke else args.shipments
    runs: list[Result] = []
    for run in range(1 if args.smoke else args.runs):
        events = backlog(shipments, seed=300 + run, run=f"c{run}")
        result = {
            "imports_s": import_seconds(),
            "disk": cold_drain(events, on_disk=True),
            "tmpfs": cold_drain(events, on_disk=False),
            "uncompiled": cold_drain(events, on_disk=False, compiled=False),
            "suite_client": post_suite_client(events),
        }
        runs.append(result)
        print(f"coldstart run {run + 1}: {json.dumps(result)}", file=sys.stderr)
    lines = report(runs)
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps({"report": lines, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
