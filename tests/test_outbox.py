"""The outbox channel's files: RFC 5322 .eml that the stdlib parser reads back, and .sms.json."""

from __future__ import annotations

import dataclasses
import email
import email.policy
import json
import shutil
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from notifier.channels import OutboxChannel, Outgoing, Receipt, outbox
from notifier.channels.outbox import build_eml
from notifier.errors import TemporaryDeliveryError
from notifier.render import EmailMessageOut, SmsMessageOut
from notifier.render.sms import SmsEncoding

AT = datetime(2026, 11, 21, 8, 30, 0, 123456, tzinfo=UTC)


def email_out(**kw: str) -> EmailMessageOut:
    values = {
        "from_addr": "Acmé Shop <orders@acme.example>",
        "subject": "Votre colis arrive aujourd’hui — commande 1001",
        "text": "Bonjour Ana,\n\nVotre colis arrive aujourd’hui.\n=_ looks like a boundary\n"
        + "x" * 300
        + "\n",
        "html": '<html lang="fr"><body><p>Votre colis arrive aujourd’hui.</p></body></html>',
    }
    values.update(kw)
    return EmailMessageOut(
        "n_abc",
        "acme",
        "shp_1",
        "ana@example.com",
        values["from_addr"],
        values["subject"],
        values["text"],
        values["html"],
    )


def parse(raw: bytes) -> email.message.EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    return msg


def test_eml_round_trips_through_the_stdlib_parser() -> None:
    out = email_out()
    msg = parse(build_eml(out, AT))
    assert msg.defects == []
    assert msg["Subject"] == out.subject
    assert msg["From"].addresses[0].display_name == "Acmé Shop"
    assert msg["From"].addresses[0].addr_spec == "orders@acme.example"
    assert msg["To"] == "ana@example.com"
    assert msg["Message-ID"] == "<n_abc@notifier.local>"
    assert msg["Date"].datetime == AT.replace(microsecond=0)
    assert msg.get_content_type() == "multipart/alternative"
    text, html = list(msg.iter_parts())
    assert text.get_content_type() == "text/plain" and html.get_content_type() == "text/html"
    assert text.get_content().replace("\r\n", "\n") == out.text
    assert html.get_content().replace("\r\n", "\n") == out.html
    assert all(len(line) <= 998 for line in build_eml(out, AT).split(b"\r\n"))


def test_header_injection_is_impossible() -> None:
    raw = build_eml(email_out(subject="Hi\r\nBcc: victim@example.com"), AT)
    msg = parse(raw)
    assert msg["Bcc"] is None
    assert msg["Subject"] == "Hi Bcc: victim@example.com"


async def test_outbox_writes_files_and_recovers_without_duplicates(tmp_path: Path) -> None:
    channel = OutboxChannel(tmp_path)
    sms = SmsMessageOut("n_sms", "acme", "shp_1", "+33612345678", "Hi", SmsEncoding.GSM7, 1)
    try:
        first = await channel.send_many([Outgoing(email_out(), AT), Outgoing(sms, AT)])
        assert all(isinstance(r, Receipt) for r in first)
        folder = tmp_path / "acme" / "shp_1"
        names = sorted(p.name for p in folder.iterdir())
        assert names == [
            "20261121T083000.123456Z-n_abc.eml",
            "20261121T083000.123456Z-n_sms.sms.json",
        ]
        assert json.loads((folder / names[1]).read_text()) == {
            "to": "+33612345678",
            "body": "Hi",
            "encoding": "GSM-7",
            "segments": 1,
            "notification_id": "n_sms",
        }
        later = AT.replace(minute=31)
        again = await channel.send_many([Outgoing(email_out(), later, recovering=True)])
        assert again == [first[0]]  # the file already there is the receipt
        assert len(list(folder.iterdir())) == 2
    finally:
        channel.close()


async def test_outbox_files_are_private_and_a_removed_folder_comes_back(tmp_path: Path) -> None:
    channel = OutboxChannel(tmp_path)
    folder = tmp_path / "acme" / "shp_1"
    try:
        [first] = await channel.send_many([Outgoing(email_out(), AT)])
        assert isinstance(first, Receipt)
        written = Path(first.detail)
        assert written.parent == folder and written.stat().st_mode & 0o777 == 0o600
        assert written.read_bytes() == build_eml(email_out(), AT)
        # An operator cleaned the outbox up between two messages of a shipment.
        shutil.rmtree(tmp_path / "acme")
        [second] = await channel.send_many([Outgoing(email_out(), AT.replace(minute=40))])
        assert isinstance(second, Receipt) and Path(second.detail).is_file()
        assert [p.name for p in folder.iterdir()] == [Path(second.detail).name]  # no temp left
        # A path that cannot be a folder: a temporary failure, reported, nothing raised.
        (tmp_path / "blocked").write_text("a file where the merchant folder should be")
        blocked = dataclasses.replace(email_out(), merchant_id="blocked")
        [third] = await channel.send_many([Outgoing(blocked, AT)])
        assert isinstance(third, TemporaryDeliveryError)
    finally:
        channel.close()


