"""Fixtures: a real redis-server started for the session, Settings, API client, burst worker.

A missing redis-server fails the session: the tests never silently skip the
real component. Set NOTIFIER_TEST_REDIS_URL to use an already running Redis
instead (it is flushed before every test).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pytest
import redis
from aiohttp.test_utils import TestClient, TestServer
from babel.dates import format_skeleton, format_time

from bench.procs import free_port, node_ports, with_bus_ports
from notifier.app import create_app
from notifier.packing import unpack
from notifier.resources import Resources, data_dir, open_resources
from notifier.settings import Settings
from notifier.store import InboxEntry, Store, record, wake
from notifier.store.record import Record
from notifier.worker import build_worker

ADMIN_KEY = "k_backend_0123456789"
ACME_KEY = "k_acme_0123456789"
API_KEYS = {ADMIN_KEY: ["*"], ACME_KEY: ["acme"]}


def real_clock_env() -> dict[str, str]:
    """The environment for redis-server: without libfaketime, which the suite may run under
    to move the clock (README) but which cannot load into redis-server (its jemalloc calls
    clock_gettime while libfaketime initializes). Redis then keeps the real time while the
    code under test is a year off: clocks that disagree are part of what that run proves."""
    return {k: v for k, v in os.environ.items() if k != "LD_PRELOAD" and not k.startswith("FAKE")}


def start_redis(port: int, workdir: Path, *options: str) -> subprocess.Popen[bytes]:
    """A real redis-server on loopback ``port``, ready when this returns (``options`` are
    more command-line settings, e.g. ``--appendonly yes``)."""
    binary = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    )
    if binary is None:
        pytest.fail(
            "redis-server is not installed: run the README's test command "
            "(scripts/test installs it) or set NOTIFIER_TEST_REDIS_URL",
            pytrace=False,
        )
    args = ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir)]
    args += ["--daemonize", "no", *(options or ("--save", "", "--appendonly", "no"))]
    proc = subprocess.Popen(
        [binary, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        env=real_clock_env(),
    )
    client = redis.Redis(host="127.0.0.1", port=port)
    deadline = time.monotonic() + 20
    while True:  # readiness wait for the server process, not a test sleep
        try:
            # the server answering must be this one: another process may have taken the
            # port since it was found free (this one then exits), and tests would share it
            if client.info("server")["process_id"] == proc.pid:
                break
        except (redis.ConnectionError, redis.BusyLoadingError):
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            client.close()
            pytest.fail(f"redis-server did not start on port {port}", pytrace=False)
        time.sleep(0.02)
    client.close()
    return proc


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    configured = os.environ.get("NOTIFIER_TEST_REDIS_URL")
    if configured:
        yield configured
        return
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="notifier-redis-"))
    proc = start_redis(port, workdir)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(timeout=10)
    shutil.rmtree(workdir, ignore_errors=True)


# -- a Redis Cluster: 3 masters, 3 replicas and a queue Redis, for the session ------------


#: the cluster's nodes' own settings (``Cluster.restart`` starts one again with them)
CLUSTER_OPTIONS = (
    *("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"),
    *("--cluster-node-timeout", "3000", "--save", "", "--appendonly", "no"),
)


@dataclass
class Cluster:
    ports: list[int]
    queue_port: int
    workdir: Path = field(default_factory=Path)
    #: each node's redis-server process (a node a test restarted: its new one)
    procs: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)

    def restart(self, port: int) -> None:
        """Start a node a test stopped again, from its nodes.conf: it rejoins the cluster
        (a master whose replica took over comes back as that replica's replica)."""
        self.procs[port] = start_redis(port, self.workdir / str(port), *CLUSTER_OPTIONS)

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.ports[0]}"

    @property
    def queue_url(self) -> str:
        return f"redis://127.0.0.1:{self.queue_port}/0"

    def node(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port)

    def role(self, port: int) -> list[Any]:
        """The node's ROLE reply: ``b"master"`` first, or ``b"slave"`` and its master's
        host and port."""
        with self.node(port) as r:
            return list(r.execute_command("ROLE"))

    def is_master(self, port: int) -> bool:
        return bool(self.role(port)[0] == b"master")

    def masters(self) -> list[int]:
        return [port for port in self.ports if self.is_master(port)]

    def replica_of(self, master: int) -> int:
        """The port of ``master``'s replica."""
        for port in self.ports:
            role = self.role(port)
            if role[0] == b"slave" and role[2] == master:
                return port
        raise AssertionError(f"no replica of the master on port {master}")

    def ready(self) -> bool:
        """Every node sees the cluster as ok, with 3 masters each followed by a replica
        whose link is up."""
        for port in self.ports:
            with self.node(port) as r:
                if r.cluster("info").get("cluster_state") != "ok":
                    return False
        masters = self.masters()
        if len(masters) != 3:
            return False
        for port in masters:
            with self.node(port) as r:
                info = r.info("replication")
                if info.get("connected_slaves") != 1 or info["slave0"]["state"] != "online":
                    return False
        return True


