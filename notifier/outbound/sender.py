"""Sending merchant webhook events: signed, retried with backoff, every attempt logged.

A worker's tick takes the due events of each scope for a lease, posts each to the
endpoints subscribed to it, and settles it: forgotten once every endpoint answered 2xx or was
given up on (after ``RETRY_S``, about three days), otherwise due again after the next wait.
Delivery is at least once: a worker that dies mid-send leaves the event to the next once its
lease ends, so receivers deduplicate by the event id (``X-Notifier-Event-Id``).

Each request is signed like Stripe's: ``X-Notifier-Signature: t=<unix time>,v1=<hex
HMAC-SHA256 of "<t>.<body>">`` with the endpoint's secret (and a second ``v1`` with the
previous one while a rotation overlaps). A receiver recomputes it and refuses a ``t`` more
than five minutes from its clock, which stops replays.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import orjson

from notifier import metrics
from notifier.outbound.events import matches
from notifier.signing import SIGNATURE_HEADER, signature_header
from notifier.store import ClaimedEvent, Scope, Store

if TYPE_CHECKING:
    import aiohttp

log = logging.getLogger("notifier.hooks")

#: seconds to wait after the n-th failed attempt before the next; after the last, given up
RETRY_S = (60, 300, 1_800, 3_600, 7_200, 14_400, 28_800, 43_200, 86_400, 86_400)
#: how long a worker holds the events it is sending
LEASE_MS = 120_000
#: one attempt's limit, connect to last byte
TIMEOUT_S = 10.0
#: events taken per claim, and requests in flight at once
CLAIM = 32
IN_FLIGHT = 16
#: a claim's posts all start within this (well inside the lease: none is posted once
#: another worker could hold the event); those that could not start wait for the next tick
BUDGET_S = (LEASE_MS / 1000 - 2 * TIMEOUT_S) / 2
#: seconds before an event whose posts could not start is tried again (not an attempt)
SOON_S = 5
#: attempts kept per endpoint in its delivery log, and for how long after the last one
LOG_CAP = 200
LOG_TTL_S = 30 * 86_400
USER_AGENT = "notifier-webhooks/1"


class PrivateAddress(OSError):
    """An endpoint's host is, or resolves to, an address on a private network."""


def is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """A global address, and for the IPv6 forms that carry an IPv4 one (mapped, 6to4,
    NAT64), a global IPv4 inside."""
    if not ip.is_global:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        inner = ip.ipv4_mapped or ip.sixtofour
        if inner is None and ip in _NAT64:
            inner = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if inner is not None:
            return inner.is_global
    return True


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def address_problem(host: str) -> str | None:
    """Why a literal IP address (or ``localhost``) may not be posted to, or None."""
    # a name's trailing dot (the root) changes nothing a resolver does: 10.0.0.1. is 10.0.0.1
    bare = host.strip("[]").rstrip(".")
    if bare.lower() in ("localhost", "localhost.localdomain"):
        return f"{host} is this machine"
    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(bare)
    except ValueError:
        try:  # the shorthands a resolver reads as IPv4: 0x7f000001, 127.1, 2130706433
            ip = ipaddress.IPv4Address(socket.inet_aton(bare))
        except OSError:
            return None  # a name: checked once resolved
    if not is_public(ip):
        return f"{host} is a private, loopback or reserved address"
    return None


def url_problem(url: str, allow_private: bool) -> str | None:
    """Why ``url`` cannot be a webhook endpoint, or None."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 (raises on a bad port)
    except ValueError as exc:
        return f"not a URL: {exc}"
    if parts.scheme not in ("https", "http") or not host:
        return "must be an absolute https:// URL"
    if len(url) > 2048:
        return "longer than 2,048 characters"
    if allow_private:
        return None
    if parts.scheme != "https":
        return "must use https (NOTIFIER_MERCHANT_HOOKS_ALLOW_PRIVATE allows http)"
    problem = address_problem(host)
    if problem:
        return f"{problem} (NOTIFIER_MERCHANT_HOOKS_ALLOW_PRIVATE allows it)"
    return None


@dataclass(frozen=True, slots=True)
class Attempt:
    """One POST of an event to an endpoint."""

    ok: bool
    status: int | None
    error: str | None
    ms: int
    #: not posted: no slot came free within the claim's budget (not an attempt)
    skipped: bool = False


def live_secrets(endpoint: Mapping[str, Any], now: float) -> list[str]:
    """The secrets to sign with: the endpoint's, and the one it replaced until that expires."""
    out = [str(endpoint["secret"])]
    previous, until = endpoint.get("previous_secret"), endpoint.get("previous_until", 0)
    if previous and now < float(until):
        out.append(str(previous))
    return out


