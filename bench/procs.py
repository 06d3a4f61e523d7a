"""The processes a benchmark runs against: redis-server, `notifier serve`, `notifier worker`.

Each is a real process on loopback, started fresh and stopped with SIGTERM; peak RSS
(VmHWM) and CPU time are read from /proc just before it stops.
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from redis.exceptions import RedisError

RESULTS = Path(__file__).resolve().parent / "results"
API_KEY = "bench-key"
API_KEYS = '{"bench-key": ["*"]}'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_until(predicate: Callable[[], bool], what: str, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, RedisError):
            if predicate():
                return
        time.sleep(0.02)
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
    """A fresh redis-server plus whichever notifier processes a stage starts."""

    workdir: Path
    outbox: Path
    redis_port: int = 0
    procs: list[Proc] = field(default_factory=list)

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def redis(self) -> Any:
        """A plain client (typed Any: redis-py types every reply as maybe-awaitable)."""
        return redis.Redis(host="127.0.0.1", port=self.redis_port)

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
        clean = {k: v for k, v in os.environ.items() if not k.startswith("NOTIFIER_")}
        return {
            **clean,
            "NOTIFIER_REDIS_URL": self.redis_url,
            "NOTIFIER_API_KEYS": API_KEYS,
            "NOTIFIER_OUTBOX_DIR": str(self.outbox),
            "NOTIFIER_LOG_LEVEL": "WARNING",
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


@contextlib.contextmanager
def stack(outbox_on_disk: bool = False) -> Iterator[Stack]:
    """A temporary directory with its own redis-server (no persistence), torn down after."""
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(binary).exists():
        raise RuntimeError("redis-server is not installed: run scripts/test (it installs it)")
    workdir = Path(tempfile.mkdtemp(prefix="notifier-bench-"))
    on_tmpfs = not outbox_on_disk and TMPFS.is_dir()
    outbox = Path(tempfile.mkdtemp(prefix="notifier-outbox-", dir=TMPFS if on_tmpfs else workdir))
    st = Stack(workdir, outbox, free_port())
    server = st.start(
        "redis",
        [
            binary,
            "--port",
            str(st.redis_port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
    )
    st.procs.remove(server)
    try:
        wait_until(lambda: bool(st.redis().ping()), "redis-server")
        yield st
    finally:
        st.stop_all()
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(outbox, ignore_errors=True)
