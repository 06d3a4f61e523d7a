"""The admin API of a merchant's webhook endpoints. Every route is scoped: a key acts only
for its merchants. Under ``/v1/merchants/{merchant_id}/webhook-endpoints``:

    GET    /                      the endpoints (no secrets)
    POST   /                      a new one; its secret is shown once
    GET    /{id}                  one
    PATCH  /{id}                  url, events, description, enabled
    DELETE /{id}                  it and its delivery log
    POST   /{id}/rotate-secret    a new secret; the old one keeps signing for overlap_s
    POST   /{id}/test             queue a test event for it
    GET    /{id}/deliveries       its latest delivery attempts, newest first
"""

from __future__ import annotations

import secrets
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from notifier.admin import Admin, json_reply
from notifier.errors import ApiError, NotFound, ValidationFailed
from notifier.ingest import read_json
from notifier.outbound import events as ev
from notifier.outbound.sender import url_problem

#: endpoints a merchant may have
MAX_ENDPOINTS = 16
#: the most seconds a replaced secret may keep signing (Stripe allows a day)
MAX_OVERLAP_S = 7 * 86_400


class InvalidEndpoint(ValidationFailed):
    code = "invalid_webhook_endpoint"


class TooManyEndpoints(ApiError):
    status, code = 409, "too_many_webhook_endpoints"


