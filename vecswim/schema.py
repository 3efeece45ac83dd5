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

_DTYPES = {
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
}


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
        if self.dtype not in _DTYPES:
            raise ValueError(f"column {self.name!r}: unsupported dtype {self.dtype!r}")
        if not isinstance(self.emit, bool) and (self.emit < 0 or math.isnan(self.emit)):
            raise ValueError(f"column {self.name!r}: deadband must be >= 0")

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    @property
    def initial_value(self) -> float | int:
        if self.initial is not None:
            return self.initial
        if self.rule is not None and self.rule.kind in ("sum", "count"):
            return 0
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
    ``fields``: dtypes of event fields not implied by a rule (e.g. those only custom kernels
    read); fields read by ``latest``/``sum``/``min``/``max`` default to the column's dtype,
    all others to float64.
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
        if not self.name.isidentifier():
            raise ValueError(f"agent type name {self.name!r} must be an identifier")
        if self.key_dtype not in ("int64", "string"):
            raise ValueError(f"agent type {self.name!r}: key_dtype must be 'int64' or 'string'")
        names = [c.name for c in self.columns]
        if len(set(names)) != len(names) or self.key in names:
            raise ValueError(f"agent type {self.name!r}: column names must be unique")
        for i, c in enumerate(self.columns):
            inp = c.rule.input if c.rule is not None else None
            if isinstance(inp, State) and inp.column not in names[:i]:
                raise ValueError(
                    f"column {c.name!r}: state({inp.column!r}) must name an earlier column"
                )
        for k in self.kernels:
            for out in k.outputs:
                if out not in names:
                    raise ValueError(f"custom kernel output {out!r} is not a column")

    def column(self, name: str) -> Column:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(f"agent type {self.name!r} has no column {name!r}")

    def event_fields(self) -> dict[str, np.dtype]:
        """Event fields the rules read, with the dtype they are cast to."""
        out: dict[str, np.dtype] = {}
        for c in self.columns:
            if c.rule is not None and isinstance(c.rule.input, str):
                same = c.rule.kind in ("latest", "sum", "min", "max")
                out.setdefault(c.rule.input, c.np_dtype if same else np.dtype("float64"))
        for k in self.kernels:
            for inp in k.inputs:
                if isinstance(inp, str):
                    out.setdefault(inp, np.dtype(self.fields.get(inp, "float64")))
        for name, dt in self.fields.items():
            out[name] = np.dtype(dt)
        return out


@dataclass(frozen=True)
class Agg:
    """A parent column computed over a link's children. Build with ``vecswim.agg``."""

    kind: str
    column: str | None = None
    scale: float = 2.0**16


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
