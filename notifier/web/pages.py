"""Editor pages around the draft: sign in and out, the overview, review and publish,
versions with diffs and rollback, and the shipment timeline."""

from __future__ import annotations

import difflib
import re
from typing import Any
from urllib.parse import quote

from aiohttp import web

from notifier.admin import InvalidOverride
from notifier.errors import ApiError, NotFound
from notifier.render import i18n
from notifier.resources import data_dir
from notifier.timeline import find_shipments, shipment_history
from notifier.web.base import Web, read_form, safe_next
from notifier.web.forms import milestone_label
from notifier.web.messages import fingerprint
from notifier.web.session import (
    SIGN_IN_COOKIE,
    CsrfFailed,
    Session,
    set_sign_in_cookie,
    sign_in_token,
)


def diff(old: str | None, new: str | None, path: str) -> str:
    """A unified diff of one file ("" when equal)."""
    lines = difflib.unified_diff(
        (old or "").splitlines(keepends=True),
        (new or "").splitlines(keepends=True),
        fromfile=f"{path} (before)" if old is not None else "(none)",
        tofile=f"{path} (after)" if new is not None else "(deleted)",
    )
    return "".join(lines)


class Pages:
    """Handlers of the sign-in, overview, publish, versions and timeline pages."""

    def __init__(self, web_: Web) -> None:
        self.web = web_

    # -- signing in ---------------------------------------------------------------------
    async def index(self, request: web.Request) -> web.StreamResponse:
        session = await self.web.sessions.find(request)
        if session is None:
            raise web.HTTPSeeOther("/merchant/sign-in")
        if session.home is None:
            return await self._pick(request, session)
        raise web.HTTPSeeOther(f"/merchant/{quote(session.home)}/")

    async def _pick(self, request: web.Request, session: Session) -> web.Response:
        merchants = session.merchants
        return self.web.page(
            "pick.html",
            request=request,
            title="Choose a merchant",
            merchants=sorted(m for m in merchants if m != "*"),
            any_merchant="*" in merchants,
            csrf=session.csrf,
        )

    async def go(self, request: web.Request) -> web.StreamResponse:
        """The merchant picker's form: to that merchant's overview (403 there if not yours)."""
        merchant = request.query.get("merchant", "").strip()
        if not merchant:  # typed without one: the picker
            raise web.HTTPSeeOther("/merchant")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", merchant):
            raise NotFound(f"no merchant {merchant}")
        raise web.HTTPSeeOther(f"/merchant/{merchant}/")

    async def sign_in_form(
        self, request: web.Request, error: str | None = None, target: str | None = None
    ) -> web.Response:
        token = sign_in_token(request)
        response = self.web.page(
            "sign_in.html",
            status=401 if error else 200,
            request=request,
            title="Sign in",
            error=error,
            next=safe_next(target or request.query.get("next")) or "",
            sign_in_csrf=token,
        )
        set_sign_in_cookie(request, response, token)
        return response

    async def sign_in(self, request: web.Request) -> web.StreamResponse:
        form = await read_form(request)
        expected = request.cookies.get(SIGN_IN_COOKIE, "")
        if not expected:
            raise CsrfFailed("the sign-in form expired: reload it")
        self.web.sessions.check_csrf(request, expected, form.get("csrf"))
        key = form.get("key", "").strip()
        target = safe_next(form.get("next")) or "/merchant"
        response = web.HTTPSeeOther(target)
        if not key or not await self.web.sessions.open(key, response, request):
            refused = "That key is not a merchant API key here."
            return await self.sign_in_form(request, refused, form.get("next"))
        response.del_cookie(SIGN_IN_COOKIE, path="/merchant")
        raise response

    async def sign_out_form(self, request: web.Request) -> web.StreamResponse:
        """A typed or bookmarked /merchant/sign-out: a button, since a GET must not sign out
        (another site could make the browser follow a link); signed out, the sign-in page."""
        session = await self.web.sessions.find(request)
        if session is None:
            raise web.HTTPSeeOther("/merchant/sign-in")
        return self.web.page("sign_out.html", request=request, title="Sign out", csrf=session.csrf)

    async def sign_out(self, request: web.Request) -> web.StreamResponse:
        session = await self.web.sessions.find(request)
        response = web.HTTPSeeOther("/merchant/sign-in")
        if session is None:
            raise response  # nothing to end (and nothing another site may touch)
        await self.web.form(request, session)
        await self.web.sessions.close(request, response)
        raise response

    # -- overview -------------------------------------------------------------------------
    async def home(self, request: web.Request) -> web.Response:
        merchant_id, session = await self.web.signed_in(request)
        store = self.web.admin.store
        live = await store.live(merchant_id)
        revision, draft = await store.draft(merchant_id)
        return self.web.page(
            "home.html",
            request=request,
            title="Overview",
            live=live,
            revision=revision,
            draft=draft,
            audit=(await store.audit(merchant_id, 10)),
            csrf=session.csrf,
        )

    # -- review and publish -----------------------------------------------------------------
    async def _beneath(self, merchant_id: str, path: str) -> str | None:
        """A file as the merchant's folder or the defaults have it (None: nowhere)."""
        templates = data_dir("templates", self.web.res.settings.templates_dir)
        if path == "policy.yaml":
            policies = data_dir("policies", self.web.res.settings.policies_dir)
            own = policies / f"{merchant_id}.yaml"
            return own.read_text(encoding="utf-8") if own.is_file() else None
        for folder in (templates / merchant_id, templates):
            if (folder / path).is_file():
                return (folder / path).read_text(encoding="utf-8", errors="replace")
        return None

    async def review(self, request: web.Request) -> web.Response:
        merchant_id, session = await self.web.signed_in(request)
        admin = self.web.admin
        live = await admin.store.live(merchant_id)
        revision, draft = await admin.store.draft(merchant_id)
        published = live.files if live else {}
        changes = []
        for path, text in sorted(draft.items()):
            if path in published:
                before: str | None = published[path]
            elif path in ("brand.yaml", "policy.yaml"):
                before = None  # an override merged over the files, not a replacement of them
            else:
                before = await self._beneath(merchant_id, path)
            changes.append(
                {
                    "path": path,
                    "deleted": text is None,
                    "diff": diff(before, text, path),
                    "base": _change_of(text),
                }
            )
        _, files = await admin.candidate(merchant_id)
        problems = await admin.problems(merchant_id, files) if draft else []
        return self.web.page(
            "publish.html",
            request=request,
            title="Review & publish",
            revision=revision,
            changes=changes,
            problems=problems,
            live=live,
            csrf=session.csrf,
            result=await self.web.sessions.take_flash(request),
        )

    async def publish(self, request: web.Request) -> web.StreamResponse:
        merchant_id, session = await self.web.signed_in(request)
        form = await self.web.form(request, session)
        if "discard" in form:
            path = form["discard"]
            _, draft = await self.web.admin.store.draft(merchant_id)
            if path in draft and _change_of(draft[path]) != form.get("base"):
                # it would throw away what someone saved since this page showed the change
                await self.web.sessions.flash(
                    request,
                    {
                        "error": f"Not discarded: someone changed {path} since you opened "
                        "this page. Its change as it is now is shown below; discard it again "
                        "once you have seen it.",
                        "problems": [],
                    },
                )
            else:
                await self.web.admin.discard_file(merchant_id, path, session.key_id)
            raise web.HTTPSeeOther(f"/merchant/{merchant_id}/publish")
        try:
            revision = int(form.get("revision", ""))
        except ValueError:
            revision = -1
        try:
            version = await self.web.admin.publish_revision(merchant_id, revision, session.key_id)
        except ApiError as exc:
            raise await self._refused(request, exc, f"/merchant/{merchant_id}/publish") from None
        await self.web.sessions.flash(request, {"published": version})
        raise web.HTTPSeeOther(f"/merchant/{merchant_id}/versions")

    async def _refused(self, request: web.Request, exc: ApiError, page: str) -> web.HTTPSeeOther:
        """Back to ``page``, which shows why (and each problem) once."""
        problems = [d.get("message", "") for d in exc.details]
        await self.web.sessions.flash(request, {"error": exc.message, "problems": problems})
        return web.HTTPSeeOther(page)

    # -- versions -----------------------------------------------------------------------------
    async def versions(self, request: web.Request) -> web.Response:
        merchant_id, session = await self.web.signed_in(request)
        versions = await self.web.admin.version_list(merchant_id)
        live = await self.web.admin.store.live(merchant_id)
        return self.web.page(
            "versions.html",
            request=request,
            title="Versions",
            versions=list(reversed(versions)),
            live=live.number if live else 0,
            audit=await self.web.admin.store.audit(merchant_id, 50),
            csrf=session.csrf,
            result=await self.web.sessions.take_flash(request),
        )

    async def rollback(self, request: web.Request) -> web.StreamResponse:
        merchant_id, session = await self.web.signed_in(request)
        form = await self.web.form(request, session)
        text = form.get("version", "")
        if not text.isascii() or not text.isdigit():
            raise InvalidOverride(
                f"no version {text!r}", [{"field": "version", "message": "a version number"}]
            )
        target = int(text)
        shown = form.get("live", "")  # the version in force the page showed
        live = int(shown) if shown.isascii() and shown.isdigit() else None
        try:
            version = await self.web.admin.rollback_to(merchant_id, target, session.key_id, live)
        except ApiError as exc:
            raise await self._refused(request, exc, f"/merchant/{merchant_id}/versions") from None
        await self.web.sessions.flash(request, {"published": version, "restored": target})
        raise web.HTTPSeeOther(f"/merchant/{merchant_id}/versions")

    # -- shipment timeline -------------------------------------------------------------------
    async def timeline(self, request: web.Request) -> web.Response:
        merchant_id, session = await self.web.signed_in(request)
        query = request.query.get("q", "").strip()[:200]
        found: list[str] = []
        history: dict[str, Any] | None = None
        lang = ""
        if query:
            found = await find_shipments(self.web.res, merchant_id, query)
            if len(found) == 1 or request.query.get("shipment") in found:
                shipment = request.query.get("shipment") or found[0]
                history = await shipment_history(self.web.res, merchant_id, shipment, None, 200)
                lang = await self._reader_lang(merchant_id, shipment)
        return self.web.page(
            "timeline.html",
            request=request,
            title="Shipment timeline",
            query=query,
            found=found,
            history=history,
            # the messages' summaries are in the recipient's language, not the page's
            summary_lang=lang,
            label=milestone_label,
            csrf=session.csrf,
        )

    async def _reader_lang(self, merchant_id: str, shipment_id: str) -> str:
        """The language the shipment's messages are written in (BCP 47), "" when unknown."""
        res = self.web.res
        [(_, state)] = await res.store.load_states([(merchant_id, shipment_id)])
        if state is None or state.recipient is None:
            return ""
        return i18n.html_lang(res.renderer.reader_locale(merchant_id, state.recipient.locale))


def _change_of(text: str | None) -> str:
    """The fingerprint of a draft's change as the review page showed it (a removal too)."""
    return fingerprint("\x00removed" if text is None else text)