async def test_a_batch_over_many_shipments_keeps_its_order_and_makes_each_folder(
    tmp_path: Path,
) -> None:
    """The writer threads take whole shipments (a folder is made once, by one thread);
    the outcomes still come back in the order of the messages."""
    channel = OutboxChannel(tmp_path)
    items = []
    for s in range(23):  # more shipments than writer threads, of different sizes
        for k in range(1 + s % 3):
            nid = f"n_{s}_{k}"
            out = dataclasses.replace(email_out(), notification_id=nid, shipment_id=f"shp_{s}")
            items.append(Outgoing(out, AT))
    (tmp_path / "acme" / "shp_4").mkdir(parents=True)  # made by an earlier process
    try:
        outcomes = await channel.send_many(items)
        again = await channel.send_many(items[:5])  # known folders: written directly
    finally:
        channel.close()
    assert all(isinstance(o, Receipt) for o in outcomes + again)
    for item, outcome in zip(items, outcomes, strict=True):
        assert isinstance(outcome, Receipt)
        written = Path(outcome.detail)
        assert written.name.endswith(f"-{item.message.notification_id}.eml")
        assert written.parent == tmp_path / "acme" / item.message.shipment_id
    assert sorted(p.name for p in (tmp_path / "acme").iterdir()) == sorted(
        f"shp_{s}" for s in range(23)
    )
    assert not [p for p in tmp_path.rglob(".tmp-*")]
    assert len([p for p in tmp_path.rglob("*.eml")]) == len(items)


async def test_the_known_folders_stay_few_and_a_forgotten_one_still_takes_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The set of folders a worker made is bounded: past its cap it starts over, and a
    folder it forgot (or one an earlier process made) takes its next file all the same."""
    monkeypatch.setattr(OutboxChannel, "KNOWN_FOLDERS", 4)
    channel = OutboxChannel(tmp_path)

    def one(s: int, minute: int) -> Outgoing:
        out = dataclasses.replace(
            email_out(), notification_id=f"n_{s}_{minute}", shipment_id=f"shp_{s}"
        )
        return Outgoing(out, AT.replace(minute=minute))

    try:
        sizes = []
        for s in range(11):
            [receipt] = await channel.send_many([one(s, 1)])
            assert isinstance(receipt, Receipt)
            sizes.append(len(channel._known))
        starts = [i for i in range(1, len(sizes)) if sizes[i] < sizes[i - 1]]
        assert max(sizes) == 4 and len(starts) >= 2, sizes  # it started over, more than once
        again = await channel.send_many([one(s, 2) for s in range(11)])
    finally:
        channel.close()
    assert all(isinstance(o, Receipt) for o in again)
    for s in range(11):
        names = sorted(p.name for p in (tmp_path / "acme" / f"shp_{s}").iterdir())
        assert names == [
            f"20261121T080100.123456Z-n_{s}_1.eml",
            f"20261121T080200.123456Z-n_{s}_2.eml",
        ]


@settings(max_examples=400, deadline=None)
@given(st.from_regex(outbox._PLAIN_ADDRESS, fullmatch=True))
def test_a_plain_address_is_written_as_the_parser_writes_it(value: str) -> None:
    """The fast path for a bare address gives the bytes ``parseaddr``/``formataddr`` give."""
    assert outbox._address("To", value) == outbox._parsed_address.__wrapped__("To", value)


def test_repeated_headers_come_from_the_cache_and_stay_each_messages_own() -> None:
    """From, a non-ASCII subject and the Date are encoded once and reused; a message with
    another recipient, subject or time still gets its own."""
    first = parse(build_eml(email_out(), AT))
    other = dataclasses.replace(
        email_out(subject="Ihr Paket ist unterwegs — Bestellung 1002"),
        to="Zoë Ünal <zoe@example.com>",
    )
    for _ in range(2):  # the second time from the cache
        second = parse(build_eml(other, AT.replace(second=7)))
        assert second["To"].addresses[0].display_name == "Zoë Ünal"
        assert second["To"].addresses[0].addr_spec == "zoe@example.com"
        assert second["Subject"] == "Ihr Paket ist unterwegs — Bestellung 1002"
        assert second["Date"].datetime == AT.replace(second=7, microsecond=0)
        assert second["From"] == first["From"]
    assert parse(build_eml(email_out(), AT))["Subject"] == first["Subject"]
    assert build_eml(email_out(), AT) == build_eml(
        email_out(), AT.astimezone(timezone(timedelta(hours=9)))
    )


async def test_receipts_name_the_path_as_pathlib_joins_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Paths are joined as text: the receipt is what ``directory / merchant / shipment /
    name`` gives, for a relative outbox too, and a recovered message names its file."""
    monkeypatch.chdir(tmp_path)
    for directory in (Path("outbox"), Path("./nested/outbox/"), tmp_path / "abs"):
        channel = OutboxChannel(directory)
        try:
            [receipt] = await channel.send_many([Outgoing(email_out(), AT)])
            name = "20261121T083000.123456Z-n_abc.eml"
            assert receipt == Receipt("outbox", str(directory / "acme" / "shp_1" / name))
            later = AT.replace(minute=31)
            [again] = await channel.send_many([Outgoing(email_out(), later, recovering=True)])
            assert again == receipt
        finally:
            channel.close()
