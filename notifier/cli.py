"""The ``notifier`` command: serve, worker, check."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import gc
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any, Literal

import orjson
from pydantic import ValidationError
from redis.exceptions import RedisError

from notifier import logs
from notifier.check import (
    check_all,
    check_warnings,
    default_brand_warning,
    published_problems,
    render_limits,
    sample_notification,
    samples,
    sms_table,
    startup_problems,
    untranslated,
)
from notifier.errors import ConfigurationError, NotifierError
from notifier.models import ChannelKind, ExceptionCode, Status, Transition
from notifier.render import Message, Renderer, SmsMessageOut, compiled
from notifier.render.environment import TemplateStore
from notifier.render.i18n import Catalogs
from notifier.resources import data_dir, sender, trees_in_use
from notifier.settings import (
    DEV_API_KEY,
    ENV_FILE,
    Settings,
    describe_redis,
    is_loopback,
    load_settings,
)

log = logging.getLogger("notifier")

#: On SIGTERM/SIGINT `serve` stops listening at once and answers the requests it has
#: started for up to this long (then cancels them) before it closes its resources.
SHUTDOWN_TIMEOUT_S = 15.0


def _settings() -> Settings:
    settings = load_settings()
    logs.configure(settings.log_format, settings.log_level)
    if settings.log_level != "DEBUG":
        # arq logs every job and cron tick at INFO (two lines every 5 s when idle), and
        # Twilio's SDK ten lines per SMS sent: only at DEBUG; their warnings still show
        logging.getLogger("arq.worker").setLevel(logging.WARNING)
        logging.getLogger("twilio").setLevel(logging.WARNING)
    return settings


def _cut(signum: int) -> None:
    """A second SIGTERM or SIGINT while `serve` stops: exit 1 now."""
    log.warning(
        "%s again: cutting the requests still in flight, exiting now",
        signal.Signals(signum).name,
    )
    logging.shutdown()  # (flushes the log before the exit that skips it)
    os._exit(1)


def _banner(settings: Settings, host: str, port: int) -> None:
    if settings.log_format == "json":  # a log pipeline reads every line: log lines only
        if settings.embedded:
            log.warning(
                "EMBEDDED MODE: in-memory store; nothing persists across restarts; messages "
                "are written to %s",
                settings.outbox_dir.resolve(),
            )
        if settings.embedded and not settings.api_keys:  # (a public, well-known key)
            log.warning("development API key: %s", DEV_API_KEY)
        log.info("notifier listening on http://%s:%d", host, port)
        return
    if settings.embedded:
        bar = "!" * 72
        print(bar, file=sys.stderr)
        print(
            "! EMBEDDED MODE: in-memory store; NOTHING PERSISTS across restarts.", file=sys.stderr
        )
        print("! Set NOTIFIER_REDIS_URL to keep state in Redis.", file=sys.stderr)
        if not settings.api_keys:
            print(f"! Development API key: {DEV_API_KEY}", file=sys.stderr)
        print(f"! Messages are written to {settings.outbox_dir.resolve()}", file=sys.stderr)
        print(bar, file=sys.stderr)
    print(f"notifier listening on http://{host}:{port}", file=sys.stderr)


#: Why a server cannot bind its address: a port in use, one it may not take, an address
#: this machine does not have.
_CANNOT_LISTEN = frozenset({errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL})


def _check_heartbeat(path: Path) -> None:
    """Refuse, at start-up, a heartbeat file the worker could never touch (a folder that
    does not exist, or that it may not write): the health check would fail for ever while
    the worker logged the same error every 5 s."""
    folder = path.parent
    if not folder.is_dir():
        raise ConfigurationError(f"--heartbeat {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK) and not (path.exists() and os.access(path, os.W_OK)):
        raise ConfigurationError(f"--heartbeat {path}: this user may not write it in {folder}")


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the API (and, in embedded mode, the worker in the same process)."""
    from notifier import serving
    from notifier.app import create_app

    settings = _settings()
    if not settings.embedded and not settings.api_keys:
        raise ConfigurationError("NOTIFIER_API_KEYS is required when NOTIFIER_REDIS_URL is set")
    host = args.host or settings.host
    if settings.embedded and not settings.api_keys and not is_loopback(host):
        raise ConfigurationError(
            f"NOTIFIER_API_KEYS is required to listen on {host or 'every interface'}: embedded "
            "mode's development key is public (it is in the README). Set keys, or listen on "
            "127.0.0.1"
        )
    port = settings.port if args.port is None else args.port
    if settings.embedded and "public_url" not in settings.model_fields_set and port:
        # the links this process signs (one-click unsubscribe) point at where it listens,
        # not at the default port (`serve --port 8096` signed links to :8080)
        where = host if is_loopback(host) else "127.0.0.1"
        where = f"[{where}]" if ":" in where else where
        settings = settings.model_copy(update={"public_url": f"http://{where}:{port}"})
    _start_up(settings)
    app = create_app(settings)

    def listening(bound: int) -> None:
        # called once the resources opened and the port is bound: a Redis refused at
        # start-up, or a port in use, never reads as listening (port 0: the one picked)
        _banner(settings, host, bound)

    def stopping() -> None:
        log.info(
            "stopping: no new connections; answering the requests in flight (at most %g s)",
            SHUTDOWN_TIMEOUT_S,
        )
        # A second signal cuts what remains: at once and in one line (through aiohttp's
        # handler it interrupted the shutdown half-way, with a traceback per request and
        # one for each resource left open). What a cut request stored is kept in Redis; its
        # caller gets no answer and retries, and is then told it is a duplicate.
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signum, _cut, signum)

    _settle_gc()
    try:
        serving.run(
            app,
            host,
            port,
            new_event_loop(settings, "serve"),
            listening=listening,
            stopping=stopping,
            grace_s=SHUTDOWN_TIMEOUT_S,
        )
    except socket.gaierror as exc:  # a host name that does not resolve
        raise ConfigurationError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    except OSError as exc:
        if exc.errno not in _CANNOT_LISTEN:
            raise
        # one line, as for a bad setting (aiohttp closed the resources on its way out)
        reason = os.strerror(exc.errno) if exc.errno is not None else str(exc)
        raise ConfigurationError(f"cannot listen on {host}:{port}: {reason.lower()}") from exc
    log.info("stopped")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """Run an arq worker against NOTIFIER_REDIS_URL."""
    from notifier.worker import build_worker

    settings = _settings()
    if settings.embedded:
        raise ConfigurationError(
            "NOTIFIER_REDIS_URL is not set: in embedded mode `notifier serve` runs the worker"
        )
    if args.heartbeat is not None:
        _check_heartbeat(args.heartbeat)
    _start_up(settings)
    asyncio.set_event_loop(new_event_loop(settings, "worker"))
    worker = build_worker(settings, heartbeat=args.heartbeat)
    _settle_gc()
    worker.run()
    log.info("stopped")
    return 0


