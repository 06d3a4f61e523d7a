"""Editor sessions: a merchant signs in with its API key once and gets a cookie.

- The cookie holds a random token; Redis holds the session under the token's SHA-256 (a
  leaked Redis dump does not hand out live cookies). The cookie is HttpOnly, SameSite=Strict,
  scoped to ``/merchant``, and Secure when the request came over HTTPS.
- A session remembers the *digest* of the key it was opened with and checks, on every
  request, that the key is still configured for its merchants: removing a key from
  NOTIFIER_API_KEYS ends its sessions. The key itself is never stored.
- Every form and every script request carries the session's CSRF token (a hidden field or
  the ``X-CSRF-Token`` header), compared in constant time; requests from another origin are
  refused outright. The sign-in form, which has no session yet, uses a double-submitted
  cookie.
- Sessions end after two idle hours and after twelve hours in any case.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import orjson
from aiohttp import web

from notifier.errors import ApiError, Forbidden
from notifier.ingest import KeyRing, may_act_for
from notifier.resources import Clock
from notifier.store import DataRedis, awaited
from notifier.store.keys import session_key

COOKIE = "notifier_session"
SIGN_IN_COOKIE = "notifier_sign_in"
PATH = "/merchant"
IDLE_S = 2 * 3600
LIFETIME_S = 12 * 3600


class SignInRequired(ApiError):
    status, code = 401, "sign_in_required"


class CsrfFailed(ApiError):
    status, code = 403, "csrf_failed"


@dataclass(frozen=True)
class Session:
    """A signed-in merchant user."""

    #: the merchants the key may act for ("*" for all)
    merchants: frozenset[str]
    #: the audit log's name for the key ("key_" + digest prefix)
    key_id: str
    csrf: str
    key_digest: str

    def may_act_for(self, merchant_id: str) -> bool:
        return may_act_for(self.merchants, merchant_id)

    @property
    def home(self) -> str | None:
        """The one merchant this session is for, when there is exactly one."""
        if "*" in self.merchants or len(self.merchants) != 1:
            return None
        return next(iter(self.merchants))


def key_id(key: str) -> str:
    """The same name KeyRing.key_id gives the key on the API."""
    return "key_" + hashlib.sha256(key.encode()).hexdigest()[:12]


def _secure(request: web.Request) -> bool:
    return request.secure or request.headers.get("X-Forwarded-Proto", "") == "https"


def _same_origin(request: web.Request, public_origin: str = "") -> bool:
    """False for a browser request that says it came from another site: its Origin must be
    this server as the request reached it, or the service's public URL (behind a proxy that
    rewrites Host)."""
    origin = request.headers.get("Origin")
    if origin is None or origin == "null":
        return origin is None
    return origin.split("://", 1)[-1] == request.host or origin == public_origin


class Sessions:
    """Open, find and close editor sessions, kept in Redis."""

    def __init__(self, redis: DataRedis, keys: KeyRing, clock: Clock, public_url: str = "") -> None:
        self.redis = redis
        self.keys = keys
        self.clock = clock
        parts = urlsplit(public_url)
        #: scheme://host[:port] of NOTIFIER_PUBLIC_URL, also accepted as a request's Origin
        self.public_origin = f"{parts.scheme}://{parts.netloc}" if parts.netloc else ""

    def check_csrf(self, request: web.Request, expected: str, presented: str | None) -> None:
        check_csrf(request, expected, presented, self.public_origin)

    def _now(self) -> int:
        return int(self.clock().timestamp())

    @staticmethod
    def _key(token: str) -> str:
        # a cookie's bytes that are no UTF-8 arrive as surrogate escapes: no session, no error
        return session_key(hashlib.sha256(token.encode(errors="surrogateescape")).hexdigest())

    async def open(self, api_key: str, response: web.StreamResponse, request: web.Request) -> bool:
        """Start a session for ``api_key`` (False when no such key) and set its cookie."""
        self.keys.check_host(request)
        merchants = self.keys.merchants_for(api_key)
        if merchants is None:
            return False
        digest = hashlib.sha256(api_key.encode()).hexdigest()
        # signing in again (another tab) ends the session before; the same key keeps its
        # CSRF token, so the forms already open in other tabs still save
        previous = await self.find(request)
        await self.close(request, response)
        token = secrets.token_urlsafe(32)
        record = {
            "merchants": sorted(merchants),
            "key_id": key_id(api_key),
            "key_digest": digest,
            "csrf": previous.csrf
            if previous is not None and previous.key_digest == digest
            else secrets.token_urlsafe(32),
            "until": self._now() + LIFETIME_S,
        }
        await self.redis.set(self._key(token), orjson.dumps(record), ex=IDLE_S)
        response.set_cookie(
            COOKIE,
            token,
            path=PATH,
            httponly=True,
            samesite="Strict",
            secure=_secure(request),
            max_age=LIFETIME_S,
        )
        return True

    async def find(self, request: web.Request) -> Session | None:
        """The request's session, if it has a live one (and its key is still configured)."""
        token = request.cookies.get(COOKIE)
        if not token:
            return None
        self.keys.check_host(request)
        key = self._key(token)
        raw = await self.redis.get(key)
        if raw is None:
            return None
        record = orjson.loads(raw)
        merchants = self.keys.merchants_for_digest(bytes.fromhex(record["key_digest"]))
        if int(record["until"]) < self._now() or merchants is None:
            await awaited(self.redis.delete(key))
            return None
        await awaited(self.redis.expire(key, IDLE_S))
        return Session(
            merchants=frozenset(record["merchants"]) & merchants
            if "*" not in merchants
            else frozenset(record["merchants"]),
            key_id=record["key_id"],
            csrf=record["csrf"],
            key_digest=record["key_digest"],
        )

    async def require(self, request: web.Request, merchant_id: str | None = None) -> Session:
        """The session, allowed for ``merchant_id``; 401 without one, 403 for another
        merchant's pages."""
        session = await self.find(request)
        if session is None:
            raise SignInRequired("sign in with your merchant API key")
        if merchant_id is not None and not session.may_act_for(merchant_id):
            raise Forbidden("your key may not act for that merchant")
        return session

    async def flash(self, request: web.Request, data: object) -> None:
        """Keep ``data`` for the page a form's redirect lands on (one read, one minute)."""
        token = request.cookies.get(COOKIE)
        if token:
            await self.redis.set(self._key(token) + ":flash", orjson.dumps(data), ex=60)

    async def take_flash(self, request: web.Request) -> Any:
        token = request.cookies.get(COOKIE)
        if not token:
            return None
        raw = await self.redis.getdel(self._key(token) + ":flash")
        return None if raw is None else orjson.loads(raw)

    async def close(self, request: web.Request, response: web.StreamResponse) -> None:
        token = request.cookies.get(COOKIE)
        if token:
            await awaited(self.redis.delete(self._key(token)))
        response.del_cookie(COOKIE, path=PATH)


def check_csrf(
    request: web.Request, expected: str, presented: str | None, public_origin: str = ""
) -> None:
    """403 unless the request is same-origin and presents the expected token."""
    if not _same_origin(request, public_origin):
        raise CsrfFailed("a request from another site was refused")
    if not presented or not hmac.compare_digest(
        presented.encode(errors="surrogateescape"), expected.encode()
    ):
        raise CsrfFailed("the form is out of date or did not come from this editor: reload it")


def sign_in_token(request: web.Request) -> str:
    """The sign-in form's CSRF token (the one the browser has, or a new one)."""
    return request.cookies.get(SIGN_IN_COOKIE) or secrets.token_urlsafe(24)


def set_sign_in_cookie(request: web.Request, response: web.StreamResponse, token: str) -> None:
    """The same token as a cookie: a sign-in must present both (double submit)."""
    response.set_cookie(
        SIGN_IN_COOKIE,
        token,
        path=PATH,
        httponly=True,
        samesite="Strict",
        secure=_secure(request),
        max_age=3600,
    )
