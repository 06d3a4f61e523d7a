"""What every editor page shares: the page renderer, security headers, the session and
CSRF checks, and turning errors into HTML pages (the API's JSON errors stay the API's)."""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from aiohttp import web
from jinja2 import Environment, FileSystemLoader, select_autoescape

from notifier.admin import Admin
from notifier.errors import ApiError, BadRequest, Forbidden, NotFound
from notifier.ingest import RETRY_AFTER_S
from notifier.models import ExceptionCode, Status
from notifier.resources import Resources
from notifier.store.base import redis_away
from notifier.web.session import COOKIE, CsrfFailed, Session, Sessions, SignInRequired

HERE = Path(__file__).parent
#: No inline scripts, nothing from elsewhere. Styles may be inline because the email
#: previews (srcdoc frames, which inherit this policy) carry their CSS inline; those frames
#: are sandboxed without scripts.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' https: data:; frame-src 'self' about:; frame-ancestors 'none'; "
    "form-action 'self'; base-uri 'none'; object-src 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    # not no-referrer: under it Chromium sends "Origin: null" on same-site posts
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
NAV = [
    ("", "Overview"),
    ("messages", "Messages"),
    ("brand", "Brand"),
    ("cadence", "Cadence rules"),
    ("publish", "Review & publish"),
    ("versions", "Versions"),
    ("timeline", "Shipment timeline"),
    ("analytics", "Analytics"),
]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Web:
    """State the editor's handlers share."""

    def __init__(self, admin: Admin, sessions: Callable[[], Sessions]) -> None:
        self.admin = admin
        self._sessions = sessions
        self.jinja = Environment(
            loader=FileSystemLoader(HERE / "templates"),
            autoescape=select_autoescape(default=True),
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.jinja.filters["moment"] = moment
        self.jinja.filters["readable"] = readable

    @property
    def res(self) -> Resources:
        return self.admin.res

    @property
    def sessions(self) -> Sessions:
        return self._sessions()

    def page(
        self, template: str, *, status: int = 200, request: web.Request, **ctx: Any
    ) -> web.Response:
        """An HTML page from ``templates/<template>``."""
        merchant_id = request.match_info.get("merchant_id")
        nav_path = request.path.rstrip("/").split("/")
        current = nav_path[3] if len(nav_path) > 3 else ""
        html = self.jinja.get_template(template).render(
            merchant_id=merchant_id, nav=NAV, current=current, **ctx
        )
        return web.Response(
            status=status, text=html, content_type="text/html", charset="utf-8", headers=HEADERS
        )

    async def signed_in(self, request: web.Request) -> tuple[str, Session]:
        """(merchant id of the page, session allowed for it); 401/403 as they apply."""
        merchant_id = request.match_info["merchant_id"]
        return merchant_id, await self.sessions.require(request, merchant_id)

    async def form(self, request: web.Request, session: Session) -> dict[str, str]:
        """A POSTed form, after the CSRF check."""
        form = await read_form(request)
        self.sessions.check_csrf(request, session.csrf, form.get("csrf"))
        return form


async def read_form(request: web.Request) -> dict[str, str]:
    """A POSTed form's text fields; 400 for a body that cannot be read as a form."""
    try:
        data = await request.post()
    except (ValueError, LookupError) as exc:  # a multipart body without boundary, a charset
        raise BadRequest(f"the form could not be read: {exc}") from exc
    return {k: v for k, v in data.items() if isinstance(v, str)}


def html_errors(web_: Web, handler: Handler) -> Handler:
    """Errors as editor pages: sign-in for a missing session, 403/404/409/422 explained; a
    refused form's text is shown back, so nothing typed is lost."""

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except SignInRequired:
            if request.method in ("GET", "HEAD"):
                target = f"/merchant/sign-in?next={quote(request.path_qs)}"
                raise web.HTTPSeeOther(target) from None
            return await _error(
                web_,
                request,
                401,
                "Signed out",
                "Your session ended, so nothing was saved: sign in again in another tab, "
                "open the page there and enter your changes again (what you typed is below).",
            )
        except (Forbidden, CsrfFailed, NotFound) as exc:
            title = "Not allowed" if exc.status == 403 else "Not found"
            return await _error(web_, request, exc.status, title, exc.message)
        except ApiError as exc:
            return await _error(
                web_, request, exc.status, "Could not do that", exc.message, exc.details
            )
        except Exception as exc:
            if not redis_away(exc):
                raise
            route = request.match_info.route.resource
            where = route.canonical if route is not None else "(no route)"
            web_.admin.res.outage.failed(f"{request.method} {where}", exc)
            response = await _error(web_, request, 503, "Try again shortly", UNAVAILABLE)
            response.headers["Retry-After"] = RETRY_AFTER_S
            return response

    return wrapped


#: What an editor page says while Redis does not answer.
UNAVAILABLE = (
    "The service cannot reach its data store (Redis) right now: what you did may not have "
    "been saved. Try again in a minute, then check it."
)


async def _error(
    web_: Web,
    request: web.Request,
    status: int,
    title: str,
    message: str,
    details: list[dict[str, Any]] | None = None,
) -> web.Response:
    unsaved = None
    if (
        request.method == "POST"
        and request.content_type != "application/json"
        and request.path.count("/") >= 3  # a merchant's page: never the sign-in (its key)
    ):
        with contextlib.suppress(BadRequest):
            unsaved = _typed(await read_form(request))
    return web_.page(
        "error.html",
        status=status,
        request=request,
        title=title,
        message=message,
        details=details,
        unsaved=unsaved,
    )


#: A form's fields that the page filled in, not the merchant, or a secret: never shown
#: back as typed.
_NOT_TYPED = {"csrf", "base", "revision", "live", "version", "action", "next", "collected", "key"}


def _typed(form: dict[str, str]) -> str | None:
    """What a refused form carried that the merchant typed, to show back: a message's text
    as it is, or a settings form's fields as ``name: value`` lines (its text boxes, choices
    and ticked boxes), so that a session that ended or a Redis away loses nothing typed."""
    if "text" in form:
        return form["text"] or None
    lines = [
        f"{name}: {value}"
        for name, value in form.items()
        if name not in _NOT_TYPED and value.strip()
    ]
    return "\n".join(lines) or None


#: A date and time as the store writes one (ISO 8601 with an offset).
_ISO_MOMENT = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:\d{2})")
#: A status or exception code as the history writes it (``out_for_delivery``), not part
#: of a setting's name (``stalled.no_scan_hours`` stays as the cadence rules write it).
_CODE = re.compile(
    r"(?<![\w.])(?:"
    + "|".join(
        sorted(
            (c.value for c in (*Status, *ExceptionCode) if "_" in c.value), key=len, reverse=True
        )
    )
    + r")(?![\w.])"
)


def readable(value: object) -> str:
    """A history's reason or detail as people read it: its times as ``moment`` shows them,
    its codes in words (``superseded by out_for_delivery (2026-12-06T15:20:51.405091+00:00)``
    reads "superseded by out for delivery (2026-12-06 15:20:51 UTC)"); the API keeps them
    as written."""
    text = _ISO_MOMENT.sub(lambda m: moment(m[0]), str(value))
    return _CODE.sub(lambda m: m[0].replace("_", " "), text)


def moment(value: object) -> str:
    """An ISO time from the store as people read it: 2026-12-03 06:51:06 UTC."""
    try:
        parsed = datetime.fromisoformat(str(value))
    except ValueError:
        return str(value)
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(UTC)
    return parsed.strftime("%Y-%m-%d %H:%M:%S") + (" UTC" if parsed.tzinfo else "")


def safe_next(target: str | None) -> str | None:
    """A same-site path to return to after signing in (never another site)."""
    if target and target.startswith("/merchant") and not target.startswith("//"):
        return target
    return None


__all__ = ["COOKIE", "Web", "html_errors", "read_form", "safe_next"]
