"""The engine: state tables, links and the tick loop.

One tick = poll -> resolve keys -> event kernels -> link propagation -> emit -> commit
(DESIGN.md "One tick"). Every step is a handful of kernel or numpy calls over the tick's events
and dirty rows, so a tick costs O(events + changed rows), never O(agents).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from vecswim import codegen
from vecswim.deadletter import DeadLetters, validate_events
from vecswim.kernels import dirty as kdirty
from vecswim.kernels import links as klinks
from vecswim.schema import AgentType, Custom, Link, State, check_links, via_fields
from vecswim.sinks import RecentEmissions, Sink
from vecswim.table import StateTable, mean_count

_TICK_WRAP = np.iinfo(np.int32).max - 1


@dataclass(frozen=True)
class TickStats:
    """What one tick did: ``events`` applied, ``dead_letters`` rejected, ``emitted`` rows,
    ``new_agents`` created, ``dirty`` rows touched, ``work`` row visits (events + dirty rows +
    children scanned by min/max recompute and broadcast: the tick's cost model, independent
    of table size), wall ``seconds`` and its split in ``phases`` (``events``: resolve keys and
    event kernels; ``link:<name>``: propagation over one link; ``broadcast``; ``emit``)."""

    tick: int
    events: int
    dead_letters: int
    emitted: int
    new_agents: int
    dirty: int
    work: int
    seconds: float
    phases: dict[str, float] = field(default_factory=dict, compare=False)


class _LinkState:
    """Runtime state of one link: the child's parent rows live in the child table; here are the
    CSR of children per parent (built at compaction) and the edge deltas added since."""

    def __init__(self, link: Link, child: StateTable, parent: StateTable, track: bool) -> None:
        self.link = link
        self.child = child
        self.parent = parent
        self.track = track
        self.indptr = np.zeros(1, np.int64)
        self.children = np.empty(0, np.int32)
        self.delta_head = np.full(parent.cap, -1, np.int32)
        self.delta_next = np.empty(1024, np.int32)
        self.delta_child = np.empty(1024, np.int32)
        self.n_delta = 0

    def reserve(self, extra: int) -> None:
        if len(self.delta_head) < self.parent.cap:
            head = np.full(self.parent.cap, -1, np.int32)
            head[: len(self.delta_head)] = self.delta_head
            self.delta_head = head
        need = self.n_delta + extra
        if need > len(self.delta_next):
            size = max(need, 2 * len(self.delta_next))
            for name in ("delta_next", "delta_child"):
                a = np.empty(size, np.int32)
                a[: self.n_delta] = getattr(self, name)[: self.n_delta]
                setattr(self, name, a)

    def maybe_compact(self, ratio: float, min_deltas: int) -> bool:
        """Rebuild the CSR once the deltas exceed ``ratio`` x its size and ``min_deltas``
        (amortized O(1) per edge change)."""
        if not self.track or self.n_delta <= max(min_deltas, ratio * len(self.children)):
            return False
        self.indptr, self.children = klinks.build_csr(
            self.child.parent_row[self.link.name], self.child.n, self.parent.n
        )
        self.delta_head[:] = -1
        self.n_delta = 0
        return True

    @property
    def nbytes(self) -> int:
        return sum(
            a.nbytes
            for a in (
                self.indptr,
                self.children,
                self.delta_head,
                self.delta_next,
                self.delta_child,
            )
        )


class LiveView:
    """The engine's live state as a SQL view: zero-copy, valid until the next tick."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.tick = engine.tick_id

    def agent_tables(self) -> dict[str, pa.Table]:
        return {name: t.to_arrow() for name, t in self.engine.tables.items()}

    def link_names(self) -> list[str]:
        return list(self.engine.links)

    def link_table(self, name: str) -> pa.Table:
        return self.engine.link_table(name)

    def ticks(self) -> pa.Table:
        from vecswim.sql import ticks_table

        return ticks_table(list(self.engine.recent))

    def metrics(self) -> pa.Table:
        from vecswim.sql import metrics_table

        return metrics_table(self.engine.metrics())

    def emissions(self) -> dict[str, pa.Table]:
        return self.engine.emission_log.tables()


