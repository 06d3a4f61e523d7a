"""The override store (drafts, versions, rollback, audit) on redis-server and the embedded one."""

from __future__ import annotations

import email
import email.message
import email.policy
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from fakeredis import FakeServer

from notifier.overrides import OverrideError, OverrideStore
from notifier.resources import data_dir, open_resources
from notifier.settings import Settings
from tests.conftest import (
    fixed_clock,
    make_settings,
    outbox_files,
    post,
    run_worker,
    transition,
    with_macro,
)

AT = "2026-11-21T14:00:00+00:00"


@pytest.fixture(params=["redis", "embedded"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[OverrideStore]:
    if request.param == "redis":
        settings, server = request.getfixturevalue("settings"), None
    else:
        settings, server = make_settings(tmp_path, redis_url=None), FakeServer()
    async with open_resources(settings, server=server) as res:
        await res.redis.flushdb()
        yield OverrideStore(res.redis)


async def test_drafts_publish_as_versions_and_roll_back(store: OverrideStore) -> None:
    assert await store.live("acme") is None
    rev = await store.save("acme", "messages/delivered.jinja", "v1 words", "key_a", AT)
    rev = await store.save("acme", "brand.yaml", "name: Acme\n", "key_a", AT)
    assert await store.draft("acme") == (
        rev,
        {"messages/delivered.jinja": "v1 words", "brand.yaml": "name: Acme\n"},
    )
    assert await store.publish("acme", rev, "key_a", AT) == 1
    # published: the draft is empty again, at a revision of its own (never one used before)
    assert await store.draft("acme") == (rev + 1, {})
    assert await store.publish("acme", rev + 1, "key_a", AT) == 0  # nothing to publish

    # a second version changes one file and deletes another
    await store.save("acme", "messages/delivered.jinja", "v2 words", "key_b", AT)
    rev = await store.save("acme", "brand.yaml", None, "key_b", AT)
    assert (await store.draft("acme"))[1]["brand.yaml"] is None
    assert await store.publish("acme", rev, "key_b", AT) == 2
    live = await store.live("acme")
    assert live is not None and live.files == {"messages/delivered.jinja": "v2 words"}
    assert live.author == "key_b" and sorted(live.changed) == [
        "brand.yaml",
        "messages/delivered.jinja",
    ]
    v1, v2 = await store.versions("acme")
    diff = v2.diff(v1)
    assert "-v1 words" in diff and "+v2 words" in diff and "--- a/brand.yaml" in diff

    # a rollback publishes the old files as a new version; history only grows
    assert await store.rollback("acme", 1, "key_a", AT) == 3
    live = await store.live("acme")
    assert live is not None and live.files == v1.files and live.restored == 1
    assert [v.number for v in await store.versions("acme")] == [1, 2, 3]
    assert await store.live_numbers(["acme", "globex"]) == {"acme": 3, "globex": 0}
    with pytest.raises(OverrideError, match="no version 9"):
        await store.rollback("acme", 9, "key_a", AT)

    # the audit log: who (the key id), what, when, newest first
    actions = [(e["action"], e["key_id"]) for e in await store.audit("acme")]
    assert actions[:3] == [("rollback", "key_a"), ("publish", "key_b"), ("delete", "key_b")]
    assert len(actions) == 7


async def test_a_publish_is_of_the_revision_that_was_checked(store: OverrideStore) -> None:
    checked = await store.save("acme", "sms/layout.txt", "checked", "k", AT)
    await store.save("acme", "sms/layout.txt", "saved after the check", "k", AT)
    with pytest.raises(OverrideError, match=f"changed since revision {checked}"):
        await store.publish("acme", checked, "k", AT)
    assert await store.live("acme") is None
    rev = await store.discard("acme", "sms/layout.txt", "k", AT)
    assert await store.draft("acme") == (rev, {})


async def test_a_revision_number_never_names_other_contents(store: OverrideStore) -> None:
    """A reviews the draft at revision 1; someone else publishes it and saves a new change.
    A's publish of "revision 1" is refused: before, a publish emptied the draft and its
    revisions counted from 0 again, so the new change was revision 1 too, and A published a
    change A had never seen."""
    reviewed = await store.save("acme", "brand.yaml", "name: Acme\n", "k_a", AT)
    assert await store.publish("acme", reviewed, "k_backend", AT) == 1
    unseen = await store.save("acme", "policy.yaml", "statuses: {}\n", "k_backend", AT)
    assert unseen != reviewed
    with pytest.raises(OverrideError, match=f"changed since revision {reviewed}"):
        await store.publish("acme", reviewed, "k_a", AT)
    assert [v.number for v in await store.versions("acme")] == [1]
    # a rollback moves an empty draft's revision too
    rev, _ = await store.draft("acme")
    await store.discard("acme", "policy.yaml", "k_backend", AT)
    emptied, files = await store.draft("acme")
    assert files == {} and emptied > rev
    await store.rollback("acme", 0, "k_a", AT)
    assert (await store.draft("acme"))[0] > emptied


async def test_only_merchant_files_are_accepted(store: OverrideStore) -> None:
    for path in ("../etc/passwd", "messages/../../x.jinja", "email/other.html", "notes.txt"):
        with pytest.raises(OverrideError, match="not a file a merchant can override"):
            await store.save("acme", path, "x", "k", AT)
    with pytest.raises(OverrideError, match="larger than 64 KB"):
        await store.save("acme", "brand.yaml", "x" * 70_000, "k", AT)
    with pytest.raises(OverrideError, match="NUL"):
        await store.save("acme", "brand.yaml", "a\x00b", "k", AT)
    # one merchant's keys never hold another's
    await store.save("acme", "brand.yaml", "name: Acme\n", "k", AT)
    assert await store.draft("globex") == (0, {})


async def test_published_files_are_what_the_worker_uses_and_a_rollback_undoes_them(
    client: Any, settings: Settings
) -> None:
    """The layered lookup: published override, then the merchant's files, then the defaults;
    a worker picks a publish (or a rollback) up at its next batch, no restart."""
    default = (data_dir("templates", None) / "messages" / "delivered.jinja").read_text()
    mine = with_macro(default, "subject", "Acme: it is there")
    async with open_resources(settings, clock=fixed_clock()) as res:
        store = OverrideStore(res.redis)
        await store.save("acme", "messages/delivered.jinja", mine, "k_acme", AT)
        await store.save("acme", "brand.yaml", "name: Acme Outfitters\n", "k_acme", AT)
        # the published policy: email only, for every status
        rev = await store.save(
            "acme", "policy.yaml", "statuses: {delivered: {channels: [email]}}\n", "k", AT
        )
        draft_only = await store.save("acme", "sms/layout.txt", "unpublished", "k", AT)
        assert draft_only > rev  # saved after the checked revision: the publish refuses
        with pytest.raises(OverrideError):
            await store.publish("acme", rev, "k_acme", AT)
        await store.discard("acme", "sms/layout.txt", "k", AT)
        assert await store.publish("acme", rev + 2, "k_acme", AT) == 1

    def latest_email() -> email.message.EmailMessage:
        shipment = f"s{len(list(settings.outbox_dir.glob('acme/*')))}"  # the newest one
        [eml] = (settings.outbox_dir / "acme" / shipment).glob("*.eml")
        msg = email.message_from_bytes(eml.read_bytes(), policy=email.policy.default)
        assert isinstance(msg, email.message.EmailMessage)
        return msg

    await post(client, transition(event_id="d1", shipment_id="s1", status="delivered"))
    await run_worker(settings)
    msg = latest_email()
    assert msg["Subject"] == "Acme: it is there" and msg["From"].startswith("Acme Outfitters")
    assert outbox_files(settings, ".sms.json") == []  # the published policy: email only

    # back to the files beneath: delete the published files in a new version
    async with open_resources(settings) as res:
        store = OverrideStore(res.redis)
        for path in ("messages/delivered.jinja", "brand.yaml", "policy.yaml"):
            await store.save("acme", path, None, "k_acme", AT)
        revision, _ = await store.draft("acme")
        assert await store.publish("acme", revision, "k_acme", AT) == 2
    await post(client, transition(event_id="d2", shipment_id="s2", status="delivered"))
    await run_worker(settings)
    assert latest_email()["Subject"] == "Votre colis a été livré"  # the defaults, in French
    assert len(outbox_files(settings, ".sms.json")) == 1

    async with open_resources(settings) as res:
        assert await OverrideStore(res.redis).rollback("acme", 1, "k_acme", AT) == 3
    await post(client, transition(event_id="d3", shipment_id="s3", status="delivered"))
    await run_worker(settings)
    assert latest_email()["Subject"] == "Acme: it is there"


async def test_a_removal_a_colleagues_rollback_made_moot_is_no_change(
    store: OverrideStore,
) -> None:
    """Alice removes a published file in her draft; Bob rolls back to a version without it:
    the removal stayed in the draft, the review showed the whole file beneath as removed,
    and the next publish listed it as changed with an empty diff (found by a black-box run
    as two merchants). It goes with the rollback; a publish lists only real changes."""
    rev = await store.save("acme", "brand.yaml", "name: Acme\n", "key_a", AT)
    assert await store.publish("acme", rev, "key_a", AT) == 1
    rev = await store.save("acme", "messages/delivered.jinja", "words", "key_a", AT)
    assert await store.publish("acme", rev, "key_a", AT) == 2
    await store.save("acme", "messages/delivered.jinja", None, "alice", AT)  # removal
    await store.save("acme", "brand.yaml", "name: Acme Shop\n", "alice", AT)  # an edit
    assert await store.rollback("acme", 1, "bob", AT) == 3  # without the message file
    assert (await store.draft("acme"))[1] == {"brand.yaml": "name: Acme Shop\n"}
    # a removal of what is not live (sent as a draft file all the same) changes nothing
    rev = await store.save("acme", "messages/picked_up.jinja", None, "alice", AT)
    assert await store.publish("acme", rev, "alice", AT) == 4
    live = await store.live("acme")
    assert live is not None and live.changed == ["brand.yaml"]


async def test_a_deletion_is_decided_against_the_version_live_at_that_moment(
    store: OverrideStore,
) -> None:
    """A deletion of a file the version in force holds goes in the draft as a removal;
    of one it does not hold, it drops the draft's change. The admin API read the version
    in force, then wrote, so a colleague's publish in between turned an intended removal
    into a discard (the file stayed live); the script now decides both at once."""
    rev = await store.save("acme", "messages/delivered.jinja", "draft words", "alice", AT)
    # nothing is live: the draft's change is dropped, and the audit says "discard"
    rev = await store.delete("acme", "messages/delivered.jinja", "alice", AT)
    assert await store.draft("acme") == (rev, {})
    assert (await store.audit("acme", 1))[0]["action"] == "discard"
    # a colleague publishes the file; a deletion now is a removal
    rev = await store.save("acme", "messages/delivered.jinja", "words", "bob", AT)
    assert await store.publish("acme", rev, "bob", AT) == 1
    rev = await store.delete("acme", "messages/delivered.jinja", "alice", AT)
    assert await store.draft("acme") == (rev, {"messages/delivered.jinja": None})
    latest = (await store.audit("acme", 1))[0]
    assert (latest["action"], latest["path"], latest["key_id"]) == (
        "delete",
        "messages/delivered.jinja",
        "alice",
    )
    assert await store.publish("acme", rev, "alice", AT) == 2
    live = await store.live("acme")
    assert live is not None and live.files == {} and live.changed == ["messages/delivered.jinja"]
    # a rollback to a version without it (version 0 here: nothing live from the editor)
    rev = await store.save("acme", "brand.yaml", "name: Acme\n", "alice", AT)
    assert await store.rollback("acme", 0, "bob", AT) == 3
    rev = await store.delete("acme", "brand.yaml", "alice", AT)
    assert await store.draft("acme") == (rev, {})
    with pytest.raises(OverrideError):
        await store.delete("acme", "../policy.yaml", "alice", AT)
