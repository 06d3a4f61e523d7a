"""Which Redis the service runs on: one older than the store's scripts need is refused at
start-up, naming its version; a queue Redis of its own holds arq's jobs and nothing else.

Debian's redis-server is 7.0; an older one (Ubuntu 22.04 ships 6.0) would fail every
commit mid-traffic. No Redis 6 can be installed here, so a small server on loopback that
speaks Redis's protocol answers as one: ``INFO`` says its version, everything else is
acknowledged.
"""

from __future__ import annotations

import json
import signal
import socketserver
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from aiohttp.test_utils import TestClient, TestServer

from notifier.app import create_app
from notifier.errors import ConfigurationError
from notifier.resources import connect, open_resources, redis_versions
from tests.conftest import (
    API_KEYS,
    Cluster,
    flush_cluster,
    free_port,
    history,
    make_settings,
    outbox_files,
    post,
    run_worker,
    spawn_notifier,
    start_redis,
    transition,
)


class _Resp(socketserver.StreamRequestHandler):
    """One client: reads commands (arrays of bulk strings), answers each."""

    version = "6.2.14"

    def handle(self) -> None:
        while line := self.rfile.readline():
            if not line.startswith(b"*"):
                return
            words = []
            for _ in range(int(line[1:])):
                size = int(self.rfile.readline()[1:])
                words.append(self.rfile.read(size + 2)[:-2].decode())
            self.wfile.write(self.answer([w.upper() for w in words]))

    def answer(self, words: list[str]) -> bytes:
        if words[0] == "INFO":
            section = words[1] if len(words) > 1 else "SERVER"
            text = {
                "SERVER": f"# Server\r\nredis_version:{self.version}\r\nredis_mode:standalone\r\n",
                "CLUSTER": "# Cluster\r\ncluster_enabled:0\r\n",
            }.get(section, "")
            return b"$%d\r\n%s\r\n" % (len(text), text.encode())
        if words[0] == "PING":
            return b"+PONG\r\n"
        return b"+OK\r\n"


def _serve(version: str) -> Iterator[int]:
    handler = type("Handler", (_Resp,), {"version": version})
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def redis6() -> Iterator[int]:
    """The port of a server that answers as Redis 6.2."""
    yield from _serve("6.2.14")


async def test_a_redis_before_7_is_refused_naming_its_version(
    redis6: int, tmp_path: Path, redis_url: str
) -> None:
    settings = make_settings(tmp_path, redis_url=f"redis://127.0.0.1:{redis6}/0")
    with pytest.raises(ConfigurationError) as caught:
        async with open_resources(settings):
            pass
    assert str(caught.value) == (
        "NOTIFIER_REDIS_URL names Redis 6.2.14: notifier needs Redis 7.0 or later (its "
        "scripts use EXPIRETIME and EXPIRE's GT and LT options)"
    )
    # the real one (7.0 and later) starts, and arq's queue on the old one is not refused:
    # arq needs no more than Redis 5
    ok = make_settings(tmp_path, redis_url=redis_url, queue_redis_url=f"redis://127.0.0.1:{redis6}")
    async with open_resources(ok) as res:
        assert (await res.redis.info("server"))["redis_version"] >= "7"


def test_serve_and_worker_say_so_in_one_line_and_exit(redis6: int, tmp_path: Path) -> None:
    env = {
        "NOTIFIER_REDIS_URL": f"redis://127.0.0.1:{redis6}/0",
        "NOTIFIER_API_KEYS": json.dumps(API_KEYS),
        "NOTIFIER_SIGNING_SECRET": "0123456789abcdef0123",
        "NOTIFIER_PORT": str(free_port()),
    }
    for command in (["serve"], ["worker"]):
        proc = spawn_notifier(command, tmp_path, **env)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 2, out
        assert "error: NOTIFIER_REDIS_URL names Redis 6.2.14: notifier needs Redis 7.0" in out
        assert "Traceback" not in out
        assert "listening" not in out  # `serve` says so once its resources opened


@pytest.fixture
def queue_redis(tmp_path: Path) -> Iterator[redis.Redis]:
    """A second real redis-server, for arq's queue alone."""
    port = free_port()
    proc = start_redis(port, tmp_path)
    client = redis.Redis(host="127.0.0.1", port=port)
    yield client
    client.close()
    proc.terminate()
    proc.wait(timeout=10)


async def test_a_queue_redis_of_its_own_next_to_one_redis_holds_the_queue_only(
    tmp_path: Path, redis_url: str, queue_redis: redis.Redis
) -> None:
    """With one Redis for the data and NOTIFIER_QUEUE_REDIS_URL set (the README's "set it to
    keep arq's queue apart anyway"), shipments stay on the data's Redis and only arq's jobs
    go to the queue's (before the fix, the data went to the queue's Redis too)."""
    port = queue_redis.connection_pool.connection_kwargs["port"]
    settings = make_settings(
        tmp_path, redis_url=redis_url, queue_redis_url=f"redis://127.0.0.1:{port}/0"
    )
    async with TestClient(TestServer(create_app(settings))) as client:
        answer = await post(client, transition())
        assert answer["accepted"] == 1
        assert [k for k in queue_redis.keys("*") if not k.startswith(b"arq:")] == []
        assert queue_redis.keys("arq:job:*")  # the drain job waits there
        await run_worker(settings)
        assert len(outbox_files(settings, ".eml")) == 1
        assert len(await history(client)) == 2  # the email's decision and the SMS's
    data = redis.Redis.from_url(redis_url)
    assert data.exists("ntf:shp:acme:shp_123")
    assert data.keys("arq:*") == []
    assert [k for k in queue_redis.keys("*") if not k.startswith(b"arq:")] == []
    data.close()


