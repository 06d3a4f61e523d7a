"""Logs: text or JSON, one line per event, with the request id, never personal data or
keys; the request id follows a transition from the API call into the shipment's history."""

from __future__ import annotations

import io
import json
import logging
import re
import signal
import socket
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from notifier import logs
from notifier.settings import Settings
from tests.conftest import (
    API_KEYS,
    auth,
    free_port,
    healthy,
    history,
    run_worker,
    spawn_notifier,
    transition,
    wait_until,
)


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """The root logger configured as `notifier` does, writing to a buffer."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    buffer = io.StringIO()
    logs.configure("json", "INFO")
    [ours] = [h for h in root.handlers if h.get_name() == "notifier"]
    ours.stream = buffer  # type: ignore[attr-defined]
    yield buffer
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


def test_json_lines_carry_the_request_id_and_no_personal_data(captured: io.StringIO) -> None:
    log = logging.getLogger("notifier.test")
    token = logs.REQUEST_ID.set("req-42")
    try:
        log.error(
            "could not reach %s at %s (Authorization: Bearer %s, api_key=%s)",
            "ana@example.com",
            "+33 6 12 34 56 78",
            "k_acme_0123456789",
            "s3cr3t",
        )
    finally:
        logs.REQUEST_ID.reset(token)
    try:
        raise ValueError("bad address ana@example.com")
    except ValueError:
        log.exception("failed for +33612345678")
    first, second = (json.loads(line) for line in captured.getvalue().splitlines())
    assert first["request_id"] == "req-42" and first["level"] == "ERROR"
    assert first["msg"] == (
        "could not reach [email] at [phone] (Authorization: Bearer [key], api_key=[secret])"
    )
    assert "request_id" not in second and second["msg"] == "failed for [phone]"
    assert "ana@example.com" not in second["exc"] and "[email]" in second["exc"]


def test_only_the_servers_parser_refusals_become_one_warning(captured: io.StringIO) -> None:
    """aiohttp's server log of a request its parser refused is one warning without the
    request; the same error in another log (a client reading a merchant's malformed
    answer) keeps its level and traceback."""
    from aiohttp.http_exceptions import BadHttpMessage

    for name in ("aiohttp.server", "notifier.outbound"):
        try:
            raise BadHttpMessage("bad line: GET /x?phone=+33612345678")
        except BadHttpMessage:
            logging.getLogger(name).exception("Error handling request from 127.0.0.1")
    server, ours = (json.loads(line) for line in captured.getvalue().splitlines())
    assert (server["level"], "exc" in server) == ("WARNING", False)
    assert server["msg"] == "refused a malformed HTTP request with 400 (BadHttpMessage)"
    assert (ours["level"], "BadHttpMessage" in ours["exc"]) == ("ERROR", True)
    assert "+33612345678" not in captured.getvalue()


def test_urls_and_ids_are_not_mistaken_for_phone_numbers() -> None:
    text = "n_3f1c0 at https://t.example/track/+1234567890 evt_+123456789 2026-11-21T10:30+01:00"
    assert logs.redact(text) == text


def test_phone_numbers_in_a_query_and_international_addresses_are_redacted() -> None:
    text = "GET /v1/x?phone=+33612345678&to=анна@пример.рф&b=+1 555 0100 999"
    assert logs.redact(text) == "GET /v1/x?phone=[phone]&to=[email]&b=[phone]"


def test_a_request_id_is_taken_or_made_and_answered() -> None:
    assert logs.request_id("req-abc.1") == "req-abc.1"
    made = logs.request_id("no spaces allowed")
    assert re.fullmatch("[0-9a-f]{16}", made), made
    assert logs.request_id("x" * 200) != "x" * 200
    # a new one each time: 64 random bits
    assert len({logs.request_id(None) for _ in range(1000)}) == 1000


def test_a_forked_process_makes_other_request_ids_than_its_parent() -> None:
    """The ids come from ``random`` (not a secret, and cheaper than ``secrets``), which a
    forked child seeds anew: two API processes forked from one never repeat each other."""
    import os

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, then out without pytest's clean-up
        os.write(write, " ".join(logs.request_id(None) for _ in range(100)).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = set(pipe.read().split())
    os.waitpid(pid, 0)
    parent = {logs.request_id(None) for _ in range(100)}
    assert len(child) == len(parent) == 100 and not child & parent


async def test_the_request_id_follows_a_transition_into_the_history(
    client: Any, settings: Settings
) -> None:
    resp = await client.post(
        "/v1/transitions",
        json=transition(),
        headers={**auth(), "X-Request-ID": "backend-7f3a"},
    )
    assert resp.status == 202 and resp.headers["X-Request-ID"] == "backend-7f3a"
    await run_worker(settings)
    decisions = await history(client)
    assert decisions and {d["request_id"] for d in decisions} == {"backend-7f3a"}
    bad = await client.post("/v1/transitions", json={}, headers=auth())
    made = bad.headers["X-Request-ID"]
    assert bad.status == 422 and len(made) == 16 and int(made, 16) >= 0


def test_a_json_logging_service_never_logs_personal_data(
    settings: Settings, tmp_path: Path
) -> None:
    """`notifier serve` and `notifier worker` with NOTIFIER_LOG_FORMAT=json: every line is
    JSON, and none holds an address, even when a provider refuses them."""
    port = free_port()
    env = {
        "NOTIFIER_REDIS_URL": str(settings.redis_url),
        "NOTIFIER_API_KEYS": json.dumps(API_KEYS),
        "NOTIFIER_OUTBOX_DIR": str(tmp_path / "outbox"),
        "NOTIFIER_PORT": str(port),
        "NOTIFIER_LOG_FORMAT": "json",
        # a provider that cannot be reached: every SMS fails and is logged
        "NOTIFIER_SMS_CHANNEL": "twilio",
        "NOTIFIER_TWILIO_ACCOUNT_SID": "AC" + "0" * 32,
        "NOTIFIER_TWILIO_AUTH_TOKEN": "0" * 32,
        "NOTIFIER_TWILIO_FROM": "+15005550006",
        "NOTIFIER_TWILIO_BASE_URL": f"http://127.0.0.1:{free_port()}",
    }
    procs = [
        spawn_notifier(["serve"], tmp_path, **env),
        spawn_notifier(["worker"], tmp_path, **env),
    ]
    try:
        wait_until(lambda: healthy(port) or procs[0].poll() is not None, "notifier serve")
        import urllib.request

        # (these processes run on the real clock: an event of now, whose email goes out)
        now = datetime.now(UTC).isoformat()
        body = json.dumps({"transitions": [transition(occurred_at=now)]}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/transitions",
            data=body,
            headers={**auth(), "Content-Type": "application/json", "X-Request-ID": "drill-1"},
        )
        with urllib.request.urlopen(request, timeout=10) as resp:
            assert resp.status == 202
        # requests aiohttp's parser refuses before any handler: a raw non-ASCII byte in the
        # query, and a phone number and an address there
        for raw in (
            b"GET /healthz?x=\xd9\xa5&phone=+33612345678&to=\xd0\xb0@x.org HTTP/1.1\r\n",
            b"GET /healthz?phone=+33612345678 ana@example.com HTTP/1.1\r\n",
        ):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
                conn.sendall(raw + b"Host: x\r\n\r\n")
                assert re.match(rb"HTTP/1\.[01] 400 ", conn.recv(100)), raw
        wait_until(lambda: any((tmp_path / "outbox").rglob("*.eml")), "the email")
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        outputs = [p.communicate(timeout=20)[0] for p in procs]
    lines = [line for out in outputs for line in out.splitlines() if line.strip()]
    assert lines
    for line in lines:
        record = json.loads(line)  # every line is one JSON object
        assert {"ts", "level", "logger", "msg"} <= set(record)
        for personal in ("ana@example.com", "+33612345678", "Ana", "k_backend_0123456789"):
            assert personal not in line, line
        # a malformed request is one warning, no ERROR and no traceback
        assert record["level"] != "ERROR" and "exc" not in record, line
    refused = [json.loads(line)["msg"] for line in lines if "malformed" in line]
    assert len(refused) == 2 and all(
        m.startswith("refused a malformed HTTP request with 400") for m in refused
    ), refused
