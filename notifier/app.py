"""create_app(settings): routes, the error middleware, resources through cleanup_ctx."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any

import orjson
from aiohttp import web
from fakeredis import FakeServer
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from redis.exceptions import RedisError

from notifier import admin, admin_views, metrics, openapi, serving, unsubscribe, webhooks
from notifier import web as merchant_web
from notifier.addresses import canonical_phone
from notifier.errors import (
    ApiError,
    Forbidden,
    InvalidOptOut,
    InvalidQuery,
    NotFound,
    OptedOutByRecipient,
)
from notifier.ingest import (
    RETRY_AFTER_S,
    KeyRing,
    RateLimiter,
    may_act_for,
    post_transitions,
    read_json,
)
from notifier.insights import api as insights_api
from notifier.insights import carriers as carriers_api
from notifier.insights import digest_api
from notifier.insights import experiments as experiments_api
from notifier.logs import REQUEST_ID, request_id
from notifier.models import ChannelKind, Email, Identifier, MerchantId, Phone
from notifier.outbound import api as outbound_api
from notifier.policy import opt_out_key
from notifier.resources import Clock, Resources, connected_replicas, open_resources, utc_now
from notifier.settings import Settings
from notifier.store.base import redis_away
from notifier.timeline import shipment_history
from notifier.worker import HEARTBEAT_S, WORKERS_KEY, build_worker

log = logging.getLogger(__name__)

RESOURCES = web.AppKey("resources", Resources)
KEYS = web.AppKey("keys", KeyRing)

_MERCHANT: TypeAdapter[str] = TypeAdapter(MerchantId)
_SHIPMENT: TypeAdapter[str] = TypeAdapter(Identifier)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(status: int, body: object, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(body), content_type="application/json", headers=headers
    )


@web.middleware
async def request_id_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every request has an id (the caller's ``X-Request-ID``, or a new one): in the log
    lines it causes, in the answer's ``X-Request-ID``, and stored with what it ingests."""
    rid = request_id(request.headers.get("X-Request-ID"))
    token = REQUEST_ID.set(rid)
    try:
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            exc.headers["X-Request-ID"] = rid
            raise
        response.headers["X-Request-ID"] = rid
        return response
    finally:
        REQUEST_ID.reset(token)


