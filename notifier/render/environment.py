"""Template environments: sandboxed, strict, layered (merchant directory over the defaults)."""

from __future__ import annotations

import threading
from pathlib import Path

from babel.support import NullTranslations
from jinja2 import FileSystemLoader, StrictUndefined, Template, select_autoescape
from jinja2.sandbox import ImmutableSandboxedEnvironment

from notifier.render.i18n import Catalogs


class TemplateStore:
    """One sandboxed environment per (merchant, locale), cached; ``invalidate`` picks up edits.

    Each environment has the merchant's layered loader (templates/<merchant_id>/ first)
    and the locale's gettext catalog installed for ``{% trans %}``.
    """

    def __init__(self, directory: Path, catalogs: Catalogs | None = None) -> None:
        self.directory = directory
        self.catalogs = catalogs
        self._envs: dict[tuple[str, str], ImmutableSandboxedEnvironment] = {}
        self._selected: dict[tuple[str, str, tuple[str, ...]], Template] = {}
        self._lock = threading.Lock()

    def select(self, merchant_id: str, names: tuple[str, ...], locale: str = "en") -> Template:
        """The first of ``names`` that exists for the merchant, resolved once and cached.

        Jinja2 caches compiled templates but not misses, so without this every
        render would stat the per-status files a merchant did not write.
        """
        key = (merchant_id, locale, names)
        template = self._selected.get(key)
        if template is None:
            template = self.environment(merchant_id, locale).select_template(list(names))
            with self._lock:
                self._selected[key] = template
        return template

    def environment(
        self, merchant_id: str, locale: str = "en", chain: list[str] | None = None
    ) -> ImmutableSandboxedEnvironment:
        """The environment for a merchant and a catalog locale (``chain``: its fallbacks)."""
        env = self._envs.get((merchant_id, locale))
        if env is None:
            env = self._build(merchant_id)
            translations = self.catalogs.translations(chain or [locale]) if self.catalogs else None
            env.install_gettext_translations(  # type: ignore[attr-defined]
                translations or NullTranslations(), newstyle=True
            )
            with self._lock:
                self._envs[(merchant_id, locale)] = env
        return env

    def invalidate(self, merchant_id: str | None = None) -> None:
        """Drop cached environments (one merchant, or all)."""
        with self._lock:
            if merchant_id is None:
                self._envs.clear()
                self._selected.clear()
            else:
                for env_key in [k for k in self._envs if k[0] == merchant_id]:
                    del self._envs[env_key]
                for key in [k for k in self._selected if k[0] == merchant_id]:
                    del self._selected[key]

    def _build(self, merchant_id: str) -> ImmutableSandboxedEnvironment:
        search = [self.directory]
        override = self.directory / merchant_id
        if merchant_id and override.is_dir():
            search.insert(0, override)
        return ImmutableSandboxedEnvironment(
            loader=FileSystemLoader([str(p) for p in search]),
            # Merchant-editable templates: no access to internals, no silent blanks.
            undefined=StrictUndefined,
            autoescape=select_autoescape(enabled_extensions=("html",), default=False),
            extensions=["jinja2.ext.i18n"],
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=False,
            auto_reload=False,
        )
