"""The one schema-driven decoder: every source's events become typed columns here.

Pulsar JSON and Arrow payloads, NDJSON / Parquet / Arrow IPC files and in-memory batches handed
to ``Engine.tick`` all go through this module. The schema is never inferred: it is a
:class:`Plan` built from the agent type (key column and key dtype) and the fields the engine
reads (``Engine.event_fields``). Every output column comes from one input field and has one
dtype; one input field may feed several outputs of different dtypes
(``{output: (field, dtype)}``), and a row is dead-lettered if any of its casts fails.

Decoding is per row: a value that cannot be represented exactly as the rules below allow
dead-letters its row, with a reason naming the field, and the good rows of the same batch are
applied. Extra input columns/members are ignored. All work is bulk (Arrow, numpy, numba); the
only per-row Python runs for JSON items that already failed a bulk parse.

Cast rules (target dtypes: the key is int64 or string; fields are float32, float64, int8,
int16, int32, int64, uint8, uint16, uint32, bool or string):

- null (JSON ``null``, a missing JSON member, an Arrow null) -> ``null key`` /
  ``null field 'x'``. A missing Arrow *column* dead-letters every row of the batch with
  ``missing field 'x'`` (key included).
- integer -> integer: accepted only if the value is in the target's range, else
  ``field 'x': out of range for int8``. Integers are never rounded or wrapped.
- integer -> float: the exact integer rounded to the nearest float64 (ties to even); for
  float32 that float64 is then rounded to float32 (below).
- float -> float64: as is. float -> float32: the float64 value rounded to the nearest float32
  (IEEE round to nearest, ties to even, as numpy ``astype``); a finite value beyond float32's
  range is ``out of range for float32``.
- float -> integer: accepted only if finite, integral (``x == floor(x)``) and in range:
  NaN/±inf -> ``non-finite field 'x'``, 1.5 -> ``field 'x': not an integer``,
  1e30 -> ``out of range for int64``. -0.0 -> 0.
- non-finite float (NaN, ±inf, and JSON number literals too large for a float64, e.g.
  ``1e999``) into a float field -> ``non-finite field 'x'``.
- bool -> bool only. A boolean is not a number: true/false into a numeric or string field is
  ``field 'x': cannot convert to <dtype>``.
- number -> bool: only 0 or 1 (as integers or floats, e.g. 1.0), else
  ``out of range for bool``; NaN -> non-finite.
- string -> number: only if the whole string is a JSON number literal
  ``-?(0|[1-9][0-9]*)(\\.[0-9]+)?([eE][+-]?[0-9]+)?`` (no spaces, ``+``, leading zeros, hex,
  ``nan``/``inf``), then exactly as a JSON number of that text (below); otherwise
  ``cannot convert to <dtype>``. string -> bool: ``"true"``/``"false"`` or a number string
  equal to 0 or 1.
- number text (JSON numbers, number strings, message keys, Arrow decimals via their text):
  an integer literal (no fraction, no exponent) is read exactly, never through a double
  (2**53+1, -2**63 and 2**63-1 are exact; beyond int64 is ``out of range``), then the integer
  rules apply. A literal with a fraction or an exponent is read as the correctly rounded
  float64 of its decimal value, then the float rules apply (so ``1.0`` and ``1e3`` are
  accepted for integer fields, ``1.5`` is not).
- -> string (string keys, link fields with a string parent key): strings as they are;
  integers (integer Arrow types, JSON integer literals within int64) as their canonical
  decimal text (``-0`` -> ``"0"``); floats, booleans -> ``cannot convert to string``.
- other Arrow types (timestamps, lists, structs, binary, ...) and JSON arrays/objects ->
  ``cannot convert to <dtype>``.

The first failing output in plan order (key first, then fields) gives the row's reason.

JSON framing (Pulsar payloads and NDJSON lines, "items"): each item must be exactly one JSON
object, checked by ``kernels.text.scan_json_items`` before parsing, so every good item yields
exactly one row and rows are paired with their items (and message keys) by construction.
Dead items: ``empty payload``, ``not a JSON object``, ``more than one JSON value``,
``truncated JSON``, ``invalid UTF-8``, ``invalid JSON: <parser message>``, oversized items;
a member named twice is ``duplicate field 'x'`` (the parser refuses it). Whitespace-only NDJSON
lines are skipped, not counted. Invalid JSON never reaches the cast rules.
"""

from __future__ import annotations

import functools
import itertools
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pajson

from vecswim.kernels import text as ktext
from vecswim.schema import DTYPES as COLUMN_DTYPES

RAW_JSON = "__json"
"""Column of a *raw JSON batch*: one JSON item (bytes) per row, decoded by the engine."""
RAW_ERROR = "__error"
"""Optional column of a raw JSON batch: a reason that dead-letters the row as it is."""
DEAD_TEXT_BYTES = 4096
"""Raw input kept in a dead letter (the ``json`` column) is cut to this many bytes."""

DTYPES = (*COLUMN_DTYPES, "string")

# per-row result codes of a conversion
OK, NULL, NONFINITE, RANGE, FRACTION, TYPE, MISSING = range(7)

