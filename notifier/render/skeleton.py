"""Render once, fill many: a message's skeleton per (templates, merchant, channel, locale,
shape), with each recipient's values filled in.

Most of what a render computes is the same for every message of a milestone: the layouts,
the words, the labels. Only some values differ (the recipient's name, the tracking number,
dates, places, links). The renderer splits a render's context into its *shape* (every value
that is not such a text, which text is empty, and how long each one is) and its *slots* (the
non-empty texts), renders the templates once with a sentinel in place of each slot, and cuts
the outputs at the sentinels. The next message of the same shape only joins the pieces with
its own values: byte for byte what rendering it would have made, because of three rules.

- **The templates only print a slot.** The skeleton is rendered in a tracing sandbox, whose
  every other way to look at a value (an attribute, an item, a comparison, a test, a filter,
  a call, a loop over it, an operator, a translation that formats it with a width, printing
  a list that holds it) raises ``Tainted``: such a shape is never cached and every message
  of it is rendered in full. Printing escapes a value or not; a sentinel holds an ``&``, so
  how many times it was escaped shows in the output (``&amp;``), and the fill escapes the
  value as many times.
- **The outputs hold every sentinel whole.** Anything else (a sentinel cut, repeated
  partly, a marker character in a template or a catalog) makes the shape uncacheable.
- **The limits hold.** Each sentinel is at least as long as its value escaped (the widths
  are part of the shape), so everything the skeleton's render built was at least as big as
  what the message's own render would build: a skeleton rendered within the render limits
  means the message would have been too. Its render has a budget of its own.

A skeleton cache is bounded (least recently built first out) and dropped, for a merchant or
all, exactly when the renderer drops its templates and brands (``forget``, ``refresh``).
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any

from jinja2 import nodes
from jinja2.compiler import Frame
from jinja2.runtime import Context, Macro
from markupsafe import escape

from notifier.render import limits
from notifier.render.limits import LimitedGenerator
from notifier.render.sandbox import Sandbox, Translate

#: A sentinel: OPEN, the slot's number (base 36), "&", PAD up to its width, CLOSE.
OPEN, PAD, CLOSE = "\ue000", "\ue001", "\ue002"
MARKS = re.compile("[\ue000-\ue002]")
_SENTINEL = re.compile("\ue000([0-9a-z]{1,4})&((?:amp;)*)(\ue001*)\ue002")
#: A sentinel's width: longer values (rare) get the next power of two. Every value is the
#: same width, so widths do not multiply the shapes.
WIDTH = 256
#: Values this short are narrower than WIDTH however they are escaped (6 for 1 at most).
_SHORT = WIDTH // 6
#: What cannot be a slot: a marker character, white space at either end (``strip``).
_NO_SLOT = re.compile(r"^\s|\s$|[\ue000-\ue002]")
#: Filters and tests that take a value as it is: what they give is the value, escaped or
#: not, or a wrapper around it; any other (``|upper``, ``|length``, ``is lower``) taints.
OPAQUE_FILTERS = frozenset(
    {"e", "escape", "forceescape", "safe", "string", "isolate", "ltr", "default", "d"}
)
OPAQUE_TESTS = frozenset({"defined", "undefined", "none", "string"})
#: A translation's conversions that print a value as it is (no width, precision or repr).
_PLAIN_PERCENT = re.compile(r"%%|%\([^)]*\)s")
#: Context entries not walked: the brand's (the same for every message of a merchant, whose
#: brand is in the key), and the US opt-out line (a key of its own, so that an event's email
#: and SMS share their shape).
MERCHANT_ENTRIES = frozenset({"brand", "support", "us_opt_out"})
#: Texts that choose what a template does (directions, template names, step states):
#: part of the shape, never slots.
SHAPE_TEXTS = frozenset(
    {"lang", "dir", "fonts", "message", "message_for_locale", "key", "state", "status"}
    | {"exception_code", "variant"}
)
#: How many skeletons a renderer keeps: an email's is about 13 KB with its inlined HTML (an
#: SMS' a few hundred bytes), so at most about 13 MB; the bench's workload (4 merchants, 13
#: locales, every milestone, email and SMS) makes 200-400 shapes.
MAX_SKELETONS = 1024


class Tainted(Exception):
    """A template looked at a slot's value: this shape is rendered in full every time."""


def carries(value: Any, depth: int = 0) -> bool:
    """Whether ``value`` holds a sentinel (or part of one), however deep."""
    if isinstance(value, str):
        return MARKS.search(value) is not None
    if depth > 40:
        return True  # deeper than any context: do not trust it
    if isinstance(value, dict):
        return any(carries(k, depth + 1) or carries(v, depth + 1) for k, v in value.items())
    if isinstance(value, list | tuple | set | frozenset):
        return any(carries(x, depth + 1) for x in value)
    return False


