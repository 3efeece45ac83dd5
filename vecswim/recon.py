"""Recon, the text format of SwimOS's WARP protocol: a parser and writers.

Recon values are absent, extant, booleans, numbers, text (identifiers or quoted strings),
data (``%base64``) and records: ordered items, each an attribute ``@name(args)``, a slot
``key:value`` or a plain value. ``@update(key:7){temp:81.5}`` is the record
``[Attr("update", {key: 7}), Slot("temp", 81.5)]``: a block after attributes is spliced in.

Here a record is a :class:`Record` (a list of :class:`Attr`, :class:`Slot` and values),
absent is ``None`` and extant is :data:`EXTANT`. ``parse`` reads one document (a block: one
item is that item, several are a record) and raises :class:`ReconError` with the position on
malformed text; it recurses at most ``MAX_DEPTH`` levels and refuses deeper input, so a
hostile message costs O(its length). ``write`` is the inverse for the values
vecswim sends; :func:`text` and :func:`number` are the building blocks the vectorized
encoders in ``vecswim.live`` reuse for one value.

Floats are written positionally (``300000.0``, never ``3e5``) because the SwimOS Python
client's parser reads no exponents. Non-finite floats are written ``nan``, ``inf`` and
``-inf`` (as swim-rust reads them; the SwimOS Python client reads the first two as text and
cannot parse the third).
"""

from __future__ import annotations

import base64
import math
import re
from dataclasses import dataclass

import numpy as np

MAX_DEPTH = 64


class ReconError(ValueError):
    """Malformed Recon text; the message says what and where."""


class _Extant:
    __slots__ = ()

    def __repr__(self) -> str:
        return "EXTANT"


EXTANT = _Extant()


@dataclass(frozen=True)
class Attr:
    """An attribute ``@name`` (value extant) or ``@name(value)``."""

    name: str
    value: object = EXTANT


@dataclass(frozen=True)
class Slot:
    """A keyed item ``key:value``."""

    key: object
    value: object


class Record(list):
    """An ordered list of items: :class:`Attr`, :class:`Slot` or plain values."""

    @property
    def tag(self) -> str | None:
        """The name of the first attribute, if the record starts with one."""
        return self[0].name if self and isinstance(self[0], Attr) else None

    def get(self, key: object, default: object = None) -> object:
        """The value of the first slot named ``key``."""
        for item in self:
            if isinstance(item, Slot) and item.key == key:
                return item.value
        return default

    def body(self) -> object:
        """The items after the first attribute as a value: nothing is absent, one plain
        value is that value, anything else a record."""
        rest = Record(self[1:])
        if not rest:
            return None
        if len(rest) == 1 and not isinstance(rest[0], Attr | Slot):
            return rest[0]
        return rest


_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*\Z")
_IDENT_START = re.compile(r"[A-Za-z_]")
_IDENT_CHARS = re.compile(r"[A-Za-z0-9_\-.]*")
_NUMBER = re.compile(r"-?(?:0x[0-9a-fA-F]+|[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)")
_DATA = re.compile(r"[A-Za-z0-9+/=]*")
_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "@": "@", "{": "{", "}": "}", "[": "[", "]": "]"}
_ESCAPES.update({"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"})


def parse(text: str) -> object:
    """The value of one Recon document. Raises :class:`ReconError`."""
    p = _Parser(text)
    items = p.block(end=None)
    if p.i != len(text):
        p.fail("unexpected character")
    return _block_value(items)


def _block_value(items: list) -> object:
    if not items:
        return None
    if len(items) == 1 and not isinstance(items[0], Slot):
        return items[0]
    return Record(items)


