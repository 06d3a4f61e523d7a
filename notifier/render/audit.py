"""What a template's source reaches for, found without running it: Python's internals,
other template systems' globals, files that are not templates. ``notifier check`` and the
editor's checks report these even in a branch no sample message reaches; the sandbox
refuses them anyway when they run."""

from __future__ import annotations

import re
from collections.abc import Iterator

from jinja2 import Environment, TemplateSyntaxError, meta, nodes

from notifier.render.environment import TEMPLATE_NAME

#: Globals of web frameworks' templates (Flask, Django) that attacks probe for.
FOREIGN_GLOBALS = frozenset(
    {"config", "request", "session", "g", "url_for", "get_flashed_messages", "settings"}
)
#: Attributes that lead from a value to the interpreter (besides ``_names``).
INTERNAL_ATTRIBUTES = frozenset(
    {
        "mro",
        "gi_frame",
        "gi_code",
        "cr_frame",
        "cr_code",
        "ag_frame",
        "ag_code",
        "f_globals",
        "f_locals",
        "f_back",
        "f_builtins",
        "tb_frame",
        "tb_next",
        "func_globals",
        "func_code",
    }
)
#: Filters that take an attribute name as an argument.
ATTRIBUTE_FILTERS = frozenset(
    {
        "attr",
        "map",
        "selectattr",
        "rejectattr",
        "sort",
        "groupby",
        "sum",
        "join",
        "unique",
        "min",
        "max",
    }
)
_DUNDER = re.compile(r"__\w+__")
#: A str.format field that reaches an attribute or item by an underscore name: {0._x}.
_FORMAT_FIELD = re.compile(r"\{[^{}]*[.\[]_")

_INTERNALS = "reaches for Python internals ({}): templates see only the values the README lists"


def template_problems(env: Environment, name: str, source: str) -> list[str]:
    """What the template ``name`` reaches for that no message template may, one line each
    with its line number (``messages/delivered.jinja, line 3: …``). A template that does
    not parse gives none here: rendering reports it."""
    try:
        tree = env.parse(source, name)
    except TemplateSyntaxError:
        return []
    internals: dict[int, list[str]] = {}
    for lineno, what in sorted({*_internals(tree), *_attribute_names(tree)}):
        internals.setdefault(lineno, []).append(what)
    found = [(n, _INTERNALS.format(", ".join(whats))) for n, whats in internals.items()]
    found += [*_foreign(tree), *_loads(tree)]
    return list(dict.fromkeys(f"{name}, line {n}: {what}" for n, what in sorted(found)))


def _internals(tree: nodes.Template) -> Iterator[tuple[int, str]]:
    """``x.__class__``, ``x['_y']``, ``'__globals__'``, ``'{0._y}'.format(x)``."""
    for node in tree.find_all(nodes.Getattr):
        if node.attr.startswith("_") or node.attr in INTERNAL_ATTRIBUTES:
            yield node.lineno, f".{node.attr}"
    for item in tree.find_all(nodes.Getitem):
        if isinstance(item.arg, nodes.Const) and _underscore(item.arg.value):
            yield item.lineno, f"[{item.arg.value!r}]"
    for const in tree.find_all(nodes.Const):
        if isinstance(const.value, str):
            if match := _DUNDER.search(const.value):
                yield const.lineno, repr(match.group())
            elif _FORMAT_FIELD.search(const.value):
                yield const.lineno, f"the format field in {const.value!r}"


def _attribute_names(tree: nodes.Template) -> Iterator[tuple[int, str]]:
    """``|attr('_x')``, ``|map(attribute='_x')``."""
    for node in tree.find_all(nodes.Filter):
        if node.name in ATTRIBUTE_FILTERS:
            for arg in [*node.args, *(k.value for k in node.kwargs)]:
                if isinstance(arg, nodes.Const) and _underscore(arg.value):
                    yield node.lineno, f"|{node.name}({arg.value!r})"


def _foreign(tree: nodes.Template) -> Iterator[tuple[int, str]]:
    """``{{ config }}``, ``{{ request }}``: never defined here."""
    try:
        foreign = meta.find_undeclared_variables(tree) & FOREIGN_GLOBALS
    except TemplateSyntaxError:
        # it compiles the template, and an unknown filter or test fails there (rendering
        # reports it, with its line): names the template never sets, then
        names = list(tree.find_all(nodes.Name))
        foreign = {n.name for n in names if n.ctx == "load"} & FOREIGN_GLOBALS
        foreign -= {n.name for n in names if n.ctx in ("store", "param")}
    for node in tree.find_all(nodes.Name):
        if node.name in foreign:
            yield (
                node.lineno,
                f"uses {node.name!r}, a global of other template systems: notifier's templates "
                "have no such variable",
            )


def _loads(tree: nodes.Template) -> Iterator[tuple[int, str]]:
    """``{% include 'acme/brand.yaml' %}``: a file that is not a template."""
    for node in tree.find_all((nodes.Include, nodes.Import, nodes.FromImport, nodes.Extends)):
        loaded = getattr(node, "template", None)
        if isinstance(loaded, nodes.Const) and not (
            isinstance(loaded.value, str) and TEMPLATE_NAME.fullmatch(loaded.value)
        ):
            yield (
                node.lineno,
                f"loads {loaded.value!r}: a template may load only message files "
                "(messages/…), layouts (email/…, sms/…) and _labels.jinja",
            )


def _underscore(value: object) -> bool:
    return isinstance(value, str) and value.startswith("_")