_METADATA_KEY = b"vecswim.decoded"
_SCAN_REASONS = {
    ktext.EMPTY: "empty payload",
    ktext.NOT_OBJECT: "not a JSON object",
    ktext.MULTIPLE: "more than one JSON value",
    ktext.TRUNCATED: "truncated JSON",
    ktext.BAD_UTF8: "invalid UTF-8",
    ktext.CONTROL: "invalid JSON: control character in a string",
}
_TOO_LONG = 7
_RAW = (RAW_JSON, RAW_ERROR)
_FALLBACK_LINES = 32  # a failing range this small is decoded line by line
_SPLIT = 16  # a larger failing range is parsed again in this many parts
_ROW = re.compile(r"JSON parse error: .* in row (\d+)$")


# -- plans ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """One output column: ``name`` read from input ``field`` as ``dtype``."""

    name: str
    field: str
    dtype: str
    key: bool = False


class Plan:
    """What to decode: the key (``key`` as ``key_dtype``, from the payload or, with
    ``key_from_message``, from message keys given alongside) and the outputs
    ``{name: (field, dtype)}``. Build with :func:`plan` (cached)."""

    def __init__(
        self,
        key: str,
        key_dtype: str,
        outputs: tuple[tuple[str, str, str], ...],
        key_from_message: bool = False,
    ) -> None:
        if key_dtype not in ("int64", "string"):
            raise ValueError(f"key dtype must be 'int64' or 'string', got {key_dtype!r}")
        self.key = key
        self.key_dtype = key_dtype
        self.key_from_message = key_from_message
        targets = [Target(key, key, key_dtype, key=True)]
        for name, fld, dt in outputs:
            if name == key:
                continue
            if dt not in DTYPES:
                raise ValueError(f"field {fld!r}: unsupported dtype {dt!r}")
            targets.append(Target(name, fld, dt))
        self.targets = tuple(targets)
        fields: dict[str, list[str]] = {}
        for t in targets:
            if t.key and key_from_message:
                continue
            fields.setdefault(t.field, []).append(t.dtype)
        self.fields = tuple(fields)
        self.fingerprint = repr((key, key_dtype, [(t.name, t.field, t.dtype) for t in targets]))
        self.schema = pa.schema(
            [(t.name, _arrow_type(t.dtype)) for t in targets],
            metadata={_METADATA_KEY: self.fingerprint.encode()},
        )
        # JSON is parsed by Arrow with one "wire" type per input field that keeps the values
        # the targets accept exact; anything else fails the parse and takes the fallback
        wire = [(f, _wire_type(dts)) for f, dts in fields.items()]
        if not wire:  # rows must still be counted
            wire = [("\x00vecswim", pa.bool_())]
        self.wire = pa.schema(wire)
        self.parse_options = pajson.ParseOptions(
            explicit_schema=self.wire, unexpected_field_behavior="ignore"
        )

    def is_decoded(self, table: pa.Table | pa.RecordBatch) -> bool:
        """True for a table this plan (or an equal one) produced: nothing left to check."""
        md = table.schema.metadata
        return md is not None and md.get(_METADATA_KEY) == self.fingerprint.encode()


def spec(fields: Mapping[str, object]) -> tuple[tuple[str, str, str], ...]:
    """Normalize ``{field: dtype}`` and/or ``{output: (field, dtype)}`` to
    ``((output, field, dtype), ...)`` with dtype names ("string" for string)."""
    out = []
    for name, v in fields.items():
        if isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str):
            fld, dt = v
        else:
            fld, dt = name, v
        out.append((name, fld, dtype_name(dt)))
    return tuple(out)


def dtype_name(dt: object) -> str:
    if isinstance(dt, str) and dt == "string":
        return "string"
    return np.dtype(dt).name


@functools.lru_cache(maxsize=256)
def _plan(key, key_dtype, outputs, key_from_message) -> Plan:
    return Plan(key, key_dtype, outputs, key_from_message)


def plan(
    key: str, key_dtype: str, fields: Mapping[str, object], key_from_message: bool = False
) -> Plan:
    """The (cached) plan for key ``key``/``key_dtype`` and ``fields`` (``{field: dtype}`` or
    ``{output: (field, dtype)}``)."""
    return _plan(key, dtype_name(key_dtype), spec(fields), key_from_message)


def plan_for(at, fields: Mapping[str, object], key_from_message: bool = False) -> Plan:
    """The plan for agent type ``at`` reading ``fields`` (e.g. ``Engine.event_fields``)."""
    return plan(at.key, at.key_dtype, fields, key_from_message)


def _arrow_type(dt: str) -> pa.DataType:
    return pa.large_string() if dt == "string" else pa.from_numpy_dtype(np.dtype(dt))


def _wire_type(dtypes: list[str]) -> pa.DataType:
    if "string" in dtypes:
        return pa.large_string()
    if any(d not in ("float32", "float64", "bool") for d in dtypes):
        return pa.int64()  # integers stay exact; float literals take the fallback
    if any(d != "bool" for d in dtypes):
        return pa.float64()
    return pa.bool_()