class _Parser:
    def __init__(self, text: str) -> None:
        self.s = text
        self.i = 0
        self.depth = 0

    def fail(self, what: str) -> None:
        near = self.s[self.i : self.i + 20]
        raise ReconError(f"{what} at offset {self.i} (near {near!r})" if near else f"{what} at end")

    def space(self, newlines: bool = True) -> None:
        s, i = self.s, self.i
        while i < len(s) and (s[i] in " \t" or (newlines and s[i] in "\r\n")):
            i += 1
        self.i = i

    def peek(self) -> str:
        return self.s[self.i] if self.i < len(self.s) else ""

    def block(self, end: str | None) -> list:
        """Items separated by ``,``, ``;`` or newlines, up to ``end`` (not consumed)."""
        self.depth += 1
        if self.depth > MAX_DEPTH:
            self.fail(f"nesting deeper than {MAX_DEPTH}")
        items: list = []
        while True:
            self.space()
            c = self.peek()
            if c == "" or c == end:
                break
            items.append(self.item())
            self.space(newlines=False)
            c = self.peek()
            if c in (",", ";", "\n", "\r"):
                self.i += 1
            elif c != "" and c != end:
                self.fail("expected ',' or the end of the block")
        self.depth -= 1
        return items

    def item(self) -> object:
        key = self.value()
        self.space(newlines=False)
        if self.peek() == ":":
            self.i += 1
            self.space(newlines=False)
            c = self.peek()
            value = EXTANT if c in ("", ",", ";", "\n", "\r", "}", ")") else self.value()
            return Slot(key, value)
        return key

    def value(self) -> object:
        attrs: list = []
        while self.peek() == "@":
            attrs.append(self.attr())
            self.space(newlines=False)
        c = self.peek()
        lit: object = _NOTHING
        if c == "{":
            self.i += 1
            inner = self.block("}")
            if self.peek() != "}":
                self.fail("expected '}'")
            self.i += 1
            if attrs:
                return Record(attrs + inner)
            return Record(inner)
        if c and c not in ",;\n\r})@:":
            lit = self.literal()
        if not attrs:
            if lit is _NOTHING:
                self.fail("expected a value")
            return lit
        rec = Record(attrs)
        if lit is not _NOTHING:
            rec.append(lit)
        return rec

    def attr(self) -> Attr:
        self.i += 1  # '@'
        if self.peek() == '"':
            name = self.string()
        else:
            m = _IDENT_CHARS.match(self.s, self.i)
            if not _IDENT_START.match(self.peek()):
                self.fail("expected an attribute name")
            name = m.group()
            self.i = m.end()
        if self.peek() != "(":
            return Attr(name)
        self.i += 1
        inner = self.block(")")
        if self.peek() != ")":
            self.fail("expected ')'")
        self.i += 1
        return Attr(name, EXTANT if not inner else _block_value(inner))

    def literal(self) -> object:
        c = self.peek()
        if c == '"' or c == "'":
            return self.string()
        if c == "%":
            self.i += 1
            m = _DATA.match(self.s, self.i)
            self.i = m.end()
            try:
                return base64.b64decode(m.group(), validate=True)
            except ValueError:
                self.fail("bad base64 data")
        if c == "-" or c.isdigit():
            if self.s.startswith("-inf", self.i) and not _more_ident(self.s, self.i + 4):
                self.i += 4
                return -math.inf
            m = _NUMBER.match(self.s, self.i)
            if m is None:
                self.fail("bad number")
            self.i = m.end()
            t = m.group()
            if "x" in t:
                return int(t, 16)
            return float(t) if ("." in t or "e" in t or "E" in t) else int(t)
        if _IDENT_START.match(c):
            m = _IDENT_CHARS.match(self.s, self.i)
            self.i = m.end()
            word = m.group()
            return {"true": True, "false": False, "nan": math.nan, "inf": math.inf}.get(word, word)
        self.fail("unexpected character")
        raise AssertionError("unreachable")

    def string(self) -> str:
        quote = self.s[self.i]
        s = self.s
        i = self.i + 1
        out: list[str] = []
        start = i
        while True:
            j = s.find(quote, i)
            k = s.find("\\", i, j if j >= 0 else len(s))
            if j < 0:
                self.i = len(s)
                self.fail("unterminated string")
            if k < 0:
                out.append(s[start:j])
                self.i = j + 1
                return "".join(out)
            out.append(s[start:k])
            esc = s[k + 1 : k + 2]
            if esc == "u":
                hexa = s[k + 2 : k + 6]
                if not re.fullmatch(r"[0-9a-fA-F]{4}", hexa):
                    self.i = k
                    self.fail("bad \\u escape")
                out.append(chr(int(hexa, 16)))
                i = start = k + 6
            elif esc in _ESCAPES or esc == quote:
                out.append(_ESCAPES.get(esc, esc))
                i = start = k + 2
            else:
                self.i = k
                self.fail("bad escape")


