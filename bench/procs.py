"""The processes a benchmark runs against: redis-server, `notifier serve`, `notifier worker`.

Each is a real process on loopback, started fresh and stopped with SIGTERM; peak RSS
(VmHWM) and CPU time are read from /proc just before it stops. ``stack(shards=3)`` runs
the data on a Redis Cluster of 3 masters (no replicas) and arq's queue on a Redis of its
own, as ``NOTIFIER_REDIS_URL=redis+cluster://`` plus ``NOTIFIER_QUEUE_REDIS_URL`` do.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from redis.exceptions import RedisError

RESULTS = Path(__file__).resolve().parent / "results"
API_KEY = "bench-key"
API_KEYS = '{"bench-key": ["*"]}'


def free_port(avoid: Collection[int] = ()) -> int:
    """A free loopback port, none of ``avoid`` (ports picked already and not yet bound: a
    port probed free is free again at once, and the kernel may hand it out twice)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if port not in avoid:
            return port


def node_port(avoid: Collection[int] = ()) -> int:
    """A free loopback port for a cluster node: its bus port (+10000) must be valid and free;
    neither one among ``avoid``."""
    while True:
        port = free_port(avoid)
        if port + 10000 > 65535 or port + 10000 in avoid:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


def with_bus_ports(ports: Collection[int]) -> list[int]:
    """Cluster nodes' ports and their bus ports (+10000): what a port picked next avoids."""
    return [*ports, *(p + 10000 for p in ports)]


def node_ports(count: int) -> list[int]:
    """``count`` distinct ports for cluster nodes (``node_port``), none another's bus port.
    Picked one by one they could repeat: a node then failed to bind, a ping reached the
    other one, and a "3-shard" cluster had two (seen in a bench/run)."""
    ports: list[int] = []
    for _ in range(count):
        ports.append(node_port(with_bus_ports(ports)))
    return ports


def wait_until(
    predicate: Callable[[], bool], what: str, seconds: float = 30.0, every: float = 0.02
) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, RedisError):
            if predicate():
                return
        time.sleep(every)
    raise RuntimeError(f"timed out waiting for {what}")


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident set size (VmHWM) in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) the process has used so far, from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_http(proc: Proc, port: int) -> None:
    """Wait until ``proc`` answers GET /healthz on ``port`` (fail fast if it exits)."""

    def up() -> bool:
        proc.check()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as reply:
            return bool(reply.status == 200)

    wait_until(up, f"{proc.name} to answer on port {port}")


def alive(procs: Proc | list[Proc], predicate: Callable[[], bool]) -> Callable[[], bool]:
    """``predicate``, failing at once if ``procs`` (one or several) has exited."""

    def check() -> bool:
        for proc in procs if isinstance(procs, list) else [procs]:
            proc.check()
        return predicate()

    return check


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    peak_mb: float = 0.0
    cpu_s: float = 0.0

    def stop(self) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(OSError):
                self.peak_mb = peak_rss_mb(self.popen.pid)
                self.cpu_s = cpu_seconds(self.popen.pid)
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()

    def check(self) -> None:
        if self.popen.poll() is not None:
            tail = self.log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{tail}")


