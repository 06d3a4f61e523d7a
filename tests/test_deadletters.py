"""`notifier dead-letters list|show|replay|purge` on a real Redis: both dead-letter lists,
personal data masked unless asked for, replays that never send a message twice."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient

from notifier.cli import main
from notifier.deadletters import DeadLetters
from notifier.errors import PermanentDeliveryError
from notifier.models import ChannelKind, Notification, waiting_payload
from notifier.packing import NOTIFICATION, pack, unpack
from notifier.pipeline import Pipeline
from notifier.resources import data_dir, open_resources
from notifier.settings import Settings
from notifier.store import InboxEntry, keys
from notifier.worker import release_due
from tests.conftest import (
    API_KEYS,
    fixed_clock,
    outbox_files,
    post,
    read_whole_inbox,
    run_worker,
    transition,
)
from tests.fakes import FailingChannel

Client = TestClient[Any, Any]


@pytest.fixture
def cli(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Run `notifier ARGS` against the test's Redis; (exit code, stdout, stderr)."""
    for name in [k for k in os.environ if k.startswith("NOTIFIER_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("NOTIFIER_REDIS_URL", str(settings.redis_url))
    monkeypatch.setenv("NOTIFIER_API_KEYS", json.dumps(API_KEYS))
    monkeypatch.setenv("NOTIFIER_PARTITIONS", str(settings.partitions))
    monkeypatch.setenv("NOTIFIER_SIGNING_SECRET", "0123456789abcdef0123")

    async def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
        code = await asyncio.to_thread(main, ["dead-letters", *args])
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


async def failed_messages(client: Client, settings: Settings) -> list[str]:
    """Post a transition whose two messages a provider refuses for good."""
    await post(client, transition())
    async with open_resources(settings, clock=fixed_clock()) as res:
        refusing = FailingChannel(PermanentDeliveryError, "provider said no", "refusing")
        res.channels = {ChannelKind.EMAIL: refusing, ChannelKind.SMS: refusing}
        res.providers = {}
        await Pipeline(res).process(await read_whole_inbox(res, "w"))
        return [i.decode() for i in await res.redis.lrange(res.store.DEAD_LETTER_KEY, 0, -1)]


async def test_failed_messages_are_listed_masked_replayed_once_and_sent(
    client: Client, settings: Settings, cli: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = await failed_messages(client, settings)
    assert len(ids) == 2
    code, out, _ = await cli(capsys, "list", "--kind", "messages")
    assert code == 0 and out.count("messages\tn_") == 2 and "provider said no" in out
    code, out, _ = await cli(capsys, "show", ids[0])
    assert code == 0 and "ana@example.com" not in out and "+33612345678" not in out
    assert '"***"' in out and "provider said no" in out
    code, out, _ = await cli(capsys, "show", ids[0], "--reveal")
    assert "ana@example.com" in out or "+33612345678" in out

    code, out, _ = await cli(capsys, "replay", "--all", "--kind", "messages")
    # the CLI makes them due on the real clock: a worker clock past any real "now"
    later = fixed_clock(datetime(2100, 1, 1, tzinfo=UTC))
    assert code == 0 and out.count("\treplayed") == 2
    code, _, err = await cli(capsys, "replay", ids[0])
    assert code == 1 and "no dead letter" in err  # off the list: nothing to replay
    async with open_resources(settings, clock=later) as res:
        assert await release_due({"res": res, "pipeline": Pipeline(res)}) == 2
        # an operator's second replay racing the first finds it sent: nothing happens
        await res.redis.rpush(res.store.DEAD_LETTER_KEY, ids[0])
    code, out, _ = await cli(capsys, "replay", ids[0])
    assert "not in the ledger any more (sent since" in out
    async with open_resources(settings, clock=later) as res:
        assert await release_due({"res": res, "pipeline": Pipeline(res)}) == 0
        assert await res.redis.llen(res.store.DEAD_LETTER_KEY) == 0
    assert len(outbox_files(settings)) == 2  # each message once


async def test_a_buried_inbox_entry_is_replayed_once_and_processed(
    client: Client, settings: Settings, cli: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """An accepted transition a drain failed on (a bug since fixed) goes back to work."""
    body = transition(event_id="buried")
    async with open_resources(settings, clock=fixed_clock()) as res:
        await res.store.bury(0, [InboxEntry("1-0", orjson.dumps(body))], "failed 5 times")
    code, out, _ = await cli(capsys, "list", "--kind", "inbox")
    assert code == 0 and "failed 5 times (event buried, inbox entry 1-0)" in out
    [entry_id] = [line.split("\t")[1] for line in out.splitlines() if line.startswith("inbox")]
    code, out, _ = await cli(capsys, "show", entry_id)
    assert "ana@example.com" not in out and '"event_id": "buried"' in out
    code, out, _ = await cli(capsys, "replay", entry_id)
    assert code == 0 and "replayed into partition" in out
    code, _, err = await cli(capsys, "replay", entry_id)
    assert code == 1 and "no dead letter" in err
    await run_worker(settings)
    assert len(outbox_files(settings)) == 2


async def test_an_unreadable_entry_is_shown_redacted_and_found_by_its_inbox_id(
    settings: Settings, cli: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = b"not json, from zq@example.org at +33612345678"
    async with open_resources(settings, clock=fixed_clock()) as res:
        await res.store.bury(0, [InboxEntry("7-0", raw)], "not a valid transition")
    code, out, _ = await cli(capsys, "show", "7-0")  # the id the list names it by
    assert code == 0
    assert "zq@example.org" not in out and "+33612345678" not in out
    assert "not json, from [email] at [phone]" in out
    code, out, _ = await cli(capsys, "show", "7-0", "--reveal")
    assert "zq@example.org" in out


async def test_purge_needs_yes_and_bad_usage_is_one_line(
    client: Client, settings: Settings, cli: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = await failed_messages(client, settings)
    code, _, err = await cli(capsys, "purge", "--all")
    assert code == 2 and "add --yes" in err
    code, out, _ = await cli(capsys, "purge", ids[0], "--yes")
    assert code == 0 and out.strip() == f"messages\t{ids[0]}\tpurged"
    code, out, _ = await cli(capsys, "list")
    assert out.count("messages\tn_") == 1
    for args in (("show",), ("replay",), ("replay", ids[1], "--all"), ("list", ids[1])):
        code, _, err = await cli(capsys, *args)
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, args


async def test_kind_holds_for_show_replay_and_purge_and_list_gives_the_total(
    client: Client, settings: Settings, cli: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--kind` means that list only: a purge of a message's id `--kind inbox` dropped the
    message (found by a black-box probe). The list's count is of every dead letter, not of
    the rows `--limit` let through; a limit under 1 is refused."""
    ids = await failed_messages(client, settings)
    assert len(ids) == 2
    code, _, err = await cli(capsys, "purge", ids[0], "--kind", "inbox", "--yes")
    assert code == 1 and f"error: no dead letter {ids[0]} among the inbox dead letters\n" in err
    code, _, _ = await cli(capsys, "show", ids[0], "--kind", "inbox")
    assert code == 1
    code, out, _ = await cli(capsys, "show", ids[0], "--kind", "messages")
    assert code == 0 and ids[0] in out
    code, out, err = await cli(capsys, "list", "--limit", "1")
    assert out.count("messages\tn_") == 1
    assert "2 dead letter(s) (1 shown: --limit 1)\n" in err
    code, _, err = await cli(capsys, "list", "--kind", "inbox")
    assert "0 dead letter(s)\n" in err
    with pytest.raises(SystemExit):
        main(["dead-letters", "list", "--limit", "0"])
    assert "invalid number (1 or more) value: '0'" in capsys.readouterr().err


async def test_redis_that_does_not_answer_is_one_line(
    cli: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFIER_REDIS_URL", "redis://127.0.0.1:1/0")
    code, _, err = await cli(capsys, "list")
    assert code == 2 and "Traceback" not in err
    assert "error: cannot read the dead letters: Redis (Redis at 127.0.0.1:1" in err


def test_dead_letters_need_redis(capsys: pytest.CaptureFixture[str], monkeypatch: Any) -> None:
    for name in [k for k in os.environ if k.startswith("NOTIFIER_")]:
        monkeypatch.delenv(name)
    assert main(["dead-letters", "list"]) == 2
    assert "NOTIFIER_REDIS_URL is not set" in capsys.readouterr().err


async def test_a_packed_payload_shows_as_the_notification(
    client: Client, settings: Settings, cli: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """A message that waited (its payload packed) and then failed reads like any other."""
    ids = await failed_messages(client, settings)
    async with open_resources(settings, clock=fixed_clock()) as res:
        scope = res.store.scope_of("acme", "shp_123")
        name = keys.notification_key(ids[0], res.store.tag(scope))
        plain = await res.store.payload(ids[0], scope)
        assert plain is not None and plain[:1] == b"{"
        # packed, and in one field as written before payloads were kept in pieces
        pieces = [f for f in await res.redis.hkeys(name) if f[:1] == b"p" and f[1:].isdigit()]
        await res.redis.hdel(name, *pieces)
        await res.redis.hset(name, "p", pack(plain, NOTIFICATION))
    code, out, _ = await cli(capsys, "show", ids[0], "--reveal")
    assert code == 0 and "shp_123" in out
    assert "ana@example.com" in out or "+33612345678" in out
    # as a message that waited keeps it now: without its id, merchant and shipment (its
    # key and its transition say them), which show as they did
    whole = orjson.loads(plain)
    async with open_resources(settings, clock=fixed_clock()) as res:
        compact = waiting_payload(Notification.model_validate_json(plain))
        assert b"notification_id" not in unpack(compact)
        await res.redis.hset(name, "p", compact)
        letter = await DeadLetters(res.redis, res.store, res.queue).show(ids[0])  # as `show`
    assert letter is not None
    assert (letter.merchant_id, letter.shipment_id) == ("acme", "shp_123")
    assert letter.body["notification"] == whole


async def sms_refused(client: Client, settings: Settings) -> str:
    """Post a transition whose SMS a provider refuses for good (the email goes out, and any
    message due at once); the SMS's dead letter."""
    await post(client, transition())
    async with open_resources(settings, clock=fixed_clock()) as res:
        refusing = FailingChannel(PermanentDeliveryError, "no such number", "refusing")
        res.channels = {**res.channels, ChannelKind.SMS: refusing}
        res.providers = {}
        await Pipeline(res).process(await read_whole_inbox(res, "w"))
        await release_due({"res": res, "pipeline": Pipeline(res)})  # a fallback is due now
        [sms] = [i.decode() for i in await res.redis.lrange(res.store.DEAD_LETTER_KEY, 0, -1)]
    return sms


async def test_an_sms_whose_update_went_out_by_email_is_replayed_only_when_forced(
    client: Client,
    settings: Settings,
    cli: Any,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An SMS-only milestone whose SMS failed for good went out by email instead (the
    fallback); replaying the SMS's dead letter then sent the same update a second time,
    and neither `list` nor `show` said the email had gone (found by an operator's drill)."""
    policies = tmp_path / "policies"
    shutil.copytree(data_dir("policies", None), policies)
    (policies / "acme.yaml").write_text("statuses: {out_for_delivery: {channels: [sms]}}\n")
    sms = await sms_refused(client, settings.model_copy(update={"policies_dir": policies}))
    assert len(outbox_files(settings, ".eml")) == 1  # the fallback email
    monkeypatch.setenv("NOTIFIER_POLICIES_DIR", str(policies))
    code, out, _ = await cli(capsys, "list", "--kind", "messages")
    assert code == 0 and "its update went out by email instead (n_" in out, out
    code, out, _ = await cli(capsys, "replay", sms)
    assert code == 0 and "not replayed: its update went out by email instead" in out, out
    async with open_resources(settings, clock=fixed_clock(datetime(2100, 1, 1, tzinfo=UTC))) as res:
        assert await release_due({"res": res, "pipeline": Pipeline(res)}) == 0
        assert await res.redis.llen(res.store.DEAD_LETTER_KEY) == 1  # still listed
    code, out, _ = await cli(capsys, "replay", sms, "--force")
    assert code == 0 and out.endswith("\treplayed\n"), out


async def test_an_sms_whose_update_had_its_own_email_is_no_fallback(
    client: Client, settings: Settings, cli: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """With both channels in the policy the event's own email is no fallback: the SMS's
    dead letter was called one and refused for replay, as it had the same id (a review)."""
    sms = await sms_refused(client, settings)
    assert len(outbox_files(settings, ".eml")) == 1  # the event's own email
    code, out, _ = await cli(capsys, "list", "--kind", "messages")
    assert code == 0 and "by email instead" not in out, out
    code, out, _ = await cli(capsys, "replay", sms)
    assert code == 0 and out.endswith("\treplayed\n"), out
