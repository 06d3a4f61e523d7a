"""The one place that turns Settings into live resources: Redis, templates, policies, channels."""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources as importlib_resources
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import hiredis
from arq.connections import ArqRedis
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import (
    AuthenticationError,
    DataError,
    RedisClusterException,
    RedisError,
    ResponseError,
    SlotNotCoveredError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from notifier import metrics
from notifier.channels import Channel, OutboxChannel
from notifier.errors import ConfigurationError
from notifier.insights.predict import Predictions
from notifier.logs import OutageLog
from notifier.models import ChannelKind
from notifier.outbound.directory import Subscriptions
from notifier.overrides import OverrideStore, Published
from notifier.policy import PolicyStore
from notifier.render import Renderer
from notifier.render.environment import TemplateStore
from notifier.render.i18n import Catalogs
from notifier.render.limits import Limits
from notifier.render.watch import TreeWatch
from notifier.settings import EmailChannelName, Settings, cluster_nodes
from notifier.store import Store, keys
from notifier.store.base import DataRedis, raised_in_redis_connection
from notifier.unsubscribe import LinkKey, derived

if TYPE_CHECKING:  # embedded mode only: imported when used
    from fakeredis import FakeServer

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    """The real clock; tests pass their own."""
    return datetime.now(UTC)


#: The repository this code runs from, when it runs from a checkout (an editable install,
#: as scripts/serve and scripts/test make, or ``python -m notifier`` in the source).
SOURCE_ROOT = Path(__file__).resolve().parent.parent
#: The merchant-editable trees, each with its setting.
TREES = ("templates", "locales", "policies")


def tree(
    name: str,
    configured: Path | None,
    *,
    source_root: Path = SOURCE_ROOT,
    package_root: Path | None = None,
) -> tuple[Path, str]:
    """Where a merchant-editable tree lives, and why: the setting; else the checkout this
    code runs from, where a developer edits it; else the copy installed with the package."""
    if configured is not None:
        return configured, f"NOTIFIER_{name.upper()}_DIR"
    checkout = source_root / name
    if (source_root / "pyproject.toml").is_file() and checkout.is_dir():
        return checkout, "the checkout notifier runs from"
    package = package_root or Path(str(importlib_resources.files("notifier")))
    packaged = package / "_data" / name
    if packaged.is_dir():
        return packaged, "installed with the package"
    return checkout, "the checkout notifier runs from"


def data_dir(name: str, configured: Path | None) -> Path:
    """Where a merchant-editable tree lives (see ``tree``)."""
    return tree(name, configured)[0]


def trees_in_use(settings: Settings) -> list[str]:
    """One line per tree: where it is and why, and a warning when the working directory
    has a tree of that name that is not the one in use (edits there would change nothing)."""
    lines = []
    for name in TREES:
        path, why = tree(name, getattr(settings, f"{name}_dir"))
        lines.append(f"{name}: {path} ({why})")
        here = Path.cwd() / name
        if here.is_dir() and here.resolve() != path.resolve():
            lines.append(
                f"warning: ./{name} is not in use, edits there change nothing: set "
                f"NOTIFIER_{name.upper()}_DIR={here} to use it"
            )
    return lines


def packed_in_c(connection: type[AbstractConnection]) -> type[AbstractConnection]:
    """``connection`` (plain, TLS or Unix socket, as the URL chose) with its commands packed
    by hiredis' C packer: the same bytes as redis-py's Python one (tested), four times faster
    on a script call's fifty arguments, where it was about 5 % of a worker's time."""

    class Packed(connection):  # type: ignore[valid-type,misc]
        def pack_command(self, *args: Any) -> list[bytes]:
            if b" " in (first := args[0].encode() if isinstance(args[0], str) else args[0]):
                args = (*first.split(), *args[1:])  # "CONFIG GET": two arguments
            try:
                return [hiredis.pack_command(args)]
            except TypeError as e:  # redis-py's error for what it cannot send (None, a list…)
                raise DataError(str(e)) from e

    Packed.__name__ = Packed.__qualname__ = f"Packed{connection.__name__}"
    return Packed


#: Redis's words when it refuses the URL's user name or password
_REFUSED_CREDENTIALS = re.compile(
    r"invalid username-password pair[^.;)]*|WRONGPASS[^.;)]*|NOAUTH[^.;)]*|"
    r"Authentication required[^.;)]*|AUTH <password> called without any password[^.;)]*"
)


class _Cluster(RedisCluster):
    """redis-py's cluster client, whose failures to reach the cluster are Redis errors like
    any other outage (a 503 with Retry-After at ingest, a retry in a worker), not a crash.
    redis-py 5.3 raises others for three of them (ingest answered 500, a worker exited):

    - no node named in NOTIFIER_REDIS_URL answers (``RedisClusterException``);
    - a slot without a master while a replica is promoted (``SlotNotCoveredError``);
    - a connection closed under a running command as the client follows a failover (an
      AttributeError from its connection module; on uvloop, the worker's loop, a
      RuntimeError: "unable to perform operation on <TCPTransport closed=True …>; the
      handler is closed", seen when a master was killed).
    """

    #: whether it ever learnt the cluster's layout: after that, a node that does not answer
    #: CLUSTER SLOTS as a cluster's (NOPERM, BUSY, restarted without cluster mode) is an
    #: outage like any other, not the set-up's error
    _met = False

    async def initialize(self) -> RedisCluster:
        try:
            found = await super().initialize()
        except RedisClusterException as exc:
            if "not enabled" in str(exc) and not self._met:  # a Redis without cluster mode
                raise
            refused = _REFUSED_CREDENTIALS.search(str(exc))
            if refused is not None and not self._met:
                # refused, not unreachable: it will refuse every retry (the set-up's error)
                raise AuthenticationError(refused.group(0)) from None
            raise RedisConnectionError(f"Redis Cluster: {exc}") from exc
        self._met = True
        return found

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().execute_command(*args, **kwargs)
        except (AttributeError, RuntimeError, SlotNotCoveredError) as exc:
            raise _as_outage(exc) from exc

    def pipeline(self, transaction: Any = None, shard_hint: Any = None) -> ClusterPipeline:
        super().pipeline(transaction, shard_hint)  # its refusals
        return _ClusterPipeline(self)  # type: ignore[abstract]  # (as redis-py makes its own)


class _ClusterPipeline(ClusterPipeline):
    """The pipeline of ``_Cluster``, with its outages read the same way."""

    async def execute(
        self, raise_on_error: bool = True, allow_redirections: bool = True
    ) -> list[Any]:
        try:
            return await super().execute(raise_on_error, allow_redirections)
        except (AttributeError, RuntimeError, SlotNotCoveredError) as exc:
            raise _as_outage(exc) from exc


#: uvloop's words for a write on a transport a failover closed
_CLOSED_TRANSPORT = re.compile(r"unable to perform operation on <\w*Transport closed=True")


def _as_outage(exc: AttributeError | RuntimeError | SlotNotCoveredError) -> BaseException:
    """A failover's error as a Redis connection error; any other AttributeError or
    RuntimeError as it is."""
    if isinstance(exc, AttributeError) and not raised_in_redis_connection(exc):
        return exc
    if isinstance(exc, RuntimeError) and not _CLOSED_TRANSPORT.match(str(exc)):
        return exc
    return RedisConnectionError(f"Redis Cluster: {type(exc).__name__}: {exc}")


def connect(settings: Settings, server: FakeServer | None = None) -> DataRedis:
    """The client of the data: the configured Redis or Redis Cluster, or the embedded
    in-memory ``server``."""
    if settings.redis_cluster and settings.redis_url:
        # one or more nodes of the cluster; the client learns the others and follows
        # failovers, and starts from any named node that answers
        url = urlsplit(settings.redis_url.replace("+cluster://", "://", 1))
        (host, port), *more = cluster_nodes(settings.redis_url)
        userinfo = url.netloc.rpartition("@")[0]
        first = f"{userinfo}@" if userinfo else ""
        netloc = f"{first}[{host}]:{port}" if ":" in host else f"{first}{host}:{port}"
        try:
            cluster: RedisCluster = _Cluster.from_url(
                url._replace(netloc=netloc).geturl(),
                startup_nodes=[ClusterNode(h, p) for h, p in more] or None,
                socket_timeout=settings.redis_timeout_s,
                socket_connect_timeout=settings.redis_timeout_s,
            )
        except (TypeError, ValueError, RedisClusterException) as exc:  # an option after ?
            raise ConfigurationError(
                "NOTIFIER_REDIS_URL: an option after ? that a Redis Cluster client does not "
                f"take, or not with that value ({_unexpected(exc)})"
            ) from None
        return cluster
    # one Redis: an ArqRedis too, so that without a queue Redis of its own arq shares it
    return _connect_one(settings, settings.redis_url, server)


def _unexpected(exc: Exception) -> str:
    """The option redis-py's error names, without the rest of its words (nor the URL)."""
    found = re.search(r"[Aa]rgument '(\w+)'", str(exc))
    return f"'{found.group(1)}'" if found else type(exc).__name__


def queue_beside(
    settings: Settings, redis: DataRedis, server: FakeServer | None = None
) -> ArqRedis:
    """arq's queue client beside the data's ``redis``: that same client on one Redis
    without NOTIFIER_QUEUE_REDIS_URL, else one of its own (close it apart)."""
    if not settings.queue_redis_url and isinstance(redis, ArqRedis):
        return redis
    return connect_queue(settings, server)


def connect_queue(settings: Settings, server: FakeServer | None = None) -> ArqRedis:
    """The client of arq's job queue: ``NOTIFIER_QUEUE_REDIS_URL``, else the data's Redis
    (or the embedded in-memory ``server``)."""
    return _connect_one(settings, settings.queue_redis_url or settings.redis_url, server)


def _connect_one(settings: Settings, url: str | None, server: FakeServer | None) -> ArqRedis:
    """A client of the Redis at ``url``, or of the embedded in-memory ``server`` without one."""
    if url:
        client: ArqRedis = ArqRedis.from_url(
            url,
            socket_timeout=settings.redis_timeout_s,
            socket_connect_timeout=settings.redis_timeout_s,
        )
        pool = client.connection_pool
        pool.connection_class = packed_in_c(pool.connection_class)
        return client
    if server is None:
        raise ConfigurationError("embedded mode needs the in-memory server to connect to")
    from fakeredis.aioredis import FakeRedis

    # fakeredis' own client class is a plain redis.asyncio.Redis; arq needs an
    # ArqRedis (enqueue_job), so borrow the connection pool that talks to the FakeServer.
    return ArqRedis(connection_pool=FakeRedis(server=server).connection_pool)


def build_providers(settings: Settings) -> dict[str, Channel]:
    """Every channel the settings make available, by name: the outbox, and each provider
    whose credentials are configured (a merchant may choose any of them)."""
    providers: dict[str, Channel] = {"outbox": OutboxChannel(settings.outbox_dir)}
    if settings.sendgrid_api_key:
        from notifier.channels.sendgrid import build_sendgrid  # aiohttp's client: when used

        providers["sendgrid"] = build_sendgrid(
            settings.sendgrid_api_key,
            base_url=settings.sendgrid_base_url,
            timeout_s=settings.provider_timeout_s,
            sender=settings.sendgrid_from,
        )
    if (
        settings.twilio_account_sid
        and settings.twilio_auth_token
        and (settings.twilio_from or settings.twilio_messaging_service_sid)
    ):
        from notifier.channels.twilio import build_twilio  # Twilio's SDK: when used

        providers["twilio"] = build_twilio(
            settings.twilio_account_sid,
            settings.twilio_auth_token,
            base_url=settings.twilio_base_url,
            from_number=settings.twilio_from,
            messaging_service_sid=settings.twilio_messaging_service_sid,
            timeout_s=settings.provider_timeout_s,
            status_callback=settings.public_url.rstrip("/") + "/v1/webhooks/twilio/status",
        )
    return providers


def sender(settings: Settings) -> str:
    """The From address: SendGrid's verified sender when SendGrid carries the email."""
    if settings.email_channel is EmailChannelName.SENDGRID and settings.sendgrid_from:
        return settings.sendgrid_from
    return settings.email_from


@dataclass
class Resources:
    """Everything the API and the worker share, built from one Settings."""

    settings: Settings
    #: the data (a Redis, the embedded one, or a Redis Cluster)
    redis: DataRedis
    #: arq's job queue: the same client as ``redis`` unless NOTIFIER_QUEUE_REDIS_URL is set
    queue: ArqRedis
    store: Store
    policies: PolicyStore
    #: merchants' published override files (the editor's), as this process last loaded them
    published: Published
    templates: TemplateStore
    renderer: Renderer
    #: the service's default channel per kind
    channels: dict[ChannelKind, Channel]
    #: every available channel by name (a merchant's brand.yaml may choose one)
    providers: dict[str, Channel]
    clock: Clock
    server: FakeServer | None
    #: which merchants' webhook endpoints take which events, and queueing them (``outbound``)
    hooks: Subscriptions
    #: each merchant's delivery-time model (``insights.predict``)
    predictions: Predictions
    #: the key one-click unsubscribe links are signed with (``unsubscribe.LinkKey``)
    links: LinkKey | None = None
    _digest_secret: str | None = None
    #: requests refused while the data Redis does not answer, logged without a flood
    outage: OutageLog = field(default_factory=lambda: OutageLog("Redis", log))

    async def link_secret(self) -> str:
        """The key of one-click unsubscribe links: the signing secret (embedded mode's own
        without one); with Redis and no secret, one derived from the deployment's key kept
        in Redis (``digest_secret``), so every process signs alike. Raises RedisError when
        Redis cannot be asked yet."""
        if self.settings.signing_secret or self.settings.embedded:
            return self.settings.signing_secret_value()
        secret = derived(await self.digest_secret())
        if self.links is not None:
            self.links.secret = secret
        return secret

    async def older_link_secrets(self) -> list[str]:
        """The key links were signed with before NOTIFIER_SIGNING_SECRET was set (derived
        from the deployment key in Redis), so that they keep working; none without the
        setting, or without that key (``DEL ntf:digest-key`` revokes them)."""
        if not self.settings.signing_secret or self.settings.embedded:
            return []
        kept = await self.redis.get(keys.DIGEST_SECRET_KEY)
        if not kept:
            return []
        return [derived(kept.decode() if isinstance(kept, bytes) else str(kept))]

    async def digest_secret(self) -> str:
        """The key of recipients' digests shared by every process (the last SMS to a number,
        which a reply is counted under: written by a worker, looked up by the API): the
        signing secret; without one, a key made once for the deployment and kept in Redis
        (each process made its own before, and replies were never counted)."""
        if self._digest_secret is None:
            if self.settings.signing_secret or self.settings.embedded:
                self._digest_secret = self.settings.signing_secret_value()
            else:
                made = secrets.token_hex(32)  # kept unless another process made one first
                found = await self.redis.set(keys.DIGEST_SECRET_KEY, made, nx=True, get=True)
                self._digest_secret = found.decode() if found else made
        return self._digest_secret


@asynccontextmanager
async def open_resources(
    settings: Settings, *, server: FakeServer | None = None, clock: Clock = utc_now
) -> AsyncIterator[Resources]:
    """Build the resources for ``settings``; the Redis connection is closed on exit.

    In embedded mode pass the same ``server`` to every user (API, worker) so they
    share one in-memory store; one is created when none is given.
    """
    if settings.embedded and server is None:
        from fakeredis import FakeServer

        server = FakeServer()
    metrics.configure(settings.metrics_dir)
    redis = connect(settings, server)
    queue = queue_beside(settings, redis, server)
    try:
        await refuse_a_mismatched_mode(settings, redis, queue)
        await refuse_a_refusing_redis(settings, redis, queue)
        await refuse_an_old_redis(settings, redis)
        await refuse_another_partition_count(settings, redis)
    except BaseException:
        await close_redis(redis)
        if queue is not redis:
            await queue.aclose(close_connection_pool=True)
        raise
    catalogs = Catalogs(data_dir("locales", settings.locales_dir))
    published = Published(OverrideStore(redis))
    templates = TemplateStore(
        data_dir("templates", settings.templates_dir),
        catalogs,
        published.templates,
        limits=Limits(settings.render_time_limit_s, settings.render_max_bytes),
    )
    watch = TreeWatch([templates.directory, catalogs.directory], settings.reload_interval_s)
    providers = build_providers(settings)
    # Settings refused a default channel whose credentials are missing, so both exist.
    channels: dict[ChannelKind, Channel] = {
        ChannelKind.EMAIL: providers[str(settings.email_channel)],
        ChannelKind.SMS: providers[str(settings.sms_channel)],
    }
    store = Store(
        redis,
        partitions=settings.partitions,
        idempotency_ttl_s=settings.idempotency_ttl_s,
        state_ttl_s=settings.state_ttl_s,
        wait_replicas=settings.ingest_wait_replicas,
        wait_timeout_ms=settings.ingest_wait_timeout_ms,
    )
    # signing one-click unsubscribe links: known now, or read from Redis (link_secret)
    shared = settings.signing_secret or settings.embedded
    links = LinkKey(settings.public_url, settings.signing_secret_value() if shared else None)
    try:
        yield Resources(
            settings=settings,
            redis=redis,
            queue=queue,
            store=store,
            policies=PolicyStore(data_dir("policies", settings.policies_dir), published.files),
            published=published,
            templates=templates,
            renderer=Renderer(
                templates,
                catalogs,
                email_from=sender(settings),
                watch=watch,
                published=published.files,
                unsubscribe=links.headers,
            ),
            channels=channels,
            providers=providers,
            clock=clock,
            server=server,
            hooks=Subscriptions(store),
            predictions=Predictions(store.carrier_stats),
            links=links,
        )
    finally:
        if queue is not redis:
            await queue.aclose(close_connection_pool=True)
        await close_redis(redis)
        for channel in {id(c): c for c in providers.values()}.values():
            close = getattr(channel, "close", None)
            if close is not None:
                close()
            aclose = getattr(channel, "aclose", None)
            if aclose is not None:
                await aclose()


async def refuse_a_refusing_redis(settings: Settings, redis: DataRedis, queue: ArqRedis) -> None:
    """A Redis that answers but refuses the URL's password or database will refuse it on
    every retry: say so at start-up, naming the setting, instead of waiting for it as for a
    Redis that does not answer yet (which is not checked here)."""
    if settings.embedded:
        return
    checks: list[tuple[str, Any]] = [("NOTIFIER_REDIS_URL", redis)]
    if queue is not redis:
        checks.append(("NOTIFIER_QUEUE_REDIS_URL", queue))
    for name, client in checks:
        try:
            await client.ping()
        except AuthenticationError as exc:
            raise ConfigurationError(
                f"{name}: Redis refused the credentials ({exc}): check the user name and "
                "password in the URL (redis://user:password@host:port/db)"
            ) from None
        except ResponseError as exc:
            if "DB index is out of range" not in str(exc):
                raise
            raise ConfigurationError(
                f"{name}: Redis has no such database (DB index is out of range): give a "
                "number below its `databases` setting (16 by default), such as /0"
            ) from None
        except (RedisError, RedisClusterException, OSError) as exc:
            # not answering yet: the processes wait for it, and the operator hears of it
            log.warning(
                "%s: Redis does not answer yet (%s): waiting for it; meanwhile ingest answers "
                "503 with Retry-After and /readyz names it",
                name,
                type(exc).__name__,
            )


async def refuse_a_mismatched_mode(settings: Settings, redis: DataRedis, queue: ArqRedis) -> None:
    """A Redis Cluster's node named as one Redis, or one Redis named as a cluster, fails
    only at the first command that hashes elsewhere, mid-traffic: say so at start-up, naming
    the setting. (A Redis that does not answer yet is not checked: the processes wait.)"""
    if settings.embedded:
        return
    checks: list[tuple[str, Redis, bool]] = []
    if queue is not redis:  # else checked as the data's Redis below
        checks.append(("NOTIFIER_QUEUE_REDIS_URL", queue, False))
    if isinstance(redis, RedisCluster):
        try:
            await redis.initialize()
        except RedisClusterException as exc:
            if "not enabled" in str(exc):
                raise ConfigurationError(
                    "NOTIFIER_REDIS_URL names a Redis without cluster mode: write redis:// "
                    "(redis+cluster:// is for a Redis Cluster)"
                ) from None
        except (RedisError, OSError):
            pass
    elif isinstance(redis, Redis):
        checks.append(("NOTIFIER_REDIS_URL", redis, True))
    for name, client, data in checks:
        try:
            clustered = (await client.info("cluster")).get("cluster_enabled") == 1
        except (RedisError, OSError):
            continue
        if clustered:
            hint = " write redis+cluster://host:port, and" if data else ""
            raise ConfigurationError(
                f"{name} names a node of a Redis Cluster:{hint} give arq's job queue a "
                "Redis of its own (NOTIFIER_QUEUE_REDIS_URL); arq cannot run on a cluster"
            )


async def refuse_another_partition_count(
    settings: Settings, redis: DataRedis, *, record: bool = True
) -> None:
    """On a Redis Cluster NOTIFIER_PARTITIONS decides the slot of every key (``keys.tag``):
    a process with another count finds none of the shipments, histories or event ids (a
    repost taken again, a message sent twice). The cluster keeps the count it was first
    written with (``keys.PARTITIONS_KEY``, set by the first process, atomically), and another
    is refused at start-up, naming both. (On one Redis the count only spreads the inbox over
    streams, whose drains take any partition: README, "Scaling out".) ``record``: False for
    ``check``, which only reads. A cluster that does not answer yet is not checked (the
    processes wait for it); one that refuses the command is said in the log."""
    if settings.embedded or not isinstance(redis, RedisCluster):
        return
    wanted = settings.partitions
    try:
        if record:
            stored = await redis.set(keys.PARTITIONS_KEY, wanted, nx=True, get=True)
        else:
            stored = await redis.get(keys.PARTITIONS_KEY)
    except (RedisConnectionError, RedisTimeoutError, OSError):
        return
    except (RedisError, RedisClusterException) as exc:  # NOPERM, READONLY...
        log.warning(
            "the partition count this Redis Cluster was written with could not be checked "
            "(%s: %s): every process must have the same NOTIFIER_PARTITIONS",
            type(exc).__name__,
            exc,
        )
        return
    try:
        before = None if stored is None else int(stored)
    except ValueError:
        log.warning("%s holds %r, not a partition count: not checked", keys.PARTITIONS_KEY, stored)
        return
    if before is None or before == wanted:
        return
    raise ConfigurationError(
        f"NOTIFIER_PARTITIONS is {wanted}, but the data in this Redis Cluster was written "
        f"with {before} partitions: every key's slot depends on it, so with another count "
        "the service finds none of its shipments, histories or event ids (a repost would be "
        f"taken again and its messages sent twice). Set NOTIFIER_PARTITIONS={before}"
    )


#: The oldest Redis the store's scripts run on: they use EXPIRETIME and EXPIRE's GT and LT
#: options, which came with Redis 7.0 (an older one fails every commit, mid-traffic).
OLDEST_REDIS = (7, 0)


async def refuse_an_old_redis(settings: Settings, redis: DataRedis) -> None:
    """Say at start-up that the data's Redis (each master of a cluster) is older than
    ``OLDEST_REDIS``, naming its version; one that does not answer yet is not checked."""
    if settings.embedded:
        return
    try:
        versions = await redis_versions(redis)
    except (RedisError, OSError):
        return
    for version in versions:
        numbers = tuple(int(x) for x in re.findall(r"\d+", version)[:2])
        if numbers and numbers < OLDEST_REDIS:
            raise ConfigurationError(
                f"NOTIFIER_REDIS_URL names Redis {version}: notifier needs Redis "
                f"{'.'.join(map(str, OLDEST_REDIS))} or later (its scripts use EXPIRETIME and "
                "EXPIRE's GT and LT options)"
            )


async def redis_versions(redis: DataRedis) -> list[str]:
    """The version of the data's Redis: on a cluster, of each node its client knows (every
    master, which run the scripts, and the replicas it has met)."""
    if isinstance(redis, RedisCluster):
        found = [await redis.info("server", target_nodes=n) for n in redis.get_nodes()]
    else:
        found = [await redis.info("server")]
    return [str(info.get("redis_version", "")) for info in found]


async def connected_replicas(redis: DataRedis) -> tuple[int, int]:
    """(replicas in sync with the data's primary, primaries that did not answer). On a
    cluster, of the primary that has fewest. Each primary the client knows is asked its
    role: one that is a replica now (a failover this process has not been redirected by
    yet) makes the client learn the layout again first."""
    if not isinstance(redis, RedisCluster):
        return _online(await redis.info("replication")), 0
    for _ in range(2):
        await redis.initialize()
        primaries = redis.get_primaries()
        online: list[int] = []
        moved = False
        for node in primaries:
            try:
                info = await redis.info("replication", target_nodes=node)
            except (RedisError, OSError):
                continue  # down: counted below
            if info.get("role") == "master":
                online.append(_online(info))
            else:
                moved = True
        if not moved:
            break
        await redis.aclose()  # its next call learns the layout again
    return min(online, default=0), len(primaries) - len(online)


def _online(info: dict[str, Any]) -> int:
    """Replicas whose link is up, by ``INFO replication`` (a replica still loading its
    first copy does not count: WAIT would not either)."""
    return sum(
        1
        for name, value in info.items()
        if name.startswith("slave") and isinstance(value, dict) and value.get("state") == "online"
    )


async def close_redis(redis: DataRedis) -> None:
    if isinstance(redis, Redis):
        await redis.aclose(close_connection_pool=True)
    else:
        await redis.aclose()


async def sync_published(res: Resources, merchant_ids: Iterable[str]) -> None:
    """Before a batch: load the merchants' published overrides again where they moved (a
    publish or a rollback in any process), and drop what was cached from the old ones."""
    for merchant_id in await res.published.sync(merchant_ids):
        res.renderer.forget(merchant_id)
        res.policies.invalidate(merchant_id)
