"""Template environments: sandboxed, strict, layered (merchant directory over the defaults)."""

from __future__ import annotations

import threading
from pathlib import Path

from jinja2 import FileSystemLoader, StrictUndefined, Template, select_autoescape
from jinja2.sandbox import ImmutableSandboxedEnvironment


class TemplateStore:
    """One sandboxed environment per merchant, cached; ``invalidate`` picks up edits."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._envs: dict[str, ImmutableSandboxedEnvironment] = {}
        self._selected: dict[tuple[str, tuple[str, ...]], Template] = {}
        self._lock = threading.Lock()

    def select(self, merchant_id: str, names: tuple[str, ...]) -> Template:
        """The first of ``names`` that exists for the merchant, resolved once and cached.

        Jinja2 caches compiled templates but not misses, so without this every
        render would stat the per-status files a merchant did not write.
        """
        key = (merchant_id, names)
        template = self._selected.get(key)
        if template is None:
            template = self.environment(merchant_id).select_template(list(names))
            with self._lock:
                self._selected[key] = template
        return template

    def environment(self, merchant_id: str) -> ImmutableSandboxedEnvironment:
        """The environment for ``merchant_id``: templates/<merchant_id>/ first, then defaults."""
        env = self._envs.get(merchant_id)
        if env is None:
            env = self._build(merchant_id)
            with self._lock:
                self._envs[merchant_id] = env
        return env

    def invalidate(self, merchant_id: str | None = None) -> None:
        """Drop cached environments (one merchant, or all)."""
        with self._lock:
            if merchant_id is None:
                self._envs.clear()
                self._selected.clear()
            else:
                self._envs.pop(merchant_id, None)
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
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=False,
            auto_reload=False,
        )
