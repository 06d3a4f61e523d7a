"""The message editor: the list of messages, one message's template with a live preview
(email at desktop and phone width, plain text, SMS with encoding and segments) and the
variables it can use, saved to the draft per locale or for all locales."""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Iterable
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from notifier.admin import InvalidOverride, TestSend, describe
from notifier.admin_views import Views, locales, message_path, milestones, variant_param
from notifier.check import candidate_renderer, sample_notification, samples
from notifier.errors import (
    ApiError,
    BadRequest,
    ConfigurationError,
    NotFound,
    NotifierError,
    plain_words,
)
from notifier.ingest import read_json
from notifier.insights.experiments import published_policy
from notifier.models import (
    E164,
    ChannelKind,
    Notification,
    Status,
    message_name,
    message_name_of,
)
from notifier.render import Renderer, i18n
from notifier.resources import data_dir
from notifier.settings import Settings
from notifier.web.base import Web
from notifier.web.forms import milestone_label
from notifier.web.session import Session

#: Context values shown in the variables panel (lists and internals are left out).
_HIDDEN = {"lang", "dir", "message", "message_for_locale", "progress", "actions", "us_opt_out"}


#: What people put between a phone number's digits: spaces, dashes, dots, brackets.
_PHONE_SPACING = re.compile(r"[\s().-]")


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for key, inner in value.items():
            _flatten(f"{prefix}.{key}" if prefix else key, inner, out)
    elif not callable(value) or hasattr(value, "__html__"):
        out[prefix] = "" if value is None else str(value)


def _sample(
    merchant_id: str,
    milestone: str,
    channel: ChannelKind,
    locale: str,
    variant: str = "a",
    collected: bool = False,
) -> Notification:
    """The sample parcel's notification of ``milestone`` for Ana, in ``locale`` (and in
    ``variant`` b of an A/B test; ``collected``: a delivered one, from a pickup point)."""
    t = next(t for t in samples() if t.milestone == milestone)
    n = sample_notification(
        t.model_copy(update={"merchant_id": merchant_id}),
        channel,
        merchant_id=merchant_id,
        shipment_id="preview",
        notification_id="n_preview",
        locale=locale,
        timezone="Europe/Paris",
        phone="+33612345678",
    )
    if collected:
        n = n.model_copy(update={"collected": True})
    return n.model_copy(update={"experiment": "preview", "variant": "b"}) if variant == "b" else n


def variables(
    renderer: Renderer, merchant_id: str, milestone: str, locale: str, collected: bool = False
) -> dict[str, str]:
    """Every variable a template may print, with its value for the sample parcel."""
    n = _sample(merchant_id, milestone, ChannelKind.EMAIL, locale, collected=collected)
    ctx = renderer.context(n, renderer.locale_for(n))
    out: dict[str, str] = {}
    for key, value in ctx.items():
        if key not in _HIDDEN:
            _flatten(key, value, out)
    return out


def page_variables(
    settings: Settings, merchant_id: str, files: dict[str, str], milestone: str, locale: str
) -> dict[str, str]:
    """The variables panel of the editor page (empty while the draft's brand does not
    validate: the page says why)."""
    try:
        renderer, _ = candidate_renderer(settings, merchant_id, files)
    except ConfigurationError:
        return {}
    return variables(renderer, merchant_id, milestone, locale)


def preview(
    settings: Settings,
    merchant_id: str,
    files: dict[str, str],
    milestone: str,
    locale: str,
    variant: str = "a",
    collected: bool = False,
) -> dict[str, Any]:
    """The email and the SMS of ``milestone`` rendered with ``files`` by one renderer (the
    one real sends use), and the variables; RenderError or ConfigurationError when the
    files do not render."""
    renderer, _ = candidate_renderer(settings, merchant_id, files)
    out: dict[str, Any] = {
        channel.value: describe(
            renderer.render(_sample(merchant_id, milestone, channel, locale, variant, collected))
        )
        for channel in ChannelKind
    }
    out["variables"] = variables(renderer, merchant_id, milestone, locale, collected)
    return out