def _start_up(settings: Settings) -> None:
    """Refuse to start on what the whole service stands on; say which trees it reads.

    Merchants' own files are not checked here (`notifier check` does): the cost would grow
    with merchants, and one merchant's broken file must not stop delivery for the others.
    """
    for line in trees_in_use(settings):
        if line.startswith("warning: "):
            log.warning(line.removeprefix("warning: "))
        else:
            log.info(line)
    _keep_compiled(settings)
    problems = startup_problems(settings)
    if problems:
        raise ConfigurationError("\n".join(problems))
    unreachable = default_brand_warning(settings)
    if unreachable:
        log.warning(unreachable)


def _keep_compiled(settings: Settings) -> None:
    """Keep compiled templates on disk for the next process (NOTIFIER_TEMPLATE_CACHE*)."""
    if not settings.template_cache:
        return
    folder = settings.template_cache_dir or compiled.default_folder()
    refused = compiled.COMPILED.keep_in(folder) if folder else "no home folder to keep them in"
    if refused:
        log.warning(
            "compiled templates are not kept on disk: %s (NOTIFIER_TEMPLATE_CACHE_DIR names "
            "another folder; NOTIFIER_TEMPLATE_CACHE=false turns this off)",
            refused,
        )


#: the event loop each long-running command runs on when NOTIFIER_EVENT_LOOP is ``auto``: the
#: faster one for its work in ``bench/`` (a worker spends about 5 % less CPU a transition on
#: uvloop's; the API ingested batches of 500 a quarter slower on it, single ones 4 %)
AUTO_EVENT_LOOP: dict[str, Literal["uvloop", "asyncio"]] = {"worker": "uvloop", "serve": "asyncio"}


