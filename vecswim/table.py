"""State tables: one struct-of-arrays table per agent type, plus its key index.

Rows are stable ids (an agent keeps its row for life); columns are contiguous numpy arrays
grown by 1.5x, so the hot kernels index plain arrays. Nothing in here is per agent Python.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from vecswim.kernels import dirty as kdirty
from vecswim.kernels import keyindex as kidx
from vecswim.schema import AgentType

MAX_LOAD = 0.6
_GROWTH = 1.5


class StateTable:
    """The live state of every agent of one agent type.

    ``cols[name]`` are the user's state columns, ``hidden[name]`` the engine's own per-agent
    columns (e.g. a running mean's count), ``last[name]`` the last emitted value of each
    emitted column. ``stamp[row] == tick`` marks a row dirty; ``dirty[:n_dirty]`` lists the
    rows dirty in the current tick in first-touch order, and ``snap[name][j]`` holds column
    ``name`` of row ``dirty[j]`` as it was before the tick first touched it (only for the
    columns links aggregate or broadcast, see ``snap_columns``).
    """

    def __init__(self, agent_type: AgentType, capacity: int = 1024) -> None:
        self.type = agent_type
        self.name = agent_type.name
        self.n = 0
        self.cap = 0
        self.string_keys = agent_type.key_dtype == "string"
        self.cols: dict[str, np.ndarray] = {}
        self.hidden: dict[str, np.ndarray] = {}
        self.last: dict[str, np.ndarray] = {}
        self.initial: dict[str, float | int] = {}
        self.deadband: dict[str, float] = {}
        self.dtypes: dict[str, np.dtype] = {}
        for c in agent_type.columns:
            self._declare(c.name, c.np_dtype, c.initial_value)
            if c.deadband is not None:
                self.last[c.name] = np.empty(0, c.np_dtype)
                self.deadband[c.name] = c.deadband
            if c.rule is not None and c.rule.kind == "mean":
                self._declare_hidden(mean_count(c.name), np.dtype(np.int32), 0)
        self.stamp = np.empty(0, np.int32)
        self.keys = np.empty(0, np.int64)
        self.dict_offsets = np.zeros(1, np.int64)
        self.dict_data = np.empty(0, np.uint8)
        self.slots = np.full(23, kidx.EMPTY, np.int32)
        self.parent_row: dict[str, np.ndarray] = {}
        self.dirty = np.empty(1024, np.int32)
        self.n_dirty = 0
        self.n_snapped = 0
        self.first_new = 0
        self.snap_columns: list[str] = []
        self.snap: dict[str, np.ndarray] = {}
        self.snap_parent: dict[str, np.ndarray] = {}
        self._grow(max(int(capacity), 16))
        self._grow_slots(max(int(capacity), 16))

    # -- layout -------------------------------------------------------------------------
    def _declare(self, name: str, dtype: np.dtype, initial: float | int) -> None:
        self.cols[name] = np.empty(0, dtype)
        self.initial[name] = initial
        self.dtypes[name] = np.dtype(dtype)

    def _declare_hidden(self, name: str, dtype: np.dtype, initial: float | int) -> None:
        self.hidden[name] = np.empty(0, dtype)
        self.initial[name] = initial
        self.dtypes[name] = np.dtype(dtype)

    def add_hidden(self, name: str, dtype: str | np.dtype, initial: float | int) -> np.ndarray:
        """Add an engine-owned per-agent column (used by links for accumulators)."""
        self._declare_hidden(name, np.dtype(dtype), initial)
        self.hidden[name] = np.full(self.cap, initial, np.dtype(dtype))
        return self.hidden[name]

    def set_initial(self, name: str, value: float | int) -> None:
        """Change a column's value for new agents (only before the first agent exists)."""
        assert self.n == 0, "initial values are fixed once agents exist"
        self.initial[name] = value
        self.column(name)[:] = value
        if name in self.last:
            self.last[name][:] = value

    def add_parent_link(self, link: str) -> None:
        """Give every row a parent row for ``link`` (-1 = unlinked)."""
        self.parent_row[link] = np.full(self.cap, -1, np.int32)

    def _grow(self, need: int) -> None:
        if need <= self.cap:
            return
        cap = max(need, int(self.cap * _GROWTH))
        n = self.n

        def grown(a: np.ndarray, fill: float | int) -> np.ndarray:
            b = np.full(cap, fill, a.dtype) if fill is not None else np.empty(cap, a.dtype)
            b[:n] = a[:n]
            return b

        for group in (self.cols, self.hidden):
            for name, a in group.items():
                group[name] = grown(a, self.initial[name])
        for name, a in self.last.items():
            self.last[name] = grown(a, self.initial[name])
        for name, a in self.parent_row.items():
            self.parent_row[name] = grown(a, -1)
        self.stamp = grown(self.stamp, 0)
        if not self.string_keys:
            self.keys = grown(self.keys, None)
        else:
            offs = np.zeros(cap + 1, np.int64)
            offs[: n + 1] = self.dict_offsets[: n + 1]
            self.dict_offsets = offs
        self.cap = cap

    def _grow_slots(self, need_rows: int) -> None:
        if need_rows <= MAX_LOAD * len(self.slots):
            return
        self.slots = np.full(int(need_rows / MAX_LOAD) + 1, kidx.EMPTY, np.int32)
        if self.string_keys:
            kidx.str_rebuild(self.slots, self.dict_offsets, self.dict_data, self.n)
        else:
            kidx.int_rebuild(self.slots, self.keys, self.n)

    # -- keys -----------------------------------------------------------------------------
    def resolve(self, keys: pa.Array | np.ndarray) -> np.ndarray:
        """Rows (int32) of ``keys``, creating agents (initial state) for unseen keys.

        Int64 keys: numpy or Arrow int64 without nulls. String keys: Arrow string/large_string
        without nulls. One kernel call per batch: O(len(keys)) expected, plus amortized growth.
        """
        m = len(keys)
        out = np.empty(m, np.int32)
        i = 0
        if self.string_keys:
            offsets, data = _string_buffers(keys)
            need = int(self.dict_offsets[self.n]) + int(offsets[-1] - offsets[0])
            if need > len(self.dict_data):
                grown = np.empty(max(need, int(len(self.dict_data) * _GROWTH)), np.uint8)
                grown[: self.dict_offsets[self.n]] = self.dict_data[: self.dict_offsets[self.n]]
                self.dict_data = grown
            while True:
                self.n, i = kidx.str_lookup_or_insert(
                    offsets,
                    data,
                    i,
                    self.slots,
                    self.dict_offsets,
                    self.dict_data,
                    self.n,
                    self._room(),
                    out,
                )
                if i == m:
                    return out
                self._make_room()
        k = _int_keys(keys)
        while True:
            self.n, i = kidx.int_lookup_or_insert(
                k, i, self.slots, self.keys, self.n, self._room(), out
            )
            if i == m:
                return out
            self._make_room()

    def _room(self) -> int:
        return min(self.cap, int(MAX_LOAD * len(self.slots)))

    def _make_room(self) -> None:
        # Grow only when a new key actually needs a row (by the growth factor), so a batch of
        # mostly known keys never inflates the table.
        self._grow(self.n + 1)
        self._grow_slots(self.cap)

    def lookup(self, keys: pa.Array | np.ndarray) -> np.ndarray:
        """Rows of ``keys`` (int32, -1 where the agent does not exist). Creates nothing."""
        if self.string_keys:
            rows = self.resolve_existing_strings(keys)
            return rows
        out = np.empty(len(keys), np.int32)
        kidx.int_lookup(_int_keys(keys), self.slots, self.keys, out)
        return out

    def resolve_existing_strings(self, keys: pa.Array) -> np.ndarray:
        # String lookups without insertion are rare (tests, point queries): reuse the
        # dictionary through Arrow rather than a second string kernel.
        table_keys = self.key_array()
        idx = pa.compute.index_in(keys, value_set=table_keys)
        return idx.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int32)

    def key_array(self, rows: np.ndarray | None = None) -> pa.Array:
        """The key column as Arrow (zero-copy for all rows), or the keys of ``rows``."""
        if self.string_keys:
            arr = pa.LargeStringArray.from_buffers(
                self.n,
                pa.py_buffer(self.dict_offsets[: self.n + 1]),
                pa.py_buffer(self.dict_data[: max(int(self.dict_offsets[self.n]), 0)]),
            )
            return arr if rows is None else arr.take(pa.array(rows))
        if rows is None:
            return pa.array(self.keys[: self.n])
        return pa.array(self.keys[rows])

    # -- per tick ---------------------------------------------------------------------------
    def begin_tick(self) -> None:
        self.n_dirty = 0
        self.n_snapped = 0
        self.first_new = self.n

    def reserve_dirty(self, extra: int) -> None:
        """Make room for ``extra`` more dirty rows (and their snapshots); a row is dirty at
        most once per tick, so never more than the table's rows."""
        need = min(self.n_dirty + extra, max(self.n, 1))
        if need <= len(self.dirty):
            return
        size = max(need, 2 * len(self.dirty))
        d = np.empty(size, np.int32)
        d[: self.n_dirty] = self.dirty[: self.n_dirty]
        self.dirty = d
        for name, a in self.snap.items():
            b = np.empty(size, a.dtype)
            b[: self.n_dirty] = a[: self.n_dirty]
            self.snap[name] = b
        for name, a in self.snap_parent.items():
            b = np.empty(size, a.dtype)
            b[: self.n_dirty] = a[: self.n_dirty]
            self.snap_parent[name] = b

    def snapshot(self, start: int) -> None:
        """Record pre-tick values of the snapshot columns for ``dirty[start:n_dirty]``."""
        self.n_snapped = self.n_dirty
        if start == self.n_dirty:
            return
        rows = self.dirty[start : self.n_dirty]
        for name in self.snap_columns:
            self.snap[name][start : self.n_dirty] = self.column(name)[rows]
        for name, a in self.snap_parent.items():
            a[start : self.n_dirty] = self.parent_row[name][rows]

    def mark(self, rows: np.ndarray, tick: int) -> None:
        """Mark ``rows`` dirty in ``tick`` and snapshot the ones touched for the first time."""
        self.reserve_dirty(len(rows))
        start = self.n_dirty
        self.n_dirty = kdirty.mark(rows, self.stamp, tick, self.dirty, self.n_dirty)
        self.snapshot(start)

    def enable_snapshot(self, column: str) -> None:
        if column not in self.snap_columns:
            self.snap_columns.append(column)
            self.snap[column] = np.empty(len(self.dirty), self.dtypes[column])

    def enable_parent_snapshot(self, link: str) -> None:
        self.snap_parent[link] = np.empty(len(self.dirty), np.int32)

    @property
    def key_dtype(self) -> str:
        return self.type.key_dtype

    def column(self, name: str) -> np.ndarray:
        a = self.cols.get(name)
        return a if a is not None else self.hidden[name]

    def restamp(self) -> None:
        """Forget all dirty stamps (called when the tick counter wraps)."""
        self.stamp[:] = 0

    # -- views --------------------------------------------------------------------------------
    def to_arrow(self, copy: bool = False) -> pa.Table:
        """Key + state columns of all agents. Zero-copy views unless ``copy``; views are only
        consistent until the next tick changes the arrays (keys never change: rows are
        append-only, so the key column is always a view)."""
        data = {self.type.key: self.key_array()}
        for name, a in self.cols.items():
            v = a[: self.n]
            data[name] = pa.array(v.copy() if copy else v)
        return pa.table(data)

    @property
    def nbytes(self) -> int:
        """Bytes held for this table: columns, hidden and emitted copies, stamps, parent rows,
        keys and the key index (allocated capacity, not only used rows)."""
        total = self.stamp.nbytes + self.slots.nbytes + self.dirty.nbytes
        for group in (
            self.cols,
            self.hidden,
            self.last,
            self.parent_row,
            self.snap,
            self.snap_parent,
        ):
            total += sum(a.nbytes for a in group.values())
        total += self.keys.nbytes + self.dict_offsets.nbytes + self.dict_data.nbytes
        return total


def mean_count(column: str) -> str:
    """Name of the hidden event count of a ``mean`` column (``__`` names are the engine's)."""
    return f"__n.{column}"


def _int_keys(keys: pa.Array | np.ndarray) -> np.ndarray:
    if isinstance(keys, np.ndarray):
        return keys.astype(np.int64, copy=False)
    if isinstance(keys, pa.ChunkedArray):
        keys = keys.combine_chunks()
    return keys.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)


def _string_buffers(keys: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(keys, pa.ChunkedArray):
        keys = keys.combine_chunks()
    if not isinstance(keys, pa.Array):
        keys = pa.array(keys, pa.large_string())
    if pa.types.is_string(keys.type):
        off_dtype = np.int32
    elif pa.types.is_large_string(keys.type):
        off_dtype = np.int64
    else:
        keys = keys.cast(pa.large_string())
        off_dtype = np.int64
    _, obuf, dbuf = keys.buffers()
    offsets = np.frombuffer(obuf, off_dtype)[keys.offset : keys.offset + len(keys) + 1]
    data = np.frombuffer(dbuf, np.uint8) if dbuf is not None else np.empty(0, np.uint8)
    return offsets, data