def _check(*values: Any) -> None:
    for value in values:
        if carries(value):
            raise Tainted


def sentinel(index: int, width: int) -> str:
    number = _base36(index)
    return f"{OPEN}{number}&{PAD * (width - len(number) - 3)}{CLOSE}"


def _base36(i: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = digits[i % 36]
    while i >= 36:
        i //= 36
        out = digits[i % 36] + out
    return out


def width_of(value: str) -> int:
    """A power of two, at least WIDTH, at least as long as the value escaped."""
    size = len(escape(value)) if _ESCAPED.search(value) else len(value)
    return WIDTH if size <= WIDTH else 1 << (size - 1).bit_length()


_ESCAPED = re.compile("[&<>\"']")


class _Token:
    """A mark in a shape: a slot (its width next), a dict, a list, their end."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


SLOT, _DICT, _LIST, _END = _Token("<slot>"), _Token("{"), _Token("["), _Token("}")


@dataclass(slots=True)
class Split:
    """A context taken apart: its shape (hashable), and its slots' values; ``lazy`` holds
    the slots computed only when printed (their makers)."""

    shape: tuple[Hashable, ...]
    values: list[str]
    lazy: dict[int, Callable[[], str]]

    def widths(self) -> list[int]:
        """Each slot's sentinel width, in order."""
        shape = self.shape
        return [int(w) for i, w in enumerate(shape) if i and shape[i - 1] is SLOT]  # type: ignore[call-overload]


def fits(value: str, width: int) -> bool:
    """Whether a value computed late can go in a slot of ``width``."""
    if not value:
        return True
    if MARKS.search(value) or value[0].isspace() or value[-1].isspace():
        return False
    return width_of(value) <= width


def split(ctx: dict[str, Any], lazy_type: type) -> Split | None:
    """The shape and slots of a render context; None when a value cannot be a slot (it
    holds a marker character, or starts or ends with white space a ``strip`` would
    remove)."""
    walker = _Walker(lazy_type)
    for key, value in ctx.items():
        if key in MERCHANT_ENTRIES:
            continue
        walker.shape.append(key)
        if not walker.walk(value, key in SHAPE_TEXTS):
            return None
    return Split(tuple(walker.shape), walker.values, walker.lazies)


class _Walker:
    __slots__ = ("lazies", "lazy_type", "shape", "values")

    def __init__(self, lazy_type: type) -> None:
        self.shape: list[Any] = []
        self.values: list[str] = []
        self.lazies: dict[int, Callable[[], str]] = {}
        self.lazy_type = lazy_type

    def walk(self, value: Any, fixed: bool) -> bool:
        kind = type(value)
        add = self.shape.append
        if kind is str:
            if not value or fixed:
                add(value)
                return True
            if _NO_SLOT.search(value):
                return False
            add(SLOT)
            add(WIDTH if len(value) <= _SHORT else width_of(value))
            self.values.append(value)
            return True
        if kind is dict:
            add(_DICT)
            for k, v in value.items():
                add(k)
                if v is None or (type(v) is str and (not v or k in SHAPE_TEXTS)):
                    add(v)  # the common leaves, without a call
                elif not self.walk(v, k in SHAPE_TEXTS):
                    return False
            add(_END)
            return True
        if kind is list:
            add(_LIST)
            if not all(self.walk(v, False) for v in value):
                return False
            add(_END)
            return True
        return self.other(value, kind)

    def other(self, value: Any, kind: type) -> bool:
        add = self.shape.append
        if kind is self.lazy_type:
            add(SLOT)
            add(WIDTH)
            self.lazies[len(self.values)] = value.__str__
            self.values.append("")
            return True
        if value is None:
            add(None)
            return True
        if kind is bool or kind is int or isinstance(value, str):
            add(kind)  # True and 1 are equal, but not the same shape
            add(value)
            return True
        return False  # anything else: not a context this module knows


def tracing_context(ctx: dict[str, Any], parts: Split, lazy_type: type) -> dict[str, Any]:
    """``ctx`` with a sentinel in place of each slot (walked in ``split``'s order)."""
    widths = parts.widths()
    counter = iter(range(len(parts.values)))

    def swap(value: Any, fixed: bool) -> Any:
        kind = type(value)
        if (kind is str and value and not fixed) or kind is lazy_type:
            i = next(counter)
            return sentinel(i, widths[i])
        if kind is dict:
            return {k: swap(v, k in SHAPE_TEXTS) for k, v in value.items()}
        if kind is list:
            return [swap(v, False) for v in value]
        return value

    return {k: v if k in MERCHANT_ENTRIES else swap(v, k in SHAPE_TEXTS) for k, v in ctx.items()}


#: A skeleton's piece: literal text, then the slot printed after it (-1: none) and how its
#: value is written there (a form below).
Piece = tuple[str, int, int]
#: How a slot's value is written where its sentinel was: as it is, escaped (by a template),
#: or as the CSS inliner writes HTML text and attribute values back (html5ever's rules).
RAW, ESCAPED, HTML_TEXT, HTML_ATTR = 0, 1, 2, 3


def written(value: str, form: int) -> str:
    """``value`` as a piece of form ``form`` writes it."""
    if form == ESCAPED:
        return str(escape(value))
    value = value.replace("&", "&amp;").replace("\xa0", "&nbsp;")
    if form == HTML_TEXT:
        return value.replace("<", "&lt;").replace(">", "&gt;")
    return value.replace('"', "&quot;")


def cut(text: str, widths: list[int]) -> tuple[Piece, ...]:
    """``text`` cut at its sentinels; Tainted unless each is whole and escaped at most once."""
    pieces: list[Piece] = []
    pos = 0
    for m in _SENTINEL.finditer(text):
        literal = text[pos : m.start()]
        index = int(m[1], 36)
        depth = len(m[2]) // 4
        if MARKS.search(literal) or index >= len(widths) or depth > 1:
            raise Tainted
        if len(m[0]) != widths[index] + 4 * depth:
            raise Tainted
        pieces.append((literal, index, ESCAPED if depth else RAW))
        pos = m.end()
    return _with_tail(pieces, text[pos:])


def _with_tail(pieces: list[Piece], tail: str) -> tuple[Piece, ...]:
    if MARKS.search(tail):
        raise Tainted
    pieces.append((tail, -1, RAW))
    return tuple(pieces)


def fill(pieces: tuple[Piece, ...], values: list[str], cache: dict[tuple[int, int], str]) -> str:
    """The pieces joined with the values, each written in its piece's form (``cache``
    keeps the escaped forms for the message's other parts)."""
    out: list[str] = []
    for literal, index, form in pieces:
        out.append(literal)
        if index < 0:
            continue
        if form:
            w = cache.get((index, form))
            if w is None:
                w = cache[(index, form)] = written(values[index], form)
            out.append(w)
        else:
            out.append(values[index])
    return "".join(out)


# --- the email's HTML with its CSS inlined, as a skeleton too ------------------------------
#
# The CSS inliner parses the HTML and writes it back: a value escaped by a template comes
# back written by the inliner's own rules, which differ in text and in attributes. A probe
# holds '&<"', which the two write differently, so the inlined skeleton knows which is which.
# Only HTML whose every slot is escaped, whose CSS has no attribute selector (which could
# match a value), and only values the HTML parser reads back unchanged (no CR, NUL, other
# C0 controls or lone surrogates) use it; otherwise each message is inlined as before.

_PROBED = re.compile('\ue000([0-9a-z]{1,4})(&amp;&lt;"|&amp;<&quot;)\ue001{4}\ue002')
_STYLE = re.compile(r"<style\b[^>]*>(.*?)</style", re.IGNORECASE | re.DOTALL)
_NOT_HTML = re.compile("[\x00-\x08\x0b-\x1f\x7f\ud800-\udfff]")


def probe_value(index: int) -> str:
    return f'{OPEN}{_base36(index)}&<"{PAD * 4}{CLOSE}'


def inlinable(pieces: tuple[Piece, ...]) -> bool:
    """Whether HTML cut into ``pieces`` can be inlined once for all its messages."""
    if any(index >= 0 and form != ESCAPED for _, index, form in pieces):
        return False
    literal = "".join(text for text, _, _ in pieces)
    return not any("[" in css for css in _STYLE.findall(literal))


def cut_inlined(text: str, count: int) -> tuple[Piece, ...]:
    """The inliner's output of the probed HTML, cut at its probes."""
    pieces: list[Piece] = []
    pos = 0
    for m in _PROBED.finditer(text):
        literal = text[pos : m.start()]
        index = int(m[1], 36)
        if MARKS.search(literal) or index >= count:
            raise Tainted
        pieces.append((literal, index, HTML_TEXT if m[2] == '&amp;&lt;"' else HTML_ATTR))
        pos = m.end()
    return _with_tail(pieces, text[pos:])


def html_safe(values: list[str], used: frozenset[int]) -> bool:
    """Whether the HTML parser reads each value back as it is."""
    return not any(_NOT_HTML.search(values[i]) for i in used)


@dataclass(frozen=True, slots=True)
class Skeleton:
    """A message rendered with sentinels, cut: ``parts`` by name (``subject``, ``html``…),
    the slots it prints, and whether it reads right to left."""

    parts: dict[str, tuple[Piece, ...]]
    used: frozenset[int]
    rtl: bool


#: What the cache holds for a shape whose templates look at a value.
UNCACHEABLE = object()


class Skeletons:
    """A bounded cache of skeletons by key (its first item: the templates' search path)."""

    def __init__(self, size: int = MAX_SKELETONS) -> None:
        self.size = size
        self._items: OrderedDict[tuple[Hashable, ...], object] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: tuple[Hashable, ...]) -> object | None:
        found = self._items.get(key)
        if found is None:
            self.misses += 1
        else:
            self.hits += 1
        return found

    def put(self, key: tuple[Hashable, ...], skeleton: object) -> None:
        with self._lock:
            self._items[key] = skeleton
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def forget(self, search: tuple[str, ...]) -> None:
        """Drop the skeletons of a search path (a merchant's published files changed:
        the path stays the same, the files do not)."""
        with self._lock:
            for key in [k for k in self._items if k[0] == search]:
                del self._items[key]


