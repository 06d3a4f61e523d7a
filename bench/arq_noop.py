"""arq's own ceiling: how many no-op jobs one arq worker process runs per second.

Run: .venv/bin/python -m bench.arq_noop --redis redis://127.0.0.1:6379/0 [--jobs 20000]
Enqueues the jobs (pipelined), then runs one burst worker with arq's defaults and the
poll delay and event loop (``NOTIFIER_EVENT_LOOP``) notifier's workers use, and prints
{"jobs": n, "seconds": s, "jobs_per_s": r} as JSON, timing only the worker.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from arq import Worker
from arq.connections import RedisSettings, create_pool

from notifier.settings import Settings


async def noop(ctx: dict[str, Any]) -> None:
    return None


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--redis", required=True)
    parser.add_argument("--jobs", type=int, default=20_000)
    args = parser.parse_args()
    settings = RedisSettings.from_dsn(args.redis)
    pool = await create_pool(settings)
    await pool.flushdb()
    for start in range(0, args.jobs, 1000):
        await asyncio.gather(
            *(pool.enqueue_job("noop", _job_id=f"n{i}") for i in range(start, start + 1000))
        )
    worker = Worker(
        functions=[noop],
        redis_pool=pool,
        burst=True,
        poll_delay=Settings.model_fields["worker_poll_delay_s"].default,
        handle_signals=False,
        keep_result=0,
    )
    started = time.perf_counter()
    await worker.main()
    seconds = time.perf_counter() - started
    await worker.close()
    done = worker.jobs_complete
    print(json.dumps({"jobs": done, "seconds": seconds, "jobs_per_s": done / seconds}))


if __name__ == "__main__":
    from notifier.cli import new_event_loop

    with asyncio.Runner(loop_factory=lambda: new_event_loop(Settings(), "worker")) as runner:
        runner.run(main())
