"""Scale-out: 1, 2 and 4 `notifier worker` processes on one redis-server, and 1 and 2 on a
3-shard Redis Cluster, the same backlog.

Run: .venv/bin/python -m bench.scale [--runs 3] [--shipments 2000] [--workers 1,2,4]
     [--cluster-workers 1,2] [--shards 3] [--json FILE] [--smoke]

Each run generates one backlog (bench/workload.py) and, for every worker count, starts a
fresh redis-server, posts the whole backlog through `notifier serve` (which then stops),
starts the workers cold and waits until the outbox has every message. For the cluster
worker counts it then does the same on a fresh Redis Cluster of 3 masters (no replicas)
with arq's queue on a Redis of its own (NOTIFIER_REDIS_URL=redis+cluster://...,
NOTIFIER_QUEUE_REDIS_URL). Per worker count and store:

- messages/s end to end, from the workers' start to the last outbox file (start-up
  included), and from the first inbox entry read ("warm");
- CPU seconds per message of the workers together (/proc), with and without their
  start-up (a worker started on an empty Redis, until its first poll: measured per run);
- each redis-server's CPU per message (/proc, over the drain) and commands per message
  (INFO commandstats, script-inner commands included), and how many of the partitions
  each shard holds; on one Redis arq's queue lives on the same server, on the cluster the
  queue Redis' share is reported apart;
- the ratio to one worker, and the cluster's ratio to one Redis at the same worker count.

The bench's own polling (one client, 8 XLEN every 0.1 s while draining) is counted in the
Redis figures: well under 1 % at 2,000 shipments, most of them in --smoke.

On a 2-core machine everything (workers, every redis-server, the bench) shares the same
two cores: more than two workers, or a cluster, cannot be faster here. The figures that
carry to bigger machines are the per-message costs, per process and per shard, and how
evenly the shards share the work; the report extrapolates from them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from redis.crc import key_slot

from bench import workload
from bench.procs import Stack, alive, cpu_seconds, stack, wait_until
from bench.service import PARTITIONS, _outbox_files, _settled_count, post_backlog
from notifier.store import keys
from notifier.worker import WORKERS_KEY

Result = dict[str, Any]


def _inbox_keys(st: Stack) -> list[str]:
    """The partitions' inbox streams (on a cluster each carries its partition's tag)."""
    return [
        keys.inbox_key(p, keys.tag(p, PARTITIONS) if st.cluster else "") for p in range(PARTITIONS)
    ]


def _consumed(data: Any, inboxes: list[str]) -> bool:
    """Whether a worker has read any inbox entry yet."""
    return any(
        int(g.get("entries-read") or 0) > 0 for key in inboxes for g in data.xinfo_groups(key)
    )


def _inbox_length(data: Any, inboxes: list[str]) -> int:
    return sum(int(data.xlen(key)) for key in inboxes)


def _partitions_per_server(st: Stack) -> dict[str, int]:
    """How many inbox partitions each data server holds (all of them on one Redis)."""
    if not st.cluster:
        return {"redis": PARTITIONS}
    ranges = [
        (low, high, st.servers[int(node[1])].name)
        for low, high, node, *_ in st.node(st.shard_ports[0]).cluster("slots")
    ]
    counts = {st.servers[port].name: 0 for port in st.shard_ports}
    for key in _inbox_keys(st):
        slot = key_slot(key.encode())
        counts[next(name for low, high, name in ranges if low <= slot <= high)] += 1
    return counts


def _server_counters(st: Stack) -> dict[str, dict[str, float]]:
    """Per redis-server: CPU seconds (/proc), commands (INFO commandstats, summed), and
    per command its calls ("calls:xack") and µs spent ("usec:xack")."""
    out = {}
    for port, server in st.servers.items():
        stats = st.node(port).info("commandstats")
        counters = {
            "cpu_s": cpu_seconds(server.popen.pid),
            "commands": float(sum(s["calls"] for s in stats.values())),
        }
        for name, stat in stats.items():
            counters[f"calls:{name.removeprefix('cmdstat_')}"] = float(stat["calls"])
            counters[f"usec:{name.removeprefix('cmdstat_')}"] = float(stat["usec"])
        out[server.name] = counters
    return out


def startup_cpu_s() -> float:
    """CPU seconds a worker spends starting (imports, templates, settings check): from its
    start on an empty Redis until its first poll says it is alive in ntf:workers."""
    with stack() as st:
        proc = st.worker()
        wait_until(alive(proc, lambda: int(st.redis().zcard(WORKERS_KEY)) > 0), "a worker", 120)
        return cpu_seconds(proc.popen.pid)


def drain(events: list[dict[str, Any]], workers: int, startup_s: float, shards: int = 0) -> Result:
    """``events`` posted as a backlog, then drained by ``workers`` processes started cold,
    on one Redis or (``shards``) on a Redis Cluster with a queue Redis."""
    with stack(shards=shards) as st:
        api, _ = post_backlog(st, events)
        api.stop()
        data, inboxes = st.redis(), _inbox_keys(st)
        backlog = _inbox_length(data, inboxes)
        partitions = _partitions_per_server(st)
        before = _server_counters(st)
        started = time.time()
        procs = [st.worker(f"worker-{i}") for i in range(workers)]
        wait_until(alive(procs, lambda: _consumed(data, inboxes)), "the workers", 120)
        warm = time.time()
        wait_until(alive(procs, lambda: _inbox_length(data, inboxes) == 0), "the drain", 900, 0.1)
        messages = _settled_count(st, st.outbox)
        last = max((p.stat().st_mtime for p in _outbox_files(st.outbox)), default=started)
        after = _server_counters(st)
        for proc in procs:
            proc.stop()
    seconds = max(last, warm) - started
    worker_cpu = sum(p.cpu_s for p in procs)
    per = max(messages, 1)
    used = {
        name: {k: v - before[name].get(k, 0.0) for k, v in counters.items()}
        for name, counters in after.items()
    }
    by_command: dict[str, float] = {}  # "calls:xack" and "usec:xack", every server's
    for counters in used.values():
        for k, v in counters.items():
            by_command[k] = by_command.get(k, 0.0) + v
    return {
        "workers": workers,
        "shards": shards,
        "transitions": backlog,
        "messages": messages,
        "seconds": seconds,
        "messages_per_s": messages / seconds,
        "messages_per_s_warm": messages / max(last - warm, 1e-9),
        "worker_cpu_ms_per_message": 1000 * worker_cpu / per,
        "worker_cpu_ms_per_message_net": 1000 * (worker_cpu - workers * startup_s) / per,
        "startup_cpu_s": startup_s,
        "cpu_s_per_worker": [p.cpu_s for p in procs],
        # every redis-server together (on a cluster: the shards and the queue Redis)
        "redis_cpu_ms_per_message": 1000 * sum(c["cpu_s"] for c in used.values()) / per,
        "redis_commands_per_message": sum(c["commands"] for c in used.values()) / per,
        # each one: redis, or shard-1.. and queue
        "servers": {
            name: {
                "cpu_ms_per_message": 1000 * c["cpu_s"] / per,
                "commands_per_message": c["commands"] / per,
                "commands_per_s": c["commands"] / seconds,
                "core_share": c["cpu_s"] / seconds,  # of one core, over the drain
                "partitions": partitions.get(name, 0),
            }
            for name, c in used.items()
        },
        # where Redis spends its time: EVALSHA is the store's scripts, XREADGROUP/XACK
        # the inbox, ZRANGEBYSCORE/WATCH/MULTI/EXEC/SET/GET mostly arq's queue
        "redis_us_per_message_by_command": _per_message(by_command, "usec:", per),
        "redis_calls_per_message_by_command": _per_message(by_command, "calls:", per),
        "worker_peak_rss_mb": max(p.peak_mb for p in procs),
    }


def _per_message(counters: dict[str, float], prefix: str, per: int) -> dict[str, float]:
    """The counters named ``prefix``<command>, per message, the largest first."""
    found = [(k.removeprefix(prefix), v / per) for k, v in counters.items() if k.startswith(prefix)]
    return dict(sorted(((k, v) for k, v in found if v > 0), key=lambda kv: -kv[1]))


def _median(results: list[Result], *path: str) -> float:
    def get(r: Any) -> float:
        for key in path:
            r = r[key]
        return float(r)

    return float(statistics.median(get(r) for r in results))


def _scaling(runs: list[list[Result]]) -> list[str]:
    """One line per worker count on one Redis: medians over the runs, the ratio to one."""
    lines = []
    base = 0.0
    for column in zip(*runs, strict=True):
        n, col = column[0]["workers"], list(column)
        rate = _median(col, "messages_per_s")
        base = base or rate
        lines.append(
            f"{n} worker{'s' if n > 1 else ' '}: {rate:7,.0f} messages/s "
            f"({rate / base:.2f}x 1 worker; warm {_median(col, 'messages_per_s_warm'):,.0f}/s), "
            f"worker CPU {_median(col, 'worker_cpu_ms_per_message'):.2f} ms/message "
            f"({_median(col, 'worker_cpu_ms_per_message_net'):.2f} without start-up), "
            f"Redis CPU {_median(col, 'redis_cpu_ms_per_message'):.3f} ms/message "
            f"({_median(col, 'redis_commands_per_message'):.1f} commands)"
        )
    return lines


def _comparison(single: list[list[Result]], cluster: list[list[Result]]) -> list[str]:
    """Per cluster worker count: one Redis against the cluster, medians over the runs."""
    lines = []
    for column in zip(*cluster, strict=True):
        n, col = column[0]["workers"], list(column)
        one = [r for run in single for r in run if r["workers"] == n]
        rate, one_rate = _median(col, "messages_per_s"), _median(one, "messages_per_s")
        shards = sorted(name for name in col[0]["servers"] if name != "queue")
        per_shard = " / ".join(
            f"{_median(col, 'servers', s, 'cpu_ms_per_message'):.3f}" for s in shards
        )
        partitions = "/".join(str(col[0]["servers"][s]["partitions"]) for s in shards)
        redis_ms = _median(col, "redis_cpu_ms_per_message")
        queue_ms = _median(col, "servers", "queue", "cpu_ms_per_message")
        queue_cmds = _median(col, "servers", "queue", "commands_per_message")
        cmds = _median(col, "redis_commands_per_message")
        lines += [
            f"{n} worker{'s' if n > 1 else ' '}: one Redis {one_rate:6,.0f} messages/s, "
            f"cluster {rate:6,.0f} messages/s ({rate / one_rate:.2f}x one Redis); worker CPU "
            f"{_median(one, 'worker_cpu_ms_per_message_net'):.2f} and "
            f"{_median(col, 'worker_cpu_ms_per_message_net'):.2f} ms/message without start-up",
            f"   Redis CPU per message: one Redis "
            f"{_median(one, 'redis_cpu_ms_per_message'):.3f} ms "
            f"({_median(one, 'redis_commands_per_message'):.1f} commands, arq's queue "
            f"included); cluster {redis_ms:.3f} ms ({cmds:.1f} commands) = shards "
            f"{per_shard} ms (holding {partitions} of the {PARTITIONS} partitions) + queue "
            f"Redis {queue_ms:.3f} ms ({queue_ms / redis_ms:.0%} of the CPU, "
            f"{queue_cmds / cmds:.0%} of the commands)",
        ]
    return lines


def _extrapolation(single: list[list[Result]], cluster: list[list[Result]]) -> list[str]:
    """What a machine with a core for every process would do, from the per-message costs
    at the largest cluster worker count (and one Redis at the same count)."""
    col = [run[-1] for run in cluster]
    n = col[0]["workers"]
    one = [r for run in single for r in run if r["workers"] == n]
    shards = [name for name in col[0]["servers"] if name != "queue"]
    busiest = max(_median(col, "servers", s, "cpu_ms_per_message") for s in shards)
    one_ms = _median(one, "redis_cpu_ms_per_message")
    worker_rate = 1000 / _median(col, "worker_cpu_ms_per_message_net")
    # the queue Redis works per worker (arq's job polling) more than per message
    queue_share = _median(col, "servers", "queue", "core_share") / n
    polls = _median(col, "servers", "queue", "commands_per_s") / n
    caps = sorted(
        [
            (
                PARTITIONS * worker_rate,
                "the partitions' drains",
                f"one drain per partition at a time: at most {PARTITIONS} busy worker "
                f"processes of {worker_rate:,.0f} messages/s each; NOTIFIER_PARTITIONS "
                "raises it",
            ),
            (1000 / one_ms, "one Redis's core", "arq's queue on it too"),
            (
                1000 / busiest,
                "the busiest shard's core",
                f"{len(shards)} shards: the cluster is full when its busiest shard is",
            ),
            (
                worker_rate / queue_share,
                "the queue Redis's core",
                f"{queue_share:.1%} of a core per worker: full at about "
                f"{1 / queue_share:,.0f} workers with {PARTITIONS} partitions",
            ),
        ]
    )
    total = _median(col, "redis_cpu_ms_per_message")
    one_redis = [c for c in caps if "shard" not in c[1] and "queue" not in c[1]]
    on_cluster = [c for c in caps if "one Redis" not in c[1]]

    def first(limits: list[tuple[float, str, str]]) -> str:
        return f"{limits[0][1]} (at {limits[0][0]:,.0f}/s), then {limits[1][1]}"

    return [
        "how it extrapolates: on this 2-core machine the workers, every redis-server and the "
        "bench share two cores, so a cluster cannot be faster here; what carries over is the "
        "cost per message, per worker and per shard, and how evenly the shards share it. "
        f"The cluster's servers spend {total / one_ms:.2f}x one Redis's CPU per message in "
        f"all, its busiest shard {busiest / one_ms:.0%} of it. With a core for every process "
        f"(per-message costs at {n} workers), the limits are:",
        *(f"   {rate:9,.0f} messages/s: {name} ({detail})" for rate, name, detail in caps),
        f"what breaks first: on one Redis {first(one_redis)}; on the cluster "
        f"{first(on_cluster)}. A shard's share follows the "
        f"partitions it holds ({PARTITIONS} over {len(shards)} shards cannot be even): more "
        "partitions spread it finer. The queue Redis works per worker, not per message: "
        "every poll (50 ms) each worker lists the queue and tries to claim every drain job "
        "in it, running elsewhere or not (WATCH, EXISTS, ZSCORE, UNWATCH; "
        f"{polls:,.0f} commands/s per worker here), so its load grows as workers x running "
        "drains (arq reads up to 100 jobs a poll): raising NOTIFIER_PARTITIONS to "
        "add workers raises it on both counts.",
    ]


def report(single: list[list[Result]], cluster: list[list[Result]]) -> list[str]:
    startup = statistics.median(r[0]["startup_cpu_s"] for r in single)
    counts = [{r["messages"] for r in s + c} for s, c in zip(single, cluster, strict=True)]
    messages = "/".join(str(min(c)) for c in counts)
    same = all(len(c) == 1 for c in counts)
    lines = [
        "one redis-server:",
        *_scaling(single),
        f"messages per run: {messages}, "
        + ("the same for every worker count and store" if same else "NOT the same every time"),
        f"worker start-up: {startup:.2f} CPU s per process",
    ]
    if cluster and cluster[0]:
        shards = cluster[0][0]["shards"]
        lines += [
            f"one Redis against a {shards}-shard Redis Cluster (no replicas) with arq's queue on "
            "a Redis of its own, the same backlog and worker count:",
            *_comparison(single, cluster),
            *_extrapolation(single, cluster),
        ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3, help="runs to take the median of")
    parser.add_argument("--shipments", type=int, default=2000, help="shipments in the backlog")
    parser.add_argument("--workers", default="1,2,4", help="worker counts, the first the base")
    parser.add_argument(
        "--cluster-workers", default="1,2", help="worker counts also run on the cluster"
    )
    parser.add_argument("--shards", type=int, default=3, help="the cluster's masters")
    parser.add_argument("--json", help="write every run's figures here")
    parser.add_argument("--smoke", action="store_true", help="30 shipments, 1 and 2 workers")
    args = parser.parse_args()
    counts = [1, 2] if args.smoke else [int(n) for n in args.workers.split(",")]
    on_cluster = [int(n) for n in args.cluster_workers.split(",") if n]
    if not set(on_cluster) <= set(counts):
        parser.error("--cluster-workers must be among --workers (compared at the same count)")
    shipments = 30 if args.smoke else args.shipments
    single: list[list[Result]] = []
    cluster: list[list[Result]] = []
    for run in range(1 if args.smoke else args.runs):
        events = workload.stream(shipments, seed=200 + run, run=f"s{run}")
        startup_s = startup_cpu_s()
        single.append([])
        cluster.append([])
        for n in counts:  # one Redis and the cluster in turn: drift hits both alike
            single[-1].append(drain(events, n, startup_s))
            print(f"scale run {run + 1}: {json.dumps(single[-1][-1])}", file=sys.stderr)
            if n in on_cluster:
                cluster[-1].append(drain(events, n, startup_s, args.shards))
                print(f"scale run {run + 1}: {json.dumps(cluster[-1][-1])}", file=sys.stderr)
    lines = report(single, cluster)
    print("\n".join(lines))
    if args.json:
        runs = {"one_redis": single, "cluster": cluster}
        Path(args.json).write_text(json.dumps({"report": lines, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
