"""Consistent snapshots of the state for readers on other threads (the SQL server).

Mechanism: double buffering with incremental refresh. Two shadow copies of every state
column and parent-row column exist; one is *published*. After each tick the engine thread
brings the other one up to date by copying only the rows changed since that buffer was last
refreshed (the dirty rows of the last ticks, plus rows created since) and publishes it — if
no reader still holds it; otherwise it keeps collecting changed rows and tries again after
the next tick. Readers take the published buffer under a short lock, query it for as long as
they like, and release it. So:

- a reader always sees exactly one tick boundary (all tables from the same buffer);
- the engine never waits for a query: the refresh costs O(rows changed) per tick, and a long
  query only delays publication of newer snapshots (readers may see a state a few ticks old);
- memory: two extra copies of the state columns and parent rows (keys are append-only and
  shared without copying).
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vecswim.kernels.dirty import copy_rows
from vecswim.sql import metrics_table, ticks_table

if TYPE_CHECKING:
    from collections.abc import Iterator

    from vecswim.engine import Engine, TickStats


@dataclass
class _Buffer:
    tick: int = 0
    readers: int = 0
    n: dict[str, int] = field(default_factory=dict)
    cols: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    prow: dict[str, np.ndarray] = field(default_factory=dict)
    keys: dict[str, pa.Array] = field(default_factory=dict)
    pending: dict[str, list[np.ndarray]] = field(default_factory=dict)
    pending_rows: int = 0
    full: bool = True
    recent: list = field(default_factory=list)
    metrics: dict[str, int] = field(default_factory=dict)
    emissions: dict[str, list] = field(default_factory=dict)


class Snapshots:
    """Publishes a consistent copy of ``engine``'s state after every tick it can.

    ``attach()`` hooks it into the engine (``Engine.after_tick``); ``reader()`` yields a
    :class:`SnapshotView` for queries from any thread.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._lock = threading.Lock()
        self._buffers = [_Buffer(), _Buffer()]
        self._published = 0
        self.refreshes = 0
        self.skipped = 0
        self.refresh_seconds = 0.0
        self.last_refresh_seconds = 0.0
        self._refresh(self._buffers[0])

    def attach(self) -> Snapshots:
        self.engine.after_tick.append(self.after_tick)
        return self

    def after_tick(self, stats: TickStats) -> None:
        """Engine thread, after each tick: record changed rows, refresh and publish the back
        buffer unless a reader still holds it."""
        for t in self.engine.tables.values():
            if t.n_dirty:
                rows = t.dirty[: t.n_dirty].copy()
                for b in self._buffers:
                    if not b.full:
                        b.pending.setdefault(t.name, []).append(rows)
                        b.pending_rows += len(rows)
        for b in self._buffers:
            # A buffer that fell far behind is cheaper to copy whole than row by row.
            if b.pending_rows > self.engine.agents:
                b.full, b.pending, b.pending_rows = True, {}, 0
        back = self._buffers[1 - self._published]
        with self._lock:
            busy = back.readers > 0
        if busy:
            self.skipped += 1
            self.last_refresh_seconds = 0.0
            return
        t0 = time.perf_counter()
        self._refresh(back)
        self.last_refresh_seconds = time.perf_counter() - t0
        self.refresh_seconds += self.last_refresh_seconds
        with self._lock:
            self._published = 1 - self._published
        self.refreshes += 1

    def _refresh(self, b: _Buffer) -> None:
        eng = self.engine
        for name, t in eng.tables.items():
            n_old = 0 if b.full else b.n.get(name, 0)
            cols = b.cols.setdefault(name, {})
            for col, live in t.cols.items():
                cols[col] = _update(cols.get(col), live, t.n, n_old, b.pending.get(name), b.full)
            b.n[name] = t.n
            b.keys[name] = t.key_array()
        for lname, ls in eng.links.items():
            child = ls.child
            b.prow[lname] = _update(
                b.prow.get(lname),
                child.parent_row[lname],
                child.n,
                0 if b.full else b.n.get(child.name, 0),
                b.pending.get(child.name),
                b.full,
            )
        b.pending, b.pending_rows, b.full = {}, 0, False
        b.tick = eng.tick_id
        b.recent = list(eng.recent)
        b.metrics = eng.metrics()
        b.emissions = eng.emission_log.snapshot()

    @contextmanager
    def reader(self) -> Iterator[SnapshotView]:
        """Hold the published snapshot for the duration of the ``with`` block."""
        with self._lock:
            b = self._buffers[self._published]
            b.readers += 1
        try:
            yield SnapshotView(self.engine, b)
        finally:
            with self._lock:
                b.readers -= 1

    @property
    def nbytes(self) -> int:
        return sum(
            a.nbytes
            for b in self._buffers
            for group in [*b.cols.values(), b.prow]
            for a in group.values()
        )


