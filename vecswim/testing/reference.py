"""The reference engine: vecswim's semantics, executed one event and one agent at a time.

:class:`ReferenceEngine` takes the same :class:`~vecswim.AgentType` / :class:`~vecswim.Link`
declarations and the same event batches as :class:`~vecswim.Engine` and returns, per tick,
the emitted rows, the dead letters and (on request) the state of every agent. It is plain
Python over dicts: slow (O(agents) per tick), obviously correct, and it shares no code with
the engine's code generator, kernels or decoder; it uses only the declarations themselves
(``vecswim.schema``: what is accepted, and the dtype each event field is decoded as).
docs/SEMANTICS.md says in words what this module says in code.

Values are Python numbers holding exactly the value of their column's dtype: a float32 value
is the float64 of the rounded float32, an integer is a Python int in the dtype's range, a
bool is a bool.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from vecswim.schema import (
    AgentType,
    Column,
    Link,
    State,
    check_links,
    via_fields,
)

__all__ = ["ReferenceEngine", "ReferenceTick"]

_DEFAULT_SCALE = 2.0**16


@dataclass
class ReferenceTick:
    """What one reference tick did: ``emitted[agent_type]`` rows (dicts: key, ``tick``, the
    emitted columns) in creation order of the agents, ``dead[agent_type]`` rejected rows (the
    original row dict plus ``reason``) in arrival order."""

    tick: int
    emitted: dict[str, list[dict]] = field(default_factory=dict)
    dead: dict[str, list[dict]] = field(default_factory=dict)


class ReferenceEngine:
    """vecswim's semantics in plain Python (see the module docstring)."""

    def __init__(self, agent_types: Sequence[AgentType], links: Sequence[Link] = ()) -> None:
        self.types = {at.name: at for at in agent_types}
        self.links = {ln.name: ln for ln in links}
        check_links(self.types, list(links))
        self.fields = {
            n: at.event_fields(via_fields(at, self.types, list(links)))
            for n, at in self.types.items()
        }
        # agents[type][key] = {column: value}; dicts keep creation order = the engine's rows
        self.agents: dict[str, dict] = {n: {} for n in self.types}
        self.mean_n: dict[str, dict] = {n: {} for n in self.types}
        self.parent: dict[str, dict] = {n: {} for n in self.links}
        self.last: dict[str, dict] = {n: {} for n in self.types}
        self.tick_id = 0
        self._pending: list[tuple[str, list, list]] = []
        self._agg_target = {
            (ln.parent, col): agg for ln in links for col, agg in ln.aggregates.items()
        }
        self._depth = self._depths()

    # -- public --------------------------------------------------------------------------
    def set_links(self, link: str, child_keys: Sequence, parent_keys: Sequence) -> None:
        """Link ``child_keys[i]`` to ``parent_keys[i]`` in the next tick, after its events."""
        ck, pk = _pylist(child_keys), _pylist(parent_keys)
        if len(ck) != len(pk):
            raise ValueError("set_links: unequal lengths")
        self._pending.append((link, ck, pk))

    def tick(self, events: Mapping[str, pa.RecordBatch | pa.Table] | None = None) -> ReferenceTick:
        """Apply one tick; returns its emissions and dead letters."""
        self.tick_id += 1
        out = ReferenceTick(self.tick_id)
        new: dict[str, set] = {n: set() for n in self.types}
        for name, batch in (events or {}).items():
            good = []
            for row in _rows(batch):
                decoded, reason = self._decode(name, row)
                if reason is None:
                    good.append(decoded)
                else:
                    out.dead.setdefault(name, []).append({**row, "reason": reason})
            self._apply(name, good, new)
        for link, ck, pk in self._pending:
            ln = self.links[link]
            for k in ck:
                self._create(ln.child, k, new)
            for k in pk:
                self._create(ln.parent, k, new)
            for c, p in zip(ck, pk, strict=True):
                self.parent[link][c] = p
        self._pending.clear()
        self._aggregate()
        self._broadcast()
        self._emit(new, out)
        return out

    def state(self, agent_type: str) -> dict:
        """{key: {column: value}} of every agent of ``agent_type`` (creation order)."""
        return {k: dict(v) for k, v in self.agents[agent_type].items()}

    # -- events --------------------------------------------------------------------------
    def _decode(self, name: str, row: dict) -> tuple[dict | None, str | None]:
        """One event row as the agent type's key and fields (first failing one in order:
        key, then fields), or the reason it is a dead letter."""
        at = self.types[name]
        wanted = {at.key: at.key_dtype, **self.fields[name]}
        for f in wanted:
            if f not in row:
                return None, f"missing field {f!r}"
        out = {}
        for f, dt in wanted.items():
            v, why = decode_value(row[f], dt)
            if why is not None:
                return None, _reason(f, dt, why, f == at.key)
            out[f] = v
        return out, None

    def _create(self, name: str, key: object, new: dict) -> dict:
        agents = self.agents[name]
        a = agents.get(key)
        if a is None:
            at = self.types[name]
            a = agents[key] = {c.name: self._initial(at, c) for c in at.columns}
            new[name].add(key)
        return a

    def _initial(self, at: AgentType, c: Column) -> object:
        agg = self._agg_target.get((at.name, c.name))
        if agg is not None:
            v = 0 if agg.kind in ("count", "sum") else math.nan
        else:
            v = c.initial_value
        return store(c.np_dtype, v)

    def _apply(self, name: str, events: list[dict], new: dict) -> None:
        at = self.types[name]
        # agents come into being in order of first appearance: the batch's own keys first,
        # then each via link's parents (links in declaration order)
        for e in events:
            self._create(name, e[at.key], new)
        vias = [ln for ln in self.links.values() if ln.child == name and ln.via is not None]
        for ln in vias:
            for e in events:
                self._create(ln.parent, e[ln.via], new)
        traces: dict[str, list] = {}
        traced = {i.column for k in at.kernels for i in k.inputs if isinstance(i, State)}
        for e in events:
            key = e[at.key]
            a = self.agents[name][key]
            for c in at.columns:
                if c.rule is None:
                    continue
                inp = c.rule.input
                x = None if inp is None else (a[inp.column] if isinstance(inp, State) else e[inp])
                a[c.name] = self._rule(name, key, c, a[c.name], x)
                if c.name in traced:
                    traces.setdefault(c.name, []).append(a[c.name])
            for ln in vias:
                self.parent[ln.name][key] = e[ln.via]
        if at.kernels and events:
            self._custom(name, events, traces)

    def _rule(self, name: str, key: object, c: Column, cur: object, x: object) -> object:
        """One event's effect on one column: arithmetic on the exact values (Python ints for
        integers, float64 for floats), the result stored in the column's dtype."""
        dt = c.np_dtype
        kind, p = c.rule.kind, c.rule.params
        if kind == "latest":
            return store(dt, x)
        if kind == "sum":
            return store(dt, cur + x if dt.kind != "f" else float(cur) + float(x))
        if kind == "count":
            return store(dt, cur + 1 if dt.kind != "f" else float(cur) + 1.0)
        if kind in ("min", "max"):
            if dt.kind == "f":
                x, cur = float(x), float(cur)  # compared as float64
            better = x < cur if kind == "min" else x > cur
            return store(dt, x) if (cur != cur or better) else cur
        if kind == "mean":
            n = self.mean_n[name][(key, c.name)] = self.mean_n[name].get((key, c.name), 0) + 1
            if n == 1:
                return store(dt, float(x))
            m = float(cur)
            return store(dt, m + (float(x) - m) / n)
        if kind == "ewma":
            if cur != cur:
                return store(dt, float(x))
            return store(dt, float(cur) + p[0] * (float(x) - float(cur)))
        if kind == "hysteresis":
            up, down = p[0], p[1]
            low, high = store(dt, p[2]), store(dt, p[3])
            v = float(x)
            if cur == low and v > up:
                return high
            if cur == high and v < down:
                return low
            return cur
        raise AssertionError(kind)

    def _custom(self, name: str, events: list[dict], traces: dict) -> None:
        """User kernels see what the engine gives them: rows (creation index), event-aligned
        inputs, whole output columns; run on Python's interpretation of their code."""
        at = self.types[name]
        index = {k: i for i, k in enumerate(self.agents[name])}
        rows = np.array([index[e[at.key]] for e in events], np.int32)
        for k in at.kernels:
            args: list = [rows]
            for i in k.inputs:
                if isinstance(i, State):
                    args.append(np.array(traces[i.column], at.column(i.column).np_dtype))
                else:
                    args.append(np.array([e[i] for e in events], self.fields[name][i]))
            outs = {}
            for o in k.outputs:
                dt = at.column(o).np_dtype
                outs[o] = np.array([a[o] for a in self.agents[name].values()], dt)
                args.append(outs[o])
            args += list(k.params)
            getattr(k.fn, "py_func", k.fn)(*args)
            for o, arr in outs.items():
                for key, v in zip(self.agents[name], arr.tolist(), strict=True):
                    self.agents[name][key][o] = store(arr.dtype, v)

    # -- links ---------------------------------------------------------------------------
    def _depths(self) -> dict[str, int]:
        depth = dict.fromkeys(self.types, 0)
        for _ in range(len(self.types)):
            for ln in self.links.values():
                depth[ln.parent] = max(depth[ln.parent], depth[ln.child] + 1)
        return depth

    def _aggregate(self) -> None:
        """Every parent's aggregates from scratch over its current children, lowest level
        first (a level's aggregates may read the level below's)."""
        for ln in sorted(self.links.values(), key=lambda ln: self._depth[ln.child]):
            if not ln.aggregates:
                continue
            children: dict = {p: [] for p in self.agents[ln.parent]}
            for c, p in self.parent[ln.name].items():
                children[p].append(self.agents[ln.child][c])
            pt, ct = self.types[ln.parent], self.types[ln.child]
            for pkey, kids in children.items():
                a = self.agents[ln.parent][pkey]
                for col, agg in ln.aggregates.items():
                    pdt = pt.column(col).np_dtype
                    cdt = None if agg.column is None else ct.column(agg.column).np_dtype
                    vals = [] if agg.column is None else [k[agg.column] for k in kids]
                    a[col] = aggregate(agg.kind, vals, len(kids), cdt, pdt, agg.scale)

    def _broadcast(self) -> None:
        """Children take their parent's value, top level first."""
        for ln in sorted(self.links.values(), key=lambda ln: -self._depth[ln.child]):
            ct = self.types[ln.child]
            for c, p in self.parent[ln.name].items():
                for dst, src in ln.broadcast.items():
                    v = self.agents[ln.parent][p][src]
                    self.agents[ln.child][c][dst] = store(ct.column(dst).np_dtype, v)

    # -- emission ------------------------------------------------------------------------
    def _emit(self, new: dict, out: ReferenceTick) -> None:
        for name, at in self.types.items():
            emitted = [c for c in at.columns if c.deadband is not None]
            if not emitted:
                continue
            rows = []
            for key, a in self.agents[name].items():
                last = self.last[name].get(key)
                if not (
                    key in new[name] or any(_moved(c, a[c.name], last[c.name]) for c in emitted)
                ):
                    continue
                self.last[name][key] = {c.name: a[c.name] for c in emitted}
                rows.append({at.key: key, "tick": self.tick_id, **self.last[name][key]})
            if rows:
                out.emitted[name] = rows