@dataclass
class Stack:
    """A fresh redis-server (or a Redis Cluster and a queue Redis) plus whichever notifier
    processes a stage starts."""

    workdir: Path
    outbox: Path
    #: the one Redis; 0 on a cluster
    redis_port: int = 0
    procs: list[Proc] = field(default_factory=list)
    #: the cluster's masters, and the Redis of arq's queue next to them
    shard_ports: list[int] = field(default_factory=list)
    queue_port: int = 0
    #: every redis-server, by port (named redis, or shard-1.. and queue)
    servers: dict[int, Proc] = field(default_factory=dict)

    @property
    def cluster(self) -> bool:
        return bool(self.shard_ports)

    @property
    def redis_url(self) -> str:
        if self.cluster:
            return f"redis+cluster://127.0.0.1:{self.shard_ports[0]}"
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def redis(self) -> Any:
        """A client of the data: a plain one, or a cluster client that routes by key
        (typed Any: redis-py types every reply as maybe-awaitable)."""
        if self.cluster:
            return redis.RedisCluster(host="127.0.0.1", port=self.shard_ports[0])
        return self.node(self.redis_port)

    def node(self, port: int) -> Any:
        """A client of one redis-server (a shard, the queue Redis or the one Redis)."""
        return redis.Redis(host="127.0.0.1", port=port)

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        log = self.workdir / f"{name}.log"
        popen = subprocess.Popen(
            argv,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            env=env if env is not None else dict(os.environ),
            cwd=self.workdir,
        )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def notifier_env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("NOTIFIER_")}
        if "NOTIFIER_EVENT_LOOP" in os.environ:  # for comparing the two loops
            env["NOTIFIER_EVENT_LOOP"] = os.environ["NOTIFIER_EVENT_LOOP"]
        if self.cluster:  # arq's queue cannot live on a cluster
            env["NOTIFIER_QUEUE_REDIS_URL"] = f"redis://127.0.0.1:{self.queue_port}/0"
        return {
            **env,
            # the checkout this bench runs from, not whatever the venv's editable install
            # points at (comparing two checkouts measured the same code twice)
            "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
            "NOTIFIER_REDIS_URL": self.redis_url,
            "NOTIFIER_API_KEYS": API_KEYS,
            "NOTIFIER_OUTBOX_DIR": str(self.outbox),
            "NOTIFIER_LOG_LEVEL": "WARNING",
            # the stack's own cache: its first process compiles the templates and keeps them
            # there for the next (notifier/render/compiled.py), whatever ~/.cache holds
            "XDG_CACHE_HOME": str(self.workdir / "cache"),
            **extra,
        }

    def api(self, **env: str) -> tuple[Proc, int]:
        port = free_port()
        argv = [sys.executable, "-m", "notifier", "serve", "--port", str(port)]
        proc = self._profiled(self.start("api", argv, self.notifier_env(**env)))
        wait_http(proc, port)
        return proc, port

    def worker(self, name: str = "worker", **env: str) -> Proc:
        """A `notifier worker` process; several at once need distinct names (their logs)."""
        argv = [sys.executable, "-m", "notifier", "worker"]
        return self._profiled(self.start(name, argv, self.notifier_env(**env)))

    def _profiled(self, proc: Proc) -> Proc:
        """Attach py-spy to ``proc`` when BENCH_PROFILE names it (api, worker).

        py-spy samples until the process exits, then writes a flame graph to
        bench/results/profile-<name>-<pid>.svg (BENCH_PROFILE_FORMAT=raw: collapsed stacks).
        """
        kind = proc.name.split("-")[0]  # worker-2 is profiled as a worker
        if kind not in os.environ.get("BENCH_PROFILE", "").split(","):
            return proc
        spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        fmt = os.environ.get("BENCH_PROFILE_FORMAT", "flamegraph")
        suffix = {"flamegraph": "svg", "raw": "txt", "speedscope": "json"}[fmt]
        out = RESULTS / f"profile-{proc.name}-{proc.popen.pid}.{suffix}"
        self.start(
            f"py-spy-{proc.name}",
            [spy, "record", "--pid", str(proc.popen.pid), "-r", "100", "-f", fmt, "-o", str(out)],
        )
        return proc

    def stop_all(self) -> None:
        spies = [p for p in self.procs if p.name.startswith("py-spy")]
        for proc in reversed(self.procs):
            if proc not in spies:
                proc.stop()
        for spy in spies:  # each writes its profile once its process has exited
            with contextlib.suppress(subprocess.TimeoutExpired):
                spy.popen.wait(120)
            spy.stop()


#: Where the outbox goes unless OUTBOX_ON_DISK is set: tmpfs, so the figures measure the
#: service and not this machine's disk (on its ext4, a new shipment folder plus one file
#: costs ~0.9 ms of kernel time, against ~35 µs on tmpfs).
TMPFS = Path("/dev/shm")


def redis_binary(name: str = "redis-server") -> str:
    binary = shutil.which(name) or f"/usr/bin/{name}"
    if not Path(binary).exists():
        raise RuntimeError(f"{name} is not installed: run scripts/test (it installs it)")
    return binary


def start_redis(st: Stack, name: str, port: int, *options: str) -> Proc:
    """A redis-server without persistence on ``port``, its files in a folder of its own;
    answering when this returns. Kept apart from ``st.procs``: stopped after them."""
    folder = st.workdir / name
    folder.mkdir()
    argv = [redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder)]
    server = st.start(name, [*argv, "--save", "", "--appendonly", "no", *options])
    st.procs.remove(server)
    st.servers[port] = server
    wait_until(alive(server, lambda: bool(st.node(port).ping())), name)
    return server


def start_cluster(st: Stack, shards: int) -> None:
    """``shards`` cluster masters (no replicas) joined by ``redis-cli --cluster create``,
    each owning an equal range of slots, and a plain Redis for arq's queue."""
    st.shard_ports = node_ports(shards)
    for i, port in enumerate(st.shard_ports, 1):
        cluster = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf")
        start_redis(st, f"shard-{i}", port, *cluster)
    st.queue_port = free_port(with_bus_ports(st.shard_ports))
    start_redis(st, "queue", st.queue_port)
    nodes = [f"127.0.0.1:{port}" for port in st.shard_ports]
    create = [redis_binary("redis-cli"), "--cluster", "create", *nodes]
    subprocess.run(
        [*create, "--cluster-replicas", "0", "--cluster-yes"],
        check=True,
        capture_output=True,
        timeout=60,
    )

    def formed() -> bool:
        return all(
            st.node(port).cluster("info").get("cluster_state") == "ok" for port in st.shard_ports
        )

    wait_until(formed, "the Redis Cluster to form", 60)


@contextlib.contextmanager
def stack(outbox_on_disk: bool = False, shards: int = 0) -> Iterator[Stack]:
    """A temporary directory with its own redis-server (no persistence), or with a Redis
    Cluster of ``shards`` masters and a queue Redis; torn down after."""
    workdir = Path(tempfile.mkdtemp(prefix="notifier-bench-"))
    on_tmpfs = not outbox_on_disk and TMPFS.is_dir()
    outbox = Path(tempfile.mkdtemp(prefix="notifier-outbox-", dir=TMPFS if on_tmpfs else workdir))
    st = Stack(workdir, outbox)
    try:
        if shards:
            start_cluster(st, shards)
        else:
            st.redis_port = free_port()
            start_redis(st, "redis", st.redis_port)
        yield st
    finally:
        st.stop_all()
        for server in st.servers.values():
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(outbox, ignore_errors=True)
