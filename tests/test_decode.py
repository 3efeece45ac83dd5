"""The one decoder (vecswim.decode) against an independent reference in plain Python.

The reference reads every item with ``json.loads`` (numbers kept as their text), checks the
framing explicitly and applies the documented cast rules with Python's exact integers,
``float(text)`` and ``struct.pack("f")``. Random mixes of good and malformed items (Pulsar
payload lists, NDJSON files, typed Arrow batches) must decode to exactly the reference's good
rows and dead reasons, with count in = good + dead and message keys paired with their own
messages.
"""

from __future__ import annotations

import json
import math
import re
import struct
import time

import numpy as np
import pulsar
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import vecswim as vs
from vecswim import decode, pulsar_io
from vecswim.deadletter import validate_events
from vecswim.sources import FileSource

# -- the reference ------------------------------------------------------------------------------
RANGES = {
    "int8": (-(2**7), 2**7 - 1),
    "int16": (-(2**15), 2**15 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "int64": (-(2**63), 2**63 - 1),
    "uint8": (0, 2**8 - 1),
    "uint16": (0, 2**16 - 1),
    "uint32": (0, 2**32 - 1),
}
NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?\Z")
INTEGER = re.compile(r"-?(0|[1-9][0-9]*)\Z")


class Dead(Exception):
    pass


class Text(str):
    """A JSON number literal, as written."""


def ref_cast(v, dt: str, typed_int: bool = False):
    """The documented rule for one value; raises Dead(code)."""
    if v is None:
        raise Dead("null")
    if isinstance(v, bool):
        if dt == "bool":
            return v
        raise Dead("type")
    if isinstance(v, str) and not isinstance(v, Text):
        if dt == "string":
            return v
        if dt == "bool" and v in ("true", "false"):
            return v == "true"
        if not NUMBER.match(v):
            raise Dead("type")
        v = Text(v)
    if isinstance(v, Text):
        if INTEGER.match(v):
            i = int(v)
            if dt in ("float32", "float64"):
                return ref_cast(float(v), dt)  # the correctly rounded double of the text
            return ref_cast(i, dt)
        if dt == "string":
            raise Dead("type")
        return ref_cast(float(v), dt)
    if isinstance(v, int):
        if dt == "string":
            if typed_int or RANGES["int64"][0] <= v <= RANGES["int64"][1]:
                return str(v)
            raise Dead("range")
        if dt == "bool":
            if v in (0, 1):
                return bool(v)
            raise Dead("range")
        if dt in ("float32", "float64"):
            try:
                return ref_cast(float(v), dt)
            except OverflowError:
                raise Dead("nonfinite") from None
        lo, hi = RANGES[dt]
        if not lo <= v <= hi:
            raise Dead("range")
        return v
    if isinstance(v, float):
        if dt == "string":
            raise Dead("type")
        if not math.isfinite(v):
            raise Dead("nonfinite")
        if dt == "float64":
            return v
        if dt == "float32":
            try:
                return struct.unpack("<f", struct.pack("<f", v))[0]
            except OverflowError:
                raise Dead("range") from None
        if dt == "bool":
            if v in (0.0, 1.0):
                return v == 1.0
            raise Dead("range")
        if not v.is_integer():
            raise Dead("fraction")
        lo, hi = RANGES[dt]
        if not lo <= v <= hi:
            raise Dead("range")
        return int(v)
    raise Dead("type")  # list, dict


def ref_reason(code: str, field: str, dt: str, key: bool, message_key: bool = False) -> str:
    if message_key:
        return "empty message key" if code == "null" else f"message key is not an {dt}"
    return {
        "null": "null key" if key else f"null field {field!r}",
        "nonfinite": f"non-finite field {field!r}",
        "range": f"field {field!r}: out of range for {dt}",
        "fraction": f"field {field!r}: not an integer",
        "type": f"field {field!r}: cannot convert to {dt}",
    }[code]


def ref_row(get, outputs, key, key_dt, message_key=None, typed=False):
    """(row, None) or (None, reason) for one record; ``get(field)`` gives the input value."""
    row = {}
    targets = [(key, key, key_dt, True)] + [(o, f, d, False) for o, (f, d) in outputs.items()]
    for name, field, dt, is_key in targets:
        from_message = is_key and message_key is not None
        v = message_key[0] if from_message else get(field)
        if from_message and v == "":
            v = None
        try:
            row[name] = ref_cast(v, dt, typed_int=typed and isinstance(v, int))
        except Dead as d:
            return None, ref_reason(str(d), field, dt, is_key, from_message)
    return row, None


def _object(pairs):
    seen, dups = set(), set()
    for k, _ in pairs:
        (dups if k in seen else seen).add(k)
    return dict(pairs), dups


def ref_frame(s: str) -> str | None:
    """The framing rule, stated plainly: after optional whitespace an object starts, its
    brackets (counted outside strings) close, and only whitespace follows; strings hold no
    raw control characters. Returns the dead reason or None."""
    depth, in_str, esc, done, seen = 0, False, False, False, False
    for ch in s:
        if in_str:
            if ord(ch) < 0x20:
                return "invalid JSON: control character in a string"
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
            continue
        if ch in " \t\r\n":
            continue
        if done:
            return "more than one JSON value"
        if not seen:
            seen = True
            if ch != "{":
                return "not a JSON object"
        if ch == '"':
            in_str = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            done = depth == 0
    if not seen:
        return "empty"
    return None if done else "truncated JSON"


def ref_item(text: bytes, outputs, key, key_dt, message_key=None, what="payload"):
    """The reference for one JSON item: ("ok", row) | ("dead", reason) | ("skip", reason)."""
    try:
        s = text.decode("utf-8")
    except UnicodeDecodeError:
        return "dead", "invalid UTF-8"
    framing = ref_frame(s)
    if framing == "empty":
        return "skip" if what == "line" else "dead", f"empty {what}"
    if framing is not None:
        return "dead", framing
    dec = json.JSONDecoder(
        parse_int=Text,
        parse_float=Text,
        parse_constant=lambda c: float(c.replace("Infinity", "inf")),
    )
    try:
        obj = dec.decode(s)
    except json.JSONDecodeError as e:
        return "dead", f"invalid JSON: {e.msg}"
    _, dups = json.JSONDecoder(object_pairs_hook=_object).decode(s)
    wanted = ([] if message_key is not None else [key]) + [f for f, _ in outputs.values()]
    for f in dict.fromkeys(wanted):
        if f in dups:
            return "dead", f"duplicate field {f!r}"
    row, reason = ref_row(obj.get, outputs, key, key_dt, message_key)
    return ("ok", row) if reason is None else ("dead", reason)


# -- generated input ------------------------------------------------------------------------
INT_TEXTS = [
    "0",
    "-0",
    "1",
    "-1",
    "127",
    "128",
    "-128",
    "-129",
    "255",
    "256",
    "4294967295",
    "4294967296",
    "9007199254740993",
    "-9007199254740993",
    "9223372036854775807",
    "9223372036854775808",
    "-9223372036854775808",
    "-9223372036854775809",
    "18446744073709551615",
    "99999999999999999999999",
]
FLOAT_TEXTS = [
    "1.0",
    "1.5",
    "-0.0",
    "1e3",
    "2.5e-1",
    "0.1",
    "1e30",
    "-1e30",
    "3.4028235e38",
    "3.4028236e38",
    "3.5e38",
    "1e999",
    "-1e999",
    "1e-400",
    "9007199254740993.0",
    "127.0",
    "300.5",
    "1E2",
]
SPECIAL_TEXTS = ["NaN", "Infinity", "-Infinity"]
STRINGS = ["abc", "12", "-7", "1.5", "1.0", " 12", "+1", "007", "0x10", "nan", "", "true", "false",
           "é☃", "a\\u0000b", "1e3"]  # fmt: skip


def number_text():
    return st.one_of(
        st.sampled_from(INT_TEXTS + FLOAT_TEXTS + SPECIAL_TEXTS),
        st.integers(-(2**70), 2**70).map(str),
        st.floats(allow_nan=False, allow_infinity=False).map(repr),
    )


def json_value():
    """(JSON text of a member value) for a field."""
    return st.one_of(
        number_text(),
        st.sampled_from(STRINGS).map(lambda s: '"' + s + '"'),
        st.text(max_size=5).map(lambda s: json.dumps(s, ensure_ascii=False)),
        st.sampled_from(["true", "false", "null", "[1, 2]", '{"a": 1}', "[]"]),
    )


FIELDS = {"n": "int8", "u": "uint8", "x": "float32", "d": "float64", "b": "bool", "s": "string"}


@st.composite
def good_object(draw, fields, key, with_key=True, allow_newlines=True):
    members = []
    names = ([key] if with_key else []) + list(fields)
    for f in names:
        mode = draw(st.sampled_from(["value", "value", "value", "absent"]))
        if mode == "absent":
            continue
        members.append((f, draw(json_value())))
    members.append(("extra", draw(st.sampled_from(['"zzz"', "[1, {}]", "1e999", "null"]))))
    draw(st.randoms()).shuffle(members)
    sep = draw(st.sampled_from([", ", ",", ",\n  " if allow_newlines else ", "]))
    body = "{" + sep.join(f'"{k}": {v}' for k, v in members) + "}"
    pad = draw(st.sampled_from(["", " ", "\t", "\n " if allow_newlines else "  "]))
    return (pad + body + pad).encode()


@st.composite
def item(draw, fields, key, with_key=True, lines=False):
    """One payload/line: mostly objects, plus every kind of malformed input."""
    good = good_object(fields, key, with_key, allow_newlines=not lines)
    kind = draw(
        st.sampled_from(
            ["good"] * 6
            + ["two", "comma", "blank", "truncated", "array", "scalar", "garbage"]
            + ["utf8", "control", "duplicate", "tail"]
            + ([] if lines else ["two_lines", "empty"])
        )
    )
    if kind == "good":
        return draw(good)
    a, b = draw(good).strip(), draw(good).strip()
    return {
        "two": a + b,
        "two_lines": a + b"\n" + b,
        "comma": a + b", " + b,
        "blank": draw(st.sampled_from([b" ", b"   ", b"\t", b"\r"])),
        "empty": b"",
        "truncated": a[: draw(st.integers(1, len(a) - 1))],
        "array": b"[" + a + b"]",
        "scalar": draw(st.sampled_from([b"42", b'"s"', b"null", b"true"])),
        "garbage": draw(
            st.sampled_from([b'{"n": }', b"{'n': 1}", b'{"n" 1}', b"{,}", b'{"a":1,}'])
        ),
        "utf8": a[:-1] + b', "bad": "\xff\xfe"}',
        "control": a[:-1] + b', "t": "a\tb"}',
        "duplicate": a[:-1] + b', "' + (key if with_key else "n").encode() + b'": 5}',
        "tail": a + b" x",
    }[kind]


def plan_outputs(fields):
    return {f: (f, dt) for f, dt in fields.items()}


# -- Pulsar-style payload lists -------------------------------------------------------------
@settings(max_examples=150)
@given(st.data())
def test_payloads_decode_exactly_like_the_reference(data):
    key_dt = data.draw(st.sampled_from(["int64", "string"]))
    fields = data.draw(st.dictionaries(st.sampled_from(list(FIELDS)), st.none(), max_size=6))
    fields = {f: FIELDS[f] for f in fields}
    payloads = data.draw(st.lists(item(fields, "k"), max_size=40))
    plan = decode.plan("k", key_dt, fields)
    res = decode.decode_payloads(plan, payloads, max_bytes=10_000)
    expected = [ref_item(p, plan_outputs(fields), "k", key_dt) for p in payloads]
    good = [(i, row) for i, (s, row) in enumerate(expected) if s == "ok"]
    dead = [(i, why) for i, (s, why) in enumerate(expected) if s == "dead"]
    got_rows = res.table.to_pylist() if res.table is not None else []
    assert [_canon(r) for r in got_rows] == [_canon(r) for _, r in good]
    assert res.rows.tolist() == [i for i, _ in good]
    assert res.bad == dead
    assert len(res.rows) + len(res.dead) == len(payloads)


@settings(max_examples=100)
@given(st.data())
def test_message_keys_pair_with_their_own_payloads(data):
    fields = {"x": "float32", "n": "int8"}
    n = data.draw(st.integers(0, 30))
    payloads = [data.draw(item(fields, "k", with_key=False)) for _ in range(n)]
    keys = [
        data.draw(
            st.one_of(
                st.integers(-(2**63), 2**63 - 1).map(str),
                st.sampled_from(["", "007", "1.5", "1e3", "abc", "9223372036854775808", "-0"]),
            )
        )
        for _ in range(n)
    ]
    plan = decode.plan("k", "int64", fields, key_from_message=True)
    res = decode.decode_payloads(plan, payloads, keys, max_bytes=10_000)
    expected = [
        ref_item(p, plan_outputs(fields), "k", "int64", message_key=(k,))
        for p, k in zip(payloads, keys, strict=True)
    ]
    good = [(i, row) for i, (s, row) in enumerate(expected) if s == "ok"]
    got = res.table.to_pylist() if res.table is not None else []
    assert [_canon(r) for r in got] == [_canon(r) for _, r in good]
    assert res.rows.tolist() == [i for i, _ in good]
    assert res.bad == [(i, why) for i, (s, why) in enumerate(expected) if s == "dead"]
    for row, i in zip(got, res.rows.tolist(), strict=True):  # each row carries its own key
        assert row["k"] == ref_cast(keys[i], "int64")


def test_zero_and_two_object_payloads_next_to_each_other_never_shift_rows():
    """Issue 11: a two-object payload followed by a whitespace-only one (2 + 0 rows) used to
    be applied as two events, and with message keys a row took another message's key."""
    one = b'{"x": 1.0}'
    payloads = [one, one + one, b"  \n ", b'{"x": 2.0}', b"", b'{"x": 3.0}\n{"x": 4.0}', one]
    keys = ["1", "2", "3", "4", "5", "6", "7"]
    plan = decode.plan("k", "int64", {"x": "float32"}, key_from_message=True)
    table, bad = pulsar_io.decode_json(payloads, plan, 1 << 20, keys)
    assert table.to_pylist() == [{"k": 1, "x": 1.0}, {"k": 4, "x": 2.0}, {"k": 7, "x": 1.0}]
    assert bad == [
        (1, "more than one JSON value"),
        (2, "empty payload"),
        (4, "empty payload"),
        (5, "more than one JSON value"),
    ]


# -- the Pulsar source end to end, on the real broker --------------------------------------
@pytest.mark.pulsar
def test_pulsar_source_pairs_message_keys_and_dead_letters_bad_payloads(pulsar_broker):
    """On a real broker: two JSON objects in one message next to a whitespace-only one, an
    uncastable value: each bad message is dead-lettered with its reason and its own key, and
    the good rows keep their own message keys."""
    import uuid

    url = pulsar_broker.service_url
    t_in = f"persistent://public/default/pairs-{uuid.uuid4().hex[:8]}"
    t_dlq = f"{t_in}-dlq"
    at = vs.AgentType("a", key="id", columns=[vs.Column("x", "float32", vs.latest("x"))])
    one = b'{"x": 1.0}'
    bodies = [one, one + one, b"   ", b'{"x": 2.0}', b'{"x": "hot"}', one]
    pub = pulsar_io.EventPublisher(url, t_in, "id")
    for i, b in enumerate(bodies):
        pub.send_raw(b, key=str(10 + i))
    pub.close()
    src = pulsar_io.PulsarSource(
        url, at, {"x": "float32"}, topics=t_in, key_from="message", dlq_topic=t_dlq
    )
    rows = []
    deadline = time.monotonic() + 60
    while src.counts["messages"] < len(bodies):
        assert time.monotonic() < deadline, src.counts
        got = src.poll(100, 0.05)
        if got:
            rows += got["a"].select(["id", "x"]).to_pylist()
    src.commit()  # publishes the dead letters (after the tick, as the engine does)
    src.close()
    assert rows == [{"id": 10, "x": 1.0}, {"id": 13, "x": 2.0}, {"id": 15, "x": 1.0}]
    assert src.counts["events"] + src.counts["dead_messages"] == len(bodies)
    c = pulsar_io.client(url)
    reader = c.create_reader(t_dlq, pulsar.MessageId.earliest)
    dead = []
    while reader.has_message_available():
        m = reader.read_next(5000)
        dead.append((m.data(), m.properties()["reason"], m.partition_key()))
    c.close()
    assert dead == [
        (one + one, "more than one JSON value", "11"),
        (b"   ", "empty payload", "12"),
        (b'{"x": "hot"}', "field 'x': cannot convert to float32", "14"),
    ]


# -- NDJSON files ----------------------------------------------------------------------------
@settings(max_examples=60)
@given(st.data())
def test_ndjson_files_decode_exactly_like_the_reference(tmp_path_factory, data):
    fields = {"n": "int8", "x": "float32", "s": "string"}
    key_dt = data.draw(st.sampled_from(["int64", "string"]))
    lines = data.draw(st.lists(item(fields, "k", lines=True), max_size=40))
    lines = [ln for ln in lines if b"\n" not in ln and b"\r" not in ln]
    truncated_tail = data.draw(st.booleans())
    chunk = data.draw(st.sampled_from([64, 200, 1 << 20]))
    body = b"".join(ln + b"\n" for ln in lines)
    if truncated_tail:
        body += b'{"k": 1, "n": 2'
        lines.append(b'{"k": 1, "n": 2')
    path = tmp_path_factory.mktemp("nd") / "ev.ndjson"
    path.write_bytes(body)
    at = vs.AgentType("a", key="k", key_dtype=key_dt, columns=[], fields=fields)
    src = FileSource(path, "a", chunk_bytes=chunk)
    good, dead = [], []
    while (polled := src.poll(7, 0.0)) is not None:
        g, d = validate_events(at, fields, polled["a"])
        good += g.to_pylist() if g is not None else []
        dead += d.select(["json", "reason"]).to_pylist() if d is not None else []
    expected_good, expected_dead = [], []
    for ln in lines:
        if len(ln) > chunk:
            text = ln[: decode.DEAD_TEXT_BYTES].decode("utf-8", "replace")
            expected_dead.append({"json": text, "reason": f"line longer than {chunk} bytes"})
            continue
        s, v = ref_item(ln, plan_outputs(fields), "k", key_dt, what="line")
        if s == "ok":
            expected_good.append(v)
        elif s == "dead":
            expected_dead.append({"json": ln.decode("utf-8", "replace"), "reason": v})
    assert [_canon(r) for r in good] == [_canon(r) for r in expected_good]
    assert dead == expected_dead
    nonblank = [ln for ln in lines if ln.strip(b" \t\r\n")]
    assert len(good) + len(dead) == len(nonblank)


def test_ndjson_int64_keys_beyond_2_53_stay_exact(tmp_path):
    """Defect 1: inferred types made a key column with one float literal a double column,
    so keys above 2**53 landed on other agents, without a dead letter."""
    at = vs.AgentType("a", key="id", columns=[vs.Column("n", "int64", vs.count())])
    keys = [2**53 + 1, 2**53 + 3, 2**63 - 1, -(2**63)]
    lines = [json.dumps({"id": k}) for k in keys] + ['{"id": 5.0}']
    path = tmp_path / "ev.ndjson"
    path.write_text("\n".join(lines) + "\n")
    eng = vs.Engine([at])
    eng.run(vs.FileSource(path, "a"))
    assert sorted(eng.state("a").column("id").to_pylist()) == sorted([*keys, 5])
    assert eng.dead_letters.count == 0


def test_ndjson_malformed_lines_are_dead_letters_and_the_rest_applies(tmp_path):
    """Defect 2: one malformed line (bad JSON, a wrong type, a truncated last line) made the
    whole file fail at open."""
    at = vs.AgentType("a", key="id", columns=[vs.Column("x", "float32", vs.latest("x"))])
    lines = [
        '{"id": 1, "x": 1.5}',
        '{"id": 2, "x": ',
        '{"id": 3, "x": "abc"}',
        "",
        '{"id": 4, "x": 2}',
        '{"id": 18446744073709551615, "x": 1}',
        '{"id": 5, "x": 3',
    ]
    path = tmp_path / "ev.ndjson"
    path.write_text("\n".join(lines))  # the last line is cut short, without a newline
    at_byte = np.cumsum([0] + [len(x) + 1 for x in lines]).tolist()
    eng = vs.Engine([at])
    eng.run(vs.FileSource(path, "a"))
    assert eng.state("a").to_pylist() == [{"id": 1, "x": 1.5}, {"id": 4, "x": 2.0}]
    (dead,) = eng.dead_letters.recent
    got = dead.select(["__offset", "json", "reason"]).to_pylist()
    assert [tuple(r.values()) for r in got] == [
        (at_byte[1], lines[1], "truncated JSON"),
        (at_byte[2], lines[2], "field 'x': cannot convert to float32"),
        (at_byte[5], lines[5], "field 'id': out of range for int64"),
        (at_byte[6], lines[6], "truncated JSON"),
    ]
    assert eng.totals["events"] == 2 and eng.totals["dead_letters"] == 4


def test_one_uncastable_value_dead_letters_only_its_row():
    """Defect 2: a failed cast dead-lettered the whole polled chunk."""
    at = vs.AgentType(
        "a",
        key="id",
        columns=[vs.Column("x", "float32", vs.latest("x")), vs.Column("n", "int8", vs.latest("n"))],
    )
    eng = vs.Engine([at])
    batch = pa.table(
        {
            "id": pa.array([1.0, 1.5, 2.0, 3.0, 4.0], pa.float64()),
            "x": pa.array(["1", "abc", "2.5", "3", "4"]),
            "n": pa.array([1, 2, 3, 300, -128], pa.int64()),
        }
    )
    s = eng.tick({"a": batch})
    assert (s.events, s.dead_letters) == (3, 2)
    assert eng.state("a").to_pylist() == [
        {"id": 1, "x": 1.0, "n": 1},
        {"id": 2, "x": 2.5, "n": 3},
        {"id": 4, "x": 4.0, "n": -128},
    ]
    assert eng.dead_letters.reasons == {
        "field 'id': not an integer": 1,
        "field 'n': out of range for int8": 1,
    }
    (dead,) = eng.dead_letters.recent
    assert dead.column("x").to_pylist() == ["abc", "3"]  # original columns kept


# -- typed Arrow batches ---------------------------------------------------------------------
TYPED = {
    "int64": st.integers(-(2**63), 2**63 - 1),
    "uint64": st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([2**64 - 1, 2**63, 255])),
    "int8": st.integers(-128, 127),
    "float64": st.one_of(
        st.floats(width=64),
        st.sampled_from([1.5, 1.0, -0.0, 2.0**63, -(2.0**63), 1e30, 300.5, 3.5e38, 255.0]),
    ),
    "float32": st.floats(width=32),
    "string": st.one_of(st.sampled_from(STRINGS), st.sampled_from(INT_TEXTS + FLOAT_TEXTS)),
    "bool": st.booleans(),
}


