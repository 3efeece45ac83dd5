"""Declaring agent types, their event rules, links and aggregates (the public schema API).

An **agent type** names a key and a list of state columns. A column may carry an event
**rule** (how an event changes it) and an **emit** setting (whether and beyond which deadband a
change leaves the engine). A **link** relates a child agent type to a parent agent type and
declares the parent's aggregate columns over its children and the columns it broadcasts down.

Everything here is plain, immutable description; the engine compiles it into tables and
kernel calls once, at construction.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

# Column dtypes, in the order docs and generators list them.
DTYPES = (
    "float32",
    "float64",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "bool",
)


# Names the engine uses itself in emitted rows and for its own per-agent columns.
RESERVED = frozenset({"tick"})

# Event rules defined on each dtype kind (float, signed, unsigned, bool). mean and ewma are
# float arithmetic; an integer column would truncate them, so they are refused there.
RULES_BY_KIND = {
    "f": {"latest", "sum", "count", "min", "max", "mean", "ewma", "hysteresis"},
    "i": {"latest", "sum", "count", "min", "max", "hysteresis"},
    "u": {"latest", "sum", "count", "min", "max", "hysteresis"},
    "b": {"latest", "hysteresis"},
}
# Rules whose input is read in the column's own dtype; the others read float64.
SAME_DTYPE_RULES = ("latest", "sum", "min", "max")


def representable(value: object, dtype: np.dtype) -> bool:
    """``value`` is exactly a value of ``dtype`` (NaN/inf only for floats, integers in range,
    0/1 for bool)."""
    if isinstance(value, bool | np.bool_):
        return True
    if not isinstance(value, int | float | np.integer | np.floating):
        return False
    if dtype.kind == "f":
        return True
    if isinstance(value, float | np.floating):
        if not math.isfinite(value) or value != math.floor(value):
            return False
        value = int(value)
    if dtype.kind == "b":
        return value in (0, 1)
    info = np.iinfo(dtype)
    return info.min <= int(value) <= info.max


def castable(src: np.dtype | str, dst: np.dtype | str) -> bool:
    """Whether a ``src`` value may be stored in a ``dst`` column: exactly (integers into
    integers that hold every value, bool into numbers) or by IEEE rounding to nearest (any
    number into a float). Never float -> integer/bool, never narrowing integers, never strings
    into numbers."""
    if "string" in (str(src), str(dst)):
        return src == dst
    src, dst = np.dtype(src), np.dtype(dst)
    if src == dst or dst.kind == "f":
        return True
    if dst.kind == "b" or src.kind == "f":
        return False
    return np.can_cast(src, dst, "safe")


@dataclass(frozen=True)
class State:
    """Reference to another state column's per-event value (its trace) as a rule input."""

    column: str


def state(column: str) -> State:
    """Use the value of state column ``column`` right after each event as a rule input,
    e.g. ``hysteresis(state("level"), up=35, down=30)`` switches on the smoothed level."""
    return State(column)


Input = str | State


@dataclass(frozen=True)
class Rule:
    """How events change one state column. Build with the functions below, not directly."""

    kind: str
    input: Input | None = None
    params: tuple = ()


def latest(field: Input) -> Rule:
    """Column takes the event's value (last event of the tick wins, in arrival order)."""
    return Rule("latest", field)


def sum(field: Input) -> Rule:
    """Column accumulates the event values."""
    return Rule("sum", field)


def count() -> Rule:
    """Column counts the events addressed to the agent."""
    return Rule("count")


def min(field: Input) -> Rule:
    """Column keeps the smallest event value seen (initial NaN = none yet)."""
    return Rule("min", field)


def max(field: Input) -> Rule:
    """Column keeps the largest event value seen (initial NaN = none yet)."""
    return Rule("max", field)


def mean(field: Input) -> Rule:
    """Column keeps the running mean of all event values (adds a hidden count column)."""
    return Rule("mean", field)


