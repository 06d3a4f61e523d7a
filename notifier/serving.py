"""Run the API's HTTP server, and stop it without dropping a request it has started.

aiohttp's own ``run_app`` closes every connection as it stops (``Server.pre_shutdown``)
and from then on drops what arrives on them: a request whose body was still arriving (a
big batch over a slow link) could never end, and was cut after the shutdown timeout with
no answer. Here a stop first closes the listening socket, then waits for the requests in
flight (``InFlight``) with their connections open, answering each with ``Connection:
close``; only then does aiohttp close what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler


@dataclass
class InFlight:
    """The requests a server is handling (``track``), and whether it is stopping."""

    count: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    stopping: bool = False

    def __post_init__(self) -> None:
        self.idle.set()


IN_FLIGHT = web.AppKey("in_flight", InFlight)


@web.middleware
async def track(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count the request while its handler runs (its body read included); once the server
    is stopping, its answer closes the connection (no next request on it)."""
    flight = request.app[IN_FLIGHT]
    flight.count += 1
    flight.idle.clear()
    try:
        response = await handler(request)
        if flight.stopping:
            response.force_close()
        return response
    finally:
        flight.count -= 1
        if not flight.count:
            flight.idle.set()


def run(
    app: web.Application,
    host: str,
    port: int,
    loop: asyncio.AbstractEventLoop,
    *,
    listening: Callable[[int], None],
    stopping: Callable[[], None],
    grace_s: float,
) -> None:
    """Serve ``app`` on ``host:port`` until SIGTERM or SIGINT; then answer the requests in
    flight for up to ``grace_s`` and stop. ``listening`` gets the port bound (``port`` 0:
    the one the system picked), ``stopping`` is called at the signal. OSError when the
    address cannot be bound."""
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(_serve(app, host, port, listening, stopping, grace_s))
    finally:
        _cancel_the_rest(loop)
        loop.run_until_complete(loop.shutdown_asyncgens())
        asyncio.set_event_loop(None)
        loop.close()


async def _serve(
    app: web.Application,
    host: str,
    port: int,
    listening: Callable[[int], None],
    stopping: Callable[[], None],
    grace_s: float,
) -> None:
    # what is still running after the wait gets a second more, then is cut; an idle
    # keep-alive connection is closed after 75 s (as run_app had it; aiohttp's own default
    # is an hour)
    runner = web.AppRunner(
        app, access_log=None, handle_signals=False, shutdown_timeout=1.0, keepalive_timeout=75
    )
    # a signal from the start (a Redis that does not answer holds the start-up): stop there
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        if not await _until_stopped(runner.setup(), stop):
            return
        site = web.TCPSite(runner, host, port)
        if not await _until_stopped(site.start(), stop):
            return
        listening(site.port)
        await stop.wait()
        stopping()
        flight = app[IN_FLIGHT]
        flight.stopping = True
        await site.stop()  # no new connections; those open stay open
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(flight.idle.wait(), grace_s)
    finally:
        await runner.cleanup()


async def _until_stopped(step: Coroutine[Any, Any, None], stop: asyncio.Event) -> bool:
    """Run a start-up step; False (the step cancelled) when a stop signal comes first."""
    task = asyncio.ensure_future(step)
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait((task, stopped), return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if task.done():
        task.result()  # (its error, if any: a port in use)
        return True
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return False


def _cancel_the_rest(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what is still running, and report what failed meanwhile (as run_app did)."""
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in tasks:
        task.cancel()
    if not tasks:
        return
    loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            loop.call_exception_handler(
                {
                    "message": "unhandled exception during serve's shutdown",
                    "exception": task.exception(),
                    "task": task,
                }
            )
