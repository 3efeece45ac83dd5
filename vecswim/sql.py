"""Read-only DuckDB SQL over the live state.

Each query gets a fresh in-memory DuckDB connection with external access disabled and the
configuration locked, over zero-copy Arrow views of the state tables taken at the current tick
boundary (the engine does not tick while an in-process query runs). Only one SELECT-like
statement is accepted; anything else, and any DuckDB error, raises :class:`SQLError` with
DuckDB's message. Nothing a query does can change the engine.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import duckdb
import numpy as np
import pyarrow as pa

if TYPE_CHECKING:
    from vecswim.engine import Engine

_ALLOWED = {"SELECT"}


class SQLError(Exception):
    """A query was refused or failed; ``str(e)`` is one line for the user."""


def _connect() -> duckdb.DuckDBPyConnection:
    return duckdb.connect(
        config={"enable_external_access": False, "lock_configuration": True, "threads": 1}
    )


def tables_for(engine: Engine, query: str | None = None) -> dict[str, pa.Table]:
    """Name -> Arrow table of everything queryable. Link tables and ``ticks`` are only built
    when ``query`` mentions them (they are copies; agent tables are zero-copy views)."""
    out: dict[str, pa.Table] = {name: t.to_arrow() for name, t in engine.tables.items()}

    def wanted(name: str) -> bool:
        return query is None or re.search(rf"\b{re.escape(name)}\b", query, re.I) is not None

    for name in engine.links:
        if wanted(name):
            out[name] = engine.link_table(name)
    if wanted("ticks"):
        r = list(engine.recent)
        out["ticks"] = pa.table(
            {
                "tick": pa.array([s.tick for s in r], pa.int64()),
                "events": pa.array([s.events for s in r], pa.int64()),
                "dead_letters": pa.array([s.dead_letters for s in r], pa.int64()),
                "emitted": pa.array([s.emitted for s in r], pa.int64()),
                "new_agents": pa.array([s.new_agents for s in r], pa.int64()),
                "dirty": pa.array([s.dirty for s in r], pa.int64()),
                "seconds": pa.array([s.seconds for s in r], pa.float64()),
            }
        )
    if wanted("metrics"):
        m = dict(engine.totals, agents=engine.agents, bytes=engine.nbytes, tick=engine.tick_id)
        out["metrics"] = pa.table(
            {"name": list(m), "value": pa.array(np.array(list(m.values()), np.int64))}
        )
    return out


def run_query(engine: Engine, query: str, output: str = "arrow"):
    """See :meth:`vecswim.Engine.sql`."""
    if output not in ("arrow", "polars"):
        raise ValueError("output must be 'arrow' or 'polars'")
    try:
        statements = duckdb.extract_statements(query)
    except duckdb.Error as e:
        raise SQLError(_one_line(e)) from None
    if len(statements) != 1:
        raise SQLError(f"expected exactly one statement, got {len(statements)}")
    kind = statements[0].type.name
    if kind not in _ALLOWED:
        raise SQLError(f"only read-only SELECT queries are allowed, got {kind}")
    con = _connect()
    try:
        for name, table in tables_for(engine, query).items():
            con.register(name, table)
        result = con.sql(query).to_arrow_table()
    except duckdb.Error as e:
        raise SQLError(_one_line(e)) from None
    finally:
        con.close()
    if output == "polars":
        import polars as pl

        return pl.from_arrow(result)
    return result


def _one_line(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return " ".join(lines[:1] + [ln for ln in lines[1:] if ln.startswith("LINE")])
