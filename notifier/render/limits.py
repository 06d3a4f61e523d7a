"""Render limits: how long one message may render and how much its templates may build.

Merchant templates are code, run in the worker's own process: a template must not be able
to stop it. Python threads cannot be killed, so the limits are cooperative: the sandbox's
hooks (calls, filters, operators, loop iterations, output) spend a per-render ``Budget``,
which raises ``LimitExceeded`` past the time limit or the step limit, and every value a
hook builds is measured *before* it is built where it can grow without bound
(``'x' * 10**9``, ``9**(9**9)``, ``'a'|center(10**9)``, ``'%*s' % (10**9, x)``), after
otherwise. So a render ends with a RenderError, only that message fails, and the process
never holds more than a few times the output limit on behalf of one template.
"""

from __future__ import annotations

import functools
import re
from collections import abc
from collections.abc import Callable, Iterable, Iterator
from contextlib import suppress
from contextvars import ContextVar
from dataclasses import dataclass
from time import thread_time
from typing import Any

from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.environment import Template, TemplateModule
from jinja2.exceptions import TemplateRuntimeError
from jinja2.runtime import Undefined
from jinja2.sandbox import MAX_RANGE
from jinja2.utils import Namespace, generate_lorem_ipsum

#: Steps one render may take (a loop iteration, a call, a KiB of text handled): a
#: deterministic bound (a message takes under a hundred) that also bounds what a loop can
#: pile up in a buffer.
MAX_STEPS = 1_000_000
#: What a render may build in all (values it drops included), in output limits: the final
#: message is at most one, and a message's words are built, then printed by its layouts.
TOTAL_FACTOR = 8
#: How deep values may nest (lists in lists…): a message's data is a few levels deep.
MAX_DEPTH = 100
#: Largest number a template may compute: Python prints at most 4300 digits anyway.
MAX_INT_BITS = 16_384
#: The slow text filters (pure Python, seconds per MiB, not interruptible) take at most
#: this share of the output limit as input.
SLOW_FILTERS = {"wordwrap": 16, "urlize": 16}
#: Printed values outside loops shorter than this are not counted (the count of those is
#: bounded by the template's own size).
_COUNT_FROM = 4096
#: How many steps (or KiB built) pass between two looks at the clock.
_CLOCK_EVERY = 1024


@dataclass(frozen=True, slots=True)
class Limits:
    """The limits of one render: CPU seconds, and bytes of any value it builds (the
    message's HTML, text or SMS included)."""

    time_s: float = 2.0
    max_bytes: int = 1024 * 1024


class LimitExceeded(TemplateRuntimeError):
    """A template crossed a render limit (time, steps or size)."""


class Budget:
    """What one render has spent: steps (a loop iteration, a call, a KiB built), bytes
    built, and CPU time, looked at every _CLOCK_EVERY steps. The hooks do the cheap part
    inline (``used += 1``) and call ``check`` when ``used`` reaches ``next_check``."""

    __slots__ = ("built", "deadline", "limits", "next_check", "total", "used")

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        # CPU time of this thread: a render that waits (for the GIL, or a busy machine)
        # is not a template that computes
        self.deadline = thread_time() + limits.time_s
        self.used = 0
        self.next_check = _CLOCK_EVERY
        self.built = 0
        self.total = TOTAL_FACTOR * limits.max_bytes

    def check(self) -> None:
        """Raise if a limit is crossed; look at the clock."""
        if self.used > MAX_STEPS:
            raise LimitExceeded(
                f"ran more than {MAX_STEPS:,} steps (a loop iteration, a call, a KiB of "
                "text handled): over the render step limit"
            )
        if self.built > self.total:
            raise LimitExceeded(
                f"built more than {self.total:,} bytes in all: over {TOTAL_FACTOR} times the "
                "render output limit (NOTIFIER_RENDER_MAX_BYTES)"
            )
        self.next_check = self.used + _CLOCK_EVERY
        if thread_time() > self.deadline:
            raise LimitExceeded(
                f"took longer than the render time limit of {self.limits.time_s:g} s of CPU "
                "(NOTIFIER_RENDER_TIME_LIMIT_S)"
            )

    def step(self, cost: int = 1) -> None:
        """``cost`` steps (1, or the KiB a call is about to build)."""
        self.used += cost
        if self.used >= self.next_check:
            self.check()

    def take(self, size: int) -> None:
        """``size`` bytes built: the common small case costs an addition, the rest spend()."""
        if size > 1024 or self.built + size > self.total:
            self.spend(size)
        else:
            self.built += size

    def spend(self, size: int) -> None:
        """``size`` more bytes built (a step for each KiB)."""
        self.built += size
        self.used += size >> 10
        if self.built > self.total or self.used >= self.next_check:
            self.check()

    def iterate(self, iterable: Iterable[Any]) -> Iterator[Any]:
        for item in iterable:
            self.used += 1
            if self.used >= self.next_check:
                self.check()
            yield item


