"""Template environments: sandboxed, strict, layered (merchant directory over the defaults)."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from babel.support import NullTranslations
from jinja2 import (
    BaseLoader,
    ChoiceLoader,
    DictLoader,
    FileSystemLoader,
    StrictUndefined,
    Template,
    TemplateError,
    TemplateNotFound,
    TemplateSyntaxError,
    pass_context,
    select_autoescape,
)
from jinja2.runtime import Context
from markupsafe import Markup

from notifier.render.compiled import COMPILED
from notifier.render.i18n import Catalogs
from notifier.render.limits import Limits
from notifier.render.sandbox import DEFAULT_LIMITS, Sandbox, Translate
from notifier.render.skeleton import TracingSandbox

#: The names the i18n extension compiles ``{% trans %}`` and ``_()`` into.
GETTEXT_NAMES = ("gettext", "ngettext", "pgettext", "npgettext")

#: Marks a search path whose first layer is a merchant's published files.
PUBLISHED = "published:"

#: The only template names a template may load ({% include %}, {% import %}, the renderer's
#: own lookups): never a file of another merchant's folder, a brand file or a catalog.
TEMPLATE_NAME = re.compile(r"_labels\.jinja|messages/[^/]+\.jinja|email/[^/]+|sms/[^/]+")

#: Unicode's left-to-right isolate and its closing pop (text, SMS, plain strings).
LRI, PDI = "\u2066", "\u2069"


@pass_context
def ltr(context: Context, value: Any) -> Any:
    """A left-to-right value (phone, email, number, URL, Latin name) kept whole in
    right-to-left text: ``<bdi dir="ltr">`` in HTML, Unicode isolates elsewhere. Unchanged
    in left-to-right messages (an isolate would make a GSM-7 SMS UCS-2)."""
    if value is None or value == "" or context.get("dir") != "rtl":
        return value
    if context.eval_ctx.autoescape:
        return Markup('<bdi dir="ltr">{}</bdi>').format(value)
    return f"{LRI}{value}{PDI}"


#: Unicode's first-strong isolate: a value whose direction is its own (a name, a place).
FSI = "\u2068"


@pass_context
def isolate(context: Context, value: Any) -> Any:
    """A value that takes its direction from its own first letter (a shop's or a person's
    name, an address), kept whole in right-to-left text: ``<bdi>`` in HTML, Unicode
    isolates elsewhere; unchanged in left-to-right messages."""
    if value is None or value == "" or context.get("dir") != "rtl":
        return value
    if context.eval_ctx.autoescape:
        return Markup("<bdi>{}</bdi>").format(value)
    return f"{FSI}{value}{PDI}"


class TemplateStore:
    """Sandboxed environments by template search path, cached; ``invalidate`` picks up edits.

    Merchants without their own template folder share one environment, so each template
    is compiled once, not once per merchant and locale. Translations are not installed
    in an environment: every render passes the gettext functions of the reader's locale
    chain (``gettext_for``) in its context, where they take precedence over the
    environment's English defaults.
    """

    def __init__(
        self,
        directory: Path,
        catalogs: Catalogs | None = None,
        published: Callable[[str], dict[str, str]] | None = None,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self.directory = directory
        self.catalogs = catalogs
        #: how long one message may render, and how big anything it builds may be
        self.limits = limits
        #: a merchant's published template files (the editor's), over its folder's
        self.published = published
        self._search: dict[str, tuple[str, ...]] = {}
        self._envs: dict[tuple[tuple[str, ...], bool], Sandbox] = {}
        self._selected: dict[tuple[tuple[str, ...], tuple[str, ...], bool], Template] = {}
        self._exists: dict[tuple[tuple[str, ...], tuple[str, ...]], bool] = {}
        self._gettext: dict[tuple[str, ...], dict[str, Translate]] = {}
        self._merchant_catalogs: dict[str, Catalogs | None] = {}
        self._lock = threading.Lock()

    def search_path(self, merchant_id: str) -> tuple[str, ...]:
        """Where a merchant's templates are looked up: its own folder first, if it has one."""
        search = self._search.get(merchant_id)
        if search is None:
            override = self.directory / merchant_id
            own = bool(merchant_id) and override.is_dir()
            search = (str(override), str(self.directory)) if own else (str(self.directory),)
            if merchant_id and self.published is not None and self.published(merchant_id):
                search = (PUBLISHED + merchant_id, *search)
            with self._lock:
                self._search[merchant_id] = search
        return search

    def has_own(self, merchant_id: str) -> bool:
        """Whether the merchant has a template folder of its own."""
        return len(self.search_path(merchant_id)) > 1

    def select(self, merchant_id: str, names: tuple[str, ...], tracing: bool = False) -> Template:
        """The first of ``names`` that exists for the merchant, resolved once and cached.

        Jinja2 caches compiled templates but not misses, so without this every
        render would stat the per-status files a merchant did not write. ``tracing``: the
        same template compiled for the tracing sandbox (``skeleton``).
        """
        search = self.search_path(merchant_id)
        key = (search, names, tracing)
        template = self._selected.get(key)
        if template is None:
            template = self.environment(merchant_id, tracing).select_template(list(names))
            with self._lock:
                self._selected[key] = template
        return template

    def exists(self, merchant_id: str, names: tuple[str, ...]) -> bool:
        """Whether any of ``names`` exists for the merchant (its misses cached too)."""
        key = (self.search_path(merchant_id), names)
        found = self._exists.get(key)
        if found is None:
            try:
                self.select(merchant_id, names)
                found = True
            except TemplateNotFound:  # TemplatesNotFound is one
                found = False
            except TemplateError:  # it exists, broken: rendering it says what is wrong
                found = True
            with self._lock:
                self._exists[key] = found
        return found

    def environment(self, merchant_id: str, tracing: bool = False) -> Sandbox:
        """The environment with the merchant's layered loader (or its tracing twin)."""
        search = self.search_path(merchant_id)
        env = self._envs.get((search, tracing))
        if env is None:
            env = self._build(search, tracing)
            with self._lock:
                self._envs[(search, tracing)] = env
        return env

    def merchant_catalogs(self, merchant_id: str) -> Catalogs | None:
        """A merchant's own catalogs (``templates/<merchant>/locales/``), if it has any."""
        if not merchant_id:
            return None
        if merchant_id not in self._merchant_catalogs:
            folder = self.directory / merchant_id / "locales"
            with self._lock:
                self._merchant_catalogs[merchant_id] = Catalogs(folder) if folder.is_dir() else None
        return self._merchant_catalogs[merchant_id]

    def gettext_for(self, chain: Sequence[str], merchant_id: str = "") -> dict[str, Translate]:
        """The newstyle gettext functions for a locale chain (first found wins, then English),
        the merchant's own catalog before the shared one in each locale, to pass in a
        render's context."""
        own = self.merchant_catalogs(merchant_id)
        key = (merchant_id if own else "", *chain)
        funcs = self._gettext.get(key)
        if funcs is None:
            translations = (
                self.catalogs.translations(chain, own) if self.catalogs else NullTranslations()
            )
            funcs = {name: Translate(name, translations) for name in GETTEXT_NAMES}
            with self._lock:
                self._gettext[key] = funcs
        return funcs

    def invalidate(self) -> None:
        """Drop cached environments and translations (after an edit of templates/ or locales/)."""
        with self._lock:
            self._search.clear()
            self._envs.clear()
            self._selected.clear()
            self._exists.clear()
            self._gettext.clear()
            self._merchant_catalogs.clear()

    def forget(self, merchant_id: str) -> None:
        """Drop what is cached for one merchant (its published files changed)."""
        with self._lock:
            search = self._search.pop(merchant_id, None)
            if search is not None and search[0].startswith(PUBLISHED):
                self._envs.pop((search, False), None)
                self._envs.pop((search, True), None)
                for key in [k for k in self._selected if k[0] == search]:
                    del self._selected[key]
                for found in [k for k in self._exists if k[0] == search]:
                    del self._exists[found]

    def _loader(self, search: tuple[str, ...]) -> BaseLoader:
        """Published files first (the editor's), then the folders, the merchant's first;
        only template names (TEMPLATE_NAME) resolve."""
        files = FileSystemLoader([p for p in search if not p.startswith(PUBLISHED)])
        if not search[0].startswith(PUBLISHED) or self.published is None:
            return _TemplatesOnly(files)
        merchant_id = search[0].removeprefix(PUBLISHED)
        return _TemplatesOnly(ChoiceLoader([DictLoader(self.published(merchant_id)), files]))

    def _build(self, search: tuple[str, ...], tracing: bool = False) -> Sandbox:
        env = (TracingSandbox if tracing else Sandbox)(
            loader=self._loader(search),
            # Merchant-editable templates: no access to internals, no silent blanks.
            undefined=StrictUndefined,
            autoescape=select_autoescape(enabled_extensions=("html",), default=False),
            extensions=["jinja2.ext.i18n"],
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=False,
            auto_reload=False,
            limits=self.limits,
            filters={"ltr": ltr, "isolate": isolate},
            bytecode_cache=COMPILED,
        )
        # English (the source strings) unless a render passes its locale's functions.
        env.globals.update({name: Translate(name, NullTranslations()) for name in GETTEXT_NAMES})
        # Compile {% trans %} as newstyle calls: gettext(text, **variables).
        env.newstyle_gettext = True  # type: ignore[attr-defined]
        return env