class HookSender:
    """Sends due webhook events for one process (the worker's tick)."""

    def __init__(
        self, store: Store, clock: Callable[[], datetime], *, allow_private: bool = False
    ) -> None:
        self.store, self.clock, self.allow_private = store, clock, allow_private
        self._session: aiohttp.ClientSession | None = None
        self._slots = asyncio.Semaphore(IN_FLIGHT)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            # imported by the first post, not at start-up: aiohttp's client and its TLS
            # context cost a worker a fifth of its imports, and most merchants have no hooks
            from notifier.outbound.client import open_session

            self._session = open_session(self.allow_private, IN_FLIGHT, TIMEOUT_S, USER_AGENT)
        return self._session

    async def run(self, stopping: Callable[[], bool] = lambda: False) -> int:
        """Send what is due in every scope; the number of attempts made."""
        made = 0
        for scope in self.store.scopes:
            while not stopping():
                now_ms = int(self.clock().timestamp() * 1000)
                claimed = await self.store.claim_hook_events(scope, now_ms, LEASE_MS, CLAIM)
                events = [(c, orjson.loads(c.stored)) for c in claimed]
                merchants = sorted({doc["event"]["merchant_id"] for _, doc in events})
                found = await self.store.hook_endpoints_of(merchants) if merchants else []
                endpoints = dict(zip(merchants, found, strict=True))
                deadline = time.monotonic() + BUDGET_S
                results = await asyncio.gather(
                    *(self._event(scope, c, doc, endpoints, deadline) for c, doc in events)
                )
                made += sum(results)
                if len(claimed) < CLAIM:
                    break
        return made

    async def _event(
        self,
        scope: Scope,
        claimed: ClaimedEvent,
        doc: dict[str, Any],
        directory: Mapping[str, dict[str, dict[str, Any]]],
        deadline: float,
    ) -> int:
        """Send one event to the endpoints still owed it, then settle it; the attempts made."""
        event, target = doc["event"], doc.get("target")
        merchant_id = event["merchant_id"]
        progress = dict(claimed.progress)
        owed = [
            ep
            for ep in directory.get(merchant_id, {}).values()
            if (ep["id"] == target if target else ep.get("enabled", True))
            and (target or matches(ep["events"], event["type"]))
            and not progress.get(ep["id"], {}).get("done")
        ]
        body = orjson.dumps(event)
        attempts = await asyncio.gather(*(self._post(ep, event, body, deadline) for ep in owed))
        at = self.clock().isoformat()
        logged = []
        skipped = False
        for ep, attempt in zip(owed, attempts, strict=True):
            if attempt.skipped:
                skipped = True
                continue
            mine = dict(progress.get(ep["id"], {"n": 0}))
            mine["n"] += 1
            outcome = "delivered" if attempt.ok else "failed"
            if attempt.ok:
                mine["done"] = True
            elif mine["n"] > len(RETRY_S):
                mine["done"], outcome = True, "gave_up"
            progress[ep["id"]] = mine
            metrics.hook_attempts(outcome)
            logged.append((ep["id"], _log_entry(event, mine["n"], at, attempt, outcome)))
            if outcome == "gave_up":
                log.warning(
                    "webhook endpoint %s of merchant %s: gave up on event %s after %d attempts",
                    ep["id"],
                    merchant_id,
                    event["id"],
                    mine["n"],
                )
        if logged:
            await self.store.log_hook_attempts(merchant_id, logged, LOG_CAP, LOG_TTL_S)
        left = [
            progress[ep["id"]]["n"]
            for ep in owed
            if ep["id"] in progress and not progress[ep["id"]].get("done")
        ]
        if not left and not skipped:
            settled = await self.store.settle_hook_event(scope, claimed, None)
        else:
            wait_s = SOON_S if skipped else RETRY_S[min(max(left), len(RETRY_S)) - 1]
            retry_at = int(self.clock().timestamp() * 1000) + wait_s * 1000
            settled = await self.store.settle_hook_event(scope, claimed, progress, retry_at)
        if not settled:
            log.warning(
                "webhook event %s of merchant %s: its lease ended while sending; "
                "another worker holds it now",
                event["id"],
                merchant_id,
            )
        return len(logged)

    async def _post(
        self, endpoint: Mapping[str, Any], event: Mapping[str, Any], body: bytes, deadline: float
    ) -> Attempt:
        """POST ``body`` to one endpoint, signed, if a slot comes free before ``deadline``;
        what came of it (never raises)."""
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                await self._slots.acquire()
        except TimeoutError:
            return Attempt(False, None, None, 0, skipped=True)
        try:
            return await self._post_now(endpoint, event, body)
        finally:
            self._slots.release()

    async def _post_now(
        self, endpoint: Mapping[str, Any], event: Mapping[str, Any], body: bytes
    ) -> Attempt:
        # the first post imports aiohttp (once, about 0.1 s): not at start-up, see session()
        from aiohttp import ClientError

        started = time.monotonic()
        now = self.clock().timestamp()
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: signature_header(live_secrets(endpoint, now), int(now), body),
            "X-Notifier-Event-Id": str(event["id"]),
            "X-Notifier-Event-Type": str(event["type"]),
        }
        url = str(endpoint["url"])
        problem = None if self.allow_private else url_problem(url, False)
        if problem:
            return Attempt(False, None, f"refused: {problem}", 0)
        try:
            async with self.session().post(
                url, data=body, headers=headers, allow_redirects=False
            ) as resp:
                await resp.content.read(1024)  # the answer's body is not used
                ms = int((time.monotonic() - started) * 1000)
                return Attempt(200 <= resp.status < 300, resp.status, None, ms)
        except TimeoutError:  # (an OSError too: first)
            error = f"no answer in {TIMEOUT_S:g} s"
        except (ClientError, OSError) as exc:
            cause = exc if isinstance(exc, PrivateAddress) else getattr(exc, "os_error", None)
            # not the message: it may carry the URL and the credentials in it
            error = f"refused: {cause}" if isinstance(cause, PrivateAddress) else type(exc).__name__
        return Attempt(False, None, error, int((time.monotonic() - started) * 1000))


def _log_entry(
    event: Mapping[str, Any], n: int, at: str, attempt: Attempt, outcome: str
) -> dict[str, Any]:
    return {
        "event_id": event["id"],
        "type": event["type"],
        "attempt": n,
        "at": at,
        "outcome": outcome,
        "status_code": attempt.status,
        "error": attempt.error,
        "duration_ms": attempt.ms,
    }