async def test_readyz_says_which_redis_does_not_answer(
    tmp_path: Path, redis_url: str, queue_redis: redis.Redis
) -> None:
    """The queue's Redis down said "redis": unreachable, as if the data's were."""
    port = queue_redis.connection_pool.connection_kwargs["port"]
    for queue_port, answer in ((port, "ok"), (free_port(), "unreachable (ConnectionError)")):
        settings = make_settings(
            tmp_path,
            redis_url=redis_url,
            queue_redis_url=f"redis://127.0.0.1:{queue_port}/0",
            redis_timeout_s=1,
        )
        async with TestClient(TestServer(create_app(settings, run_worker=False))) as client:
            body = await (await client.get("/readyz")).json()
        assert body["redis"] == "ok", body
        assert body["queue"].startswith(answer), body
    assert body["queue"].endswith("NOTIFIER_QUEUE_REDIS_URL") and body["status"] == "not_ready"
    settings = make_settings(tmp_path, redis_url=redis_url)  # one Redis for both: no "queue"
    async with TestClient(TestServer(create_app(settings, run_worker=False))) as client:
        assert "queue" not in await (await client.get("/readyz")).json()


async def test_every_master_of_a_cluster_is_asked(cluster: Cluster, tmp_path: Path) -> None:
    flush_cluster(cluster)
    settings = make_settings(tmp_path, redis_url=cluster.url, queue_redis_url=cluster.queue_url)
    client = connect(settings)
    try:
        await client.initialize()  # type: ignore[union-attr]
        versions = await redis_versions(client)
    finally:
        await client.aclose()
    # every master (they run the scripts), and the replicas the client has met, if any
    assert len(versions) >= len(cluster.masters()) == 3
    assert all(v.split(".")[0] >= "7" for v in versions), versions


def test_a_redis_refusing_the_urls_password_or_database_is_one_line(tmp_path: Path) -> None:
    """A Redis that answers but refuses the URL's credentials or database refuses them on
    every retry: `serve` started and answered 503 to everything, and `worker` waited for
    ever ("Redis does not answer (AuthenticationError)") or died with a traceback (DB index
    is out of range; found by a black-box probe). Both say so in one line and exit 2."""
    port = free_port()
    proc = start_redis(port, tmp_path)
    try:
        redis.Redis(port=port).config_set("requirepass", "sekret")
        env = {
            "NOTIFIER_API_KEYS": json.dumps(API_KEYS),
            "NOTIFIER_SIGNING_SECRET": "0123456789abcdef0123",
            "NOTIFIER_PORT": str(free_port()),
        }
        for url, says in (
            (f"redis://:wrong@127.0.0.1:{port}/0", "Redis refused the credentials"),
            (f"redis://127.0.0.1:{port}/0", "Redis refused the credentials"),
            (f"redis://:sekret@127.0.0.1:{port}/99", "Redis has no such database"),
        ):
            for command in (["serve"], ["worker"]):
                run = spawn_notifier(command, tmp_path, NOTIFIER_REDIS_URL=url, **env)
                out, _ = run.communicate(timeout=60)
                assert run.returncode == 2, (command, url, out)
                assert f"error: NOTIFIER_REDIS_URL: {says}" in out, out
                assert "Traceback" not in out and "sekret" not in out and "wrong" not in out
                assert "listening" not in out and "does not answer" not in out
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_serve_says_at_start_up_that_redis_does_not_answer(tmp_path: Path) -> None:
    """`serve` with a Redis that does not answer said only "listening" (found by a
    black-box run): it now says so at start-up, naming the setting, not the URL (which
    may hold a password), and keeps running (it waits for Redis: ingest answers 503)."""
    env = {
        "NOTIFIER_API_KEYS": json.dumps(API_KEYS),
        "NOTIFIER_SIGNING_SECRET": "0123456789abcdef0123",
        "NOTIFIER_PORT": str(free_port()),
    }
    url = f"redis://:sekret@127.0.0.1:{free_port()}/0"
    run = spawn_notifier(["serve"], tmp_path, NOTIFIER_REDIS_URL=url, **env)
    try:
        out, _ = run.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        run.terminate()
        out, _ = run.communicate(timeout=30)
    assert "NOTIFIER_REDIS_URL: Redis does not answer yet (ConnectionError)" in out, out
    assert "ingest answers 503" in out and "sekret" not in out, out
    assert run.returncode in (None, 0, -signal.SIGTERM), (run.returncode, out)
