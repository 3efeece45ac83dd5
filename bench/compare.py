"""vecswim side by side with what a user would pick instead, on one workload, in one run.

    python -m bench.compare [--agents 100000] [--events 1000000] [--tick 20000]
                            [--scale 1e5,1e6,1e7,1e8] [--no-results]

Workload (``engines``): N engines, E generated events in ticks of T events; each event sets
an engine's engine_temp / fan_temp / coolant_vol, moves its status green/red with hysteresis
(red above 110, green below 100) and (re)links it to its fleet; fleets count their engines
and red engines; each tick emits the engines whose emitted columns moved beyond their
deadbands. Every contender runs in its own process on the same pre-generated events and
must end with the same per-engine state and per-fleet counts as vecswim (else it is marked
WRONG); emitted-row counts are compared where the contender has ticks.

Contenders: vecswim; naive Python (an object per agent, dict lookup, the same logic per
event: what a SwimOS-style Python program does); polars per tick; DuckDB per tick
(``UPDATE ... FROM batch``); Bytewax (``stateful_map``, testing input); Pathway
(groupby/reduce over an in-memory table); the raw numba random-scatter loop (the machine's
limit for this access pattern). Peers that cannot be imported are reported with the error
(``pip install -e '.[compare]'`` installs them).

Then a scale curve of vecswim alone (events/s, tick p99, bytes/agent) for ``--scale`` agent
counts, plotted to ``bench/scale.png``; everything is written into ``bench/RESULTS.md``
between the ``compare`` markers.
"""

from __future__ import annotations

import argparse
import datetime as dt
import multiprocessing as mp
import platform
import resource
import time
import traceback
from pathlib import Path

import numpy as np
import pyarrow as pa

UP, DOWN = 110.0, 100.0
DEADBAND = {"engine_temp": 0.5, "fan_temp": 0.5, "coolant_vol": 0.1}
HERE = Path(__file__).resolve().parent


