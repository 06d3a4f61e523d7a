"""Typed views of a merchant's override files in the admin API: message templates by
(milestone, locale), the brand as fields, the cadence policy as the policy files' schema.
Each writes the same draft as the file routes (admin.py), checked the same way.

    GET    /v1/merchants/{merchant_id}/templates                      every message, each source
    GET    /v1/merchants/{merchant_id}/templates/{milestone}[?locale=de]  its text and source
    PUT    /v1/merchants/{merchant_id}/templates/{milestone}[?locale=de]  {"text"} into the draft
    DELETE /v1/merchants/{merchant_id}/templates/{milestone}[?locale=de]  back to the files beneath
    GET    /v1/merchants/{merchant_id}/brand                           effective brand + override
    PUT    /v1/merchants/{merchant_id}/brand                           the override's fields
    GET    /v1/merchants/{merchant_id}/policy                          effective policy + override
    PUT    /v1/merchants/{merchant_id}/policy                          the override (policy schema)

A message template holds a milestone's wording for both channels (the email's subject,
preheader, headline and paragraphs; the SMS), so that they never disagree; the channel
layouts are the files ``email/layout.html``, ``email/layout.txt`` and ``sms/layout.txt``.
"""

from __future__ import annotations

from typing import Any

import orjson
import yaml
from aiohttp import web

from notifier.admin import Admin, InvalidOverride, json_reply
from notifier.check import samples
from notifier.errors import ConfigurationError, NotFound
from notifier.ingest import read_json
from notifier.models import message_name_of, message_paths
from notifier.policy import PolicyStore
from notifier.policy.rules import VARIANTS, override_label
from notifier.render.brand import load_brand
from notifier.resources import Resources, data_dir


def _fields(data: Any) -> dict[str, Any]:
    """A YAML file's mapping as JSON carries it: keys as text, and what JSON has no type for
    (a set, binary, a date) as text. A file that is not a mapping has no fields (the check
    says why)."""
    if not isinstance(data, dict):
        return {}
    try:
        text = orjson.dumps(data, default=str, option=orjson.OPT_NON_STR_KEYS)
    except TypeError:  # a key JSON cannot name (a YAML sequence as a key)
        return {}
    fields: dict[str, Any] = orjson.loads(text)
    return fields


def message_path(milestone: str, locale: str | None = None, variant: str = "") -> str:
    """The override file of a milestone's message (for one locale, or all; its variant b of
    an A/B test with ``variant="b"``)."""
    one, every = message_paths(message_name_of(milestone), locale or "", variant)
    return one if locale else every


def variant_param(value: str | None) -> str:
    """The variant a query or form names (``a`` when none); 404 for anything else."""
    variant = value or "a"
    if variant not in VARIANTS:
        raise NotFound(f"no variant {variant} (a, or b of an A/B test)")
    return variant


def milestones() -> list[str]:
    return [t.milestone for t in samples()]


def locales(res: Resources) -> list[str]:
    """Every locale a message can be written and previewed in (the renderer's catalogs,
    listed once per process)."""
    return ["en", *res.renderer.catalogs.available()]