def _update(shadow, live, n, n_old, pending, full) -> np.ndarray:
    """Bring ``shadow`` to ``live[:n]``: copy new rows [n_old, n) and the pending rows."""
    if shadow is None or len(shadow) < n:
        grown = np.empty(max(n, len(live)), live.dtype)
        if shadow is not None and not full:
            grown[:n_old] = shadow[:n_old]
        shadow = grown
    if full:
        shadow[:n] = live[:n]
        return shadow
    shadow[n_old:n] = live[n_old:n]
    for rows in pending or ():
        copy_rows(rows, live, shadow, n_old)
    return shadow


class SnapshotView:
    """A published snapshot as a SQL view (see ``vecswim.sql.StateView``)."""

    def __init__(self, engine: Engine, b: _Buffer) -> None:
        self._engine = engine
        self._b = b
        self.tick = b.tick

    def agent_tables(self) -> dict[str, pa.Table]:
        out = {}
        for name, t in self._engine.tables.items():
            n = self._b.n[name]
            data = {t.type.key: self._b.keys[name]}
            for col, a in self._b.cols[name].items():
                data[col] = pa.array(a[:n])
            out[name] = pa.table(data)
        return out

    def link_names(self) -> list[str]:
        return list(self._engine.links)

    def link_table(self, name: str) -> pa.Table:
        ls = self._engine.links[name]
        n = self._b.n[ls.child.name]
        prow = self._b.prow[name][:n]
        rows = np.flatnonzero(prow >= 0)
        ckeys = self._b.keys[ls.child.name]
        pkeys = self._b.keys[ls.parent.name]
        return pa.table(
            {
                f"child_{ls.child.type.key}": ckeys.take(pa.array(rows)),
                f"parent_{ls.parent.type.key}": pkeys.take(pa.array(prow[rows])),
            }
        )

    def ticks(self) -> pa.Table:
        return ticks_table(self._b.recent)

    def metrics(self) -> pa.Table:
        return metrics_table(self._b.metrics)

    def emissions(self) -> dict[str, pa.Table]:
        return {
            at: pa.Table.from_batches(bs, schema=schema)
            for at, (bs, schema) in self._b.emissions.items()
        }

    # -- point reads for live subscriptions (copies: valid after the reader is released) ----
    def rows_of(self, agent_type: str, keys: pa.Array) -> np.ndarray:
        """The row of each key (-1: no such agent); one hash pass, O(agents + len(keys))."""
        n = self._b.n[agent_type]
        idx = pc.index_in(keys, value_set=self._b.keys[agent_type][:n])
        return pc.fill_null(idx, -1).to_numpy(zero_copy_only=False).astype(np.int64)

    def value(self, agent_type: str, column: str, row: int) -> object:
        """One state value as a Python scalar."""
        return self._b.cols[agent_type][column][row].item()

    def emitted_columns(self, agent_type: str, rows: np.ndarray | None = None) -> pa.Table:
        """The key and the emitted columns of every agent (or of ``rows``), copied."""
        t = self._engine.tables[agent_type]
        n = self._b.n[agent_type]
        sel = np.arange(n) if rows is None else rows
        data = {t.type.key: self._b.keys[agent_type].take(pa.array(sel))}
        for col in t.last:
            data[col] = pa.array(self._b.cols[agent_type][col][sel])
        return pa.table(data)

    def children(self, link: str, parent_key: object) -> pa.Table:
        """The children of one parent: their keys and emitted columns, copied."""
        ls = self._engine.links[link]
        ptype = self._b.keys[ls.parent.name].type
        prow = self.rows_of(ls.parent.name, pa.array([parent_key], ptype))
        n = self._b.n[ls.child.name]
        rows = np.flatnonzero(self._b.prow[link][:n] == prow[0]) if prow[0] >= 0 else np.arange(0)
        return self.emitted_columns(ls.child.name, rows)