_current: ContextVar[Budget | None] = ContextVar("notifier_render_budget", default=None)


def budget(limits: Limits) -> _Within:
    """A fresh budget for the renders inside a ``with`` block (one message)."""
    return _Within(limits)


class _Within:
    __slots__ = ("limits", "token")

    def __init__(self, limits: Limits) -> None:
        self.limits = limits

    def __enter__(self) -> Budget:
        spent = Budget(self.limits)
        self.token = _current.set(spent)
        return spent

    def __exit__(self, *exc: object) -> None:
        _current.reset(self.token)


#: The budget of the render under way, if any.
current = _current.get


def iterate(iterable: Iterable[Any]) -> Iterable[Any]:
    """What every ``{% for %}`` iterates: the loop's own items, one step each."""
    spent = _current.get()
    return iterable if spent is None else spent.iterate(iterable)


def too_big(what: str, size: int, cap: int) -> LimitExceeded:
    return LimitExceeded(
        f"{what} would build {size:,} bytes: over the render output limit of {cap:,} "
        "(NOTIFIER_RENDER_MAX_BYTES)"
    )


def measure(value: Any, cap: int) -> int:
    """About how many bytes ``value`` takes as text (what ``str()`` of it would make),
    counting shared parts each time (``[a, a]`` twice ``a``) but walking each part once;
    stops counting past ``cap``. Refuses values nested deeper than MAX_DEPTH: hashing one
    a million tuples deep crashes the interpreter."""
    if isinstance(value, str):
        return len(value)
    return _measure(value, cap, {}, 0)


def _measure(value: Any, cap: int, seen: dict[int, int], depth: int) -> int:
    flat = _flat_size(value)
    if flat is not None:
        return flat
    known = seen.get(id(value))
    if known is not None:
        return known
    if depth >= MAX_DEPTH:
        raise LimitExceeded(f"a value nested more than {MAX_DEPTH} deep: over the render limit")
    inner = value._Namespace__attrs if isinstance(value, Namespace) else value
    parts: abc.Collection[Any]
    if isinstance(inner, abc.Mapping):
        total, parts = 4 * len(inner), [*inner.keys(), *inner.values()]
    elif isinstance(inner, abc.Collection):  # dict views too; never an iterator (consumed)
        total, parts = 2 * len(inner), inner
    else:
        total, parts = 16, ()
    for part in parts:
        total += len(part) if isinstance(part, str) else _measure(part, cap, seen, depth + 1)
        if total > cap:
            break
    seen[id(value)] = total
    return total


def _flat_size(v: Any) -> int | None:
    """The size of a value that holds no others; None for one that does."""
    if isinstance(v, str | bytes):
        return len(v)
    if isinstance(v, bool | float | None):
        return 8
    if isinstance(v, int):
        return v.bit_length() // 3 + 1
    if isinstance(v, range):
        return 24
    if isinstance(v, Undefined):
        return 0  # printing it fails on its own; |default takes it
    return None


def _int_bits(left: Any, right: Any, operator: str) -> int:
    if operator == "*":
        return int(left.bit_length() + right.bit_length())
    # ** : about log2(base) bits per unit of exponent (0, 1, -1 stay small)
    base = abs(left)
    return 0 if right <= 0 or base <= 1 else int(base.bit_length() * right)


def binop_size(operator: str, left: Any, right: Any, cap: int) -> int:
    """How many bytes ``left <operator> right`` would build, before building it."""
    ints = isinstance(left, int) and isinstance(right, int)
    if ints and operator in ("*", "**"):
        bits = _int_bits(left, right, operator)
        if bits > MAX_INT_BITS:
            raise LimitExceeded(
                f"a number of about {bits:,} bits: over the render limit of {MAX_INT_BITS:,}"
            )
        return bits // 8
    if operator == "*":
        if isinstance(right, int) and not isinstance(left, int | float):
            return measure(left, cap) * max(right, 0)
        if isinstance(left, int) and not isinstance(right, int | float):
            return measure(right, cap) * max(left, 0)
    if operator == "+" and not ints:
        return measure(left, cap) + measure(right, cap)
    if operator == "%" and isinstance(left, str):
        return percent_size(left, right, cap)
    return 0