class Views:
    """Handlers of the typed admin routes."""

    def __init__(self, admin: Admin) -> None:
        self.admin = admin

    def locales(self) -> list[str]:
        return locales(self.admin.res)

    async def current_text(self, merchant_id: str, path: str) -> tuple[str, str]:
        """(text, source) of a merchant's file as the draft would publish it: "draft",
        "published", "files" (its folder), "default"; for a locale without a file of its
        own, the all-locales text with "<source>, all languages"."""
        _, draft = await self.admin.store.draft(merchant_id)
        live = await self.admin.store.live(merchant_id)
        found = self._lookup(merchant_id, path, draft, live.files if live else {})
        if found is None:
            raise NotFound(f"no template {path}")
        return found

    def _lookup(
        self,
        merchant_id: str,
        path: str,
        draft: dict[str, str | None],
        published: dict[str, str],
    ) -> tuple[str, str] | None:
        """The file itself; else, for one locale, its all-languages text; else, for a
        variant b, variant a's the same way (a new variant b starts as a copy of a)."""
        name, *rest = path.removeprefix("messages/").removesuffix(".jinja").split(".")
        variant = "b" if rest[:1] == ["b"] else ""
        locale = next((part for part in rest if part != "b"), "")
        fallbacks = []
        for arm, note in ((variant, ""), ("", ", variant a")) if variant else (("", ""),):
            one, every = message_paths(name, locale, arm)
            if locale:
                fallbacks.append((one, note))
            fallbacks.append((every, note + (", all languages" if locale else "")))
        for other, note in fallbacks:
            found = self._file(merchant_id, other, draft, published)
            if found is not None:
                return found[0], found[1] + note
        return None

    def _file(
        self,
        merchant_id: str,
        path: str,
        draft: dict[str, str | None],
        published: dict[str, str],
    ) -> tuple[str, str] | None:
        if path in draft and draft[path] is not None:
            return draft[path] or "", "draft"
        if path in published and path not in draft:
            return published[path], "published"
        templates = data_dir("templates", self.admin.res.settings.templates_dir)
        for folder, source in ((templates / merchant_id, "files"), (templates, "default")):
            if (folder / path).is_file():
                # a file saved in another encoding opens (its render names it, and an edit
                # saved here is UTF-8): its stray bytes show as U+FFFD
                return (folder / path).read_text(encoding="utf-8", errors="replace"), source
        return None

    def _address(self, request: web.Request) -> tuple[str, str | None, str, str]:
        """(milestone, locale, file, variant) a template route names."""
        milestone = request.match_info["milestone"]
        locale = request.query.get("locale") or None
        if milestone not in milestones():
            raise NotFound(f"no milestone {milestone} (a status, or exception:<code>)")
        if locale is not None and locale not in self.locales():
            raise NotFound(f"no catalog for locale {locale} (one of {', '.join(self.locales())})")
        variant = variant_param(request.query.get("variant"))
        return milestone, locale, message_path(milestone, locale, variant), variant

    async def list_templates(self, request: web.Request) -> web.Response:
        """Every message's template for all locales, and those written for one locale; and
        the variants b (A/B tests) the merchant wrote."""
        merchant_id, _ = self.admin.merchant(request)
        _, draft = await self.admin.store.draft(merchant_id)
        live = await self.admin.store.live(merchant_id)
        published = live.files if live else {}
        out = []
        for milestone in milestones():
            for variant in VARIANTS:
                for locale in (None, *self.locales()):
                    path = message_path(milestone, locale, variant)
                    found = self._lookup(merchant_id, path, draft, published)
                    if found is None or found[1].endswith(("all languages", "variant a")):
                        continue  # no file of its own for this locale or variant
                    entry = {"milestone": milestone, "locale": locale, "variant": variant}
                    out.append({**entry, "path": path, "source": found[1]})
        return json_reply(200, {"merchant_id": merchant_id, "templates": out})

    async def get_template(self, request: web.Request) -> web.Response:
        merchant_id, _ = self.admin.merchant(request)
        milestone, locale, path, variant = self._address(request)
        text, source = await self.current_text(merchant_id, path)
        body = {"milestone": milestone, "locale": locale, "variant": variant, "path": path}
        body["source"] = source
        return json_reply(200, {**body, "text": text})

    async def put_template(self, request: web.Request) -> web.Response:
        merchant_id, key_id = self.admin.merchant(request)
        path = self._address(request)[2]
        body = await read_json(request, 256 * 1024)
        if not isinstance(body, dict) or not isinstance(body.get("text"), str) or len(body) != 1:
            raise InvalidOverride(
                'expected {"text": "..."}', [{"field": "text", "message": "required string"}]
            )
        return json_reply(200, await self.admin.save_file(merchant_id, path, body["text"], key_id))

    async def delete_template(self, request: web.Request) -> web.Response:
        merchant_id, key_id = self.admin.merchant(request)
        path = self._address(request)[2]
        return json_reply(200, await self.admin.save_file(merchant_id, path, None, key_id))

    # -- brand and policy ---------------------------------------------------------------
    async def _override(
        self, merchant_id: str, path: str
    ) -> tuple[dict[str, str], dict[str, Any], bool]:
        """(candidate files, the override file's fields as the draft would publish it, and
        whether the draft changes that file: a problem then names the draft's)."""
        _, files = await self.admin.candidate(merchant_id)
        _, draft = await self.admin.store.draft(merchant_id)
        text = files.get(path)
        try:
            data = yaml.safe_load(text) if text else None
        except yaml.YAMLError:
            data = None  # reported by the check; GET still answers
        return files, _fields(data), path in draft

    async def get_brand(self, request: web.Request) -> web.Response:
        merchant_id, _ = self.admin.merchant(request)
        files, override, drafted = await self._override(merchant_id, "brand.yaml")
        templates = data_dir("templates", self.admin.res.settings.templates_dir)
        label = override_label("brand.yaml", merchant_id, drafted)
        try:
            brand = load_brand(templates, merchant_id, files.get("brand.yaml"), label)
            effective, problem = brand.model_dump(mode="json"), None
        except ConfigurationError as exc:
            effective, problem = None, str(exc)
        body = {"merchant_id": merchant_id, "brand": effective, "override": override}
        return json_reply(200, {**body, "problem": problem})

    async def get_policy(self, request: web.Request) -> web.Response:
        merchant_id, _ = self.admin.merchant(request)
        files, override, drafted = await self._override(merchant_id, "policy.yaml")
        directory = data_dir("policies", self.admin.res.settings.policies_dir)
        try:
            store = PolicyStore(directory, lambda _: files, draft=drafted)
            effective, problem = store.strict(merchant_id).model_dump(mode="json"), None
        except ConfigurationError as exc:
            effective, problem = None, str(exc)
        body = {"merchant_id": merchant_id, "policy": effective, "override": override}
        return json_reply(200, {**body, "problem": problem})

    async def _put_mapping(self, request: web.Request, path: str, what: str) -> web.Response:
        merchant_id, key_id = self.admin.merchant(request)
        body = await read_json(request, 64 * 1024)
        if not isinstance(body, dict):
            raise InvalidOverride(
                f"expected a JSON object of {what} fields",
                [{"field": "(body)", "message": "must be an object"}],
            )
        header = f"# {path} written through the admin API: merged over the files beneath\n"
        text = header + (yaml.safe_dump(body, sort_keys=False, allow_unicode=True) if body else "")
        return json_reply(200, await self.admin.save_file(merchant_id, path, text, key_id))

    async def put_brand(self, request: web.Request) -> web.Response:
        """Replace the brand override (fields merged over the merchant's files and the
        defaults, as brand.yaml); saved to the draft with the draft's problems."""
        return await self._put_mapping(request, "brand.yaml", "brand")

    async def put_policy(self, request: web.Request) -> web.Response:
        """Replace the policy override (the policy files' schema, merged over the merchant's
        file and the default policy); saved to the draft with the draft's problems."""
        return await self._put_mapping(request, "policy.yaml", "policy")


def add_routes(app: web.Application, admin: Admin) -> Views:
    views = Views(admin)
    base = "/v1/merchants/{merchant_id}"
    template = f"{base}/templates/{{milestone:[a-z_]+(:[a-z_]+)?}}"
    app.router.add_get(f"{base}/templates", views.list_templates)
    app.router.add_get(template, views.get_template)
    app.router.add_put(template, views.put_template)
    app.router.add_delete(template, views.delete_template)
    app.router.add_get(f"{base}/brand", views.get_brand)
    app.router.add_put(f"{base}/brand", views.put_brand)
    app.router.add_get(f"{base}/policy", views.get_policy)
    app.router.add_put(f"{base}/policy", views.put_policy)
    return views