@settings(max_examples=150)
@given(st.data())
def test_typed_batches_cast_per_row_like_the_reference(data):
    n = data.draw(st.integers(1, 25))
    cols, types = {}, {}
    for name in ("k", "p", "q"):
        t = data.draw(st.sampled_from(sorted(TYPED)))
        vals = data.draw(st.lists(st.one_of(st.none(), TYPED[t]), min_size=n, max_size=n))
        arr = pa.array(vals, pa.large_string() if t == "string" else pa.from_numpy_dtype(t))
        if t == "string" and data.draw(st.booleans()):
            arr = arr.dictionary_encode()
        cols[name], types[name] = arr, t
    key_dt = data.draw(st.sampled_from(["int64", "string"]))
    outputs = {
        "p": ("p", data.draw(st.sampled_from([*RANGES, "float32", "float64", "bool"]))),
        "p2": ("p", data.draw(st.sampled_from([*RANGES, "float32", "float64", "bool"]))),
        "q": ("q", data.draw(st.sampled_from(["string", "float32", "uint8", "bool"]))),
    }
    plan = decode.plan("k", key_dt, outputs)
    table = pa.table(cols)
    good, dead = decode.decode_batch(plan, table)
    rows = table.to_pylist()
    expected_good, expected_dead = [], []
    for r in rows:
        row, why = ref_row(r.get, outputs, "k", key_dt, typed=True)
        if why is None:
            expected_good.append(row)
        else:
            expected_dead.append(why)
    got = good.to_pylist() if good is not None else []
    assert [_canon(r) for r in got] == [_canon(r) for r in expected_good]
    assert (dead.column("reason").to_pylist() if dead is not None else []) == expected_dead
    if dead is not None:  # original columns, original types
        assert dead.schema.field("k").type == table.schema.field("k").type


