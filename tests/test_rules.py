"""Built-in event rules and custom kernels against plain Python, event by event."""

import math

import numpy as np
import pyarrow as pa
from hypothesis import given
from hypothesis import strategies as st
from numba import njit

import vecswim as vs
from tests.helpers import canon_value, state_dict

ALPHA = 0.25

ALL_RULES = vs.AgentType(
    "a",
    key="id",
    columns=[
        vs.Column("last", "float32", vs.latest("x")),
        vs.Column("total", "float64", vs.sum("x")),
        vs.Column("n", "int32", vs.count()),
        vs.Column("lo", "float32", vs.min("x")),
        vs.Column("hi", "float32", vs.max("x")),
        vs.Column("avg", "float64", vs.mean("x")),
        vs.Column("smooth", "float32", vs.ewma("x", alpha=ALPHA)),
        vs.Column("status", "uint8", vs.hysteresis(vs.state("smooth"), up=10.0, down=-10.0)),
        vs.Column("flips", "int32", initial=0),
        vs.Column("prev_status", "uint8", initial=0),
    ],
)


@njit(cache=True)
def count_flips(rows, status, prev, flips):
    """Custom kernel: count status changes, seeing every intermediate status (trace)."""
    for i in range(len(rows)):
        r = rows[i]
        if status[i] != prev[r]:
            flips[r] += 1
            prev[r] = status[i]


WITH_CUSTOM = vs.AgentType(
    "a",
    key="id",
    columns=ALL_RULES.columns,
    kernels=[vs.custom(count_flips, [vs.state("status")], ["prev_status", "flips"])],
)


def f32(x: float) -> float:
    return float(np.float32(x))


def reference(events):
    agents: dict = {}
    for k, x in events:
        a = agents.setdefault(
            k,
            {
                "last": math.nan,
                "total": 0.0,
                "n": 0,
                "lo": math.nan,
                "hi": math.nan,
                "avg": math.nan,
                "smooth": math.nan,
                "status": 0,
                "flips": 0,
                "prev_status": 0,
                "_n": 0,
            },
        )
        x32 = f32(x)
        a["last"] = x32
        a["total"] = a["total"] + x  # float64 field
        a["n"] += 1
        a["lo"] = x32 if math.isnan(a["lo"]) or x32 < a["lo"] else a["lo"]
        a["hi"] = x32 if math.isnan(a["hi"]) or x32 > a["hi"] else a["hi"]
        a["_n"] += 1
        a["avg"] = x if a["_n"] == 1 else a["avg"] + (x - a["avg"]) / a["_n"]
        s = a["smooth"]
        a["smooth"] = f32(x) if math.isnan(s) else f32(s + ALPHA * (x - s))
        if a["status"] == 0 and a["smooth"] > 10.0:
            a["status"] = 1
        elif a["status"] == 1 and a["smooth"] < -10.0:
            a["status"] = 0
        if a["status"] != a["prev_status"]:
            a["flips"] += 1
            a["prev_status"] = a["status"]
    for a in agents.values():
        del a["_n"]
    return agents


@given(
    ticks=st.lists(
        st.lists(
            st.tuples(st.integers(0, 8), st.floats(-50, 50, allow_nan=False, width=32)), max_size=40
        ),
        min_size=1,
        max_size=6,
    )
)
def test_rules_and_custom_kernel_match_python(ticks):
    eng = vs.Engine([WITH_CUSTOM])
    all_events = []
    for evs in ticks:
        eng.tick(
            {
                "a": pa.table(
                    {
                        "id": pa.array([k for k, _ in evs], pa.int64()),
                        "x": pa.array([x for _, x in evs], pa.float64()),
                    }
                )
            }
        )
        all_events += evs
    want = reference(all_events)
    got = state_dict(eng, "a")
    assert set(got) == set(want)
    for k, a in want.items():
        assert got[k] == {c: canon_value(v) for c, v in a.items()}, k


def test_hysteresis_holds_between_thresholds():
    t = vs.AgentType(
        "s", key="id", columns=[vs.Column("state", "uint8", vs.hysteresis("x", up=110, down=100))]
    )
    eng = vs.Engine([t])
    seen = []
    for x in [105, 111, 105, 101, 99.5, 105, 110, 110.5]:
        eng.tick({"s": pa.table({"id": [1], "x": [float(x)]})})
        seen.append(state_dict(eng, "s")[1]["state"])
    assert seen == [0, 1, 1, 1, 0, 0, 0, 1]


def test_schema_errors_are_clear():
    import pytest

    with pytest.raises(ValueError, match="must name an earlier column"):
        vs.AgentType(
            "b",
            key="id",
            columns=[
                vs.Column("s", "uint8", vs.hysteresis(vs.state("later"), 1, 0)),
                vs.Column("later", "float32", vs.latest("x")),
            ],
        )
    with pytest.raises(ValueError, match="unsupported dtype"):
        vs.Column("x", "complex64")
    with pytest.raises(ValueError, match="down <= up"):
        vs.hysteresis("x", up=1, down=2)
    with pytest.raises(ValueError, match="alpha"):
        vs.ewma("x", alpha=0)
    with pytest.raises(ValueError, match="cycle"):
        vs.Engine([ALL_RULES], [vs.Link("l", "a", "a")])
