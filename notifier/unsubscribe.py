"""One-click unsubscribe (RFC 8058): signed links, the List-Unsubscribe headers, the endpoint.

A link carries the merchant and the address, signed with HMAC-SHA256 under
``NOTIFIER_SIGNING_SECRET``: nobody can unsubscribe an address they were not sent. Without
the setting, with Redis, every process signs with a key derived from the deployment's key
kept in Redis (``Resources.digest_secret``), so links signed by a worker verify in the API
and survive restarts; embedded mode (one process) makes its own.
POST (what mail clients' one-click buttons send) records the opt-out; GET only shows a
page with a button, because link scanners fetch every URL in a message.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import logging
from typing import TYPE_CHECKING

from notifier.errors import NotFound
from notifier.insights import record
from notifier.insights.counts import Count
from notifier.models import ChannelKind
from notifier.policy import opt_out_key

if TYPE_CHECKING:  # resources builds the renderer with this module's headers()
    from aiohttp import web

    from notifier.resources import Resources

PATH = "/v1/unsubscribe/{token}"
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

    def headers(self, merchant_id: str, address: str) -> dict[str, str]:
        """The email's RFC 8058 headers; none while the key is not known (never a link that
        cannot work: said once in the log)."""
        if self.secret is None:
            if not self._said:
                log.warning("one-click unsubscribe headers left out: the links' key is not read")
                self._said = True
            return {}
        return headers(self.public_url, self.secret, merchant_id, address)


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


def headers(public_url: str, secret: str, merchant_id: str, address: str) -> dict[str, str]:
    """The RFC 8058 headers for one email."""
    url = public_url.rstrip("/") + PATH.format(token=sign(secret, merchant_id, address))
    return {"List-Unsubscribe": f"<{url}>", "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"}


def _page(title: str, body: str) -> web.Response:
    from aiohttp import web  # the API's; a worker only signs links (headers())

    return web.Response(
        text=f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f'</head><body style="font-family:Arial,sans-serif;font-size:16px;max-width:36em;'
        f'margin:2em auto;">{body}</body></html>',
        content_type="text/html",
    )


async def unsubscribe(request: web.Request, res: Resources) -> web.Response:
    """GET (and HEAD, a link scanner's): a page with a button. POST: record the opt-out
    (one click)."""
    token = request.match_info["token"]
    found = verify(await res.link_secret(), token)
    if found is None:  # signed before NOTIFIER_SIGNING_SECRET was set? (asks Redis)
        found = next(
            (w for old in await res.older_link_secrets() if (w := verify(old, token))), None
        )
    if found is None:
        raise NotFound("this unsubscribe link is not valid")
    merchant_id, address = found
    if request.method != "POST":
        return _page(
            "Unsubscribe",
            (
                f"<h1>Stop emails to {html.escape(address)}?</h1>"
                '<form method="post"><button type="submit" '
                'style="font-size:16px;padding:8px 16px;">Unsubscribe</button></form>'
            ),
        )
    key = opt_out_key(ChannelKind.EMAIL, address)
    if await res.store.set_opt_out(merchant_id, key, True):
        at = res.clock()
        await res.hooks.opted_out(merchant_id, key, "unsubscribe_link", at)
        await record.report(
            res.store, merchant_id, None, key, "email", None, Count.UNSUBSCRIBED, at
        )
    return _page("Unsubscribed", f"<h1>{html.escape(address)} will get no more emails.</h1>")