def new_event_loop(settings: Settings, command: str) -> asyncio.AbstractEventLoop:
    """The event loop ``notifier <command>`` runs on (``NOTIFIER_EVENT_LOOP``); asyncio's
    where uvloop is not installed (it is not made for Windows)."""
    chosen = settings.event_loop
    if chosen == "auto":
        chosen = AUTO_EVENT_LOOP[command]
    loop: asyncio.AbstractEventLoop | None = None
    if chosen == "uvloop":
        try:
            import uvloop
        except ImportError:
            log.warning("uvloop is not installed here: running on asyncio's own event loop")
        else:
            log.info("event loop: uvloop %s", version("uvloop"))
            loop = uvloop.new_event_loop()
    if loop is None:
        log.info("event loop: asyncio's own")
        loop = asyncio.new_event_loop()
    loop.set_exception_handler(_redis_leftovers_quietly)
    return loop


#: What redis-py says of a client or pipeline collected with its connection still held
#: (it closes that connection itself): ``_DEL_MESSAGE`` of its classes.
_REDIS_LEFTOVERS = frozenset(
    {
        "Unclosed Redis client",
        "Unclosed Pipeline client",
        "Unclosed RedisCluster client",
        "Unclosed ClusterNode object",
    }
)


def _redis_leftovers_quietly(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The loop's handler of errors nothing awaited: a Redis pipeline a command left open
    when it was cut short (Redis stalled, a stop's cancellation) is a warning that says
    so, not an ERROR with the client's repr (seen in every drill of a stop during a Redis
    pause); everything else as asyncio logs it."""
    if context.get("message") in _REDIS_LEFTOVERS and "exception" not in context:
        log.warning(
            "%s left open by a Redis command cut short (Redis did not answer, or a stop "
            "cancelled it): redis-py closed its connection",
            str(context["message"]).removeprefix("Unclosed ").lower(),
        )
        return
    loop.default_exception_handler(context)


def _settle_gc() -> None:
    """Keep the cyclic GC off what start-up loaded, and let it run less often.

    Modules, compiled templates and catalogs live as long as the process, yet every
    full collection walked them all again: a fifth of a worker's time under load
    (`bench/`). They go to the permanent generation; the young generation is
    collected every 20,000 net allocations instead of 700.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)


