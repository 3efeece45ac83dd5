"""Live agents: every agent a SwimOS node, its state streamed over WebSocket (WARP or JSON).

Nodes and lanes (DESIGN.md "Live agents"):

- ``/<agent type>/<key>``: a *value lane* per state column; a *map lane* per link on parent
  agents, named after the link (child key -> the child's emitted columns, like a SwimOS join
  lane); a *command lane* ``event`` that turns a command into an event for that agent.
- ``/<agent type>``: a *map lane* ``agents`` (key -> the agent's emitted columns).
- ``swimos:meta:mesh``: a value lane ``pulse`` (ticks, events/s, tick p50/p99, agents,
  emitted rows, dead letters, connections, links), about once a second.

Semantics are SwimOS's: ``link`` -> ``linked``, then events; ``sync`` -> ``linked``, the
current value (value lane) or one update per key (map lane), then ``synced``; ``unlink`` ->
``unlinked``; an unknown node or lane -> ``unlinked`` with ``@nodeNotFound``/``@laneNotFound``.
An agent that does not exist yet is a valid node (its lanes start when data creates it).
Sync values are the state at one tick boundary T (a published snapshot); events are the
emissions (deadbands apply) of the ticks after T, so sync plus events never miss or repeat a
tick. A value lane of a column that is never emitted gets its sync value and no events.

Flow: after every tick the engine thread hands the tick's emission batches (already built for
the sinks), and for links someone watches the children's parent keys and moves, to the
server's event loop: O(1) work plus, per watched link, O(dirty children) numpy. The loop
matches them against the subscriptions in bulk (Arrow ``is_in``: cost O(emitted rows), then
Python only for rows someone subscribed to) and queues them on the uplinks. A connection's
writer sends what its uplinks hold, encoded in bulk (Arrow string kernels). Slow subscribers
never slow a tick: a value uplink keeps only the latest value, a map uplink merges its
queue to the latest row per key once it grows (so it is bounded by the keys, not the
ticks), and a connection whose queue still exceeds ``max_pending`` rows, or that takes no
data for ``stall_seconds``, is closed with a reason. If the loop falls ``backlog`` ticks
behind the engine, the queued ticks are dropped and every uplink re-syncs from a fresh
snapshot (state stays exact; intermediate values are coalesced).

Each frame the writer takes holds what the uplink had at one tick boundary; JSON map frames
carry that tick.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import gc
import json
import math
import threading
import time
import urllib.parse
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from aiohttp import WSMsgType, web

from vecswim import decode, recon

if TYPE_CHECKING:
    from vecswim.engine import Engine, TickStats
    from vecswim.snapshot import Snapshots

META_NODE = "swimos:meta:mesh"
PULSE_LANE = "pulse"
AGENTS_LANE = "agents"
COMMAND_LANE = "event"
WARP_PROTOCOL = "warp0"
_SHARE_ROWS = 8192  # entries up to this size keep their encoded frames for other uplinks
_CHUNK = 4096  # map lane rows per JSON frame, and per encoding step of a larger entry
JSON_PROTOCOL = "vecswim-json"


# -- addresses -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Address:
    """A resolved lane: ``kind`` is ``value``, ``agents``, ``link``, ``command`` or
    ``pulse``; ``type`` the agent type, ``key`` the agent's key (typed), ``name`` the column
    or link."""

    kind: str
    node: str
    lane: str
    type: str = ""
    key: object = None
    name: str = ""


@dataclass
class _Tick:
    """One tick as the engine thread hands it over."""

    tick: int
    emitted: dict[str, pa.RecordBatch]
    rows: dict[str, np.ndarray]  # type -> the agent row of each emitted row
    parents: dict[str, pa.Array]  # link -> parent key of each emitted child row (null: none)
    moves: dict[str, tuple]  # link -> (child keys, old parent keys, new parent keys, values)
    tracked: frozenset
    stats: TickStats | None


@dataclass
class _Entry:
    """Map lane rows queued for one uplink: ``updates`` (key column first, then the values)
    and/or ``removes`` (keys), as of ``tick``."""

    tick: int
    updates: pa.Table | None = None
    removes: pa.Array | None = None
    # frames already encoded, by (codec, node, lane[, first row]): a tick's entry is shared
    # by every uplink of an agents lane, and encoded once for all of them
    frames: dict = field(default_factory=dict)
    shared: bool = False  # a large entry sent to many uplinks (an agents lane's catch-up)
    readers: int = 0  # of a shared entry: the uplinks it was handed to
    sent: dict = field(default_factory=dict)  # and of those, how many sent each chunk

    @property
    def rows(self) -> int:
        return (0 if self.updates is None else self.updates.num_rows) + (
            0 if self.removes is None else len(self.removes)
        )


# -- uplinks ---------------------------------------------------------------------------------
class _Uplink:
    """One linked lane of one connection."""

    def __init__(self, conn: _Connection, addr: Address, sync: bool) -> None:
        self.conn = conn
        self.addr = addr
        self.want_sync = sync
        self.syncing = True  # no live offers until the sync (or link) point is known
        self.since = -1  # offers for ticks <= since are already covered
        self.control: list[tuple[str, int]] = []  # (tag, tick) frames before the data
        self.after: list[tuple[str, int]] = []  # after the data queued so far
        self.closed = False

    def take(self) -> object:
        return None

    def release(self) -> None:
        """Forget what is queued (the uplink closes or re-syncs)."""
        self.take()

    def ready(self) -> None:
        self.conn.ready(self)


class _ValueUplink(_Uplink):
    def __init__(self, conn: _Connection, addr: Address, sync: bool) -> None:
        super().__init__(conn, addr, sync)
        self.has = False
        self.value: object = None
        self.tick = -1
        self.known = False  # current: the newest value offered (sent or queued)
        self.current: object = None

    def offer(self, tick: int, value: object) -> None:
        if tick <= self.since or (self.known and _same(value, self.current)):
            return  # an emission of the row that left this column as it was
        self.known, self.current = True, value
        if self.has:
            self.conn.hub.dropped += 1  # coalesced: the client gets the newer value only
        self.has, self.value, self.tick = True, value, tick
        self.ready()

    def take(self) -> tuple[int, object] | None:
        if not self.has:
            return None
        self.has = False
        return self.tick, self.value


class _MapUplink(_Uplink):
    """A link lane uplink: a queue of entries, merged to the latest row per key once it
    doubles (bounded by the parent's children, not by the ticks)."""

    def __init__(self, conn: _Connection, addr: Address, sync: bool, key: str) -> None:
        super().__init__(conn, addr, sync)
        self.key = key
        self.entries: list[_Entry] = []
        self.rows = 0
        self.counted = 0  # of ``rows``, those counted against the connection's cap
        self.compact_at = conn.hub.compact_rows

    def offer(self, entry: _Entry, live: bool = True) -> None:
        """Queue ``entry``; a sync's entry (``live`` False) does not count against the cap:
        it is the lane's state, bounded by the children."""
        if entry.tick <= self.since or entry.rows == 0:
            return
        self.entries.append(entry)
        self.rows += entry.rows
        if live:
            self.counted += entry.rows
            self.conn.rows += entry.rows
        if self.rows > self.compact_at and len(self.entries) > 1:
            self.compact()
            # merge again only once the queue doubled: O(1) amortized per queued row
            self.compact_at = max(self.conn.hub.compact_rows, 2 * self.rows)
        if self.conn.rows > self.conn.hub.max_pending:
            self.conn.too_slow(f"more than {self.conn.hub.max_pending:,} updates pending")
            return
        self.ready()

    def compact(self) -> None:
        """Merge the queue to the latest row per key (a consistent later tick boundary)."""
        self.entries = [_merge(self.entries, self.key)]
        self.conn.hub.dropped += self.rows - self.entries[0].rows
        self.rows = self.entries[0].rows
        counted = min(self.counted, self.rows)
        self.conn.rows -= self.counted - counted
        self.counted = counted

    def take(self) -> list[_Entry]:
        self.compact_at = self.conn.hub.compact_rows
        self.conn.rows -= self.counted
        out, self.entries, self.rows, self.counted = self.entries, [], 0, 0
        return out


class _AgentsUplink(_Uplink):
    """An ``agents`` lane uplink. While it keeps up it queues the lane's ticks (entries
    shared by all uplinks of the lane, encoded once); once more than ``hub.compact_rows``
    rows wait, the queue is dropped and its next send is the rows changed since ``cursor``
    at their latest values, read from the shared :class:`_AgentsLane` (one tick boundary).
    Memory per uplink: at most ``compact_rows`` queued rows, whatever the lag."""

    def __init__(self, conn: _Connection, addr: Address, sync: bool) -> None:
        super().__init__(conn, addr, sync)
        self.entries: list[_Entry] = []
        self.rows = 0
        self.cursor = -1  # the client has, or is being sent, every change up to this tick
        self.behind = False  # the next send comes from the lane, not from ``entries``

    def offer(self, entry: _Entry) -> None:
        if entry.tick <= self.cursor or entry.rows == 0:
            return
        if not self.behind:
            self.entries.append(entry)
            self.rows += entry.rows
            self.conn.rows += entry.rows
            if self.rows > self.conn.hub.compact_rows:
                self.catch_up()
        self.ready()

    def catch_up(self) -> None:
        """Drop the queue: the next send is read from the lane."""
        self.conn.hub.dropped += self.rows
        self.conn.rows -= self.rows
        self.entries, self.rows, self.behind = [], 0, True

    def release(self) -> None:
        self.conn.rows -= self.rows
        self.entries, self.rows, self.behind = [], 0, False

    def take(self) -> list[_Entry]:
        if self.behind:
            hub = self.conn.hub
            entry = hub.catch_up(self)
            # a round gathered ticks ago leaves this uplink behind still: the ticks since
            # were offered while it was behind, and come from the lane next time
            self.cursor = entry.tick
            self.behind = entry.tick < hub.lanes[self.addr.type].tick
            if self.behind:
                self.ready()
            # a sync is as of the tick its rows were read at
            self.after = [(tag, self.cursor if t is None else t) for tag, t in self.after]
            return [entry] if entry.rows else []
        out = self.entries
        if out:
            self.cursor = out[-1].tick
        self.conn.rows -= self.rows
        self.entries, self.rows = [], 0
        return out


class _AgentsLane:
    """The latest emitted row of every agent of one type as of tick ``tick``, kept on the
    loop thread while anyone links the type's ``agents`` lane, shared by those uplinks.

    ``ver[row]`` is the tick that last changed the row, so an uplink that fell behind
    catches up with the rows changed since its cursor, each at its latest value (map lanes
    coalesce per key), in one gather: there is no per-uplink queue to merge. A row's key
    never changes, so keys are kept once, as Arrow, where ``key_pos[row]`` points (no Python
    object per key). Memory: the emitted columns, the keys, and 16 bytes per agent. Cost:
    O(emitted rows) numpy per tick; a catch-up is one O(agents) scan plus O(changed rows).
    While a catch-up reads the arrays on another thread (``deferred`` is a list), the ticks
    handed out wait in it and are applied, in order, by ``resume``.
    """

    def __init__(self, table: pa.Table, tick: int) -> None:
        n = table.num_rows
        self.key, self.key_type = table.column_names[0], table.schema.field(0).type
        self.names = table.column_names[1:]
        self.n, self.tick = n, tick
        self.round: tuple[int, _Entry] | None = None  # the newest catch-up: (cursor, rows)
        cap = max(n, 1024)
        self._key_chunks = [table.column(0).combine_chunks()]
        self._key_count = n
        self.key_pos = _grown(np.arange(n, dtype=np.int64), cap, -1)
        self.cols = {
            c: _grown(table.column(c).to_numpy(zero_copy_only=False), cap) for c in self.names
        }
        self.ver = _grown(np.full(n, tick, np.int64), cap, -1)
        self.deferred: list | None = None
        self.gathering: asyncio.Task | None = None

    def advance(self, tick: int) -> None:
        """A handed-out tick that emitted no row of this type: still a boundary of the lane."""
        if self.deferred is not None:
            self.deferred.append((tick, None, None))
        else:
            self.tick = max(self.tick, tick)

    def resume(self) -> None:
        """Apply the ticks deferred while a catch-up read the arrays."""
        deferred, self.deferred = self.deferred or [], None
        for tick, rows, batch in deferred:
            if rows is None:
                self.advance(tick)
            else:
                self.apply(tick, rows, batch)

    def apply(self, tick: int, rows: np.ndarray, batch: pa.RecordBatch) -> None:
        """Take one handed-out tick's emission of this type (``rows``: the agents' rows);
        ticks the lane already covers are skipped."""
        if self.deferred is not None:
            self.deferred.append((tick, rows, batch))
            return
        if tick <= self.tick:
            return
        self.tick = tick
        if not len(rows):
            return
        top = int(rows.max()) + 1
        if top > len(self.ver):
            cap = max(top, 2 * len(self.ver))
            self.key_pos = _grown(self.key_pos, cap, -1)
            self.cols = {c: _grown(a, cap) for c, a in self.cols.items()}
            self.ver = _grown(self.ver, cap, -1)
        self.n = max(self.n, top)
        new = np.flatnonzero(self.ver[rows] < 0)  # agents the lane has not seen yet
        if len(new):
            self.key_pos[rows[new]] = self._key_count + np.arange(len(new))
            self._key_chunks.append(batch.column(0).take(pa.array(new)).cast(self.key_type))
            self._key_count += len(new)
            if len(self._key_chunks) > 64:
                self._key_chunks = [pa.concat_arrays(self._key_chunks)]
        for c in self.names:
            self.cols[c][rows] = batch.column(c).to_numpy(zero_copy_only=False)
        self.ver[rows] = tick

    def since(self, cursor: int) -> pa.Table | None:
        """Key and emitted columns of the rows changed after tick ``cursor``, in row order;
        None if none changed."""
        rows = np.flatnonzero(self.ver[: self.n] > cursor)
        if not len(rows):
            return None
        if len(self._key_chunks) > 1:  # one array: a take over many chunks is slower
            self._key_chunks = [pa.concat_arrays(self._key_chunks)]
        data = {self.key: self._key_chunks[0].take(pa.array(self.key_pos[rows]))}
        for c in self.names:
            data[c] = pa.array(self.cols[c][rows])
        return pa.table(data)


def _timed_since(lane: _AgentsLane, cursor: int) -> tuple[pa.Table | None, float]:
    """``lane.since(cursor)`` and the CPU seconds it took (run on the encoder thread)."""
    t = time.thread_time()
    table = lane.since(cursor)
    return table, time.thread_time() - t


def _serves(r: tuple[int, _Entry] | None, up: _AgentsUplink) -> bool:
    """Whether catch-up round ``r`` holds every change ``up`` lacks, and some."""
    return r is not None and r[0] <= up.cursor and r[1].tick > up.cursor


def _grown(a: np.ndarray, cap: int, fill: object = None) -> np.ndarray:
    """``a`` copied into a new array of length ``cap`` (the rest: ``fill``, or unset)."""
    out = np.empty(cap, a.dtype) if fill is None else np.full(cap, fill, a.dtype)
    out[: len(a)] = a
    return out


def _merge(entries: list[_Entry], key: str) -> _Entry:
    """Entries in order -> one entry with the last state per key (update or remove)."""
    parts = []
    schema = None
    for seq, e in enumerate(entries):
        if e.updates is not None and e.updates.num_rows:
            schema = e.updates.schema
            t = e.updates.append_column("__op", pa.array(np.zeros(e.updates.num_rows, np.int8)))
            parts.append((seq, t))
        if e.removes is not None and len(e.removes):
            parts.append((seq, e.removes))
    if schema is None:  # removes only
        keys = pa.concat_arrays([p for _, p in parts]).unique()
        return _Entry(entries[-1].tick, None, keys)
    tables = []
    for _, p in parts:
        if isinstance(p, pa.Table):
            tables.append(p)
        else:
            cols = {key: p.cast(schema.field(0).type)}
            for f in schema:
                if f.name != key:
                    cols[f.name] = pa.nulls(len(p), f.type)
            cols["__op"] = pa.array(np.ones(len(p), np.int8))
            tables.append(pa.table(cols))
    allrows = pa.concat_tables(tables, promote_options="permissive")
    n = allrows.num_rows
    # the last occurrence of each key: dedupe the reversed order, keep first
    rev = allrows.take(pa.array(np.arange(n - 1, -1, -1)))
    idx = rev.append_column("__i", pa.array(np.arange(n))).group_by(key).aggregate([("__i", "min")])
    last = rev.take(idx.column("__i_min"))
    ops = last.column("__op").to_numpy()
    upd = last.filter(pa.array(ops == 0)).drop_columns(["__op"])
    rem = last.filter(pa.array(ops == 1)).column(key).combine_chunks()
    return _Entry(entries[-1].tick, upd if upd.num_rows else None, rem if len(rem) else None)


# -- encoders --------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4096)
def _lit(text: str) -> pa.Scalar:
    """A string literal as an Arrow scalar: pyarrow converts a Python str argument on every
    compute call (about 20x the cost of the kernel on small arrays), so build each once."""
    return pa.scalar(text, pa.string())


_FALSE = pa.scalar(False)


def _join(*parts: object) -> pa.Array:
    """Element-wise concatenation of string arrays and literals."""
    return pc.binary_join_element_wise(
        *(_lit(p) if isinstance(p, str) else p for p in parts), _lit("")
    )


def _recon_column(arr: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Recon text of each value (nulls and NaN-free absent as empty)."""
    arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    t = arr.type
    if pa.types.is_boolean(t) or pa.types.is_integer(t):
        return pc.fill_null(pc.cast(arr, pa.string()), _lit(""))
    if pa.types.is_floating(t):
        s = pc.cast(arr, pa.string())
        plain = pc.match_substring_regex(s, r"^-?[0-9]+$")
        s = pc.if_else(plain, _join(s, ".0"), s)
        expo = pc.match_substring(s, "e")
        if pc.any(expo).as_py():
            vals = arr.to_numpy(zero_copy_only=False)
            texts = s.to_pylist()
            for i in np.flatnonzero(expo.to_numpy(zero_copy_only=False)):
                texts[i] = recon.number(vals[i])
            s = pa.array(texts, pa.string())
        return pc.fill_null(s, _lit(""))
    s = pc.cast(arr, pa.string())
    if pc.any(pc.match_substring_regex(s, r"[\x00-\x1f]")).as_py():
        return pa.array([None if v is None else recon.quote(v) for v in s.to_pylist()]).fill_null(
            ""
        )
    s = pc.replace_substring(pc.replace_substring(s, "\\", "\\\\"), '"', '\\"')
    return pc.fill_null(_join('"', s, '"'), _lit(""))


def _json_column(arr: pa.Array | pa.ChunkedArray) -> pa.Array:
    """JSON text of each value: NaN as null, infinities as "Infinity"/"-Infinity" (as the
    SQL endpoint answers), nulls as null."""
    arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    t = arr.type
    if pa.types.is_boolean(t) or pa.types.is_integer(t):
        return pc.fill_null(pc.cast(arr, pa.string()), _lit("null"))
    if pa.types.is_floating(t):
        s = pc.cast(arr, pa.string())
        if not pc.all(pc.is_finite(arr)).as_py():
            for word, text in (("nan", "null"), ("inf", '"Infinity"'), ("-inf", '"-Infinity"')):
                s = pc.if_else(pc.equal(s, _lit(word)), _lit(text), s)
        return pc.fill_null(s, _lit("null"))
    vals = arr.cast(pa.string()).to_pylist()
    return pa.array(["null" if v is None else json.dumps(v) for v in vals], pa.string())


class _Codec:
    """How frames are written for one protocol."""

    def control(self, tag: str, addr: Address, tick: int, reason: str | None) -> str:
        raise NotImplementedError

    def value(self, addr: Address, tick: int, value: object) -> str:
        raise NotImplementedError

    def encode(self, addr: Address, entry: _Entry, lo: int, hi: int) -> list[str | bytes]:
        """The frames of updates ``lo:hi`` of ``entry``, then its removes if ``hi`` is its
        last update. Runs on the hub's encoder thread: Arrow kernels, which release the GIL,
        do the per-row work."""
        raise NotImplementedError


class WarpCodec(_Codec):
    """WARP envelopes in Recon: one envelope per frame, as SwimOS clients expect."""

    def control(self, tag: str, addr: Address, tick: int, reason: str | None) -> str:
        return recon.envelope(tag, addr.node, addr.lane, f"@{reason}" if reason else "")

    def value(self, addr: Address, tick: int, value: object) -> str:
        return recon.envelope("event", addr.node, addr.lane, recon.write(value))

    def encode(self, addr: Address, entry: _Entry, lo: int, hi: int) -> list[str | bytes]:
        head = recon.envelope("event", addr.node, addr.lane, "")
        out: list[str | bytes] = []
        t = entry.updates
        if t is not None and hi > lo:
            part = t.slice(lo, hi - lo)
            pieces: list = [head + "@update(key:", _recon_column(part.column(0)), "){"]
            for i, name in enumerate(part.column_names[1:]):
                pieces += [("," if i else "") + recon.text(name) + ":"]
                pieces.append(_recon_column(part.column(i + 1)))
            pieces.append("}")
            out += _join(*pieces).to_pylist()
        if entry.removes is not None and hi >= (0 if t is None else t.num_rows):
            out += _join(head + "@remove(key:", _recon_column(entry.removes), ")").to_pylist()
        return out


class JsonCodec(_Codec):
    """The same operations as JSON objects; a map lane frame carries many rows of one tick."""

    def control(self, tag: str, addr: Address, tick: int, reason: str | None) -> str:
        d: dict = {"tag": tag, "node": addr.node, "lane": addr.lane}
        if tag == "synced":
            d["tick"] = tick
        if tag == "unlinked":
            d["reason"] = reason
        return json.dumps(d)

    def value(self, addr: Address, tick: int, value: object) -> str:
        # the same text as json.dumps of the whole object, its constant head encoded once
        head = _json_value_head(addr.node, addr.lane)
        return f'{head}{tick}, "value": {json.dumps(_jsonable(value))}}}'

    def encode(self, addr: Address, entry: _Entry, lo: int, hi: int) -> list[str | bytes]:
        head = json.dumps(
            {"tag": "event", "node": addr.node, "lane": addr.lane, "tick": entry.tick}
        )[:-1]
        out: list[str | bytes] = []
        t = entry.updates
        for a in range(lo, hi, _CHUNK):
            part = t.slice(a, min(_CHUNK, hi - a))
            pieces: list = ["[", _json_column(part.column(0)), ",{"]
            for i, name in enumerate(part.column_names[1:]):
                pieces.append(("," if i else "") + json.dumps(name) + ":")
                pieces.append(_json_column(part.column(i + 1)))
            pieces.append("}]")
            out.append(_frame(head + ',"updates":[', _join(*pieces), '],"removes":[]}'))
        if entry.removes is not None and hi >= (0 if t is None else t.num_rows):
            keys = _json_column(entry.removes)
            out.append(_frame(head + ',"updates":[],"removes":[', keys, "]}"))
        return out


@functools.lru_cache(maxsize=1 << 16)
def _json_value_head(node: str, lane: str) -> str:
    return json.dumps({"tag": "event", "node": node, "lane": lane})[:-1] + ', "tick": '


def _frame(head: str, items: pa.Array, tail: str) -> bytes:
    """``head``, the texts of ``items`` joined by commas, ``tail``: one frame's UTF-8, joined
    by Arrow (no Python string per row). ``head`` carries the tick: it is not made an Arrow
    literal, which ``_lit`` would cache once per tick."""
    joined = pc.binary_join(
        pa.ListArray.from_arrays(pa.array([0, len(items)], pa.int32()), items), _lit(",")
    )[0].as_buffer()
    return b"".join((head.encode(), b"" if joined is None else joined, tail.encode()))


def _jsonable(v: object) -> object:
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    return v


# -- connections -----------------------------------------------------------------------------
class _Frame:
    """A queued frame outside any uplink."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


class _Connection:
    """One WebSocket client: its uplinks and the task that writes to it."""

    def __init__(
        self, hub: LiveHub, request: web.Request, ws: web.WebSocketResponse, codec: _Codec
    ) -> None:
        self.hub = hub
        self.request = request
        self.ws = ws
        self.codec = codec
        self.uplinks: dict[tuple[str, str], _Uplink] = {}
        self.queue: dict[_Uplink | _Frame, None] = {}  # what has something to send, in order
        self.wake = asyncio.Event()
        self.closing: str | None = None
        self.sent = 0
        self.rows = 0  # map lane rows queued over all uplinks
        self.sending_since: float | None = None  # monotonic start of the send under way

    def ready(self, up: _Uplink | _Frame) -> None:
        if up in self.queue:
            return
        self.queue[up] = None
        self.wake.set()

    def frame(self, text: str) -> None:
        """Queue one frame that belongs to no uplink (unlinked, errors, authed), in order."""
        self.ready(_Frame(text))

    def too_slow(self, why: str) -> None:
        if self.closing is None:
            self.closing = why
            self.hub.closed_slow += 1
            asyncio.get_running_loop().create_task(self._close(1008, f"too slow: {why}"))

    async def _close(self, code: int, reason: str) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2.0):
                await self.ws.close(code=code, message=reason.encode()[:120])
        transport = self.request.transport
        if not self.ws.closed and transport is not None:
            transport.abort()  # the close handshake did not finish: drop the socket

    async def send(self, frame: str | bytes) -> None:
        """Send one frame. A send that waits too long (the client reads nothing) is ended by
        the hub's watchdog, which closes the connection (no timer per send: with thousands
        of connections their timer handles were a large share of the loop's work)."""
        self.sending_since = time.monotonic()
        try:
            if isinstance(frame, bytes):  # UTF-8 already: no round trip through str
                await self.ws.send_frame(frame, WSMsgType.TEXT)
            else:
                await self.ws.send_str(frame)
        finally:
            self.sending_since = None
        if self.closing is not None:
            raise ConnectionResetError(self.closing)
        self.sent += 1
        self.hub.sent += 1

    async def _send_entry(self, addr: Address, entry: _Entry) -> None:
        """Encode ``entry`` on the hub's encoder thread and send it. A tick's entry (shared
        by every uplink of its lane) is encoded once for all of them; a larger one (a sync
        or catch-up) a chunk at a time within ``catch_up_share``, each chunk once for all
        uplinks if the entry is ``shared``."""
        hub, codec = self.hub, self.codec
        n = 0 if entry.updates is None else entry.updates.num_rows
        if entry.rows <= _SHARE_ROWS:
            key = (type(codec), addr.node, addr.lane)
            fut = entry.frames.get(key)
            if fut is None:
                fut = entry.frames[key] = hub.encode(codec, addr, entry, 0, n)
            # shielded: this connection ending must not cancel the encoding others await
            for f in await asyncio.shield(fut):
                await self.send(f)
            return
        for lo in range(0, max(n, 1), _CHUNK):
            key = (type(codec), addr.node, addr.lane, lo)
            fut = entry.frames.get(key)
            if fut is None:
                await hub.catch_up_turn()
                fut = hub.encode(codec, addr, entry, lo, min(lo + _CHUNK, n), timed=True)
                if entry.shared:
                    entry.frames[key] = fut
            frames = await asyncio.shield(fut)
            if entry.shared:
                # once every uplink it was handed to has this chunk, its frames can go (an
                # uplink that joins the round later encodes it again)
                entry.sent[key] = done = entry.sent.get(key, 0) + 1
                if done >= entry.readers:
                    entry.frames.pop(key, None)
            for f in frames:
                await self.send(f)

    async def writer(self) -> None:
        """Send what the uplinks hold, uplink by uplink, until the connection ends."""
        codec = self.codec
        while True:
            await self.wake.wait()
            self.wake.clear()
            while self.queue:
                up = next(iter(self.queue))
                del self.queue[up]
                if isinstance(up, _Frame):
                    await self.send(up.text)
                    continue
                control, up.control = up.control, []
                for tag, tick in control:
                    await self.send(codec.control(tag, up.addr, tick, None))
                if isinstance(up, _AgentsUplink) and up.behind:
                    await self.hub.catch_up_turn()
                    if not up.closed:
                        await self.hub.prepare_catch_up(up)
                    if up.closed:
                        continue
                got = up.take()  # before ``after``: an agents lane's sync sets its tick
                after, up.after = up.after, []
                if isinstance(up, _ValueUplink):
                    if got is not None:
                        await self.send(codec.value(up.addr, got[0], got[1]))
                elif got:
                    for entry in got:
                        await self._send_entry(up.addr, entry)
                for tag, tick in after:
                    await self.send(codec.control(tag, up.addr, tick, None))


# -- the hub ---------------------------------------------------------------------------------
class LiveHub:
    """Nodes, lanes and subscriptions of one engine, served on the SQL server's event loop.

    ``attach(loop)`` hooks it into the engine (``Engine.after_tick``); ``handle(request,
    protocol)`` serves one WebSocket. Engine-thread cost per tick: O(1), plus O(dirty
    children) numpy for each link whose lane someone watches. ``max_pending``: live rows a
    connection may have queued before it is closed as too slow; ``compact_rows``: rows a map
    uplink queues before it coalesces (a link lane merges its queue; an agents lane drops it
    and catches up from the shared lane state); ``catch_up_share``: the share of one core
    that catch-ups (the gathers and their encoding) may use, so that lagging clients get
    coalesced updates less often instead of taking the engine's cores; ``stall_seconds``: how
    long a send may wait; ``history``: ticks kept to bring a new sync up to date;
    ``backlog``: ticks the loop may fall behind before it re-syncs everyone instead.
    """

    def __init__(
        self,
        engine: Engine,
        snapshots: Snapshots,
        *,
        max_pending: int = 2_000_000,
        compact_rows: int = 50_000,
        stall_seconds: float = 30.0,
        history: int = 256,
        backlog: int = 1024,
        pulse_seconds: float = 1.0,
        max_message: int = 1 << 16,
        catch_up_share: float = 0.1,
    ) -> None:
        self.engine = engine
        self.snapshots = snapshots
        self.max_pending = max_pending
        self.compact_rows = compact_rows
        self.stall_seconds = stall_seconds
        self.backlog = backlog
        self.pulse_seconds = pulse_seconds
        self.max_message = max_message
        self.commands = Commands(engine)
        # map lane frames are encoded here, off the loop: one thread, so that encoding for
        # lagging clients takes at most one core from the engine
        self.encoder = concurrent.futures.ThreadPoolExecutor(1, "vecswim-live-encode")
        self.catch_up_share = catch_up_share
        self._budget_at = 0.0  # catch-up work may start from this monotonic time on
        self._budget_lock = threading.Lock()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._inbox: deque[_Tick] = deque()
        self._scheduled = False
        self._overflow = False
        self._ring: deque[_Tick] = deque(maxlen=history)
        self._covered_from = 0  # the ring holds every tick from here on
        self._last = -1  # newest tick handed to the uplinks
        self._tracked: frozenset = frozenset()
        self.conns: set[_Connection] = set()
        self.values: dict[str, dict[object, list[_ValueUplink]]] = {}
        self._watched: dict[str, pa.Array | None] = {}
        self.agents: dict[str, set[_AgentsUplink]] = {}
        self.lanes: dict[str, _AgentsLane] = {}  # of the types someone links ``agents`` of
        self.link_lanes: dict[str, dict[object, set[_MapUplink]]] = {}
        self._watched_parents: dict[str, pa.Array | None] = {}
        self.pulses: set[_ValueUplink] = set()
        self._syncs: list[_Uplink] = []
        self._sync_task: asyncio.Task | None = None
        self._pulse_task: asyncio.Task | None = None
        self._watch_task: asyncio.Task | None = None
        self.closed_slow = 0
        self.malformed = 0
        self.links = 0  # open uplinks
        self.sent = 0
        self.dropped = 0
        self.resyncs = 0  # times the loop fell ``backlog`` ticks behind
        self.catch_ups = 0  # catch-up rounds gathered for lagging agents-lane uplinks
        self.catch_up_sends = 0  # and sent (a round serves every uplink it covers)
        self.freeze_after = 500
        self.unfreeze_seconds = 600.0
        self._opened_since = self._closed_since = 0
        self._frozen_at: float | None = None
        self._key_types = {
            n: t.key_array(np.zeros(0, np.int32)).type for n, t in engine.tables.items()
        }

    # -- engine thread ------------------------------------------------------------------------
    def attach(self, loop: asyncio.AbstractEventLoop) -> LiveHub:
        self.loop = loop
        self.engine.after_tick.append(self.after_tick)
        loop.call_soon_threadsafe(self._start_pulse)
        return self

    def after_tick(self, stats: TickStats) -> None:
        """Engine thread: hand the tick over to the loop (never waits)."""
        eng = self.engine
        tracked = self._tracked
        parents: dict[str, pa.Array] = {}
        moves: dict[str, tuple] = {}
        for name in tracked:
            ls = eng.links[name]
            child, parent = ls.child, ls.parent
            rows = eng.emitted_rows.get(child.name)
            if rows is not None:
                parents[name] = _keys(parent, child.parent_row[name][rows])
            n = child.n_dirty
            if n:
                dirty = child.dirty[:n]
                old = child.snap_parent[name][:n]
                new = child.parent_row[name][dirty]
                m = np.flatnonzero(old != new)
                if len(m):
                    mr = dirty[m]
                    cols = {child.type.key: child.key_array(mr)}
                    for c, last in child.last.items():
                        cols[c] = pa.array(last[mr])
                    moves[name] = (pa.table(cols), _keys(parent, old[m]), _keys(parent, new[m]))
        item = _Tick(
            stats.tick, dict(eng.emitted), dict(eng.emitted_rows), parents, moves, tracked, stats
        )
        if len(self._inbox) >= self.backlog:
            self._inbox.clear()
            self._overflow = True
        self._inbox.append(item)
        if not self._scheduled and self.loop is not None:
            self._scheduled = True
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens
                self.loop.call_soon_threadsafe(self._drain)

    # -- loop thread: fan-out -----------------------------------------------------------------
    def _drain(self) -> None:
        self._scheduled = False
        if self._overflow:
            self._overflow = False
            self._inbox.clear()
            self._ring.clear()
            self._resync_all()
            return
        while self._inbox:
            item = self._inbox.popleft()
            if not self._ring or len(self._ring) == self._ring.maxlen:
                self._covered_from = item.tick if not self._ring else self._ring[1].tick
            self._ring.append(item)
            self._last = item.tick
            self._fan_out(item)

    def _fan_out(self, item: _Tick) -> None:
        tick = item.tick
        for tname, lane in self.lanes.items():
            batch = item.emitted.get(tname)
            if batch is not None:
                lane.apply(tick, item.rows[tname], batch)
            else:
                lane.advance(tick)
        for tname, batch in item.emitted.items():
            subs = self.values.get(tname)
            if subs:
                watched = self._watched_keys(tname)
                hit = pc.is_in(batch.column(0), value_set=watched)
                idx = np.flatnonzero(hit.to_numpy(zero_copy_only=False))
                if len(idx):
                    rows = batch.take(pa.array(idx)).to_pylist()
                    key = batch.schema.names[0]
                    for row in rows:
                        for up in subs.get(row[key], ()):
                            if up.addr.name in row:
                                up.offer(tick, row[up.addr.name])
            ups = self.agents.get(tname)
            if ups:
                entry = _Entry(tick, _updates(batch))
                for up in list(ups):
                    if not up.syncing:
                        up.offer(entry)
        for lname, per_parent in self.link_lanes.items():
            if per_parent and lname in item.tracked:
                self._fan_out_link(item, lname, per_parent)

    def _fan_out_link(self, item: _Tick, lname: str, per_parent: dict) -> None:
        ls = self.engine.links[lname]
        watched = self._watched_parent_keys(lname)
        batch = item.emitted.get(ls.child.name)
        pkeys = item.parents.get(lname)
        groups: dict[object, list[_Entry]] = {}
        if batch is not None and pkeys is not None:
            idx = np.flatnonzero(
                pc.fill_null(pc.is_in(pkeys, value_set=watched), _FALSE).to_numpy(
                    zero_copy_only=False
                )
            )
            if len(idx):
                sub = _updates(batch).take(pa.array(idx))
                pk = pkeys.take(pa.array(idx))
                for k in pk.unique().to_pylist():
                    groups.setdefault(k, []).append(
                        _Entry(item.tick, sub.filter(pc.equal(pk, pa.scalar(k, pk.type))))
                    )
        move = item.moves.get(lname)
        if move is not None:
            values, old, new = move
            for arr, removing in ((old, True), (new, False)):
                hit = pc.fill_null(pc.is_in(arr, value_set=watched), _FALSE)
                idx = np.flatnonzero(hit.to_numpy(zero_copy_only=False))
                if not len(idx):
                    continue
                sel = arr.take(pa.array(idx))
                rows = values.take(pa.array(idx))
                for k in sel.unique().to_pylist():
                    part = rows.filter(pc.equal(sel, pa.scalar(k, sel.type)))
                    e = (
                        _Entry(item.tick, None, part.column(0).combine_chunks())
                        if removing
                        else _Entry(item.tick, part)
                    )
                    groups.setdefault(k, []).append(e)
        for k, entries in groups.items():
            for up in per_parent.get(k, ()):
                if not up.syncing:
                    for e in entries:
                        up.offer(e)

    def _watched_keys(self, tname: str) -> pa.Array:
        w = self._watched.get(tname)
        if w is None:
            w = pa.array(list(self.values.get(tname, {})), self._key_types[tname])
            self._watched[tname] = w
        return w

    def _watched_parent_keys(self, lname: str) -> pa.Array:
        w = self._watched_parents.get(lname)
        if w is None:
            ptype = self.engine.links[lname].parent.name
            w = pa.array(list(self.link_lanes.get(lname, {})), self._key_types[ptype])
            self._watched_parents[lname] = w
        return w

    # -- loop thread: addresses and subscriptions -----------------------------------------------
    def resolve(self, node: str, lane: str) -> Address | str:
        """The lane at ``node``/``lane``, or ``nodeNotFound``/``laneNotFound``."""
        eng = self.engine
        if node == META_NODE:
            return Address("pulse", node, lane) if lane == PULSE_LANE else "laneNotFound"
        parts = node.split("/")
        if len(parts) < 2 or parts[0] != "" or parts[1] not in eng.types:
            return "nodeNotFound"
        tname = parts[1]
        at = eng.types[tname]
        if len(parts) == 2:
            return Address("agents", node, lane, tname) if lane == AGENTS_LANE else "laneNotFound"
        if len(parts) != 3:
            return "nodeNotFound"
        key = _parse_key(urllib.parse.unquote(parts[2]), eng.tables[tname].string_keys)
        if key is None:
            return "nodeNotFound"
        if lane == COMMAND_LANE:
            return Address("command", node, lane, tname, key)
        if lane in eng.tables[tname].cols and lane in {c.name for c in at.columns}:
            return Address("value", node, lane, tname, key, lane)
        link = eng.links.get(lane)
        if link is not None and link.parent.name == tname:
            return Address("link", node, lane, tname, key, lane)
        return "laneNotFound"

    def open(self, conn: _Connection, addr: Address, sync: bool) -> _Uplink:
        """Register an uplink; it syncs (or just links) on the next sync round."""
        if addr.kind == "value" or addr.kind == "pulse":
            up: _Uplink = _ValueUplink(conn, addr, sync)
        elif addr.kind == "agents":
            up = _AgentsUplink(conn, addr, sync)
        else:
            up = _MapUplink(conn, addr, sync, self.engine.links[addr.name].child.type.key)
        self.links += 1
        if addr.kind == "value":
            self.values.setdefault(addr.type, {}).setdefault(addr.key, []).append(up)
            self._watched[addr.type] = None
        elif addr.kind == "agents":
            self.agents.setdefault(addr.type, set()).add(up)
        elif addr.kind == "link":
            self.link_lanes.setdefault(addr.name, {}).setdefault(addr.key, set()).add(up)
            self._watched_parents[addr.name] = None
            self._tracked = frozenset(k for k, v in self.link_lanes.items() if v)
        elif addr.kind == "pulse":
            self.pulses.add(up)
        up.control.append(("linked", -1))
        up.ready()
        self._syncs.append(up)
        if self._sync_task is None or self._sync_task.done():
            self._sync_task = asyncio.get_running_loop().create_task(self._sync_round())
        return up

    def close(self, up: _Uplink) -> None:
        """Forget an uplink (once)."""
        if up.closed:
            return
        up.closed = True
        self.links -= 1
        up.release()
        addr = up.addr
        if addr.kind == "value":
            subs = self.values.get(addr.type, {})
            lst = subs.get(addr.key, [])
            if up in lst:
                lst.remove(up)
                if not lst:
                    del subs[addr.key]
                    self._watched[addr.type] = None
        elif addr.kind == "agents":
            ups = self.agents.get(addr.type, set())
            ups.discard(up)
            if not ups:
                self.lanes.pop(addr.type, None)
        elif addr.kind == "link":
            per = self.link_lanes.get(addr.name, {})
            s = per.get(addr.key)
            if s is not None:
                s.discard(up)
                if not s:
                    del per[addr.key]
                    self._watched_parents[addr.name] = None
            self._tracked = frozenset(k for k, v in self.link_lanes.items() if v)
        elif addr.kind == "pulse":
            self.pulses.discard(up)
        up.conn.queue.pop(up, None)
        with contextlib.suppress(ValueError):
            self._syncs.remove(up)

    # -- loop thread: sync -----------------------------------------------------------------------
    async def _sync_round(self) -> None:
        """Bring every new uplink to a tick boundary: read a snapshot (in a thread) for all
        of them at once, then replay the ticks the loop handed out since."""
        await asyncio.sleep(0)  # let a burst of links arrive first
        while self._syncs:
            batch, self._syncs = self._syncs, []
            need = {u.addr.type for u in batch if u.addr.kind == "agents"} - set(self.lanes)
            for _attempt in range(200):
                tick, values = await asyncio.to_thread(self._read_snapshot, batch, need)
                # the ring must hold every tick after the snapshot that the loop handed out
                links_ok = all(
                    all(up.addr.name in it.tracked for it in self._ring if it.tick > tick)
                    for up in batch
                    if up.addr.kind == "link"
                )
                if (tick >= self._last or tick + 1 >= self._covered_from) and links_ok:
                    break
                await asyncio.sleep(0.01)
            batch = [up for up in batch if up.conn.uplinks.get((up.addr.node, up.addr.lane)) is up]
            for tname in need:
                if self.agents.get(tname):
                    self.lanes[tname] = self._new_lane(tname, values[tname], tick)
            for up in batch:
                self._finish_sync(up, tick, values.get(id(up)))

    def _read_snapshot(
        self, ups: list[_Uplink], lanes: set[str]
    ) -> tuple[int, dict[int | str, object]]:
        """Worker thread: the sync value of each uplink, and the emitted columns of each of
        the agent types ``lanes``, at one tick boundary."""
        out: dict[int | str, object] = {}
        with self.snapshots.reader() as view:
            tick = view.tick
            for tname in lanes:
                out[tname] = view.emitted_columns(tname)
            by_type: dict[str, list[_Uplink]] = {}
            for up in ups:
                a = up.addr
                if a.kind == "value" and up.want_sync:
                    by_type.setdefault(a.type, []).append(up)
                elif a.kind == "link" and up.want_sync:
                    out[id(up)] = view.children(a.name, a.key)
            for tname, group in by_type.items():
                rows = view.rows_of(
                    tname, pa.array([u.addr.key for u in group], self._key_types[tname])
                )
                for up, r in zip(group, rows, strict=True):
                    if r >= 0:
                        out[id(up)] = view.value(tname, up.addr.name, int(r))
        return tick, out

    def encode(
        self, codec: _Codec, addr: Address, entry: _Entry, lo: int, hi: int, timed: bool = False
    ) -> asyncio.Future:
        """The frames of ``entry``'s updates ``lo:hi``, encoded on the encoder thread;
        ``timed``: its CPU time counts against ``catch_up_share``."""
        run = asyncio.get_running_loop().run_in_executor
        if timed:
            return run(self.encoder, self._timed_encode, codec, addr, entry, lo, hi)
        return run(self.encoder, codec.encode, addr, entry, lo, hi)

    def _timed_encode(
        self, codec: _Codec, addr: Address, entry: _Entry, lo: int, hi: int
    ) -> list[str | bytes]:
        t = time.thread_time()
        out = codec.encode(addr, entry, lo, hi)
        self.spend(time.thread_time() - t)
        return out

    def catch_up(self, up: _AgentsUplink) -> _Entry:
        """The lane's current catch-up round if it holds every change ``up`` lacks, else a
        new one from the oldest cursor of the lane's lagging uplinks: its rows (the latest
        of each agent changed after that cursor, at the lane's tick) are gathered and
        encoded once for all of them. Rows a client already has come again unchanged, which
        is harmless for a map lane."""
        lane = self.lanes[up.addr.type]
        r = lane.round
        if not _serves(r, up):  # gathered here, on the loop (prepare_catch_up gathers off it)
            base = min(u.cursor for u in self.agents[up.addr.type] if u.behind)
            r = self._new_round(lane, base, lane.tick, *_timed_since(lane, base))
        self.catch_up_sends += 1
        r[1].readers += 1
        return r[1]

    async def prepare_catch_up(self, up: _AgentsUplink) -> None:
        """Make the lane's catch-up round one that serves ``up`` (``catch_up`` then hands it
        out), gathering a new one off the loop if it does not: the gather reads the lane's
        arrays on the encoder thread while the ticks handed out meanwhile are deferred, so
        the loop goes on sending and the round is still as of one tick. (A gather over a
        million agents took 65 ms; on the loop it held back every value lane that long.)"""
        tname = up.addr.type
        for _ in range(2):  # a round under way may have started before ``up`` fell behind
            lane = self.lanes.get(tname)
            if lane is None or _serves(lane.round, up):
                return
            if lane.gathering is None:
                lane.gathering = asyncio.get_running_loop().create_task(self._gather(tname, lane))
            await asyncio.shield(lane.gathering)

    async def _gather(self, tname: str, lane: _AgentsLane) -> None:
        try:
            cursors = [u.cursor for u in self.agents.get(tname, ()) if u.behind]
            if not cursors:
                return
            base, tick = min(cursors), lane.tick
            lane.deferred = []
            try:
                loop = asyncio.get_running_loop()
                table, cpu = await loop.run_in_executor(self.encoder, _timed_since, lane, base)
            finally:
                lane.resume()
            self._new_round(lane, base, tick, table, cpu)
        finally:
            lane.gathering = None

    def _new_round(
        self, lane: _AgentsLane, base: int, tick: int, table: pa.Table | None, cpu: float
    ) -> tuple[int, _Entry]:
        """Make the rows changed after ``base`` (as of ``tick``) the lane's catch-up round."""
        self.spend(cpu)
        lane.round = (base, _Entry(tick, table, shared=True))
        self.catch_ups += 1
        return lane.round

    def spend(self, cpu: float) -> None:
        """Charge ``cpu`` seconds of catch-up work (any thread) to the budget."""
        with self._budget_lock:
            self._budget_at = max(self._budget_at, time.monotonic()) + cpu / self.catch_up_share

    async def catch_up_turn(self) -> None:
        """Wait until catch-up work is within its budget: a client that lags gets coalesced
        catch-ups less often, and the engine keeps its cores."""
        wait = self._budget_at - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)

    def close_encoder(self) -> None:
        """Stop the encoder thread (the server is closing)."""
        self.encoder.shutdown(wait=False, cancel_futures=True)

    def _new_lane(self, tname: str, table: pa.Table, tick: int) -> _AgentsLane:
        """An agents lane from a snapshot's emitted columns at ``tick``, brought up to the
        newest handed-out tick from the ring."""
        lane = _AgentsLane(table, tick)
        for item in self._ring:
            if item.tick > tick:
                batch = item.emitted.get(tname)
                if batch is not None:
                    lane.apply(item.tick, item.rows[tname], batch)
        lane.tick = max(lane.tick, self._last)
        return lane

    def _finish_sync(self, up: _Uplink, tick: int, value: object) -> None:
        """Queue the sync value (state at ``tick``), then the ticks handed out since; from
        then on the uplink takes live offers. An agents lane's sync is read from the lane
        when the uplink's turn to send comes."""
        up.syncing = False
        up.since = -1
        if isinstance(up, _AgentsUplink):
            if up.want_sync:
                up.cursor, up.behind = -1, True
                up.after.append(("synced", None))
                up.ready()
            else:
                up.cursor = self.lanes[up.addr.type].tick
            return
        if up.addr.kind == "pulse":
            if up.want_sync:
                up.offer(self._last, self.pulse())
        elif up.want_sync and value is not None:
            if isinstance(up, _ValueUplink):
                up.offer(tick, value)
            elif isinstance(up, _MapUplink) and value.num_rows:
                up.offer(_Entry(tick, value), live=False)
        if up.addr.kind != "pulse":
            for item in self._ring:
                if item.tick > tick:
                    self._replay(up, item)
            up.since = max(tick, self._last)
        if up.want_sync:
            up.after.append(("synced", tick))
            up.ready()

    def _replay(self, up: _Uplink, item: _Tick) -> None:
        """Offer one handed-out tick to one uplink (after its sync)."""
        a = up.addr
        if a.kind == "value":
            batch = item.emitted.get(a.type)
            if batch is None or a.name not in batch.schema.names:
                return
            hit = pc.equal(batch.column(0), pa.scalar(a.key, batch.schema.field(0).type))
            idx = np.flatnonzero(pc.fill_null(hit, _FALSE).to_numpy(zero_copy_only=False))
            if len(idx):
                up.offer(item.tick, batch.column(a.name)[int(idx[-1])].as_py())
        elif a.kind == "link":
            # the bulk fan-out, restricted to this one uplink
            self._fan_out_link(item, a.name, {a.key: (up,)})

    def _resync_all(self) -> None:
        """The loop fell too far behind: drop every queue and sync everyone afresh."""
        self.resyncs += 1
        self._covered_from = 1 << 62
        self.lanes.clear()  # they missed ticks: rebuilt by the syncs
        for conn in self.conns:
            for up in conn.uplinks.values():
                if up.addr.kind in ("command", "pulse"):
                    continue
                up.syncing = True
                up.release()
                up.want_sync = True
                self._syncs.append(up)
        if self._syncs and (self._sync_task is None or self._sync_task.done()):
            self._sync_task = asyncio.get_running_loop().create_task(self._sync_round())

    # -- pulse -------------------------------------------------------------------------------
    def _start_pulse(self) -> None:
        loop = asyncio.get_running_loop()
        self._pulse_task = loop.create_task(self._pulse_loop())
        self._watch_task = loop.create_task(self._watch_sends())

    async def _watch_sends(self) -> None:
        """Close each connection whose send has not completed for ``stall_seconds`` (checked
        every quarter of it, at most every second: O(connections) a second)."""
        while True:
            await asyncio.sleep(min(1.0, self.stall_seconds / 4))
            now, limit = time.monotonic(), self.stall_seconds
            for conn in self.conns:
                since = conn.sending_since
                if since is not None and now - since > limit:
                    conn.too_slow(f"no progress for {limit:g}s")

    async def _pulse_loop(self) -> None:
        while True:
            await asyncio.sleep(self.pulse_seconds)
            self._gc_policy()
            if self.pulses:
                value = self.pulse()
                for up in list(self.pulses):
                    if not up.syncing:
                        up.offer(self._last, value)

    def _gc_policy(self) -> None:
        """Keep connections out of Python's full collections: thousands of WebSocket
        connections are a million tracked objects, and a full collection over them paused
        the whole process (engine thread included) for 0.5 s (bench.fanout). Once
        ``freeze_after`` connections opened since the last freeze, everything alive is frozen
        (``gc.freeze``: never scanned again); once as many closed, or ``unfreeze_seconds``
        passed, it is unfrozen so that the next collection reclaims the closed ones."""
        now = time.monotonic()
        if self._frozen_at is not None and (
            self._closed_since >= self.freeze_after or now - self._frozen_at > self.unfreeze_seconds
        ):
            gc.unfreeze()
            self._frozen_at = None
            self._closed_since = 0
        if self._opened_since >= self.freeze_after:
            gc.freeze()
            self._frozen_at = now
            self._opened_since = self._closed_since = 0

    def pulse(self) -> dict:
        """The introspection record: tick, totals, rates over the last second, tick
        percentiles over the recent ticks, agents, subscribers."""
        eng = self.engine
        recent = list(eng.recent)[-1000:]
        secs = np.array([s.seconds for s in recent]) if recent else np.zeros(1)
        now = time.monotonic()
        events = eng.totals["events"]
        prev = getattr(self, "_prev_pulse", None)
        rate = 0.0 if prev is None else (events - prev[1]) / max(now - prev[0], 1e-9)
        self._prev_pulse = (now, events)
        by_type = {n: int(t.n) for n, t in eng.tables.items()}
        st = self.stats()
        return {
            "tick": int(eng.tick_id),
            "ticks": int(eng.totals["ticks"]),
            "events": int(events),
            "events_per_s": round(rate, 1),
            "tick_p50_ms": round(float(np.percentile(secs, 50)) * 1e3, 3),
            "tick_p99_ms": round(float(np.percentile(secs, 99)) * 1e3, 3),
            "agents": sum(by_type.values()),
            "agents_by_type": by_type,
            "emitted": int(eng.totals["emitted"]),
            "dead_letters": int(eng.totals["dead_letters"]),
            "connections": st["connections"],
            "links": st["links"],
        }

    def stats(self) -> dict[str, int]:
        """Counters, safe to read from any thread: open connections and links, frames sent,
        updates coalesced away (``dropped``) for slow subscribers, connections closed as
        too slow, malformed requests, commands accepted, re-syncs of everyone after the loop
        fell behind, catch-up rounds of agents lanes gathered and sent."""
        return {
            "connections": len(self.conns),
            "links": self.links,
            "sent": self.sent,
            "dropped": self.dropped,
            "closed_slow": self.closed_slow,
            "malformed": self.malformed,
            "commands": self.commands.accepted,
            "resyncs": self.resyncs,
            "catch_ups": self.catch_ups,
            "catch_up_sends": self.catch_up_sends,
        }

    # -- loop thread: one WebSocket --------------------------------------------------------
    async def handle(self, request: web.Request, protocol: str) -> web.StreamResponse:
        """Serve one WebSocket speaking ``warp`` (Recon envelopes) or ``json``."""
        ws = web.WebSocketResponse(
            protocols=(WARP_PROTOCOL,) if protocol == "warp" else (JSON_PROTOCOL,),
            heartbeat=30.0,
            max_msg_size=self.max_message,
        )
        await ws.prepare(request)
        conn = _Connection(self, request, ws, WarpCodec() if protocol == "warp" else JsonCodec())
        self.conns.add(conn)
        self._opened_since += 1
        writer = asyncio.get_running_loop().create_task(conn.writer())
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    err = self._receive(conn, msg.data, protocol)
                    if err is not None:
                        self.malformed += 1
                        if protocol == "json":
                            conn.frame(json.dumps({"tag": "error", "error": err}))
                        else:
                            await ws.close(code=1003, message=err.encode()[:120])
                            break
                elif msg.type == WSMsgType.BINARY:
                    self.malformed += 1
                    await ws.close(code=1003, message=b"binary frames are not supported")
                    break
                if writer.done():
                    break
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            writer.cancel()
            with contextlib.suppress(BaseException):
                await writer
            for up in list(conn.uplinks.values()):
                self.close(up)
            conn.uplinks.clear()
            conn.queue.clear()
            self.conns.discard(conn)
            self._closed_since += 1
        return ws

    def _receive(self, conn: _Connection, text: str, protocol: str) -> str | None:
        """Apply one request; returns an error line for a malformed one."""
        if protocol == "warp":
            try:
                env = recon.parse(text)
            except recon.ReconError as e:
                return f"malformed envelope: {e}"
            if not isinstance(env, recon.Record) or env.tag is None:
                return "malformed envelope: expected @link, @sync, @unlink, @command or @auth"
            tag = env.tag
            if tag in ("auth", "deauth"):
                # the token was checked at the upgrade; nothing more to prove
                conn.frame(f"@{tag}ed")
                return None
            head = env[0].value
            if not isinstance(head, recon.Record):
                return f"malformed envelope: @{tag} needs node and lane"
            node, lane = head.get("node"), head.get("lane")
            body = env.body()
        else:
            try:
                op = json.loads(text)
            except ValueError as e:
                return f"bad JSON ({e})"
            if not isinstance(op, dict):
                return 'each message must be a JSON object like {"op":"sync","node":...,"lane":...}'
            tag, node, lane = op.get("op"), op.get("node"), op.get("lane")
            body = op.get("body")
            if tag not in ("link", "sync", "unlink", "command"):
                return f"unknown op {tag!r}; use link, sync, unlink or command"
        if not isinstance(node, str) or not isinstance(lane, str):
            return f"{tag}: node and lane must be text"
        if tag not in ("link", "sync", "unlink", "command"):
            return f"unknown envelope @{tag}"
        addr = self.resolve(node, lane)
        if isinstance(addr, str):
            conn.frame(conn.codec.control("unlinked", Address("", node, lane), -1, addr))
            return None
        if tag == "command":
            if addr.kind != "command":
                conn.frame(conn.codec.control("unlinked", addr, -1, "laneNotFound"))
                return None
            err = self.commands.submit(addr, body)
            if err is not None and protocol == "json":
                return err
            return None
        key = (node, lane)
        old = conn.uplinks.pop(key, None)
        if old is not None:
            self.close(old)
        if tag == "unlink":
            conn.frame(conn.codec.control("unlinked", addr, -1, None))
            return None
        if addr.kind == "command":
            conn.frame(conn.codec.control("unlinked", addr, -1, "laneNotFound"))
            return None
        conn.uplinks[key] = self.open(conn, addr, sync=tag == "sync")
        return None