def test_one_field_feeds_several_dtypes_and_any_failed_cast_kills_the_row():
    plan = decode.plan(
        "id", "int64", {"x": ("x", "int8"), "x_sum": ("x", "float64"), "x_on": ("x", "bool")}
    )
    res = decode.decode_payloads(
        plan,
        [
            b'{"id": 1, "x": 1}',
            b'{"id": 2, "x": 0.0}',
            b'{"id": 3, "x": 2}',
            b'{"id": 4, "x": 1.5}',
        ],
    )
    assert res.table.to_pylist() == [
        {"id": 1, "x": 1, "x_sum": 1.0, "x_on": True},
        {"id": 2, "x": 0, "x_sum": 0.0, "x_on": False},
    ]
    assert res.table.schema.types == [pa.int64(), pa.int8(), pa.float64(), pa.bool_()]
    assert res.bad == [(2, "field 'x': out of range for bool"), (3, "field 'x': not an integer")]


def test_missing_column_dead_letters_every_row_and_extra_columns_are_ignored():
    at = vs.AgentType("a", key="id", columns=[vs.Column("x", "float32", vs.latest("x"))])
    good, dead = validate_events(at, {"x": "float32"}, pa.table({"id": [1, 2], "y": [1, 2]}))
    assert good is None
    assert dead.to_pylist() == [
        {"id": 1, "y": 1, "reason": "missing field 'x'"},
        {"id": 2, "y": 2, "reason": "missing field 'x'"},
    ]
    good, dead = validate_events(at, {"x": "float32"}, {"id": [1], "x": [2.0], "y": ["z"]})
    assert dead is None and good.to_pylist() == [{"id": 1, "x": 2.0}]