# --- the tracing sandbox: every look at a value raises Tainted ---------------------------


def iterate(iterable: Iterable[Any]) -> Iterable[Any]:
    """What a traced ``{% for %}`` iterates: never the characters of a slot."""
    if isinstance(iterable, str) and MARKS.search(iterable):
        raise Tainted
    return limits.iterate(iterable)


def probe(value: Any) -> Any:
    """A comparison's operand: never a value that holds a slot."""
    if carries(value):
        raise Tainted
    return value


def printed(value: Any) -> Any:
    """Every printed value (the environment's finalize): text as it is, but not a list or
    a dict that holds a slot (printed as its repr, which quotes and escapes)."""
    if not isinstance(value, str) and carries(value):
        raise Tainted
    return value


class TracingGenerator(LimitedGenerator):
    """The limited code generator, with every comparison's operands probed."""

    iterate_name = f"{__name__}.iterate"

    def visit_Compare(self, node: nodes.Compare, frame: Frame) -> None:
        self.write("(environment.probe(")
        self.visit(node.expr, frame)
        self.write(")")
        for op in node.ops:
            self.write(f" {_OPERATORS[op.op]} environment.probe(")
            self.visit(op.expr, frame)
            self.write(")")
        self.write(")")


_OPERATORS = {
    "eq": "==",
    "ne": "!=",
    "gt": ">",
    "gteq": ">=",
    "lt": "<",
    "lteq": "<=",
    "in": "in",
    "notin": "not in",
}