# -- commands --------------------------------------------------------------------------------
class Commands:
    """Commands to agents' ``event`` lanes, queued for the next tick as events.

    ``submit`` (loop thread) turns a command body (a Recon record or JSON object of event
    fields) into one JSON event item with the agent's key; the engine thread takes them
    with ``take`` and the engine decodes, validates and dead-letters them like any event.
    At most ``max_queued`` commands wait; more are refused with a reason.
    """

    def __init__(self, engine: Engine, max_queued: int = 100_000) -> None:
        self.engine = engine
        self.max_queued = max_queued
        self._q: deque[tuple[str, bytes]] = deque()
        self.accepted = 0
        self.refused = 0

    def submit(self, addr: Address, body: object) -> str | None:
        """Queue the command; an error line if it cannot even be queued."""
        if len(self._q) >= self.max_queued:
            self.refused += 1
            return f"too many commands waiting ({self.max_queued:,}); retry shortly"
        fields = _fields(body)
        if fields is None:
            self.refused += 1
            return "a command body must be a record of event fields, e.g. {temp:81.5}"
        fields[self.engine.types[addr.type].key] = addr.key
        try:
            item = json.dumps(fields, allow_nan=False).encode()
        except ValueError:
            item = json.dumps(_jsonable(fields)).encode()
        self._q.append((addr.type, item))
        self.accepted += 1
        return None

    def take(self) -> dict[str, list[bytes]]:
        """Engine thread: everything queued, by agent type, in arrival order."""
        out: dict[str, list[bytes]] = {}
        while self._q:
            tname, item = self._q.popleft()
            out.setdefault(tname, []).append(item)
        return out