def cmd_preview(args: argparse.Namespace) -> int:
    """Render one message with sample data and write it to a file (.html/.txt/.eml or .sms.txt)."""
    settings = _settings()
    _keep_compiled(settings)
    templates_dir = data_dir("templates", settings.templates_dir)
    catalogs = Catalogs(data_dir("locales", settings.locales_dir))
    renderer = Renderer(
        TemplateStore(templates_dir, catalogs, limits=render_limits(settings)),
        catalogs,
        email_from=sender(settings),
        strict=True,  # show the merchant's problem, not a fallback
    )
    sample = next(
        (
            t
            for t in samples()
            if t.status == args.status
            and (t.exception_code or None) == (args.exception_code or None)
        ),
        None,
    )
    if sample is None:
        raise ConfigurationError(
            f"no such message: --status {args.status}"
            + (f" --exception-code {args.exception_code}" if args.exception_code else "")
            + " (exception needs --exception-code, other statuses none)"
        )
    out = Path(args.output) if args.output else None
    wanted = (".sms.txt", ".txt") if args.channel == "sms" else (".html", ".txt", ".eml")
    if out is not None and not out.name.endswith(wanted):
        raise ConfigurationError(
            f"-o {out}: the {args.channel} preview is written as {' or '.join(wanted)}"
        )
    try:
        n = sample_notification(
            sample,
            ChannelKind(args.channel),
            merchant_id=args.merchant or "preview",
            shipment_id="preview",
            notification_id="n_preview",
            locale=args.locale,
            timezone=args.timezone,
            phone=args.phone,
        )
    except ValidationError as exc:  # --locale, --timezone or --phone
        flags = {"locale": "--locale", "timezone": "--timezone", "phone": "--phone"}
        raise ConfigurationError(
            "; ".join(
                f"{flags.get(str(e['loc'][-1]), str(e['loc'][-1]))}: "
                f"{e['msg'].removeprefix('Value error, ')}"
                for e in exc.errors(include_input=False, include_url=False)
            )
        ) from None
    if args.collected:
        if sample.status is not Status.DELIVERED:
            raise ConfigurationError("--collected is for --status delivered only")
        n = n.model_copy(update={"collected": True})
    message = renderer.render(n)
    try:
        return _write_preview(message, sample, args, out)
    except OSError as exc:
        raise ConfigurationError(
            f"cannot write the preview: {exc.strerror}: {exc.filename}"
        ) from None