class _TemplatesOnly(BaseLoader):
    """A loader that finds template names only. The default templates' folder holds every
    merchant's folder too: without this, ``{% include 'other/brand.yaml' %}`` in one
    merchant's template would print another merchant's files."""

    def __init__(self, inner: BaseLoader) -> None:
        self.inner = inner

    def get_source(
        self, environment: Any, template: str
    ) -> tuple[str, str | None, Callable[[], bool] | None]:
        if not TEMPLATE_NAME.fullmatch(template):
            raise TemplateNotFound(template, f"{template}: not a template a message may load")
        try:
            return self.inner.get_source(environment, template)
        except UnicodeDecodeError as exc:  # a file saved in another encoding: named, as a
            raise not_utf8(exc, template) from None  # broken policy or brand file is


def not_utf8(exc: UnicodeDecodeError, name: str) -> TemplateSyntaxError:
    """A template file that is not UTF-8 text, as a template error naming it and the line
    of its first stray byte."""
    data = exc.object if isinstance(exc.object, bytes) else bytes(exc.object)
    line = data[: exc.start].count(b"\n") + 1
    byte = data[exc.start : exc.start + 1].hex()
    return TemplateSyntaxError(
        f"not UTF-8 text (byte 0x{byte} on this line): save it as UTF-8", line, name
    )
