"""A merchant's own files kept in Redis: a draft, published versions, and an audit log.

The merchant editor (issue 13) writes here; the layered loader reads the published version
over the merchant's files in ``templates/`` and ``policies/``, over the defaults. A merchant's
override is a set of virtual files named like those of ``templates/<merchant_id>/``
(``brand.yaml``, ``messages/delivered.jinja``, ``email/layout.html``…) plus ``policy.yaml``
(the merchant's policy file). A merchant's catalogs are files in its folder only, so far.

- Every change is a **draft** until published; a draft names the revision it was saved at,
  so a publish checked against one revision never publishes another.
- **Publishing** makes a new version: the previous version's files with the draft's changes
  (a deleted file is a tombstone in the draft). Every version is kept, with who published
  it (an API key id, never the key), when, and which files changed. **Rolling back** to a
  version publishes its files as a new version: history only grows.
- Each merchant's keys share a hash tag (``{merchant}``), so every script stays in one slot.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson

from notifier.render.environment import TEMPLATE_NAME
from notifier.store import DataRedis, awaited, keys
from notifier.store.scripts import script

PREFIX = keys.OVERRIDES_PREFIX
#: What a draft holds for a file deleted in it.
TOMBSTONE = "\x00deleted"
#: The draft field with its revision (no file can be called this).
REVISION = "#rev"
#: The files a merchant may override.
PATH = re.compile(
    r"brand\.yaml|policy\.yaml|_labels\.jinja"
    # a message's wording (both channels), for every locale or for one (delivered.de.jinja),
    # and its variant b of an A/B test (delivered.b.jinja, delivered.b.de.jinja)
    r"|messages/[a-z_]{3,40}(\.b)?(\.[a-z]{2,3}(_[A-Za-z]{2,4})?)?\.jinja"
    r"|email/layout\.(html|txt)|sms/layout\.txt"
)
#: Largest file accepted (a message template is a few KB).
MAX_FILE_BYTES = 64 * 1024

# KEYS: draft, versions, live, audit. ARGV: author key id, time (ISO), revision checked.
_PUBLISH = """
local rev = redis.call('HGET', KEYS[1], '#rev') or '0'
if rev ~= ARGV[3] then return {-1, rev} end
local draft = redis.call('HGETALL', KEYS[1])
if #draft <= 2 then return {0, rev} end
local live = redis.call('GET', KEYS[3])
local files = {}
if live then files = cjson.decode(redis.call('HGET', KEYS[2], live))['files'] end
local changed = {}
for i = 1, #draft, 2 do
  local path, text = draft[i], draft[i + 1]
  if path ~= '#rev' then
    if text ~= '\\0deleted' then
      files[path] = text
      table.insert(changed, path)
    elseif files[path] ~= nil then  -- (removing what is not live changes nothing)
      files[path] = nil
      table.insert(changed, path)
    end
  end
end
local n = redis.call('HLEN', KEYS[2]) + 1
local record = {files = files, author = ARGV[1], at = ARGV[2], changed = changed}
redis.call('HSET', KEYS[2], tostring(n), cjson.encode(record))
redis.call('SET', KEYS[3], tostring(n))
-- the draft empties, its revision moves on: a number is never reused for other contents
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], '#rev', tostring(tonumber(rev) + 1))
redis.call('RPUSH', KEYS[4], cjson.encode({at = ARGV[2], key_id = ARGV[1],
  action = 'publish', version = n, paths = changed}))
return {n, rev}
"""

# KEYS: draft, audit, live, versions. ARGV: path, its new text ('' with ARGV[4] = 'hdel':
# drop the change), the audit entry, 'hset', 'hdel' or 'delete', and for 'delete' the audit
# entry of a discard: a deletion of a file the version in force does not hold drops the
# draft's change instead, decided here so that a publish in between cannot turn it into the
# wrong one. One script, not MULTI: a Redis Cluster pipeline has none. Returns {revision,
# 1 when the change was dropped}.
_EDIT = """
local mode, entry = ARGV[4], ARGV[3]
if mode == 'delete' then
  local live = redis.call('GET', KEYS[3])
  local held = false
  if live then
    local record = redis.call('HGET', KEYS[4], live)
    if record then
      local files = cjson.decode(record)['files']
      held = type(files) == 'table' and files[ARGV[1]] ~= nil
    end
  end
  if held then mode = 'hset' else mode, entry = 'hdel', ARGV[5] end
