"""Links: incremental aggregates, re-linking, compaction and broadcast against a
recompute-from-scratch reference."""

import math

import numpy as np
import pyarrow as pa
from hypothesis import given
from hypothesis import strategies as st

import vecswim as vs
from tests.helpers import canon_value, state_dict

CHILD = vs.AgentType(
    "child",
    key="cid",
    columns=[
        vs.Column("v", "float32", vs.latest("v"), emit=0.0),
        vs.Column("k", "int32", vs.latest("k")),
        vs.Column("parent_avg", "float64", emit=0.0),
    ],
)
PARENT = vs.AgentType(
    "parent",
    key="pid",
    columns=[
        vs.Column("n", "int64", emit=True),
        vs.Column("total", "float64", emit=0.0),
        vs.Column("ksum", "int64", emit=True),
        vs.Column("avg", "float64", emit=0.0),
        vs.Column("lo", "float32", emit=0.0),
        vs.Column("hi", "float32", emit=0.0),
    ],
)
LINK = vs.Link(
    "child_parent",
    child="child",
    parent="parent",
    via="pid",
    aggregates={
        "n": vs.agg.count(),
        "total": vs.agg.sum("v"),
        "ksum": vs.agg.sum("k"),
        "avg": vs.agg.mean("v"),
        "lo": vs.agg.min("v"),
        "hi": vs.agg.max("v"),
    },
    broadcast={"parent_avg": "avg"},
)


def fixed(x: float) -> int:
    return round(x * 2.0**16)


def reference_parents(children: dict) -> dict:
    by_parent: dict = {}
    for c in children.values():
        by_parent.setdefault(c["pid"], []).append(c)
    out = {}
    for p, cs in by_parent.items():
        vals = [c["v"] for c in cs]
        out[p] = {
            "n": len(cs),
            "total": sum(fixed(v) for v in vals) / 2.0**16,
            "ksum": sum(c["k"] for c in cs),
            "avg": sum(fixed(v) for v in vals) / 2.0**16 / len(vals),
            "lo": min(vals),
            "hi": max(vals),
        }
    return out


def new_engine(**kw) -> vs.Engine:
    return vs.Engine([CHILD, PARENT], [LINK], capacity=4, **kw)


events = st.lists(
    st.tuples(
        st.integers(0, 30),  # child key
        st.integers(-400, 400).map(lambda q: q / 8.0) | st.sampled_from([0.0, 1.0, 2.0]),
        st.integers(-1000, 1000),  # k
        st.integers(0, 6),  # parent key
    ),
    max_size=60,
)


@given(ticks=st.lists(events, min_size=1, max_size=12), min_deltas=st.sampled_from([0, 4, 1024]))
def test_aggregates_match_recompute(ticks, min_deltas):
    eng = new_engine(compaction_ratio=0.0, compaction_min_deltas=min_deltas)
    children: dict = {}
    parents_seen: set = set()
    for evs in ticks:
        batch = pa.table(
            {
                "cid": pa.array([e[0] for e in evs], pa.int64()),
                "v": pa.array([e[1] for e in evs], pa.float32()),
                "k": pa.array([e[2] for e in evs], pa.int32()),
                "pid": pa.array([e[3] for e in evs], pa.int64()),
            }
        )
        eng.tick({"child": batch})
        for cid, v, k, pid in evs:
            children[cid] = {"v": v, "k": k, "pid": pid}
            parents_seen.add(pid)
        expected = reference_parents(children)
        state = state_dict(eng, "parent")
        assert set(state) == parents_seen
        for p in parents_seen:
            want = expected.get(
                p,
                {"n": 0, "total": 0.0, "ksum": 0, "avg": math.nan, "lo": math.nan, "hi": math.nan},
            )
            assert state[p] == {c: canon_value(v) for c, v in want.items()}, p
        cstate = state_dict(eng, "child")
        for cid, c in children.items():
            assert cstate[cid]["parent_avg"] == canon_value(expected[c["pid"]]["avg"])
        links = eng.link_table("child_parent").to_pylist()
        assert {r["child_cid"]: r["parent_pid"] for r in links} == {
            cid: c["pid"] for cid, c in children.items()
        }


def tick(eng, rows):
    cids, vs_, pids = zip(*rows, strict=True)
    return eng.tick(
        {
            "child": pa.table(
                {
                    "cid": list(cids),
                    "v": pa.array(vs_, pa.float32()),
                    "k": [0] * len(rows),
                    "pid": list(pids),
                }
            )
        }
    )


def parent(eng, pid):
    return state_dict(eng, "parent")[pid]


def test_max_when_extreme_child_leaves_or_drops():
    eng = new_engine()
    tick(eng, [(1, 10.0, 7), (2, 30.0, 7), (3, 20.0, 7)])
    assert parent(eng, 7)["hi"] == 30.0 and parent(eng, 7)["lo"] == 10.0
    tick(eng, [(2, 5.0, 7)])  # the max child drops below the others
    assert parent(eng, 7)["hi"] == 20.0 and parent(eng, 7)["lo"] == 5.0
    tick(eng, [(3, 1.0, 8)])  # the new max child leaves for another parent
    assert parent(eng, 7)["hi"] == 10.0 and parent(eng, 8)["hi"] == 1.0
    tick(eng, [(1, 2.0, 8), (2, 3.0, 8)])  # everybody leaves
    p7 = parent(eng, 7)
    assert p7["n"] == 0 and p7["hi"] == "nan" and p7["lo"] == "nan" and p7["avg"] == "nan"
    assert parent(eng, 8) == {"n": 3, "total": 6.0, "ksum": 0, "avg": 2.0, "lo": 1.0, "hi": 3.0}
    tick(eng, [(2, 4.0, 7), (2, 9.0, 8)])  # moves away and back within one tick
    assert parent(eng, 7)["n"] == 0 and parent(eng, 8)["hi"] == 9.0


def test_set_links_static_and_relink_in_bulk():
    eng = new_engine()
    eng.set_links("child_parent", np.array([1, 2, 3]), np.array([10, 10, 11]))
    s = eng.tick()
    assert s.new_agents == 5
    assert parent(eng, 10)["n"] == 2 and parent(eng, 11)["n"] == 1
    assert parent(eng, 10)["avg"] == "nan"  # children exist but have no value yet
    eng.set_links("child_parent", np.array([1]), np.array([11]))
    eng.tick()
    assert parent(eng, 10)["n"] == 1 and parent(eng, 11)["n"] == 2


def test_cost_does_not_grow_with_agents():
    """Same events on a small and a 1M-agent table: identical work counts; an empty tick does
    no work at all."""
    works = []
    # Without the broadcast: pushing a changed parent value down to all its children is
    # inherently O(children of changed parents), which is what grows here.
    link = vs.Link("child_parent", "child", "parent", via="pid", aggregates=LINK.aggregates)
    for n in (100, 1_000_000):
        eng = vs.Engine([CHILD, PARENT], [link])
        keys = np.arange(n, dtype=np.int64)
        eng.tick(
            {
                "child": pa.table(
                    {
                        "cid": keys,
                        "v": np.ones(n, np.float32),
                        "k": np.zeros(n, np.int32),
                        "pid": keys % 50,
                    }
                )
            }
        )
        empty = eng.tick()
        assert (empty.events, empty.dirty, empty.work, empty.emitted) == (0, 0, 0, 0)
        s = tick(eng, [(5, 2.0, 5), (6, 3.0, 6), (5, 4.0, 5)])
        works.append((s.events, s.dirty, s.work, s.emitted))
    assert works[0] == works[1]
    assert works[0][:3] == (3, 4, 7)