def _cli() -> str:
    binary = shutil.which("redis-cli")
    if binary is None:
        pytest.fail("redis-cli is not installed: run the README's test command", pytrace=False)
    return binary


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    workdir = Path(tempfile.mkdtemp(prefix="notifier-cluster-"))
    ports = node_ports(6)
    procs: dict[int, subprocess.Popen[bytes]] = {}
    try:
        for port in ports:
            (workdir / str(port)).mkdir()
            procs[port] = start_redis(port, workdir / str(port), *CLUSTER_OPTIONS)
        queue_port = free_port(with_bus_ports(ports))
        (workdir / "queue").mkdir()
        procs[queue_port] = start_redis(queue_port, workdir / "queue")
        create = [_cli(), "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports)]
        subprocess.run(
            [*create, "--cluster-replicas", "1", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
            env=real_clock_env(),  # redis-cli cannot load libfaketime either
        )
        found = Cluster(ports, queue_port, workdir, procs)
        # a replica's first sync waits for Redis's diskless-sync delay (5 s)
        wait_until(found.ready, "the Redis Cluster to form", seconds=60)
        yield found
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            proc.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)


def flush_cluster(found: Cluster) -> None:
    """Empty every master of the cluster and its queue Redis (before a test)."""
    for port in found.masters():
        with found.node(port) as r:
            r.flushall()
    with redis.Redis(port=found.queue_port) as r:
        r.flushall()


@pytest.fixture(scope="session", autouse=True)
def _own_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The session's own cache folder (XDG_CACHE_HOME), for the processes and commands that
    keep compiled templates on disk (``notifier.render.compiled``): not the user's."""
    folder = tmp_path_factory.mktemp("xdg-cache")
    before = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(folder)
    yield folder
    if before is None:
        del os.environ["XDG_CACHE_HOME"]
    else:
        os.environ["XDG_CACHE_HOME"] = before


@pytest.fixture(autouse=True)
def _own_logging() -> Iterator[None]:
    """A test that configures logging in this process (`notifier serve` run by ``main``,
    ``logs.configure``) leaves no handler behind: its stream is the test's captured stderr,
    closed once the test ends, and later tests' log lines would fail on it."""
    root = logging.getLogger()
    handlers, level = set(root.handlers), root.level
    yield
    for handler in root.handlers[:]:  # (pytest's own capture handlers come and go by phase)
        if handler not in handlers and not type(handler).__module__.startswith("_pytest"):
            root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture(autouse=True)
def _no_tasks_left(request: pytest.FixtureRequest) -> None:
    """An async test leaves nothing running on the session's event loop (``_tasks_left``)."""
    if inspect.iscoroutinefunction(request.function):
        request.getfixturevalue("_tasks_left")


@pytest.fixture
async def _tasks_left(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """Tasks a test started and left running (a worker whose loop outlived its test) would
    go on in the next tests on this loop, with this test's settings: in CI one took the next
    tests' events and wrote their messages to this test's outbox. They are cancelled here,
    and the test that left them fails, naming them."""
    before = asyncio.all_tasks()
    yield
    await asyncio.sleep(0)  # callbacks the test's end scheduled
    me = asyncio.current_task()
    left = [t for t in asyncio.all_tasks() - before if t is not me and not t.done()]
    if not left:
        return
    for task in left:
        task.cancel()
    _, stuck = await asyncio.wait(left, timeout=10)
    names = ", ".join(sorted(f"{t.get_name()} ({t.get_coro()!r})" for t in left))
    pytest.fail(
        f"the test left tasks running ({len(left)}: {names})"
        + (f"; {len(stuck)} did not even stop when cancelled" if stuck else ""),
        pytrace=False,
    )


@pytest.fixture(autouse=True)
def _flush(request: pytest.FixtureRequest) -> None:
    if "redis_url" in request.fixturenames:
        client = redis.Redis.from_url(request.getfixturevalue("redis_url"))
        client.flushall()
        client.close()


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "api_keys": API_KEYS,
        "outbox_dir": tmp_path / "outbox",
        "worker_poll_delay_s": 0,
        "worker_linger_s": 0.02,
        "partitions": 4,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@pytest.fixture
def settings(tmp_path: Path, redis_url: str) -> Settings:
    return make_settings(tmp_path, redis_url=redis_url)


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[TestClient[Any, Any]]:
    async with TestClient(TestServer(create_app(settings))) as c:
        yield c


#: The tests' "now": after every event the tests post, in daylight in Europe (no quiet hours).
NOW = datetime(2026, 11, 21, 14, 0, tzinfo=UTC)


def local_day_and_time(moment: datetime, timezone: str, locale: str) -> tuple[str, str]:
    """How the locked Babel writes ``moment``'s day and short time for a reader in
    ``timezone`` and ``locale``: tests look for these instead of strings copied from one
    CLDR release (Babel 2.18 wrote "sam. 21 nov.", 2.19 writes "sam. 21 novembre")."""
    zone = ZoneInfo(timezone)
    day = format_skeleton("MMMMEEEEd", moment, tzinfo=zone, locale=locale)
    return str(day), str(format_time(moment, "short", tzinfo=zone, locale=locale))


def fixed_clock(at: datetime = NOW) -> Callable[[], datetime]:
    return lambda: at


async def run_worker(
    settings: Settings, clock: Callable[[], datetime] | None = None, **kwargs: Any
) -> int:
    """Run a burst worker (clock fixed at NOW unless given) until the queue is empty."""
    worker = build_worker(
        settings,
        burst=True,
        handle_signals=False,
        poll_delay_s=0,
        clock=clock or fixed_clock(),
        **kwargs,
    )
    try:
        await worker.main()
    finally:
        await worker.close()
    assert worker.jobs_failed == 0, f"{worker.jobs_failed} jobs failed"
    return int(worker.jobs_complete)


async def stop_worker(worker: Any, task: asyncio.Task[Any]) -> None:
    """Stop a worker running as ``task``: told to stop first, as its close() does (its jobs
    and loop are cancelled, and its next poll ends the loop even if that cancellation is
    lost inside redis-py), then closed once its loop has ended (nothing in flight on the
    connections it closes). A test that only cancelled the task hung in CI when the
    cancellation was lost, and left the worker running into the next tests."""
    worker.main_task = task
    worker.handle_sig(signal.SIGUSR1)
    done, _ = await asyncio.wait({task}, timeout=10)
    await worker.close()
    assert done, "the worker's loop went on after it was told to stop"


def with_macro(template: str, name: str, body: str) -> str:
    """``template`` (a message file) with macro ``name`` replaced by ``body`` (its line)."""
    start = "{%- macro " + name + "() -%}"
    lines = template.splitlines()
    [at] = [i for i, line in enumerate(lines) if line.startswith(start)]
    lines[at] = start + body + "{%- endmacro -%}"
    return "\n".join(lines) + "\n"


def just_now() -> str:
    """An occurred_at for a process that runs on the real clock: a minute ago (a transition
    of the fixed test day is weeks old there, and old news is recorded, not sent)."""
    return (datetime.now(UTC) - timedelta(minutes=1)).isoformat()


def transition(**overrides: Any) -> dict[str, Any]:
    """A valid transition as the tracking backend posts it."""
    body: dict[str, Any] = {
        "event_id": "evt_1",
        "merchant_id": "acme",
        "shipment_id": "shp_123",
        "tracking_number": "1Z999AA10123456784",
        "carrier": "ups",
        "status": "out_for_delivery",
        "occurred_at": "2026-11-21T09:30:00+01:00",
        "location": {
            "city": "Leipzig",
            "region": "SN",
            "country": "DE",
            "lat": 51.34,
            "lon": 12.37,
        },
        "tracking_url": "https://track.example.com/1Z999AA10123456784",
        "recipient": {
            "name": "Ana",
            "email": "ana@example.com",
            "phone": "+33612345678",
            "locale": "fr_FR",
            "timezone": "Europe/Paris",
        },
        "order": {"number": "1001"},
    }
    body.update(overrides)
    return body


def auth(key: str = ADMIN_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def outbox_files(settings: Settings, suffix: str = "") -> list[Path]:
    return sorted(p for p in settings.outbox_dir.rglob(f"*{suffix}") if p.is_file())


class Reader:
    """A process's output, read on a thread of its own as it comes."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        self.stream = proc.stdout
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self.lines.extend, args=(self.stream,))
        self.thread.start()

    def text(self) -> str:
        """All of it, once the process has ended."""
        self.thread.join(timeout=30)
        self.stream.close()
        return "".join(self.lines)


def emails_per_shipment(settings: Settings) -> Counter[str]:
    """How many emails the outbox holds for each shipment."""
    return Counter(p.parent.name for p in outbox_files(settings, ".eml"))


async def wake_every_partition(settings: Settings) -> None:
    """Enqueue a drain of each partition, as the worker's sweep does for those waiting."""
    async with open_resources(settings, clock=fixed_clock()) as res:
        await wake(res.queue, range(settings.partitions))


def process_env(workdir: Path, port: int, **env: str) -> dict[str, str]:
    """The ``NOTIFIER_*`` environment of `notifier serve` and `notifier worker` processes
    on the real clock, writing to ``workdir``/outbox: merchant acme's SMS never wait for
    quiet hours (the messages a test counts would come the next morning)."""
    policies = workdir / "policies"
    shutil.copytree(data_dir("policies", None), policies)
    (policies / "acme.yaml").write_text("quiet_hours: {sms: null}\n")
    return {
        "NOTIFIER_POLICIES_DIR": str(policies),
        "NOTIFIER_API_KEYS": json.dumps(API_KEYS),
        "NOTIFIER_OUTBOX_DIR": str(workdir / "outbox"),
        "NOTIFIER_PORT": str(port),
        "NOTIFIER_WORKER_POLL_DELAY_S": "0.05",
        **env,
    }


def shared_env(settings: Settings) -> dict[str, str]:
    """The NOTIFIER_* variables a spawned process needs to share ``settings``' Redis, keys,
    outbox and partitions with this test."""
    return {
        "NOTIFIER_REDIS_URL": str(settings.redis_url),
        "NOTIFIER_API_KEYS": json.dumps(API_KEYS),
        "NOTIFIER_OUTBOX_DIR": str(settings.outbox_dir),
        "NOTIFIER_PARTITIONS": str(settings.partitions),
    }


def spawn_notifier(args: list[str], cwd: Path, **env: str) -> subprocess.Popen[str]:
    """`notifier ARGS` as a real process with only the given NOTIFIER_* variables."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("NOTIFIER_")}
    return subprocess.Popen(
        [sys.executable, "-m", "notifier", *args],
        cwd=cwd,
        env={**clean, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def healthy(port: int) -> bool:
    """Whether a `notifier serve` on ``port`` answers its health check."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


@pytest.fixture
def primary_and_replica(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A redis-server and its replica, in sync: the primary's URL and the replica's process."""
    primary_port = free_port()
    replica_port = free_port([primary_port])  # both picked before either is bound
    (tmp_path / "p").mkdir()
    (tmp_path / "r").mkdir()
    primary = start_redis(primary_port, tmp_path / "p")
    replica = start_redis(
        replica_port, tmp_path / "r", "--replicaof", "127.0.0.1", str(primary_port)
    )
    try:
        watch = redis.Redis(port=replica_port)
        wait_until(
            lambda: watch.info("replication")["master_link_status"] == "up",
            "the replica to be in sync",
        )
        yield f"redis://127.0.0.1:{primary_port}/0", replica
    finally:
        for proc in (replica, primary):
            proc.kill()
            proc.wait()


def wait_until(predicate: Callable[[], bool], what: str, seconds: float = 20.0) -> None:
    """Bounded readiness wait for an external process (never used for in-process workers)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


async def post(client: Any, *items: dict[str, Any]) -> dict[str, Any]:
    """POST transitions as one batch with the admin key; they must all be accepted."""
    resp = await client.post("/v1/transitions", json={"transitions": list(items)}, headers=auth())
    assert resp.status == 202, await resp.text()
    body: dict[str, Any] = await resp.json()
    return body


def post_over_http(
    port: int, items: list[dict[str, Any]]
) -> tuple[int, dict[str, str], dict[str, Any]]:
    """POST a batch to a `notifier serve` on ``port``: (status, headers, body), whatever the
    status."""
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/transitions",
        data=json.dumps({"transitions": items}).encode(),
        headers={**auth(), "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, dict(resp.headers), json.load(resp)
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, dict(exc.headers), json.load(exc)


async def history(client: Any, shipment: str = "shp_123") -> list[dict[str, Any]]:
    """The recorded decisions of an acme shipment, through the API."""
    resp = await client.get(
        f"/v1/merchants/acme/shipments/{shipment}/notifications", headers=auth()
    )
    assert resp.status == 200
    decisions: list[dict[str, Any]] = (await resp.json())["decisions"]
    return decisions


async def record_of(store: Store, merchant_id: str, shipment_id: str) -> Record:
    """A shipment's record (``notifier/store/record.py``), also of one kept in three keys as
    before records."""
    [found] = await store.records([(merchant_id, shipment_id)])
    return found


async def rewrite_record(store: Store, merchant_id: str, shipment_id: str, **parts: Any) -> None:
    """Change parts of a shipment's record behind the store's back (as another worker, or a
    version before, might have left it), keeping its lifetime."""
    changed = replace(await record_of(store, merchant_id, shipment_id), **parts)
    key = store.state_key(merchant_id, shipment_id)
    await store.redis.set(key, record.blob(changed), keepttl=True)


def outcome_records(elements: list[bytes]) -> list[tuple[str, dict[str, Any]]]:
    """(notification id, what its worker recorded: {} for a provider's status report) of each
    record on an outcome list, read as the format says (lua/fold.lua, lua/lib/outcomes.lua)
    and not through the store's own reader: a record ``<id>\\t<header>\\t<packed>``, or a
    chunk ``\\x03<count>:<ids>\\t<ranks>\\t<packed [[id, header, recorded], ...]>``, or
    with packed ids ``\\x03<count>:\\x00<n>:<n ids of 16 bytes><ranks>\\t<packed [[position
    of the id, header, recorded], ...]>``, where a detail that named the id is kept as
    ``"dx": [before, after]``."""
    out: list[tuple[str, dict[str, Any]]] = []
    for element in elements:
        if element[0] == 3 and element[element.index(b":") + 1] == 0:
            count_end = element.index(b":")
            ids_end = element.index(b":", count_end + 2)
            held = int(element[count_end + 2 : ids_end])
            at = ids_end + 1
            ids = ["n_" + element[at + 16 * i : at + 16 * i + 16].hex() for i in range(held)]
            packed = element[at + 16 * held :].split(b"\t", 1)[1]
            for i, _, recorded in orjson.loads(unpack(packed)):
                if "dx" in recorded:
                    recorded["detail"] = ids[i].join(recorded.pop("dx"))
                out.append((ids[i], recorded))
        elif element[0] == 3:
            packed = element.split(b"\t", 2)[2]
            out += [(nid, recorded) for nid, _, recorded in orjson.loads(unpack(packed))]
        else:
            nid, _, packed = element.split(b"\t", 2)
            out.append((nid.decode(), orjson.loads(unpack(packed)) if packed else {}))
    return out


async def read_whole_inbox(res: Resources, consumer: str, count: int = 100) -> list[InboxEntry]:
    """What one worker reading every partition's inbox gets (the groups made first)."""
    await res.store.ensure_groups()
    entries: list[InboxEntry] = []
    for p in range(res.settings.partitions):
        entries += await res.store.read_inbox(p, consumer, count)
    return entries
