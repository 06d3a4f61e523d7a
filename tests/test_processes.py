"""Redis mode as deployed: the API in-process here, `notifier worker` as a real process."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

from notifier.resources import data_dir
from notifier.settings import Settings
from tests.conftest import (
    API_KEYS,
    auth,
    just_now,
    outbox_files,
    shared_env,
    spawn_notifier,
    transition,
    wait_until,
)

Client = TestClient[Any, Any]


async def test_worker_process_delivers_and_stops_cleanly(
    client: Client, settings: Settings, tmp_path: Path
) -> None:
    # A real process runs on the real clock, so the events are from a minute ago: events
    # dated on a fixed day would be anomalies before it and stalled shipments after it.
    occurred_at = just_now()
    items = [
        transition(event_id=f"e{i}", shipment_id=f"s{i}", occurred_at=occurred_at)
        for i in range(50)
    ]
    resp = await client.post("/v1/transitions", json={"transitions": items}, headers=auth())
    assert (await resp.json())["accepted"] == 50

    # Real clock: a policy without quiet hours, so the SMS goes out whatever the hour.
    policies = tmp_path / "policies"
    shutil.copytree(data_dir("policies", None), policies)
    (policies / "acme.yaml").write_text("quiet_hours: {sms: null}\n")
    proc = spawn_notifier(
        ["worker"],
        tmp_path,
        NOTIFIER_POLICIES_DIR=str(policies),
        **shared_env(settings),
    )
    try:
        wait_until(
            lambda: len(outbox_files(settings)) >= 100 or proc.poll() is not None,
            "the worker process to deliver",
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=20)[0]
    assert proc.returncode == 0, output
    assert len(outbox_files(settings, ".eml")) == 50
    assert len(outbox_files(settings, ".sms.json")) == 50
    assert "ana@example.com" not in output and "+33612345678" not in output
    assert "cron:release_due" not in output  # arq's per-job lines only at DEBUG


def test_serve_told_to_stop_answers_a_request_whose_body_is_still_arriving(
    tmp_path: Path,
) -> None:
    """A batch uploaded over a slow link, SIGTERM while its body arrives: the body was
    dropped (aiohttp's stop closes every connection first) and the request cut after 15 s
    with no answer (found by an operator's drill). It is answered now, then `serve` ends."""
    import socket
    import time

    from tests.conftest import Reader, free_port, healthy

    port = free_port()
    proc = spawn_notifier(
        ["serve", "--port", str(port)], tmp_path, NOTIFIER_OUTBOX_DIR=str(tmp_path / "outbox")
    )
    output = Reader(proc)
    try:
        wait_until(lambda: healthy(port) or proc.poll() is not None, "serve to listen")
        items = [transition(event_id=f"slow{i}", occurred_at=just_now()) for i in range(200)]
        body = json.dumps({"transitions": items}).encode()
        head = (
            b"POST /v1/transitions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\n"
            b"Authorization: Bearer dev-key-not-for-production\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)
        )
        with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
            conn.sendall(head + body[: len(body) // 2])
            time.sleep(0.3)  # the handler is reading the body
            proc.send_signal(signal.SIGTERM)
            wait_until(
                lambda: any("stopping: no new connections" in line for line in output.lines),
                "serve to start stopping",
            )
            conn.sendall(body[len(body) // 2 :])
            reply = conn.makefile("rb").read()
        status = reply.split(b"\r\n", 1)[0]
        assert status == b"HTTP/1.1 202 Accepted", reply[:300]
        assert b"Connection: close" in reply.split(b"\r\n\r\n", 1)[0]
        assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["accepted"] == 200
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "stopped" in output.text()


def test_serve_stopped_while_it_starts_exits_0(tmp_path: Path) -> None:
    """A Redis that takes connections and never answers holds `serve`'s start-up: SIGTERM
    then killed it (exit 143, nothing closed), SIGINT raised KeyboardInterrupt (found by a
    review of its own stop). It stops as from serving: exit 0."""
    import socket
    import time

    from tests.conftest import Reader, free_port

    mute = socket.socket()
    mute.bind(("127.0.0.1", 0))
    mute.listen(8)  # takes connections (the kernel's backlog), never reads a command
    try:
        proc = spawn_notifier(
            ["serve", "--port", str(free_port())],
            tmp_path,
            NOTIFIER_REDIS_URL=f"redis://127.0.0.1:{mute.getsockname()[1]}/0",
            NOTIFIER_API_KEYS=json.dumps(API_KEYS),
            NOTIFIER_OUTBOX_DIR=str(tmp_path / "outbox"),
        )
        output = Reader(proc)
        time.sleep(3)  # into the start-up, waiting on the mute Redis
        assert proc.poll() is None, output.text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, output.text()
    finally:
        mute.close()
    assert "Traceback" not in output.text(), output.text()