# -- the value semantics, one function each ---------------------------------------------------
def store(dtype: np.dtype, x: object) -> object:
    """``x`` as a column of ``dtype`` holds it: floats rounded to nearest (float32 may
    overflow to inf), integers wrapped to the dtype's width (two's complement), bools as is."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        if isinstance(x, int | np.integer) and not isinstance(x, bool):
            # one rounding, straight from the integer (as a C cast does)
            return float(np.array(int(x), np.int64).astype(dtype))
        x = float(x)
        if dtype.itemsize == 4 and math.isfinite(x):
            with np.errstate(over="ignore"):
                return float(np.float32(x))
        return x
    if dtype.kind == "b":
        return bool(x)
    bits = 8 * dtype.itemsize
    x = int(x) % (1 << bits)
    if dtype.kind == "i" and x >= 1 << (bits - 1):
        x -= 1 << bits
    return x


_NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")


def decode_value(v: object, dtype: np.dtype | str) -> tuple[object, str | None]:
    """An event value as a field of ``dtype`` holds it, or why it can't be one: "null",
    "non-finite", "range", "integer" (a fraction for an integer field) or "convert".

    Numbers are taken exactly: integers into integer fields only within range, floats into
    integer fields only when integral and within range, any number into a float field
    rounded to nearest (integers through float64; float32 beyond its range refused), 0/1 into
    bool fields. Bools only into bool fields. A string is a number only if it is a JSON
    number literal (integer literals exact, others as their float64); "true"/"false" are
    bools. Strings into string fields, integers as their decimal text."""
    if v is None:
        return None, "null"
    if isinstance(dtype, str) and dtype == "string":
        if isinstance(v, str):
            return v, None
        if isinstance(v, int) and not isinstance(v, bool):
            return str(v), None
        return None, "convert"
    dtype = np.dtype(dtype)
    if isinstance(v, str):
        if dtype.kind == "b" and v in ("true", "false"):
            return v == "true", None
        if not _NUMBER.fullmatch(v):
            return None, "convert"
        v = int(v) if _NUMBER.fullmatch(v).group(2, 3) == (None, None) else float(v)
    if isinstance(v, bool):
        return (v, None) if dtype.kind == "b" else (None, "convert")
    if isinstance(v, float) and not math.isfinite(v):
        return None, "non-finite"
    if dtype.kind == "f":
        x = float(v)
        if dtype.itemsize == 4:
            with np.errstate(over="ignore"):
                x = float(np.float32(x))
            if not math.isfinite(x):
                return None, "range"
        return x, None
    if dtype.kind == "b":
        return (v == 1, None) if v in (0, 1) else (None, "range")
    if isinstance(v, float):
        if v != math.floor(v):
            return None, "integer"
        v = int(v)
    if not np.iinfo(dtype).min <= v <= np.iinfo(dtype).max:
        return None, "range"
    return v, None


def _reason(field: str, dtype: object, why: str, is_key: bool) -> str:
    if why == "null":
        return "null key" if is_key else f"null field {field!r}"
    if why == "non-finite":
        return f"non-finite field {field!r}"
    if why == "range":
        return f"field {field!r}: out of range for {dtype}"
    if why == "integer":
        return f"field {field!r}: not an integer"
    return f"field {field!r}: cannot convert to {dtype}"


def aggregate(
    kind: str,
    vals: list,
    n_children: int,
    child_dtype: np.dtype | None,
    parent_dtype: np.dtype,
    scale: float = _DEFAULT_SCALE,
) -> object:
    """A parent's aggregate over its children's values, from scratch.

    count: children linked. sum/mean over the children with finite values: integers add
    exactly (int64, wrapping); floats add as fixed point ``round(x * scale)`` (ties to even,
    saturated to int64) so that re-linking never drifts; sum = total (/ scale for floats),
    mean = that / number of finite children (NaN if none). min/max over the finite children,
    each compared as the parent's dtype holds it (NaN if none)."""
    if kind == "count":
        return store(parent_dtype, n_children)
    finite = [v for v in vals if math.isfinite(float(v))]
    if kind in ("sum", "mean"):
        is_float = child_dtype.kind == "f"
        acc = 0
        for v in finite:
            acc += _fixed(v, scale) if is_float else int(v)
        acc = store(np.dtype("int64"), acc)
        total = acc / scale if is_float else acc
        if kind == "sum":
            return store(parent_dtype, total)
        return store(parent_dtype, float(total) / len(finite)) if finite else math.nan
    held = [store(parent_dtype, v) for v in finite]
    if not held:
        return math.nan
    return max(held) if kind == "max" else min(held)


def _fixed(v: float, scale: float) -> int:
    x = round(float(v) * scale)  # ties to even, exact
    return min(max(x, -(2**63)), 2**63 - 1)


def _moved(c: Column, now: object, last: object) -> bool:
    """An emitted column moved beyond its deadband since its last emission."""
    db = c.deadband
    if c.np_dtype.kind == "f":
        if (now != now) != (last != last):
            return True
        return now == now and abs(float(now) - float(last)) > db
    return abs(int(now) - int(last)) > db


def _rows(batch: pa.RecordBatch | pa.Table | Mapping) -> list[dict]:
    if isinstance(batch, Mapping):
        batch = pa.table(dict(batch))
    return batch.to_pylist()


def _pylist(keys: object) -> list:
    if isinstance(keys, pa.Array | pa.ChunkedArray):
        return keys.to_pylist()
    if isinstance(keys, np.ndarray):
        return keys.tolist()
    return list(keys)
