"""The `notifier` command: check (settings, policies, templates), and serve/worker refusals."""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from arq.connections import ArqRedis
from redis import Redis

from notifier import metrics
from notifier.cli import main, new_event_loop
from notifier.errors import ConfigurationError
from notifier.overrides import OverrideStore
from notifier.resources import data_dir
from notifier.settings import DEV_API_KEY
from notifier.store.keys import WORKERS_KEY
from tests.conftest import make_settings, spawn_notifier


@pytest.fixture
def trees(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Copies of the shipped templates and policies, pointed at through the environment."""
    for name in ("templates", "policies"):
        shutil.copytree(data_dir(name, None), tmp_path / name)
        monkeypatch.setenv(f"NOTIFIER_{name.upper()}_DIR", str(tmp_path / name))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_check_passes_on_the_shipped_trees(trees: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check"]) == 0
    out = capsys.readouterr()
    assert "ok" in out.out
    # a loud warning for the shipped default brand, not an error
    assert "templates/brand.yaml: NO SUPPORT CONTACT IN THE DEFAULT BRAND" in out.err


def test_a_merchant_brand_without_support_is_an_error(
    trees: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Its exception and return messages say "contact us": they must say how."""
    (trees / "templates" / "acme").mkdir()
    (trees / "templates" / "acme" / "brand.yaml").write_text("name: Acme\nsupport: {hours: 9-5}\n")
    assert main(["check"]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: templates/acme/brand.yaml: support: exception and return messages tell "
        "customers to contact you: give support.url, support.email or support.phone"
    ]
    (trees / "templates" / "acme" / "brand.yaml").write_text(
        "name: Acme\nsupport: {email: a@b.example}\n"
    )
    assert main(["check"]) == 0


def test_check_renders_the_help_answer(trees: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A HELP texted to our number is answered from sms/help.txt: one that fails to render
    is answered in English at run time, and said here first."""
    (trees / "templates" / "sms" / "help.txt").write_text("{{ brand.name }}")
    assert main(["check"]) == 1
    assert (
        "templates/sms/help.txt, line 1 (en): UndefinedError: 'brand' is undefined (a HELP "
        "would be answered in English)"
    ) in capsys.readouterr().err


def test_check_renders_the_unsubscribe_page(
    trees: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The page of an email's unsubscribe link is a default template too: one that fails
    to render would fail the customer's click, so it is said here first."""
    page = trees / "templates" / "email" / "unsubscribe.html"
    page.write_text(page.read_text().replace("{{ merchant|isolate }}", "{{ merchant.name() }}"))
    assert main(["check"]) == 1
    err = capsys.readouterr().err
    assert "templates/email/unsubscribe.html, line " in err and " (en): " in err
    assert "(an unsubscribe link's page would fail)" in err


def test_the_sms_table_shows_segments_per_locale(
    trees: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check", "--sms-table"]) == 0
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()[1:]}
    assert set(rows) >= {"en", "es", "pt_BR", "pl", "ar"}
    assert rows["es"][0] == "GSM-7" and rows["pt_BR"][0] == "GSM-7"  # reworded to stay GSM-7
    assert int(rows["es"][2]) <= 2 and int(rows["pt_BR"][2]) <= 2  # +1 numbers: was 3


def test_check_names_file_and_path_of_a_bad_policy(
    trees: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (trees / "policies" / "acme.yaml").write_text(
        "statuses:\n  delivered: {channels: [email, pigeon]}\n"
    )
    assert main(["check"]) == 1
    err = capsys.readouterr().err
    assert "acme.yaml" in err
    assert "statuses.delivered.channels.1" in err


def test_check_names_a_broken_template(trees: Path, capsys: pytest.CaptureFixture[str]) -> None:
    override = trees / "templates" / "acme" / "messages"
    override.mkdir(parents=True)
    (override / "delivered.jinja").write_text(
        "{%- macro subject() -%}{{ brand.nmae }}{%- endmacro -%}\n"
    )
    assert main(["check"]) == 1
    err = capsys.readouterr().err
    assert "templates/acme" in err
    assert "nmae" in err


def test_check_names_a_template_that_is_not_utf8(
    trees: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A merchant's file saved in Latin-1: one line naming it and the line of its stray
    byte (it raised UnicodeDecodeError from the strings' extraction, naming nothing)."""
    override = trees / "templates" / "acme" / "messages"
    override.mkdir(parents=True)
    (override / "delivered.jinja").write_bytes(
        "{#- ok -#}\n{%- macro subject() -%}Café{%- endmacro -%}\n".encode("latin-1")
    )
    assert main(["check"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "templates/acme: messages/delivered.jinja, line 2: not UTF-8 text (byte 0xe9" in err


def test_check_names_message_files_no_reader_gets(
    trees: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A typo in a message file's name, or a locale without a catalog: the file is never
    used, which the editor's API said and `check` did not ("ok")."""
    own = trees / "templates" / "acme" / "messages"
    own.mkdir(parents=True)
    default = (trees / "templates" / "messages" / "delivered.jinja").read_text()
    (own / "delivred.jinja").write_text(default)
    (own / "delivered.fr_CA.jinja").write_text(default)
    (own / "delivered.de.jinja").write_text(default)  # a catalog: fine
    assert main(["check"]) == 1
    err = capsys.readouterr().err
    assert "templates/acme/messages/delivred.jinja: no milestone uses" in err
    assert "templates/acme/messages/delivered.fr_CA.jinja: no catalog for locale fr_CA" in err
    assert "delivered.de.jinja" not in err


def test_a_broken_default_policy_hides_no_template_problem(
    trees: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Both are listed at once; the template's showed only once the policy was fixed (found
    by a black-box probe)."""
    default = trees / "policies" / "default.yaml"
    default.write_text(default.read_text() + "quiet_hours: [[[\n")
    layout = trees / "templates" / "email" / "layout.html"
    layout.write_text(layout.read_text() + "{% if %}\n")
    assert main(["check"]) == 1
    err = capsys.readouterr().err
    assert "default.yaml" in err and "email/layout.html" in err, err


def test_check_refuses_a_sandbox_escape(trees: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (trees / "templates" / "sms" / "layout.txt").write_text("{{ brand.__class__.__mro__ }}\n")
    assert main(["check"]) == 1
    assert "__class__" in capsys.readouterr().err


def test_check_reports_invalid_settings(
    trees: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("NOTIFIER_SMS_CHANNEL", "twilio")
    assert main(["check"]) == 2
    err = capsys.readouterr().err
    assert "NOTIFIER_TWILIO_ACCOUNT_SID" in err


def test_settings_errors_never_print_api_keys(
    trees: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("NOTIFIER_API_KEYS", '{"k_supersecret_123": "acme"}')
    assert main(["check"]) == 2
    err = capsys.readouterr().err
    assert "NOTIFIER_API_KEYS" in err
    assert "supersecret" not in err.lower()


def test_serve_with_redis_needs_api_keys(
    trees: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("NOTIFIER_REDIS_URL", "redis://127.0.0.1:1/0")
    assert main(["serve"]) == 2
    assert "NOTIFIER_API_KEYS" in capsys.readouterr().err


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.1", "notifier.example"])
def test_embedded_serve_beyond_loopback_needs_api_keys(
    trees: Path, capsys: pytest.CaptureFixture[str], host: str
) -> None:
    """The development key is in the README: embedded mode without keys of its own (the
    Docker image's default) listens on loopback only."""
    assert main(["serve", "--host", host, "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"NOTIFIER_API_KEYS is required to listen on {host}: " in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_serve_on_a_port_in_use_says_so_in_one_line(tmp_path: Path) -> None:
    """Another process holds the port: one `error:` line naming the address, exit code 2,
    and never "listening" first (it used to print the banner, then a traceback)."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        proc = spawn_notifier(["serve"], tmp_path, NOTIFIER_PORT=str(port))
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2, out
    assert f"error: cannot listen on 127.0.0.1:{port}: address already in use\n" in out
    assert "listening" not in out and "Traceback" not in out
    assert "stopping" not in out  # it never started


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--locale", "xx_YY"], "error: --locale: must be a locale like fr_FR"),
        (["--timezone", "Mars/Base"], "error: --timezone: must be an IANA time zone"),
        (["--channel", "sms", "--phone", "notaphone"], "error: --phone: must be an E.164"),
        (["-o", "nowhere/x.html"], "error: cannot write the preview: No such file or directory"),
        (["-o", "x.pdf"], "error: -o x.pdf: the email preview is written as .html or .txt"),
        (["--channel", "sms", "-o", "s.eml"], "error: -o s.eml: the sms preview is written as"),
    ],
)
def test_a_bad_preview_argument_is_one_line(
    trees: Path, capsys: pytest.CaptureFixture[str], args: list[str], says: str
) -> None:
    """Each was a traceback (a pydantic error, FileNotFoundError), or wrote SMS text into an
    .eml (found by a black-box probe)."""
    assert main(["preview", "--status", "delivered", *args]) == 2
    err = capsys.readouterr().err
    assert says in err, err
    assert "Traceback" not in err and err.count("\n") == 1
    assert not list(trees.glob("x.pdf")) and not list(trees.glob("s.eml"))


def test_serve_with_a_bad_port_or_a_host_that_does_not_resolve_says_so(
    trees: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--port", "70000"])
    assert "argument --port: invalid port (0-65535) value: '70000'" in capsys.readouterr().err
    monkeypatch.setenv("NOTIFIER_API_KEYS", '{"k_backend_0123456789": ["*"]}')  # (see below)
    assert main(["serve", "--host", "nosuchhost.invalid", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "error: cannot listen on nosuchhost.invalid:0: " in err and "Traceback" not in err


def test_serve_on_port_0_names_the_port_it_got(tmp_path: Path) -> None:
    """It said "listening on http://127.0.0.1:0" (found by a black-box probe)."""
    import re
    import urllib.request

    proc = spawn_notifier(["serve"], tmp_path, NOTIFIER_PORT="0")
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            found = re.search(r"notifier listening on http://127\.0\.0\.1:(\d+)", line)
            if found:
                break
        else:
            raise AssertionError("no banner")
        port = int(found.group(1))
        assert port != 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as resp:
            assert resp.status == 200
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def test_embedded_json_logs_name_the_development_key(tmp_path: Path) -> None:
    """DESIGN §6: embedded mode prints its development key at start-up; with JSON logs the
    banner became log lines, and the key was left out (found by a black-box probe)."""
    import json

    proc = spawn_notifier(["serve"], tmp_path, NOTIFIER_PORT="0", NOTIFIER_LOG_FORMAT="json")
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(json.loads(line)["msg"])
            if lines[-1].startswith("notifier listening on"):
                break
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    assert f"development API key: {DEV_API_KEY}" in lines, lines


def test_a_worker_stopped_while_redis_is_down_exits_0(tmp_path: Path) -> None:
    """It ended in a traceback and exit code 1: arq's close deletes a key in Redis first
    (found by a black-box probe). README: on SIGTERM both processes exit 0."""
    import json
    import signal

    from tests.conftest import API_KEYS

    env = {
        "NOTIFIER_REDIS_URL": "redis://127.0.0.1:1/0",
        "NOTIFIER_API_KEYS": json.dumps(API_KEYS),
        "NOTIFIER_SIGNING_SECRET": "0123456789abcdef0123",
    }
    proc = spawn_notifier(["worker"], tmp_path, **env)
    assert proc.stdout is not None
    for line in proc.stdout:
        if "Redis does not answer" in line:
            break
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "Traceback" not in out and "stopping while Redis is down" in out


@pytest.mark.parametrize("chosen", ["uvloop", "asyncio", None])
def test_serve_and_worker_run_on_the_event_loop_chosen(
    tmp_path: Path, redis_url: str, chosen: str | None
) -> None:
    """NOTIFIER_EVENT_LOOP, by default each command on the loop it measured faster on: the
    start-up log names it, and both processes answer and stop on it (SIGTERM: exit 0)."""
    import json
    import signal
    import urllib.request

    from tests.conftest import API_KEYS

    env = {"NOTIFIER_PORT": "0"} | ({"NOTIFIER_EVENT_LOOP": chosen} if chosen else {})
    uvloop, asyncio_own = "event loop: uvloop ", "event loop: asyncio's own"
    expected = {  # by default: the API on asyncio's, the worker on uvloop
        "serve": uvloop if chosen == "uvloop" else asyncio_own,
        "worker": asyncio_own if chosen == "asyncio" else uvloop,
    }
    serve = spawn_notifier(["serve"], tmp_path, **env)
    try:
        assert serve.stdout is not None
        seen = []
        for line in serve.stdout:
            seen.append(line)
            if found := re.search(r"notifier listening on http://127\.0\.0\.1:(\d+)", line):
                break
        else:
            raise AssertionError("no banner")
        assert any(expected["serve"] in line for line in seen), seen
        with urllib.request.urlopen(f"http://127.0.0.1:{found.group(1)}/healthz", timeout=10):
            pass
    finally:
        serve.send_signal(signal.SIGTERM)
        out, _ = serve.communicate(timeout=30)
    assert serve.returncode == 0, out
    worker_env = env | {
        "NOTIFIER_REDIS_URL": redis_url,
        "NOTIFIER_API_KEYS": json.dumps(API_KEYS),
        "NOTIFIER_SIGNING_SECRET": "0123456789abcdef0123",
    }
    redis = Redis.from_url(redis_url)
    redis.delete(WORKERS_KEY)
    worker = spawn_notifier(["worker"], tmp_path, **worker_env)
    for _ in range(400):  # until it says it is alive (bounded)
        if redis.zcard(WORKERS_KEY) or worker.poll() is not None:
            break
        time.sleep(0.05)
    assert redis.zcard(WORKERS_KEY) == 1
    worker.send_signal(signal.SIGTERM)
    out, _ = worker.communicate(timeout=30)
    redis.close()
    assert worker.returncode == 0, out
    assert expected["worker"] in out and "Traceback" not in out


def test_worker_needs_redis(trees: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["worker"]) == 2
    assert "NOTIFIER_REDIS_URL" in capsys.readouterr().err


def test_a_worker_starts_without_aiohttp_until_it_posts_a_webhook() -> None:
    # aiohttp's client and server were a fifth of a worker's start-up; the worker needs the
    # client only for merchants' webhooks (test_merchant_hooks posts through it)
    code = (
        "import sys, notifier.cli, notifier.worker, notifier.outbound.sender\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'aiohttp'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_an_unknown_variable_is_refused_naming_the_closest_one(
    trees: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("NOTIFIER_REDIS_ULR", "redis://127.0.0.1:6379/0")
    for command in ("check", "serve", "worker"):
        assert main([command]) == 2
        err = capsys.readouterr().err
        assert err == (
            "error: NOTIFIER_REDIS_ULR is not a notifier setting "
            "(did you mean NOTIFIER_REDIS_URL?)\n"
        )
    monkeypatch.delenv("NOTIFIER_REDIS_ULR")
    (trees / ".env").write_text("NOTIFIER_LOG_LEVL=DEBUG\nOTHER_TOOL_SETTING=1\n")
    assert main(["check"]) == 2
    assert capsys.readouterr().err == (
        "error: NOTIFIER_LOG_LEVL is not a notifier setting "
        "(did you mean NOTIFIER_LOG_LEVEL?) in .env\n"
    )


def test_malformed_api_keys_are_one_line_naming_the_variable_not_the_value(
    trees: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("NOTIFIER_API_KEYS", '{"k_supersecret_123": [acme]')
    assert main(["check"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("error: NOTIFIER_API_KEYS is not valid JSON")
    assert "supersecret" not in err


def test_check_says_which_mode_and_env_file_it_read(
    trees: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check"]) == 0
    out = capsys.readouterr().out
    assert "mode: embedded (in-memory store, nothing persists" in out
    assert f".env: none ({trees / '.env'} does not exist)" in out
    (trees / ".env").write_text(
        "NOTIFIER_REDIS_URL=redis://:hunter2@db.internal:6380/3\n"
        'NOTIFIER_API_KEYS={"k_backend_0123456789": ["*"]}\n'
        "NOTIFIER_SIGNING_SECRET=0123456789abcdef0123\n"
    )
    assert main(["check"]) == 1  # it cannot reach that Redis to check published overrides
    out, err = capsys.readouterr()
    assert "mode: Redis at db.internal:6380 (database 3)" in out
    assert f".env: {trees / '.env'}" in out
    assert "error: cannot read the published overrides from Redis" in err
    assert "hunter2" not in out + err


def test_a_bad_brand_is_one_line_in_check_and_preview(
    trees: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (trees / "templates" / "acme").mkdir()
    (trees / "templates" / "acme" / "brand.yaml").write_text("accent: '#787878'\n")
    assert main(["check"]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "acme/brand.yaml: accent: #787878: neither white" in errors[0]
    assert main(["preview", "--status", "delivered", "--merchant", "acme"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "acme/brand.yaml: accent" in err and "Traceback" not in err


def test_a_template_error_in_many_renders_is_one_line(
    trees: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    override = trees / "templates" / "acme" / "email"
    override.mkdir(parents=True)
    (override / "layout.html").write_text("{{ brand.nmae }}")
    assert main(["check"]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    assert "templates/acme: " in errors[0] and "nmae" in errors[0]
    assert " more)" in errors[0]  # it says where else: every milestone, in every locale


def test_check_names_a_bad_redis_port_without_a_traceback(
    trees: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("NOTIFIER_REDIS_URL", "redis://db.internal:99999/0")
    monkeypatch.setenv("NOTIFIER_API_KEYS", '{"k_backend_0123456789": ["*"]}')
    monkeypatch.setenv("NOTIFIER_SIGNING_SECRET", "0123456789abcdef0123")
    assert main(["check"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "error: invalid settings: NOTIFIER_REDIS_URL: does not read as a URL: its port after "
        "the host must be a number up to 65535, and a password holding #, /, ?, @ or : must be "
        "percent-encoded (%23, %2F, %3F, %40, %3A)\n"
    )


@pytest.mark.parametrize(
    "url",
    [
        "redis://:Xs3cr3t#pw@127.0.0.1:16390/0",
        "redis://:Xs3cr3t/pw@127.0.0.1:16390/0",
        "redis://:Xs3cr3t?pw@127.0.0.1:16390/0",
        "redis+cluster://:Xs3cr3t/pw@10.0.0.1:7001,10.0.0.2:7002",
        # the part before the cut reads as a port: the rest as the options, or the path
        "redis://:1234?Xs3cr3tpw@127.0.0.1:6379/0",
        "redis://:1234/Xs3cr3tpw@127.0.0.1:6379/0",
    ],
)
def test_a_redis_url_that_does_not_read_never_prints_its_password(
    trees: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], url: str
) -> None:
    """A password holding "#", "/" or "?" was read as the port, and the error quoted it:
    "bad port: Port could not be cast to integer value as 'Xs3cr3t'" (an operator's drill)."""
    monkeypatch.setenv("NOTIFIER_REDIS_URL", url)
    monkeypatch.setenv("NOTIFIER_API_KEYS", '{"k_backend_0123456789": ["*"]}')
    monkeypatch.setenv("NOTIFIER_SIGNING_SECRET", "0123456789abcdef0123")
    assert main(["check"]) == 2
    err = capsys.readouterr().err
    assert "Xs3cr3t" not in err and "pw" not in err, err
    assert "must be percent-encoded (%23, %2F, %3F" in err, err


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("NOTIFIER_PUBLIC_URL", "not-a-url", "must be an http:// or https:// URL with a host"),
        ("NOTIFIER_PUBLIC_URL", "ftp://x.example", "must be an http:// or https:// URL"),
        ("NOTIFIER_PUBLIC_URL", "https://x.example/?a=1", "without ?query or #fragment"),
        ("NOTIFIER_TWILIO_BASE_URL", "notaurl", "must be an http:// or https:// URL"),
        ("NOTIFIER_SENDGRID_BASE_URL", "https://x.example:99999", "must be a number up to"),
        ("NOTIFIER_EMAIL_FROM", "notanemail", "must be an email address alone"),
        ("NOTIFIER_EMAIL_FROM", "Acme <a@acme.example>", "must be an email address alone"),
        ("NOTIFIER_SENDGRID_WEBHOOK_PUBLIC_KEY", "notbase64!!", "the base64 public key"),
        ("NOTIFIER_SENDGRID_WEBHOOK_PUBLIC_KEY", "aGVsbG8=", "the base64 public key"),
        # a cluster named by several nodes: each one checked
        ("NOTIFIER_REDIS_URL", "redis+cluster://10.0.0.1:7001,10.0.0.2:x", "node 2 (after"),
        ("NOTIFIER_REDIS_URL", "redis+cluster://10.0.0.1:7001,,10.0.0.3", "no host"),
        # redis-py read any other path as database 0
        ("NOTIFIER_REDIS_URL", "redis://127.0.0.1:6379/abc", "must be a number, like /0"),
        # redis-py passed an unknown option to the connection: a traceback at start-up
        ("NOTIFIER_REDIS_URL", "redis://127.0.0.1:6379/0?foo=bar", "option redis-py cannot"),
        ("NOTIFIER_REDIS_URL", "redis://127.0.0.1:6379/0?retry=x", "'retry' (after the ?"),
        ("NOTIFIER_REDIS_URL", "redis://127.0.0.1:6379/0?socket_timeout=abc", "does not read"),
        ("NOTIFIER_QUEUE_REDIS_URL", "redis://127.0.0.1:6379/0?foo=bar", "'foo' (after the ?"),
    ],
)
def test_a_bad_url_address_or_key_is_one_line_naming_its_variable(
    trees: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    variable: str,
    value: str,
    says: str,
) -> None:
    """Before, these were taken as they were, and emails went out with ``From: Acme
    <notanemail>`` and ``List-Unsubscribe: <not-a-url/v1/unsubscribe/…>`` (a black-box
    probe), and a bad SendGrid key refused every event with 403."""
    monkeypatch.setenv(variable, value)
    assert main(["check"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: invalid settings: {variable}: ") and says in err, err
    assert value not in err
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    "variable",
    [
        "NOTIFIER_HOST",
        "NOTIFIER_OUTBOX_DIR",
        "NOTIFIER_TEMPLATES_DIR",
        # (it was the embedded in-memory store: found by an operator's drill)
        "NOTIFIER_REDIS_URL",
        "NOTIFIER_QUEUE_REDIS_URL",
    ],
)
def test_an_empty_host_or_folder_is_refused(
    trees: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], variable: str
) -> None:
    """An empty NOTIFIER_HOST listened on every interface (the development key open to the
    network in the embedded mode); an empty folder was the working directory (found by a
    black-box probe)."""
    monkeypatch.setenv(variable, "")
    assert main(["check"]) == 2
    assert capsys.readouterr().err == (
        f"error: invalid settings: {variable}: is empty: give a value, or unset it for the "
        "default\n"
    )


def test_a_dotenv_that_is_not_utf8_or_a_metrics_dir_that_is_a_file_is_one_line(
    trees: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Both were tracebacks (the second only once `serve` started; found by a probe)."""
    (trees / ".env").write_bytes(b"\xff\xfe=1\n")
    assert main(["check"]) == 2
    assert capsys.readouterr().err == "error: .env: not UTF-8 text\n"
    (trees / ".env").unlink()
    (trees / "a-file").write_text("")
    monkeypatch.setenv("NOTIFIER_METRICS_DIR", str(trees / "a-file"))
    assert main(["check"]) == 1
    assert f"error: NOTIFIER_METRICS_DIR: {trees / 'a-file'}: not a directory\n" in (
        capsys.readouterr().err
    )


def test_a_folder_the_service_could_not_make_or_write_in_is_one_line(
    trees: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The outbox (when a default channel writes there) and the metrics folder are made when
    missing; one under a file failed every message later (the outbox: "outbox write failed:
    Not a directory", naming neither setting nor path) or was a traceback (metrics)."""
    (trees / "a-file").write_text("")
    monkeypatch.setenv("NOTIFIER_OUTBOX_DIR", str(trees / "a-file" / "outbox"))
    assert main(["check"]) == 1
    assert (
        f"error: NOTIFIER_OUTBOX_DIR: {trees / 'a-file' / 'outbox'}: not a directory "
        f"({trees / 'a-file'} is a file)\n"
    ) in capsys.readouterr().err
    # not when no default channel writes to the outbox (a provider's deployment)
    monkeypatch.setenv("NOTIFIER_EMAIL_CHANNEL", "sendgrid")
    monkeypatch.setenv("NOTIFIER_SENDGRID_API_KEY", "SG.x")
    monkeypatch.setenv("NOTIFIER_SMS_CHANNEL", "twilio")
    monkeypatch.setenv("NOTIFIER_TWILIO_ACCOUNT_SID", "AC" + "0" * 32)
    monkeypatch.setenv("NOTIFIER_TWILIO_AUTH_TOKEN", "0" * 32)
    monkeypatch.setenv("NOTIFIER_TWILIO_FROM", "+15005550006")
    monkeypatch.setenv("NOTIFIER_SENDGRID_FROM", "notifications@shop.example")
    assert "NOTIFIER_OUTBOX_DIR" not in (main(["check"]), capsys.readouterr().err)[1]
    # a metrics folder the process cannot make: one line when it starts, not a traceback
    monkeypatch.setenv("NOTIFIER_METRICS_DIR", str(trees / "a-file" / "metrics"))
    assert main(["check"]) == 1
    assert "error: NOTIFIER_METRICS_DIR: " in capsys.readouterr().err
    with pytest.raises(ConfigurationError, match=r"NOTIFIER_METRICS_DIR: cannot make .*metrics"):
        metrics.configure(trees / "a-file" / "metrics")


def test_a_tree_that_is_not_a_directory_names_its_variable(
    trees: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("NOTIFIER_TEMPLATES_DIR", str(trees / "nowhere"))
    assert main(["check"]) == 1
    err = capsys.readouterr().err
    assert "error: NOTIFIER_TEMPLATES_DIR: not a directory (or it does not exist)\n" in err
    assert "nowhere" not in err.split("error: ", 1)[1]


def test_check_validates_the_published_overrides_in_redis(
    trees: Path,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A publish was checked, but the files beneath may change since: check looks again."""

    async def publish() -> None:
        redis = ArqRedis.from_url(redis_url)
        store = OverrideStore(redis)
        rev = await store.save("acme", "messages/delivered.jinja", "{{ brand.nmae }}", "k", "t")
        await store.publish("acme", rev, "k", "t")
        await redis.aclose()

    asyncio.run(publish())
    monkeypatch.setenv("NOTIFIER_REDIS_URL", redis_url)
    monkeypatch.setenv("NOTIFIER_API_KEYS", '{"k_backend_0123456789": ["*"]}')
    monkeypatch.setenv("NOTIFIER_SIGNING_SECRET", "0123456789abcdef0123")
    assert main(["check"]) == 1
    err = capsys.readouterr().err
    assert "error: published override of acme (version 1): templates/acme: " in err
    assert "nmae" in err


def test_check_reports_untranslated_merchant_words(
    trees: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    own = trees / "templates" / "acme" / "messages"
    own.mkdir(parents=True)
    (own / "delivered.jinja").write_text(
        (trees / "templates" / "messages" / "delivered.jinja")
        .read_text()
        .replace("{% trans %}Enjoy your order.{% endtrans %}", "{% trans %}Enjoy!{% endtrans %}")
    )
    (trees / "templates" / "acme" / "brand.yaml").write_text("locales: [fr]\n")
    assert main(["check"]) == 1
    err = capsys.readouterr().err
    assert "error: templates/acme: 'Enjoy!' has no translation in fr:" in err


def test_check_says_what_serve_would_refuse_and_where_links_would_point(
    trees: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`check` passed a Redis deployment without API keys, which `serve` refuses, and one
    whose Twilio status callbacks and unsubscribe links point at loopback (found by a
    black-box probe): the first is an error now, the second a warning."""
    monkeypatch.setenv("NOTIFIER_REDIS_URL", redis_url)
    (trees / "templates" / "messages" / "delivered.jinja").write_text("{{ nope }}")
    assert main(["check"]) == 1
    err = capsys.readouterr().err
    assert "error: NOTIFIER_API_KEYS is required when NOTIFIER_REDIS_URL is set\n" in err
    assert "nope" in err  # and everything else is checked still
    shutil.copy(
        data_dir("templates", None) / "messages" / "delivered.jinja",
        trees / "templates" / "messages" / "delivered.jinja",
    )
    monkeypatch.setenv("NOTIFIER_API_KEYS", '{"k_backend_0123456789": ["*"]}')
    monkeypatch.setenv("NOTIFIER_SMS_CHANNEL", "twilio")
    monkeypatch.setenv("NOTIFIER_TWILIO_ACCOUNT_SID", "AC" + "0" * 32)
    monkeypatch.setenv("NOTIFIER_TWILIO_AUTH_TOKEN", "0" * 32)
    monkeypatch.setenv("NOTIFIER_TWILIO_FROM", "+15005550006")
    acme = trees / "templates" / "acme"
    acme.mkdir(parents=True, exist_ok=True)
    brand = "name: Acme\none_click_unsubscribe: true\nsupport: {email: help@acme.example}\n"
    (acme / "brand.yaml").write_text(brand)
    assert main(["check"]) == 0
    err = capsys.readouterr().err
    assert "warning: NOTIFIER_PUBLIC_URL is http://127.0.0.1:8080: Twilio's status" in err
    assert "one_click_unsubscribe with NOTIFIER_PUBLIC_URL http://127.0.0.1:8080" in err
    monkeypatch.setenv("NOTIFIER_PUBLIC_URL", "https://notify.shop.example")
    assert main(["check"]) == 0
    assert "NOTIFIER_PUBLIC_URL" not in capsys.readouterr().err


def test_a_heartbeat_file_the_worker_could_never_touch_is_refused_at_start_up(
    trees: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`worker --heartbeat /nonexistent/dir/hb` started, and logged "cannot touch the
    heartbeat file" every 5 s without naming it (an operator's drill)."""
    monkeypatch.setenv("NOTIFIER_REDIS_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("NOTIFIER_API_KEYS", '{"k_backend_0123456789": ["*"]}')
    missing = trees / "nowhere" / "hb"
    assert main(["worker", "--heartbeat", str(missing)]) == 2
    assert capsys.readouterr().err == (
        f"error: --heartbeat {missing}: the folder {missing.parent} does not exist\n"
    )


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("redis://db.internal:6380/3", "Redis at db.internal:6380 (database 3)"),
        ("redis://db.internal?db=3", "Redis at db.internal:6379 (database 3)"),
        ("redis://db.internal/1?db=3", "Redis at db.internal:6379 (database 3)"),
        ("unix:///run/redis/r.sock", "Redis at the socket /run/redis/r.sock (database 0)"),
        ("unix:///run/redis/r.sock?db=2", "Redis at the socket /run/redis/r.sock (database 2)"),
    ],
)
def test_the_mode_line_names_the_database_redis_py_uses(url: str, said: str) -> None:
    """`?db=3` read "database 0" (redis-py uses 3), and a socket "Redis at /tmp/x/r.sock:6379
    (database tmp/x/r.sock)" (an operator's drill)."""
    from notifier.settings import Settings, describe_redis

    settings = Settings(redis_url=url, api_keys={"k_backend_0123456789": ["*"]})
    assert describe_redis(settings) == said


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_a_redis_pipeline_left_open_is_a_warning_not_an_error(
    loop_kind: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """redis-py reports a pipeline collected with its connection held (a command cut short
    while Redis stalled, or by a stop) to the loop, which logged "ERROR asyncio: Unclosed
    Pipeline client" and the client's repr in every drill of a stop during a Redis pause.
    It is a warning saying what happened; anything else is still asyncio's ERROR."""
    settings = make_settings(tmp_path, event_loop=loop_kind)
    loop = new_event_loop(settings, "worker")
    try:
        with caplog.at_level(logging.WARNING):
            loop.call_exception_handler({"message": "Unclosed Pipeline client", "client": 1})
            loop.call_exception_handler({"message": "Task exception was never retrieved"})
    finally:
        loop.close()
    levels = [(r.levelname, r.name) for r in caplog.records]
    assert levels == [("WARNING", "notifier"), ("ERROR", "asyncio")], caplog.text
    assert "pipeline client left open by a Redis command cut short" in caplog.text
    assert "client': 1" not in caplog.text
