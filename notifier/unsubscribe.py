"""One-click unsubscribe (RFC 8058): signed links, the List-Unsubscribe headers, the endpoint.

A link carries the merchant and the address, signed with HMAC-SHA256 under
``NOTIFIER_SIGNING_SECRET``: nobody can unsubscribe an address they were not sent. Without
the setting, with Redis, every process signs with a key derived from the deployment's key
kept in Redis (``Resources.digest_secret``), so links signed by a worker verify in the API
and survive restarts; embedded mode (one process) makes its own.
POST (what mail clients' one-click buttons send) records the opt-out; GET only shows a
page with a button, because link scanners fetch every URL in a message.

The page (``templates/email/unsubscribe.html``) is in the email's language: a link carries
it as ``?lang=`` (outside the signature: it changes nothing but the words), and a link from
before it, or a link that is not valid, is shown in the browser's (``Accept-Language``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import re
from typing import TYPE_CHECKING

from notifier.errors import NotFound
from notifier.insights import record
from notifier.insights.counts import Count, untag
from notifier.models import ChannelKind, ExceptionCode, Status
from notifier.policy import opt_out_key
from notifier.store.base import redis_away

if TYPE_CHECKING:  # resources builds the renderer with this module's headers()
    from aiohttp import web

    from notifier.resources import Resources


async def sync_published(res: Resources, merchant_ids: list[str]) -> None:
    """``resources.sync_published`` (imported when used: resources imports this module)."""
    from notifier.resources import sync_published as sync

    await sync(res, merchant_ids)


PATH = "/v1/unsubscribe/{token}"
#: Retry-After of the page shown while Redis does not answer (as the API's 503s)
RETRY_AFTER_S = "5"
log = logging.getLogger(__name__)


def derived(deployment_key: str) -> str:
    """The links' key made from the deployment's key in Redis (a key of its own: the
    deployment key also keys recipients' digests)."""
    return hmac.new(deployment_key.encode(), b"one-click unsubscribe links", "sha256").hexdigest()


class LinkKey:
    """The key links are signed with, once this process knows it: at once from the setting
    (or embedded mode's own), else from Redis (``Resources.link_secret``, read by the worker
    at start-up and by the API when it first needs it)."""

    def __init__(self, public_url: str, secret: str | None) -> None:
        self.public_url = public_url
        self.secret = secret
        self._said = False

    def headers(
        self, merchant_id: str, address: str, locale: str = "", tag: str = ""
    ) -> dict[str, str]:
        """The email's RFC 8058 headers; none while the key is not known (never a link that
        cannot work: said once in the log)."""
        if self.secret is None:
            if not self._said:
                log.warning("one-click unsubscribe headers left out: the links' key is not read")
                self._said = True
            return {}
        return headers(self.public_url, self.secret, merchant_id, address, locale, tag)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign(secret: str, merchant_id: str, address: str) -> str:
    payload = f"{merchant_id}\n{address}".encode()
    mac = hmac.new(secret.encode(), payload, hashlib.sha256).digest()
    return f"{_b64(payload)}.{_b64(mac)}"


def verify(secret: str, token: str) -> tuple[str, str] | None:
    """(merchant_id, address) of a genuine token, else None."""
    try:
        encoded, _, given = token.partition(".")
        payload = _unb64(encoded)
        expected = hmac.new(secret.encode(), payload, hashlib.sha256).digest()
        if not hmac.compare_digest(expected, _unb64(given)):
            return None
        merchant_id, _, address = payload.decode().partition("\n")
    except (ValueError, UnicodeDecodeError):
        return None
    return (merchant_id, address) if merchant_id and address else None


def headers(
    public_url: str,
    secret: str,
    merchant_id: str,
    address: str,
    locale: str = "",
    tag: str = "",
) -> dict[str, str]:
    """The RFC 8058 headers for one email; its page in ``locale`` (the email's language),
    its count under ``tag`` (the email's milestone and locale, ``counts.tag``). Neither is
    signed: each changes only words or which row of the merchant's own counts."""
    url = public_url.rstrip("/") + PATH.format(token=sign(secret, merchant_id, address))
    query = [f"{name}={value}" for name, value in (("lang", locale), ("t", tag)) if value]
    if query:
        url += "?" + "&".join(query)
    return {"List-Unsubscribe": f"<{url}>", "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"}


#: A language tag as a link or a browser gives it (``fr``, ``pt-BR``, ``zh_Hans``).
_TAG = re.compile(r"[A-Za-z]{2,8}([-_][A-Za-z0-9]{1,8}){0,3}")


def languages(request: web.Request) -> list[str]:
    """The page's languages in order: the link's ``lang`` (the email's), then the
    browser's ``Accept-Language`` by preference (at most 8; what does not parse is
    passed over)."""
    wanted = []
    lang = request.query.get("lang", "")
    if _TAG.fullmatch(lang):
        wanted.append(lang)
    ranked = []
    for n, item in enumerate(request.headers.get("Accept-Language", "").split(",")[:16]):
        tag, _, params = item.strip().partition(";")
        q = 1.0
        if (param := params.strip()).startswith("q="):
            try:
                q = float(param[2:])
            except ValueError:
                continue
        if _TAG.fullmatch(tag.strip()) and q > 0:
            ranked.append((-q, n, tag.strip()))
    wanted += [tag for _, _, tag in sorted(ranked)[:8]]
    return wanted


def _page(
    res: Resources,
    request: web.Request,
    state: str,
    merchant_id: str | None = None,
    address: str = "",
) -> web.Response:
    """The page of ``state`` (``ask``, ``done``, ``invalid``, ``unavailable``) for a
    link's merchant and address (none for a link that is not valid or not read)."""
    from aiohttp import web  # the API's; a worker only signs links (headers())

    html = res.renderer.unsubscribe_page(merchant_id, languages(request), state, address)
    status = {"invalid": 404, "unavailable": 503}.get(state, 200)
    headers = {"Cache-Control": "no-store", "Vary": "Accept, Accept-Language"}
    if state == "unavailable":
        headers["Retry-After"] = RETRY_AFTER_S
    return web.Response(text=html, status=status, content_type="text/html", headers=headers)


#: The milestones a message is written for (a status, or ``exception:<code>``).
_MILESTONES = frozenset(
    [s.value for s in Status if s is not Status.EXCEPTION]
    + [f"exception:{c.value}" for c in ExceptionCode]
)


def _known_tag(tag: str | None) -> str | None:
    """A link's ``t`` when it names a milestone messages are written for: the link is not
    signed there, and an invented milestone would add a row to the merchant's counts
    (one that does not read counts as unknown)."""
    return tag if tag and untag(tag)[0] in _MILESTONES else None


def _wants_json(request: web.Request) -> bool:
    """A program that asks for JSON only: it gets the API's errors, not pages."""
    accept = request.headers.get("Accept", "")
    return "application/json" in accept and "text/html" not in accept


async def unsubscribe(request: web.Request, res: Resources) -> web.Response:
    """GET (and HEAD, a link scanner's): a page with a button, or "unsubscribed" for an
    address that already is. POST: record the opt-out (one click). A link that is not
    valid: a 404 page saying so; Redis not answering: a 503 page with the button again,
    in the customer's language (the API's JSON for a program that asks for JSON)."""
    try:
        return await _unsubscribe(request, res)
    except Exception as exc:
        if not redis_away(exc) or _wants_json(request):
            raise  # (the API's 503 or 500)
        res.outage.failed(f"{request.method} {PATH}", exc)
        return _page(res, request, "unavailable")


async def _unsubscribe(request: web.Request, res: Resources) -> web.Response:
    token = request.match_info["token"]
    found = verify(await res.link_secret(), token)
    if found is None:  # signed before NOTIFIER_SIGNING_SECRET was set? (asks Redis)
        found = next(
            (w for old in await res.older_link_secrets() if (w := verify(old, token))), None
        )
    if found is None:
        if _wants_json(request):
            raise NotFound("this unsubscribe link is not valid")
        return _page(res, request, "invalid")
    merchant_id, address = found
    key = opt_out_key(ChannelKind.EMAIL, address)
    # the brand the merchant published in the editor (its name, its default language),
    # and a second visit told it is done, not asked again: a Redis that does not answer
    # costs only these (the files' brand; the question)
    already = False
    try:
        await sync_published(res, [merchant_id])
        if request.method != "POST":
            already = key in await res.store.opted_out(merchant_id, [key])
    except Exception as exc:
        if not redis_away(exc):
            raise
        res.outage.failed(f"{request.method} {PATH}", exc)
    if request.method != "POST":
        return _page(res, request, "done" if already else "ask", merchant_id, address)
    if await res.store.set_opt_out(merchant_id, key, True):
        at = res.clock()
        await res.hooks.opted_out(merchant_id, key, "unsubscribe_link", at)
        tag = _known_tag(request.query.get("t"))
        await record.report(res.store, merchant_id, None, key, "email", tag, Count.UNSUBSCRIBED, at)
    return _page(res, request, "done", merchant_id, address)
