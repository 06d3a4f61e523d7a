"""The merchant editor at /merchant: server-rendered pages over the admin API's operations,
signed in with a merchant API key (see session.py), a little JavaScript for live previews."""

from __future__ import annotations

from aiohttp import web

from notifier.admin import Admin
from notifier.admin_views import Views
from notifier.errors import NotFound
from notifier.ingest import KeyRing
from notifier.web.analytics_page import AnalyticsPage
from notifier.web.base import HERE, Web, html_errors
from notifier.web.messages import Messages
from notifier.web.pages import Pages
from notifier.web.session import Sessions
from notifier.web.settings_pages import SettingsPages


def add_routes(app: web.Application, admin: Admin, views: Views, keys: KeyRing) -> None:
    """The editor's routes; sessions live in the service's Redis (built at start-up)."""
    sessions: list[Sessions] = []

    def get_sessions() -> Sessions:
        if not sessions:
            res = admin.res
            sessions.append(Sessions(res.redis, keys, res.clock, res.settings.public_url))
        return sessions[0]

    web_ = Web(admin, get_sessions)
    pages, messages, settings = Pages(web_), Messages(web_, views), SettingsPages(web_)
    insights = AnalyticsPage(web_)
    base = "/merchant/{merchant_id:[A-Za-z0-9][A-Za-z0-9._-]{0,63}}"  # models.MerchantId
    milestone = "{milestone:[a-z_]+(:[a-z_]+)?}"
    routes = [
        ("GET", "/merchant", pages.index),
        ("GET", "/merchant/", pages.index),
        ("GET", "/merchant/go", pages.go),
        ("GET", "/merchant/sign-in", pages.sign_in_form),
        ("POST", "/merchant/sign-in", pages.sign_in),
        ("GET", "/merchant/sign-out", pages.sign_out_form),  # not the merchant "sign-out"
        ("POST", "/merchant/sign-out", pages.sign_out),
        ("GET", f"{base}/", pages.home),
        ("GET", f"{base}/messages", messages.list),
        ("GET", f"{base}/messages/{milestone}", messages.edit),
        ("POST", f"{base}/messages/{milestone}", messages.save),
        ("POST", f"{base}/messages/{milestone}/test-send", messages.test_send),
        ("POST", f"{base}/preview", messages.preview),
        ("GET", f"{base}/brand", settings.brand),
        ("POST", f"{base}/brand", settings.save_brand),
        ("GET", f"{base}/cadence", settings.cadence),
        ("POST", f"{base}/cadence", settings.save_cadence),
        ("GET", f"{base}/publish", pages.review),
        ("POST", f"{base}/publish", pages.publish),
        ("GET", f"{base}/versions", pages.versions),
        ("POST", f"{base}/rollback", pages.rollback),
        ("GET", f"{base}/timeline", pages.timeline),
        ("GET", f"{base}/analytics", insights.page),
        ("GET", f"{base}/analytics.csv", insights.csv),
    ]
    for method, path, handler in routes:
        # the preview answers the editor's script: its errors stay the API's JSON
        wrapped = handler if handler == messages.preview else html_errors(web_, handler)
        if method == "GET":  # and HEAD, as every other GET route (README, "OpenAPI")
            app.router.add_get(path, wrapped)
        else:
            app.router.add_route(method, path, wrapped)
    app.router.add_get(base, _slash)
    for plain in ("/merchant/sign-in/", "/merchant/sign-out/", "/merchant/go/"):
        # typed with a slash, these are the editor's own pages, not merchants of that name
        app.router.add_get(plain, _unslash)
    app.router.add_get("/merchant/-/static/{filename}", _static)
    # last: a typed page with a slash too many goes to the page, any other is a 404 page
    # (not the API's JSON) for the person who typed it
    app.router.add_get("/merchant/{tail:.+}", html_errors(web_, _unknown))
    app.router.add_post("/merchant/{tail:.+}", _unknown)  # the API's 404, as before it


async def _slash(request: web.Request) -> web.StreamResponse:
    raise web.HTTPPermanentRedirect(request.path + "/")


async def _unslash(request: web.Request) -> web.StreamResponse:
    """``/merchant/sign-out/`` to ``/merchant/sign-out`` (its query kept): without it the
    slash made it the overview of a merchant called "sign-out", for a key of every merchant."""
    target = request.path.rstrip("/")
    raise web.HTTPPermanentRedirect(
        f"{target}?{request.query_string}" if request.query_string else target
    )


async def _unknown(request: web.Request) -> web.StreamResponse:
    """A path under /merchant that no page has: ``…/brand/`` to ``…/brand`` (its query
    kept); a form posted to a page that has none, ``405`` as before this route; else a
    404: a page for a browser, the API's JSON for a program (as before)."""
    reading = request.method in ("GET", "HEAD")
    target = request.path.rstrip("/")
    if (
        reading
        and target != request.path
        and target != "/merchant"
        and await _page_at(request, target)
    ):
        return await _unslash(request)
    if not reading and await _page_at(request, request.path):
        raise web.HTTPMethodNotAllowed(request.method, ["GET", "HEAD"])
    if reading and "text/html" in request.headers.get("Accept", ""):
        raise NotFound(f"no page {request.path}")  # a person's browser: the editor's page
    raise web.HTTPNotFound(text=f"no page {request.path}")  # a program: the API's JSON


async def _page_at(request: web.Request, path: str) -> bool:
    """Whether a GET of ``path`` opens a page (a route of its own, not this catch-all)."""
    found = await request.app.router.resolve(request.clone(method="GET", rel_url=path))
    return (
        found.http_exception is None
        and found.route.resource is not request.match_info.route.resource
    )


#: The editor's own files (nothing else is served from its folder).
STATIC = {"editor.css": "text/css", "editor.js": "application/javascript"}


async def _static(request: web.Request) -> web.StreamResponse:
    name = request.match_info["filename"]
    if name not in STATIC:
        raise NotFound(f"no file {name}")
    return web.FileResponse(HERE / "static" / name, headers={"Content-Type": STATIC[name]})
