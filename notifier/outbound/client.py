"""The HTTP client that posts webhook events: aiohttp, resolving to public addresses only.

Its own module so that a worker imports aiohttp (a fifth of its start-up) only once it has
an event to post (``HookSender.session``).
"""

from __future__ import annotations

import ipaddress
import socket

import aiohttp
from aiohttp.abc import ResolveResult
from aiohttp.resolver import ThreadedResolver

from notifier.outbound.sender import PrivateAddress, is_public


class PublicOnlyResolver(ThreadedResolver):
    """Resolves names to global addresses only: a merchant's endpoint must not reach into
    the network the service runs in."""

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await super().resolve(host, port, family)
        for entry in found:
            if not is_public(ipaddress.ip_address(entry["host"])):
                raise PrivateAddress(f"{host} resolves to a private or reserved address")
        return found


def open_session(
    allow_private: bool, limit: int, timeout_s: float, user_agent: str
) -> aiohttp.ClientSession:
    """A session of at most ``limit`` connections that gives up on a request after
    ``timeout_s``; unless ``allow_private``, one that refuses private addresses."""
    connector = aiohttp.TCPConnector(
        resolver=None if allow_private else PublicOnlyResolver(), limit=limit
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=timeout_s),
        headers={"User-Agent": user_agent},
    )
