"""Profile one worker draining a realistic backlog, in-process (cProfile, or tracemalloc).

Run: .venv/bin/python -m bench.profile_worker [--shipments 2000] [--memory | --time]
Starts redis-server and the API (bench/procs.py), posts the backlog, then drains it with a
burst worker in this process and prints where the time went.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import time

from bench import service, workload
from bench.procs import stack


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shipments", type=int, default=2000)
    parser.add_argument("--top", type=int, default=45)
    parser.add_argument("--memory", action="store_true", help="tracemalloc: where memory goes")
    parser.add_argument("--time", action="store_true", help="no profiler: the drain rate only")
    parser.add_argument("--save", help="also write the profile here (pstats, for snakeviz)")
    args = parser.parse_args()
    events = workload.stream(args.shipments, seed=3, run="p")
    with stack() as st:
        _, port = st.api()
        asyncio.run(service._post_batches(port, service._bodies(events), 4))
        backlog = service._inbox_length(st)
        os.environ.update(st.notifier_env())
        from notifier.cli import _settle_gc, new_event_loop
        from notifier.settings import Settings
        from notifier.worker import build_worker

        r = st.redis()
        _settle_gc()  # as `notifier worker` does

        def waiting() -> int:
            """Inbox entries and queued jobs left: one round trip on one connection (this
            process's CPU is the worker's figure; a new client per poll cost ~1 ms of it)."""
            pipe = r.pipeline(transaction=False)
            for p in range(service.PARTITIONS):
                pipe.xlen(f"ntf:inbox:{p}")
            pipe.zcard("arq:queue")
            return sum(int(n) for n in pipe.execute())

        async def until_drained() -> None:
            worker = build_worker(Settings(), handle_signals=False)
            task = asyncio.create_task(worker.main())
            while waiting():
                if task.done():
                    task.result()
                await asyncio.sleep(0.05)
            task.cancel()
            await worker.close()

        loop = new_event_loop(
            Settings(), "worker"
        )  # as `notifier worker` runs (NOTIFIER_EVENT_LOOP)
        asyncio.set_event_loop(loop)

        def redis_cpu() -> float:
            """CPU seconds redis-server has used (its scripts run there)."""
            info = r.info("cpu")
            return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

        started, cpu, rcpu = time.perf_counter(), time.process_time(), redis_cpu()
        main_cpu = time.thread_time()  # the event loop's thread (the outbox writes on others)
        if args.time:
            loop.run_until_complete(until_drained())
        elif args.memory:
            import resource
            import tracemalloc

            tracemalloc.start(8)
            loop.run_until_complete(until_drained())
            snapshot = tracemalloc.take_snapshot()
            for stat in snapshot.statistics("traceback")[: args.top // 3]:
                print(f"{stat.size / 2**20:.1f} MiB in {stat.count} blocks")
                for line in stat.traceback.format()[-6:]:
                    print("   ", line)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(
                f"traced now {tracemalloc.get_traced_memory()[0] / 2**20:.0f} MiB, "
                f"peak traced {tracemalloc.get_traced_memory()[1] / 2**20:.0f} MiB, "
                f"peak RSS {peak:.0f} MB"
            )
        else:
            prof = cProfile.Profile()
            prof.enable()
            loop.run_until_complete(until_drained())
            prof.disable()
            if args.save:
                prof.dump_stats(args.save)
            pstats.Stats(prof).sort_stats("cumulative").print_stats(args.top)
            pstats.Stats(prof).sort_stats("tottime").print_stats(args.top)
        seconds = time.perf_counter() - started
        cpu = time.process_time() - cpu
        main_cpu = time.thread_time() - main_cpu
        rcpu = redis_cpu() - rcpu
        messages = len(service._outbox_files(st.outbox))
        # CPU seconds of this process (all its threads): steadier than the wall clock on a
        # machine that runs other work
        print(
            f"{backlog} transitions in {seconds:.1f} s: {backlog / seconds:.0f}/s; "
            f"{messages} messages: {messages / seconds:.0f}/s; "
            f"worker CPU {cpu:.1f} s: {backlog / cpu:.0f} transitions and "
            f"{messages / cpu:.0f} messages per CPU second; "
            f"Redis CPU {rcpu:.2f} s: {rcpu / backlog * 1e6:.0f} µs a transition; "
            f"the event loop's thread {main_cpu:.1f} s of CPU, busy {main_cpu / seconds:.0%} "
            f"of the drain (the rest it waited on Redis and the outbox's threads)"
        )


if __name__ == "__main__":
    main()