def test_decoded_batches_pass_through_unchanged():
    plan = decode.plan("id", "int64", {"x": "float32"})
    res = decode.decode_payloads(plan, [b'{"id": 1, "x": 2}'])
    good, dead = decode.decode_batch(plan, res.table)
    assert good is res.table and dead is None


def test_decimal_and_other_arrow_types():
    from decimal import Decimal

    plan = decode.plan("id", "int64", {"x": "int32", "t": "float64"})
    table = pa.table(
        {
            "id": pa.array([1, 2, 3], pa.int64()),
            "x": pa.array(
                [Decimal("1.00"), Decimal("2.50"), Decimal("-3.00")], pa.decimal128(10, 2)
            ),
            "t": pa.array([0, 1, None], pa.timestamp("s")),
        }
    )
    good, dead = decode.decode_batch(plan, table)
    assert good is None
    assert dead.column("reason").to_pylist() == [
        "field 't': cannot convert to float64",
        "field 'x': not an integer",
        "null field 't'",
    ]
    good, dead = decode.decode_batch(plan, table.set_column(2, "t", pa.array([0.5, 1.5, 2.5])))
    assert good.to_pylist() == [{"id": 1, "x": 1, "t": 0.5}, {"id": 3, "x": -3, "t": 2.5}]
    assert dead.column("reason").to_pylist() == ["field 'x': not an integer"]


