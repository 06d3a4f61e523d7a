"""Compiled templates are shared by every environment of a process built alike (the start-up
check, the worker's renderer, a refresh after an edit): a source compiles once, an edited
source compiles anew, and environments that compile differently never share code. On disk,
the next process loads them instead of compiling them, from a folder only its user can write
to; an edited, damaged or other version's file is never used, and a disk that fails leaves
the templates compiled in memory."""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import jinja2
import pytest

from notifier.cli import main
from notifier.render import compiled
from notifier.render.compiled import COMPILED, Compiled
from notifier.render.environment import TemplateStore
from notifier.render.limits import Limits
from notifier.render.sandbox import Sandbox
from notifier.resources import data_dir

NAMES = ("sms/layout.txt",)


@pytest.fixture
def compiles(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the templates compiled from source from now on."""
    seen: list[str] = []
    compile_source = Sandbox.compile

    def counted(self: Sandbox, source: Any, name: str | None = None, *args: Any) -> Any:
        seen.append(str(name))
        return compile_source(self, source, name, *args)

    monkeypatch.setattr(Sandbox, "compile", counted)
    monkeypatch.setattr(COMPILED, "_code", type(COMPILED._code)())  # an empty cache
    monkeypatch.setattr(COMPILED, "folder", None)  # and none on disk
    return seen


@pytest.fixture
def templates(tmp_path: Path) -> Path:
    copy = tmp_path / "templates"
    shutil.copytree(data_dir("templates", None), copy)
    return copy


def test_a_source_compiles_once_for_every_store_built_alike(
    compiles: list[str], templates: Path
) -> None:
    first = TemplateStore(templates).select("", NAMES)
    assert compiles == ["sms/layout.txt"]
    again = TemplateStore(templates).select("", NAMES)
    assert compiles == ["sms/layout.txt"]  # the second store compiled nothing
    assert again is not first and again.environment is not first.environment
    assert again.render(**context()) == first.render(**context())


def test_an_edited_template_compiles_anew(compiles: list[str], templates: Path) -> None:
    store = TemplateStore(templates)
    before = store.select("", NAMES).render(**context())
    layout = templates / "sms" / "layout.txt"
    layout.write_text("EDITED " + layout.read_text(encoding="utf-8"), encoding="utf-8")
    store.invalidate()
    after = store.select("", NAMES).render(**context())
    assert after.startswith("EDITED") and not before.startswith("EDITED")
    assert compiles == ["sms/layout.txt", "sms/layout.txt"]


def test_environments_that_compile_differently_never_share_code(
    compiles: list[str], templates: Path
) -> None:
    TemplateStore(templates).select("", NAMES)
    TemplateStore(templates, limits=Limits(time_s=1.0)).select("", NAMES)
    TemplateStore(templates).select("", NAMES, tracing=True)
    assert compiles == ["sms/layout.txt"] * 3


def new_process(monkeypatch: pytest.MonkeyPatch, folder: Path | None) -> str | None:
    """As a new process would start: nothing compiled in memory; kept in ``folder``."""
    monkeypatch.setattr(COMPILED, "_code", type(COMPILED._code)())
    return COMPILED.keep_in(folder)


def code_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*/*.code"))


def test_the_next_process_loads_what_one_compiled(
    compiles: list[str], templates: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    assert new_process(monkeypatch, cache) is None
    first = TemplateStore(templates).select("", NAMES).render(**context())
    assert compiles == ["sms/layout.txt"]
    assert len(code_files(cache)) == 1
    assert cache.stat().st_mode & 0o077 == 0  # made for this user only

    assert new_process(monkeypatch, cache) is None
    again = TemplateStore(templates).select("", NAMES).render(**context())
    assert compiles == ["sms/layout.txt"]  # loaded from the file, not compiled
    assert again == first


def test_an_edited_or_damaged_file_is_compiled_again(
    compiles: list[str], templates: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    new_process(monkeypatch, cache)
    TemplateStore(templates).select("", NAMES)
    (before,) = code_files(cache)

    layout = templates / "sms" / "layout.txt"
    layout.write_text("EDITED " + layout.read_text(encoding="utf-8"), encoding="utf-8")
    new_process(monkeypatch, cache)
    edited = TemplateStore(templates).select("", NAMES).render(**context())
    assert edited.startswith("EDITED")  # not the code of the source before
    assert compiles == ["sms/layout.txt"] * 2
    (file,) = [f for f in code_files(cache) if f != before]  # its own file (MAX_FILES bounds)

    good = file.read_bytes()
    flipped = bytearray(good)
    flipped[len(good) // 2 + 40] ^= 0x5A  # in the code, past the header
    for damage in (good[:-40], b"", b"not a compiled template", bytes(flipped)):
        file.write_bytes(damage)
        new_process(monkeypatch, cache)
        assert TemplateStore(templates).select("", NAMES).render(**context()) == edited
    assert compiles == ["sms/layout.txt"] * 6
    new_process(monkeypatch, cache)
    TemplateStore(templates).select("", NAMES)
    assert len(compiles) == 6  # the last compile wrote a good file again


def test_code_of_another_version_is_never_loaded(
    compiles: list[str], templates: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the code depends on besides the source names the folder: another Jinja2 (or
    Python, or notifier's code generator) reads and writes another folder."""
    cache = tmp_path / "cache"
    new_process(monkeypatch, cache)
    TemplateStore(templates).select("", NAMES)
    monkeypatch.setattr(jinja2, "__version__", "0.0-other")
    new_process(monkeypatch, cache)
    TemplateStore(templates).select("", NAMES)
    assert compiles == ["sms/layout.txt"] * 2
    assert len({f.parent for f in code_files(cache)}) == 2


def test_a_folder_others_can_write_to_is_refused(
    compiles: list[str], templates: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Code is loaded from it: a folder someone else could put a file in is not used."""
    open_to_all = tmp_path / "shared"
    open_to_all.mkdir()
    open_to_all.chmod(0o777)
    assert new_process(monkeypatch, open_to_all) == f"{open_to_all}: others can write to it" + (
        " (chmod go-w, or another folder)"
    )
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    monkeypatch.setattr(os, "getuid", lambda: theirs.stat().st_uid + 1)
    assert new_process(monkeypatch, theirs) == f"{theirs}: owned by another user"
    a_file = tmp_path / "file"
    a_file.write_text("")
    assert "exists" in str(new_process(monkeypatch, a_file))
    assert COMPILED.folder is None
    TemplateStore(templates).select("", NAMES)  # compiled in memory, as without a folder
    assert compiles == ["sms/layout.txt"]
    assert not list(open_to_all.iterdir()) and not list(theirs.iterdir())


def test_a_disk_that_fails_leaves_templates_compiled_in_memory(
    compiles: list[str],
    templates: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A full or read-only disk: one warning, templates compiled in memory, and the files
    there (an image's, compiled when it was built) still read."""
    cache = tmp_path / "cache"
    new_process(monkeypatch, cache)
    TemplateStore(templates).select("", ("email/layout.txt",))  # on disk before
    new_process(monkeypatch, cache)

    def full(*args: Any, **kwargs: Any) -> Any:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(compiled.tempfile, "mkstemp", full)
    with caplog.at_level(logging.WARNING, "notifier.render"):
        store = TemplateStore(templates)
        text = store.select("", NAMES).render(**context())
        store.select("", ("email/layout.html",))
        store.select("", ("email/layout.txt",))
    assert text.startswith("Your parcel")
    assert not COMPILED.writable and COMPILED.folder is not None
    warnings = [r.getMessage() for r in caplog.records if r.name == "notifier.render"]
    assert warnings == [  # one, not one per template
        f"compiled templates are no longer written to {cache}/{compiled.fingerprint()} (No "
        "space left on device): the ones there are still read, the others compiled in memory "
        "as this process needs them"
    ]
    assert len(code_files(cache)) == 1
    # the file there was loaded, the others compiled
    assert compiles == ["email/layout.txt", "sms/layout.txt", "email/layout.html"]


def test_only_folders_of_versions_unused_for_a_week_are_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What else the folder holds is never touched (NOTIFIER_TEMPLATE_CACHE_DIR may name a
    folder of other things)."""
    cache = tmp_path / "cache"
    old, recent = cache / "0123456789abcdef", cache / "fedcba9876543210"
    theirs, mixed = cache / "outbox-archive", cache / "00000000000000ff"
    for folder in (old, recent, theirs, mixed):
        folder.mkdir(parents=True)
        (folder / ("ab" * 16 + ".code")).write_bytes(b"")
    (mixed / "notes.txt").write_text("kept")
    week_ago = time.time() - compiled.STALE_S - 60
    for folder in (old, theirs, mixed):
        os.utime(folder, (week_ago, week_ago))
    cache.chmod(0o700)
    assert Compiled().keep_in(cache) is None
    assert not old.exists()
    assert recent.exists() and theirs.exists() and (mixed / "notes.txt").exists()
    assert (cache / compiled.fingerprint()).is_dir()


def test_a_version_keeps_its_latest_files_only(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    folder = cache / compiled.fingerprint()
    folder.mkdir(parents=True, mode=0o700)
    cache.chmod(0o700)
    for i in range(5):
        f = folder / (f"{i:032x}" + ".code")
        f.write_bytes(b"")
        os.utime(f, (1_000_000 + i, 1_000_000 + i))
    (folder / "unrelated").write_text("")
    compiled._remove_oldest(folder, 3)
    assert sorted(f.name for f in folder.iterdir()) == [
        f"{2:032x}.code",
        f"{3:032x}.code",
        f"{4:032x}.code",
        "unrelated",
    ]


def test_every_module_of_the_package_and_the_version_name_the_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The code generator and the limits it writes into the code live in this package's
    modules (limits.py, sandbox.py, skeleton.py): a change to any of them is another folder."""
    import notifier

    copy = tmp_path / "render"
    shutil.copytree(Path(compiled.__file__).parent, copy)
    monkeypatch.setattr(compiled, "__file__", str(copy / "compiled.py"))
    before = compiled.fingerprint()
    limits = copy / "limits.py"
    limits.write_text(limits.read_text(encoding="utf-8") + "\n# changed\n", encoding="utf-8")
    after_limits = compiled.fingerprint()
    monkeypatch.setattr(notifier, "__version__", "99.0.0")
    assert len({before, after_limits, compiled.fingerprint()}) == 3


def test_a_template_of_one_name_and_two_sources_has_two_files(
    compiles: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two merchants' published files of one name (no file name: from the editor): each
    keeps its own file instead of replacing the other's at every compile."""
    cache = tmp_path / "cache"
    new_process(monkeypatch, cache)
    env = Sandbox(loader=jinja2.DictLoader({}), bytecode_cache=COMPILED)
    for text in ("one {{ x }}", "two {{ x }}"):
        env.loader = jinja2.DictLoader({"messages/a.jinja": text})
        env.cache = None  # type: ignore[assignment]
        env.get_template("messages/a.jinja")
    assert len(code_files(cache)) == 2


def test_a_folder_under_one_others_can_write_to_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Someone who can write the folder above could put another folder, of theirs, in its
    place after the check; unless that folder has the sticky bit (as /tmp)."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    assert new_process(monkeypatch, shared / "cache") == (
        f"{shared}: others can write to a folder above it"
    )
    shared.chmod(0o1777)
    assert new_process(monkeypatch, shared / "cache") is None
    link = tmp_path / "link"
    link.symlink_to(shared / "cache")
    assert new_process(monkeypatch, link) is None
    assert COMPILED.folder == shared / "cache" / compiled.fingerprint()  # the link resolved


def test_the_default_folder_is_the_users_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", "/srv/cache")
    assert compiled.default_folder() == Path("/srv/cache/notifier/templates")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", "/home/ops")
    assert compiled.default_folder() == Path("/home/ops/.cache/notifier/templates")


@pytest.mark.parametrize("keep", [True, False])
def test_notifier_check_keeps_them_where_the_settings_say(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, keep: bool
) -> None:
    monkeypatch.setattr(COMPILED, "folder", None)
    monkeypatch.setattr(COMPILED, "_code", type(COMPILED._code)())
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NOTIFIER_TEMPLATE_CACHE_DIR", str(tmp_path / "compiled"))
    monkeypatch.setenv("NOTIFIER_TEMPLATE_CACHE", str(keep).lower())
    assert main(["check"]) == 0
    found = code_files(tmp_path / "compiled")
    # the default templates, and the tracing twins of the ones with skeletons
    assert len(found) > 20 if keep else found == []


def context() -> dict[str, Any]:
    """What the SMS layout reads."""
    return {
        "m": {"sms": "Your parcel arrives today."},
        "sms_url": "https://t.example/1",
        "event": {"exception_code": None},
        "shipment": {"carrier": "ups", "tracking_number": "1Z"},
        "us_opt_out": False,
    }
