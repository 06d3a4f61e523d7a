"""Which template, locale and policy trees notifier reads, and that it says so."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from notifier.resources import SOURCE_ROOT, tree
from tests.conftest import spawn_notifier, with_macro


def test_the_checkout_comes_before_the_installed_copy(tmp_path: Path) -> None:
    checkout, site = tmp_path / "checkout", tmp_path / "site-packages" / "notifier"
    (checkout / "templates").mkdir(parents=True)
    (site / "_data" / "templates").mkdir(parents=True)
    assert tree("templates", None, source_root=checkout, package_root=site) == (
        site / "_data" / "templates",
        "installed with the package",
    )  # a folder called templates is not a checkout
    (checkout / "pyproject.toml").write_text("[project]\nname = 'notifier'\n")
    assert tree("templates", None, source_root=checkout, package_root=site) == (
        checkout / "templates",
        "the checkout notifier runs from",
    )
    assert tree("templates", tmp_path / "mine", source_root=checkout, package_root=site) == (
        tmp_path / "mine",
        "NOTIFIER_TEMPLATES_DIR",
    )


def checkout_copy(tmp_path: Path) -> Path:
    """A copy of this checkout, as a user has it (the code runs from it)."""
    root = tmp_path / "checkout"
    for name in ("notifier", "templates", "locales", "policies"):
        shutil.copytree(SOURCE_ROOT / name, root / name, ignore=shutil.ignore_patterns("_data"))
    shutil.copy(SOURCE_ROOT / "pyproject.toml", root)
    return root


def test_a_merchant_template_in_the_checkout_is_what_preview_and_check_use(
    tmp_path: Path,
) -> None:
    root = checkout_copy(tmp_path)
    mine = root / "templates" / "acme" / "messages"
    mine.mkdir(parents=True)
    default = (root / "templates" / "messages" / "delivered.jinja").read_text()
    (mine / "delivered.jinja").write_text(with_macro(default, "headline", "It has landed, enjoy!"))
    out = root / "preview.html"
    # `python -m notifier` from the checkout, as after `scripts/serve` (an editable install)
    proc = spawn_notifier(
        ["preview", "--status", "delivered", "--merchant", "acme", "-o", str(out)], root
    )
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, output
    assert "It has landed, enjoy!" in out.read_text()

    check = subprocess.run(
        [sys.executable, "-m", "notifier", "check"],
        cwd=root,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert f"templates: {root / 'templates'} (the checkout notifier runs from)" in check.stdout
    assert f"policies: {root / 'policies'} (the checkout notifier runs from)" in check.stdout
    assert "mode: embedded" in check.stdout and ".env: none" in check.stdout


def test_check_warns_when_the_templates_here_are_not_the_ones_in_use(tmp_path: Path) -> None:
    here = tmp_path / "here"
    (here / "templates").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(SOURCE_ROOT / "templates", elsewhere)
    proc = spawn_notifier(["check"], here, NOTIFIER_TEMPLATES_DIR=str(elsewhere))
    output = proc.communicate(timeout=60)[0]
    assert f"templates: {elsewhere} (NOTIFIER_TEMPLATES_DIR)" in output
    assert (
        "warning: ./templates is not in use, edits there change nothing: set "
        f"NOTIFIER_TEMPLATES_DIR={here / 'templates'} to use it"
    ) in output