def test_json_float_parsing_matches_python_exactly():
    """Bulk Arrow parsing and the per-line fallback read a float literal as the correctly
    rounded double (what ``float(text)`` gives)."""
    rng = np.random.default_rng(3)
    values = rng.standard_normal(2000) * 10.0 ** rng.integers(-300, 300, 2000)
    texts = [repr(float(v)) for v in values] + [f"{v:.17e}" for v in rng.standard_normal(500)]
    texts += ["0.1", "9007199254740993", "-0", "123456789012345678901234567890", "2.5e-324"]
    payloads = [f'{{"id": 1, "x": {t}}}'.encode() for t in texts]
    plan = decode.plan("id", "int64", {"x": "float64"})
    bulk = decode.decode_payloads(plan, payloads)
    # a payload the bulk parse refuses makes its small neighbourhood take the Python path
    mixed = decode.decode_payloads(plan, [*payloads[:5], b'{"id": 1, "x": true}'])
    want = [repr(float(t)) for t in texts]
    assert [repr(v) for v in bulk.table.column("x").to_pylist()] == want
    assert [repr(v) for v in mixed.table.column("x").to_pylist()] == want[:5]
    assert mixed.bad == [(5, "field 'x': cannot convert to float64")]


def _canon(row: dict) -> dict:
    return {k: repr(v) if isinstance(v, float) else v for k, v in row.items()}


