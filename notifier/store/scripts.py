"""The store's Lua scripts: read once from ``lua/<name>.lua`` at import, registered once
per store.

Every write that must be atomic is one script, so any number of API and worker processes
can share one Redis. Each file's header says what its KEYS and ARGV are and what it returns.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from importlib.resources import files
from typing import cast

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript


@dataclass(frozen=True, slots=True)
class Scripts:
    """One registered script per field, named like its file."""

    ingest: AsyncScript
    commit: AsyncScript
    claim: AsyncScript
    settle: AsyncScript
    reschedule: AsyncScript
    unschedule: AsyncScript
    add_notification: AsyncScript
    provider_status: AsyncScript
    history_page: AsyncScript
    drop_stall: AsyncScript
    lock: AsyncScript
    unlock: AsyncScript
    ack: AsyncScript
    bury: AsyncScript
    record_test: AsyncScript

    @classmethod
    def register(cls, redis: Redis | RedisCluster) -> Scripts:
        """Register every script with ``redis`` (it loads them on their first call)."""
        return cls(**{name: script(redis, text) for name, text in SOURCES.items()})


def script(redis: Redis | RedisCluster, text: str) -> AsyncScript:
    """A script run through ``redis``, loaded on its first call (on each node of a Redis
    Cluster that meets it: the client sends SCRIPT LOAD to every primary)."""
    return AsyncScript(cast(Redis, redis), text)


#: name -> Lua source, for every field of ``Scripts``
SOURCES = {
    f.name: (files(__package__) / "lua" / f"{f.name}.lua").read_text(encoding="utf-8")
    for f in fields(Scripts)
}
