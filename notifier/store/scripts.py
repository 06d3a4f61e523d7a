"""The store's Lua scripts: read once from ``lua/<name>.lua`` at import, registered once
per store.

Every write that must be atomic is one script, so any number of API and worker processes
can share one Redis. Each file's header says what its KEYS and ARGV are and what it returns.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, fields
from importlib.resources import files
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError


class Script:
    """A Lua script, called by its SHA1 (EVALSHA). A server that does not know it yet (a
    fresh or restarted Redis, a replica a failover just promoted) gets the whole text once
    by EVAL, which goes where EVALSHA went (on a cluster, to the node of its KEYS' slot)
    and caches it there. (redis-py's own script loads it with SCRIPT LOAD, which on a
    cluster goes to the primaries the client last knew of: after a failover, not the new
    one, and every call failed with NoScriptError.)"""

    def __init__(self, redis: Redis | RedisCluster, text: str) -> None:
        self.registered_client = redis
        self.script = text  # the names redis-py's pipelines look for when they load it
        self.sha = hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()

    async def __call__(
        self, keys: Sequence[Any] = (), args: Sequence[Any] = (), client: Any = None
    ) -> Any:
        target: Any = self.registered_client if client is None else client
        if isinstance(target, Pipeline):
            pipe: Any = target
            pipe.scripts.add(self)  # loaded before the pipeline runs
            return await pipe.evalsha(self.sha, len(keys), *keys, *args)
        try:
            return await target.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await target.eval(self.script, len(keys), *keys, *args)


@dataclass(frozen=True, slots=True)
class Scripts:
    """One registered script per field, named like its file."""

    ingest: Script
    commit: Script
    claim: Script
    unclaim: Script
    settle: Script
    reschedule: Script
    unschedule: Script
    add_notification: Script
    provider_status: Script
    fold: Script
    shorten: Script
    read_records: Script
    compact: Script
    drop_stall: Script
    lock: Script
    unlock: Script
    ack: Script
    bury: Script
    record_test: Script
    hook_event: Script
    hook_claim: Script
    hook_settle: Script
    hook_endpoint: Script
    forget_consumers: Script
    note_fallback: Script

    @classmethod
    def register(cls, redis: Redis | RedisCluster) -> Scripts:
        """Register every script with ``redis`` (it loads them on their first call)."""
        return cls(**{name: script(redis, text) for name, text in SOURCES.items()})


def script(redis: Redis | RedisCluster, text: str) -> Script:
    """A script run through ``redis`` (sent whole the first time a server meets it)."""
    return Script(redis, text)


#: the Lua functions some scripts share (``lua/lib/<name>.lua``) -> the scripts they go
#: in front of
LIBRARIES = {
    "record": (
        "commit",
        "add_notification",
        "provider_status",
        "fold",
        "compact",
        "record_test",
        "read_records",
    ),
    "outcomes": ("commit", "add_notification", "provider_status"),
    "payload": ("commit", "add_notification", "claim"),
    "due": ("commit", "add_notification", "reschedule", "unschedule", "fold"),
}


def library(name: str) -> str:
    """The Lua of a library (``lua/lib/<name>.lua``), for a script kept elsewhere to go
    after."""
    return (files(__package__) / "lua" / "lib" / f"{name}.lua").read_text(encoding="utf-8")


def _source(name: str) -> str:
    """A script's Lua, after the libraries it uses."""
    used = [library(lib) for lib, users in LIBRARIES.items() if name in users]
    script_path = files(__package__) / "lua" / f"{name}.lua"
    return "".join([*used, script_path.read_text(encoding="utf-8")])


#: name -> Lua source, for every field of ``Scripts``
SOURCES = {f.name: _source(f.name) for f in fields(Scripts)}
