"""Template environments: sandboxed, strict, layered (merchant directory over the defaults)."""

from __future__ import annotations

import threading
from pathlib import Path

from jinja2 import FileSystemLoader, StrictUndefined, select_autoescape
from jinja2.sandbox import ImmutableSandboxedEnvironment


class TemplateStore:
    """One sandboxed environment per merchant, cached; ``invalidate`` picks up edits."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._envs: dict[str, ImmutableSandboxedEnvironment] = {}
        self._lock = threading.Lock()

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
            else:
                self._envs.pop(merchant_id, None)

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
