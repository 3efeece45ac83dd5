"""Regression tests for defects found on schemas nobody here wrote (issues Step 6 and 6b),
each checked against the reference engine, and the declarations that must be refused."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

import vecswim as vs
from tests.test_differential import run_differential


def _child(dtype: str = "float64", **cols) -> vs.AgentType:
    return vs.AgentType(
        "child", key="cid", columns=[vs.Column("v", dtype, vs.latest("v"), emit=True)]
    )


def _parent(*cols: vs.Column) -> vs.AgentType:
    return vs.AgentType("parent", key="pid", columns=list(cols))


def _ticks(*rows: list[tuple]) -> list:
    return [
        (
            {
                "child": pa.table(
                    {"cid": [r[0] for r in t], "v": [r[1] for r in t], "pid": [r[2] for r in t]}
                )
            },
            [],
        )
        for t in rows
    ]


def test_max_of_float64_children_into_float32_parent_follows_the_extreme_child():
    # children a=1.1, b=0.3; a drops to 0.2: the float32 max must become 0.3 (was stuck at 1.1)
    parent = _parent(vs.Column("hi", "float32", emit=True), vs.Column("lo", "float32", emit=True))
    link = vs.Link(
        "l",
        "child",
        "parent",
        via="pid",
        aggregates={"hi": vs.agg.max("v"), "lo": vs.agg.min("v")},
    )
    eng = vs.Engine([_child(), parent], [link])
    eng.tick({"child": pa.table({"cid": [1, 2], "v": [1.1, 0.3], "pid": [9, 9]})})
    eng.tick({"child": pa.table({"cid": [1], "v": [0.2], "pid": [9]})})
    row = eng.state("parent").to_pylist()[0]
    assert row["hi"] == pytest.approx(0.3, rel=1e-7) and row["hi"] == float(np.float32(0.3))
    assert row["lo"] == float(np.float32(0.2))
    run_differential([_child(), parent], [link], _ticks([(1, 1.1, 9), (2, 0.3, 9)], [(1, 0.2, 9)]))


def test_min_max_leave_out_infinite_children():
    # a float32 sum overflows to inf: max/min/mean over the children must leave it out
    parent = _parent(
        vs.Column("hi", "float64", emit=True),
        vs.Column("avg", "float64", emit=True),
        vs.Column("n", "int64", emit=True),
    )
    link = vs.Link(
        "l",
        "child",
        "parent",
        aggregates={"hi": vs.agg.max("s"), "avg": vs.agg.mean("s"), "n": vs.agg.count()},
    )
    child = vs.AgentType(
        "child", key="cid", columns=[vs.Column("s", "float32", vs.sum("v"), emit=True)]
    )
    seq = [
        ({"child": pa.table({"cid": [1, 1, 2], "v": [3e38, 3e38, -4.0]})}, [("l", [1, 2], [7, 7])]),
    ]
    run_differential([child, parent], [link], seq)
    eng = vs.Engine([child, parent], [link])
    eng.set_links("l", [1, 2], [7, 7])
    eng.tick(seq[0][0])
    assert eng.state("parent").to_pylist() == [{"pid": 7, "hi": -4.0, "avg": -4.0, "n": 2}]


def test_numeric_deadband_applies_to_integer_columns():
    at = vs.AgentType("a", key="id", columns=[vs.Column("s", "int64", vs.sum("x"), emit=5)])
    eng = vs.Engine([at])
    out = vs.MemorySink()
    eng.add_sink(out)
    for x in (1, 2, 3, 1):  # 1 (new), 3, 6 (moved 5 < 6-1), 7
        eng.tick({"a": pa.table({"id": [1], "x": [x]})})
    assert [r["s"] for r in out.table("a").to_pylist()] == [1, 7]


def test_childless_parent_aggregates_do_not_depend_on_unrelated_events():
    parent = vs.AgentType(
        "parent",
        key="pid",
        columns=[
            vs.Column("touch", "int64", vs.count()),
            vs.Column("avg", "float64", emit=True),
            vs.Column("tot", "float64", emit=True),
        ],
    )
    link = vs.Link(
        "l",
        "child",
        "parent",
        via="pid",
        aggregates={"avg": vs.agg.mean("v"), "tot": vs.agg.sum("v")},
    )
    alone = vs.Engine([_child(), parent], [link])
    alone.tick({"parent": pa.table({"pid": [5]})})
    busy = vs.Engine([_child(), parent], [link])
    busy.tick(
        {"parent": pa.table({"pid": [5]}), "child": pa.table({"cid": [1], "v": [7.5], "pid": [6]})}
    )
    a = alone.state("parent").to_pylist()[0]
    b = busy.state("parent").to_pylist()[0]
    assert math.isnan(a["avg"]) and math.isnan(b["avg"]) and a["tot"] == b["tot"] == 0.0


def test_broadcast_link_with_many_new_parents_in_one_tick():
    # used to read past the delta heads (segfault without bounds checks)
    parent = vs.AgentType("parent", key="pid", columns=[vs.Column("x", "float64", vs.latest("x"))])
    child = vs.AgentType("child", key="cid", columns=[vs.Column("px", "float64", emit=True)])
    link = vs.Link("l", "child", "parent", broadcast={"px": "x"})
    seq = [
        ({}, [("l", [1, 2], [0, 0])]),
        ({"parent": pa.table({"pid": np.arange(1000), "x": np.arange(1000.0)})}, []),
        ({"parent": pa.table({"pid": [0], "x": [3.5]})}, []),
    ]
    run_differential([child, parent], [link], seq)


def test_set_links_is_validated_when_called():
    parent = vs.AgentType("parent", key="pid", columns=[vs.Column("n", "int64", emit=True)])
    link = vs.Link("l", "child", "parent", aggregates={"n": vs.agg.count()})
    eng = vs.Engine([_child(), parent], [link])
    with pytest.raises(ValueError, match="2000 child keys but 1 parent keys"):
        eng.set_links("l", np.arange(2000), np.array([1]))
    with pytest.raises(TypeError, match="keys are int64"):
        eng.set_links("l", ["a", "b"], [1, 2])
    with pytest.raises(ValueError, match="null keys"):
        eng.set_links("l", [1, None], [1, 2])
    eng.set_links("l", [1, 2, 3], [10, 10, 11])  # plain lists are fine
    eng.tick()
    assert eng.state("parent").to_pylist() == [{"pid": 10, "n": 2}, {"pid": 11, "n": 1}]
    eng.tick({"child": pa.table({"cid": [1], "v": [1.0]})})  # the engine is not wedged


def test_one_field_read_by_columns_of_different_dtypes():
    # int8 latest and float64 sum of one field: undeclared it is refused, declared it works
    cols = [
        vs.Column("last", "int8", vs.latest("x"), emit=True),
        vs.Column("tot", "float64", vs.sum("x"), emit=True),
    ]
    with pytest.raises(ValueError, match="declare fields="):
        vs.AgentType("a", key="id", columns=cols)
    at = vs.AgentType("a", key="id", columns=cols, fields={"x": "int8"})
    seq = [({"a": pa.table({"id": [1, 1, 1], "x": [2.5, 3.0, 300]})}, [])]
    run_differential([at], [], seq)
    eng = vs.Engine([at])
    eng.tick(seq[0][0])
    assert eng.state("a").to_pylist() == [{"id": 1, "last": 3, "tot": 3.0}]
    assert eng.dead_letters.count == 2


def test_mean_hidden_count_does_not_collide_with_user_columns():
    at = vs.AgentType(
        "a",
        key="id",
        columns=[
            vs.Column("x", "float64", vs.mean("v"), emit=True),
            vs.Column("x__n", "float64", vs.latest("w"), emit=True),
        ],
    )
    seq = [({"a": pa.table({"id": [1, 1], "v": [1.0, 2.0], "w": [2.7, 2.7]})}, [])]
    run_differential([at], [], seq)


def test_hysteresis_on_a_float_column_starts_low_and_switches():
    at = vs.AgentType(
        "a",
        key="id",
        columns=[vs.Column("s", "float32", vs.hysteresis("v", up=10, down=5), emit=True)],
    )
    eng = vs.Engine([at])
    eng.tick({"a": pa.table({"id": [1], "v": [20.0]})})
    assert eng.state("a").to_pylist() == [{"id": 1, "s": 1.0}]


def test_engine_creates_via_parents_in_arrival_order_at_scale():
    child = vs.AgentType("child", key="cid", columns=[vs.Column("v", "float64", vs.latest("v"))])
    parent = vs.AgentType("parent", key="pid", columns=[vs.Column("n", "int64")])
    link = vs.Link("l", "child", "parent", via="pid", aggregates={"n": vs.agg.count()})
    eng = vs.Engine([child, parent], [link], capacity=1 << 17)
    n = 100_000
    rng = np.random.default_rng(1)
    cid = rng.permutation(n)
    pid = rng.integers(0, 10**12, n)
    eng.tick({"child": pa.table({"cid": cid, "v": np.zeros(n), "pid": pid})})
    got = eng.state("parent").column("pid").to_numpy()
    _, first = np.unique(pid, return_index=True)
    assert np.array_equal(got, pid[np.sort(first)])


BAD = [
    (lambda: vs.Column("tick", "int64"), "reserved"),
    (lambda: vs.Column("__x", "int64"), "reserved"),
    (lambda: vs.Column("x", "int8", vs.ewma("v", 0.5)), "ewma is not defined on int8"),
    (lambda: vs.Column("x", "int32", vs.mean("v")), "mean is not defined on int32"),
    (lambda: vs.Column("x", "bool", vs.sum("v")), "sum is not defined on bool"),
    (lambda: vs.Column("x", "uint8", vs.hysteresis("v", 1, 0, low=-1, high=1)), "low=-1"),
    (lambda: vs.Column("x", "float32", vs.hysteresis("v", 1, 0), initial=7), "low or high"),
    (lambda: vs.Column("x", "int8", initial=300), "initial 300"),
    (lambda: vs.Column("x", "int8", initial=1.5), "initial 1.5"),
    (lambda: vs.agg.sum("v", scale=0), "scale"),
    (lambda: vs.agg.mean("v", scale=-1.0), "scale"),
    (lambda: vs.AgentType("a", key="tick", columns=[]), "reserved"),
    (
        lambda: vs.AgentType(
            "a",
            key="id",
            columns=[
                vs.Column("f", "float64", vs.latest("v")),
                vs.Column("i", "int8", vs.latest(vs.state("f"))),
            ],
        ),
        "would store float64 values in int8",
    ),
]


@pytest.mark.parametrize("make,match", BAD)
def test_refused_declarations(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def _link_case(parent_cols, child_cols, **link):
    child = vs.AgentType("c", key="cid", columns=child_cols)
    parent = vs.AgentType("p", key="pid", columns=parent_cols)
    return lambda: vs.Engine([child, parent], [vs.Link("l", "c", "p", **link)])


F64 = [vs.Column("v", "float64", vs.latest("v"))]
BAD_LINKS = [
    (_link_case([vs.Column("s", "int8")], F64, aggregates={"s": vs.agg.sum("v")}), "truncate"),
    (_link_case([vs.Column("b", "bool")], F64, aggregates={"b": vs.agg.count()}), "bool"),
    (_link_case([vs.Column("m", "int64")], F64, aggregates={"m": vs.agg.max("v")}), "float"),
    (
        _link_case(
            [vs.Column("m", "float64", initial=0.0)], F64, aggregates={"m": vs.agg.max("v")}
        ),
        "initial",
    ),
    (
        _link_case(
            [vs.Column("m", "float64", vs.latest("m"))], F64, aggregates={"m": vs.agg.max("v")}
        ),
        "written by",
    ),
    (
        _link_case(
            [vs.Column("x", "float64")], [*F64, vs.Column("i", "int8")], broadcast={"i": "x"}
        ),
        "truncate or wrap",
    ),
    (
        _link_case(
            [vs.Column("x", "float64")],
            [*F64, vs.Column("w", "float64", vs.latest("w"))],
            broadcast={"w": "x"},
        ),
        "written by",
    ),
    (
        _link_case(
            [vs.Column("x", "float64"), vs.Column("s", "float64")],
            [*F64, vs.Column("b", "float64")],
            broadcast={"b": "x"},
            aggregates={"s": vs.agg.sum("b")},
        ),
        "broadcast sets after aggregation",
    ),
    (_link_case([vs.Column("x", "float64")], F64, aggregates={"nope": vs.agg.count()}), "nope"),
]


@pytest.mark.parametrize("make,match", BAD_LINKS)
def test_refused_links(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_two_mean_columns_keep_their_own_counts():
    # found by the deep differential run: the reference once shared one count between them
    at = vs.AgentType(
        "a",
        key="id",
        columns=[
            vs.Column("m1", "float32", vs.mean("x"), emit=True),
            vs.Column("m2", "float64", vs.mean("y"), emit=True),
        ],
    )
    seq = [({"a": pa.table({"id": [1, 1], "x": [1.0, 2.0], "y": [-0.0, 0.1]})}, [])]
    run_differential([at], [], seq)
    eng = vs.Engine([at])
    eng.tick(seq[0][0])
    assert eng.state("a").to_pylist() == [{"id": 1, "m1": 1.5, "m2": 0.05}]
