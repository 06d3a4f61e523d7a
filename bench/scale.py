"""Scale-out: 1, 2 and 4 `notifier worker` processes on one redis-server, the same backlog.

Run: .venv/bin/python -m bench.scale [--runs 3] [--shipments 2000] [--workers 1,2,4]
     [--json FILE] [--smoke]

Each run generates one backlog (bench/workload.py) and, for every worker count, starts a
fresh redis-server, posts the whole backlog through `notifier serve` (which then stops),
starts the workers cold and waits until the outbox has every message. Per worker count:

- messages/s end to end, from the workers' start to the last outbox file (start-up
  included), and from the first inbox entry read ("warm");
- CPU seconds per message of the workers together (/proc), with and without their
  start-up (a worker started on an empty Redis, until its first poll: measured per run);
- Redis CPU per message (INFO cpu, user + system, over the drain) and Redis commands per
  message: the arq queue lives on the same Redis, so both include it;
- the ratio to one worker.

On a 2-core machine more than two workers only share the same cores with Redis; the
figures that carry to bigger machines are the per-message costs and the ratio at 2.
The comparison with a 3-shard Redis Cluster is not measured: the store does not run on
a cluster yet (issue 16, point 2), and the report says so.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench import workload
from bench.procs import Stack, alive, cpu_seconds, stack, wait_until
from bench.service import (
    _consumed,
    _inbox_length,
    _outbox_files,
    _settled_count,
    post_backlog,
)
from notifier.worker import WORKERS_KEY

Result = dict[str, Any]
CLUSTER_NOTE = (
    "1 vs 3-shard Redis Cluster: not measured; the store does not run on a cluster yet "
    "(issue 16, point 2)"
)


def _redis_counters(st: Stack) -> dict[str, float]:
    """Redis's CPU seconds (user + system), commands processed, and µs spent per command."""
    r = st.redis()
    cpu = r.info("cpu")
    counters = {
        "cpu_s": float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
        "commands": float(r.info("stats")["total_commands_processed"]),
    }
    for name, stat in r.info("commandstats").items():
        counters[name.removeprefix("cmdstat_")] = float(stat["usec"])
    return counters


def startup_cpu_s() -> float:
    """CPU seconds a worker spends starting (imports, templates, settings check): from its
    start on an empty Redis until its first poll says it is alive in ntf:workers."""
    with stack() as st:
        proc = st.worker()
        wait_until(alive(proc, lambda: int(st.redis().zcard(WORKERS_KEY)) > 0), "a worker", 120)
        return cpu_seconds(proc.popen.pid)


def drain(events: list[dict[str, Any]], workers: int, startup_s: float) -> Result:
    """``events`` posted as a backlog, then drained by ``workers`` processes started cold."""
    with stack() as st:
        api, backlog = post_backlog(st, events)
        api.stop()
        before = _redis_counters(st)
        started = time.time()
        procs = [st.worker(f"worker-{i}") for i in range(workers)]
        wait_until(alive(procs, lambda: _consumed(st)), "the workers", 120)
        warm = time.time()
        wait_until(alive(procs, lambda: _inbox_length(st) == 0), "the drain", 900)
        messages = _settled_count(st, st.outbox)
        last = max((p.stat().st_mtime for p in _outbox_files(st.outbox)), default=started)
        redis = {k: v - before.get(k, 0.0) for k, v in _redis_counters(st).items()}
        for proc in procs:
            proc.stop()
    seconds = max(last, warm) - started
    worker_cpu = sum(p.cpu_s for p in procs)
    per = max(messages, 1)
    return {
        "workers": workers,
        "transitions": backlog,
        "messages": messages,
        "seconds": seconds,
        "messages_per_s": messages / seconds,
        "messages_per_s_warm": messages / max(last - warm, 1e-9),
        "worker_cpu_ms_per_message": 1000 * worker_cpu / per,
        "worker_cpu_ms_per_message_net": 1000 * (worker_cpu - workers * startup_s) / per,
        "startup_cpu_s": startup_s,
        "cpu_s_per_worker": [p.cpu_s for p in procs],
        "redis_cpu_ms_per_message": 1000 * redis.pop("cpu_s") / per,
        "redis_commands_per_message": redis.pop("commands") / per,
        # where Redis spends its time: EVALSHA is the store's scripts, XREADGROUP/XACK
        # the inbox, ZRANGEBYSCORE/WATCH/MULTI/EXEC/SET/GET mostly arq's queue
        "redis_us_per_message_by_command": {
            k: v / per for k, v in sorted(redis.items(), key=lambda kv: -kv[1]) if v > 0
        },
        "worker_peak_rss_mb": max(p.peak_mb for p in procs),
    }


def report(runs: list[list[Result]]) -> list[str]:
    """One line per worker count: medians over the runs, and the ratio to one worker."""
    lines = []
    base = 0.0
    for column in zip(*runs, strict=True):
        n = column[0]["workers"]

        def med(key: str, col: tuple[Result, ...] = column) -> float:
            return float(statistics.median(r[key] for r in col))

        rate = med("messages_per_s")
        base = base or rate
        lines.append(
            f"{n} worker{'s' if n > 1 else ' '}: {rate:7,.0f} messages/s "
            f"({rate / base:.2f}x 1 worker; warm {med('messages_per_s_warm'):,.0f}/s), "
            f"worker CPU {med('worker_cpu_ms_per_message'):.2f} ms/message "
            f"({med('worker_cpu_ms_per_message_net'):.2f} without start-up), "
            f"Redis CPU {med('redis_cpu_ms_per_message'):.3f} ms/message "
            f"({med('redis_commands_per_message'):.1f} commands)"
        )
    startup = statistics.median(r[0]["startup_cpu_s"] for r in runs)
    same = all(len({r["messages"] for r in run}) == 1 for run in runs)
    messages = "/".join(str(run[0]["messages"]) for run in runs)
    lines.append(
        f"messages per run: {messages}, "
        + ("the same for every worker count" if same else "NOT the same for every worker count")
    )
    return [*lines, f"worker start-up: {startup:.2f} CPU s per process", CLUSTER_NOTE]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3, help="runs to take the median of")
    parser.add_argument("--shipments", type=int, default=2000, help="shipments in the backlog")
    parser.add_argument("--workers", default="1,2,4", help="worker counts, the first the base")
    parser.add_argument("--json", help="write every run's figures here")
    parser.add_argument("--smoke", action="store_true", help="30 shipments, 1 and 2 workers")
    args = parser.parse_args()
    counts = [1, 2] if args.smoke else [int(n) for n in args.workers.split(",")]
    shipments = 30 if args.smoke else args.shipments
    runs: list[list[Result]] = []
    for run in range(1 if args.smoke else args.runs):
        events = workload.stream(shipments, seed=200 + run, run=f"s{run}")
        startup_s = startup_cpu_s()
        runs.append([])
        for n in counts:
            runs[-1].append(drain(events, n, startup_s))
            print(f"scale run {run + 1}: {json.dumps(runs[-1][-1])}", file=sys.stderr)
    lines = report(runs)
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps({"report": lines, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