@pytest.mark.parametrize("fmt", ["parquet", "arrow", "ndjson"])
def test_file_source_positions_resume_exactly(tmp_path, fmt):
    """A FileSource resumed from positions() continues right after what was polled."""
    import pyarrow.ipc as ipc
    import pyarrow.parquet as pq

    t = pa.table({"id": np.arange(1000, dtype=np.int64), "x": np.arange(1000) / 8.0})
    path = tmp_path / f"ev.{'ndjson' if fmt == 'ndjson' else fmt}"
    if fmt == "parquet":
        pq.write_table(t, path, row_group_size=128)
    elif fmt == "arrow":
        with ipc.new_stream(path, t.schema) as w:
            for b in t.to_batches(max_chunksize=97):
                w.write_batch(b)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in t.to_pylist()))
    at = vs.AgentType("a", key="id", columns=[vs.Column("x", "float64", vs.latest("x"))])

    def rows(src, polls=None):
        out = []
        while (polls is None or polls > 0) and (got := src.poll(150, 0.0)) is not None:
            g, _ = validate_events(at, {"x": "float64"}, got["a"])
            out += g.to_pylist()
            polls = None if polls is None else polls - 1
        return out

    first = FileSource([path, path], "a", chunk_bytes=4096)
    head = rows(first, polls=9)
    pos = first.positions()
    assert pos["file"] == 1 and pos["events"] == len(head)
    rest = rows(FileSource([path, path], "a", chunk_bytes=4096, resume=json.loads(json.dumps(pos))))
    assert head + rest == t.to_pylist() * 2
    with pytest.raises(ValueError, match="checkpoint was taken replaying"):
        FileSource([path], "a", resume=pos)