class EndpointChanged(ApiError):
    status, code = 409, "endpoint_changed"


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @field_validator("events", check_fields=False)
    @classmethod
    def _known(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        found = ev.check_patterns(value)  # UnknownEventType (a ValueError): a 422 naming it
        if not found:
            raise ValueError("subscribe to at least one event type")
        return found


class NewEndpoint(_Body):
    """POST …/webhook-endpoints."""

    url: str = Field(description="where events are posted (https)")
    events: list[str] = Field(
        description="event types, 'exception.*', 'delivery.*', 'recipient.*' or '*'"
    )
    description: str = Field(default="", max_length=200)
    enabled: bool = True


class EndpointChange(_Body):
    """PATCH …/webhook-endpoints/{id}: the fields to change."""

    url: str | None = None
    events: list[str] | None = None
    description: str | None = Field(default=None, max_length=200)
    enabled: bool | None = None


class Rotation(_Body):
    """POST …/rotate-secret: how long the old secret keeps signing too."""

    overlap_s: int = Field(default=86_400, ge=0, le=MAX_OVERLAP_S)


class _Reply(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EndpointReply(_Reply):
    """A webhook endpoint as the API shows it."""

    id: str
    url: str
    events: list[str]
    description: str
    enabled: bool
    created_at: str
    secret_hint: str = Field(description="the secret's last four characters")
    secret: str | None = Field(
        default=None, description="the signing secret: only in the answer that made it"
    )
    previous_until: float | None = Field(
        default=None, description="unix time until which the replaced secret signs too"
    )


class EndpointList(_Reply):
    merchant_id: str
    endpoints: list[EndpointReply]


class EventReply(_Reply):
    """An event as receivers get it."""

    id: str
    type: str
    created_at: str
    merchant_id: str
    data: dict[str, Any]


class TestQueued(_Reply):
    queued: EventReply


class AttemptReply(_Reply):
    """One delivery attempt of an event to an endpoint."""

    event_id: str
    type: str
    attempt: int
    at: str
    outcome: Literal["delivered", "failed", "gave_up"]
    status_code: int | None
    error: str | None
    duration_ms: int


class Deliveries(_Reply):
    endpoint_id: str
    attempts: list[AttemptReply]


def public(endpoint: dict[str, Any], *, secret: bool = False) -> dict[str, Any]:
    """An endpoint as the API shows it: its secret only when it was just made."""
    shown = {k: v for k, v in endpoint.items() if k not in ("secret", "previous_secret")}
    shown["secret_hint"] = "…" + str(endpoint["secret"])[-4:]
    if secret:
        shown["secret"] = endpoint["secret"]
    return shown


def _new_secret() -> str:
    return "whsec_" + secrets.token_urlsafe(32)


class HookAdmin:
    """Handlers of the webhook-endpoint routes (over the editor's ``Admin`` for keys and
    resources)."""

    def __init__(self, admin: Admin) -> None:
        self.admin = admin

    @property
    def allow_private(self) -> bool:
        return self.admin.res.settings.merchant_hooks_allow_private

    async def _body(self, request: web.Request, model: type[_Body]) -> Any:
        try:
            return model.model_validate(await read_json(request, 64 * 1024))
        except ValidationError as exc:
            raise InvalidEndpoint.of("invalid webhook endpoint", exc) from exc

    def _check_url(self, url: str) -> None:
        problem = url_problem(url, self.allow_private)
        if problem:
            raise InvalidEndpoint(
                "invalid webhook endpoint", [{"field": "url", "message": problem}]
            )

    async def _endpoint(self, request: web.Request) -> tuple[str, dict[str, Any]]:
        merchant_id, _ = self.admin.merchant(request)
        endpoint_id = request.match_info["endpoint_id"]
        found = (await self.admin.res.store.hook_endpoints(merchant_id)).get(endpoint_id)
        if found is None:
            raise NotFound(f"merchant {merchant_id} has no webhook endpoint {endpoint_id}")
        return merchant_id, found

    async def _change(
        self, merchant_id: str, before: dict[str, Any], endpoint: dict[str, Any]
    ) -> None:
        """Write a changed endpoint over the one read (``before``): 404 when it was deleted
        meanwhile (never brought back), 409 when another change came first (neither is lost:
        read it again)."""
        written = await self.admin.res.store.change_hook_endpoint(merchant_id, before, endpoint)
        if written == 0:
            raise NotFound(f"merchant {merchant_id} has no webhook endpoint {endpoint['id']}")
        if written < 0:
            raise EndpointChanged(
                f"webhook endpoint {endpoint['id']} was changed meanwhile: read it and try again"
            )

    async def list(self, request: web.Request) -> web.Response:
        merchant_id, _ = self.admin.merchant(request)
        found = await self.admin.res.store.hook_endpoints(merchant_id)
        listed = sorted(found.values(), key=lambda e: (e["created_at"], e["id"]))
        return json_reply(
            200, {"merchant_id": merchant_id, "endpoints": [public(e) for e in listed]}
        )

    async def create(self, request: web.Request) -> web.Response:
        merchant_id, _ = self.admin.merchant(request)
        body: NewEndpoint = await self._body(request, NewEndpoint)
        self._check_url(body.url)
        endpoint = {
            "id": "we_" + secrets.token_hex(8),
            "url": body.url,
            "events": body.events,
            "description": body.description,
            "enabled": body.enabled,
            "created_at": self.admin.now(),
            "secret": _new_secret(),
        }
        if not await self.admin.res.store.add_hook_endpoint(merchant_id, endpoint, MAX_ENDPOINTS):
            raise TooManyEndpoints(f"a merchant has at most {MAX_ENDPOINTS} webhook endpoints")
        return json_reply(201, public(endpoint, secret=True))

    async def show(self, request: web.Request) -> web.Response:
        _, endpoint = await self._endpoint(request)
        return json_reply(200, public(endpoint))

    async def change(self, request: web.Request) -> web.Response:
        merchant_id, endpoint = await self._endpoint(request)
        body: EndpointChange = await self._body(request, EndpointChange)
        changes = body.model_dump(exclude_none=True)
        if "url" in changes:
            self._check_url(changes["url"])
        changed = {**endpoint, **changes}
        await self._change(merchant_id, endpoint, changed)
        return json_reply(200, public(changed))

    async def delete(self, request: web.Request) -> web.Response:
        merchant_id, endpoint = await self._endpoint(request)
        await self.admin.res.store.delete_hook_endpoint(merchant_id, endpoint["id"])
        return web.Response(status=204)

    async def rotate(self, request: web.Request) -> web.Response:
        merchant_id, endpoint = await self._endpoint(request)
        body: Rotation = await self._body(request, Rotation)
        now = self.admin.res.clock().timestamp()
        rotated = {
            **endpoint,
            "secret": _new_secret(),
            "previous_secret": endpoint["secret"],
            "previous_until": now + body.overlap_s,
        }
        await self._change(merchant_id, endpoint, rotated)
        return json_reply(200, public(rotated, secret=True))

    async def test(self, request: web.Request) -> web.Response:
        """Queue a ``test`` event for this endpoint only (sent by the next worker tick)."""
        merchant_id, endpoint = await self._endpoint(request)
        res = self.admin.res
        now = res.clock()
        eid = ev.event_id(merchant_id, ev.EventType.TEST, endpoint["id"], now.isoformat())
        event = ev.envelope(
            eid, ev.EventType.TEST, merchant_id, now, {"endpoint_id": endpoint["id"]}
        )
        scope = res.store.scope_of(merchant_id, "")
        await res.store.queue_hook_events(
            scope, [(eid, ev.stored(event, endpoint["id"]))], int(now.timestamp() * 1000)
        )
        return json_reply(202, {"queued": event})

    async def deliveries(self, request: web.Request) -> web.Response:
        merchant_id, endpoint = await self._endpoint(request)
        text = request.query.get("limit", "50")
        if not text.isdigit() or not 1 <= int(text) <= 200:
            raise InvalidEndpoint(
                "invalid query", [{"field": "limit", "message": "a whole number from 1 to 200"}]
            )
        found = await self.admin.res.store.hook_attempts(merchant_id, endpoint["id"], int(text))
        return json_reply(200, {"endpoint_id": endpoint["id"], "attempts": found})


def add_routes(app: web.Application, admin: Admin) -> HookAdmin:
    hooks = HookAdmin(admin)
    base = "/v1/merchants/{merchant_id}/webhook-endpoints"
    one = base + "/{endpoint_id}"
    app.router.add_get(base, hooks.list)
    app.router.add_post(base, hooks.create)
    app.router.add_get(one, hooks.show)
    app.router.add_patch(one, hooks.change)
    app.router.add_delete(one, hooks.delete)
    app.router.add_post(one + "/rotate-secret", hooks.rotate)
    app.router.add_post(one + "/test", hooks.test)
    app.router.add_get(one + "/deliveries", hooks.deliveries)
    return hooks