class Engine:
    """A live graph of agents: one state table per agent type, links between them.

    ``agent_types``: the schemas. ``links``: child -> parent relations (children listed
    before parents is not required; the engine orders them). ``capacity``: expected agents per
    type (int for all, or a mapping), to allocate once instead of growing.
    ``compaction_ratio``, ``compaction_min_deltas``: rebuild a link's CSR when its edge deltas
    exceed both this fraction of it and this count.

    Not thread-safe: call ``tick``/``run``/``sql`` from one thread.
    """

    def __init__(
        self,
        agent_types: Sequence[AgentType],
        links: Sequence[Link] = (),
        capacity: int | Mapping[str, int] = 1024,
        compaction_ratio: float = 0.5,
        compaction_min_deltas: int = 1024,
        recent_ticks: int = 10_000,
    ) -> None:
        self.types = {at.name: at for at in agent_types}
        if len(self.types) != len(agent_types):
            raise ValueError("agent type names must be unique")
        links = list(links)
        check_links(self.types, links)
        caps = capacity if isinstance(capacity, Mapping) else dict.fromkeys(self.types, capacity)
        self.tables = {n: StateTable(at, caps.get(n, 1024)) for n, at in self.types.items()}
        self.tick_id = 0
        self.compaction_ratio = compaction_ratio
        self.compaction_min_deltas = compaction_min_deltas
        self.sinks: list[Sink] = []
        self.dead_letters = DeadLetters()
        self.totals = {"ticks": 0, "events": 0, "dead_letters": 0, "emitted": 0}
        self.recent: deque[TickStats] = deque(maxlen=recent_ticks)
        self.emission_log = RecentEmissions()
        self.after_tick: list[Callable[[TickStats], None]] = []
        # the last tick's emissions per agent type, and the rows they came from (for hooks)
        self.emitted: dict[str, pa.RecordBatch] = {}
        self.emitted_rows: dict[str, np.ndarray] = {}
        # source/checkpoint gauges shown in ``metrics`` (set by ``run``)
        self.gauges: dict[str, int] = {}
        self._scanned = 0
        self._pending_links: list[tuple[str, object, object]] = []
        self._emit_barrier: Callable[[], None] | None = None  # set by run: journal first
        self._steps = {n: self._compile_rules(at) for n, at in self.types.items()}
        self._fields = {
            n: at.event_fields(via_fields(at, self.types, links)) for n, at in self.types.items()
        }
        self.links: dict[str, _LinkState] = {}
        self._aggs: dict[str, list[codegen.AggSpec]] = {}
        for link in links:
            self._add_link(link)
        self._order = self._level_order()
        self._generate_kernels()
        for t in self.tables.values():
            if t.last:  # emissions_<type> exists (empty) before the type's first emission
                self.emission_log.declare(t.name, self._emission_schema(t))

    # -- construction -----------------------------------------------------------------------
    def _compile_rules(self, at: AgentType) -> list[codegen.RuleSpec]:
        traced = {i.column for k in at.kernels for i in k.inputs if isinstance(i, State)}
        specs = []
        for c in at.columns:
            if c.rule is None:
                continue
            inp = c.rule.input
            params = c.rule.params
            if c.rule.kind == "hysteresis":
                up, down, low, high = params
                params = (up, down, c.np_dtype.type(low), c.np_dtype.type(high))
            specs.append(
                codegen.RuleSpec(
                    kind=c.rule.kind,
                    column=c.name,
                    input=inp.column if isinstance(inp, State) else inp,
                    from_state=isinstance(inp, State),
                    params=params,
                    trace=c.name in traced,
                )
            )
        return specs

    def _generate_kernels(self) -> None:
        """Generate and load the fused event, propagation and emission loops."""
        sources = []
        self._event_src: dict[str, codegen.Source] = {}
        self._emit_src: dict[str, codegen.Source] = {}
        self._prop_src: dict[str, codegen.Source] = {}
        for name, t in self.tables.items():
            via = [n for n, ls in self.links.items() if ls.link.child == name and ls.link.via]
            hidden_count = {c: mean_count(c) for c in t.cols if mean_count(c) in t.hidden}
            self._event_src[name] = codegen.event_pass(
                f"event_pass_{name}",
                list(t.snap_columns),
                list(t.snap_parent),
                self._steps[name],
                via,
                hidden_count,
            )
            emitted = [(c, t.deadband[c], t.dtypes[c].kind == "f") for c in t.last]
            self._emit_src[name] = codegen.emit_pass(f"emit_pass_{name}", emitted)
            sources += [self._event_src[name], self._emit_src[name]]
        for name, ls in self.links.items():
            aggs = self._aggs[name]
            self._prop_src[name] = codegen.propagate(
                f"propagate_{name}",
                list(ls.parent.snap_columns),
                list(ls.parent.snap_parent),
                aggs,
            )
            sources.append(self._prop_src[name])
        self._kernels = codegen.load(*sources)

    def _add_link(self, link: Link) -> None:
        # check_links has refused everything the kernels below can't compute exactly
        child, parent = self.tables[link.child], self.tables[link.parent]
        child.add_parent_link(link.name)
        child.enable_parent_snapshot(link.name)
        track = False
        aggs = []
        for col, agg in link.aggregates.items():
            hidden = tuple(f"__{link.name}.{col}.{h}" for h in _AGG_HIDDEN[agg.kind])
            for h in hidden:
                parent.add_hidden(h, np.int64, 0)
            # a parent's aggregate is a function of its children only: a parent without
            # children holds the empty aggregate from the moment it exists
            parent.set_initial(col, 0 if agg.kind in ("count", "sum") else np.nan)
            is_float = False
            if agg.column is not None:
                is_float = child.type.column(agg.column).np_dtype.kind == "f"
                child.enable_snapshot(agg.column)
            track |= agg.kind in ("min", "max")
            aggs.append(
                codegen.AggSpec(
                    column=col,
                    kind=agg.kind,
                    child_column=agg.column,
                    scale=float(agg.scale) if is_float else 0.0,
                    hidden=hidden,
                    dtype=parent.dtypes[col].name,
                )
            )
        self._aggs[link.name] = aggs
        for src in link.broadcast.values():
            parent.enable_snapshot(src)
            track = True
        self.links[link.name] = _LinkState(link, child, parent, track)

    def _level_order(self) -> list[str]:
        """Links ordered so every child type is complete before its parent aggregates it."""
        depth = dict.fromkeys(self.types, 0)
        for _ in range(len(self.types) + 1):
            changed = False
            for ls in self.links.values():
                d = depth[ls.link.child] + 1
                if depth[ls.link.parent] < d:
                    depth[ls.link.parent] = d
                    changed = True
            if not changed:
                break
        else:
            raise ValueError("links form a cycle; they must be a DAG")
        return sorted(self.links, key=lambda n: depth[self.links[n].link.child])

    # -- public API ---------------------------------------------------------------------------
    def add_sink(self, sink: Sink) -> None:
        """Send every tick's emissions to ``sink``."""
        self.sinks.append(sink)

    def set_links(self, link: str, child_keys: object, parent_keys: object) -> None:
        """Link ``child_keys[i]`` to ``parent_keys[i]`` in the next tick, after its events
        (creating agents as needed, children first). Bulk: arrays (numpy, Arrow or sequences)
        of keys of each side's key dtype, applied with one kernel call. Raises ``ValueError``
        or ``TypeError`` at once on keys of another type, nulls or unequal lengths."""
        if link not in self.links:
            raise KeyError(f"no link named {link!r}")
        ls = self.links[link]
        ck = _key_array(child_keys, ls.child, f"set_links({link!r}) child keys")
        pk = _key_array(parent_keys, ls.parent, f"set_links({link!r}) parent keys")
        if len(ck) != len(pk):
            raise ValueError(f"set_links({link!r}): {len(ck)} child keys but {len(pk)} parent keys")
        self._pending_links.append((link, ck, pk))

    def tick(self, events: Mapping[str, pa.RecordBatch | pa.Table] | None = None) -> TickStats:
        """Run one tick over ``events`` (agent type name -> batch with the key and fields, or
        a list of batches applied one after the other).

        Events are applied in batch order. Rows that fail validation go to the dead letters
        with a reason and do not stop the tick. Returns what the tick did.
        """
        t0 = time.perf_counter()
        self._scanned = 0
        self._advance_tick()
        tick = self.tick_id
        tables = self.tables
        new_before = {n: t.n for n, t in tables.items()}
        for t in tables.values():
            t.begin_tick()
        n_events = 0
        n_dead = 0
        for name, batches in (events or {}).items():
            if name not in tables:
                raise KeyError(f"events for unknown agent type {name!r}")
            for batch in batches if isinstance(batches, list | tuple) else (batches,):
                good, dead = validate_events(self.types[name], self.event_fields(name), batch)
                if dead is not None:
                    n_dead += dead.num_rows
                    self.dead_letters.write(tick, name, dead)
                if good is None or good.num_rows == 0:
                    continue
                n_events += good.num_rows
                self._apply_events(tables[name], good, tick)
        for link, ck, pk in self._pending_links:
            ls = self.links[link]
            crow = ls.child.resolve(ck)
            ls.child.mark(crow, tick)
            self._assign(ls, crow, ls.parent.resolve(pk))
        self._pending_links.clear()
        for t in tables.values():
            if t.n > t.first_new:
                # agents created only as link targets are dirty too: they get their aggregates
                # and their first emission in the tick that created them
                t.mark(np.arange(t.first_new, t.n, dtype=np.int32), tick)
        phases = {"events": time.perf_counter() - t0}
        for ls in self.links.values():
            ls.reserve(0)  # parents created this tick by their own events need delta heads
        for name in self._order:
            t1 = time.perf_counter()
            self._propagate(self.links[name], tick)
            phases[f"link:{name}"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        for name in reversed(self._order):
            if self.links[name].link.broadcast:
                self._broadcast(self.links[name], tick)
        t2 = time.perf_counter()
        phases["broadcast"] = t2 - t1
        if self._emit_barrier is not None:
            barrier, self._emit_barrier = self._emit_barrier, None
            barrier()
        emitted = self._emit(tick)
        phases["emit"] = time.perf_counter() - t2
        for ls in self.links.values():
            ls.maybe_compact(self.compaction_ratio, self.compaction_min_deltas)
        stats = TickStats(
            tick=tick,
            events=n_events,
            dead_letters=n_dead,
            emitted=emitted,
            new_agents=sum(t.n - new_before[n] for n, t in tables.items()),
            dirty=(dirty := sum(t.n_dirty for t in tables.values())),
            work=n_events + dirty + self._scanned,
            seconds=time.perf_counter() - t0,
            phases=phases,
        )
        self.totals["ticks"] += 1
        self.totals["events"] += n_events
        self.totals["dead_letters"] += n_dead
        self.totals["emitted"] += emitted
        self.recent.append(stats)
        for hook in self.after_tick:
            hook(stats)
        return stats

    def run(
        self,
        source: object,
        max_events: int = 100_000,
        tick_ms: float = 10.0,
        seconds: float | None = None,
        max_ticks: int | None = None,
        on_tick: Callable[[TickStats], None] | None = None,
        checkpointer=None,
        stop=None,
    ) -> None:
        """Poll ``source`` and tick until it is exhausted, ``seconds`` pass, ``max_ticks``
        ticks ran or ``stop`` (e.g. a ``threading.Event`` set by a SIGTERM handler) is set. A
        tick closes at ``max_events`` events or after ``tick_ms`` ms. After each tick the sinks
        are flushed and then the source commits (acknowledges) what the tick consumed; with a
        ``checkpointer`` (``vecswim.checkpoint.Checkpointer``) the source is acknowledged only
        when a checkpoint covering it is durable, and a final checkpoint is taken at the end
        (also after ``stop``). Sinks are closed at the end. The ``gauges()`` of the source and
        the checkpointer, where they have them, are kept in ``self.gauges`` (``metrics``).

        With the checkpointer's tick journal (a ``replayable`` source), the ticks journaled
        after the restored checkpoint run first, with their tick ids and exactly their input
        (``source.replay``); then every tick with input (``source.boundary()``) or pending
        links is journaled, durably before its output leaves (the write overlaps the tick;
        while the journal cannot be written the tick waits before emitting). The source's
        ``release`` (dead letters) runs after the tick."""
        deadline = None if seconds is None else time.monotonic() + seconds
        ticks = 0
        gauges = [
            g for g in (getattr(source, "gauges", None), getattr(checkpointer, "gauges", None)) if g
        ]
        journal = getattr(checkpointer, "journal", None)
        replay = checkpointer.replay if journal is not None else deque()
        release = getattr(source, "release", None)
        try:
            while (
                (deadline is None or time.monotonic() < deadline)
                and (max_ticks is None or ticks < max_ticks)
                and not (stop is not None and stop.is_set())
            ):
                if replay:
                    # the ticks a killed run journaled after its checkpoint: same ids, same
                    # input, so the same output (which sinks and the broker drop as repeats)
                    rec = replay[0]["input"]
                    events = {} if rec is None else source.replay(rec, tick_ms / 1000.0)
                    if events is None:
                        continue
                    self.skip_to(replay.popleft()["tick"] - 1)
                else:
                    events = source.poll(max_events, tick_ms / 1000.0)
                    if events is None:
                        break
                    # a tick emits only with input or pending links: journal those ticks,
                    # durably before the tick's output leaves (the write overlaps the tick)
                    b = source.boundary() if journal is not None else None
                    if journal is not None and (b is not None or self._pending_links):
                        checkpointer.journal_begin(self.tick_id + 1, b)
                        self._emit_barrier = lambda: checkpointer.journal_wait(stop)
                for g in gauges:
                    self.gauges.update(g())
                stats = self.tick(events)
                if release is not None:
                    release()
                for s in self.sinks:
                    s.flush()
                if checkpointer is not None:
                    if not replay:  # a checkpoint inside the replay would cut the journal
                        checkpointer.after_tick()
                elif (commit := getattr(source, "commit", None)) is not None:
                    commit()
                ticks += 1
                if on_tick is not None:
                    on_tick(stats)
            if checkpointer is not None:
                checkpointer.close()
        finally:
            self.close()

    def skip_to(self, tick: int) -> None:
        """Advance the tick id to ``tick`` without running the ticks in between (ticks
        without input change nothing); used when replaying the tick journal."""
        if tick > self.tick_id:
            self.totals["ticks"] += tick - self.tick_id
            self.tick_id = tick

    def close(self) -> None:
        """Flush and close every sink (idempotent)."""
        for s in self.sinks:
            s.close()

    def sql(self, query: str, output: str = "arrow"):
        """Run one read-only DuckDB query over the live state at the current tick boundary.

        Tables: one per agent type (key + state columns), one per link (child key, parent
        key), ``ticks`` (recent ticks), ``metrics`` (counters), ``emissions`` (recent emitted
        rows: agent_type, tick, key) and ``emissions_<agent type>`` (with their columns).
        Returns a ``pyarrow.Table`` (``output="polars"``: a polars DataFrame). Raises
        ``vecswim.SQLError`` with DuckDB's message on a bad or forbidden query; the engine is
        unaffected. Call it between ticks (same thread); other threads use the SQL server.
        """
        from vecswim.sql import execute

        if output not in ("arrow", "polars"):
            raise ValueError("output must be 'arrow' or 'polars'")
        table = execute(LiveView(self), query).table
        if output == "polars":
            import polars as pl

            return pl.from_arrow(table)
        return table

    def metrics(self) -> dict[str, int]:
        """Counters: ticks, events, dead letters, emitted rows, agents, bytes, current tick,
        and the gauges ``run`` keeps (source lag, unacknowledged messages, checkpoints)."""
        return dict(
            self.totals, **self.gauges, agents=self.agents, bytes=self.nbytes, tick=self.tick_id
        )

    def state(self, agent_type: str) -> pa.Table:
        """A copy of one state table (key + state columns) as Arrow."""
        return self.tables[agent_type].to_arrow(copy=True)

    def link_table(self, link: str) -> pa.Table:
        """(child key, parent key) for every linked child of ``link``."""
        ls = self.links[link]
        prow = ls.child.parent_row[link][: ls.child.n]
        rows = np.flatnonzero(prow >= 0).astype(np.int32)
        return pa.table(
            {
                f"child_{ls.child.type.key}": ls.child.key_array(rows),
                f"parent_{ls.parent.type.key}": ls.parent.key_array(prow[rows]),
            }
        )

    @property
    def agents(self) -> int:
        """Number of agents over all agent types."""
        return sum(t.n for t in self.tables.values())

    @property
    def nbytes(self) -> int:
        """Bytes held by all state tables, key indexes and links."""
        return sum(t.nbytes for t in self.tables.values()) + sum(
            ls.nbytes for ls in self.links.values()
        )

    # -- tick steps -----------------------------------------------------------------------------
    def _advance_tick(self) -> None:
        self.tick_id += 1
        if self.tick_id >= _TICK_WRAP:
            # int32 dirty stamps: once every ~2**31 ticks clear them all and restart at 1.
            for t in self.tables.values():
                t.restamp()
            self.tick_id = 1

    def event_fields(self, name: str) -> dict[str, np.dtype | str]:
        """Event fields the engine reads for agent type ``name`` (besides its key), with the
        dtype each is decoded as (``AgentType.event_fields``; parent-key fields of links have
        the parent's key dtype)."""
        return dict(self._fields[name])

    def _apply_events(self, table: StateTable, batch: pa.Table, tick: int) -> None:
        at = table.type
        rows = table.resolve(batch.column(at.key))
        perm = _locality_order(rows, table.n)
        if perm is not None:
            rows = rows[perm]
        fields: dict[str, np.ndarray] = {}
        traces: dict[str, np.ndarray] = {}

        def value(inp: str | State) -> np.ndarray:
            if isinstance(inp, State):
                return traces[inp.column]
            arr = fields.get(inp)
            if arr is None:
                arr = batch.column(inp).to_numpy(zero_copy_only=False)
                fields[inp] = arr = arr if perm is None else arr[perm]
            return arr

        via: dict[str, np.ndarray] = {}
        for name, ls in self.links.items():
            if ls.link.child == table.name and ls.link.via is not None:
                # resolved in arrival order, so new parents are created in that order
                prow = ls.parent.resolve(batch.column(ls.link.via))
                via[name] = prow if perm is None else prow[perm]
                ls.reserve(len(rows))
        table.reserve_dirty(len(rows))
        src = self._event_src[table.name]
        args = []
        for b in src.bindings:
            kind = b[0]
            if kind == "rows":
                args.append(rows)
            elif kind == "tick":
                args.append(tick)
            elif kind == "x":
                args.append(value(b[1]))
            elif kind == "trace":
                traces[b[1]] = tr = np.empty(len(rows), table.dtypes[b[1]])
                args.append(tr)
            elif kind == "pk":
                args.append(via[b[1]])
            elif kind in _LINK_BINDINGS:
                ls = self.links[b[1]]
                args.append(getattr(ls, _LINK_BINDINGS[kind]))
            else:
                args.append(_table_binding(table, b))
        res = getattr(self._kernels, src.name)(*args)
        table.n_dirty = table.n_snapped = res[0]
        for k, name in enumerate(via):
            self.links[name].n_delta = res[1 + k]
        for k in at.kernels:
            _call_custom(k, rows, value, table)

    def _assign(self, ls: _LinkState, crow: np.ndarray, prow: np.ndarray) -> None:
        ls.reserve(len(crow))
        ls.n_delta = klinks.assign_parent(
            crow,
            prow,
            ls.child.parent_row[ls.link.name],
            ls.track,
            ls.delta_head,
            ls.delta_next,
            ls.delta_child,
            ls.n_delta,
        )

    def _propagate(self, ls: _LinkState, tick: int) -> None:
        child, parent, link = ls.child, ls.parent, ls.link
        m = child.n_dirty
        if m == 0:
            return
        parent.reserve_dirty(2 * m)
        src = self._prop_src[link.name]
        recompute: dict[str, np.ndarray] = {}
        args = []
        for b in src.bindings:
            kind = b[0]
            if kind == "dirty":
                args.append(child.dirty)
            elif kind == "m":
                args.append(m)
            elif kind == "old_parent":
                args.append(child.snap_parent[link.name])
            elif kind == "prow":
                args.append(child.parent_row[link.name])
            elif kind == "tick":
                args.append(tick)
            elif kind == "csnap":
                args.append(child.snap[b[1]])
            elif kind == "ccol":
                args.append(child.column(b[1]))
            elif kind == "recompute":
                recompute[b[1]] = rc = np.empty(m, np.int32)
                args.append(rc)
            elif kind == "zero":
                args.append(0)
            else:
                args.append(_table_binding(parent, (_PARENT_BINDINGS[kind], *b[1:])))
        res = getattr(self._kernels, src.name)(*args)
        parent.n_dirty = parent.n_snapped = res[0]
        pd = parent.dirty[: parent.n_dirty]
        n_rc = iter(res[1:])
        for agg in self._aggs[link.name]:
            out = parent.cols[agg.column]
            if agg.kind == "count":
                out[pd] = parent.hidden[agg.hidden[0]][pd]
            elif agg.kind in ("sum", "mean"):
                acc = parent.hidden[agg.hidden[0]][pd]
                total = acc / agg.scale if agg.scale else acc
                if agg.kind == "sum":
                    out[pd] = total
                else:
                    valid = parent.hidden[agg.hidden[1]][pd]
                    with np.errstate(invalid="ignore", divide="ignore"):
                        out[pd] = np.where(valid > 0, np.asarray(total, np.float64) / valid, np.nan)
            else:
                k = next(n_rc)
                if k:
                    self._scanned += klinks.recompute_extreme(
                        np.unique(recompute[agg.column][:k]),
                        ls.indptr,
                        ls.children,
                        ls.delta_head,
                        ls.delta_next,
                        ls.delta_child,
                        child.parent_row[link.name],
                        child.column(agg.child_column),
                        out,
                        parent.hidden[agg.hidden[0]],
                        1.0 if agg.kind == "max" else -1.0,
                    )

    def _broadcast(self, ls: _LinkState, tick: int) -> None:
        child, parent, link = ls.child, ls.parent, ls.link
        prow = child.parent_row[link.name]
        m = child.n_dirty
        for dst, src in link.broadcast.items():
            klinks.broadcast_pull(
                child.dirty,
                m,
                child.snap_parent[link.name],
                prow,
                parent.cols[src],
                child.cols[dst],
                child.initial[dst],
            )
        for dst, src in link.broadcast.items():
            child.reserve_dirty(child.n)
            child.n_dirty, scanned = klinks.broadcast_push(
                parent.dirty,
                parent.n_dirty,
                parent.n_snapped,
                parent.snap[src],
                parent.cols[src],
                ls.indptr,
                ls.children,
                ls.delta_head,
                ls.delta_next,
                ls.delta_child,
                prow,
                child.cols[dst],
                child.stamp,
                tick,
                child.dirty,
                child.n_dirty,
            )
            self._scanned += scanned

    def _emission_schema(self, t: StateTable) -> pa.Schema:
        none = np.empty(0, np.int32)
        cols = {t.type.key: t.key_array(none), "tick": pa.array(np.empty(0, np.int64))}
        for c in t.last:
            cols[c] = pa.array(np.empty(0, t.dtypes[c]))
        return pa.RecordBatch.from_pydict(cols).schema

    def _emit(self, tick: int) -> int:
        total = 0
        self.emitted, self.emitted_rows = {}, {}
        for t in self.tables.values():
            n = t.n_dirty
            if n == 0 or not t.last:
                continue
            src = self._emit_src[t.name]
            out_rows = np.empty(n, np.int32)
            outs = {c: np.empty(n, t.dtypes[c]) for c in t.last}
            args = []
            for b in src.bindings:
                kind = b[0]
                if kind == "dirty":
                    args.append(t.dirty)
                elif kind == "n":
                    args.append(n)
                elif kind == "first_new":
                    args.append(t.first_new)
                elif kind == "out_rows":
                    args.append(out_rows)
                elif kind == "out":
                    args.append(outs[b[1]])
                elif kind == "last":
                    args.append(t.last[b[1]])
                else:
                    args.append(_table_binding(t, b))
            k = getattr(self._kernels, src.name)(*args)
            if k == 0:
                continue
            rows = out_rows[:k]
            cols = {
                t.type.key: t.key_array(rows),
                "tick": pa.array(np.full(k, tick, np.int64)),
            }
            for c, v in outs.items():
                # Few of the dirty rows emitted: copy, since the emission log (and sinks) keep
                # the batch, and a view would keep all n rows of ``v`` alive with it.
                cols[c] = pa.array(v[:k] if 2 * k >= n else v[:k].copy())
            batch = pa.RecordBatch.from_pydict(cols)
            total += k
            self.emitted[t.name], self.emitted_rows[t.name] = batch, rows
            self.emission_log.write(tick, t.name, batch)
            for s in self.sinks:
                s.write(tick, t.name, batch)
        return total


# Engine-owned accumulator columns (int64, on the parent) per aggregate kind.
_AGG_HIDDEN = {
    "count": ("n",),
    "sum": ("acc", "valid"),
    "mean": ("acc", "valid"),
    "min": ("ties",),
    "max": ("ties",),
}
_LOCALITY_MIN_ROWS = 1 << 16
_BUCKET_BITS = 14


def _locality_order(rows: np.ndarray, n_rows: int) -> np.ndarray | None:
    """Permutation that groups a batch's events by table region (see
    ``kernels.dirty.bucket_order``); None when the table fits in cache anyway."""
    if n_rows < _LOCALITY_MIN_ROWS or len(rows) < 1024:
        return None
    shift = max(0, n_rows.bit_length() - _BUCKET_BITS)
    return kdirty.bucket_order(rows, shift, (n_rows >> shift) + 1)


_LINK_BINDINGS = {
    "track": "track",
    "dhead": "delta_head",
    "dnext": "delta_next",
    "dchild": "delta_child",
    "nd": "n_delta",
}


def _table_binding(t: StateTable, b: tuple) -> object:
    """Resolve a generated kernel's argument binding against a state table."""
    kind = b[0]
    if kind == "stamp":
        return t.stamp
    if kind == "dirty":
        return t.dirty
    if kind == "n_dirty":
        return t.n_dirty
    if kind == "col":
        return t.column(b[1])
    if kind == "hidden":
        return t.hidden[b[1]]
    if kind == "snap":
        return t.snap[b[1]]
    if kind == "snapp":
        return t.snap_parent[b[1]]
    if kind in ("prow", "lprow"):
        return t.parent_row[b[1]]
    if kind == "param":
        return b[1]
    raise KeyError(f"unknown binding {b!r}")


# Propagation kernels name the parent table's arrays with a "p" prefix; they resolve like
# the table's own (``_table_binding``) against the parent.
_PARENT_BINDINGS = {
    "pstamp": "stamp",
    "pdirty": "dirty",
    "n_pdirty": "n_dirty",
    "psnap": "snap",
    "pcol": "col",
    "psnapp": "snapp",
    "pprow": "prow",
    "phidden": "hidden",
    "param": "param",
}


def _call_custom(k: Custom, rows: np.ndarray, value: Callable, table: StateTable) -> None:
    args: list[object] = [rows]
    args += [value(i) for i in k.inputs]
    args += [table.cols[o] for o in k.outputs]
    args += list(k.params)
    k.fn(*args)


def _key_array(keys: object, table: StateTable, what: str) -> pa.Array:
    """``keys`` as an Arrow array of ``table``'s key dtype, or a clear error."""
    if isinstance(keys, pa.ChunkedArray):
        keys = keys.combine_chunks()
    if not isinstance(keys, pa.Array):
        try:
            keys = pa.array(keys if isinstance(keys, np.ndarray) else list(keys))
        except (pa.ArrowException, TypeError) as e:
            raise TypeError(f"{what}: not an array of keys ({e})") from None
    if len(keys) == 0:
        return pa.array([], pa.large_string() if table.string_keys else pa.int64())
    if keys.null_count:
        raise ValueError(f"{what}: null keys")
    if table.string_keys:
        if not (pa.types.is_string(keys.type) or pa.types.is_large_string(keys.type)):
            raise TypeError(f"{what}: {table.name} keys are strings, got {keys.type}")
        return keys
    if not pa.types.is_integer(keys.type):
        raise TypeError(f"{what}: {table.name} keys are int64, got {keys.type}")
    try:
        return keys.cast(pa.int64())
    except pa.ArrowInvalid:
        raise ValueError(f"{what}: keys out of the int64 range") from None
