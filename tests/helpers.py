"""Test helpers: canonical forms for comparing engine output with reference models."""

from __future__ import annotations

import math

import pyarrow as pa

import vecswim as vs


def canon_value(v):
    """NaN -> "nan" so equal NaNs compare equal; everything else unchanged."""
    return "nan" if isinstance(v, float) and math.isnan(v) else v


def canon_rows(rows: list[dict], key: str) -> dict:
    """[{key: k, ...}] -> {k: {col: value}}; fails on a key emitted twice in one tick."""
    out = {}
    for r in rows:
        r = dict(r)
        k = r.pop(key)
        assert k not in out, f"key {k} emitted twice in one tick"
        out[k] = {c: canon_value(v) for c, v in r.items()}
    return out


def canon_ref(rows: dict) -> dict:
    return {k: {c: canon_value(v) for c, v in r.items()} for k, r in rows.items()}


class TickCapture:
    """A sink that keeps only the current tick's emissions, per agent type, as row dicts."""

    def __init__(self, engine: vs.Engine) -> None:
        self.rows: dict[str, list[dict]] = {}
        engine.add_sink(vs.CallbackSink(self._write))

    def _write(self, tick: int, agent_type: str, batch: pa.RecordBatch) -> None:
        self.rows.setdefault(agent_type, []).extend(batch.to_pylist())

    def take(self) -> dict[str, list[dict]]:
        rows, self.rows = self.rows, {}
        return rows


def state_dict(engine: vs.Engine, agent_type: str) -> dict:
    """{key: {col: value}} of a whole state table."""
    t = engine.state(agent_type)
    return canon_rows(t.to_pylist(), engine.types[agent_type].key)


def final_state_matches(eng: vs.Engine, agents: dict, agent_type: str, columns) -> None:
    """Every agent of ``agent_type`` exists exactly as in the reference ``agents``."""
    state = state_dict(eng, agent_type)
    assert set(state) == set(agents)
    for k, a in agents.items():
        got = {c: state[k][c] for c in columns}
        assert got == canon_ref({k: {c: a[c] for c in columns}})[k], k


# Over the engines scenario: fleets whose aggregates differ from their children's, and engines
# counted by no fleet. Both are 0 in any result that saw whole ticks only.
INVARIANT = """
WITH kids AS (
    SELECT l.parent_fleet_id AS fleet_id, count(*) AS n, sum(e.status) AS red,
           max(e.engine_temp) AS hot
    FROM engine_fleet l JOIN engine e ON e.engine_id = l.child_engine_id GROUP BY 1)
SELECT
    (SELECT count(*) FROM fleet f LEFT JOIN kids k USING (fleet_id)
     WHERE f.engines != coalesce(k.n, 0) OR f.red_engines != coalesce(k.red, 0)
        OR f.max_engine_temp IS DISTINCT FROM k.hot) AS bad_fleets,
    coalesce((SELECT sum(engines) FROM fleet), 0) - (SELECT count(*) FROM engine)
        AS lost_engines,
    (SELECT value FROM metrics WHERE name = 'tick') AS tick
"""
