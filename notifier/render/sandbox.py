"""The sandbox merchant templates run in: Jinja2's immutable sandbox, the render limits'
hooks (``notifier.render.limits``), and two fast paths for what every render does."""

from __future__ import annotations

import gettext as stdlib_gettext
import types
from collections.abc import Callable, Iterable, Sequence
from functools import update_wrapper
from typing import Any

from jinja2 import Template, TemplateSyntaxError, pass_context
from jinja2.runtime import Context, Macro
from jinja2.runtime import markup_join as _markup_join
from jinja2.runtime import str_join as _str_join
from jinja2.sandbox import MAX_RANGE, ImmutableSandboxedEnvironment, SandboxedFormatter
from markupsafe import EscapeFormatter, Markup

from notifier.render import limits
from notifier.render.limits import LimitExceeded, Limits, limit_filter, measure, too_big

#: Names a template reaches as attributes of a dict (``d.items``), never as its keys.
_DICT_ATTRIBUTES = frozenset(dir(dict))


class Translate:
    """One of the i18n extension's newstyle gettext functions for one locale chain.

    Behaves like the functions ``install_gettext_translations(newstyle=True)``
    makes (the result is %-formatted with the named variables, and is Markup,
    so those variables are escaped, where the template autoescapes), but
    ``Sandbox.call`` calls it directly: a ``{% trans %}`` costs one call, not
    two trips through the sandbox's call checks.
    """

    __slots__ = ("contextual", "func", "plural")

    def __init__(self, name: str, translations: stdlib_gettext.NullTranslations) -> None:
        self.func: Callable[..., str] = getattr(translations, name)
        # decided once here, not on every {% trans %}
        self.plural = name in ("ngettext", "npgettext")
        self.contextual = name in ("pgettext", "npgettext")

    @pass_context
    def __call__(self, context: Context, *args: Any, **variables: Any) -> str:
        return self.translate(context.eval_ctx.autoescape, args, variables)

    def translate(self, autoescape: bool, args: tuple[Any, ...], variables: dict[str, Any]) -> str:
        if self.plural:
            variables.setdefault("num", args[-1])
        if self.contextual:
            variables.setdefault("context", args[0])
        text = self.func(*args)
        if not variables:
            return Markup(text) if autoescape else text
        # a variable may be used many times: what the result would be is measured first
        # (and spent), so chained translations cannot multiply a value past the limit
        spent = limits.current()
        cap = (spent.limits if spent else DEFAULT_LIMITS).max_bytes
        size = limits.percent_size(text, variables, cap)
        if size > cap:
            raise too_big("a translated string with its variables", size, cap)
        if spent is not None and size > 1024:
            spent.spend(size)
        return (Markup(text) if autoescape else text) % variables


#: What a TemplateStore built without its own limits renders with (the settings' defaults).
DEFAULT_LIMITS = Limits()


class Sandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with render limits and two fast paths.

    Limits (``notifier.render.limits``): calls, filters, the ``* ** + %`` operators, ``~``,
    every ``{% for %}`` item and every printed value spend the render's budget; what could
    grow without bound is measured before it is built. Attributes of classes are refused
    (``dict.update(brand, …)`` would change a value shared by every message).

    Fast paths, for what every render does many times:

    - ``d.key`` on a plain dict (the render context is dicts) is a key lookup, unless the
      name is a dict attribute: the same answer the sandbox gives, without first trying
      (and failing) an attribute lookup.
    - ``{% trans %}`` calls a ``Translate``, which is safe by construction.
    """

    code_generator_class = limits.LimitedGenerator
    template_class = limits.LimitedTemplate
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(
        self,
        *args: Any,
        limits: Limits = DEFAULT_LIMITS,
        filters: dict[str, Callable[..., Any]] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self.globals["range"] = self.limited_range
        self.filters = {
            name: limit_filter(name, func, limits, self.made)
            for name, func in {**self.filters, **(filters or {})}.items()
        }

    def getattr(self, obj: Any, attribute: str) -> Any:
        if type(obj) is dict and attribute not in _DICT_ATTRIBUTES and attribute in obj:
            return obj[attribute]
        return super().getattr(obj, attribute)

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        # dict.update(brand, …), cycler.next(x): unbound methods work on any object
        return not isinstance(obj, type) and super().is_safe_attribute(obj, attr, value)

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        spent = limits.current()
        if spent is not None:
            spent.used += 1
            if spent.used >= spent.next_check:
                spent.check()
        kind = type(__obj)
        if kind is Translate:
            return __obj.translate(__context.eval_ctx.autoescape, args, kwargs)
        if kind is Macro:  # its output is measured as it is joined
            return super().call(__context, __obj, *args, **kwargs)
        cap = __self.limits.max_bytes
        size, args = limits.call_size(__obj, args, kwargs, cap)
        if size > cap:
            raise too_big(f"calling {_name(__obj)}", size, cap)
        if spent is not None and size > 1024:
            spent.step(size >> 10)
        result = super().call(__context, __obj, *args, **kwargs)
        size = len(result) if isinstance(result, str) else measure(result, cap)
        if size > cap:
            raise too_big(f"calling {_name(__obj)}", size, cap)
        if spent is not None and size:
            spent.spend(size)
        return result

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        cap = self.limits.max_bytes
        size = limits.binop_size(operator, left, right, cap)
        if size > cap:
            raise too_big(f"'{operator}'", size, cap)
        spent = limits.current()
        if spent is not None:
            spent.spend(size)
        return self.binop_table[operator](left, right)

    def made(self, value: Any, what: str) -> Any:
        """``value``, built by ``what``, if it is within the output limit (and spent): what
        calls, filters and literals build."""
        cap = self.limits.max_bytes
        size = len(value) if isinstance(value, str) else measure(value, cap)
        if size > cap:
            raise too_big(what, size, cap)
        spent = limits.current()
        if spent is not None:
            spent.take(size)
        return value

    def counted(self, text: str) -> str:
        """Every printed value (compiled in): what a loop piles up in a buffer is counted
        before the buffer is ever joined."""
        spent = limits.current()
        if spent is not None:
            spent.take(len(text))
        return text

    def literal(self, value: Any) -> Any:
        """A list, tuple or dict literal, measured: nesting ``[a, a]`` makes sizes double."""
        return self.made(value, "a literal")

    def concat(self, parts: Iterable[str]) -> str:
        """Jinja's ``"".join`` of a template's, a macro's or a block's output, measured
        first (so a loop's pile of parts is never joined into something huge)."""
        parts = parts if isinstance(parts, list) else list(parts)
        cap = self.limits.max_bytes
        size = sum(map(len, parts))
        if size > cap:
            raise too_big("the template's output", size, cap)
        spent = limits.current()
        if spent is not None:
            spent.take(size)
        return "".join(parts)

    def str_join(self, seq: Sequence[Any]) -> str:
        """``a ~ b``, measured before it is built."""
        self._operands(seq)
        return str(self.made(_str_join(seq), "'~'"))

    def markup_join(self, seq: Sequence[Any]) -> str:
        """``a ~ b`` where the template autoescapes."""
        self._operands(seq)
        return str(self.made(_markup_join(seq), "'~'"))

    def _operands(self, seq: Sequence[Any]) -> None:
        cap = self.limits.max_bytes
        size = sum(measure(x, cap) for x in seq)
        if size > cap:
            raise too_big("'~'", size, cap)

    def limited_range(self, *args: int) -> range:
        """``range``, at most MAX_RANGE numbers (as Jinja's sandbox), refused as a limit."""
        numbers = range(*args)
        try:
            count = len(numbers)
        except OverflowError:
            count = MAX_RANGE + 1
        if count > MAX_RANGE:
            raise LimitExceeded(
                f"range() of {count:,} numbers: over the render limit of {MAX_RANGE:,}"
            )
        return numbers

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        """Jinja's sandboxed ``str.format``, with fields measured (``'{:999999999}'``)."""
        if not isinstance(value, types.MethodType | types.BuiltinMethodType) or (
            value.__name__ not in ("format", "format_map")
        ):
            return None
        f_self: Any = value.__self__
        if not isinstance(f_self, str):
            return None
        str_type = type(f_self)
        is_format_map = value.__name__ == "format_map"
        formatter: _Formatter = (
            _EscapeFormatter(self, escape=f_self.escape)
            if isinstance(f_self, Markup)
            else _Formatter(self)
        )

        def wrapper(*args: Any, **kwargs: Any) -> str:
            if is_format_map:
                if kwargs:
                    raise TypeError("format_map() takes no keyword arguments")
                if len(args) != 1:
                    raise TypeError(f"format_map() takes exactly one argument ({len(args)} given)")
                kwargs, args = args[0], ()
            return str_type(formatter.vformat(f_self, args, kwargs))

        return update_wrapper(wrapper, value)


def _name(obj: Any) -> str:
    return str(getattr(obj, "__name__", None) or getattr(obj, "name", None) or type(obj).__name__)


class _Formatter(SandboxedFormatter):
    """The sandbox's formatter, counting what the fields of one ``format`` build."""

    def __init__(self, env: Sandbox, **kwargs: Any) -> None:
        super().__init__(env, **kwargs)
        self.cap = env.limits.max_bytes
        self.size = 0

    def vformat(self, format_string: str, args: Sequence[Any], kwargs: Any) -> str:
        self.size = len(format_string)
        return super().vformat(format_string, args, kwargs)

    def format_field(self, value: Any, format_spec: str) -> Any:
        self.size += limits.format_field_size(value, format_spec, self.cap)
        if self.size > self.cap:
            raise too_big("str.format", self.size, self.cap)
        return super().format_field(value, format_spec)


class _EscapeFormatter(_Formatter, EscapeFormatter):
    pass


def where(exc: BaseException) -> str | None:
    """The template and line ``exc`` was raised at (``messages/delivered.jinja, line 3``):
    the innermost template frame of its traceback."""
    if isinstance(exc, TemplateSyntaxError):
        return f"{exc.name or exc.filename or 'template'}, line {exc.lineno}"
    found = None
    tb = exc.__traceback__
    while tb is not None:
        template = tb.tb_frame.f_globals.get("__jinja_template__")
        if isinstance(template, Template):
            found = f"{template.name or 'template'}, line "
            found += str(template.get_corresponding_lineno(tb.tb_lineno))
        tb = tb.tb_next
    return found


def render_text(template: Template, ctx: dict[str, Any]) -> str:
    """``template.render(ctx)``, with the traceback of a failure left as it happened (so
    ``where`` finds the template's line; Jinja rewrites it into fake frames)."""
    return template.environment.concat(template.root_render_func(template.new_context(ctx)))
