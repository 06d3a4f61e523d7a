"""The translations workflow: stable catalog diffs, merchants' own catalogs, mixed languages."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from notifier.check import samples, untranslated
from notifier.models import ChannelKind, Notification, Recipient
from notifier.render import EmailMessageOut, Renderer
from notifier.render.environment import TemplateStore
from notifier.render.i18n import Catalogs
from notifier.resources import SOURCE_ROOT
from tests.conftest import make_settings, with_macro

SCRIPT = SOURCE_ROOT / "scripts" / "translations"
DELIVERED = next(t for t in samples() if t.milestone == "delivered")
HOORAY = "Your parcel is here, hooray!"


def checkout(tmp_path: Path) -> Path:
    root = tmp_path / "checkout"
    for name in ("templates", "locales"):
        shutil.copytree(SOURCE_ROOT / name, root / name)
    shutil.copy(SOURCE_ROOT / "babel.cfg", root)
    return root


def run(root: Path, *args: str) -> None:
    subprocess.run(["bash", str(SCRIPT), "--root", str(root), *args], check=True)


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*.po*"))}


def merchant_headline(root: Path) -> None:
    own = root / "templates" / "acme" / "messages"
    own.mkdir(parents=True)
    default = (root / "templates" / "messages" / "delivered.jinja").read_text()
    headline = "{% trans %}" + HOORAY + "{% endtrans %}"
    (own / "delivered.jinja").write_text(with_macro(default, "headline", headline))


def test_the_workflow_is_stable_and_adds_only_what_is_new(tmp_path: Path) -> None:
    root = checkout(tmp_path)
    before = snapshot(root / "locales")
    run(root)
    assert snapshot(root / "locales") == before  # the committed catalogs are its output

    # a merchant's own wording never reaches the shared catalogs
    merchant_headline(root)
    run(root)
    assert snapshot(root / "locales") == before

    # a new default string: one untranslated entry per catalog, nothing fuzzy, no churn
    layout = root / "templates" / "messages" / "delivered.jinja"
    layout.write_text(layout.read_text().replace("Enjoy your order.", "Enjoy it, truly."))
    run(root)
    after = snapshot(root / "locales")
    for name, text in after.items():
        old_lines, new_lines = before[name].splitlines(), text.splitlines()
        added = [line for line in new_lines if line not in old_lines]
        assert 'msgid "Enjoy it, truly."' in added, name
        assert len(added) <= 3, (name, added)  # msgid, msgstr "" and a blank line
        assert "#, fuzzy" not in text.replace(before[name], ""), name
        assert "#:" not in text  # no source locations: moving a line changes nothing


def test_a_merchants_own_catalog_translates_its_own_words(tmp_path: Path) -> None:
    root = checkout(tmp_path)
    merchant_headline(root)
    run(root, "--merchant", "acme")
    po = root / "templates" / "acme" / "locales" / "fr" / "LC_MESSAGES" / "messages.po"
    text = po.read_text()
    assert f'msgid "{HOORAY}"' in text
    assert 'msgid "Your parcel was delivered"' not in text  # the shared catalog has that
    po.write_text(
        text.replace(f'msgid "{HOORAY}"\nmsgstr ""', f'msgid "{HOORAY}"\nmsgstr "Il est là !"')
    )
    catalogs = Catalogs(root / "locales")
    renderer = Renderer(
        TemplateStore(root / "templates", catalogs), catalogs, email_from="n@example.com"
    )

    def headline(locale: str) -> str:
        message = renderer.render(
            Notification(
                notification_id="n_1",
                merchant_id="acme",
                shipment_id="s1",
                channel=ChannelKind.EMAIL,
                to="ana@example.com",
                transition=DELIVERED,
                recipient=Recipient(email="ana@example.com", locale=locale),
                created_at=DELIVERED.occurred_at,
            )
        )
        assert isinstance(message, EmailMessageOut)
        return message.html

    assert "Il est là !" in headline("fr")
    assert "Votre colis a été livré" in headline("fr")  # the shared words stay translated
    assert HOORAY in headline("de")  # no German yet: English amid German

    settings = make_settings(
        tmp_path, templates_dir=root / "templates", locales_dir=root / "locales"
    )
    errors, warnings = untranslated(settings)
    assert errors == []
    [warning] = warnings
    assert f"templates/acme: {HOORAY!r} has no translation in " in warning
    assert "fr" not in warning.split("has no translation in ")[1].split(":")[0].split(", ")
    assert "de" in warning and "those readers get it in en" in warning

    # a merchant that says whom it serves gets an error for those languages
    (root / "templates" / "acme" / "brand.yaml").write_text("locales: [fr, de]\n")
    errors, warnings = untranslated(settings)
    assert warnings == [] and len(errors) == 1
    assert f"{HOORAY!r} has no translation in de:" in errors[0]


def test_listed_locales_are_read_as_the_catalogs_they_resolve_to(tmp_path: Path) -> None:
    root = checkout(tmp_path)
    merchant_headline(root)
    run(root, "--merchant", "acme")
    for lang in ("fr", "pt_BR"):
        po = root / "templates" / "acme" / "locales" / lang / "LC_MESSAGES" / "messages.po"
        entry = f'msgid "{HOORAY}"\nmsgstr '
        po.write_text(po.read_text().replace(entry + '""', entry + '"Chegou!"'))
    settings = make_settings(
        tmp_path, templates_dir=root / "templates", locales_dir=root / "locales"
    )
    brand = root / "templates" / "acme" / "brand.yaml"
    brand.write_text("locales: [fr_FR, pt, en_US]\n")  # fr_FR reads fr, pt reads pt_BR
    assert untranslated(settings) == ([], [])
    brand.write_text("locales: [fr, sv]\n")  # no Swedish catalog at all
    errors, _ = untranslated(settings)
    assert errors == [
        "templates/acme/brand.yaml: locales: sv has no catalog: its readers get every "
        "message in English"
    ]
