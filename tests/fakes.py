"""Fake providers on loopback: they record what the real SDKs send and can be told to fail."""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import (
    AbstractAsyncContextManager,
    AsyncExitStack,
    asynccontextmanager,
    contextmanager,
)
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from notifier.channels import Outcome, Outgoing, Receipt
from notifier.errors import DeliveryError


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
class _Fake:
    """What both fakes share: scripted answers, an outage, and what they accepted."""

    script: list[Reply] = field(default_factory=list)
    #: while not empty, every request is answered with these in turn (an outage)
    outage: list[Reply] = field(default_factory=list)
    url: str = ""
    _turns: itertools.count[int] = field(default_factory=itertools.count)

    def down(self, *replies: Reply) -> None:
        """Answer every request with ``replies`` in turn until ``up()``: a provider outage."""
        self.outage = list(replies)

    def up(self) -> None:
        self.outage = []

    def _reply(self, default: Reply) -> Reply:
        outage = self.outage  # (another thread may end it meanwhile)
        if outage:
            return outage[next(self._turns) % len(outage)]
        return self.script.pop(0) if self.script else default


@dataclass
class FakeTwilio(_Fake):
    """Twilio's Messages API: POST /2010-04-01/Accounts/{sid}/Messages.json."""

    received: list[dict[str, str]] = field(default_factory=list)
    #: the requests answered with a message resource: the SMS that went out
    accepted: list[dict[str, str]] = field(default_factory=list)
    auth: list[str] = field(default_factory=list)
    _sids: itertools.count[int] = field(default_factory=itertools.count)

    @staticmethod
    def error(
        status: int,
        code: int | None = None,
        *,
        retry_after: str | None = None,
        delay_s: float = 0.0,
    ) -> Reply:
        """An error answer in Twilio's JSON error shape."""
        body = {
            "code": code,
            "message": f"fake error {code or status}",
            "status": status,
            "more_info": f"https://www.twilio.com/docs/errors/{code}",
        }
        headers = {"Retry-After": retry_after} if retry_after else {}
        return Reply(status, body, headers, delay_s)

    def fail(
        self,
        status: int,
        code: int | None = None,
        *,
        retry_after: str | None = None,
        delay_s: float = 0.0,
    ) -> None:
        """Answer the next request with an error (Twilio's JSON error shape)."""
        self.script.append(self.error(status, code, retry_after=retry_after, delay_s=delay_s))

    async def messages(self, request: web.Request) -> web.Response:
        form = await request.post()
        self.received.append({k: str(v) for k, v in form.items()})
        self.auth.append(request.headers.get("Authorization", ""))
        reply = self._reply(Reply())
        if reply.delay_s:
            await asyncio.sleep(reply.delay_s)  # a provider that hangs
        if reply.text is not None:
            return web.Response(text=reply.text, status=reply.status)
        if 200 <= reply.status < 300:
            self.accepted.append(self.received[-1])
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
class FakeSendGrid(_Fake):
    """SendGrid's v3 API: POST /v3/mail/send (202 with X-Message-Id when accepted)."""

    received: list[dict[str, Any]] = field(default_factory=list)
    #: the requests answered 202: the emails that went out
    accepted: list[dict[str, Any]] = field(default_factory=list)
    auth: list[str] = field(default_factory=list)
    _ids: itertools.count[int] = field(default_factory=itertools.count)

    @staticmethod
    def error(status: int, *, headers: dict[str, str] | None = None, delay_s: float = 0.0) -> Reply:
        """An error answer in SendGrid's JSON error shape."""
        body = {"errors": [{"message": f"fake error {status}", "field": None}]}
        return Reply(status, body, headers or {}, delay_s)

    def fail(
        self, status: int, *, headers: dict[str, str] | None = None, delay_s: float = 0.0
    ) -> None:
        self.script.append(self.error(status, headers=headers, delay_s=delay_s))

    async def send(self, request: web.Request) -> web.Response:
        self.received.append(await request.json())
        self.auth.append(request.headers.get("Authorization", ""))
        reply = self._reply(Reply(202))
        if reply.delay_s:
            await asyncio.sleep(reply.delay_s)
        if reply.status == 202:
            self.accepted.append(self.received[-1])
            return web.Response(status=202, headers={"X-Message-Id": f"sg{next(self._ids)}"})
        return web.json_response(reply.body, status=reply.status, headers=reply.headers)


@asynccontextmanager
async def serve_sendgrid() -> AsyncIterator[FakeSendGrid]:
    fake = FakeSendGrid()
    async with _serve("/v3/mail/send", fake.send) as url:
        fake.url = url
        yield fake


@contextmanager
def in_thread(
    *servers: Callable[[], AbstractAsyncContextManager[Any]],
) -> Iterator[list[Any]]:
    """Run fakes (``serve_twilio``, ``serve_sendgrid``) on an event loop of their own in a
    background thread, for tests that wait on real processes with blocking calls."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    stack = AsyncExitStack()

    async def enter() -> list[Any]:
        return [await stack.enter_async_context(serve()) for serve in servers]

    try:
        yield asyncio.run_coroutine_threadsafe(enter(), loop).result(timeout=30)
    finally:
        asyncio.run_coroutine_threadsafe(stack.aclose(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


class Crash(BaseException):
    """The process dying mid-send (not an error the code could handle)."""


class CrashingChannel:
    """Accepts nothing: the worker dies after committing decisions, before any send."""

    name = "crashing"

    async def send_many(self, items: Sequence[Outgoing]) -> list[Outcome]:
        raise Crash


class FailingChannel:
    """Every send fails with ``error``: a TemporaryDeliveryError (a provider's 503, say)
    or a PermanentDeliveryError (a provider refusing the address)."""

    def __init__(self, error: type[DeliveryError], reason: str, name: str) -> None:
        self.error, self.reason, self.name = error, reason, name

    async def send_many(self, items: Sequence[Outgoing]) -> list[Outcome]:
        return [self.error(self.reason, i.message.notification_id, self.name) for i in items]


class CountingChannel:
    """A provider that accepts every message and counts what it was handed, per
    notification id (no provider can tell a resend); ``hold`` keeps each batch in flight
    until it is set (``entered`` is set once a batch is in flight)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.sent: dict[str, int] = {}
        self.hold: asyncio.Event | None = None
        self.entered = asyncio.Event()

    async def send_many(self, items: Sequence[Outgoing]) -> list[Outcome]:
        self.entered.set()
        if self.hold is not None:
            await self.hold.wait()
        for i in items:
            nid = i.message.notification_id
            self.sent[nid] = self.sent.get(nid, 0) + 1
        return [Receipt(self.name, f"{self.name}-{i.message.notification_id}") for i in items]
