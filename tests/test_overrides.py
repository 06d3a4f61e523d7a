"""Merchant overrides at run time: edits picked up, broken files skipped, never the service."""

from __future__ import annotations

import email
import email.policy
import logging
import os
import shutil
import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from aiohttp.test_utils import TestClient

from notifier.check import samples, startup_problems
from notifier.cli import _start_up
from notifier.errors import ConfigurationError, RenderError
from notifier.models import ChannelKind, Notification, Recipient
from notifier.render import EmailMessageOut, Renderer
from notifier.render.environment import TemplateStore
from notifier.render.i18n import Catalogs
from notifier.render.watch import TreeWatch
from notifier.resources import data_dir
from notifier.settings import Settings
from notifier.store import keys
from tests.conftest import (
    auth,
    make_settings,
    outbox_files,
    shared_env,
    spawn_notifier,
    transition,
    wait_until,
    with_macro,
)

Client = TestClient[Any, Any]
DELIVERED = next(t for t in samples() if t.milestone == "delivered")


def tree(tmp_path: Path) -> Path:
    templates = tmp_path / "templates"
    shutil.copytree(data_dir("templates", None), templates)
    (templates / "acme" / "messages").mkdir(parents=True)
    return templates


def renderer(templates: Path, *, strict: bool = False, watch: bool = False) -> Renderer:
    catalogs = Catalogs(data_dir("locales", None))
    return Renderer(
        TemplateStore(templates, catalogs),
        catalogs,
        email_from="notifications@example.com",
        strict=strict,
        watch=TreeWatch([templates], interval_s=0) if watch else None,
    )


def delivered(merchant: str = "acme") -> Notification:
    return Notification(
        notification_id="n_1",
        merchant_id=merchant,
        shipment_id="s1",
        channel=ChannelKind.EMAIL,
        to="ana@example.com",
        transition=DELIVERED,
        recipient=Recipient(email="ana@example.com", locale="en", timezone="Europe/Paris"),
        created_at=DELIVERED.occurred_at,
    )


def own_subject(templates: Path, subject: str) -> None:
    path = templates / "acme" / "messages" / "delivered.jinja"
    default = (templates / "messages" / "delivered.jinja").read_text()
    path.write_text(with_macro(default, "subject", subject))