# -- results ----------------------------------------------------------------------------------
@dataclass
class Decoded:
    """Result of a decode: ``table`` holds the good rows (the plan's outputs, key first, in
    input order; None if none), ``rows`` the input row/item index of each good row, ``dead``
    the increasing indexes of dead rows/items and ``reasons`` theirs. Skipped items (blank
    NDJSON lines) are in neither."""

    table: pa.Table | None
    rows: np.ndarray
    dead: np.ndarray
    reasons: list[str]

    @property
    def bad(self) -> list[tuple[int, str]]:
        """``[(index, reason)]`` of the dead rows/items."""
        return list(zip(self.dead.tolist(), self.reasons, strict=True))


# -- converters ---------------------------------------------------------------------------------
Values = np.ndarray | pa.Array
Codes = np.ndarray | None  # int8 per row, None = all OK


def _empty(dt: str, n: int) -> Values:
    if dt == "string":
        return pa.nulls(n, pa.large_string())
    return np.zeros(n, np.dtype(dt))


def _codes(n: int, code: int = OK) -> np.ndarray:
    return np.full(n, code, np.int8)


def _from_int(v: np.ndarray, dt: str) -> tuple[Values, Codes]:
    if dt == "string":
        return pc.cast(pa.array(v), pa.large_string()), None
    if dt == "bool":
        ok = (v == 0) | (v == 1)
        return v.astype(bool), None if ok.all() else np.where(ok, OK, RANGE).astype(np.int8)
    target = np.dtype(dt)
    if target.kind == "f":
        return v.astype(np.float64).astype(target, copy=False), None
    if np.can_cast(v.dtype, target, "safe"):
        return v.astype(target, copy=False), None
    info = np.iinfo(target)
    ok = v <= info.max
    if v.dtype.kind == "i":
        ok &= v >= info.min
    if ok.all():
        return v.astype(target), None
    return np.where(ok, v, 0).astype(target), np.where(ok, OK, RANGE).astype(np.int8)


def _from_float(v: np.ndarray, dt: str) -> tuple[Values, Codes]:
    v = v.astype(np.float64, copy=False)
    finite = np.isfinite(v)
    all_finite = bool(finite.all())
    if dt == "string":
        return _empty(dt, len(v)), _codes(len(v), TYPE)
    if dt == "float64":
        return v, None if all_finite else np.where(finite, OK, NONFINITE).astype(np.int8)
    codes = None if all_finite else np.where(finite, OK, NONFINITE).astype(np.int8)
    if dt == "float32":
        with np.errstate(over="ignore"):
            r = v.astype(np.float32)
        over = np.isinf(r) & finite
        if over.any():
            codes = _codes(len(v)) if codes is None else codes
            codes[over] = RANGE
        return r, codes
    safe = np.where(finite, v, 0.0)
    if dt == "bool":
        ok = (safe == 0.0) | (safe == 1.0)
        if not ok.all():
            codes = _codes(len(v)) if codes is None else codes
            codes[~ok & (codes == OK)] = RANGE
        return safe == 1.0, codes
    info = np.iinfo(np.dtype(dt))
    frac = np.floor(safe) != safe
    out_of_range = (safe < float(info.min)) | (safe >= float(info.max) + 1.0)
    bad = frac | out_of_range
    if bad.any():
        codes = _codes(len(v)) if codes is None else codes
        codes[frac & (codes == OK)] = FRACTION
        codes[out_of_range & (codes == OK)] = RANGE
        safe = np.where(bad, 0.0, safe)
    return safe.astype(np.dtype(dt)), codes