class _Nothing:
    __slots__ = ()


_NOTHING = _Nothing()


def _more_ident(s: str, i: int) -> bool:
    return i < len(s) and (s[i].isalnum() or s[i] in "_-")


# -- writing -------------------------------------------------------------------------------

_NEEDS_ESCAPE = re.compile(r'["\\\x00-\x1f]')


def text(s: str) -> str:
    """``s`` as Recon text: an identifier if it is one (and not a keyword), else quoted."""
    if _IDENT.match(s) and s not in ("true", "false", "nan", "inf"):
        return s
    return quote(s)


def quote(s: str) -> str:
    """``s`` as a quoted Recon string."""
    if _NEEDS_ESCAPE.search(s) is None:
        return f'"{s}"'
    return '"' + _NEEDS_ESCAPE.sub(_escape, s) + '"'


def _escape(m: re.Match) -> str:
    c = m.group()
    return {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(
        c, f"\\u{ord(c):04x}"
    )


def number(v: float | int) -> str:
    """A number in positional notation, shortest round-trip digits of its own precision (a
    numpy float32 gives float32 digits); non-finite floats as ``nan``/``inf``/``-inf``."""
    if isinstance(v, bool | np.bool_):
        return "true" if v else "false"
    if isinstance(v, int | np.integer):
        return str(int(v))
    if not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    r = repr(float(v)) if not isinstance(v, np.floating) else str(v)
    if "e" in r or "E" in r:
        r = np.format_float_positional(v, unique=True, trim="0")
    return r


def write(v: object) -> str:
    """``v`` (a value as :func:`parse` returns it, or a dict as a record of slots) as
    Recon."""
    if v is None:
        return ""
    if v is EXTANT:
        return ""
    if isinstance(v, bool | np.bool_):
        return "true" if v else "false"
    if isinstance(v, int | float | np.integer | np.floating):
        return number(v)
    if isinstance(v, str):
        return text(v)
    if isinstance(v, bytes):
        return "%" + base64.b64encode(v).decode()
    if isinstance(v, dict):
        return "{" + ",".join(f"{write_key(k)}:{write(x)}" for k, x in v.items()) + "}"
    if isinstance(v, Attr):
        return _write_attr(v)
    if isinstance(v, list):
        attrs = []
        rest = []
        for item in v:
            (attrs if isinstance(item, Attr) and not rest else rest).append(item)
        head = "".join(_write_attr(a) for a in attrs)
        if not rest:
            return head or "{}"
        if len(rest) == 1 and attrs and not isinstance(rest[0], Slot | Attr | list | dict):
            return head + write(rest[0])
        return head + "{" + ",".join(_write_item(x) for x in rest) + "}"
    raise TypeError(f"cannot write {type(v).__name__} as Recon")


def write_key(k: object) -> str:
    return write(k) if not isinstance(k, str) else text(k)


def _write_item(x: object) -> str:
    if isinstance(x, Slot):
        return f"{write_key(x.key)}:{write(x.value)}"
    return write(x)


def _write_attr(a: Attr) -> str:
    if a.value is EXTANT:
        return f"@{text(a.name)}"
    if isinstance(a.value, Record) and not a.value.tag:
        return f"@{text(a.name)}(" + ",".join(_write_item(x) for x in a.value) + ")"
    if isinstance(a.value, dict):
        return f"@{text(a.name)}(" + write(a.value)[1:-1] + ")"
    return f"@{text(a.name)}({write(a.value)})"


def envelope(tag: str, node: str, lane: str, body: str = "") -> str:
    """A WARP envelope ``@tag(node:...,lane:...)body`` with ``body`` already Recon."""
    return f"@{tag}(node:{text(node)},lane:{text(lane)}){body}"
