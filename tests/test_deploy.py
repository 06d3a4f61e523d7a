"""The Dockerfile and compose.yaml, checked without a Docker engine.

hadolint lints the Dockerfile, the compose specification's JSON schema checks compose.yaml,
and their commands run as plain processes: the compose Redis command, the image's CMD and the
compose worker command with the image's and compose's environment (the container paths mapped
into a temporary folder, Redis pointed at the test's own), and every health check must then
answer healthy, and unhealthy once its process is gone. The image's pip install steps are the
ones .ci/run performs in a fresh venv (its packaged-install step); here they are only compared.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from prometheus_client.parser import text_string_to_metric_families

from notifier.settings import unknown_variables
from tests.conftest import API_KEYS, auth, free_port, start_redis, transition, wait_until

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
#: What `docker compose up` would be given (README); compose refuses to start without them.
COMPOSE_VARIABLES = {
    "NOTIFIER_API_KEYS": json.dumps(API_KEYS),
    "NOTIFIER_SIGNING_SECRET": "s3cret-for-the-deploy-test",
}


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    out: list[tuple[str, str]] = []
    logical = ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if not logical and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        instruction, _, args = (logical + line).strip().partition(" ")
        out.append((instruction.upper(), " ".join(args.split())))
        logical = ""
    return out


def final_stage() -> list[tuple[str, str]]:
    """The instructions of the image that runs (after the last FROM)."""
    steps = dockerfile()
    last = max(i for i, (name, _) in enumerate(steps) if name == "FROM")
    return steps[last + 1 :]


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for name, args in final_stage():
        if name == "ENV":
            env.update(pair.split("=", 1) for pair in shlex.split(args))
    return env


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return data


_VARIABLE = re.compile(r"\$\{(\w+)(?::([?-])([^}]*))?\}")


def interpolate(value: str, variables: Mapping[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error} (the forms compose.yaml uses)."""

    def one(m: re.Match[str]) -> str:
        name, op, arg = m.groups()
        if variables.get(name):
            return variables[name]
        if op == "?":
            raise ValueError(f"{name}: {arg}")
        return arg if op == "-" else ""

    return _VARIABLE.sub(one, value)


def run(args: list[str], env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, env=env, check=False)


def test_the_dockerfile_passes_hadolint() -> None:
    out = run([str(BIN / "hadolint"), str(ROOT / "Dockerfile")])
    assert out.returncode == 0, out.stdout + out.stderr


def test_compose_yaml_follows_the_compose_specification() -> None:
    schema = ["--builtin-schema", "vendor.compose-spec", str(ROOT / "compose.yaml")]
    out = run([str(BIN / "check-jsonschema"), *schema])
    assert out.returncode == 0, out.stdout + out.stderr


