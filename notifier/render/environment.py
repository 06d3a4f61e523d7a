"""Template environments: sandboxed, strict, layered (merchant directory over the defaults)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

from babel.support import NullTranslations
from jinja2 import Environment, FileSystemLoader, StrictUndefined, Template, select_autoescape
from jinja2.sandbox import ImmutableSandboxedEnvironment

from notifier.render.i18n import Catalogs

#: The names the i18n extension compiles ``{% trans %}`` and ``_()`` into.
GETTEXT_NAMES = ("gettext", "ngettext", "pgettext", "npgettext")


class TemplateStore:
    """Sandboxed environments by template search path, cached; ``invalidate`` picks up edits.

    Merchants without their own template folder share one environment, so each template
    is compiled once, not once per merchant and locale. Translations are not installed
    in an environment: every render passes the gettext functions of the reader's locale
    chain (``gettext_for``) in its context, where they take precedence over the
    environment's English defaults.
    """

    def __init__(self, directory: Path, catalogs: Catalogs | None = None) -> None:
        self.directory = directory
        self.catalogs = catalogs
        self._search: dict[str, tuple[str, ...]] = {}
        self._envs: dict[tuple[str, ...], ImmutableSandboxedEnvironment] = {}
        self._selected: dict[tuple[tuple[str, ...], tuple[str, ...]], Template] = {}
        self._gettext: dict[tuple[str, ...], dict[str, Callable[..., Any]]] = {}
        self._lock = threading.Lock()

    def search_path(self, merchant_id: str) -> tuple[str, ...]:
        """Where a merchant's templates are looked up: its own folder first, if it has one."""
        search = self._search.get(merchant_id)
        if search is None:
            override = self.directory / merchant_id
            own = bool(merchant_id) and override.is_dir()
            search = (str(override), str(self.directory)) if own else (str(self.directory),)
            with self._lock:
                self._search[merchant_id] = search
        return search

    def select(self, merchant_id: str, names: tuple[str, ...]) -> Template:
        """The first of ``names`` that exists for the merchant, resolved once and cached.

        Jinja2 caches compiled templates but not misses, so without this every
        render would stat the per-status files a merchant did not write.
        """
        search = self.search_path(merchant_id)
        template = self._selected.get((search, names))
        if template is None:
            template = self.environment(merchant_id).select_template(list(names))
            with self._lock:
                self._selected[(search, names)] = template
        return template

    def environment(self, merchant_id: str) -> ImmutableSandboxedEnvironment:
        """The environment with the merchant's layered loader."""
        search = self.search_path(merchant_id)
        env = self._envs.get(search)
        if env is None:
            env = self._build(search)
            with self._lock:
                self._envs[search] = env
        return env

    def gettext_for(self, chain: Sequence[str]) -> dict[str, Callable[..., Any]]:
        """The newstyle gettext functions for a locale chain (first found wins, then English),
        to pass in a render's context."""
        key = tuple(chain)
        funcs = self._gettext.get(key)
        if funcs is None:
            translations = (
                self.catalogs.translations(chain) if self.catalogs else NullTranslations()
            )
            # A bare environment only to have Jinja2 wrap the functions the way compiled
            # templates expect them (autoescaping, %-formatting); nothing is compiled in it.
            scratch = Environment(extensions=["jinja2.ext.i18n"])
            scratch.install_gettext_translations(  # type: ignore[attr-defined]
                translations, newstyle=True
            )
            funcs = {
                name: cast(Callable[..., Any], scratch.globals[name]) for name in GETTEXT_NAMES
            }
            with self._lock:
                self._gettext[key] = funcs
        return funcs

    def invalidate(self) -> None:
        """Drop cached environments and translations (after an edit of templates/ or locales/)."""
        with self._lock:
            self._search.clear()
            self._envs.clear()
            self._selected.clear()
            self._gettext.clear()

    def _build(self, search: tuple[str, ...]) -> ImmutableSandboxedEnvironment:
        env = ImmutableSandboxedEnvironment(
            loader=FileSystemLoader(list(search)),
            # Merchant-editable templates: no access to internals, no silent blanks.
            undefined=StrictUndefined,
            autoescape=select_autoescape(enabled_extensions=("html",), default=False),
            extensions=["jinja2.ext.i18n"],
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=False,
            auto_reload=False,
        )
        # English (the source strings) unless a render passes its locale's functions.
        env.install_gettext_translations(  # type: ignore[attr-defined]
            NullTranslations(), newstyle=True
        )
        return env