def command_batch(items: list[bytes]) -> pa.RecordBatch:
    """Raw JSON event items as one batch for ``Engine.tick`` (decoded and validated there)."""
    lengths = np.fromiter(map(len, items), np.int64, len(items))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return decode.json_batch(b"".join(items), offsets)


class CommandSource:
    """Wraps a source: each poll also brings the queued commands (as raw JSON events after
    the source's own events of the same agent type). For the tick journal the commands are
    part of the tick's input (``boundary``), so a replayed tick applies the same commands."""

    def __init__(self, source: object, commands: Commands) -> None:
        self.source = source
        self.commands = commands
        self._taken: dict[str, list[bytes]] = {}

    def poll(self, max_events: int, timeout: float):
        got = self.source.poll(max_events, timeout)
        if got is None:
            return None
        self._taken = self.commands.take()
        return _with_commands(got, self._taken)

    def boundary(self) -> dict | None:
        inner = self.source.boundary() if hasattr(self.source, "boundary") else None
        if not self._taken:
            return inner
        cmds = {t: [i.decode() for i in items] for t, items in self._taken.items()}
        return {"commands": cmds, "source": inner}

    def replay(self, boundary: dict, timeout: float):
        if "commands" not in boundary:
            return self.source.replay(boundary, timeout)
        inner = boundary["source"]
        got = {} if inner is None else self.source.replay(inner, timeout)
        if got is None:
            return None
        cmds = {t: [i.encode() for i in items] for t, items in boundary["commands"].items()}
        return _with_commands(got, cmds)

    def __getattr__(self, name: str):
        return getattr(self.source, name)