def _string_buffers(arr: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(data bytes, int64 offsets [n + 1], valid mask) of a string/binary array."""
    if not (pa.types.is_large_string(arr.type) or pa.types.is_large_binary(arr.type)):
        arr = pc.cast(arr, pa.large_binary() if pa.types.is_binary(arr.type) else pa.large_string())
    bufs = arr.buffers()
    n = len(arr)
    offsets = np.frombuffer(bufs[1], np.int64)[arr.offset : arr.offset + n + 1]
    data = np.frombuffer(bufs[2], np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    if arr.null_count:
        valid = ~np.asarray(arr.is_null().to_numpy(zero_copy_only=False))
    else:
        valid = np.ones(n, bool)
    return data, offsets, valid


def _from_number_text(arr: pa.Array, dt: str) -> tuple[Values, Codes]:
    """Number text (JSON grammar) -> ``dt``; non-number text is TYPE."""
    n = len(arr)
    data, offsets, valid = _string_buffers(arr)
    cls = np.empty(n, np.int8)
    ival = np.empty(n, np.int64)
    ktext.parse_number_text(data, offsets, valid, cls, ival)
    codes = np.where(cls == ktext.NOT_NUMBER, TYPE, OK).astype(np.int8)
    if dt == "string":
        codes[cls == ktext.INT_OVERFLOW] = RANGE
        is_int = cls == ktext.INT
        out = pc.cast(pa.array(ival), pa.large_string())
        if not is_int.all():
            codes[cls == ktext.FLOAT] = TYPE
            out = pc.if_else(pa.array(is_int), out, pa.scalar(None, pa.large_string()))
        return out, None if not codes.any() else codes
    target_int = dt not in ("float32", "float64", "bool")
    via_float = (cls == ktext.FLOAT) if target_int else (cls != ktext.NOT_NUMBER)
    if target_int:
        values, c = _from_int(ival, dt)
        values = np.asarray(values)
        if c is not None:
            codes = np.where((cls == ktext.INT) & (c != OK), c, codes).astype(np.int8)
        codes[cls == ktext.INT_OVERFLOW] = RANGE
    else:
        values = _empty(dt, n)
    if via_float.any():
        idx = np.flatnonzero(via_float)
        floats = pc.cast(arr.take(pa.array(idx)), pa.float64()).to_numpy(zero_copy_only=False)
        fv, fc = _from_float(floats, dt)
        values[idx] = fv
        if fc is not None:
            codes[idx] = fc
    return values, None if not codes.any() else codes


def _from_string(arr: pa.Array, dt: str) -> tuple[Values, Codes]:
    if dt == "string":
        return (arr if arr.type == pa.large_string() else pc.cast(arr, pa.large_string())), None
    if dt == "bool":
        t = pc.fill_null(pc.equal(arr, "true"), False).to_numpy(zero_copy_only=False)
        f = pc.fill_null(pc.equal(arr, "false"), False).to_numpy(zero_copy_only=False)
        values, codes = _from_number_text(arr, dt)
        words = t | f
        if words.any():
            values = np.where(words, t, values)
            if codes is not None:
                codes[words] = OK
                codes = codes if codes.any() else None
        return values, codes
    return _from_number_text(arr, dt)


def convert(arr: pa.Array | pa.ChunkedArray, dt: str) -> tuple[Values, np.ndarray | None]:
    """Convert one typed Arrow column to ``dt`` by the module's rules: (values, codes) where
    codes (int8, None if all OK) give OK/NULL/NONFINITE/RANGE/FRACTION/TYPE per row and
    values are only meaningful where OK (numpy, or Arrow for strings)."""
    if isinstance(arr, pa.ChunkedArray):
        arr = _one_array(arr)
    t = arr.type
    n = len(arr)
    if pa.types.is_dictionary(t):
        arr = arr.dictionary_decode()
        t = arr.type
    if pa.types.is_null(t):
        return _empty(dt, n), _codes(n, NULL)
    nulls = None
    if arr.null_count:
        nulls = np.asarray(arr.is_null().to_numpy(zero_copy_only=False))
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        if pa.types.is_string_view(t):
            arr = pc.cast(arr, pa.large_string())
        values, codes = _from_string(arr, dt)
    elif pa.types.is_decimal(t):
        values, codes = _from_number_text(pc.cast(arr, pa.large_string()), dt)
    elif pa.types.is_boolean(t):
        if dt == "bool":
            values, codes = pc.fill_null(arr, False).to_numpy(zero_copy_only=False), None
        else:
            values, codes = _empty(dt, n), _codes(n, TYPE)
    elif pa.types.is_integer(t) or pa.types.is_floating(t):
        v = (pc.fill_null(arr, 0) if nulls is not None else arr).to_numpy(zero_copy_only=False)
        values, codes = _from_float(v, dt) if pa.types.is_floating(t) else _from_int(v, dt)
    else:
        values, codes = _empty(dt, n), _codes(n, TYPE)
    if nulls is not None:
        codes = _codes(n) if codes is None else codes
        codes[nulls] = NULL
    return values, codes


# -- JSON values that failed the bulk parse ----------------------------------------------------
_K_NULL, _K_BOOL, _K_NUMBER, _K_STRING, _K_SPECIAL, _K_OTHER = range(6)


class _Num(str):
    """A JSON number kept as its text."""


class _Obj(dict):
    """A JSON object that remembers which member names it saw twice."""

    dups: frozenset = frozenset()


def _pairs(pairs: list) -> _Obj:
    o = _Obj(pairs)
    if len(o) != len(pairs):
        seen: set = set()
        o.dups = frozenset(k for k, _ in pairs if k in seen or seen.add(k))
    return o


_SPECIAL = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}
_DECODER = json.JSONDecoder(
    parse_float=_Num, parse_int=_Num, parse_constant=_SPECIAL.__getitem__, object_pairs_hook=_pairs
)


class _Kinded:
    """One input field over rows decoded in Python: each value by JSON kind, so the typed
    converters (the same as for Arrow columns) apply to each kind."""

    def __init__(self, values: list) -> None:
        n = len(values)
        self.n = n
        self.kinds = np.empty(n, np.int8)
        groups: dict[int, list] = {k: [] for k in range(6)}
        for i, v in enumerate(values):
            if v is None:
                k = _K_NULL
            elif v is True or v is False:
                k = _K_BOOL
            elif isinstance(v, _Num):
                k = _K_NUMBER
            elif isinstance(v, str):
                k = _K_STRING if _utf8_ok(v) else _K_OTHER
            elif isinstance(v, float):
                k = _K_SPECIAL
            else:
                k = _K_OTHER
            self.kinds[i] = k
            groups[k].append(v)
        self.groups = groups

    def convert(self, dt: str) -> tuple[Values, np.ndarray | None]:
        n = self.n
        codes = _codes(n)
        codes[self.kinds == _K_NULL] = NULL
        codes[self.kinds == _K_OTHER] = TYPE
        pieces = []
        for kind, arrow_type in (
            (_K_BOOL, pa.bool_()),
            (_K_NUMBER, pa.large_string()),
            (_K_STRING, pa.large_string()),
            (_K_SPECIAL, pa.float64()),
        ):
            vals = self.groups[kind]
            if not vals:
                continue
            idx = np.flatnonzero(self.kinds == kind)
            arr = pa.array(vals, arrow_type)
            v, c = _from_number_text(arr, dt) if kind == _K_NUMBER else convert(arr, dt)
            if c is not None:
                codes[idx] = c
            pieces.append((idx, v))
        return _assemble(n, dt, pieces), codes


def _utf8_ok(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from \\ud800 escapes
        return False
    return True


def _assemble(n: int, dt: str, pieces: list[tuple[np.ndarray, Values]]) -> Values:
    """Values of ``n`` rows from ``(row indexes, values)`` pieces (other rows: arbitrary)."""
    if dt != "string":
        out = np.zeros(n, np.dtype(dt))
        for idx, v in pieces:
            out[idx] = v
        return out
    rows = [np.arange(0)] + [idx for idx, _ in pieces]
    vals = [pa.nulls(0, pa.large_string())] + [v for _, v in pieces]
    covered = np.concatenate(rows)
    missing = np.setdiff1d(np.arange(n), covered)
    rows.append(missing)
    vals.append(pa.nulls(len(missing), pa.large_string()))
    order = np.argsort(np.concatenate(rows), kind="stable")
    return pa.concat_arrays(vals).take(pa.array(order))


# -- conform: converted columns -> good table + reasons ----------------------------------------
Source = pa.Array | pa.ChunkedArray | _Kinded | None


def _conform(
    plan: Plan, source: Callable[[Target], Source], n: int, key_messages: bool = False
) -> tuple[pa.Table | None, np.ndarray | None, list[str]]:
    """Convert every target; returns (good table, per-row message id (0 = good; None if all
    good), messages)."""
    outs: dict[str, Values] = {}
    reason: np.ndarray | None = None
    messages: list[str] = []
    ids: dict[tuple[str, int], int] = {}
    for tg in plan.targets:
        src = source(tg)
        if src is None:
            values, codes = _empty(tg.dtype, n), _codes(n, MISSING)
        elif isinstance(src, _Kinded):
            values, codes = src.convert(tg.dtype)
        else:
            values, codes = convert(src, tg.dtype)
        outs[tg.name] = values
        if codes is None:
            continue
        if reason is None:
            reason = np.zeros(n, np.int32)
        for code in np.unique(codes[codes != OK]).tolist():
            mid = ids.get((tg.name, code))
            if mid is None:
                messages.append(_message(tg, code, key_messages and tg.key))
                mid = ids[(tg.name, code)] = len(messages)
            reason[(codes == code) & (reason == 0)] = mid
    ok = None
    if reason is not None:
        ok = reason == 0
        if ok.all():
            reason, ok = None, None
    cols = []
    for tg in plan.targets:
        v = outs[tg.name]
        if ok is not None:
            v = v.filter(pa.array(ok)) if isinstance(v, pa.Array) else v[ok]
        cols.append(v if isinstance(v, pa.Array) else pa.array(v))
    if ok is not None and not ok.any():
        return None, reason, messages
    return pa.Table.from_arrays(cols, schema=plan.schema), reason, messages


def _message(tg: Target, code: int, message_key: bool) -> str:
    if message_key:
        return "empty message key" if code == NULL else f"message key is not an {tg.dtype}"
    f = tg.field
    if code == NULL:
        return "null key" if tg.key else f"null field {f!r}"
    if code == NONFINITE:
        return f"non-finite field {f!r}"
    if code == RANGE:
        return f"field {f!r}: out of range for {tg.dtype}"
    if code == FRACTION:
        return f"field {f!r}: not an integer"
    if code == MISSING:
        return f"missing field {f!r}"
    return f"field {f!r}: cannot convert to {tg.dtype}"


def _reasons(reason: np.ndarray, messages: list[str], idx: np.ndarray) -> list[str]:
    return np.array(messages, dtype=object)[reason[idx] - 1].tolist()


# -- typed (Arrow) input ------------------------------------------------------------------------
def _to_table(batch: pa.RecordBatch | pa.Table | Mapping) -> pa.Table:
    if isinstance(batch, pa.Table):
        return batch
    if isinstance(batch, pa.RecordBatch):
        return pa.Table.from_batches([batch])
    return pa.table(dict(batch))


def decode_arrow(plan: Plan, batch: pa.RecordBatch | pa.Table | Mapping, keys=None) -> Decoded:
    """Decode typed columns (any Arrow types) by the rules. A batch missing an input column
    dead-letters every row with ``missing field 'x'``. ``keys``: message keys (strings) when
    the plan takes the key from the message."""
    table = _to_table(batch)
    n = table.num_rows
    if n == 0:
        return Decoded(None, np.arange(0), np.arange(0), [])
    if plan.is_decoded(table):
        return Decoded(table, np.arange(n), np.arange(0), [])
    names = set(table.column_names)
    missing = [f for f in plan.fields if f not in names]
    if missing:
        return Decoded(None, np.arange(0), np.arange(n), [f"missing field {missing[0]!r}"] * n)

    def source(tg: Target) -> Source:
        if tg.key and plan.key_from_message:
            return keys
        return table.column(tg.field)

    good, reason, messages = _conform(plan, source, n, key_messages=plan.key_from_message)
    if reason is None:
        return Decoded(good, np.arange(n), np.arange(0), [])
    dead = np.flatnonzero(reason)
    return Decoded(good, np.flatnonzero(reason == 0), dead, _reasons(reason, messages, dead))


# -- JSON input ---------------------------------------------------------------------------------
def decode_payloads(
    plan: Plan,
    payloads: Sequence[bytes],
    keys: Sequence[str | None] | None = None,
    max_bytes: int | None = None,
) -> Decoded:
    """Decode one JSON object per payload (Pulsar messages). ``keys``: the message keys, one
    per payload, when the plan takes the key from the message. Indexes are payload indexes."""
    n = len(payloads)
    lengths = np.fromiter(map(len, payloads), np.int64, n)
    ends = np.cumsum(lengths + 1) - 1
    data = np.frombuffer(b"\n".join(payloads), np.uint8)  # parsed in place when all are good
    key_arr = None
    if keys is not None:
        key_arr = pa.array([k or None for k in keys], pa.large_string())
    return decode_json(plan, data, ends - lengths, ends, key_arr, max_bytes, what="payload")


def decode_json(
    plan: Plan,
    data: np.ndarray,
    starts: np.ndarray,
    ends: np.ndarray,
    keys: pa.Array | None = None,
    max_bytes: int | None = None,
    skip_blank: bool = False,
    what: str = "payload",
) -> Decoded:
    """Decode the JSON items ``data[starts[i]:ends[i]]`` (one object each). Items that are
    not exactly one object are dead (framing scan); the others are parsed by Arrow in bulk
    against the plan's wire schema, and only the lines Arrow refuses are decoded in Python
    (see ``_bulk``). ``skip_blank``: whitespace-only items are skipped (NDJSON lines).

    When every item is good or blank, holds no raw CR/LF and is followed by a newline in
    ``data`` (NDJSON blocks, payloads joined with newlines), Arrow parses ``data`` in place;
    otherwise the good items are first copied to a fresh buffer, one per line."""
    n = len(starts)
    if n == 0:
        return Decoded(None, np.arange(0), np.arange(0), [])
    starts = np.asarray(starts, np.int64)
    ends = np.asarray(ends, np.int64)
    too_long = None
    if max_bytes is not None:
        too_long = (ends - starts) > max_bytes
        if too_long.any():
            ends = np.where(too_long, starts, ends)
        else:
            too_long = None
    status = np.empty(n, np.int8)
    newlines = np.empty(n, np.bool_)
    ktext.scan_json_items(data, starts, ends, status, newlines)
    if too_long is not None:
        status[too_long] = _TOO_LONG
    good = status == ktext.OK
    items = np.flatnonzero(good)  # item of each good line
    n_good = len(items)

    # bulk parse; the lines Arrow refuses go to the fallback
    parsed: list[tuple[int, int, pa.Table]] = []
    fallback: list[int] = []
    if n_good:
        in_place = bool(((status == ktext.OK) | (status == ktext.EMPTY)).all()) and not bool(
            (newlines & good).any()
        )
        if in_place and n > 1:  # items are separated by exactly a \n or \r\n
            gap = starts[1:] - ends[:-1]
            lf = data[np.maximum(starts[1:] - 1, 0)] == 10
            cr = data[np.minimum(ends[:-1], len(data) - 1)] == 13
            in_place = bool((lf & ((gap == 1) | ((gap == 2) & cr))).all())
        if in_place:
            buf = data
            lines = np.append(starts[items], ends[items[-1]])
        else:
            buf = np.empty(int((ends[items] - starts[items]).sum()) + n_good, np.uint8)
            lines = np.empty(n_good + 1, np.int64)
            lines[n_good] = ktext.compact_json_items(data, starts, ends, status, buf, lines)
        _bulk(plan, buf, lines, 0, n_good, parsed, fallback)

    # conform the bulk rows (typed) and the fallback rows (Python) with the same converters
    good_tables: list[pa.Table] = []
    good_items: list[np.ndarray] = []
    dead_items: list[np.ndarray] = [np.flatnonzero((status != ktext.OK) & (status != ktext.EMPTY))]
    dead_reasons: list[list[str]] = [
        [_scan_reason(int(s), what, max_bytes) for s in status[dead_items[0]]]
    ]
    blank = np.flatnonzero(status == ktext.EMPTY)
    if not skip_blank:
        dead_items.append(blank)
        dead_reasons.append([f"empty {what}"] * len(blank))
    if parsed:
        lines = np.concatenate([np.arange(lo, hi) for lo, hi, _ in parsed])
        wire = pa.concat_tables([t for _, _, t in parsed]) if len(parsed) > 1 else parsed[0][2]
        it = items[lines]
        _collect(
            plan,
            wire.column,
            len(lines),
            it,
            keys,
            good_tables,
            good_items,
            dead_items,
            dead_reasons,
        )
    if fallback:
        fb_items = items[np.asarray(fallback, np.int64)]
        rows, ok_items, errs = [], [], []
        for item in fb_items.tolist():
            text = data[starts[item] : ends[item]].tobytes()
            obj, err = _loads(text, plan)
            if err is None:
                rows.append(obj)
                ok_items.append(item)
            else:
                errs.append((item, err))
        if errs:
            dead_items.append(np.array([i for i, _ in errs], np.int64))
            dead_reasons.append([e for _, e in errs])
        if rows:
            cols = {f: _Kinded([r.get(f) for r in rows]) for f in plan.fields}
            _collect(
                plan,
                cols.__getitem__,
                len(rows),
                np.array(ok_items, np.int64),
                keys,
                good_tables,
                good_items,
                dead_items,
                dead_reasons,
            )

    dead = np.concatenate(dead_items)
    reasons = [r for rs in dead_reasons for r in rs]
    if len(dead) and (len(dead_items) > 1):
        order = np.argsort(dead, kind="stable")
        dead = dead[order]
        reasons = [reasons[i] for i in order.tolist()]
    if not good_tables:
        return Decoded(None, np.arange(0), dead, reasons)
    rows_idx = np.concatenate(good_items)
    table = good_tables[0] if len(good_tables) == 1 else pa.concat_tables(good_tables)
    if len(good_tables) > 1:
        order = np.argsort(rows_idx, kind="stable")
        rows_idx = rows_idx[order]
        table = table.take(pa.array(order))
    return Decoded(table, rows_idx, dead, reasons)


def _scan_reason(code: int, what: str, max_bytes: int | None) -> str:
    if code == _TOO_LONG:
        return f"{what} exceeds {max_bytes} bytes"
    if code == ktext.EMPTY:
        return f"empty {what}"
    return _SCAN_REASONS[code]


def _bulk(plan, buf, lines, lo, hi, parsed, fallback) -> None:
    """Parse lines ``lo:hi`` (``buf[lines[lo]:lines[hi]]``, one JSON object each) into
    ``parsed`` as ``(lo, hi, table)`` ranges, and put the lines Arrow refuses in ``fallback``.

    The slice is parsed as one Arrow block, so a parse error names the row it stopped at:
    the rows before it are parsed again (they were fine up to there), that line goes to the
    fallback and parsing goes on after it, so k bad lines cost about two passes over the
    data. A conversion error (no row, e.g. 1.5 for an int64) splits the range in ``_SPLIT``
    parts; a range of at most ``_FALLBACK_LINES`` lines goes to the fallback whole."""
    while lo < hi:
        chunk = pa.py_buffer(buf[lines[lo] : lines[hi]])
        read = pajson.ReadOptions(block_size=chunk.size + 1, use_threads=False)
        try:
            t = pajson.read_json(
                pa.BufferReader(chunk), read_options=read, parse_options=plan.parse_options
            )
            if t.num_rows == hi - lo:  # one row per line: each holds one object (scanned)
                parsed.append((lo, hi, t))
                return
            row = None
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:
            m = _ROW.search(str(e))
            row = int(m.group(1)) if m else None
        if row is None or not 0 <= row < hi - lo:
            break
        if row:
            _bulk(plan, buf, lines, lo, lo + row, parsed, fallback)
        fallback.append(lo + row)
        lo += row + 1
    else:
        return
    if hi - lo <= _FALLBACK_LINES:
        fallback.extend(range(lo, hi))
        return
    cuts = np.unique(np.linspace(lo, hi, _SPLIT + 1).astype(np.int64)).tolist()
    for a, b in itertools.pairwise(cuts):
        _bulk(plan, buf, lines, a, b, parsed, fallback)


def _loads(text: bytes, plan: Plan) -> tuple[dict | None, str | None]:
    try:
        obj = _DECODER.decode(text.decode("utf-8"))
    except json.JSONDecodeError as e:
        return None, f"invalid JSON: {e.msg}"
    except RecursionError:
        return None, "invalid JSON: nested too deeply"
    except (ValueError, UnicodeDecodeError) as e:
        return None, f"invalid JSON: {e}"
    if not isinstance(obj, dict):
        return None, "not a JSON object"
    if obj.dups:
        dup = [f for f in plan.fields if f in obj.dups]
        if dup:
            return None, f"duplicate field {dup[0]!r}"
    return obj, None


def _collect(plan, column, n, items, keys, good_tables, good_items, dead_items, dead_reasons):
    """Conform ``n`` rows (input columns from ``column(field)``) that came from ``items``."""
    key_rows = None
    if plan.key_from_message:
        key_rows = keys.take(pa.array(items))

    def source(tg: Target) -> Source:
        if tg.key and plan.key_from_message:
            return key_rows
        return column(tg.field)

    good, reason, messages = _conform(plan, source, n, key_messages=plan.key_from_message)
    if reason is None:
        good_tables.append(good)
        good_items.append(items)
        return
    ok = reason == 0
    if good is not None:
        good_tables.append(good)
        good_items.append(items[ok])
    dead = np.flatnonzero(~ok)
    dead_items.append(items[dead])
    dead_reasons.append(_reasons(reason, messages, dead))


# -- raw JSON batches (NDJSON lines through the engine) ---------------------------------------
def json_batch(data: bytes, offsets: np.ndarray, extra: Mapping[str, pa.Array] | None = None):
    """A raw JSON batch over ``data`` (zero-copy): item ``i`` is
    ``data[offsets[i]:offsets[i+1]]``. ``extra`` columns (e.g. ``__offset``, ``__error``) ride
    along and are kept in dead letters."""
    n = len(offsets) - 1
    arr = pa.Array.from_buffers(
        pa.large_binary(),
        n,
        [None, pa.py_buffer(np.ascontiguousarray(offsets, np.int64)), pa.py_buffer(data)],
    )
    cols = {RAW_JSON: arr, **(extra or {})}
    return pa.RecordBatch.from_pydict(cols)


def decode_batch(
    plan: Plan, batch: pa.RecordBatch | pa.Table | Mapping
) -> tuple[pa.Table | None, pa.RecordBatch | None]:
    """(good events, dead letters) of a typed batch or a raw JSON batch (column ``__json``).
    Dead letters keep the original columns plus ``reason``; for raw JSON the item text (cut
    to ``DEAD_TEXT_BYTES``) is in column ``json`` and the ``__json`` column is dropped."""
    table = _to_table(batch)
    if table.num_rows == 0:
        return None, None
    if RAW_JSON not in table.column_names:
        res = decode_arrow(plan, table)
        if not len(res.dead):
            return res.table, None
        dead = table.take(pa.array(res.dead))
        dead = dead.append_column("reason", pa.array(res.reasons, pa.string()))
        return res.table, _one_batch(dead)
    raw = _one_array(table.column(RAW_JSON))
    data, offsets, valid = _string_buffers(raw)
    starts, ends = offsets[:-1], offsets[1:]
    if len(data):  # an item's own line terminator (\n or \r\n) is not part of it
        last = np.maximum(ends - 1, 0)
        ends = ends - ((ends > starts) & (data[last] == 10))
        last = np.maximum(ends - 1, 0)
        ends = ends - ((ends > starts) & (data[last] == 13))
    forced = None
    if RAW_ERROR in table.column_names:
        err = _one_array(table.column(RAW_ERROR))
        forced = np.flatnonzero(~np.asarray(err.is_null().to_numpy(zero_copy_only=False)))
    skip = ~valid
    if forced is not None and len(forced):
        skip[forced] = True
    if skip.any():
        ends = np.where(skip, starts, ends)
    res = decode_json(plan, data, starts, ends, skip_blank=True, what="line")
    dead, reasons = res.dead, res.reasons
    if forced is not None and len(forced):
        errs = err.take(pa.array(forced)).to_pylist()
        dead = np.concatenate([dead, forced])
        reasons = reasons + errs
        order = np.argsort(dead, kind="stable")
        dead = dead[order]
        reasons = [reasons[i] for i in order.tolist()]
    if not len(dead):
        return res.table, None
    take = pa.array(dead)
    cols = {c: table.column(c).take(take) for c in table.column_names if c not in _RAW}
    cols["json"] = pa.array(
        [
            bytes(data[offsets[i] : min(offsets[i + 1], offsets[i] + DEAD_TEXT_BYTES)])
            .decode("utf-8", "replace")
            .rstrip("\r\n")
            for i in dead.tolist()
        ],
        pa.string(),
    )
    cols["reason"] = pa.array(reasons, pa.string())
    return res.table, _one_batch(pa.table(cols))


def _one_array(col: pa.ChunkedArray) -> pa.Array:
    """The column as one array (zero-copy when it has one chunk)."""
    return col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()


def _one_batch(t: pa.Table) -> pa.RecordBatch:
    return t.combine_chunks().to_batches()[0]


def warm_up() -> None:
    """Compile (or load from numba's cache) the text kernels."""
    p = plan("k", "int64", {"x": "float32", "s": "string"})
    good = [b'{"k": 1, "x": 1.5, "s": "a"}', b'{"k": "2", "x": "1"}']
    decode_payloads(p, good)
    decode_payloads(p, [*good, b"x"])
    lines = b"\n".join(good)
    decode_batch(p, json_batch(lines, np.array([0, len(good[0]) + 1, len(lines)], np.int64)))
