"""The merchant admin API over a merchant's override files (the editor's): draft, publish,
versions, rollback, audit. Every route is scoped: a key acts only for its merchants.

    GET    /v1/merchants/{merchant_id}/overrides                 published files and the draft
    PUT    /v1/merchants/{merchant_id}/overrides/draft/{path}    {"text": "..."} (null: delete)
    DELETE /v1/merchants/{merchant_id}/overrides/draft/{path}    drop a file's draft change
    POST   /v1/merchants/{merchant_id}/overrides/publish         {"revision": n}
    GET    /v1/merchants/{merchant_id}/overrides/versions        with author, time, diff
    POST   /v1/merchants/{merchant_id}/preview                   a message, rendered for real
    POST   /v1/merchants/{merchant_id}/test-send                 … and sent to a given address
    POST   /v1/merchants/{merchant_id}/overrides/rollback        {"version": n}
    GET    /v1/merchants/{merchant_id}/audit                     who changed what, when
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any, Literal

import orjson
from aiohttp import web
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from notifier.addresses import canonical_phone, email_problem, phone_problem
from notifier.channels.base import Outgoing, Receipt
from notifier.check import (
    candidate_renderer,
    override_problems,
    sample_notification,
    samples,
)
from notifier.errors import ApiError, Forbidden, NotFound, NotifierError, ValidationFailed
from notifier.ingest import KeyRing, may_act_for, read_json
from notifier.models import (
    ChannelKind,
    LocaleTag,
    MerchantId,
    Notification,
    Phone,
    Status,
    TimeZone,
)
from notifier.overrides import LiveMoved, OverrideError, OverrideStore
from notifier.policy import opt_out_key
from notifier.render import Message, SmsMessageOut
from notifier.render.brand import Brand
from notifier.resources import Resources
from notifier.settings import Settings

_MERCHANT: TypeAdapter[str] = TypeAdapter(MerchantId)


class InvalidOverride(ValidationFailed):
    code = "invalid_override"


class DraftChanged(ApiError):
    status, code = 409, "draft_changed"


class LiveChanged(ApiError):
    status, code = 409, "live_changed"


class SaveFile(BaseModel):
    """PUT …/overrides/draft/{path}: a file's new text."""

    model_config = ConfigDict(extra="forbid")
    text: str | None = Field(description="the file's new text; null deletes it from the override")


class Publish(BaseModel):
    """POST …/overrides/publish: publish the draft checked at ``revision``."""

    model_config = ConfigDict(extra="forbid")
    revision: int = Field(ge=0, strict=True, description="the draft revision that was checked")


