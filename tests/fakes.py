"""Fake providers on loopback: they record what the real SDKs send and can be told to fail."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Reply:
    """One scripted answer: status, JSON body, headers, and a delay before answering."""

    status: int = 201
    body: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    #: a raw, non-JSON answer (a proxy's error page, a truncated reply)
    text: str | None = None


@dataclass
class FakeTwilio:
    """Twilio's Messages API: POST /2010-04-01/Accounts/{sid}/Messages.json."""

    script: list[Reply] = field(default_factory=list)
    received: list[dict[str, str]] = field(default_factory=list)
    auth: list[str] = field(default_factory=list)
    url: str = ""
    _sids: itertools.count[int] = field(default_factory=itertools.count)

    def fail(
        self,
        status: int,
        code: int | None = None,
        *,
        retry_after: str | None = None,
        delay_s: float = 0.0,
    ) -> None:
        """Answer the next request with an error (Twilio's JSON error shape)."""
        body = {
            "code": code,
            "message": f"fake error {code or status}",
            "status": status,
            "more_info": f"https://www.twilio.com/docs/errors/{code}",
        }
        headers = {"Retry-After": retry_after} if retry_after else {}
        self.script.append(Reply(status, body, headers, delay_s))

    async def messages(self, request: web.Request) -> web.Response:
        form = await request.post()
        self.received.append({k: str(v) for k, v in form.items()})
        self.auth.append(request.headers.get("Authorization", ""))
        reply = self.script.pop(0) if self.script else Reply()
        if reply.delay_s:
            await asyncio.sleep(reply.delay_s)  # a provider that hangs
        if reply.text is not None:
            return web.Response(text=reply.text, status=reply.status)
        body = reply.body or {
            "sid": f"SM{next(self._sids):032d}",
            "status": "queued",
            "to": form.get("To"),
            "body": form.get("Body"),
            "account_sid": request.match_info["sid"],
        }
        return web.json_response(body, status=reply.status, headers=reply.headers)


@asynccontextmanager
async def _serve(route: str, handler: Any) -> AsyncIterator[str]:
    """Run one POST route on a free loopback port; yield its base URL."""
    app = web.Application()
    app.router.add_post(route, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def serve_twilio() -> AsyncIterator[FakeTwilio]:
    fake = FakeTwilio()
    async with _serve("/2010-04-01/Accounts/{sid}/Messages.json", fake.messages) as url:
        fake.url = url
        yield fake


@dataclass
class FakeSendGrid:
    """SendGrid's v3 API: POST /v3/mail/send (202 with X-Message-Id when accepted)."""

    script: list[Reply] = field(default_factory=list)
    received: list[dict[str, Any]] = field(default_factory=list)
    auth: list[str] = field(default_factory=list)
    url: str = ""
    _ids: itertools.count[int] = field(default_factory=itertools.count)

    def fail(
        self, status: int, *, headers: dict[str, str] | None = None, delay_s: float = 0.0
    ) -> None:
        body = {"errors": [{"message": f"fake error {status}", "field": None}]}
        self.script.append(Reply(status, body, headers or {}, delay_s))

    async def send(self, request: web.Request) -> web.Response:
        self.received.append(await request.json())
        self.auth.append(request.headers.get("Authorization", ""))
        reply = self.script.pop(0) if self.script else Reply(202)
        if reply.delay_s:
            await asyncio.sleep(reply.delay_s)
        if reply.status == 202:
            return web.Response(status=202, headers={"X-Message-Id": f"sg{next(self._ids)}"})
        return web.json_response(reply.body, status=reply.status, headers=reply.headers)


@asynccontextmanager
async def serve_sendgrid() -> AsyncIterator[FakeSendGrid]:
    fake = FakeSendGrid()
    async with _serve("/v3/mail/send", fake.send) as url:
        fake.url = url
        yield fake