#: A %-conversion: its optional key, flags, width and precision.
_PERCENT = re.compile(r"%(?:\([^)]*\))?[#0 +-]*(\*|\d+)?(?:\.(\*|\d+))?")
#: A %-conversion with a width or a precision.
SIZED = re.compile(r"%(?:\([^)]*\))?[#0 +-]*[*\d.]")


def _number(digits: str, cap: int) -> int:
    return int(digits) if len(digits) <= 12 else cap + 1


def percent_size(text: str, args: Any, cap: int) -> int:
    """How many bytes ``text % args`` would build: every field as wide as the widest
    argument, plus the widths and precisions it asks for."""
    fields = text.count("%")
    if not fields:
        return len(text)
    if isinstance(args, abc.Mapping):
        values = list(args.values())
    else:
        values = list(args) if isinstance(args, tuple) else [args]
    widest = max((measure(v, cap) for v in values), default=0)
    size = len(text) + fields * widest
    if SIZED.search(text) is None:  # no width or precision: the common case
        return size
    numbers = _PERCENT.findall(text)
    size += sum(_number(n, cap) for field in numbers for n in field if n.isdigit())
    if any("*" in field for field in numbers):  # widths taken from the arguments
        size += sum(abs(v) for v in values if isinstance(v, int))
    return size


def format_field_size(value: Any, spec: str, cap: int) -> int:
    """How many bytes ``format(value, spec)`` would build (its width and precision)."""
    return measure(value, cap) + sum(_number(n, cap) for n in re.findall(r"\d+", spec))


def _width(value: Any) -> int:
    return value if isinstance(value, int) else len(str(value))


#: The methods of text (str, Markup, bytes) a template may call: each builds at most a few
#: times its input, or is sized before it runs (padding, replacing, joining).
TEXT_METHODS = frozenset(
    {
        *("capitalize", "casefold", "center", "count", "decode", "encode", "endswith"),
        *("expandtabs", "find", "format", "format_map", "hex", "index", "isalnum", "isalpha"),
        *("isascii", "isdecimal", "isdigit", "isidentifier", "islower", "isnumeric"),
        *("isprintable", "isspace", "istitle", "isupper", "join", "ljust", "lower", "lstrip"),
        *("partition", "removeprefix", "removesuffix", "replace", "rfind", "rindex", "rjust"),
        *("rpartition", "rsplit", "rstrip", "split", "splitlines", "startswith", "strip"),
        *("striptags", "swapcase", "title", "unescape", "upper", "zfill"),
    }
)


def call_size(
    obj: Any, args: tuple[Any, ...], kwargs: dict[str, Any], cap: int
) -> tuple[int, tuple[Any, ...]]:
    """How many bytes calling ``obj`` would build, for the calls that can multiply their
    input (text padding, replacing and joining, lipsum); the text's own size for its other
    methods; 0 for other calls (measured after). ``str.join`` of an iterator gets it read
    into a list first (the arguments to call with)."""
    if obj is generate_lorem_ipsum:
        words = dict(zip(("n", "html", "min", "max"), args, strict=False)) | kwargs
        return _width(words.get("n", 5)) * _width(words.get("max", 100)) * 12, args
    owner = getattr(obj, "__self__", None)
    name = getattr(obj, "__name__", "")
    if isinstance(owner, int) and name == "to_bytes":
        return _width(args[0] if args else kwargs.get("length", 1)), args
    if not isinstance(owner, str | bytes):
        return 0, args
    if name not in TEXT_METHODS:
        # e.g. translate(), which maps one character to any text
        raise LimitExceeded(
            f"{type(owner).__name__}.{name}() is not available in templates: what it builds "
            "cannot be checked against the render limits before it runs"
        )
    n = len(owner)
    if name in ("center", "ljust", "rjust", "zfill"):
        return max(n, _width(args[0] if args else kwargs.get("width", 0))), args
    if name == "expandtabs":
        tab = args[0] if args else kwargs.get("tabsize", 8)
        tabs = owner.count("\t") if isinstance(owner, str) else owner.count(b"\t")
        return n + tabs * max(_width(tab), 0), args
    if name == "replace" and len(args) >= 2:
        return replace_size(owner, args[0], args[1], args[2] if len(args) > 2 else -1), args
    if name == "join" and len(args) == 1:
        items = list(args[0])
        return sum(measure(x, cap) for x in items) + n * len(items), (items,)
    return n, args  # the others take time, or build text, in proportion to it