def test_a_broken_brand_or_template_falls_back_to_the_defaults(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    templates = tree(tmp_path)
    (templates / "acme" / "brand.yaml").write_text("name: Acme\nlogo_url: http://x.example/l.png\n")
    (templates / "acme" / "messages" / "delivered.jinja").write_text(
        "{%- macro subject() -%}{{ no_such_variable }}{%- endmacro -%}"
    )
    r = renderer(templates)
    message = r.render(delivered())
    assert isinstance(message, EmailMessageOut)
    # the default words and brand; the customer still hears that the parcel arrived
    assert message.subject == "Your parcel was delivered"
    assert message.from_addr.startswith("Your shop")
    reasons = sorted(r.disabled["acme"])
    assert "acme/brand.yaml: logo_url: must be an https:// URL" in reasons[0]
    assert "no_such_variable" in reasons[1] and "default templates" in reasons[1]
    assert "merchant acme:" in caplog.text and "logo_url" in caplog.text
    # every other merchant is untouched, and strict renderers (check, preview) refuse
    assert "globex" not in r.disabled and r.render(delivered("globex"))
    with pytest.raises(ConfigurationError, match=r"acme/brand\.yaml: logo_url"):
        renderer(templates, strict=True).brand("acme")
    (templates / "acme" / "brand.yaml").write_text("name: Acme\n")
    with pytest.raises(RenderError, match="no_such_variable"):
        renderer(templates, strict=True).render(delivered())


def test_edits_reach_a_running_renderer_and_the_last_good_brand_stays(tmp_path: Path) -> None:
    templates = tree(tmp_path)
    (templates / "acme" / "brand.yaml").write_text("name: Acme Outfitters\n")
    r = renderer(templates, watch=True)
    first = r.render(delivered())
    assert isinstance(first, EmailMessageOut) and first.from_addr.startswith("Acme Outfitters")
    assert first.subject == "Your parcel was delivered"

    own_subject(templates, "Acme: it is there")
    (templates / "acme" / "brand.yaml").write_text("name: Acme & Co\n")
    second = r.render(delivered())
    assert isinstance(second, EmailMessageOut)
    assert second.subject == "Acme: it is there" and second.from_addr.startswith("Acme & Co")

    # a broken edit: the last good brand stays in force, and the problem is listed
    (templates / "acme" / "brand.yaml").write_text("name: ''\n")
    third = r.render(delivered())
    assert isinstance(third, EmailMessageOut) and third.from_addr.startswith("Acme & Co")
    assert any("last good brand" in why for why in r.disabled["acme"])
    # fixed: picked up, nothing disabled any more
    (templates / "acme" / "brand.yaml").write_text("name: Acme\n")
    fourth = r.render(delivered())
    assert isinstance(fourth, EmailMessageOut)
    assert fourth.from_addr == "Acme <notifications@example.com>"
    assert r.disabled == {}


def test_a_merchant_stays_disabled_until_its_own_files_change(tmp_path: Path) -> None:
    templates = tree(tmp_path)
    (templates / "acme" / "brand.yaml").write_text("name: Acme\nlogo_url: http://x/l.png\n")
    (templates / "globex").mkdir()
    r = renderer(templates, watch=True)
    r.render(delivered())
    assert "acme" in r.disabled and r.take_changes() == ({"acme"}, set())
    # another merchant's edit says nothing about acme's file: still disabled, still counted
    (templates / "globex" / "brand.yaml").write_text("name: Globex\n")
    r.render(delivered("globex"))
    assert "acme" in r.disabled and r.take_changes() == (set(), set())
    # an edit of acme's own folder has it judged again (and found broken again on use)
    (templates / "acme" / "brand.yaml").write_text("name: Acme\nlogo_url: http://y/l.png\n")
    r.render(delivered("globex"))
    assert "acme" not in r.disabled and r.take_changes() == (set(), {"acme"})
    r.render(delivered())
    assert r.take_changes() == ({"acme"}, set())
    # an edit of the defaults re-judges every merchant
    (templates / "brand.yaml").write_text((templates / "brand.yaml").read_text() + "\n")
    r.render(delivered("globex"))
    assert r.take_changes() == (set(), {"acme"})


def test_a_brand_file_that_is_not_utf8_is_skipped_like_any_broken_file(tmp_path: Path) -> None:
    templates = tree(tmp_path)
    (templates / "acme" / "brand.yaml").write_bytes("name: Café Acme\n".encode("latin-1"))
    r = renderer(templates)
    message = r.render(delivered())
    assert isinstance(message, EmailMessageOut) and message.from_addr.startswith("Your shop")
    assert any("not UTF-8 text" in why for why in r.disabled["acme"])


def test_a_template_that_is_not_utf8_is_skipped_naming_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    templates = tree(tmp_path)
    (templates / "acme" / "messages" / "delivered.jinja").write_bytes(
        "{%- macro subject() -%}Café{%- endmacro -%}\n".encode("latin-1")
    )
    r = renderer(templates)
    message = r.render(delivered())
    assert isinstance(message, EmailMessageOut) and message.subject == "Your parcel was delivered"
    [why] = r.disabled["acme"]
    assert "messages/delivered.jinja, line 1: not UTF-8 text (byte 0xe9 on this line)" in why
    assert "not UTF-8 text" in caplog.text  # the log names the file too
    with pytest.raises(RenderError, match="not UTF-8 text"):
        renderer(templates, strict=True).render(delivered())


async def test_the_api_and_the_editor_open_a_template_that_is_not_utf8(
    tmp_path: Path, redis_url: str
) -> None:
    """It was a 500 on both: the merchant could not open the file to fix it. It opens, its
    stray byte shown as U+FFFD."""
    from aiohttp.test_utils import TestServer

    from notifier.app import create_app
    from tests.test_editor import sign_in

    templates = tree(tmp_path)
    (templates / "acme" / "messages" / "delivered.jinja").write_bytes(
        "{%- macro subject() -%}Café{%- endmacro -%}\n".encode("latin-1")
    )
    settings = make_settings(tmp_path, redis_url=redis_url, templates_dir=templates)
    async with TestClient(TestServer(create_app(settings))) as client:
        resp = await client.get("/v1/merchants/acme/templates/delivered", headers=auth())
        assert resp.status == 200, await resp.text()
        assert "Caf\ufffd" in (await resp.json())["text"]
        assert (await client.get("/v1/merchants/acme/templates", headers=auth())).status == 200
        await sign_in(client)
        page = await client.get("/merchant/acme/messages/delivered")
        assert page.status == 200 and "Caf\ufffd" in await page.text()


def test_the_watch_sees_added_changed_and_removed_files(tmp_path: Path) -> None:
    now = [0.0]
    watch = TreeWatch([tmp_path], interval_s=1.0, clock=lambda: now[0])
    (tmp_path / "a.jinja").write_text("one")
    assert not watch.changed()  # not looked at again before the interval
    now[0] = 1.0
    assert watch.changed() and not watch.changed()
    now[0] = 2.0
    path = tmp_path / "a.jinja"
    path.write_text("two")  # same size: the modification time tells
    os.utime(path, ns=(1, 1))
    assert watch.changed()
    now[0] = 3.0
    path.unlink()
    assert watch.changed()
    now[0] = 4.0
    assert not watch.changed()


def test_start_up_checks_do_not_look_at_merchants(tmp_path: Path) -> None:
    templates = tree(tmp_path)
    for i in range(30):
        (templates / f"m{i}").mkdir()
        (templates / f"m{i}" / "brand.yaml").write_text("accent: 'not a colour'\n")
    settings = make_settings(tmp_path, templates_dir=templates)
    assert startup_problems(settings) == []
    (templates / "brand.yaml").write_text("name: ''\n")  # the defaults are another matter
    assert any("templates/brand.yaml" in p for p in startup_problems(settings))


def test_start_up_warns_loudly_when_the_default_brand_gives_no_support_contact(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Every merchant without a brand of its own tells customers "contact us" with no way
    to: `serve` and `worker` say so when they start, not only `notifier check`."""
    templates = tree(tmp_path)
    settings = make_settings(tmp_path, templates_dir=templates, template_cache=False)
    with caplog.at_level(logging.WARNING, logger="notifier"):
        _start_up(settings)
    assert "NO SUPPORT CONTACT IN THE DEFAULT BRAND" in caplog.text
    caplog.clear()
    brand = templates / "brand.yaml"
    brand.write_text(brand.read_text().replace("  url: null", "  url: https://shop.example/help"))
    with caplog.at_level(logging.WARNING, logger="notifier"):
        _start_up(settings)
    assert "NO SUPPORT CONTACT" not in caplog.text


async def test_a_running_worker_process_survives_a_bad_brand_and_picks_up_edits(
    client: Client, settings: Settings, tmp_path: Path
) -> None:
    templates = tree(tmp_path)
    (templates / "acme" / "brand.yaml").write_text("name: Acme\naccent: 'blue-ish'\n")
    proc = spawn_notifier(
        ["worker"],
        tmp_path,
        NOTIFIER_TEMPLATES_DIR=str(templates),
        **shared_env(settings),
        NOTIFIER_RELOAD_INTERVAL_S="0",
    )
    at = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()

    async def deliver(shipment: str) -> email.message.EmailMessage:
        body = transition(
            event_id=f"e_{shipment}", shipment_id=shipment, status="delivered", occurred_at=at
        )
        resp = await client.post("/v1/transitions", json=body, headers=auth())
        assert resp.status == 202
        folder = settings.outbox_dir / "acme" / shipment
        wait_until(
            lambda: any(folder.glob("*.eml")) or proc.poll() is not None, "the email of " + shipment
        )
        assert proc.poll() is None, proc.communicate()[0]
        [eml] = folder.glob("*.eml")
        msg = email.message_from_bytes(eml.read_bytes(), policy=email.policy.default)
        assert isinstance(msg, email.message.EmailMessage)
        return msg

    async def disabled() -> int:
        count: int = (await (await client.get("/healthz")).json())["merchant_overrides_disabled"]
        return count

    try:
        # one merchant's broken brand.yaml: the worker starts and its messages go out
        first = await deliver("s1")
        assert first["From"].startswith("Your shop")
        assert await disabled() == 1  # /healthz counts it (the worker published it)
        # edits reach the running process: a fixed brand, a template of its own
        (templates / "acme" / "brand.yaml").write_text("name: Acme Outfitters\n")
        own_subject(templates, "Acme: your parcel is here")
        second = await deliver("s2")
        assert second["Subject"] == "Acme: your parcel is here"
        assert second["From"].startswith("Acme Outfitters")
        assert await disabled() == 0
        # broken again, then its folder removed: the defaults, and /healthz counts nothing
        (templates / "acme" / "brand.yaml").write_text("name: Acme\naccent: 'blue-ish'\n")
        assert (await deliver("s3"))["From"].startswith("Acme Outfitters")  # the last good
        assert await disabled() == 1
        shutil.rmtree(templates / "acme")
        # seen by the idle worker (its sweep, every 15 s): no message needed to clear it
        r = redis.Redis.from_url(str(settings.redis_url))
        wait_until(lambda: r.zcard(keys.OVERRIDES_KEY) == 0, "the removal seen", seconds=40)
        r.close()
        assert await disabled() == 0
        fourth = await deliver("s4")
        assert fourth["From"].startswith("Your shop")
    finally:
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=20)[0]
    assert proc.returncode == 0, output
    assert "templates/acme/brand.yaml: accent" in output  # logged, with the file and field
    assert len(outbox_files(settings, ".eml")) == 4


async def test_a_worker_started_after_a_fix_judges_the_counted_merchants_again(
    client: Client, settings: Settings, tmp_path: Path
) -> None:
    """/healthz counted three merchants an earlier worker met with broken files. Before the
    next worker started, one was fixed and one's folder removed: that worker judges them
    again at start-up, with no message sent, and only the still broken one stays counted
    (it stayed counted for a day: a worker cleared only edits it saw itself)."""
    templates = tree(tmp_path)
    broken = "name: Acme\naccent: 'blue-ish'\n"
    for merchant in ("beta", "gone"):
        (templates / merchant).mkdir()
        (templates / merchant / "brand.yaml").write_text(broken)
    (templates / "acme" / "brand.yaml").write_text("name: Acme Outfitters\n")  # the fix
    shutil.rmtree(templates / "gone")
    r = redis.Redis.from_url(str(settings.redis_url))
    met = int(datetime.now(UTC).timestamp() * 1000)  # a spawned worker's clock is the real one
    r.zadd(keys.OVERRIDES_KEY, dict.fromkeys(["acme", "beta", "gone"], met))
    assert (await (await client.get("/healthz")).json())["merchant_overrides_disabled"] == 3
    proc = spawn_notifier(
        ["worker"],
        tmp_path,
        NOTIFIER_TEMPLATES_DIR=str(templates),
        **shared_env(settings),
    )
    try:
        wait_until(
            lambda: (
                set(r.zrange(keys.OVERRIDES_KEY, 0, -1)) == {b"beta"} or proc.poll() is not None
            ),
            "the fixed and the removed merchant to be judged again",
            seconds=60,
        )
        assert proc.poll() is None
        assert (await (await client.get("/healthz")).json())["merchant_overrides_disabled"] == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=20)[0]
        r.close()
    assert proc.returncode == 0, output
    assert "3 merchants counted with broken files judged again, 2 of them fixed" in output
    assert outbox_files(settings, ".eml") == []  # judged by the checker: nothing was sent


def test_changes_that_could_not_be_published_are_told_next_time(tmp_path: Path) -> None:
    """``publish_broken`` took the renderer's changes, then Redis failed: they were lost,
    and /healthz went on counting a fixed merchant (a review). They are put back, and a
    change since wins over the one put back."""
    r = renderer(tree(tmp_path))
    r._hits, r._cleared = {"a", "b"}, {"c"}
    hits, cleared = r.take_changes()
    r._hits, r._cleared = {"c"}, {"a"}  # since: c hit again, a judged again
    r.put_back(hits, cleared)
    assert r.take_changes() == ({"b", "c"}, {"a"})
