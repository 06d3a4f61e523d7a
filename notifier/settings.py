"""Settings: the one place that reads the environment (prefix ``NOTIFIER_``, or a ``.env`` file)."""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
import re
import secrets
from collections.abc import Iterable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import SplitResult, parse_qsl, urlsplit

from dotenv import dotenv_values
from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError
from redis.asyncio import connection as redis_connection

from notifier.errors import ConfigurationError

#: The API key embedded mode accepts when none is configured. It is printed at
#: start-up and only ever valid against the in-memory store on this machine: `serve`
#: refuses to listen beyond loopback with it, and the API takes it only from requests
#: addressed to a loopback name (``KeyRing``: a web page whose name was re-bound to
#: 127.0.0.1 must not use a key that is written in the README).
DEV_API_KEY = "dev-key-not-for-production"


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address, with or without its port or IPv6 brackets,
    as a Host header or ``--host`` gives it) is this machine's loopback: ``localhost``,
    127.0.0.0/8 or ``::1``. An empty host, ``0.0.0.0`` or ``::`` (every interface) is not,
    nor anything else after the name than a port."""
    found = _HOST.fullmatch(host.strip().lower())
    if found is None:
        return False
    name = found.group("v6") or found.group("name") or found.group("bare") or ""
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


#: a host as Host or --host give it: [IPv6](:port), name(:port), or a bare IPv6 address
_HOST = re.compile(
    r"\[(?P<v6>[0-9a-f:.]+)\](:\d+)?|(?P<name>[^:\[\]]+)(:\d+)?|(?P<bare>[0-9a-f:.]+)"
)


_PROCESS_SECRET = secrets.token_urlsafe(32)


class EmailChannelName(StrEnum):
    """Implementations that can carry email."""

    OUTBOX = "outbox"  #: write .eml files under the outbox directory
    SENDGRID = "sendgrid"  #: SendGrid's v3 mail API


class SmsChannelName(StrEnum):
    """Implementations that can carry SMS."""

    OUTBOX = "outbox"  #: write .sms.json files under the outbox directory
    TWILIO = "twilio"  #: Twilio's Messages API


class Settings(BaseSettings):
    """Typed configuration, read once; tests build ``Settings(...)`` directly."""

    model_config = SettingsConfigDict(
        env_prefix="NOTIFIER_", env_file=".env", extra="ignore", frozen=True
    )

    redis_url: str | None = Field(
        default=None,
        description=(
            "Redis to use; unset means the embedded in-memory mode. "
            "redis+cluster://host:port (or rediss+cluster://) names a node of a Redis Cluster, "
            "redis+cluster://host1:port1,host2:port2,... several (any one that answers will do)"
        ),
    )
    queue_redis_url: str | None = Field(
        default=None,
        description=(
            "the Redis that holds arq's job queue (drain jobs); unset: NOTIFIER_REDIS_URL. "
            "Required with a Redis Cluster, where arq cannot run"
        ),
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    api_keys: dict[str, list[str]] = Field(
        default_factory=dict,
        description=(
            'JSON object: API key -> merchant ids it may act for (["*"] = all); a key may be '
            'given as "sha256:<hex digest>" (`notifier hash-key`) so the settings never hold it'
        ),
    )
    outbox_dir: Path = Path("outbox")
    templates_dir: Path | None = None
    locales_dir: Path | None = None
    policies_dir: Path | None = None
    public_url: str = "http://127.0.0.1:8080"

    email_channel: EmailChannelName = EmailChannelName.OUTBOX
    sms_channel: SmsChannelName = SmsChannelName.OUTBOX
    email_from: str = Field(
        default="notifications@notifier.invalid",
        description="From address of outgoing email when the merchant sets none.",
    )

    twilio_account_sid: str | None = None
    twilio_auth_token: str | None = None
    twilio_from: str | None = None
    twilio_messaging_service_sid: str | None = None
    twilio_base_url: str = "https://api.twilio.com"
    sendgrid_api_key: str | None = None
    sendgrid_from: str | None = None
    sendgrid_base_url: str = "https://api.sendgrid.com"
    sendgrid_webhook_public_key: str | None = None
    signing_secret: str | None = Field(
        default=None,
        min_length=16,
        description="Signs one-click unsubscribe links (embedded mode: one per process).",
    )
    provider_timeout_s: float = Field(
        default=10.0, gt=0, description="How long a provider call may take before a retry."
    )

    max_body_bytes: int = Field(
        default=2 * 1024 * 1024, ge=1024, description="Largest request body accepted (413 above)."
    )
    max_batch: int = Field(default=1000, ge=1, le=10_000)
    idempotency_ttl_s: int = Field(
        default=30 * 24 * 3600, ge=60, description="How long an event_id is remembered."
    )
    state_ttl_s: int = Field(
        default=90 * 24 * 3600, ge=60, description="How long shipment state and history live."
    )
    retention_after_final_s: int = Field(
        default=30 * 24 * 3600,
        ge=60,
        description=(
            "How long a shipment's state, history and messages are kept once it is delivered "
            "or returned (at most state_ttl_s); opt-outs never expire."
        ),
    )
    partitions: Annotated[int, Field(ge=1, le=256)] = Field(
        default=8, description="Inbox streams; one shipment always maps to the same one."
    )
    worker_batch: int = Field(default=500, ge=1, le=10_000)
    worker_max_jobs: int = Field(default=16, ge=1)
    worker_poll_delay_s: float = Field(default=0.05, ge=0)
    worker_linger_s: float = Field(
        default=0.25,
        ge=0,
        description="How long a drain whose partition ran dry waits for more before it ends "
        "(at most half of redis_timeout_s): under a steady trickle the next event is picked "
        "up at once, not at the next job poll.",
    )
    claim_idle_s: float = Field(
        default=60.0, gt=0, description="Inbox entries unacknowledged this long are re-claimed."
    )
    redis_timeout_s: float = Field(default=2.0, gt=0)
    reload_interval_s: float = Field(
        default=1.0,
        ge=0,
        description="How often running processes look for edits of the template and locale "
        "trees (policies are looked at on every lookup).",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    #: requests per second one API key may make to one API process (0: no limit); bursts of
    #: ``rate_limit_burst`` are allowed. With N API processes a key gets up to N times this.
    rate_limit_per_s: float = Field(default=0, ge=0)
    rate_limit_burst: int = Field(default=50, ge=1)
    #: one line per event: text for people, json for a log pipeline (both redacted)
    log_format: Literal["text", "json"] = "text"
    #: the event loop `notifier serve` and `notifier worker` run on: ``auto``, each the one
    #: it measured faster on (``cli.AUTO_EVENT_LOOP``), or ``uvloop`` or ``asyncio`` for both
    event_loop: Literal["auto", "uvloop", "asyncio"] = "auto"
    ingest_signing_secrets: list[Annotated[str, Field(min_length=16)]] = Field(
        default_factory=list,
        description=(
            'JSON list of secrets; when set, POST /v1/transitions must carry "X-Notifier-'
            'Signature: t=<unix time>,v1=<hex HMAC-SHA256 of "<t>.<body>">" made with one of '
            "them (two during a rotation)"
        ),
    )
    ingest_signature_tolerance_s: int = Field(
        default=300,
        ge=1,
        le=3600,
        description="How far a signature's timestamp may be from the server's clock.",
    )
    ingest_wait_replicas: int = Field(
        default=0,
        ge=0,
        le=16,
        description=(
            "Replicas that must hold an ingested transition before the API answers 202 "
            "(Redis WAIT), and a message's claim before a worker sends it; 0 answers (and "
            "sends) once the primary has it."
        ),
    )
    ingest_wait_timeout_ms: int = Field(
        default=1000,
        ge=1,
        le=60_000,
        description="How long ingest waits for those replicas before answering 503.",
    )
    render_time_limit_s: float = Field(
        default=2.0,
        gt=0,
        le=60,
        description="How long rendering one message may take; past it the message fails "
        "(a merchant's template) or falls back to the defaults.",
    )
    render_max_bytes: int = Field(
        default=1024 * 1024,
        ge=16 * 1024,
        le=20 * 1024 * 1024,
        description="Largest rendered message (HTML, text or SMS) a template may produce.",
    )
    metrics_dir: Path | None = Field(
        default=None,
        description=(
            "Folder shared by every notifier process on one host (a tmpfs): /metrics then "
            "adds up the API and worker processes (prometheus-client's multiprocess mode). "
            "Unset: /metrics shows the API process and what Redis holds."
        ),
    )
    template_cache: bool = Field(
        default=True,
        description=(
            "Keep compiled templates on disk (NOTIFIER_TEMPLATE_CACHE_DIR) for the next "
            "process to start: a cold worker then loads them instead of compiling them."
        ),
    )
    template_cache_dir: Path | None = Field(
        default=None,
        description=(
            "Where compiled templates are kept: a folder of this user's that no one else can "
            "write to. Unset: $XDG_CACHE_HOME/notifier/templates, else "
            "~/.cache/notifier/templates."
        ),
    )
    merchant_hooks_allow_private: bool = Field(
        default=False,
        description=(
            "Let merchant webhook endpoints use http:// and private, loopback or reserved "
            "addresses (a receiver on this machine or the local network). Off: https only, "
            "and a name that resolves to such an address is refused."
        ),
    )

    @field_validator(
        "host",
        "outbox_dir",
        "templates_dir",
        "locales_dir",
        "policies_dir",
        "metrics_dir",
        "redis_url",
        "queue_redis_url",
        mode="before",
    )
    @classmethod
    def _not_empty(cls, value: Any) -> Any:
        # an empty value (a compose file's unset substitution) is no default: an empty host
        # listens on every interface, an empty folder is the working directory, an empty
        # Redis URL would be the embedded in-memory store (every event lost at a restart)
        if isinstance(value, str) and not value.strip():
            raise ValueError("is empty: give a value, or unset it for the default")
        return value

    @field_validator("redis_url", "queue_redis_url")
    @classmethod
    def _redis_url(cls, value: str | None, info: ValidationInfo) -> str | None:
        if not value:
            return None
        url = urlsplit(value)
        schemes = ["redis", "rediss", "unix"]
        if info.field_name == "redis_url":
            schemes += ["redis+cluster", "rediss+cluster"]
        if url.scheme not in schemes:
            raise ValueError("must start with " + ", ".join(f"{s}://" for s in schemes))
        if "#" in value or "@" in url.path or "@" in url.query:
            # a password cut at a "#", "/" or "?": its rest read as the port, the path or
            # the options (an "@" there); never quoted back, it may be a password's
            raise ValueError(_ENCODE)
        if url.scheme.endswith("+cluster"):
            cluster_nodes(value)  # each node named well
        else:
            _check_port(url)
            _check_options(url)
        database = url.path.strip("/")
        asked = [v for k, v in parse_qsl(url.query) if k == "db"]
        if url.scheme.endswith("+cluster") and ({database, *asked} - {"", "0"}):
            raise ValueError("a Redis Cluster has database 0 only: write no /<database>")
        if url.scheme in ("redis", "rediss") and database and not database.isdigit():
            # (redis-py read anything else as database 0)
            raise ValueError(
                f"the database after the host must be a number, like /0, not /{database[:20]}"
            )
        return value

    @field_validator("public_url", "twilio_base_url", "sendgrid_base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        url = urlsplit(value)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        if url.query or url.fragment:
            raise ValueError("must be a base URL, without ?query or #fragment")
        _check_port(url)
        return value

    @field_validator("email_from", "sendgrid_from")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is not None and not _BARE_ADDRESS.fullmatch(value):
            raise ValueError("must be an email address alone, like notifications@shop.example")
        return value

    @field_validator("sendgrid_webhook_public_key")
    @classmethod
    def _sendgrid_key(cls, value: str | None) -> str | None:
        if value:
            from sendgrid.helpers.eventwebhook import EventWebhook  # only when one is set

            try:
                EventWebhook(value)
            except (ValueError, TypeError):
                raise ValueError(
                    "must be the base64 public key SendGrid shows for its signed event webhook"
                ) from None
        return value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _api_keys_json(cls, value: object) -> object:
        # pydantic-settings already decodes JSON from the environment; a plain
        # string here comes from a .env file or a test and is decoded the same way.
        if isinstance(value, str):
            return json.loads(value) if value.strip() else {}
        return value

    @field_validator("api_keys")
    @classmethod
    def _api_keys_sane(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for key, merchants in value.items():
            if key.startswith(HASHED_KEY):
                if not re.fullmatch(r"[0-9a-f]{64}", key.removeprefix(HASHED_KEY)):
                    raise ValueError("a hashed key is sha256: and 64 lowercase hex digits")
            elif len(key) < 8:
                raise ValueError("every API key must be at least 8 characters long")
            if not merchants:
                raise ValueError("every API key must list at least one merchant id (or '*')")
        return value

    @model_validator(mode="after")
    def _channels_have_credentials(self) -> Settings:
        missing: list[str] = []
        if self.email_channel is EmailChannelName.SENDGRID:
            missing += [
                f"NOTIFIER_{name.upper()}"
                for name in ("sendgrid_api_key", "sendgrid_from")
                if not getattr(self, name)
            ]
        if self.sms_channel is SmsChannelName.TWILIO:
            missing += [
                f"NOTIFIER_{name.upper()}"
                for name in ("twilio_account_sid", "twilio_auth_token")
                if not getattr(self, name)
            ]
            if not (self.twilio_from or self.twilio_messaging_service_sid):
                missing.append("NOTIFIER_TWILIO_FROM or NOTIFIER_TWILIO_MESSAGING_SERVICE_SID")
        if missing:
            raise ValueError("the chosen channel needs " + ", ".join(missing))
        if self.ingest_wait_replicas and self.ingest_wait_timeout_ms > self.redis_timeout_s * 500:
            raise ValueError(
                "NOTIFIER_INGEST_WAIT_TIMEOUT_MS must be at most half of NOTIFIER_REDIS_TIMEOUT_S"
                " (a Redis call that takes longer is given up)"
            )
        if self.ingest_wait_replicas and not self.redis_url:
            raise ValueError(
                "NOTIFIER_INGEST_WAIT_REPLICAS needs NOTIFIER_REDIS_URL (embedded mode has no "
                "replicas)"
            )
        if self.queue_redis_url and not self.redis_url:
            raise ValueError("NOTIFIER_QUEUE_REDIS_URL needs NOTIFIER_REDIS_URL")
        if self.redis_cluster and not self.queue_redis_url:
            raise ValueError(
                "a Redis Cluster (NOTIFIER_REDIS_URL=redis+cluster://...) needs "
                "NOTIFIER_QUEUE_REDIS_URL: arq's job queue cannot live on a cluster"
            )
        if self.sendgrid_api_key and not self.sendgrid_from:
            # any merchant may choose SendGrid once it is configured, and it only sends
            # from a verified sender
            raise ValueError("NOTIFIER_SENDGRID_API_KEY needs NOTIFIER_SENDGRID_FROM")
        return self

    @property
    def redis_cluster(self) -> bool:
        """True when NOTIFIER_REDIS_URL names a Redis Cluster."""
        return bool(self.redis_url) and urlsplit(self.redis_url or "").scheme.endswith("+cluster")

    @property
    def embedded(self) -> bool:
        """True when no Redis is configured: in-memory store, worker in the API process."""
        return not self.redis_url

    def signing_secret_value(self) -> str:
        """The signing secret, or this process's own (embedded mode: one process). With
        Redis and no secret, links are signed with a key every process reads from Redis
        (``Resources.link_secret``), not with this."""
        if self.signing_secret:
            return self.signing_secret
        return _PROCESS_SECRET

    def effective_api_keys(self) -> dict[str, list[str]]:
        """Configured keys, or the development key in embedded mode when none are set."""
        if self.api_keys or not self.embedded:
            return self.api_keys
        return {DEV_API_KEY: ["*"]}


def cluster_nodes(url: str) -> list[tuple[str, int]]:
    """The nodes a ``redis+cluster://`` URL names: ``host:port``, or several separated by
    commas (``[::1]:7001`` for IPv6; the port defaults to 6379). ValueError naming a bad one."""
    netloc = urlsplit(url).netloc.rpartition("@")[2]
    nodes = []
    for i, node in enumerate(netloc.split(","), 1):
        try:
            one = urlsplit(f"//{node.strip()}")
            host, port = one.hostname, one.port or 6379
        except ValueError:
            # (not quoted: with a password cut at a "/" or "?", it holds part of it)
            raise ValueError(f"node {i} (after the //) does not read: {_ENCODE_WHY}") from None
        if not host:
            raise ValueError(f"node {i} (after the //) names no host")
        nodes.append((host, port))
    return nodes


#: How a Redis URL's password must be written; what a bad URL's error says instead of
#: quoting it (a password cut at a "#", "/" or "?" reads as the port, or as a path).
_ENCODE_WHY = (
    "its port after the host must be a number up to 65535, and a password holding #, /, ?, @ or : "
    "must be percent-encoded (%23, %2F, %3F, %40, %3A)"
)
_ENCODE = f"does not read as a URL: {_ENCODE_WHY}"


def _check_port(url: SplitResult) -> None:
    """ValueError when a URL's port is not a number (urlsplit parses it lazily), without
    quoting it."""
    try:
        url.port  # noqa: B018 (parsing it is the check)
    except ValueError:
        raise ValueError(_ENCODE) from None


#: The options of a Redis URL's query that redis-py reads from text: those it parses
#: (numbers, yes/no), and the connection's settings that are text themselves. Any other it
#: would hand the connection as text, which fails at the first command with a traceback.
_TEXT_OPTIONS = frozenset({"username", "password", "client_name", "lib_name", "lib_version"})
_TLS_OPTIONS = frozenset(
    {"ssl_keyfile", "ssl_certfile", "ssl_cert_reqs", "ssl_ca_certs", "ssl_ca_path"}
)


def _check_options(url: SplitResult) -> None:
    """ValueError naming an option of a Redis URL's query that redis-py cannot take as text,
    or one whose value does not read; never quoting a value (a blank one, which redis-py
    skips, is fine)."""
    known = set(redis_connection.URL_QUERY_ARGUMENT_PARSERS) | _TEXT_OPTIONS
    if url.scheme == "rediss":
        known |= _TLS_OPTIONS
    for name, value in parse_qsl(url.query):  # (blank values left out, as redis-py does)
        if name not in known:
            raise ValueError(
                f"has an option redis-py cannot take from a URL: {name!r} (after the ?; "
                f"one of {', '.join(sorted(known))})"
            )
        parse = redis_connection.URL_QUERY_ARGUMENT_PARSERS.get(name)
        if parse is not None:
            try:
                parse(value)
            except (TypeError, ValueError):
                raise ValueError(f"option {name!r} (after the ?) does not read") from None


#: An email address alone (no display name, no spaces or angle brackets): the sender's, which
#: the From header pairs with the merchant's name.
_BARE_ADDRESS = re.compile(r"[^@\s<>\"(),;]+@[^@\s<>\"(),;]+\.[^@\s<>\"(),;.]+")

#: How NOTIFIER_API_KEYS names a key by its SHA-256 instead of the key itself.
HASHED_KEY = "sha256:"

#: The .env file read beside the environment (relative to the working directory).
ENV_FILE = Path(".env")
#: NOTIFIER_ variables that something other than Settings reads: the tests' own Redis.
OTHER_VARIABLES = frozenset({"NOTIFIER_TEST_REDIS_URL"})


def variable(field: str) -> str:
    """The environment variable of a setting: ``api_keys`` -> ``NOTIFIER_API_KEYS``."""
    return f"NOTIFIER_{field.upper()}"


def unknown_variables(names: Iterable[str]) -> list[str]:
    """One problem per ``NOTIFIER_*`` name that is no setting, with the closest one."""
    known = sorted(variable(name) for name in Settings.model_fields)
    problems = []
    for name in sorted(set(names)):
        upper = name.upper()
        if not upper.startswith("NOTIFIER_") or upper in known or upper in OTHER_VARIABLES:
            continue
        close = difflib.get_close_matches(upper, known, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else " (see the README's Configuration)"
        problems.append(f"{name} is not a notifier setting{hint}")
    return problems


def load_settings(env_file: Path = ENV_FILE) -> Settings:
    """Settings from the environment and ``env_file``: the only reader of ``os.environ``.

    Refuses unknown ``NOTIFIER_*`` variables (a typo would silently fall back to a default,
    e.g. embedded mode), and turns a bad value into one line naming its variable, never
    the value (``NOTIFIER_API_KEYS`` holds secrets).
    """
    problems = unknown_variables(os.environ)
    if env_file.is_file():
        try:
            found = dotenv_values(env_file)
        except UnicodeDecodeError:
            raise ConfigurationError(f"{env_file}: not UTF-8 text") from None
        problems += [f"{p} in {env_file}" for p in unknown_variables(found)]
    if problems:
        raise ConfigurationError("; ".join(problems))
    try:
        return Settings(_env_file=env_file)
    except SettingsError as exc:
        # pydantic-settings could not decode a JSON value; its message names the field
        field = re.search(r'field "(\w+)"', str(exc))
        name = variable(field.group(1)) if field else "a NOTIFIER_ variable"
        raise ConfigurationError(
            f"{name} is not valid JSON"
            + (' (expected an object like {"k_backend": ["*"]})' if name.endswith("KEYS") else "")
        ) from None
    except ValidationError as exc:
        # Only the variable's name: deeper parts of a location can be secrets (the keys of
        # NOTIFIER_API_KEYS), and the input itself is never shown.
        problems = [
            f"{variable(str(e['loc'][0]))}: {e['msg'].removeprefix('Value error, ')}"
            if e["loc"]
            else e["msg"].removeprefix("Value error, ")
            for e in exc.errors(include_input=False, include_url=False)
        ]
        raise ConfigurationError("invalid settings: " + "; ".join(problems)) from None


def describe_redis(settings: Settings) -> str:
    """The mode in words, with the Redis host but never its password."""
    if settings.embedded:
        return "embedded (in-memory store, nothing persists; worker in the API process)"
    url = urlsplit(settings.redis_url or "")
    if settings.redis_cluster:
        queue = urlsplit(settings.queue_redis_url or "")
        nodes = ", ".join(f"{h}:{p}" for h, p in cluster_nodes(settings.redis_url or ""))
        return (
            f"Redis Cluster at {nodes}, job queue on Redis at "
            f"{queue.hostname or queue.path}:{queue.port or 6379}"
        )
    # as redis-py reads it: ?db= over the path's number; a socket's database only from ?db=
    asked = dict(parse_qsl(url.query)).get("db")
    if url.scheme == "unix":
        return f"Redis at the socket {url.path} (database {asked or '0'})"
    db = asked or url.path.strip("/") or "0"
    return f"Redis at {url.hostname}:{url.port or 6379} (database {db})"