def _with_commands(got: dict, cmds: dict[str, list[bytes]]) -> dict:
    if not cmds:
        return got
    out = dict(got)
    for tname, items in cmds.items():
        prev = out.get(tname)
        batch = command_batch(items)
        if prev is None:
            out[tname] = batch
        else:
            out[tname] = [*(prev if isinstance(prev, list | tuple) else [prev]), batch]
    return out


def _fields(body: object) -> dict | None:
    """A command body as ``{field: value}``: a JSON object, or a Recon record of slots."""
    if isinstance(body, dict):
        return dict(body)
    if isinstance(body, recon.Record) and all(isinstance(i, recon.Slot) for i in body):
        out = {}
        for item in body:
            if not isinstance(item.key, str):
                return None
            v = item.value
            if v is recon.EXTANT or isinstance(v, list | bytes):
                return None
            out[item.key] = v
        return out
    return None


# -- helpers ---------------------------------------------------------------------------------
def _keys(table, rows: np.ndarray) -> pa.Array:
    """Keys of ``table`` at ``rows``; null where the row is -1 (no parent)."""
    rows = np.asarray(rows)
    none = rows < 0
    keys = table.key_array(np.where(none, 0, rows) if table.n else np.zeros(0, np.int32))
    if table.n == 0:
        return pa.nulls(len(rows), keys.type)
    if none.any():
        keys = pc.if_else(pa.array(~none), keys, pa.scalar(None, keys.type))
    return keys


def _updates(batch: pa.RecordBatch) -> pa.Table:
    """An emission batch as map lane rows: the key, then the emitted columns."""
    return pa.Table.from_batches([batch]).drop_columns(["tick"])


def _same(a: object, b: object) -> bool:
    return a == b or (a != a and b != b)  # NaN is NaN


def _parse_key(text: str, string_keys: bool) -> object:
    """The node's key segment as the agent type's key; None if it is not one."""
    if string_keys:
        return text
    if not text or text != text.strip() or (text[0] == "+"):
        return None
    try:
        v = int(text)
    except ValueError:
        return None
    return v if -(2**63) <= v < 2**63 and str(v) == text else None
