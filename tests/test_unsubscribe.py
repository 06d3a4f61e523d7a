"""One-click unsubscribe (RFC 8058): headers on the email, signed links, GET vs POST."""

from __future__ import annotations

import email
import email.policy
import shutil
from pathlib import Path

from aiohttp.test_utils import TestClient, TestServer

from notifier.app import create_app
from notifier.resources import data_dir
from notifier.unsubscribe import sign, verify
from tests.conftest import history, make_settings, outbox_files, post, run_worker, transition

SECRET = "s3cret-for-signing-links"


def test_tokens_are_signed() -> None:
    token = sign(SECRET, "acme", "ana@example.com")
    assert verify(SECRET, token) == ("acme", "ana@example.com")
    assert verify("another-secret-entirely", token) is None
    forged = sign(SECRET, "acme", "ana@example.com").split(".")[0] + "." + "A" * 43
    assert verify(SECRET, forged) is None
    assert verify(SECRET, "garbage") is None


async def test_one_click_unsubscribe_end_to_end(tmp_path: Path, redis_url: str) -> None:
    templates = tmp_path / "templates"
    shutil.copytree(data_dir("templates", None), templates)
    (templates / "acme").mkdir()
    (templates / "acme" / "brand.yaml").write_text("name: Acme\none_click_unsubscribe: true\n")
    settings = make_settings(
        tmp_path,
        redis_url=redis_url,
        templates_dir=templates,
        signing_secret=SECRET,
        public_url="https://notify.example.com",
    )
    async with TestClient(TestServer(create_app(settings))) as client:
        await post(client, transition())
        await run_worker(settings)
        [eml] = outbox_files(settings, ".eml")
        msg = email.message_from_bytes(eml.read_bytes(), policy=email.policy.default)
        assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        url = msg["List-Unsubscribe"].strip("<>")
        assert url.startswith("https://notify.example.com/v1/unsubscribe/")
        path = url.removeprefix("https://notify.example.com")

        page = await client.get(path)  # a link scanner: nothing happens
        assert page.status == 200 and '<form method="post">' in await page.text()
        done = await client.post(path, data={"List-Unsubscribe": "One-Click"})
        assert done.status == 200
        assert (await client.post(path[:-3] + "abc")).status == 404

        await post(
            client,
            transition(event_id="b", status="delivered", occurred_at="2026-11-21T13:00:00+01:00"),
        )
        await run_worker(settings)
        latest = [d for d in await history(client) if d["channel"] == "email"][-1]
        assert latest["reason"] == "recipient opted out of email"