def replace_size(text: Any, old: Any, new: Any, count: Any) -> int:
    """How many bytes ``text.replace(old, new, count)`` would build."""
    text = text if isinstance(text, str | bytes) else str(text)
    hits = text.count(old) if old else len(text) + 1
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    return len(text) + hits * len(new)


def _indent_size(cap: int, s: Any, width: Any = 4, *rest: Any, **kwargs: Any) -> int:
    text = str(s)
    return len(text) + (text.count("\n") + 1) * _width(width)


def _tojson_size(cap: int, value: Any, indent: Any = None, *rest: Any, **kwargs: Any) -> int:
    """``|tojson(indent)``: the value, plus a line for each of its values and brackets,
    each indented by its depth (``indent=10**9`` would build a gigabyte from ``{'a': 1}``)."""
    size = measure(value, cap)
    width = _width(indent) if indent is not None else 0
    if width <= 0 or size > cap:
        return size
    lines, depths = _json_lines(value, {})
    return size + lines + width * depths


def _json_lines(value: Any, seen: dict[int, tuple[int, int]]) -> tuple[int, int]:
    """The lines indented JSON writes ``value`` on, and their depths' sum below it (each
    part walked once: a list holding one list a thousand times counts it a thousand)."""
    if not isinstance(value, dict | list | tuple) or not value:
        return 1, 0
    known = seen.get(id(value))
    if known is not None:
        return known
    lines, depths = 2, 0
    for item in value.values() if isinstance(value, dict) else value:
        inner, below = _json_lines(item, seen)
        lines += inner
        depths += below + inner  # one level deeper than this one
    seen[id(value)] = lines, depths
    return lines, depths


