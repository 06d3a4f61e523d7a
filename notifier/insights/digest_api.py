"""The weekly digest's settings through the admin API:

GET    /v1/merchants/{merchant_id}/digest    who gets it (404: nobody)
PUT    /v1/merchants/{merchant_id}/digest    {"to": ["ops@acme.example"], "enabled": true}
DELETE /v1/merchants/{merchant_id}/digest    nobody any more
"""

from __future__ import annotations

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from notifier.addresses import email_problem
from notifier.admin import Admin, json_reply
from notifier.errors import NotFound, ValidationFailed
from notifier.ingest import read_json


class InvalidDigest(ValidationFailed):
    code = "invalid_digest"


class DigestSettings(BaseModel):
    """Who gets a merchant's weekly digest (Monday from 06:00 UTC, the week before)."""

    model_config = ConfigDict(extra="forbid")

    to: list[str] = Field(min_length=1, max_length=5, description="1 to 5 email addresses")
    enabled: bool = True

    @field_validator("to")
    @classmethod
    def _addresses(cls, value: list[str]) -> list[str]:
        for address in value:
            problem = email_problem(address)
            if problem:
                raise ValueError(problem)
        # one address once, however it is written (the mailbox is the same): the first
        kept: dict[str, str] = {}
        for address in value:
            kept.setdefault(address.lower(), address)
        return list(kept.values())


class DigestApi:
    def __init__(self, admin: Admin) -> None:
        self.admin = admin

    async def get(self, request: web.Request) -> web.Response:
        merchant_id, _ = self.admin.merchant(request)
        found = await self.admin.res.store.digest_settings_of(merchant_id)
        if found is None:
            raise NotFound(f"merchant {merchant_id} has no weekly digest")
        return json_reply(200, found)

    async def put(self, request: web.Request) -> web.Response:
        merchant_id, _ = self.admin.merchant(request)
        try:
            body = DigestSettings.model_validate(await read_json(request, 16 * 1024))
        except ValidationError as exc:
            raise InvalidDigest.of("invalid digest settings", exc) from exc
        value = body.model_dump()
        await self.admin.res.store.put_digest_settings(merchant_id, value)
        return json_reply(200, value)

    async def delete(self, request: web.Request) -> web.Response:
        merchant_id, _ = self.admin.merchant(request)
        if not await self.admin.res.store.drop_digest_settings(merchant_id):
            raise NotFound(f"merchant {merchant_id} has no weekly digest")
        return web.Response(status=204)


def add_routes(app: web.Application, admin: Admin) -> DigestApi:
    api = DigestApi(admin)
    path = "/v1/merchants/{merchant_id}/digest"
    app.router.add_get(path, api.get)
    app.router.add_put(path, api.put)
    app.router.add_delete(path, api.delete)
    return api