# -- the workload ---------------------------------------------------------------------------
def make_ticks(agents: int, events: int, tick: int, seed: int = 7) -> list[pa.RecordBatch]:
    from vecswim.scenarios import engines

    gen = engines.Generator(agents, seed=seed, relink=0.001)
    return [gen.make(tick)["engine"] for _ in range(events // tick)]


def final_tables(eid, temp, fan, cool, status, fleet) -> tuple[pa.Table, pa.Table]:
    """Canonical final state: engines sorted by id; fleets with engine and red counts."""
    e = pa.table(
        {
            "engine_id": pa.array(eid, pa.int64()),
            "engine_temp": pa.array(temp, pa.float32()),
            "fan_temp": pa.array(fan, pa.float32()),
            "coolant_vol": pa.array(cool, pa.float32()),
            "status": pa.array(status, pa.uint8()),
            "fleet_id": pa.array(fleet, pa.int64()),
        }
    ).sort_by("engine_id")
    f = (
        e.group_by("fleet_id")
        .aggregate([("engine_id", "count"), ("status", "sum")])
        .rename_columns(["fleet_id", "engines", "red"])
    )
    f = f.set_column(1, "engines", f.column("engines").cast(pa.int64()))
    f = f.set_column(2, "red", f.column("red").cast(pa.int64())).sort_by("fleet_id")
    return e, f


# -- contenders (each returns (final tables, emitted engine rows or None)) -----------------------
def run_vecswim(ticks, agents):
    from vecswim.scenarios import engines

    eng = engines.build_engine(agents)
    emitted = 0

    def count(tick, at, batch):
        nonlocal emitted
        emitted += batch.num_rows if at == "engine" else 0

    import vecswim as vs

    eng.add_sink(vs.CallbackSink(count))
    t0 = time.perf_counter()
    for b in ticks:
        eng.tick({"engine": b})
    secs = time.perf_counter() - t0
    t = eng.tables["engine"]
    n = t.n
    fleet_keys = eng.tables["fleet"].keys[t.parent_row["engine_fleet"][:n]]
    e = final_tables(
        t.keys[:n],
        t.cols["engine_temp"][:n],
        t.cols["fan_temp"][:n],
        t.cols["coolant_vol"][:n],
        t.cols["status"][:n],
        fleet_keys,
    )
    return secs, e, emitted


class _Agent:
    __slots__ = ("coolant_vol", "emitted", "engine_temp", "fan_temp", "fleet", "status")

    def __init__(self) -> None:
        self.engine_temp = self.fan_temp = self.coolant_vol = float("nan")
        self.status = 0
        self.fleet = None
        self.emitted = None


def run_naive(ticks, agents):
    agents_by_id: dict[int, _Agent] = {}
    fleets: dict[int, list[int]] = {}  # fleet -> [engines, red]
    emitted = 0
    rows = [b.to_pydict() for b in ticks]  # decoding is not what is measured
    t0 = time.perf_counter()
    for cols in rows:
        touched = {}
        for k, temp, fan, cool, fl in zip(
            cols["engine_id"],
            cols["engine_temp"],
            cols["fan_temp"],
            cols["coolant_vol"],
            cols["fleet_id"],
            strict=True,
        ):
            a = agents_by_id.get(k)
            if a is None:
                a = agents_by_id[k] = _Agent()
            old_red = a.status
            a.engine_temp, a.fan_temp, a.coolant_vol = temp, fan, cool
            if a.status == 0 and temp > UP:
                a.status = 1
            elif a.status == 1 and temp < DOWN:
                a.status = 0
            if a.fleet != fl:
                if a.fleet is not None:
                    f = fleets[a.fleet]
                    f[0] -= 1
                    f[1] -= old_red
                f = fleets.setdefault(fl, [0, 0])
                f[0] += 1
                f[1] += a.status
                a.fleet = fl
            elif a.status != old_red:
                fleets[fl][1] += a.status - old_red
            touched[k] = a
        for a in touched.values():
            e = a.emitted
            if (
                e is None
                or abs(a.engine_temp - e[0]) > DEADBAND["engine_temp"]
                or abs(a.fan_temp - e[1]) > DEADBAND["fan_temp"]
                or abs(a.coolant_vol - e[2]) > DEADBAND["coolant_vol"]
                or a.status != e[3]
            ):
                a.emitted = (a.engine_temp, a.fan_temp, a.coolant_vol, a.status)
                emitted += 1
    secs = time.perf_counter() - t0
    ids = list(agents_by_id)
    ag = list(agents_by_id.values())
    e = final_tables(
        ids,
        [a.engine_temp for a in ag],
        [a.fan_temp for a in ag],
        [a.coolant_vol for a in ag],
        [a.status for a in ag],
        [a.fleet for a in ag],
    )
    return secs, e, emitted


def _last_per_key(df, pl):
    """Per engine in this tick: latest values, and the status its last decisive event set
    (hysteresis: > UP forces red, < DOWN forces green, in between keeps the status)."""
    df = df.with_row_index("seq")
    latest = df.group_by("engine_id").agg(pl.all().sort_by("seq").last())
    decisive = (
        df.filter((pl.col("engine_temp") > UP) | (pl.col("engine_temp") < DOWN))
        .group_by("engine_id")
        .agg(pl.col("engine_temp").sort_by("seq").last().alias("decisive"))
    )
    return (
        latest.join(decisive, on="engine_id", how="left")
        .with_columns(
            pl.when(pl.col("decisive").is_null())
            .then(None)
            .otherwise((pl.col("decisive") > UP).cast(pl.UInt8))
            .alias("new_status")
        )
        .drop("seq", "decisive")
    )


def run_polars(ticks, agents):
    import polars as pl

    state = pl.DataFrame(
        schema={
            "engine_id": pl.Int64,
            "engine_temp": pl.Float32,
            "fan_temp": pl.Float32,
            "coolant_vol": pl.Float32,
            "status": pl.UInt8,
            "fleet_id": pl.Int64,
            "e_temp": pl.Float32,
            "e_fan": pl.Float32,
            "e_cool": pl.Float32,
            "e_status": pl.UInt8,
        }
    )
    emitted = 0
    frames = [pl.from_arrow(b) for b in ticks]
    t0 = time.perf_counter()
    for df in frames:
        upd = _last_per_key(df, pl)
        joined = upd.join(state, on="engine_id", how="left", suffix="_old")
        new = joined.with_columns(
            pl.coalesce("new_status", "status", pl.lit(0, pl.UInt8)).alias("status"),
        )
        changed = new.filter(
            pl.col("e_temp").is_null()
            | ((pl.col("engine_temp") - pl.col("e_temp")).abs() > DEADBAND["engine_temp"])
            | ((pl.col("fan_temp") - pl.col("e_fan")).abs() > DEADBAND["fan_temp"])
            | ((pl.col("coolant_vol") - pl.col("e_cool")).abs() > DEADBAND["coolant_vol"])
            | (pl.col("status") != pl.col("e_status"))
        )
        emitted += changed.height
        emit_cols = changed.select(
            "engine_id",
            pl.col("engine_temp").alias("e_temp2"),
            pl.col("fan_temp").alias("e_fan2"),
            pl.col("coolant_vol").alias("e_cool2"),
            pl.col("status").alias("e_status2"),
        )
        rows = new.join(emit_cols, on="engine_id", how="left").select(
            "engine_id",
            "engine_temp",
            "fan_temp",
            "coolant_vol",
            "status",
            "fleet_id",
            pl.coalesce("e_temp2", "e_temp").alias("e_temp"),
            pl.coalesce("e_fan2", "e_fan").alias("e_fan"),
            pl.coalesce("e_cool2", "e_cool").alias("e_cool"),
            pl.coalesce("e_status2", "e_status").alias("e_status"),
        )
        state = pl.concat([state.join(rows, on="engine_id", how="anti"), rows])
        # what a per-tick user does for the fleet link: recompute the aggregates
        state.group_by("fleet_id").agg(pl.len(), pl.col("status").sum())
    secs = time.perf_counter() - t0
    e = final_tables(
        *(
            state[c].to_numpy()
            for c in ("engine_id", "engine_temp", "fan_temp", "coolant_vol", "status", "fleet_id")
        )
    )
    return secs, e, emitted


def run_duckdb(ticks, agents):
    import duckdb

    con = duckdb.connect()
    con.execute("""CREATE TABLE state (engine_id BIGINT PRIMARY KEY, engine_temp REAL,
                   fan_temp REAL, coolant_vol REAL, status UTINYINT, fleet_id BIGINT,
                   e_temp REAL, e_fan REAL, e_cool REAL, e_status UTINYINT)""")
    emitted = 0
    t0 = time.perf_counter()
    for b in ticks:
        con.register("batch", b)
        con.execute(f"""CREATE OR REPLACE TEMP TABLE upd AS
            WITH ev AS (SELECT *, row_number() OVER () AS seq FROM batch),
            latest AS (SELECT engine_id, arg_max(engine_temp, seq) AS engine_temp,
                       arg_max(fan_temp, seq) AS fan_temp, arg_max(coolant_vol, seq) AS coolant_vol,
                       arg_max(fleet_id, seq) AS fleet_id FROM ev GROUP BY engine_id),
            decisive AS (SELECT engine_id, arg_max(engine_temp, seq) AS d FROM ev
                         WHERE engine_temp > {UP} OR engine_temp < {DOWN} GROUP BY engine_id)
            SELECT l.*, CASE WHEN d IS NULL THEN NULL WHEN d > {UP} THEN 1 ELSE 0 END
                   AS new_status
            FROM latest l LEFT JOIN decisive USING (engine_id)""")
        con.execute("""INSERT INTO state SELECT engine_id, NULL, NULL, NULL, 0, NULL,
                       NULL, NULL, NULL, NULL FROM upd ANTI JOIN state USING (engine_id)""")
        con.execute("""UPDATE state SET engine_temp = u.engine_temp, fan_temp = u.fan_temp,
                       coolant_vol = u.coolant_vol, fleet_id = u.fleet_id,
                       status = coalesce(u.new_status, state.status)
                       FROM upd u WHERE state.engine_id = u.engine_id""")
        emitted += con.execute(f"""UPDATE state SET e_temp = engine_temp, e_fan = fan_temp,
            e_cool = coolant_vol, e_status = status
            WHERE engine_id IN (SELECT engine_id FROM upd) AND (e_temp IS NULL
              OR abs(engine_temp - e_temp) > {DEADBAND["engine_temp"]}
              OR abs(fan_temp - e_fan) > {DEADBAND["fan_temp"]}
              OR abs(coolant_vol - e_cool) > {DEADBAND["coolant_vol"]}
              OR status != e_status)""").fetchone()[0]
        con.execute("SELECT fleet_id, count(*), sum(status) FROM state GROUP BY 1").fetchall()
    secs = time.perf_counter() - t0
    t = con.sql(
        "SELECT engine_id, engine_temp, fan_temp, coolant_vol, status, fleet_id FROM state"
    ).to_arrow_table()
    e = final_tables(*(t.column(i).to_numpy() for i in range(6)))
    return secs, e, emitted


def run_bytewax(ticks, agents):
    import bytewax.operators as op
    from bytewax.dataflow import Dataflow
    from bytewax.testing import TestingSink, TestingSource, run_main

    events = []
    for b in ticks:
        d = b.to_pydict()
        events += list(
            zip(
                d["engine_id"],
                d["engine_temp"],
                d["fan_temp"],
                d["coolant_vol"],
                d["fleet_id"],
                strict=True,
            )
        )

    def engine_step(state, ev):
        _, temp, fan, cool, fl = ev
        st = state or {"status": 0, "fleet": None}
        old_fleet, old_red = st["fleet"], st["status"]
        if st["status"] == 0 and temp > UP:
            st["status"] = 1
        elif st["status"] == 1 and temp < DOWN:
            st["status"] = 0
        st.update(engine_temp=temp, fan_temp=fan, coolant_vol=cool, fleet=fl)
        return st, (old_fleet, old_red, fl, st["status"], dict(st))

    def fleet_deltas(kv):
        _, (old_fleet, old_red, fl, red, _) = kv
        out = []
        if old_fleet is not None:
            out.append((str(old_fleet), (-1, -old_red)))
        out.append((str(fl), (1, red)))
        return out

    def fleet_step(state, delta):
        n, red = state or (0, 0)
        n, red = n + delta[0], red + delta[1]
        return (n, red), (n, red)

    engines_out, fleets_out = [], []
    flow = Dataflow("engines")
    s = op.input("in", flow, TestingSource(events))
    keyed = op.key_on("key", s, lambda ev: str(ev[0]))
    states = op.stateful_map("engine", keyed, engine_step)
    op.output("engines", states, TestingSink(engines_out))
    deltas = op.flat_map("deltas", states, fleet_deltas)
    fleets = op.stateful_map("fleet", deltas, fleet_step)
    op.output("fleets", fleets, TestingSink(fleets_out))
    t0 = time.perf_counter()
    run_main(flow)
    secs = time.perf_counter() - t0
    last = {}
    for k, (_, _, _, _, st) in engines_out:
        last[int(k)] = st
    ids = list(last)
    v = list(last.values())
    e = final_tables(
        ids,
        [s["engine_temp"] for s in v],
        [s["fan_temp"] for s in v],
        [s["coolant_vol"] for s in v],
        [s["status"] for s in v],
        [s["fleet"] for s in v],
    )
    return secs, e, None


def run_pathway(ticks, agents):
    import pathway as pw

    t = pa.concat_tables([pa.Table.from_batches([b]) for b in ticks])
    t = t.append_column("seq", pa.array(np.arange(t.num_rows, dtype=np.int64)))
    df = t.to_pandas()
    t0 = time.perf_counter()
    ev = pw.debug.table_from_pandas(df)
    latest = ev.groupby(pw.this.engine_id).reduce(
        pw.this.engine_id,
        last=pw.reducers.argmax(pw.this.seq),
    )
    last_rows = latest.select(
        pw.this.engine_id,
        engine_temp=ev.ix(pw.this.last).engine_temp,
        fan_temp=ev.ix(pw.this.last).fan_temp,
        coolant_vol=ev.ix(pw.this.last).coolant_vol,
        fleet_id=ev.ix(pw.this.last).fleet_id,
    )
    dec = ev.filter((pw.this.engine_temp > UP) | (pw.this.engine_temp < DOWN))
    dec_last = dec.groupby(pw.this.engine_id).reduce(
        pw.this.engine_id, last=pw.reducers.argmax(pw.this.seq)
    )
    dec_rows = dec_last.select(
        pw.this.engine_id, red=pw.if_else(dec.ix(pw.this.last).engine_temp > UP, 1, 0)
    )
    final = last_rows.join_left(dec_rows, pw.left.engine_id == pw.right.engine_id).select(
        *pw.left, status=pw.coalesce(pw.right.red, 0)
    )
    out = pw.debug.table_to_pandas(final)
    secs = time.perf_counter() - t0
    e = final_tables(
        out["engine_id"].to_numpy(),
        out["engine_temp"].to_numpy(),
        out["fan_temp"].to_numpy(),
        out["coolant_vol"].to_numpy(),
        out["status"].to_numpy(),
        out["fleet_id"].to_numpy(),
    )
    return secs, e, None


def run_scatter(ticks, agents):
    from bench.common import raw_scatter

    cols = [np.zeros(agents, np.float32) for _ in range(3)]
    rng = np.random.default_rng(0)
    prepared = []
    for b in ticks:
        rows = rng.integers(0, agents, b.num_rows).astype(np.int32)
        prepared.append(
            (rows, *(b.column(c).to_numpy() for c in ("engine_temp", "fan_temp", "coolant_vol")))
        )
    raw_scatter(*prepared[0], *cols)
    t0 = time.perf_counter()
    for p in prepared:
        raw_scatter(*p, *cols)
    return time.perf_counter() - t0, None, None


CONTENDERS = {
    "vecswim": run_vecswim,
    "naive Python": run_naive,
    "polars per tick": run_polars,
    "DuckDB per tick": run_duckdb,
    "Bytewax": run_bytewax,
    "Pathway": run_pathway,
    "raw numba scatter": run_scatter,
}


def _child(name, agents, events, tick, queue):
    try:
        ticks = make_ticks(agents, events, tick)
        if name == "vecswim":
            from vecswim.scenarios import engines

            from vecswim import scenarios

            scenarios.warm_up(engines)
        secs, tables, emitted = CONTENDERS[name](ticks, agents)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        queue.put(("ok", secs, tables, emitted, rss))
    except ImportError as e:
        queue.put(("missing", f"{type(e).__name__}: {e}"))
    except Exception as e:  # a contender that breaks is reported, not hidden
        queue.put(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"))


def run_one(name, agents, events, tick):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(name, agents, events, tick, q))
    p.start()
    res = q.get()
    p.join()
    return res


def scale_point(agents: int, tick: int, ticks: int):
    from bench.common import loaded_engines

    eng, gen = loaded_engines(agents)
    batches = [gen.make(tick) for _ in range(ticks + 2)]
    for b in batches[:2]:
        eng.tick(b)
    secs = [eng.tick(b).seconds for b in batches[2:]]
    return (
        tick * ticks / sum(secs),
        float(np.percentile(np.array(secs) * 1e3, 99)),
        eng.nbytes / eng.agents,
    )


def _scale_child(agents, tick, ticks, queue):
    try:
        queue.put(("ok", *scale_point(agents, tick, ticks)))
    except MemoryError as e:
        queue.put(("error", f"MemoryError: {e}"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=100_000)
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--tick", type=int, default=20_000)
    ap.add_argument("--scale", default="1e5,1e6,1e7,1e8")
    ap.add_argument("--only", default=None, help="comma-separated contenders")
    ap.add_argument("--no-results", action="store_true", help="do not write RESULTS.md")
    args = ap.parse_args()
    names = args.only.split(",") if args.only else list(CONTENDERS)
    results = {}
    for name in names:
        print(f"running {name} ...", flush=True)
        results[name] = run_one(name, args.agents, args.events, args.tick)
    ref = results["vecswim"]
    lines = [
        "| contender | events/s | peak RSS | vs vecswim | same final state | emitted rows |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for name in names:
        r = results[name]
        if r[0] != "ok":
            lines.append(f"| {name} | {r[0]}: {r[1].splitlines()[0][:120]} | | | | |")
            continue
        _, secs, tables, emitted, rss = r
        rate = args.events / secs
        ratio = ref[0] == "ok" and (args.events / ref[1]) / rate
        same = (
            "–"
            if tables is None
            else (
                "yes"
                if tables[0].equals(ref[2][0]) and tables[1].equals(ref[2][1])
                else "**WRONG**"
            )
        )
        em = (
            "–"
            if emitted is None
            else (f"{emitted:,}" + ("" if emitted == ref[3] else " (**differs**)"))
        )
        vs_txt = f"{ratio:.1f}x" if name != "raw numba scatter" else f"vecswim = {ratio:.3f} of it"
        lines.append(
            f"| {name} | {rate:,.0f} | {rss / 2**20:,.0f} MiB | "
            f"{'1.0x' if name == 'vecswim' else vs_txt} | {same} | {em} |"
        )
    table = "\n".join(lines)
    print(table)

    scale_rows = ["| agents | events/s | tick p99 | bytes/agent |", "|---:|---:|---:|---:|"]
    xs, rates = [], []
    for a in (int(float(x)) for x in args.scale.split(",") if x):
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        p = ctx.Process(target=_scale_child, args=(a, args.tick * 10, 10, q))
        p.start()
        res = q.get()
        p.join()
        if res[0] != "ok":
            scale_rows.append(f"| {a:,} | {res[1]} | | |")
            continue
        _, rate, p99, bpa = res
        xs.append(a)
        rates.append(rate)
        scale_rows.append(f"| {a:,} | {rate:,.0f} | {p99:.1f} ms | {bpa:.1f} |")
        print(scale_rows[-1], flush=True)
    scale = "\n".join(scale_rows)
    if xs:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(xs, rates, marker="o")
        ax.set_xscale("log")
        ax.set_xlabel("agents")
        ax.set_ylabel(f"events/s (ticks of {args.tick * 10} events)")
        ax.set_title("vecswim engines: throughput vs agents")
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        fig.savefig(HERE / "scale.png", dpi=100)
    if not args.no_results:
        write_results(args, table, scale)


def write_results(args, table: str, scale: str) -> None:
    import duckdb
    import numba
    import polars

    import vecswim

    versions = (
        f"vecswim {vecswim.__version__}, numba {numba.__version__}, numpy "
        f"{np.__version__}, pyarrow {pa.__version__}, polars {polars.__version__}, "
        f"duckdb {duckdb.__version__}"
    )
    from importlib.metadata import PackageNotFoundError, version

    for mod in ("bytewax", "pathway"):
        try:
            versions += f", {mod} {version(mod)}"
        except PackageNotFoundError:
            versions += f", {mod} not installed"
    text = f"""<!-- compare:begin (generated by `python -m bench.compare`; do not edit) -->
## Side by side (issue: step 4)

Generated {dt.date.today()} by `python -m bench.compare --agents {args.agents} --events
{args.events} --tick {args.tick} --scale {args.scale}` on {platform.machine()}, 2 cores,
24 GiB, Python {platform.python_version()}; {versions}. Each contender in its own process,
same pre-generated events; "same final state" compares every engine's columns, fleet and
status and every fleet's engine and red counts with vecswim's.

{table}

Scale curve (vecswim alone, ticks of {args.tick * 10:,} events, all agents created up front;
plot: `bench/scale.png`):

{scale}
<!-- compare:end -->"""
    path = HERE / "RESULTS.md"
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    if "<!-- compare:begin" in old:
        head, rest = old.split("<!-- compare:begin", 1)
        tail = rest.split("<!-- compare:end -->", 1)[1]
        new = head + text + tail
    else:
        new = old.rstrip() + "\n\n" + text + "\n"
    path.write_text(new)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