def test_crlf_and_blank_lines_in_ndjson(tmp_path):
    """CRLF line ends, blank and whitespace-only lines, a CR inside a line (whitespace) and a
    final line without a newline: same rows as LF-only input (in place or copied)."""
    at = vs.AgentType("a", key="id", columns=[vs.Column("x", "float32", vs.latest("x"))])
    body = (
        b'{"id": 1, "x": 1}\r\n\r\n  \t \n{"id": 2,\r"x": 2}\r\n{"id": 3, "x": 3}\n\n'
        b'{"id": 4, "x": 4}'
    )
    path = tmp_path / "ev.ndjson"
    path.write_bytes(body)
    for chunk in (8, 1 << 20):
        src = FileSource(path, "a", chunk_bytes=chunk)
        good, dead = [], []
        while (p := src.poll(100, 0.0)) is not None:
            g, d = validate_events(at, {"x": "float32"}, p["a"])
            good += g.to_pylist() if g is not None else []
            dead += d.column("reason").to_pylist() if d is not None else []
        if chunk == 8:  # every line but the blank ones is longer than 8 bytes
            assert good == [] and dead == ["line longer than 8 bytes"] * 4
        else:
            assert good == [{"id": i, "x": float(i)} for i in (1, 2, 3, 4)] and dead == []
