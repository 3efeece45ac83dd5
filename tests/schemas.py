"""Hypothesis strategies for random vecswim schemas and event batches (differential tests).

A schema is 1-4 agent types (int64 or string keys, every column dtype, every rule, ``state()``
chains, deadbands 0 / True / numbers, explicit initials) and 0-3 links between them (child
types before parent types, so they form a DAG; multi-level; ``via`` relinking or
``set_links``; every aggregate over every child/parent dtype pair; broadcasts). The
generator aims at declarations the API accepts but also produces some it must refuse; the
tests accept a refusal only as a ``ValueError`` at declaration.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
from hypothesis import strategies as st
from numba import njit

import vecswim as vs
from vecswim import schema
from vecswim.schema import castable

DTYPES = list(schema.DTYPES)
RULES = {k: sorted(v) for k, v in schema.RULES_BY_KIND.items()}
SAME = schema.SAME_DTYPE_RULES
INT_KEYS = [0, 1, 2, 7, -3, 2**53 + 1, 2**62 + 5, -(2**63), 2**63 - 1]
STR_KEYS = ["a", "b", "c", "dé", "", "x" * 20]


@njit(cache=True)
def accumulate(rows, x, out):
    """A custom event kernel: out[agent] += x (float64) for every event."""
    for i in range(len(rows)):
        out[rows[i]] += np.float64(x[i])


def _reader(dtype: str, kind: str) -> str:
    return dtype if kind in SAME else "float64"


@st.composite
def columns(draw, n_fields: int) -> tuple[list[vs.Column], dict[str, str]]:
    """State columns with rules and the declared field dtypes they need."""
    cols: list[vs.Column] = []
    readers: dict[str, list[str]] = {}
    for j in range(draw(st.integers(1, 5))):
        dtype = draw(st.sampled_from(DTYPES))
        kind = np.dtype(dtype).kind
        name = f"c{j}"
        rule = None
        initial = None
        if draw(st.integers(0, 4)) > 0:
            rk = draw(st.sampled_from(RULES[kind]))
            inp: object = None
            if rk != "count":
                reader = _reader(dtype, rk)
                earlier = [c for c in cols if castable(c.dtype, reader)]
                if earlier and draw(st.integers(0, 3)) == 0:
                    inp = vs.state(draw(st.sampled_from(earlier)).name)
                else:
                    inp = f"f{draw(st.integers(0, n_fields - 1))}"
                    readers.setdefault(inp, []).append(reader)
            if rk == "hysteresis":
                down = draw(st.sampled_from([-10.0, 0.0, 0.5, 3.0]))
                up = down + draw(st.sampled_from([0.0, 1.0, 5.0]))
                lo, hi = draw(
                    st.sampled_from(
                        [(0, 1), (1, 0), (0, 0)] if kind == "b" else [(0, 1), (2, 5), (1, 0)]
                    )
                )
                rule = vs.hysteresis(inp, up=up, down=down, low=lo, high=hi)
                if draw(st.booleans()):
                    initial = draw(st.sampled_from([lo, hi]))
            elif rk == "ewma":
                rule = vs.ewma(inp, alpha=draw(st.sampled_from([0.1, 0.5, 1.0])))
            elif rk == "count":
                rule = vs.count()
            else:
                rule = getattr(vs, rk)(inp)
        if (
            initial is None
            and (rule is None or rule.kind != "hysteresis")
            and draw(st.integers(0, 5)) == 0
        ):
            initial = draw(_initial(dtype))
        emit = draw(
            st.sampled_from([False, True, 0, 0.0, 0.5, 1, 2.5, 100.0])
            if kind != "b"
            else st.sampled_from([False, True, 0, 0.5, 1])
        )
        cols.append(vs.Column(name, dtype, rule, initial=initial, emit=emit))
    fields: dict[str, str] = {}
    for f, rs in readers.items():
        if len(set(rs)) > 1 and draw(st.booleans()):
            # declare a dtype every reader can take when there is one (else: refused)
            ok = [d for d in DTYPES if all(castable(d, r) for r in rs)]
            if ok:
                fields[f] = draw(st.sampled_from(ok))
    return cols, fields


def _initial(dtype: str):
    kind = np.dtype(dtype).kind
    if kind == "f":
        return st.sampled_from([0.0, -1.5, 1e6, math.nan, math.inf, -math.inf])
    if kind == "b":
        return st.sampled_from([0, 1, True])
    info = np.iinfo(dtype)
    return st.sampled_from([0, 1, int(info.min), int(info.max)])


class RefusedType(str):
    """An agent type the API refused at declaration (its error message)."""


@st.composite
def schemas(draw) -> tuple[list[vs.AgentType], list[vs.Link]] | RefusedType:
    n_types = draw(st.integers(1, 4))
    types = []
    for i in range(n_types):
        try:
            cols, fields = draw(columns(n_fields=3))
        except ValueError as e:
            return RefusedType(str(e))
        # plain columns that links may aggregate into or broadcast into
        for j in range(draw(st.integers(0, 3))):
            dtype = draw(st.sampled_from([*DTYPES, "float32", "float32", "float64"]))
            emit = draw(st.sampled_from([False, True, 0.0, 0.5, 3]))
            cols.append(vs.Column(f"p{j}", dtype, emit=emit))
        key_dtype = draw(st.sampled_from(["int64", "string"]))
        kernels = []
        outs = [c for c in cols if c.rule is None and c.dtype in ("float32", "float64")]
        if outs and draw(st.integers(0, 3)) == 0:
            traced = [c for c in cols if c.rule is not None]
            inp = (
                vs.state(draw(st.sampled_from(traced)).name)
                if traced and draw(st.booleans())
                else "g0"
            )
            kernels.append(vs.custom(accumulate, [inp], [draw(st.sampled_from(outs)).name]))
        try:
            at = vs.AgentType(
                f"t{i}",
                key=f"k{i}",
                columns=cols,
                key_dtype=key_dtype,
                fields=fields,
                kernels=kernels,
            )
        except ValueError as e:
            return RefusedType(str(e))
        types.append(at)
    links = []
    claimed: set[tuple[int, str]] = set()
    for n in range(draw(st.integers(0, 3)) if n_types > 1 else 0):
        ci = draw(st.integers(0, n_types - 2))
        pi = draw(st.integers(ci + 1, n_types - 1))
        child, parent = types[ci], types[pi]
        free = lambda t, i, initial_ok=False: [  # noqa: E731
            c
            for c in t.columns
            if c.rule is None
            and (initial_ok or c.initial is None)
            and (i, c.name) not in claimed
            and all(c.name not in k.outputs for k in t.kernels)
        ]
        aggs = {}
        for pc in draw(
            # targets with an explicit initial too: refused at declaration (no phantom child)
            st.lists(st.sampled_from(free(parent, pi, True) or [None]), max_size=3, unique_by=id)
        ):
            if pc is None:
                continue
            kinds = ["count"] if pc.dtype == "bool" else ["count", "sum"]
            if np.dtype(pc.dtype).kind == "f":
                kinds += ["mean", "min", "max", "min", "max"]
            kind = draw(st.sampled_from(kinds))
            if kind == "count":
                aggs[pc.name] = vs.agg.count()
            else:
                floats = [c for c in child.columns if c.np_dtype.kind == "f"]
                # min/max over float children above all (where +-inf and rounding live),
                # often wider than the target (compared in the target's dtype)
                wider = [c for c in child.columns if c.np_dtype.itemsize > pc.np_dtype.itemsize]
                pick = floats if kind in ("min", "max") and floats else child.columns
                if kind in ("min", "max") and wider and draw(st.booleans()):
                    pick = wider
                cc = draw(st.sampled_from(pick))
                scale = draw(st.sampled_from([2.0**16, 1.0, 1000.0]))
                aggs[pc.name] = getattr(vs.agg, kind)(
                    cc.name, **({"scale": scale} if kind in ("sum", "mean") else {})
                )
            claimed.add((pi, pc.name))
        bcast = {}
        if draw(st.booleans()):
            dsts = free(child, ci)
            if dsts:
                dst = draw(st.sampled_from(dsts))
                srcs = [c for c in parent.columns if castable(c.dtype, dst.dtype)]
                if srcs:
                    bcast[dst.name] = draw(st.sampled_from(srcs)).name
                    claimed.add((ci, dst.name))
        via = f"via{n}" if draw(st.integers(0, 3)) > 0 else None
        links.append(
            vs.Link(
                f"l{n}",
                child=child.name,
                parent=parent.name,
                via=via,
                aggregates=aggs,
                broadcast=bcast,
            )
        )
    return types, links


def _values(draw, dtype, n: int) -> pa.Array:
    """n values for a field of ``dtype``: mostly valid, some null, non-finite or out of range."""
    if dtype == "string":
        vals = [
            draw(st.sampled_from([*STR_KEYS, None]))
            if draw(st.integers(0, 15)) == 0
            else draw(st.sampled_from(STR_KEYS))
            for _ in range(n)
        ]
        return pa.array(vals, pa.string())
    dt = np.dtype(dtype)
    bad = draw(st.integers(0, 4)) == 0  # this column carries some invalid values
    if dt.kind == "b":
        vals = [
            draw(st.sampled_from([True, False, None] if bad else [True, False])) for _ in range(n)
        ]
        return pa.array(vals, pa.bool_())
    if dt.kind == "f":
        pool = [0.0, 1.0, -2.5, 0.1, 3.0, 1e6, -1e-3, 7.25, 1e30, 3e38, -3e38]
        if bad:
            pool += [math.nan, math.inf, -math.inf, None, 1e300]
        # float32 fields: values float32 holds exactly; float64: any (rounding shows)
        width = 32 if dt.itemsize == 4 else 64
        vals = [
            draw(st.one_of(st.sampled_from(pool), st.floats(-1e4, 1e4, width=width)))
            for _ in range(n)
        ]
        return pa.array(vals, pa.float64())
    info = np.iinfo(dt)
    pool = [0, 1, 2, 3, 5, 100, int(info.max), int(info.min)]
    if dt.kind == "i":
        pool += [-1, -7]
    if bad:
        pool += [None, int(info.max) + 1, int(info.min) - 1]
        vals = [draw(st.sampled_from(pool)) for _ in range(n)]
        if draw(st.booleans()):
            return pa.array(
                [None if v is None else float(v) + draw(st.sampled_from([0.0, 0.5])) for v in vals],
                pa.float64(),
            )
        return pa.array(
            [v if v is None or -(2**63) <= v < 2**63 else None for v in vals], pa.int64()
        )
    vals = [draw(st.sampled_from(pool)) for _ in range(n)]
    return pa.array(vals, pa.from_numpy_dtype(dt))


def _keys(draw, key_dtype: str, n: int, pool_size: int) -> pa.Array:
    null = draw(st.integers(0, 6)) == 0
    if key_dtype == "string":
        pool = STR_KEYS[:pool_size] + [f"k{i}" for i in range(pool_size - len(STR_KEYS))]
        vals = [
            None if null and draw(st.integers(0, 4)) == 0 else draw(st.sampled_from(pool))
            for _ in range(n)
        ]
        return pa.array(vals, pa.string())
    pool = INT_KEYS[:pool_size] + list(range(100, 100 + pool_size - len(INT_KEYS)))
    vals = [
        None if null and draw(st.integers(0, 4)) == 0 else draw(st.sampled_from(pool))
        for _ in range(n)
    ]
    return pa.array(vals, pa.int64())


@st.composite
def ticks(draw, engine: vs.Engine, n_ticks: int | None = None) -> list[tuple[dict, list]]:
    """Per tick: ({agent type: batch}, [set_links calls]). Empty ticks, hot keys, new keys."""
    out = []
    for _ in range(n_ticks if n_ticks is not None else draw(st.integers(1, 6))):
        events = {}
        for name, at in engine.types.items():
            if draw(st.integers(0, 2)) == 0:
                continue
            n = draw(st.integers(0, 8))
            pool = draw(st.integers(1, 6))
            if draw(st.integers(0, 9)) == 0:  # many agents: tables grow past their capacity (16)
                n, pool = 40, 40
            cols = {at.key: _keys(draw, at.key_dtype, n, pool)}
            for f, dt in engine.event_fields(name).items():
                if f == at.key:
                    continue
                if isinstance(dt, str) or (dt == np.dtype("int64") and f.startswith("via")):
                    parent_dtype = "string" if isinstance(dt, str) else "int64"
                    cols[f] = _keys(draw, parent_dtype, n, draw(st.integers(1, 4)))
                else:
                    cols[f] = _values(draw, dt.name, n)
            events[name] = pa.table(cols)
        calls = []
        for link, ls in engine.links.items():
            if draw(st.integers(0, 2 if ls.link.via is None else 8)) == 0:
                m = draw(st.integers(0, 4))
                ck = [draw(st.sampled_from(_pool(ls.child.key_dtype))) for _ in range(m)]
                mp = m if draw(st.integers(0, 9)) else draw(st.integers(0, 4))  # unequal: refused
                pk = [draw(st.sampled_from(_pool(ls.parent.key_dtype)[:3])) for _ in range(mp)]
                calls.append((link, ck, pk))
        out.append((events, calls))
    return out


def _pool(key_dtype: str) -> list:
    return STR_KEYS if key_dtype == "string" else INT_KEYS