def test_compose_has_safe_defaults_and_restarts() -> None:
    """What compose.yaml promises, read as data (the schema says only that it is valid)."""
    services = compose()["services"]
    assert {name: s.get("restart") for name, s in services.items()} == {
        "redis": "unless-stopped",
        "api": "unless-stopped",
        "worker": "unless-stopped",
    }
    # longer than the API's 15 s for requests in flight; for a worker, than a claim's lease
    # (60 s from its last renewal, plus the provider timeout), which it may wait out for
    # Redis to record what a provider accepted (``Deliverer.stop``)
    assert services["api"]["stop_grace_period"] == "30s"
    assert services["worker"]["stop_grace_period"] == "90s"
    env = services["api"]["environment"]
    assert services["worker"]["environment"] == env
    # no public fallback key: compose refuses to start without one (${VAR:?message})
    assert env["NOTIFIER_API_KEYS"].startswith("${NOTIFIER_API_KEYS:?")
    assert "}" not in env["NOTIFIER_API_KEYS"][:-1]  # a brace would end the message early
    assert env["NOTIFIER_SIGNING_SECRET"].startswith("${NOTIFIER_SIGNING_SECRET:?")
    assert all(p.startswith("127.0.0.1:") for p in services["api"]["ports"])
    worker = services["worker"]
    beat = worker["command"][worker["command"].index("--heartbeat") + 1]
    assert beat in " ".join(worker["healthcheck"]["test"])
    assert worker["healthcheck"]["start_period"]

    # Redis keeps what it acknowledged in its append-only file, on a volume, and says when
    # it is up (the api and worker wait for that)
    r = services["redis"]
    assert r["command"][r["command"].index("--appendonly") + 1] == "yes"
    assert "--appendfsync" in r["command"]
    assert any(v.endswith(":/data") for v in r["volumes"])
    assert r["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    for name in ("api", "worker"):
        assert services[name]["depends_on"] == {"redis": {"condition": "service_healthy"}}

    # one metrics folder, in memory, shared by the api and the worker, named in their settings
    assert env["NOTIFIER_METRICS_DIR"] == "/metrics"
    for name in ("api", "worker"):
        assert "metrics:/metrics" in services[name]["volumes"]
    assert compose()["volumes"]["metrics"]["driver_opts"]["type"] == "tmpfs"
    assert env["NOTIFIER_OUTBOX_DIR"] == "/data/outbox"
    assert "outbox:/data/outbox" in services["worker"]["volumes"]


def test_the_image_and_compose_agree_and_name_only_real_settings() -> None:
    image, services = image_env(), compose()["services"]
    # compose publishes the port the image listens on
    published = services["api"]["ports"][0].rsplit(":", 1)[1]
    assert published == image["NOTIFIER_PORT"]
    assert ("EXPOSE", published) in final_stage()
    # a misspelt variable would silently fall back to a default
    assert unknown_variables([*image, *services["api"]["environment"]]) == []
    # the image's CMD is the api service's command
    cmd = [args for name, args in final_stage() if name == "CMD"]
    assert [json.loads(c) for c in cmd] == [services["api"]["command"]]
    # a numeric user that is not root (a name may not resolve on the host)
    (user,) = [args for name, args in final_stage() if name == "USER"]
    assert user.split(":")[0].isdigit() and user.split(":")[0] != "0"


def test_the_image_installs_what_ci_installs() -> None:
    """The pip steps of the build are the packaged install .ci/run does in a fresh venv
    (from requirements.lock, hash-checked, then the package without its dependencies), and
    every file the build copies exists."""
    ci = (ROOT / ".ci" / "run").read_text()
    ci_installs = {
        " ".join(a for a in line.split("pip install", 1)[1].split() if a != "-q")
        for line in ci.splitlines()
        if "pip install" in line
    }
    image_installs = {
        " ".join(a for a in args.split("pip install", 1)[1].split() if a != "--no-cache-dir")
        for name, args in dockerfile()
        if name == "RUN" and "pip install" in args
    }
    assert image_installs == {
        "--require-hashes -r requirements.lock",
        "--no-deps --no-build-isolation .",
    }
    assert image_installs <= ci_installs
    for name, args in dockerfile():
        if name == "COPY" and not args.startswith("--from"):
            for source in args.split()[:-1]:
                assert (ROOT / source).exists(), f"COPY {source}: no such file"


# -- the commands as processes ------------------------------------------------------------


class Container:
    """A container's filesystem mapped into ``root``: /data, /tmp and /metrics live there."""

    def __init__(self, root: Path) -> None:
        self.root = root
        for folder in ("data/outbox", "tmp", "metrics"):
            (root / folder).mkdir(parents=True)

    def path(self, text: str) -> str:
        """``text`` with container paths replaced by their folders here."""
        return re.sub(r"(?<![\w/])/(data|tmp|metrics)\b", lambda m: f"{self.root}/{m[1]}", text)

    def env(self, redis_port: int, api_port: int) -> dict[str, str]:
        """The image's ENV, then compose's environment, as the container would see them;
        then what this machine needs: the binaries of this venv, loopback and free ports."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("NOTIFIER_")}
        for key, value in image_env().items():
            value = value.replace("$PATH", env.get("PATH", "")).replace(
                "/opt/notifier/bin", str(BIN)
            )
            env[key] = value if key == "PATH" else self.path(value)
        compose_env = compose()["services"]["api"]["environment"]
        env.update(
            {k: self.path(interpolate(str(v), COMPOSE_VARIABLES)) for k, v in compose_env.items()}
        )
        env["NOTIFIER_REDIS_URL"] = env["NOTIFIER_REDIS_URL"].replace(
            "redis:6379", f"127.0.0.1:{redis_port}"
        )
        env.update(NOTIFIER_HOST="127.0.0.1", NOTIFIER_PORT=str(api_port))
        return env


def image_healthcheck() -> list[str]:
    (check,) = [args for name, args in final_stage() if name == "HEALTHCHECK"]
    assert "--start-period" in check
    command: list[str] = json.loads(check.split(" CMD ", 1)[1])
    return command


def healthy(command: list[str], env: Mapping[str, str] | None = None) -> bool:
    return run(command, env).returncode == 0


@pytest.mark.timeout(120)
def test_the_commands_run_as_processes_and_their_health_checks_answer(tmp_path: Path) -> None:
    container, services = Container(tmp_path), compose()["services"]
    # Redis as compose runs it (REDIS_APPENDFSYNC unset), on loopback here
    redis_port = free_port()
    (container.root / "redis").mkdir()
    command = [interpolate(a, {}) for a in services["redis"]["command"]]
    assert command[0] == "redis-server"
    server = start_redis(redis_port, container.root / "redis", *command[1:])
    procs: list[subprocess.Popen[str]] = []
    try:
        r = redis.Redis(host="127.0.0.1", port=redis_port)
        config = r.config_get("append*")
        r.close()
        assert (config["appendonly"], config["appendfsync"]) == ("yes", "always")
        cli, *ping_args = services["redis"]["healthcheck"]["test"][1:]
        ping = [cli, "-p", str(redis_port), *ping_args]  # compose's runs inside the container
        out = run(ping)
        assert out.returncode == 0 and out.stdout.strip() == "PONG", out

        api_port = free_port()
        env = container.env(redis_port, api_port)
        workdir = container.path([a for n, a in final_stage() if n == "WORKDIR"][-1])
        check_api = image_healthcheck()
        check_worker = [container.path(a) for a in services["worker"]["healthcheck"]["test"][1:]]
        assert not healthy(check_api, env) and not healthy(check_worker, env)  # nothing runs yet
        for name in ("api", "worker"):
            args = [container.path(a) for a in services[name]["command"]]
            procs.append(
                subprocess.Popen(
                    args,
                    cwd=workdir,
                    env=env,
                    text=True,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                )
            )
        api, worker = procs
        wait_until(
            lambda: healthy(check_api, env) or api.poll() is not None, "the api health check", 60
        )
        wait_until(
            lambda: healthy(check_worker, env) or worker.poll() is not None,
            "the worker health check",
            60,
        )
        assert api.poll() is None and worker.poll() is None

        # and they work together: a transition posted to the api comes out of the worker
        at = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
        req = urllib.request.Request(
            f"http://127.0.0.1:{api_port}/v1/transitions",
            data=json.dumps(transition(occurred_at=at)).encode(),
            headers={**auth(), "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 202
        outbox = Path(env["NOTIFIER_OUTBOX_DIR"])
        wait_until(lambda: any(outbox.rglob("*.eml")), "the worker to deliver", 30)

        # unhealthy once their process is gone (docker stop sends SIGTERM: a clean exit)
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
            output = proc.communicate(timeout=30)[0]
            assert proc.returncode == 0, output
            assert "Traceback" not in output
        assert not healthy(check_api, env)
        worker_command = services["worker"]["command"]
        beat = Path(container.path(worker_command[worker_command.index("--heartbeat") + 1]))
        old = time.time() - 60
        os.utime(beat, (old, old))
        assert not healthy(check_worker, env)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=10)
        server.terminate()
        server.wait(timeout=10)
    assert not healthy(ping)
    assert any((container.root / "redis").rglob("*.aof"))  # the append-only file was written


def post_one(port: int, n: int) -> None:
    at = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/transitions",
        data=json.dumps(transition(event_id=f"e{n}", shipment_id=f"s{n}", occurred_at=at)).encode(),
        headers={**auth(), "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 202


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(
    found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in found.items() if n == name and want <= ls)


#: Runs a shell command as PID 1 of new PID and UTS namespaces, as a container's process.
CONTAINER = ["unshare", "--pid", "--uts", "--fork", "--mount-proc", "sh", "-c"]


@pytest.mark.timeout(120)
def test_the_api_and_worker_containers_add_up_in_one_metrics_folder(tmp_path: Path) -> None:
    """In compose the api and the worker are each PID 1 of their own container and write
    their metrics to the one shared tmpfs: run them that way (PID and host name namespaces
    of their own) and /metrics must still show what each of them counted, scrape after
    scrape."""
    container, services = Container(tmp_path), compose()["services"]
    redis_port, api_port = free_port(), free_port()
    (container.root / "redis").mkdir()
    server = start_redis(redis_port, container.root / "redis")
    env = container.env(redis_port, api_port)
    assert Path(env["NOTIFIER_METRICS_DIR"]) == container.root / "metrics"
    procs: list[subprocess.Popen[str]] = []
    try:
        for name in ("api", "worker"):
            args = [container.path(a) for a in services[name]["command"]]
            procs.append(
                subprocess.Popen(
                    [*CONTAINER, f'hostname {name}-container && exec "$@"', "sh", *args],
                    cwd=container.root / "data",
                    env=env,
                    text=True,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                )
            )
        api, worker = procs
        check_api = image_healthcheck()
        wait_until(
            lambda: healthy(check_api, env) or api.poll() is not None, "the api health check", 60
        )
        for n in range(5):
            post_one(api_port, n)
        outbox = Path(env["NOTIFIER_OUTBOX_DIR"])
        wait_until(lambda: len(list(outbox.rglob("*.eml"))) == 5, "the worker to deliver", 30)
        for _ in range(3):  # each scrape counts a request of the api's: its file grows
            found = scrape(api_port)
            assert total(found, "notifier_transitions_total", result="accepted") == 5  # api
            assert total(found, "notifier_decisions_total", channel="email", outcome="sent") == 5
        assert worker.poll() is None
    finally:
        for proc in procs:
            if proc.poll() is None:  # unshare waits for its child: stop the child
                for child in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split():
                    os.kill(int(child), signal.SIGTERM)
            proc.communicate(timeout=30)
        server.terminate()
        server.wait(timeout=10)