@web.middleware
async def unread_body_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A compressed body the handler did not read (a 401, a 405, a GET) is not decoded
    afterwards: the connection closes instead. aiohttp would read it to keep the connection,
    and a body that does not decode would log an error with a traceback for every such
    request — a way for anyone to flood the error log."""
    response = await handler(request)
    if "Content-Encoding" in request.headers and not request.content.is_eof():
        response.force_close()  # the rest of the body is never read: no keep-alive
        request.content.feed_eof()
    return response


#: What a request the client abandoned counts as (nginx's "client closed request"): not a
#: server error, which pages whoever is on call.
CLIENT_CLOSED = 499


def _client_left(request: web.Request) -> bool:
    """Whether the client closed the connection (not the server stopping, which cuts what
    is left after its wait: those count as errors)."""
    if request.app[serving.IN_FLIGHT].stopping:
        return False
    transport = request.transport
    return transport is None or transport.is_closing()


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Counts and times every request by its route template (never the path: it can hold
    identifiers or a signed address)."""
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    except asyncio.CancelledError:
        if _client_left(request):
            status = CLIENT_CLOSED  # its handler cancelled as the client went away
        raise
    finally:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "(no route)"
        metrics.request(route, request.method, status, time.perf_counter() - started)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error leaves as ``{"error": {"code", "message", "details"}}``."""
    try:
        response = await handler(request)
        if response.status < 300 and _asks_redis(request.path):
            request.app[RESOURCES].outage.answered()
        return response
    except ApiError as exc:
        return _json(exc.status, exc.body(), exc.headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = exc.reason.lower().replace(" ", "_")
        return _json(
            exc.status,
            {"error": {"code": code, "message": exc.text or exc.reason}},
            {k: v for k, v in exc.headers.items() if k == "Allow"},
        )
    except Exception as exc:
        # the route, not the path: a path can carry an identifier or a signed address
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "(no route)"
        if redis_away(exc):
            # Redis does not answer (down, restarting, failing over): the caller may retry,
            # and the log says so once, not once per request (``OutageLog``)
            request.app[RESOURCES].outage.failed(f"{request.method} {route}", exc)
            return _json(
                503,
                {"error": {"code": "unavailable", "message": "Redis does not answer; retry later"}},
                {"Retry-After": RETRY_AFTER_S},
            )
        if isinstance(exc, ConnectionResetError) and _client_left(request):
            # the client went away before its request was read (an aborted upload): not
            # the service's error, nor a page for whoever is on call; nobody reads the answer
            log.info("client closed the connection during %s %s", request.method, route)
            body = {"error": {"code": "client_closed_request", "message": "closed"}}
            return _json(CLIENT_CLOSED, body)
        log.exception("unhandled error on %s %s", request.method, route)
        return _json(500, {"error": {"code": "internal", "message": "internal error"}})


def _asks_redis(path: str) -> bool:
    """Whether a route of ``path`` succeeds only after asking Redis: the JSON API's and a
    merchant's editor pages (not the editor's files, sign-in form or picker, nor
    /openapi.json or /metrics): its success ends an outage (``OutageLog``)."""
    if path.startswith("/v1/"):
        return True
    return path.startswith("/merchant/") and path.count("/") >= 3 and path[10:12] != "-/"


async def transitions(request: web.Request) -> web.Response:
    return await post_transitions(request, request.app[RESOURCES], request.app[KEYS])


async def shipment_notifications(request: web.Request) -> web.Response:
    """Decisions and delivery status of one shipment (DESIGN.md §5)."""
    merchant_id = request.match_info["merchant_id"]
    shipment_id = request.match_info["shipment_id"]
    if not may_act_for(request.app[KEYS].authenticate(request), merchant_id):
        raise Forbidden("this API key may not read that merchant's shipments")
    res = request.app[RESOURCES]
    try:
        _MERCHANT.validate_python(merchant_id)
        _SHIPMENT.validate_python(shipment_id)
    except ValidationError as exc:
        raise NotFound(f"no shipment {shipment_id} for merchant {merchant_id}") from exc
    cursor, limit = _page_query(request)
    history = await shipment_history(res, merchant_id, shipment_id, cursor, limit)
    if history is None:
        raise NotFound(f"no decisions recorded for shipment {shipment_id}")
    return _json(200, history)


#: Decisions per page of a shipment's history, by default and at most (all that is kept).
HISTORY_PAGE_MAX = 200
_COUNT = re.compile(r"[0-9]{1,15}")


def _page_query(request: web.Request) -> tuple[int | None, int]:
    """``cursor`` and ``limit`` of a history request; 422 naming a bad one."""
    details = []
    cursor_text = request.query.get("cursor")
    limit_text = request.query.get("limit", str(HISTORY_PAGE_MAX))
    # ASCII digits only (str.isdigit() also takes "²"), and few enough for Redis's integers
    cursor = int(cursor_text) if cursor_text and _COUNT.fullmatch(cursor_text) else None
    if cursor_text is not None and cursor is None:
        details.append({"field": "cursor", "message": "must be a next_cursor from a page"})
    limit = int(limit_text) if _COUNT.fullmatch(limit_text) else 0
    if not 1 <= limit <= HISTORY_PAGE_MAX:
        details.append(
            {"field": "limit", "message": f"must be a whole number from 1 to {HISTORY_PAGE_MAX}"}
        )
    if details:
        raise InvalidQuery("invalid query parameters", details)
    return cursor, limit


class OptOut(BaseModel):
    """POST /v1/merchants/{merchant_id}/opt-outs: record an opt-out (or an opt-in)."""

    model_config = ConfigDict(extra="forbid")

    channel: ChannelKind
    address: Annotated[str, StringConstraints(min_length=3, max_length=254)]
    opted_out: bool = Field(default=True, strict=True)  # ("yes", 1: not read as true)

    @field_validator("address")
    @classmethod
    def _address_fits_channel(cls, value: str, info: ValidationInfo) -> str:
        # An address in another form than the one transitions carry would never match.
        kind = Phone if info.data.get("channel") is ChannelKind.SMS else Email
        try:
            address: str = TypeAdapter(kind).validate_python(value)  # stripped, as they carry it
        except ValidationError as exc:
            raise ValueError(exc.errors()[0]["msg"].removeprefix("Value error, ")) from exc
        return address


async def opt_outs(request: web.Request) -> web.Response:
    """Record that a recipient opted out of (or back into) a channel for one merchant."""
    merchant_id = request.match_info["merchant_id"]
    if not may_act_for(request.app[KEYS].authenticate(request), merchant_id):
        raise Forbidden("this API key may not act for that merchant")
    try:
        _MERCHANT.validate_python(merchant_id)
        body = OptOut.model_validate(await read_json(request, 16 * 1024))
    except ValidationError as exc:
        raise InvalidOptOut.of("invalid opt-out", exc) from exc
    address = body.address
    if body.channel is ChannelKind.SMS:  # the spelling a STOP and a message use
        address = canonical_phone(address)
    key = opt_out_key(body.channel, address)
    res = request.app[RESOURCES]
    if await res.store.set_opt_out(merchant_id, key, body.opted_out) and body.opted_out:
        await res.hooks.opted_out(merchant_id, key, "api", res.clock())
    if not body.opted_out and await res.store.opted_out(merchant_id, [key]):
        # (it answered "opted_out": false while the SMS stayed suppressed)
        raise OptedOutByRecipient(
            "still opted out: the number opted out of every merchant's SMS (a STOP it sent, "
            "or Twilio reporting it unsubscribed); only a START from it opts it in again",
            [{"field": "address", "message": "opted out of every merchant by the recipient"}],
        )
    return _json(200, {**body.model_dump(mode="json"), "address": address})  # (as kept)


async def twilio_status_hook(request: web.Request) -> web.Response:
    return await webhooks.twilio_status(request, request.app[RESOURCES])


async def twilio_inbound_hook(request: web.Request) -> web.Response:
    return await webhooks.twilio_inbound(request, request.app[RESOURCES])


async def sendgrid_events_hook(request: web.Request) -> web.Response:
    return await webhooks.sendgrid_events(request, request.app[RESOURCES])


async def unsubscribe_hook(request: web.Request) -> web.Response:
    return await unsubscribe.unsubscribe(request, request.app[RESOURCES])


async def metrics_page(request: web.Request) -> web.Response:
    """Prometheus metrics of every process sharing NOTIFIER_METRICS_DIR (or of this one),
    and gauges read from Redis now."""
    res = request.app[RESOURCES]
    gauges = await metrics.redis_gauges(res.store, WORKERS_KEY, WORKER_ALIVE_S)
    return web.Response(
        body=metrics.exposition(gauges), headers={"Content-Type": metrics.CONTENT_TYPE_LATEST}
    )


async def healthz(request: web.Request) -> web.Response:
    """Liveness, a Redis check and the dead-letter counts; 503 when Redis does not answer."""
    res = request.app[RESOURCES]
    mode = "embedded" if res.settings.embedded else "redis"
    try:
        dead = await res.store.dead_letters()
        disabled = await res.store.overrides_disabled(int(res.clock().timestamp() * 1000))
    except (RedisError, OSError):
        return _json(503, {"status": "unavailable", "redis": "unreachable", "mode": mode})
    res.outage.answered()
    return _json(
        200,
        {
            "status": "ok",
            "redis": "ok",
            "mode": mode,
            "dead_letters": dead,
            # merchants whose own brand or templates workers found broken (and use the
            # defaults for) within the last day: a count, /healthz needs no key; the worker
            # log and `notifier check` say which files and why
            "merchant_overrides_disabled": disabled,
        },
    )


#: A worker counts as alive for /readyz this long after its last heartbeat.
WORKER_ALIVE_S = 3 * HEARTBEAT_S


async def readyz(request: web.Request) -> web.Response:
    """Ready to take traffic: Redis answers, the default templates, catalogs and policy are
    loaded, and at least one worker beat lately. 503 naming what is not."""
    res = request.app[RESOURCES]
    checks: dict[str, Any] = {}
    if res.queue is not res.redis:  # arq's own Redis: said apart (the data's may be fine)
        try:
            await res.queue.ping()
            checks["queue"] = "ok"
        except (RedisError, OSError) as exc:
            checks["queue"] = f"unreachable ({type(exc).__name__}): NOTIFIER_QUEUE_REDIS_URL"
    try:
        await res.redis.ping()
        since = int(res.clock().timestamp() * 1000) - int(WORKER_ALIVE_S * 1000)
        alive = int(await res.redis.zcount(WORKERS_KEY, since, "+inf"))
        checks["redis"] = "ok"
        checks["workers"] = alive
        wanted = res.settings.ingest_wait_replicas
        if wanted:
            replicas, silent = await connected_replicas(res.redis)
            if silent:
                checks["replicas"] = f"{silent} Redis Cluster master(s) not answering"
            else:
                checks["replicas"] = (
                    "ok" if replicas >= wanted else f"{replicas} of the {wanted} required connected"
                )
    except (RedisError, OSError) as exc:
        checks["redis"] = f"unreachable ({type(exc).__name__})"
        alive = -1
    for name, probe in (
        ("policies", lambda: res.policies.for_merchant("")),
        ("templates", lambda: res.templates.select("", ("email/layout.html",))),
        ("brand", lambda: res.renderer.brand("")),
        ("catalogs", lambda: _some(res.renderer.catalogs.available(), "no catalog found")),
    ):
        try:
            probe()
            checks[name] = "ok"
        except Exception as exc:  # a check names what failed; it never raises
            checks[name] = f"failed: {exc}"
    ready = alive > 0 and all(v == "ok" for k, v in checks.items() if k != "workers")
    if alive == 0:
        checks["workers"] = f"none alive in the last {WORKER_ALIVE_S:g} s"
    return _json(200 if ready else 503, {"status": "ready" if ready else "not_ready", **checks})


def _some(found: list[str], why: str) -> list[str]:
    if not found:
        raise LookupError(why)
    return found


def create_app(
    settings: Settings,
    *,
    server: FakeServer | None = None,
    clock: Clock = utc_now,
    run_worker: bool | None = None,
) -> web.Application:
    """The API. In embedded mode (and unless ``run_worker`` is False) the worker runs in-process."""
    app = web.Application(
        middlewares=[
            serving.track,  # (outermost: a stop waits for what it counts)
            request_id_middleware,
            unread_body_middleware,
            metrics_middleware,
            error_middleware,
        ],
        client_max_size=settings.max_body_bytes,
    )
    app[serving.IN_FLIGHT] = serving.InFlight()
    app[KEYS] = KeyRing(
        settings.effective_api_keys(),
        RateLimiter(settings.rate_limit_per_s, settings.rate_limit_burst),
        loopback_only=settings.embedded and not settings.api_keys,
    )
    in_process = settings.embedded if run_worker is None else run_worker

    async def resources_ctx(app: web.Application) -> AsyncIterator[None]:
        async with open_resources(settings, server=server, clock=clock) as res:
            app[RESOURCES] = res
            if not in_process:
                yield
                return
            worker = build_worker(settings, resources=res, handle_signals=False)
            task = asyncio.create_task(worker.main())
            try:
                yield
            finally:
                await worker.close()
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    app.cleanup_ctx.append(resources_ctx)
    app.router.add_post("/v1/transitions", transitions)
    app.router.add_get(
        "/v1/merchants/{merchant_id}/shipments/{shipment_id}/notifications",
        shipment_notifications,
    )
    app.router.add_post("/v1/merchants/{merchant_id}/opt-outs", opt_outs)
    app.router.add_post("/v1/webhooks/twilio/status", twilio_status_hook)
    app.router.add_post("/v1/webhooks/twilio/inbound", twilio_inbound_hook)
    app.router.add_post("/v1/webhooks/sendgrid/events", sendgrid_events_hook)
    app.router.add_get(unsubscribe.PATH, unsubscribe_hook)  # (HEAD too: shows, never records)
    app.router.add_route("POST", unsubscribe.PATH, unsubscribe_hook)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/openapi.json", openapi.handler)
    app.router.add_get("/metrics", metrics_page)
    editor = admin.Admin(lambda: app[RESOURCES], app[KEYS])
    admin.add_routes(app, editor)
    outbound_api.add_routes(app, editor)
    insights_api.add_routes(app, editor)
    carriers_api.add_routes(app, editor)
    experiments_api.add_routes(app, editor)
    digest_api.add_routes(app, editor)
    views = admin_views.add_routes(app, editor)
    merchant_web.add_routes(app, editor, views, app[KEYS])
    return app
