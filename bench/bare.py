"""The ingest ceiling: a bare aiohttp handler that reads and parses the same JSON, returns 202.

Run: .venv/bin/python -m bench.bare --port 8099   (the suite starts it itself)
No validation, no Redis, no auth: what aiohttp and orjson alone cost per request on
this machine, on the event loop `notifier serve` runs on (``NOTIFIER_EVENT_LOOP``), to put
notifier's own ingest figure next to.
"""

from __future__ import annotations

import argparse

import orjson
from aiohttp import web

from notifier.cli import new_event_loop
from notifier.settings import Settings


async def handle(request: web.Request) -> web.Response:
    body = orjson.loads(await request.read())
    reply = {"accepted": 1, "duplicates": 0, "results": [{"event_id": body.get("event_id")}]}
    return web.Response(status=202, body=orjson.dumps(reply), content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    port = parser.parse_args().port
    app = web.Application()
    app.router.add_post("/v1/transitions", handle)
    app.router.add_get("/healthz", healthz)
    loop = new_event_loop(Settings(), "serve")
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None, loop=loop)


if __name__ == "__main__":
    main()