def _write_preview(
    message: Message, sample: Transition, args: argparse.Namespace, out: Path | None
) -> int:
    """Write the rendered preview where ``-o`` (or its default name) says; say where."""
    if isinstance(message, SmsMessageOut):
        text = f"{message.body}\n\n[{message.encoding}, {message.segments} segment(s)]\n"
        path = out or Path(f"preview-{sample.milestone.replace(':', '-')}-{args.locale}.sms.txt")
        path.write_text(text, encoding="utf-8")
    else:
        path = out or Path(f"preview-{sample.milestone.replace(':', '-')}-{args.locale}.html")
        if path.suffix == ".eml":
            from notifier.channels.outbox import build_eml

            path.write_bytes(build_eml(message, sample.occurred_at))
        elif path.suffix == ".txt":
            path.write_text(f"Subject: {message.subject}\n\n{message.text}", encoding="utf-8")
        else:
            path.write_text(message.html, encoding="utf-8")
    print(f"wrote {path}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Validate settings, policies and templates of every merchant; exit 1 listing each
    problem once. First say what this configuration is: mode, .env, trees."""
    settings = _settings()
    if args.sms_table:
        print("locale   encoding      +33  +1  +1 with links.short_base   (most SMS segments)")
        for locale, encodings, fr, us, short in sms_table(settings):
            print(f"{locale:<8} {encodings:<13} {fr:>3} {us:>3} {short:>3}")
        return 0
    print(f"mode: {describe_redis(settings)}")
    _keep_compiled(settings)
    env = ENV_FILE.resolve()
    print(f".env: {env}" if env.is_file() else f".env: none ({env} does not exist)")
    notes = trees_in_use(settings)
    for line in notes:
        print(line)
    missing, unsure = untranslated(settings)  # (extracting templates once for both)
    problems = check_all(settings) + missing + asyncio.run(published_problems(settings))
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    for warning in check_warnings(settings) + unsure:
        print(f"warning: {warning}", file=sys.stderr)
    if problems:
        return 1
    print("ok: settings, policies and templates are valid")
    return 0


def cmd_dead_letters(args: argparse.Namespace) -> int:
    """List, show, replay or purge the dead letters of NOTIFIER_REDIS_URL."""
    wants_ids = args.action in ("replay", "purge")
    if args.action == "show" and len(args.ids) != 1:
        raise ConfigurationError("dead-letters show takes one id")
    if wants_ids and bool(args.ids) == args.all:
        raise ConfigurationError(f"dead-letters {args.action} takes ids, or --all (not both)")
    if args.action == "list" and args.ids:
        raise ConfigurationError("dead-letters list takes no ids (use show)")
    settings = _settings()
    if settings.embedded:
        raise ConfigurationError(
            "NOTIFIER_REDIS_URL is not set: in embedded mode the dead letters live in the "
            "memory of `notifier serve` (GET /healthz counts them) and end with it"
        )
    try:
        return asyncio.run(_dead_letters(args, settings))
    except (RedisError, OSError) as exc:
        raise ConfigurationError(
            f"cannot read the dead letters: Redis ({describe_redis(settings)}) answered "
            f"{type(exc).__name__}: {exc}"
        ) from None


async def _dead_letters(args: argparse.Namespace, settings: Settings) -> int:
    from datetime import UTC, datetime

    from notifier.deadletters import DeadLetter, DeadLetters, masked
    from notifier.resources import close_redis, connect, connect_queue
    from notifier.store import Store

    redis = connect(settings)
    queue = connect_queue(settings)
    store = Store(
        redis,
        partitions=settings.partitions,
        idempotency_ttl_s=settings.idempotency_ttl_s,
        state_ttl_s=settings.state_ttl_s,
    )
    dead = DeadLetters(redis, store, queue)

    def show(body: dict[str, object]) -> object:
        return body if args.reveal else masked(body)

    async def find(entry_id: str) -> DeadLetter | None:
        """The dead letter with this id, in the list ``--kind`` names (a purge is for good)."""
        one = await dead.show(entry_id)
        return None if one is None or (args.kind and one.kind != args.kind) else one

    try:
        if args.action == "list":
            letters = await dead.list(args.kind, args.limit)
            print("kind\tid\tmerchant\tshipment\twhy")
            for letter in letters:
                print(letter.summary())
            counts = await store.dead_letters()
            total = {"inbox": counts["inbox"], "messages": counts["notifications"]}
            held = total[args.kind] if args.kind else sum(total.values())
            shown = f" ({len(letters)} shown: --limit {args.limit})" if len(letters) < held else ""
            print(f"{held} dead letter(s){shown}", file=sys.stderr)
            return 0
        if args.action == "show":
            one = await find(args.ids[0])
            if one is None:
                print(f"error: no dead letter {args.ids[0]}", file=sys.stderr)
                return 1
            print(one.summary())
            print(orjson.dumps(show(one.body), option=orjson.OPT_INDENT_2).decode())
            return 0
        if args.all:
            letters = await dead.list(args.kind, 1_000_000)
        else:
            found = [await find(i) for i in args.ids]
            missing = [i for i, f in zip(args.ids, found, strict=True) if f is None]
            if missing:
                among = f" among the {args.kind} dead letters" if args.kind else ""
                print(f"error: no dead letter {', '.join(missing)}{among}", file=sys.stderr)
                return 1
            letters = [f for f in found if f is not None]
        if args.action == "purge" and not args.yes:
            print(
                f"error: purging drops {len(letters)} dead letter(s) for good: add --yes",
                file=sys.stderr,
            )
            return 2
        now_ms = int(datetime.now(UTC).timestamp() * 1000)
        for letter in letters:
            if args.action == "replay":
                done = await dead.replay(letter, now_ms, force=args.force)
                print(f"{letter.kind}\t{letter.id}\t{done}")
            else:
                await dead.purge(letter)
                print(f"{letter.kind}\t{letter.id}\tpurged")
        return 0
    finally:
        await close_redis(redis)
        await queue.aclose(close_connection_pool=True)


def cmd_hash_key(args: argparse.Namespace) -> int:
    """Print the NOTIFIER_API_KEYS name of a key read from standard input (never argv,
    which other users of the machine can see)."""
    import hashlib

    from notifier.settings import HASHED_KEY

    try:
        key = sys.stdin.readline().strip()
        key.encode()
    except (UnicodeDecodeError, UnicodeEncodeError):
        raise ConfigurationError("the key on standard input is not UTF-8 text") from None
    if len(key) < 8:
        raise ConfigurationError("give the key (at least 8 characters) on standard input")
    print(HASHED_KEY + hashlib.sha256(key.encode()).hexdigest())
    return 0


def _whole(low: int, high: int | None, name: str) -> Callable[[str], int]:
    """An argparse type: a whole number from ``low`` to ``high``; argparse names the flag
    and ``name`` when it is not one ("invalid port (0-65535) value: '70000'")."""

    def parse(text: str) -> int:
        number = int(text)
        if number < low or (high is not None and number > high):
            raise ValueError(text)
        return number

    parse.__name__ = name
    return parse


_port = _whole(0, 65535, "port (0-65535)")
_at_least_one = _whole(1, None, "number (1 or more)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="notifier",
        description="The notifier command: serve the API, run workers, check the trees.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the API (embedded mode: and the worker)")
    serve.add_argument("--host", help="listen address (default NOTIFIER_HOST)")
    serve.add_argument("--port", type=_port, help="listen port (default NOTIFIER_PORT)")
    serve.set_defaults(func=cmd_serve)
    worker = sub.add_parser("worker", help="run an arq worker against NOTIFIER_REDIS_URL")
    worker.add_argument(
        "--heartbeat",
        type=Path,
        help="touch this file every 5 s while the worker can reach Redis (for health checks)",
    )
    worker.set_defaults(func=cmd_worker)
    check = sub.add_parser("check", help="validate settings, policies and templates")
    check.add_argument(
        "--sms-table",
        action="store_true",
        help="print the most SMS segments per locale (+33, +1, +1 with a short-link base)",
    )
    check.set_defaults(func=cmd_check)
    sub.add_parser(
        "hash-key", help="print a key's sha256: form for NOTIFIER_API_KEYS (key on stdin)"
    ).set_defaults(func=cmd_hash_key)
    dead = sub.add_parser(
        "dead-letters", help="list, show, replay or purge the dead letters (needs Redis)"
    )
    dead.add_argument("action", choices=["list", "show", "replay", "purge"])
    dead.add_argument("ids", nargs="*", help="inbox entry ids (1733…-0) or notification ids")
    dead.add_argument("--kind", choices=["inbox", "messages"], help="one list only")
    dead.add_argument("--all", action="store_true", help="replay or purge every one listed")
    dead.add_argument(
        "--limit", type=_at_least_one, default=100, help="list at most this many (100)"
    )
    dead.add_argument("--reveal", action="store_true", help="show recipients' personal data")
    dead.add_argument("--yes", action="store_true", help="confirm a purge")
    dead.add_argument(
        "--force",
        action="store_true",
        help="replay an SMS whose update went out by email instead (sent twice, then)",
    )
    dead.set_defaults(func=cmd_dead_letters)
    preview = sub.add_parser("preview", help="render one message with sample data to a file")
    preview.add_argument("--status", required=True, choices=[s.value for s in Status])
    preview.add_argument("--exception-code", choices=[c.value for c in ExceptionCode])
    preview.add_argument("--locale", default="en", help="e.g. fr_CA, pt_BR, ar (default en)")
    preview.add_argument("--channel", choices=["email", "sms"], default="email")
    preview.add_argument("--merchant", help="use templates/<merchant>/ and its brand.yaml")
    preview.add_argument("--timezone", default="Europe/Paris")
    preview.add_argument("--phone", default="+33612345678", help="SMS recipient (+1... adds STOP)")
    preview.add_argument(
        "--collected",
        action="store_true",
        help="delivered only: as a parcel the customer collected from a pickup point",
    )
    preview.add_argument("-o", "--output", help="file to write (.html, .txt or .eml for email)")
    preview.set_defaults(func=cmd_preview)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logs.configure()
    try:
        return int(args.func(args))
    except NotifierError as exc:  # a bad setting, brand or template: one clear line
        print(f"error: {exc}", file=sys.stderr)
        return 2