def ewma(field: Input, alpha: float) -> Rule:
    """Exponentially weighted moving average, ``col += alpha * (x - col)``; starts at the
    first value (initial must be NaN)."""
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"ewma alpha must be in (0, 1], got {alpha}")
    return Rule("ewma", field, (float(alpha),))


def hysteresis(field: Input, up: float, down: float, low: int = 0, high: int = 1) -> Rule:
    """Two-state status: ``low`` -> ``high`` when the input rises above ``up``,
    ``high`` -> ``low`` when it falls below ``down``. Needs ``down <= up``."""
    if down > up:
        raise ValueError(f"hysteresis needs down <= up, got up={up} down={down}")
    return Rule("hysteresis", field, (float(up), float(down), int(low), int(high)))


@dataclass(frozen=True)
class Custom:
    """A user ``@njit`` event kernel that updates several state columns at once.

    The engine calls ``fn(rows, *inputs, *outputs, *params)`` once per tick with
    ``rows[i]`` = agent row of event ``i`` (arrival order), each input an event-aligned array
    (event field or ``state(...)`` trace), each output a whole state column to update in
    place at ``rows[i]``. The kernel must mark nothing and allocate nothing per event.
    """

    fn: Callable
    inputs: tuple[Input, ...]
    outputs: tuple[str, ...]
    params: tuple = ()


def custom(
    fn: Callable, inputs: Sequence[Input], outputs: Sequence[str], params: Sequence = ()
) -> Custom:
    """Register a user event kernel; see :class:`Custom` for the calling convention."""
    return Custom(fn, tuple(inputs), tuple(outputs), tuple(params))


@dataclass(frozen=True)
class Column:
    """One state column.

    ``dtype``: a numpy dtype name (float32, float64, int8..int64, uint8..uint32, bool).
    ``rule``: how events change it (None: set by a custom kernel, a link, or never).
    ``initial``: value of a new agent (default 0 for sum/count rules and non-float columns,
    NaN for other float columns: "no value yet").
    ``emit``: False (never emitted), True (any change is emitted) or a float deadband
    (emitted when it moved strictly more than that since its last emission).
    """

    name: str
    dtype: str = "float32"
    rule: Rule | None = None
    initial: float | int | None = None
    emit: bool | float = False

    def __post_init__(self) -> None:
        where = f"column {self.name!r}"
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"column name must be a non-empty string, got {self.name!r}")
        if self.name in RESERVED or self.name.startswith("__"):
            raise ValueError(f"{where}: the name is reserved (tick, __*)")
        if self.dtype not in DTYPES:
            raise ValueError(f"{where}: unsupported dtype {self.dtype!r}")
        if not isinstance(self.emit, bool) and (
            not isinstance(self.emit, int | float) or not self.emit >= 0
        ):
            raise ValueError(f"{where}: deadband must be True, False or a number >= 0")
        kind = self.np_dtype.kind
        rule = self.rule
        if rule is not None:
            if not isinstance(rule, Rule):
                raise ValueError(f"{where}: rule must be built with vecswim.latest/sum/...")
            allowed = RULES_BY_KIND[kind]
            if rule.kind not in allowed:
                raise ValueError(
                    f"{where}: rule {rule.kind} is not defined on {self.dtype} columns "
                    f"(allowed: {', '.join(sorted(allowed))})"
                )
            if rule.kind == "hysteresis":
                for what in ("low", "high"):
                    v = rule.params[2 if what == "low" else 3]
                    if not representable(v, self.np_dtype):
                        raise ValueError(f"{where}: hysteresis {what}={v!r} is not a {self.dtype}")
                if self.initial is not None and self.initial not in rule.params[2:]:
                    raise ValueError(
                        f"{where}: a hysteresis column starts at its low or high state"
                    )
        if self.initial is not None and not representable(self.initial, self.np_dtype):
            raise ValueError(f"{where}: initial {self.initial!r} is not a {self.dtype} value")

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    @property
    def initial_value(self) -> float | int:
        """A new agent's value: ``initial`` if given; else 0 for sum/count, the low state for
        hysteresis, the dtype's largest/smallest value for min/max on integers (the identity:
        "no value yet"), NaN for other float columns and 0 for other integer/bool columns."""
        if self.initial is not None:
            return self.initial
        kind = None if self.rule is None else self.rule.kind
        if kind in ("sum", "count"):
            return 0
        if kind == "hysteresis":
            return self.rule.params[2]
        if self.np_dtype.kind in "iu" and kind in ("min", "max"):
            info = np.iinfo(self.np_dtype)
            return int(info.max if kind == "min" else info.min)
        return math.nan if self.np_dtype.kind == "f" else 0

    @property
    def deadband(self) -> float | None:
        """None if not emitted; 0.0 for 'any change'."""
        if self.emit is False:
            return None
        return 0.0 if self.emit is True else float(self.emit)


