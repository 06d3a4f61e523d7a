"""The README's first screen for real: `notifier serve` as a process, its curl, the outbox."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from notifier.settings import DEV_API_KEY, Settings, variable
from tests.conftest import free_port, healthy, spawn_notifier, wait_until

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_curl() -> str:
    text = README.read_text(encoding="utf-8")
    match = re.search(r"<!-- readme-curl.*?-->\s*```sh\n(.*?)```", text, re.S)
    assert match, "README lost its curl example"
    return match.group(1)


def test_readme_curl_leads_to_eml_and_sms_json(tmp_path: Path) -> None:
    port = free_port()
    proc = spawn_notifier(["serve", "--port", str(port)], tmp_path)
    try:
        wait_until(lambda: healthy(port) or proc.poll() is not None, "notifier serve")
        assert proc.poll() is None, proc.communicate()[0]
        command = readme_curl().replace("127.0.0.1:8080", f"127.0.0.1:{port}")
        # the date the command computes, computed once: both posts carry the same body even
        # across midnight (a different body under the same event id would be a 409)
        today = datetime.now(UTC).strftime("%Y-%m-%dT%H:00:00Z")
        assert "$(date -u +%Y-%m-%dT%H:00:00Z)" in command
        command = command.replace("$(date -u +%Y-%m-%dT%H:00:00Z)", today)
        out = subprocess.run(["bash", "-c", command], capture_output=True, text=True, check=True)
        assert json.loads(out.stdout)["accepted"] == 1
        outbox = tmp_path / "outbox" / "acme" / "shp_123"

        def eml() -> bool:
            return outbox.is_dir() and any(outbox.glob("*.eml"))

        def sms_settled() -> bool:
            return bool(
                any(outbox.glob("*.sms.json")) or sms_decision().get("outcome") == "deferred"
            )

        def sms_decision() -> dict[str, Any]:
            url = f"http://127.0.0.1:{port}/v1/merchants/acme/shipments/shp_123/notifications"
            req = urllib.request.Request(url, headers={"Authorization": f"Bearer {DEV_API_KEY}"})
            try:
                with urllib.request.urlopen(req, timeout=2) as resp:
                    decisions = json.load(resp)["decisions"]
            except OSError:
                return {}
            return next((d for d in decisions if d.get("channel") == "sms"), {})

        wait_until(eml, "the .eml in the outbox")
        # The SMS goes out at once, unless it is night in Paris (SMS quiet hours, 21:00-08:00):
        # then it is deferred to the morning, and the history says so
        wait_until(sms_settled, "the SMS to be sent or deferred")
        deferred = not any(outbox.glob("*.sms.json"))
        if deferred:
            assert "quiet hours" in sms_decision()["reason"], sms_decision()
        again = subprocess.run(["bash", "-c", command], capture_output=True, text=True, check=True)
        assert json.loads(again.stdout)["duplicates"] == 1
    finally:
        proc.terminate()
        output = proc.communicate(timeout=10)[0]
    assert "NOTHING PERSISTS" in output
    assert "dev-key-not-for-production" in output
    assert "ana@example.com" not in output and "+33612345678" not in output  # no PII in logs
    assert len(list(outbox.glob("*"))) == (1 if deferred else 2)


def test_every_setting_is_in_the_configuration_table() -> None:
    text = README.read_text(encoding="utf-8")
    table = text[text.index("## Configuration") : text.index("## Commands")]
    documented = set(re.findall(r"`(NOTIFIER_[A-Z0-9_]+)`", table))
    missing = sorted({variable(name) for name in Settings.model_fields} - documented)
    assert not missing, f"README's Configuration table lacks {missing}"