class PreviewRequest(BaseModel):
    """POST …/preview: which message to render, how, and from which files."""

    model_config = ConfigDict(extra="forbid")
    milestone: str = Field(
        description="a status, or exception:<code>",
        json_schema_extra=lambda schema: schema.update(enum=[t.milestone for t in samples()]),
    )
    channel: ChannelKind = ChannelKind.EMAIL
    locale: LocaleTag = "en"
    timezone: TimeZone = "Europe/Paris"
    phone: Phone = "+33612345678"
    #: what to render: the published files, or the draft over them (the default)
    source: Literal["published", "draft"] = "draft"
    #: files over the source, unsaved (what the editor has on screen)
    files: dict[str, str] = Field(default_factory=dict)
    collected: bool = Field(
        default=False,
        description="delivered only: the form for a parcel the customer collected from a "
        "pickup point (templates see event.collected)",
    )

    @field_validator("collected")
    @classmethod
    def _collected_is_delivered(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("milestone", Status.DELIVERED) != Status.DELIVERED:
            raise ValueError("is for the delivered milestone only")
        return value


class TestSend(PreviewRequest):
    """POST …/test-send: a preview, sent to ``to`` through the merchant's channel."""

    to: str = Field(min_length=3, max_length=254, description="an email address or phone")


class Rollback(BaseModel):
    """POST …/overrides/rollback: publish the files of ``version`` again."""

    model_config = ConfigDict(extra="forbid")
    #: 0 restores "nothing from the editor" (the merchant's files over the defaults)
    version: int = Field(ge=0, strict=True)  # (not true, read as 1: a version number)
    #: the version the caller saw in force (0: none): refused with 409 ``live_changed``
    #: when another is live now (a colleague published or rolled back meanwhile)
    live: int | None = Field(default=None, ge=0, strict=True)


def json_reply(status: int, body: object) -> web.Response:
    """A JSON answer (the admin routes' and the other merchant routes')."""
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


class Admin:
    """Handlers of the admin routes, sharing the resources and the keys."""

    def __init__(self, resources: Callable[[], Resources], keys: KeyRing) -> None:
        self._resources = resources  # built at start-up (cleanup_ctx), after the routes
        self.keys = keys

    @property
    def res(self) -> Resources:
        return self._resources()

    @property
    def store(self) -> OverrideStore:
        return self.res.published.store

    def merchant(self, request: web.Request) -> tuple[str, str]:
        """(merchant id, the caller's key id); 401/403/404 as they apply."""
        merchant_id = request.match_info["merchant_id"]
        if not may_act_for(self.keys.authenticate(request), merchant_id):
            raise Forbidden("this API key may not act for that merchant")
        try:
            _MERCHANT.validate_python(merchant_id)
        except ValidationError as exc:
            raise NotFound(f"no merchant {merchant_id}") from exc
        return merchant_id, self.keys.key_id(request)

    async def _body(self, request: web.Request, model: type[BaseModel]) -> Any:
        try:
            return model.model_validate(await read_json(request, 256 * 1024))
        except ValidationError as exc:
            raise InvalidOverride.of("invalid request body", exc) from exc

    def now(self) -> str:
        return self.res.clock().isoformat()

    async def candidate(self, merchant_id: str) -> tuple[int, dict[str, str]]:
        """(draft revision, the files as publishing the draft now would make them)."""
        live = await self.store.live(merchant_id)
        revision, draft = await self.store.draft(merchant_id)
        files = dict(live.files) if live else {}
        for path, text in draft.items():
            if text is None:
                files.pop(path, None)
            else:
                files[path] = text
        return revision, files

    async def problems(self, merchant_id: str, files: dict[str, str]) -> list[str]:
        # rendering every milestone in every locale takes about a second: not on the loop
        return await asyncio.to_thread(override_problems, self.res.settings, merchant_id, files)

    async def overview(self, request: web.Request) -> web.Response:
        merchant_id, _ = self.merchant(request)
        live = await self.store.live(merchant_id)
        revision, draft = await self.store.draft(merchant_id)
        return json_reply(
            200,
            {
                "merchant_id": merchant_id,
                "version": live.number if live else 0,
                "files": live.files if live else {},
                "draft": {"revision": revision, "files": draft},
            },
        )

    async def save(self, request: web.Request) -> web.Response:
        merchant_id, key_id = self.merchant(request)
        body: SaveFile = await self._body(request, SaveFile)
        saved = await self.save_file(merchant_id, request.match_info["path"], body.text, key_id)
        return json_reply(200, saved)

    async def save_file(
        self, merchant_id: str, path: str, text: str | None, key_id: str
    ) -> dict[str, Any]:
        """Save one file of the draft (None deletes it) and check the whole draft:
        {"revision", "saved", "problems"}. Saved even when invalid (a draft may be work in
        progress); publishing refuses it. Deleting a file nothing published holds drops
        the draft's change instead (a deletion of nothing showed as a removal of the whole
        file beneath, and as a change in the version published)."""
        try:
            if text is None:
                revision = await self.store.delete(merchant_id, path, key_id, self.now())
            else:
                revision = await self.store.save(merchant_id, path, text, key_id, self.now())
        except OverrideError as exc:
            details = [{"field": exc.field, "message": str(exc)}]
            raise InvalidOverride(str(exc), details) from exc
        checked, files = await self.candidate(merchant_id)
        problems = await self.problems(merchant_id, files)
        return {"revision": checked, "saved": revision, "problems": problems}

    async def discard(self, request: web.Request) -> web.Response:
        merchant_id, key_id = self.merchant(request)
        path = request.match_info["path"]
        return json_reply(200, {"revision": await self.discard_file(merchant_id, path, key_id)})

    async def discard_file(self, merchant_id: str, path: str, key_id: str) -> int:
        """Drop one file's change from the draft; the new revision (422 for a bad path)."""
        try:
            return await self.store.discard(merchant_id, path, key_id, self.now())
        except OverrideError as exc:
            raise InvalidOverride(str(exc), [{"field": "path", "message": str(exc)}]) from exc

    async def publish(self, request: web.Request) -> web.Response:
        merchant_id, key_id = self.merchant(request)
        body: Publish = await self._body(request, Publish)
        version = await self.publish_revision(merchant_id, body.revision, key_id)
        return json_reply(200, {"version": version, "published": version > 0})

    async def publish_revision(self, merchant_id: str, revision: int, key_id: str) -> int:
        """Publish the draft if it is still at ``revision`` and has no problem: the new
        version's number (0 for an empty draft)."""
        current, files = await self.candidate(merchant_id)
        if current != revision:
            raise DraftChanged(
                f"the draft is at revision {current}, not {revision}: check it again"
            )
        problems = await self.problems(merchant_id, files)
        if problems:
            raise InvalidOverride(
                f"the draft has {len(problems)} problem(s); it stays a draft",
                [{"field": "draft", "message": p} for p in problems],
            )
        try:
            return await self.store.publish(merchant_id, revision, key_id, self.now())
        except OverrideError as exc:  # saved to between the check and the publish
            raise DraftChanged(str(exc)) from exc

    async def rendered(
        self,
        merchant_id: str,
        body: PreviewRequest,
        to: str | None,
        notification_id: str,
        variant: str = "a",
    ) -> tuple[Message, Brand]:
        """The message ``body`` asks for, rendered with the files it names (published,
        draft, posted) by the renderer real sends use (in ``variant`` b of an A/B test),
        and the brand it was rendered with."""
        sample = next((t for t in samples() if t.milestone == body.milestone), None)
        if sample is None:
            detail = "a status, or exception:<code> (exception:customs_hold)"
            raise InvalidOverride(
                f"no such milestone: {body.milestone}",
                [{"field": "milestone", "message": detail}],
            )
        if body.source == "draft":
            _, files = await self.candidate(merchant_id)
        else:
            live = await self.store.live(merchant_id)
            files = dict(live.files) if live else {}
        files.update(body.files)
        n = sample_notification(
            sample.model_copy(update={"merchant_id": merchant_id}),
            body.channel,
            merchant_id=merchant_id,
            shipment_id=TEST_SHIPMENT,
            notification_id=notification_id,
            locale=body.locale,
            timezone=body.timezone,
            phone=body.phone,
            to=to,
        )
        if variant == "b":
            n = n.model_copy(update={"experiment": "test", "variant": "b"})
        if body.collected:
            n = n.model_copy(update={"collected": True})
        try:
            return await asyncio.to_thread(_render, self.res.settings, merchant_id, files, n)
        except NotifierError as exc:
            raise InvalidOverride(str(exc), [{"field": "files", "message": str(exc)}]) from exc

    async def preview(self, request: web.Request) -> web.Response:
        """Render a message with the published files, the draft, or files posted in the
        body, for a sample transition in any locale: the renderer real sends use."""
        merchant_id, _ = self.merchant(request)
        body: PreviewRequest = await self._body(request, PreviewRequest)
        message, _ = await self.rendered(merchant_id, body, None, "n_preview")
        return json_reply(200, describe(message))

    async def test_send(self, request: web.Request) -> web.Response:
        """Send a rendered message to an address the merchant gives, through its real
        channel; recorded, marked as a test, in the history of shipment ``test-sends``."""
        merchant_id, key_id = self.merchant(request)
        body: TestSend = await self._body(request, TestSend)
        entry = await self.send_test(merchant_id, key_id, body)
        return json_reply(200 if entry["outcome"] == "sent" else 502, entry)

    async def send_test(
        self, merchant_id: str, key_id: str, body: TestSend, variant: str = "a"
    ) -> dict[str, Any]:
        """``test_send``'s work (the editor's too): its history entry, with the
        notification id; InvalidOverride for an address that cannot be sent to, or files
        that do not render."""
        if body.channel is ChannelKind.SMS:  # the spelling opt-outs are kept under
            body = body.model_copy(update={"to": canonical_phone(body.to)})
        problem = (email_problem if body.channel is ChannelKind.EMAIL else phone_problem)(body.to)
        if problem is None and await self.res.store.opted_out(
            merchant_id, [opt_out_key(body.channel, body.to)]
        ):
            problem = "the address opted out of this channel for this merchant"
        if problem is not None:
            raise InvalidOverride(
                f"cannot send a test to that address: {problem}",
                [{"field": "to", "message": problem}],
            )
        nid = f"test_{uuid.uuid4().hex[:16]}"
        message, brand = await self.rendered(merchant_id, body, body.to, nid, variant)
        chosen = brand.channels.email if body.channel is ChannelKind.EMAIL else brand.channels.sms
        channel = self.res.providers.get(chosen or "") or self.res.channels[body.channel]
        now = self.res.clock()
        [outcome] = await channel.send_many([Outgoing(message, now)])
        sent = isinstance(outcome, Receipt)
        entry = {
            "event_id": f"test:{nid}",
            "status": body.milestone,
            "channel": body.channel.value,
            "outcome": "sent" if sent else "failed",
            "reason": f"test send by {key_id} ({body.source} files)",
            "test": True,
            "decided_at": now.isoformat(),
            "occurred_at": now.isoformat(),
            "delivery": {"status": "sent", "detail": f"{outcome.channel}:{outcome.detail}"}
            if isinstance(outcome, Receipt)
            else {"status": "failed", "error": outcome.reason},
        }
        await self.res.store.record_test(merchant_id, TEST_SHIPMENT, entry)
        return {"notification_id": nid, **entry}

    async def versions(self, request: web.Request) -> web.Response:
        merchant_id, _ = self.merchant(request)
        versions = await self.version_list(merchant_id)
        return json_reply(200, {"merchant_id": merchant_id, "versions": versions})

    async def version_list(self, merchant_id: str) -> list[dict[str, Any]]:
        """Every published version, oldest first, each with its diff against the one before."""
        out, previous = [], None
        for v in await self.store.versions(merchant_id):
            out.append(
                {
                    "version": v.number,
                    "author": v.author,
                    "at": v.at,
                    "changed": v.changed,
                    "restored": v.restored,
                    "diff": v.diff(previous),
                }
            )
            previous = v
        return out

    async def rollback(self, request: web.Request) -> web.Response:
        merchant_id, key_id = self.merchant(request)
        body: Rollback = await self._body(request, Rollback)
        version = await self.rollback_to(merchant_id, body.version, key_id, body.live)
        return json_reply(200, {"version": version, "restored": body.version})

    async def rollback_to(
        self, merchant_id: str, version: int, key_id: str, live: int | None = None
    ) -> int:
        """Publish the files of ``version`` again, as a new version (its number), once they
        pass the checks against today's files beneath (422 naming each problem); with
        ``live``, only while that version is in force (409 ``live_changed``)."""
        if version == 0:
            files: dict[str, str] = {}
        else:
            old = await self.store.version(merchant_id, version)
            if old is None:
                raise NotFound(f"no version {version}")
            files = old.files
        problems = await self.problems(merchant_id, files)
        if problems:
            raise InvalidOverride(
                f"version {version} has {len(problems)} problem(s) with today's files; "
                "it was not restored",
                [{"field": "version", "message": p} for p in problems],
            )
        try:
            return await self.store.rollback(merchant_id, version, key_id, self.now(), live)
        except LiveMoved as exc:
            raise LiveChanged(str(exc)) from exc
        except OverrideError as exc:
            raise InvalidOverride(str(exc), [{"field": "version", "message": str(exc)}]) from exc

    async def audit(self, request: web.Request) -> web.Response:
        merchant_id, _ = self.merchant(request)
        return json_reply(
            200, {"merchant_id": merchant_id, "entries": await self.store.audit(merchant_id)}
        )


#: The history a merchant's test sends are recorded in (GET …/shipments/test-sends/…).
TEST_SHIPMENT = "test-sends"


def describe(message: Message) -> dict[str, Any]:
    if isinstance(message, SmsMessageOut):
        sms = {"body": message.body, "encoding": message.encoding, "segments": message.segments}
        return {"channel": "sms", **sms}
    return {
        "channel": "email",
        "subject": message.subject,
        "preheader": message.preheader,
        "html": message.html,
        "text": message.text,
        "from": message.from_addr,
    }


def _render(
    settings: Settings, merchant_id: str, files: dict[str, str], n: Notification
) -> tuple[Message, Brand]:
    renderer, _ = candidate_renderer(settings, merchant_id, files)
    return renderer.render(n), renderer.brand(merchant_id)


def add_routes(app: web.Application, admin: Admin) -> None:
    base = "/v1/merchants/{merchant_id}"
    # a file path's "/" may come as is or escaped (%2F, as OpenAPI clients send it)
    path = "{path:(?:[A-Za-z0-9_./-]|%2[Ff])+}"
    app.router.add_get(f"{base}/overrides", admin.overview)
    app.router.add_put(f"{base}/overrides/draft/{path}", admin.save)
    app.router.add_delete(f"{base}/overrides/draft/{path}", admin.discard)
    app.router.add_post(f"{base}/overrides/publish", admin.publish)
    app.router.add_get(f"{base}/overrides/versions", admin.versions)
    app.router.add_post(f"{base}/preview", admin.preview)
    app.router.add_post(f"{base}/test-send", admin.test_send)
    app.router.add_post(f"{base}/overrides/rollback", admin.rollback)
    app.router.add_get(f"{base}/audit", admin.audit)