def _guarded(name: str, func: Callable[..., Any], opaque: frozenset[str]) -> Any:
    skip = 1 if getattr(func, "jinja_pass_arg", None) is not None else 0

    def guarded(*args: Any, **kwargs: Any) -> Any:
        if name in opaque:  # the value as it is; its other arguments must not be slots
            _check(*args[skip + 1 :], *kwargs.values())
        else:
            _check(*args[skip:], *kwargs.values())
        return func(*args, **kwargs)

    if skip:
        guarded.jinja_pass_arg = func.jinja_pass_arg  # type: ignore[attr-defined]
    return guarded


class TracingSandbox(Sandbox):
    """The sandbox a skeleton is rendered in: the same templates, filters and limits, and a
    check wherever a template could look at a value (see the module's doc)."""

    code_generator_class = TracingGenerator

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, finalize=printed, **kwargs)
        self.probe = probe
        self.filters = {n: _guarded(n, f, OPAQUE_FILTERS) for n, f in self.filters.items()}
        self.tests = {n: _guarded(n, t, OPAQUE_TESTS) for n, t in self.tests.items()}  # type: ignore[arg-type]

    def getattr(self, obj: Any, attribute: str) -> Any:
        if isinstance(obj, str) and MARKS.search(obj):
            raise Tainted
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _check(argument)
        if isinstance(obj, str) and MARKS.search(obj):
            raise Tainted
        return super().getitem(obj, argument)

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        kind = type(__obj)
        if kind is Translate:
            _check(*args)
            if any(carries(v) for v in kwargs.values()):
                if any(not isinstance(v, str) and carries(v) for v in kwargs.values()):
                    raise Tainted
                if "%" in _PLAIN_PERCENT.sub("", __obj.func(*args)):
                    raise Tainted  # a width, a precision or a repr of a value
        elif kind is not Macro and __obj is not iterate:  # a loop's items may be slots
            _check(__obj, *args, *kwargs.values())
        return super().call(__context, __obj, *args, **kwargs)

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        if operator != "+":
            _check(left, right)
        return super().call_binop(context, operator, left, right)

    def str_join(self, seq: Iterable[Any]) -> str:
        return super().str_join(_joinable(seq))

    def markup_join(self, seq: Iterable[Any]) -> str:
        return super().markup_join(_joinable(seq))


def _joinable(seq: Iterable[Any]) -> list[Any]:
    """``a ~ b``'s operands: text, or anything that holds no slot (str() of a list is
    its repr)."""
    items = list(seq)
    for x in items:
        printed(x)
    return items