@dataclass(frozen=True)
class AgentType:
    """A schema: one state table per agent type.

    ``key``: name of the key column (and of the event field that addresses the agent).
    ``key_dtype``: "int64" or "string" (string keys are dictionary-encoded in bulk).
    ``kernels``: custom event kernels, run after the column rules, in order.
    ``fields``: dtypes of event fields, declared when the rules don't imply one (fields only
    custom kernels read) or when columns of different dtypes read one field; see
    :meth:`event_fields`.
    """

    name: str
    key: str
    columns: tuple[Column, ...]
    key_dtype: str = "int64"
    kernels: tuple[Custom, ...] = ()
    fields: Mapping[str, str] = field(default_factory=dict)

    def __init__(
        self,
        name: str,
        key: str,
        columns: Sequence[Column],
        key_dtype: str = "int64",
        kernels: Sequence[Custom] = (),
        fields: Mapping[str, str] | None = None,
    ) -> None:
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "key", key)
        object.__setattr__(self, "columns", tuple(columns))
        object.__setattr__(self, "key_dtype", key_dtype)
        object.__setattr__(self, "kernels", tuple(kernels))
        object.__setattr__(self, "fields", dict(fields or {}))
        self._validate()

    def _validate(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(f"agent type name {self.name!r} must be an identifier")
        if self.key_dtype not in ("int64", "string"):
            raise ValueError(f"agent type {self.name!r}: key_dtype must be 'int64' or 'string'")
        if not isinstance(self.key, str) or self.key in RESERVED or self.key.startswith("__"):
            raise ValueError(f"agent type {self.name!r}: key name {self.key!r} is reserved")
        names = [c.name for c in self.columns]
        if len(set(names)) != len(names) or self.key in names:
            raise ValueError(f"agent type {self.name!r}: column names must be unique")
        for name, dt in self.fields.items():
            if dt not in DTYPES and dt != "string":
                raise ValueError(f"agent type {self.name!r}: field {name!r} has dtype {dt!r}")
        for i, c in enumerate(self.columns):
            inp = c.rule.input if c.rule is not None else None
            if isinstance(inp, State):
                if inp.column not in names[:i]:
                    raise ValueError(
                        f"column {c.name!r}: state({inp.column!r}) must name an earlier column"
                    )
                src = self.column(inp.column).np_dtype
                if not castable(src, _reader_dtype(c)):
                    raise ValueError(
                        f"column {c.name!r}: {c.rule.kind} of state({inp.column!r}) would store "
                        f"{src} values in {_reader_dtype(c)}"
                    )
        for k in self.kernels:
            for out in k.outputs:
                if out not in names:
                    raise ValueError(f"custom kernel output {out!r} is not a column")
            for inp in k.inputs:
                if isinstance(inp, State) and inp.column not in names:
                    raise ValueError(f"custom kernel input state({inp.column!r}) is not a column")
        self.event_fields()

    def column(self, name: str) -> Column:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(f"agent type {self.name!r} has no column {name!r}")

    def event_fields(self, forced: Mapping[str, str] | None = None) -> dict[str, np.dtype | str]:
        """Event fields the rules and custom kernels read, with the dtype each is decoded as
        (``"string"`` for string keys).

        A field's dtype is, in this order: fixed from outside (``forced``: a link's ``via``
        field has the parent's key dtype; the key field has ``key_dtype``), declared in
        ``fields``, the dtype of its readers when they agree, or the common dtype of its
        readers (numpy promotion). Every reader must then be able to take it (see
        :func:`castable`); if one can't, this raises ``ValueError`` naming the field.
        """
        fixed: dict[str, set] = {}
        for name, dt in (forced or {}).items():
            fixed.setdefault(name, set()).add(dt)
        for name, dt in self.fields.items():
            fixed.setdefault(name, set()).add(dt)
        readers: dict[str, list[tuple[str, np.dtype]]] = {}
        for c in self.columns:
            if c.rule is not None and isinstance(c.rule.input, str):
                readers.setdefault(c.rule.input, []).append((c.name, _reader_dtype(c)))
        for name in readers:
            if name == self.key:
                fixed.setdefault(name, set()).add(self.key_dtype)
        custom_only = [
            i for k in self.kernels for i in k.inputs if isinstance(i, str) and i not in readers
        ]
        out: dict[str, np.dtype | str] = {}
        for name in list(readers) + custom_only + list(fixed):
            if name in out:
                continue
            if name in fixed:
                if len(fixed[name]) > 1:
                    raise ValueError(
                        f"agent type {self.name!r}: field {name!r} is both "
                        + " and ".join(sorted(map(str, fixed[name])))
                    )
                (dt,) = fixed[name]
                dt = dt if dt == "string" else np.dtype(dt)
            elif name in readers:
                dt = np.result_type(*[r for _, r in readers[name]])
            else:
                dt = np.dtype("float64")
            for col, r in readers.get(name, ()):
                if not castable(dt, r):
                    raise ValueError(
                        f"agent type {self.name!r}: field {name!r} is decoded as {dt} but "
                        f"column {col!r} reads it as {r}; declare fields={{{name!r}: ...}} "
                        "with a dtype every reader can take"
                    )
            out[name] = dt
        return out


def _reader_dtype(c: Column) -> np.dtype:
    """The dtype a column's rule reads its input in: its own for latest/sum/min/max,
    float64 for the float arithmetic of mean/ewma/hysteresis."""
    if c.rule.kind in SAME_DTYPE_RULES:
        return c.np_dtype
    return np.dtype("float64")


@dataclass(frozen=True)
class Agg:
    """A parent column computed over a link's children. Build with ``vecswim.agg``."""

    kind: str
    column: str | None = None
    scale: float = 2.0**16

    def __post_init__(self) -> None:
        if self.kind not in ("count", "sum", "mean", "min", "max"):
            raise ValueError(f"unknown aggregate {self.kind!r}")
        ok = isinstance(self.scale, int | float) and math.isfinite(self.scale) and self.scale > 0
        if not ok:
            raise ValueError(f"aggregate {self.kind}: scale must be a finite number > 0")


@dataclass(frozen=True)
class Link:
    """A directed child -> parent relation between two agent types (CSR adjacency).

    ``via``: the child event field holding the parent key; each event (re)links its child
    (None: links are only set with ``Engine.set_links``).
    ``aggregates``: parent column -> :class:`Agg` over the children's columns.
    ``broadcast``: child context column -> parent column copied down to every child.
    """

    name: str
    child: str
    parent: str
    via: str | None = None
    aggregates: Mapping[str, Agg] = field(default_factory=dict)
    broadcast: Mapping[str, str] = field(default_factory=dict)


def check_links(types: Mapping[str, AgentType], links: Sequence[Link]) -> None:
    """Refuse, with a ``ValueError`` naming the declaration, every link set the engine can't
    compute exactly: unknown types or columns, a column written by two things (a rule, a
    custom kernel, an aggregate, a broadcast), an explicit ``initial`` on an aggregate (a
    parent's aggregate is a function of its children only), dtype pairs that would truncate
    or wrap silently, an aggregate over a broadcast column (its change would arrive after
    propagation), and cycles."""
    names: set[str] = set()
    writer: dict[tuple[str, str], str] = {}
    for at in types.values():
        for c in at.columns:
            if c.rule is not None:
                writer[(at.name, c.name)] = f"its {c.rule.kind} rule"
        for k in at.kernels:
            for o in k.outputs:
                writer.setdefault((at.name, o), "a custom kernel")
    broadcast_dst: set[tuple[str, str]] = set()
    for link in links:
        where = f"link {link.name!r}"
        if not isinstance(link.name, str) or not link.name.isidentifier():
            raise ValueError(f"{where}: the name must be an identifier")
        if link.name in names or link.name in types:
            raise ValueError(f"{where}: the name is already an agent type or link")
        names.add(link.name)
        for t in (link.child, link.parent):
            if t not in types:
                raise ValueError(f"{where}: unknown agent type {t!r}")
        child, parent = types[link.child], types[link.parent]

        for pcol, agg in link.aggregates.items():
            if not isinstance(agg, Agg):
                raise ValueError(f"{where}: aggregate of {pcol!r} must be built with vecswim.agg")
            pc = _col(where, parent, pcol, "aggregate target")
            _claim(writer, where, parent, pcol, f"aggregate {agg.kind} of link {link.name!r}")
            if pc.initial is not None:
                raise ValueError(
                    f"{where}: aggregate target {pcol!r} can't have an initial value "
                    "(a parent without children has the empty aggregate)"
                )
            pk = pc.np_dtype.kind
            if pk == "b" or (agg.kind in ("mean", "min", "max") and pk != "f"):
                raise ValueError(
                    f"{where}: {agg.kind} into {pc.dtype} column {pcol!r} "
                    f"needs a float column{'' if agg.kind != 'count' else ' or an integer one'}"
                )
            if agg.kind == "count":
                continue
            cc = _col(where, child, agg.column, "aggregated column")
            if cc.np_dtype.kind == "f" and pk != "f":
                raise ValueError(
                    f"{where}: sum of float column {agg.column!r} into {pc.dtype} column "
                    f"{pcol!r} would truncate; make {pcol!r} a float column"
                )
        for dst, src in link.broadcast.items():
            dc = _col(where, child, dst, "broadcast target")
            sc = _col(where, parent, src, "broadcast source")
            _claim(writer, where, child, dst, f"the broadcast of link {link.name!r}")
            broadcast_dst.add((child.name, dst))
            if not castable(sc.np_dtype, dc.np_dtype):
                raise ValueError(
                    f"{where}: broadcast of {sc.dtype} {src!r} into {dc.dtype} {dst!r} "
                    "would truncate or wrap"
                )
    for at in types.values():
        at.event_fields(via_fields(at, types, links))
    for link in links:
        for pcol, agg in link.aggregates.items():
            if agg.column is not None and (link.child, agg.column) in broadcast_dst:
                raise ValueError(
                    f"link {link.name!r}: aggregate {pcol!r} reads {link.child}.{agg.column}, "
                    "which a broadcast sets after aggregation; aggregate the parent's column "
                    "instead"
                )


def via_fields(at: AgentType, types: Mapping[str, AgentType], links: Sequence[Link]) -> dict:
    """The ``via`` fields of ``at``'s links, each with its parent's key dtype."""
    out: dict[str, set] = {}
    for link in links:
        if link.child == at.name and link.via is not None:
            out.setdefault(link.via, set()).add(types[link.parent].key_dtype)
    for name, dts in out.items():
        if len(dts) > 1:
            raise ValueError(
                f"agent type {at.name!r}: via field {name!r} names parents of different key dtypes"
            )
    return {name: dts.pop() for name, dts in out.items()}


def _col(where: str, at: AgentType, name: str, what: str) -> Column:
    try:
        return at.column(name)
    except KeyError:
        raise ValueError(f"{where}: {what} {name!r} is not a column of {at.name!r}") from None


def _claim(writer: dict, where: str, at: AgentType, name: str, by: str) -> None:
    prev = writer.get((at.name, name))
    if prev is not None:
        raise ValueError(f"{where}: {at.name}.{name} is written by {prev} and by {by}")
    writer[(at.name, name)] = by