end
if mode == 'hdel' then
  redis.call('HDEL', KEYS[1], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
local rev = redis.call('HINCRBY', KEYS[1], '#rev', 1)
redis.call('RPUSH', KEYS[2], entry)
return {rev, mode == 'hdel' and 1 or 0}
"""

# KEYS: versions, live, audit, draft. ARGV: author key id, time (ISO), version to restore,
# the version the caller saw live ('' for any: then -3 when another is live now).
# A draft's revision moves, so a publish checked against the files before stays refused.
_ROLLBACK = """
if ARGV[4] ~= '' and (redis.call('GET', KEYS[2]) or '0') ~= ARGV[4] then return -3 end
local files = {}
if ARGV[3] ~= '0' then
  local old = redis.call('HGET', KEYS[1], ARGV[3])
  if not old then return -1 end
  files = cjson.decode(old)['files']
elseif not redis.call('GET', KEYS[2]) then
  return -2
end
local n = redis.call('HLEN', KEYS[1]) + 1
local record = {files = files, author = ARGV[1], at = ARGV[2], changed = {},
  restored = tonumber(ARGV[3])}
redis.call('HSET', KEYS[1], tostring(n), cjson.encode(record))
redis.call('SET', KEYS[2], tostring(n))
redis.call('RPUSH', KEYS[3], cjson.encode({at = ARGV[2], key_id = ARGV[1],
  action = 'rollback', version = n, restored = tonumber(ARGV[3])}))
if redis.call('EXISTS', KEYS[4]) == 1 then
  -- a draft's removal of a file the restored version has not is no change any more
  local draft = redis.call('HGETALL', KEYS[4])
  for i = 1, #draft, 2 do
    if draft[i + 1] == '\\0deleted' and files[draft[i]] == nil then
      redis.call('HDEL', KEYS[4], draft[i])
    end
  end
  redis.call('HINCRBY', KEYS[4], '#rev', 1)
end
return n
"""


class OverrideError(ValueError):
    """A change the override store refuses (the API turns it into a 4xx naming ``field``:
    the file's path, or the text that is wrong)."""

    def __init__(self, message: str, field: str = "path") -> None:
        super().__init__(message)
        self.field = field


class LiveMoved(OverrideError):
    """A rollback asked of a version in force that is no longer (another publish or
    rollback came first)."""

    def __init__(self, expected: int, live: int) -> None:
        self.expected, self.live = expected, live
        super().__init__(
            f"version {live} is live now, not version {expected} as when you looked: "
            "look at the versions again before rolling back"
        )


@dataclass(frozen=True, slots=True)
class Version:
    """One published version of a merchant's override."""

    number: int
    files: dict[str, str]
    author: str
    at: str
    #: files the draft changed (empty for a rollback)
    changed: list[str]
    #: the version a rollback restored
    restored: int | None = None

    def diff(self, previous: Version | None) -> str:
        """A unified diff of every file against ``previous`` (None: against nothing)."""
        before = previous.files if previous is not None else {}
        out: list[str] = []
        for path in sorted(before.keys() | self.files.keys()):
            old, new = before.get(path, ""), self.files.get(path, "")
            if old != new:
                out += difflib.unified_diff(
                    old.splitlines(keepends=True),
                    new.splitlines(keepends=True),
                    f"a/{path}" if path in before else "/dev/null",
                    f"b/{path}" if path in self.files else "/dev/null",
                )
        return "".join(out)


class OverrideStore:
    """Drafts, published versions and the audit log of merchants' overrides in Redis."""

    def __init__(self, redis: DataRedis) -> None:
        self.redis = redis
        self._publish = script(redis, _PUBLISH)
        self._rollback = script(redis, _ROLLBACK)
        self._edit = script(redis, _EDIT)

    @staticmethod
    def key(merchant_id: str, kind: str) -> str:
        return keys.override_key(merchant_id, kind)

    async def draft(self, merchant_id: str) -> tuple[int, dict[str, str | None]]:
        """(revision, changed files): a file's new text, or None where it is deleted."""
        raw = await awaited(self.redis.hgetall(self.key(merchant_id, "draft")))
        fields = {k.decode(): v.decode() for k, v in raw.items()}
        revision = int(fields.pop(REVISION, "0"))
        return revision, {p: (None if t == TOMBSTONE else t) for p, t in fields.items()}

    async def save(
        self, merchant_id: str, path: str, text: str | None, key_id: str, at: str
    ) -> int:
        """Put a file (``text``) or its deletion (None) in the draft; the new revision."""
        if not PATH.fullmatch(path):
            raise OverrideError(f"{path}: not a file a merchant can override")
        if text is not None and (size := len(text.encode())) > MAX_FILE_BYTES:
            raise OverrideError(
                f"{path}: {size:,} bytes, larger than {MAX_FILE_BYTES // 1024} KB "
                f"({MAX_FILE_BYTES:,} bytes), the most a file may hold",
                "text",
            )
        if text is not None and "\x00" in text:
            raise OverrideError(f"{path}: contains a NUL character", "text")
        entry = {"at": at, "key_id": key_id, "action": "delete" if text is None else "save"}
        revision, _ = await self._edit(
            keys=self._edited(merchant_id),
            args=[
                path,
                TOMBSTONE if text is None else text,
                orjson.dumps({**entry, "path": path}),
                "hset",
                "",
            ],
        )
        return int(revision)

    async def delete(self, merchant_id: str, path: str, key_id: str, at: str) -> int:
        """The file's deletion in the draft when the version in force holds it, else the
        draft's change of it dropped (a deletion of nothing would show as a removal of the
        file beneath), decided atomically with what is live; the new revision."""
        if not PATH.fullmatch(path):
            raise OverrideError(f"{path}: not a file a merchant can override")
        entry = {"at": at, "key_id": key_id, "path": path}
        revision, _ = await self._edit(
            keys=self._edited(merchant_id),
            args=[
                path,
                TOMBSTONE,
                orjson.dumps({**entry, "action": "delete"}),
                "delete",
                orjson.dumps({**entry, "action": "discard"}),
            ],
        )
        return int(revision)

    def _edited(self, merchant_id: str) -> list[str]:
        """The keys of ``_EDIT``."""
        return [self.key(merchant_id, k) for k in ("draft", "audit", "live", "versions")]

    async def discard(self, merchant_id: str, path: str, key_id: str, at: str) -> int:
        """Drop a file's change from the draft (the published text stays); the revision."""
        if not PATH.fullmatch(path):
            raise OverrideError(f"{path}: not a file a merchant can override")
        entry = {"at": at, "key_id": key_id, "action": "discard", "path": path}
        revision, _ = await self._edit(
            keys=self._edited(merchant_id), args=[path, "", orjson.dumps(entry), "hdel", ""]
        )
        return int(revision)

    async def publish(self, merchant_id: str, revision: int, key_id: str, at: str) -> int:
        """Publish the draft as it was at ``revision`` (the one that was validated): the
        new version's number, or 0 when the draft is empty. A draft saved since raises."""
        n, current = await self._publish(
            keys=[self.key(merchant_id, k) for k in ("draft", "versions", "live", "audit")],
            args=[key_id, at, str(revision)],
        )
        if int(n) < 0:
            raise OverrideError(
                f"the draft changed since revision {revision} (now {int(current)}): "
                "check it again before publishing"
            )
        return int(n)

    async def rollback(
        self, merchant_id: str, version: int, key_id: str, at: str, live: int | None = None
    ) -> int:
        """Publish the files of ``version`` again, as a new version; its number. Version 0
        is "nothing from the editor": the merchant's files and the defaults again. With
        ``live``, only while that version is the one in force (else LiveMoved)."""
        n = await self._rollback(
            keys=[self.key(merchant_id, k) for k in ("versions", "live", "audit", "draft")],
            args=[key_id, at, str(version), "" if live is None else str(live)],
        )
        if int(n) == -3:
            now = await awaited(self.redis.get(self.key(merchant_id, "live")))
            raise LiveMoved(live or 0, int(now or 0))
        if int(n) == -2:
            raise OverrideError("nothing is published: version 0 is what is live already")
        if int(n) < 0:
            raise OverrideError(f"no version {version}")
        return int(n)

    async def live(self, merchant_id: str) -> Version | None:
        """The published version in force, None before the first publish."""
        number = await awaited(self.redis.get(self.key(merchant_id, "live")))
        return await self.version(merchant_id, int(number)) if number else None

    async def live_numbers(self, merchant_ids: list[str]) -> dict[str, int]:
        """The version in force per merchant (0: none), in one round trip: what a worker
        compares with the versions it has loaded, before each batch."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for merchant_id in merchant_ids:
                pipe.get(self.key(merchant_id, "live"))
            numbers = await pipe.execute()
        return {m: int(n or 0) for m, n in zip(merchant_ids, numbers, strict=True)}

    async def version(self, merchant_id: str, number: int) -> Version | None:
        raw = await awaited(self.redis.hget(self.key(merchant_id, "versions"), str(number)))
        return _version(number, raw) if raw else None

    async def versions(self, merchant_id: str) -> list[Version]:
        """Every published version, oldest first."""
        raw = await awaited(self.redis.hgetall(self.key(merchant_id, "versions")))
        return sorted((_version(int(n), r) for n, r in raw.items()), key=lambda v: v.number)

    async def audit(self, merchant_id: str, limit: int = 100) -> list[dict[str, Any]]:
        """The latest ``limit`` changes, newest first: who (key id), what, when."""
        rows = await awaited(self.redis.lrange(self.key(merchant_id, "audit"), -limit, -1))
        return [orjson.loads(r) for r in reversed(rows)]


def _version(number: int, raw: bytes | str) -> Version:
    record = orjson.loads(raw)
    files = record.get("files") or {}  # cjson writes an empty table as {} or []
    return Version(
        number=number,
        files=dict(files) if isinstance(files, dict) else {},
        author=record.get("author", ""),
        at=record.get("at", ""),
        changed=list(record.get("changed") or []),
        restored=record.get("restored"),
    )


#: Files of an override that are templates (the others are brand.yaml and policy.yaml).
TEMPLATE = TEMPLATE_NAME


class Published:
    """The published override files in force, per merchant, as this process last loaded
    them: what the template, brand and policy lookups read (synchronously). ``sync``,
    awaited before each batch for the merchants in it, loads a merchant's files again when
    its published version moved (a publish or a rollback, in any process)."""

    def __init__(self, store: OverrideStore) -> None:
        self.store = store
        self._loaded: dict[str, tuple[int, dict[str, str]]] = {}

    def files(self, merchant_id: str) -> dict[str, str]:
        """Every published file of the merchant (none before its first publish)."""
        return self._loaded.get(merchant_id, (0, {}))[1]

    def version(self, merchant_id: str) -> int:
        return self._loaded.get(merchant_id, (0, {}))[0]

    def templates(self, merchant_id: str) -> dict[str, str]:
        return {p: t for p, t in self.files(merchant_id).items() if TEMPLATE.fullmatch(p)}

    async def sync(self, merchant_ids: Iterable[str]) -> set[str]:
        """Load what changed for these merchants; the merchants whose files changed."""
        wanted = sorted(set(merchant_ids))
        if not wanted:
            return set()
        changed = set()
        for merchant_id, number in (await self.store.live_numbers(wanted)).items():
            if number == self.version(merchant_id):
                continue
            version = await self.store.version(merchant_id, number) if number else None
            self._loaded[merchant_id] = (number, version.files if version else {})
            changed.add(merchant_id)
        return changed
