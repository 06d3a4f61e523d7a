"""Compiled templates are shared by every environment of a process built alike (the start-up
check, the worker's renderer, a refresh after an edit): a source compiles once, an edited
source compiles anew, and environments that compile differently never share code."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from notifier.render.environment import COMPILED, TemplateStore
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


def context() -> dict[str, Any]:
    """What the SMS layout reads."""
    return {
        "m": {"sms": "Your parcel arrives today."},
        "sms_url": "https://t.example/1",
        "event": {"exception_code": None},
        "shipment": {"carrier": "ups", "tracking_number": "1Z"},
        "us_opt_out": False,
    }
