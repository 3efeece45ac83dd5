"""Read-only DuckDB SQL over the state.

Queries run against a *view*: the live engine between ticks (in-process ``Engine.sql``) or a
published snapshot (``vecswim.snapshot``, used by the SQL server while the engine ticks on).
Either way every table of one query shows the same tick boundary.

Each query gets a fresh in-memory DuckDB connection with external access disabled and the
configuration locked. Only one SELECT statement is accepted; anything else, and any DuckDB
error, raises :class:`SQLError` with DuckDB's message in one line. A time limit interrupts a
long query; a row limit truncates the result (reported, never silent). Nothing a query does
can change the engine.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Protocol

import duckdb
import numpy as np
import pyarrow as pa

_ALLOWED = {"SELECT"}


class SQLError(Exception):
    """A query was refused or failed; ``str(e)`` is one line for the user."""


class StateView(Protocol):
    """What a query can see, all at one tick boundary."""

    tick: int

    def agent_tables(self) -> dict[str, pa.Table]: ...

    def link_names(self) -> list[str]: ...

    def link_table(self, name: str) -> pa.Table: ...

    def ticks(self) -> pa.Table: ...

    def metrics(self) -> pa.Table: ...

    def emissions(self) -> dict[str, pa.Table]: ...


@dataclass
class Result:
    """A query result: the Arrow table, the tick it reflects, whether the row limit cut it."""

    table: pa.Table
    tick: int
    truncated: bool


def ticks_table(stats: list) -> pa.Table:
    """The ``ticks`` table from recent ``TickStats``."""
    cols = ("tick", "events", "dead_letters", "emitted", "new_agents", "dirty", "work")
    out = {c: pa.array([getattr(s, c) for s in stats], pa.int64()) for c in cols}
    out["seconds"] = pa.array([s.seconds for s in stats], pa.float64())
    return pa.table(out)


def metrics_table(metrics: dict[str, int]) -> pa.Table:
    return pa.table(
        {"name": list(metrics), "value": pa.array(np.array(list(metrics.values()), np.int64))}
    )


def emissions_union(per_type: dict[str, pa.Table], keys: dict[str, str]) -> pa.Table:
    """All recent emissions as (agent_type, tick, key as text)."""
    parts = [
        pa.table(
            {
                "agent_type": pa.array([at] * t.num_rows, pa.string()),
                "tick": t.column("tick"),
                "key": t.column(keys[at]).cast(pa.string()),
            }
        )
        for at, t in per_type.items()
    ]
    if not parts:
        return pa.table(
            {
                "agent_type": pa.array([], pa.string()),
                "tick": pa.array([], pa.int64()),
                "key": pa.array([], pa.string()),
            }
        )
    return pa.concat_tables(parts)


def tables_for(view: StateView, query: str | None = None) -> dict[str, pa.Table]:
    """Name -> Arrow table of everything queryable in ``view``. Agent tables are zero-copy;
    the others are built only when ``query`` mentions them."""
    out = dict(view.agent_tables())

    def wanted(name: str) -> bool:
        return query is None or re.search(rf"\b{re.escape(name)}\b", query, re.I) is not None

    for name in view.link_names():
        if wanted(name):
            out[name] = view.link_table(name)
    if wanted("ticks"):
        out["ticks"] = view.ticks()
    if wanted("metrics"):
        out["metrics"] = view.metrics()
    if query is None or re.search(r"\bemissions", query, re.I):
        per_type = view.emissions()
        keys = {at: t.schema.names[0] for at, t in per_type.items()}
        for at, t in per_type.items():
            out[f"emissions_{at}"] = t
        out["emissions"] = emissions_union(per_type, keys)
    return out


def check(query: str) -> None:
    """Refuse anything but exactly one SELECT statement."""
    try:
        statements = duckdb.extract_statements(query)
    except duckdb.Error as e:
        raise SQLError(_one_line(e)) from None
    if len(statements) != 1:
        raise SQLError(f"expected exactly one statement, got {len(statements)}")
    kind = statements[0].type.name
    if kind not in _ALLOWED:
        raise SQLError(f"only read-only SELECT queries are allowed, got {kind}")


def execute(
    view: StateView,
    query: str,
    timeout: float | None = None,
    max_rows: int | None = None,
    memory_limit: str = "2GB",
    threads: int = 1,
) -> Result:
    """Run one read-only query over ``view``; see the module docstring for the guarantees."""
    check(query)
    con = duckdb.connect(
        config={
            "enable_external_access": False,
            "lock_configuration": True,
            "threads": threads,
            "memory_limit": memory_limit,
        }
    )
    timer = None
    if timeout is not None:
        timer = threading.Timer(timeout, con.interrupt)
        timer.start()
    try:
        for name, table in tables_for(view, query).items():
            con.register(name, table)
        reader = con.sql(query).to_arrow_reader(65_536)
        batches, n, truncated = [], 0, False
        for b in reader:
            if max_rows is not None and n + b.num_rows > max_rows:
                batches.append(b.slice(0, max_rows - n))
                truncated = True
                break
            batches.append(b)
            n += b.num_rows
        table = pa.Table.from_batches(batches, schema=reader.schema)
    except duckdb.InterruptException:
        raise SQLError(f"query exceeded the time limit of {timeout:g}s") from None
    except duckdb.Error as e:
        raise SQLError(_one_line(e)) from None
    finally:
        if timer is not None:
            timer.cancel()
        con.close()
    return Result(table, view.tick, truncated)


def _one_line(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return " ".join(lines[:1] + [ln for ln in lines[1:] if ln.startswith("LINE")])
