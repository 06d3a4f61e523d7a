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
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
from aiohttp.abc import ResolveResult
from aiohttp.resolver import ThreadedResolver

from notifier import metrics
from notifier.ingest import SIGNATURE_HEADER, signature
from notifier.outbound.events import matches
from notifier.store import ClaimedEvent, Scope, Store

log = logging.getLogger("notifier.hooks")

#: seconds to wait after the n-th failed attempt before the next; after the last, given up
RETRY_S = (60, 300, 1_800, 3_600, 7_200, 14_400, 28_800, 43_200, 86_400, 86_400)
#: how long a worker holds an event it is sending (longer than a send can take)
LEASE_MS = 120_000
#: one attempt's limit, connect to last byte
TIMEOUT_S = 10.0
#: events taken per claim, and requests in flight at once
CLAIM = 100
IN_FLIGHT = 16
#: attempts kept per endpoint in its delivery log, and for how long after the last one
LOG_CAP = 200
LOG_TTL_S = 30 * 86_400
USER_AGENT = "notifier-webhooks/1"


class PrivateAddress(OSError):
    """An endpoint's host is, or resolves to, an address on a private network."""


def address_problem(host: str) -> str | None:
    """Why a literal IP address (or ``localhost``) may not be posted to, or None."""
    if host.lower().rstrip(".") in ("localhost", "localhost.localdomain"):
        return f"{host} is this machine"
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None  # a name: checked once resolved
    if not ip.is_global:
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


class PublicOnlyResolver(ThreadedResolver):
    """Resolves names to global addresses only: a merchant's endpoint must not reach into
    the network the service runs in."""

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await super().resolve(host, port, family)
        for entry in found:
            if not ipaddress.ip_address(entry["host"]).is_global:
                raise PrivateAddress(f"{host} resolves to a private or reserved address")
        return found


@dataclass(frozen=True, slots=True)
class Attempt:
    """One POST of an event to an endpoint."""

    ok: bool
    status: int | None
    error: str | None
    ms: int


def signature_header(secrets: list[str], timestamp: int, body: bytes) -> str:
    """``t=<timestamp>,v1=<hex>`` with one ``v1`` per secret."""
    return ",".join([f"t={timestamp}", *(f"v1={signature(s, timestamp, body)}" for s in secrets)])


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
            connector = aiohttp.TCPConnector(
                resolver=None if self.allow_private else PublicOnlyResolver(), limit=IN_FLIGHT
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=TIMEOUT_S),
                headers={"User-Agent": USER_AGENT},
            )
        return self._session

    async def run(self, stopping: Callable[[], bool] = lambda: False) -> int:
        """Send what is due in every scope; the number of attempts made."""
        made = 0
        for scope in self.store.scopes:
            while not stopping():
                now_ms = int(self.clock().timestamp() * 1000)
                claimed = await self.store.claim_hook_events(scope, now_ms, LEASE_MS, CLAIM)
                endpoints: dict[str, dict[str, dict[str, Any]]] = {}
                results = await asyncio.gather(
                    *(self._event(scope, event, endpoints) for event in claimed)
                )
                made += sum(results)
                if len(claimed) < CLAIM:
                    break
        return made

    async def _event(
        self, scope: Scope, claimed: ClaimedEvent, directory: dict[str, dict[str, dict[str, Any]]]
    ) -> int:
        """Send one event to the endpoints still owed it, then settle it."""
        doc = orjson.loads(claimed.stored)
        event, target = doc["event"], doc.get("target")
        merchant_id = event["merchant_id"]
        if merchant_id not in directory:
            directory[merchant_id] = await self.store.hook_endpoints(merchant_id)
        progress = dict(claimed.progress)
        owed = [
            ep
            for ep in directory[merchant_id].values()
            if (ep["id"] == target if target else ep.get("enabled", True))
            and (target or matches(ep["events"], event["type"]))
            and not progress.get(ep["id"], {}).get("done")
        ]
        body = orjson.dumps(event)
        attempts = await asyncio.gather(*(self._post(ep, event, body) for ep in owed))
        at = self.clock().isoformat()
        logged = []
        for ep, attempt in zip(owed, attempts, strict=True):
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
        left = [progress[ep["id"]]["n"] for ep in owed if not progress[ep["id"]].get("done")]
        if not left:
            await self.store.settle_hook_event(scope, claimed, None)
        else:
            wait_s = RETRY_S[min(max(left), len(RETRY_S)) - 1]
            retry_at = int(self.clock().timestamp() * 1000) + wait_s * 1000
            await self.store.settle_hook_event(scope, claimed, progress, retry_at)
        return len(owed)

    async def _post(
        self, endpoint: Mapping[str, Any], event: Mapping[str, Any], body: bytes
    ) -> Attempt:
        """POST ``body`` to one endpoint, signed; what came of it (never raises)."""
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
            async with (
                self._slots,
                self.session().post(url, data=body, headers=headers, allow_redirects=False) as resp,
            ):
                await resp.content.read(1024)  # the answer's body is not used
                ms = int((time.monotonic() - started) * 1000)
                return Attempt(200 <= resp.status < 300, resp.status, None, ms)
        except (aiohttp.ClientError, OSError) as exc:
            cause = exc if isinstance(exc, PrivateAddress) else getattr(exc, "os_error", None)
            # not the message: it may carry the URL and the credentials in it
            error = f"refused: {cause}" if isinstance(cause, PrivateAddress) else type(exc).__name__
        except TimeoutError:
            error = f"no answer in {TIMEOUT_S:g} s"
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