def _wordwrap_size(cap: int, s: Any, width: int = 79, *rest: Any, **kwargs: Any) -> int:
    wrapstring = kwargs.get("wrapstring", rest[1] if len(rest) > 1 else None) or "\n"
    n = len(str(s))
    return n + (n // max(width, 1) + 1) * len(wrapstring)


def _join_size(cap: int, value: Any, d: Any = "", *rest: Any, **kwargs: Any) -> int:
    items = list(value)
    return sum(measure(x, cap) for x in items) + len(str(d)) * len(items)


def _sum_size(cap: int, iterable: Any, attribute: Any = None, start: Any = 0) -> int:
    return measure(start, cap) + sum(measure(x, cap) for x in iterable)


def _count_arg(name: str) -> Callable[..., int]:
    def size(cap: int, value: Any, count: Any, *rest: Any, **kwargs: Any) -> int:
        if isinstance(count, int) and count > MAX_RANGE:
            raise LimitExceeded(f"|{name}({count:,}): over the render limit of {MAX_RANGE:,}")
        return 0

    return size


#: Filters whose output can be far larger than their input: what they would build, given
#: the output limit and the filter's own arguments.
FILTER_SIZES: dict[str, Callable[..., int]] = {
    "center": lambda cap, value, width=80: len(str(value)) + _width(width),
    "indent": _indent_size,
    "tojson": _tojson_size,
    "wordwrap": _wordwrap_size,
    "replace": lambda cap, s, old, new, count=None: replace_size(s, old, new, count),
    "format": lambda cap, value, *args, **kwargs: percent_size(str(value), kwargs or args, cap),
    "join": _join_size,
    "sum": _sum_size,
    "batch": _count_arg("batch"),
    "slice": _count_arg("slice"),
}
#: Inputs whose length tells how long a filter takes on them.
_SIZED_TYPES = (str, list, tuple, dict)
#: Filters that consume an iterator: it is read into a list first, to be measured.
_CONSUMING = frozenset({"join", "sum"})


def limit_filter(
    name: str, func: Callable[..., Any], limits: Limits, made: Callable[[Any, str], Any]
) -> Any:
    """``func`` (the filter ``name``) with what it builds measured after it (``made``)
    and a step spent, in proportion to its input; for the filters of FILTER_SIZES and
    SLOW_FILTERS, what it would build estimated before."""
    skip = 1 if getattr(func, "jinja_pass_arg", None) is not None else 0
    if name in FILTER_SIZES or name in SLOW_FILTERS:
        return _estimated(name, func, limits.max_bytes, skip, made)
    what = f"|{name}"
    cap = limits.max_bytes

    @functools.wraps(func)
    def proportional(*args: Any, **kwargs: Any) -> Any:
        # Its input was measured when it was made; its time goes with its size.
        result = func(*args, **kwargs)
        size = len(result) if isinstance(result, str) else measure(result, cap)
        if size > cap:
            raise too_big(what, size, cap)
        spent = _current.get()
        if spent is not None:
            value = args[skip] if len(args) > skip else None
            spent.used += 1 + (len(value) >> 10 if isinstance(value, _SIZED_TYPES) else 0)
            spent.spend(size)
        return result

    return proportional


def _estimated(
    name: str, func: Callable[..., Any], cap: int, skip: int, made: Callable[[Any, str], Any]
) -> Any:
    """A filter of FILTER_SIZES or SLOW_FILTERS: refused before it runs when what it would
    build, or its input, is too big."""
    size_of = FILTER_SIZES.get(name)
    slow = SLOW_FILTERS.get(name)
    what = f"|{name}"

    @functools.wraps(func)
    def estimated(*args: Any, **kwargs: Any) -> Any:
        if len(args) <= skip:
            return func(*args, **kwargs)
        value = args[skip]
        if name in _CONSUMING and isinstance(value, abc.Iterator):
            value = list(value)
            args = (*args[:skip], value, *args[skip + 1 :])
        size = measure(value, cap)
        if slow is not None and size > cap // slow:
            raise LimitExceeded(
                f"{what} on {size:,} bytes: over its render limit of {cap // slow:,}"
            )
        if size_of is not None:
            # bad arguments: the filter itself says what is wrong
            with suppress(TypeError, ValueError, AttributeError):
                size = max(size, size_of(cap, *args[skip:], **kwargs))
        if size > cap:
            raise too_big(what, size, cap)
        spent = _current.get()
        if spent is not None:
            spent.step(1 + (size >> 10))
        return made(func(*args, **kwargs), what)

    return estimated


class LimitedGenerator(CodeGenerator):
    """Jinja's code generator with the budget's hooks compiled in: every ``{% for %}``
    iterates through ``iterate`` (a step per item), every printed value goes through the
    environment's ``counted``, list, tuple and dict literals through its ``literal`` (so
    ``[a, a]`` nested thirty times is refused, not printed), and ``~`` joins through the
    environment."""

    #: what every loop iterates through
    iterate_name = f"{__name__}.iterate"

    def visit_Template(self, node: nodes.Template, frame: Frame | None = None) -> None:
        for loop in node.find_all(nodes.For):
            loop.iter = nodes.Call(
                nodes.ImportedName(self.iterate_name),
                [loop.iter],
                [],
                None,
                None,
                lineno=loop.iter.lineno,
            )
        super().visit_Template(node, frame)

    def write_commons(self) -> None:
        super().write_commons()
        self.writeline("str_join = environment.str_join")
        self.writeline("markup_join = environment.markup_join")

    _loops = 0

    def visit_For(self, node: nodes.For, frame: Frame) -> None:
        self._loops += 1
        try:
            super().visit_For(node, frame)
        finally:
            self._loops -= 1

    def _output_child_pre(self, node: nodes.Expr, frame: Frame, finalize: Any) -> None:
        # In a loop every printed value is counted; elsewhere (a bounded number of them
        # per call) only the big ones, with an inline length check: most of a message.
        self.write("environment.counted(" if self._loops else "(_o if len(_o := ")
        super()._output_child_pre(node, frame, finalize)

    def _output_child_post(self, node: nodes.Expr, frame: Frame, finalize: Any) -> None:
        super()._output_child_post(node, frame, finalize)
        self.write(")" if self._loops else f") < {_COUNT_FROM} else environment.counted(_o))")

    def visit_List(self, node: nodes.List, frame: Frame) -> None:
        self.write("environment.literal(")
        super().visit_List(node, frame)
        self.write(")")

    def visit_Dict(self, node: nodes.Dict, frame: Frame) -> None:
        self.write("environment.literal(")
        super().visit_Dict(node, frame)
        self.write(")")

    def visit_Tuple(self, node: nodes.Tuple, frame: Frame) -> None:
        if node.ctx != "load":  # a target: {% for a, b in … %}
            super().visit_Tuple(node, frame)
            return
        self.write("environment.literal(")
        super().visit_Tuple(node, frame)
        self.write(")")


class LimitedTemplate(Template):
    """A template whose module (``{% import %}``, a message file's macros) keeps its
    top-level output as a list, not as Jinja's generator."""

    def make_module(
        self,
        vars: dict[str, Any] | None = None,
        shared: bool = False,
        locals: abc.Mapping[str, Any] | None = None,
    ) -> TemplateModule:
        ctx = self.new_context(vars, shared, locals)
        # each printed value is counted as it is made: a module's parts are at most
        # constants besides them, one per loop step
        return TemplateModule(self, ctx, list(self.root_render_func(ctx)))
