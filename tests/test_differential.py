"""Differential tests: the engine (bounds-checked kernels) equals the reference engine,
exactly, every tick, on random schemas and random batches.

Per tick it compares the emitted rows, the dead letters (rows and reasons) and the whole state
of every agent type in row (creation) order. A declaration is either refused by both with a
``ValueError`` or computed identically. ``HYPOTHESIS_PROFILE=deep`` runs many more schemas,
each with 10 tick sequences (see tests/conftest.py); ``NUMBA_OPT=0`` makes its per-schema
compilation ~3x faster without changing what the kernels compute.
"""

from __future__ import annotations

import math
import os

import pyarrow as pa
import pytest
from hypothesis import event, given, note
from hypothesis import strategies as st

import vecswim as vs
from tests.schemas import RefusedType, schemas, ticks
from vecswim.testing import ReferenceEngine

SEQUENCES = 10 if os.environ.get("HYPOTHESIS_PROFILE") == "deep" else 1


def canon(v):
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return v


def canon_rows(rows: list[dict]) -> list[dict]:
    return [{k: canon(v) for k, v in r.items()} for r in rows]


def _describe(types, links) -> str:
    lines = []
    for at in types:
        lines.append(f"{at!r}")
    for ln in links:
        lines.append(f"{ln!r}")
    return "\n".join(lines)


def run_differential(types, links, seq, compaction_min_deltas: int = 1024) -> None:
    """Drive an engine and the reference with the same ticks and compare everything."""
    ref = ReferenceEngine(types, links)
    eng = vs.Engine(types, links, capacity=4, compaction_min_deltas=compaction_min_deltas)
    emitted: dict[str, list] = {}
    dead: dict[str, list] = {}
    eng.add_sink(vs.CallbackSink(lambda t, at, b: emitted.setdefault(at, []).extend(b.to_pylist())))
    eng.dead_letters.add_sink(lambda t, at, b: dead.setdefault(at, []).extend(b.to_pylist()))
    for i, (events, calls) in enumerate(seq):
        for link, ck, pk in calls:
            try:
                ref.set_links(link, ck, pk)
            except ValueError:  # refused when called (unequal lengths), by both
                with pytest.raises(ValueError):
                    eng.set_links(link, ck, pk)
                continue
            eng.set_links(link, ck, pk)
        eng.tick(events)
        r = ref.tick(events)
        where = f"tick {i + 1}"
        for name, at in eng.types.items():
            got = sorted(canon_rows(emitted.pop(name, [])), key=lambda row: repr(row[at.key]))
            want = sorted(canon_rows(r.emitted.get(name, [])), key=lambda row: repr(row[at.key]))
            assert got == want, f"{where}: emissions of {name}"
            got_dead = canon_rows(dead.pop(name, []))
            want_dead = canon_rows(r.dead.get(name, []))
            assert got_dead == want_dead, (
                f"{where}: dead letters of {name}: "
                f"{[d for d in got_dead if d not in want_dead]} != "
                f"{[d for d in want_dead if d not in got_dead]}"
            )
            state = canon_rows(eng.state(name).to_pylist())
            want_state = canon_rows([{at.key: k, **v} for k, v in ref.state(name).items()])
            assert state == want_state, f"{where}: state of {name}"


@given(data=st.data())
def test_engine_equals_reference_on_random_schemas(data):
    drawn = data.draw(schemas())
    if isinstance(drawn, RefusedType):
        event("agent type refused at declaration")
        return
    types, links = drawn
    note(_describe(types, links))
    try:
        ReferenceEngine(types, links)
    except ValueError as e:
        event("refused at declaration")
        with pytest.raises(ValueError):
            vs.Engine(types, links)
        note(f"refused: {e}")
        return
    event("accepted")
    eng = vs.Engine(types, links)
    # the deep profile drives each schema (compiled once) with several tick sequences
    for _ in range(SEQUENCES):
        seq = data.draw(ticks(eng))
        compaction = data.draw(st.sampled_from([1, 4, 1024]))
        run_differential(types, links, seq, compaction)


def test_reference_engine_is_public():
    import vecswim.testing as t

    assert t.ReferenceEngine is ReferenceEngine
    at = vs.AgentType("a", key="id", columns=[vs.Column("x", "int64", vs.sum("v"), emit=True)])
    ref = ReferenceEngine([at])
    out = ref.tick({"a": pa.table({"id": [1, 1, 2], "v": [3, 4, 5]})})
    assert out.emitted["a"] == [{"id": 1, "tick": 1, "x": 7}, {"id": 2, "tick": 1, "x": 5}]
    assert ref.state("a") == {1: {"x": 7}, 2: {"x": 5}}