def _files_of(milestone: str, paths: Iterable[str]) -> list[str]:
    """Of ``paths``, the files of ``milestone``'s message: for all languages, for one, and
    their variants b."""
    name = message_path(milestone)
    prefix = name.removesuffix(".jinja")
    return sorted(p for p in paths if p == name or p.startswith(prefix + "."))


class Messages:
    """Handlers of the message pages."""

    def __init__(self, web_: Web, views: Views) -> None:
        self.web = web_
        self.views = views

    async def list(self, request: web.Request) -> web.Response:
        merchant_id, session = await self.web.signed_in(request)
        live = await self.web.admin.store.live(merchant_id)
        _, draft = await self.web.admin.store.draft(merchant_id)
        published = live.files if live else {}
        # the merchant's own template files (its folder), which a message without an
        # override reads instead of the default
        folder = data_dir("templates", self.web.res.settings.templates_dir) / merchant_id
        on_disk = (
            {f"messages/{f.name}" for f in (folder / "messages").glob("*.jinja")}
            if (folder / "messages").is_dir()
            else set()
        )
        rows = []
        for milestone in milestones():
            own = _files_of(milestone, {*published, *draft})
            rows.append(
                {
                    "milestone": milestone,
                    "label": milestone_label(milestone),
                    "published": [p for p in own if p in published],
                    # (path, whether the draft removes it): a removal is no edit
                    "draft": [(p, draft[p] is None) for p in own if p in draft],
                    "files": _files_of(milestone, on_disk),
                }
            )
        return self.web.page(
            "messages.html", request=request, title="Messages", rows=rows, csrf=session.csrf
        )

    async def edit(self, request: web.Request) -> web.Response:
        merchant_id, session = await self.web.signed_in(request)
        milestone = request.match_info["milestone"]
        if milestone not in milestones():
            raise NotFound(f"no milestone {milestone}")
        settings = self.web.res.settings
        available = locales(self.web.res)
        locale = request.query.get("locale", "")
        if locale and locale not in available:
            raise NotFound(f"no catalog for locale {locale}")
        variant = variant_param(request.query.get("variant"))
        path = message_path(milestone, locale or None, variant)
        text, source = await self.views.current_text(merchant_id, path)
        _, files = await self.web.admin.candidate(merchant_id)
        preview_locale = locale or "en"
        values = await asyncio.to_thread(
            page_variables, settings, merchant_id, files, milestone, preview_locale
        )
        _, draft = await self.web.admin.store.draft(merchant_id)
        live = await self.web.admin.store.live(merchant_id)
        prefix = message_path(milestone, None, variant).removesuffix("jinja")
        own_locales = sorted(
            p.removeprefix(prefix).removesuffix(".jinja")
            for p in {*(live.files if live else {}), *(k for k, v in draft.items() if v)}
            if p.startswith(prefix)
            and p.removeprefix(prefix).count(".") == 1
            and not p.removeprefix(prefix).startswith("b.")
        )
        policy = await published_policy(self.web.res, merchant_id)
        test = policy.experiment_of.get(message_name_of(milestone))
        flash = await self.web.sessions.take_flash(request)
        tested = flash.get("test") if isinstance(flash, dict) else None
        # after a test send: the text as it was typed, in the language it was sent in (the
        # page shows the saved text and language otherwise)
        typed = tested if tested is not None and tested.get("path") == path else None
        return self.web.page(
            "message.html",
            request=request,
            title=f"{milestone_label(milestone)} message",
            milestone=milestone,
            label=milestone_label(milestone),
            locale=locale,
            variant=variant,
            experiment=test,
            preview_locale=typed["locale"] if typed and not locale else preview_locale,
            locales=available,
            path=path,
            text=typed["text"] if typed else text,
            unsaved=typed is not None and typed["text"] != text,
            source=source,
            in_draft=path in draft,
            removable=source in ("draft", "published"),
            own_locales=own_locales,
            base=fingerprint(text),
            brand_problem=None if values else "the draft's brand.yaml does not validate",
            variables=values,
            csrf=session.csrf,
            saved=request.query.get("saved"),
            problems=flash if isinstance(flash, list) else None,
            tested=tested,
        )

    async def save(self, request: web.Request) -> web.StreamResponse:
        merchant_id, session = await self.web.signed_in(request)
        milestone = request.match_info["milestone"]
        form = await self.web.form(request, session)
        locale = form.get("locale", "")
        if milestone not in milestones() or (locale and locale not in locales(self.web.res)):
            raise NotFound(f"no message {milestone} {locale}".strip())
        variant = variant_param(form.get("variant"))
        path = message_path(milestone, locale or None, variant)
        query = {"locale": locale, "variant": variant if variant == "b" else ""}
        where = f"/merchant/{merchant_id}/messages/{milestone}?" + "".join(
            f"{k}={v}&" for k, v in query.items() if v
        )
        text = form.get("text", "").replace("\r\n", "\n")
        current, source = await self.views.current_text(merchant_id, path)
        changed = fingerprint(current) != form.get("base")
        if form.get("action") == "discard":
            if changed:  # it would throw away what someone saved since
                raise EditConflict(
                    "Not discarded: someone saved this message since you opened it. Open "
                    "the message again to see their change before you discard anything.",
                    [{"field": "text", "message": "changed by someone else meanwhile"}],
                )
            await self.web.admin.discard_file(merchant_id, path, session.key_id)
            raise web.HTTPSeeOther(where + "saved=discarded")
        if changed and current != text:
            raise EditConflict(
                "Someone saved this message since you opened it. Your text is below: "
                "open the message again to see theirs, then merge and save.",
                [{"field": "text", "message": "changed by someone else meanwhile"}],
            )
        if form.get("action") == "remove":
            result = await self.web.admin.save_file(merchant_id, path, None, session.key_id)
            await self.web.sessions.flash(request, result["problems"])
            raise web.HTTPSeeOther(where + f"saved={result['saved']}")
        if text == current and source not in ("draft", "published"):
            # The text shown, untouched, is not this file's own (a default, the merchant's
            # files, the all-languages text, variant a): a copy saved here would pin it, and
            # later changes to it would no longer reach this message.
            raise web.HTTPSeeOther(where + "saved=unchanged")
        result = await self.web.admin.save_file(merchant_id, path, text, session.key_id)
        await self.web.sessions.flash(request, result["problems"])
        raise web.HTTPSeeOther(where + f"saved={result['saved']}")

    async def test_send(self, request: web.Request) -> web.StreamResponse:
        """Send the text on screen (over the draft), rendered in the preview's language, to
        an address the merchant gives, through its real channel (the admin API's test
        send: marked as a test on the timeline of shipment ``test-sends``); back to the
        message with what became of it. The address is never put in a URL or a log."""
        merchant_id, session = await self.web.signed_in(request)
        milestone = request.match_info["milestone"]
        form = await self.web.form(request, session)
        available = locales(self.web.res)
        locale, reader = form.get("locale", ""), form.get("preview_locale", "en")
        if milestone not in milestones() or (locale and locale not in available):
            raise NotFound(f"no message {milestone} {locale}".strip())
        if reader not in available:
            raise NotFound(f"no catalog for locale {reader}")
        variant = variant_param(form.get("variant"))
        path = message_path(milestone, locale or None, variant)
        channel, to = form.get("channel", ""), form.get("to", "").strip()
        # "+33 6 12 34 56 78", as people write a number (and the brand form); "+33 (0)6…"
        # writes the national 0 a caller from abroad leaves out
        spaced = _PHONE_SPACING.sub("", to.replace("(0)", ""))
        if channel == ChannelKind.SMS and E164.fullmatch(spaced):
            to = spaced
        text = form.get("text", "").replace("\r\n", "\n")
        # the page comes back with the text as typed, not as saved, and what became of the
        # test: sent, or why not (an address refused came back as an error page, the text
        # only in a box to copy: a black-box run as a merchant)
        tested: dict[str, Any] = {
            "channel": channel if channel in set(ChannelKind) else "email",
            # typed again after each test otherwise; kept in the session's flash only
            # (never a URL or a log), read once by the page that follows
            "to": to,
            "locale": locale or reader,
            "path": path,
            "text": text,
        }
        try:
            entry = await self._send_test(
                merchant_id,
                session,
                milestone,
                channel,
                to,
                locale or reader,
                path,
                text,
                form,
                variant,
            )
        except InvalidOverride as exc:  # (over the key's rate limit stays a 429 page)
            why = "; ".join(d.get("message", "") for d in exc.details) or exc.message
            # (the message often says the detail already: said once, not twice)
            said = f"{exc.message} ({why})" if why not in exc.message else exc.message
            tested.update(sent=False, error=said if said.endswith(".") else f"{said}.")
        else:
            tested.update(sent=entry["outcome"] == "sent", error=entry["delivery"].get("error"))
        await self.web.sessions.flash(request, {"test": tested})
        query = ([f"locale={locale}"] if locale else []) + (["variant=b"] if variant == "b" else [])
        where = f"/merchant/{merchant_id}/messages/{milestone}"
        raise web.HTTPSeeOther(where + ("?" + "&".join(query) if query else ""))

    async def _send_test(
        self,
        merchant_id: str,
        session: Session,
        milestone: str,
        channel: str,
        to: str,
        locale: str,
        path: str,
        text: str,
        form: dict[str, str],
        variant: str,
    ) -> dict[str, Any]:
        """The admin API's test send of ``text`` to ``to``; ApiError naming what is wrong
        with the address or the channel."""
        known = channel in set(ChannelKind)
        if not known or not to:
            field = "to" if known else "channel"
            raise InvalidOverride(
                "cannot send a test: give an email address or a phone number, and its channel",
                [{"field": field, "message": "an email address (email) or a phone number (SMS)"}],
            )
        try:
            body = TestSend(
                milestone=milestone,
                channel=ChannelKind(channel),
                locale=locale,
                to=to,
                files={path: text},
                collected=form.get("collected") == "1" and milestone == Status.DELIVERED,
            )
        except ValidationError as exc:  # too long an address
            raise InvalidOverride(
                "cannot send a test to that address",
                [{"field": "to", "message": plain_words(e)} for e in exc.errors()],
            ) from exc
        # the key's rate limit, as on the API's test send: each one is a real message
        self.web.sessions.keys.limiter.take(bytes.fromhex(session.key_digest))
        entry: dict[str, Any] = await self.web.admin.send_test(
            merchant_id, session.key_id, body, variant
        )
        return entry

    async def preview(self, request: web.Request) -> web.Response:
        """JSON for the live preview: the email and the SMS rendered from the text on
        screen (over the draft), and the variables in the preview locale."""
        merchant_id, session = await self.web.signed_in(request)
        self.web.sessions.check_csrf(request, session.csrf, request.headers.get("X-CSRF-Token"))
        body = await read_json(request, 256 * 1024)
        if not isinstance(body, dict):
            raise BadRequest("expected a JSON object")
        path, text = str(body.get("path", "")), str(body.get("text", ""))
        milestone, locale = str(body.get("milestone", "")), str(body.get("locale", "en"))
        if milestone not in milestones() or locale not in locales(self.web.res):
            raise NotFound("no such message or locale")
        variant = variant_param(str(body.get("variant") or ""))
        collected = body.get("collected") is True and milestone == Status.DELIVERED
        _, files = await self.web.admin.candidate(merchant_id)
        files[path] = text
        try:
            out = await asyncio.to_thread(
                preview,
                self.web.res.settings,
                merchant_id,
                files,
                milestone,
                locale,
                variant,
                collected,
            )
        except NotifierError as exc:
            raise InvalidOverride(str(exc), [{"field": "text", "message": str(exc)}]) from exc
        out["name"] = message_name(next(t for t in samples() if t.milestone == milestone))
        # the reader's language and direction: the page shows the words as they read them
        out["lang"], out["dir"] = i18n.html_lang(locale), i18n.text_direction(locale)
        return web.json_response(out)


class EditConflict(ApiError):
    status, code = 409, "edit_conflict"


def fingerprint(text: str) -> str:
    """A short digest of a file's text as a page showed it (to notice a save in between)."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]
